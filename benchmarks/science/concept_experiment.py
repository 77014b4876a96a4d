"""SFT vs D-OPSD in miniature: teach the toy student the concept ``[V]`` with each method and
measure concept fidelity, few-step quality and forgetting over training steps.

    python benchmarks/science/concept_experiment.py                 # the shipped student, 20 min on 2 cores
    python benchmarks/science/concept_experiment.py --weights runs/toy/weights --steps 400 --probe-every 50

Both methods run through the project's own trainer (``dopsd_fast.trainer.Trainer``, eager path), from
the toy student (``model.preset=toy-zimage``; K = 2 on the shipped curved world, 4 on the v1 one; ``--weights`` points the preset at another
toy weights folder, e.g. a rebuilt one), with the same data, steps, learning rate, LoRA and seeds;
only ``method`` differs. D-OPSD's EMA teacher decays with a half-life of a quarter of the run unless
``--ema-decay`` says otherwise. Two data settings:

- ``concept``: the 6 ``[V]`` pairs alone (``data.builtin=toy-concept``);
- ``concept+prior``: the 6 ``[V]`` pairs and 18 ordinary world pairs (``toy-concept-prior``), the
  DreamBooth-style prior preservation a user adds against forgetting.

The world is the weights' (``toy.json``): on the v1 world every ``--probe-every`` steps the student is
scored by :class:`dopsd_fast.toy.concept.Probe`; on the curved world by
:class:`dopsd_fast.toy.concept.CurvedProbe` (``[V]`` checker correlation and background error,
object accuracy on held-out ``[V]`` captions; few-step quality on 128 of the curved world's fixed
held-out prompts: Frechet distance, precision, recall, sharpness, prompt accuracy; drift), and the
starting student is also scored at ``--noise-seeds`` other sampling noises: the noise floor every
change is compared with. Writes ``runs/<setting>-<method>-s<seed>.json`` (one per run: an
interrupted experiment resumes at the first unfinished run), ``results.json``, ``results.md``,
``curves.png`` and ``samples.png``; ``--publish DIR`` copies the last four there.
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


# The curved world's: (set, key, label, lower is better)
METRICS_CURVED = [
    ("concept_heldout", "v_checker_correlation", "[V] checker correlation, held-out [V] prompts", False),
    ("concept_heldout", "v_background_error", "[V] background error, held-out [V] prompts (MSE)", True),
    ("concept_heldout", "accuracy_mean", "object accuracy, held-out [V] prompts", False),
    ("world", "frechet", "Frechet distance, held-out world prompts", True),
    ("world", "sharpness_gap", "|sharpness / real - 1|, held-out world prompts (blur or a leaked texture)", True),
    ("world", "precision", "precision, held-out world prompts", False),
    ("world", "recall", "recall, held-out world prompts", False),
    ("world", "prompt_accuracy", "prompt accuracy, held-out world prompts", False),
    ("world", "drift_mse", "world drift from the starting student (MSE)", True),
]
# Few-step quality: what SFT is said to erode (the precondition) and D-OPSD to keep.
QUALITY_KEYS = ("frechet", "sharpness_gap", "precision", "recall", "prompt_accuracy")


def metrics(world: str) -> list:
    return METRICS_CURVED if world == "curved" else METRICS


def ema_decay_for(steps: int, half_life: float = 0.25) -> float:
    """The EMA decay whose half-life is ``half_life`` of a run of ``steps`` steps: 0.5 ** (1 / (half_life * steps))."""
    return round(0.5 ** (1.0 / max(1.0, half_life * steps)), 6)


def config(setting: str, method: str, seed: int, steps: int, lr: float, rank: int, out: Path,
           ema_decay: float = 0.9999, world: str = "v1") -> dict:
    """The trainer's config of one run; D-OPSD rolls out at the world's student schedule (v1: Z-Image
    K = 4; curved: ``curved.STUDENT_SIGMAS``, K = 2)."""
    from dopsd_fast.toy import curved as C

    return {
        "method": method,
        "model": {"family": "zimage", "preset": "toy-zimage"},
        "lora": {"rank": rank, "alpha": 2 * rank},
        "dopsd": {"rollout": list(C.STUDENT_SIGMAS) if world == "curved" else "zimage-k4", "loss": "x0",
                  "ema_decay": ema_decay},
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
                                         args.out / "train" / f"{setting}-{method}-s{seed}", args.ema_decay,
                                         args.world)))
    curve, t_train, pics = [], 0.0, {}
    teacher = None
    if method == "dopsd":
        from dopsd_fast.toy.concept import teacher_reference

        teacher = probe.teacher(tr) if args.world == "curved" else teacher_reference(tr, probe)
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
            "rank": args.rank, "ema_decay": args.ema_decay, "train_seconds": round(t_train, 1),
            "teacher_at_start": teacher, "curve": curve}


def noise_floor(args, probe) -> list[dict]:
    """The starting student scored at ``args.noise_seeds`` sampling noises other than the probe's:
    how much a metric moves with the noise alone (the curved world's probe)."""
    from dopsd_fast.config import config_from_dict
    from dopsd_fast.trainer import Trainer

    tr = Trainer(config_from_dict(config(args.settings[0], "sft", 0, args.steps, args.lr, args.rank,
                                         args.out / "train" / "noise-floor", args.ema_decay)))
    return [probe(tr, noise_seed=probe.seed + 1 + i)[0] for i in range(args.noise_seeds)]


def _get(point, s, k):
    if k == "sharpness_gap":  # 0 for the real pictures' sharpness; blur lowers it, a leaked texture raises it
        return abs(point[s]["sharpness"] - 1.0)
    return point[s][k]


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(runs: list[dict], world: str = "v1", floor: list[dict] | None = None) -> dict:
    """Per (data, method): the metric at the start and at the last step, mean and sd over seeds; on
    the curved world also the noise floor (sd of the starting student over sampling noises) and, per
    metric, the change from the start with its standard error and whether it stands above both."""
    out = {}
    for setting in SETTINGS:
        for method in METHODS:
            rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
            if not rs:
                continue
            row = {"seeds": len(rs), "train_seconds": statistics.mean(r["train_seconds"] for r in rs)}
            for s, k, _, lower in metrics(world):
                start = [_get(r["curve"][0], s, k) for r in rs]
                end = [_get(r["curve"][-1], s, k) for r in rs]
                cell = {"start": statistics.mean(start), "end": statistics.mean(end), "end_sd": _sd(end)}
                if floor and (k if k != "sharpness_gap" else "sharpness") in floor[0].get(s, {}):
                    fl = [_get(f, s, k) for f in floor] + [start[0]]
                    f_sd = _sd(fl)
                    change = cell["end"] - cell["start"]
                    se = (cell["end_sd"] ** 2 / len(end) + f_sd ** 2) ** 0.5
                    cell.update(floor_sd=f_sd, change=change, change_se=se,
                                worse=(change > 0) == lower and abs(change) > 2 * se and abs(change) > 2 * f_sd,
                                better=(change < 0) == lower and abs(change) > 2 * se and abs(change) > 2 * f_sd)
                row[f"{s}.{k}"] = cell
            out[f"{setting}/{method}"] = row
    t = [r["teacher_at_start"] for r in runs if r.get("teacher_at_start")]
    if t:  # the same at every seed (the teacher at step 0 is the toy student under the teacher context)
        out["teacher_at_start"] = t[0]
    return out


def _rows(summary: dict):
    return [(k, v) for k, v in summary.items() if k != "teacher_at_start"]


def markdown(summary: dict, args) -> str:
    mets = metrics(args.world)
    lines = [f"SFT vs D-OPSD from the toy student ({args.world} world): {args.steps} steps, lr {args.lr}, LoRA "
             f"r{args.rank} (alpha {2 * args.rank}), batch 1, D-OPSD EMA decay {args.ema_decay}, seeds "
             f"{' '.join(map(str, args.seeds))}; mean (sd over seeds) at the last step; `start` is the toy "
             "student before fine-tuning.", ""]
    head = "| data / method | " + " | ".join(label for _, _, label, _ in mets) + " | train s |"
    lines += [head, "|" + "---|" * (len(mets) + 2)]
    first = _rows(summary)[0][1]
    floor = "floor_sd" in first[f"{mets[0][0]}.{mets[0][1]}"]
    lines.append("| start (toy student) | " + " | ".join(
        f"{first[f'{s}.{k}']['start']:.3f}" + (f" ({first[f'{s}.{k}']['floor_sd']:.3f})" if "floor_sd" in first[f"{s}.{k}"] else "")
        for s, k, _, _ in mets) + " | |")
    for name, row in _rows(summary):
        cells = []
        for s, k, _, _ in mets:
            c = row[f"{s}.{k}"]
            mark = " **worse**" if c.get("worse") else " **better**" if c.get("better") else ""
            cells.append(f"{c['end']:.3f} ({c['end_sd']:.3f}){mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
    if floor:
        lines += ["", f"The start row's parentheses: the noise floor, the sd of the starting student's metric over "
                  f"{args.noise_seeds + 1} sampling noises. **worse** / **better**: the change from the start exceeds "
                  "twice its standard error (seeds and noise floor together) and twice the noise floor."]
        lines += ["", "Few-step quality on held-out world prompts, change from the start (mean +- standard error):", ""]
        lines += ["| data / method | " + " | ".join(QUALITY_KEYS) + " |", "|" + "---|" * (len(QUALITY_KEYS) + 1)]
        for name, row in _rows(summary):
            lines.append(f"| {name} | " + " | ".join(
                f"{row[f'world.{k}']['change']:+.3f} +- {row[f'world.{k}']['change_se']:.3f}" for k in QUALITY_KEYS) + " |")
        lines += ["", verdict(summary)]
    t = summary.get("teacher_at_start")
    if t:
        lines += ["", "D-OPSD's teacher at step 0 (the toy student under the teacher context: caption + target picture) "
                  "on the 6 training pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items() if isinstance(v, float)) + "."]
    return "\n".join(lines) + "\n"


def verdict(summary: dict) -> str:
    """The two questions, answered from the summary's flags, per data setting."""
    out = []
    for setting in SETTINGS:
        sft, dop = summary.get(f"{setting}/sft"), summary.get(f"{setting}/dopsd")
        if not sft or not dop:
            continue
        eroded = [k for k in QUALITY_KEYS if sft[f"world.{k}"].get("worse")]
        kept = [k for k in QUALITY_KEYS if dop[f"world.{k}"].get("worse")]
        tex = {m: summary[f"{setting}/{m}"]["concept_heldout.v_checker_correlation"] for m in METHODS}
        out.append(f"- {setting}: SFT " + (f"erodes few-step quality ({', '.join(eroded)} worse than the start beyond "
                                          "the noise)" if eroded else "does not measurably erode few-step quality")
                   + "; D-OPSD " + (f"loses {', '.join(kept)}" if kept else "keeps every few-step quality measure within the noise")
                   + f"; held-out [V] checker correlation SFT {tex['sft']['end']:.3f} ({tex['sft']['end_sd']:.3f}), "
                   f"D-OPSD {tex['dopsd']['end']:.3f} ({tex['dopsd']['end_sd']:.3f}), start {tex['sft']['start']:.3f}.")
    return "\n".join(out)


def plot_curves(runs: list[dict], path: Path, world: str = "v1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mets = metrics(world)
    fig, axes = plt.subplots(2 if len(mets) <= 8 else 3, 4 if len(mets) <= 8 else 3,
                             figsize=(19, 8.5) if len(mets) <= 8 else (15, 12))
    colours = {"sft": "tab:orange", "dopsd": "tab:blue"}
    styles = {"concept": "-", "concept+prior": "--"}
    for ax, (s, k, label, lower) in zip(axes.flat, mets):
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
    fig.suptitle(f"Teaching the toy student [V] ({world} world): SFT vs D-OPSD (lines: mean over seeds; bands: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def picture(args, path: Path) -> None:
    """Rows: true pictures, the toy student, then each (data, method) after training (seed of the
    first run); left 8 held-out [V] prompts, right 8 held-out world prompts."""
    from dopsd_fast.toy import world as W
    from dopsd_fast.toy.concept import prompt_sets

    seed = args.seeds[0]
    if args.world == "curved":
        from dopsd_fast.toy import curved as C

        true_v = [W.example("concept-heldout", i) for i in range(8)]
        true_w = [e["attrs"] for e in C.HELDOUT_PROMPTS[:8]]
    else:
        sets = prompt_sets()
        true_v, true_w = sets["concept_heldout"][1][:8], sets["world"][1][:8]
    rows = [torch.stack([W.to_tensor(W.render(a)) for a in true_v + true_w])]
    first = None
    for setting in SETTINGS:
        for method in METHODS:
            f = args.out / "runs" / f"{setting}-{method}-s{seed}.pt"
            if not f.is_file():
                continue
            pics = torch.load(f, weights_only=True)
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
    ap.add_argument("--steps", type=int, default=2000, help="the default run's length (the v1 world's tables: 400)")
    ap.add_argument("--probe-every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--publish", type=Path, default=None, help="copy results and figures here")
    ap.add_argument("--weights", type=Path, default=None,
                    help="the toy weights folder model.preset=toy-zimage loads (default: the shipped dopsd_fast/toy/weights)")
    ap.add_argument("--ema-decay", type=float, default=None,
                    help="D-OPSD's EMA teacher decay (default: a half-life of a quarter of the run, 0.5 ** (4 / steps))")
    ap.add_argument("--noise-seeds", type=int, default=3,
                    help="curved world: score the starting student at this many other sampling noises (the noise floor)")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("concept_experiment.py: matplotlib is needed for the plots: pip install matplotlib")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dopsd_fast").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from tqdm.auto import tqdm

    from dopsd_fast.toy import models as M
    from dopsd_fast.toy.concept import CurvedProbe, Probe

    if args.weights is not None:  # the toy preset, the probe and the dataset read this folder
        if not (args.weights / "student.safetensors").is_file():
            raise SystemExit(f"concept_experiment.py: --weights {args.weights}: no student.safetensors there")
        import dopsd_fast.families.zimage.toy as family_toy

        M.WEIGHTS_DIR = family_toy.WEIGHTS_DIR = args.weights.resolve()
    args.world = M.read_meta(M.WEIGHTS_DIR).get("world", "v1")
    if args.ema_decay is None:
        args.ema_decay = ema_decay_for(args.steps)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    probe = CurvedProbe() if args.world == "curved" else Probe()
    floor = None
    if args.world == "curved" and args.noise_seeds > 0:
        f = args.out / "runs" / "noise-floor.json"
        if f.is_file():
            floor = json.loads(f.read_text())
        else:
            floor = noise_floor(args, probe)
            f.write_text(json.dumps(floor) + "\n")
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
    summary = summarise(runs, args.world, floor)
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "summary": summary, "noise_floor": floor, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(summary, args))
    plot_curves(runs, args.out / "curves.png", args.world)
    picture(args, args.out / "samples.png")
    print(markdown(summary, args))
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md", "curves.png", "samples.png"):
            shutil.copy(args.out / name, args.publish / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
