"""``dopsd-train --dry-run``: check a run before paying for it, with nothing but the config. Validates
the config; reads the data, the model folder's config files and the feature cache where they are, and
where they are not takes the recipe's buckets and the family spec's released config instead (one line
says so, and the end lists what a real run still needs); builds the real architecture on the meta
device (no weight is read); prints the memory model's predicted peak and step time on a GPU class,
whether it fits and, if not, what would. Model figures (:mod:`dopsd_fast.memory`), not measurements:
the time is scaled from the H200's measured step, on any other GPU a spec-sheet estimate.

``python -m dopsd_fast.dryrun --table`` prints the table (docs/performance.md) of the shipped real-size recipes on
every GPU class, made by the same code."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from dopsd_fast import memory
from dopsd_fast.cache import CacheError, FeatureCache, kinds_of
from dopsd_fast.data import build_dataset
from dopsd_fast.data.buckets import make_buckets
from dopsd_fast.errors import ConfigError
from dopsd_fast.families import build_adapter, family, require_editing_support
from dopsd_fast.plan import resolve_plan


def _lora_params(transformer, targets, rank: int) -> int:
    """Parameters of one adapter on ``targets`` (peft's rule: a module name equal to a target or ending
    with ``.target``), counted from the module shapes."""
    n = 0
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (mod.in_features + mod.out_features)
    return n


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules as None (an import that is made to fail)
        return False


def _folder_bytes(*paths) -> int:
    return sum(f.stat().st_size for p in paths if p and Path(p).is_dir() for f in Path(p).rglob("*.safetensors"))


@dataclasses.dataclass
class Workload:
    """What the dry run knows of a run whatever the GPU: the step's shape, the weights and encoders
    resident, the transformer's config and the floor FLOPs of a step."""
    spec: object
    transformer_config: dict
    shape: memory.Shape
    weights: float
    encoders: float
    floor_flops: float
    needs: list  # what a real run still needs (data, model folder, feature cache)
    files: tuple = (0.0, 0.0, 2)  # memory.run_files: one checkpoint's bytes, the exports' bytes, export folders


@contextlib.contextmanager
def _model_config(cfg, say, needs):
    """``cfg.model``, or where its folder is absent, the same with ``path`` at a temporary folder of the
    family's released config files (no weights)."""
    m = cfg.model
    if m.preset is not None or (m.path and Path(m.path).is_dir()):
        yield m, True
        return
    spec = family(m.family)
    name = spec.flavour_for(m)
    folder = str(m.path or "").rstrip("/").rsplit("/", 1)[-1].lower()
    tags = [f.rsplit("-", 1)[-1] for f in spec.released_flavours]
    guess = "" if any(t in folder for t in tags) or len(tags) < 2 else (
        f"; a guess: the folder's name carries none of the size tags {tags}, so the first; name the folder "
        f"after its model (e.g. ...-{tags[-1].upper()}) for another")
    say(f"model: no folder at {m.path}; shapes from the family spec's {name} flavour (its released config{guess})")
    needs.append(f"model.path: a local diffusers-format folder (not found: {m.path})")
    if m.vlm_path and not Path(m.vlm_path).is_dir() and "teacher" in kinds_of(cfg.method):
        needs.append(f"model.vlm_path: a local folder (not found: {m.vlm_path}), to write the feature cache")
    with tempfile.TemporaryDirectory(prefix="dopsd-dry-run-") as d:
        spec.write_config_folder(name, d)
        yield dataclasses.replace(m, path=d), False


def _data(cfg, spec, say, needs, references: int = 0, counted_by: str = "--references"):
    """(dataset or None, buckets, references per bucket or None): the data where it is, else the recipe's
    buckets, each row with ``references`` reference images at its own bucket (``--references``, or
    ``counted_by``: why that many)."""
    d = cfg.data
    src = d.jsonl or d.folder
    if references and not spec.editing:
        raise ConfigError(f"--references {references}: model.family={spec.name} has no editing mode (reference images "
                          "are for an editing model's rows)")
    if src and not Path(src).exists():
        buckets = make_buckets(d.buckets, d.bucket_scale, d.bucket_multiple)
        w, h = max(buckets, key=lambda b: b[0] * b[1])
        field = "data.jsonl" if d.jsonl else "data.folder"
        rows = (f"; each row with {references} reference image{'s' if references > 1 else ''} at its bucket "
                f"({counted_by})" if references else
                "; rows without reference images (editing rows with N references each: --references N)"
                if spec.editing else "")
        say(f"data: {src} not found; shapes from the recipe's buckets (data.buckets {d.buckets!r}: "
            f"{len(buckets)}, the largest {w}x{h}){rows}")
        needs.append(f"{field}: your training data (not found: {src})")
        return None, buckets, ([[b] * references for b in buckets] if references else None)
    dataset = build_dataset(d, progress=False)
    require_editing_support(spec, dataset)
    buckets = sorted(set(dataset.buckets_of))
    say(f"data: {len(dataset.records)} samples, buckets {buckets[:6]}{' ...' if len(buckets) > 6 else ''}"
        + (f" (--references {references} is not used: the rows' own references are counted)"
           if references and counted_by == "--references" else ""))
    return dataset, dataset.buckets_of, [r.reference_buckets for r in dataset.records]


def _validation_references(cfg, spec, needs) -> list:
    """The held-out prompts' reference images (``validation.references``, a ``validation.prompts`` entry's
    own ``references``) as the run checks them at start-up (a family without an editing mode, an
    unreadable or too small image: refused); one not on disk is what the real run still needs. Returns
    (field, index, path, decoded image) of each one decoded, for :func:`_check_grids`."""
    from dopsd_fast.sample import load_references

    decoded = []
    try:
        for name, refs in cfg.validation.reference_fields().items():
            if refs and not spec.editing:
                load_references(cfg.data, cfg.model.family, refs, name)  # refuses the family
            for i, path in enumerate(refs):
                if not Path(path).exists():
                    needs.append(f"{name}[{i}]: an image file (not found: {path})")
                else:
                    decoded.append((name, i, path, load_references(cfg.data, cfg.model.family, [path], name, first=i)[0]))
    except ValueError as e:
        raise ConfigError(f"config field {e}") from None
    return decoded


def _check_grids(adapter, dataset, buckets, references, teacher: bool = True) -> None:
    """The buckets the run will use are ones the model takes (its latent grid), refused as the run
    refuses them at start-up: the data's (its targets' and references'; the recipe's buckets where the
    data is not at hand) and each held-out prompt's reference images."""
    from dopsd_fast.families import check_buckets
    from dopsd_fast.sample import check_reference_grid

    if dataset is not None:
        check_buckets(adapter, dataset, teacher=teacher)
    else:
        check_buckets(adapter, sizes=buckets, what="a bucket of the recipe, where the data is not at hand: the run "
                                                  "refuses it if its rows use it", teacher=teacher)
    try:
        for name, i, path, image in references:
            check_reference_grid(adapter, [image], [path], name, first=i)
    except ValueError as e:
        raise ConfigError(f"config field {e}") from None


def recipe_references(cfg, recipe) -> int:
    """Reference images per row of a shipped recipe whose rows carry them (``FamilySpec.reference_recipes``,
    by the recipe's name or its file's), else 0."""
    if not recipe:
        return 0
    return family(cfg.model.family).reference_recipes.get(Path(str(recipe)).stem if str(recipe).endswith(
        (".yaml", ".yml")) else str(recipe), 0)


def workload(cfg, say=print, references: int | None = 0, recipe=None) -> Workload:
    """Everything of the dry run that does not depend on the GPU class (prints what it read).
    ``references``: reference images per row where the data is not found (editing rows); None: the
    count of the shipped ``recipe``'s rows (:func:`recipe_references`)."""
    spec = family(cfg.model.family)
    needs: list[str] = []
    if cfg.train.wandb and not _installed("wandb"):
        needs.append("train.wandb: the wandb package (pip install wandb)")
    counted_by = "--references"
    if references is None:
        references = recipe_references(cfg, recipe)
        counted_by = f"the recipe {Path(str(recipe)).stem}'s rows carry references; --references N to count N"
    dataset, buckets, refs = _data(cfg, spec, say, needs, references, counted_by)
    held_refs = _validation_references(cfg, spec, needs)
    with _model_config(cfg, say, needs) as (model_cfg, real_model):
        adapter = build_adapter(model_cfg, load_encoders=False, empty_weights=True)
        _check_grids(adapter, dataset, buckets, held_refs, teacher="teacher" in kinds_of(cfg.method))
        if cfg.cache.dir:
            encoders = 0
            if dataset is not None and real_model:
                try:
                    kinds = kinds_of(cfg.method)
                    FeatureCache.for_run(cfg.cache.dir, adapter, cfg.method).require_complete(
                        dataset, spec.context_width(adapter.transformer.config), kinds,
                        extra_problem=getattr(adapter, "cache_extra_problem", None),
                        max_tokens=spec.context_tokens(cfg.model))
                    say(f"feature cache: complete ({cfg.cache.dir}); the encoders will not be loaded")
                except (CacheError, FileNotFoundError) as e:
                    say(f"feature cache: not ready ({e}); counted as if complete (the encoders not loaded)")
                    needs.append(f"cache.dir: {e}")
            else:
                say(f"feature cache: {cfg.cache.dir} not checked (no data or model folder to check it against); "
                    "counted as if complete (the encoders not loaded)")
                needs.append(f"cache.dir: a complete feature cache at {cfg.cache.dir} (run dopsd-cache first, "
                             "with the same --config / --set)")
        else:
            m = model_cfg
            teacher = "teacher" in kinds_of(cfg.method)
            on_disk = {"text": _folder_bytes(Path(m.path) / "text_encoder" if m.path and real_model else None),
                       "teacher": _folder_bytes(m.vlm_path) if teacher else 0}
            released = {} if m.preset is not None else spec.flavours[spec.flavour_for(cfg.model)].encoders
            sized = {k: on_disk[k] or released.get(k, 0) for k in on_disk if k == "text" or teacher}
            encoders = sum(sized.values())
            guessed = [k for k in sized if not on_disk[k] and sized[k]]
            what = (f"the {' and '.join(guessed)} encoder{'s' if len(guessed) > 1 else ''} sized from the released "
                    "model (parameters x 2 bytes), not on disk")
            note = ("tiny preset: negligible" if m.preset is not None else what if guessed else "" if encoders
                    else "no encoder weights here to size them: not counted")
            say(f"feature cache: none; the encoders stay resident ({memory.fmt_gb(encoders)}"
                f"{'; ' + note if note else ''})")
        tr = adapter.transformer
        n_base = sum(p.numel() for p in tr.parameters())
        dt = torch.finfo(adapter.dtype).bits // 8
        if cfg.lora.enabled:
            targets = spec.lora_targets(cfg.lora, tr.config)
            n_train = _lora_params(tr, targets, cfg.lora.rank)
            if not n_train:  # as the run refuses it
                raise ConfigError(f"config field 'lora.targets': {list(targets)} match no linear layer of the "
                                  "transformer; name linear layers (e.g. to_q, to_k, to_v), or leave it unset for "
                                  "the family's default")
            weights = n_base * dt + 2 * n_train * 4  # frozen base + student and EMA-teacher adapters (fp32)
            per = 4
        else:  # as the trainer keeps them (dopsd_fast.weights): an fp32 student master trained in fp32, the
            n_train = n_base  # teacher module in the model dtype, its fp32 EMA master on the GPU or the host
            weights = n_base * 4 + n_base * dt + (0 if cfg.dopsd.ema_on_cpu else n_base * 4)
            per = 4
        shape = memory.step_shape(cfg, adapter, buckets, n_train, per, references=refs)
        files = memory.run_files(n_train, n_base, dt, cfg.lora.enabled)
        c = dict(tr.config)
    img = shape.tokens_student // cfg.data.batch_size - cfg.model.student_max_tokens
    rank = cfg.lora.rank if cfg.lora.enabled else 0
    cap_s, cap_t = spec.step_tokens(cfg.model, 0)  # context tokens of each branch
    f_s = spec.forward_flops(c, img, [cap_s] * cfg.data.batch_size, rank)
    # the teacher's image tokens as the step has them (an editing teacher: the state's, the row's references
    # and the target; rows with references have more than the family's 2 x the state's)
    img_t = shape.tokens_teacher // cfg.data.batch_size - cap_t
    f_t = spec.forward_flops(c, img_t, [cap_t] * cfg.data.batch_size, rank)
    # the adapters' own backward (dX + dA/dB, 2x their forward), as the benchmark's floor counts it
    lora_s = f_s[0] - spec.forward_flops(c, img, [cap_s] * cfg.data.batch_size)[0] if rank else 0.0
    floor = shape.states * (sum(f_s) + sum(f_t) + memory.backward_flops(f_s, cfg.lora.enabled, lora_s))
    return Workload(spec, c, shape, weights, encoders, floor, needs, files)


@dataclasses.dataclass
class Estimate:
    gpu: str
    plan: object
    peak: dict
    total: float
    capacity: float
    seconds: float
    to_fit: list  # the changes the memory model says would fit (empty when it fits)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def _fits(w: Workload, shape, path, backward, ckpt, encoders, cap) -> bool:
    return w.weights + encoders + memory.peak_bytes(shape, path, backward, ckpt)["total"] <= cap


def _to_fit(cfg, w: Workload, path, backward, ckpt, n_layers, cap) -> list[str]:
    """The changes the memory model says make the run fit ``cap``, each alone, or if none does alone, all
    of them together. FP8 is never one: the model gives it no saving (it keeps e4m3 copies of the block
    weights on top of the bf16 ones)."""
    budget = 0.85 * (cap - w.weights - w.encoders)
    can_ckpt = ckpt < n_layers and (path == "eager" or "checkpoint" in w.spec.fast_features)
    options = []  # (hint, shape, backward, checkpointed layers, encoders)
    if backward == "once":
        options.append(("dopsd.backward=stepwise (the same gradient)", w.shape, "stepwise", ckpt, w.encoders))
    if can_ckpt:
        fewest = n_layers if path == "eager" else min(n_layers, max(ckpt, memory.checkpoint_layers_for(
            w.shape, path, backward, budget)))
        options.append((f"model.gradient_checkpointing={'all' if fewest >= n_layers else 'auto'} "
                        f"({fewest} of {n_layers} layers)", w.shape, backward, fewest, w.encoders))
    if w.encoders:
        options.append(("a feature cache (dopsd-cache) to unload the encoders", w.shape, backward, ckpt, 0))
    if not cfg.lora.enabled and not cfg.dopsd.ema_on_cpu:  # full fine-tuning's fp32 EMA master off the GPU
        host = dataclasses.replace(w, weights=w.weights - w.shape.trainable_params * 4)
        options.append(("dopsd.ema_on_cpu=true (the fp32 EMA master in host memory)", w.shape, backward, ckpt,
                        w.encoders, host))
    b = cfg.data.batch_size
    if b > 1:
        one = dataclasses.replace(w.shape, tokens_student=w.shape.tokens_student // b,
                                  tokens_teacher=w.shape.tokens_teacher // b)
        options.append(("data.batch_size=1", one, backward, ckpt, w.encoders))
    options = [o if len(o) == 6 else (*o, w) for o in options]  # (..., the workload with that change)
    hints = [h for h, s, bw, ck, enc, wl in options if _fits(wl, s, path, bw, ck, enc, cap)]
    if hints or len(options) < 2:
        return hints
    shape = next((o[1] for o in options if o[0] == "data.batch_size=1"), w.shape)
    lightest = min((o[5] for o in options), key=lambda x: x.weights)
    together = _fits(lightest, shape, path, "stepwise", n_layers if can_ckpt else ckpt, 0, cap)
    return [" + ".join(h for h, *_ in options)] if together else []


def estimate(cfg, w: Workload, gpu: str) -> Estimate:
    """The run plan, predicted peak and step time of workload ``w`` on GPU class ``gpu``."""
    g = memory.GPUS[gpu]
    cap = g.memory_gb * 1e9
    budget = (cfg.fast.memory_budget_gb * 1e9 if cfg.fast.memory_budget_gb is not None
              else 0.85 * (cap - w.weights - w.encoders))
    # the run plan as the trainer resolves it, against this GPU class's memory (the device: a CUDA one)
    plan = resolve_plan(cfg, w.spec, w.transformer_config, w.shape, torch.device("cuda"), budget,
                        gpu_name=f"NVIDIA {g.name}")
    total = w.weights + w.encoders + plan.peak["total"]
    seconds = memory.predicted_step_seconds(w.floor_flops, plan.path, gpu)
    hints = [] if total <= cap else _to_fit(cfg, w, plan.path, plan.backward, plan.checkpoint_layers, plan.layers,
                                            cap)
    return Estimate(gpu, plan, plan.peak, total, cap, seconds, hints)


def _disk(cfg, w: Workload) -> str:
    """The run's checkpoints and exports (a fresh start), and the free space where its output folder
    would be on this machine (where the dry run runs; the run's own start-up checks its disk)."""
    t = cfg.train
    ck, exports, folders = w.files
    out = Path(t.output_dir).absolute()
    probe = next((p for p in (out, *out.parents) if p.is_dir()), None)
    try:
        free = shutil.disk_usage(probe).free if probe is not None else None
    except OSError:
        free = None
    d = memory.disk_plan(ck, exports, folders, t.keep_checkpoints, memory.checkpoint_steps(0, t.max_steps,
                         t.checkpoint_every), exports_each_checkpoint=cfg.lora.enabled, free=free)
    line = "\n" + d.describe(t.output_dir)
    if free is not None:
        line += (f"; {memory.fmt_bytes(free)} free there on this machine"
                 + (f": NOT ENOUGH (step {d.fails_at}'s checkpoint and exports would not fit; lower "
                    "train.keep_checkpoints or write to a larger disk)" if d.fails_at is not None else ""))
    return line


def dry_run(cfg, gpu: str = "h100", references: int | None = 0, recipe=None) -> int:
    gpu = memory.gpu_class(gpu)
    print("config: valid")
    if cfg.method != "dopsd":
        print(f"method {cfg.method}: the figures below are a D-OPSD step's (K states, the teacher on each), an "
              "upper bound for its step (the memory model has no term of its own for it)")
    w = workload(cfg, references=references, recipe=recipe)
    e = estimate(cfg, w, gpu)
    plan, shape = e.plan, w.shape
    print(f"\nstep: {shape.family}, {plan.path} path, backward {plan.backward}"
          f"{' (auto)' if cfg.dopsd.backward == 'auto' else ''}, {plan.checkpoint_layers} of {plan.layers} layers "
          f"checkpointed, K = {shape.states}, {shape.tokens_student} student / {shape.tokens_teacher} teacher tokens "
          f"per micro-batch\n{plan.describe()}")
    rows = [("weights (base, adapters / EMA)", w.weights), ("encoders", w.encoders)]
    rows += [(memory.TERM_LABELS[t], e.peak[t]) for t in memory.TERMS if e.peak[t]]
    rows.append(("predicted peak", e.total))
    for name, b in rows:
        print(f"  {name:<34} {memory.fmt_gb(b):>10}")
    g = memory.GPUS[gpu]
    print(f"  {'GPU ' + g.name:<34} {memory.fmt_gb(e.capacity):>10}  -> {'FITS' if e.fits else 'DOES NOT FIT'}")
    print(f"  floor FLOPs {w.floor_flops / 1e12:.1f} TFLOP per step; predicted step time ~{e.seconds:.2f} s on "
          f"the {g.name} ({memory.time_label(gpu)})")
    if e.fits and e.plan.over_budget:
        print(f"  (the predicted peak beyond the weights, {memory.fmt_gb(e.plan.peak['total'])}, passes the plan's "
              f"budget of {memory.fmt_gb(e.plan.budget_bytes)}: little room is left for the CUDA context and the "
              "allocator's cached blocks)")
    room = e.capacity - w.weights - w.encoders
    if cfg.fast.memory_budget_gb is not None and cfg.fast.memory_budget_gb * 1e9 > room:
        print(f"  fast.memory_budget_gb={cfg.fast.memory_budget_gb:g} is more than this GPU holds beyond the weights "
              f"and encoders ({memory.fmt_gb(room)})")
    if not e.fits:
        more = ("; or, for full fine-tuning, LoRA (lora.enabled=true) or torchrun over several GPUs with "
                "dist.fsdp=on (it shards the weights, gradients and AdamW state)" if not cfg.lora.enabled else "")
        print("  to fit: " + ("; ".join(e.to_fit) if e.to_fit else
                              "none of stepwise, gradient checkpointing, a feature cache, a smaller batch or (full "
                              "fine-tuning) the EMA master on the host fits this GPU in the memory model, alone "
                              "or together: a GPU with more memory")
              + more)
    print(_disk(cfg, w))
    if w.needs:
        print("\na real run still needs:\n" + "\n".join(f"  - {n}" for n in w.needs))
    print("\n(model figures from dopsd_fast.memory: fake-tensor steps, and the H200's measured Z-Image-Turbo peaks; "
          "the CUDA context and the allocator's cached blocks come on top)")
    return 0 if e.fits else 1


# ---- the recipes-per-GPU table (docs/performance.md) ------------------------------------------------------------------------
TABLE_GPUS = ("h200", "h100", "b200", "a100-80", "a100-40", "l40s", "4090")


def table_recipes() -> list[str]:
    """The shipped recipes of real-size models (no built-in preset), by name."""
    from dopsd_fast.config import load_config, shipped_configs

    return [n for n in sorted(shipped_configs()) if load_config(n, []).model.preset is None]


def table(recipes=None, gpus=TABLE_GPUS) -> str:
    """The Markdown table of ``dopsd-train --config R --dry-run --gpu G`` for every shipped real-size
    recipe R and GPU class G: predicted peak, fits, backward and checkpointed layers, step time."""
    from dopsd_fast.config import load_config

    head = "| recipe | " + " | ".join(memory.GPUS[g].name + ("" if memory.GPUS[g].measured else " *")
                                     for g in gpus) + " |"
    lines = [head, "|---" * (len(gpus) + 1) + "|"]
    for name in recipes or table_recipes():
        cfg = load_config(name, [])
        refs = recipe_references(cfg, name)  # rows with references: counted with them
        w = workload(cfg, say=lambda _: None, references=refs)
        cells = []
        for g in gpus:
            e = estimate(cfg, w, g)
            p = e.plan
            cells.append(f"{memory.fmt_gb(e.total)} {'fits' if e.fits else 'does not fit'}, {p.backward}, "
                         f"{p.checkpoint_layers}/{p.layers} ckpt, ~{e.seconds:.1f} s")
        note = "" if cfg.method == "dopsd" else f" ({cfg.method}: a D-OPSD step's figures, an upper bound)"
        note += f" ({refs} reference image{'s' if refs > 1 else ''} per row)" if refs else ""
        lines.append(f"| `{name}`{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m dopsd_fast.dryrun",
                                description="The dry run's figures for every shipped real-size recipe.")
    p.add_argument("--table", action="store_true",
                   help="print the Markdown table of predicted peak, fit and step time per recipe and GPU class "
                        "(docs/performance.md's)")
    if not p.parse_args(argv).table:
        p.print_help()
        return 2
    print(table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
