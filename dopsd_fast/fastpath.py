"""The fast path of a training run (``fast.enabled``): the family's packed fast model on the run's
weights behind the pair protocol (:mod:`dopsd_fast.pair`): the packed double forward for the
roll-out, one branch for validation and SFT, FP8 and CUDA graphs as configured."""

from __future__ import annotations

import contextlib
import logging

import torch

from dopsd_fast.errors import ConfigError
from dopsd_fast.pair import EagerPair, branch_key, flatten_contexts, unflatten_contexts
from dopsd_fast.profiling import nvtx_range

log = logging.getLogger("dopsd_fast")


def resolve_checkpoint_layers(fc, n_layers: int, shape, backward: str, device) -> int:
    """``fast.checkpoint`` -> how many main layers run under gradient checkpointing (``auto``: the
    fewest that make the memory model's predicted peak fit the budget, :mod:`dopsd_fast.memory`)."""
    from dopsd_fast.memory import checkpoint_layers_for, fmt_gb, memory_budget_bytes, peak_bytes

    if fc.checkpoint == "none":
        return 0
    if fc.checkpoint == "all":
        return n_layers
    if not isinstance(fc.checkpoint, str):
        return min(int(fc.checkpoint), n_layers)
    budget = memory_budget_bytes(fc.memory_budget_gb, device)
    n = min(checkpoint_layers_for(shape, "fast", backward, budget), n_layers)
    log.info("fast.checkpoint=auto: %d of %d main layers checkpointed (predicted peak %s beyond the weights, "
             "budget %s, backward %s)", n, n_layers, fmt_gb(peak_bytes(shape, "fast", backward, n)["total"]),
             fmt_gb(budget) if budget else "unlimited", backward)
    return n


class FastPath:
    """The fast implementation of the pair protocol (:mod:`dopsd_fast.pair`) for a training run: the
    family's fast model (its spec's ``fast_model_class``) on the run's weights, the ops, FP8, gradient
    checkpointing and CUDA graphs as configured and as the family supports (refused earlier, when
    the config is validated, otherwise)."""

    def __init__(self, cfg, adapter, weights, max_tokens: int, backward: str | None = None, mem_shape=None):
        """``backward``: the resolved schedule (default: ``dopsd.backward``, ``auto`` read as ``once``);
        ``mem_shape``: the run's :class:`~dopsd_fast.memory.Shape` for ``fast.checkpoint: auto`` (default:
        built from the transformer config, ``max_tokens`` student and teacher tokens)."""
        from dopsd_fast.families import family
        from dopsd_fast.fp8 import apply_fp8
        from dopsd_fast.models.ops import build_ops
        from dopsd_fast.weights import STUDENT, TEACHER

        fc = cfg.fast
        spec = family(cfg.model.family)
        spec.validate(cfg)
        if fc.fp8 != "off" and not cfg.lora.enabled:
            raise ConfigError("config field 'fast.fp8': FP8 is implemented for LoRA runs (the base weights frozen); "
                              "full fine-tuning in FP8 is not")
        self.cfg, self.spec, self.device = cfg, spec, adapter.device
        self.nvtx = fc.nvtx
        tr = weights.transformer
        self.fp8_ctx = apply_fp8(tr, fc.fp8, fc.fp8_recipe, spec)
        ops = build_ops(fc.kernels, fc.attention, self.device, fc.compile_backend if fc.compile else None, fc.gemm)
        if weights.lora:
            student, teacher = (tr, STUDENT), (tr, TEACHER)
        else:
            student, teacher = (tr, None), (weights.teacher_module, None)
        n_ckpt = 0
        backward = backward or (cfg.dopsd.backward if cfg.dopsd.backward != "auto" else "once")
        self.backward = backward
        if "checkpoint" in spec.fast_features:
            from dopsd_fast.memory import shape_of

            if mem_shape is None:
                n_train = sum(p.numel() for p in weights.trainable_parameters())
                mem_shape = shape_of(tr.config, spec, max_tokens, max_tokens,
                                     len(adapter.training_sigmas(cfg.dopsd.rollout)) - 1, n_train)
            n_ckpt = resolve_checkpoint_layers(fc, spec.checkpointable_layers(tr.config), mem_shape, backward,
                                               self.device)
        self.model = spec.fast_model_class()(student, teacher, ops=ops, checkpoint_layers=n_ckpt, nvtx=fc.nvtx,
                                             fp8_ctx=self.fp8_ctx, fp8_teacher=fc.fp8_teacher)
        if fc.fp8 == "native":
            from dopsd_fast.fp8 import NativeFP8, _require_fp8_gpu

            if self.device.type == "cuda":
                _require_fp8_gpu("native")
            self.model.fp8_native = NativeFP8(fc.fp8_recipe)
        self.weights = weights
        modules = {id(student[0]): student[0], id(teacher[0]): teacher[0]}
        self._graph_params = lambda: [p for m in modules.values() for p in m.parameters()]
        self.graphs = None  # {(branch, context structure): GraphCache} with fast.graphs
        self.graph_backend = None  # how graphs are captured (None: CUDA graphs; the tests pass a stand-in)
        if fc.graphs:
            if self.device.type != "cuda":
                raise ConfigError("config field 'fast.graphs': CUDA graphs need a CUDA device")
            self.graphs = {}
        log.info("fast path (%s): ops=%s attention=%s gemm=%s fp8=%s graphs=%s checkpointed layers=%d", spec.title,
                 type(ops).__name__, ops.attention, "cublas" if ops.lora_impl == "torch" else ops.lora_impl, fc.fp8,
                 fc.graphs, n_ckpt)

    def _nv(self, name):
        return nvtx_range(name) if self.nvtx else contextlib.nullcontext()

    def _one(self, which: str, x, sigma, ctx):
        """One branch through the packed model (the other branch not run)."""
        with self.fp8_ctx(which == "s" or self.cfg.fast.fp8_teacher):
            v_s, v_t = self.model.velocity_pair(x, sigma, ctx if which == "s" else None, ctx if which == "t" else None)
        return v_s if which == "s" else v_t

    def _graph(self, which: str, struct):
        """The CUDA-graph cache of one branch and context structure (no-grad forwards only)."""
        from dopsd_fast.graphs import GraphCache

        key = (which, struct)
        if key not in self.graphs:
            def fn(x, sigma, *flat):
                return (self._one(which, x, sigma, unflatten_contexts(struct, flat)),)
            self.graphs[key] = GraphCache(fn, self._graph_params, name=f"{which} forward", backend=self.graph_backend)
        return self.graphs[key]

    def velocity(self, branch: str, x, sigma, ctx):
        """One branch's velocity (``"student"``/``"s"``, ``"teacher"``/``"t"``): the teacher always without
        autograd, through a CUDA graph if on; the student with autograd when grad is enabled."""
        which = branch_key(branch)
        if which == "s" and torch.is_grad_enabled():
            with self._nv("student"):
                return self._one("s", x, sigma, ctx)
        with torch.no_grad(), self._nv(f"{which} forward"):
            if self.graphs is not None:
                struct, flat = flatten_contexts(ctx)
                return self._graph(which, struct)(("velocity",), x, sigma, *flat)[0]
            return self._one(which, x, sigma, ctx)

    def pair_fn(self, ctx_s, ctx_t, backward: str | None = None, finish: bool = False):
        """``(x, sigma) -> (v_student, v_teacher)`` for :func:`~dopsd_fast.algorithm.rollout_loss_paired`:
        one micro-batch's roll-out (the same contexts and weights at every call), ALWAYS the packed
        pair: with ``fast.graphs`` too (a graph of the teacher alone would unpack it from the student's
        GEMMs and attention launch, and lose the shared refiners; the graphs serve the no-grad
        single-branch forwards, :meth:`velocity`). What depends only on
        them is computed at the first state and reused (Z-Image: the context refiner, the teacher's
        always, the student's where ``backward`` (default: the run's schedule) is ``once``, or with
        ``finish``, any schedule: the caller then calls ``fn.finish()`` after the roll-out's last backward)."""
        once = (backward or self.backward) == "once"
        share = self.model.new_share(student="deferred" if finish else "graph" if once else False)

        def fn(x, sigma):  # always the packed pair (with fast.graphs too: the teacher is never unpacked)
            with self._nv("state"), self._nv("student+teacher"), self.fp8_ctx(True):
                return self.model.velocity_pair(x, sigma, ctx_s, ctx_t, share=share)
        fn.share = share
        fn.finish = share.finish if share is not None else (lambda: None)
        return fn


def build_pair(cfg, adapter, weights, backward: str | None = None, mem_shape=None):
    """The run's model behind the protocol: :class:`~dopsd_fast.fastpath.FastPath` with
    ``fast.enabled``, else :class:`EagerPair` on the adapter's diffusers call (with ``fast.compile``:
    diffusers' regional compilation of the repeated blocks)."""
    if cfg.fast.enabled:
        return FastPath(cfg, adapter, weights, max_tokens=mem_shape.tokens_teacher if mem_shape else 4096,
                        backward=backward, mem_shape=mem_shape)
    if cfg.fast.compile:
        adapter.transformer.compile_repeated_blocks(backend=cfg.fast.compile_backend, dynamic=True)
    return EagerPair(adapter.velocity, weights.student, weights.teacher)
