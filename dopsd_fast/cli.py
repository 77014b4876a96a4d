"""Command-line entry points: ``dopsd-train``, ``dopsd-cache``, ``dopsd-sample``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
import os
import warnings
from dopsd_fast.cache import CacheError, FeatureCache, needed_entries
from dopsd_fast.config import ConfigError, load_config
from dopsd_fast.data import DataError, build_dataset
from dopsd_fast.families import build_adapter
from dopsd_fast.safety import DivergenceError, Terminated


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))  # torchrun: rank 0 informs, the others warn only
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=("%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else
                                f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"),
                        datefmt="%H:%M:%S")
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


def _load(args):
    try:
        return load_config(args.config or DEFAULT_RECIPE, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser("dopsd-train", description="Train with D-OPSD (on-policy self-distillation).")
    _common(p)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds an earlier one: the earlier run is moved aside "
                        "to <output_dir>.old-N (nothing deleted)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even where the config changes what the run computes (model, LoRA, data, schedule)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config, data and cache; print the predicted peak memory and step time; do not train")
    p.add_argument("--gpu", default="h100", help="GPU class for --dry-run: h100 (80 GB), h200 (141 GB), a100-80, "
                   "a100-40, l40s, 4090, b200")
    args = p.parse_args(argv)
    _setup_logging()
    cfg = _load(args)
    if args.dry_run:
        from dopsd_fast.dryrun import dry_run

        try:
            return dry_run(cfg, args.gpu)
        except (DataError, CacheError, FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
    from dopsd_fast.trainer import Trainer


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
        return 130
    logging.getLogger("dopsd_fast").info("done: step %d, loss %.5g; outputs in %s", trainer.step,
                                         last.get("loss", float("nan")), trainer.out)
    trainer.dist.close()
    return 0


def cache_main(argv=None) -> int:
    p = argparse.ArgumentParser("dopsd-cache", description="Precompute student/teacher contexts into cache.dir.")
    _common(p)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    _setup_logging()
    cfg = _load(args)
    if not cfg.cache.dir:
        sys.exit("error: config field 'cache.dir' must be set for dopsd-cache (e.g. --set cache.dir=cache/)")

    try:
        dataset = build_dataset(cfg.data, progress=cfg.train.progress)
        adapter = build_adapter(cfg.model, load_encoders=False)
        cache = FeatureCache(cfg.cache.dir, adapter.encoder_identity(), create=True)
        n = cache.write(adapter, dataset, batch_size=args.batch_size, shard_size=cfg.cache.shard_size,
                        progress=cfg.train.progress)
    except (DataError, CacheError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    logging.getLogger("dopsd_fast").info("cache %s: %d new contexts, %d needed in all", cfg.cache.dir, n,
                                         len(needed_entries(dataset)))
    return 0


def sample_main(argv=None) -> int:
    p = argparse.ArgumentParser("dopsd-sample", description="Generate images with the few-step schedule (+ a LoRA).")
    _common(p)
    p.add_argument("--lora", default=None, help="a LoRA directory written by dopsd-train (e.g. runs/x/lora)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    args = p.parse_args(argv)
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        sys.exit(f"error: --out {args.out}: give an image file name ending in .png, .jpg or .webp")
    _setup_logging()
    cfg = _load(args)
    from dopsd_fast.sample import generate

    if args.lora and not Path(args.lora).is_dir():
        sys.exit(f"error: --lora {args.lora}: no such directory (expected a LoRA folder written by dopsd-train, "
                 "e.g. runs/<name>/lora)")
    try:
        path = generate(cfg, args.prompt, lora=args.lora, width=args.width, height=args.height, steps=args.steps,
                        seed=args.seed, out=args.out)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    logging.getLogger("dopsd_fast").info("wrote %s", path)
    return 0
