"""Faults and misuse that used to lose data or give a silently wrong result (tiny, CPU): resume with a
changed config, divergence, two trainers on one output, torn outputs, SIGTERM, a corrupt checkpoint."""

import json
import logging
import os
import re
import signal

import pytest
import torch

from tests.conftest import assert_close, tiny_config


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


def test_a_run_on_the_earlier_rollout_default_is_told_how_to_resume(tmp_path):
    """dopsd.rollout left out was one family's schedule for every family; it is now the family's own. A run
    of another family that trained on the earlier default, resumed with the same config, is refused (the
    math changes) with the line that resumes it."""
    from dopsd_fast.config import ConfigError
    from dopsd_fast.families import DEFAULT_FAMILY, FAMILIES

    other = next(s for n, s in FAMILIES.items() if n != DEFAULT_FAMILY)
    first = FAMILIES[DEFAULT_FAMILY].default_rollout
    base = [f"model.family={other.name}", f"model.preset={other.tiny_preset}", "train.checkpoint_every=1"]
    _trainer(tmp_path, *base, "train.max_steps=1", f"dopsd.rollout={first}").train()
    with pytest.raises(ConfigError, match=rf"dopsd.rollout: '{first}' -> '{other.default_rollout}'.*earlier default: "
                                          rf"--set dopsd.rollout={first} resumes it"):
        _trainer(tmp_path, *base, "train.max_steps=2", resume="latest")
    assert _trainer(tmp_path, *base, "train.max_steps=2", f"dopsd.rollout={first}", resume="latest").step == 1


def test_divergence_stops_before_anything_is_written(tmp_path, caplog):
    from dopsd_fast.safety import DivergenceError

    with pytest.raises(DivergenceError, match=r"step 1: the update is .* x the weights"):
        _trainer(tmp_path, "optim.lr=1", "train.max_update_ratio=1.5", "train.checkpoint_every=1").train()
    run = tmp_path / "run"
    assert not (run / "lora").exists() and not any((run / "checkpoints").glob("step-*"))
    # a large but finite LR trains on, with a warning
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        _trainer(tmp_path / "b", "optim.lr=1").train()
    assert "larger than the weights" in caplog.text


def test_gradient_norm_spikes_warn_once_then_are_counted(caplog):
    """A gradient-norm spike (warn_factor x the running median) is printed in full; later ones within
    quiet_steps of it are counted, not printed, and the count with the largest comes with the next
    printed spike or, at the end of the run, in one line (Guard.summary). A steady run prints nothing."""
    from dopsd_fast.safety import Guard

    g = Guard(max_update_ratio=1e6, warn_factor=10.0, quiet_steps=100)
    w = [torch.ones(4)]
    spikes = {20: 20.0, 30: 40.0, 50: 30.0, 150: 25.0, 160: 50.0}
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        for step in range(1, 201):
            g.check_after_update(step, w, None, spikes.get(step, 1.0))
        printed = [r.getMessage() for r in caplog.records]
        g.summary()
        g.summary()  # nothing left to say
    assert len(printed) == 2, printed
    assert printed[0].startswith("step 20: gradient norm 20 is 20 x its running median 1: a spike")
    assert "further spikes within 100 steps are counted, not printed" in printed[0]
    assert printed[1].startswith("step 150: gradient norm 25 is 25 x") and \
        "2 more since step 20 (the largest 40 x at step 30)" in printed[1], printed[1]
    end = [r.getMessage() for r in caplog.records][2:]
    assert end == ["gradient norm spikes over 10 x the running median: 1 more since step 150 (the largest 50 x at "
                   "step 160)"], end
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        quiet = Guard(max_update_ratio=1e6, warn_factor=10.0)
        for step in range(1, 101):
            quiet.check_after_update(step, w, None, 1.0 + 0.5 * (step % 3))
        quiet.summary()
    assert not caplog.records
    # torchrun: the ranks other than 0 see the same averaged gradient: their guard warns nothing (every
    # rank printed each spike), while its refusals stay
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        other = Guard(max_update_ratio=1e6, warn_factor=10.0, quiet_steps=100, verbose=False)
        for step in range(1, 201):
            other.check_after_update(step, w, None, spikes.get(step, 1.0))
        other.summary()
        from dopsd_fast.safety import DivergenceError

        with pytest.raises(DivergenceError):
            other.check_before_update(201, float("nan"), 1.0)
    assert not caplog.records


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


def test_a_resume_at_the_end_writes_the_final_exports_its_checkpoint_has_and_they_lack(straight, tmp_path, caplog):
    """The final exports are written from the checkpoint by a resume that has nothing left to train, when
    they are missing or of an earlier step: a LoRA export that failed after its checkpoint (a full disk),
    full fine-tuning stopped during its last step (it exports at the end). The resume said "nothing to
    train, nothing written" and the trained weights were only in the checkpoint."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    good = _files(run)
    shutil.rmtree(run / "lora_ema")  # never written
    mark = json.loads((run / "lora" / "export.json").read_text())
    assert mark["step"] == 4
    (run / "lora" / "export.json").write_text(json.dumps({**mark, "step": 3}))  # the previous export
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"the step-3 export")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        assert _trainer(tmp_path, *_STRAIGHT, resume="latest").train() == {}
    assert "nothing to train; the run's final export lora/ (of step 3), lora_ema/ (missing): writing it" in caplog.text
    from safetensors import safe_open

    now = _files(run)
    assert set(now) == set(good)
    for name in good:  # the uninterrupted run's files (safetensors: the same tensors and metadata; the
        if not name.endswith(".safetensors"):  # header's key order is not fixed)
            assert now[name] == good[name], name
            continue
        with safe_open(str(run / name), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        with safe_open(str(straight / name), "pt") as f:
            assert meta == f.metadata() and set(tensors) == set(f.keys()), name
            assert all(torch.equal(tensors[k], f.get_tensor(k)) for k in tensors), name

    # full fine-tuning: a SIGTERM during the last step writes its checkpoint and stops before the export
    from dopsd_fast.safety import Terminated
    from dopsd_fast.trainer import Trainer

    full = ["lora.enabled=false", "train.max_steps=2", "train.checkpoint_every=0"]
    base = tmp_path / "full"
    tr = _trainer(base, *full)
    orig = Trainer.train_step

    def step_then_term(self):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self)

    Trainer.train_step = step_then_term
    try:
        with pytest.raises(Terminated):
            tr.train()
    finally:
        Trainer.train_step = orig
    assert not (base / "run" / "transformer").exists() and (base / "run" / "checkpoints" / "step-0000002").is_dir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr = _trainer(base, *full, resume="latest")
        tr.train()
    assert "final export transformer/ (missing), transformer_ema/ (missing): writing it" in caplog.text
    from safetensors.torch import load_file

    for name, module in (("transformer", tr.weights.student()), ("transformer_ema", tr.weights.teacher())):
        assert json.loads((base / "run" / name / "export.json").read_text())["step"] == 2
        sd = load_file(str(base / "run" / name / "diffusion_pytorch_model.safetensors"))
        want = module.state_dict()
        assert set(sd) == set(want) and all(torch.equal(sd[k], want[k].to(sd[k].dtype)) for k in sd), name
    before = _files(base / "run")
    _trainer(base, *full, resume="latest").train()  # now complete: nothing written
    assert _files(base / "run") == before


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


# ---- Ctrl-C, a used output folder, a second trainer (nothing lost) ---------------------------------------
def _files(folder):
    """Every file under ``folder`` (the lock aside) as bytes: what "untouched" compares."""
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _state(ck):
    from dopsd_fast.checkpoint import load_checkpoint

    s = load_checkpoint(ck)
    return {"step": s["step"], "weights": s["weights"], "optimizer": s["optimizer"], "sampler": s["sampler"],
            "lr_scheduler": s["lr_scheduler"]}


def _assert_same(a, b, where="state"):
    """Bitwise equal nested states."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


_STRAIGHT = ["train.max_steps=4", "train.keep_checkpoints=10", "dopsd.ema_decay=0.7", "data.batch_size=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: 4 steps, a checkpoint after every one."""
    from dopsd_fast.trainer import Trainer

    base = tmp_path_factory.mktemp("straight")
    Trainer(tiny_config(base, *_STRAIGHT, "train.checkpoint_every=1")).train()
    return base / "run"


def _inject_sigint(monkeypatch, tr, point, at_step, times=1):
    """Send this process SIGINT ``times`` times at ``point`` of optimizer step ``at_step`` (1-based): a
    deterministic place, not a timing."""
    import dopsd_fast.weights as W
    from dopsd_fast.trainer import Trainer

    def fire():
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)

    if point == "before_backward":
        orig = Trainer.compute_rollout

        def f(self, *a, **kw):
            if self.step + 1 == at_step:
                fire()
            return orig(self, *a, **kw)
        monkeypatch.setattr(Trainer, "compute_rollout", f)
    elif point == "after_optimizer_step":
        orig_step = tr.optimizer.step

        def f(*a, **kw):
            out = orig_step(*a, **kw)
            if tr.step + 1 == at_step:
                fire()  # the weights hold step N, the step counter, sampler and EMA do not yet
            return out
        monkeypatch.setattr(tr.optimizer, "step", f)
    elif point == "inside_ema":
        orig = W.ema_update_

        def f(teacher, students, decay):
            teacher, students = list(teacher), list(students)
            k = len(teacher) // 2
            orig(teacher[:k], students[:k], decay)
            if tr.step + 1 == at_step:
                fire()  # half of the teacher updated
            orig(teacher[k:], students[k:], decay)
        monkeypatch.setattr(W, "ema_update_", f)
    elif point == "between_steps":
        orig = tr.logger.log

        def f(step, metrics):
            orig(step, metrics)
            if step == at_step:
                fire()
        monkeypatch.setattr(tr.logger, "log", f)
    else:
        raise AssertionError(point)


_OPT_STEP_WRAPPED = "ignore:Seems like `optimizer.step\\(\\)` has been overridden"


@pytest.mark.filterwarnings(_OPT_STEP_WRAPPED)
@pytest.mark.parametrize("point", ["before_backward", "after_optimizer_step", "inside_ema", "between_steps"])
def test_ctrl_c_writes_the_completed_step_and_resume_equals_the_uninterrupted_run(straight, tmp_path, monkeypatch,
                                                                                  point):
    """Ctrl-C anywhere in step 2 (before the backward, just after optimizer.step(), half-way through the EMA
    update, between steps): the step finishes, its checkpoint is labelled 2 and holds exactly what the
    uninterrupted run's step-2 checkpoint holds (weights, optimizer, LR schedule, data position); the
    resumed run ends bitwise where the uninterrupted one ended, with every metrics row."""
    from dopsd_fast.safety import Interrupted
    from dopsd_fast.trainer import Trainer

    tr = _trainer(tmp_path, *_STRAIGHT)
    _inject_sigint(monkeypatch, tr, point, at_step=2)
    with pytest.raises(Interrupted, match="SIGINT at step 2"):
        tr.train()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back
    cks = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert cks == ["step-0000002"]
    _assert_same(_state(tmp_path / "run" / "checkpoints" / "step-0000002"),
                 _state(straight / "checkpoints" / "step-0000002"))
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]
    monkeypatch.undo()
    tr = _trainer(tmp_path, *_STRAIGHT, resume="latest")
    assert tr.step == 2
    tr.train()
    _assert_same(_state(tmp_path / "run" / "checkpoints" / "step-0000004"),
                 _state(straight / "checkpoints" / "step-0000004"))
    assert _rows(tmp_path / "run") == _rows(straight)  # every row, the same values


def _metrics_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rows(run):
    """The metrics rows without the timings."""
    return [{k: v for k, v in m.items() if k not in ("step_time_s", "samples_per_s")} for m in _metrics_of(run)]


@pytest.mark.filterwarnings(_OPT_STEP_WRAPPED)
def test_a_second_ctrl_c_stops_at_once_writing_nothing(straight, tmp_path, monkeypatch):
    """Two Ctrl-C just after step 2's optimizer.step(): the run stops there, writes no checkpoint and no
    LoRA of the half-applied step (step 1's stay as they were), and the resume repeats step 2 onwards to
    the uninterrupted result."""
    from dopsd_fast.safety import Aborted

    tr = _trainer(tmp_path, *_STRAIGHT, "train.checkpoint_every=1")
    orig_save = tr.save
    saved = {}

    def save():
        p = orig_save()
        saved.update(_files(tmp_path / "run"))
        return p
    monkeypatch.setattr(tr, "save", save)
    _inject_sigint(monkeypatch, tr, "after_optimizer_step", at_step=2, times=2)
    with pytest.raises(Aborted):
        tr.train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-0000001"]
    after = _files(tmp_path / "run")
    assert {k: v for k, v in after.items() if k != "metrics.jsonl" and k != "config.yaml"} == \
        {k: v for k, v in saved.items() if k != "metrics.jsonl" and k != "config.yaml"}
    assert [m["step"] for m in _metrics(tmp_path)] == [1]
    monkeypatch.undo()
    tr = _trainer(tmp_path, *_STRAIGHT, "train.checkpoint_every=1", resume="latest")
    assert tr.step == 1
    tr.train()
    _assert_same(_state(tmp_path / "run" / "checkpoints" / "step-0000004"),
                 _state(straight / "checkpoints" / "step-0000004"))
    assert _rows(tmp_path / "run") == _rows(straight)


def _no_model_build(monkeypatch):
    """A refusal must come before the data and the model are touched."""
    from dopsd_fast.trainer import Trainer

    def fail(self):
        raise AssertionError("the model was built before the refusal")
    monkeypatch.setattr(Trainer, "_build_data_and_model", fail)


def test_a_used_output_dir_without_resume_is_refused_and_overwrite_moves_it_aside(straight, tmp_path, monkeypatch):
    import shutil

    from dopsd_fast.errors import OutputDirError
    from dopsd_fast.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    before = _files(run)
    with pytest.MonkeyPatch.context() as m:
        _no_model_build(m)
        with pytest.raises(OutputDirError) as e:
            _trainer(tmp_path, *_STRAIGHT)
    msg = str(e.value)
    assert "\n" not in msg and str(run) in msg and "--resume latest" in msg and "another output_dir" in msg \
        and "--overwrite" in msg
    assert _files(run) == before  # the earlier run untouched
    with pytest.raises(OutputDirError, match="pass one of them"):
        Trainer(tiny_config(tmp_path, *_STRAIGHT), resume="latest", overwrite=True)
    # --overwrite: the earlier run moved aside whole, the new run trains in a fresh folder
    Trainer(tiny_config(tmp_path, *_STRAIGHT, "train.max_steps=2", "train.checkpoint_every=1"), overwrite=True).train()
    assert _files(tmp_path / "run.old-1") == before
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]
    # a second --overwrite keeps the first one aside too
    Trainer(tiny_config(tmp_path, *_STRAIGHT, "train.max_steps=1"), overwrite=True).train()
    assert _files(tmp_path / "run.old-1") == before and (tmp_path / "run.old-2" / "metrics.jsonl").is_file()


def test_the_cli_refuses_a_used_output_dir_in_one_line(straight, tmp_path, capsys):
    import shutil

    from dopsd_fast.cli import train_main

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    before = _files(run)
    with pytest.raises(SystemExit) as e:
        train_main(["--set", f"train.output_dir={run}", "--set", "train.max_steps=4", "--set", "train.progress=false"])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: train.output_dir ")
    assert "\n" not in e.value.code and "--overwrite" in e.value.code
    assert _files(run) == before


def test_pruning_touches_only_the_current_runs_checkpoints(straight, tmp_path):
    """Checkpoints carry their run's id; a run prunes only its own (another run's step-50 stays, though
    its step number is the highest)."""
    import shutil

    from dopsd_fast.checkpoint import checkpoint_run_id, list_checkpoints, save_checkpoint

    ck = tmp_path / "ck"
    for step in (50, 51):
        save_checkpoint(ck, step, {"step": step, "w": torch.ones(2)}, keep=1, run_id="aaaaaaaaaaaa")
    for step in (1, 2, 3):
        save_checkpoint(ck, step, {"step": step, "w": torch.ones(2)}, keep=2, run_id="bbbbbbbbbbbb")
    assert [s for s, _ in list_checkpoints(ck)] == [2, 3, 51]
    assert checkpoint_run_id(ck / "step-0000051") == "aaaaaaaaaaaa"
    # in the trainer: a foreign checkpoint in the folder, the run resumed from its own step 2
    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(ck / "step-0000051", run / "checkpoints" / "step-0000051")
    mine = checkpoint_run_id(run / "checkpoints" / "step-0000002")
    assert mine and mine != "aaaaaaaaaaaa"
    tr = _trainer(tmp_path, *_STRAIGHT, "train.max_steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                  resume=str(run / "checkpoints" / "step-0000002"))
    assert tr.run_id == mine
    tr.train()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5, 6, 51]
    assert checkpoint_run_id(run / "checkpoints" / "step-0000006") == mine


def test_resume_into_a_folder_of_another_run_or_with_nothing_loadable_is_refused(straight, tmp_path):
    import shutil

    from dopsd_fast.errors import OutputDirError

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    before = _files(run)
    other = tmp_path / "other"
    _trainer(other, *_STRAIGHT, "train.max_steps=1").train()
    with pytest.raises(OutputDirError, match="holds another run"):
        _trainer(tmp_path, *_STRAIGHT, "train.max_steps=5", resume=str(other / "run" / "checkpoints" / "step-0000001"))
    assert _files(run) == before
    # every checkpoint damaged: refused (a fresh start there would mix with, then prune, the earlier run)
    for ck in (run / "checkpoints").glob("step-*"):
        (ck / "__0_0.distcp").write_bytes(b"torn")
    before = _files(run)
    with pytest.raises(OutputDirError, match=r"no checkpoint in .* loads .*--overwrite"):
        _trainer(tmp_path, *_STRAIGHT, "train.max_steps=5", resume="latest")
    assert _files(run) == before


def _forged(straight, tmp_path, edit):
    """``straight``'s step-2 checkpoint with ``edit`` applied to its state, written as a received one."""
    from dopsd_fast.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(straight / "checkpoints" / "step-0000002")
    edit(state)
    return save_checkpoint(tmp_path / "received", 2, state, keep=5)


def _student_a(state):
    return next(k for k in state["weights"]["student"] if ".lora_A." in k)


def _set(path, value):
    def edit(state):
        *head, last = path(state) if callable(path) else path
        d = state
        for k in head:
            d = d[k]
        d[last] = value
    return edit


@pytest.mark.parametrize("edit, error, match", [
    # a tensor of another shape is refused naming it (it used to be broadcast into the weight)
    (_set(lambda s: ["weights", "student", _student_a(s)], torch.tensor(0.5)), "ConfigError",
     r"student weight .*lora_A.* is torch.float32 \(\), this model's is floating-point \(\d+, \d+\)"),
    (_set(lambda s: ["weights", "teacher", _student_a(s).replace("student", "teacher")], torch.tensor([7.0])),
     "ConfigError", r"teacher weight .* is torch.float32 \(1,\)"),
    (_set(["optimizer", "state", 0, "exp_avg"], torch.zeros(2, 3, 4)), "ConfigError",
     r"optimizer state exp_avg of .* has shape \(2, 3, 4\)"),
    # values of another kind: the checkpoint does not load
    (_set(lambda s: ["weights", "student", _student_a(s)], "not a tensor"), "FileNotFoundError",
     r"weights.student\[.*\] is not a floating-point tensor"),
    (_set(["step"], -5), "FileNotFoundError", r"step -5 is not a step count"),
    (_set(["lr_scheduler", "last_epoch"], "x"), "FileNotFoundError", r"'lr_scheduler' is not"),
    (_set(["optimizer", "state", 0, "exp_avg_sq"], torch.full((1,), -1.0)), "FileNotFoundError",
     r"exp_avg_sq.* holds negative values"),
    (_set(["optimizer", "state", 0, "payload"], torch.zeros(1)), "FileNotFoundError", r"not one of AdamW's tensors"),
    (_set(["run_id"], "../../elsewhere"), "FileNotFoundError", r"run_id .* is not a run id"),
    (_set(["model_files"], {"model.path": {"x.safetensors": 5}}), "FileNotFoundError", r"'model_files' is not"),
    # a sampler or generator state that is not one: KeyError / IndexError "unexpected" lines at load() before
    (lambda s: s["weights"]["student"][_student_a(s)].fill_(1e30), "FileNotFoundError",
     r"weights.student\[.*lora_A.*\] holds \|w\| up to 1e\+30, over the limit"),
    (_set(["sampler"], {}), "FileNotFoundError", r"sampler\['epoch'\] is not a count"),
    (_set(["sampler", "position"], -3), "FileNotFoundError", r"sampler\['position'\] is not a count"),
    (_set(["sampler", "epoch"], "abc"), "FileNotFoundError", r"sampler\['epoch'\] is not a count"),
    (_set(["rng"], {}), "FileNotFoundError", r"'rng' lacks the python generator's state"),
    (_set(["rng", "numpy"], ("MT19937",)), "FileNotFoundError", r"'rng' is not the generators' state"),
    (_set(["rng", "python"], "abc"), "FileNotFoundError", r"'rng' is not the generators' state"),
    (_set(["rng", "torch"], torch.zeros(3, dtype=torch.uint8)), "FileNotFoundError", r"'rng' is not the generators'"),
    (_set(["rng", "cuda"], [torch.zeros(16)]), "FileNotFoundError", r"'rng' holds a CUDA generators' state that is not"),
    # a 0-dim moment passed the shape check and failed at the first step
    (_set(["optimizer", "state", 0, "exp_avg"], torch.tensor(5.0)), "ConfigError",
     r"optimizer state exp_avg of .* has shape \(\), the parameter"),
], ids=["scalar-weight", "short-teacher", "moment-shape", "string-weight", "negative-step", "scheduler-epoch",
        "negative-moment", "foreign-state", "run-id", "model-files", "huge-lora", "sampler-empty", "sampler-negative",
        "sampler-string", "rng-empty", "rng-numpy", "rng-python", "rng-torch", "rng-cuda", "scalar-moment"])
def test_a_received_checkpoint_of_the_wrong_kind_is_refused_naming_the_field(straight, tmp_path, edit, error, match):
    ck = _forged(straight, tmp_path, edit)
    with pytest.raises(Exception, match=match) as e:
        _trainer(tmp_path, *_STRAIGHT, "train.max_steps=5", resume=str(ck))
    assert type(e.value).__name__ == error and len(str(e.value).splitlines()) == 1


def test_a_received_checkpoint_sets_no_optimizer_or_scheduler_option(straight, tmp_path):
    """Only the position of the scheduler and the moments of the optimizer come from a checkpoint: its
    scheduler entries cannot replace the scheduler's attributes, its optimizer options are this run's."""

    def edit(state):
        state["lr_scheduler"]["optimizer"] = 1  # LambdaLR.load_state_dict would set self.optimizer = 1
        state["lr_scheduler"]["base_lrs"] = [9.0]
        for g in state["optimizer"]["param_groups"]:
            g.update(maximize=True, amsgrad=True, lr=9.0)

    tr = _trainer(tmp_path, *_STRAIGHT, "train.max_steps=3", resume=str(_forged(straight, tmp_path, edit)))
    assert tr.step == 2 and tr.lr_sched.optimizer is tr.optimizer and tr.lr_sched.last_epoch == 2
    assert all(not g["maximize"] and not g["amsgrad"] and g["lr"] < 1 for g in tr.optimizer.param_groups)
    tr.train()
    assert tr.step == 3


def test_a_run_id_record_that_is_a_pipe_or_a_link_out_is_not_read(tmp_path):
    from dopsd_fast.checkpoint import RUN_ID_FILE, checkpoint_run_id

    outside = tmp_path / "outside"
    outside.write_text("aaaaaaaaaaaa\n")
    piped, linked, plain = (tmp_path / n for n in ("piped", "linked", "plain"))
    for d in (piped, linked, plain):
        d.mkdir()
    os.mkfifo(piped / RUN_ID_FILE)  # opening it for reading would wait for a writer forever
    (linked / RUN_ID_FILE).symlink_to(outside)
    (plain / RUN_ID_FILE).write_text("bbbbbbbbbbbb\n")
    assert checkpoint_run_id(piped) is None and checkpoint_run_id(linked) is None
    assert checkpoint_run_id(plain) == "bbbbbbbbbbbb"


def test_the_lock_comes_first_a_second_trainer_is_refused_at_once_and_truncates_nothing(straight, tmp_path,
                                                                                         monkeypatch):
    """A trainer running in the folder (its lock held): a second one, even with --resume latest (which
    cuts metrics.jsonl back to the checkpoint), is refused before it reads, writes or builds anything."""
    import shutil
    import time

    from dopsd_fast.errors import OutputDirError
    from dopsd_fast.safety import OutputLock

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    with open(run / "metrics.jsonl", "a") as f:  # the running trainer's row past its last checkpoint
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    before = _files(run)
    held = OutputLock(run)
    try:
        _no_model_build(monkeypatch)
        for resume in ("latest", None):
            t0 = time.perf_counter()
            with pytest.raises(OutputDirError, match=f"in use by host .* pid {os.getpid()}"):
                _trainer(tmp_path, *_STRAIGHT, "train.max_steps=6", resume=resume)
            assert time.perf_counter() - t0 < 2.0
        assert _files(run) == before
    finally:
        held.release()


def test_the_lock_follows_no_symlink_and_a_killed_holder_leaves_none(tmp_path):
    import subprocess
    import sys

    from dopsd_fast.errors import OutputDirError
    from dopsd_fast.safety import OutputLock

    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (run / ".lock").symlink_to(target)
    with pytest.raises(OutputDirError, match=r"\.lock is a symbolic link"):
        OutputLock(run)
    with pytest.raises(OutputDirError, match=r"\.lock is a symbolic link"):
        _trainer(tmp_path)
    assert target.read_text() == "keep me\n"
    (run / ".lock").unlink()
    # kill -9 of the holder: the kernel drops the flock, the next trainer takes the lock
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirError, match="in use"):
            OutputLock(run)
    finally:
        holder.kill()
        holder.wait()
    OutputLock(run).release()


def test_max_steps_at_or_below_the_checkpoint_says_so(straight, tmp_path, caplog):
    import shutil

    from dopsd_fast.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    before = _files(run)
    with pytest.raises(ConfigError, match=r"train.max_steps=3 is below the step of the checkpoint .*step-0000004 "
                                          r"\(4\): nothing to train"):
        _trainer(tmp_path, *_STRAIGHT, "train.max_steps=3", resume="latest")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        assert _trainer(tmp_path, *_STRAIGHT, resume="latest").train() == {}
    assert "the checkpoint is at step 4, train.max_steps=4: nothing to train, nothing written" in caplog.text
    assert _files(run) == before
    # an older checkpoint at max_steps: nothing written either (metrics.jsonl keeps steps 3 and 4, whose
    # checkpoints are still there: a later --resume latest continues from step 4 with every row)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr = _trainer(tmp_path, *[o for o in _STRAIGHT if "max_steps" not in o], "train.max_steps=2",
                      resume=str(run / "checkpoints" / "step-0000002"))
        assert tr.train() == {}
    assert "the checkpoint is at step 2, train.max_steps=2: nothing to train, nothing written" in caplog.text
    assert _files(run) == before


# ---- every fault ends in one line that names it -------------------------------------------------------
def test_resume_latest_names_every_checkpoint_it_skips(straight, tmp_path, caplog):
    """An emptied step folder, one without .metadata, and one that does not load: each named with its
    reason; the resume takes the newest that loads."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    cks = run / "checkpoints"
    shutil.rmtree(cks / "step-0000004")
    (cks / "step-0000004").mkdir()  # emptied
    (cks / "step-0000003" / ".metadata").unlink()  # half-copied
    (cks / "step-0000002" / "__0_0.distcp").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr = _trainer(tmp_path, *_STRAIGHT, resume="latest")
    assert tr.step == 1
    tr.close()
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skips) == 3
    assert "step-0000004: not a complete checkpoint (no .metadata" in skips[0]
    assert "step-0000003: not a complete checkpoint" in skips[1]
    assert "step-0000002: it does not load" in skips[2]


def test_an_incomplete_checkpoint_skipped_on_resume_is_set_aside_not_deleted_when_its_step_comes_again(straight,
                                                                                                   tmp_path, caplog):
    """The run's step 4 without its .metadata (its data file and run id remain): --resume latest skipped
    it, and the resumed run's save of step 4 deleted it (this run's own checkpoint of the same step). It
    is moved aside to step-0000004.damaged-1 at the resume, its files kept."""
    import shutil

    from dopsd_fast.checkpoint import list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    cks = run / "checkpoints"
    (cks / "step-0000004" / ".metadata").unlink()  # half-copied
    data = (cks / "step-0000004" / "__0_0.distcp").read_bytes()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr = _trainer(tmp_path, *_STRAIGHT, "train.checkpoint_every=1", resume="latest")
        assert tr.step == 3
        tr.train()
    assert "moved aside (step-0000004.damaged-1; not deleted)" in caplog.text
    assert (cks / "step-0000004.damaged-1" / "__0_0.distcp").read_bytes() == data
    assert [s for s, _ in list_checkpoints(cks)] == [1, 2, 3, 4]  # the resumed run's step 4, written anew


def test_a_save_over_a_folder_of_its_step_that_is_not_a_complete_checkpoint_moves_it_aside(tmp_path, caplog):
    """save_checkpoint removed the run's own folder of the step it writes, complete or not; one that is
    not a complete checkpoint (no .metadata: skipped on resume, its files someone's to inspect) is moved
    aside to step-N.damaged-K; another run's still goes to step-N.superseded-K."""
    from dopsd_fast.checkpoint import RUN_ID_FILE, list_checkpoints, save_checkpoint

    ck, rid = tmp_path / "ck", "aaaaaaaaaaaa"
    torn = ck / "step-0000002"
    torn.mkdir(parents=True)
    (torn / "__0_0.distcp").write_bytes(b"the data")
    (torn / RUN_ID_FILE).write_text(rid + "\n")
    emptied = ck / "step-0000003"
    emptied.mkdir()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        for step in (2, 3):
            save_checkpoint(ck, step, {"step": step, "w": torch.ones(2)}, keep=5, run_id=rid)
        save_checkpoint(ck, 3, {"step": 3, "w": torch.ones(2)}, keep=5, run_id=rid)  # its own complete one: replaced
    assert (ck / "step-0000002.damaged-1" / "__0_0.distcp").read_bytes() == b"the data"
    assert (ck / "step-0000003.damaged-1").is_dir()
    assert [s for s, _ in list_checkpoints(ck)] == [2, 3]
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000002", "step-0000002.damaged-1", "step-0000003",
                                                    "step-0000003.damaged-1"]
    assert "step-0000002 is not a complete checkpoint: moved to" in caplog.text


def test_the_lora_swap_leaves_a_complete_folder_and_a_crash_between_renames_is_repaired(tmp_path, monkeypatch,
                                                                                        caplog):
    from dopsd_fast import safety

    out = tmp_path / "out"
    safety.atomic_dir(out / "lora", lambda d: (d / "w").write_text("one"))
    # the swap is one step where the system has it: "lora" always names a complete folder
    seen = []
    real = os.replace

    def watch(a, b):
        seen.append((os.path.basename(a), os.path.basename(b), (out / "lora" / "w").exists()))
        return real(a, b)
    monkeypatch.setattr(safety.os, "replace", watch)
    safety.atomic_dir(out / "lora", lambda d: (d / "w").write_text("two"))
    assert (out / "lora" / "w").read_text() == "two" and not list(out.glob(".lora.*"))
    pid = os.getpid()  # renameat2 where available (no moment without lora/), else the two renames
    assert seen == [] or [x[:2] for x in seen] == [("lora", f".lora.old-{pid}"), (f".lora.tmp-{pid}", "lora")]
    monkeypatch.undo()
    # a crash between the fallback's two renames: lora/ missing, the previous one aside, a temp left
    os.replace(out / "lora", out / ".lora.old-4242")
    (out / ".lora.tmp-4242").mkdir()
    (out / ".lora.tmp-4242" / "w").write_text("half")
    (out / ".lora_ema.tmp-77").mkdir()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        safety.recover_dirs(out, ("lora", "lora_ema"))
    assert (out / "lora" / "w").read_text() == "two"
    assert not list(out.glob(".lora*"))
    assert "restored the previous one from .lora.old-4242" in caplog.text and ".lora_ema.tmp-77" in caplog.text


def test_a_resume_repairs_the_lora_folders_left_by_a_kill(straight, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    good = _files(run / "lora")
    os.replace(run / "lora", run / ".lora.old-31337")  # kill -9 between the two renames of the swap
    (run / ".lora_ema.tmp-31337").mkdir()
    tr = _trainer(tmp_path, *_STRAIGHT, "train.max_steps=5", resume="latest")
    assert _files(run / "lora") == good and not list(run.glob(".lora*"))
    tr.close()


def test_a_full_disk_during_the_lora_export_is_one_line_and_nothing_torn(tmp_path, monkeypatch):
    from pathlib import Path

    import dopsd_fast.trainer as T

    tr = _trainer(tmp_path, "train.max_steps=1")
    tr.train()
    run = tmp_path / "run"
    good = _files(run / "lora"), _files(run / "lora_ema")

    class SafetensorError(Exception):  # what safetensors raises, not an OSError
        pass

    def full(d, alpha):
        (Path(d) / "comfyui_lora.safetensors").write_bytes(b"\0" * 7)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(T, "write_comfyui_lora", full)
    with pytest.raises(OSError) as e:
        tr.export_lora()
    assert e.value.errno == 28 and "\n" not in str(e.value)
    assert "writing the LoRA export lora/ at step 1 failed (No space left on the device)" in e.value.strerror
    assert (_files(run / "lora"), _files(run / "lora_ema")) == good and not list(run.glob(".lora*"))
    # through the command: one line, no traceback
    from dopsd_fast.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--config", "tiny-zimage", "--set", f"train.output_dir={run}", "--set", "train.max_steps=2",
                    "--set", "train.progress=false",
                    "--set", "train.tensorboard=false", "--set", "validation.at_start=false", "--set",
                    "validation.every=0", "--set", "train.checkpoint_every=0", "--resume", "latest"])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith("error: writing the LoRA export lora/ at step 2 failed (No space left")
    assert (_files(run / "lora"), _files(run / "lora_ema")) == good


def test_allow_config_change_with_another_lora_rank_is_refused_naming_the_field(straight, tmp_path, monkeypatch):
    import shutil

    from dopsd_fast.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    before = _files(run)
    _no_model_build(monkeypatch)
    with pytest.raises(ConfigError, match=r"lora.rank: 8 -> 4 changes the shapes of the trained tensors.*not even "
                                          r"with --allow-config-change") as e:
        _trainer(tmp_path, *_STRAIGHT, "lora.rank=4", "train.max_steps=6", resume="latest", allow=True)
    assert "\n" not in str(e.value) and "step-0000004" in str(e.value)
    assert _files(run) == before


def test_data_edited_in_place_between_runs_is_refused_naming_it(tmp_path, caplog):
    """The checkpoint records the data's content fingerprint: a JSONL edited in place (same path, so the
    config check alone sees no change) is refused, naming the file and what differs."""
    from dopsd_fast.config import ConfigError
    from dopsd_fast.data.tiny import ensure_tiny_dataset

    jl = ensure_tiny_dataset(tmp_path / "data")
    data = ["data.builtin=null", f"data.jsonl={jl}"]
    _trainer(tmp_path, *data, "train.max_steps=1").train()
    rows = [json.loads(line) for line in jl.read_text().splitlines()]
    rows[0]["prompt"] += " at dusk"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    before = _files(run)
    with pytest.raises(ConfigError, match=rf"the content of data.jsonl {jl} changed since the checkpoint \(the "
                                          r"prompts differ\).*--allow-config-change") as e:
        _trainer(tmp_path, *data, "train.max_steps=2", resume="latest")
    assert "\n" not in str(e.value)
    assert _files(run) == before
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr = _trainer(tmp_path, *data, "train.max_steps=2", resume="latest", allow=True)
    assert tr.step == 1 and "resuming on the new data" in caplog.text
    tr.close()


def _poison_cached_record(cache, record) -> dict:
    """Every cached context of ``record`` (each prompt, both branches) set to NaN, in its shard, as an
    encoder that overflowed would have written it (the checksums of the NaN contexts, returned)."""
    from safetensors.torch import load_file, save_file

    from dopsd_fast.cache import context_crc, record_key

    entries = json.loads((cache / "manifest.json").read_text())["entries"]
    keys = [record_key(kind, p, record) for kind in ("student", "teacher") for p in record.prompts]
    sums = {}
    for shard in {entries[k][0] for k in keys}:
        tensors = load_file(str(cache / shard))
        for k in keys:
            s, name = entries[k]
            if s == shard:
                tensors[f"{name}.features"] = torch.full_like(tensors[f"{name}.features"], float("nan"))
                extra = {t[len(f"{name}.extra."):]: v for t, v in tensors.items() if t.startswith(f"{name}.extra.")}
                sums[k] = context_crc(tensors[f"{name}.features"], extra)
        save_file(tensors, str(cache / shard))
    return sums


def test_nonfinite_cached_features_are_named_at_the_batch_that_carries_them(tmp_path):
    """Garbled (NaN) cached features: the step that draws them stops naming the sample, its row and the
    cache shard, before the update; the checkpoints before it are intact."""
    from dopsd_fast.checkpoint import load_checkpoint
    from dopsd_fast.cli import cache_main
    from dopsd_fast.errors import DataError

    cache = tmp_path / "cache"
    assert cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false",
                       "--set", "cache.shard_size=5"]) == 0
    tr = _trainer(tmp_path, f"cache.dir={cache}", "train.checkpoint_every=1", f"train.max_steps={4 * 24}")
    k = 3
    rec = tr.dataset.records[k]
    tr.contexts.cache.checksums.update(_poison_cached_record(cache, rec))
    with pytest.raises(DataError) as e:
        tr.train()
    msg = str(e.value)
    assert f"sample {k} ({rec.where}, image {rec.image_path})" in msg
    assert re.search(rf"non-finite values \(NaN or Inf\) in its student context \(feature cache {cache}, shard "
                     r"shard-\d+\.safetensors; .*dopsd-cache again\) and teacher context \(feature cache", msg), msg
    assert "\n" not in msg
    failed = int(msg.split(":")[0].split()[1])
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert steps and steps[-1] == f"step-{failed - 1:07d}"  # every step before the bad batch kept
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / steps[-1])
    assert all(torch.isfinite(v).all() for v in state["weights"]["student"].values())


@pytest.mark.parametrize("method,what", [("dopsd", "teacher context"), ("sft", "target latents")])
def test_nonfinite_image_is_named_at_the_batch_that_carries_it(tmp_path, monkeypatch, method, what):
    """A NaN in a decoded image (contexts encoded on the fly): the step names the sample, its image and
    the input the image fed (the teacher's context; the SFT target's latents)."""
    import dopsd_fast.data.dataset as D
    from dopsd_fast.errors import DataError

    tr = _trainer(tmp_path, f"method={method}", "train.max_steps=48")
    k = 1
    bad_path = tr.dataset.records[k].image_path
    orig = D._load_record_images

    def load(rec):
        image, refs = orig(rec)
        if rec.image_path == bad_path:
            image = image.clone()
            image[:, 0, 0] = float("nan")
        return image, refs
    monkeypatch.setattr(D, "_load_record_images", load)
    with pytest.raises(DataError, match=rf"step \d+: sample {k} \(.*image {bad_path}\) carries non-finite values "
                                        rf"\(NaN or Inf\) in its {what} \(.*encoded from .*{bad_path}"):
        tr.train()


def test_resume_keeps_only_metrics_rows_up_to_the_checkpoint(tmp_path):
    """A metrics.jsonl line that is not a row (a list, a step that is no number, a torn line) is dropped on
    resume, not a crash."""
    from dopsd_fast.logging_utils import MetricsLogger

    lines = ['{"step": 1, "loss": 0.5}', "[1]", '{"step": "x"}', '"text"', '{"step": 2, "loss": 0.4}',
             '{"step": 3, "loss": 0.3}', '{"step": 2.0, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    MetricsLogger(tmp_path, tensorboard=False).truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [lines[0], lines[4]]


def test_resume_latest_over_a_finished_run_without_its_checkpoints_is_refused(straight, tmp_path):
    """Its checkpoints deleted (to save disk), a finished run is not restarted over its results: the
    LoRA exports and the metrics would be replaced."""
    import shutil

    from dopsd_fast.errors import OutputDirError

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(run / "checkpoints")
    before = _files(run)
    with pytest.raises(OutputDirError, match=r"no checkpoint in .*, but .* holds the results of a run that wrote one "
                                             r"\(lora/, lora_ema/, metrics.jsonl up to step 4\).*--overwrite"):
        _trainer(tmp_path, *_STRAIGHT, "train.max_steps=6", "train.checkpoint_every=1", resume="latest")
    assert _files(run) == before
    # an attempt that stopped at or before its first checkpoint (killed while writing it: the row of that
    # step is written first), no export: a requeued job with --resume latest starts afresh
    for p in ("lora", "lora_ema"):
        shutil.rmtree(run / p)
    _trainer(tmp_path, *_STRAIGHT, "train.max_steps=1", "train.checkpoint_every=4", resume="latest").train()
    assert [m["step"] for m in _metrics(tmp_path)] == [1]


def test_a_refused_resume_leaves_a_new_folder_unused(straight, tmp_path):
    """A resume refused at load (weights that do not fit) leaves nothing in a new output folder: a fresh
    start there is not refused as "holds an earlier run"."""
    from dopsd_fast.safety import run_outputs

    ck = _forged(straight, tmp_path, _set(lambda s: ["weights", "student", _student_a(s)], torch.tensor(0.5)))
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match="do not fit the model"):
        _trainer(fresh, *_STRAIGHT, "train.tensorboard=true", resume=str(ck))
    assert run_outputs(fresh / "run") == []
    _trainer(fresh, *_STRAIGHT, "train.max_steps=1", "train.tensorboard=true").train()
    assert (fresh / "run" / "tensorboard").is_dir()


def test_overwrite_of_the_folder_the_command_runs_in_is_refused_in_one_line(straight, tmp_path, monkeypatch):
    """Moving it aside would move the process's working folder, and every relative path with it."""
    import shutil

    from dopsd_fast.errors import OutputDirError
    from dopsd_fast.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    (run / "sub").mkdir()
    before = _files(run)
    for where, out in ((run, "."), (run / "sub", ".."), (run / "sub", str(run))):
        monkeypatch.chdir(where)
        with pytest.raises(OutputDirError, match=r"is the folder this command runs in \(or holds it\).*run from its "
                                                 r"parent folder"):
            Trainer(tiny_config(tmp_path, *_STRAIGHT, f"train.output_dir={out}"), overwrite=True)
    assert _files(run) == before and not (tmp_path / "run.old-1").exists()
    # an input kept inside the run's folder (a feature cache beside the run) would move aside with it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputDirError, match=r"cache.dir .*run/sub/cache is inside train.output_dir .*: --overwrite "
                                             r"would move it aside with the earlier run"):
        Trainer(tiny_config(tmp_path, *_STRAIGHT, f"cache.dir={run / 'sub' / 'cache'}"), overwrite=True)
    assert _files(run) == before and not (tmp_path / "run.old-1").exists()


def test_an_output_dir_or_cache_dir_that_is_a_file_is_named_in_one_line(tmp_path, capsys):
    from dopsd_fast.cli import cache_main, train_main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit, match=rf"train.output_dir {afile} is a file, not a folder"):
        train_main(["--set", f"train.output_dir={afile}", "--set", "train.progress=false"])
    with pytest.raises(SystemExit, match=rf"cache.dir {afile} is a file, not a folder"):
        cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={afile}", "--set", "train.progress=false"])


def test_lora_targets_that_match_nothing_or_no_linear_name_the_field(tmp_path):
    from dopsd_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.targets \['nonexistent'\]: Target modules .* not found") as e:
        _trainer(tmp_path, "lora.targets=[nonexistent]")
    assert len(str(e.value).splitlines()) == 1
    for module in ("norm_q", "layers"):  # a norm, a module list: not layers a LoRA adapts
        with pytest.raises(ConfigError, match=rf"lora.targets \['{module}'\]: .*name linear layers") as e:
            _trainer(tmp_path, f"lora.targets=[{module}]")
        assert len(str(e.value).splitlines()) == 1


def test_a_resume_refused_at_load_starts_no_wandb_run(straight, tmp_path, monkeypatch):
    """The wandb run, like the tensorboard folder, starts at the first row: a resume refused when its
    weights load opens none, and a run that trains logs every row to it and finishes it."""
    import sys
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda m, step: calls.append(("log", step)),
                                finish=lambda exit_code=None: calls.append(("finish", exit_code)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append("init") or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    ck = _forged(straight, tmp_path, _set(lambda s: ["weights", "student", _student_a(s)], torch.tensor(0.5)))
    with pytest.raises(Exception, match="do not fit the model"):
        _trainer(tmp_path / "a", *_STRAIGHT, "train.wandb=true", resume=str(ck))
    assert calls == []
    _trainer(tmp_path / "b", *_STRAIGHT, "train.max_steps=2", "train.wandb=true").train()
    assert calls == ["init", ("log", 1), ("log", 2), ("finish", 0)]


def test_wandb_a_resumed_run_continues_its_wandb_run_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    """Each resume opened a new wandb run (its curves in pieces) in the project "dopsd-fast" whatever
    $WANDB_PROJECT said; and without the package, train.wandb=true ended, after the model was built, in
    an "unexpected" ImportError. Now a resume continues the wandb run its rows went to (the project
    $WANDB_PROJECT's), and one that drops rows past its checkpoint (a run taken back to an earlier one)
    starts a new wandb run in the run's group: wandb drops a resumed run's rows at or below its last
    step, so the re-trained steps would have kept the abandoned values. A missing package is refused
    before the model is built."""
    import importlib.machinery
    import sys
    import types

    from dopsd_fast.trainer import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: import fails
    monkeypatch.setattr(Trainer, "_build_data_and_model", lambda self: pytest.fail("the model was built"))
    with pytest.raises(RuntimeError, match=r"^train.wandb=true: the 'wandb' package is not installed \(pip install "
                       r"wandb\), or set train.wandb=false$"):
        _trainer(tmp_path / "none", "train.wandb=true")
    monkeypatch.undo()

    runs = {}  # wandb id -> the steps it holds, as wandb keeps them (a row at or below the last step is dropped)
    inits, ends = [], []

    def init(**kw):
        inits.append(kw)
        held = runs.setdefault(kw["id"], [])

        def log(metrics, step):
            if not held or step > held[-1]:
                held.append(step)
        return types.SimpleNamespace(log=log, finish=lambda exit_code=None: ends.append(exit_code))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe for it with find_spec
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "my-concepts")
    w = ("train.checkpoint_every=1", "train.keep_checkpoints=9", "train.wandb=true")
    t = _trainer(tmp_path, "train.max_steps=2", *w)
    t.train()
    _trainer(tmp_path, "train.max_steps=3", *w, resume="latest").train()
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == t.run_id and runs[t.run_id] == [1, 2, 3], inits
    assert all(kw["project"] == "my-concepts" and kw["resume"] == "allow" and kw["name"] == "run"
               and kw["group"] == t.run_id for kw in inits)
    # taken back to step 1 (rows 2 and 3 dropped): a new wandb run of the group holds the re-trained steps
    ck = tmp_path / "run" / "checkpoints" / "step-0000001"
    _trainer(tmp_path, "train.max_steps=3", *w, resume=str(ck)).train()
    seg = inits[2]["id"]
    assert seg.startswith(t.run_id + "-") and inits[2]["group"] == t.run_id and runs[seg] == [2, 3], inits[2]
    assert inits[2]["name"] == "run (from step 1)" and runs[t.run_id] == [1, 2, 3]
    _trainer(tmp_path, "train.max_steps=4", *w, resume="latest").train()
    assert inits[3]["id"] == seg and runs[seg] == [2, 3, 4]  # then a resume continues that one
    assert ends == [0, 0, 0, 0]  # each finished run once, as finished

    # a failed run is marked failed (exit code 1; wandb called it finished), a stopped one by its signal's code
    from dopsd_fast.safety import Interrupted
    from dopsd_fast.trainer import Trainer

    step = Trainer.train_step

    def fail(self):  # after a row is logged (the wandb run starts at the first)
        if self.step == 5:
            raise RuntimeError("out of memory")
        return step(self)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "train_step", fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            _trainer(tmp_path, "train.max_steps=6", *w, resume="latest").train()
    tr = _trainer(tmp_path, "train.max_steps=7", *w, resume="latest")
    with pytest.MonkeyPatch.context() as m:
        _inject_sigint(m, tr, "before_backward", at_step=7)
        with pytest.raises(Interrupted):
            tr.train()
    assert ends == [0, 0, 0, 0, 1, 130], ends
    from dopsd_fast.safety import Terminated
    from dopsd_fast.trainer import _exit_code

    assert [_exit_code(e) for e in (None, Terminated(), Interrupted(), KeyboardInterrupt(), ValueError())] == \
        [0, 143, 130, 130, 1]  # the CLI's codes: SIGTERM after its checkpoint 143


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_update_norm_from_its_state_equals_the_snapshot(wd):
    """Full fine-tuning's guard has no copy of the weights (it would be a second model): the update's norm
    and the old weights' norm come from AdamW's state and the new weights. They equal a snapshot's."""
    from dopsd_fast.safety import Guard

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(33, 17)), torch.nn.Parameter(torch.randn(65))]
    opt = torch.optim.AdamW(ps, lr=3e-3, weight_decay=wd, foreach=True)
    assert Guard.adamw_update(opt) is None  # no step yet
    for _ in range(3):
        before = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        up, old = Guard.adamw_update(opt)
        want_up = torch.stack([(p.detach() - b).norm() for p, b in zip(ps, before)]).norm()
        want_old = torch.stack([b.norm() for b in before]).norm()
        assert_close(up, want_up, rtol=1e-4, name="update norm")
        assert_close(old, want_old, rtol=1e-5, name="weights-before norm")


def test_full_fine_tuning_update_ratio_is_guarded(tmp_path):
    """train.max_update_ratio stopped a LoRA run and let a full fine-tuning run go on (no snapshot, no
    ratio, no metric); now the ratio comes from AdamW's state and guards it too."""
    from dopsd_fast.safety import DivergenceError
    from dopsd_fast.trainer import Trainer

    t = Trainer(tiny_config(tmp_path / "a", "lora.enabled=false", "train.max_steps=1"))
    m = t.train_step()
    assert 0 < m["update_ratio"] < 1, m
    t = Trainer(tiny_config(tmp_path / "b", "lora.enabled=false", "train.max_update_ratio=1e-9"))
    with pytest.raises(DivergenceError, match="train.max_update_ratio"):
        t.train_step()


def test_a_checkpoint_of_a_process_that_saw_more_gpus_sets_the_generators_it_has(monkeypatch):
    """A checkpoint's CUDA generator states are one per GPU its process saw; resumed on a machine with
    fewer (an 8-GPU node's run resumed on one GPU), torch's set_rng_state_all raised at the first missing
    device (a traceback). Each GPU present gets its own state; the rest are not set."""
    from dopsd_fast import checkpoint

    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: got.append((i, int(s[0]))))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: got.extend((i, int(s[0])) for i, s in
                                                                                  enumerate(states)))
    state = checkpoint.rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    checkpoint.set_rng_state(state)
    assert got == [(0, 0), (1, 1)]


def test_a_run_taken_back_to_an_earlier_checkpoint_sets_the_later_ones_aside(straight, tmp_path, caplog):
    """Back to step 2 of a run that went on to step 4 (with a lower LR, say): the checkpoints 3 and 4
    kept the run's id, so the resumed run's pruning deleted its own newer checkpoints (the step numbers
    of the abandoned ones are higher) and --resume latest went back to the abandoned step 4, whose
    exports then replaced the resumed run's. They are moved aside now (not deleted)."""
    import shutil

    from dopsd_fast.checkpoint import list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    (run / "checkpoints" / ".step-0000007.tmp").mkdir()  # a write a kill -9 left: nothing removed it
    with caplog.at_level(logging.WARNING, logger="dopsd_fast.trainer"):
        tr = _trainer(tmp_path, *_STRAIGHT, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=1",
                      "optim.lr=5e-4", resume=str(run / "checkpoints" / "step-0000002"))
    said = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert said and "step-0000003.abandoned-1, step-0000004.abandoned-1" in said[0]
    tr.train()
    ck = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(ck)] == [3]  # the resumed run's own, kept
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000003", "step-0000003.abandoned-1",
                                                    "step-0000004.abandoned-1"]
    tr = _trainer(tmp_path, *_STRAIGHT, "train.max_steps=3", "optim.lr=5e-4", resume="latest")
    assert tr.step == 3  # the resumed run, not the abandoned step 4
    tr.close()
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]


def test_a_run_taken_back_to_an_earlier_checkpoint_sets_the_later_grids_aside(tmp_path):
    """Back to step 2 of a run that validated up to step 4: samples/step-0000004.png, the abandoned run's
    picture, stayed in samples/ beside the resumed run's, unmarked (the checkpoints were moved aside, the
    metrics cut back). The later grids go to samples/abandoned-1/ now."""
    over = ("train.checkpoint_every=2", "train.keep_checkpoints=5", "validation.every=2", "validation.num_samples=1")
    _trainer(tmp_path, "train.max_steps=4", *over).train()
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-0000002.png", "step-0000004.png"]
    _trainer(tmp_path, "train.max_steps=3", "optim.lr=5e-4", *over,
             resume=str(tmp_path / "run" / "checkpoints" / "step-0000002")).train()
    assert sorted(p.name for p in samples.glob("step-*.png")) == ["step-0000002.png", "step-0000003.png"]
    assert [p.name for p in (samples / "abandoned-1").iterdir()] == ["step-0000004.png"]


def test_a_ctrl_c_while_a_checkpoint_loads_stops_and_calls_nothing_damaged(straight, tmp_path, monkeypatch):
    """DCP wraps the KeyboardInterrupt of a Ctrl-C during its load: it read as a checkpoint that does not
    load, so --resume latest skipped a good checkpoint (or, with one, said none loads)."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock"))
    orig = FileSystemReader.read_data

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, *_STRAIGHT, resume="latest")
    monkeypatch.setattr(FileSystemReader, "read_data", orig)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())][-1] == "step-0000004"
    tr = _trainer(tmp_path, *_STRAIGHT, "train.max_steps=5", resume="latest")
    assert tr.step == 4
    tr.close()


def test_a_second_ctrl_c_inside_the_checkpoint_write_is_the_stop_and_leaves_no_temporary(tmp_path, monkeypatch):
    """DCP wraps the Aborted of a second Ctrl-C in its write: it was 'writing the checkpoint failed'
    (exit 1, a full-size .step-N.tmp left behind)."""
    import torch.distributed.checkpoint.filesystem as fs

    from dopsd_fast.safety import Aborted

    tr = _trainer(tmp_path, *_STRAIGHT, "train.checkpoint_every=2")
    orig = fs._write_item
    calls = []

    def write(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise Aborted("a second Ctrl-C")
        return orig(*a, **kw)

    monkeypatch.setattr(fs, "_write_item", write)
    with pytest.raises(Aborted):
        tr.train()
    ck = tmp_path / "run" / "checkpoints"
    assert not list(ck.glob(".step-*")) and not list(ck.glob("step-*"))


def test_a_file_size_limit_in_the_checkpoint_write_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from dopsd_fast.checkpoint import save_checkpoint

    def grow_fails(*a, **kw):  # what torch says when a write stops short (a file size limit, or a full disk)
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed, unexpected pos 704 vs 598")

    monkeypatch.setattr(dcp, "save", grow_fails)
    with pytest.raises(OSError, match=r"a file could not grow: the disk is full, or a file size limit was reached"):
        save_checkpoint(tmp_path / "ck", 1, {"step": 1, "w": torch.ones(2)}, keep=1, run_id="aaaaaaaaaaaa")
    assert not list((tmp_path / "ck").iterdir())


def test_tensorboard_drops_the_steps_past_the_checkpoint_on_resume(tmp_path):
    from dopsd_fast.logging_utils import MetricsLogger

    lg = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        lg.log(step, {"loss": float(step)})
    lg.close()
    lg = MetricsLogger(tmp_path, tensorboard=True)
    lg.truncate_after(1)  # resumed at step 1: steps 2 and 3 are written again
    lg.log(2, {"loss": 20.0})
    lg.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 20.0)]


def test_a_ctrl_c_during_start_up_says_so(tmp_path, monkeypatch, caplog):
    """It exited 130 with nothing printed."""
    import dopsd_fast.trainer as T
    from dopsd_fast.cli import train_main

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Trainer, "__init__", interrupted)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        assert train_main(["--config", "tiny-zimage", "--set", f"train.output_dir={tmp_path / 'run'}"]) == 130
    assert "Ctrl-C during start-up: stopped, nothing written" in caplog.text


def test_a_second_ctrl_c_in_the_final_export_says_what_stands(tmp_path, monkeypatch, caplog):
    """The last line was the first Ctrl-C's 'finishing the step' warning: nothing said the export was
    not written."""
    from dopsd_fast.safety import Aborted

    tr = _trainer(tmp_path, *_STRAIGHT, "train.max_steps=1")

    def export_full():
        raise Aborted("a second Ctrl-C")

    monkeypatch.setattr(tr, "export_full", export_full)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast.trainer"), pytest.raises(Aborted):
        tr.train()
    assert "stopped at once at the end (step 1), nothing more written: the last complete checkpoint stands" in caplog.text


def test_a_file_where_the_run_writes_a_folder_is_refused_at_start_up(tmp_path):
    """A file named checkpoints (with --resume latest) trained up to the first checkpoint, then ended
    in 'File exists'."""
    from dopsd_fast.errors import OutputDirError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(OutputDirError, match=r"checkpoints is a file where the run writes a folder"):
        _trainer(tmp_path, *_STRAIGHT, resume="latest")


def test_a_writer_error_without_a_file_names_the_file(tmp_path):
    """PIL's error on a full disk has no file name: the run's line named the output folder only."""
    import errno

    from dopsd_fast.safety import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "samples" / "step-0000010.png", full)
    assert err.value.filename == str(tmp_path / "samples" / "step-0000010.png")
    assert err.value.errno == errno.ENOSPC


def test_overwrite_of_a_mount_point_says_so(tmp_path, monkeypatch):
    import errno

    import dopsd_fast.safety as S

    def busy(a, b):
        raise OSError(errno.EBUSY, "Device or resource busy", str(a))

    monkeypatch.setattr(S.os, "rename", busy)
    (tmp_path / "mnt").mkdir()
    with pytest.raises(OSError, match=r"is a mount point \(or on a mount of its own\): --overwrite cannot move it"):
        S.move_aside(tmp_path / "mnt")


def test_the_same_data_at_another_path_resumes_and_other_data_there_is_refused(tmp_path, monkeypatch):
    """The data's path was compared as a string: 'data/train.jsonl' vs its absolute path, or a copy on
    another disk, was refused as a change (only --allow-config-change, which lifts every check, got through)
    though the checkpoint's content fingerprint decides."""
    import shutil

    from dopsd_fast.config import ConfigError
    from dopsd_fast.data.tiny import ensure_tiny_dataset

    jl = ensure_tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    _trainer(tmp_path, "data.builtin=null", "data.jsonl=data/train.jsonl", "train.max_steps=1").train()
    copy_dir = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "data", copy_dir)
    for where in (str(jl.resolve()), f"{copy_dir}/train.jsonl"):
        tr = _trainer(tmp_path, "data.builtin=null", f"data.jsonl={where}", "train.max_steps=2", resume="latest")
        assert tr.step == 1
        tr.close()
    rows = [json.loads(line) for line in (copy_dir / "train.jsonl").read_text().splitlines()]
    rows[0]["prompt"] += " at dusk"
    (copy_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"the content of data.jsonl .*elsewhere/train.jsonl changed since the "
                                          r"checkpoint \(the prompts differ\)"):
        _trainer(tmp_path, "data.builtin=null", f"data.jsonl={copy_dir}/train.jsonl", "train.max_steps=2",
                 resume="latest")


def test_another_alpha_background_on_resume_is_a_change_of_the_data_where_an_image_is_transparent(tmp_path):
    """data.alpha_background was 'applied' on resume as harmless: it changes the pixels trained on where
    an image has an alpha channel (the feature cache already keys on it)."""
    from PIL import Image

    from dopsd_fast.config import ConfigError
    from dopsd_fast.data.tiny import ensure_tiny_dataset

    jl = ensure_tiny_dataset(tmp_path / "data")
    first = json.loads(jl.read_text().splitlines()[0])["image"]
    img = Image.open(jl.parent / first).convert("RGBA")
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.save(jl.parent / first)
    data = ["data.builtin=null", f"data.jsonl={jl}"]
    _trainer(tmp_path, *data, "train.max_steps=1").train()
    with pytest.raises(ConfigError, match=r"the transparent images' background \(data.alpha_background\) differs"):
        _trainer(tmp_path, *data, "data.alpha_background=[0, 0, 0]", "train.max_steps=2", resume="latest")
    tr = _trainer(tmp_path, *data, "train.max_steps=2", resume="latest")
    assert tr.step == 1
    assert "composite" in tr.data_fingerprint
    earlier = {k: v for k, v in tr.data_fingerprint.items() if k != "composite"}  # an earlier version's record
    tr._check_data(tmp_path / "run" / "checkpoints" / "step-0000001", {"data_fingerprint": earlier})  # no refusal
    tr.close()


def test_the_memory_model_counts_this_ranks_share_of_sharded_tensors(tmp_path, monkeypatch):
    """Under FSDP2 a trained tensor is a DTensor whose numel() is the whole model's: the run plan budgeted
    every rank for the full gradients and AdamW state (a warning of running out, layers checkpointed that
    need not be). The count is of each tensor's local shard now (stood in for here: half of each)."""
    import dopsd_fast.fsdp as F

    tr = _trainer(tmp_path, *_STRAIGHT)
    whole = tr.memory_shape().trainable_params
    assert whole == sum(p.numel() for p in tr.weights.trainable_parameters())
    monkeypatch.setattr(F, "local", lambda t: t.reshape(-1)[: t.numel() // 2])
    assert tr.memory_shape().trainable_params == sum(p.numel() // 2 for p in tr.weights.trainable_parameters())
    tr.close()


def test_ctrl_c_before_the_first_step_names_what_the_folder_keeps(tmp_path, monkeypatch, caplog):
    """A Ctrl-C during the step-0 validation said "nothing to write", yet the folder kept config.yaml and the
    step-0 grid, and the same command was then refused ("holds an earlier run"): the line says so now."""
    import logging

    from dopsd_fast.safety import Interrupted
    from dopsd_fast.trainer import Trainer

    tr = _trainer(tmp_path, "train.max_steps=2", "validation.at_start=true")
    orig = Trainer.validate

    def validate(self, *a, **kw):
        out = orig(self, *a, **kw)
        os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(Trainer, "validate", validate)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"), pytest.raises(Interrupted, match="at step 0"):
        tr.train()
    said = [r.getMessage() for r in caplog.records if "before the first step" in r.getMessage()]
    assert len(said) == 1 and "keeps config.yaml" in said[0] and "--resume latest" in said[0], said
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("lora", [False, True])
def test_the_weights_state_for_a_checkpoint_is_a_copy_the_training_goes_on_without_touching(lora):
    """The checkpoint writer reads the state while nothing else holds the live weights: a view of them
    would be written as the next step left them, not as this step's."""
    from dopsd_fast.config import LoraConfig
    from dopsd_fast.weights import StudentTeacher

    from diffusers import ZImageTransformer2DModel

    from dopsd_fast.adapters.tiny import TINY_ZIMAGE

    st = StudentTeacher(ZImageTransformer2DModel(**TINY_ZIMAGE), LoraConfig(rank=2, alpha=2.0, enabled=lora),
                        ("to_q", "to_k"), torch.float32)
    state = st.state_dict()
    live = {"student": st.named_trainable(), "teacher": st.named_teacher()}
    for which in ("student", "teacher"):
        assert set(state[which]) == set(live[which]) and state[which]
        for n, p in live[which].items():
            saved = state[which][n].clone()
            with torch.no_grad():
                p.add_(1.0)
            assert torch.equal(state[which][n], saved), (which, n)


def test_resume_removes_the_temporary_files_of_a_killed_write(tmp_path):
    """A process killed inside atomic_write (between the write and the rename) leaves .<stem>.tmp-<pid><suffix>;
    a resume removes them (the folder's lock is held: none is being written), and nothing else."""
    from dopsd_fast.safety import remove_stale_temp_files

    (tmp_path / "samples").mkdir()
    stale = [tmp_path / ".curves.tmp-123.png", tmp_path / ".metrics.tmp-45.jsonl", tmp_path / ".wandb_run_id.tmp-9",
             tmp_path / "samples" / ".step-0000100.tmp-77.png"]
    kept = [tmp_path / ".lock", tmp_path / "metrics.jsonl", tmp_path / "samples" / "step-0000100.png"]
    for f in stale + kept:
        f.write_text("x")
    (tmp_path / ".lora.tmp-5").mkdir()  # atomic_dir's: recover_dirs' to handle
    remove_stale_temp_files(tmp_path, ("", "samples"))
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept) and (tmp_path / ".lora.tmp-5").is_dir()


def test_a_run_whose_folder_was_moved_away_writes_nothing_into_the_new_run_at_that_path(tmp_path):
    """The output folder moved (or removed) while its run was paused or in a long step, and a new run
    started at the same path: the old run used to go on writing that folder (metrics interleaved, its
    checkpoints and exports over the new run's), both ending 'done'. It stops at its next write, naming
    the folder, and leaves the new run's folder as it was."""
    from dopsd_fast.errors import OutputDirError
    from dopsd_fast.safety import OutputLock

    tr = _trainer(tmp_path, "train.checkpoint_every=1")
    run = tmp_path / "run"
    run.rename(tmp_path / "run.moved")
    run.mkdir()
    held = OutputLock(run)  # the new run at the old path
    try:
        with pytest.raises(OutputDirError, match=r"run was removed, moved or replaced while this run went on"):
            tr.train()
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        held.release()
        tr.close()


def test_a_safetensors_write_past_a_file_size_limit_is_an_os_error_naming_the_file(tmp_path):
    """safetensors reports a full disk or a file-size limit as its own SafetensorError ('... (os error 27)'):
    dopsd-cache's shard and the LoRA export ended in 'unexpected ... include it in a bug report' naming no
    file. Written through atomic_write / atomic_dir it is an OSError naming the file; nothing is left behind."""
    import errno
    import resource

    from safetensors.torch import save_file

    from dopsd_fast.safety import atomic_dir, atomic_write

    big = {"x": torch.zeros(64 * 1024)}  # 256 KiB, over the limit below
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError) as e:
            atomic_write(tmp_path / "shard-00000.safetensors", lambda t: save_file(big, str(t)))
        assert e.value.errno == errno.EFBIG and e.value.filename == str(tmp_path / "shard-00000.safetensors")
        with pytest.raises(OSError) as e:
            atomic_dir(tmp_path / "lora", lambda d: save_file(big, str(d / "w.safetensors")))
        assert e.value.errno == errno.EFBIG and e.value.filename == str(tmp_path / "lora")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_temporary_names_are_apart_per_write_and_still_cleaned_up(tmp_path):
    """atomic_write's temporary file was named by the pid alone: two processes of one pid (containers on a
    shared disk, two dopsd-sample --out to one file) wrote the same temporary file, and one said 'wrote' of
    the other's bytes. Each write has its own name now, which the start-up clean-up still knows."""
    from dopsd_fast.safety import atomic_dir, atomic_write, recover_dirs, remove_stale_temp_files

    seen = []
    for _ in range(2):
        atomic_write(tmp_path / "a.png", lambda t: (seen.append(t.name), t.write_bytes(b"x")))
        atomic_dir(tmp_path / "lora", lambda d: (seen.append(d.name), (d / "w").write_bytes(b"x")))
    assert len(set(seen)) == 4, seen
    (tmp_path / seen[0]).write_bytes(b"torn")  # as a killed write leaves them
    (tmp_path / seen[1]).mkdir()
    remove_stale_temp_files(tmp_path)
    recover_dirs(tmp_path, ("lora",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "lora"]


def test_a_lock_held_by_another_process_of_the_same_pid_text_is_not_called_this_processs(tmp_path):
    """The refusal said 'an earlier trainer of this process: call its close()' wherever the lock file named
    this host and pid (another container's process of the same pid); it says so only for a lock this process
    holds."""
    import socket
    import subprocess
    import sys

    from dopsd_fast.errors import OutputDirError
    from dopsd_fast.safety import OutputLock

    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, sys.argv[2].encode(), 0); print('held', flush=True); "
            "time.sleep(60)")
    text = f"host {socket.gethostname()} pid {os.getpid()}\n"
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock"), text], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirError) as e:
            OutputLock(tmp_path)
        assert f"is in use by host {socket.gethostname()} pid {os.getpid()}; wait" in str(e.value), str(e.value)
    finally:
        other.kill()
        other.wait()
    mine = OutputLock(tmp_path)
    try:
        with pytest.raises(OutputDirError, match=r"an earlier trainer of this process: call its close\(\)"):
            OutputLock(tmp_path)
    finally:
        mine.release()
    OutputLock(tmp_path).release()


def test_an_update_larger_than_the_weights_is_said_once_per_window_then_counted(caplog):
    """'the update is N x the weights' norm' was said at every step it held (hundreds of lines in a run at too
    high a learning rate); it is said once per quiet_steps, the steps between counted, and the count said at
    the run's end."""
    from dopsd_fast.safety import Guard

    g = Guard(max_update_ratio=1e6, warn_factor=1e9, quiet_steps=100)
    w = [torch.ones(4)]
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        for step in range(1, 131):  # the weights' norm 2, the update's 4 (twice them), then 6 at step 120
            g.check_after_update(step, w, None, 1.0, update=(torch.tensor(6.0 if step == 120 else 4.0),
                                                            torch.tensor(2.0)))
        g.summary()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert said[0].startswith("step 1: the update is 2 x the weights' norm (larger than the weights)")
    assert said[1].startswith("step 101: the update is 2 x") and "(99 more such steps since step 1)" in said[1]
    assert said[2] == ("steps whose update was larger than the weights: 29 more since step 101 (the largest 3 x at "
                       "step 120); lower optim.lr"), said[2]
