"""Command-line entry points: ``dopsd-train``, ``dopsd-cache``, ``dopsd-sample``."""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import math
import os
import signal
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from dopsd_fast.cache import CacheError, FeatureCache, kinds_of, needed_entries
from dopsd_fast.checkpoint import CheckpointError
from dopsd_fast.config import ConfigError, load_config
from dopsd_fast.data import DataError, build_dataset
from dopsd_fast.families import build_adapter
from dopsd_fast.data.dataset import MAX_PROMPT_CHARS
from dopsd_fast.errors import OutputDirError
from dopsd_fast.safety import DivergenceError, Terminated, file_write_problem

# the run's output folder once the config is read: where a failure's full traceback is kept
_RUN_DIR: list[Path] = []


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _keep_error(text: str) -> Path:
    """Append ``text`` (a failure's full traceback) to the run's ``errors.log`` (its output folder when
    the config was read and the folder exists, else the system's temp folder); return that path."""
    rank = _rank()
    name = "errors.log" if rank == 0 else f"errors.rank{rank}.log"
    folder = _RUN_DIR[-1] if _RUN_DIR and _RUN_DIR[-1].is_dir() else Path(tempfile.gettempdir())
    path = folder / (name if folder != Path(tempfile.gettempdir()) else f"dopsd-{os.getpid()}-{name}")
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n{text}\n")
    except OSError:
        return Path("(not written: the folder is not writable)")
    return path


def _foreign(exc) -> bool:
    """An error a command turned into its one line that a library raised (torch's shapes error, say), not
    our code's own message nor an OS error naming its file: where it came from is worth keeping (the
    run's ``errors.log``)."""
    if exc is None or isinstance(exc, (OSError, KeyboardInterrupt, SystemExit)) or exc.__traceback__ is None:
        return False
    last = Path(traceback.extract_tb(exc.__traceback__)[-1].filename).resolve()
    ours = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "kernels")
    installed = any(part in ("site-packages", "dist-packages") for part in last.parts)
    return installed and not any(last.is_relative_to(d) for d in ours)


def _said_by_rank0(line: str) -> bool:
    """Another rank's failure ``line``: whether rank 0 says the same (it posts its line to the
    rendezvous store before printing it; waited for a few seconds)."""
    from dopsd_fast.distributed import rank_error

    return rank_error(0, wait_s=3.0) == line


def _on_rank(line: str) -> str:
    """``line`` with this rank named: ``error: [rank N] ...``."""
    return f"error: [rank {_rank()}] {line.removeprefix('error: ')}"


def _ends_clean(main):
    """A command that ends in one line: a user error (a ``SystemExit`` with its message) prints that line;
    an unexpected exception prints its type and first line and keeps the full traceback in the run's
    ``errors.log``, never on the screen. Under torchrun every failing rank leaves its line in the
    rendezvous store (rank 0's message about a failed collective names a rank's own error) and keeps
    it in ``errors.rankN.log``; rank 0 prints its line; another rank prints its own, named ``[rank N]``,
    unless rank 0 says the same (an error every rank sees, once on the screen) or it is a failed
    collective (its message says which)."""
    from dopsd_fast import distributed
    from dopsd_fast.distributed import post_error

    def other_rank(line: str, context, core: str | None = None) -> None:
        """``core``: what rank 0's line is compared with (the line without this rank's own log path)."""
        post_error(core or line)
        if not distributed._STORE:  # before the process group (a config error): the ranks of a node meet the
            if os.environ.get("LOCAL_RANK") == "0":  # same, another node may not (a file it lacks): each
                print(_on_rank(line), file=sys.stderr)  # node's first process says it (rank 0's said it plainly)
            return
        if type(context).__name__ == "DistributedError" or not _said_by_rank0(core or line):
            print(_on_rank(line), file=sys.stderr)

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            context = e.__context__
            if _rank() == 0:
                post_error(e.code)
                if _foreign(context):  # a library's own error (torch's, diffusers'): its traceback kept too
                    path = _keep_error("".join(traceback.format_exception(context)) + e.code)
                    raise SystemExit(f"{e.code} (its traceback: {path})") from None
                raise  # a user error: Python prints its one line and exits 1
            _keep_error("".join(traceback.format_exception(context)) + e.code if context is not None else e.code)
            other_rank(e.code, context)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # noqa: BLE001 - anything unexpected: one line, the traceback in the log
            path = _keep_error(traceback.format_exc())
            first = (str(e).strip().splitlines() or [""])[0][:300]
            core = f"error: {type(e).__name__}: {first}"  # the same on every rank that meets it
            line = f"{core} (unexpected: the full traceback is in {path}; include it in a bug report)"
            if _rank() == 0:
                post_error(core)
                print(line, file=sys.stderr)
            else:
                other_rank(line, e, core)
            return 1
    return run


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))  # torchrun: rank 0 informs, the others warn only
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=("%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else
                                f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"),
                        datefmt="%H:%M:%S")
    if rank != 0:  # its start-up warnings are rank 0's (checked): said once, by rank 0
        from dopsd_fast.logging_utils import RANK_STARTUP

        RANK_STARTUP.quiet = True
        for h in logging.root.handlers:
            h.addFilter(RANK_STARTUP)
    for noisy in ("diffusers", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # both libraries keep their own verbosity switch besides the stdlib logger
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:
        pass

    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config or a shipped recipe's name (configs/*.yaml; default: toy-concept, the pretrained "
                        "toy Z-Image learning the concept [V] on the CPU, no downloads)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=5e-5 (repeatable)")


# ``dopsd-train`` / ``dopsd-cache`` / ``dopsd-sample`` without --config: this shipped recipe
DEFAULT_RECIPE = "toy-concept"
MAX_LORA_SCALE = 100.0  # --lora-scale S: trained LoRAs are used at about -2 to 2; far past it the update overflows
MAX_DRY_RUN_REFERENCES = 64  # --references N: past it no model of the field fits a step (and the count grows)


def _load(args):
    try:
        cfg = load_config(args.config or DEFAULT_RECIPE, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    _RUN_DIR.append(Path(cfg.train.output_dir))
    return cfg


@_ends_clean
def train_main(argv=None) -> int:
    p = argparse.ArgumentParser("dopsd-train", description="Train with D-OPSD (on-policy self-distillation).")
    _common(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the run's folder (train.output_dir: checkpoints, LoRA exports, samples, metrics)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds an earlier one: the earlier run is moved aside "
                        "to <output_dir>.old-N (nothing deleted)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even where the config changes what the run computes (model, LoRA, data, schedule)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the predicted peak memory and step time and whether the run fits; needs only the "
                        "config (data, model folder and feature cache are checked where present); do not train")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="GPU class for --dry-run (default H100), any case: H100 (80 GB), H200 (141 GB), "
                        "B200 (180 GB), A100 (80 GB) or A100-40, L40S (48 GB), 4090 (24 GB); the time is one "
                        "measured H200 step scaled by floor FLOPs, and off the H200 by the GPU's spec sheet")
    p.add_argument("--references", default=None, type=int, metavar="N",
                   help="for --dry-run where the data is not at hand: each row has N reference images at its bucket "
                        "(an editing model's rows; found data counts its own; default: 0, or the count of a shipped "
                        "recipe's rows, e.g. 1 for the ground-truth-reference recipe)")
    args = p.parse_args(argv)
    if args.out is not None:
        if any(o.split("=", 1)[0].strip() == "train.output_dir" for o in args.overrides):
            sys.exit("error: --out and --set train.output_dir both name the run's folder: give one")
        args.overrides.append(f"train.output_dir={args.out}")
    if args.gpu is not None and not args.dry_run:
        print("error: --gpu names the GPU class a --dry-run plans for; add --dry-run (a run uses the GPU it has)",
              file=sys.stderr)
        return 2
    if args.references is not None and not args.dry_run:
        print("error: --references N counts reference images per row for a --dry-run without the data; a run counts "
              "its rows' own", file=sys.stderr)
        return 2
    if args.references is not None and not 0 <= args.references <= MAX_DRY_RUN_REFERENCES:
        print(f"error: --references {args.references}: reference images per row, 0 to {MAX_DRY_RUN_REFERENCES}",
              file=sys.stderr)
        return 2
    if args.dry_run:
        from dopsd_fast.memory import gpu_class

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would print a one-GPU report
            print("error: --dry-run plans one GPU and runs as one process: run it without torchrun; the per-GPU "
                  "memory of runs over several GPUs (FSDP2's shards) is tabled in docs/performance.md "
                  "(benchmarks/memory_table.py)", file=sys.stderr)
            return 2
        try:
            gpu = gpu_class(args.gpu or "h100")
        except ValueError as e:  # a usage error: exit 2, as argparse's own (1 is "does not fit")
            print(f"error: {e}", file=sys.stderr)
            return 2
    _setup_logging()
    cfg = _load(args)
    if args.dry_run:
        from dopsd_fast.dryrun import dry_run

        try:
            if args.resume:  # the checkpoint the run would resume, checked as the run checks it before its start
                from dopsd_fast.trainer import Trainer

                ck, step = Trainer.resume_check(cfg, args.resume, args.allow_config_change)
                print(f"resume: from {ck} at step {step} (its config and step checked; its tensors, the data's content "
                      "and the model's files are read and compared when the run starts)" if ck is not None else
                      f"resume: no checkpoint in {cfg.train.output_dir}: --resume latest starts at step 0")
            return dry_run(cfg, gpu, args.references, recipe=args.config)
        except (DataError, CacheError, FileNotFoundError, ValueError, OutputDirError, CheckpointError) as e:
            sys.exit(f"error: {e}")
    from dopsd_fast.trainer import Trainer


    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume, allow_config_change=args.allow_config_change,
                          overwrite=args.overwrite)
        last = trainer.train()
    except (DataError, CacheError, FileNotFoundError, ConfigError, DivergenceError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an unwritable output directory, a full disk
        sys.exit(f"error: {e.strerror or e} ({e.filename or cfg.train.output_dir})" if e.strerror else f"error: {e}")
    except Terminated:
        return 143  # 128 + SIGTERM, after the checkpoint
    except KeyboardInterrupt:  # Ctrl-C: after the checkpoint (a second Ctrl-C: at once)
        if trainer is None:  # the trainer says what it wrote; before it existed, nothing was
            logging.getLogger("dopsd_fast").warning("Ctrl-C during start-up: stopped, nothing written")
        return 130
    grids = [g for g in trainer.out.glob("samples/step-*.png")  # not an earlier attempt's beyond this run's end
             if g.stem[5:].isdigit() and int(g.stem[5:]) <= trainer.step]
    pictures = sorted(grids)[-1:] + [p for p in [trainer.out / "curves.png"] if p.is_file()]
    loss = f", loss {last['loss']:.5g}" if "loss" in last else ""  # none when nothing was trained
    loss += _loss_trend(trainer.out / "metrics.jsonl")
    logging.getLogger("dopsd_fast").info("done: step %d%s; outputs in %s%s", trainer.step, loss, trainer.out,
                                         "; look at " + " and ".join(map(str, pictures)) if pictures else "")
    trainer.dist.close()
    return 0


def _loss_trend(metrics: Path) -> str:
    """The loss's mean over the first and the last tenth of the logged steps (one step's loss, on one row of
    a batch of one, says little; a student wrecked while its EMA teacher follows shows a loss that grows)."""
    from dopsd_fast.curves import read_series

    try:
        values = [v for _, v in read_series(metrics).get("loss", [])]
    except OSError:
        return ""
    if len(values) < 10:
        return ""
    k = len(values) // 10
    return (f" (the mean of the first {k} logged: {sum(values[:k]) / k:.4g}, of the last {k}: "
            f"{sum(values[-k:]) / k:.4g})")


@_ends_clean
def cache_main(argv=None) -> int:
    p = argparse.ArgumentParser("dopsd-cache", description="Precompute student/teacher contexts into cache.dir.")
    _common(p)
    p.add_argument("--batch-size", type=int, default=8,
                   help="samples encoded per encoder call (default 8; lower it if the encoders run out of memory)")
    p.add_argument("--prune", action="store_true",
                   help="drop the contexts this dataset does not use (of rows, captions or images edited since; "
                        "another dataset's sharing the folder): their shards are written again without them")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size {args.batch_size}: must be at least 1")
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") and os.environ.get("RANK") is not None:
        sys.exit("error: dopsd-cache runs as one process (it writes one cache folder, which the ranks would race "
                 "for): run it once without torchrun, then train with torchrun on the cache")
    _setup_logging()
    cfg = _load(args)
    if not cfg.cache.dir:
        sys.exit("error: config field 'cache.dir' must be set for dopsd-cache (e.g. --set cache.dir=cache/)")
    from dopsd_fast.families import check_buckets, family, require_editing_support
    from dopsd_fast.memory import fmt_bytes
    from dopsd_fast.safety import OutputLock

    log = logging.getLogger("dopsd_fast")
    lock = None

    stopping, writing = [], [False]

    def _term(signum, frame):  # a scheduler's SIGTERM, or Ctrl-C: kept as a flag (an exception raised inside a
        stopping.append(signum)  # finalizer is dropped by Python); while contexts are encoded the writer stops
        if not writing[0] or len(stopping) > 1:  # after the batch, its contexts kept; else (or a second) at once
            raise KeyboardInterrupt

    # a signal the process was started ignoring (a script's `&`, `trap '' INT`) stays ignored
    prev_term = signal.signal(signal.SIGTERM, _term) if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN else None
    prev_int = signal.signal(signal.SIGINT, _term) if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else None
    try:
        dataset = build_dataset(cfg.data, progress=cfg.train.progress)
        require_editing_support(family(cfg.model.family), dataset)
        cache_dir = Path(cfg.cache.dir)
        if cache_dir.exists() and not cache_dir.is_dir():
            raise CacheError(f"cache.dir {cache_dir} is a file, not a folder; point cache.dir at a folder")
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(cache_dir, "cache.dir")  # one dopsd-cache per folder: shards and manifest are its
        for tmp in cache_dir.glob(".shard-*.tmp-*"):  # a shard being written when an earlier run was killed
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
        # the encoders and, where contexts use it, the VAE: a local transformer's weights are never read
        adapter = build_adapter(cfg.model, load_encoders=False, encoding_only=True)
        check_buckets(adapter, dataset, teacher="teacher" in kinds_of(cfg.method))
        kinds = kinds_of(cfg.method)
        cache = FeatureCache.for_run(cache_dir, adapter, cfg.method, create=True)
        for why in cache.repair(family(cfg.model.family).context_width(adapter.transformer.config)
                                if getattr(adapter, "transformer", None) is not None else None):
            log.warning("cache %s: %s: its contexts are encoded again", cache_dir, why)
        writing[0] = True
        try:
            n = cache.write(adapter, dataset, batch_size=args.batch_size, shard_size=cfg.cache.shard_size,
                            progress=cfg.train.progress, kinds=kinds, stop=lambda: bool(stopping))
        finally:
            writing[0] = False
        if stopping:  # asked to stop after the last batch, or while a finalizer ran: as interrupted
            raise KeyboardInterrupt
        if args.prune:
            dropped, freed = cache.prune(dataset)
            unused = ([], 0)
            log.info("cache %s: %d contexts this dataset does not use dropped, %s freed", cache_dir, dropped,
                     fmt_bytes(freed))
        else:
            unused = cache.unused(dataset)
    except (DataError, CacheError, FileNotFoundError, OutputDirError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an unwritable folder, a full disk, a model folder without its weights
        sys.exit(f"error: {e.strerror or e} ({e.filename or cfg.cache.dir})" if e.strerror else f"error: {e}")
    except KeyboardInterrupt:
        log.warning("cache %s: stopped; the shards written so far are kept (run dopsd-cache again to go on)",
                    cfg.cache.dir)
        return 128 + (stopping[0] if stopping else signal.SIGINT)  # 143 for SIGTERM, 130 for Ctrl-C
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
        if prev_int is not None:
            signal.signal(signal.SIGINT, prev_int)
        if lock is not None:
            lock.release()
    log.info("cache %s: %d new contexts, %d needed in all%s", cfg.cache.dir, n,
             len(needed_entries(dataset, kinds_of(cfg.method))),
             f"; it also holds {len(unused[0])} ({fmt_bytes(unused[1])}) this dataset does not use (of rows, "
             "captions or images edited since, or another dataset's): dopsd-cache --prune drops them"
             if unused[0] else "")
    return 0


@_ends_clean
def sample_main(argv=None) -> int:
    p = argparse.ArgumentParser("dopsd-sample", description="Generate images with the few-step schedule (+ a LoRA or a "
                                "fine-tuned transformer; + reference images for an editing model).")
    _common(p)
    p.add_argument("--lora", default=None, help="a LoRA: the folder dopsd-train wrote (e.g. runs/x/lora), or a "
                                                 "LoRA's .safetensors file (another trainer's too)")
    p.add_argument("--transformer", default=None,
                   help="a fully fine-tuned transformer folder written by dopsd-train (runs/x/transformer or "
                        "runs/x/transformer_ema) in place of the model's")
    p.add_argument("--lora-scale", action="append", type=float, default=None, metavar="S",
                   help="the LoRA's strength (its update times S; default 1); repeatable: one column per strength, "
                        "the same noise (0 is the model without it)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                   help="a reference image every prompt is conditioned on (repeatable; an editing model's, e.g. a "
                        "LoRA trained on rows with references), at the data.buckets bucket nearest its aspect")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels (default: the first --reference's bucket, else the first of the "
                        "config's data.buckets)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: the first --reference's bucket, else the first of the "
                        "config's data.buckets)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    p.add_argument("--schedule", default=None, metavar="NAME|S0,S1,...",
                   help="the sigmas in place of the model's inference schedule: a roll-out schedule's name, as "
                        "dopsd.rollout takes (docs/models.md names the authors' tables), or sigmas ending with 0, "
                        "comma-separated (default: the config's validation.schedule, else the model's)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the initial noise (default 0); the i-th --prompt (from 0) draws with seed + i")
    p.add_argument("--out", default="samples.png",
                   help="output image file, .png, .jpg or .webp (default samples.png; one grid of every prompt)")
    args = p.parse_args(argv)
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        sys.exit(f"error: --out {args.out}: give an image file name ending in .png, .jpg or .webp")
    if Path(args.out).is_dir():
        sys.exit(f"error: --out {args.out} is a folder; give an image file name (e.g. {Path(args.out) / 'samples.png'})")
    why = file_write_problem(args.out)  # before the model is read and sampled
    if why:
        sys.exit(f"error: --out {args.out}: {why}")
    long = next((p for p in args.prompt if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        sys.exit(f"error: --prompt: a prompt {len(long)} characters long, over {MAX_PROMPT_CHARS}, far more than the "
                 "encoders read (the data's captions have the same limit)")
    for flag, v in (("--width", args.width), ("--height", args.height), ("--steps", args.steps)):
        if v is not None and v < 1:
            sys.exit(f"error: {flag} {v}: must be at least 1 (leave it out for the default)")
    if not 0 <= args.seed < 2 ** 63 - len(args.prompt):
        sys.exit(f"error: --seed {args.seed}: must be in [0, 2^63)")
    if args.lora_scale and not args.lora:
        sys.exit("error: --lora-scale scales a LoRA: give it with --lora DIR")
    bad = [v for v in args.lora_scale or [] if not (math.isfinite(v) and abs(v) <= MAX_LORA_SCALE)]
    if bad:
        sys.exit(f"error: --lora-scale {bad[0]:g}: must be a number from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}")
    if args.schedule is not None and args.steps is not None:
        sys.exit("error: --schedule names the sigmas and so the steps: leave --steps out")
    _setup_logging()
    cfg = _load(args)
    from dopsd_fast.sample import LoraMismatchError, generate

    schedule = cfg.validation.schedule if args.steps is None else None
    if args.schedule is not None:
        schedule = args.schedule
        if "," in schedule:
            try:
                schedule = [float(v) for v in schedule.split(",")]
            except ValueError:
                sys.exit(f"error: --schedule {args.schedule}: give a schedule's name or numbers separated by commas")
        try:
            from dataclasses import replace

            replace(cfg, validation=replace(cfg.validation, schedule=schedule, steps=None))  # its checks
        except ConfigError as e:
            sys.exit("error: --schedule: " + str(e).removeprefix("config field 'validation.schedule': "))

    if args.lora and Path(args.lora).is_file() and Path(args.lora).suffix != ".safetensors":
        sys.exit(f"error: --lora {args.lora} is not a .safetensors file: give a LoRA's .safetensors file, or the folder "
                 "dopsd-train wrote (runs/<name>/lora)")
    if args.lora and not Path(args.lora).exists():
        sys.exit(f"error: --lora {args.lora}: no such file or folder (a LoRA's .safetensors file, or the folder "
                 "dopsd-train wrote, e.g. runs/<name>/lora)")
    try:
        path = generate(cfg, args.prompt, lora=args.lora, width=args.width, height=args.height, steps=args.steps,
                        seed=args.seed, out=args.out, transformer=args.transformer, references=args.reference,
                        lora_scales=args.lora_scale, schedule=schedule)
    except LoraMismatchError as e:
        hint = ""
        if args.config is None:  # the default recipe's model, not the one the LoRA was trained on
            run_cfg = os.path.normpath(os.path.join(args.lora, "..", "config.yaml"))
            hint = (f"; it was read with the default config ({DEFAULT_RECIPE}): "
                    + (f"give the run's own, --config {run_cfg}" if Path(run_cfg).is_file()
                       else "give the --config of the run that trained it"))
        sys.exit(f"error: {e}{hint}")
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    logging.getLogger("dopsd_fast").info("wrote %s", path)
    return 0
