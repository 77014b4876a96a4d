"""Few-step generation with the base model or a trained LoRA (``dopsd-sample``)."""

from __future__ import annotations

from pathlib import Path

import torch

from dopsd_fast.algorithm import euler_sample
from dopsd_fast.data.buckets import make_buckets
from dopsd_fast.export import LORA_FILE, check_lora_weights
from dopsd_fast.families import build_adapter
from dopsd_fast.safety import file_in_folder
from dopsd_fast.validation import save_grid


def load_lora_into(transformer, lora_dir: str) -> None:
    """Load a LoRA written by ``dopsd-train`` (diffusers format) as the active adapter. The folder is
    untrusted input: its weights file must be a file in it; weights that are not finite or of an absurd
    magnitude, and a file whose LoRA weights match no module of this model (or only some), are refused
    in one line naming what the file holds."""
    from diffusers import ZImagePipeline


    d = Path(lora_dir)
    try:
        weights = file_in_folder(d, LORA_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(f"--lora: {d} has no {LORA_FILE}") from None
    except ValueError as e:
        raise ValueError(f"--lora: {e}") from None
    try:
        state, meta = ZImagePipeline.lora_state_dict(str(d), weight_name=LORA_FILE, return_lora_metadata=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise FileNotFoundError(f"--lora: {weights} does not load as a LoRA for this model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    check_lora_weights(state, f"--lora: {weights}")  # a LoraWeightsError (ValueError): one line
    wanted = _lora_modules(state)
    if not wanted:
        raise ValueError(f"--lora: {weights} holds no LoRA weights ({_found(state)}); expected "
                         "transformer.<module>.lora_A/lora_B.weight as dopsd-train writes")
    _refuse_unmatched(weights, wanted, {name for name, _ in transformer.named_modules()})
    try:
        ZImagePipeline.load_lora_into_transformer(state, transformer=transformer, adapter_name="lora", metadata=meta)
    except Exception as e:  # noqa: BLE001 - a foreign file: one line naming it
        raise FileNotFoundError(f"--lora: {weights} does not load as a LoRA for this model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    _refuse_unmatched(weights, wanted, _loaded_lora_modules(transformer, "lora"))


def _refuse_unmatched(weights: Path, wanted: set, present: set) -> None:
    missing = sorted(wanted - present)
    if missing:
        raise ValueError(f"--lora: {weights}: {len(missing)} of its {len(wanted)} LoRA modules match no module of this "
                         f"model ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); a LoRA for another "
                         "model?")


def _lora_modules(state: dict) -> set:
    """The modules a diffusers-format LoRA state dict adapts (``transformer.`` prefix dropped)."""
    out = set()
    for key in state:
        for tag in (".lora_A.", ".lora_B."):
            if tag in key:
                out.add(key.split(tag)[0].removeprefix("transformer."))
    return out


def _loaded_lora_modules(transformer, adapter: str) -> set:
    from peft.tuners.lora import LoraLayer

    return {name for name, m in transformer.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _found(state: dict) -> str:
    keys = sorted(state)
    return f"{len(keys)} tensors: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" if keys else "no tensors"


@torch.no_grad()
@torch.no_grad()
def sample_images(adapter, prompts, width: int, height: int, steps=None, seed: int = 0, transformer=None,
                  sigmas=None) -> list[torch.Tensor]:
    """One image per prompt, (3, H, W) in [0, 1] on the CPU: the Euler ODE from noise seeded
    ``seed + i``, along the model's inference schedule of ``steps`` (or ``sigmas`` when given), with
    ``transformer`` (the adapter's own by default)."""
    transformer = transformer if transformer is not None else adapter.transformer
    shape = adapter.latent_shape(height, width)
    sig = sigmas if sigmas is not None else adapter.inference_sigmas(steps, shape[-2:])
    out = []
    for i, p in enumerate(prompts):
        ctx = [c.to(adapter.device) for c in adapter.encode_student([p])]
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i)).to(adapter.device)
        x = euler_sample(lambda x, s: adapter.velocity(transformer, x, s, ctx), noise, sig)
        out.append(adapter.decode(x)[0].float().clamp(0, 1).cpu())
    return out


def generate(cfg, prompts, lora=None, width=None, height=None, steps=None, seed=0, out="samples.png") -> Path:
    adapter = build_adapter(cfg.model)
    if lora:
        load_lora_into(adapter.transformer, lora)
    bw, bh = make_buckets(cfg.data.buckets, cfg.data.bucket_scale, cfg.data.bucket_multiple)[0]
    w, h = width or bw, height or bh
    n_steps = len(adapter.inference_sigmas(steps, adapter.latent_shape(h, w)[-2:])) - 1
    images = sample_images(adapter, prompts, w, h, steps, seed)
    rows = [(p, [im]) for p, im in zip(prompts, images)]
    return save_grid(rows, ["lora" if lora else "base"], out, title=f"{n_steps} steps")
