"""A ComfyUI-ready copy of an exported LoRA.

The diffusers export (``pytorch_lora_weights.safetensors``) keeps rank and alpha in its metadata,
which ComfyUI ignores: ComfyUI scales each module by ``<module>.alpha / rank`` when the file carries
an ``.alpha`` tensor, and by 1.0 when it does not, so a LoRA trained at alpha / rank = 2 loads at half
strength. ``comfyui_lora.safetensors`` holds the same tensors under the same keys
(``transformer.<diffusers module>.lora_A/B.weight``, which ComfyUI maps for Z-Image and FLUX.2-klein)
plus one ``<module>.alpha`` per module. The alpha tensors live in this second file because diffusers
reads a file with ``.alpha`` keys as a foreign format and fails to load it."""

from __future__ import annotations

from pathlib import Path

import torch

COMFYUI_FILE = "comfyui_lora.safetensors"


def write_comfyui_lora(lora_dir: str | Path, alpha: float) -> Path:
    from safetensors.torch import load_file, save_file

    lora_dir = Path(lora_dir)
    sd = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd if ".lora_A." in k or ".lora_B." in k})
    out = dict(sd)
    for m in modules:
        out[f"{m}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    path = lora_dir / COMFYUI_FILE
    save_file(out, str(path), metadata={"format": "pt", "dopsd_fast": "comfyui: scale = alpha / rank per module"})
    return path
