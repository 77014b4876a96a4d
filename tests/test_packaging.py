"""The wheel built from the source tree holds every module and shipped recipe, installs on its own
(not editable), and runs the fast path from the installed copy."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path) -> Path:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("dopsd_fast-*.whl")
    return whl


def test_wheel_files_match_the_tree_and_run_the_fast_path(tmp_path):
    whl = _build_wheel(tmp_path)
    names = {n for n in zipfile.ZipFile(whl).namelist() if ".dist-info/" not in n}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "dopsd_fast").rglob("*.py")}
    expected |= {f"dopsd_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected |= {f"dopsd_fast/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "dopsd_fast" / "toy" / "weights").iterdir()
                 if p.suffix in (".safetensors", ".json")}  # the toy model (package data)
    assert names == expected, f"missing {sorted(expected - names)}, extra {sorted(names - expected)}"
    assert not any(n.startswith("kernels/") for n in names), "no top-level kernels package (Hugging Face's name)"

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # from a folder outside the checkout, with only the installed copy of dopsd_fast importable first
    code = (
        "import json, sys, dopsd_fast, dopsd_fast.models.zimage, dopsd_fast.kernels.attention\n"
        f"assert dopsd_fast.__file__.startswith({str(site)!r}), dopsd_fast.__file__\n"
        "from dopsd_fast.config import load_config\n"
        "from dopsd_fast.trainer import Trainer\n"
        "cfg = load_config('tiny-zimage', ['fast.enabled=true', 'train.max_steps=1', 'train.progress=false',\n"
        "    'train.tensorboard=false', 'validation.at_start=false', 'validation.every=0',\n"
        f"    'train.checkpoint_every=0', 'train.output_dir={tmp_path / 'run'}'])\n"
        "tr = Trainer(cfg)\n"
        "m = tr.train_step()\n"
        "print(json.dumps({'loss': m['loss'], 'fast': type(tr.pair.model).__name__}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(site)
    env["DOPSD_FAST_HOME"] = str(tmp_path / "home")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["fast"] == "FastZImage" and out["loss"] > 0
