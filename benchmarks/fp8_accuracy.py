"""FP8 accuracy of ``fast.fp8: native``: what the FP8 GEMMs do to the velocity and to the LoRA gradients,
against bf16 and fp32, at the released width and on the tiny full model.

    python benchmarks/fp8_accuracy.py --out benchmarks/results/DATE-cpu-fp8-accuracy/
    python benchmarks/fp8_accuracy.py --image-tokens 1024 --blocks 2     # fewer tokens, same width

Three parts, each with the fp32 path as the reference and the bf16 path beside the FP8 one (the parity
rule of performance.md: a low-precision path is judged by its error against fp32 next to bf16's):

* ``real_width``: the fast path (``FastZImage``, the student branch) on a Z-Image transformer of the
  released configuration (dim 3840, 30 heads of 128, FFN 10240, ``families/zimage/spec.py``
  ``RELEASED``) cut to ``--blocks`` main blocks and no refiners, at diffusers' own initialisation
  (``ZImageTransformer2DModel`` sets no init of its own: PyTorch's default ``nn.Linear`` init, RMSNorm
  weights 1), with LoRA r64 / alpha 128 on q, k, v, out, w1, w2, w3 (B drawn non-zero, as after some
  training: a zero B gives A no gradient). Inputs: a 1024^2 latent (4096 image tokens, or
  ``--image-tokens``) and a 512-token caption of Qwen3 width (2560). Measured: the velocity's SQNR
  (``dopsd_fast.fp8.sqnr_db``) and, for one fixed upstream gradient, the SQNR of the gradient with
  respect to the latent (dX, through every block's backward) and of every LoRA gradient (the worst and
  the gradient-norm-weighted whole).
* ``gemm_full_rows``: one block GEMM (to_q, 3840 -> 3840) over all 4608 rows (4096 image + 512
  caption tokens) of the embedded input: rowwise quantization scales each row alone, so its error does
  not depend on the row count; this checks it at the real count when the blocks ran with fewer.
* ``tiny_training``: the tiny Z-Image through the trainer (``dopsd_fast.trainer.Trainer``, the fast
  path, bf16 weights), ``--steps`` optimizer steps with ``fast.fp8`` off / native rowwise / native
  tensorwise beside an fp32 run: the loss per step, the LoRA gradients of the first and of the last
  step (each run at its own weights by then) and the LoRA weights after the last.

Each FP8 variant runs with the backward's dX GEMMs in FP8 (``fast.fp8_dgrad``, the default: one per group
of linears, the output gradients quantized per row as one) and ``fp8-rowwise-fwdonly`` with them in bf16.
Off a GPU the FP8 GEMM is ``torch._scaled_mm`` on the CPU (PyTorch's reference kernel: e4m3 inputs,
fp32 accumulation), exactly the code the GPU runs around it; cuBLAS may
accumulate in another order. Times printed here are CPU times: they are not performance results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from dopsd_fast.fp8 import NativeFP8, quantize, sqnr_db  # noqa: E402

# fp8-*: fast.fp8=native with its defaults (the backward's dX GEMMs in FP8 too: fast.fp8_dgrad);
# *-fwdonly: the forward GEMMs alone in FP8, dX in bf16 (fast.fp8_dgrad=false)
PRECISIONS = ("fp32", "bf16", "fp8-rowwise", "fp8-tensorwise", "fp8-rowwise-fwdonly")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def _log(*a):
    print(*a, flush=True)


def _set_precision(st, fast, name: str, fp32_base: dict):
    """The base weights in fp32 or bf16 (the LoRA masters stay fp32, cast per use as the trainer does);
    FP8 on the block linears for the fp8-* precisions (a fresh cache: weights quantized once)."""
    dtype = torch.float32 if name == "fp32" else torch.bfloat16
    with torch.no_grad():
        for n, p in st.transformer.named_parameters():
            if "lora_" not in n:
                p.data = fp32_base[n].to(dtype)
    fast.fp8_native = (NativeFP8(name.split("-")[1], dgrad=not name.endswith("-fwdonly")) if name.startswith("fp8")
                       else None)
    return dtype


def _grad_sqnr(ref: dict, test: dict) -> dict:
    """SQNR of the LoRA gradients: the worst tensor and the whole set (error energy over signal energy
    summed over tensors). Tensors whose reference gradient is exactly zero (lora_A while B is still 0)
    carry no signal: counted, left out."""
    live = [n for n in ref if bool(ref[n].any())]
    per = {n: sqnr_db(ref[n], test[n]) for n in live}
    sig = sum(float(ref[n].double().pow(2).sum()) for n in live)
    err = sum(float((test[n].double() - ref[n].double()).pow(2).sum()) for n in live)
    worst = min(per, key=per.get)
    return {"all_db": 10 * torch.log10(torch.tensor(sig / max(err, 1e-300))).item(), "worst_db": per[worst],
            "worst_tensor": worst, "n_tensors": len(live), "n_zero_reference": len(ref) - len(live)}


def real_width(blocks: int, image_tokens: int, cap_tokens: int, rank: int, seed: int, dim: int = 3840) -> dict:
    from diffusers import ZImageTransformer2DModel

    from dopsd_fast.config import LoraConfig
    from dopsd_fast.families.zimage.spec import RELEASED
    from dopsd_fast.models.ops import FusedOps
    from dopsd_fast.models.zimage import FastZImage
    from dopsd_fast.weights import STUDENT, TEACHER, StudentTeacher

    side = int(round(image_tokens ** 0.5))
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens must be a square (a square latent of 2x2 patches), got {image_tokens}")
    torch.manual_seed(seed)
    cfg = dict(RELEASED, n_layers=blocks, n_refiner_layers=0)
    if dim != RELEASED["dim"]:  # a narrower model of the same head dim (128): a quick check of the script only
        cfg |= {"dim": dim, "n_heads": dim // 128, "n_kv_heads": dim // 128}
    tr = ZImageTransformer2DModel(**cfg).float().eval()
    st = StudentTeacher(tr, LoraConfig(rank=rank, alpha=2.0 * rank), TARGETS, torch.float32)
    with torch.no_grad():  # B non-zero (as after some steps), A at its init; the teacher adapter a little apart
        for n, p in st.named_trainable().items():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
        for (_, ps), (_, pt) in zip(st.named_trainable().items(), st.named_teacher().items()):
            pt.copy_(ps + 0.1 * ps.std() * torch.randn_like(ps))
    fp32_base = {n: p.detach().clone() for n, p in tr.named_parameters() if "lora_" not in n}
    fast = FastZImage((tr, STUDENT), (tr, TEACHER), ops=FusedOps(attention="sdpa", gemm="cublas"))
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(1, 16, 2 * side, 2 * side, generator=g)  # a latent of 8x-downsampled pixels, 2x2 patches
    t = torch.tensor([0.5])  # sigma 0.5, mid roll-out
    cap0 = torch.randn(cap_tokens, cfg["cap_feat_dim"], generator=g)
    upstream = None
    runs = {}
    for name in PRECISIONS:
        dtype = _set_precision(st, fast, name, fp32_base)
        x = x0.to(dtype).requires_grad_()
        t0 = time.perf_counter()
        v, _ = fast.forward_pair(x, t, [cap0.to(dtype)])
        if upstream is None:
            upstream = torch.randn(v.shape, generator=g)  # one fixed dL/dv for every precision
        params = list(st.named_trainable().items())
        grads = torch.autograd.grad(v, [x] + [p for _, p in params], upstream.to(v.dtype))
        runs[name] = {"v": v.detach().float(), "dx": grads[0].float(),
                      "lora": {n: gr.float() for (n, _), gr in zip(params, grads[1:])}}
        if name.startswith("fp8"):
            assert fast.fp8_native._w, "no block linear took the FP8 path"
            runs[name]["fp8_linears"] = len(fast.fp8_native._w)
        _log(f"real width {name}: forward + backward {time.perf_counter() - t0:.1f} s (CPU)")
    ref, bf = runs["fp32"], runs["bf16"]
    out = {"config": {"dim": cfg["dim"], "heads": cfg["n_heads"], "ffn": int(cfg["dim"] / 3 * 8), "main_blocks": blocks,
                      "refiners": 0, "image_tokens": image_tokens, "caption_tokens": cap_tokens,
                      "caption_padded": cap_tokens + (-cap_tokens) % 32, "lora_rank": rank, "lora_alpha": 2.0 * rank,
                      "sigma": 0.5, "branch": "student", "init": "diffusers default (nn.Linear kaiming-uniform)",
                      "seed": seed},
           "velocity_rms": float(ref["v"].pow(2).mean().sqrt())}
    for name in PRECISIONS[1:]:
        r = runs[name]
        row = {"velocity_sqnr_vs_fp32_db": sqnr_db(ref["v"], r["v"]), "dx_sqnr_vs_fp32_db": sqnr_db(ref["dx"], r["dx"]),
               "lora_grad_vs_fp32": _grad_sqnr(ref["lora"], r["lora"])}
        if name != "bf16":
            row |= {"velocity_sqnr_vs_bf16_db": sqnr_db(bf["v"], r["v"]), "dx_sqnr_vs_bf16_db": sqnr_db(bf["dx"], r["dx"]),
                    "lora_grad_vs_bf16": _grad_sqnr(bf["lora"], r["lora"]), "fp8_linears": r["fp8_linears"]}
        out[name] = row
    return out


def gemm_full_rows(image_tokens: int, cap_tokens: int, seed: int) -> dict:
    """to_q of a released-width block over every row of the embedded input (image + caption tokens)."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from dopsd_fast.families.zimage.spec import RELEASED

    torch.manual_seed(seed)
    d = RELEASED["dim"]
    x_emb = torch.nn.Linear(64, d)  # the patch embedder (2x2x16 -> dim) and the caption embedder, default init
    cap_emb = torch.nn.Sequential(torch.nn.RMSNorm(RELEASED["cap_feat_dim"], eps=1e-5),
                                  torch.nn.Linear(RELEASED["cap_feat_dim"], d))
    block = ZImageTransformerBlock(0, d, RELEASED["n_heads"], RELEASED["n_kv_heads"], 1e-5, True)
    with torch.no_grad():
        h = torch.cat([x_emb(torch.randn(image_tokens, 64)), cap_emb(torch.randn(cap_tokens, RELEASED["cap_feat_dim"]))])
        h = block.attention_norm1(h)  # the GEMM's input (modulation scale 1 + ~0 at init)
        w = block.attention.to_q.weight
        ref = h @ w.t()
        out = {"rows": h.shape[0], "shape": f"{h.shape[0]} x {d} -> {w.shape[0]}",
               "bf16_sqnr_vs_fp32_db": sqnr_db(ref, (h.bfloat16() @ w.bfloat16().t()).float())}
        for recipe in ("rowwise", "tensorwise"):
            hq, hs = quantize(h.bfloat16(), recipe == "rowwise")
            wq, ws = quantize(w.bfloat16(), recipe == "rowwise")
            y = torch._scaled_mm(hq, wq.t(), scale_a=hs, scale_b=ws.t() if recipe == "rowwise" else ws,
                                 out_dtype=torch.bfloat16)
            out[f"fp8_{recipe}_sqnr_vs_fp32_db"] = sqnr_db(ref, y.float())
    return out


def tiny_training(steps: int, workdir: Path) -> dict:
    from dopsd_fast.config import load_config
    from dopsd_fast.trainer import Trainer

    base = [f"train.max_steps={steps}", "train.progress=false", "train.tensorboard=false", "validation.at_start=false",
            "validation.every=0", "train.checkpoint_every=0", "fast.enabled=true", "model.device=cpu"]
    variants = {"fp32": ["model.dtype=fp32"], "bf16": ["model.dtype=bf16"],
                "fp8-rowwise": ["model.dtype=bf16", "fast.fp8=native", "fast.fp8_recipe=rowwise"],
                "fp8-tensorwise": ["model.dtype=bf16", "fast.fp8=native", "fast.fp8_recipe=tensorwise"],
                "fp8-rowwise-fwdonly": ["model.dtype=bf16", "fast.fp8=native", "fast.fp8_recipe=rowwise",
                                        "fast.fp8_dgrad=false"]}
    runs = {}
    for name, over in variants.items():
        trainer = Trainer(load_config(None, base + over + [f"train.output_dir={workdir / name}"]))
        grads = []  # the LoRA gradients of every step, read before the optimizer uses them

        def record(opt, args, kwargs, _grads=grads, _w=trainer.weights):
            _grads.append({n: p.grad.detach().float().clone() for n, p in _w.named_trainable().items()
                           if p.grad is not None})

        trainer.optimizer.register_step_pre_hook(record)
        losses = [trainer.train_step()["loss"] for _ in range(steps)]
        runs[name] = {"losses": losses, "grads_first": grads[0], "grads_last": grads[-1],
                      "weights": {n: p.detach().float().clone() for n, p in trainer.weights.named_trainable().items()}}
        _log(f"tiny {name}: losses {['%.5f' % x for x in losses]}")
        del trainer
    ref, bf = runs["fp32"], runs["bf16"]

    def rel(a: dict, b: dict) -> float:
        num = sum(float((a[n] - b[n]).double().norm() ** 2) for n in b)
        den = sum(float(b[n].double().norm() ** 2) for n in b)
        return (num / den) ** 0.5

    out = {"steps": steps, "losses": {n: r["losses"] for n, r in runs.items()}}
    for name in PRECISIONS[1:]:
        r = runs[name]
        out[name] = {"max_loss_rel_err_vs_fp32": max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])),
                     "first_step_lora_grad_vs_fp32": _grad_sqnr(ref["grads_first"], r["grads_first"]),
                     "last_step_lora_grad_vs_fp32": _grad_sqnr(ref["grads_last"], r["grads_last"]),
                     "lora_weight_rel_err_vs_fp32": rel(r["weights"], ref["weights"])}
        if name != "bf16":
            out[name] |= {"max_loss_rel_err_vs_bf16": max(abs(a - b) / abs(b) for a, b in zip(r["losses"], bf["losses"])),
                          "first_step_lora_grad_vs_bf16": _grad_sqnr(bf["grads_first"], r["grads_first"]),
                          "last_step_lora_grad_vs_bf16": _grad_sqnr(bf["grads_last"], r["grads_last"]),
                          "lora_weight_rel_err_vs_bf16": rel(r["weights"], bf["weights"])}
    return out


def _commit() -> str:
    try:
        here = Path(__file__).parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
        return head + ("-dirty" if dirty and head else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2, help="main blocks at the released width")
    ap.add_argument("--image-tokens", type=int, default=4096, help="4096 = a 1024^2 image (a square number)")
    ap.add_argument("--cap-tokens", type=int, default=512, help="the student's caption tokens")
    ap.add_argument("--dim", type=int, default=3840, help="the released width; less only to check the script")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps of the tiny training comparison")
    ap.add_argument("--parts", default="real_width,gemm_full_rows,tiny_training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="a folder: results.json there")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    res = {"machine": {"device": "cpu", "processor": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
                       "fp8": "torch._scaled_mm on the CPU (e4m3 inputs, fp32 accumulation); backward dX in FP8 "
                              "(fast.fp8_dgrad) except the *-fwdonly variants"},
           "commit": _commit(), "argv": sys.argv[1:]}
    t0 = time.perf_counter()
    if "gemm_full_rows" in parts:
        res["gemm_full_rows"] = gemm_full_rows(4096, args.cap_tokens, args.seed)
        _log("gemm_full_rows:", json.dumps(res["gemm_full_rows"]))
    if "real_width" in parts:
        res["real_width"] = real_width(args.blocks, args.image_tokens, args.cap_tokens, args.lora_rank, args.seed, args.dim)
        _log("real_width:", json.dumps({k: v for k, v in res["real_width"].items()}, indent=1))
    if "tiny_training" in parts:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            res["tiny_training"] = tiny_training(args.steps, Path(tmp))
        _log("tiny_training:", json.dumps({k: v for k, v in res["tiny_training"].items() if k != "losses"}, indent=1))
    res["wall_s_cpu"] = time.perf_counter() - t0
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
