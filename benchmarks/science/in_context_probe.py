"""Can the toy's in-context route (the teacher context: the VLM reading [picture, caption]) learn to
copy a texture it never saw, the ``[V]`` checkerboard? A DiT, text encoder and vision tower trained
from scratch on the curved world's in-context batches only (``pipeline.in_context_batch``: train
pictures and uncaptioned patterns, never ``[V]``), unit-scale vision position embeddings, the
frozen VAE and the metric classifier of ``--weights``; then the teacher's texture metrics on the 6
training and 16 held-out ``[V]`` pictures (20 Euler steps) and the copy error on unseen patterns.

    python benchmarks/science/in_context_probe.py --weights runs/curved/weights --steps 400   # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="a toy weights folder with vae and classifier")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("runs/in-context-probe"))
    args = ap.parse_args(argv)

    from dopsd_fast.toy import curved as C
    from dopsd_fast.toy import models as M
    from dopsd_fast.toy import pipeline as P
    from dopsd_fast.toy import world as W
    from dopsd_fast.toy.concept import OBJECT_ATTRIBUTES, score, texture_scores

    args.out.mkdir(parents=True, exist_ok=True)
    tok, te, vlm, ip = M.build_encoders(args.weights, load=False, vision_pos_std=P.CURVED_BASE["vision_pos_std"])
    vae = M.build_vae(args.weights).requires_grad_(False).eval()
    dit = M.build_transformer(None)
    clf = P.load_classifier(args.weights)
    net = P._Trainable(dit, te, vlm.visual)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    sched = P._lr_schedule(opt, args.steps, warmup=50)
    ema = copy.deepcopy(net).requires_grad_(False)
    t0 = time.time()
    for step in range(args.steps):
        g = P.step_rng(7, step, 3)
        x_c, cap_c = P.in_context_batch(7, step, args.batch, salt=9)
        with torch.no_grad():
            x0 = M.vae_encode(vae, x_c)
        feats = M.encode_teacher(tok, vlm, ip, cap_c, x_c)
        sig = P.train_sigmas(g, x0.shape[0])
        eps = torch.randn(x0.shape, generator=g)
        xs = (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * eps
        loss = (M.velocity(dit, xs, sig, feats) - (eps - x0)).pow(2).mean()
        P._update(loss, net, opt, sched, step, ema=ema, ema_decay=0.99)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    net.load_state_dict(ema.state_dict())
    net.eval()
    toy = M.Toy(tok, te, vlm, ip, vae, dit, {})
    x, caps, attrs = C.batch("concept", range(len(W.CONCEPT_TRAIN)))
    xh, capsh, attrsh = C.batch("concept-heldout", range(16))
    sched20 = P.fine_schedule(5)
    gen = P.generate(toy, caps + capsh, images=torch.cat([x, xh]), schedule=sched20)
    xp, capp, _ = C.batch("patterned", range(1000, 1016))
    genp = P.generate(toy, capp, images=xp, schedule=sched20)
    res = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seconds": round(time.time() - t0),
           "teacher_concept": texture_scores(gen, attrs + attrsh),
           "patterned_copy_mse": round(float((genp - xp).pow(2).mean()), 4)}
    res["teacher_concept"]["object_accuracy"] = round(score(clf, gen, attrs + attrsh, OBJECT_ATTRIBUTES)["accuracy_mean"], 4)
    W.grid(torch.cat([x, gen[:6], xp[:6], genp[:6]]), ncol=6, scale=2).save(args.out / "in_context_probe.png")
    (args.out / "in_context_probe.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
