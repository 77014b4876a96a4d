"""The fast path of a training run (``fast.enabled``): builds :class:`~dopsd_fast.models.zimage.FastZImage`
on the run's weights and hands the trainer the packed double forward, the no-grad velocity for
validation, FP8 and CUDA graphs as configured."""

from __future__ import annotations

import contextlib
import logging

import torch

from dopsd_fast.config import ConfigError
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
    def __init__(self, cfg, adapter, weights, max_tokens: int, backward: str | None = None, mem_shape=None):
        """``backward``: the resolved schedule (default: ``dopsd.backward``, ``auto`` read as ``once``);
        ``mem_shape``: the run's :class:`~dopsd_fast.memory.Shape` for ``fast.checkpoint: auto`` (default:
        built from the transformer config, ``max_tokens`` student and teacher tokens)."""
        from dopsd_fast.fp8 import apply_fp8
        from dopsd_fast.models.ops import build_ops
        from dopsd_fast.models.zimage import FastZImage
        from dopsd_fast.weights import STUDENT, TEACHER

        fc = cfg.fast
        if cfg.model.family not in ("zimage", "klein"):
            raise ConfigError(f"config field 'fast.enabled': no fast path for model.family={cfg.model.family!r}")
        if cfg.model.family == "klein":
            for field, on in (("fast.fp8", fc.fp8 != "off"), ("fast.graphs", fc.graphs),
                              ("fast.checkpoint", fc.checkpoint not in ("auto", "none", 0))):
                if on:
                    raise ConfigError(f"config field '{field}': not implemented on the FLUX.2-klein fast path yet "
                                      "(packed pass and kernels only)")
        if fc.fp8 != "off" and not cfg.lora.enabled:
            raise ConfigError("config field 'fast.fp8': FP8 is implemented for LoRA runs (the base weights frozen); "
                              "full fine-tuning in FP8 is not")
        self.cfg, self.device = cfg, adapter.device
        self.nvtx = fc.nvtx
        tr = weights.transformer
        self.fp8_ctx = apply_fp8(tr, fc.fp8, fc.fp8_recipe)
        ops = build_ops(fc.kernels, fc.attention, self.device, fc.compile_backend if fc.compile else None)
        tcfg = tr.config
        if weights.lora:
            student, teacher = (tr, STUDENT), (tr, TEACHER)
        else:
            student, teacher = (tr, None), (weights.teacher_module, None)
        if cfg.model.family == "klein":
            from dopsd_fast.models.flux2 import FastFlux2

            n_ckpt = 0
            self.model = FastFlux2(student, teacher, ops=ops, nvtx=fc.nvtx)
        else:
            from dopsd_fast.memory import shape_of

            backward = backward or (cfg.dopsd.backward if cfg.dopsd.backward != "auto" else "once")
            if mem_shape is None:
                n_train = sum(p.numel() for p in weights.trainable_parameters())
                mem_shape = shape_of(tcfg, "zimage", max_tokens, max_tokens, len(weights_sigmas(cfg, adapter)) - 1,
                                     n_train)
            n_ckpt = resolve_checkpoint_layers(fc, tcfg.n_layers, mem_shape, backward, self.device)
            self.model = FastZImage(student, teacher, ops=ops, checkpoint_layers=n_ckpt, nvtx=fc.nvtx,
                                    fp8_ctx=self.fp8_ctx, fp8_teacher=fc.fp8_teacher)
        self.weights = weights
        self.graphs = None
        if fc.graphs:
            if self.device.type != "cuda":
                raise ConfigError("config field 'fast.graphs': CUDA graphs need a CUDA device")
            from dopsd_fast.graphs import GraphCache

            params = lambda: [p for m in {id(student[0]): student[0], id(teacher[0]): teacher[0]}.values()  # noqa: E731
                              for p in m.parameters()]
            self.graphs = {w: GraphCache(self._nograd_fn(w), params, name=f"{w} forward") for w in ("s", "t")}
        log.info("fast path: ops=%s attention=%s fp8=%s graphs=%s checkpointed layers=%d", type(ops).__name__,
                 ops.attention, fc.fp8, fc.graphs, n_ckpt)

    def _nv(self, name):
        return nvtx_range(name) if self.nvtx else contextlib.nullcontext()

    def _nograd_fn(self, which):
        if self.cfg.model.family == "klein":
            def fn_klein(x, sigma, *ctx):
                v_s, v_t = self.model.velocity_pair(x, sigma, list(ctx) if which == "s" else None,
                                                    list(ctx) if which == "t" else None)
                return (v_s if which == "s" else v_t,)
            return fn_klein

        def fn(x, sigma, *feats):
            t = 1.0 - sigma.float()
            with self.fp8_ctx(which == "s" or self.cfg.fast.fp8_teacher):
                if which == "s":
                    out, _ = self.model.forward_pair(x, t, list(feats), None)
                else:
                    _, out = self.model.forward_pair(x, t, None, list(feats), student=False)
            return (-out.float(),)
        return fn

    def velocity(self, which: str, x, sigma, ctx):
        """No-grad velocity of one branch (``"s"`` student, ``"t"`` teacher), through a graph if on."""
        feats = ctx if self.cfg.model.family == "klein" else [c.features for c in ctx]
        with torch.no_grad(), self._nv(f"{which} forward"):
            if self.graphs is not None:
                return self.graphs[which](("velocity",), x, sigma, *feats)[0]
            return self._nograd_fn(which)(x, sigma, *feats)[0]

    def pair_fn(self, ctx_s, ctx_t):
        """``(x, sigma) -> (v_student, v_teacher)`` for :func:`~dopsd_fast.algorithm.rollout_loss_paired`."""
        def fn(x, sigma):
            with self._nv("state"):
                if self.graphs is not None:  # teacher through its graph, student eager (autograd)
                    v_t = self.velocity("t", x, sigma, ctx_t)
                    with self._nv("student"), self.fp8_ctx(True):
                        v_s, _ = self.model.velocity_pair(x, sigma, ctx_s, None)
                    return v_s, v_t
                with self._nv("student+teacher"), self.fp8_ctx(True):
                    return self.model.velocity_pair(x, sigma, ctx_s, ctx_t)
        return fn


def weights_sigmas(cfg, adapter):
    return adapter.training_sigmas(cfg.dopsd.rollout)
