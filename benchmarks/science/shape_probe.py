"""Why does the curved world's base draw a blob for every shape word? A probe of one hypothesis.

The base trains on noise levels shifted toward noise (``pipeline.train_sigmas``: logit-normal, shift
3, the Z-Image inference shift). A shape differs from the others only in fine detail, which is
decided at low noise, where a shift of 3 puts few of the training samples. From a built base, two
arms fine-tune the DiT and the text encoder on the base's own text-to-image batches for the same
steps, with the same data and seeds: shift 3 (the control: just more training), shift 1 (no
shift), and shift 3 with the object's latents weighing ``1 + object_weight`` in the loss (the object
mask pooled to the latent grid: the VAE's fix, tried on the DiT). Each is scored on 128 prompts of **trained** (shape, colour) combinations at 40 steps,
unguided and guided, by attribute (the classifier of the build).

    python benchmarks/science/shape_probe.py --out runs/curved --steps 500   # 3 arms, 8 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[2]))


def score(toy, net, entries) -> dict:
    from dopsd_fast.toy import pipeline as P
    from dopsd_fast.toy import quality as Q

    caps = [e["prompt"] for e in entries]
    res = {}
    for name, w in (("unguided", 1.0), ("guided", P.GUIDANCE)):
        pics = P.generate(toy, caps, schedule=P.fine_schedule(), guidance=w)
        overall, by = Q.prompt_accuracy(net, pics, entries, by_attribute=True)
        res[name] = {"prompt_accuracy": round(overall, 4), **{k: by[k] for k in ("shape", "colour", "size")}}
    return res


def arm(out: Path, shift: float, steps: int, batch: int, lr: float, seed: int = 0, object_weight: float = 0.0):
    from dopsd_fast.toy import curved as C
    from dopsd_fast.toy import models as M
    from dopsd_fast.toy import pipeline as P
    from dopsd_fast.toy import world as W
    from dopsd_fast.toy.stages import step_rng

    toy = P.load_toy(out, "base")
    dit, te = toy.transformer, toy.text_encoder
    for m in (dit, te):
        m.requires_grad_(True).train()
    params = list(dit.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = [copy.deepcopy(m).requires_grad_(False) for m in (dit, te)]
    for step in range(steps):
        g = step_rng(seed, step, 41)
        idx, rng = P._indices(seed, step, batch, 43)
        x, _, attrs = C.batch("train", idx)
        caps = ["" if rng.random() < P.P_UNCOND else W.caption(a, C.draw_drop(rng)) for a in attrs]
        with torch.no_grad():
            x0 = M.vae_encode(toy.vae, x)
        sig = P.train_sigmas(g, batch, shift).view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        v = M.velocity(dit, (1 - sig) * x0 + sig * eps, sig.flatten(), M.encode_text(toy.tokenizer, te, caps))
        w = 1.0
        if object_weight:
            mask = torch.stack([W.object_mask(a) for a in attrs])
            w = 1 + object_weight * torch.nn.functional.adaptive_avg_pool2d(mask, x0.shape[-2:])
        loss = ((v - (eps - x0)).pow(2) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, m in zip(ema, (dit, te)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - 0.99)
        if step % 100 == 0:
            print(f"shift {shift}: step {step} loss {loss.item():.4f}", flush=True)
    toy.transformer, toy.text_encoder = (e.eval() for e in ema)
    return toy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/curved", help="a curved-world build (its weights/)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--arms", default="3,1,3w", help="the arms: noise-level shifts; a trailing w weighs the object")
    p.add_argument("--object-weight", type=float, default=4.0, help="the w arms' object weight")
    p.add_argument("--result", default=None, help="write the scores here as JSON")
    a = p.parse_args(argv)
    from dopsd_fast.toy import curved as C
    from dopsd_fast.toy import pipeline as P
    from dopsd_fast.toy.classifier import load_classifier

    out = Path(a.out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net = load_classifier(out / "weights")
    entries = C.partial_prompts("validation", 128)  # trained combinations
    res = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "start": score(P.load_toy(out, "base"), net, entries)}
    print("start", res["start"], flush=True)
    for name in a.arms.split(","):
        ow = a.object_weight if name.endswith("w") else 0.0
        res[f"shift_{name}"] = score(arm(out, float(name.rstrip("w")), a.steps, a.batch, a.lr, object_weight=ow), net, entries)
        print(f"shift {name}", res[f"shift_{name}"], flush=True)
    if a.result:
        Path(a.result).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
