"""Validation pictures: one row per prompt, columns side by side (target | student | teacher)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from dopsd_fast.safety import atomic_write


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_grid(rows, headers, path, title: str = "", min_cell: int = 128) -> Path:
    """``rows``: list of (caption, [image tensors (3, H, W) in [0, 1], or None: an empty cell]). Small
    images are upscaled (nearest) to ``min_cell`` so tiny runs stay legible."""
    cell_w = max(min_cell, max(im.shape[-1] for _, ims in rows for im in ims if im is not None))
    cell_h = max(min_cell, max(im.shape[-2] for _, ims in rows for im in ims if im is not None))
    pad, head, cap = 6, 18, 28
    ncol = max(len(ims) for _, ims in rows)
    W = pad + ncol * (cell_w + pad)
    H = head + pad + len(rows) * (cell_h + cap + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((pad, 2), title, fill=(0, 0, 0))
    for r, (caption, ims) in enumerate(rows):
        y = head + pad + r * (cell_h + cap + pad)
        for c, im in enumerate(ims):
            if im is None:
                continue
            p = to_pil(im)
            s = min(cell_w / p.width, cell_h / p.height)
            if s > 1:
                p = p.resize((int(p.width * s), int(p.height * s)), Image.NEAREST)
            x = pad + c * (cell_w + pad)
            canvas.paste(p, (x, y))
            if c < len(headers):
                d.text((x + 2, y + 2), headers[c], fill=(255, 255, 0), stroke_width=1, stroke_fill=(0, 0, 0))
        d.text((pad, y + cell_h + 2), "\n".join(textwrap.wrap(caption, width=max(20, W // 7))[:2]), fill=(0, 0, 0))

    return atomic_write(Path(path), canvas.save)
