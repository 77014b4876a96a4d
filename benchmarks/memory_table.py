"""Per-GPU memory of Z-Image-Turbo (6.15 B) training at 1024^2 on 1, 2, 4, 8 GPUs of 80 GB: LoRA r64
(replicated base, fast path; or the base sharded with FSDP2, eager path) and full fine-tuning (FSDP2,
eager path, gradient checkpointing). MODEL FIGURES: dopsd_fast.memory's terms (activations, the
checkpoint recompute, transient, gradients, AdamW, LoRA casts, cuBLAS workspace, what the fake step
cannot see), its constants from fake-tensor steps (benchmarks/perf_model.py --calibrate) and the H200
measurement of the LoRA fast row's configuration (40.1 GB predicted, 40.05 GB measured, 2026-12-04);
the other rows are not measured.

    python benchmarks/memory_table.py            # the markdown table of docs/performance.md

Weights per GPU: LoRA: bf16 base 2 bytes per parameter (replicated, or / ranks) + the student's and
the EMA teacher's fp32 adapters (8 bytes per adapter parameter); full fine-tuning: fp32 student 4 +
bf16 EMA teacher copy 2 + fp32 EMA master 4 (0 with dopsd.ema_on_cpu) bytes per parameter, divided
by the ranks under FSDP2, plus FSDP2's working set: one block gathered in bf16 for the forward plus the
next one prefetched, and in the backward one block's bf16 weights with its fp32 unsharded gradient (8
bytes per block parameter), plus the unsharded root (embedders, final layer). The step's terms count
the trainable tensors' fp32 gradient (4) and AdamW moments (8) per rank's shard.
K = 4, batch 1 per rank, caption 512 (student) / 1024 (teacher context); the fewest checkpointed
layers (fast path; eager full fine-tuning: all) and the backward schedule that fit 85% of what the
weights leave. The peak is what torch.cuda.max_memory_allocated counts; the CUDA context and the
allocator's cached blocks come on top (the 15% margin).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

GPU_GB = 80.0
GPUS = (1, 2, 4, 8)


def _model():
    import torch

    from dopsd_fast.families import ZIMAGE

    cfg = ZIMAGE.flavours["zimage-6b"].config
    with torch.device("meta"):
        tr = ZIMAGE.diffusers_class()(**cfg)
    n = sum(p.numel() for p in tr.parameters())
    blocks = [sum(p.numel() for p in u.parameters()) for u in ZIMAGE.shard_units(tr)]
    lora = 0
    for name, mod in tr.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name.endswith("." + t) for t in ZIMAGE.default_lora_targets()):
            lora += 64 * (mod.in_features + mod.out_features)
    return cfg, n, max(blocks), n - sum(blocks), lora


def rows(ema_on_cpu: bool = False):
    """(run, GPUs, weights per GPU, the step's memory beyond them, backward, checkpointed layers)."""
    from dopsd_fast import memory
    from dopsd_fast.families import ZIMAGE

    cfg, n, block, root, n_lora = _model()
    n_img = 4096
    tok_s, tok_t = n_img + 512, n_img + 1024
    out = []

    def step(trainable, path, fixed, checkpointed=None):
        s = memory.shape_of(cfg, ZIMAGE, tok_s, tok_t, 4, trainable)
        budget = 0.85 * (GPU_GB * 1e9 - fixed)  # memory.memory_budget_bytes: 85% of what the weights leave
        back = memory.resolve_backward("auto", s, path, budget, checkpointed or 0)
        ck = checkpointed if checkpointed is not None else memory.checkpoint_layers_for(s, path, back, budget)
        return memory.peak_bytes(s, path, back, ck)["total"], back, ck

    for gpus in GPUS:
        # LoRA, replicated base, fast path: bf16 base + both fp32 adapters (student, EMA teacher)
        fixed = 2 * n + 8 * n_lora
        out.append(("LoRA r64, replicated base (fast path)", gpus, fixed, *step(n_lora, "fast", fixed)))
        if gpus > 1:  # LoRA with the base sharded (dist.shard_base): eager path
            fixed = (2 * n + 8 * n_lora) / gpus + 8 * block * 2
            out.append(("LoRA r64, base sharded (dist.shard_base, eager)", gpus, fixed,
                        *step(round(n_lora / gpus), "eager", fixed, 0)))
        # full fine-tuning: one rank holds everything; FSDP2 shards it over the ranks (the fp32 gradient
        # and AdamW state are the step's terms, per rank's shard)
        per_param = 6 if ema_on_cpu else 10
        fixed = per_param * n / gpus + (8 * block * 2 + 2 * root if gpus > 1 else 0)
        out.append(("full fine-tuning" + (" (FSDP2)" if gpus > 1 else ""), gpus, fixed,
                    *step(round(n / gpus), "eager", fixed, 32)))
    return out


def table(ema_on_cpu: bool = False) -> str:
    lines = ["| run | GPUs | weights (+ EMA) per GPU | step: activations, gradients, AdamW, casts, workspace | "
             "predicted peak | fits 80 GB | backward, checkpointed layers |", "|---|---|---|---|---|---|---|"]
    for name, gpus, fixed, act, back, ck in rows(ema_on_cpu):
        total = fixed + act
        lines.append(f"| {name} | {gpus} | {fixed / 1e9:.1f} GB | {act / 1e9:.1f} GB | {total / 1e9:.1f} GB | "
                     f"{'yes' if total <= GPU_GB * 1e9 else 'no'} | {back}, {ck} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ema-on-cpu", action="store_true", help="the EMA's fp32 master on the CPU (dopsd.ema_on_cpu)")
    print(table(parser.parse_args().ema_on_cpu))
