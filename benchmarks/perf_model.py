"""A real-size performance and memory model of one D-OPSD step, on the CPU, with fake tensors.

One whole optimizer step (roll-out of K states, teacher on every state, loss, backward, AdamW, EMA)
of the eager reference and of the fast path runs at the real size (Z-Image-Turbo 6.15 B, FLUX.2-klein
4B / 9B) under ``FakeTensorMode``: shapes, dtypes and every op, no data and no memory. A dispatch
mode counts, per region (forwards, backward, optimizer, EMA) and op kind: FLOPs, bytes read + written,
kernel launches, and the peak of live memory (saved activations, temporaries, gradients, optimizer
state; the weights excluded). The predicted time prices every op at stated rates (default: GEMM 700
TFLOP/s, attention 350 / 280 TFLOP/s forward / backward, 2.7 TB/s, 5 us per launch), an op taking
``launches x 5 us + max(FLOPs / rate, bytes / bandwidth)``. These are MODEL figures: a GPU confirms.

What differs from a GPU run, and how it is handled:
* fake CPU tensors (on a CPU-only torch, fake CUDA tensors abort in the backward): the eager path runs
  under CPU bf16 autocast, which casts matmuls like CUDA autocast; SDPA dispatches to its CPU flash
  variant, priced like the GPU's flash attention;
* our fused kernels are ``torch.library.custom_op``s, seen as ONE op: each states its own FLOPs,
  bytes, launches and scratch (``dopsd_fast.kernels._common.COSTS``, beside its registration);
* the fast path's shape-dependent host work (packing layout, offsets) is plain Python on real
  tensors, so attention FLOPs per sample are exact;
* the weights' storages are known to the counter before the step, so a view of a weight (the
  transpose inside ``F.linear``, a ``detach()``) is not counted as step memory.

    python benchmarks/perf_model.py --preset zimage-6b                 # eager + fast, once + stepwise
    python benchmarks/perf_model.py --preset klein-4b --paths fast --backward stepwise --json out.json
    python benchmarks/perf_model.py --preset klein-9b --paths fast --checkpoint all   # checkpointing's cost
    python benchmarks/perf_model.py --preset zimage-6b --paths fast --teacher-graph   # the graphed teacher
    python benchmarks/perf_model.py --preset zimage-6b --paths fast --backward stepwise --memory  # the peak's makeup
    python benchmarks/perf_model.py --calibrate        # dopsd_fast.memory's constants, the H200 check (~8 min)
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

os.environ.pop("TRITON_INTERPRET", None)  # the kernels are never run here: their custom ops are

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # step_time, beside this file
if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

RATES = {"gemm": 700e12, "gemm_fp8": 1400e12, "attn_fwd": 350e12, "attn_bwd": 280e12, "bandwidth": 2.7e12,
         "launch": 5e-6}
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


class StepCounter(TorchDispatchMode):
    """Counts every op between ``start()`` and the end, per region and kind, and tracks live memory."""

    def __init__(self, rates=RATES):
        super().__init__()
        from dopsd_fast.kernels import _common

        self.costs = _common.COSTS
        self.rates = rates
        self.region = "other"
        self.table = defaultdict(lambda: defaultdict(float))  # (region, kind) -> totals
        self.ops = defaultdict(lambda: defaultdict(float))  # op name -> totals
        self.live = 0
        self.peak = 0
        self.peak_region = ""
        self._seen: dict[int, int] = {}
        # live bytes by where each storage was made (region, op), and that split at the peak (the
        # memory model's terms: benchmarks/perf_model.py --memory)
        self.live_by = defaultdict(int)
        self.peak_by: dict = {}
        self._op = ""

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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name()
        self._op = name
        if func.is_view or name in _FREE or name.startswith("prim::") or getattr(func, "_schema", None) is None:
            self._track(out)
            return out
        if name in self.costs:
            c = self.costs[name](*args, **kwargs)
            flops, byts, launches, kind, scratch = c["flops"], c["bytes"], c["launches"], c["kind"], c["scratch"]
        else:
            scratch = 0
            launches = 1
            # a factory (zeros, ones, full, *_like) reads nothing: only its output counts
            factory = name.split("::")[-1].split(".")[0] in _FACTORIES
            byts = (0 if factory else _bytes(_tensors((args, kwargs)))) + _bytes(_tensors(out))
            sd = _sdpa_flops(name, args, out)
            if sd is not None:
                flops, kind = sd
            elif func.overloadpacket in flop_registry:
                flops, kind = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)), "gemm"
            else:
                flops, kind = 0.0, "memory"
        rate = self.rates[kind] if kind != "memory" else None
        if self.region == GRAPH_REGION:  # inside a CUDA graph: no launch of its own (one replay, counted apart)
            launches = 0
        t = launches * self.rates["launch"] + max(flops / rate if rate else 0.0, byts / self.rates["bandwidth"])
        for row in (self.table[(self.region, kind)], self.ops[name]):
            row["flops"] += flops
            row["bytes"] += byts
            row["launches"] += launches
            row["time_s"] += t
        self._track(out, scratch)
        return out


# ---- the step under fake tensors ------------------------------------------------------------------
def _fake_bench(preset: str, backward: str, path: str, rank: int, cap_s: int | None, cap_t: int | None,
                gemm: str = "auto", fp8: str = "off", checkpoint: str = "none", eager_checkpointing: bool = False):
    import step_time

    argv = ["--preset", preset, "--backward", backward, "--checkpoint", checkpoint, "--gemm", gemm]
    argv += ["--eager-checkpointing"] if eager_checkpointing else []
    argv += ["--fp8", fp8] if path == "fast" else []
    argv += ["--lora-rank", str(rank)] if rank is not None else []
    if path == "fast":  # the GPU configuration: our fused kernels and attention (as custom ops here)
        argv += ["--kernels", "on", "--attention", "triton"]
    argv += ["--cap-s", str(cap_s)] if cap_s else []
    argv += ["--cap-t", str(cap_t)] if cap_t else []
    args = step_time.parse(argv)
    step_time.PRESETS[preset] = dict(step_time.PRESETS[preset], device="cpu", dtype="bf16")
    return step_time.Bench(args), args


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
            if fp8_module_filter(name, m):
                q, sc = native.weight(m.weight)
                n += q.numel() * q.element_size() + sc.numel() * sc.element_size()
    return n / 1e9


def model_step(preset: str, path: str, backward: str, rank: int | None = None, cap_s=None, cap_t=None,
               rates=RATES, gemm: str = "auto", fp8: str = "off", checkpoint: str = "none",
               teacher_graph: bool = False, eager_checkpointing: bool = False) -> dict:
    """One optimizer step of ``path`` ("eager" | "fast") under fake tensors; the counts. Fast path:
    ``checkpoint`` (none | all | N main layers, ``fast.checkpoint``); ``teacher_graph``: the alternative
    to the packed pair that ``fast.graphs`` does NOT take, modelled to show why: the student alone
    (with autograd) and the teacher alone through a CUDA graph (its launches priced at one replay),
    nothing shared between the branches. ``eager_checkpointing``: the eager path with diffusers' gradient
    checkpointing on every block (the authors' setting; ``step_time --eager-checkpointing``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.time()
    fp8_gb = 0.0
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    swap = torch.utils.swap_tensors

    def set_data(t1, t2):  # Module.to() on fake parameters: the fake mode's weakrefs forbid a swap
        with torch.no_grad():
            t1.data = t2.data

    torch.utils.swap_tensors = set_data
    try:
        with mode:
            bench, args = _fake_bench(preset, backward, path, rank, cap_s, cap_t, gemm, fp8, checkpoint,
                                      eager_checkpointing)
        if path == "fast":  # built in the fake mode: parameters and buffers fake
            with mode:
                fp = bench.fast_model(args.kernels, fp8=fp8)
            prebuild_layout(bench, fp)  # host-side packing with real offsets, outside the fake mode
            fp8_gb = prequantize(fp, mode)
    finally:
        torch.utils.swap_tensors = swap
    with mode:
        counter = StepCounter(rates)
        # the weights (base, adapters, the teacher's copy or shadow) are not step memory: known to the
        # counter from the start, so a view of one (a detach(), a transpose) does not count its storage
        w = bench.weights
        mods = [w.transformer] + ([w.teacher_module] if getattr(w, "teacher_module", None) is not None else [])
        for t in [*(x for m in mods for x in (*m.parameters(), *m.buffers())), *w.named_teacher().values()]:
            counter._seen.setdefault(id(t.untyped_storage()), 0)
        orig_backward = torch.Tensor.backward
        opt_step, ema = bench.optimizer.step, bench.weights.ema_update

        def bw(self_, *a, **kw):
            with counter.in_region("backward"):
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
                        v_s = fp._one("s", x, s, bench.ctx_s)
                    with counter.in_region(GRAPH_REGION), torch.no_grad():
                        v_t = fp._one("t", x, s, bench.ctx_t)
                    counter.table[(GRAPH_REGION, "memory")]["launches"] += 1  # the replay
                    counter.table[(GRAPH_REGION, "memory")]["time_s"] += rates["launch"]
                    return v_s, v_t
                pair = graphed if teacher_graph else regioned("student + teacher forward (packed)", fn)
                with autocast:
                    res = rollout_loss_paired(pair, bench.noise, bench.sigmas, backward=backward)
                if backward == "once":
                    res.loss.backward()
                with counter.in_region("backward"):
                    fn.finish()
                return res
        bench.optimizer.step = regioned("optimizer", opt_step)
        bench.weights.ema_update = regioned("EMA", ema)
        torch.Tensor.backward = bw
        try:
            with counter:
                bench.step(rollout)
        finally:
            torch.Tensor.backward = orig_backward
    regions = defaultdict(lambda: defaultdict(float))
    kinds = defaultdict(lambda: defaultdict(float))
    for (region, kind), row in counter.table.items():
        for k, v in row.items():
            regions[region][k] += v
            kinds[kind][k] += v
    total = {k: sum(r[k] for r in regions.values()) for k in ("flops", "bytes", "launches", "time_s")}
    return {"preset": preset, "path": path, "backward": backward, "lora_rank": args.lora_rank, "K": len(bench.sigmas) - 1,
            "checkpoint": checkpoint, "checkpointed_layers": fp.model.checkpoint_layers if path == "fast" else 0,
            "teacher_graph": teacher_graph,
            "gemm": gemm, "fp8": fp8, "non_gemm_tb": kinds["memory"]["bytes"] / 1e12,
            "floor_tflop": bench.floor_flops / 1e12, "total": total,
            "predicted_s": total["time_s"], "floor_s_at_gemm_rate": bench.floor_flops / rates["gemm"],
            "peak_live_gb": counter.peak / 1e9, "peak_region": counter.peak_region,
            "trainable_params": sum(p.numel() for p in bench.params),
            "peak_live_by_source": sorted(({"region": r, "op": o, "gb": b / 1e9} for (r, o), b in counter.peak_by.items()),
                                          key=lambda x: -x["gb"]),
            "eager_checkpointing": eager_checkpointing,
            "weights_gb": bench.weights_gb, "fp8_weights_gb": fp8_gb, "regions": {k: dict(v) for k, v in regions.items()},
            "kinds": {k: dict(v) for k, v in kinds.items()},
            "top_ops": sorted(({"op": n, **v} for n, v in counter.ops.items()), key=lambda r: -r["time_s"])[:60],
            "model_seconds": time.time() - t0, "rates": rates}


# per family: the preset calibrated at, and per block kind of memory.PER_TOKEN the config key whose
# count is lowered (and by how much) to measure one block's slope
CALIBRATION = {"zimage": ("zimage-6b", {"block": ("n_layers", 10)}),
               "klein": ("klein-4b", {"double": ("num_layers", 2), "single": ("num_single_layers", 10)})}


def calibrate(family: str, path: str) -> dict:
    """The memory model's fake-tensor constants (``dopsd_fast.memory``) at the sizes of
    :data:`CALIBRATION` (Z-Image-Turbo 6B at 30 and 20 main layers; klein-4B at (5, 20), (3, 20) and
    (5, 10) double / single blocks), each term apart so that none is counted twice:

    * per block kind, the saved activations per layer: the slope of the stepwise peak over the layers;
    * one roll-out state's saved activations: from the ``once`` peak (K states alive, no gradients yet)
      against the stepwise one (one state alive, the fp32 gradients of the previous states'
      backwards): ``(once - stepwise + gradients) / (K - 1)``; the per-state extra is what that holds
      beyond layers x slope, in units of width^2 (it scales so between Z-Image's 6B and 1536-wide
      sizes, -45.7 and -44.6, not with the tokens);
    * the transient: the stepwise peak less one state, the gradients and the LoRA casts (the teacher's
      working set at the peak layer, the roll-out's inputs).

    In elements per token in units of the width (the extra: of width^2; bf16), as
    ``memory.PER_TOKEN``, ``PER_STATE_EXTRA`` and ``TRANSIENT_PER_TEACHER_TOKEN`` hold them."""
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

    r0 = run()
    p0, K, n = r0["peak_live_gb"] * 1e9, r0["K"], r0["trainable_params"]
    grads = n * 4  # fp32 LoRA adapters
    casts = memory.cast_bytes(n, path)
    per = {kind: (p0 - run(**{key: cfg[key] - fewer})["peak_live_gb"] * 1e9) / fewer
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
    s = memory.shape_of(ZIMAGE.flavours["zimage-6b"].config, "zimage", 4096 + 512, 4096 + 1024, 4, n)
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
            + ("  [teacher through a CUDA graph, unpacked]" if r.get("teacher_graph") else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="zimage-6b", help="step_time preset (zimage-6b, zimage-mid, klein-4b, klein-9b, tiny)")
    p.add_argument("--paths", default="eager,fast")
    p.add_argument("--backward", default="once,stepwise")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the preset's (64 at real size)")
    p.add_argument("--cap-s", type=int, default=None)
    p.add_argument("--cap-t", type=int, default=None)
    p.add_argument("--gemm", default="auto", choices=["auto", "cublas", "triton"],
                   help="the fast path's paired-linear GEMM (auto = cublas: the LoRA delta accumulated into the "
                        "output by a second call; triton: in the GEMM's epilogue)")
    p.add_argument("--fp8", default="off", choices=["off", "native"],
                   help="the fast path's FP8 (native: the block linears' base GEMMs priced at the FP8 rate, 1400 "
                        "TFLOP/s, with the activations' quantization)")
    p.add_argument("--checkpoint", default="none", help="fast path: none | all | N main layers checkpointed")
    p.add_argument("--teacher-graph", action="store_true",
                   help="fast path: model the alternative fast.graphs does not take (student alone, teacher alone "
                        "through a CUDA graph, no packing) instead of the packed pair")
    p.add_argument("--calibrate", action="store_true",
                   help="derive dopsd_fast.memory's constants (both families, both paths) and exit")
    p.add_argument("--families", default="zimage,klein", help="--calibrate: the families to calibrate")
    p.add_argument("--json", default=None)
    p.add_argument("--regions", action="store_true", help="print the per-region and per-kind breakdown")
    p.add_argument("--memory", action="store_true",
                   help="print what the peak holds, by the region and op that made each storage")
    p.add_argument("--eager-checkpointing", action="store_true",
                   help="eager path: diffusers' gradient checkpointing on every block (the authors' setting)")
    args = p.parse_args(argv)
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    print(f"# D-OPSD step model (fake tensors, CPU): {args.preset}; rates: GEMM "
          f"{RATES['gemm'] / 1e12:.0f} TFLOP/s, attention {RATES['attn_fwd'] / 1e12:.0f}/{RATES['attn_bwd'] / 1e12:.0f} "
          f"fwd/bwd, {RATES['bandwidth'] / 1e12:.1f} TB/s, {RATES['launch'] * 1e6:.0f} us/launch. MODEL FIGURES, not "
          "measurements; the peak excludes the weights.")
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
                           eager_checkpointing=args.eager_checkpointing and path == "eager")
            rows.append(r)
            print(_fmt_row(r) + f"  [{r['model_seconds']:.0f} s to model]", flush=True)
            if args.memory:
                print(f"    peak {r['peak_live_gb']:.2f} GB in '{r['peak_region']}', made by:")
                for m in r["peak_live_by_source"][:12]:
                    print(f"    {m['gb']:8.3f} GB  {m['region']:<40} {m['op']}")
            if args.regions:
                for name, v in r["regions"].items():
                    print(f"    {name:<38} {v['time_s']:7.3f} s {v['flops'] / 1e12:8.1f} TFLOP {v['bytes'] / 1e12:7.3f} TB "
                          f"{int(v['launches']):7d} launches")
                for name, v in r["kinds"].items():
                    print(f"    kind {name:<33} {v['time_s']:7.3f} s {v['flops'] / 1e12:8.1f} TFLOP {v['bytes'] / 1e12:7.3f} TB "
                          f"{int(v['launches']):7d} launches")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
