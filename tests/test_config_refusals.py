"""Config values that were accepted and then ignored, or failed minutes into a run with a message naming
no field: each is refused at start-up naming its field, or said at start-up as set and not read."""

import logging

import pytest

from dopsd_fast.config import ConfigError, load_config
from tests.conftest import tiny_config


@pytest.mark.parametrize("over", ["data.jsonl=", "data.jsonl=''", "data.folder=", "data.folder=' '"])
def test_an_empty_data_source_is_refused(over):
    """`--set data.jsonl=$DATA` with DATA unset trained on the recipe's built-in data, silently."""
    field = over.split("=")[0]
    with pytest.raises(ConfigError, match=f"config field '{field}': .*empty"):
        load_config("toy-concept", [over])
    assert load_config("toy-concept", ["data.jsonl=null"]).data.builtin == "toy-concept-prior"  # an explicit null
    with pytest.raises(ConfigError, match="expects key=value"):  # no '=' at all: that error, not "empty"
        load_config("toy-concept", ["data.jsonl"])


@pytest.mark.parametrize("steps", [0, -1])
def test_validation_steps_below_one_is_refused(steps):
    """0 sampled pure noise, silently; -1 stopped the run at its first validation (after validation.every
    steps) with torch's 'number of steps must be non-negative', naming no field."""
    with pytest.raises(ConfigError, match="config field 'validation.steps': must be >= 1"):
        load_config("tiny-zimage", [f"validation.steps={steps}"])
    assert load_config("tiny-zimage", ["validation.steps=1"]).validation.steps == 1


@pytest.mark.parametrize("over, field", [
    (["model.teacher_min_pixels=-1"], "model.teacher_min_pixels"),
    (["model.teacher_max_pixels=0"], "model.teacher_max_pixels"),
    (["model.teacher_min_pixels=1000000", "model.teacher_max_pixels=1000"], "model.teacher_min_pixels"),
    (["sft.logit_mean=.nan"], "sft.logit_mean"),
    (["sft.logit_std=.inf"], "sft.logit_std"),
    (["sft.mode_scale=.nan"], "sft.mode_scale"),
    (["sft.mode_scale=-5"], "sft.mode_scale"),
])
def test_out_of_range_numbers_are_refused(over, field):
    """A NaN u sampled every SFT sigma at 1 (pure noise) and a min over the max pixels reached the image
    processor: both trained on, silently."""
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        load_config("tiny-zimage-sft", over)
    load_config("tiny-zimage-sft", ["sft.mode_scale=-1", "model.teacher_min_pixels=1000",
                                    "model.teacher_max_pixels=1000"])


def test_fields_this_run_does_not_read_are_named():
    """ema_on_cpu under LoRA, another family's model fields, the fast
    path's choices on the eager path, a compile backend with compile off, the SFT weighting's unused
    parameters: each was accepted and ignored, silently."""
    unread = dict(load_config("tiny-zimage", [
        "lora.enabled=false", "lora.rank=4", "model.text_layers=[1]", "model.vlm_path=/x",
        "fast.attention=triton", "fast.gemm=triton", "fast.compile_backend=eager", "method=sft",
        "sft.mode_scale=2"]).unread_fields())
    # not the LoRA settings under full fine-tuning: lora.enabled=false on a LoRA recipe is the way to it
    assert set(unread) == {"model.text_layers", "model.vlm_path", "fast.attention", "fast.gemm",
                           "fast.compile_backend", "sft.mode_scale"}, unread
    assert "zimage" in unread["model.text_layers"]
    klein = dict(load_config("tiny-klein", ["model.teacher_max_tokens=5", "dopsd.ema_on_cpu=true"]).unread_fields())
    assert set(klein) == {"model.teacher_max_tokens", "dopsd.ema_on_cpu"}, klein
    for recipe in ("tiny-zimage", "tiny-klein", "toy-concept", "zimage-turbo-lora", "klein-4b-editing-lora",
                   "zimage-turbo-sft", "klein-4b-sft"):
        assert load_config(recipe).unread_fields() == [], recipe


def test_unread_fields_are_said_at_start(tmp_path, caplog):
    from dopsd_fast.trainer import Trainer

    cfg = tiny_config(tmp_path, "lora.enabled=false", "lora.rank=4", "dist.shard_base=false",
                      "dist.reshard_after_forward=false", "dist.fsdp=on")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        Trainer(cfg).close()
    assert "lora." not in caplog.text, caplog.text
    assert "dist.fsdp, dist.reshard_after_forward: set, and not read: one process" in caplog.text, caplog.text


def test_an_unknown_compile_backend_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """It failed after the model was built with torch's 'Invalid backend', naming no field: now the run
    refuses it before its data check and model build, and the dry run at its plan."""
    from dopsd_fast.dryrun import dry_run
    from dopsd_fast.trainer import Trainer

    with pytest.raises(ConfigError, match="config field 'fast.compile_backend': 'abc'"):
        dry_run(tiny_config(tmp_path, "fast.compile=regional", "fast.compile_backend=abc"))

    def built(self):
        raise AssertionError("the data and the model were built")
    monkeypatch.setattr(Trainer, "_build_data_and_model", built)
    with pytest.raises(ConfigError, match="config field 'fast.compile_backend': 'abc'"):
        Trainer(tiny_config(tmp_path / "run", "fast.compile=regional", "fast.compile_backend=abc"))


def test_an_explicit_choice_the_plan_replaces_is_said(tmp_path, caplog):
    """fast.attention=triton on the CPU without the fused kernels ran PyTorch's SDPA, and fast.gemm with
    the eager ops chose nothing; the plan said neither."""
    from dopsd_fast.trainer import Trainer

    caplog.set_level(logging.INFO, logger="dopsd_fast")
    tr = Trainer(tiny_config(tmp_path, "fast.enabled=true", "fast.attention=triton", "fast.gemm=triton"))
    tr.close()
    assert tr.plan.attention == "sdpa"
    assert "attention triton -> sdpa" in tr.plan.describe() and "GEMM triton: not used" in tr.plan.describe()


@pytest.mark.parametrize("over", ["dopsd.ema_decay=true", "lora.alpha=false", "optim.lr=true"])
def test_a_boolean_in_a_number_field_is_refused(over):
    """true was read as 1.0 (dopsd.ema_decay=true froze the teacher without a word), as an integer field
    already refused it."""
    field = over.split("=")[0]
    with pytest.raises(ConfigError, match=f"config field '{field}': expected a number, got"):
        load_config("tiny-zimage", [over])
    assert load_config("tiny-zimage", ["dopsd.ema_decay=1", "lora.alpha=8"]).dopsd.ema_decay == 1.0


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_warm_up_longer_than_the_run_is_said(tmp_path, caplog):
    """optim.warmup_steps above train.max_steps: the run ends below optim.lr, which no line said."""
    from dopsd_fast.trainer import Trainer

    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        t = Trainer(tiny_config(tmp_path, "optim.warmup_steps=10", "train.max_steps=2", "optim.lr=1e-4"))
    t.close()
    assert "optim.warmup_steps 10 is more than train.max_steps 2: the learning rate never reaches optim.lr 0.0001 " \
           "(it ends at 2e-05)" in caplog.text, caplog.text
    t.lr_sched.step()  # the scheduler as it stands after step 2's update: the figure said
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        Trainer(tiny_config(tmp_path / "b", "optim.warmup_steps=2", "train.max_steps=2")).close()
    assert "warmup_steps" not in caplog.text


@pytest.mark.parametrize("over", ["optim.eps=.inf", "optim.weight_decay=.inf", "train.dist_timeout_s=.inf"])
def test_an_infinite_optimizer_or_timeout_setting_is_refused(over):
    """optim.eps=inf trained with zero updates, weight_decay=inf made the weights non-finite at the first
    step, an infinite collective timeout raised an OverflowError at the process group's start (a timedelta
    of inf seconds) under torchrun: refused, named."""
    field = over.split("=")[0]
    with pytest.raises(ConfigError, match=f"config field '{field}': must be a finite number"):
        load_config("tiny-zimage", [over])


def test_a_teacher_pixel_bound_past_the_models_other_one_is_refused():
    """The config compares the two bounds where both are set; one set past the model's default of the
    other (teacher_min_pixels 5000 over the tiny model's max 4096) reached the image processor."""
    from dopsd_fast.families import build_adapter

    for over, match in (("model.teacher_min_pixels=5000", r"lower pixel bound model.teacher_min_pixels 5000 is over "
                                                          r"its upper one 4096 \(the model's, model.teacher_max_pixels null\)"),
                        ("model.teacher_max_pixels=1000", r"lower pixel bound 1024 \(the model's, model.teacher_min_"
                                                          r"pixels null\) is over its upper one model.teacher_max_pixels 1000")):
        with pytest.raises(ConfigError, match=r"config field 'model.teacher_min_pixels': the teacher's " + match):
            build_adapter(load_config("tiny-zimage", [over]).model)
    ad = build_adapter(load_config("tiny-zimage", ["model.teacher_min_pixels=2000"]).model)
    assert (ad.min_pixels, ad.max_pixels) == (2000, 4096)


def test_fp16_without_loss_scaling_is_said(tmp_path, caplog):
    """model.dtype=fp16 trains under float16 autocast with no loss scaling (gradients under 6e-8 vanish):
    an option never measured on a GPU here, said at start-up rather than left to be found in the results."""
    from dopsd_fast.trainer import Trainer

    for dtype, said in (("fp16", True), ("fp32", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
            Trainer(tiny_config(tmp_path / dtype, f"model.dtype={dtype}")).close()
        assert ("model.dtype=fp16: the run computes in float16 without loss scaling" in caplog.text) == said, dtype


def test_a_learning_rate_over_one_is_refused_in_one_line():
    """optim.lr=1e38 passed the config check, then ended in torch's overflow error, marked unexpected and
    naming no field; an AdamW learning rate over 1 moves each weight by more than 1 a step: refused."""
    with pytest.raises(ConfigError, match=r"config field 'optim.lr': 1e\+38 is over 1: AdamW moves each weight"):
        load_config("tiny-zimage", ["optim.lr=1e38"])
    assert load_config("tiny-zimage", ["optim.lr=1"]).optim.lr == 1.0
