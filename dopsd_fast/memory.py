"""The memory model of one training step: what ``dopsd.backward: auto``, ``model.gradient_checkpointing: auto`` and
``dopsd-train --dry-run`` decide from.

Peak memory beyond the weights = saved activations of the student (per roll-out state alive: K with
``once``, 1 with ``stepwise``) + a transient (the largest working set of a forward: the teacher's
layer, attention temporaries) + gradients and AdamW state of the trainable tensors (allocated at the
first step, after any free-memory probe).

The constants are MEASURED by ``benchmarks/perf_model.py --calibrate`` (a whole step at real size
under fake tensors, bf16, stepwise, the peak of live memory beyond the weights): the slope of the peak
over the number of layers gives the bytes one layer keeps per student token, the rest the transient
per teacher token. Each is in elements per token in units of the model width (bf16: 2 bytes each); a
checkpointed layer keeps its input only (1 x width). Model figures until a GPU confirms them. Each
family's constants are its spec's (``spec.memory``, :class:`~dopsd_fast.families.spec.MemoryCoefficients`):

| family, path | per layer and student token | transient per teacher token |
|---|---|---|
| Z-Image, fast (fused) | 21.2 x dim (0.750 GB per layer at 4608 tokens, dim 3840: 30 vs 20 layers) | 25.0 x dim |
| Z-Image, eager (diffusers) | 39.6 x dim | 8.2 x dim |
| klein, fast | double block 23.3 x D, single block 26.9 x D | 22.3 x D (the editing teacher: 2 images) |
| klein, eager | double 28.8 x D, single 25.7 x D | 10.4 x D |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BYTES = 2  # bf16 activations
GPU_MEMORY_GB = {"h100": 80.0, "h200": 141.0, "b200": 180.0, "a100-80": 80.0, "a100-40": 40.0, "l40s": 48.0,
                 "4090": 24.0}
# The fake-tensor model's predicted step time per floor FLOP at Z-Image-Turbo size (stepwise, no
# checkpointing; GEMM 700 TFLOP/s, attention 350/280, 2.7 TB/s, 5 us per launch): eager 3.60 s and
# fast 1.98 s for 867 TFLOP. An ESTIMATE for --dry-run, scaled by the config's floor FLOPs.
SECONDS_PER_FLOOR_TFLOP = {"eager": 3.60 / 866.9, "fast": 1.98 / 866.9}


@dataclass
class Shape:
    """What the memory model needs of a step."""
    family: str
    coefficients: object  # the family's MemoryCoefficients (spec.memory)
    width: int
    layers: dict  # block kind -> count (zimage: {"block": n_layers + refiners}; klein: double/single)
    tokens_student: int  # summed over the micro-batch
    tokens_teacher: int
    states: int  # K
    trainable_params: int
    trainable_bytes_per_param: int = 4  # LoRA adapters are fp32


def shape_of(transformer_config, spec, tokens_student: int, tokens_teacher: int, states: int,
             trainable_params: int, trainable_bytes_per_param: int = 4) -> Shape:
    """The shape of a step of family ``spec`` (a :class:`~dopsd_fast.families.spec.FamilySpec`)."""
    width, layers = spec.memory_layers(transformer_config)
    return Shape(spec.name, spec.memory, width, layers, tokens_student, tokens_teacher, states, trainable_params,
                 trainable_bytes_per_param)


def step_shape(cfg, adapter, buckets, trainable_params: int, trainable_bytes_per_param: int = 4) -> Shape:
    """A run's shape: its largest bucket, context lengths, roll-out states and trainable tensors."""
    spec = adapter.spec
    w, h = max(buckets, key=lambda b: b[0] * b[1])
    _, lh, lw = adapter.latent_shape(h, w)
    tok_s, tok_t = spec.step_tokens(cfg.model, spec.image_tokens((lh, lw)))
    states = len(adapter.training_sigmas(cfg.dopsd.rollout, (lh, lw))) - 1
    b = cfg.data.batch_size
    return shape_of(adapter.transformer.config, spec, b * tok_s, b * tok_t, states, trainable_params,
                    trainable_bytes_per_param)


def peak_bytes(s: Shape, path: str, backward: str, checkpoint_layers: int = 0) -> dict:
    """Predicted peak beyond the weights, by part (bytes)."""
    per = s.coefficients.per_token[path]
    alive = s.states if backward == "once" else 1
    per_state = 0.0
    ck = checkpoint_layers
    for kind, n in s.layers.items():
        c = min(ck, n)
        ck -= c
        per_state += ((n - c) * per[kind] + c * 1.0) * s.width * s.tokens_student * BYTES
    transient = s.coefficients.transient_per_teacher_token[path] * s.width * s.tokens_teacher * BYTES
    optimizer = s.trainable_params * (s.trainable_bytes_per_param + 8)  # gradient + AdamW m, v (fp32)
    # the fast path's roll-out keeps the student's and the teacher's fp32 adapters cast to bf16 (its
    # RolloutShare); fp32 trainable tensors are LoRA adapters here (full fine-tuning trains the model dtype)
    casts = 2 * s.trainable_params * BYTES if path == "fast" and s.trainable_bytes_per_param == 4 else 0
    acts = alive * per_state
    return {"activations": acts, "transient": transient, "optimizer": optimizer, "casts": casts,
            "total": acts + transient + optimizer + casts}


def memory_budget_bytes(budget_gb: float | None, device: torch.device) -> float | None:
    """``fast.memory_budget_gb`` if set; on CUDA 85% of the free memory now (weights loaded); else no
    limit (None)."""
    if budget_gb is not None:
        return budget_gb * 1e9
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.85 * free
    return None


def resolve_backward(value: str, s: Shape, path: str, budget: float | None, checkpoint_layers: int = 0) -> str:
    """``dopsd.backward: auto``: ``once`` (the authors' schedule) where its peak fits the budget, else
    ``stepwise`` (the same gradient, one state's activations alive, no recompute). ``checkpoint_layers``:
    layers checkpointed whatever the schedule (a fixed ``model.gradient_checkpointing``)."""
    if value != "auto":
        return value
    if budget is None:
        return "once"
    return "once" if peak_bytes(s, path, "once", checkpoint_layers)["total"] <= budget else "stepwise"


def checkpoint_layers_for(s: Shape, path: str, backward: str, budget: float | None) -> int:
    """The fewest main layers to checkpoint so the predicted peak fits ``budget`` (0 when it fits or
    there is no limit; every layer when even that does not fit)."""
    if budget is None:
        return 0
    n = sum(s.layers.values())
    if peak_bytes(s, path, backward, 0)["total"] <= budget:
        return 0
    lo, hi = 0, n  # peak is decreasing in the number of checkpointed layers
    while lo < hi:
        mid = (lo + hi) // 2
        if peak_bytes(s, path, backward, mid)["total"] <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def predicted_step_seconds(floor_flops: float, path: str) -> float:
    return floor_flops / 1e12 * SECONDS_PER_FLOOR_TFLOP[path]


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if math.isfinite(b) else "?"


# ---- FLOPs of a step (analytic; benchmarks/step_time.py and --dry-run; each family's forward is its
# spec's ``forward_flops``) ------------------------------------------------------------------------
def backward_flops(fwd: tuple[float, float], lora: bool, lora_fwd: float = 0.0) -> float:
    """The student backward: dX of every GEMM (1x its forward) plus, in full fine-tuning, dW (1x
    more); attention backward 2.5x its forward. A LoRA run computes no base-weight gradient; its
    adapters (``lora_fwd`` of the forward's GEMM FLOPs) cost dX + dA/dB, 2x their forward."""
    gemm, attn = fwd
    if lora:
        return (gemm - lora_fwd) + 2.0 * lora_fwd + 2.5 * attn
    return 2.0 * gemm + 2.5 * attn
