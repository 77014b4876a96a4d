"""The memory model of one training step: what ``dopsd.backward: auto``, ``model.gradient_checkpointing: auto`` and
``dopsd-train --dry-run`` decide from.

It predicts what ``torch.cuda.max_memory_allocated`` counts beyond the weights, term by term
(:data:`TERMS`; sizes at the configuration an H200 measured: Z-Image-Turbo, 1024^2, K = 4, LoRA r64,
captions 512 / 1024, stepwise; fast path with no checkpointing / eager reference with every block
checkpointed):

| term | what | fast | eager, ckpt |
|---|---|---|---|
| activations | what the student's autograd saves for the states alive (K with ``once``, 1 with ``stepwise``): per layer and student token (the family spec's ``memory.per_token``; a checkpointed layer keeps its input, 1 x width), plus a per-state intercept (``memory.per_state_extra``, x width^2: what a state holds beyond layers x slope) | 22.72 GB | 1.13 GB |
| recompute | with checkpointed layers: one layer's activations, re-made in its backward | 0 | 1.38 GB |
| transient | the working set on top at the peak: the teacher's layer in the forward, the roll-out's inputs (``memory.transient_per_teacher_token``) | 1.06 GB | 0.65 GB |
| gradients | fp32 gradients of the trainable tensors (a stepwise peak follows the first state's backward; a ``once`` peak, at the start of the backward, holds few: counted whole, high by at most this) | 0.64 GB | 0.64 GB |
| optimizer | AdamW's two moments, from the first optimizer step on | 1.27 GB | 1.27 GB |
| casts | fast path, LoRA: both adapters cast to bf16 once per roll-out (``RolloutShare``) | 0.64 GB | 0 |
| workspace | cuBLAS's workspace, 32 MiB per handle and stream on sm_90+ (cuBLASLt shares it), one for the forward's thread and one for autograd's | 0.07 GB | 0.07 GB |
| unseen | what a fake-tensor step cannot see: scratch inside library calls (SDPA's fp32 dQ accumulator, 0.07 GB here), the allocator's rounding of blocks | 0.09 GB | 0.09 GB |
| fp8_weights | ``fast.fp8: native`` only: the block linears' e4m3 copies (and with ``fast.fp8_dgrad`` their transposes), kept beside the weights for the run (:func:`fp8_weight_bytes`); not measured on a GPU | 0 | 0 |
| total | | 26.48 GB | 5.23 GB |

activations, transient (and the checks of gradients and casts) come from ``benchmarks/perf_model.py
--calibrate``: whole steps at real size under fake tensors, bf16, the storages alive at the peak,
each term taken apart (one layer's slope from two layer counts, one state from ``once`` against
``stepwise``), kept in elements per token in units of the model width (bf16: 2 bytes each; the
per-state intercept in units of width^2: small, -0.15 GB at Z-Image's 6B (-5.2), -0.06 GB at its
1536-wide size (-13.0), where the slope is 20.3 x width, as at 6B).
gradients, optimizer, casts, workspace are byte counts. unseen is the one constant fitted on a GPU:
on the H200 (2026-12-04, ``benchmarks/results/2026-12-04-h200``) the fast step peaked at 41.33 GB and
the checkpointed eager reference at 20.09 GB, each with the weights (13.58 GB: base and both fp32
adapters) and step_time's snapshot of the adapters (1.27 GB) in them; what the other terms leave is
0.09 and 0.10 GB, so 0.09. The predictions are then 41.33 and 20.08 GB; the m3 peaks of the same run
(our attention, no snapshot, step 0 before AdamW's state exists) 38.79 / 40.06 GB for 38.77 / 40.05
measured, nothing fitted on them (tests/test_memory.py). (The "40 % low" read of that run set the
README's activations + transient, 25.0 GB, against the whole 41.3 GB; the model's total then was 27.5
GB beyond the weights against 26.5 measured beyond the weights and the snapshot, its transient
holding the gradients and casts a second time.)

Each family's constants are its spec's (``spec.memory``, :class:`~dopsd_fast.families.spec.MemoryCoefficients`):

| family, path | per layer and student token | per state | transient per teacher token |
|---|---|---|---|
| Z-Image, fast (fused) | 20.2 x dim (0.715 GB per layer at 4608 tokens, dim 3840: 30 vs 20 layers, less their adapters' gradients and casts) | -5.2 x dim^2 | 27.0 x dim |
| Z-Image, eager (diffusers) | 39.1 x dim (26 of the 45 GB of its stepwise peak are casts' outputs, ``_to_copy``) | -12.3 x dim^2 | 16.5 x dim |
| klein, fast | double 21.2 x D, single 20.1 x D | 0.1 x D^2 | 20.2 x D (the editing teacher: 2 images) |
| klein, eager | double 27.7 x D, single 25.3 x D | -9.8 x D^2 | 13.8 x D |

Not in ``max_memory_allocated``, so in no term: the CUDA context and the blocks the caching allocator
keeps reserved but unused (fragmentation). The budget leaves room for them: 85% of the free memory
(:func:`memory_budget_bytes`). Model figures beyond the configuration measured.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

BYTES = 2  # bf16 activations
CUBLAS_WORKSPACE_BYTES = 32 * 2 ** 20  # torch's default per cuBLAS handle and stream on sm_90+ (cuBLASLt shares it)
CUBLAS_HANDLES = 2  # the forward's thread and autograd's device thread each hold one on the step's stream
UNSEEN_BYTES = 0.09e9  # fitted on the H200 peaks (see the module docstring)
TERMS = ("activations", "recompute", "transient", "gradients", "optimizer", "casts", "workspace", "unseen",
         "fp8_weights")
TERM_LABELS = {"activations": "saved activations", "recompute": "checkpoint recompute (1 layer)",
               "transient": "transient (working set)", "gradients": "gradients (fp32)",
               "optimizer": "AdamW state", "casts": "adapters cast to bf16 (roll-out)",
               "workspace": "cuBLAS workspaces", "unseen": "unseen (library scratch, rounding)",
               "fp8_weights": "FP8 weights (e4m3 copies)"}
@dataclass(frozen=True)
class GPU:
    """A GPU class ``--dry-run --gpu`` plans for: its memory, and the spec sheet's dense bf16 rate and
    memory bandwidth (what the step time of a GPU nobody measured here is scaled by)."""
    name: str
    memory_gb: float
    bf16_tflops: float  # dense (no sparsity), spec sheet
    bandwidth_tbs: float  # HBM / GDDR, spec sheet
    measured: bool = False  # a step of this project was timed on it (benchmarks/results/)


GPUS = {
    "h100": GPU("H100 80 GB (SXM)", 80.0, 989.0, 3.35),
    "h200": GPU("H200 141 GB", 141.0, 989.0, 4.8, measured=True),
    "b200": GPU("B200 180 GB", 180.0, 2250.0, 8.0),
    "a100-80": GPU("A100 80 GB (SXM)", 80.0, 312.0, 2.039),
    "a100-40": GPU("A100 40 GB", 40.0, 312.0, 1.555),
    "l40s": GPU("L40S 48 GB", 48.0, 362.0, 0.864),
    "4090": GPU("RTX 4090 24 GB", 24.0, 165.2, 1.008),
}
GPU_MEMORY_GB = {k: g.memory_gb for k, g in GPUS.items()}
_GPU_ALIASES = {"a100": "a100-80", "a10080": "a100-80", "a10040": "a100-40", "a10080gb": "a100-80",
                "a10040gb": "a100-40", "rtx4090": "4090", "geforcertx4090": "4090"}


def gpu_class(name: str) -> str:
    """``--gpu NAME`` -> a key of :data:`GPUS`, case and spaces ignored (``H200``, ``h200``, ``A100``:
    the 80 GB one, ``A100-40``, ``RTX 4090``, ``NVIDIA L40S``); one line naming the known ones otherwise."""
    key = str(name).strip().lower().replace("nvidia", "").replace(" ", "").replace("_", "-")
    key = _GPU_ALIASES.get(key.replace("-", ""), key)
    if key not in GPUS:
        key = {k.replace("-", ""): k for k in GPUS}.get(key.replace("-", "").removesuffix("gb"), key)
    if key not in GPUS:
        raise ValueError(f"--gpu {name!r}: not a GPU class this estimate knows; use one of "
                         "H100, H200, B200, A100 (A100-80), A100-40, L40S, 4090")
    return key


# Seconds per floor TFLOP of a step, MEASURED on the H200 (2026-12-04, benchmarks/results/2026-12-04-h200,
# benchmarks/calibration/h200-2026-12-04.json "steps"): Z-Image-Turbo at 1024^2, K = 4, LoRA r64, stepwise,
# 866.9 TFLOP floor: the fast path (no checkpointing) 1.953 s, the eager reference (every block
# checkpointed) 3.812 s. --dry-run scales them by the config's floor FLOPs (an estimate away from that
# workload) and, for another GPU, by its spec sheet (:func:`predicted_step_seconds`).
MEASURED_GPU = "h200"
SECONDS_PER_FLOOR_TFLOP = {"eager": 3.812 / 866.9, "fast": 1.953 / 866.9}


def predicted_step_seconds(floor_flops: float, path: str, gpu: str = MEASURED_GPU) -> float:
    """A step's time on GPU class ``gpu``: the H200's measured seconds per floor FLOP (the path's), times
    the floor FLOPs; on another GPU a SPEC-SHEET ESTIMATE: the part of the H200's step its floor FLOPs
    would take at the H200's dense bf16 peak (its floor MFU: 45 % fast, 23 % eager) scales by the ratio
    of dense bf16 rates, the rest (memory traffic, launches, efficiency lost) by the ratio of memory
    bandwidths."""
    t = floor_flops / 1e12 * SECONDS_PER_FLOOR_TFLOP[path]
    ref, g = GPUS[MEASURED_GPU], GPUS[gpu]
    if gpu == MEASURED_GPU:
        return t
    mfu = 1.0 / (SECONDS_PER_FLOOR_TFLOP[path] * ref.bf16_tflops)
    return t * (mfu * ref.bf16_tflops / g.bf16_tflops + (1.0 - mfu) * ref.bandwidth_tbs / g.bandwidth_tbs)


def time_label(gpu: str) -> str:
    """How :func:`predicted_step_seconds`' figure for ``gpu`` was made (printed beside it)."""
    if GPUS[gpu].measured:
        return (f"scaled from the step measured on the {GPUS[gpu].name.split()[0]} "
                "(benchmarks/results/2026-12-04-h200) by floor FLOPs")
    return (f"spec-sheet estimate: the H200's measured step scaled by dense bf16 TFLOP/s "
            f"({GPUS[gpu].bf16_tflops:.0f} vs {GPUS[MEASURED_GPU].bf16_tflops:.0f}) and memory bandwidth "
            f"({GPUS[gpu].bandwidth_tbs:.2f} vs {GPUS[MEASURED_GPU].bandwidth_tbs:.2f} TB/s); not measured")


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
    fp8_weight_bytes: int = 0  # fast.fp8=native: the block linears' e4m3 copies beside the weights (fast path)
    adapters: bool = True  # LoRA (the trainable tensors are adapters); False: full fine-tuning


def shape_of(transformer_config, spec, tokens_student: int, tokens_teacher: int, states: int,
             trainable_params: int, trainable_bytes_per_param: int = 4) -> Shape:
    """The shape of a step of family ``spec`` (a :class:`~dopsd_fast.families.spec.FamilySpec`)."""
    width, layers = spec.memory_layers(transformer_config)
    return Shape(spec.name, spec.memory, width, layers, tokens_student, tokens_teacher, states, trainable_params,
                 trainable_bytes_per_param)


def step_shape(cfg, adapter, buckets, trainable_params: int, trainable_bytes_per_param: int = 4,
               references=None) -> Shape:
    """A run's shape: its largest sample (tokens of each branch), context lengths, roll-out states and
    trainable tensors. ``references``: per bucket of ``buckets`` (a record's), its references' buckets
    (editing rows: their tokens are in both branches' sequences, the student's and the teacher's)."""
    spec = adapter.spec
    w, h = max(buckets, key=lambda b: b[0] * b[1])
    _, lh, lw = adapter.latent_shape(h, w)
    tok_s, tok_t = spec.step_tokens(cfg.model, spec.image_tokens((lh, lw)))

    def tokens(b):
        return spec.image_tokens(adapter.latent_shape(b[1], b[0])[1:])

    for bucket, refs in {(tuple(b), tuple(map(tuple, r))) for b, r in zip(buckets, references or []) if r}:
        n_ref = sum(tokens(r) for r in refs)  # the references, in both branches; the teacher's target after them
        s, t = spec.step_tokens(cfg.model, tokens(bucket))
        tok_s, tok_t = max(tok_s, s + n_ref), max(tok_t, t + n_ref)
    states = len(adapter.training_sigmas(cfg.dopsd.rollout, (lh, lw))) - 1
    b = cfg.data.batch_size
    shape = shape_of(adapter.transformer.config, spec, b * tok_s, b * tok_t, states, trainable_params,
                     trainable_bytes_per_param)
    shape = dataclasses.replace(shape, adapters=bool(cfg.lora.enabled))
    if cfg.fast.enabled and cfg.fast.fp8 == "native":
        shape = dataclasses.replace(shape, fp8_weight_bytes=fp8_weight_bytes(adapter.transformer, spec,
                                                                               cfg.fast.fp8_dgrad))
    return shape


def fp8_weight_bytes(model, spec, dgrad: bool) -> int:
    """``fast.fp8: native``'s copies of the block linears FP8 takes (the family spec's ``fp8_module``):
    e4m3 (1 byte per weight) with an fp32 scale per output row, and with ``fast.fp8_dgrad`` the same
    again transposed for the backward's dX GEMMs (a scale per input channel). Kept for the whole run,
    beside the bf16 weights (works on a meta-device model: shapes only)."""
    total = 0
    for name, m in model.named_modules():
        base = getattr(m, "base_layer", m)
        if spec.fp8_module(name + (".base_layer" if base is not m else ""), base):
            n_out, n_in = base.weight.shape
            total += n_out * n_in + 4 * n_out + ((n_out * n_in + 4 * n_in) if dgrad else 0)
    return total


def cast_bytes(trainable_params: int, path: str, trainable_bytes_per_param: int = 4, adapters: bool = True) -> int:
    """The fast path's roll-out keeps the student's and the teacher's fp32 adapters cast to bf16 (its
    RolloutShare). Full fine-tuning (``adapters`` False: an fp32 student master, a bf16 teacher module)
    keeps no such copies: its weights are cast per op."""
    return 2 * trainable_params * BYTES if path == "fast" and adapters and trainable_bytes_per_param == 4 else 0


def peak_bytes(s: Shape, path: str, backward: str, checkpoint_layers: int = 0, optimizer_state: bool = True) -> dict:
    """Predicted peak beyond the weights (what ``torch.cuda.max_memory_allocated`` adds to them), by
    term (:data:`TERMS`, bytes) and ``total``. ``optimizer_state``: AdamW's moments exist (every step
    after the first)."""
    per = s.coefficients.per_token[path]
    unit_s = s.width * s.tokens_student * BYTES
    alive = s.states if backward == "once" else 1
    # the per-state extra belongs to the layers' saved activations: none when every layer is
    # checkpointed (each then keeps its input only)
    all_checkpointed = checkpoint_layers >= sum(s.layers.values())
    extra = 0.0 if all_checkpointed else s.coefficients.per_state_extra[path] * s.width ** 2 * BYTES
    per_layers, recompute, ck = 0.0, 0.0, checkpoint_layers
    for kind, n in s.layers.items():
        c = min(ck, n)
        ck -= c
        per_layers += (n - c) * per[kind] + c * 1.0
        if c:
            recompute = max(recompute, per[kind])
    n_train = s.trainable_params
    terms = {
        # never below what every layer keeps when checkpointed (its input): the intercept, measured at
        # 4.6k tokens, would outweigh the layers at a few hundred
        "activations": alive * max(per_layers * unit_s + extra, sum(s.layers.values()) * unit_s),
        "recompute": recompute * unit_s,
        "transient": s.coefficients.transient_per_teacher_token[path] * s.width * s.tokens_teacher * BYTES,
        # a stepwise peak comes after the first state's backward made them; a once peak, at the start of
        # the backward, holds few yet: counted whole all the same (errs high by at most this term)
        "gradients": n_train * s.trainable_bytes_per_param,
        "optimizer": n_train * 8 if optimizer_state else 0,  # AdamW m, v (fp32)
        "casts": cast_bytes(n_train, path, s.trainable_bytes_per_param, s.adapters),
        "workspace": CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES,
        "unseen": UNSEEN_BYTES,
        "fp8_weights": s.fp8_weight_bytes if path == "fast" else 0,
    }
    terms["total"] = sum(terms[t] for t in TERMS)
    return terms


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


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if math.isfinite(b) else "?"


# ---- disk: what a run writes (the trainer's start-up check and --dry-run) ---------------------------------------
CHECKPOINT_BYTES_PER_PARAM = 16  # per trained parameter: the fp32 student, its fp32 EMA teacher, AdamW's two fp32 moments


def run_files(trained_params: int, base_params: int, dtype_bytes: int, lora: bool) -> tuple[float, float, int]:
    """(one checkpoint's bytes, the exports' bytes, export folders) of a run training ``trained_params``:
    a LoRA run exports both adapters (``lora/``, ``lora_ema/``) in fp32, each as the diffusers file and
    the ComfyUI one; full fine-tuning the student and its EMA copy (``transformer/``,
    ``transformer_ema/``), ``base_params`` each in the model dtype."""
    exports = 2 * 2 * 4 * trained_params if lora else 2 * base_params * dtype_bytes
    return CHECKPOINT_BYTES_PER_PARAM * trained_params, exports, 2


def checkpoint_steps(start: int, max_steps: int, every: int) -> list[int]:
    """The steps a run from ``start`` to ``max_steps`` writes a checkpoint at: every ``every`` (0: none
    on the way), and the last step where that is not one of them."""
    steps = list(range((start // every + 1) * every, max_steps + 1, every)) if every > 0 else []
    if max_steps > start and (not steps or steps[-1] != max_steps):
        steps.append(max_steps)
    return steps


@dataclass(frozen=True)
class DiskPlan:
    """The bytes a run adds to its output folder's disk, at most: ``kept`` checkpoints of
    ``checkpoint`` bytes at once (``train.keep_checkpoints``, plus the one being written before the
    oldest goes), of which ``existing`` are there already; and the exports, ``exports`` bytes (plus
    one export folder written beside the one it replaces). ``fails_at``: the first checkpoint step
    that does not fit ``free`` bytes (None: all fit, or ``free`` unknown)."""
    checkpoint: float
    steps: tuple
    kept: int
    existing: int
    exports: float
    export_folders: int
    need: float
    free: float | None = None
    fails_at: int | None = None

    def describe(self, where: str) -> str:
        if not self.steps:
            return f"disk: no checkpoint left to write under {where}"
        ck = f"checkpoints of {fmt_bytes(self.checkpoint)}, up to {self.kept} at once"
        ex = f"exports {fmt_bytes(self.exports)}" if self.exports else "no exports"
        have = f"; {self.existing} of the run's there already" if self.existing else ""
        return f"disk: up to {fmt_bytes(self.need)} more under {where} ({ck}{have}; {ex})"


def disk_plan(checkpoint: float, exports: float, export_folders: int, keep: int, steps: list[int],
              existing: int = 0, exports_each_checkpoint: bool = True, free: float | None = None,
              exports_there: bool = False) -> DiskPlan:
    """:class:`DiskPlan` of a run writing checkpoints at ``steps`` (:func:`checkpoint_steps`), each
    ``checkpoint`` bytes, ``keep`` kept; ``existing`` of them on the disk already; ``exports`` bytes in
    ``export_folders`` folders written after each checkpoint (LoRA) or after the last (full
    fine-tuning), there already where ``exports_there``. A save writes the new checkpoint beside the
    kept ones, then deletes the oldest, then writes the exports: each folder beside the one it replaces."""
    one_export = exports / export_folders if export_folders else 0.0
    fails_at, need = None, 0.0
    added, present = 0.0, exports_there  # export bytes this run adds; whether its export folders are there
    for i, s in enumerate(steps, 1):
        now = max(min(existing + i, keep + 1) - existing, 1) * checkpoint + added  # the new one beside the kept
        if exports_each_checkpoint or s == steps[-1]:
            after = max(min(existing + i, keep) - existing, 0) * checkpoint  # pruned back to keep
            if present:  # one folder at a time written beside the one it replaces
                now = max(now, after + added + one_export)
            else:
                added, present = exports, True
                now = max(now, after + added)
        need = max(need, now)
        if free is not None and fails_at is None and now > free:
            fails_at = s
    kept = min(existing + len(steps), keep + 1) if steps else existing
    return DiskPlan(checkpoint, tuple(steps), kept, existing, exports, export_folders, need, free, fails_at)


def fmt_bytes(b: float) -> str:
    """GB from 0.1 GB up, else MB (a tiny run's checkpoints are a few MB)."""
    return fmt_gb(b) if not math.isfinite(b) or b >= 1e8 else f"{b / 1e6:.1f} MB"


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
