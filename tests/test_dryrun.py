"""dopsd-train --dry-run: on the tiny default, on real-size configs whose model directory holds only
the config files (the architecture is built on the meta device; no weight is read), and on every
shipped recipe as shipped, with no data, model folder or feature cache (the family spec's released
config and the recipe's buckets stand in); --gpu by name; docs/performance.md's table made by the same code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # this checkout's package first, whatever the working directory (a fresh folder: no data, no cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys; from dopsd_fast.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


_MANY = """
import contextlib, io, json, sys
from dopsd_fast.cli import _setup_logging, train_main
_setup_logging()
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = train_main(argv)
        except SystemExit as x:
            rc = x.code if isinstance(x.code, int) else 1
            if x.code is not None and not isinstance(x.code, int):
                print(x.code, file=e)
    out.append({"returncode": rc, "stdout": o.getvalue(), "stderr": e.getvalue()})
print(json.dumps(out))
"""


def _run_many(*argvs, cwd):
    """``dopsd-train`` with each argv in turn, in one fresh process (one import of torch and diffusers,
    not one per run): a (returncode, stdout, stderr) namespace each; the process's own stderr (its log
    lines) is added to each one's."""
    from types import SimpleNamespace

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    r = subprocess.run([sys.executable, "-c", _MANY, json.dumps([list(a) for a in argvs])], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [SimpleNamespace(**{**x, "stderr": x["stderr"] + r.stderr}) for x in json.loads(r.stdout.splitlines()[-1])]


def _config_only_dir(tmp_path, family):
    from diffusers import FlowMatchEulerDiscreteScheduler
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.pop(0)
    d = tmp_path / family
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    from dopsd_fast.families import FAMILIES

    spec = FAMILIES[family]
    T = spec.diffusers_class()
    # the released VAEs' widths, and the released schedulers (static shift 3 / dynamic shifting)
    vae_cls, vae, sched = {
        "zimage": (AutoencoderKL, dict(down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4,
                                       block_out_channels=(128, 256, 512, 512), latent_channels=16),
                   FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)),
        "klein": (AutoencoderKLFlux2, dict(block_out_channels=(128, 256, 512, 512)),
                  FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)),
    }[family]
    cfg = {"zimage": step_time.ZIMAGE_RELEASED, "klein": step_time.KLEIN_4B}[family]
    with torch.device("meta"):
        T.from_config(cfg).save_config(d / "transformer")
        vae_cls.from_config(vae).save_config(d / "vae")
    sched.save_config(d / "scheduler")
    return d


def _data(tmp_path):
    img = tmp_path / "data" / "a.png"
    img.parent.mkdir(parents=True)
    Image.fromarray(np.full((1024, 1024, 3), 128, np.uint8)).save(img)
    jl = tmp_path / "data" / "train.jsonl"
    jl.write_text(json.dumps({"image": "a.png", "prompt": "a photo of [V]"}) + "\n")
    return jl


def test_dry_run_default_and_tiny():
    for r in _run_many(("--dry-run",), ("--dry-run", "--config", "tiny-zimage"), cwd=ROOT):  # the default run (the
        assert r.returncode == 0, r.stdout + r.stderr  # toy), the tiny random preset
        assert "config: valid" in r.stdout and "-> FITS" in r.stdout and "predicted peak" in r.stdout


def test_dry_run_real_size_zimage_picks_stepwise_on_an_h100(tmp_path):
    model = _config_only_dir(tmp_path, "zimage")
    jl = _data(tmp_path)
    common = ["--config", "zimage-turbo-lora", "--set", f"model.path={model}", "--set", f"data.jsonl={jl}",
              "--set", "data.builtin=null"]
    nocache = [*common, "--set", "cache.dir=null"]
    missing, auto, once = _run_many(
        ("--dry-run", "--gpu", "h100", *common, "--set", f"cache.dir={tmp_path / 'nocache'}"),
        ("--dry-run", "--gpu", "h100", *nocache),
        ("--dry-run", "--gpu", "h100", *nocache, "--set", "dopsd.backward=once", "--set", "fast.checkpoint=none"),
        cwd=ROOT)
    # a missing feature cache: the dry run says what a real run still needs instead of failing
    r = missing
    assert r.returncode == 0, r.stdout + r.stderr
    assert "feature cache: not ready" in r.stdout and "a real run still needs" in r.stdout, r.stdout
    assert "run dopsd-cache first" in r.stdout.split("a real run still needs")[1], r.stdout
    r = auto
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backward stepwise (auto)" in r.stdout, r.stdout  # K = 4 states of activations do not fit 80 GB
    assert "-> FITS" in r.stdout and "4608 student / 5120 teacher tokens" in r.stdout
    # the authors' explicit `once` on an H100 without checkpointing does not fit, and says what would
    r = once
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout and "dopsd.backward=stepwise" in r.stdout, r.stdout


def test_dry_run_real_size_klein(tmp_path):
    model = _config_only_dir(tmp_path, "klein")
    jl = _data(tmp_path)
    r = _run("--dry-run", "--gpu", "h200", "--config", "klein-4b-editing-lora", "--set", f"model.path={model}",
             "--set", f"data.jsonl={jl}", "--set", "data.builtin=null", "--set", "cache.dir=null")
    assert r.returncode == 0, r.stdout + r.stderr
    # the recipe: eager path with gradient checkpointing, so the authors' `once` fits
    assert "klein, eager path, backward once (auto), 25 of 25 layers checkpointed" in r.stdout, r.stdout
    assert "4608 student / 8704 teacher tokens" in r.stdout and "-> FITS" in r.stdout


# ---- nothing but the config: no data, no model folder, no feature cache ---------------------------
def _recipes():
    from dopsd_fast.config import shipped_configs

    return sorted(shipped_configs())


def test_dry_run_every_recipe_needs_nothing_but_the_config(tmp_path):
    """Every shipped recipe, as shipped (paths /path/to/...), on a GPU name in any case, from a folder
    with no data, weights or cache: exit 0 (fits) or 1 (does not fit, with what would), never an error."""
    names = ["H200", "h100", "B200", "a100", "A100-40", "l40s", "4090"]
    recipes = _recipes()
    runs = _run_many(*[("--config", recipe, "--dry-run", "--gpu", names[i % len(names)])
                       for i, recipe in enumerate(recipes)], cwd=tmp_path)
    for recipe, r in zip(recipes, runs):
        assert r.returncode in (0, 1) and "error" not in r.stderr.lower(), (recipe, r.stdout + r.stderr)
        assert "predicted peak" in r.stdout and "predicted step time" in r.stdout, (recipe, r.stdout)


def test_dry_run_without_data_weights_or_cache_says_what_a_real_run_needs(tmp_path):
    r = _run("--config", "zimage-turbo-lora", "--dry-run", "--gpu", "H200", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "data: /path/to/train.jsonl not found; shapes from the recipe's buckets" in out, out
    assert "shapes from the family spec's" in out and "released config" in out, out
    assert "4608 student / 5120 teacher tokens" in out, out  # the largest 1 MP bucket, 1024 x 1024
    needs = out.split("a real run still needs:")[1]
    for field in ("data.jsonl", "model.path", "cache.dir"):
        assert field in needs, (field, out)
    assert "GPU H200 141 GB" in out and "measured on the H200" in out and "spec-sheet" not in out, out


def test_dry_run_gpu_changes_memory_and_time(tmp_path):
    outs = {}
    gpus = ("h200", "4090", "A100")
    for gpu, r in zip(gpus, _run_many(*[("--config", "zimage-turbo-lora", "--dry-run", "--gpu", g) for g in gpus],
                                      cwd=tmp_path)):
        assert r.returncode == 0, r.stdout + r.stderr
        outs[gpu] = r.stdout
    assert "backward once (auto)" in outs["h200"] and "backward stepwise (auto)" in outs["4090"]
    assert "GPU RTX 4090 24 GB" in outs["4090"] and "GPU A100 80 GB (SXM)" in outs["A100"]
    for gpu in ("4090", "A100"):
        assert "spec-sheet estimate" in outs[gpu] and "not measured" in outs[gpu], outs[gpu]
    secs = {g: float(o.split("predicted step time ~")[1].split(" s")[0]) for g, o in outs.items()}
    assert secs["h200"] < secs["A100"] < secs["4090"], secs


def test_dry_run_does_not_fit_names_only_what_fits(tmp_path):
    # klein-9B on a 24 GB card: the weights alone leave too little; nothing the model knows fits
    r, r2 = _run_many(("--config", "klein-9b-editing-lora", "--dry-run", "--gpu", "4090"),
                      ("--config", "zimage-turbo-lora", "--dry-run", "--gpu", "H100", "--set", "dopsd.backward=once",
                       "--set", "model.gradient_checkpointing=none"), cwd=tmp_path)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout, r.stdout + r.stderr
    assert "to fit: none of" in r.stdout and "fast.fp8" not in r.stdout, r.stdout
    # Z-Image with the authors' once and no checkpointing on an H100: stepwise or checkpointing fit
    r = r2
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout, r.stdout + r.stderr
    hint = r.stdout.split("to fit: ")[1].splitlines()[0]
    assert "dopsd.backward=stepwise" in hint and "fast.fp8" not in hint, hint


def test_unknown_gpu_is_one_line(tmp_path):
    r = _run("--config", "zimage-turbo-lora", "--dry-run", "--gpu", "v100", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --gpu 'v100'"), r.stderr
    assert "H200" in r.stderr and "4090" in r.stderr  # exit 2: a usage error, not 1 ("does not fit")
    r = _run("--config", "tiny-zimage", "--gpu", "h100", cwd=tmp_path)  # was ignored: a run started
    assert r.returncode != 0 and "add --dry-run" in r.stderr and not (tmp_path / "runs").exists(), r.stderr


def test_gpu_names_and_time_scaling():
    from dopsd_fast import memory

    for name, key in (("H200", "h200"), ("h100", "h100"), ("A100", "a100-80"), ("a100-40", "a100-40"),
                      ("A100 40GB", "a100-40"), ("L40S", "l40s"), ("4090", "4090"), ("RTX 4090", "4090"),
                      ("NVIDIA B200", "b200")):
        assert memory.gpu_class(name) == key, name
    # the H200's time is its measured one (the calibration file's steps), the others scaled from it
    cal = json.loads((ROOT / "benchmarks" / "calibration" / "h200-2026-12-04.json").read_text())
    floor = 866.9e12
    assert abs(memory.predicted_step_seconds(floor, "fast", "h200") - cal["steps"]["fast"]["median_s"]) < 0.01
    assert abs(memory.predicted_step_seconds(floor, "eager", "h200")
               - cal["steps"]["eager_checkpointed"]["median_s"]) < 0.01
    t = {g: memory.predicted_step_seconds(floor, "fast", g) for g in memory.GPUS}
    assert t["b200"] < t["h200"] < t["h100"] < t["a100-80"] < t["a100-40"] < t["4090"]
    assert [g for g, v in memory.GPUS.items() if v.measured] == ["h200"]
    # the measured workload's own recipe: the dry run's floor is the benchmark's (it left out the adapters'
    # own backward: 861.4 TFLOP, every predicted time 0.6 % low), so its H200 time is the measured one
    from dopsd_fast.config import load_config
    from dopsd_fast.dryrun import workload

    w = workload(load_config("zimage-turbo-lora", []), say=lambda *a: None)
    assert abs(w.floor_flops / 1e12 - 866.9) < 0.1, w.floor_flops / 1e12


def test_readme_table_is_the_dry_run_table():
    """docs/performance.md's dry-run table is what ``python -m dopsd_fast.dryrun --table`` prints now."""
    from dopsd_fast.dryrun import table

    readme = (ROOT / "docs" / "performance.md").read_text()
    begin = readme.index("<!-- dry-run table:")
    block = readme[readme.index("\n", begin) + 1:readme.index("<!-- end of the dry-run table -->")]
    assert block == table(), "docs/performance.md's dry-run table is stale: regenerate with python -m dopsd_fast.dryrun --table"


def test_full_fine_tuning_counts_what_the_trainer_keeps(tmp_path):
    """Full fine-tuning: the dry run counted the student and its gradients at the model dtype, while the
    trainer keeps an fp32 student master (trained in fp32), a teacher module in the model dtype and an
    fp32 EMA master (on the host with dopsd.ema_on_cpu); it also counted LoRA's bf16 adapter casts.
    Now its weights are the trainer's tensors, byte for byte, and its shape the trainer's own."""
    from dopsd_fast.dryrun import workload
    from dopsd_fast.memory import peak_bytes
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    for extra in ([], ["dopsd.ema_on_cpu=true"]):
        cfg = tiny_config(tmp_path / str(len(extra)), "lora.enabled=false", "fast.enabled=true", "model.dtype=bf16",
                          *extra)
        w = workload(cfg, say=lambda *a: None)
        t = Trainer(cfg)
        ws = t.weights
        on_gpu_ema = [] if extra else list(ws._ema.values())
        kept = nbytes(ws._student.values()) + nbytes(ws.teacher_module.parameters()) + nbytes(on_gpu_ema)
        assert w.weights == kept, (extra, w.weights, kept)
        mine = t.memory_shape()
        assert (w.shape.trainable_bytes_per_param, w.shape.adapters) == (mine.trainable_bytes_per_param,
                                                                          mine.adapters) == (4, False)
        assert peak_bytes(w.shape, "fast", "stepwise")["casts"] == 0


def test_dry_run_says_when_the_plan_passes_its_budget(tmp_path, capsys):
    """A plan whose predicted peak passes its budget with every saving taken said it "fits the budget"
    (dry run and trainer alike), the dry run's FITS compared with the whole card, and a hint read "(32 of 30
    layers)". Now the plan says it passes, the dry run names the missing margin and a budget larger than
    the card, and the layer count is the plan's; a full fine-tuning run that fits nowhere names LoRA and FSDP2."""
    from dopsd_fast.cli import train_main

    rc = train_main(["--config", "zimage-turbo-lora", "--dry-run", "--gpu", "a100-40", "--set", "dopsd.backward=once",
                     "--set", "fast.memory_budget_gb=10"])
    out = capsys.readouterr().out
    assert rc == 0 and "still passes the budget" in out and "fits the budget" not in out, out
    assert "passes the plan's budget" in out, out
    rc = train_main(["--config", "zimage-turbo-lora", "--dry-run", "--gpu", "4090", "--set",
                     "fast.memory_budget_gb=500"])
    out = capsys.readouterr().out
    assert rc == 1 and "fast.memory_budget_gb=500 is more than this GPU holds" in out, out
    assert "(30 of 30 layers)" in out and "of 30 layers)" in out.split("to fit:")[1], out
    rc = train_main(["--config", "zimage-turbo-lora", "--dry-run", "--gpu", "h100", "--set", "lora.enabled=false"])
    out = capsys.readouterr().out
    assert rc == 1 and "lora.enabled=true" in out and "dist.fsdp=on" in out, out


def test_trainer_warns_when_its_plan_passes_the_budget(tmp_path, caplog):
    import logging

    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        t = Trainer(tiny_config(tmp_path, "fast.enabled=true", "fast.memory_budget_gb=0.000001"))
    assert t.plan.over_budget and "still passes the budget" in t.plan.describe()
    assert any("may run out of memory" in r.getMessage() for r in caplog.records), caplog.text


def test_lora_targets_matching_nothing_or_partly(tmp_path, caplog, capsys):
    """The dry run said "config: valid" (0 adapter parameters, FITS) for targets the run refuses; a user's
    list of which some match nothing trained the rest without a word."""
    import logging

    import pytest

    from dopsd_fast.cli import train_main
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    with pytest.raises(SystemExit, match=r"error: config field 'lora.targets': \['nope'\] match no linear layer"):
        train_main(["--config", "tiny-zimage", "--dry-run", "--set", "lora.targets=[nope]"])
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        Trainer(tiny_config(tmp_path, "lora.targets=[to_q, nope]"))
    assert "lora.targets: ['nope'] match no module" in caplog.text, caplog.text


def test_encoders_not_on_disk_are_sized_from_the_released_models(tmp_path, capsys):
    """Without a feature cache and without the encoders on disk, the dry run counted them as 0 GB and said
    FITS on a 4090 (22.2 GB); the released encoders (Z-Image: Qwen3-4B and the teacher's Qwen3-VL-4B) are
    about 17 GB. They are now sized from the released models, and the SFT baseline's from its text encoder
    alone (it loads no teacher encoder); a folder name without a size tag says its flavour is a guess."""
    from dopsd_fast.cli import train_main

    rc = train_main(["--config", "zimage-turbo-lora", "--dry-run", "--gpu", "4090", "--set", "cache.dir=null"])
    out = capsys.readouterr().out
    assert rc == 1 and "encoders stay resident (16.9 GB; the text and teacher encoders sized" in out, out
    rc = train_main(["--config", "zimage-turbo-sft", "--dry-run", "--gpu", "h100", "--set", "cache.dir=null"])
    out = capsys.readouterr().out
    assert rc == 0 and "encoders stay resident (8.0 GB; the text encoder sized" in out, out
    train_main(["--config", "klein-9b-editing-lora", "--dry-run", "--set", "model.path=/models/flux2-klein"])
    assert "klein-4b flavour (its released config; a guess" in capsys.readouterr().out


def test_validation_references_are_checked_as_the_run_checks_them(tmp_path):
    """The dry run passed validation.references that the run refuses at start-up (a family without an
    editing mode, a picture smaller than every bucket); one not on disk is what the run still needs."""
    import numpy as np
    import pytest
    from PIL import Image

    from dopsd_fast.config import load_config
    from dopsd_fast.dryrun import workload
    from dopsd_fast.errors import ConfigError

    small, ok = tmp_path / "small.png", tmp_path / "ok.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(small)
    Image.fromarray(np.zeros((200, 200, 3), dtype=np.uint8)).save(ok)

    def run(config, refs):
        return workload(load_config(config, ["validation.prompts=[x]", f"validation.references={refs}"]),
                        say=lambda *_: None)

    w = run("tiny-klein", f"[{ok}, {tmp_path / 'none.png'}]")
    assert [n for n in w.needs if n.startswith("validation")] == \
        [f"validation.references[1]: an image file (not found: {tmp_path / 'none.png'})"]
    with pytest.raises(ConfigError, match=r"'validation.references\[1\]' .*small.png is 20x20, which fits inside no"):
        run("tiny-klein", f"[{ok}, {small}]")
    with pytest.raises(ConfigError, match="'validation.references': model.family=zimage has no editing mode"):
        run("tiny-zimage", f"[{tmp_path / 'none.png'}]")
    # a held-out prompt's own references, checked the same way and named by their field
    own = f"validation.prompts=[x, {{prompt: y, references: [{tmp_path / 'none.png'}, {small}]}}]"
    with pytest.raises(ConfigError, match=r"'validation.prompts\[1\].references\[1\]' .*small.png is 20x20"):
        workload(load_config("tiny-klein", [own]), say=lambda *_: None)
    own = f"validation.prompts=[x, {{prompt: y, references: [{tmp_path / 'none.png'}]}}]"
    w = workload(load_config("tiny-klein", [own]), say=lambda *_: None)
    assert [n for n in w.needs if n.startswith("validation")] == \
        [f"validation.prompts[1].references[0]: an image file (not found: {tmp_path / 'none.png'})"]
    own = f"validation.prompts=[x, {{prompt: y, references: [{tmp_path}]}}]"  # a folder is there, and no image
    with pytest.raises(ConfigError, match=r"'validation.prompts\[1\].references\[0\]' .*: a folder, not an image file"):
        workload(load_config("tiny-klein", [own]), say=lambda *_: None)
    # a bucket the model does not take (klein: a multiple of 16), as the run refuses it at start-up: a held-out
    # prompt's reference at it (the dry run passed it), the data's rows at it, the recipe's buckets without data
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((256, 384, 3), dtype=np.uint8)).save(wide)
    grid = ["data.buckets=[[128,128],[152,104]]", "data.bucket_scale=1", "data.bucket_multiple=8"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": str(ok), "prompt": "p"}) + "\n")  # square: at 128 x 128
    data = [f"data.jsonl={rows}", "data.builtin=null", "data.prompt_keys=[prompt]"]
    assert workload(load_config("tiny-klein", [*grid, *data, "validation.prompts=[x]"]), say=lambda *_: None).needs == []
    with pytest.raises(ConfigError, match=r"'validation.prompts\[0\].references\[0\]' .*wide.png: its bucket 152x104: "
                                          r"image size 152x104 must be a multiple of 16"):
        workload(load_config("tiny-klein", [*grid, *data, f"validation.prompts=[{{prompt: y, references: [{wide}]}}]"]),
                 say=lambda *_: None)
    rows.write_text(json.dumps({"image": str(wide), "prompt": "p"}) + "\n")
    for data in ([f"data.jsonl={rows}", "data.builtin=null", "data.prompt_keys=[prompt]"],
                 [f"data.jsonl={tmp_path / 'absent.jsonl'}", "data.builtin=null"]):
        with pytest.raises(ConfigError, match=r"'data.buckets' .*image size 152x104 must be a multiple of 16"):
            workload(load_config("tiny-klein", [*grid, *data, "validation.prompts=[x]"]), say=lambda *_: None)


def test_references_per_row_where_the_data_is_not_at_hand(tmp_path, capsys):
    """An editing recipe without its data counted rows without references (the ground-truth-reference
    recipe's table row equalled the text-to-image one's); ``--references N`` counts N per row at its
    bucket in both branches, in the memory model and the floor FLOPs (the teacher: the state's image,
    the references and the target), and says so; found data counts its own rows; the table counts the
    shipped reference recipes with one; a family without an editing mode and a run refuse it."""
    import pytest

    from dopsd_fast.cli import train_main
    from dopsd_fast.config import load_config, shipped_configs
    from dopsd_fast.dryrun import table, workload
    from dopsd_fast.families import FAMILIES
    from dopsd_fast.errors import ConfigError

    cfg = load_config("klein-4b-gtref-lora", [])
    said = []
    w0, w1 = workload(cfg, say=said.append), workload(cfg, say=said.append, references=1)
    assert "rows without reference images (editing rows with N references each: --references N)" in said[0]
    assert "each row with 1 reference image at its bucket (--references)" in said[len(said) // 2]
    n_img = 64 * 64  # 1024 x 1024: 64 x 64 klein tokens
    assert (w0.shape.tokens_student, w0.shape.tokens_teacher) == (n_img + 512, 2 * n_img + 512)
    assert (w1.shape.tokens_student, w1.shape.tokens_teacher) == (2 * n_img + 512, 3 * n_img + 512)
    # FLOPs: the teacher with 3 x the image tokens, not 2 x the student's (4 x)
    spec, c, rank = w1.spec, w1.transformer_config, cfg.lora.rank
    f_s, f_t = spec.forward_flops(c, 2 * n_img, [512], rank), spec.forward_flops(c, 3 * n_img, [512], rank)
    from dopsd_fast import memory

    lora_s = f_s[0] - spec.forward_flops(c, 2 * n_img, [512])[0]
    assert w1.floor_flops == pytest.approx(w1.shape.states * (sum(f_s) + sum(f_t)
                                                              + memory.backward_flops(f_s, True, lora_s)))
    assert w1.floor_flops > 1.8 * w0.floor_flops

    named = {r: s.name for s in FAMILIES.values() for r in s.reference_recipes}
    assert named and all(load_config(r, []).model.family == f for r, f in named.items())  # each a shipped recipe
    assert set(named) <= set(shipped_configs())
    row = next(line for line in table(["klein-4b-gtref-lora", "klein-4b-editing-lora"]).splitlines()
               if line.startswith("| `klein-4b-gtref-lora`"))
    other = next(line for line in table(["klein-4b-editing-lora"]).splitlines()
                 if line.startswith("| `klein-4b-editing-lora`"))
    assert "(1 reference image per row)" in row and row.split("|")[2] != other.split("|")[2]

    with pytest.raises(ConfigError, match="--references 1: model.family=zimage has no editing mode"):
        workload(load_config("zimage-turbo-lora", []), say=lambda *_: None, references=1)
    said.clear()
    workload(load_config("tiny-klein", []), say=said.append, references=2)  # the built-in data: its own rows
    assert "--references 2 is not used: the rows' own references are counted" in said[0]
    assert train_main(["--references", "1"]) == 2
    assert "--references N counts reference images per row for a --dry-run" in capsys.readouterr().err
    for n in ("-1", "65"):  # a count past any model (it cost minutes and GBs, then failed as unexpected)
        assert train_main(["--dry-run", "--references", n]) == 2
        assert f"error: --references {n}: reference images per row, 0 to 64" in capsys.readouterr().err
    # the documented "Will it fit?" dry run of the recipe, by name or by file, counts its rows' references
    # (as the table does), unless --references says otherwise
    for recipe in ("klein-4b-gtref-lora", str(ROOT / "configs" / "klein-4b-gtref-lora.yaml")):
        said.clear()
        w = workload(load_config(recipe, []), say=said.append, references=None, recipe=recipe)
        assert w.shape.tokens_teacher == w1.shape.tokens_teacher, recipe
        assert "each row with 1 reference image at its bucket (the recipe klein-4b-gtref-lora's rows carry" in said[0]
    assert workload(cfg, say=lambda _: None, references=0, recipe="klein-4b-gtref-lora").shape == w0.shape
    assert workload(load_config("klein-4b-editing-lora", []), say=lambda _: None, references=None,
                    recipe="klein-4b-editing-lora").shape.tokens_teacher == w0.shape.tokens_teacher


def test_dry_run_under_torchrun_is_refused_in_one_line(monkeypatch, capsys):
    """Under torchrun every rank printed a one-GPU report, interleaved, each 'DOES NOT FIT' for a sharded
    run, and suggested the torchrun command it ran under."""
    from dopsd_fast.cli import train_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["--config", "tiny-zimage", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dry-run plans one GPU and runs as one process")


def test_disk_plan_counts_checkpoints_kept_and_the_one_being_written():
    """What a run adds to its disk: a save writes the new checkpoint before the oldest goes, and an
    export folder beside the one it replaces; a resumed run's own checkpoints are there already."""
    from dopsd_fast.memory import checkpoint_steps, disk_plan

    assert checkpoint_steps(0, 2000, 500) == [500, 1000, 1500, 2000]
    assert checkpoint_steps(0, 1234, 500) == [500, 1000, 1234]  # and the last step
    assert checkpoint_steps(600, 2000, 500) == [1000, 1500, 2000] == checkpoint_steps(500, 2000, 500)
    assert checkpoint_steps(0, 10, 0) == [10] and checkpoint_steps(2000, 2000, 500) == []
    G = 1e9
    # full fine-tuning of a 6 B model: 98 GB checkpoints, 3 kept; the exports (2 x 12.3 GB) after the last
    # save, which pruned back to 3: the peak is the 4th checkpoint being written (392 GB), not 4 + the exports
    d = disk_plan(98 * G, 24.6 * G, 2, 3, [500, 1000, 1500, 2000], exports_each_checkpoint=False, free=350 * G)
    assert d.kept == 4 and d.need == pytest.approx(4 * 98 * G) and d.fails_at == 2000
    assert disk_plan(98 * G, 24.6 * G, 2, 3, [500, 1000], exports_each_checkpoint=False, free=150 * G).fails_at == 1000
    d = disk_plan(98 * G, 24.6 * G, 2, 3, [500, 1000], exports_each_checkpoint=False, free=230 * G)
    assert d.need == pytest.approx(2 * 98 * G + 24.6 * G) and d.fails_at is None  # both kept, then the exports
    # LoRA, fresh: the exports with each checkpoint; from the 2nd on each folder is written beside its old one
    d = disk_plan(2 * G, 1 * G, 2, 3, [500, 1000], free=5.4 * G)
    assert d.need == pytest.approx(2 * 2 * G + 1 * G + 0.5 * G) and d.fails_at == 1000
    # a resumed run, its 3 checkpoints and its exports there: one checkpoint more, or one export folder
    d = disk_plan(2 * G, 1 * G, 2, 3, [1500, 2000], existing=3, exports_there=True, free=2.1 * G)
    assert d.kept == 4 and d.need == pytest.approx(2 * G) and d.fails_at is None
    assert disk_plan(2 * G, 1 * G, 2, 3, [1500, 2000], existing=3, exports_there=True, free=1.9 * G).fails_at == 1500


def test_a_run_that_will_not_fit_its_disk_is_told_at_start(tmp_path, caplog, monkeypatch):
    """A run's checkpoints filled its disk hours in (full fine-tuning of Z-Image-Turbo: 98 GB each, up to
    four at once), and the first save that did not fit stopped it, with no word at the start. Now the
    start-up warns, naming the step whose checkpoint and exports will not fit; its figures are the files the run
    writes (checked here against a run's own checkpoint and exports); the dry run says the same."""
    import logging
    import shutil

    from dopsd_fast import trainer as tr
    from dopsd_fast.checkpoint import load_checkpoint
    from tests.conftest import tiny_config

    args = ("train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=2", "validation.every=0")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        t = tr.Trainer(tiny_config(tmp_path / "a", *args))
    d = t.disk_plan()
    assert d.steps == (1, 2, 3) and d.kept == 3 and not any("will not fit" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(tr.Trainer, "ANNOUNCE_BYTES", 1.0)  # a long write is announced (here: every one)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        t.train()
    said = [r.getMessage() for r in caplog.records]
    assert sum("writing its checkpoint (about" in m for m in said) == 3, said
    assert sum(m.startswith("checkpoint ") and " written (" in m for m in said) == 3, said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        tr.Trainer(tiny_config(tmp_path / "a", *args), resume="latest").close()
    assert any(r.getMessage().startswith("reading checkpoint ") for r in caplog.records), caplog.text
    out = tmp_path / "a" / "run"
    st = load_checkpoint(out / "checkpoints" / "step-0000003")

    def tensor_bytes(x):
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        return sum(map(tensor_bytes, x.values() if isinstance(x, dict) else x)) if isinstance(x, (dict, list, tuple)) else 0

    assert tensor_bytes(st["weights"]) + tensor_bytes(st["optimizer"]) == pytest.approx(d.checkpoint, rel=0.01)
    exported = sum(f.stat().st_size for n in ("lora", "lora_ema") for f in (out / n).glob("*.safetensors"))
    assert exported == pytest.approx(d.exports, rel=0.1), (exported, d.exports)

    real = shutil.disk_usage
    free = 2.6 * d.checkpoint  # the first save (1 checkpoint, then the exports: 1 more) fits, the second (2 + 1) not
    monkeypatch.setattr(tr.shutil, "disk_usage", lambda p: real(p)._replace(free=int(free)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr.Trainer(tiny_config(tmp_path / "b", *args)).close()
    warned = [r.getMessage() for r in caplog.records if "will not fit" in r.getMessage()]
    assert len(warned) == 1 and "step 2's checkpoint and exports will not fit" in warned[0], caplog.text
    assert "train.keep_checkpoints" in warned[0] and str(tmp_path / "b" / "run") in warned[0], warned[0]


def test_dry_run_says_what_the_run_writes_to_its_disk(capsys):
    from dopsd_fast.cli import train_main

    rc = train_main(["--config", "zimage-turbo-lora", "--dry-run", "--gpu", "h200", "--set", "lora.enabled=false",
                     "--set", "train.keep_checkpoints=3", "--set", "train.checkpoint_every=250"])
    out = capsys.readouterr().out
    line = next((x for x in out.splitlines() if x.startswith("disk: ")), "")
    # the released Z-Image-Turbo's 6.15 B parameters: 16 bytes each per checkpoint, 2 x 2 bytes exported
    assert rc == 0 and "checkpoints of 98.5 GB, up to 4 at once" in line and "exports 24.6 GB" in line, out
    assert "free there on this machine" in line, line


def test_dry_run_names_a_missing_wandb(monkeypatch, capsys):
    from dopsd_fast.cli import train_main

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert train_main(["--dry-run", "--set", "train.wandb=true"]) == 0
    needs = capsys.readouterr().out.split("a real run still needs:")[-1]
    assert "train.wandb: the wandb package (pip install wandb)" in needs, needs


def test_the_start_names_the_checkpoints_set_aside_and_their_size(tmp_path, caplog):
    """Checkpoints a resume moves aside (abandoned, damaged, another run's) are kept for inspection and
    deleted by no run: they stayed on the disk unseen. The start-up now names them with their bytes."""
    import logging

    from dopsd_fast.memory import fmt_bytes
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    args = ("train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=9")
    Trainer(tiny_config(tmp_path, *args)).train()
    ck = tmp_path / "run" / "checkpoints"
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):  # taken back to step 1: step 2 is set aside
        Trainer(tiny_config(tmp_path, *args), resume=str(ck / "step-0000001")).close()
    aside = ck / "step-0000002.abandoned-1"
    size = sum(f.stat().st_size for f in aside.iterdir())
    said = [r.getMessage() for r in caplog.records if "set aside (" in r.getMessage()]
    assert said == [f"{ck}/ keeps 1 folder set aside (step-0000002.abandoned-1: {fmt_bytes(size)} in all): no run "
                    "reads or deletes them; delete them when you no longer need them"], caplog.text


def test_folder_bytes_counts_regular_files_follows_no_link_and_says_none_for_a_folder_gone(tmp_path):
    """One byte count for the checkpoint log line, the resume announcement and the set-aside folders."""
    from dopsd_fast.checkpoint import folder_bytes

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"z" * 1000)
    (tmp_path / "link.bin").symlink_to(outside)  # a link's target is not the folder's bytes
    assert folder_bytes(tmp_path) == 10
    assert folder_bytes(tmp_path, recursive=True) == 15
    assert folder_bytes(tmp_path / "gone") is None and folder_bytes(tmp_path / "gone", recursive=True) is None
