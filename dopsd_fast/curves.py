"""The run's curves as one picture, ``curves.png`` beside ``metrics.jsonl``: loss, its part at each
roll-out state, grad norm, the update ratio, learning rate and step time against the step (rank 0:
redrawn at each validation and checkpoint, at a stop, at the end and when the run fails). TensorBoard
has the same numbers; this is the look at a run without starting a server.

:class:`Curves` reads only what was appended to ``metrics.jsonl`` since its last read (a file cut back
by a resume is read again whole), and a curve is drawn through at most a few points per pixel column
(each column's lowest and highest value), so a redraw costs about the same at step 100 and at step
100,000."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dopsd_fast.logging_utils import parse_row
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
_EXACT_MEAN = 4_000_000  # points x window up to which a moving mean sums each window on its own
LOG_DECADES = 3  # a panel of positive values spanning more decades than this is drawn on a log axis


_METRICS = frozenset(p[0] for p in PANELS)


def _wanted(name: str) -> bool:
    return name in _METRICS or _STATE.match(name) is not None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Curves:
    """The panels' series of one ``metrics.jsonl``, read incrementally: ``{metric: ([steps], [values])}``,
    finite values only (a torn or non-row line is skipped, as everywhere the file is read)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.file = None  # (device, inode) of the file read so far
        self.series: dict[str, tuple[list, list]] = {}

    def update(self) -> dict:
        """Read what was appended since the last call (a whole line at a time) and return the series."""
        try:
            st = self.path.stat()
            size, file = st.st_size, (st.st_dev, st.st_ino)
        except FileNotFoundError:
            size, file = 0, None
        if size < self.offset or file != self.file:  # cut back or replaced (a resume rewrites it to the
            self.offset, self.series, self.file = 0, {}, file  # checkpoint's step): read it again, whole
        if size == self.offset:
            return self.series
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            parsed = parse_row(line)
            if parsed is None:
                continue
            row, step = parsed
            for name, v in row.items():
                if _wanted(name) and _finite(v):
                    steps, vals = self.series.setdefault(name, ([], []))
                    steps.append(float(step))
                    vals.append(float(v))
        return self.series


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` of a whole ``metrics.jsonl`` (the panels' metrics and every
    ``loss_state/k``)."""
    return {k: list(zip(s, v)) for k, (s, v) in Curves(path).update().items()}


def moving_mean(values, window: int, at=None) -> np.ndarray:
    """Centred mean over ``window`` points (fewer at the ends, where the window is cut): no lag behind the
    logged values; at the indices ``at`` only, or at every point. Each window is summed on its own (a
    running sum would lose the small values' digits after a huge one, e.g. a 1e17 grad norm)."""
    v = np.asarray(values, dtype=np.float64)
    n, half = len(v), window // 2
    at = np.arange(n) if at is None else np.asarray(at, dtype=np.int64)
    if window <= 1 or n == 0:
        return v[at].copy()
    if len(at) * window <= _EXACT_MEAN:  # every window at once, as strided views
        padded = np.pad(v, (half, window - half - 1), constant_values=np.nan)
        return np.nanmean(np.lib.stride_tricks.sliding_window_view(padded, window)[at], axis=1)
    return np.array([v[max(0, i - half):min(n, i + window - half)].mean() for i in at.tolist()])


def _thin(x: np.ndarray, y: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """At most 2 points per pixel column (x: pixel positions, ascending): each column's lowest and highest
    value, in that order; fewer points than 4 per column are kept as they are."""
    if len(x) <= 4 * columns:
        return x, y
    col = np.clip(x.astype(np.int64), 0, None)
    starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
    lo, hi = np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts)
    xs = np.repeat(col[starts].astype(np.float64), 2)
    ys = np.empty(2 * len(starts))
    ys[0::2], ys[1::2] = lo, hi
    return xs, ys


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _panel(d: ImageDraw.ImageDraw, x0: int, y0: int, title: str, lines: list, smooth: bool, zero: bool,
           empty: str = "not logged (yet)") -> None:
    """One panel: its title, the axes with the value range and the step range, and ``lines`` (label,
    (steps, values), colour), each its moving mean where ``smooth`` (one line alone: over its logged
    values, light). The last value (or moving mean) of each line: in the title for one line, in a
    legend inside the plot for several. ``zero``: the value axis starts at 0 (a positive quantity read
    on its own scale)."""
    px, py = x0 + LEFT, y0 + TOP
    d.rectangle([px, py, px + PLOT_W, py + PLOT_H], outline=AXIS)
    lines = [(label, sv, colour) for label, sv, colour in lines if len(sv[0])]
    if not lines:
        d.text((x0, y0 + 2), title, fill=(0, 0, 0))
        d.text((px + 8, py + PLOT_H // 2 - 5), empty, fill=AXIS)
        return
    raw = [(label, np.asarray(sv[0]), np.asarray(sv[1], dtype=np.float64), colour) for label, sv, colour in lines]
    every = np.concatenate([v for _, _, v, _ in raw])
    # positive values over more than LOG_DECADES decades (a run diverged and staying there: on a linear axis it
    # lay on the floor line, read as recovered): drawn on a log axis, the moving means of the logs
    log_axis = bool(smooth and every.min() > 0 and every.max() > every.min() * 10 ** LOG_DECADES)
    if log_axis:
        raw = [(label, s, np.log10(v), colour) for label, s, v, colour in raw]
        every = np.log10(every)
        title, zero = f"{title} (log scale)", False
    shown = (lambda x: float(10 ** x)) if log_axis else float
    # the range of the logged values without the extreme 1 % on either side (a first-step spike would
    # squash the rest); what lies outside is drawn on the border
    lo, hi = np.percentile(every, [1, 99]) if len(every) >= 100 else (every.min(), every.max())
    drawn = []
    for label, s, v, colour in raw:
        # the moving mean where it is drawn: at most 2 points per pixel column, always the last one
        at = np.unique(np.linspace(0, len(v) - 1, min(len(v), 2 * PLOT_W)).round().astype(np.int64))
        m = moving_mean(v, 2 * (len(v) // 50) + 1, at) if smooth else v[at]
        drawn.append((label, s, v, s[at], m, colour))
    means = smooth and max(len(v) for _, _, v, _, _, _ in drawn) >= 50
    if len(drawn) > 1:
        lo, hi = min(lo, *(m.min() for *_, m, _ in drawn)), max(hi, *(m.max() for *_, m, _ in drawn))
    if zero and lo > 0:
        lo = 0.0
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * max(abs(lo), 1e-12), hi + 0.5 * max(abs(hi), 1e-12)
    first = s0 = min(s.min() for _, s, _, _, _, _ in drawn)
    last = s1 = max(s.max() for _, s, _, _, _, _ in drawn)
    if s1 <= s0:  # one step logged: its point in the middle
        s0, s1 = s0 - 0.5, s0 + 0.5

    def points(s, v):
        x, y = _thin(px + (s - s0) / (s1 - s0) * PLOT_W, v, PLOT_W)
        y = py + 2 + (1 - (np.clip(y, lo, hi) - lo) / (hi - lo)) * (PLOT_H - 4)  # off the frame
        return list(zip(x.tolist(), y.tolist()))

    kind = (" (moving means)" if len(drawn) > 1 else " (moving mean)") if means else ""
    if len(drawn) == 1:
        d.text((x0, y0 + 2), f"{title}: {_fmt(shown(drawn[0][4][-1]))}{kind}", fill=(0, 0, 0))
    else:
        d.text((x0, y0 + 2), title + kind, fill=(0, 0, 0))
    if smooth and len(drawn) == 1:
        _, s, v, _, _, _ = drawn[0]
        d.line(points(s, v), fill=LIGHT, width=1)
    for _, _, _, sm, m, colour in drawn:
        pts = points(sm, m)
        if len(pts) == 1:  # one logged value (a first step, a run that failed at its second): a dot
            (x, y), = pts
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            d.line(pts, fill=colour, width=2)
    if len(drawn) > 1:  # the legend: each line's label and last value, in its colour, top right inside the plot
        for k, (label, *_, m, colour) in enumerate(drawn[:(PLOT_H - 8) // 11]):
            text = f"{label}: {_fmt(shown(m[-1]))}"
            d.text((px + PLOT_W - 4 - d.textlength(text), py + 3 + 11 * k), text, fill=colour)
    d.text((x0, py - 1), _fmt(shown(hi)), fill=AXIS)
    d.text((x0, py + PLOT_H - 10), _fmt(shown(lo)), fill=AXIS)
    d.text((px, py + PLOT_H + 3), f"step {int(first)}", fill=AXIS)
    end = f"step {int(last)}"
    d.text((px + PLOT_W - d.textlength(end), py + PLOT_H + 3), end, fill=AXIS)


def _lines(name: str, series: dict) -> list:
    """The (label, (steps, values), colour) lines of panel ``name``."""
    if name != "loss_state/*":
        return [("", series.get(name, ([], [])), DARK)]
    states = sorted((int(_STATE.match(k).group(1)), sv) for k, sv in series.items() if _STATE.match(k))
    return [(f"state {k}", sv, STATE_COLOURS[k % len(STATE_COLOURS)]) for k, sv in states]


def _same(a, b) -> bool:
    """Two (steps, values) series hold the same points."""
    return b is not None and len(a[0]) == len(b[0]) and np.array_equal(np.asarray(a[0]), np.asarray(b[0])) \
        and np.array_equal(np.asarray(a[1]), np.asarray(b[1]))


def draw_curves(series: dict, path: Path, title: str = "") -> Path:
    """The panels of ``series`` (:meth:`Curves.update`'s dict), two per row, in one picture at ``path``
    (written whole)."""
    pw, ph = LEFT + PLOT_W + PAD, TOP + PLOT_H + BOTTOM + PAD
    rows = (len(PANELS) + 1) // 2
    canvas = Image.new("RGB", (PAD + 2 * pw, HEAD + rows * ph), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((PAD, 4), title, fill=(0, 0, 0))
    for i, (name, label, smooth, zero) in enumerate(PANELS):
        lines, empty = _lines(name, series), "not logged (yet)"
        if name == "loss_state/*" and len(lines) == 1 and _same(lines[0][1], series.get("loss")):
            lines, empty = [], "one state (no roll-out): the loss panel"  # SFT: it would repeat that panel
        _panel(d, PAD + (i % 2) * pw, HEAD + (i // 2) * ph, label, lines, smooth, zero, empty)
    return atomic_write(Path(path), canvas.save)


def plot_run(out_dir: Path, title: str = "", curves: Curves | None = None) -> Path | None:
    """``out_dir/curves.png`` from ``out_dir/metrics.jsonl`` (through ``curves``, a :class:`Curves` kept
    between calls, to read only what is new). With no row to draw (none yet, or the file cut back to
    none): None, and an earlier picture is removed (it would show rows the file no longer has)."""
    out_dir = Path(out_dir)
    curves = curves if curves is not None else Curves(out_dir / "metrics.jsonl")
    series = curves.update()
    pic = out_dir / "curves.png"
    if not any(len(s) for s, _ in series.values()):
        pic.unlink(missing_ok=True)
        return None
    return draw_curves(series, pic, title)
