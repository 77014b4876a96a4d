"""dopsd-train --dry-run: on the tiny default, and on real-size configs whose model directory holds
only the config files (the architecture is built on the meta device; no weight is read)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from dopsd_fast.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


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
    for extra in ((), ("--config", "tiny-zimage")):  # the default run (the toy), the tiny random preset
        r = _run("--dry-run", *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "config: valid" in r.stdout and "-> FITS" in r.stdout and "predicted peak" in r.stdout


def test_dry_run_real_size_zimage_picks_stepwise_on_an_h100(tmp_path):
    model = _config_only_dir(tmp_path, "zimage")
    jl = _data(tmp_path)
    common = ["--config", "zimage-turbo-lora", "--set", f"model.path={model}", "--set", f"data.jsonl={jl}",
              "--set", "data.builtin=null"]
    r = _run("--dry-run", "--gpu", "h100", *common, "--set", f"cache.dir={tmp_path / 'nocache'}")
    assert r.returncode == 1 and "feature cache" in r.stderr and "run dopsd-cache first" in r.stderr, r.stderr
    common += ["--set", "cache.dir=null"]
    r = _run("--dry-run", "--gpu", "h100", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backward stepwise (auto)" in r.stdout, r.stdout  # K = 4 states of activations do not fit 80 GB
    assert "-> FITS" in r.stdout and "4608 student / 5120 teacher tokens" in r.stdout
    # the authors' explicit `once` on an H100 without checkpointing does not fit, and says what would
    r = _run("--dry-run", "--gpu", "h100", *common, "--set", "dopsd.backward=once", "--set", "fast.checkpoint=none")
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
