"""benchmarks/step_time.py: the CPU default runs and reports PASS; GPU presets exit clearly on the
CPU; the parity verdict fails when the fast path is wrong."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_time.py"


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_default_cpu_run_passes(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2", "--warmup", "1", "--parity-steps", "2",
                        "--ablation", "--out", str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "verdict: PASS" in r.stdout
    res = json.loads((tmp_path / "step_time-tiny.json").read_text())
    assert res["verdict"] == "PASS" and res["parity"]["gradients"]["n_tensors"] > 0
    assert len(res["parity"]["velocities"]) == 2 * 4  # K = 4 states, both branches
    assert [a["path"] for a in res["ablation"]][:2] == ["eager reference", "+ packed pass (eager ops)"]
    for key in ("median_s", "min_s", "max_s", "samples_per_s", "peak_memory_gb"):
        assert res["eager"][key] > 0 and res["fast"][key] > 0


def test_gpu_presets_exit_clearly_on_cpu():
    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "zimage-6b"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "klein-4b"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


def test_tiny_klein_preset_passes(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny-klein", "--steps", "1", "--warmup", "0",
                        "--parity-steps", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=_env(),
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "step_time-tiny-klein.json").read_text())
    assert res["verdict"] == "PASS" and res["parity"]["gradients"]["min_cos_fast"] > 0.9999


def test_parity_verdict_fails_for_a_wrong_fast_path():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.pop(0)
    bench = step_time.Bench(step_time.parse(["--parity-steps", "1"]))

    def wrong():  # the eager path on slightly different noise: every velocity moves
        saved = bench.noise
        bench.noise = saved * 1.01
        try:
            return bench.eager_rollout()
        finally:
            bench.noise = saved

    assert step_time.parity(bench, wrong, fp8=False)["verdict"] == "FAIL"
    assert step_time.parity(bench, lambda: bench.fast_rollout("off"), fp8=False)["verdict"] == "PASS"
