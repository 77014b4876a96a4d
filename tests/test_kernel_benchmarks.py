"""The kernel benchmark scripts: a clear exit without a GPU, and a smoke run of every script on tiny
shapes through the interpreter (checks the script and its parity gate; it measures nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks" / "kernels").glob("bench_*.py"))
EXPECTED = {"attention", "rope_qk_norm", "norm_modulation", "swiglu", "multi_lora", "fp8_quant"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def test_every_kernel_has_a_benchmark():
    assert {p.stem.removeprefix("bench_") for p in SCRIPTS} == EXPECTED


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_smoke_run_and_no_gpu_exit(script, tmp_path):
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    name = script.stem.removeprefix("bench_")
    rows = json.loads((tmp_path / f"{name}-cpu-smoke.json").read_text())
    timed = [row for row in rows if "parity_max_abs_err" in row]
    assert timed and all(row["device"].startswith("cpu-smoke") for row in rows)
    assert (tmp_path / f"{name}-cpu-smoke.csv").read_text().startswith("device,")
    if sys.platform.startswith("linux") and not os.path.exists("/dev/nvidia0"):
        r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "gpu")], capture_output=True, text=True,
                           env=_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr, (r.returncode, r.stderr[-2000:])
        assert not (tmp_path / "gpu").exists()
