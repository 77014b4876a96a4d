"""D-OPSD step time: the eager reference step and the fast step side by side, on identical weights,
noise and contexts, with a parity verdict.

    python benchmarks/step_time.py                          # tiny preset on the CPU (the default)
    python benchmarks/step_time.py --preset zimage-6b       # real size, random weights, CUDA
    python benchmarks/step_time.py --preset zimage-6b --ablation --fp8 torchao --graphs

One step = the full optimizer step of the method: a K-state roll-out of the student, the teacher
on every state, the loss, backward, AdamW, EMA update. The eager reference is the diffusers model
called as the trainer's eager path calls it (``fast.enabled: false``); the fast path is
``dopsd_fast.families.zimage.fast.FastZImage`` (packed student/teacher pass, fused kernels on CUDA).

Parity (performance.md): per-state velocities, the loss and the gradient of every trainable tensor
after one step, each compared with an fp32 eager reference on the same weights: the fast path's
error must not exceed 2x the eager low-precision path's error plus an atol (on an fp32 run the eager
path IS the reference: the fast path must then be within atol); the LoRA weights after N optimizer
steps, fast vs eager. FP8 runs are judged by velocity SQNR against the bf16 eager path (>= 20 dB).
Exit status 1 on FAIL. Results: a table on stdout and JSON (``--out``).

MFU counts the floor FLOPs of the algorithm (per state: teacher forward + student forward + student
backward, dX and the dW of the trainable tensors only: with LoRA about 1.3x a forward; no recompute, no
encoders), the same for both paths, against the
GPU's bf16 dense peak (989 TFLOP/s for H100/H200 SXM). On the CPU no MFU is reported, and CPU times
are not performance results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import importlib.util

import torch

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from dopsd_fast.config import load_config  # noqa: E402
from dopsd_fast.families import FAMILIES, KLEIN, ZIMAGE, family  # noqa: E402
from dopsd_fast.fastpath import FastPath  # noqa: E402
from dopsd_fast.memory import backward_flops, memory_budget_bytes  # noqa: E402
from dopsd_fast.pair import EagerPair, dopsd_step  # noqa: E402
from dopsd_fast.plan import resolve_plan  # noqa: E402

# the flavours of every family (dopsd_fast.families), by name; "tiny" is the tiny Z-Image
PRESETS = {fl.name: dict(family=spec.name, config=fl.config, resolution=fl.resolution, cap_s=fl.cap_s, cap_t=fl.cap_t,
                         device=fl.device, dtype=fl.dtype, rank=fl.rank)
           for spec in FAMILIES.values() for fl in spec.flavours.values()}
PRESETS["tiny"] = PRESETS["tiny-zimage"]
ZIMAGE_RELEASED = ZIMAGE.flavours["zimage-6b"].config
ZIMAGE_MID = ZIMAGE.flavours["zimage-mid"].config
KLEIN_4B = KLEIN.flavours["klein-4b"].config
KLEIN_9B = KLEIN.flavours["klein-9b"].config
PEAK_BF16 = 989e12


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the preset's)")
    p.add_argument("--k", type=int, default=4, help="roll-out states K (4: zimage-k4, 8: zimage-k8)")
    p.add_argument("--cap-s", type=int, help="student context tokens (default: the preset's; 512 at real size)")
    p.add_argument("--cap-t", type=int, help="teacher context tokens (default: the preset's; Z-Image 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora-rank", type=int, help="LoRA rank; 0 = full fine-tuning (default: the preset's)")
    p.add_argument("--backward", default="stepwise", choices=["once", "stepwise"])
    p.add_argument("--kernels", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--attention", default="auto", choices=["auto", "cudnn", "triton", "sdpa", "flash_attn"])
    p.add_argument("--gemm", default="auto", choices=["auto", "cublas", "triton"],
                   help="the paired LoRA linear's base GEMM (fast.gemm; auto = per shape, the form the GPU's "
                        "calibrated rates price faster: cuBLAS where the GPU has none)")
    p.add_argument("--checkpoint", default="auto", help="fast path: auto | none | all | N layers")
    p.add_argument("--eager-checkpointing", action="store_true",
                   help="eager reference with diffusers' gradient checkpointing (the authors' setting)")
    p.add_argument("--fp8", default="off", choices=["off", "native", "te", "torchao"])
    p.add_argument("--graphs", action="store_true",
                   help="also time a no-grad sampling roll-out (validation / inference: the student alone) with "
                        "and without CUDA graphs, and check they agree (the training step stays the packed pair)")
    p.add_argument("--paths", default="eager,fast",
                   help="timed paths, in order: eager (the reference, checkpointed with --eager-checkpointing), "
                        "eager-plain (the reference without gradient checkpointing), fast (with --fp8), fast-bf16 "
                        "(the fast path without FP8, beside an --fp8 run), fast-fp8-fwd (fp8=native with "
                        "fast.fp8_dgrad=false: the backward's dX GEMMs in bf16); default eager,fast")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--parity-steps", type=int, default=3, help="optimizer steps before comparing LoRA weights")
    p.add_argument("--ablation", action="store_true", help="add one optimization at a time and time each")
    p.add_argument("--no-fp32-reference", action="store_true",
                   help="bf16 runs: skip the fp32 eager reference (parity then fast vs eager, atol only)")
    p.add_argument("--out", default=None, help="JSON file or folder (default: print only)")
    p.add_argument("--rows", default=None,
                   help="JSONL file: one row appended (and flushed) per result as soon as it is measured")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(TIMED_PATHS)
    if unknown:
        p.error(f"--paths: unknown {sorted(unknown)}; known: {', '.join(TIMED_PATHS)}")
    return args


TIMED_PATHS = ("eager", "eager-plain", "fast", "fast-bf16", "fast-fp8-fwd")


# ---- FLOPs: dopsd_fast.memory (shared with dopsd-train --dry-run) --------------------------------
# ---- the two paths ---------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        from dopsd_fast.algorithm import resolve_schedule
        from dopsd_fast.config import LoraConfig
        from dopsd_fast.weights import StudentTeacher

        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        pre = PRESETS[args.preset]
        self.args = args
        self.spec = spec = family(pre.get("family", "zimage"))
        self.device = torch.device(pre["device"])
        self.dtype = torch.bfloat16 if pre["dtype"] == "bf16" else torch.float32
        self.cfg = dict(pre["config"] or spec.tiny_config())
        res = args.resolution or pre["resolution"]
        rank = pre["rank"] if args.lora_rank is None else args.lora_rank
        torch.manual_seed(args.seed)
        with torch.device(self.device):
            tr = spec.diffusers_class()(**self.cfg).to(self.dtype)
        spec.init_random(tr)
        targets = spec.default_lora_targets(self.cfg)
        if args.eager_checkpointing:
            tr.enable_gradient_checkpointing()
        self.weights = StudentTeacher(tr, LoraConfig(rank=max(rank, 1), alpha=2.0 * max(rank, 1), enabled=rank > 0),
                                      targets, self.dtype)
        with torch.no_grad():  # adapters away from zero, and the teacher away from the student
            g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
            for p in self.weights.named_trainable().values():
                if rank > 0:
                    p.add_((1e-2 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
            teach = self.weights.named_teacher().values() if rank > 0 else self.weights.teacher_module.parameters()
            for p in teach:
                p.add_((1e-2 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype) * (p.abs().mean() + 1e-3))
        self.weights.sync_teacher()  # full fine-tuning: the moved EMA into the teacher module
        self.params = self.weights.trainable_parameters()
        self.lat = spec.latent_shape(self.cfg, res)
        self.noise = torch.randn(args.batch, *self.lat, generator=torch.Generator().manual_seed(args.seed + 2)).to(
            self.device)
        gen = torch.Generator().manual_seed(args.seed + 3)
        self.ctx_s, self.ctx_t = spec.random_contexts(self.cfg, self.lat, args.cap_s or pre["cap_s"],
                                                      args.cap_t or pre["cap_t"], args.batch, gen, self.device,
                                                      self.dtype)
        self.sigmas = resolve_schedule(spec.rollout_sigmas(args.k, self.lat[1:]))
        n_img = spec.image_tokens(self.lat[1:])
        f_t = spec.forward_flops(self.cfg, n_img, [len(c.features) for c in self.ctx_t], rank, teacher=True)
        f_s = spec.forward_flops(self.cfg, n_img, [len(c.features) for c in self.ctx_s], rank)
        lora_s = f_s[0] - spec.forward_flops(self.cfg, n_img, [len(c.features) for c in self.ctx_s])[0]
        K = len(self.sigmas) - 1
        lora = rank > 0
        # floor (spec): per state one teacher forward, one student forward, one student backward (LoRA:
        # dX only), no recompute; the same count for every path
        self.flops = {"teacher_fwd": sum(f_t), "student_fwd": sum(f_s), "student_bwd": backward_flops(f_s, lora, lora_s)}
        self.floor_flops = K * sum(self.flops.values())
        # the memory model (dopsd_fast.memory: backward and checkpointing auto, --dry-run), to set against
        # the measured peak: activations + transient + gradients / AdamW state for this preset, without
        # checkpointing, for the fast path (the eager path's figure is in its own row of the model)
        from dopsd_fast.memory import peak_bytes, shape_of

        tok_s = sum(n_img + len(c.features) for c in self.ctx_s)
        tok_t = sum(spec.teacher_image_tokens(n_img) + len(c.features) for c in self.ctx_t)
        self.max_tokens = max(spec.teacher_image_tokens(n_img) + len(c.features) for c in self.ctx_t)
        self.mem_shape = mshape = dataclasses.replace(
            shape_of(self.cfg, spec, tok_s, tok_t, K, sum(p.numel() for p in self.params)), adapters=rank > 0)
        self.predicted_peak_gb = {p: peak_bytes(mshape, p, args.backward)["total"] / 1e9 for p in ("eager", "fast")}
        self.weights_gb = sum(p.numel() * p.element_size() for p in tr.parameters()) / 1e9
        self.n_params = sum(p.numel() for p in tr.parameters())
        self.rank, self.resolution = rank, res
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, **({"fused": True} if self.device.type == "cuda"
                                                                     else {"foreach": True}))
        self.fast_cache = {}

    # -- eager reference
    def _eager_vel(self, model, x, sigma, ctx):
        return self.spec.eager_velocity(model, x, sigma, ctx)

    @contextlib.contextmanager
    def eager_checkpointing(self, on: bool):
        """The eager reference with or without diffusers' gradient checkpointing, for a block of work."""
        tr = self.weights.transformer
        was = self.args.eager_checkpointing
        (tr.enable_gradient_checkpointing if on else tr.disable_gradient_checkpointing)()
        try:
            yield
        finally:
            (tr.enable_gradient_checkpointing if was else tr.disable_gradient_checkpointing)()

    def autocast(self, enabled=True):
        if self.device.type == "cuda" and self.dtype == torch.bfloat16 and enabled:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def eager_rollout(self, autocast=True):
        w = self.weights
        pair = EagerPair(self._eager_vel, w.student, w.teacher)
        return dopsd_step(pair, self.noise, self.ctx_s, self.ctx_t, self.sigmas, backward=self.args.backward,
                          autocast=self.autocast(autocast))

    # -- fast path
    def fast_model(self, kernels, graphs=False, fp8="off", fp8_dgrad=True):
        key = (kernels, graphs, fp8, fp8_dgrad)
        if key in self.fast_cache:
            return self.fast_cache[key]
        ck = self.args.checkpoint if "checkpoint" in self.spec.fast_features else "none"
        over = [f"model.family={self.spec.name}", f"model.preset={self.spec.tiny_preset}",
                f"dopsd.rollout={json.dumps(list(self.sigmas))}",
                "fast.enabled=true", f"fast.kernels={kernels}", f"fast.attention={self.args.attention}",
                f"fast.gemm={self.args.gemm}",
                f"model.gradient_checkpointing={ck}", f"fast.graphs={str(graphs).lower()}", f"fast.fp8={fp8}",
                f"dopsd.backward={self.args.backward}", f"lora.enabled={str(self.weights.lora).lower()}"]
        if fp8 == "native":
            over.append(f"fast.fp8_dgrad={str(fp8_dgrad).lower()}")
        cfg = load_config(None, over)
        # the run plan as the trainer resolves it: the memory model at this step's shape, 85% of free memory
        plan = resolve_plan(cfg, self.spec, self.weights.transformer.config, self.mem_shape, self.device,
                            memory_budget_bytes(None, self.device))
        fp = FastPath(cfg, self.spec, self.device, self.weights, plan)
        self.fast_cache[key] = fp
        return fp

    def fast_rollout(self, kernels, graphs=False, fp8="off", fp8_dgrad=True):
        return dopsd_step(self.fast_model(kernels, graphs, fp8, fp8_dgrad), self.noise, self.ctx_s, self.ctx_t, self.sigmas,
                          backward=self.args.backward, autocast=self.autocast())  # as the trainer calls it

    def sample_time(self, graphs: bool, steps: int, warmup: int):
        """Median seconds of one no-grad K-step sampling roll-out of the student (what validation and
        inference run), through CUDA graphs or launched op by op, and its final state."""
        from dopsd_fast.algorithm import euler_sample

        fp = self.fast_model("on", graphs, "off")

        def run():
            with self.autocast():
                return euler_sample(lambda x, s: fp.velocity("s", x, s, self.ctx_s), self.noise, self.sigmas)

        for _ in range(warmup):
            run()
        times = []
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            out = run()
            self.sync()
            times.append(time.perf_counter() - t0)
        failed = [t for c in (fp.graphs or {}).values() for t in c.failures.values()]
        if failed:  # the cache went on eagerly after a failed capture: not a graph timing
            raise RuntimeError(f"CUDA graph capture failed ({len(failed)} structure(s)): {failed[0]}")
        return statistics.median(times), out

    # -- a whole optimizer step
    def step(self, rollout):
        res = rollout()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.ema_update(0.9999)
        return res

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, rollout, steps, warmup):
        state = self.snapshot()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            self.step(rollout)
        times = []
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            self.step(rollout)
            self.sync()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.restore(state)
        return times, peak

    # -- state save/restore so every path starts from the same weights
    def snapshot(self):
        return {"student": [p.detach().clone() for p in self.params],
                "teacher": [p.detach().clone() for p in self.weights.named_teacher().values()],
                "opt": copy.deepcopy(self.optimizer.state_dict())}

    def restore(self, s):
        with torch.no_grad():
            for p, v in zip(self.params, s["student"]):
                p.copy_(v)
            for p, v in zip(self.weights.named_teacher().values(), s["teacher"]):
                p.copy_(v)
        self.optimizer.load_state_dict(s["opt"])
        self.weights.sync_teacher()  # full fine-tuning: the teacher module reads the restored EMA

    def grads_of(self, rollout):
        for p in self.params:
            p.grad = None
        res = rollout()
        g = [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
             for p in self.params]
        for p in self.params:
            p.grad = None
        return res, g

    def fp32_reference(self, rollout):
        """The eager path with the model's weights cast to fp32 (exact for bf16 weights), no autocast."""
        if self.dtype == torch.float32:
            return self.grads_of(rollout)
        tr = self.weights.transformer
        tmods = [tr] + ([] if self.weights.lora else [self.weights.teacher_module])
        for m in tmods:
            m.float()
        saved, self.dtype = self.dtype, torch.float32
        try:
            return self.grads_of(lambda: self.eager_rollout(autocast=False))
        finally:
            self.dtype = saved
            for m in tmods:
                m.to(saved)
            if self.weights.lora:  # LoRA weights stay fp32, as the trainer keeps them
                for p in list(self.params) + list(self.weights.named_teacher().values()):
                    p.data = p.data.float()


# ---- parity ----------------------------------------------------------------------------------
def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _cos(a, b):
    """Cosine without an epsilon floor (tiny-model gradients can be far below F.cosine_similarity's 1e-8)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float((a @ b) / (na * nb))


def parity(bench, fast_rollout, fp8: bool):
    args = bench.args
    low = bench.dtype != torch.float32
    st = bench.snapshot()
    ref = bench.fp32_reference(bench.eager_rollout) if (not low or not args.no_fp32_reference) else None
    bench.restore(st)
    eager = bench.grads_of(bench.eager_rollout)
    bench.restore(st)
    fast = bench.grads_of(fast_rollout)
    bench.restore(st)
    if ref is None:
        ref = eager
    atol = 1e-4 if not low else 2e-3
    rows, ok = {}, True
    K = len(fast[0].student_v)
    vel = []
    for k in range(K):
        for br, attr in (("student", "student_v"), ("teacher", "teacher_v")):
            f, e, r = getattr(fast[0], attr)[k], getattr(eager[0], attr)[k], getattr(ref[0], attr)[k]
            ef, ee = _rel(f, r), _rel(e, r)
            row = {"state": k, "branch": br, "max_abs_err": float((f - r).abs().max()), "rel_err_fast": ef,
                   "rel_err_eager": ee}
            if fp8:
                from dopsd_fast.fp8 import sqnr_db

                row["sqnr_db_vs_bf16_eager"] = sqnr_db(e, f)
                row["pass"] = row["sqnr_db_vs_bf16_eager"] >= 20.0
            else:
                row["pass"] = ef <= 2 * ee + atol
            ok &= row["pass"]
            vel.append(row)
    rows["velocities"] = vel
    lf, le, lr = float(fast[0].loss), float(eager[0].loss), float(ref[0].loss)
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)  # noqa: E731
    loss_tol = 2 * rel(le, lr) + (atol if not fp8 else 5e-2)
    rows["loss"] = {"fast": lf, "eager": le, "fp32_ref": lr, "rel_err_fast": rel(lf, lr), "rel_err_eager": rel(le, lr),
                    "pass": rel(lf, lr) <= loss_tol}
    ok &= rows["loss"]["pass"]
    names = list(bench.weights.named_trainable())
    per = []
    for n, gf, ge, gr in zip(names, fast[1], eager[1], ref[1]):
        if gr.norm() == 0 and gf.norm() == 0:
            continue
        per.append({"tensor": n, "cos_fast": _cos(gf, gr), "rel_err_fast": _rel(gf, gr), "rel_err_eager": _rel(ge, gr)})
    cat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    gf, ge, gr = cat(fast[1]), cat(eager[1]), cat(ref[1])
    min_cos = 0.98 if fp8 else (0.99 if low else 0.9999)
    g_ok = _rel(gf, gr) <= (2 * _rel(ge, gr) + (atol if not fp8 else 0.2)) and min(r["cos_fast"] for r in per) >= min_cos
    rows["gradients"] = {"global_rel_err_fast": _rel(gf, gr), "global_rel_err_eager": _rel(ge, gr),
                         "min_cos_fast": min(r["cos_fast"] for r in per), "min_cos_required": min_cos,
                         "worst": sorted(per, key=lambda r: r["cos_fast"])[:5], "n_tensors": len(per), "pass": g_ok}
    ok &= g_ok
    # LoRA weights after N optimizer steps, fast vs eager
    n = args.parity_steps
    for _ in range(n):
        bench.step(bench.eager_rollout)
    w_e = [p.detach().float().clone() for p in bench.params]
    bench.restore(st)
    for _ in range(n):
        bench.step(fast_rollout)
    w_f = [p.detach().float().clone() for p in bench.params]
    bench.restore(st)
    w_tol = 5e-2 if fp8 else (2e-2 if low else 1e-4)  # FP8: its own rounding, whatever the model's dtype
    rows["weights_after_steps"] = {"steps": n, "rel_err": _rel(cat(w_f), cat(w_e)), "tol": w_tol,
                                   "pass": _rel(cat(w_f), cat(w_e)) <= w_tol}
    ok &= rows["weights_after_steps"]["pass"]
    rows["tolerances"] = {"rule": "fast err vs fp32 ref <= 2 x eager err + atol" if not fp8 else
                          "velocity SQNR vs bf16 eager >= 20 dB", "atol": atol, "min_grad_cos": min_cos,
                          "weights_rel_tol": w_tol}
    rows["verdict"] = "PASS" if ok else "FAIL"
    return rows


def cpu_name() -> str:
    """The processor's name: /proc/cpuinfo's model name (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware") and ":" in line:
                name = line.split(":", 1)[1].strip()
                if name:
                    return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def workload(bench) -> str:
    """The step measured, in one line: model, size, resolution, K, LoRA rank, tokens per sample."""
    b = bench.args.batch
    ms = bench.mem_shape
    train = f"LoRA rank {bench.rank}" if bench.rank > 0 else "full fine-tuning"
    return (f"{bench.spec.title} {bench.args.preset} ({bench.n_params / 1e9:.3g} B parameters, width {ms.width}, "
            f"{sum(ms.layers.values())} layers), {bench.resolution}x{bench.resolution}, K = {len(bench.sigmas) - 1}, "
            f"{train}, tokens per sample: student {ms.tokens_student // b} / teacher {ms.tokens_teacher // b}, "
            f"batch {b}, {bench.dtype}, backward {bench.args.backward}")


def environment(device):
    import diffusers
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "diffusers": diffusers.__version__, "device": "cpu (" + cpu_name() + ")",
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = "unknown"
    return env


def executed_flops(bench, path: str) -> float:
    """FLOPs a path actually runs per step: the floor plus the recompute of checkpointed layers (the
    eager reference with --eager-checkpointing recomputes every block's student forward, eager-plain
    none; the fast path its first N main layers)."""
    K = len(bench.sigmas) - 1
    if path == "eager-plain":
        frac = 0.0
    elif path == "eager":
        frac = 1.0 if bench.args.eager_checkpointing else 0.0
    else:
        n = bench.cfg.get("n_layers") or 1
        frac = min(getattr(bench, "fast_checkpoint_layers", 0), n) / n
    return bench.floor_flops + K * frac * bench.flops["student_fwd"]


def summarize(name, times, peak, bench, path="fast"):
    med = statistics.median(times)
    row = {"path": name, "median_s": med, "min_s": min(times), "max_s": max(times),
           "samples_per_s": bench.args.batch / med, "peak_memory_gb": peak / 1e9,
           "executed_tflop": executed_flops(bench, path) / 1e12}
    if bench.device.type == "cuda":  # MFU two ways (performance.md): floor FLOPs and FLOPs executed
        row["mfu_floor"] = bench.floor_flops / med / PEAK_BF16
        row["mfu_executed"] = executed_flops(bench, path) / med / PEAK_BF16
    return row


def emit(args, row: dict) -> None:
    """Append one result row to --rows (JSONL), flushed at once: a run cut short still reports."""
    if not args.rows:
        return
    with open(args.rows, "a") as f:
        f.write(json.dumps({"stage": "step_time", "preset": args.preset, **row}, default=str) + "\n")
        f.flush()


def main(argv=None):
    args = parse(argv)
    pre = PRESETS[args.preset]
    if pre["device"] == "cuda" and not torch.cuda.is_available():
        print(f"step_time: preset {args.preset} needs a CUDA GPU (real sizes); on this machine use --preset tiny.",
              file=sys.stderr)
        return 2
    bench = Bench(args)
    fast_kw = dict(kernels=args.kernels, fp8=args.fp8)  # the step never goes through graphs (--graphs: below)
    fast_rollout = lambda: bench.fast_rollout(**fast_kw)  # noqa: E731
    bench.fast_checkpoint_layers = bench.fast_model(**fast_kw).model.checkpoint_layers
    emit(args, {"kind": "flops", "floor_tflop_per_step": bench.floor_flops / 1e12,
                **{f"{k}_tflop_per_state": v / 1e12 for k, v in bench.flops.items()},
                "cap_s": len(bench.ctx_s[0].features), "cap_t": len(bench.ctx_t[0].features)})
    par = parity(bench, fast_rollout, fp8=args.fp8 != "off")
    emit(args, {"kind": "parity", "verdict": par["verdict"], "loss_rel_err_fast": par["loss"]["rel_err_fast"],
                "grad_rel_err_fast": par["gradients"]["global_rel_err_fast"],
                "grad_rel_err_eager": par["gradients"]["global_rel_err_eager"],
                "min_grad_cos": par["gradients"]["min_cos_fast"],
                "weights_rel_err": par["weights_after_steps"]["rel_err"],
                # FP8: the velocity SQNR vs the bf16 eager path, the lowest over the states, per branch
                **({f"min_velocity_sqnr_db_{br}": min(v["sqnr_db_vs_bf16_eager"] for v in par["velocities"]
                                                      if v["branch"] == br) for br in ("student", "teacher")}
                   if args.fp8 != "off" else {})})
    timed = {}
    for path in args.paths.split(","):
        name, rollout, ctx = {
            "eager": ("eager reference" + (" (checkpointed)" if args.eager_checkpointing else ""),
                      bench.eager_rollout, contextlib.nullcontext()),
            "eager-plain": ("eager reference (no checkpointing)", bench.eager_rollout, bench.eager_checkpointing(False)),
            "fast": ("fast" + (f" (FP8 {args.fp8})" if args.fp8 != "off" else ""), fast_rollout, contextlib.nullcontext()),
            "fast-bf16": ("fast (bf16)", lambda: bench.fast_rollout(kernels=args.kernels), contextlib.nullcontext()),
            "fast-fp8-fwd": ("fast (FP8 native, forward GEMMs only: dX in bf16)",
                             lambda: bench.fast_rollout(kernels=args.kernels, fp8="native", fp8_dgrad=False),
                             contextlib.nullcontext()),
        }[path]
        with ctx:
            t, peak = bench.timed(rollout, args.steps, args.warmup)
        timed[path] = summarize(name, t, peak, bench, path=path)
        if "eager" in timed and path != "eager":
            timed[path]["speedup_vs_eager"] = timed["eager"]["median_s"] / timed[path]["median_s"]
        emit(args, {"kind": "time", **timed[path]})
    eager, fast = timed.get("eager"), timed.get("fast")
    result = {"env": environment(bench.device), "preset": args.preset, "args": vars(args), "workload": workload(bench),
              "model": {k: v for k, v in bench.cfg.items() if k in ("dim", "n_layers", "n_heads", "cap_feat_dim",
                                                                     "num_layers", "num_single_layers",
                                                                     "num_attention_heads", "joint_attention_dim")},
              "floor_tflop_per_step": bench.floor_flops / 1e12,
              "flops_tflop_per_state": {k: v / 1e12 for k, v in bench.flops.items()}, "eager": eager, "fast": fast,
              "timed": timed,
              "memory_model": {"weights_gb": bench.weights_gb,
                               "predicted_peak_beyond_weights_gb (dopsd_fast.memory, no checkpointing)":
                                   bench.predicted_peak_gb,
                               "checkpointed_layers_fast": bench.fast_model(**fast_kw).model.checkpoint_layers},
              "speedup": eager["median_s"] / fast["median_s"] if eager and fast else None,
              "memory_ratio": fast["peak_memory_gb"] / max(eager["peak_memory_gb"], 1e-9) if eager and fast else None,
              "parity": par, "verdict": par["verdict"]}
    if args.ablation:
        steps = [("eager reference", bench.eager_rollout), ("+ packed pass (eager ops)",
                                                             lambda: bench.fast_rollout("off"))]
        if bench.device.type == "cuda":
            steps.append(("+ fused kernels", lambda: bench.fast_rollout("on")))
            if args.fp8 != "off":
                steps.append((f"+ FP8 ({args.fp8})", lambda: bench.fast_rollout("on", fp8=args.fp8)))
        abl = []
        for name, fn in steps:
            t, p = bench.timed(fn, args.steps, args.warmup)
            abl.append(summarize(name, t, p, bench, path="eager" if name == "eager reference" else "fast"))
            emit(args, {"kind": "ablation", **abl[-1]})
        for r in abl:
            r["speedup_vs_eager"] = abl[0]["median_s"] / r["median_s"]
        result["ablation"] = abl
    if args.graphs and bench.device.type == "cuda":
        try:  # after the step's results: a failed capture is reported, not fatal to them
            t_l, x_l = bench.sample_time(False, args.steps, args.warmup)
            t_g, x_g = bench.sample_time(True, args.steps, args.warmup)
            err = float((x_g - x_l).abs().max() / x_l.abs().max().clamp_min(1e-12))
            result["graphs"] = {"what": f"no-grad sampling roll-out of the student, K = {len(bench.sigmas) - 1}",
                                "launched_median_s": t_l, "graphs_median_s": t_g, "speedup": t_l / t_g,
                                "final_state_max_rel_err": err}
            print(f"sampling roll-out: launched {t_l * 1e3:.1f} ms, CUDA graphs {t_g * 1e3:.1f} ms "
                  f"({t_l / t_g:.2f}x), final state max rel. difference {err:.1e}")
        except Exception as e:  # noqa: BLE001
            result["graphs"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"sampling roll-out with CUDA graphs FAILED: {result['graphs']['error']}", file=sys.stderr)
        emit(args, {"kind": "graphs", **result["graphs"]})
    print_table(result)
    if args.out:
        out = Path(args.out)
        if out.suffix != ".json":
            out.mkdir(parents=True, exist_ok=True)
            out = out / f"step_time-{args.preset}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"-> {out}")
    return 0 if par["verdict"] == "PASS" else 1


def print_table(r):
    """The results, every figure labelled: GPU (measured on CUDA), CPU (measured on the CPU: a check of
    the harness, not a performance result) or estimate (analytic FLOPs, the memory model). Memory is
    printed only where it is measured (CUDA's max_memory_allocated; on the CPU the JSON's
    peak_memory_gb is the process's maximum resident set, no step's memory)."""
    env = r["env"]
    gpu = not env["device"].startswith("cpu")
    where = "GPU" if gpu else "CPU"
    print(f"# D-OPSD step time on {env['device']} (torch {env['torch']}"
          f"{', CUDA ' + str(env.get('cuda')) if env.get('cuda') else ''})")
    if r.get("workload"):
        print(f"workload: {r['workload']}")
    print(f"floor: {r['floor_tflop_per_step']:.3g} TFLOP per step (estimate: analytic FLOP count)")
    cols = ["path", "median_s", "min_s", "max_s", "samples_per_s", "executed_tflop"]
    if gpu:
        cols[5:5] = ["peak_memory_gb"]
        cols += ["mfu_floor", "mfu_executed"]
    labels = {c: c if c == "path" else f"{c} [{'estimate' if c == 'executed_tflop' else where}]" for c in cols}
    print(" | ".join(labels[c] for c in cols))
    for row in list(r["timed"].values()) + r.get("ablation", []):
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols))
    if r["speedup"] is not None:
        print(f"speedup (eager / fast, median) [{where}]: {r['speedup']:.3f}x"
              + (f"; peak memory fast / eager [GPU]: {r['memory_ratio']:.3f}" if gpu else ""))
    mm = r.get("memory_model") or {}
    pred = next((v for k, v in mm.items() if k.startswith("predicted_peak")), None)
    if pred:
        print("memory model [estimate]: " + ", ".join(f"{p} {v:.3g} GB" for p, v in pred.items())
              + f" beyond {mm.get('weights_gb', 0):.3g} GB of weights, no checkpointing"
              + ("" if gpu else "; memory not measured on the CPU"))
    p = r["parity"]
    worst_v = max(p["velocities"], key=lambda v: v["rel_err_fast"])
    print(f"parity [{where}]: velocities worst rel err {worst_v['rel_err_fast']:.3g} (eager {worst_v['rel_err_eager']:.3g}); "
          f"loss rel err {p['loss']['rel_err_fast']:.3g}; grads global rel err {p['gradients']['global_rel_err_fast']:.3g}, "
          f"min cos {p['gradients']['min_cos_fast']:.6f}; LoRA after {p['weights_after_steps']['steps']} steps rel err "
          f"{p['weights_after_steps']['rel_err']:.3g}")
    print(f"verdict: {p['verdict']}  ({p['tolerances']['rule']}; atol {p['tolerances']['atol']})")
    if not gpu:
        print("note: CPU times check the harness; they are not performance results.")

if __name__ == "__main__":
    sys.exit(main())
