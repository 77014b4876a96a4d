"""SFT vs D-OPSD in miniature: teach the toy student the concept ``[V]`` with each method and
measure concept fidelity, few-step quality and forgetting over training steps.

    python benchmarks/science/concept_experiment.py --out runs/concept-experiment     # 11 min on 2 cores

Both methods run through the project's own trainer (``dopsd_fast.trainer.Trainer``, eager path), from
the shipped toy student (``model.preset=toy-zimage``, K = 4), with the same data, steps, learning
rate, LoRA and seeds; only ``method`` differs. Two data settings:

- ``concept``: the 6 ``[V]`` pairs alone (``data.builtin=toy-concept``);
- ``concept+prior``: the 6 ``[V]`` pairs and 18 ordinary world pairs (``toy-concept-prior``), the
  DreamBooth-style prior preservation a user adds against forgetting.

Every ``--probe-every`` steps the student is sampled at its 4-step schedule with fixed noise and
scored by :class:`dopsd_fast.toy.concept.Probe` (``[V]`` background error and classifier score on the
training and 32 held-out ``[V]`` captions, the held-out captions' object accuracy, world accuracy and
drift on 64 held-out world captions). Writes ``runs/<setting>-<method>-s<seed>.json`` (one per run:
an interrupted experiment resumes at the first unfinished run), ``results.json``, ``results.md``,
``curves.png`` and ``samples.png``; ``--publish DIR`` copies the last four there
(``benchmarks/science/concept/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

if importlib.util.find_spec("dopsd_fast") is None:  # a checkout with no install: its root goes LAST on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[2]))

SETTINGS = {"concept": "toy-concept", "concept+prior": "toy-concept-prior"}
METHODS = ("sft", "dopsd")
# What each plot / table column reads from a probe: (set, key, label, lower is better)
METRICS = [
    ("concept_heldout", "v_background_mse", "[V] background error, held-out [V] prompts (MSE)", True),
    ("concept_train", "v_background_mse", "[V] background error, training prompts (MSE)", True),
    ("concept_heldout", "v_centroid_rate", "[V] centroid rate, held-out [V] prompts", False),
    ("concept_heldout", "v_score", "classifier P([V]), held-out [V] prompts", False),
    ("concept_heldout", "accuracy_mean", "object accuracy, held-out [V] prompts", False),
    ("world", "accuracy_mean", "attribute accuracy, held-out world prompts", False),
    ("world", "v_centroid_rate", "[V] leak: centroid rate, world prompts", True),
    ("world", "drift_mse", "world drift from the starting student (MSE)", True),
]


def config(setting: str, method: str, seed: int, steps: int, lr: float, rank: int, out: Path) -> dict:
    return {
        "method": method,
        "model": {"family": "zimage", "preset": "toy-zimage"},
        "lora": {"rank": rank, "alpha": 2 * rank},
        "dopsd": {"rollout": "zimage-k4", "loss": "x0", "ema_decay": 0.9999},
        "optim": {"lr": lr},
        "data": {"builtin": SETTINGS[setting], "prompt_keys": ["prompt"], "buckets": [[64, 64]], "num_workers": 0},
        "train": {"output_dir": str(out), "max_steps": steps, "seed": seed, "progress": False,
                  "checkpoint_every": 0, "tensorboard": False},
        "validation": {"every": 0, "at_start": False},
    }


def one_run(setting, method, seed, args, probe) -> dict:
    from dopsd_fast.config import config_from_dict
    from dopsd_fast.trainer import Trainer

    probe.reference = None
    tr = Trainer(config_from_dict(config(setting, method, seed, args.steps, args.lr, args.rank,
                                         args.out / "train" / f"{setting}-{method}-s{seed}")))
    curve, t_train, pics = [], 0.0, {}
    teacher = None
    if method == "dopsd":
        from dopsd_fast.toy.concept import teacher_reference

        teacher = teacher_reference(tr, probe)
    while True:
        if tr.step % args.probe_every == 0 or tr.step == args.steps:
            res, p = probe(tr)
            curve.append({"step": tr.step, **res})
            if tr.step in (0, args.steps):
                pics[tr.step] = {k: v[:8] for k, v in p.items()}
        if tr.step >= args.steps:
            break
        t0 = time.perf_counter()
        tr.train_step()
        t_train += time.perf_counter() - t0
    torch.save(pics, args.out / "runs" / f"{setting}-{method}-s{seed}.pt")
    return {"setting": setting, "method": method, "seed": seed, "steps": args.steps, "lr": args.lr,
            "rank": args.rank, "train_seconds": round(t_train, 1), "teacher_at_start": teacher, "curve": curve}


def _get(point, s, k):
    return point[s][k]


def summarise(runs: list[dict]) -> dict:
    out = {}
    for setting in SETTINGS:
        for method in METHODS:
            rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
            if not rs:
                continue
            row = {"seeds": len(rs), "train_seconds": statistics.mean(r["train_seconds"] for r in rs)}
            for s, k, _, _ in METRICS:
                start = [_get(r["curve"][0], s, k) for r in rs]
                end = [_get(r["curve"][-1], s, k) for r in rs]
                row[f"{s}.{k}"] = {"start": statistics.mean(start), "end": statistics.mean(end),
                                   "end_sd": statistics.stdev(end) if len(end) > 1 else 0.0}
            out[f"{setting}/{method}"] = row
    t = [r["teacher_at_start"] for r in runs if r.get("teacher_at_start")]
    if t:  # the same at every seed (the teacher at step 0 is the toy student under the teacher context)
        out["teacher_at_start"] = t[0]
    return out


def markdown(summary: dict, args) -> str:
    lines = [f"SFT vs D-OPSD from the toy student: {args.steps} steps, lr {args.lr}, LoRA r{args.rank} "
             f"(alpha {2 * args.rank}), batch 1, seeds {' '.join(map(str, args.seeds))}; mean (sd over seeds) "
             "at the last step; `start` is the toy student before fine-tuning.", ""]
    head = "| data / method | " + " | ".join(label for _, _, label, _ in METRICS) + " | train s |"
    lines += [head, "|" + "---|" * (len(METRICS) + 2)]
    first = next(v for k, v in summary.items() if k != "teacher_at_start")
    lines.append("| start (toy student) | " + " | ".join(f"{first[f'{s}.{k}']['start']:.3f}" for s, k, _, _ in METRICS)
                 + " | |")
    for name, row in summary.items():
        if name == "teacher_at_start":
            continue
        cells = [f"{row[f'{s}.{k}']['end']:.3f} ({row[f'{s}.{k}']['end_sd']:.3f})" for s, k, _, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
    t = summary.get("teacher_at_start")
    if t:
        lines += ["", f"D-OPSD's teacher at step 0 (the toy student under the teacher context: caption + target picture) "
                  f"on the 6 training pairs: [V] background error {t['v_background_mse']:.3f}, [V] centroid rate "
                  f"{t['v_centroid_rate']:.3f}, classifier P([V]) {t['v_score']:.3f}, object accuracy "
                  f"{t['accuracy_mean']:.3f}."]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(19, 8.5))
    colours = {"sft": "tab:orange", "dopsd": "tab:blue"}
    styles = {"concept": "-", "concept+prior": "--"}
    for ax, (s, k, label, lower) in zip(axes.flat, METRICS):
        for setting in SETTINGS:
            for method in METHODS:
                rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
                if not rs:
                    continue
                steps = [p["step"] for p in rs[0]["curve"]]
                vals = torch.tensor([[_get(p, s, k) for p in r["curve"]] for r in rs])
                m = vals.mean(0)
                ax.plot(steps, m, styles[setting], color=colours[method],
                        label=f"{'D-OPSD' if method == 'dopsd' else 'SFT'}, {setting}")
                if len(rs) > 1:
                    ax.fill_between(steps, vals.min(0).values, vals.max(0).values, color=colours[method], alpha=0.12)
        ax.set_title(label + (" (lower is better)" if lower else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Teaching the toy student [V]: SFT vs D-OPSD (lines: mean over seeds; bands: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def picture(args, path: Path) -> None:
    """Rows: the toy student, then each (data, method) after training (seed of the first run); left
    8 held-out [V] prompts, right 8 held-out world prompts."""
    from dopsd_fast.toy import world as W
    from dopsd_fast.toy.concept import prompt_sets

    seed = args.seeds[0]
    sets = prompt_sets()
    truth = torch.stack([W.to_tensor(W.render(a)) for a in sets["concept_heldout"][1][:8]])
    rows = [torch.cat([truth, torch.stack([W.to_tensor(W.render(a)) for a in sets["world"][1][:8]])])]
    first = None
    for setting in SETTINGS:
        for method in METHODS:
            f = args.out / "runs" / f"{setting}-{method}-s{seed}.pt"
            if not f.is_file():
                continue
            pics = torch.load(f)
            if first is None:
                first = pics[0]
                rows.append(torch.cat([first["concept_heldout"], first["world"]]))
            end = pics[max(pics)]
            rows.append(torch.cat([end["concept_heldout"], end["world"]]))
    W.grid(torch.cat(rows), ncol=16, scale=2).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/concept-experiment"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--probe-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--publish", type=Path, default=None, help="copy results and figures here")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("concept_experiment.py: matplotlib is needed for the plots: pip install matplotlib")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dopsd_fast").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from tqdm.auto import tqdm

    from dopsd_fast.toy.concept import Probe

    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    probe = Probe()
    todo = [(st, m, s) for st in args.settings for s in args.seeds for m in METHODS]
    runs = []
    for setting, method, seed in tqdm(todo, desc="runs"):
        f = args.out / "runs" / f"{setting}-{method}-s{seed}.json"
        if f.is_file():
            runs.append(json.loads(f.read_text()))
            continue
        r = one_run(setting, method, seed, args, probe)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(r) + "\n")
        tmp.replace(f)
        runs.append(r)
    summary = summarise(runs)
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "summary": summary, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(summary, args))
    plot_curves(runs, args.out / "curves.png")
    picture(args, args.out / "samples.png")
    print(markdown(summary, args))
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md", "curves.png", "samples.png"):
            shutil.copy(args.out / name, args.publish / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
