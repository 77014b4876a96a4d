"""The memory model of one training step: what ``dopsd.backward: auto``, ``fast.checkpoint: auto`` and
``dopsd-train --dry-run`` decide from.

Peak memory beyond the weights = saved activations of the student (per roll-out state alive: K with
``once``, 1 with ``stepwise``) + a transient (the largest working set of a forward: the teacher's
layer, attention temporaries) + gradients and AdamW state of the trainable tensors (allocated at the
first step, after any free-memory probe).

The constants are MEASURED by ``benchmarks/perf_model.py --calibrate`` (a whole step at real size
under fake tensors, bf16, stepwise, the peak of live memory beyond the weights): the slope of the peak
over the number of layers gives the bytes one layer keeps per student token, the rest the transient
per teacher token. Each is in elements per token in units of the model width (bf16: 2 bytes each); a
checkpointed layer keeps its input only (1 x width). Model figures until a GPU confirms them.

| family, path | per layer and student token | transient per teacher token |
|---|---|---|
| Z-Image, fast (fused) | 21.2 x dim (0.750 GB per layer at 4608 tokens, dim 3840: 30 vs 20 layers) | 25.0 x dim |
| Z-Image, eager (diffusers) | 39.6 x dim | 8.2 x dim |
| klein, fast | double block 23.3 x D, single block 26.9 x D | 22.3 x D (the editing teacher: 2 images) |
| klein, eager | double 28.8 x D, single 25.7 x D | 10.4 x D |

(Before 2026-11-29 the fake step counted a weight's storage as step memory the first time a view of it
(a transpose in ``F.linear``) was made: the eager constants were 49.8 / 26.7 (Z-Image) and 46.1, 34.4 /
17.7 (klein), the klein fast transient 60.6, each inflated by the weights.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

BYTES = 2  # bf16 activations
PER_TOKEN = {  # elements kept per student token and layer, in units of the width
    ("zimage", "fast"): {"block": 21.2},
    ("zimage", "eager"): {"block": 39.6},
    ("klein", "fast"): {"double": 23.3, "single": 26.9},
    ("klein", "eager"): {"double": 28.8, "single": 25.7},
}
TRANSIENT_PER_TEACHER_TOKEN = {("zimage", "fast"): 25.0, ("zimage", "eager"): 8.2, ("klein", "fast"): 22.3,
                               ("klein", "eager"): 10.4}
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
    width: int
    layers: dict  # block kind -> count (zimage: {"block": n_layers + refiners}; klein: double/single)
    tokens_student: int  # summed over the micro-batch
    tokens_teacher: int
    states: int  # K
    trainable_params: int
    trainable_bytes_per_param: int = 4  # LoRA adapters are fp32


def shape_of(transformer_config, family: str, tokens_student: int, tokens_teacher: int, states: int,
             trainable_params: int, trainable_bytes_per_param: int = 4) -> Shape:
    from dopsd_fast.families import family as family_spec

    width, layers = family_spec(family).memory_layers(transformer_config)
    return Shape(family, width, layers, tokens_student, tokens_teacher, states, trainable_params,
                 trainable_bytes_per_param)


def step_shape(cfg, adapter, buckets, trainable_params: int, trainable_bytes_per_param: int = 4) -> Shape:
    """A run's shape: its largest bucket, context lengths, roll-out states and trainable tensors."""
    from dopsd_fast.families import family

    spec = family(cfg.model.family)
    w, h = max(buckets, key=lambda b: b[0] * b[1])
    _, lh, lw = adapter.latent_shape(h, w)
    tok_s, tok_t = spec.step_tokens(cfg.model, spec.image_tokens((lh, lw)))
    states = len(adapter.training_sigmas(cfg.dopsd.rollout, (lh, lw))) - 1
    b = cfg.data.batch_size
    return shape_of(adapter.transformer.config, spec.name, b * tok_s, b * tok_t, states, trainable_params,
                    trainable_bytes_per_param)


def peak_bytes(s: Shape, path: str, backward: str, checkpoint_layers: int = 0) -> dict:
    """Predicted peak beyond the weights, by part (bytes)."""
    per = PER_TOKEN[(s.family, path)]
    alive = s.states if backward == "once" else 1
    per_state = 0.0
    ck = checkpoint_layers
    for kind, n in s.layers.items():
        c = min(ck, n)
        ck -= c
        per_state += ((n - c) * per[kind] + c * 1.0) * s.width * s.tokens_student * BYTES
    transient = TRANSIENT_PER_TEACHER_TOKEN[(s.family, path)] * s.width * s.tokens_teacher * BYTES
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
    layers checkpointed whatever the schedule (the eager path's ``model.gradient_checkpointing``)."""
    if value != "auto":
        return value
    if budget is None:
        return "once"
    need = peak_bytes(s, path, "once", checkpoint_layers)["total"]
    choice = "once" if need <= budget else "stepwise"
    log.info("dopsd.backward=auto: %s (once needs %.1f GB, budget %.1f GB)", choice, need / 1e9, budget / 1e9)
    return choice


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


# ---- FLOPs of a step (analytic; benchmarks/step_time.py and --dry-run) ----------------------------
def zimage_forward_flops(cfg: dict, n_img: int, cap_lens: list[int], rank: int = 0) -> tuple[float, float]:
    """Analytic FLOPs of one Z-Image forward, ``(GEMMs, attention)``, summed over the samples; with
    ``rank`` the LoRA adapters on the default targets (q, k, v, out, w1, w2, w3 of every block and
    refiner) count with the GEMMs (spec: student forward 63.9 TFLOP at 1024^2, caption 512, r64)."""
    d, ffn = cfg["dim"], int(cfg["dim"] / 3 * 8)
    per_tok = 2 * (4 * d * d + 3 * d * ffn) + 2 * rank * (8 * d + 3 * (d + ffn))
    pad = lambda n: n + (-n) % 32  # noqa: E731
    n_i = pad(n_img)
    gemm = attn = 0.0
    for c in cap_lens:
        c = pad(c)
        s = n_i + c
        gemm += cfg["n_layers"] * s * per_tok + cfg["n_refiner_layers"] * (n_i + c) * per_tok
        attn += cfg["n_layers"] * 4 * s * s * d + cfg["n_refiner_layers"] * 4 * (n_i * n_i + c * c) * d
        gemm += 2 * n_img * 4 * cfg["in_channels"] * d * 2
    return gemm, attn


def flux2_forward_flops(cfg: dict, n_img: int, n_txt: int) -> tuple[float, float]:
    """Analytic FLOPs of one FLUX.2 forward for one sample, ``(GEMMs, attention)``."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    s = n_img + n_txt
    per_tok = 2 * 13 * d * d  # double: qkv 3 + out 1 + ff 6 + 3 (d^2 MACs), single: fused 9 + out 4
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    return blocks * s * per_tok + 2 * n_img * cfg["in_channels"] * d * 2, blocks * 4 * s * s * d


def backward_flops(fwd: tuple[float, float], lora: bool, lora_fwd: float = 0.0) -> float:
    """The student backward: dX of every GEMM (1x its forward) plus, in full fine-tuning, dW (1x
    more); attention backward 2.5x its forward. A LoRA run computes no base-weight gradient; its
    adapters (``lora_fwd`` of the forward's GEMM FLOPs) cost dX + dA/dB, 2x their forward."""
    gemm, attn = fwd
    if lora:
        return (gemm - lora_fwd) + 2.0 * lora_fwd + 2.5 * attn
    return 2.0 * gemm + 2.5 * attn
