"""Hopper compile gate: every Triton kernel our entry points launch, compiled for sm_90a on the CPU.

No GPU and no CUDA driver are needed. A stand-in Triton driver reports the Hopper target
(``GPUTarget("cuda", 90, 32)``) and every ``kernel[grid](...)`` launch becomes a compile-only call
(``warmup=True``), so the real launchers run with CPU tensors at the real shapes, argument types and
constexprs, and each kernel goes through Triton's whole pipeline: front end, TTIR, TTGIR, LLVM, PTX
and ptxas (``sm_90a``, shipped in the triton wheel). The interpreter, which the numeric tests use,
checks none of this: front-end type errors, register spills and shared-memory limits only show here.

Scenarios call the ops interface of the fast path (``FusedOps``: the exact call pattern of the
models), the single-branch attention and the D-OPSD loss, forward and backward, in bf16 at
Z-Image-Turbo (dim 3840, 30 x 128 heads, FFN 10240, 4096 image tokens, captions 512 / 1024, LoRA
rank 64) and FLUX.2-klein-4B / 9B sizes, packed as one sample (``(1, T, D)``) and as a ragged batch
of two (``(T, 1, D)``, per-token modulation), plus a small fp32 run (reported, not gated).

Per compiled kernel and configuration: registers, spill bytes, shared memory, warps / stages, and
how its ``tl.dot`` lowered (``wgmma``, ``mma.sync`` or ``fma``). Exit 1 on: a compile error; a spill
in a bf16 kernel; shared memory over 227 KB; a bf16 dot not on wgmma; a ``_tma`` kernel whose loads are
not TMA copies (``cp.async.bulk.tensor``); an entry kernel of
``dopsd_fast.kernels`` that no scenario launched. ptxas advisories (e.g. C7515, wgmma serialised)
are printed.

    python benchmarks/compile_check.py                  # all scenarios, table, exit status
    python benchmarks/compile_check.py --only zimage    # scenarios whose name contains "zimage"
    python benchmarks/compile_check.py --json out.json  # rows for the report
"""

from __future__ import annotations

import os

# Must precede any import of a kernel module: triton.jit reads it at decoration time.
if os.environ.pop("TRITON_INTERPRET", None) == "1":
    print("compile_check: TRITON_INTERPRET=1 ignored (this gate compiles; the interpreter does not)")
# A fresh cache: every kernel really compiles, so ptxas reports its registers and spills.
import tempfile  # noqa: E402

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dopsd-compile-check-")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said out loud (silences its warning)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

KERNEL_MODULES = ("attention", "fp8_quant", "multi_lora", "norm_modulation", "rope_qk_norm", "swiglu")
SMEM_LIMIT = 227 * 1024  # H100/H200: 227 KB of shared memory per block (opt-in maximum)
TARGET = GPUTarget("cuda", 90, 32)


# ---- the stand-in driver and the compile-only launch --------------------------------------------
class HopperStandIn(DriverBase):
    """Reports an sm_90 device; launches nothing."""

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile_check: nothing runs on the stand-in driver")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Launch:
    kernel: str
    module: str
    scenario: str
    constexprs: dict
    num_warps: int
    num_stages: int
    compiled: object = field(default=None, repr=False)


class Recorder:
    def __init__(self):
        self.launches: list[Launch] = []
        self.ptxas_logs: dict[int, str] = {}  # id(compiled kernel) -> the ptxas -v log of its compile
        self.scenario = "?"

    def install(self):
        driver.set_active(HopperStandIn())
        orig = JITFunction.run
        rec = self

        knobs.nvidia.dump_ptxas_log = True  # triton prints its own `ptxas -v` log: captured below

        def run(self_, *args, grid, warmup, **kwargs):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                kernel = orig(self_, *args, grid=grid, warmup=True, **kwargs)
            if buf.getvalue():
                rec.ptxas_logs[id(kernel)] = buf.getvalue()
            names = [p.name for p in self_.params]
            consts = {n: (a if not hasattr(a, "dtype") else str(a.dtype)) for n, a in zip(names, args)
                      if self_.params[names.index(n)].is_constexpr}
            consts.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
            rec.launches.append(Launch(self_.fn.__name__, self_.fn.__module__, rec.scenario, consts,
                                       kernel.metadata.num_warps, kernel.metadata.num_stages, kernel))
            return kernel

        JITFunction.run = run
        # The kernel files run the Triton path on CUDA tensors or under the interpreter; here every
        # launch compiles only, so CPU tensors take the Triton path.
        for name in KERNEL_MODULES:
            importlib.import_module(f"dopsd_fast.kernels.{name}").use_triton = lambda *t: True


def entry_kernels() -> dict[str, str]:
    """``name -> module`` of every @triton.jit function that no other jit function calls."""
    jits = {}
    for name in KERNEL_MODULES + ("_common",):
        mod = importlib.import_module(f"dopsd_fast.kernels.{name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                jits[attr] = (mod.__name__, obj.src if hasattr(obj, "src") else inspect.getsource(obj.fn))
    called = {n for n in jits for _, (_, src) in jits.items() if re.search(rf"\b{n}\(", src.split(":", 1)[1])}
    return {n: m for n, (m, _) in jits.items() if n not in called}


# ---- analysis of one compiled kernel ------------------------------------------------------------
def ptxas_report(log: str) -> dict:
    """Registers, spills and advisories from the ``ptxas -v`` log of triton's own sm_90a compile."""
    regs = re.search(r"Used (\d+) registers", log)
    st = re.search(r"(\d+) bytes spill stores", log)
    ld = re.search(r"(\d+) bytes spill loads", log)
    adv = sorted({line.strip() for line in log.splitlines() if re.search(r"\bC\d{4}\b", line)})
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": (int(st.group(1)) if st else 0) + (int(ld.group(1)) if ld else 0), "advisories": adv}


def dot_lowering(asm: dict) -> tuple[str, int]:
    ttgir, ptx = asm.get("ttgir", ""), asm.get("ptx", "")
    n_wg = len(re.findall(r"warp_group_dot\b", ttgir))
    n_dot = len(re.findall(r"\btt\.dot\b", ttgir))
    if n_wg + n_dot == 0:
        return "-", 0
    if n_dot == 0:
        return "wgmma", n_wg
    if "mma.sync" in ptx:
        return ("wgmma+mma.sync" if n_wg else "mma.sync"), n_wg + n_dot
    return ("wgmma+fma" if n_wg else "fma"), n_wg + n_dot


# ---- scenarios ----------------------------------------------------------------------------------
SHAPES = {  # dim, heads, head_dim, ffn, image tokens, student / teacher context tokens
    "zimage": dict(dim=3840, heads=30, hd=128, ffn=10240, img=4096, cap_s=512, cap_t=1024),
    "klein4b": dict(dim=3072, heads=24, hd=128, ffn=9216, img=4096, cap_s=512, cap_t=512 + 4096),
    "klein9b": dict(dim=4096, heads=32, hd=128, ffn=12288, img=4096, cap_s=512, cap_t=512 + 4096),
    "tiny-fp32": dict(dim=64, heads=2, hd=32, ffn=160, img=64, cap_s=7, cap_t=45),
}
RANK = 64


def _lens(sh, ragged):
    """Per-sample student / teacher token counts (ragged: two samples of different caption lengths)."""
    s = [sh["img"] + sh["cap_s"]]
    t = [sh["img"] + sh["cap_t"]]
    if ragged:
        s.append(sh["img"] // 4 + sh["cap_s"] // 3)
        t.append(sh["img"] // 4 + sh["cap_t"] // 5)
    return s, t


def _cu(lens):
    return torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32), [0] + list(
        torch.tensor(lens).cumsum(0).tolist())


def scenario(family: str, ragged: bool, dtype: torch.dtype):
    """Forward and backward of every fused op of one packed double-forward layer, at real shapes."""
    from dopsd_fast.kernels.attention import flash_attn_varlen
    from dopsd_fast.models.ops import FusedOps

    sh = SHAPES[family]
    D, H, hd, F = sh["dim"], sh["heads"], sh["hd"], sh["ffn"]
    ls, lt = _lens(sh, ragged)
    Ts, Tt = sum(ls), sum(lt)
    B = len(ls)
    ops = FusedOps(attention="triton", gemm="triton")
    e = lambda *s, g=False: torch.empty(*s, dtype=dtype, requires_grad=g)  # noqa: E731
    rows = lambda x: x.view(1, -1, x.shape[-1])  # noqa: E731
    # per-sample modulation; several samples: read per row through the sample index (seq)
    seq_s = torch.repeat_interleave(torch.arange(B), torch.tensor(ls)) if B > 1 else None
    seq_t = torch.repeat_interleave(torch.arange(B), torch.tensor(lt)) if B > 1 else None
    x_s, x_t = e(Ts, D, g=True), e(Tt, D)
    w = e(D)
    # norm + modulation (RMS and LayerNorm), gated residual
    y = ops.rms_mod(rows(x_s), w, e(B, D), 1e-5, seq=seq_s)
    y = ops.gated(rows(x_s), e(B, D), y, seq=seq_s)
    y = y + ops.ln_mod(rows(x_s), e(B, D), 1e-6, seq=seq_s)
    y = y + ops.norm_gated(rows(x_s), e(B, D), rows(e(Ts, D, g=True)), w, 1e-5, seq=seq_s)  # Z-Image residual
    # a residual and the next sublayer's norm in one pass (frozen modulation): Z-Image's form, FLUX.2's
    for kw in (dict(post=(w, 1e-5), weight=w), dict(shift=e(B, D), tanh=False, layer=True)):
        y = y + sum(ops.residual_norm(rows(x_s), e(B, D), rows(e(Ts, D, g=True)), e(B, D), 1e-5, seq=seq_s, **kw))
    with torch.no_grad():
        ops.rms_mod(rows(x_t), w, e(B, D), 1e-5, seq=seq_t)
    y.sum().backward()
    # full fine-tuning: the norm weight and the modulation train too (the kernels that write fp32 partials)
    w_g, m_g = e(D, g=True), e(B, D, g=True)
    y = ops.rms_mod(rows(x_s), w_g, m_g, 1e-5, seq=seq_s)
    y = ops.gated(rows(x_s), m_g, y, seq=seq_s) + ops.ln_mod(rows(x_s), m_g, 1e-6, seq=seq_s)
    y = y + ops.norm_gated(rows(x_s), m_g, rows(e(Ts, D, g=True)), w_g, 1e-5, seq=seq_s)
    y.sum().backward()
    # paired LoRA linears: q/k/v as one group (the student's dx accumulated in place), FFN in and out; in
    # bf16 also the candidates the GPU check times beside the default: the 128 x 256 tile, the TMA kernel
    from dopsd_fast.kernels.multi_lora import gemm_kernel, gemm_tile

    bf16 = dtype == torch.bfloat16
    for kern, tile in ([(k, t) for k in ("pointer", "tma") for t in ((128, 128), (128, 256))] if bf16
                       else [("pointer", (128, 128))]):
        with gemm_kernel(kern), gemm_tile(*tile):
            for n_in, n_outs in ((D, (D, D, D)), (D, (F,)), (F, (D,))):
                xs, xt = e(Ts, n_in, g=True), e(Tt, n_in)
                lo_s = [(e(RANK, n_in, g=True), e(n, RANK, g=True), 2.0) for n in n_outs]
                lo_t = [(e(RANK, n_in), e(n, RANK), 2.0) for n in n_outs]
                outs = ops.paired_linears(xs, xt, [e(n, n_in) for n in n_outs], [None] * len(n_outs), lo_s, lo_t)
                sum(ys.sum() for ys, _ in outs).backward()
                if kern == "tma":  # fast.fp8=native on our GEMM: e4m3 operands, scales and the delta in one pass
                    from dopsd_fast.fp8 import NativeFP8

                    for recipe in ("rowwise", "tensorwise"):
                        outs = ops.paired_linears(xs, xt, [e(n, n_in) for n in n_outs], [None] * len(n_outs), lo_s,
                                                  lo_t, fp8=NativeFP8(recipe))
                        sum(ys.sum() for ys, _ in outs).backward()
    # FP8 rowwise quantization of the linears' inputs (fast.fp8=native), both widths
    from dopsd_fast.kernels.fp8_quant import quantize_rows, quantize_rows_cat

    quantize_rows(e(Ts, D))
    quantize_rows(e(Ts, F))
    # the backward's dy of a group quantized as one (fast.fp8_dgrad): q, k, v rowwise in one launch, w1 / w3,
    # and tensorwise (per-tensor maxima, then the cast)
    quantize_rows_cat([e(Ts, D), e(Ts, D), e(Ts, D)])
    quantize_rows_cat([e(Ts, F), e(Ts, F)])
    quantize_rows_cat([e(Ts, D), e(Ts, F)], False)
    # SwiGLU
    a, b = e(Ts, F, g=True), e(Ts, F, g=True)
    ops.swiglu(a, b).sum().backward()
    ops.swiglu(*e(Ts, 2 * F, g=True).chunk(2, -1)).sum().backward()  # the halves of one projection, in place
    # RoPE + QK RMSNorm (packed (1, T, H, hd))
    q, k = e(1, Ts, H, hd, g=True), e(1, Ts, H, hd, g=True)
    cos, sin = torch.empty(Ts, hd // 2), torch.empty(Ts, hd // 2)
    oq, ok = ops.rope_qk(q, k, e(hd), e(hd), cos, sin, 1e-5)
    (oq.sum() + ok.sum()).backward()
    # attention: both branches in one launch, and the single-branch call (checkpointed / graph paths)
    cu_s, cl_s = _cu(ls)
    cu_t, cl_t = _cu(lt)
    qs, ks, vs = (e(Ts, H, hd, g=True) for _ in range(3))
    qt, kt, vt = (e(Tt, H, hd) for _ in range(3))
    o_s, o_t = ops.attention_pair((qs, ks, vs, cu_s, cl_s), (qt, kt, vt, cu_t, cl_t))
    o_s.sum().backward()
    o, _ = flash_attn_varlen(qs, ks, vs, cu_s, cu_s, max_seqlen_q=max(ls), max_seqlen_k=max(ls))
    o.sum().backward()


SCENARIOS = {
    "zimage-bf16": ("zimage", False, torch.bfloat16),
    "zimage-ragged-bf16": ("zimage", True, torch.bfloat16),
    "klein4b-bf16": ("klein4b", False, torch.bfloat16),
    "klein9b-ragged-bf16": ("klein9b", True, torch.bfloat16),
    "tiny-fp32": ("tiny-fp32", True, torch.float32),
}


# ---- self-test: the gate must catch what it claims to catch --------------------------------------
@triton.jit
def _selftest_type_error(X, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    x, _ = tl.load(X + rows), rows < n  # `_` is a BLOCK_M mask ...
    for i in range(0, n, BLOCK_N):
        cols = i + tl.arange(0, BLOCK_N)
        y, _ = tl.load(X + cols), cols < n  # ... re-assigned a BLOCK_N mask: the front end refuses
        x += tl.sum(y)
    tl.store(X + rows, x)


@triton.jit
def _selftest_spill(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs).to(tl.float32)  # BLOCK values per thread, all live across the reduction
    tl.store(X + offs, (x / tl.sum(x * x)).to(X.dtype.element_ty))


def selftest(rec: Recorder) -> int:
    """A kernel with a front-end type error and a bf16 kernel that spills must both be flagged."""
    x = torch.empty(8192, dtype=torch.bfloat16)
    rec.scenario = "selftest-bf16"
    caught_error = False
    try:
        _selftest_type_error[(1,)](x, 64, BLOCK_M=128, BLOCK_N=64)
    except Exception as exc:  # noqa: BLE001
        caught_error = "Loop-carried variable" in str(exc)
    _selftest_spill[(1,)](x, BLOCK=8192, num_warps=1)
    rows = analyse(rec.launches, rec.ptxas_logs)
    spill = [r for r in rows if r.kernel == "_selftest_spill"]
    caught_spill = bool(spill) and any("spills" in f for f in spill[0].failures)
    print(f"self-test: front-end type error caught: {caught_error}; bf16 spill flagged: {caught_spill} "
          f"({spill[0].spill_bytes if spill else '?'} B, {spill[0].registers if spill else '?'} registers)")
    return 0 if caught_error and caught_spill else 1


# ---- main ---------------------------------------------------------------------------------------
@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    scenarios: list
    num_warps: int
    num_stages: int
    registers: int | None
    spill_bytes: int
    shared_bytes: int
    dots: str
    n_dots: int
    advisories: list
    failures: list


def _config_str(c: dict) -> str:
    keep = {k: v for k, v in c.items() if (k.isupper() or k.startswith("BLOCK")) and k not in ("IEEE", "UPCAST")}
    return " ".join(f"{k}={v}" for k, v in sorted(keep.items()))


def analyse(launches: list[Launch], logs: dict) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for ln in launches:
        dtype = "bf16" if "bf16" in ln.scenario else "fp32"
        key = (ln.kernel, _config_str(ln.constexprs), ln.num_warps, ln.num_stages, dtype, id(ln.compiled))
        if key in rows:
            if ln.scenario not in rows[key].scenarios:
                rows[key].scenarios.append(ln.scenario)
            continue
        asm = ln.compiled.asm
        px = ptxas_report(logs.get(id(ln.compiled), ""))
        dots, n = dot_lowering(asm)
        shared = int(ln.compiled.metadata.shared)
        fails = []
        if px["registers"] is None:
            fails.append("no ptxas report (register count unknown)")
        if dtype == "bf16":
            if px["spill_bytes"]:
                fails.append(f"spills {px['spill_bytes']} B")
            if n and dots != "wgmma":
                fails.append(f"dot lowered to {dots}, not wgmma")
        if shared > SMEM_LIMIT:
            fails.append(f"shared memory {shared} B > {SMEM_LIMIT}")
        if "_tma" in ln.kernel and "cp.async.bulk.tensor" not in asm.get("ptx", ""):
            fails.append("a tensor-descriptor kernel whose loads are not TMA copies (no cp.async.bulk.tensor)")
        rows[key] = Row(ln.kernel, _config_str(ln.constexprs), dtype, [ln.scenario], ln.num_warps, ln.num_stages,
                        px["registers"], px["spill_bytes"], shared, dots, n, px["advisories"], fails)
    # one row per distinct compiled binary: merge rows that differ only by the binary object
    merged: dict[tuple, Row] = {}
    for r in rows.values():
        k = (r.kernel, r.config, r.num_warps, r.num_stages, r.dtype, r.registers, r.spill_bytes, r.shared_bytes)
        if k in merged:
            merged[k].scenarios += [s for s in r.scenarios if s not in merged[k].scenarios]
        else:
            merged[k] = r
    return sorted(merged.values(), key=lambda r: (r.kernel, r.dtype, r.config))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run the scenarios whose name contains this text")
    p.add_argument("--json", default=None, help="write the rows and the verdict here")
    p.add_argument("--selftest", action="store_true", help="check that the gate flags a broken and a spilling kernel")
    args = p.parse_args(argv)

    rec = Recorder()
    rec.install()
    if args.selftest:
        return selftest(rec)
    entries = entry_kernels()
    errors = []
    t0 = time.time()
    torch.manual_seed(0)
    for name, (family, ragged, dtype) in SCENARIOS.items():
        if args.only and args.only not in name:
            continue
        rec.scenario = name
        t1 = time.time()
        try:
            scenario(family, ragged, dtype)
            print(f"[{time.time() - t0:6.1f} s] {name}: compiled ({time.time() - t1:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - every compile error is a finding, reported in full
            msg = f"{type(exc).__name__}: {exc}"
            errors.append(f"{name}: {msg.splitlines()[0] if msg else type(exc).__name__}")
            print(f"[{time.time() - t0:6.1f} s] {name}: COMPILE ERROR\n{msg}", flush=True)
            traceback.print_exc(limit=3)
    rows = analyse(rec.launches, rec.ptxas_logs)

    hdr = ("kernel", "dtype", "config", "warps", "stages", "regs", "spill B", "smem B", "dots", "verdict")
    table = [hdr] + [(r.kernel, r.dtype, r.config, str(r.num_warps), str(r.num_stages), str(r.registers),
                      str(r.spill_bytes), str(r.shared_bytes), f"{r.dots} x{r.n_dots}" if r.n_dots else "-",
                      "FAIL: " + "; ".join(r.failures) if r.failures else "ok") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(hdr))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        for a in r.advisories:
            print(f"ptxas advisory, {r.kernel} ({r.config}): {a}")

    launched = {r.kernel for r in rows}
    missing = sorted(n for n in entries if n not in launched) if not args.only else []
    failures = errors + [f"{r.kernel} [{r.dtype}, {r.config}]: {f}" for r in rows for f in r.failures]
    failures += [f"entry kernel {entries[n]}.{n} is launched by no scenario (add it to the gate)" for n in missing]
    verdict = "FAIL" if failures else "PASS"
    print(f"\ncompile gate (sm_90a, triton {triton.__version__}, {len(rows)} kernel binaries, "
          f"{len(launched)}/{len(entries)} entry kernels, {time.time() - t0:.0f} s): {verdict}")
    for f in failures:
        print(f"  - {f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90a", "verdict": verdict, "failures": failures,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
