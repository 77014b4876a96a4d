"""Few-step generation with the base model or a trained LoRA (``dopsd-sample``)."""

from __future__ import annotations

from pathlib import Path

import torch

from dopsd_fast.algorithm import euler_sample


def load_lora_into(transformer, lora_dir: str) -> None:
    """Load a LoRA written by ``dopsd-train`` (diffusers format) as the active adapter."""
    from diffusers import ZImagePipeline

    d = Path(lora_dir)
    if not (d / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(f"--lora: {d} has no pytorch_lora_weights.safetensors")
    try:
        state, meta = ZImagePipeline.lora_state_dict(str(d), return_lora_metadata=True)
        ZImagePipeline.load_lora_into_transformer(state, transformer=transformer, adapter_name="lora", metadata=meta)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise FileNotFoundError(f"--lora: {d / 'pytorch_lora_weights.safetensors'} does not load as a LoRA for this "
                                f"model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


@torch.no_grad()
def generate(cfg, prompts, lora=None, width=None, height=None, steps=None, seed=0, out="samples.png") -> Path:
    from dopsd_fast.families import build_adapter
    from dopsd_fast.data.buckets import make_buckets
    from dopsd_fast.validation import save_grid

    adapter = build_adapter(cfg.model)
    if lora:
        load_lora_into(adapter.transformer, lora)
    bw, bh = make_buckets(cfg.data.buckets, cfg.data.bucket_scale, cfg.data.bucket_multiple)[0]
    w, h = width or bw, height or bh
    shape = adapter.latent_shape(h, w)
    sig = adapter.inference_sigmas(steps, shape[-2:])
    rows = []
    for i, p in enumerate(prompts):
        ctx = [c.to(adapter.device) for c in adapter.encode_student([p])]
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i)).to(adapter.device)
        x = euler_sample(lambda x, s: adapter.velocity(adapter.transformer, x, s, ctx), noise, sig)
        rows.append((p, [adapter.decode(x)[0].cpu()]))
    return save_grid(rows, ["lora" if lora else "base"], out, title=f"{len(sig) - 1} steps")
