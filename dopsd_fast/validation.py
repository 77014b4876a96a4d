"""Validation pictures: one row per prompt, columns side by side (target | student | teacher)."""

from __future__ import annotations

import bisect
import functools
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from dopsd_fast.safety import atomic_write

log = logging.getLogger(__name__)


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


# ---- captions in any script: Pillow's built-in font draws ASCII only ("é", "ü", Cyrillic, CJK came out as
# boxes); a caption with characters it lacks is drawn in an installed font that has them (found through
# fontconfig), else the boxes stay and the run says once which characters and what to install. A picture
# never stops a run: anything failing here falls back to the built-in font.
_FONTS: dict = {}  # frozenset of the characters the built-in font lacks -> the font drawn with
_told_undrawn: set = set()  # characters said to show as boxes
_SCANNED = 4000  # a caption's first characters looked at (a caption is cut at MAX_CAPTION_LINES lines anyway)


@functools.lru_cache(maxsize=1)
def _base_font():
    return ImageFont.load_default()


def _undrawn(font, text: str) -> set:
    """The characters of ``text`` that ``font`` draws as its missing-glyph box, or cannot draw at all (a
    bitmap font's Latin-1 only); spaces and controls aside."""
    def mask(c):
        try:
            m = font.getmask(c)
            return m.size, bytes(m)
        except Exception:  # noqa: BLE001 - a bitmap font cannot encode it: not drawn
            return None

    box = mask("\U0010FFFD")  # a private-use code point: no font draws it, so its mask is the box
    out = set()
    for c in set(text):
        if c.isprintable() and not c.isspace() and not (c.isascii() and box is None):
            m = mask(c)
            if m is None or m == box:
                out.add(c)
    return out


_TABLE: list | None = None  # (file, range starts, range ends) of every installed font


def _font_table() -> list:
    """Every font fontconfig knows, with the code points it has (sorted ranges); [] without fontconfig (read
    once per process)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = []
        fc = shutil.which("fc-list")
        try:  # a file name that is not UTF-8 kept as the bytes it is (surrogateescape), so it still opens
            out = subprocess.run([fc, "--format", "%{file}\t%{charset}\n"], capture_output=True, text=True,
                                 errors="surrogateescape", timeout=5).stdout if fc else ""
        except (OSError, subprocess.SubprocessError, ValueError):
            out = ""
        for line in out.splitlines():
            path, _, charset = line.partition("\t")
            try:
                ranges = sorted(tuple(int(v, 16) for v in (r.split("-") * 2)[:2]) for r in charset.split())
            except ValueError:
                continue
            if path and ranges:
                _TABLE.append((path, [lo for lo, _ in ranges], [hi for _, hi in ranges]))
    return _TABLE


def _fonts_by_coverage(chars: set) -> list[str]:
    """Installed font files that have some of ``chars``, the most first (plain sans first among equals)."""
    odd = ("bold", "italic", "oblique", "mono", "serif", "condensed", "light", "black", "thin")
    points = [ord(c) for c in chars]

    def covered(starts, ends):
        return sum(1 for p in points if (i := bisect.bisect_right(starts, p) - 1) >= 0 and p <= ends[i])

    ranked = sorted(((covered(st, en), -sum(w in Path(f).name.lower() for w in odd), -len(Path(f).name), f)
                     for f, st, en in _font_table()), reverse=True)
    return [f for n, *_, f in ranked if n]


def drawable(text: str, font) -> str:
    """``text`` as ``font`` can take it: a bitmap font (Pillow without FreeType) encodes Latin-1 only, the
    rest drawn as "?" (it raised, and the grid was lost)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def caption_font(text: str):
    """The font to draw ``text`` in: Pillow's built-in one when it has every character, else the installed
    font that has the most of them (looked up once per set of characters); the characters no installed
    font draws with the rest are said once."""
    base = _base_font()
    if text.isascii():
        return base
    try:
        missing = frozenset(_undrawn(base, text[:_SCANNED]))
        if not missing:
            return base
        if missing not in _FONTS:
            font = base
            for path in _fonts_by_coverage(set(missing))[:4]:
                try:
                    font = ImageFont.truetype(path, getattr(base, "size", 10))
                    break
                except (OSError, ValueError):
                    continue
            _FONTS[missing] = font
            left = sorted(_undrawn(font, "".join(missing)) if font is not base else missing)
            new = [c for c in left if c not in _told_undrawn]
            if new:
                _told_undrawn.update(new)
                log.warning("captions: no installed font draws %s with the rest of its caption; they show as boxes "
                            "in the pictures' captions (install a font that has them, e.g. fonts-noto-cjk for "
                            "Chinese, Japanese or Korean)",
                            " ".join(repr(c) for c in new[:8]) + (f" and {len(new) - 8} more" if len(new) > 8 else ""))
        return _FONTS[missing]
    except Exception as e:  # noqa: BLE001 - a picture's caption never stops the run
        log.debug("caption font lookup failed: %s", e)
        return base


MAX_CAPTION_LINES = 24  # a caption past it is cut, its last line ending in "…" (a pasted novel is no 10000 px grid)


def cap_lines(draw: ImageDraw.ImageDraw, lines: list[str], width: int, most: int = MAX_CAPTION_LINES) -> list[str]:
    """``lines`` (a wrapped caption) as they are when at most ``most``; else the first ``most``, the last
    ending in "…" within ``width`` pixels."""
    if len(lines) <= most:
        return lines
    last, more = lines[most - 1], " …" if isinstance(draw.getfont(), ImageFont.FreeTypeFont) else " ..."
    while last and draw.textlength(last.rstrip() + more) > width:
        last = last[:-1]
    return lines[:most - 1] + [(last.rstrip() + more).lstrip()]


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
    fonts, captions = [], []
    for caption, _, _ in rows:
        d.font = caption_font(caption)  # measured in the font it is drawn with
        fonts.append(d.font)
        captions.append(cap_lines(d, wrap_text(d, drawable(caption, d.font), W - 2 * pad, MAX_CAPTION_LINES),
                                  W - 2 * pad))
    cap_h = [max(28, 6 + line_h * len(lines)) for lines in captions]
    H = head + pad + sum(cell_h + c + pad for c in cap_h)
    canvas = Image.new("RGB", (W, max(H, head + pad)), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    tf = caption_font(title)
    d.text((pad, 2), drawable(title, tf), fill=(0, 0, 0), font=tf)
    y = head + pad
    for (caption, ims, labels), lines, ch, font in zip(rows, captions, cap_h, fonts):
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
                lf = caption_font(labels[c])
                d.text((x + 2, y + 2), drawable(labels[c], lf), fill=(255, 255, 0), stroke_width=1,
                       stroke_fill=(0, 0, 0), font=lf)
        for k, line in enumerate(lines):
            d.text((pad, y + cell_h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
        y += cell_h + ch + pad

    return atomic_write(Path(path), canvas.save)


def set_aside_later_grids(samples: Path, step: int) -> Path | None:
    """A resume from ``step``: the grids ``samples/step-N.png`` of later steps (of the attempt whose metrics
    rows past ``step`` were dropped: a crash, or a run taken back to an earlier checkpoint) moved into
    ``samples/abandoned-K/`` (not deleted), so ``samples/`` holds this run's pictures only; -> that folder,
    or None when there were none."""
    samples = Path(samples)
    later = sorted(p for p in samples.glob("step-*.png")
                   if (m := re.fullmatch(r"step-(\d+)\.png", p.name)) and int(m.group(1)) > step and p.is_file())
    if not later:
        return None
    k = 1
    while (samples / f"abandoned-{k}").exists():
        k += 1
    aside = samples / f"abandoned-{k}"
    aside.mkdir()
    for p in later:
        os.replace(p, aside / p.name)
    return aside
