"""The run plan: every choice about how a run executes (eager or fast path, backward schedule,
gradient checkpointing, attention backend, kernels, GEMM, compile, FP8, CUDA graphs), resolved ONCE
at start-up from the config, the device and the memory model (:mod:`dopsd_fast.memory`), logged as
one block, and read by the trainer, the fast path and ``dopsd-train --dry-run`` alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dopsd_fast import memory
from dopsd_fast.errors import ConfigError
from dopsd_fast.models.ops import resolve_attention

log = logging.getLogger("dopsd_fast")


@dataclass(frozen=True)
class RunPlan:
    path: str  # "fast" | "eager"
    backward: str  # "once" | "stepwise"
    checkpoint_layers: int  # main layers under gradient checkpointing (the eager path: none or all)
    layers: int  # the main layers that can be checkpointed
    kernels: bool  # our fused kernels (fast path)
    attention: str  # the fast path's attention backend ("diffusers" on the eager path: the model's own)
    gemm: str  # the paired LoRA linear's base GEMM: "cublas" | "triton" | "auto" (per shape: measured rates)
    compile: str  # "off" | "ops" (the fast path's element-wise ops) | "regional" (diffusers' repeated blocks)
    compile_backend: str
    fp8: str
    graphs: bool
    budget_bytes: float | None  # the memory budget the choices were made against (None: no limit)
    peak: dict = field(default_factory=dict)  # predicted peak beyond the weights, by part (bytes)
    reasons: tuple = ()  # one line per automatic choice: what was chosen and why

    @property
    def over_budget(self) -> bool:
        """The predicted peak passes the budget the plan was made against."""
        return self.budget_bytes is not None and bool(self.peak) and self.peak["total"] > self.budget_bytes

    def describe(self) -> str:
        """The plan as one block (what the trainer logs at start-up and the dry run prints)."""
        ck = f"{self.checkpoint_layers} of {self.layers} main layers"
        rows = [f"path {self.path}, backward {self.backward}, gradient checkpointing {ck}"]
        if self.path == "fast":
            rows.append(f"kernels {'fused' if self.kernels else 'eager PyTorch'}, attention {self.attention}, "
                        f"GEMM {self.gemm}, compile {self.compile}, FP8 {self.fp8}, CUDA graphs "
                        f"{'on' if self.graphs else 'off'}")
        elif self.compile != "off":
            rows.append(f"compile {self.compile} ({self.compile_backend})")
        budget = memory.fmt_gb(self.budget_bytes) if self.budget_bytes is not None else "no limit"
        if self.peak:
            rows.append(f"predicted peak beyond the weights {memory.fmt_gb(self.peak['total'])} (memory model), "
                        f"budget {budget}")
        rows += list(self.reasons)
        return "run plan:\n" + "\n".join(f"  {r}" for r in rows)


def _checkpoint_layers(cfg, spec, transformer_config, shape, path, backward, budget, reasons) -> int:
    """``model.gradient_checkpointing`` -> the number of main layers checkpointed."""
    setting = cfg.model.gradient_checkpointing
    n = spec.checkpointable_layers(transformer_config) if path == "fast" else sum(shape.layers.values())
    if path == "fast" and "checkpoint" not in spec.fast_features:
        if setting not in ("auto", "none", 0):
            raise ConfigError(f"config field 'model.gradient_checkpointing': not implemented on the {spec.title} "
                              "fast path")
        return 0
    if setting == "none":
        return 0
    if setting == "all":
        return n
    if setting != "auto":
        if path == "eager" and 0 < int(setting) < n:
            raise ConfigError(f"config field 'model.gradient_checkpointing': the eager path checkpoints every block "
                              f"or none (diffusers), got {setting}; use all, none or auto (or fast.enabled=true)")
        return min(int(setting), n)
    fewest = memory.checkpoint_layers_for(shape, path, backward, budget)
    if path == "eager":  # diffusers checkpoints all blocks or none
        fewest = n if fewest else 0
    fewest = min(fewest, n)
    if budget is not None:
        peak = memory.peak_bytes(shape, path, backward, fewest)["total"]
        if peak <= budget:
            reasons.append(f"gradient checkpointing auto: {fewest} of {n} main layers, the fewest whose predicted peak "
                           f"({memory.fmt_gb(peak)}) fits the budget")
        else:
            reasons.append(f"gradient checkpointing auto: {fewest} of {n} main layers, and the predicted peak "
                           f"({memory.fmt_gb(peak)}) still passes the budget ({memory.fmt_gb(budget)})")
    return fewest


def check_compile_backend(fc) -> None:
    """With ``fast.compile`` on, ``fast.compile_backend`` must name a torch.compile backend of this
    environment (torch's own error came at the first compiled call, naming no field). The trainer calls it
    before the model is built; :func:`resolve_plan` (the dry run's) too."""
    if fc.compile != "off":
        import torch._dynamo

        if fc.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"config field 'fast.compile_backend': {fc.compile_backend!r} is not a torch.compile "
                              f"backend here; use one of {torch._dynamo.list_backends()} (inductor: the default)")


def resolve_plan(cfg, spec, transformer_config, shape, device: torch.device, budget: float | None,
                 gpu_name: str | None = None) -> RunPlan:
    """The plan of a run of family ``spec`` with the step ``shape`` (:func:`dopsd_fast.memory.step_shape`)
    on ``device``, against ``budget`` bytes beyond the weights (None: no limit). ``gpu_name`` (with a CUDA
    ``device``) plans for a GPU that is not here, as the dry run does: nothing touches CUDA."""
    path = "fast" if cfg.fast.enabled else "eager"
    fc = cfg.fast
    reasons: list[str] = []
    # the backward schedule first (with the checkpointing a fixed setting already implies), then the
    # fewest checkpointed layers that fit with it
    fixed_ckpt = {"all": sum(shape.layers.values()), "none": 0, "auto": 0}.get(cfg.model.gradient_checkpointing,
                                                                                 cfg.model.gradient_checkpointing)
    backward = memory.resolve_backward(cfg.dopsd.backward, shape, path, budget, int(fixed_ckpt))
    if cfg.dopsd.backward == "auto" and budget is not None:
        once = memory.peak_bytes(shape, path, "once", int(fixed_ckpt))["total"]
        reasons.append(f"backward auto: {backward} (once needs {memory.fmt_gb(once)} beyond the weights)")
    ckpt = _checkpoint_layers(cfg, spec, transformer_config, shape, path, backward, budget, reasons)
    layers = spec.checkpointable_layers(transformer_config) if path == "fast" else sum(shape.layers.values())
    if path == "fast":
        kernels = fc.compile != "ops" and (fc.kernels == "on" or (fc.kernels == "auto" and device.type == "cuda"))
        attention = resolve_attention(fc.attention, device, gpu_name)
        if attention == "triton" and not kernels and device.type != "cuda":
            attention = "sdpa"  # our attention kernel without the fused ops, off the GPU: PyTorch's instead
            if fc.attention == "triton":
                reasons.append("attention triton -> sdpa: off the GPU our attention kernel runs with the fused "
                               "kernels only (fast.kernels=on)")
        gemm = fc.gemm
        if not kernels and gemm != "auto":
            reasons.append(f"GEMM {gemm}: not used, the paired LoRA linear's GEMM is chosen with the fused kernels "
                           "(here eager PyTorch ops)")
        if fc.graphs and device.type != "cuda" and gpu_name is None:
            raise ConfigError("config field 'fast.graphs': CUDA graphs need a CUDA device")
    else:
        kernels, attention, gemm = False, "diffusers", "cublas"
    check_compile_backend(fc)
    return RunPlan(path=path, backward=backward, checkpoint_layers=ckpt, layers=layers, kernels=kernels,
                   attention=attention, gemm=gemm, compile=fc.compile, compile_backend=fc.compile_backend,
                   fp8=fc.fp8, graphs=fc.graphs, budget_bytes=budget,
                   peak=memory.peak_bytes(shape, path, backward, ckpt), reasons=tuple(reasons))
