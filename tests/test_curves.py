"""``curves.png``: the run's metrics as a picture, drawn from ``metrics.jsonl`` (what it shows follows the
numbers), and a picture that cannot be written never stops a run."""

import json
import math
import logging

import numpy as np
import pytest
from PIL import Image

from dopsd_fast import curves as C


def _write(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def _dark_rows(img, x0, x1, y0, y1):
    """Mean row of the dark (moving-mean) pixels in the box [x0, x1) x [y0, y1)."""
    a = np.asarray(img.convert("RGB"), dtype=int)[y0:y1, x0:x1]
    dark = (np.abs(a - np.array(C.DARK)).sum(-1) < 60)
    ys = np.nonzero(dark)[0]
    assert len(ys), "no curve drawn in the box"
    return ys.mean() + y0


def test_moving_mean_is_the_centred_mean():
    v = np.random.default_rng(0).normal(size=37)
    for w in (1, 3, 5):
        want = [v[max(0, i - w // 2):i + w - w // 2].mean() for i in range(len(v))]
        np.testing.assert_allclose(C.moving_mean(v, w), want, rtol=1e-12)


@pytest.mark.parametrize("falling", [True, False])
def test_the_loss_curve_follows_the_logged_numbers(tmp_path, falling):
    """A falling loss is drawn high on the left and low on the right (a rising one the other way); a
    torn line, a NaN and a non-row are skipped, not drawn or fatal."""
    rows = [{"step": s, "loss": (math.exp(-s / 60) if falling else 1 - math.exp(-s / 60)),
             "grad_norm": 1.0, "lr": 1e-3, "step_time_s": 0.5} for s in range(1, 301)]
    rows[150]["loss"] = float("nan")
    (tmp_path / "metrics.jsonl").write_text("")
    _write(tmp_path / "metrics.jsonl", rows, extra_lines=['{"step": 301, "loss": 0.', "[1, 2]"])
    series = C.read_series(tmp_path / "metrics.jsonl")
    assert len(series["loss"]) == 299 and all(math.isfinite(v) for _, v in series["loss"])
    path = C.plot_run(tmp_path, "t")
    assert path == tmp_path / "curves.png"
    img = Image.open(path)
    # the loss panel: the first one (top left)
    px, py = C.PAD + C.LEFT, C.HEAD + C.TOP
    left = _dark_rows(img, px + 2, px + 30, py + 1, py + C.PLOT_H)
    right = _dark_rows(img, px + C.PLOT_W - 30, px + C.PLOT_W - 2, py + 1, py + C.PLOT_H)
    assert (left < right - 0.5 * C.PLOT_H) if falling else (left > right + 0.5 * C.PLOT_H), (left, right)


def test_each_roll_out_state_is_its_own_line(tmp_path):
    """loss_state/0 high and falling, loss_state/1 low and flat: two lines, the state-0 one above on the
    left, both in the panel's own colours."""
    rows = [{"step": s, "loss": 1.0, "loss_state/0": 2 - s / 300, "loss_state/1": 0.2} for s in range(1, 301)]
    _write(tmp_path / "metrics.jsonl", rows)
    series = C.read_series(tmp_path / "metrics.jsonl")
    assert sorted(k for k in series if k.startswith("loss_state/")) == ["loss_state/0", "loss_state/1"]
    img = Image.open(C.plot_run(tmp_path))
    pw = C.LEFT + C.PLOT_W + C.PAD
    px, py = C.PAD + pw + C.LEFT, C.HEAD + C.TOP  # the second panel (top right)
    a = np.asarray(img.convert("RGB"), dtype=int)[py + 1:py + C.PLOT_H, px + 2:px + 30]
    rows_of = [np.nonzero((np.abs(a - np.array(c)).sum(-1) < 60))[0] for c in C.STATE_COLOURS[:2]]
    assert all(len(r) for r in rows_of) and rows_of[0].mean() < rows_of[1].mean() - 0.5 * C.PLOT_H


def test_one_huge_value_does_not_erase_the_moving_mean():
    """Finite spikes of 1e17 (a grad norm before clipping): the mean of a window after them is the other
    values' again (a running sum lost their digits), on both ways of summing the windows."""
    v = np.ones(5000)
    v[10] = 1e17
    np.testing.assert_array_equal(C.moving_mean(v, 201)[200:], 1.0)
    many = np.ones(20_000)
    many[:10_000:160] = 1e17  # 63 spikes: more than the 0.1 % a percentile bound would cut
    assert C.moving_mean(many, 801, at=[19_999, 15_000]).tolist() == [1.0, 1.0]
    big = np.ones(200_000)
    big[:100_000:1000] = 1e17
    at = np.linspace(0, 199_999, 600).round().astype(int)
    assert len(at) * 8001 > C._EXACT_MEAN  # the window-by-window path
    assert np.all(C.moving_mean(big, 8001, at=at)[at > 105_000] == 1.0)
    np.testing.assert_allclose(C.moving_mean(big[:5000], 41, at=at[:10]), C.moving_mean(big[:5000], 41)[at[:10]])


def test_curves_read_only_what_was_appended(tmp_path):
    """Incremental reading: a line still being written waits for its newline; a file cut back (a resume)
    is read again whole; with no row left the old picture is removed."""
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": s, "loss": float(s)} for s in (1, 2)])
    cur = C.Curves(path)
    assert cur.update()["loss"] == ([1.0, 2.0], [1.0, 2.0])
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 3.0}\n{"step": 4, "lo')
    assert cur.update()["loss"][0] == [1.0, 2.0, 3.0]
    with open(path, "a") as f:
        f.write('ss": 4.0}\n')
    assert cur.update()["loss"][0] == [1.0, 2.0, 3.0, 4.0]
    assert C.plot_run(tmp_path, curves=cur).is_file()
    _write(path, [{"step": 1, "loss": 1.0}])  # cut back to the checkpoint's step
    assert cur.update()["loss"] == ([1.0], [1.0])
    new = tmp_path / "new.jsonl"  # replaced by a longer file (an atomic rewrite): read again, not from the offset
    _write(new, [{"step": s, "loss": 10.0 + s} for s in range(1, 6)])
    new.replace(path)
    assert cur.update()["loss"] == ([1.0, 2.0, 3.0, 4.0, 5.0], [11.0, 12.0, 13.0, 14.0, 15.0])
    path.write_text("")
    assert C.plot_run(tmp_path, curves=cur) is None and not (tmp_path / "curves.png").exists()


def test_nothing_logged_draws_nothing_and_one_point_draws_its_panel(tmp_path):
    assert C.plot_run(tmp_path) is None  # no metrics.jsonl
    _write(tmp_path / "metrics.jsonl", [], extra_lines=["not json"])
    assert C.plot_run(tmp_path) is None
    _write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.3, "grad_norm": 1.0, "lr": 0.0, "step_time_s": 2.0},
                                        {"step": 2, "loss": 0.3, "grad_norm": 1.0, "lr": 0.0, "step_time_s": 2.0}])
    assert C.plot_run(tmp_path).is_file()  # constant series: a flat line, no division by zero
    # one row (a 1-step run, a run that failed at its second step): each panel shows its value as a dot
    # (it said "not logged (yet)"); a metric no row has stays empty
    _write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.3, "grad_norm": 1.0, "lr": 0.0, "step_time_s": 2.0}])
    img = Image.open(C.plot_run(tmp_path))
    px, py = C.PAD + C.LEFT, C.HEAD + C.TOP
    y = _dark_rows(img, px + 2, px + C.PLOT_W - 2, py + 1, py + C.PLOT_H)  # the loss panel (top left)
    assert py + 0.3 * C.PLOT_H < y < py + 0.7 * C.PLOT_H  # one value: mid-height
    a = np.asarray(img.convert("RGB"), dtype=int)[py + 1:py + C.PLOT_H, px + 2:px + C.PLOT_W - 2]
    xs = np.nonzero((np.abs(a - np.array(C.DARK)).sum(-1) < 60).any(0))[0]
    assert 0.4 * C.PLOT_W < xs.mean() < 0.6 * C.PLOT_W and xs.max() - xs.min() <= 8  # a dot in the middle
    i = [p[0] for p in C.PANELS].index("update_ratio")  # no row has it
    rx = C.PAD + (i % 2) * (C.LEFT + C.PLOT_W + C.PAD) + C.LEFT
    ry = C.HEAD + (i // 2) * (C.TOP + C.PLOT_H + C.BOTTOM + C.PAD) + C.TOP
    b = np.asarray(img.convert("RGB"), dtype=int)[ry + 1:ry + C.PLOT_H, rx + 2:rx + C.PLOT_W - 2]
    assert not (np.abs(b - np.array(C.DARK)).sum(-1) < 60).any()


def test_a_run_draws_its_curves_and_a_failed_picture_costs_it_nothing(tmp_path, monkeypatch, caplog):
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    tr = Trainer(tiny_config(tmp_path / "a", "train.max_steps=2"))
    tr.train()
    assert (tmp_path / "a" / "run" / "curves.png").is_file()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    # a run that fails draws its curves up to the failure (no validation or checkpoint drew them here)
    from dopsd_fast import trainer as T

    step = T.Trainer.train_step

    def failing(self):
        if self.step == 2:
            raise RuntimeError("injected failure at step 3")
        return step(self)

    monkeypatch.setattr(T.Trainer, "train_step", failing)
    tr = Trainer(tiny_config(tmp_path / "f", "train.max_steps=5", "train.log_every=1"))
    with pytest.raises(RuntimeError, match="injected"):
        tr.train()
    assert C.read_series(tmp_path / "f" / "run" / "metrics.jsonl")["loss"][-1][0] == 2
    assert (tmp_path / "f" / "run" / "curves.png").is_file()
    monkeypatch.setattr(T.Trainer, "train_step", step)

    monkeypatch.setattr(C, "plot_run", broken)
    tr = Trainer(tiny_config(tmp_path / "b", "train.max_steps=3", "validation.every=1", "validation.num_samples=1"))
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr.train()
    assert tr.step == 3 and (tmp_path / "b" / "run" / "lora").is_dir()
    said = [r.getMessage() for r in caplog.records if "curves.png not written" in r.getMessage()]
    assert len(said) == 1 and "No space left on device" in said[0], said


def test_one_state_equal_to_the_loss_is_not_drawn_twice(tmp_path):
    """SFT logs its loss as the one state's: the states' panel said the same as the loss panel; it now
    says so in words. Two states, or one that differs from the loss, are drawn."""
    def state_panel_has_a_line(rows):
        _write(tmp_path / "metrics.jsonl", rows)
        img = Image.open(C.plot_run(tmp_path))
        i = [p[0] for p in C.PANELS].index("loss_state/*")
        x = C.PAD + (i % 2) * (C.LEFT + C.PLOT_W + C.PAD) + C.LEFT
        y = C.HEAD + (i // 2) * (C.TOP + C.PLOT_H + C.BOTTOM + C.PAD) + C.TOP
        a = np.asarray(img.convert("RGB"), dtype=int)[y + 1:y + C.PLOT_H, x + 2:x + C.PLOT_W - 2]
        return bool((np.abs(a - np.array(C.STATE_COLOURS[0])).sum(-1) < 60).any())

    sft = [{"step": s, "loss": 1 / s, "loss_state/0": 1 / s} for s in range(1, 30)]
    assert not state_panel_has_a_line(sft)
    assert state_panel_has_a_line([{**r, "loss_state/0": 2 / r["step"]} for r in sft])
    assert state_panel_has_a_line([{**r, "loss_state/1": 0.5 / r["step"]} for r in sft])


def test_a_run_that_stays_diverged_is_drawn_on_a_log_axis_not_on_the_floor(tmp_path):
    """A loss of 0.02 for 80 steps, then 1e6 .. 1e11 for 20 (a full fine-tuning run at optim.lr=1): on a
    linear axis from 0.02 to 1e11 the diverged steps lay on the floor line, labelled 0.02, read as a run
    that recovered. Positive values over more than 3 decades are drawn on a log axis: the diverged end is
    high, the healthy start low."""
    rows = [{"step": s, "loss": 0.02 if s <= 80 else 10 ** (6 + 5 * (s - 81) / 19), "lr": 1e-3}
            for s in range(1, 101)]
    _write(tmp_path / "metrics.jsonl", rows)
    img = Image.open(C.plot_run(tmp_path, "t"))
    px, py = C.PAD + C.LEFT, C.HEAD + C.TOP
    left = _dark_rows(img, px + 2, px + 30, py + 1, py + C.PLOT_H)
    right = _dark_rows(img, px + C.PLOT_W - 20, px + C.PLOT_W - 2, py + 1, py + C.PLOT_H)
    assert left > py + 0.6 * C.PLOT_H and right < py + 0.4 * C.PLOT_H, (left, right)
    # a healthy run's loss (under 3 decades) keeps its linear axis: the same picture as before
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 101)]
    _write(tmp_path / "metrics.jsonl", rows)
    lin = np.asarray(Image.open(C.plot_run(tmp_path, "t")))
    C.LOG_DECADES, before = 1, C.LOG_DECADES
    try:
        log = np.asarray(Image.open(C.plot_run(tmp_path, "t")))
    finally:
        C.LOG_DECADES = before
    assert not np.array_equal(lin, log)


def test_the_done_line_says_the_loss_over_the_first_and_last_tenth(tmp_path):
    """The done line said one step's loss (one row of a batch of one: 0.026 where the moving mean was 0.043),
    and nothing of where the run went; it says the loss's mean over the first and last tenth of the logged
    steps (a student wrecked while its EMA teacher follows shows a loss that grows)."""
    from dopsd_fast.cli import _loss_trend

    _write(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0 if s <= 2 else 0.5 if s <= 18 else 4.0}
                                        for s in range(1, 21)])
    assert _loss_trend(tmp_path / "metrics.jsonl") == " (the mean of the first 2 logged: 1, of the last 2: 4)"
    _write(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(1, 10)])
    assert _loss_trend(tmp_path / "metrics.jsonl") == ""  # under 10 logged steps: one step's loss alone
    assert _loss_trend(tmp_path / "none.jsonl") == ""
