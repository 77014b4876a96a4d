"""Shared harness of the kernel benchmarks: GPU check, environment record, median timings through
``triton.testing.do_bench``, a parity check before any timing, and JSON/CSV rows.

Every number these scripts print was measured by them on the GPU named in the row; nothing is
estimated. On a machine without a CUDA GPU they stop with exit code 2 and say so.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[2]))

NO_GPU_EXIT = 2
SMOKE = False  # --smoke: tiny shapes on the CPU through Triton's interpreter; checks the script, measures nothing
DEVICE = "cuda"


def setup(args, name: str) -> str:
    """GPU check (or smoke mode); returns the device to put tensors on."""
    global SMOKE, DEVICE
    if getattr(args, "smoke", False):
        SMOKE, DEVICE = True, "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        return DEVICE
    require_cuda(name)
    return DEVICE


def pick(shapes, smoke_shapes, quick: bool):
    return smoke_shapes if SMOKE else (shapes[:1] if quick else shapes)


def require_cuda(name: str) -> None:
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(f"{name}: TRITON_INTERPRET=1 is set; benchmarks need the compiled kernels on a GPU (unset it).")
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA GPU on this machine; the kernel benchmarks time Triton kernels on a GPU only "
              "(kernel numerics are checked on the CPU by `pytest tests/kernels`).", file=sys.stderr)
        sys.exit(NO_GPU_EXIT)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "kernels"),
                   help="folder for the JSON/CSV rows (default: benchmarks/results/kernels)")
    p.add_argument("--quick", action="store_true", help="first shape only")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU under TRITON_INTERPRET=1: exercises the script, times nothing real")
    return p


def environment() -> dict:
    import torch
    import triton

    if SMOKE:
        return {"device": "cpu-smoke (not a measurement)", "torch": torch.__version__, "triton": triton.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - the record says unknown rather than failing the run
        driver = "unknown"
    return {"device": props.name, "sm": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time): the roofline the
    elementwise/norm kernels are held to (target >= 75% of it)."""
    import torch

    nbytes = 1 << 16 if SMOKE else nbytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def parity(name: str, fast, ref, atol: float, rtol: float = 0.0) -> dict:
    """Max abs error of the fast output vs the eager one; raises if outside atol + rtol * |ref|."""
    import torch

    fast, ref = fast.float(), ref.float()
    err = (fast - ref).abs()
    bad = err > atol + rtol * ref.abs()
    if bad.any() or not torch.isfinite(fast).all():
        raise AssertionError(f"{name}: parity failed, max abs err {err.max().item():.3g} (atol {atol}, rtol {rtol})")
    return {"parity_max_abs_err": float(err.max().item())}


def write(rows: list[dict], bench: str, out: str) -> None:
    env = environment()
    rows = [{**env, "bench": bench, **r} for r in rows]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cpu-smoke" if SMOKE else re.sub(r"[^A-Za-z0-9_.-]+", "_", env["device"]).strip("_")
    (out_dir / f"{bench}-{tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / f"{bench}-{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    show = [k for k in keys if k not in env]
    print(f"# {bench} on {env['device']} (driver {env.get('driver', '-')}, torch {env['torch']}, "
          f"CUDA {env.get('cuda', '-')}, triton {env['triton']})")
    print(" | ".join(show))
    for r in rows:
        print(" | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in show))
    print(f"-> {out_dir / f'{bench}-{tag}.json'}")
