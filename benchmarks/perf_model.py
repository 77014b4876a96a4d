"""A real-size performance and memory model of one D-OPSD step, on the CPU, with fake tensors.

One whole optimizer step (roll-out of K states, teacher on every state, loss, backward, AdamW, EMA)
of the eager reference and of the fast path runs at the real size (Z-Image-Turbo 6.15 B, FLUX.2-klein
4B / 9B) under ``FakeTensorMode``: shapes, dtypes and every op, no data and no memory. A dispatch
mode counts, per region (forwards, backward, optimizer, EMA) and op kind: FLOPs, bytes read + written,
kernel launches, and the peak of live memory (saved activations, temporaries, gradients, optimizer
state; the weights excluded). Every op (and every pass inside a fused op: a launch of its own) takes
``launches x launch cost + max(FLOPs / rate, bytes / bandwidth)``. Rates, two ways:

* stated (the default): GEMM 700 TFLOP/s, attention 350 / 280 TFLOP/s forward / backward, 2.7 TB/s,
  5 us per launch;
* calibrated (``--calibration FILE``, ``benchmarks/calibration/``): derived from a GPU run's measurements
  (``benchmarks/gpu_check.py`` m1, m2, the step and graphs rows), the file naming the GPU, date and
  commit: GEMMs per shape and implementation (cuBLAS, ours), attention per backend (ours, SDPA flash,
  SDPA cuDNN), memory passes at the measured device-copy bandwidth, launches at the measured saving of
  CUDA graphs per launch. What no run measured is priced at a measured rate of the same kind of work
  (never at a target). ``--compare`` sets the model beside the steps that file measured. FP8 GEMMs,
  never measured: at the bf16 rate, and an ESTIMATE range at that rate x 1.4 / 1.7 / 2.0
  (``FP8_GEMM_SPEEDUPS``), which the GPU check's fp8 stage confirms or refutes.

These are MODEL figures: a GPU confirms.

What differs from a GPU run, and how it is handled:
* fake CPU tensors (on a CPU-only torch, fake CUDA tensors abort in the backward): the eager path runs
  under CPU bf16 autocast, which casts matmuls like CUDA autocast; SDPA dispatches to its CPU flash
  variant, priced at the rates of the attention backend named;
* our fused kernels are ``torch.library.custom_op``s, seen as ONE op: each states its own FLOPs,
  bytes, launches and scratch (``dopsd_fast.kernels._common.COSTS``, beside its registration), and
  where it launches several kernels, each of them (``cost["passes"]``: the paired LoRA linears);
* the fast path's shape-dependent host work (packing layout, offsets) is plain Python on real
  tensors, so attention FLOPs per sample are exact;
* the weights' storages are known to the counter before the step, so a view of a weight (the
  transpose inside ``F.linear``, a ``detach()``) is not counted as step memory.

    python benchmarks/perf_model.py --preset zimage-6b                 # eager + fast, once + stepwise
    python benchmarks/perf_model.py --preset klein-4b --paths fast --backward stepwise --json out.json
    python benchmarks/perf_model.py --preset klein-9b --paths fast --checkpoint all   # checkpointing's cost
    python benchmarks/perf_model.py --preset zimage-6b --paths fast --teacher-graph   # the graphed teacher
    python benchmarks/perf_model.py --paths fast --backward stepwise --traffic        # every non-GEMM pass
    python benchmarks/perf_model.py --compare          # calibrated model vs the H200's measured steps
    python benchmarks/perf_model.py --calibrate-from benchmarks/results/DATE-GPU/results.json \
        --write benchmarks/calibration/GPU-DATE.json   # a new GPU run's measurements as a calibration
    python benchmarks/perf_model.py --calibrate        # dopsd_fast.memory's constants (~4 min)
    python benchmarks/perf_model.py --preset zimage-6b --paths fast --backward stepwise --memory  # the peak's makeup
"""

from __future__ import annotations

import argparse
import contextlib
import json
import importlib.util
import os
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

if __name__ == "__main__":  # as a script: no kernel runs here (fake tensors reach the ops' fake functions),
    os.environ.pop("TRITON_INTERPRET", None)  # so none needs interpreting; imported, the caller's setting stays

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # step_time, beside this file
if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from dopsd_fast.kernels import CUBLAS_FAST  # noqa: E402  (a cost pass's impl: _scaled_mm, fast accumulation)

# FP8 GEMMs (fast.fp8=native) have no GPU measurement yet. Calibrated runs price them at the measured
# bf16 rate of the same shape and implementation (no gain: the stated prediction), and beside it give
# an ESTIMATE as a range, the measured bf16 rate times these ratios: 1.4 and 1.7, the GEMM-level FP8
# gains published for large GEMMs on an H200 (TransformerEngine; performance.md), and 2.0, the
# spec-sheet ratio (1979 / 989 TFLOP/s dense), a ceiling no stack reaches. The GPU check's fp8 stage
# (benchmarks/gpu_check.py) measures the real step.
FP8_GEMM_SPEEDUPS = {"published GEMM-level low": 1.4, "published GEMM-level high": 1.7, "spec-sheet ceiling": 2.0}

RATES = {"gemm": 700e12, "gemm_fp8": 1400e12, "attn_fwd": 350e12, "attn_bwd": 280e12, "bandwidth": 2.7e12,
         "launch": 5e-6}
DEFAULT_CALIBRATION = HERE / "calibration" / "h200-2026-12-04.json"
GPU_MEMORY_GB = {"h100": 80.0, "h200": 141.0, "a100-80": 80.0, "l40s": 48.0, "4090": 24.0}
_FREE = {"aten::detach", "aten::alias", "aten::lift_fresh", "aten::_to_copy_meta", "aten::set_",
         "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
         "aten::_local_scalar_dense", "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::is_same_size",
         "aten::_has_compatible_shallow_copy_type", "aten::resize_", "aten::_unsafe_view", "aten::view",
         "aten::reshape", "aten::_reshape_alias"}


_FACTORIES = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
              "scalar_tensor", "arange", "randn", "rand", "randn_like", "rand_like"}


GRAPH_REGION = "teacher forward (CUDA graph replay)"


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _bytes(ts) -> int:
    return sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes() or t.numel() * t.element_size())
               for t in ts)


def _sdpa_flops(name, args, out) -> tuple[float, str] | None:
    """Flash-style attention FLOPs from the q/k/v shapes (B, H, L, D) of any SDPA variant."""
    if "scaled_dot_product" not in name and "flash_attention" not in name:
        return None
    ts = [t for t in _tensors(args) if t.ndim == 4]
    if len(ts) < 3:
        return 0.0, "attn_fwd"
    if "backward" in name:  # (grad_out, q, k, v, ...)
        q, k = ts[1], ts[2]
        B, H, Lq, D = q.shape
        return 2.5 * 4.0 * B * H * Lq * k.shape[2] * D, "attn_bwd"
    q, k = ts[0], ts[1]
    B, H, Lq, D = q.shape
    return 4.0 * B * H * Lq * k.shape[2] * D, "attn_fwd"


_GEMM_OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1), "aten::baddbmm": (1, 2),
                  "aten::_scaled_mm": (0, 1)}


def _gemm_shape(name: str, args) -> tuple[int, int, int] | None:
    """(rows, inner, out) of an aten GEMM (batched: batch x rows), or None."""
    ix = _GEMM_OPERANDS.get(name)
    if ix is None:
        return None
    a, b = args[ix[0]], args[ix[1]]
    rows = a.shape[0] * a.shape[1] if a.ndim == 3 else a.shape[0]
    return int(rows), int(a.shape[-1]), int(b.shape[-1])


class Pricing:
    """Seconds of one op or pass: ``launches x launch + max(FLOPs / rate, bytes / bandwidth)``.

    Stated rates (``rates``) unless ``calibration`` (what :func:`derive_rates` makes of a calibration
    file) is given: then GEMMs per (inner, out) shape and implementation ("cublas", "triton"; an FP8
    GEMM's also "cublas_fast", ``_scaled_mm`` with fast accumulation, by its own rows where measured; a shape
    no run measured at the slowest measured rate of its implementation), attention at the measured
    rates of ``attention`` ("triton": ours, "flash", "cudnn"), memory at the measured copy bandwidth,
    launches at the measured cost per launch; FP8 GEMMs at the fp8 stage's measured rates, or unmeasured
    at the bf16 rate, flagged, or with ``fp8_speedup`` at that rate times the factor (an ESTIMATE:
    :data:`FP8_GEMM_SPEEDUPS`)."""

    def __init__(self, rates=RATES, calibration: dict | None = None, attention: str = "triton",
                 fp8_speedup: float | None = None):
        self.rates, self.cal, self.attention = dict(rates), calibration, attention
        self.fp8_speedup = fp8_speedup
        self.fp8_recipe = "rowwise"  # the recipe whose measured FP8 rates price FP8 GEMMs (fast.fp8_recipe)
        self.bandwidth = calibration["bandwidth"] if calibration else rates["bandwidth"]
        self.launch = calibration["launch_s"] if calibration else rates["launch"]
        self.in_situ = calibration.get("in_situ", 1.0) if calibration else 1.0
        self.unmeasured: set = set()  # what was priced at another measurement's rate (reported)

    def gemm_rate(self, shape=None, impl=None) -> float:
        if self.cal is None:
            return self.rates["gemm"]
        table = self.cal["gemm"].get(impl or "cublas") or self.cal["gemm"]["cublas"]
        if shape is not None:
            hit = table.get(f"{shape[1]}x{shape[2]}")
            if hit is not None:
                return hit
        return min(table.values())

    def rate(self, kind: str, shape=None, impl=None) -> float | None:
        if kind == "memory":
            return None
        if kind == "gemm":
            return self.gemm_rate(shape, impl)
        if kind == "gemm_fp8":
            if self.cal is None:
                return self.rates["gemm_fp8"]
            # ours (the TMA kernel, fast.gemm=triton) by its own measurement, cuBLAS's _scaled_mm by its
            measured = (self.cal.get("gemm_fp8_ours" if impl == "triton" else "gemm_fp8") or {}).get(self.fp8_recipe)
            if impl == CUBLAS_FAST:  # the forward's _scaled_mm with fast accumulation: its own rows where the
                fast = (self.cal.get("gemm_fp8_fast") or {}).get(self.fp8_recipe) or {}  # run timed them, else
                measured = {**(measured or {}), **fast} or None  # the promoted form's rate (slower: conservative)
            if measured and self.fp8_speedup is None:  # the fp8 stage's rates: this (inner, out) at the
                same = {int(k.split("x")[0]): v for k, v in measured.items()  # nearest measured row count
                        if shape is not None and k.split("x", 1)[1] == f"{shape[1]}x{shape[2]}"}
                if not same:
                    self.unmeasured.add("FP8 GEMMs of an unmeasured shape: at the slowest measured FP8 rate")
                    return min(measured.values())
                return same[min(same, key=lambda m: abs(m - shape[0]))]
            if self.fp8_speedup is not None:
                self.unmeasured.add(f"FP8 GEMMs: ESTIMATE, the measured bf16 GEMM rate x {self.fp8_speedup:g} "
                                    "(no FP8 measurement)")
                return self.gemm_rate(shape, impl) * self.fp8_speedup
            self.unmeasured.add("FP8 GEMMs: no FP8 measurement, priced at the bf16 GEMM rate")
            return self.gemm_rate(shape, impl)
        if self.cal is None:
            return self.rates[kind]
        return self.cal["attention"][self.attention][kind]

    def seconds(self, kind, flops, byts, launches, shape=None, impl=None) -> float:
        rate = self.rate(kind, shape, impl)
        return launches * self.launch + self.in_situ * max(flops / rate if rate else 0.0, byts / self.bandwidth)

    def describe(self) -> str:
        if self.cal is None:
            r = self.rates
            return (f"stated rates: GEMM {r['gemm'] / 1e12:.0f} TFLOP/s, attention {r['attn_fwd'] / 1e12:.0f}/"
                    f"{r['attn_bwd'] / 1e12:.0f} fwd/bwd, {r['bandwidth'] / 1e12:.1f} TB/s, {r['launch'] * 1e6:.0f} "
                    "us/launch")
        src = self.cal["source"]
        att = self.cal["attention"][self.attention]
        gem = ", ".join(f"{impl} " + "/".join(f"{v / 1e12:.0f}" for v in t.values())
                        for impl, t in self.cal["gemm"].items())
        return (f"calibrated on {src['gpu']} {src['date']} (commit {src['commit']}): GEMM {gem} TFLOP/s by shape; "
                f"attention ({self.attention}) {att['attn_fwd'] / 1e12:.0f}/{att['attn_bwd'] / 1e12:.0f} fwd/bwd; "
                f"{self.bandwidth / 1e12:.2f} TB/s; {self.launch * 1e6:.2f} us/launch; in-situ x{self.in_situ:.3f}")


class StepCounter(TorchDispatchMode):
    """Counts every op between ``start()`` and the end, per region and kind, and tracks live memory.
    ``traffic``: the bytes of every memory-kind op and pass (non-GEMM, non-attention), by region and
    name; ``bytes_bound_gemms``: GEMM calls whose bytes take longer than their FLOPs (rank-sized)."""

    def __init__(self, rates=RATES, pricing: Pricing | None = None):
        super().__init__()
        from dopsd_fast.kernels import _common

        self.costs = _common.COSTS
        self.pricing = pricing or Pricing(rates)
        self.rates = self.pricing.rates
        self.region = "other"
        self.table = defaultdict(lambda: defaultdict(float))  # (region, kind) -> totals
        self.ops = defaultdict(lambda: defaultdict(float))  # op name -> totals
        self.traffic = defaultdict(lambda: defaultdict(float))  # (region, pass or op name) -> totals
        self.bytes_bound_gemms = defaultdict(lambda: defaultdict(float))
        self.live = 0
        self.peak = 0
        self.peak_region = ""
        self._seen: dict[int, int] = {}
        # live bytes by where each storage was made (region, op), and that split at the peak (the
        # memory model's terms: benchmarks/perf_model.py --memory)
        self.live_by = defaultdict(int)
        self.peak_by: dict = {}
        self._op = ""
        self.fp8_gemms: list = []  # (flops, bytes, launches, shape, impl) of every FP8 GEMM: repriced by fp8_range
        self.paused = False  # ops run but are not counted (one-time work outside the step: weights quantized)

    @contextlib.contextmanager
    def in_region(self, name):
        prev, self.region = self.region, name
        try:
            yield
        finally:
            self.region = prev

    def _free(self, key, n, where):
        if self._seen.pop(key, None) is not None:
            self.live -= n
            self.live_by[where] -= n

    def _track(self, out, scratch=0):
        where = (self.region, self._op)
        for t in _tensors(out):
            st = t.untyped_storage()
            key = id(st)
            if key in self._seen:
                continue
            n = st.nbytes()
            self._seen[key] = n
            self.live += n
            self.live_by[where] += n
            weakref.finalize(st, self._free, key, n, where)
        if self.live + scratch > self.peak:
            self.peak, self.peak_region = self.live + scratch, self.region
            self.peak_by = {k: v for k, v in self.live_by.items() if v}
            if scratch:
                self.peak_by[(self.region, self._op + " (scratch)")] = scratch

    def _add(self, op_name, pass_name, kind, flops, byts, launches, shape=None, impl=None):
        if self.region == GRAPH_REGION:  # inside a CUDA graph: no launch of its own (one replay, counted apart)
            launches = 0
        t = self.pricing.seconds(kind, flops, byts, launches, shape, impl)
        if kind == "gemm_fp8":
            self.fp8_gemms.append((flops, byts, launches, shape, impl))
        rows = [self.table[(self.region, kind)], self.ops[op_name]]
        if kind == "memory":
            rows.append(self.traffic[(self.region, pass_name)])
        elif kind.startswith("gemm") and byts / self.pricing.bandwidth > flops / self.pricing.rate(kind, shape, impl):
            rows.append(self.bytes_bound_gemms[(self.region, pass_name)])
        for row in rows:
            row["flops"] += flops
            row["bytes"] += byts
            row["launches"] += launches
            row["time_s"] += t
            row["calls"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = func.name()
        self._op = name
        if func.is_view or name in _FREE or name.startswith("prim::") or getattr(func, "_schema", None) is None:
            self._track(out)
            return out
        scratch = 0
        if name in self.costs:
            c = self.costs[name](*args, **kwargs)
            scratch = c["scratch"]
            for p in c.get("passes") or [dict(name=name, kind=c["kind"], flops=c["flops"], bytes=c["bytes"],
                                              launches=c["launches"])]:
                self._add(name, p["name"], p["kind"], p["flops"], p["bytes"], p["launches"], p.get("shape"),
                          p.get("impl"))
        else:
            # a factory (zeros, ones, full, *_like) reads nothing: only its output counts
            factory = name.split("::")[-1].split(".")[0] in _FACTORIES
            byts = (0 if factory else _bytes(_tensors((args, kwargs)))) + _bytes(_tensors(out))
            if out is None:  # an in-place op that returns nothing (_foreach_*_, _fused_adamw_): its writes
                byts += _bytes(_tensors(_written(func, args, kwargs)))
            sd = _sdpa_flops(name, args, out)
            shape = None
            if sd is not None:
                flops, kind = sd
            elif func.overloadpacket in flop_registry:
                flops, kind = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)), "gemm"
                shape = _gemm_shape(name, args)
            else:
                flops, kind = 0.0, "memory"
            self._add(name, name, kind, flops, byts, 1, shape, "cublas" if kind == "gemm" else None)
        self._track(out, scratch)
        return out


# ---- calibration: a GPU run's measurements -> rates ------------------------------------------------
def load_calibration(path) -> dict:
    """A calibration file (``benchmarks/calibration/*.json``): the measured rows of one GPU run and where
    they come from. One line naming the file and field on a problem."""
    path = Path(path)
    try:
        cal = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"perf_model: calibration {path}: {exc}")
    for key in ("source", "paired_linear", "attention", "launch", "steps"):
        if key not in cal:
            raise SystemExit(f"perf_model: calibration {path}: no '{key}' field (write it with --calibrate-from)")
    for key in ("gpu", "date", "commit", "report"):
        if key not in cal["source"]:
            raise SystemExit(f"perf_model: calibration {path}: source.{key} missing (every rate names its source)")
    return cal


# m2's variants -> (implementation, the cuBLAS form's order of the LoRA delta): "ours: stacked on cuBLAS" is
# the paired op's cuBLAS form as it ran until the delta went first (its rows in the 2026-12-04 calibration)
_GEMM_IMPL = {"ours: stacked on cuBLAS": ("cublas", "after"),
              "ours: paired on cuBLAS, delta first": ("cublas", "first"),
              "ours: Triton paired GEMM": ("triton", "first")}
_TRITON_CANDIDATE = "ours: Triton paired GEMM, "  # m2's candidate rows: "..., 128 x 256 tiles", "..., TMA persistent"
_ATTENTION = {"ours: both branches, one launch": "triton", "SDPA flash (two calls)": "flash",
              "SDPA cuDNN (two calls)": "cudnn"}


def _paired_forward_passes(row, impl, delta):
    from dopsd_fast.kernels.multi_lora import paired_fwd_passes

    return [p for m in (int(x) for x in row["rows"].split("+"))
            for p in paired_fwd_passes(m, row["K"], [row["N"]], row["rank"], 2, impl, delta=delta)]


def _attention_flops(row, backend) -> dict:
    """FLOPs the model counts for m1's call (student + teacher forward, the student's backward) in
    the convention of the op the model sees for ``backend``: our ops' own costs, SDPA's flash count."""
    H, D, Ts, Tt = row["heads"], row["head_dim"], row["tokens_student"], row["tokens_teacher"]
    if backend == "triton":
        from dopsd_fast.kernels._common import COSTS
        import dopsd_fast.kernels.attention  # noqa: F401  (registers the ops' costs)

        meta = lambda n: torch.empty(n, H, D, device="meta", dtype=torch.bfloat16)  # noqa: E731
        cu = lambda n: torch.tensor([0, n], dtype=torch.int32)  # noqa: E731
        e, z = meta(0), torch.zeros(2, dtype=torch.int32)
        fwd = COSTS["dopsd_fast::dual_branch_attention"](meta(Ts), meta(Tt), e, e, meta(Ts), meta(Ts), meta(Tt),
                                                         meta(Tt), cu(Ts), cu(Tt), z, cu(Ts), cu(Tt), Tt, 0, Ts, Tt,
                                                         D ** -0.5)["flops"]
        lse = torch.empty(H, Ts, device="meta")
        bwd = COSTS["dopsd_fast::attn_varlen_backward"](meta(Ts), meta(Ts), meta(Ts), lse, e, e, meta(Ts), meta(Ts),
                                                        cu(Ts), z, cu(Ts), Ts, 0, Ts, D ** -0.5)["flops"]
        return {"attn_fwd": fwd, "attn_bwd": bwd}
    one = lambda n: torch.empty(1, H, n, D, device="meta")  # noqa: E731
    fwd = sum(_sdpa_flops("aten::scaled_dot_product_attention", (one(n), one(n), one(n)), None)[0] for n in (Ts, Tt))
    bwd = _sdpa_flops("aten::_scaled_dot_product_flash_attention_backward", (one(Ts),) * 4, None)[0]
    return {"attn_fwd": fwd, "attn_bwd": bwd}


_DERIVED: dict = {}


def derive_rates(cal: dict, in_situ: bool = True) -> dict:
    """Rates from a calibration file's measured rows (each with the row it comes from):

    * bandwidth: m2's device copy (bytes read + written per second), the median over its sizes;
    * GEMM per implementation and (inner, out) shape: m2's paired forward at that shape, less the
      model's time for its other passes (u = s x A^T, the delta's second call, fills) and launches:
      the base GEMM's rate. The backward's dX GEMM (inner N, out K) takes the forward rate of the same
      (inner, out) problem, which m2 measured for every block shape (3840 -> 10240's dX is the
      10240 -> 3840 forward problem);
    * attention per backend: m1's forward (both branches) and backward (the student's), in FLOPs of
      the convention of the op the model sees (ours counts its backward at 3.5x the forward);
    * launch and in-situ factor, from the graphs row (a no-grad sampling roll-out of the student,
      launched and through CUDA graphs), modelled here at the rates above: the graphs' saving per
      launch is the cost of one launch; the graphed (GPU-bound) roll-out over the model's time of its
      ops is the in-situ factor, what the per-op microbenchmarks leave out when the ops run back to
      back in a whole model (``in_situ=False``: 1).

    The roll-out is modelled in the paired linears' cuBLAS form that ran it (:func:`measured_form`).
    Derived once per file and process (the in-situ factor models the roll-out: ~20 s)."""
    key = (json.dumps(cal, sort_keys=True), in_situ)
    if key in _DERIVED:
        return _DERIVED[key]
    with measured_form(cal):
        out = _derive_rates(cal, in_situ)
    _DERIVED[key] = out
    return out


@contextlib.contextmanager
def measured_form(cal: dict):
    """The step in the form the calibration's GPU run executed: the paired op's cuBLAS form with the LoRA
    delta after the base GEMM (a second call re-reading the output) until the delta went first (a file
    from a later run says which: ``paired_cublas_delta``, an earlier one is "after"); a block's residual
    and the next norm as two kernels and an add of out's gradients until they were fused (a later file
    says ``residual_norm_fused``)."""
    from dopsd_fast.kernels.multi_lora import costs_of_form
    from dopsd_fast.models.ops import FusedOps

    prev = FusedOps.fuse_residual_norm
    FusedOps.fuse_residual_norm = bool(cal.get("residual_norm_fused", False))
    try:
        with costs_of_form(cal.get("paired_cublas_delta", "after")):
            yield
    finally:
        FusedOps.fuse_residual_norm = prev


def _derive_rates(cal: dict, in_situ: bool) -> dict:
    copy = sorted({(r["copy_bytes"], r["copy_ms"]) for r in cal["paired_linear"]})
    speeds = sorted(b / (ms * 1e-3) for b, ms in copy)
    bandwidth = speeds[len(speeds) // 2]
    out = {"source": cal["source"], "bandwidth": bandwidth, "launch_s": 0.0, "gemm": {}, "attention": {},
           "in_situ": 1.0, "derivation": [f"bandwidth: m2 device copy, median of {len(speeds)} sizes -> "
                                          f"{bandwidth / 1e12:.2f} TB/s"]}
    launch = cal["launch"]
    launches = model_sampling("zimage-6b", attention="sdpa")["total"]["launches"]
    out["launch_s"] = launch_s = (launch["launched_s"] - launch["graphs_s"]) / launches
    out["derivation"].append(f"launch: graphs row ({launch['launched_s']:.4f} - {launch['graphs_s']:.4f} s) / "
                             f"{int(launches)} launches of the roll-out (model) -> {launch_s * 1e6:.2f} us")
    probe = Pricing(calibration={**out, "gemm": {"cublas": {"-": 1e30}}})
    for row in cal["paired_linear"]:
        impl, delta = _GEMM_IMPL.get(row["variant"], (None, None))
        # a Triton candidate (another tile, the TMA kernel): its rate is derived and shown, not priced, since
        # the fast path launches the default kernel (multi_lora.KERNEL, TILE)
        candidate = impl is None and row["variant"].startswith(_TRITON_CANDIDATE)
        if impl is None and not candidate:
            continue
        passes = _paired_forward_passes(row, impl or "triton", delta or "first")
        base = [p for p in passes if p["kind"] == "gemm" and p["shape"][2] == row["N"]]
        other = sum(probe.seconds(p["kind"], 0.0, p["bytes"], p["launches"]) for p in passes if p not in base)
        left = row["fwd_ms"] * 1e-3 - other - sum(p["launches"] for p in base) * launch_s
        rate = sum(p["flops"] for p in base) / left
        shape = f"{row['K']}x{row['N']}"
        if candidate:
            out.setdefault("gemm_candidates", {}).setdefault(row["variant"], {})[shape] = rate
        else:
            out["gemm"].setdefault(impl, {})[shape] = rate
        out["derivation"].append(f"GEMM {'candidate, not priced' if candidate else impl} {shape}: m2 "
                                 f"'{row['variant']}' forward {row['fwd_ms']:.3f} ms, other passes "
                                 f"{other * 1e3:.3f} ms -> {rate / 1e12:.0f} TFLOP/s")
    for row in cal.get("gemm_rate", []):  # m2's plain cuBLAS GEMMs: shown, not priced (the paired rows price)
        rate = 2.0 * row["M"] * row["K"] * row["N"] / (row["ms"] * 1e-3)
        out.setdefault("gemm_plain", {})[f"{row['M']}x{row['K']}x{row['N']} {row['layout']}"] = rate
        out["derivation"].append(f"cuBLAS mm {row['M']}x{row['K']}x{row['N']}, {row['layout']} (not priced): "
                                 f"{row['ms']:.3f} ms -> {rate / 1e12:.0f} TFLOP/s")
    for row in cal["attention"]:
        backend = _ATTENTION.get(row["variant"])
        if backend is None:
            continue
        flops = _attention_flops(row, backend)
        out["attention"][backend] = {"attn_fwd": flops["attn_fwd"] / (row["fwd_ms"] * 1e-3),
                                     "attn_bwd": flops["attn_bwd"] / (row["bwd_ms"] * 1e-3)}
        out["derivation"].append(f"attention {backend}: m1 '{row['variant']}' {row['fwd_ms']:.3f} / "
                                 f"{row['bwd_ms']:.3f} ms "
                                 f"-> {out['attention'][backend]['attn_fwd'] / 1e12:.0f} / "
                                 f"{out['attention'][backend]['attn_bwd'] / 1e12:.0f} TFLOP/s (model's FLOP count)")
    for row in cal.get("fp8_gemm", []):  # the fp8 stage's torch._scaled_mm at the step's shapes, as measured
        fl, key = 2.0 * row["M"] * row["K"] * row["N"], f"{row['M']}x{row['K']}x{row['N']}"
        rates = {recipe: fl / (row[f"{recipe}_ms"] * 1e-3) for recipe in ("rowwise", "tensorwise")}
        for recipe, rate in rates.items():  # keyed rows x inner x out (the rows matter for FP8's small M)
            out.setdefault("gemm_fp8", {}).setdefault(recipe, {})[key] = rate
        out["derivation"].append(f"FP8 GEMM {key} at {row['M']} rows: fp8 stage rowwise {row['rowwise_ms']:.3f} ms, "
                                 f"tensorwise {row['tensorwise_ms']:.3f} ms -> {rates['rowwise'] / 1e12:.0f} / "
                                 f"{rates['tensorwise'] / 1e12:.0f} TFLOP/s")
        fast = {recipe: fl / (row[f"{recipe}_fast_ms"] * 1e-3) for recipe in ("rowwise", "tensorwise")
                if f"{recipe}_fast_ms" in row}  # a forward shape, timed with use_fast_accum=True as it runs
        for recipe, rate in fast.items():
            out.setdefault("gemm_fp8_fast", {}).setdefault(recipe, {})[key] = rate
        if fast:
            out["derivation"].append(f"FP8 GEMM {key}, fast accumulation (the forward's): "
                                     + " / ".join(f"{recipe} {row[f'{recipe}_fast_ms']:.3f} ms" for recipe in fast)
                                     + " -> " + " / ".join(f"{v / 1e12:.0f}" for v in fast.values()) + " TFLOP/s")
        if "ours_rowwise_delta_ms" in row:  # ours (TMA kernel) with its rank-r delta in the tile: the whole
            ours = fl / (row["ours_rowwise_delta_ms"] * 1e-3)  # time on the FP8 FLOPs (the delta, priced again
            table = out.setdefault("gemm_fp8_ours", {}).setdefault("rowwise", {})  # at bf16: conservative)
            table[key] = min(ours, table.get(key, ours))  # a forward (fast accumulation) and a dX GEMM (promoted)
            # of the same dimensions: the slower prices both
            out["derivation"].append(f"FP8 GEMM {key}, ours with the rank-{row.get('rank', '?')} delta in its tile: "
                                     f"{row['ours_rowwise_delta_ms']:.3f} ms (cuBLAS form with the delta after: "
                                     f"{row.get('rowwise_delta_ms', float('nan')):.3f} ms) -> {ours / 1e12:.0f} "
                                     "TFLOP/s")
    if in_situ:
        r = model_sampling("zimage-6b", attention="sdpa", calibration=out)
        ops = r["total"]["time_s"] - r["total"]["launches"] * launch_s
        out["in_situ"] = launch["graphs_s"] / ops
        out["derivation"].append(f"in-situ: graphs row {launch['graphs_s']:.4f} s (GPU-bound roll-out) / "
                                 f"{ops:.4f} s of its ops at the rates above (model) -> x{out['in_situ']:.3f}")
    return out


# ---- the step under fake tensors ------------------------------------------------------------------
def _fake_bench(preset: str, backward: str, path: str, rank: int, cap_s: int | None, cap_t: int | None,
                gemm: str = "auto", fp8: str = "off", checkpoint: str = "none", attention: str = "triton",
                eager_checkpointing: bool = False):
    import step_time

    argv = ["--preset", preset, "--backward", backward, "--checkpoint", checkpoint, "--gemm", gemm]
    argv += ["--eager-checkpointing"] if eager_checkpointing else []
    argv += ["--fp8", fp8.split("-")[0]] if path == "fast" else []  # native-fwd: native, dX in bf16
    argv += ["--lora-rank", str(rank)] if rank is not None else []
    if path == "fast":  # the GPU configuration: our fused kernels (as custom ops here)
        argv += ["--kernels", "on", "--attention", attention]
    argv += ["--cap-s", str(cap_s)] if cap_s else []
    argv += ["--cap-t", str(cap_t)] if cap_t else []
    args = step_time.parse(argv)
    step_time.PRESETS[preset] = dict(step_time.PRESETS[preset], device="cpu", dtype="bf16")
    return step_time.Bench(args), args


# the fast path's fast.attention -> (what the fake run executes, whose measured rates price it). cuDNN
# and flash are both PyTorch SDPA (the same calls; the fake run's CPU SDPA stands in for either);
# "sdpa" is PyTorch's own choice, flash on the H200 with torch 2.11 (what the measured fast step ran)
ATTENTION_MODEL = {"triton": ("triton", "triton"), "sdpa": ("sdpa", "flash"), "cudnn": ("sdpa", "cudnn")}


def prebuild_layout(bench, fp) -> None:
    """The fast models build their packing (offsets, gather indices, RoPE tables) from Python lists;
    on fake tensors that host work cannot run, so it is built here, outside the fake mode, for the
    step's shapes, and the step finds it in the model's layout cache."""
    model = fp.model
    if hasattr(model, "layout"):  # FastZImage: the pair's, and each branch's alone
        B, _, H, W = bench.noise.shape
        cs, ct = [len(c.features) for c in bench.ctx_s], [len(c.features) for c in bench.ctx_t]
        for s, t in ((cs, ct), (cs, None), (None, ct)):
            model.layout(B, H, W, s, t, bench.noise.device)


def prequantize(fp, mode) -> float:
    """fast.fp8=native: the block linears' weights quantized before the step (as after a run's first
    step; they persist like the weights: not step memory). Returns their GB."""
    native = getattr(fp.model, "fp8_native", None)
    if native is None:
        return 0.0
    from dopsd_fast.fp8 import fp8_module_filter

    n = 0
    with mode:
        for name, m in fp.model.ms.named_modules():
            if fp8_module_filter(name, m, fp.spec):
                q, sc = native.weight(m.weight)
                n += q.numel() * q.element_size() + sc.numel() * sc.element_size()
    return n / 1e9


def _written(func, args, kwargs) -> list:
    """The arguments ``func`` writes in place (its schema's ``a!``), less a fused optimizer's gradients:
    its schema marks them written (unscaled in place where a grad scale is given; none is here)."""
    vals = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    return [vals[a.name] for a in func._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and a.name != "grads" and a.name in vals]


def _steady_adamw(params):
    """AdamW as the GPU steps it (``fused=True``, step_time's CUDA form), in its steady state: its
    moments made by one step here, so the counted step prices one fused pass, not a first step's state
    creation (two zero fills per parameter) and the CPU's foreach form."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _build(preset, path, backward, rank, cap_s, cap_t, gemm, fp8, checkpoint, attention, eager_checkpointing):
    """The benchmark (and the fast path) built under a fake mode: (mode, bench, args, fast path, FP8 GB)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fp, fp8_gb = None, 0.0
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    swap = torch.utils.swap_tensors

    def set_data(t1, t2):  # Module.to() on fake parameters: the fake mode's weakrefs forbid a swap
        with torch.no_grad():
            t1.data = t2.data

    torch.utils.swap_tensors = set_data
    try:
        with mode:
            bench, args = _fake_bench(preset, backward, path, rank, cap_s, cap_t, gemm, fp8, checkpoint, attention,
                                      eager_checkpointing)
            bench.optimizer = _steady_adamw(bench.params)
        if path == "fast":  # built in the fake mode: parameters and buffers fake
            with mode:
                fp = bench.fast_model(args.kernels, fp8=fp8.split("-")[0], fp8_dgrad=fp8 != "native-fwd")
            prebuild_layout(bench, fp)  # host-side packing with real offsets, outside the fake mode
            fp8_gb = prequantize(fp, mode)
    finally:
        torch.utils.swap_tensors = swap
    return mode, bench, args, fp, fp8_gb


def _new_counter(bench, rates, pricing):
    counter = StepCounter(rates, pricing)
    # the weights (base, adapters, the teacher's copy or shadow) are not step memory: known to the
    # counter from the start, so a view of one (a detach(), a transpose) does not count its storage
    w = bench.weights
    mods = [w.transformer] + ([w.teacher_module] if getattr(w, "teacher_module", None) is not None else [])
    for t in [*(x for m in mods for x in (*m.parameters(), *m.buffers())), *w.named_teacher().values()]:
        counter._seen.setdefault(id(t.untyped_storage()), 0)
    return counter


def _summary(counter) -> dict:
    regions = defaultdict(lambda: defaultdict(float))
    kinds = defaultdict(lambda: defaultdict(float))
    for (region, kind), row in counter.table.items():
        for k, v in row.items():
            regions[region][k] += v
            kinds[kind][k] += v
    total = {k: sum(r[k] for r in regions.values()) for k in ("flops", "bytes", "launches", "time_s")}
    rows = lambda d: sorted(({"region": r, "name": n, **v} for (r, n), v in d.items()),  # noqa: E731
                            key=lambda x: -x["bytes"])
    return {"total": total, "predicted_s": total["time_s"], "regions": {k: dict(v) for k, v in regions.items()},
            "kinds": {k: dict(v) for k, v in kinds.items()}, "non_gemm_tb": kinds["memory"]["bytes"] / 1e12,
            "traffic": rows(counter.traffic), "bytes_bound_gemms": rows(counter.bytes_bound_gemms),
            "top_ops": sorted(({"op": n, **v} for n, v in counter.ops.items()), key=lambda r: -r["time_s"])[:60],
            "unmeasured": sorted(counter.pricing.unmeasured)}


def _pricing(path, attention, rates, calibration) -> Pricing:
    backend = "flash" if path == "eager" else ATTENTION_MODEL[attention][1]  # eager: PyTorch SDPA's choice
    return Pricing(rates, calibration, backend)


def fp8_range(counter: StepCounter, predicted_s: float) -> dict | None:
    """The step with its FP8 GEMMs repriced at the measured bf16 rate times each ratio of
    :data:`FP8_GEMM_SPEEDUPS` (everything else as priced): ESTIMATES, {label: {speedup, step_s}}.
    None without FP8 GEMMs or without a calibration (the stated rates have their own FP8 rate)."""
    pr = counter.pricing
    if not counter.fp8_gemms or pr.cal is None or all(
            (pr.cal.get("gemm_fp8_ours" if g[4] == "triton" else "gemm_fp8") or {}).get(pr.fp8_recipe)
            for g in counter.fp8_gemms):
        return None  # no FP8, no calibration, or every FP8 GEMM measured (cuBLAS's, ours): priced at its own rates
    saved, base_unmeasured = pr.fp8_speedup, set(pr.unmeasured)

    def fp8_seconds(speedup):
        pr.fp8_speedup = speedup
        return sum(pr.seconds("gemm_fp8", *g) for g in counter.fp8_gemms)

    try:
        now = fp8_seconds(saved)
        out = {label: {"speedup": s, "step_s": predicted_s - now + fp8_seconds(s), "estimate": True}
               for label, s in FP8_GEMM_SPEEDUPS.items()}
        out["no gain (bf16 rate)"] = {"speedup": 1.0, "step_s": predicted_s - now + fp8_seconds(None), "estimate": True}
    finally:
        pr.fp8_speedup, pr.unmeasured = saved, base_unmeasured
    return out


def model_step(preset: str, path: str, backward: str, rank: int | None = None, cap_s=None, cap_t=None,
               rates=RATES, gemm: str = "auto", fp8: str = "off", checkpoint: str = "none",
               teacher_graph: bool = False, attention: str = "triton", eager_checkpointing: bool = False,
               calibration: dict | None = None) -> dict:
    """One optimizer step of ``path`` ("eager" | "fast") under fake tensors; the counts. Fast path:
    ``checkpoint`` (none | all | N main layers, ``model.gradient_checkpointing``); ``attention`` (triton | sdpa | cudnn,
    ``fast.attention``); ``teacher_graph``: the alternative to the packed pair that ``fast.graphs`` does
    NOT take, modelled to show why: the student alone (with autograd) and the teacher alone through a
    CUDA graph (its launches priced at one replay), nothing shared between the branches. Eager path:
    ``eager_checkpointing`` (diffusers' gradient checkpointing, as the authors run it). ``calibration``:
    rates from :func:`derive_rates` (default: the stated ``rates``); with it, ``gemm="auto"`` is the
    per-shape choice the paired linears make on the calibration's GPU (``multi_lora.choose_paired_impl``)."""
    from dopsd_fast.kernels.multi_lora import costs_of_form

    with costs_of_form(gpu=calibration["source"]["gpu"] if calibration and gemm == "auto" else None):
        return _model_step(preset, path, backward, rank, cap_s, cap_t, rates, gemm, fp8, checkpoint, teacher_graph,
                           attention, eager_checkpointing, calibration)


def _model_step(preset, path, backward, rank, cap_s, cap_t, rates, gemm, fp8, checkpoint, teacher_graph, attention,
                eager_checkpointing, calibration) -> dict:
    t0 = time.time()
    if attention not in ATTENTION_MODEL:
        raise ValueError(f"perf_model: attention must be one of {sorted(ATTENTION_MODEL)}, got {attention!r}")
    mode, bench, args, fp, fp8_gb = _build(preset, path, backward, rank, cap_s, cap_t, gemm, fp8, checkpoint,
                                           ATTENTION_MODEL[attention][0], eager_checkpointing)
    pricing = _pricing(path, attention, rates, calibration)
    with mode:
        counter = _new_counter(bench, rates, pricing)
        orig_backward = torch.Tensor.backward
        opt_step, ema = bench.optimizer.step, bench.weights.ema_update

        def bw(self_, *a, **kw):  # a backward inside a named backward region (finish()) stays there
            with counter.in_region(counter.region if counter.region.startswith("backward") else "backward"):
                return orig_backward(self_, *a, **kw)

        def regioned(name, fn):
            def inner(*a, **kw):
                with counter.in_region(name):
                    return fn(*a, **kw)
            return inner

        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        if path == "eager":
            w = bench.weights
            s_fn = regioned("student forward", lambda x, s: bench._eager_vel(w.student(), x, s, bench.ctx_s))
            t_fn = regioned("teacher forward", lambda x, s: bench._eager_vel(w.teacher(), x, s, bench.ctx_t))
            from dopsd_fast.algorithm import rollout_loss

            def rollout():
                with autocast:
                    res = rollout_loss(s_fn, t_fn, bench.noise, bench.sigmas, backward=backward)
                    w.student()
                if backward == "once":
                    res.loss.backward()
                return res
        else:
            from dopsd_fast.algorithm import rollout_loss_paired

            def rollout():
                fn = fp.pair_fn(bench.ctx_s, bench.ctx_t, finish=True)  # as the trainer calls it

                def graphed(x, s):  # the alternative not taken: student alone, teacher alone in a graph
                    with counter.in_region("student forward (alone)"):
                        v_s = fp.single_branch("s", x, s, bench.ctx_s)
                    with counter.in_region(GRAPH_REGION), torch.no_grad():
                        v_t = fp.single_branch("t", x, s, bench.ctx_t)
                    counter.table[(GRAPH_REGION, "memory")]["launches"] += 1  # the replay
                    counter.table[(GRAPH_REGION, "memory")]["time_s"] += pricing.launch
                    return v_s, v_t
                pair = graphed if teacher_graph else regioned("student + teacher forward (packed)", fn)
                with autocast:
                    res = rollout_loss_paired(pair, bench.noise, bench.sigmas, backward=backward)
                if backward == "once":
                    res.loss.backward()
                with counter.in_region("backward (context refiner, once per roll-out)"):
                    fn.finish()
                return res
        bench.optimizer.step = regioned("optimizer", opt_step)
        bench.weights.ema_update = regioned("EMA", ema)
        native = getattr(fp.model, "fp8_native", None) if fp is not None else None
        if native is not None:  # fast.fp8_dgrad: the groups' transposed weights, quantized once like the
            quantize_t = native.weights_t  # forward's (prequantize): persistent, not the step's work

            def weights_t(ws):
                counter.paused = True
                try:
                    return quantize_t(ws)
                finally:
                    counter.paused = False
            native.weights_t = weights_t
        torch.Tensor.backward = bw
        try:
            with counter:
                bench.step(rollout)
        finally:
            torch.Tensor.backward = orig_backward
    summary = _summary(counter)
    if native is not None:
        fp8_gb += sum(h[2].numel() + 4 * h[3].numel() for h in native._wt.values()) / 1e9
    return {"preset": preset, "path": path, "backward": backward, "lora_rank": args.lora_rank, "K": len(bench.sigmas) - 1,
            "checkpoint": checkpoint, "checkpointed_layers": fp.model.checkpoint_layers if path == "fast" else 0,
            "eager_checkpointing": eager_checkpointing, "attention": attention if path == "fast" else "sdpa",
            "teacher_graph": teacher_graph, "gemm": gemm, "fp8": fp8, "floor_tflop": bench.floor_flops / 1e12,
            **summary, "floor_s_at_gemm_rate": bench.floor_flops / pricing.gemm_rate(),
            "peak_live_gb": counter.peak / 1e9, "peak_region": counter.peak_region,
            "weights_gb": bench.weights_gb, "fp8_weights_gb": fp8_gb, "model_seconds": time.time() - t0,
            "trainable_params": sum(p.numel() for p in bench.params),
            "peak_live_by_source": sorted(({"region": r, "op": o, "gb": b / 1e9} for (r, o), b in counter.peak_by.items()),
                                          key=lambda x: -x["gb"]),
            "rates": rates, "pricing": pricing.describe(), "fp8_estimate": fp8_range(counter, summary["predicted_s"])}


def model_sampling(preset: str, attention: str = "sdpa", rank: int | None = None, rates=RATES,
                   calibration: dict | None = None) -> dict:
    """The no-grad K-step sampling roll-out of the student alone through the fast path (what step_time's
    ``--graphs`` row times launched and through CUDA graphs): its counts. Its launches calibrate the
    cost of one launch (:func:`derive_rates`)."""
    mode, bench, args, fp, _ = _build(preset, "fast", "stepwise", rank, None, None, "auto", "off", "none",
                                      ATTENTION_MODEL[attention][0], False)
    from dopsd_fast.algorithm import euler_sample

    with mode:
        counter = _new_counter(bench, rates, _pricing("fast", attention, rates, calibration))
        with counter, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), counter.in_region("sampling"):
            euler_sample(lambda x, s: fp.velocity("s", x, s, bench.ctx_s), bench.noise, bench.sigmas)
    return {"preset": preset, "attention": attention, **_summary(counter)}


# per family: the preset calibrated at, and per block kind of the family's memory coefficients
# (spec.memory.per_token) the config key whose count is lowered (and by how much) to measure one block's slope
CALIBRATION = {"zimage": ("zimage-6b", {"block": ("n_layers", 10)}),
               "klein": ("klein-4b", {"double": ("num_layers", 2), "single": ("num_single_layers", 10)})}


def calibrate(family: str, path: str) -> dict:
    """The memory model's fake-tensor constants (``dopsd_fast.memory``) at the sizes of
    :data:`CALIBRATION` (Z-Image-Turbo 6B at 30 and 20 main layers; klein-4B at (5, 20), (3, 20) and
    (5, 10) double / single blocks), each term apart so that none is counted twice:

    * per block kind, the saved activations per layer: the slope of the stepwise peak over the layers,
      less the layer's adapters' gradients and casts (counted by their own terms: in the slope too, they
      were counted twice, which the per-state extra cancelled at this size only);
    * one roll-out state's saved activations: from the ``once`` peak (K states alive, no gradients yet)
      against the stepwise one (one state alive, the fp32 gradients of the previous states'
      backwards): ``(once - stepwise + gradients) / (K - 1)``; the per-state extra is what that holds
      beyond layers x slope, in units of width^2 (small: -0.15 GB at Z-Image's 6B, -0.06 GB at its
      1536-wide size);
    * the transient: the stepwise peak less one state, the gradients and the LoRA casts (the teacher's
      working set at the peak layer, the roll-out's inputs).

    In elements per token in units of the width (the extra: of width^2; bf16), as
    each family spec's ``memory`` (:class:`~dopsd_fast.families.spec.MemoryCoefficients`:
    ``per_token``, ``per_state_extra``, ``transient_per_teacher_token``) holds them."""
    import step_time

    from dopsd_fast import memory
    from dopsd_fast.families import FAMILIES

    base, vary = CALIBRATION[family]
    pre = step_time.PRESETS[base]
    cfg = dict(pre["config"])
    spec = FAMILIES[family]
    width, layers = spec.memory_layers(cfg)
    img = spec.image_tokens(spec.latent_shape(cfg, pre["resolution"])[1:])
    tok_s, tok_t = img + pre["cap_s"], spec.teacher_image_tokens(img) + pre["cap_t"]
    unit_s, unit_t = width * tok_s * memory.BYTES, width * tok_t * memory.BYTES

    def run(backward="stepwise", **over):
        name = f"{base}-calib-" + "-".join(f"{k}{v}" for k, v in over.items())
        step_time.PRESETS[name] = dict(pre, config=dict(cfg, **over))
        return model_step(name, path, backward)

    def activations(r):  # the peak less the adapters' fp32 gradients and bf16 casts (terms of their own):
        m = r["trainable_params"]  # a layer removed takes its adapters' share of those away too
        return r["peak_live_gb"] * 1e9 - m * 4 - memory.cast_bytes(m, path)

    r0 = run()
    p0, K, n = r0["peak_live_gb"] * 1e9, r0["K"], r0["trainable_params"]
    grads = n * 4  # fp32 LoRA adapters
    casts = memory.cast_bytes(n, path)
    per = {kind: (activations(r0) - activations(run(**{key: cfg[key] - fewer}))) / fewer
           for kind, (key, fewer) in vary.items()}
    once = run("once")["peak_live_gb"] * 1e9
    state = (once - p0 + grads) / (K - 1)
    return {"per_token": {k: v / unit_s for k, v in per.items()},
            "per_state_extra": (state - sum(layers[k] * v for k, v in per.items())) / (width ** 2 * memory.BYTES),
            "transient": (p0 - state - grads - casts) / unit_t,
            "fake_peaks_gb": {"stepwise": p0 / 1e9, "once": once / 1e9}}


H200_RESULTS = HERE / "results" / "2026-12-04-h200" / "results.json"


def zimage_lora_params(rank: int = 64) -> int:
    """Parameters of one LoRA adapter on Z-Image-Turbo's default targets (counted on the meta device)."""
    from dopsd_fast.families import ZIMAGE

    cfg = ZIMAGE.flavours["zimage-6b"].config
    with torch.device("meta"):
        tr = ZIMAGE.diffusers_class()(**cfg)
    targets = ZIMAGE.default_lora_targets(cfg)
    return sum(rank * (m.in_features + m.out_features) for name, m in tr.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets))


def h200_memory_check(path: Path = H200_RESULTS) -> list[dict]:
    """``dopsd_fast.memory`` against the peaks (``torch.cuda.max_memory_allocated``) the H200 measured
    on 2026-12-04 (Z-Image-Turbo, 1024^2, K = 4, LoRA r64, captions 512 / 1024, stepwise). Each peak
    holds the weights (base and both fp32 adapters, the run's ``weights_gb``) and, in the ``step``
    stage (step_time.py), the snapshot its ``timed()`` keeps of the student's and teacher's adapters
    (8 bytes per adapter parameter); the ``m3`` stage keeps none. Calibration rows: what
    ``memory.UNSEEN_BYTES`` was fitted on; prediction rows: nothing fitted on them."""
    from dopsd_fast import memory
    from dopsd_fast.families import ZIMAGE

    rows = json.loads(Path(path).read_text())["rows"]
    peak = {r["path"]: r["peak_memory_gb"] * 1e9 for r in rows if r.get("kind") == "time"}
    m3 = sorted((r for r in rows if r.get("kind") == "step_regions"), key=lambda r: r["step"])
    weights = next(r["weights_gb"] for r in rows if r.get("kind") == "step_setup") * 1e9
    n = zimage_lora_params()
    s = memory.shape_of(ZIMAGE.flavours["zimage-6b"].config, ZIMAGE, 4096 + 512, 4096 + 1024, 4, n)
    snapshot = 8 * n
    every_block = sum(s.layers.values())
    cases = [("step: fast (SDPA), 0 layers checkpointed (auto on 141 GB)", "calibration",
              memory.peak_bytes(s, "fast", "stepwise", 0), snapshot, peak["fast"]),
             ("step: eager reference, every block checkpointed", "calibration",
              memory.peak_bytes(s, "eager", "stepwise", every_block), snapshot, peak["eager reference"])]
    for r in m3:
        cases.append((f"m3 step {r['step']}: fast (our attention), no checkpointing"
                      + (", before AdamW's state exists" if r["step"] == 0 else ""), "prediction",
                      memory.peak_bytes(s, "fast", "stepwise", 0, optimizer_state=r["step"] > 0), 0,
                      r["peak_memory_gb"] * 1e9))
    return [{"what": what, "role": role, "terms_gb": {k: v / 1e9 for k, v in terms.items()},
             "predicted_gb": (weights + harness + terms["total"]) / 1e9, "measured_gb": measured / 1e9,
             "rel_err": (weights + harness + terms["total"]) / measured - 1,
             "remainder_without_unseen_gb": (measured - weights - harness - terms["total"] + terms["unseen"]) / 1e9}
            for what, role, terms, harness, measured in cases]


def _fmt_row(r: dict) -> str:
    t = r["total"]
    return (f"{r['preset']:<10} {r['path']:<6} {r['backward']:<9} {r['predicted_s']:8.3f} s  "
            f"{t['flops'] / 1e12:8.1f} TFLOP  {t['bytes'] / 1e12:7.3f} TB  {int(t['launches']):7d} launches  "
            f"peak {r['peak_live_gb']:7.1f} GB  (floor {r['floor_tflop']:.0f} TFLOP = {r['floor_s_at_gemm_rate']:.2f} s)"
            + (f"  [{r['checkpointed_layers']} layers checkpointed]" if r.get("checkpointed_layers") else "")
            + ("  [checkpointed]" if r.get("eager_checkpointing") else "")
            + (f"  [attention {r['attention']}]" if r["path"] == "fast" else "")
            + ("  [teacher through a CUDA graph, unpacked]" if r.get("teacher_graph") else ""))


# the independent count of the fast step's non-GEMM, non-attention traffic: Z-Image-Turbo,
# 1024^2, K = 4, LoRA r64, captions 512 / 1024, stepwise, cuBLAS paired linears, our kernels
INDEPENDENT_NON_GEMM_TB = 0.70


def traffic_table(r: dict) -> str:
    """Every non-GEMM, non-attention pass of the step with its bytes (model figures), by region, then
    the GEMM calls whose bytes outweigh their FLOPs (rank-sized LoRA products: priced by bytes)."""
    lines = [f"non-GEMM, non-attention passes ({r['preset']} {r['path']} {r['backward']}): "
             f"{r['non_gemm_tb']:.3f} TB, {sum(x['time_s'] for x in r['traffic']):.3f} s (model)",
             f"{'region':<44} {'pass (op, or a launch inside a fused op)':<78} {'GB':>8} {'launches':>8} {'ms':>8}"]
    for x in r["traffic"]:
        if x["bytes"] >= 0.05e9:
            lines.append(f"{x['region'][:44]:<44} {x['name'][:78]:<78} {x['bytes'] / 1e9:8.1f} {int(x['launches']):8d} "
                         f"{x['time_s'] * 1e3:8.1f}")
    small = [x for x in r["traffic"] if x["bytes"] < 0.05e9]
    lines.append(f"{'(all regions)':<44} {f'{len(small)} smaller entries':<78} "
                 f"{sum(x['bytes'] for x in small) / 1e9:8.1f} {int(sum(x['launches'] for x in small)):8d} "
                 f"{sum(x['time_s'] for x in small) * 1e3:8.1f}")
    bb = r["bytes_bound_gemms"]
    lines.append(f"GEMM calls priced by their bytes (not in the non-GEMM total): "
                 f"{sum(x['bytes'] for x in bb) / 1e12:.3f} TB, {sum(x['time_s'] for x in bb):.3f} s")
    for x in bb:
        if x["bytes"] >= 1e9:
            lines.append(f"{x['region'][:44]:<44} {x['name'][:78]:<78} {x['bytes'] / 1e9:8.1f} {int(x['launches']):8d} "
                         f"{x['time_s'] * 1e3:8.1f}")
    return "\n".join(lines)


# the measured steps a calibration file carries, and the model configuration of each
VALIDATION = (("fast", "fast (SDPA flash, cuBLAS paired linears)", dict(path="fast", attention="sdpa")),
              ("fast_triton_attention", "fast, our Triton attention (m3 warm step)",
               dict(path="fast", attention="triton")),
              ("eager_checkpointed", "eager reference, checkpointed", dict(path="eager", eager_checkpointing=True)))


def compare(cal_path, preset: str = "zimage-6b") -> tuple[str, list[dict]]:
    """The calibrated model beside the steps the calibration file measured (stepwise, LoRA r64, no fast
    checkpointing, as measured): a table, and its rows. The model column with the in-situ factor, and
    (``per-op``) without it: the per-op rates of m1 / m2 alone."""
    cal = load_calibration(cal_path)
    rates = derive_rates(cal)
    src = cal["source"]
    lines = [f"model (calibrated: {Path(cal_path).name}) vs measured on {src['gpu']} {src['date']}, commit "
             f"{src['commit']} ({src['report']}), paired linears' cuBLAS form: LoRA delta "
             f"{cal.get('paired_cublas_delta', 'after')} the base GEMM, as run; MODEL FIGURES beside measurements",
             f"{'step':<44} {'measured s':>10} {'model s':>8} {'error':>7} {'per-op s':>9} {'error':>7}"]
    rows = []
    for key, label, kw in VALIDATION:
        m = cal["steps"].get(key)
        if m is None:
            continue
        with measured_form(cal):  # the steps as they ran (fast.gemm auto was cuBLAS)
            r = model_step(preset, backward="stepwise", calibration=rates, gemm="cublas", **kw)
        launch = r["total"]["launches"] * rates["launch_s"]
        per_op = (r["predicted_s"] - launch) / rates["in_situ"] + launch
        err, err_op = r["predicted_s"] / m["median_s"] - 1, per_op / m["median_s"] - 1
        lines.append(f"{label:<44} {m['median_s']:10.3f} {r['predicted_s']:8.3f} {err:+7.1%} {per_op:9.3f} "
                     f"{err_op:+7.1%}")
        model_regions = {k: v["time_s"] for k, v in r["regions"].items()}
        for name, secs in (m.get("regions") or {}).items():
            mine = next((v for k, v in model_regions.items() if k.split(" ")[0] in name and secs > 0.01), None)
            if mine is not None:
                lines.append(f"{'  region: ' + name[:34]:<44} {secs:10.3f} {mine:8.3f} {mine / secs - 1:+7.1%}")
        rows.append({"step": key, "label": label, "measured_s": m["median_s"], "model_s": r["predicted_s"],
                     "error": err, "per_op_s": per_op, "per_op_error": err_op, "regions": model_regions,
                     "non_gemm_tb": r["non_gemm_tb"], "traffic": r["traffic"], "source_row": m["row"]})
    return "\n".join(lines), rows


def calibration_from_results(results_path, report: str) -> dict:
    """A calibration file's content from a GPU check's results.json: the rows the rates come from
    (m1 attention, m2 paired linear with its copy, the graphs row with the sampling roll-out's launches
    counted by this model), the measured steps (step stage, m3's warm step), and where they come from."""
    res = json.loads(Path(results_path).read_text())
    rows = res["rows"]
    env = next((r for r in rows if r.get("kind") == "env"), {})
    meta = res["meta"]
    pick = lambda r, keys: {k: r[k] for k in keys if k in r}  # noqa: E731
    lin = []
    for r in rows:
        if r.get("kind") == "paired_linear" and "error" not in r:
            K, N, (ms, mt) = r["K"], r["N"], (int(x) for x in r["rows"].split("+"))
            lin.append({**pick(r, ("variant", "K", "N", "rows", "rank", "fwd_ms", "bwd_ms")),
                        "copy_ms": r["copy_same_bytes_ms"], "copy_bytes": 2 * ((ms + mt) * (K + N) + N * K)})
    att = [pick(r, ("variant", "tokens_student", "tokens_teacher", "heads", "head_dim", "fwd_ms", "bwd_ms"))
           for r in rows if r.get("kind") == "attention" and "error" not in r]
    plain = [pick(r, ("M", "K", "N", "layout", "ms")) for r in rows if r.get("kind") == "gemm_rate" and "error" not in r]
    graphs = next(r for r in rows if r.get("kind") == "graphs")
    fp8 = [pick(r, ("M", "K", "N", "bf16_ms", "rowwise_ms", "tensorwise_ms", "rowwise_fast_ms", "tensorwise_fast_ms",
                    "rank", "rowwise_delta_ms",
                    "ours_rowwise_delta_ms", "rowwise_fast_delta_ms", "ours_fast_accum", "dgrad"))
           for r in rows if r.get("kind") == "fp8_gemm" and "error" not in r]
    steps = {}
    times = {r["path"]: r for r in rows if r.get("kind") == "time"}
    if "fast" in times:
        steps["fast"] = {"median_s": times["fast"]["median_s"], "row": "step stage, path 'fast'"}
    eager = times.get("eager reference (checkpointed)") or times.get("eager reference")
    if eager is not None:
        steps["eager_checkpointed"] = {"median_s": eager["median_s"], "row": f"step stage, path '{eager['path']}'"}
    m3 = [r for r in rows if r.get("kind") == "step_regions" and r.get("note") == "measured"]
    if m3:
        warm = m3[-1]
        steps["fast_triton_attention"] = {
            "median_s": warm["wall_s"], "row": f"m3 step {warm['step']} (warm)",
            "regions": {k[:-4]: v for k, v in warm.items() if k.endswith(" [s]")}}
    return {"source": {"gpu": env.get("gpu"), "driver": env.get("driver"), "torch": env.get("torch"),
                       "triton": env.get("triton"), "cuda": env.get("cuda"), "date": meta["date"][:10],
                       "commit": meta["git_commit"], "report": report},
            "note": "measured rows as taken; the rates are derived from them by benchmarks/perf_model.py "
                    "(derive_rates). Regenerate with --calibrate-from; do not edit the numbers.",
            # the paired op's cuBLAS form that ran (measured_form): m2 names it since the delta went first
            "paired_cublas_delta": "first" if any(r["variant"] == "ours: paired on cuBLAS, delta first"
                                                  for r in lin) else "after",
            # a block's residual and the next norm fused (measured_form): the run's meta says so since then
            "residual_norm_fused": bool(meta.get("forms", {}).get("residual_norm_fused", False)),
            "paired_linear": lin, "attention": att, **({"fp8_gemm": fp8} if fp8 else {}),
            **({"gemm_rate": plain} if plain else {}),
            "launch": {"launched_s": graphs["launched_median_s"], "graphs_s": graphs["graphs_median_s"],
                       "row": f"step stage, graphs row: {graphs['what']}"},
            "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="zimage-6b", help="step_time preset (zimage-6b, zimage-mid, klein-4b, klein-9b, tiny)")
    p.add_argument("--paths", default="eager,fast")
    p.add_argument("--backward", default="once,stepwise")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the preset's (64 at real size)")
    p.add_argument("--cap-s", type=int, default=None)
    p.add_argument("--cap-t", type=int, default=None)
    p.add_argument("--gemm", default="auto", choices=["auto", "cublas", "triton"],
                   help="the fast path's paired-linear GEMM (cublas: the LoRA delta first, the base GEMM accumulating "
                        "into it; triton: ours, the delta in its tile; auto: per shape, the faster at the calibration "
                        "GPU's measured rates, cublas without --calibration)")
    p.add_argument("--attention", default="auto", choices=["auto", *sorted(ATTENTION_MODEL)],
                   help="the fast path's attention (triton: ours; sdpa: PyTorch's choice, priced as flash; cudnn; "
                        "auto: the trainer's fast.attention auto on the calibration's GPU (cuDNN on the H200), ours "
                        "without --calibration: the stated rates are our kernel's class)")
    p.add_argument("--fp8", default="off", choices=["off", "native", "native-fwd"],
                   help="the fast path's FP8 (native: the block linears' base GEMMs and the backward's dX GEMMs "
                        "priced at the FP8 rate, 1400 TFLOP/s, with the quantization passes; calibrated: at the "
                        "measured FP8 rates, or without them at the measured bf16 rate and an ESTIMATE range at that "
                        "rate x 1.4 / 1.7 / 2.0; native-fwd: fast.fp8_dgrad=false, dX in bf16)")
    p.add_argument("--checkpoint", default="none", help="fast path: none | all | N main layers checkpointed")
    p.add_argument("--eager-checkpointing", action="store_true",
                   help="eager path: diffusers' gradient checkpointing (the reference as the authors run it)")
    p.add_argument("--teacher-graph", action="store_true",
                   help="fast path: model the alternative fast.graphs does not take (student alone, teacher alone "
                        "through a CUDA graph, no packing) instead of the packed pair")
    p.add_argument("--calibration", nargs="?", const=str(DEFAULT_CALIBRATION), default=None,
                   help=f"price at rates derived from a GPU run's measurements (default file: "
                        f"{DEFAULT_CALIBRATION.relative_to(HERE.parent)})")
    p.add_argument("--compare", action="store_true",
                   help="the calibrated model beside the steps its calibration file measured, and exit")
    p.add_argument("--traffic", action="store_true", help="list every non-GEMM, non-attention pass with its bytes")
    p.add_argument("--calibrate-from", default=None, metavar="RESULTS_JSON",
                   help="write a calibration file (--write) from a GPU check's results.json, and exit")
    p.add_argument("--write", default=None, help="with --calibrate-from: the calibration file to write")
    p.add_argument("--calibrate", action="store_true",
                   help="derive dopsd_fast.memory's constants (both families, both paths) and exit")
    p.add_argument("--families", default="zimage,klein", help="--calibrate: the families to calibrate")
    p.add_argument("--json", default=None)
    p.add_argument("--regions", action="store_true", help="print the per-region and per-kind breakdown")
    p.add_argument("--memory", action="store_true",
                   help="print what the peak holds, by the region and op that made each storage")
    args = p.parse_args(argv)
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    if args.calibrate_from:
        if not args.write:
            p.error("--calibrate-from needs --write FILE")
        res = Path(args.calibrate_from).resolve()
        report = res.parent / "report.md"
        try:
            report = str(report.relative_to(HERE.parent))
        except ValueError:
            report = str(report)
        cal = calibration_from_results(res, report)
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(json.dumps(cal, indent=1) + "\n")
        print("\n".join(derive_rates(cal)["derivation"]))
        print(f"wrote {args.write}")
        return 0
    if args.compare:
        table, rows = compare(args.calibration or DEFAULT_CALIBRATION, args.preset)
        print("\n".join(derive_rates(load_calibration(args.calibration or DEFAULT_CALIBRATION))["derivation"]))
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
        return 0
    calibration = derive_rates(load_calibration(args.calibration)) if args.calibration else None
    if args.attention == "auto":
        args.attention = "triton"
        if calibration:  # what the trainer's auto runs on that GPU (its measured order; no CUDA touched)
            from dopsd_fast.models.ops import resolve_attention

            chosen = resolve_attention("auto", torch.device("cuda"), gpu_name=calibration["source"]["gpu"])
            args.attention = chosen if chosen in ATTENTION_MODEL else "sdpa"
    header_pricing = Pricing(RATES, calibration, ATTENTION_MODEL[args.attention][1])  # the fast path's attention
    print(f"# D-OPSD step model (fake tensors, CPU): {args.preset}; {header_pricing.describe()}. "
          "MODEL FIGURES, not measurements; the peak excludes the weights and AdamW's state (made before the "
          "step counted).")
    if args.calibrate:
        for fam in args.families.split(","):
            for path in ("fast", "eager"):
                c = calibrate(fam, path)
                print(f"{fam:<7} {path:<6} per layer and student token: "
                      + ", ".join(f"{k} {v:.1f} x width" for k, v in c["per_token"].items())
                      + f"; per state extra {c['per_state_extra']:.1f} x width^2; transient per teacher token: "
                      f"{c['transient']:.1f} x width (fake peaks: stepwise {c['fake_peaks_gb']['stepwise']:.2f} GB, "
                      f"once {c['fake_peaks_gb']['once']:.2f} GB)", flush=True)
        print("\nH200, 2026-12-04: predicted (weights + the benchmark's adapter snapshot + dopsd_fast.memory) vs "
              "measured max_memory_allocated; memory.UNSEEN_BYTES = the calibration rows' mean remainder")
        for r in h200_memory_check():
            print(f"  {r['role']:<11} {r['what']:<62} predicted {r['predicted_gb']:6.2f} GB, measured "
                  f"{r['measured_gb']:6.2f} GB ({100 * r['rel_err']:+.1f} %), remainder without 'unseen' "
                  f"{r['remainder_without_unseen_gb']:.2f} GB")
        return 0
    rows = []
    for path in args.paths.split(","):
        for bw in args.backward.split(","):
            r = model_step(args.preset, path, bw, args.lora_rank, args.cap_s, args.cap_t, gemm=args.gemm, fp8=args.fp8,
                           checkpoint=args.checkpoint, teacher_graph=args.teacher_graph and path == "fast",
                           attention=args.attention, eager_checkpointing=args.eager_checkpointing and path == "eager",
                           calibration=calibration)
            rows.append(r)
            print(_fmt_row(r) + f"  [{r['model_seconds']:.0f} s to model]", flush=True)
            for note in r["unmeasured"]:
                print(f"    note: {note}")
            if r["fp8_estimate"]:
                print("    FP8 step ESTIMATE (FP8 GEMMs at the measured bf16 rate x a ratio; not measured: the GPU "
                      "check's fp8 stage confirms): " + "; ".join(
                          f"{v['step_s']:.3f} s at x{v['speedup']:g} ({k})" for k, v in
                          sorted(r["fp8_estimate"].items(), key=lambda kv: kv[1]["speedup"])))
            if args.memory:
                print(f"    peak {r['peak_live_gb']:.2f} GB in '{r['peak_region']}', made by:")
                for m in r["peak_live_by_source"][:12]:
                    print(f"    {m['gb']:8.3f} GB  {m['region']:<40} {m['op']}")
            if args.regions:
                for name, v in r["regions"].items():
                    print(f"    {name:<46} {v['time_s']:7.3f} s {v['flops'] / 1e12:8.1f} TFLOP "
                          f"{v['bytes'] / 1e12:7.3f} TB "
                          f"{int(v['launches']):7d} launches")
                for name, v in r["kinds"].items():
                    print(f"    kind {name:<41} {v['time_s']:7.3f} s {v['flops'] / 1e12:8.1f} TFLOP "
                          f"{v['bytes'] / 1e12:7.3f} TB "
                          f"{int(v['launches']):7d} launches")
            if args.traffic:
                print(traffic_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
