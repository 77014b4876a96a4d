"""The run's curves as one picture, ``curves.png`` beside ``metrics.jsonl``: loss, its part at each
roll-out state, grad norm, the update ratio, learning rate and step time against the step, redrawn at
each validation, at a stop and at the end of the run (rank 0). TensorBoard has the same numbers; this
is the look at a run without starting a server."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dopsd_fast.logging_utils import metrics_rows
from dopsd_fast.safety import atomic_write

# (metric, panel title, smoothed, value axis from zero): a smoothed panel draws the centred moving mean
# (dark) over the logged values (light); "loss_state/*": one moving mean per roll-out state
PANELS = (("loss", "loss", True, False), ("loss_state/*", "loss at each roll-out state", True, False),
          ("grad_norm", "grad norm (before clipping)", True, False),
          ("update_ratio", "update ratio |dw| / |w|", True, False),
          ("lr", "learning rate", False, True), ("step_time_s", "step time (s)", True, True))
PLOT_W, PLOT_H, LEFT, TOP, BOTTOM, PAD, HEAD = 300, 150, 64, 20, 18, 10, 20
LIGHT, DARK, AXIS = (170, 190, 230), (20, 60, 170), (90, 90, 90)
STATE_COLOURS = ((20, 60, 170), (200, 80, 20), (30, 140, 60), (150, 40, 150), (120, 120, 20), (20, 140, 150))
_STATE = re.compile(r"loss_state/(\d+)$")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` of a ``metrics.jsonl``: the panels' metrics and every
    ``loss_state/k``, finite values only (a torn or non-row line is skipped, as everywhere the file is read)."""
    out: dict[str, list[tuple[float, float]]] = {p[0]: [] for p in PANELS if not p[0].endswith("*")}
    for line, step in metrics_rows(path):
        row = json.loads(line)
        for name, v in row.items():
            if (name in out or _STATE.match(name)) and _finite(v):
                out.setdefault(name, []).append((float(step), float(v)))
    return out


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` points (fewer at the ends, where the window is cut): no lag behind the
    logged values."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    i = np.arange(len(values))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window - window // 2, len(values))
    return (c[hi] - c[lo]) / (hi - lo)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _panel(d: ImageDraw.ImageDraw, x0: int, y0: int, title: str, lines: list, smooth: bool, zero: bool) -> None:
    """One panel: its title (with the last value or moving mean), the axes with the value range and the
    step range, and ``lines`` (label, [(step, value)], colour), each its moving mean where ``smooth`` (one
    line alone: over its logged values, light). ``zero``: the value axis starts at 0 (a positive quantity
    read on its own scale)."""
    px, py = x0 + LEFT, y0 + TOP
    d.rectangle([px, py, px + PLOT_W, py + PLOT_H], outline=AXIS)
    lines = [(label, pts, colour) for label, pts, colour in lines if len(pts) >= 2]
    if not lines:
        d.text((x0, y0 + 2), title, fill=(0, 0, 0))
        d.text((px + 8, py + PLOT_H // 2 - 5), "not logged (yet)", fill=AXIS)
        return
    drawn = []
    for label, pts, colour in lines:
        s = np.array([p[0] for p in pts])
        v = np.array([p[1] for p in pts])
        drawn.append((label, s, v, moving_mean(v, 2 * (len(v) // 50) + 1) if smooth else v, colour))
    means = smooth and max(len(v) for _, _, v, _, _ in drawn) >= 50
    last = ", ".join(f"{label} {_fmt(m[-1])}" if label else _fmt(m[-1]) for label, _, _, m, _ in drawn)
    d.text((x0, y0 + 2), f"{title}: {last}" + (" (moving means)" if means and len(drawn) > 1 else
                                                " (moving mean)" if means else ""), fill=(0, 0, 0))
    # the range of the logged values without the extreme 1 % on either side (a first-step spike would
    # squash the rest); what lies outside is drawn on the border
    every = np.concatenate([v for _, _, v, _, _ in drawn] if len(drawn) == 1 else [m for *_, m, _ in drawn])
    lo, hi = np.percentile(every, [1, 99]) if len(every) >= 100 else (every.min(), every.max())
    if zero and lo > 0:
        lo = 0.0
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * max(abs(lo), 1e-12), hi + 0.5 * max(abs(hi), 1e-12)
    s0 = min(s.min() for _, s, _, _, _ in drawn)
    s1 = max(s.max() for _, s, _, _, _ in drawn)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(step, val):
        y = (min(max(val, lo), hi) - lo) / (hi - lo)
        return px + (step - s0) / (s1 - s0) * PLOT_W, py + (1 - y) * PLOT_H

    if smooth and len(drawn) == 1:
        _, s, v, _, _ = drawn[0]
        d.line([xy(a, b) for a, b in zip(s, v)], fill=LIGHT, width=1)
    for _, s, _, m, colour in drawn:
        d.line([xy(a, b) for a, b in zip(s, m)], fill=colour, width=2)
    d.text((x0, py - 1), _fmt(hi), fill=AXIS)
    d.text((x0, py + PLOT_H - 10), _fmt(lo), fill=AXIS)
    d.text((px, py + PLOT_H + 3), f"step {int(s0)}", fill=AXIS)
    end = f"step {int(s1)}"
    d.text((px + PLOT_W - d.textlength(end), py + PLOT_H + 3), end, fill=AXIS)


def _lines(name: str, series: dict) -> list:
    """The (label, points, colour) lines of panel ``name``."""
    if name != "loss_state/*":
        return [("", series.get(name, []), DARK)]
    states = sorted((int(_STATE.match(k).group(1)), pts) for k, pts in series.items() if _STATE.match(k))
    return [(f"state {k}", pts, STATE_COLOURS[k % len(STATE_COLOURS)]) for k, pts in states]


def draw_curves(series: dict, path: Path, title: str = "") -> Path:
    """The panels of ``series`` (``read_series``'s dict), two per row, in one picture at ``path``
    (written whole)."""
    pw, ph = LEFT + PLOT_W + PAD, TOP + PLOT_H + BOTTOM + PAD
    rows = (len(PANELS) + 1) // 2
    canvas = Image.new("RGB", (PAD + 2 * pw, HEAD + rows * ph), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((PAD, 4), title, fill=(0, 0, 0))
    for i, (name, label, smooth, zero) in enumerate(PANELS):
        _panel(d, PAD + (i % 2) * pw, HEAD + (i // 2) * ph, label, _lines(name, series), smooth, zero)
    return atomic_write(Path(path), canvas.save)


def plot_run(out_dir: Path, title: str = "") -> Path | None:
    """``out_dir/curves.png`` from ``out_dir/metrics.jsonl``; None while the file has no row."""
    src = Path(out_dir) / "metrics.jsonl"
    if not src.is_file():
        return None
    series = read_series(src)
    if not any(series.values()):
        return None
    return draw_curves(series, Path(out_dir) / "curves.png", title)
