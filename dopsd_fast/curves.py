"""The run's curves as one picture, ``curves.png`` beside ``metrics.jsonl``: loss, grad norm, learning
rate and step time against the step, redrawn at each validation and at the end of the run (rank 0).
TensorBoard has the same numbers; this is the look at a run without starting a server."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dopsd_fast.logging_utils import metrics_rows
from dopsd_fast.safety import atomic_write

# (metric, panel title, smoothed, axis from zero): a smoothed panel draws its moving mean (dark) over the
# logged values (light)
PANELS = (("loss", "loss", True, False), ("grad_norm", "grad norm (before clipping)", True, False),
          ("lr", "learning rate", False, True), ("step_time_s", "step time (s)", True, True))
PLOT_W, PLOT_H, LEFT, TOP, BOTTOM, PAD = 300, 150, 64, 20, 18, 10
LIGHT, DARK, AXIS = (170, 190, 230), (20, 60, 170), (90, 90, 90)


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` of a ``metrics.jsonl`` for the panels' metrics: finite values only
    (a torn or non-row line is skipped, as everywhere the file is read)."""
    import json

    out: dict[str, list[tuple[float, float]]] = {p[0]: [] for p in PANELS}
    for line, step in metrics_rows(path):
        row = json.loads(line)
        for name in out:
            v = row.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[name].append((float(step), float(v)))
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


def _panel(d: ImageDraw.ImageDraw, x0: int, y0: int, title: str, pts: list, smooth: bool, zero: bool) -> None:
    """One panel: its title (with the last moving mean), the axes with the value range and the step
    range, the curve. ``zero``: the value axis starts at 0 (for positive quantities read on their own scale)."""
    px, py = x0 + LEFT, y0 + TOP
    d.rectangle([px, py, px + PLOT_W, py + PLOT_H], outline=AXIS)
    if len(pts) < 2:
        d.text((x0, y0 + 2), title, fill=(0, 0, 0))
        d.text((px + 8, py + PLOT_H // 2 - 5), "not logged yet" if not pts else "one point so far", fill=AXIS)
        return
    s = np.array([p[0] for p in pts])
    v = np.array([p[1] for p in pts])
    m = moving_mean(v, 2 * (len(v) // 50) + 1) if smooth else v  # odd: centred exactly
    d.text((x0, y0 + 2), f"{title}: {_fmt(m[-1])}" + (" (moving mean)" if smooth and len(v) >= 50 else ""),
           fill=(0, 0, 0))
    # the range of the logged values without the extreme 1 % on either side (a first-step spike would
    # squash the rest); what lies outside is drawn on the border
    lo, hi = (np.percentile(v, [1, 99]) if len(v) >= 100 else (v.min(), v.max()))
    if zero and lo > 0:
        lo = 0.0
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * max(abs(lo), 1e-12), hi + 0.5 * max(abs(hi), 1e-12)
    s0, s1 = s.min(), s.max()
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(step, val):
        y = (min(max(val, lo), hi) - lo) / (hi - lo)
        return px + (step - s0) / (s1 - s0) * PLOT_W, py + (1 - y) * PLOT_H

    if smooth:
        d.line([xy(a, b) for a, b in zip(s, v)], fill=LIGHT, width=1)
    d.line([xy(a, b) for a, b in zip(s, m)], fill=DARK, width=2)
    d.text((x0, py - 1), _fmt(hi), fill=AXIS)
    d.text((x0, py + PLOT_H - 10), _fmt(lo), fill=AXIS)
    d.text((px, py + PLOT_H + 3), f"step {int(s0)}", fill=AXIS)
    end = f"step {int(s1)}"
    d.text((px + PLOT_W - d.textlength(end), py + PLOT_H + 3), end, fill=AXIS)


def draw_curves(series: dict, path: Path, title: str = "") -> Path:
    """The panels of ``series`` (``read_series``'s dict) in a 2 x 2 picture at ``path`` (written whole)."""
    pw, ph = LEFT + PLOT_W + PAD, TOP + PLOT_H + BOTTOM + PAD
    head = 20
    canvas = Image.new("RGB", (PAD + 2 * pw, head + 2 * ph), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((PAD, 4), title, fill=(0, 0, 0))
    for i, (name, label, smooth, zero) in enumerate(PANELS):
        _panel(d, PAD + (i % 2) * pw, head + (i // 2) * ph, label, series.get(name, []), smooth, zero)
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
