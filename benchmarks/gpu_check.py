"""The GPU check: one command, one global time budget, three files out.

Made for a GPU machine held for a short time, possibly without network: one call
(``bash benchmarks/gpu_check.sh [--out DIR] [--budget S] [--wheels DIR]``, which installs any extra
wheels and runs this driver from the checkout) that ends by itself within its budget (540 s by
default, counted from the start of the call, wheel install included), and exactly three files in the
output folder:
``results.json`` (every row, each with the git commit, GPU, driver and versions), ``report.md`` and
``logs.txt`` (each stage's log, its end: a failure's whole text). The first two are rewritten after every
stage (the log appended), and every stage appends its rows to a JSONL file as it
measures them, so a stage cut by the budget still reports what it had.

Stages, in the order of the questions they answer (each in its own process, under
``min(its cap, what is left of the budget)``):

* ``smoke``: imports, the GPU, one tiny compile + launch of our kernels with a parity
  check. No GPU: the run stops here and says so. Smoke failure: the run stops with the error.
* ``m1`` attention at Z-Image-Turbo's workload (student 4608 / teacher 5120 tokens, 30 x 128 heads,
  bf16), forward and student backward: ours (both branches in one launch, and two single calls) vs
  PyTorch SDPA (flash, cuDNN); TFLOP/s.
* ``m2`` the paired LoRA linear forward + backward at 3840->3840, 3840->10240, 10240->3840 with
  4608 + 5120 rows, rank 64: ours (Triton, and the stacked algorithm on cuBLAS) vs two cuBLAS
  LoRA layers, and a device copy of the same bytes as the bandwidth ceiling; the backward timed
  alone, as GPU time and per call with the host's time beside it.
* ``m3`` one fast D-OPSD step at the real workload (Z-Image-Turbo size, LoRA r64, 1024^2, K = 4,
  captions 512 / 1024, stepwise backward, no checkpointing): time per region (CUDA events) and
  peak memory.
* ``step`` eager vs fast at zimage-6b (``step_time.py``) with its parity verdict.
* ``tests``: the CUDA-graph capture tests, then the kernel parity tests with the compiled kernels on the GPU.

    python benchmarks/gpu_check.py --out DIR [--budget 540] [--stages smoke,m1,m2,m3,step]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = {  # name -> (cap in seconds, what it answers); the default order is the most valuable first
    "smoke": (35, "imports, GPU, one compile + launch + parity check"),
    "step": (145, "zimage-6b step, default attention (auto: cuDNN on H100/H200), 5 measured steps: eager "
                  "checkpointed and un-checkpointed (stepwise) vs fast, bf16 parity (step_time.py)"),
    "fp8": (95, "FP8 GEMMs (torch._scaled_mm) vs bf16 at the step's shapes; zimage-6b step with fast.fp8=native "
                "beside the bf16 fast path and FP8 without FP8 dX; SQNR parity vs bf16 eager"),
    "tests": (105, "kernel tests, short form on the GPU: CUDA-graph capture first (-x -v), then one case per "
                   "kernel and dtype"),
    "m1": (35, "attention fwd + bwd at the Z-Image workload: ours vs SDPA flash / cuDNN; a ragged batch "
               "through the cudnn / sdpa backends; a residual + next norm fused vs unfused"),
    "m3": (50, "one fast step at the real workload, default attention: time per region, peak memory"),
    "m2": (40, "cuBLAS bf16 GEMM rates (layouts, packed rows, grouped); paired LoRA linear fwd + bwd: ours "
               "(128 x 128 tiles; candidates: 128 x 256 tiles, the TMA kernel) vs cuBLAS; device copy ceiling; "
               "the backward alone: GPU time, per call, host"),
    # used by the tests only: a stage that ends, and one that overruns its budget
    "selftest-ok": (30, "test stage: writes one row"),
    "selftest-overrun": (600, "test stage: sleeps past any budget"),
}
DEFAULT_STAGES = "smoke,step,fp8,tests,m1,m3,m2"
REPORT_RESERVE_S = 10  # kept back from the budget to write the report
MIN_STAGE_S = 15  # a stage with less time than this left is not started
NO_GPU_EXIT = 3
# GPU_CHECK_DRYRUN=1: the measuring stages at toy shapes on the CPU (kernels through the
# interpreter, wall-clock timers): checks the stages' code before any GPU time is spent; measures nothing.
DRY = os.environ.get("GPU_CHECK_DRYRUN") == "1"
# The dry run's time limits: the GPU plan's caps and budget times this (the CPU runs the kernels through
# Triton's interpreter; the dry run checks the code and the plan's table, it measures nothing).
DRY_TIME_SCALE = 3
M3_STEPS = 5  # measured steps of m3 after its compile step (one warm step is too noisy to calibrate on)
DEV = "cpu" if DRY else "cuda"


# ---- rows ---------------------------------------------------------------------------------------
class Rows:
    """Append-only JSONL, one row per line, flushed at once (a killed stage keeps its rows)."""

    def __init__(self, path: str, stage: str):
        self.path, self.stage = path, stage

    def add(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": self.stage, **row}, default=str) + "\n")
            f.flush()
        print(f"[{self.stage}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)


def _fmt(v):
    """A table cell: one line, no column separators (an error's text may hold both)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v).replace("\n", " ").replace("|", "/")


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: skip it, keep the rest
            continue
    return out


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10)
        if c.returncode == 0:
            return c.stdout.strip() + ("-dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (pass GIT_COMMIT=...)"


# ---- stages (each runs in its own process) ------------------------------------------------------
def _median_ms(fn, rep=30):
    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


class _WallEvent:
    """torch.cuda.Event's timing interface on the wall clock (dry run only)."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _event():
    import torch

    return _WallEvent() if DRY else torch.cuda.Event(enable_timing=True)


def _sync():
    import torch

    if not DRY:
        torch.cuda.synchronize()


def _carried_packages() -> dict:
    """The extra wheels gpu_check.sh installed (GPU_CHECK_CARRIED: its private folder): name -> version,
    each checked to import from that folder."""
    folder = os.environ.get("GPU_CHECK_CARRIED")
    if not folder or not Path(folder).is_dir():
        return {}
    out = {}
    for info in sorted(Path(folder).glob("*.dist-info")):
        name, version = info.name[: -len(".dist-info")].rsplit("-", 1)
        top = (info / "top_level.txt").read_text().split() if (info / "top_level.txt").is_file() else [name]
        spec = importlib.util.find_spec(top[0])
        where = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
        out[name] = version if where and str(where).startswith(folder) else f"{version}, not imported from {folder}"
    return out


def stage_smoke(rows: Rows) -> int:
    import torch
    import triton

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "python": platform.python_version()}
    for name in ("diffusers", "transformers", "peft"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - the report names what is missing
            env[name] = f"missing: {type(exc).__name__}: {exc}"
    import dopsd_fast  # the package imports (no CUDA touched at import)

    env["dopsd_fast"] = getattr(dopsd_fast, "__version__", "imported")
    env["dopsd_fast_from"] = str(Path(dopsd_fast.__file__).parent)
    env["carried"] = _carried_packages()

    if DRY:  # the CPU dry run: the kernels through the interpreter, nothing measured
        rows.add(kind="env", status="CPU dry run", **env)
    elif not torch.cuda.is_available():
        rows.add(kind="env", status="no GPU", **env)
        return NO_GPU_EXIT
    else:
        props = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            driver = "unknown"
        rows.add(kind="env", status="ok", gpu=props.name, sm=f"{props.major}.{props.minor}",
                 memory_gib=round(props.total_memory / 2**30, 1), driver=driver, **env)
    # one tiny compile + launch of each kernel family the step uses, checked against its reference
    from dopsd_fast.kernels.attention import attention_varlen_ref, dual_branch_attention
    from dopsd_fast.kernels.swiglu import swiglu, swiglu_ref

    torch.manual_seed(0)
    a, b = (torch.randn(257, 320, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    t0 = time.time()
    want = swiglu_ref(a, b).float()
    err = (swiglu(a, b).float() - want).abs().max().item()
    swiglu_ok = err <= 1e-2 * want.abs().max().item()  # relative: one bf16 step at |y| ~ 10 is 0.06
    rows.add(kind="smoke", what="swiglu compile+launch", seconds=time.time() - t0, max_abs_err=err,
             ok=swiglu_ok)
    q, k, v = (torch.randn(300, 2, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 300], dtype=torch.int32, device=DEV)
    e = k[:0]
    z = torch.zeros_like(cu)
    t0 = time.time()
    o_s, _, o_t, _ = dual_branch_attention(q, q, (e, e, z), (k, v, cu), (k, v, cu), cu, cu)
    ref, _ = attention_varlen_ref(q.float(), k.float(), v.float(), cu, cu)
    err = max((o_s.float() - ref).abs().max().item(), (o_t.float() - ref).abs().max().item())
    _sync()
    rows.add(kind="smoke", what="dual-branch attention compile+launch", seconds=time.time() - t0, max_abs_err=err,
             ok=err < 2e-2)
    missing = [n for n in ("diffusers", "transformers", "peft") if str(env[n]).startswith("missing")]
    return 0 if swiglu_ok and err < 2e-2 and not missing else 1


def stage_m1(rows: Rows) -> int:
    """Attention at the Z-Image workload: TFLOP/s of ours (dual, two single calls) and SDPA."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dopsd_fast.kernels.attention import dual_branch_attention, flash_attn_varlen

    H, D, Ts, Tt = (2, 32, 40, 56) if DRY else (30, 128, 4608, 5120)
    dev, bf = DEV, torch.bfloat16
    torch.manual_seed(0)
    qs, ks, vs = (torch.randn(Ts, H, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
    qt, kt, vt = (torch.randn(Tt, H, D, device=dev, dtype=bf) for _ in range(3))
    cu_s = torch.tensor([0, Ts], dtype=torch.int32, device=dev)
    cu_t = torch.tensor([0, Tt], dtype=torch.int32, device=dev)
    e, z = ks[:0].detach(), torch.zeros_like(cu_s)
    do = torch.randn(Ts, H, D, device=dev, dtype=bf)
    fl_fwd = 4 * H * D * (Ts * Ts + Tt * Tt)  # both branches
    fl_bwd = 2.5 * 4 * H * D * Ts * Ts  # the student's backward only
    grads = (qs, ks, vs)

    def ours_dual():
        return dual_branch_attention(qs, qt, (e, e, z), (ks, vs, cu_s), (kt, vt, cu_t), cu_s, cu_t,
                                     max_seqlens=(Tt, 0, Ts, Tt))[0]

    def ours_two():
        o = flash_attn_varlen(qs, ks, vs, cu_s, cu_s, max_seqlen_q=Ts, max_seqlen_k=Ts)[0]
        with torch.no_grad():
            flash_attn_varlen(qt, kt, vt, cu_t, cu_t, max_seqlen_q=Tt, max_seqlen_k=Tt)
        return o

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qs, ks, vs)))
                with torch.no_grad():
                    F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qt, kt, vt)))
            return o[0].transpose(0, 1)
        return run

    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qs, ks, vs)))[0].transpose(0, 1)
    variants = [("ours: both branches, one launch", ours_dual), ("ours: two single calls", ours_two),
                ("SDPA flash (two calls)", sdpa(SDPBackend.FLASH_ATTENTION)),
                ("SDPA cuDNN (two calls)", sdpa(SDPBackend.CUDNN_ATTENTION))]
    status = 0
    for name, fn in variants:
        try:
            with torch.no_grad():
                err = (fn().float() - ref.float()).abs().max().item()
                ms_f = _median_ms(fn)

            def fwd_bwd():
                torch.autograd.grad(fn(), grads, do)

            ms_fb = _median_ms(fwd_bwd)
            ms_b = max(ms_fb - ms_f, 1e-9)
            rows.add(kind="attention", variant=name, tokens_student=Ts, tokens_teacher=Tt, heads=H, head_dim=D,
                     fwd_ms=ms_f, fwd_tflops=fl_fwd / ms_f / 1e9, bwd_ms=ms_b, bwd_tflops=fl_bwd / ms_b / 1e9,
                     fwd_bwd_ms=ms_fb, max_abs_err_vs_sdpa_flash=err, parity_ok=err < 3e-2)
            status |= 0 if err < 3e-2 else 1
        except Exception as exc:  # noqa: BLE001 - one variant failing (e.g. cuDNN absent) is a result
            rows.add(kind="attention", variant=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return status | _ragged_attention(rows, H, D, do.dtype) | _residual_norm_fusion(rows)


def _ragged_attention(rows: Rows, H: int, D: int, dtype) -> int:
    """A ragged batch of two samples through the fast path's own attention call (``varlen_attention``):
    ``cudnn`` (cuDNN alone on the jagged batch, else PyTorch's order: which one ran is recorded) vs
    ``sdpa`` (PyTorch's order), forward and forward + backward, against per-sample attention."""
    import torch
    import torch.nn.functional as F

    from dopsd_fast.models import ops

    lens = [40, 56] if DRY else [4608, 4096]
    cu_list = [0, lens[0], sum(lens)]
    cu = torch.tensor(cu_list, dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(sum(lens), H, D, device=DEV, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    with torch.no_grad():
        ref = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0]
                         .transpose(0, 1) for a, b in zip(cu_list, cu_list[1:])]).float()
    fl_fwd = sum(4 * H * D * n * n for n in lens)
    status = 0
    for backend in ("cudnn", "sdpa"):
        try:
            def fn():
                return ops.varlen_attention(backend, q, k, v, cu, cu_list)

            with torch.no_grad():
                err = (fn().float() - ref).abs().max().item()
                ms_f = _median_ms(fn)
            ms_fb = _median_ms(lambda: torch.autograd.grad(fn(), (q, k, v), do))
            rows.add(kind="attention_ragged", backend=backend, lens=lens, heads=H, head_dim=D, fwd_ms=ms_f,
                     fwd_tflops=fl_fwd / ms_f / 1e9, fwd_bwd_ms=ms_fb, max_abs_err=err, parity_ok=err < 3e-2,
                     jagged_on_cudnn=ops.JAGGED_CUDNN if backend == "cudnn" else None)
            status |= 0 if err < 3e-2 else 1
        except Exception as exc:  # noqa: BLE001
            rows.add(kind="attention_ragged", backend=backend, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return status


def _residual_norm_fusion(rows: Rows) -> int:
    """A block's residual and the next sublayer's norm: one op (``residual_norm``) vs the unfused kernels
    it replaces (the residual, then the norm; autograd adds out's two gradients), forward and forward +
    backward on the student's rows, Z-Image's form (3840) and FLUX.2's (klein-4B, 3072); parity between
    the two and the bytes each moves per the step model's costs."""
    import torch

    from dopsd_fast.models.ops import FusedOps

    M = 40 if DRY else 4608
    fused, unfused = FusedOps(), FusedOps()
    unfused.fuse_residual_norm = False
    status = 0
    # (name, width, Z-Image's form: post-norm, tanh gate, RMSNorm; else FLUX.2's: gate, LayerNorm + shift)
    for family, D, post_norm in (("zimage", 48 if DRY else 3840, True), ("klein-4b", 32 if DRY else 3072, False)):
        try:
            torch.manual_seed(0)
            x, y = (torch.randn(1, M, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            gate, scale, shift = (0.5 * torch.randn(1, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
            w_post, w = (1 + 0.1 * torch.randn(D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
            d_out, d_xn = torch.randn_like(x), torch.randn_like(x)
            kw = dict(post=(w_post, 1e-5), weight=w) if post_norm else dict(shift=shift, tanh=False, layer=True)
            res = {}
            for name, ops in (("fused: one op", fused), ("unfused: residual, norm, add of gradients", unfused)):
                def fn(ops=ops):
                    return ops.residual_norm(x, gate, y, scale, 1e-5, **kw)

                def fwd_bwd(fn=fn):
                    return torch.autograd.grad(fn(), (x, y), (d_out, d_xn))

                with torch.no_grad():
                    out = [t.float() for t in fn()]
                    ms_f = _median_ms(fn)
                res[name] = out + [g.float() for g in fwd_bwd()]
                rows.add(kind="fusion", op="residual_norm", family=family, variant=name, rows=M, dim=D, fwd_ms=ms_f,
                         fwd_bwd_ms=_median_ms(fwd_bwd))
            a, b = res.values()
            err = max(((p - q).abs().max() / q.abs().max().clamp_min(1e-6)).item() for p, q in zip(a, b))
            rows.add(kind="fusion", op="residual_norm", family=family, variant="parity: fused vs unfused",
                     rel_err=err, parity_ok=err < 2e-2)
            status |= 0 if err < 2e-2 else 1
        except Exception as exc:  # noqa: BLE001
            rows.add(kind="fusion", op="residual_norm", family=family, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return status


def _host_ms(fn, reps=5) -> float:
    """Median host time to issue ``fn`` (the GPU is not waited for): what a call costs the CPU."""
    times = []
    for _ in range(1 if DRY else reps):  # the dry run: the code once (the interpreter is slow)
        _sync()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync()
    return sorted(times)[len(times) // 2]


def _queued_ms(fn, reps=10, host_ms=None) -> float:
    """GPU time per call of ``fn``, L2 flushed before each (as do_bench does): the host queues ``reps``
    calls behind a spinning kernel, so the events around them time the GPU's work with no gap where the
    host is behind. do_bench's per-call events time the host instead when it is slower than the GPU.
    Dry run: the wall clock."""
    if DRY:
        return _median_ms(fn)
    import torch

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    host_ms = host_ms if host_ms is not None else _host_ms(fn)

    def timed(body):
        start, end = _event(), _event()
        torch.cuda._sleep(int((1.5 * reps * (host_ms + 0.1) + 0.5) * 2e6))  # longer than the host's queueing (~2 GHz)
        start.record()
        for _ in range(reps):
            body()
        end.record()
        _sync()
        return start.elapsed_time(end) / reps

    timed(fn)  # warm
    both = timed(lambda: (flush.zero_(), fn()))
    return max(both - timed(flush.zero_), 0.0)


WIDE_TILE = "ours: Triton paired GEMM, 128 x 256 tiles"  # the candidate tile (multi_lora.gemm_tile), beside 128 x 128
TMA = "ours: Triton paired GEMM, TMA persistent"  # the candidate operand path (multi_lora.gemm_kernel)
TMA_WIDE = "ours: Triton paired GEMM, TMA persistent, 128 x 256 tiles"
CANDIDATES = {WIDE_TILE: ("pointer", (128, 256)), TMA: ("tma", (128, 128)), TMA_WIDE: ("tma", (128, 256))}


# plain cuBLAS GEMMs (bf16, no LoRA): rows x (inner -> out). The block's three shapes at one branch's rows
# and at both branches' rows packed, in both weight layouts; and a q/k/v group (3840 -> 3 x 3840) and w1 / w3
# (3840 -> 2 x 10240) as one GEMM each, at one branch's rows
GEMM_RATE_SHAPES = tuple((m, k, n, lay) for m in (4608, 9728) for k, n in ((3840, 3840), (3840, 10240), (10240, 3840))
                         for lay in ("x W^T", "x Wt")) + tuple((4608, 3840, n, "x W^T") for n in (11520, 20480))


def _gemm_operands(M: int, K: int, N: int):
    """A GEMM's bf16 operands, seeded: x (M, K) and a weight (N, K) as stored, at its init scale."""
    import torch

    torch.manual_seed(0)
    return (torch.randn(M, K, device=DEV, dtype=torch.bfloat16),
            torch.randn(N, K, device=DEV, dtype=torch.bfloat16) * K ** -0.5)


def cublas_gemm_rates(rows: Rows) -> int:
    """cuBLAS's bf16 rate at the step's GEMMs, alone: ``x W^T`` with the weight (N, K) as stored, and
    ``x Wt`` with a (K, N) copy (the other operand layout cuBLAS runs); one branch's rows and both packed;
    a group's linears as one wider GEMM. Rows ``gemm_rate``: what decides whether a relayout or packing
    of the GEMMs pays (the step model does not price them)."""
    import torch

    shapes = ((16, 32, 48, "x W^T"), (16, 32, 48, "x Wt")) if DRY else GEMM_RATE_SHAPES
    status = 0
    for M, K, N, lay in shapes:
        try:
            x, w = _gemm_operands(M, K, N)
            b = w.t() if lay == "x W^T" else w.t().contiguous()
            ms = _median_ms(lambda: torch.mm(x, b))
            rows.add(kind="gemm_rate", M=M, K=K, N=N, layout=lay, ms=ms, tflops=2.0 * M * K * N / ms / 1e9)
        except Exception as exc:  # noqa: BLE001
            rows.add(kind="gemm_rate", M=M, K=K, N=N, layout=lay, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            status = 1
    return status


def stage_m2(rows: Rows) -> int:
    """The paired LoRA linear: ours (the delta in the GEMM's tile, dx accumulated in the dX GEMM), the
    cuBLAS form (the delta first, the base GEMM accumulating into it) beside the earlier cuBLAS form
    (the delta by a second call after the base GEMM) and two plain LoRA layers, and a device copy of the
    same bytes. Ours four times: as it launches (pointer loads, 128 x 128 tiles), and the candidates: the
    128 x 256 tile, the TMA kernel (tensor descriptors, persistent) with either tile; a candidate's row has
    its forward, its backward's GPU time and the host's time to issue it. The backward is
    timed alone (the forward's graph kept) two ways: ``bwd_ms`` GPU time (queued behind a spinning
    kernel), ``bwd_wall_ms`` per call with do_bench (host included where the host is slower), with
    ``bwd_host_ms`` the host's time to issue it; ``bwd_derived_ms`` is the earlier figure (forward +
    backward minus the no-grad forward), ``fwd_grad_ms`` the forward with autograd."""
    import torch

    from dopsd_fast.kernels.multi_lora import gemm_kernel, gemm_tile, lora_linear_ref, paired_lora_linear

    # the dry run: toy shapes (each call runs the GEMMs through Triton's interpreter); rank 8, so that the
    # adapters' rows are 16 bytes and the TMA candidates read them through descriptors
    dev, bf, r, Ms, Mt = (DEV, torch.bfloat16, 8, 16, 24) if DRY else (DEV, torch.bfloat16, 64, 4608, 5120)
    status = cublas_gemm_rates(rows)
    for K, N in ((32, 32), (32, 48), (48, 32)) if DRY else ((3840, 3840), (3840, 10240), (10240, 3840)):
        torch.manual_seed(0)
        xs = torch.randn(Ms, K, device=dev, dtype=bf, requires_grad=True)
        xt = torch.randn(Mt, K, device=dev, dtype=bf)
        w = torch.randn(N, K, device=dev, dtype=bf) * K ** -0.5
        a_s = (torch.randn(r, K, device=dev, dtype=bf) * K ** -0.5).requires_grad_()
        b_s = (torch.randn(N, r, device=dev, dtype=bf) * 0.01).requires_grad_()
        a_t, b_t = a_s.detach().clone(), b_s.detach().clone() * 1.1
        dy = torch.randn(Ms, N, device=dev, dtype=bf)
        fl_fwd = 2 * (Ms + Mt) * K * N + 2 * (Ms + Mt) * r * (K + N)
        fl_bwd = 2 * Ms * K * N + 4 * Ms * r * (K + N)  # dX (base + adapter) and dA, dB: no base dW

        def ours(impl):
            return lambda: paired_lora_linear(xs, xt, w, None, (a_s, b_s, 2.0), (a_t, b_t, 2.0), impl=impl)[0]

        def delta_after():  # the paired op's earlier cuBLAS form: the delta by a second call re-reading y
            def one(x, a, b):
                u = torch.addmm(x.new_zeros(()), x, a.t(), beta=0, alpha=2.0)
                return torch.mm(x, w.t()).addmm_(u, b.t())

            y = one(xs, a_s, b_s)
            with torch.no_grad():
                one(xt, a_t, b_t)
            return y

        def two_layers():
            y = lora_linear_ref(xs, w, None, a_s, b_s, 2.0)
            with torch.no_grad():
                lora_linear_ref(xt, w, None, a_t, b_t, 2.0)
            return y

        with torch.no_grad():
            ref = two_layers().float()
        nbytes = 2 * ((Ms + Mt) * (K + N) + N * K)  # read x and W, write y, bf16
        src = torch.empty(nbytes // 2, device=dev, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_ms = _median_ms(lambda: dst.copy_(src))  # moves nbytes (read + write)
        for name, fn in (("ours: Triton paired GEMM", ours("triton")),
                         ("ours: paired on cuBLAS, delta first", ours("torch")),
                         ("cuBLAS, delta after the base GEMM (earlier form, autograd's backward)", delta_after),
                         ("two cuBLAS LoRA layers", two_layers),
                         # the dry run: the TMA kernel alone (the interpreter's tiles are its own: no other candidate)
                         *((c, ours("triton")) for c in ((TMA,) if DRY else CANDIDATES))):  # last: their first
            kern, tile = CANDIDATES.get(name, ("pointer", None))  # calls compile, and a cut stage keeps the rows before
            try:
                with gemm_kernel(kern), (gemm_tile(*tile) if tile else contextlib.nullcontext()):
                    with torch.no_grad():
                        err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
                        ms_f = _median_ms(fn)
                    y = fn()

                    def bwd():
                        torch.autograd.grad(y, (xs, a_s, b_s), dy, retain_graph=True)

                    def fwd_bwd():
                        torch.autograd.grad(fn(), (xs, a_s, b_s), dy)

                    host_b = _host_ms(bwd)
                    ms_b = _queued_ms(bwd, host_ms=host_b)
                    row = dict(kind="paired_linear", variant=name, K=K, N=N, rows=f"{Ms}+{Mt}", rank=r, fwd_ms=ms_f,
                               fwd_tflops=fl_fwd / ms_f / 1e9, bwd_ms=ms_b, bwd_tflops=fl_bwd / max(ms_b, 1e-9) / 1e9,
                               bwd_host_ms=host_b, copy_same_bytes_ms=copy_ms, rel_err_vs_two_layers=err,
                               parity_ok=err < 2e-2)
                    if name not in CANDIDATES:  # the launched forms: also the wall-clock and derived figures
                        ms_fb, host_fb = _median_ms(fwd_bwd), _host_ms(fwd_bwd)
                        row.update(bwd_wall_ms=_median_ms(bwd), bwd_derived_ms=ms_fb - ms_f,
                                   fwd_grad_ms=_median_ms(fn),  # the forward with autograd (in the fwd + bwd figure)
                                   fwd_bwd_ms=ms_fb, fwd_bwd_gpu_ms=_queued_ms(fwd_bwd, host_ms=host_fb),
                                   fwd_bwd_host_ms=host_fb)
                    rows.add(**row)
                    del y
                    status |= 0 if err < 2e-2 else 1
            except Exception as exc:  # noqa: BLE001
                rows.add(kind="paired_linear", variant=name, K=K, N=N, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return status


def stage_m3(rows: Rows) -> int:
    """One fast step at the real workload; time per region with CUDA events; peak memory."""
    import torch

    sys.path.insert(0, str(HERE))
    import step_time

    # the default attention (auto: cuDNN on H100/H200), as the step stage runs it
    args = step_time.parse(["--preset", "tiny" if DRY else "zimage-6b", "--backward", "stepwise", "--checkpoint",
                            "none", "--attention", "auto"])
    t0 = time.time()
    bench = step_time.Bench(args)
    rows.add(kind="step_setup", what=f"{args.preset} built", seconds=time.time() - t0,
             weights_gb=bench.weights_gb, floor_tflop_per_step=bench.floor_flops / 1e12)
    regions: dict[str, list] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            s, e = _event(), _event()
            s.record()
            out = fn(*a, **kw)
            e.record()
            regions.setdefault(name, []).append((s, e))
            return out
        return wrapper

    fp = bench.fast_model(args.kernels)
    orig_pair, orig_backward = fp.pair_fn, torch.Tensor.backward
    def timed_pair(cs, ct, *a, **kw):  # the pair protocol's fn, timed; its finish() (the shared backward) too
        fn = orig_pair(cs, ct, *a, **kw)
        out = timed("forward: student + teacher (packed)", fn)
        out.finish = timed("backward (context refiner, once per roll-out)", fn.finish)
        return out

    fp.pair_fn = timed_pair
    opt_step, ema = bench.optimizer.step, bench.weights.ema_update
    status = 0
    for i in range(1 + M3_STEPS):  # step 0 compiles; the rest are measured
        regions.clear()
        if not DRY:
            torch.cuda.reset_peak_memory_stats()
        torch.Tensor.backward = timed("backward (stepwise, per state)", orig_backward)
        bench.optimizer.step = timed("optimizer (fused AdamW)", opt_step)
        bench.weights.ema_update = timed("EMA update", ema)
        try:
            _sync()
            t0 = time.perf_counter()
            bench.step(lambda: bench.fast_rollout(args.kernels))
            _sync()
            wall = time.perf_counter() - t0
        finally:
            torch.Tensor.backward = orig_backward
            bench.optimizer.step, bench.weights.ema_update = opt_step, ema
        per = {k: sum(s.elapsed_time(e) for s, e in v) / 1e3 for k, v in regions.items()}
        rows.add(kind="step_regions", step=i, note="includes compile" if i == 0 else "measured",
                 wall_s=wall, **{f"{k} [s]": v for k, v in per.items()},
                 other_s=wall - sum(per.values()),
                 peak_memory_gb=float("nan") if DRY else torch.cuda.max_memory_allocated() / 1e9,
                 mfu_floor=bench.floor_flops / wall / step_time.PEAK_BF16)
    return status


def _step_time(rows: Rows, *extra: str) -> int:
    extra = list(extra)
    if DRY:  # the code, once: one timed step per path, no warm-up
        for flag, value in (("--steps", "1"), ("--warmup", "0")):
            extra[extra.index(flag) + 1] = value
    cmd = [sys.executable, str(HERE / "step_time.py"), "--preset", "tiny" if DRY else "zimage-6b",
           "--rows", rows.path, *extra]
    return subprocess.call(cmd)


def stage_step(rows: Rows) -> int:
    # --eager-checkpointing: the reference as the authors run it, and what keeps its fp32 parity pass (fp32
    # weights 24.6 GB + un-checkpointed fp32 activations ~115 GB, model figure) inside one GPU's memory; the
    # un-checkpointed eager reference (stepwise) is timed beside it
    return _step_time(rows, "--steps", "5", "--warmup", "2", "--parity-steps", "1", "--eager-checkpointing",
                      "--paths", "eager,eager-plain,fast")


# the FP8 GEMMs a Z-Image step runs (rows, inner, out), as the code runs them: the forward per branch
# (student 4608 rows, teacher 5120) at each block shape, and the student's dX GEMM per group (inner: the
# group's concatenated outputs: q, k, v 11520; w1, w3 20480; out 3840; w2 3840 -> 10240)
# (rows, inner, out, a backward dX GEMM): the forward's GEMMs per branch, then the student's dX GEMMs of q/k/v,
# w1/w3 (one GEMM over the group) and w2
FP8_GEMM_SHAPES = tuple((m, k, n, False) for m in (4608, 5120) for k, n in ((3840, 3840), (3840, 10240),
                                                                           (10240, 3840))) + \
    ((4608, 11520, 3840, True), (4608, 20480, 3840, True), (4608, 3840, 10240, True))


def fp8_gemms(rows: Rows) -> int:
    """``torch._scaled_mm`` (e4m3, rowwise and tensorwise scales, bf16 out) beside the bf16 ``mm`` of the
    same problem, at the step's FP8 shapes: the rates the step model prices FP8 with once measured
    (``perf_model.py --calibrate-from``); a forward shape also with ``use_fast_accum=True``, as the fast
    path's forward runs it (``rowwise_fast_ms``, ``tensorwise_fast_ms``; the dX GEMMs promote). With a
    rank-64 LoRA delta as the fast path adds it: the cuBLAS form (``_scaled_mm``, then ``addmm_``
    re-reading y; promoted, and for a forward shape with fast accumulation) beside ours (the TMA kernel:
    the scales and the delta in the same tile, one pass; fast accumulation in the forward's GEMMs, the
    accumulator promoted once per K step in the dX GEMMs, as the fast path runs each), with ours' error
    against the cuBLAS form and ours' speed-up against the cuBLAS form the fast path runs."""
    import torch

    from dopsd_fast.kernels.multi_lora import _fp8_gemm

    shapes = ((32, 48, 32, False), (16, 96, 32, True)) if DRY else FP8_GEMM_SHAPES
    r = 8 if DRY else 64
    status = 0
    for M, K, N, dgrad in shapes:
        try:
            a, b = _gemm_operands(M, K, N)
            aq, bq = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)  # values only matter for time
            sa, sb = torch.ones(M, 1, device=DEV), torch.ones(1, N, device=DEV)
            one = torch.ones((), device=DEV)
            ms_bf = _median_ms(lambda: torch.mm(a, b.t()))
            ms_row = _median_ms(lambda: torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
            ms_ten = _median_ms(lambda: torch._scaled_mm(aq, bq.t(), scale_a=one, scale_b=one,
                                                         out_dtype=torch.bfloat16))
            fl = 2.0 * M * K * N
            row = dict(kind="fp8_gemm", M=M, K=K, N=N, dgrad=dgrad, rank=r, bf16_ms=ms_bf, rowwise_ms=ms_row, tensorwise_ms=ms_ten,
                       bf16_tflops=fl / ms_bf / 1e9, rowwise_tflops=fl / ms_row / 1e9,
                       tensorwise_tflops=fl / ms_ten / 1e9, rowwise_speedup=ms_bf / ms_row)
            if not dgrad:  # the forward's form: fast accumulation (failing, it is a result: the rest stays)
                try:
                    row["rowwise_fast_ms"] = _median_ms(lambda: torch._scaled_mm(
                        aq, bq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True))
                    row["tensorwise_fast_ms"] = _median_ms(lambda: torch._scaled_mm(
                        aq, bq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True))
                except Exception as exc:  # noqa: BLE001
                    row["fast_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            u = torch.randn(M, r, device=DEV, dtype=torch.bfloat16)
            lb = torch.randn(N, r, device=DEV, dtype=torch.bfloat16) * 0.01

            def cublas_delta(fast=False):
                y = torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast)
                return y.addmm_(u, lb.t())

            def ours_delta():
                return _fp8_gemm(aq, sa, bq.t(), sb.t(), True, torch.bfloat16, u, lb.t(), fast_accum=not dgrad)

            try:
                ref, got = cublas_delta().float(), ours_delta()
                if got is None:
                    raise RuntimeError("the TMA kernel refused these operands")
                err = ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                row.update(rowwise_delta_ms=_median_ms(cublas_delta), ours_rowwise_delta_ms=_median_ms(ours_delta),
                           ours_fast_accum=not dgrad, ours_rel_err=err, ours_parity_ok=err < 2e-2)
                if not dgrad:  # the forward: ours accumulates fast, so cuBLAS's fast accumulation beside it
                    row["rowwise_fast_delta_ms"] = _median_ms(lambda: cublas_delta(True))
                row["ours_speedup_vs_cublas_delta"] = row.get("rowwise_fast_delta_ms", row["rowwise_delta_ms"]) \
                    / row["ours_rowwise_delta_ms"]  # against the cuBLAS form as the fast path runs it
            except Exception as exc:  # noqa: BLE001  (ours failing is a result; the cuBLAS rows stay)
                row["ours_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.add(**row)
        except Exception as exc:  # noqa: BLE001  (an unsupported FP8 GEMM is a result too)
            if DRY and "per-tensor scaling for CPU" in str(exc):  # an older torch's CPU _scaled_mm: not the GPU's
                rows.add(kind="fp8_gemm", M=M, K=K, N=N, dgrad=dgrad,
                         skipped="this torch's CPU _scaled_mm has no rowwise scales (CUDA's has)")
                continue
            rows.add(kind="fp8_gemm", M=M, K=K, N=N, dgrad=dgrad, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            status = 1
    return status


def stage_fp8(rows: Rows) -> int:
    gemm_status = fp8_gemms(rows)
    # parity by velocity SQNR against the bf16 eager path (no fp32 reference needed); the bf16 fast path
    # timed beside the FP8 one (the eager reference's time is the step stage's), and FP8 with the backward's
    # dX GEMMs in bf16 (fast.fp8_dgrad=false): what FP8 dX gains or loses at this GPU
    return _step_time(rows, "--fp8", "native", "--steps", "5", "--warmup", "2", "--parity-steps", "1",
                      "--eager-checkpointing", "--no-fp32-reference", "--paths",
                      "fast-bf16,fast,fast-fp8-fwd") or gemm_status


def _pytest(rows: Rows, what: str, args: list[str], env: dict) -> int:
    """pytest's output streamed into the stage's log as it comes (a stage cut at its cap keeps what ran),
    then one row."""
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", *args], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    rc = p.wait()
    summary = [line for line in lines if any(w in line for w in (" passed", " failed", " error", " skipped",
                                                                " collected"))]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    rows.add(kind="kernel_tests", what=what, exit_code=rc, summary=summary[-1] if summary else "no summary",
             failed="; ".join(failed)[:1500], tail="" if rc == 0 else "\n".join(lines)[-1500:])
    return rc


def stage_tests(rows: Rows) -> int:
    """The CUDA-graph capture tests first, every case (-x -v: the first failure with its text; -rfEs keeps
    the FAILED lines in the summary), then the kernel tests in short form (DOPSD_GPU_TESTS_SHORT=1: one
    case per test function and dtype). The CPU dry run runs the capture tests (they skip without a GPU)
    and collects the short form's selection without running it: the test suite runs every kernel test
    through the interpreter already, and running them twice only cost the suite time."""
    env = {**os.environ, "DOPSD_GPU_TESTS": "1", "DOPSD_GPU_TESTS_SHORT": "1"}
    if DRY:  # on the CPU: the interpreter, the same selection
        env.pop("DOPSD_GPU_TESTS")
        env["TRITON_INTERPRET"] = "1"
    every_case = {k: v for k, v in env.items() if k != "DOPSD_GPU_TESTS_SHORT"}
    rc = _pytest(rows, "CUDA-graph capture", ["-x", "-v", "tests/kernels/test_graph_capture.py"], every_case)
    return rc | _pytest(rows, "kernel tests, short form", ["-q", *(["--collect-only"] if DRY else []), "tests/kernels",
                                                            "--deselect", "tests/kernels/test_graph_capture.py"], env)


def stage_selftest_ok(rows: Rows) -> int:
    rows.add(kind="selftest", what="a stage that ends in time")
    return 0


def stage_selftest_overrun(rows: Rows) -> int:
    rows.add(kind="selftest", what="a stage that overruns: this row was written before the cut")
    time.sleep(3600)
    return 0


STAGE_FN = {"smoke": stage_smoke, "m1": stage_m1, "m2": stage_m2, "m3": stage_m3, "step": stage_step,
            "fp8": stage_fp8, "tests": stage_tests,
            "selftest-ok": stage_selftest_ok, "selftest-overrun": stage_selftest_overrun}


# ---- the driver ---------------------------------------------------------------------------------
def write_outputs(out: Path, rows_path: str, timeline: list[dict], meta: dict) -> None:
    rows = read_rows(rows_path)
    env = next((r for r in rows if r.get("kind") == "env"), {})
    common = {"git_commit": meta["git_commit"], "gpu": env.get("gpu", "none"), "driver": env.get("driver", "-"),
              "torch": env.get("torch"), "cuda": env.get("cuda"), "triton": env.get("triton")}
    full = [{**common, **r} for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "timeline": timeline, "rows": full}, indent=1, default=str) + "\n")
    os.replace(tmp, out / "results.json")
    lines = [f"# GPU check: {meta['verdict']}", "",
             f"commit `{meta['git_commit']}`; GPU {common['gpu']} (driver {common['driver']}); torch {common['torch']}, "
             f"CUDA {common['cuda']}, triton {common['triton']}; budget {meta['budget_s']} s, used "
             f"{meta['elapsed_s']:.0f} s; {meta['date']}", "", "## Stages", "",
             "| stage | what | limit s | took s | status |", "|---|---|---|---|---|"]
    lines += [f"| {t['stage']} | {STAGES[t['stage']][1]} | {t['limit_s']:.0f} | {t.get('took_s', 0):.0f} | "
              f"{t['status']} |" for t in timeline]
    by_kind: dict[str, list] = {}
    for r in rows:
        by_kind.setdefault(r.get("kind", "?"), []).append(r)
    for kind, rs in by_kind.items():
        keys = [k for k in dict.fromkeys(k for r in rs for k in r) if k not in ("stage", "kind")]
        lines += ["", f"## {kind}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rs]
    tails = [t for t in timeline if t.get("log_tail")]
    for t in tails:
        lines += ["", f"## log tail: {t['stage']}", "", "```", t["log_tail"], "```"]
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "report.md")


LOG_KEEP_CHARS = 60_000  # of each stage's log in $OUT/logs.txt (its end: the errors are there)


def _append_log(out: Path, stage: str, status: str, log: str) -> None:
    """The stage's log (its last ``LOG_KEEP_CHARS``) appended to ``$OUT/logs.txt``: the text of a failure
    comes back with the report, not only its last 25 lines."""
    out.mkdir(parents=True, exist_ok=True)
    cut = len(log) > LOG_KEEP_CHARS
    with open(out / "logs.txt", "a") as f:
        f.write(f"===== stage {stage}: {status}{' (its last %d characters)' % LOG_KEEP_CHARS if cut else ''}\n")
        f.write(log[-LOG_KEEP_CHARS:] + ("" if log.endswith("\n") else "\n"))


def run_stage(name: str, limit: float, rows_path: str, log_path: str) -> tuple[int | None, float]:
    """The stage in its own process group, killed (with everything it started) at ``limit``."""
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--stage", name, "--rows", rows_path],
                             stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    return rc, time.time() - t0


def plan_table(stages: list[str], budget: float, spent: float = 0.0) -> tuple[str, float]:
    """The per-stage budget: each stage's cap and the latest second it can end by; the total of the caps
    with the report reserve and what the call had spent before the first stage."""
    lines = ["| stage | cap s | ends by s | what |", "|---|---|---|---|"]
    t = spent
    for s in stages:
        t += STAGES[s][0]
        lines.append(f"| {s} | {STAGES[s][0]} | {t:.0f} | {STAGES[s][1]} |")
    total = t + REPORT_RESERVE_S
    lines.append(f"| report | {REPORT_RESERVE_S} | {total:.0f} | results.json, report.md |")
    lines.append(f"\nplan: {total:.0f} s of caps against a budget of {budget:.0f} s "
                 f"({'fits' if total <= budget else 'OVER: the last stages get what is left, or nothing'})")
    return "\n".join(lines), total


def forms() -> dict:
    """The forms of the step this code runs that a calibration must know (benchmarks/perf_model.py,
    measured_form)."""
    from dopsd_fast.models.ops import FusedOps

    return {"residual_norm_fused": FusedOps.fuse_residual_norm}


def drive(args) -> int:
    t_start = args.t0 or time.time()
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # logs and rows live here, not in $OUT
    (out / "logs.txt").unlink(missing_ok=True)  # this run's stage logs only (the other two files are rewritten)
    rows_path = str(work / "rows.jsonl")
    meta = {"git_commit": git_commit(), "budget_s": args.budget, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "dry_run": "CPU dry run at toy shapes: checks the code, measures nothing" if DRY else False,
            "verdict": "RUNNING", "elapsed_s": 0.0, "forms": forms()}
    timeline: list[dict] = []
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"gpu_check: unknown stage(s) {unknown}; known: {list(STAGES)}", file=sys.stderr)
        return 2
    table, _ = plan_table(stages, args.budget, time.time() - t_start)
    print(table, flush=True)
    scale = DRY_TIME_SCALE if DRY else 1
    if DRY:
        print(f"dry run on the CPU: each stage's limit and the budget x{scale}; nothing is measured", flush=True)
    meta["plan"] = table
    verdict = "PASS"
    for i, name in enumerate(stages):
        left = scale * args.budget - (time.time() - t_start) - REPORT_RESERVE_S
        cap = scale * STAGES[name][0]
        if left < MIN_STAGE_S:
            timeline += [{"stage": s, "limit_s": 0, "status": "not started: budget spent"} for s in stages[i:]]
            verdict = "INCOMPLETE (budget)"
            break
        limit = min(cap, left)
        print(f"[{time.time() - t_start:5.0f} s] stage {name}: limit {limit:.0f} s ({STAGES[name][1]})", flush=True)
        log_path = str(work / f"{name}.log")
        rc, took = run_stage(name, limit, rows_path, log_path)
        entry = {"stage": name, "limit_s": limit, "took_s": took}
        log = Path(log_path).read_text(errors="replace")
        if rc is None:
            entry["status"] = f"cut after {took:.0f} s ({'budget' if limit < cap else 'stage cap'}); rows so far kept"
            verdict = "INCOMPLETE (budget)" if verdict == "PASS" else verdict
        elif rc == 0:
            entry["status"] = "ok"
        elif name == "smoke" and rc == NO_GPU_EXIT:
            entry["status"] = "no GPU: nothing to measure on this machine"
        else:
            entry["status"] = f"FAILED (exit {rc})"
        if rc != 0:
            entry["log_tail"] = "\n".join(log.splitlines()[-25:])
        _append_log(out, name, entry["status"], log)
        timeline.append(entry)
        print(f"[{time.time() - t_start:5.0f} s] stage {name}: {entry['status']}", flush=True)
        meta["elapsed_s"] = time.time() - t_start
        if name == "smoke" and rc != 0:
            verdict = "NO GPU" if rc == NO_GPU_EXIT else "SMOKE FAILED"
            timeline += [{"stage": s, "limit_s": 0, "status": f"not run: {verdict.lower()}"} for s in stages[i + 1:]]
            break
        if rc not in (0, None):
            verdict = "FAIL"
        meta["verdict"] = "RUNNING"
        write_outputs(out, rows_path, timeline, meta)
    meta["verdict"], meta["elapsed_s"] = verdict, time.time() - t_start
    write_outputs(out, rows_path, timeline, meta)
    print(f"[{meta['elapsed_s']:5.0f} s] gpu check: {verdict}; {out / 'report.md'}, {out / 'results.json'}", flush=True)
    return 0 if verdict in ("PASS", "NO GPU") else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results" / time.strftime("local-%Y%m%d-%H%M%S")))
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 540)),
                   help="seconds for the whole call, counted from --t0 (default 540)")
    p.add_argument("--t0", type=float, default=None, help="epoch seconds when the call started (gpu_check.sh)")
    p.add_argument("--stages", default=os.environ.get("GPU_CHECK_STAGES", DEFAULT_STAGES),
                   help=f"comma-separated, in order (default {DEFAULT_STAGES}); known: "
                        + ", ".join(s for s in STAGES if not s.startswith("selftest")))
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        if DRY:  # before any kernel module is imported
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            os.environ.pop("TRITON_INTERPRET", None)
        return STAGE_FN[args.stage](Rows(args.rows, args.stage))
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
