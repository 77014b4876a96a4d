"""Validation pictures: one row per prompt, columns side by side (target | student | teacher)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from dopsd_fast.safety import atomic_write


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def wrap_text(draw: ImageDraw.ImageDraw, text: str, width: int, max_lines: int | None = None) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (measured in the font drawn with), breaking at
    spaces; a word wider than the line is broken inside. Nothing is dropped, unless ``max_lines`` is
    given: then the wrapping stops once past it (``max_lines + 1`` lines at most, the last one partial)."""
    lines: list[str] = []
    for word in text.split():
        if max_lines is not None and len(lines) > max_lines:
            break
        line = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(line) <= width:
            lines[-1] = line
            continue
        while draw.textlength(word) > width and len(word) > 1:  # a word longer than the line
            if max_lines is not None and len(lines) > max_lines:
                break
            k = 1  # the longest start of the word that fits (at least one character)
            while k < len(word) and draw.textlength(word[:k + 1]) <= width:
                k += 1
            lines.append(word[:k])
            word = word[k:]
        lines.append(word)
    return lines or [""]


MAX_CAPTION_LINES = 24  # a caption past it is cut, its last line ending in "…" (a pasted novel is no 10000 px grid)


def cap_lines(draw: ImageDraw.ImageDraw, lines: list[str], width: int, most: int = MAX_CAPTION_LINES) -> list[str]:
    """``lines`` (a wrapped caption) as they are when at most ``most``; else the first ``most``, the last
    ending in "…" within ``width`` pixels."""
    if len(lines) <= most:
        return lines
    last = lines[most - 1]
    while last and draw.textlength(last.rstrip() + " …") > width:
        last = last[:-1]
    return lines[:most - 1] + [(last.rstrip() + " …").lstrip()]


def save_grid(rows, headers, path, title: str = "", min_cell: int = 128) -> Path:
    """``rows``: list of (caption, [image tensors (3, H, W) in [0, 1], or None: an empty cell]), or
    (caption, images, labels): that row's cells labelled ``labels`` instead of ``headers``. Small
    images are upscaled (nearest) to ``min_cell`` so tiny runs stay legible. Each caption is wrapped to
    the grid's width (its row grows by the lines it needs), up to :data:`MAX_CAPTION_LINES` lines; a
    longer one is cut, ending in "…"."""
    rows = [(r[0], r[1], r[2] if len(r) > 2 else headers) for r in rows]
    cell_w = max(min_cell, max(im.shape[-1] for _, ims, _ in rows for im in ims if im is not None))
    cell_h = max(min_cell, max(im.shape[-2] for _, ims, _ in rows for im in ims if im is not None))
    pad, head, line_h = 6, 18, 11
    ncol = max(len(ims) for _, ims, _ in rows)
    W = pad + ncol * (cell_w + pad)
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [cap_lines(d, wrap_text(d, caption, W - 2 * pad, MAX_CAPTION_LINES), W - 2 * pad)
                for caption, _, _ in rows]
    cap_h = [max(28, 6 + line_h * len(lines)) for lines in captions]
    H = head + pad + sum(cell_h + c + pad for c in cap_h)
    canvas = Image.new("RGB", (W, max(H, head + pad)), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((pad, 2), title, fill=(0, 0, 0))
    y = head + pad
    for (caption, ims, labels), lines, ch in zip(rows, captions, cap_h):
        for c, im in enumerate(ims):
            if im is None:
                continue
            p = to_pil(im)
            s = min(cell_w / p.width, cell_h / p.height)
            if s > 1:
                p = p.resize((int(p.width * s), int(p.height * s)), Image.NEAREST)
            x = pad + c * (cell_w + pad)
            canvas.paste(p, (x, y))
            if c < len(labels):
                d.text((x + 2, y + 2), labels[c], fill=(255, 255, 0), stroke_width=1, stroke_fill=(0, 0, 0))
        for k, line in enumerate(lines):
            d.text((pad, y + cell_h + 2 + k * line_h), line, fill=(0, 0, 0))
        y += cell_h + ch + pad

    return atomic_write(Path(path), canvas.save)
