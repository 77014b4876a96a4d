"""A ComfyUI-ready copy of an exported LoRA.

The diffusers export (``pytorch_lora_weights.safetensors``) holds the trained strength in its factors:
``lora_B`` carries alpha / rank, its metadata says alpha = rank (scale 1), so every loader applies the
trained delta, also one that drops the metadata (and takes alpha = rank). ComfyUI scales each module by
``<module>.alpha / rank`` when the file carries an ``.alpha`` tensor, and by 1.0 when it does not.
``comfyui_lora.safetensors`` holds the same tensors under the same keys
(``transformer.<diffusers module>.lora_A/B.weight``, which ComfyUI maps for Z-Image and FLUX.2-klein)
plus one ``<module>.alpha`` (= rank) per module, the strength said outright. The alpha tensors live in
this second file because diffusers reads a file with ``.alpha`` keys as a foreign format.

The exported tensors are checked first (read back from the diffusers file, before the ComfyUI copy
is written): a LoRA weight that is not finite or whose magnitude passes ``LORA_MAX_ABS`` is damage (a
flipped exponent bit) or divergence, never a result, and the export stops with one line naming the
tensor (the trainer writes exports atomically, so the previous one stays in place)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMFYUI_FILE = "comfyui_lora.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LORA_MAX_ABS = 1e4  # AdamW moves a weight by ~lr per step: trained LoRA factors stay orders of magnitude below


class LoraWeightsError(ValueError):
    """LoRA weights that must not be written or used: non-finite, or of an absurd magnitude."""

def check_lora_weights(sd: dict, source: str) -> None:
    """Refuse (one line naming the tensor) a LoRA state dict with a non-finite weight or one whose
    magnitude passes :data:`LORA_MAX_ABS`."""
    for key, t in sd.items():
        if not t.is_floating_point() or not t.numel():
            continue
        if t.dtype not in LORA_DTYPES:
            raise LoraWeightsError(f"{source}: {key} is {str(t.dtype).replace('torch.', '')}; LoRA weights are "
                                   "float32, bfloat16, float16 or float64; refused")
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            raise LoraWeightsError(f"{source}: {key} holds {int((~torch.isfinite(t)).sum())} non-finite value(s) "
                                   "(damaged or diverged weights); refused")
        peak = float(t.abs().max())
        if peak > LORA_MAX_ABS:
            raise LoraWeightsError(f"{source}: {key} holds |w| up to {peak:.3g}, over the limit {LORA_MAX_ABS:g} "
                                   "(damaged or diverged weights); refused")


def write_comfyui_lora(lora_dir: str | Path, alpha: float) -> Path:
    lora_dir = Path(lora_dir)
    try:  # pread: the mmap backend of safetensors 0.8 leaks per tensor read (an older one has no such argument)
        sd = load_file(str(lora_dir / LORA_FILE), backend="pread")
    except TypeError:
        sd = load_file(str(lora_dir / LORA_FILE))
    check_lora_weights(sd, f"LoRA export ({LORA_FILE})")  # what was written, read back
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd if ".lora_A." in k or ".lora_B." in k})
    out = dict(sd)
    for m in modules:
        out[f"{m}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    path = lora_dir / COMFYUI_FILE
    save_file(out, str(path), metadata={"format": "pt", "dopsd_fast": "comfyui: scale = alpha / rank per module"})
    return path
