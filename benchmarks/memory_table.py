"""Per-GPU memory of Z-Image-Turbo (6.15 B) training at 1024^2 on 1, 2, 4, 8 GPUs of 80 GB: LoRA r64
(replicated base, fast path; or the base sharded with FSDP2, eager path) and full fine-tuning (FSDP2,
eager path, gradient checkpointing). MODEL FIGURES: the activation constants of dopsd_fast.memory
(calibrated on fake-tensor steps, benchmarks/perf_model.py) plus the byte counts below; no GPU measured.

    python benchmarks/memory_table.py            # the markdown table the README shows

Per parameter (full fine-tuning): fp32 student 4 + bf16 EMA teacher copy 2 + fp32 EMA master 4 (0 with
dopsd.ema_on_cpu) + fp32 gradient 4 + AdamW moments 8 = 22 bytes, divided by the ranks under FSDP2.
FSDP2 working set: one block gathered in bf16 for the forward plus the next one prefetched, and in
the backward one block's bf16 weights with its fp32 unsharded gradient (8 bytes per block parameter),
plus the unsharded root (embedders, final layer). LoRA: bf16 base 2 bytes per parameter (replicated,
or / ranks), adapters (student + EMA teacher fp32, gradient, AdamW: 20 bytes per adapter parameter; the
fast path's roll-out also holds both adapters cast to bf16: 4 more).
Activations: K = 4, batch 1 per rank, caption 512 (student) / 1024 (teacher context); the fewest
checkpointed layers (fast path; eager full fine-tuning: all) and the backward schedule that fit.
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
    from dopsd_fast import memory
    from dopsd_fast.families import ZIMAGE

    cfg, n, block, root, n_lora = _model()
    n_img = 4096
    tok_s, tok_t = n_img + 512, n_img + 1024
    out = []
    for gpus in GPUS:
        budget = GPU_GB * 1e9
        # LoRA, replicated base, fast path
        fixed = 2 * n + 24 * n_lora  # + the roll-out's bf16 casts of both adapters (fast path)
        s = memory.shape_of(cfg, ZIMAGE, tok_s, tok_t, 4, 0)
        back = memory.resolve_backward("auto", s, "fast", 0.85 * budget - fixed)
        ck = memory.checkpoint_layers_for(s, "fast", back, 0.85 * budget - fixed)
        act = memory.peak_bytes(s, "fast", back, ck)
        out.append(("LoRA r64, replicated base (fast path)", gpus, fixed, act["activations"] + act["transient"], back,
                    ck))
        if gpus > 1:  # LoRA with the base sharded (dist.shard_base): eager path
            fixed = (2 * n + 20 * n_lora) / gpus + 8 * block * 2
            back = memory.resolve_backward("auto", s, "eager", 0.85 * budget - fixed)
            act = memory.peak_bytes(s, "eager", back, 0)
            out.append(("LoRA r64, base sharded (dist.shard_base, eager)", gpus, fixed,
                        act["activations"] + act["transient"], back, 0))
        # full fine-tuning: one rank holds everything; FSDP2 shards it over the ranks
        per_param = 18 if ema_on_cpu else 22
        fixed = per_param * n / gpus + (8 * block * 2 + 2 * root if gpus > 1 else 0)
        layers = sum(s.layers.values())
        back = memory.resolve_backward("auto", s, "eager", 0.85 * budget - fixed, layers)
        act = memory.peak_bytes(s, "eager", back, layers)
        out.append(("full fine-tuning" + (" (FSDP2)" if gpus > 1 else ""), gpus, fixed,
                    act["activations"] + act["transient"], back, layers))
    return out


def table(ema_on_cpu: bool = False) -> str:
    lines = ["| run | GPUs | weights, grads, optimizer, EMA per GPU | activations + transient | predicted peak | "
             "fits 80 GB | backward, checkpointed layers |", "|---|---|---|---|---|---|---|"]
    for name, gpus, fixed, act, back, ck in rows(ema_on_cpu):
        total = fixed + act
        lines.append(f"| {name} | {gpus} | {fixed / 1e9:.1f} GB | {act / 1e9:.1f} GB | {total / 1e9:.1f} GB | "
                     f"{'yes' if total <= GPU_GB * 1e9 else 'no'} | {back}, {ck} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ema-on-cpu", action="store_true", help="the EMA's fp32 master on the CPU (dopsd.ema_on_cpu)")
    print(table(parser.parse_args().ema_on_cpu))
