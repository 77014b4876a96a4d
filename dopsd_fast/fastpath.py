"""The fast path of a training run (``fast.enabled``): the family's packed fast model on the run's
weights behind the pair protocol (:class:`~dopsd_fast.pair.FastPair`), as the run plan
(:mod:`dopsd_fast.plan`) says: the ops, the attention backend, gradient checkpointing, FP8, and CUDA
graphs for the no-grad single-branch forwards. :func:`build_pair` builds the run's pair, eager or fast."""

from __future__ import annotations

import logging

import torch

from dopsd_fast.errors import ConfigError
from dopsd_fast.fp8 import NativeFP8, apply_fp8, require_fp8_gpu
from dopsd_fast.graphs import GraphCache
from dopsd_fast.models.ops import FusedOps, TorchOps, compile_ops
from dopsd_fast.pair import EagerPair, FastPair, branch_key, flatten_contexts, unflatten_contexts
from dopsd_fast.weights import STUDENT, TEACHER

log = logging.getLogger("dopsd_fast")


def ops_for(plan, device: torch.device):
    """The fast model's operations as the plan says: our fused kernels or eager PyTorch (compiled with
    ``compile: ops``), the attention backend, the paired linear's GEMM."""
    if plan.compile == "ops":
        return compile_ops(TorchOps(attention=plan.attention), plan.compile_backend)
    if plan.kernels:
        return FusedOps(attention=plan.attention, gemm=plan.gemm)
    return TorchOps(attention=plan.attention)


class FastPath(FastPair):
    """The fast pair of a training run: the family's fast model (its spec's ``fast_model_class``) on the
    run's weights, built as the run plan says (refused earlier, when the config is validated, where the
    family does not support a feature); CUDA graphs serve the no-grad single-branch forwards."""

    def __init__(self, cfg, spec, device: torch.device, weights, plan):
        if plan.fp8 != "off" and not weights.lora:
            raise ConfigError("config field 'fast.fp8': FP8 is implemented for LoRA runs (the base weights frozen); "
                              "full fine-tuning in FP8 is not")
        self.cfg, self.spec, self.device, self.plan = cfg, spec, device, plan
        tr = weights.transformer
        fp8_ctx = apply_fp8(tr, plan.fp8, cfg.fast.fp8_recipe, spec)
        ops = ops_for(plan, device)
        if weights.lora:
            student, teacher = (tr, STUDENT), (tr, TEACHER)
        else:
            student, teacher = (tr, None), (weights.teacher_module, None)
        model = spec.fast_model_class()(student, teacher, ops=ops, checkpoint_layers=plan.checkpoint_layers,
                                        nvtx=cfg.fast.nvtx, fp8_ctx=fp8_ctx, fp8_teacher=cfg.fast.fp8_teacher)
        if plan.fp8 == "native":
            if device.type == "cuda":
                require_fp8_gpu("native")
            model.fp8_native = NativeFP8(cfg.fast.fp8_recipe, dgrad=cfg.fast.fp8_dgrad)
        super().__init__(model, backward=plan.backward, fp8_ctx=fp8_ctx, fp8_teacher=cfg.fast.fp8_teacher,
                         nvtx=cfg.fast.nvtx)
        self.weights = weights
        modules = {id(student[0]): student[0], id(teacher[0]): teacher[0]}
        self._graph_params = lambda: [p for m in modules.values() for p in m.parameters()]
        self.graphs = {} if plan.graphs else None  # {(branch, context structure): GraphCache}
        self.graph_backend = None  # how graphs are captured (None: CUDA graphs; the tests pass a stand-in)

    def _graph(self, which: str, struct):
        """The CUDA-graph cache of one branch and context structure (no-grad forwards only)."""
        key = (which, struct)
        if key not in self.graphs:
            def forward(x, sigma, *flat):
                return (self.single_branch(which, x, sigma, unflatten_contexts(struct, flat)),)
            self.graphs[key] = GraphCache(forward, self._graph_params, name=f"{which} forward",
                                          backend=self.graph_backend)
        return self.graphs[key]

    def velocity(self, branch: str, x, sigma, ctx):
        """One branch's velocity; the no-grad ones through a CUDA graph with ``fast.graphs``."""
        which = branch_key(branch)
        if self.graphs is None or (which == "s" and torch.is_grad_enabled()):
            return super().velocity(branch, x, sigma, ctx)
        with torch.no_grad(), self._region(f"{which} forward"):
            struct, flat = flatten_contexts(ctx)
            return self._graph(which, struct)(("velocity",), x, sigma, *flat)[0]


def build_pair(cfg, spec, adapter, weights, plan):
    """The run's model behind the pair protocol: :class:`FastPath` on the fast path, else
    :class:`~dopsd_fast.pair.EagerPair` on the adapter's diffusers call (gradient checkpointing of every
    block and diffusers' regional compilation as the plan says)."""
    if plan.path == "fast":
        return FastPath(cfg, spec, adapter.device, weights, plan)
    if plan.checkpoint_layers:
        weights.transformer.enable_gradient_checkpointing()
    if plan.compile == "regional":
        adapter.transformer.compile_repeated_blocks(backend=plan.compile_backend, dynamic=True)
    return EagerPair(adapter.velocity, weights.student, weights.teacher)
