"""``dopsd-train --dry-run``: check a run before paying for it. Validates the config, the data and the
feature cache, builds the real architecture on the meta device (no weights read), and prints the
memory model's predicted peak and step time on a GPU class, and whether it fits. Model figures
(:mod:`dopsd_fast.memory`), not measurements."""

from __future__ import annotations

from pathlib import Path

import torch

from dopsd_fast import memory
from dopsd_fast.cache import FeatureCache
from dopsd_fast.data import build_dataset
from dopsd_fast.families import build_adapter, family, require_editing_support
from dopsd_fast.plan import resolve_plan


def _lora_params(transformer, targets, rank: int) -> int:
    """Parameters of one adapter on ``targets`` (peft's rule: a module name equal to a target or ending
    with ``.target``), counted from the module shapes."""
    n = 0
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (mod.in_features + mod.out_features)
    return n


def _folder_bytes(*paths) -> int:
    return sum(f.stat().st_size for p in paths if p and Path(p).is_dir() for f in Path(p).rglob("*.safetensors"))


def dry_run(cfg, gpu: str = "h100") -> int:
    if gpu not in memory.GPU_MEMORY_GB:
        raise ValueError(f"--gpu {gpu!r}: known GPU classes {sorted(memory.GPU_MEMORY_GB)}")
    print("config: valid")
    dataset = build_dataset(cfg.data, progress=False)
    spec = family(cfg.model.family)
    require_editing_support(spec, dataset)
    print(f"data: {len(dataset.records)} samples, buckets {sorted(set(dataset.buckets_of))[:6]}"
          f"{' ...' if len(set(dataset.buckets_of)) > 6 else ''}")
    adapter = build_adapter(cfg.model, load_encoders=False, empty_weights=True)
    if cfg.cache.dir:
        FeatureCache(cfg.cache.dir, adapter.encoder_identity()).require_complete(dataset)
        print(f"feature cache: complete ({cfg.cache.dir}); the encoders will not be loaded")
        encoders = 0
    else:
        m = cfg.model
        encoders = _folder_bytes(Path(m.path) / "text_encoder" if m.path else None, m.vlm_path)
        print(f"feature cache: none; the encoders stay resident ({memory.fmt_gb(encoders)} of weights read from disk"
              f"{'' if m.path else '; tiny preset: negligible'})")
    tr = adapter.transformer
    n_base = sum(p.numel() for p in tr.parameters())
    dt = torch.finfo(adapter.dtype).bits // 8
    if cfg.lora.enabled:
        targets = spec.lora_targets(cfg.lora, tr.config)
        n_train = _lora_params(tr, targets, cfg.lora.rank)
        weights = n_base * dt + 2 * n_train * 4  # frozen base + student and EMA-teacher adapters (fp32)
        per = 4
    else:
        n_train = n_base
        weights = 2 * n_base * dt + n_base * 4  # student, teacher module, fp32 EMA master
        per = dt
    shape = memory.step_shape(cfg, adapter, dataset.buckets_of, n_train, per)
    cap = memory.GPU_MEMORY_GB[gpu] * 1e9
    budget = (cfg.fast.memory_budget_gb * 1e9 if cfg.fast.memory_budget_gb is not None
              else 0.85 * (cap - weights - encoders))
    # the run plan as the trainer resolves it, against this GPU class's memory (the device: a CUDA one)
    plan = resolve_plan(cfg, spec, tr.config, shape, torch.device("cuda"), budget, gpu_name=f"NVIDIA {gpu.upper()}")
    path, backward, ckpt, n_layers, peak = plan.path, plan.backward, plan.checkpoint_layers, plan.layers, plan.peak
    total = weights + encoders + peak["total"]
    c = dict(tr.config)
    img = shape.tokens_student // cfg.data.batch_size - cfg.model.student_max_tokens
    rank = cfg.lora.rank if cfg.lora.enabled else 0
    cap_s, cap_t = spec.step_tokens(cfg.model, 0)  # context tokens of each branch
    f_s = spec.forward_flops(c, img, [cap_s] * cfg.data.batch_size, rank)
    f_t = spec.forward_flops(c, img, [cap_t] * cfg.data.batch_size, rank, teacher=True)
    floor = shape.states * (sum(f_s) + sum(f_t) + memory.backward_flops(f_s, cfg.lora.enabled))
    fits = total <= cap
    print(f"\nstep: {shape.family}, {path} path, backward {backward}"
          f"{' (auto)' if cfg.dopsd.backward == 'auto' else ''}, {ckpt} of {n_layers} layers checkpointed, "
          f"K = {shape.states}, {shape.tokens_student} student / {shape.tokens_teacher} teacher tokens per micro-batch"
          f"\n{plan.describe()}")
    rows = [("weights (base, adapters / EMA)", weights), ("encoders", encoders)]
    rows += [(memory.TERM_LABELS[t], peak[t]) for t in memory.TERMS if peak[t]]
    rows.append(("predicted peak", total))
    for name, b in rows:
        print(f"  {name:<34} {memory.fmt_gb(b):>10}")
    print(f"  {'GPU class ' + gpu:<34} {memory.fmt_gb(cap):>10}  -> {'FITS' if fits else 'DOES NOT FIT'}")
    t = memory.predicted_step_seconds(floor, path)
    print(f"  floor FLOPs {floor / 1e12:.1f} TFLOP per step; predicted step time ~{t:.2f} s on an H100-class GPU "
          f"(estimate: the fake-tensor model's time per floor FLOP at Z-Image-Turbo size)")
    if not fits:
        hints = []
        if backward == "once":
            hints.append("dopsd.backward=stepwise (same gradient)")
        if ckpt < n_layers and (path == "eager" or "checkpoint" in spec.fast_features):
            hints.append("model.gradient_checkpointing=auto or all")
        if not cfg.cache.dir and encoders:
            hints.append("a feature cache (dopsd-cache) to unload the encoders")
        hints.append("a smaller data.bucket_scale or data.batch_size")
        print("  to fit: " + "; ".join(hints))
    print("\n(model figures from dopsd_fast.memory: fake-tensor steps, and the H200's measured Z-Image-Turbo peaks; "
          "the CUDA context and the allocator's cached blocks come on top)")
    return 0 if fits else 1
