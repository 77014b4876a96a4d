"""Faults and misuse that used to lose data or give a silently wrong result (tiny, CPU): resume with a
changed config, divergence, two trainers on one output, torn outputs, SIGTERM, a corrupt checkpoint."""

import json
import logging
import os
import signal

import pytest
import torch

from tests.conftest import tiny_config


def _trainer(tmp_path, *over, resume=None, allow=False):
    from dopsd_fast.trainer import Trainer

    return Trainer(tiny_config(tmp_path, *over), resume=resume, allow_config_change=allow)


def _metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_resume_applies_a_new_lr_and_refuses_math_changes(tmp_path):
    from dopsd_fast.config import ConfigError

    _trainer(tmp_path, "train.checkpoint_every=2", "optim.lr=0.001").train()
    tr = _trainer(tmp_path, "train.max_steps=5", "optim.lr=0.05", resume="latest")
    assert tr.step == 3 and all(g["lr"] == 0.05 for g in tr.optimizer.param_groups)
    tr.train()
    assert [m["lr"] for m in _metrics(tmp_path) if m["step"] > 3] == [0.05, 0.05]
    with pytest.raises(ConfigError, match=r"lora.rank: 8 -> 4"):
        _trainer(tmp_path, "lora.rank=4", "train.max_steps=6", resume="latest")
    with pytest.raises(ConfigError, match=r"data.bucket_scale"):
        _trainer(tmp_path, "data.bucket_scale=0.1", "train.max_steps=6", resume="latest")
    tr = _trainer(tmp_path, "data.bucket_scale=0.1", "train.max_steps=6", resume="latest", allow=True)
    assert tr.step == 5


def test_divergence_stops_before_anything_is_written(tmp_path, caplog):
    from dopsd_fast.safety import DivergenceError

    with pytest.raises(DivergenceError, match=r"step 1: the update is .* x the weights"):
        _trainer(tmp_path, "optim.lr=1e20", "train.checkpoint_every=1").train()
    run = tmp_path / "run"
    assert not (run / "lora").exists() and not any((run / "checkpoints").glob("step-*"))
    # a large but finite LR trains on, with a warning
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        _trainer(tmp_path / "b", "optim.lr=1e3").train()
    assert "larger than the weights" in caplog.text


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dopsd_fast.safety import DivergenceError
    from dopsd_fast.trainer import Trainer

    tr = _trainer(tmp_path, "train.checkpoint_every=1", "train.max_steps=4")
    orig = Trainer.compute_rollout

    def poisoned(self, *a, **kw):
        res = orig(self, *a, **kw)
        if self.step == 2:
            res.loss = res.loss * float("nan")
        return res

    monkeypatch.setattr(Trainer, "compute_rollout", poisoned)
    with pytest.raises(DivergenceError, match="step 3: the loss is nan"):
        tr.train()
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert steps[-1] == "step-0000002"
    from dopsd_fast.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "run" / "checkpoints" / steps[-1])
    assert all(torch.isfinite(v).all() for v in state["weights"]["student"].values())


def test_lr_must_be_finite_and_positive():
    from dopsd_fast.config import ConfigError, load_config

    for bad in (".inf", "0", "-1e-4", ".nan"):
        with pytest.raises(ConfigError, match="optim.lr"):
            load_config(None, [f"optim.lr={bad}"])


def test_one_trainer_per_output_directory(tmp_path):
    from dopsd_fast.safety import OutputLock

    (tmp_path / "run").mkdir()
    held = OutputLock(tmp_path / "run")
    try:
        with pytest.raises(RuntimeError, match=f"in use by host .* pid {os.getpid()}"):
            _trainer(tmp_path).train()
    finally:
        held.release()
    # a lock file left by a dead holder (no flock held) is taken over
    (tmp_path / "run" / ".lock").write_text("host gone pid 999999\n")
    _trainer(tmp_path).train()


def test_lora_export_is_atomic(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    tr.train()
    good = {p.name: p.read_bytes() for p in (tmp_path / "run" / "lora").iterdir()}

    def torn(state, out_dir, meta):  # dies half-way through writing
        with open(os.path.join(out_dir, "pytorch_lora_weights.safetensors"), "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tr.adapter, "export_lora", torn)
    with pytest.raises(OSError, match="No space left"):
        tr.export_lora()
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "lora").iterdir()} == good


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    from dopsd_fast.safety import Terminated
    from dopsd_fast.trainer import Trainer

    tr = _trainer(tmp_path, "train.max_steps=5")
    orig = Trainer.train_step

    def step_then_term(self):
        m = orig(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler would, at a deterministic point
        return m

    monkeypatch.setattr(Trainer, "train_step", step_then_term)
    with pytest.raises(Terminated):
        tr.train()
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / ".metadata").is_file()
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    monkeypatch.setattr(Trainer, "train_step", orig)
    tr = _trainer(tmp_path, "train.max_steps=5", resume="latest")
    assert tr.step == 2
    tr.train()
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, caplog):
    _trainer(tmp_path, "train.checkpoint_every=1", "train.max_steps=3").train()
    newest = tmp_path / "run" / "checkpoints" / "step-0000003" / "__0_0.distcp"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        tr = _trainer(tmp_path, "train.max_steps=4", resume="latest")
    assert tr.step == 2 and "skipping" in caplog.text and "step-0000003" in caplog.text
    # metrics beyond the resumed step are dropped: the file reads as one run
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        tr = _trainer(tmp_path / "fresh", resume="latest")
    assert tr.step == 0 and "starting from scratch" in caplog.text


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writes_leave_files_readable_per_umask(tmp_path, mask):
    """safetensors' save_file writes through a private temporary file (mode 0600); what the atomic
    writers leave has the mode a plain open() gives: 0666 less the umask."""
    import os

    from safetensors.torch import save_file

    from dopsd_fast.safety import atomic_dir, atomic_write

    old = os.umask(mask)
    try:
        atomic_dir(tmp_path / "lora", lambda d: save_file({"w": torch.ones(2)}, str(d / "x.safetensors")))
        atomic_write(tmp_path / "y.safetensors", lambda t: save_file({"w": torch.ones(2)}, str(t)))
    finally:
        os.umask(old)
    for f in (tmp_path / "lora" / "x.safetensors", tmp_path / "y.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f, oct(f.stat().st_mode))
