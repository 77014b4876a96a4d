"""benchmarks/step_time.py: the CPU default runs and reports PASS; GPU presets exit clearly on the
CPU; the parity verdict fails when the fast path is wrong."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_time.py"


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_default_cpu_run_passes(tmp_path):
    rows = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2", "--warmup", "1", "--parity-steps", "2",
                        "--ablation", "--out", str(tmp_path), "--rows", str(rows)], capture_output=True, text=True,
                       env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "verdict: PASS" in r.stdout
    res = json.loads((tmp_path / "step_time-tiny.json").read_text())
    # one workload line, the processor named, every figure labelled, no memory figure on the CPU
    assert "workload: Z-Image tiny (" in r.stdout and "K = 4" in r.stdout and "LoRA rank" in r.stdout, r.stdout
    assert "tokens per sample: student" in r.stdout
    assert res["env"]["device"].startswith("cpu (") and res["env"]["device"] != "cpu ()", res["env"]
    assert "median_s [CPU]" in r.stdout and "[estimate]" in r.stdout and "peak_memory_gb" not in r.stdout
    assert "peak memory fast / eager" not in r.stdout and "memory not measured on the CPU" in r.stdout
    assert res["verdict"] == "PASS" and res["parity"]["gradients"]["n_tensors"] > 0
    assert len(res["parity"]["velocities"]) == 2 * 4  # K = 4 states, both branches
    assert [a["path"] for a in res["ablation"]][:2] == ["eager reference", "+ packed pass (eager ops)"]
    for key in ("median_s", "min_s", "max_s", "samples_per_s", "peak_memory_gb", "executed_tflop"):
        assert res["eager"][key] > 0 and res["fast"][key] > 0
    # every result is flushed as a row as soon as it is measured (a run cut short still reports)
    kinds = [json.loads(line)["kind"] for line in rows.read_text().splitlines()]
    assert kinds[:4] == ["flops", "parity", "time", "time"] and kinds.count("ablation") == len(res["ablation"])


def test_gpu_presets_exit_clearly_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the presets run instead of exiting")
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


def test_floor_flops_match_the_spec():
    """performance.md: Z-Image-Turbo at 1024^2, student caption 512, teacher context 1024, LoRA r64:
    student forward 63.9 TFLOP, teacher forward 72.2, student backward (dX only) 80.7 per state,
    ~867 per step at K = 4; full fine-tuning adds the weight gradients."""
    from dopsd_fast import memory
    from dopsd_fast.families import ZIMAGE

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.pop(0)
    cfg = step_time.ZIMAGE_RELEASED
    f_s = ZIMAGE.forward_flops(cfg, 4096, [512], 64)
    f_t = ZIMAGE.forward_flops(cfg, 4096, [1024], 64)
    lora = f_s[0] - ZIMAGE.forward_flops(cfg, 4096, [512])[0]
    bwd = memory.backward_flops(f_s, True, lora)
    assert abs(sum(f_s) / 1e12 - 63.9) < 0.1 and abs(sum(f_t) / 1e12 - 72.2) < 0.1 and abs(bwd / 1e12 - 80.7) < 0.1
    assert abs(4 * (sum(f_s) + sum(f_t) + bwd) / 1e12 - 867) < 1
    full = memory.backward_flops(ZIMAGE.forward_flops(cfg, 4096, [512]), False)
    assert full > 1.6 * bwd  # dX + dW of every GEMM


def test_restore_resets_the_full_finetuning_teacher():
    """Full fine-tuning: restoring a snapshot puts the EMA back into the teacher module the forward
    reads (before, parity runs after the first started from a stale teacher)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.pop(0)
    bench = step_time.Bench(step_time.parse(["--lora-rank", "0", "--parity-steps", "1"]))
    mod = dict(bench.weights.teacher_module.named_parameters())
    before = {n: p.detach().clone() for n, p in mod.items()}
    snap = bench.snapshot()
    bench.step(bench.eager_rollout)
    assert any(not torch.equal(before[n], p) for n, p in mod.items()), "the EMA update moved the teacher"
    bench.restore(snap)
    for n, p in mod.items():
        assert torch.equal(p, before[n]), n


def test_print_table_labels_every_figure_and_shows_memory_only_on_a_gpu(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.pop(0)
    row = {"path": "fast", "median_s": 1.95, "min_s": 1.9, "max_s": 2.0, "samples_per_s": 0.5,
           "peak_memory_gb": 41.3, "executed_tflop": 866.9, "mfu_floor": 0.45, "mfu_executed": 0.45}
    par = {"velocities": [{"rel_err_fast": 1e-3, "rel_err_eager": 1e-3}], "loss": {"rel_err_fast": 1e-4},
           "gradients": {"global_rel_err_fast": 1e-2, "min_cos_fast": 0.9998},
           "weights_after_steps": {"steps": 3, "rel_err": 1e-3}, "verdict": "PASS",
           "tolerances": {"rule": "2x eager + atol", "atol": 1e-3}}
    res = {"env": {"device": "NVIDIA H200", "torch": "2", "cuda": "13.0"}, "workload": "Z-Image zimage-6b (...)",
           "floor_tflop_per_step": 866.9, "timed": {"fast": row, "eager": dict(row, path="eager")}, "speedup": 1.95,
           "memory_ratio": 2.0, "memory_model": {"weights_gb": 13.6, "predicted_peak_beyond_weights_gb": {"fast": 25.0}},
           "parity": par}
    step_time.print_table(res)
    gpu = capsys.readouterr().out
    assert "peak_memory_gb [GPU]" in gpu and "median_s [GPU]" in gpu and "[estimate]" in gpu
    assert "peak memory fast / eager [GPU]" in gpu and "workload: Z-Image zimage-6b" in gpu
    res["env"] = {"device": "cpu (" + step_time.cpu_name() + ")", "torch": "2"}
    step_time.print_table(res)
    cpu = capsys.readouterr().out
    assert "peak_memory_gb" not in cpu and "median_s [CPU]" in cpu and "not performance results" in cpu
    assert step_time.cpu_name().strip()
