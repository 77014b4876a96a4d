"""The run plan is resolved once and read by everyone; the D-OPSD step is written once; one config name
per concept, the earlier names accepted with a one-line deprecation."""

import logging

import pytest
import torch

from tests.conftest import tiny_config


def test_trainer_fast_path_and_dry_run_read_one_plan(tmp_path, capsys):
    """The trainer resolves the plan once; its fast path reads that same object; the dry run resolves
    an equal plan for the same config and memory budget (and prints it)."""
    from dopsd_fast import dryrun
    from dopsd_fast.trainer import Trainer

    over = ["fast.enabled=true", "fast.kernels=off", "fast.attention=sdpa", "fast.memory_budget_gb=0.05"]
    tr = Trainer(tiny_config(tmp_path / "run", *over))
    assert tr.pair.plan is tr.plan and tr.pair.model.checkpoint_layers == tr.plan.checkpoint_layers
    assert tr.plan.path == "fast" and tr.plan.attention == "sdpa" and tr.plan.budget_bytes == 0.05e9
    seen = {}
    real = dryrun.resolve_plan
    dryrun.resolve_plan = lambda *a, **kw: seen.setdefault("plan", real(*a, **kw))
    try:
        dryrun.dry_run(tiny_config(tmp_path / "dry", *over), gpu="h100")
    finally:
        dryrun.resolve_plan = real
    assert seen["plan"] == tr.plan
    assert tr.plan.describe() in capsys.readouterr().out


def test_plan_is_logged_as_one_block(tmp_path, caplog):
    from dopsd_fast.trainer import Trainer

    caplog.set_level(logging.INFO, logger="dopsd_fast")
    tr = Trainer(tiny_config(tmp_path, "fast.enabled=true"))
    blocks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run plan:")]
    assert len(blocks) == 1 and "path fast, backward" in blocks[0] and f"attention {tr.plan.attention}" in blocks[0]


def test_one_step_function_for_trainer_backend_and_step_time(tmp_path, monkeypatch):
    """The trainer, the drop-in backend and benchmarks/step_time.py all run pair.dopsd_step."""
    import sys
    from pathlib import Path

    from dopsd_fast import backend, pair, trainer
    from dopsd_fast.families import ZIMAGE

    calls = []
    real = pair.dopsd_step

    def counting(p, *a, **kw):
        calls.append(type(p).__name__)
        return real(p, *a, **kw)

    monkeypatch.setattr(trainer, "dopsd_step", counting)
    monkeypatch.setattr(backend, "dopsd_step", counting)
    tr = trainer.Trainer(tiny_config(tmp_path, "fast.enabled=true"))
    tr.train_step()
    fast = backend.wrap(tr.weights.transformer, student_adapter="student", teacher_adapter="teacher")
    x = torch.randn(1, *tr.adapter.latent_shape(64, 64))
    ctx = [torch.randn(7, int(ZIMAGE.tiny_config()["cap_feat_dim"]))]
    fast.dopsd_step(x, ctx, ctx, sigmas="zimage-k4")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(step_time, "dopsd_step", counting)
    bench = step_time.Bench(step_time.parse(["--preset", "tiny"]))
    bench.eager_rollout()
    bench.fast_rollout("auto")
    assert calls == ["FastPath", "Backend", "EagerPair", "FastPath"], calls


def test_earlier_field_names_are_read_with_one_line(tmp_path, caplog):
    from dopsd_fast.config import ConfigError, config_from_dict, load_config

    caplog.set_level(logging.WARNING)
    cfg = load_config(None, ["fast.enabled=true", "fast.checkpoint=2"])
    assert cfg.model.gradient_checkpointing == 2
    assert "config field fast.checkpoint is deprecated: use model.gradient_checkpointing" in caplog.text
    assert load_config(None, ["fast.enabled=true", "fast.compile=true"]).fast.compile == "ops"
    assert load_config(None, ["fast.compile=true"]).fast.compile == "regional"
    assert "fast.compile: true is deprecated" in caplog.text
    assert load_config(None, ["model.gradient_checkpointing=true"]).model.gradient_checkpointing == "all"
    old = load_config(None).to_dict()
    old["model"].pop("gradient_checkpointing")
    old["fast"]["checkpoint"] = "all"
    assert config_from_dict(old).model.gradient_checkpointing == "all"  # a saved config of an earlier release
    with pytest.raises(ConfigError, match="fast.checkpoint .deprecated. and model.gradient_checkpointing"):
        load_config(None, ["fast.checkpoint=2", "model.gradient_checkpointing=all"])
    with pytest.raises(ConfigError, match="the eager path checkpoints every block or none"):
        from dopsd_fast.trainer import Trainer

        Trainer(tiny_config(tmp_path, "model.gradient_checkpointing=1"))
