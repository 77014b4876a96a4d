"""benchmarks/gpu_check.sh as a GPU machine with no network would run it, here on the CPU: one call, a
global budget, exactly three files in the output folder (two when the install fails), stages that stop at
"no GPU", and a stage that overruns the budget cut and reported with the rows it had written."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import cpu_rowwise_scaled_mm

ROOT = Path(__file__).resolve().parents[1]
# Two tests expect the real check to stop at "no GPU". On a GPU machine it would run every stage instead (a
# 540 s budget against the 300 s subprocess timeout, whose kill leaves the stage process running on the GPU).
NO_GPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="expects the check to stop at 'no GPU'; on a "
                                 "GPU machine run benchmarks/gpu_check.sh itself")


def _run(out, *args, **env_over):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable, **env_over)  # the tests' Python (python3 on PATH may be another)
    t0 = time.time()
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    return r, time.time() - t0


def _wheel(folder: Path, name: str, code: str) -> Path:
    """A minimal valid wheel holding one module ``name`` (for the offline install step)."""
    import base64
    import hashlib
    import zipfile

    def record(path, data):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}.py": code.encode(),
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-1.0.dist-info/RECORD",
                   "\n".join([record(p, d) for p, d in files.items()] + [f"{name}-1.0.dist-info/RECORD,,"]) + "\n")
    return whl


@NO_GPU_ONLY
def test_cpu_run_stops_at_no_gpu_with_three_files(tmp_path):
    r, took = _run(tmp_path, GIT_COMMIT="abc123")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs.txt", "report.md", "results.json"]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["verdict"] == "NO GPU" and res["meta"]["git_commit"] == "abc123"
    status = {t["stage"]: t["status"] for t in res["timeline"]}
    assert status["smoke"].startswith("no GPU") and all(status[s] == "not run: no gpu" for s in ("m1", "m2", "m3", "step"))
    assert all(row["git_commit"] == "abc123" and row["torch"] for row in res["rows"])
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# GPU check: NO GPU") and "| m1 |" in report
    assert took < 120


def test_overrunning_stage_is_cut_by_the_budget_and_reported(tmp_path):
    # 45 s: the report's 10 s reserve, a first stage that needs 15 s left to start, and up to 20 s for
    # the start-up (the import check loads torch and triton: seconds on a busy machine); the overrunning
    # stage gets what is left and is cut, and the third finds nothing left
    r, took = _run(tmp_path, GPU_CHECK_STAGES="selftest-ok,selftest-overrun,selftest-ok", BUDGET_S="45")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert took < 45 + 5, f"the call took {took:.0f} s against a 45 s budget"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs.txt", "report.md", "results.json"]
    logs = (tmp_path / "logs.txt").read_text()  # every stage's log comes back, the cut one's too
    assert "===== stage selftest-ok: ok" in logs and "===== stage selftest-overrun: cut after" in logs, logs
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["verdict"] == "INCOMPLETE (budget)"
    tl = res["timeline"]
    assert [t["stage"] for t in tl] == ["selftest-ok", "selftest-overrun", "selftest-ok"]
    assert tl[0]["status"] == "ok"
    assert tl[1]["status"].startswith("cut after") and "budget" in tl[1]["status"]
    assert tl[2]["status"] == "not started: budget spent"
    whats = [row.get("what", "") for row in res["rows"]]
    assert any("before the cut" in w for w in whats), "the overrunning stage's rows are kept"
    assert "cut after" in (tmp_path / "report.md").read_text()


@NO_GPU_ONLY
def test_install_step_works_offline_from_the_checkout(tmp_path):
    """No package index (PIP_NO_INDEX=1), no install of dopsd-fast: an extra wheel installs into a private
    temporary folder, the stages import it and the checkout's dopsd_fast (the smoke stage imports the
    kernels and stops at "no GPU" here), and no fixed path such as /tmp/site is used."""
    _wheel(tmp_path / "wheels", "gpu_check_probe", "MARK = 'carried'\n")
    out = tmp_path / "out"
    # the checkout is not on PYTHONPATH (it imports as-is); what else the environment puts there stays (an image
    # without diffusers carries its wheel on PYTHONPATH, as gpu_check.sh does, and the import check needs it)
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    r, _ = _run(out, "--wheels", str(tmp_path / "wheels"), "--budget", "120", GIT_COMMIT="abc123",
                PIP_NO_INDEX="1", PYTHONPATH=os.pathsep.join(keep))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ready" in r.stdout and "/tmp/site" not in (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["verdict"] == "NO GPU", res["meta"]
    env_row = next(x for x in res["rows"] if x["kind"] == "env")
    assert env_row["carried"] == {"gpu_check_probe": "1.0"}, env_row
    assert env_row["dopsd_fast_from"] == str(ROOT / "dopsd_fast"), env_row  # the checkout, as-is


def test_failed_wheel_install_stops_at_once(tmp_path):
    bad = tmp_path / "wheels" / "not_a_wheel-0.0.0-py3-none-any.whl"
    bad.parent.mkdir()
    bad.write_text("this is not a zip file")
    r, took = _run(tmp_path / "out", "--wheels", str(bad.parent))
    tmp_path = tmp_path / "out"
    assert r.returncode == 1 and "carried wheels" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["report.md", "results.json"]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["verdict"] == "INSTALL FAILED"


def test_default_plan_fits_the_budget():
    """The default stages' caps, the report reserve and a few seconds of start-up fit 540 s."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gc
    spec.loader.exec_module(gc)
    stages = gc.DEFAULT_STAGES.split(",")
    assert stages[:4] == ["smoke", "step", "fp8", "tests"], "the most valuable stages first"
    table, total = gc.plan_table(stages, 540, spent=5)
    assert total <= 540 and "fits" in table, table


def test_dry_run_of_the_default_command_on_the_cpu(tmp_path):
    """`gpu_check.sh --dry-run`: every default stage at toy shapes on the CPU (kernels through the
    interpreter), each within its cap, the per-stage budget table printed first. Nothing here is a
    measurement: it checks the code before GPU time is spent."""
    r, took = _run(tmp_path, "--dry-run", "--budget", "540", GIT_COMMIT="abc123")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| stage | cap s | ends by s | what |" in r.stdout and "fits" in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["dry_run"] and res["meta"]["verdict"] == "PASS", res["timeline"]
    assert [t["stage"] for t in res["timeline"]] == ["smoke", "step", "fp8", "tests", "m1", "m3", "m2"]
    assert all(t["status"] == "ok" for t in res["timeline"]), res["timeline"]
    rows = res["rows"]
    attn = [x for x in rows if x["kind"] == "attention" and "error" not in x]
    assert {x["variant"] for x in attn} >= {"ours: both branches, one launch", "ours: two single calls",
                                            "SDPA flash (two calls)"}
    assert all(x["parity_ok"] for x in attn)
    ragged = {x["backend"]: x for x in rows if x["kind"] == "attention_ragged"}
    assert set(ragged) == {"cudnn", "sdpa"} and all(x["parity_ok"] for x in ragged.values())
    assert ragged["cudnn"]["jagged_on_cudnn"] is False  # no cuDNN on the CPU: the fallback ran, and says so
    fusion = [x for x in rows if x["kind"] == "fusion"]  # a residual + next norm, fused beside unfused, per family
    assert [(x["family"], x["variant"].split(":")[0]) for x in fusion] == [
        (f, v) for f in ("zimage", "klein-4b") for v in ("fused", "unfused", "parity")], fusion
    assert all(x["parity_ok"] for x in fusion if "parity" in x["variant"]), fusion
    rates = [x for x in rows if x["kind"] == "gemm_rate"]  # plain cuBLAS GEMMs, both weight layouts
    assert [x["layout"] for x in rates] == ["x W^T", "x Wt"] and all(x["tflops"] > 0 for x in rates), rates
    lin = [x for x in rows if x["kind"] == "paired_linear"]
    # 3 shapes x 5 forms, each beside the others (of the candidates, the TMA kernel: the interpreter has its own tiles)
    assert len(lin) == 15 and all(x["parity_ok"] for x in lin)
    assert {x["variant"] for x in lin} == {"ours: Triton paired GEMM", "ours: Triton paired GEMM, TMA persistent",
                                          "ours: paired on cuBLAS, delta first",
                                          "cuBLAS, delta after the base GEMM (earlier form, autograd's backward)",
                                          "two cuBLAS LoRA layers"}
    steps = [x for x in rows if x["kind"] == "step_regions"]
    assert len(steps) == 6 and all(x["forward: student + teacher (packed) [s]"] > 0 for x in steps)
    parity = [x for x in rows if x.get("stage") == "step_time" and x["kind"] == "parity"]
    assert len(parity) == 2 and all(p["verdict"] == "PASS" for p in parity)  # bf16 step and FP8 (SQNR)
    assert "min_velocity_sqnr_db_student" not in parity[0]  # the bf16 step: no SQNR
    assert all(parity[1][f"min_velocity_sqnr_db_{br}"] >= 20.0 for br in ("student", "teacher")), parity[1]
    fp8 = [x for x in rows if x["kind"] == "fp8_gemm"]  # torch._scaled_mm beside mm at the dry run's shapes
    if not cpu_rowwise_scaled_mm():  # torch < 2.13 on the CPU (the GPU image's 2.11): the rows say why, no error
        assert [(x["dgrad"], "no rowwise scales" in x.get("skipped", "")) for x in fp8] == [(False, True), (True, True)], fp8
    else:
        assert len(fp8) == 2 and all("error" not in x and x["rowwise_ms"] > 0 and x["bf16_ms"] > 0 for x in fp8), fp8
        # the forward's shape also with fast accumulation, as the fast path's forward runs _scaled_mm; not the dX's
        assert [(x["dgrad"], x.get("rowwise_fast_ms", 0) > 0, x.get("tensorwise_fast_ms", 0) > 0) for x in fp8] == [
            (False, True, True), (True, False, False)], fp8
        # with the LoRA delta: the cuBLAS form beside ours (the TMA kernel, one pass), ours within parity
        assert all("ours_error" not in x and x["ours_parity_ok"] and x["ours_rowwise_delta_ms"] > 0 for x in fp8), fp8
    timed = [x["path"] for x in rows if x.get("stage") == "step_time" and x["kind"] == "time"]
    assert timed == ["eager reference (checkpointed)", "eager reference (no checkpointing)", "fast",
                     "fast (bf16)", "fast (FP8 native)",
                     "fast (FP8 native, forward GEMMs only: dX in bf16)"], timed
    tests = {x["what"]: x for x in rows if x["kind"] == "kernel_tests"}
    assert list(tests) == ["CUDA-graph capture", "kernel tests, short form"]
    short = tests["kernel tests, short form"]["summary"]  # the dry run collects the selection, runs none of it
    assert all(x["exit_code"] == 0 for x in tests.values()) and "deselected" in short and " collected" in short, short
