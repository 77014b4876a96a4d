"""Config validation, the shipped configs, and the README's main command."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dopsd_fast.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_yaml_equals_embedded_default():
    from_yaml = load_config(ROOT / "configs" / "tiny-zimage.yaml")
    assert from_yaml.to_dict() == load_config(None).to_dict()


def test_shipped_configs_parse():
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(p)


@pytest.mark.parametrize("override,match", [
    ("optim.lr=-1", "'optim.lr'"),
    ("dopsd.loss=l1", "'dopsd.loss'"),
    ("dopsd.backward=later", "'dopsd.backward'"),
    ("dopsd.ema_decay=2", "'dopsd.ema_decay'"),
    ("dopsd.rollout=[1.0,0.5]", "'dopsd.rollout'"),
    ("lora.rank=0", "'lora.rank'"),
    ("train.grad_accum=0", "'train.grad_accum'"),
    ("train.max_steps=abc", "'train.max_steps'"),
    ("optim.nope=1", r"unknown config field\(s\) \['nope'\] in section 'optim'"),
    ("data.builtin=null", "set exactly one of data.builtin"),
    ("model.dtype=fp64", "'model.dtype'"),
    ("data.buckets=[[0,0]]", r"'data.buckets'.*whole pixels > 0, got \[\[0, 0\]\]"),
    ("data.buckets=[[512,-8]]", "'data.buckets'"),
    ("data.buckets=[]", "'data.buckets'"),
    ("lora.alpha=4096", r"'lora.alpha'.*alpha / rank = 512, over 256"),
    ("validation.prompts=[a, '']", r"'validation.prompts\[1\]': must be a non-empty prompt string"),
    ("validation.prompts=[{prompt: a, refs: [x.png]}]", r"'validation.prompts\[0\]': unknown key\(s\) \['refs'\]"),
    ("validation.prompts=[{references: [x.png]}]", r"'validation.prompts\[0\].prompt': must be a non-empty"),
    ("validation.prompts=[a, {prompt: b, references: x.png}]", r"'validation.prompts\[1\].references': must be a list"),
    # a value that is not YAML (a prompt beginning with the identifier token): one line with how to quote it
    ("validation.prompts=[V] dog", r"--set 'validation.prompts=\[V\] dog': the value is not valid YAML \(expected "
                                   r"'<document start>'.*\); quote text .* --set 'validation.prompts=\"...\"'"),
    ("data.prompt_keys=[prompt", r"--set 'data.prompt_keys=\[prompt': the value is not valid YAML"),
    # an empty text field (`--set train.output_dir=$OUT` with OUT unset) was the text 'None': a run into ./None
    ("train.output_dir=", "'train.output_dir': must not be empty"),
    ("train.output_dir=null", "'train.output_dir': must not be empty"),
    ("train.output_dir=' '", "'train.output_dir': must not be empty"),
    ("model.device=", "'model.device': must not be empty"),
    ("method=", "'method': must not be empty"),
    # a nested list, null or mapping in a schedule: float() raised a TypeError that named no field
    ("dopsd.rollout=[[0.5], 0]", r"'dopsd.rollout': a roll-out schedule is a list of numbers \(sigmas\), got an entry \[0.5\]"),
    ("dopsd.rollout=[null, 0]", "'dopsd.rollout': a roll-out schedule is a list of numbers"),
    ("dopsd.rollout=[true, 0]", "'dopsd.rollout': a roll-out schedule is a list of numbers"),
    ("validation.schedule=[{a: 1}, 0]", "'validation.schedule': a roll-out schedule is a list of numbers"),
])
def test_config_errors_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override,hint", [
    ("train.steps=3", "'train.max_steps' or 'validation.steps'"),  # a word of a name here, the name elsewhere
    ("train.lr=1e-4", "'optim.lr'"),  # the same name in another section
    ("lr=1e-4", "'optim.lr'"),
    ("train.eps=1e-8", "'optim.eps'"),  # not max_steps (one letter in common is no hint)
    ("dopsd.ema=0.9", "'dopsd.ema_decay' or 'dopsd.ema_on_cpu'"),  # a word of a name
    ("lora.ranks=4", "'lora.rank'"),  # a close spelling
    ("trian.max_steps=3", "'train'"),  # a misspelt section
])
def test_an_unknown_field_names_the_one_meant(override, hint):
    with pytest.raises(ConfigError, match=re.escape(f"(did you mean {hint}?); known: [")):
        load_config(None, [override])


def test_a_bad_field_of_the_config_file_names_the_file(tmp_path):
    """The file's own bad field names the file, with --set overrides beside it too; an override's own
    bad value does not blame the file."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("train:\n  steps: 10\n")
    for over in ([], ["optim.lr=1e-4"]):
        with pytest.raises(ConfigError, match=re.escape(f"config file {cfg}: unknown config field(s) ['steps']")):
            load_config(cfg, over)
    cfg.write_text("lora:\n  rank: 0\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {cfg}: config field 'lora.rank'")):
        load_config(cfg, ["lora.alpha=4"])
    assert load_config(cfg, ["lora.rank=4"]).lora.rank == 4  # an override that fixes the file's field
    cfg.write_text("lora:\n  rank: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["lora.rank=0"])
    assert str(err.value).startswith("config field 'lora.rank'")


def test_an_unknown_field_with_nothing_close_has_no_guess():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.zzzz=1"])
    assert "did you mean" not in str(err.value)


def test_a_quoted_value_of_a_list_field_is_one_entry():
    """A quoted string given to a list field is one entry as written: it was read as YAML again, so
    '"[V] dog"' failed as "unexpected" and '"[V]"' became the prompt 'V'."""
    for raw, want in (('"[V] dog"', ["[V] dog"]), ('"[V]"', ["[V]"]), ('"a, b"', ["a, b"]),
                      ('["[V] dog", b]', ["[V] dog", "b"]), ("x", ["x"])):
        assert load_config(None, [f"validation.prompts={raw}"]).validation.prompts == want, raw


def test_config_roundtrip(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "dopsd.rollout=[1.0,0.6,0.0]"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict() and again.dopsd.rollout == [1.0, 0.6, 0.0]
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_readme_main_command(tmp_path):
    """The README's main job: `dopsd-train` on the embedded default (shortened here)."""
    out = tmp_path / "run"
    cmd = ["dopsd-train", "--set", f"train.output_dir={out}", "--set", "train.max_steps=4",
           "--set", "train.checkpoint_every=2", "--set", "validation.every=2"]
    exe = Path(sys.executable).parent / "dopsd-train"
    proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 4" in proc.stderr
    assert f"look at {out / 'samples' / 'step-0000004.png'} and {out / 'curves.png'}" in proc.stderr, proc.stderr[-500:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-0000000.png", "step-0000002.png",
                                                                       "step-0000004.png"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "step-0000004" / ".metadata").is_file()  # a DCP checkpoint
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert list((out / "tensorboard").iterdir())
    assert (out / "curves.png").is_file()
    # resume picks up where it stopped
    proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:], "--set", "train.max_steps=5",
                           "--resume", "latest"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "done: step 5" in proc.stderr


def test_cli_reports_bad_config_cleanly(tmp_path):
    exe = Path(sys.executable).parent / "dopsd-train"
    proc = subprocess.run([str(exe), "--set", "optim.lr=-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "config field 'optim.lr'" in proc.stderr and "Traceback" not in proc.stderr


def test_removed_fields_shipped_names_and_authors_values(tmp_path, caplog):
    import logging

    import pytest

    from dopsd_fast.config import ConfigError, load_config

    old = tmp_path / "old.yaml"
    old.write_text("cache:\n  mode: require\ntrain:\n  export_lora_every: 0\n  max_steps: 7\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(str(old))
    assert cfg.train.max_steps == 7 and "cache.mode is ignored" in caplog.text
    assert load_config("zimage-turbo-lora").model.family == "zimage"  # a shipped recipe by name
    assert load_config("klein-4b-sft.yaml").model.family == "klein"
    with pytest.raises(ConfigError, match="shipped recipes: .*tiny-klein"):
        load_config("no-such-recipe")
    assert load_config(None, ["lora.targets=authors"]).lora.targets == "authors"
    with pytest.raises(ConfigError, match="lora.targets"):
        load_config(None, ["lora.targets=mine"])
    klein = ["model.family=klein", "model.preset=tiny-klein"]
    assert load_config(None, klein + ["dopsd.rollout=klein-k4-authors"]).dopsd.rollout == "klein-k4-authors"
    with pytest.raises(ConfigError, match="'klein-k4' is not a Z-Image schedule"):  # refused before any weight
        load_config(None, ["dopsd.rollout=klein-k4"])
    with pytest.raises(ConfigError, match="dopsd.rollout"):
        load_config(None, ["dopsd.rollout=klein-kx-authors"])


def test_a_data_source_on_the_command_line_replaces_the_configs():
    """`--set data.folder=...` on the default (built-in) config switches the source by itself; two
    sources given together are still an error."""
    cfg = load_config(None, ["data.folder=/some/folder"])
    assert cfg.data.folder == "/some/folder" and cfg.data.builtin is None
    cfg = load_config("tiny-zimage", ["data.jsonl=x.jsonl"])
    assert cfg.data.jsonl == "x.jsonl" and cfg.data.builtin is None
    with pytest.raises(ConfigError, match="set exactly one"):
        load_config(None, ["data.folder=/a", "data.jsonl=b.jsonl"])


def test_a_model_path_is_never_ignored_for_a_preset(tmp_path):
    """model.path with the preset at its default (a built-in tiny model) trained the tiny model and never
    read the path, silently. A path given without a preset loads it: in a config file, or on the command
    line over a recipe's preset (as a data source replaces the config's); a file that gives both is
    refused, naming the field."""
    import yaml

    (tmp_path / "own.yaml").write_text(yaml.safe_dump({"model": {"family": "klein", "path": "/models/klein"},
                                                       "data": {"builtin": "tiny"}}))
    cfg = load_config(str(tmp_path / "own.yaml"))
    assert cfg.model.preset is None and cfg.model.path == "/models/klein" and cfg.model.family == "klein"
    for recipe in ("tiny-zimage", None):
        cfg = load_config(recipe, ["model.path=/models/zimage"])
        assert cfg.model.preset is None and cfg.model.path == "/models/zimage"
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny-zimage", "path": "/models/z"}}))
    with pytest.raises(ConfigError, match=r"both.yaml: config field 'model.path': /models/z is read only without a "
                                          r"preset, and model.preset is 'tiny-zimage'.*set model.preset=null"):
        load_config(str(tmp_path / "both.yaml"))
    with pytest.raises(ConfigError, match="model.path"):
        load_config("tiny-zimage", ["model.path=/models/z", "model.preset=tiny-zimage"])
    # the other way: a preset on the command line over a real-weights recipe runs the preset
    cfg = load_config("zimage-turbo-lora", ["model.preset=tiny-zimage"])
    assert cfg.model.preset == "tiny-zimage" and cfg.model.path is None
    from dopsd_fast.config import config_from_dict  # a saved run's dict reads the same way

    assert config_from_dict({"model": {"path": "/models/z"}}).model.preset is None


def test_a_left_out_rollout_is_the_familys_own(tmp_path):
    """dopsd.rollout's default was one family's schedule: a FLUX.2-klein config that left it out rolled out
    on the other family's sigmas, silently. Left out (or null), it is the model family's own."""
    import yaml

    from dopsd_fast.families import FAMILIES

    for name, spec in FAMILIES.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"model": {"family": name, "preset": spec.tiny_preset},
                                                               "data": {"builtin": "tiny"}}))
        assert load_config(str(tmp_path / f"{name}.yaml")).dopsd.rollout == spec.default_rollout
        assert load_config(str(tmp_path / f"{name}.yaml"), ["dopsd.rollout=null"]).dopsd.rollout == spec.default_rollout
        assert load_config(str(tmp_path / f"{name}.yaml"), ["dopsd.rollout=[1, 0.5, 0]"]).dopsd.rollout == [1, 0.5, 0]
        assert load_config(None, [f"model.family={name}", f"model.preset={spec.tiny_preset}"]).dopsd.rollout \
            == spec.default_rollout  # the built-in default config too
    assert len({spec.default_rollout for spec in FAMILIES.values()}) == len(FAMILIES) > 1  # the check can fail


def test_a_failure_ends_in_one_line_with_the_traceback_kept(tmp_path, monkeypatch, capsys):
    """An unexpected exception prints its type and first line, no traceback; the full traceback goes to
    the run's errors.log. A user error's line is printed by rank 0; another rank keeps its own in its
    log and prints it, named, where rank 0 does not say the same."""
    from dopsd_fast import cli

    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(cli, "_RUN_DIR", [out])

    @cli._ends_clean
    def boom(argv=None):
        raise KeyError("no such tensor\nsecond line")

    assert boom() == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: KeyError: 'no such tensor") and "Traceback" not in err
    assert str(out / "errors.log") in err
    kept = (out / "errors.log").read_text()
    assert "Traceback (most recent call last)" in kept and "raise KeyError" in kept

    @cli._ends_clean
    def user_error(argv=None):
        try:
            raise ValueError("data.jsonl: row 3: no image")
        except ValueError as e:
            sys.exit(f"error: {e}")

    with pytest.raises(SystemExit, match="^error: data.jsonl: row 3: no image$"):  # rank 0: its line
        user_error()
    assert not (out / "errors.rank1.log").exists()
    # another rank, under torchrun: its line kept in its log and left in the rendezvous store; printed
    # (named) unless rank 0 says the same (an error every rank meets, once on the screen)
    from dopsd_fast import distributed

    class Store:  # the rendezvous store's calls the failure path makes
        def __init__(self):
            self.kv = {}

        def set_timeout(self, t):
            pass

        def set(self, k, v):
            self.kv[k] = v.encode() if isinstance(v, str) else v

        def check(self, keys):
            return all(k in self.kv for k in keys)

        def get(self, k):
            return self.kv[k]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit):  # before the process group (no store): silent, as the node's ranks meet it
        user_error()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")  # ... but the first process of another node says it (a file it lacks)
    with pytest.raises(SystemExit):
        user_error()
    assert capsys.readouterr().err.startswith("error: [rank 1] ")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("RANK", "0")
    store = Store()
    monkeypatch.setattr(distributed, "_STORE", [store])
    store.set("error/0", "error: data.jsonl: row 3: no image")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:  # rank 0 said the same: silent
        user_error()
    assert e.value.code == 1 and capsys.readouterr().err == ""
    assert "row 3: no image" in (out / "errors.rank1.log").read_text()
    assert store.kv["error/1"] == b"error: data.jsonl: row 3: no image"
    store.set("error/0", "error: rank 0/2: the collective 'gradients' failed")
    with pytest.raises(SystemExit):  # rank 0 says something else: this rank's own line, named
        user_error()
    assert capsys.readouterr().err == "error: [rank 1] data.jsonl: row 3: no image\n"
    # an unexpected error every rank meets: rank 0's line (its log path aside) is this rank's: silent
    monkeypatch.setenv("RANK", "0")
    assert boom() == 1
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    assert boom() == 1
    assert capsys.readouterr().err == ""
    assert "raise KeyError" in (out / "errors.rank1.log").read_text()


def test_a_collective_failure_is_told_from_errors_that_mention_a_connection():
    from dopsd_fast.distributed import is_collective_failure
    from dopsd_fast.errors import DataError

    gloo = RuntimeError("[/w/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [1.2.3.4]:555")
    assert is_collective_failure(gloo)
    wrapped = RuntimeError("writing the checkpoint /x/step-0000002 failed: RuntimeError: ...")
    wrapped.__cause__ = gloo
    assert is_collective_failure(wrapped)
    for other in (ConnectionResetError(104, "Connection reset by peer"), TimeoutError("Timed out waiting 5 s"),
                  DataError("train.jsonl:3: image /nfs/a.png: [Errno 104] Connection reset by peer"),
                  RuntimeError("a NCCL error was named in this user message")):
        assert not is_collective_failure(other), other


def test_fsdp_on_with_lora_and_no_sharded_base_is_refused(tmp_path):
    """dist.fsdp=on shards full fine-tuning; with LoRA it did nothing, silently (the run replicated)."""
    from dopsd_fast.config import ConfigError
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match="'dist.fsdp': on shards full fine-tuning"):
        tiny_config(tmp_path, "dist.fsdp=on")
    assert tiny_config(tmp_path, "dist.fsdp=on", "lora.enabled=false").dist.fsdp == "on"
    assert tiny_config(tmp_path, "dist.fsdp=on", "dist.shard_base=true").dist.shard_base


def test_the_other_methods_fields_are_said_and_free_on_resume(tmp_path, caplog):
    """SFT read no dopsd.loss / rollout / backward and D-OPSD no sft.*, yet both were accepted silently and
    a resume refused a change of them as one that "changes what the run computes". Now a set one is said
    at start-up, and a resume applies a change of it."""
    import logging

    from dopsd_fast.safety import config_changes
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    sft = tiny_config(tmp_path / "a", "method=sft", "dopsd.loss=v", "dopsd.backward=stepwise")
    assert sft.ignored_fields() == ["dopsd.loss", "dopsd.backward"]
    assert tiny_config(tmp_path / "b", "sft.weighting=mode").ignored_fields() == ["sft.weighting"]
    assert tiny_config(tmp_path / "c").ignored_fields() == []
    assert tiny_config(tmp_path / "d", "method=sft").ignored_fields() == []
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        Trainer(sft)
    assert "method sft does not read dopsd.loss, dopsd.backward" in caplog.text, caplog.text
    base = tiny_config(tmp_path / "e", "method=sft").to_dict()
    frozen, applied = config_changes(base, sft.to_dict())
    assert not frozen and {k for k, *_ in applied} >= {"dopsd.loss", "dopsd.backward"}
    frozen, _ = config_changes(tiny_config(tmp_path / "f").to_dict(),
                               tiny_config(tmp_path / "g", "dopsd.loss=v").to_dict())
    assert [k for k, *_ in frozen] == ["dopsd.loss"]  # D-OPSD reads it: still frozen


def test_a_library_error_turned_into_one_line_keeps_its_traceback(tmp_path, monkeypatch):
    """A library's own error that a command ends in one line (torch's "mat1 and mat2 shapes cannot be
    multiplied") left no traceback anywhere; its traceback now goes to errors.log, the line naming it. Our
    own messages stay as they are."""
    import torch

    from dopsd_fast import cli

    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(cli, "_RUN_DIR", [out])

    @cli._ends_clean
    def shapes(argv=None):
        try:
            torch.nn.Linear(3, 4)(torch.ones(2, 5))  # raised inside torch (its Python frames)
        except RuntimeError as e:
            sys.exit(f"error: {e}")

    # torch >= 2.15 names the op first ("addmm: mat1 and mat2 ..."); earlier releases do not
    with pytest.raises(SystemExit, match=r"^error: (addmm: )?mat1 and mat2 .* \(its traceback: .*errors.log\)$"):
        shapes()
    assert "Traceback (most recent call last)" in (out / "errors.log").read_text()


def test_a_field_newer_than_the_checkpoint_at_its_default_is_no_change(tmp_path):
    """A checkpoint of a version before a field (its config lacks it) resumed with the field at its default
    is no change: no log line for validation.references, no refusal for a frozen model.* field (a
    new field's default keeps the earlier behaviour); the
    field at another value is still one."""
    from dopsd_fast.config import Config
    from dopsd_fast.safety import config_changes
    from tests.conftest import tiny_config

    now = tiny_config(tmp_path / "a").to_dict()
    old = {**now, "validation": {k: v for k, v in now["validation"].items() if k != "references"},
           "model": {k: v for k, v in now["model"].items() if k != "teacher_max_tokens"}}
    assert now["model"]["teacher_max_tokens"] == Config().model.teacher_max_tokens  # at its default
    assert config_changes(old, now, Config().to_dict()) == ([], [])
    frozen, applied = config_changes(old, now)  # without the defaults: both said
    assert [k for k, *_ in frozen] == ["model.teacher_max_tokens"] and [k for k, *_ in applied] == ["validation.references"]
    other = tiny_config(tmp_path / "a", "validation.references=[x.png]", "model.teacher_max_tokens=64").to_dict()
    frozen, applied = config_changes(old, other, Config().to_dict())
    assert [k for k, *_ in frozen] == ["model.teacher_max_tokens"] and [k for k, *_ in applied] == ["validation.references"]


def test_received_config_files_end_in_one_bounded_line(tmp_path):
    """A config saved in another encoding, a key given twice (YAML kept the last silently: a second
    ``train:`` dropped the first's output_dir), a syntax error (PyYAML's several lines), a 700-byte alias
    bomb (a 226 MB error line, 1.1 GB of memory) and list fields holding other types (an "unexpected"
    TypeError later): each one line naming the file or field."""
    from dopsd_fast.config import ConfigError, load_config

    cases = {
        "latin1.yaml": (b"model:\n  family: zimage\n\xff\xfe bad: 1\n", r"is not UTF-8 text \(byte 0xff at offset 24\)"),
        "dup.yaml": (b"train: {max_steps: 3, output_dir: w/zz}\ntrain: {max_steps: 5}\n",
                     r"line 2, column 1: key 'train' is given twice in one mapping \(first on line 1\)"),
        "syntax.yaml": (b"train:\n  max_steps: [3\n", r"line 3, column 1: expected ',' or ']'"),
        "bomb.yaml": (b"validation:\n  prompts: [&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                      b"&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                      b"&e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]\n"
                      b"train: {output_dir: *f}\n", None),
    }
    for name, (body, match) in cases.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(ConfigError) as e:
            load_config(str(tmp_path / name))
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and len(msg) < 400, msg[:500]
        if match:
            assert re.search(match, msg), msg
    assert "expected a string, got [[" in msg  # the bomb: its value shown, bounded
    # a merge key overridden is no duplicate, also in a mapping an alias refers to (flattened before its own turn)
    (tmp_path / "merge.yaml").write_text("optim: &o\n  <<: {lr: 0.001, eps: 1.0e-8}\n  lr: 0.002\n"
                                         "validation: {prompts: [x]}\nsft: {<<: {}}\n")
    merged = load_config(str(tmp_path / "merge.yaml"))
    assert merged.optim.lr == 0.002 and merged.optim.eps == 1e-8
    from dopsd_fast.config import _UniqueKeyLoader

    assert yaml.load("base: &b {lr: 1}\no: &o\n  <<: *b\n  lr: 2\nx: {<<: *o}\n", Loader=_UniqueKeyLoader) == {
        "base": {"lr": 1}, "o": {"lr": 2}, "x": {"lr": 2}}
    # values earlier versions took: an empty list as null, a number YAML 1.1 reads as text
    assert load_config(None, ["lora.targets=[]", "optim.betas=[9e-1, 0.999]"]).optim.betas == [0.9, 0.999]
    for override, field in [("data.prompt_keys=[prompt, [x]]", "data.prompt_keys"), ("lora.targets=[[x]]", "lora.targets"),
                            ("optim.betas=[a, 0.9]", "optim.betas"), ("model.text_layers=[a]", "model.text_layers")]:
        with pytest.raises(ConfigError, match=rf"config field '{re.escape(field)}': must be"):
            load_config(None, [override])


def test_a_config_nested_past_the_recursion_limit_is_one_line(tmp_path):
    from dopsd_fast.config import ConfigError

    p = tmp_path / "deep.yaml"
    p.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"config file {p} nests too deeply to read"):
        load_config(p)


def test_an_optional_text_field_may_be_empty():
    """The empty-text refusal is for the fields that are never optional: an empty teacher instruction
    (the teacher without one) stays a value."""
    cfg = load_config(None, ["model.teacher_instruction=''", "model.gt_instruction=''"])
    assert cfg.model.teacher_instruction == "" and cfg.model.gt_instruction == ""
    assert load_config(None, ["model.teacher_instruction=null"]).model.teacher_instruction is None


def test_an_alias_bomb_in_the_background_colour_is_one_short_line():
    """data.alpha_background's message printed the value whole (built even for a valid one): a few hundred
    bytes of nested YAML aliases made a line of megabytes, or hung."""
    levels = ["&a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    with pytest.raises(ConfigError, match=r"'data.alpha_background': must be three values in \[0, 255\]") as e:
        load_config(None, [f"data.alpha_background=[{', '.join(levels)}]"])
    assert len(str(e.value)) < 1000, len(str(e.value))


def test_a_set_value_nested_past_the_recursion_limit_is_one_line():
    from dopsd_fast.config import ConfigError

    with pytest.raises(ConfigError, match=r"--set 'validation.prompts=\[\[\[.*\.\.\.: the value nests too deeply to read"):
        load_config(None, ["validation.prompts=" + "[" * 5000 + "]" * 5000])


def test_dopsd_train_takes_out_as_its_folder(tmp_path):
    """dopsd-sample has --out; dopsd-train took the folder only as --set train.output_dir=..., and --out was an
    unknown argument. It names the run's folder; with --set train.output_dir too it is one line."""
    from dopsd_fast.cli import train_main

    out = tmp_path / "run"
    assert train_main(["--config", "tiny-zimage", "--out", str(out), "--set", "train.max_steps=1",
                       "--set", "validation.every=0", "--set", "validation.at_start=false",
                       "--set", "train.progress=false"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    with pytest.raises(SystemExit, match="--out and --set train.output_dir both name the run's folder"):
        train_main(["--config", "tiny-zimage", "--out", str(out), "--set", f"train.output_dir={out}"])
