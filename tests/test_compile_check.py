"""The Hopper compile gate (benchmarks/compile_check.py) catches what it claims to catch. CI runs the
gate itself on every change (with CI's triton and with triton 3.6); these tests check its mechanics.
The gate compiles, so it runs in a subprocess without TRITON_INTERPRET (set for this suite)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "benchmarks" / "compile_check.py"


def _run(*args, code=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(GATE), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_gate_flags_a_front_end_error_and_a_bf16_spill():
    res = _run("--selftest")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "front-end type error caught: True; bf16 spill flagged: True" in res.stdout


def test_every_entry_kernel_must_be_launched(tmp_path):
    """With no scenario at all, every entry kernel of dopsd_fast.kernels is reported as unlaunched and
    the gate fails; helpers called from other kernels (mma, _load_rows, ...) are not entry kernels."""
    out = tmp_path / "gate.json"
    code = (f"import sys; sys.path.insert(0, {str(GATE.parent)!r}); import compile_check as cc; "
            f"cc.SCENARIOS.clear(); sys.exit(cc.main(['--json', {str(out)!r}]))")
    res = _run(code=code)
    assert res.returncode == 1, res.stdout + res.stderr
    failures = json.loads(out.read_text())["failures"]
    names = {f.split("entry kernel ")[1].split(" ")[0].rsplit(".", 1)[1] for f in failures if "entry kernel" in f}
    assert {"_fwd_kernel", "_dkdv_kernel", "_dq_kernel", "_gemm_kernel", "_swiglu_fwd_kernel",
            "_rope_qk_bwd_kernel", "_norm_mod_bwd_kernel", "_gated_fwd_kernel"} <= names
    assert not names & {"mma", "_load_rows", "_attend", "_fwd_branch", "_dkdv_tile", "_tanh", "_fwd_one", "_sample",
                         "_gate_act"}
