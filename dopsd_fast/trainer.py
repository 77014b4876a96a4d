"""The D-OPSD training loop (the eager reference of this project).

Per optimizer step and per sample: fresh noise, a K-state on-policy roll-out of the student
(text context), the teacher (EMA weights, multimodal context) on every student state, the loss
of :func:`dopsd_fast.algorithm.rollout_loss`, AdamW with clipping, then the EMA update.
All randomness of a step is derived from ``(train.seed, step)``, so a resumed run repeats exactly
what an uninterrupted one does.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import math
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch

from tqdm.auto import tqdm

from dopsd_fast import fsdp
from dopsd_fast.algorithm import RolloutResult, euler_sample
from dopsd_fast.cache import ContextProvider, FeatureCache, kinds_of, needed_entries
from dopsd_fast.checkpoint import (check_train_state, checkpoint_run_id, folder_bytes, incomplete_checkpoints,
                                   list_checkpoints, load_checkpoint, resolve_resume, rng_state, save_checkpoint,
                                   set_aside_folders, set_aside_later, set_rng_state)
from dopsd_fast.config import Config, DistConfig
from dopsd_fast.data import BucketBatchSampler, build_dataset
from dopsd_fast.data.prefetch import ImagePrefetcher
from dopsd_fast.distributed import DistributedError, from_env, is_collective_failure, launcher_died
from dopsd_fast.errors import ConfigError, DataError, OutputDirError
from dopsd_fast.export import write_comfyui_lora
from dopsd_fast.families import DEFAULT_FAMILY, FAMILIES, build_adapter, check_buckets, family, require_editing_support
from dopsd_fast.families.common import differing_files, file_fingerprint
from dopsd_fast.fastpath import build_pair
from dopsd_fast.logging_utils import RANK_STARTUP, MetricsLogger, metrics_rows, require_wandb
from dopsd_fast.memory import checkpoint_steps, disk_plan, fmt_bytes, fmt_gb, memory_budget_bytes, run_files, step_shape
from dopsd_fast.pair import dopsd_step
from dopsd_fast.plan import check_compile_backend, resolve_plan
from dopsd_fast.profiling import nvtx_range
from dopsd_fast.safety import (RUN_FOLDERS, DivergenceError, Guard, Interrupted, OutputLock, StopSignals,
                               Terminated, atomic_dir, atomic_write, config_changes, move_aside, recover_dirs, remove_stale_temp_files,
                               run_outputs)
from dopsd_fast.validation import save_grid, set_aside_later_grids
from dopsd_fast.weights import StudentTeacher

log = logging.getLogger("dopsd_fast")


# Config fields that change the shapes (or the set) of the trained tensors: a checkpoint's weights and
# optimizer moments cannot be loaded across a change of them, whatever --allow-config-change says.
SHAPE_FIELDS = ("lora.enabled", "lora.rank", "lora.targets")
# The model's folders: a copy of them elsewhere (node-local disk, another mount point) is the same model when
# its files are; the checkpoint records their fingerprints (families.common.file_fingerprint).
MODEL_FOLDERS = ("model.path", "model.vlm_path")
# Paths a node may hold at a place of its own (node-local copies): not compared between the ranks (the data's
# content is, the output folder is checked to be one)
DATA_PATHS = ("data.jsonl", "data.folder")
PER_NODE_PATHS = MODEL_FOLDERS + DATA_PATHS + ("cache.dir", "train.output_dir")
# ... nor fields a rank may set for itself (its device: cuda:$LOCAL_RANK; what rank 0 alone logs or shows;
# held-out reference files, read from each node's disk)
PER_RANK_FIELDS = PER_NODE_PATHS + ("model.device", "train.progress", "train.tensorboard", "train.wandb",
                                    "validation.references", "validation.prompts")


def _seed_of(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h


class _AboveBar(logging.Handler):
    """A console handler's stand-in while a progress bar shows: the same level, filters, format and
    stream, each line written through ``tqdm.write`` (which clears the bar, writes, redraws it)."""

    def __init__(self, console: logging.StreamHandler, bar_class):
        super().__init__(console.level)
        self.console, self.bar_class = console, bar_class
        self.setFormatter(console.formatter)
        self.filters = list(console.filters)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.bar_class.write(self.format(record), file=self.console.stream)
        except Exception:
            self.handleError(record)


def _exit_code(error: BaseException | None) -> int:
    """The process's exit code for how the loop ended (the CLI's): 0 done, 143 / 130 stopped by SIGTERM /
    Ctrl-C after a checkpoint, 1 failed."""
    if error is None:
        return 0
    if isinstance(error, Terminated):
        return 143
    return 130 if isinstance(error, KeyboardInterrupt) else 1


def _group_name(g) -> str:
    """A batch group (``ImageTextDataset.batch_groups``: the bucket, then each reference's) as words."""
    sizes = [f"{g[i]}x{g[i + 1]}" for i in range(0, len(g) - 1, 2)]
    return f"bucket {sizes[0]}" + (f" with references at {', '.join(sizes[1:])}" if len(sizes) > 1 else "")


@contextlib.contextmanager
def _log_above(bar):
    """While the progress bar shows: the console's log lines (a spike, a Ctrl-C, a validation) are
    written above the bar, not into its line. Only the root logger's handlers that write to the
    terminal's streams (the CLI's ``basicConfig``) are stood in for, and put back after; a program that
    configured no logging gets no handler from us."""
    root = logging.root
    saved = root.handlers[:]
    if not bar.disable:
        root.handlers = [_AboveBar(h, type(bar)) if isinstance(h, logging.StreamHandler)
                         and getattr(h, "stream", None) in (sys.stdout, sys.stderr) else h for h in saved]
    try:
        yield
    finally:
        root.handlers = saved


def _load_train_state(ck: Path) -> dict:
    """A checkpoint's state, checked as the trainer's (:func:`~dopsd_fast.checkpoint.check_train_state`);
    one of 1 GB or more is announced first (read and checksummed: it takes a while)."""
    size = folder_bytes(ck) or 0
    if size >= Trainer.ANNOUNCE_BYTES:
        log.info("reading checkpoint %s (%s)", ck, fmt_bytes(size))
    state = load_checkpoint(ck)
    check_train_state(state, ck)
    return state


class Trainer:
    def __init__(self, cfg, resume: str | None = None, allow_config_change: bool = False, overwrite: bool = False):
        """``resume``: ``"latest"`` (the newest checkpoint that loads; none at all: start from scratch) or a
        checkpoint directory. A resume whose config changes the math (model, LoRA, data, schedule,
        method, seed) is refused, naming the fields, unless ``allow_config_change``; other changes (LR,
        steps, logging, batch size) are applied and logged.

        The output folder is claimed first, before anything reads or writes it and before the model is
        built: its lock (one trainer per folder), then, without ``resume``, a folder holding an earlier
        run is refused (``overwrite``: that run is moved aside to ``<output_dir>.old-N``, nothing
        deleted). The lock is held until :meth:`train` ends or :meth:`close` is called."""
        self.cfg = cfg
        self.dist = from_env(cfg.train.dist_timeout_s)  # torchrun: one process per GPU (dopsd_fast.distributed)
        self.rank, self.world = self.dist.rank, self.dist.world
        self.out = Path(cfg.train.output_dir)
        self.allow_config_change = allow_config_change
        self._lock = None
        self._resume_from = None
        self._signals = None
        self._stop_kind = None
        self._saved_step = None
        self._skipped: list = []
        self._model_files: dict = {}  # folder -> its file_fingerprint, taken once
        try:
            self._claim_output(resume, overwrite)
            self._check_shared_output()
            for sec, body in sorted(cfg.to_dict().items()):  # one digest per section: the refusal names it
                body = {k: v for k, v in body.items() if f"{sec}.{k}" not in PER_RANK_FIELDS} \
                    if isinstance(body, dict) else body
                self._check_same_on_every_rank("config", json.dumps(body, sort_keys=True, default=str), sec)
            check_compile_backend(cfg.fast)  # before the data check and the model: a refusal costs neither
            ck, state = self._pick_resume(resume)  # before the model: a refusal costs no model build
            if resume and self.dist.active:  # every rank reads the folder itself: they must pick the same one
                lo, hi = self.dist.min_max(int(state["step"]) if state is not None else -1, "resume checkpoint choice")
                if lo != hi:
                    seen = lambda v: f"step {int(v)}" if v >= 0 else "none"  # noqa: E731
                    raise OutputDirError(f"--resume {resume}: the ranks picked different checkpoints in {self.out} "
                                         f"({seen(lo)} and {seen(hi)}; rank {self.rank}: "
                                         f"{Path(ck).name if ck is not None else 'none'}): the folder looks different from "
                                         "the ranks (a shared filesystem not yet in sync?); resume when every node "
                                         "sees the same checkpoints, or name one: --resume <checkpoint folder>")
            self._model_folders_fingerprint()  # rank 0, once: the files the run loads (what checkpoints record)
            if state is not None:
                self._check_model_files(ck, state)
            self._resume_from = (ck, state) if state is not None else None
            if cfg.train.wandb and self.rank == 0:  # before the model is built: a missing package costs no build
                require_wandb()
            torch.manual_seed(cfg.train.seed)
            random.seed(cfg.train.seed)
            self._build_data_and_model()
            # the run plan: every execution choice, once, from the config, the device and the memory model
            self.mem_shape = self.memory_shape()
            self.plan = resolve_plan(cfg, self.spec, self.adapter.transformer.config, self.mem_shape, self.device,
                                     memory_budget_bytes(cfg.fast.memory_budget_gb, self.device))
            log.info("%s", self.plan.describe())
            ignored = cfg.ignored_fields()
            if ignored:
                log.warning("method %s does not read %s: set, and ignored", cfg.method, ", ".join(ignored))
            unread = cfg.unread_fields()
            if self.world == 1:  # the FSDP2 settings with no ranks to shard over
                one = "one process: no ranks to shard over (torchrun starts several)"
                unread += [(f"dist.{f.name}", one) for f in dataclasses.fields(DistConfig)
                           if getattr(cfg.dist, f.name) != getattr(DistConfig(), f.name)]
            for why in dict.fromkeys(w for _, w in unread):  # one line per reason
                log.warning("%s: set, and not read: %s", ", ".join(f for f, w in unread if w == why), why)
            if self.adapter.dtype == torch.float16:
                log.warning("model.dtype=fp16: the run computes in float16 without loss scaling: gradients under "
                            "6e-8 vanish and activations over 65504 overflow (the guard stops the run at a non-finite "
                            "one); bf16 (GPUs from Ampere on) has float32's range")
            if self.plan.over_budget:
                log.warning("the predicted peak beyond the weights (%s) passes the memory budget (%s) with every "
                            "saving the plan has: this run may run out of memory (dopsd-train --dry-run --gpu NAME "
                            "says what would fit)", fmt_gb(self.plan.peak["total"]), fmt_gb(self.plan.budget_bytes))
            self.backward = self.plan.backward
            # the model behind the pair protocol: the eager reference or the packed fast path (dopsd_fast.pair)
            self.pair = build_pair(cfg, self.spec, self.adapter, self.weights, self.plan)
            self._build_optimizer()
            self.sampler = BucketBatchSampler(self.dataset.batch_groups, cfg.data.batch_size, seed=cfg.train.seed,
                                              rank=self.rank, world_size=self.world)
            if self.rank == 0:
                self._say_small_groups()
            self.prefetch = ImagePrefetcher(self.dataset, cfg.data.num_workers)
            self._sigma_cache: dict = {}
            self.step = 0
            self.run_id = uuid.uuid4().hex[:16]  # a resume takes the checkpoint's
            self.logger = MetricsLogger(self.out, cfg.train.tensorboard, cfg.train.wandb, cfg.to_dict(),
                                        enabled=self.rank == 0)
            self.guard = Guard(cfg.train.max_update_ratio, cfg.train.warn_factor, verbose=self.rank == 0)
            if state is not None:
                self.load(ck, state)
                self._resume_from = state = None  # not kept: the checkpoint's tensors can be large
            elif resume == "latest" and self.rank == 0:
                self.logger.truncate_after(0)  # rows of an earlier attempt that left no checkpoint
            self.logger.run_id = self.run_id  # after load: a resumed run's wandb run is the one it began
            if self.rank == 0:
                self._check_disk()
            RANK_STARTUP.quiet = False  # started: from here each rank's warnings are its own (said on the screen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output folder's lock (:meth:`train` does at its end)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _claim_output(self, resume: str | None, overwrite: bool) -> None:
        """Rank 0 takes the folder's lock and checks it; every rank waits for that verdict (a refusal on
        rank 0 stops all, at once)."""
        err = None
        if self.rank == 0:
            try:
                self._claim_output_rank0(resume, overwrite)
            except (OutputDirError, OSError) as e:
                err = e
        self._follow_rank0(err, "output folder check", OutputDirError(f"train.output_dir {self.out}: refused by rank 0 "
                                                                     "(its message says why)"))

    def _follow_rank0(self, err: BaseException | None, what: str, refused: BaseException) -> None:
        """A check rank 0 alone makes: ``err`` (rank 0's refusal, or None) stops every rank at once, each
        other rank with ``refused``."""
        if self.dist.active and float(self.dist.mean(torch.tensor([1.0 if err else 0.0], dtype=torch.float64),
                                                     what)) > 0 and err is None:
            raise refused
        if err is not None:
            raise err

    def _check_shared_output(self) -> None:
        """Under torchrun, ``train.output_dir`` must be one folder every rank writes (each rank writes its
        shards of every checkpoint there): each rank writes a mark, and each must see rank 0's (rank 0:
        every rank's). A folder that is not shared (not mounted on a node, a relative path resolved on each
        node's own disk) or that a rank cannot write is refused here, in one line; it used to end in
        'done' with checkpoints missing the other ranks' shards, none of them loadable."""
        if not self.dist.active:
            return
        import secrets

        nonce = secrets.randbits(48) if self.rank == 0 else 1 << 50
        nonce = int(self.dist.min_max(nonce, "output folder check")[0])  # rank 0's, to every rank
        mark = lambda r: self.out / f".rank-check-{nonce:012x}-{r}"  # noqa: E731
        wrote = True
        try:
            mark(self.rank).write_text(str(self.rank))
        except OSError as e:
            wrote, why = False, e.strerror or type(e).__name__
        self.dist.min_max(1 if wrote else 0, "output folder check")  # every rank's mark written
        for _ in range(10):  # a filesystem that shows other nodes' new files late (NFS attribute caching): 5 s
            missing = [r for r in (range(self.world) if self.rank == 0 else (0,)) if not mark(r).is_file()]
            if not missing:
                break
            time.sleep(0.5)
        sees = not missing
        lo_ok, _ = self.dist.min_max(int(wrote and sees), "output folder check")
        with contextlib.suppress(OSError):
            mark(self.rank).unlink()
        if lo_ok >= 1:
            return
        if not wrote and self.out.is_dir():
            raise OutputDirError(f"train.output_dir {self.out}: rank {self.rank} cannot write there ({why}); every rank "
                                 "writes its shards of each checkpoint there")
        if self.rank == 0 and missing:
            raise OutputDirError(f"train.output_dir {self.out} is not one folder for every rank: rank 0 does not see "
                                 f"the files of rank(s) {', '.join(map(str, missing[:8]))} (a filesystem not shared by every "
                                 "node, or a relative path resolved on each node's own disk); point it at a folder "
                                 "every rank shares, by an absolute path")
        raise OutputDirError(f"train.output_dir {self.out} is not one folder for every rank (rank {self.rank} "
                             f"{'does not see rank 0' if not sees else 'sees rank 0, another rank does not'}'s files): "
                             "point it at a folder every rank shares, by an absolute path")

    def _check_same_on_every_rank(self, what: str, text: str, part: str = "") -> None:
        """``text`` (a config section ``part``, a data fingerprint) is the same on every rank: a node with
        another copy of the data or another config trained on silently, its checkpoints mixing the ranks'
        weights."""
        if not self.dist.active:
            return
        import hashlib

        h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")
        lo, hi = self.dist.min_max(h, f"{what} check")
        if lo != hi:
            if what == "data":
                raise DataError("the data differs between the ranks: every node must train on the same data "
                                "(node-local copies of it that differ?)")
            raise ConfigError(f"the config differs between the ranks, in its {part} section: every node must run "
                              "with the same config (a command line or config file that differs by node?)")

    def _claim_output_rank0(self, resume: str | None, overwrite: bool) -> None:
        out = self.out
        if overwrite and resume:
            raise OutputDirError(f"train.output_dir {out}: --overwrite starts a new run there and --resume continues "
                                 "one; pass one of them")
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"train.output_dir {out} is a file, not a folder; choose a folder (it is created "
                                 "where missing)")
        out.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock(out)  # the lock first: nothing of the folder read or written before it
        for sub in RUN_FOLDERS:
            if (out / sub).exists() and not (out / sub).is_dir():  # found at the first checkpoint, after the compute
                raise OutputDirError(f"train.output_dir {out}: {out / sub} is a file where the run writes a folder; "
                                     "move it away, or choose another output_dir")
        used = run_outputs(out)
        if resume:  # continuing here: the LoRA exports as complete folders, leftovers of a crash removed
            recover_dirs(out, ("lora", "lora_ema", "transformer", "transformer_ema"))
            remove_stale_temp_files(out, ("", "samples"))
        if not used or resume:
            return
        if not overwrite:
            raise OutputDirError(f"train.output_dir {out} holds an earlier run ({', '.join(used)}); continue it with "
                                 "--resume latest, choose another output_dir, or pass --overwrite to move it aside "
                                 f"(to {out.name}.old-N, nothing deleted) and start afresh")
        here, folder = Path.cwd().resolve(), out.resolve()
        if here == folder or folder in here.parents:
            raise OutputDirError(f"train.output_dir {out} is the folder this command runs in (or holds it): --overwrite "
                                 "cannot move it aside while the run works inside it; run from its parent folder, or "
                                 "choose another output_dir")
        c = self.cfg
        for field, where in (("cache.dir", c.cache.dir), ("data.jsonl", c.data.jsonl), ("data.folder", c.data.folder),
                             ("model.path", c.model.path), ("model.vlm_path", getattr(c.model, "vlm_path", None))):
            if where and (Path(where).resolve() == folder or folder in Path(where).resolve().parents):
                raise OutputDirError(f"{field} {where} is inside train.output_dir {out}: --overwrite would move it aside "
                                     f"with the earlier run (to {out.name}.old-N); keep it outside the run's folder")
        held = self._lock
        aside = move_aside(out)  # the held lock moves with it: no other trainer can slip in meanwhile
        out.mkdir()
        self._lock = OutputLock(out)
        held.release()
        log.warning("--overwrite: the earlier run in %s moved aside to %s (nothing deleted)", out, aside)

    @classmethod
    def resume_check(cls, cfg, resume: str, allow_config_change: bool = False) -> tuple:
        """What ``--dry-run --resume`` checks without claiming the folder or building anything: the
        checkpoint the run would pick, loaded and checked against ``cfg`` as :meth:`_pick_resume` does
        (the refusals a resume meets before the data and model are read); -> (checkpoint, step), or
        (None, None) where ``--resume latest`` finds none."""
        self = cls.__new__(cls)
        self.cfg, self.out, self.allow_config_change, self._skipped = cfg, Path(cfg.train.output_dir), \
            allow_config_change, []
        ck, state = self._pick_resume(resume, tensors=False)
        return ck, int(state["step"]) if state is not None else None

    def _pick_resume(self, resume: str | None, tensors: bool = True):
        """(checkpoint, its state) to resume from, loaded and checked against the config; (None, None)
        for a fresh start. ``tensors`` false (a dry run): its large tensors are neither read nor checked
        (:func:`~dopsd_fast.checkpoint.load_checkpoint`)."""
        load = _load_train_state if tensors else (lambda ck: load_checkpoint(ck, tensors=False))
        if not resume:
            return None, None
        root = self.out / "checkpoints"
        if resume != "latest":
            ck = resolve_resume(root, resume)
            try:
                state = load(ck)
            except Exception as e:  # noqa: BLE001 - a corrupt file: one line naming it
                raise FileNotFoundError(f"--resume {ck}: the checkpoint does not load ({type(e).__name__}: {e})") from None
            theirs = {checkpoint_run_id(p) for _, p in list_checkpoints(root)}
            mine = state.get("run_id") or checkpoint_run_id(ck)
            if Path(ck).resolve().parent != root.resolve() and run_outputs(self.out) and mine not in theirs:
                raise OutputDirError(f"--resume {ck}: train.output_dir {self.out} holds another run; resume it into "
                                     "an output_dir of its own (or that run's folder)")
            self._check_resume(ck, state)
            return ck, state
        # newest first; every folder passed over is named with the reason
        candidates = sorted([(s, p, True) for s, p in list_checkpoints(root)]
                            + [(s, p, False) for s, p in incomplete_checkpoints(root)], key=lambda c: c[0])
        skipped = self._skipped = []  # names of checkpoints passed over (set aside as damaged on resume)
        for _, ck, complete in reversed(candidates):
            if not complete:
                log.warning("--resume latest: skipping %s: not a complete checkpoint (no .metadata: emptied, or left "
                            "half-written or half-copied)", ck)
                skipped.append(ck.name)
                continue
            try:
                state = load(ck)
            except Exception as e:  # noqa: BLE001 - fall back to the previous one
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log.warning("--resume latest: skipping %s: it does not load (%s)", ck, why)
                skipped.append(ck.name)
                continue
            self._check_resume(ck, state)
            return ck, state
        if skipped:
            raise OutputDirError(f"--resume latest: no checkpoint in {root} loads ({', '.join(skipped)}: see the "
                                 "warnings above); start afresh there with --overwrite instead of --resume (the "
                                 "run is moved aside, nothing deleted), or in another output_dir")
        passed = self._results_past_a_checkpoint()
        if passed:
            raise OutputDirError(f"--resume latest: no checkpoint in {root}, but {self.out} holds the results of a run "
                                 f"that wrote one ({passed}): its checkpoints were removed, so it cannot continue; "
                                 "start afresh with --overwrite instead of --resume (the run is moved aside, nothing "
                                 "deleted), or in another output_dir")
        log.info("--resume latest: no checkpoint in %s: starting from scratch", root)
        return None, None

    def _results_past_a_checkpoint(self) -> str:
        """What in the output folder shows a run that got past a checkpoint (a LoRA export, metrics rows
        past ``train.checkpoint_every``), or ''. A ``--resume latest`` that finds no checkpoint
        starts afresh only over an attempt that never wrote one."""
        found = [f"{name}/" for name in ("lora", "lora_ema", "transformer", "transformer_ema")
                 if (self.out / name).exists()]
        every, metrics = self.cfg.train.checkpoint_every, self.out / "metrics.jsonl"
        if every > 0 and metrics.is_file():
            steps = [at for _, at in metrics_rows(metrics)]
            if steps and max(steps) > every:  # the row of a step is written before its checkpoint: one past it
                found.append(f"metrics.jsonl up to step {max(steps)}")  # shows that checkpoint complete
        return ", ".join(found)

    def _check_resume(self, ck: Path, state: dict) -> None:
        """The refusals a resume can meet, before anything is built: a config that changes the math, a
        checkpoint at or past ``train.max_steps``."""
        self._config_check(ck, state)
        step, max_steps = int(state.get("step", 0)), self.cfg.train.max_steps
        if step > max_steps:
            raise ConfigError(f"train.max_steps={max_steps} is below the step of the checkpoint {ck} ({step}): "
                              f"nothing to train; set train.max_steps above {step} to continue the run")

    def _check_data(self, ck: Path, state: dict) -> None:
        """The data's content (:meth:`~dopsd_fast.data.dataset.ImageTextDataset.fingerprint`) against the
        checkpoint's: another content is refused like a frozen config field (``--allow-config-change``
        resumes anyway, saying so)."""
        saved, now = state.get("data_fingerprint"), self.data_fingerprint
        if not isinstance(saved, dict):
            log.info("resume: %s records no data fingerprint (an earlier version): the data's content is not "
                     "compared", ck)
            return
        changed = [k for k in ("rows", "images", "prompts", "buckets") if saved.get(k) != now.get(k)]
        if "composite" in saved and saved["composite"] != now.get("composite"):  # transparent images on another
            changed.append("composite")  # background (a checkpoint of an earlier version records none: not compared)
        if not changed:
            return
        src = self.cfg.data
        where = (f"data.jsonl {src.jsonl}" if src.jsonl else f"data.folder {src.folder}" if src.folder
                 else f"data.builtin {src.builtin}")
        what = ", ".join(f"rows {saved.get('rows')} -> {now.get('rows')}" if k == "rows" else
                         "the transparent images' background (data.alpha_background) differs" if k == "composite"
                         else f"the {k} differ" for k in changed)
        if not self.allow_config_change:
            raise ConfigError(f"resume from {ck}: the content of {where} changed since the checkpoint ({what}); "
                              "restore the data the run trained on, start a new output_dir, or pass "
                              "--allow-config-change to resume on the new data")
        log.warning("resume: the content of %s changed since the checkpoint (%s): resuming on the new data "
                    "(--allow-config-change)", where, what)

    def _config_check(self, path: Path, state: dict) -> tuple[list, list]:
        """The config's changes against the checkpoint's, refused where they change the math (unless forced):
        -> (the forced ones, the ones that change nothing computed), each ``(field, before, now)``."""
        frozen, applied = config_changes(state.get("config", {}), self.cfg.to_dict(), Config().to_dict())
        recorded = state.get("model_files") if isinstance(state.get("model_files"), dict) else None
        notes = []
        if recorded is not None:  # another folder: its files decide (_check_model_files, rank 0's verdict)
            frozen = [(k, a, b) for k, a, b in frozen if not (k in MODEL_FOLDERS and a and b and k in recorded)]
        elif any(k in MODEL_FOLDERS for k, _, _ in frozen):
            notes.append("the checkpoint records no fingerprints of the model's files (an earlier version): a copy "
                         "of the folder elsewhere cannot be recognised")
        if isinstance(state.get("data_fingerprint"), dict):  # the data at another path ('folder/', absolute, a
            # copy): its content decides (_check_data, once the data is read), not the path's spelling
            frozen = [(k, a, b) for k, a, b in frozen if not (k in DATA_PATHS and a and b)]
        first_default = FAMILIES[DEFAULT_FAMILY].default_rollout  # dopsd.rollout's default for every family, once
        if any(k == "dopsd.rollout" and a == first_default and b == FAMILIES[self.cfg.model.family].default_rollout
               for k, a, b in frozen):
            notes.append(f"a config that leaves dopsd.rollout out now rolls out on the family's own schedule; this "
                         f"run trained on {first_default}, the earlier default: --set dopsd.rollout={first_default} "
                         "resumes it")
        shaped = [(k, a, b) for k, a, b in frozen if k in SHAPE_FIELDS]
        if shaped:  # the trained tensors themselves would not fit: no override can resume across it
            fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in shaped)
            raise ConfigError(f"resume from {path}: {fields} changes the shapes of the trained tensors, so the "
                              "checkpoint cannot be resumed with it (not even with --allow-config-change); keep the "
                              "checkpoint's value, or start a new run (another output_dir, or --overwrite)")
        if frozen and not self.allow_config_change:
            fields = "; ".join([f"{k}: {a!r} -> {b!r}" for k, a, b in frozen] + notes)
            raise ConfigError(f"resume from {path}: the config changes what the run computes ({fields}); start a new "
                              "output_dir, or pass --allow-config-change to resume anyway")
        return frozen, applied

    def _build_data_and_model(self) -> None:
        """The dataset, the family's adapter (its encoders, or the feature cache instead), the contexts,
        the student / EMA-teacher weights, and FSDP2 sharding where the run asks for it."""
        cfg = self.cfg
        self.dataset = build_dataset(cfg.data, progress=cfg.train.progress and self.rank == 0)
        self.data_fingerprint = self.dataset.fingerprint()
        self._check_same_on_every_rank("data", json.dumps(self.data_fingerprint, sort_keys=True, default=str))
        if self._resume_from is not None:  # before the model: the data's content against the checkpoint's
            self._check_data(*self._resume_from)
        self.spec = family(cfg.model.family)
        require_editing_support(self.spec, self.dataset)
        val_refs = self._decode_validation_references()
        cache = None
        # the contexts the method reads: D-OPSD the student's and the teacher's, SFT the student's alone (no
        # Z-Image VLM loaded, no model.vlm_path needed)
        self.context_kinds = kinds_of(cfg.method)
        if cfg.cache.dir:
            self.adapter = build_adapter(cfg.model, load_encoders=False)
            cache = FeatureCache.for_run(cfg.cache.dir, self.adapter, cfg.method)
            cache.hold_for_reading()  # dopsd-cache --prune (which rewrites shards) waits for the run's end
            cache.require_complete(self.dataset, self.spec.context_width(self.adapter.transformer.config),
                                   self.context_kinds, extra_problem=getattr(self.adapter, "cache_extra_problem", None),
                                   max_tokens=self.spec.context_tokens(cfg.model))
            log.info("contexts from the feature cache %s: encoders not loaded", cfg.cache.dir)
        elif "teacher" in self.context_kinds:
            self.adapter = build_adapter(cfg.model, load_encoders=True)
        else:
            self.adapter = build_adapter(cfg.model, load_encoders=False)
            self.adapter.ensure_student_encoder()
        check_buckets(self.adapter, self.dataset, teacher="teacher" in self.context_kinds)
        self.val_refs = self._validation_references(val_refs)
        self.contexts = ContextProvider(self.adapter, cache,
                                        total=None if cache else len(needed_entries(self.dataset, self.context_kinds)))
        self.device = self.adapter.device
        targets = self.spec.lora_targets(cfg.lora, self.adapter.transformer.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(cfg.train.seed, 7))  # LoRA init independent of anything else
            self.weights = StudentTeacher(self.adapter.transformer, cfg.lora, targets, self.adapter.dtype,
                                          ema_on_cpu=cfg.dopsd.ema_on_cpu)
        # FSDP2 (full fine-tuning with several ranks, or dist.shard_base): before the optimizer sees the parameters
        self.sharded = fsdp.apply(cfg, self.spec, self.weights, self.device, self.adapter.dtype, self.world)

    def _build_optimizer(self) -> None:
        """AdamW (fused on CUDA) over the trainable tensors, with the linear warm-up."""
        o = self.cfg.optim
        params = self.weights.trainable_parameters()
        kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        kw["fused" if self.device.type == "cuda" else "foreach"] = True
        self.optimizer = torch.optim.AdamW(params, **kw)
        warm = o.warmup_steps
        if warm > self.cfg.train.max_steps and self.rank == 0:
            log.warning("optim.warmup_steps %d is more than train.max_steps %d: the learning rate never reaches "
                        "optim.lr %g (it ends at %g)", warm, self.cfg.train.max_steps, o.lr,
                        o.lr * self.cfg.train.max_steps / warm)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        log.info("trainable parameters: %s (%s)", f"{sum(p.numel() for p in params):,}",
                 "LoRA" if self.cfg.lora.enabled else "full")

    # ---- pieces ------------------------------------------------------------------------------
    def _nv(self, name):
        return nvtx_range(name) if self.cfg.fast.nvtx else contextlib.nullcontext()

    def autocast(self):
        if self.device.type == "cuda" and self.adapter.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.adapter.dtype)
        return contextlib.nullcontext()

    def next_samples(self, step: int, micro: int):
        """This rank's slice of the micro-batch's global batch; each sample's randomness (prompt variant,
        augmentation) keyed by (seed, step, micro-batch, global sample index), not by rank."""
        idx = self.sampler.next_batch()
        first = self.rank * self.cfg.data.batch_size
        samples = [self.dataset.get(i, random.Random(_seed_of(self.cfg.train.seed, step, micro, first + j, i, 1)),
                                    images=self.prefetch.images(i)) for j, i in enumerate(idx)]
        # the next micro-batch's images decode while this one computes: those a sample may read (a context or
        # SFT's latents not encoded yet); once encoded (memoised, or from the feature cache) none is read
        self.prefetch.ahead(self.sampler, wanted=self._may_read_images)
        return samples

    def _may_read_images(self, index: int) -> bool:
        """Whether a sample of record ``index`` may read its images (target, references): SFT's latents not yet
        encoded, or (without a feature cache) a context of one of its prompts not yet encoded."""
        from dopsd_fast.cache import record_key

        rec, memo = self.dataset.records[index], self.contexts.memo
        if self.cfg.method == "sft" and ("latents", rec.image_hash, tuple(rec.bucket)) not in memo:
            return True
        if self.contexts.cache is not None:
            return False
        return any(record_key(k, p, rec) not in memo for k in self.context_kinds for p in rec.prompts)

    def noise_for(self, samples, step: int, micro: int) -> torch.Tensor:
        """x_0 of each sample from (seed, step, micro-batch, global sample index): N ranks x batch b draw
        the noise 1 rank x batch N b draws."""
        w, h = samples[0].record.bucket
        shape = self.adapter.latent_shape(h, w)
        first = self.rank * self.cfg.data.batch_size
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(
            _seed_of(self.cfg.train.seed, step, micro, first + j, 2)), dtype=torch.float32) for j in range(len(samples))]
        return torch.stack(noise).to(self.device)

    def memory_shape(self):
        """The step's shape for the memory model (:mod:`dopsd_fast.memory`): this rank's share of the trained
        tensors (FSDP2's shards: their gradients and AdamW state are a shard's size on each GPU)."""
        params = self.weights.trainable_parameters()
        return step_shape(self.cfg, self.adapter, self.dataset.buckets_of, sum(fsdp.local(p).numel() for p in params),
                          params[0].element_size() if params else 4,
                          references=[r.reference_buckets for r in self.dataset.records])

    def sigmas_for(self, latent_hw) -> list[float]:
        """The roll-out schedule (resolution-dependent for klein: the empirical mu of the sequence)."""
        key = tuple(latent_hw)
        if key not in self._sigma_cache:
            self._sigma_cache[key] = self.adapter.training_sigmas(self.cfg.dopsd.rollout, key)
        return self._sigma_cache[key]

    def compute_rollout(self, samples, noise, loss_scale: float = 1.0, input_flags: list | None = None):
        """Roll-out, loss and backward of one micro-batch: the one D-OPSD step (:func:`dopsd_fast.pair.dopsd_step`).
        ``input_flags``: where to append the micro-batch's finiteness flags (:meth:`input_flags`)."""
        sigmas = self.sigmas_for(noise.shape[-2:])
        ctx_s = [c.to(self.device) for c in self.contexts.student(samples)]
        ctx_t = [c.to(self.device) for c in self.contexts.teacher(samples)]
        if input_flags is not None:
            input_flags.append(self.input_flags(samples, ctx_s, ctx_t))
        return dopsd_step(self.pair, noise, ctx_s, ctx_t, sigmas, loss=self.cfg.dopsd.loss, backward=self.backward,
                          loss_scale=loss_scale, autocast=self.autocast(), region=self._nv,
                          check_inputs=False)  # its own noise; the loss is read once per optimizer step

    def compute_sft(self, samples, noise, step: int, micro: int, loss_scale: float = 1.0,
                    input_flags: list | None = None):
        """The SFT baseline: flow matching on the target latents, ``(1 - s) x0 + s eps`` -> ``eps - x0``,
        with the sigma sampling of diffusers' DreamBooth LoRA scripts (u from the weighting scheme,
        quantised to the 1000-step grid, then the model's timestep shift); student context only."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sc = self.cfg.sft
        x0 = self.contexts.latents(samples).to(self.device)
        ctx_s = [c.to(self.device) for c in self.contexts.student(samples)]
        if input_flags is not None:
            input_flags.append(self.input_flags(samples, ctx_s, None, x0))
        # u per sample from (seed, step, micro-batch, global sample index), as noise_for: N ranks x batch b
        # draw what 1 rank x batch N b draws
        first = self.rank * self.cfg.data.batch_size
        u = torch.cat([compute_density_for_timestep_sampling(
            sc.weighting, 1, sc.logit_mean, sc.logit_std, sc.mode_scale,
            generator=torch.Generator().manual_seed(_seed_of(self.cfg.train.seed, step, micro, first + j, 3)))
            for j in range(len(samples))])
        idx = (u * 1000).long().clamp(0, 999)
        sigma = self.adapter.shift_sigmas(1.0 - idx.double() / 1000.0, noise.shape[-2:]).float().to(self.device)
        s = sigma.view(-1, *[1] * (x0.dim() - 1))
        x_t = (1 - s) * x0 + s * noise
        with self.autocast():
            v = self.pair.velocity("student", x_t, sigma, ctx_s)
        loss = ((v.float() - (noise - x0)) ** 2).mean()
        with self._nv("backward"):
            (loss * loss_scale).backward()
        return RolloutResult(loss.detach(), [loss.detach()], [x_t.detach()], [v.detach()], [])

    # what each bit of an input flag names (the sample's context or target that is not finite)
    _INPUT_KINDS = ((1, "student", "student context"), (2, "teacher", "teacher context"), (4, None, "target latents"))

    def input_flags(self, samples, ctx_s, ctx_t=None, x0=None) -> torch.Tensor:
        """One number per sample, computed on the device (no host read): 0 where every input of the sample
        is finite, else ``(dataset index + 1) * 8 + mask`` (mask bits: 1 student context, 2 teacher context,
        4 target latents). The training step reads them with its loss, once per optimizer step."""
        flags = []
        for j, s in enumerate(samples):
            parts = [(1, [ctx_s[j]]), (2, [ctx_t[j]] if ctx_t is not None else []),
                     (4, [x0[j]] if x0 is not None else [])]
            mask = torch.zeros((), dtype=torch.float64, device=self.device)
            for bit, ctxs in parts:
                ts = [t for c in ctxs for t in ([c] if torch.is_tensor(c) else
                                                [c.features, *(v for v in c.extra.values() if torch.is_tensor(v))])
                      if t.is_floating_point() and t.numel()]
                if ts:
                    bad = torch.stack([~torch.isfinite(t).all() for t in ts]).any()
                    mask = mask + bit * bad.double()
            flags.append(torch.where(mask > 0, (getattr(s, "index", -1) + 1) * 8 + mask, mask))
        return torch.stack(flags)

    def _input_source(self, kind: str | None, record) -> str:
        """Where a sample's context or latents came from, for the message about a non-finite one."""
        if kind is None:
            return f"encoded from the image {record.image_path}"
        if self.contexts.cache is not None:
            from dopsd_fast.cache import record_key

            entries = self.contexts.cache.entries
            shards = sorted({entries[k][0] for k in (record_key(kind, p, record) for p in record.prompts) if k in entries})
            return (f"feature cache {self.contexts.cache.dir}, shard {', '.join(shards) or '?'}; delete the cache "
                    "and run dopsd-cache again")
        what = "the image and the prompt" if kind == "teacher" else "the prompt"
        return f"encoded from {what} of {record.image_path}"

    def _raise_nonfinite_inputs(self, step: int, flags: list[float]) -> None:
        """The first sample whose inputs are not finite, named (row, image, which input, its source)."""
        per_rank = len(flags) // (self.world if self.dist.active else 1)
        for slot, f in enumerate(flags):
            v = int(round(f))
            if v <= 0:
                continue
            index, mask = v // 8 - 1, v % 8
            rank, within = divmod(slot, per_rank)
            rec = self.dataset.records[index] if 0 <= index < len(self.dataset) else None
            where = (f"sample {index} ({rec.where}, image {rec.image_path})" if rec is not None
                     else f"sample {index}")
            kinds = [(name, self._input_source(k, rec) if rec is not None else "")
                     for bit, k, name in self._INPUT_KINDS if mask & bit]
            if len({src for _, src in kinds}) == 1:  # one source (a cache shard): said once
                what = f"{' and '.join(name for name, _ in kinds)}" + (f" ({kinds[0][1]})" if kinds[0][1] else "")
            else:
                what = " and ".join(f"{name} ({src})" for name, src in kinds)
            on = f" on rank {rank}" if self.dist.active and self.world > 1 else ""
            raise DataError(f"step {step}: {where}{on} carries non-finite values (NaN or Inf) in its {what}; fix or "
                            "remove that row (nothing of this step was written; the last checkpoint is the last good "
                            "state)")

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        accum = self.cfg.train.grad_accum
        # losses stay on the device: no host read per micro-batch (each would drain the GPU's queue)
        state_losses = None
        total, n = None, 0
        input_flags: list[torch.Tensor] = []  # per sample, read with the loss (one fused read per step)
        for micro in range(accum):
            if self.sharded:  # FSDP2 reduce-scatters with the last micro-batch's backward only
                self.weights.transformer.set_requires_gradient_sync(micro == accum - 1)
            samples = self.next_samples(self.step, micro)
            noise = self.noise_for(samples, self.step, micro)
            if self.cfg.method == "sft":
                res = self.compute_sft(samples, noise, self.step, micro, loss_scale=1.0 / accum,
                                       input_flags=input_flags)
            else:
                res = self.compute_rollout(samples, noise, loss_scale=1.0 / accum, input_flags=input_flags)
            loss = res.loss.detach().float().reshape(1)
            sl = torch.stack([l.detach().float().reshape(()) for l in res.state_losses])
            total = loss if total is None else total + loss
            state_losses = sl if state_losses is None else state_losses + sl
            n += len(samples)
        params = self.weights.trainable_parameters()
        # this rank's flags in its own slots of a world-wide vector (a mean over ranks keeps every rank's)
        own = torch.cat(input_flags).to(total.device) if input_flags else total.new_zeros(0, dtype=torch.float64)
        width = accum * self.cfg.data.batch_size
        flags = own.new_zeros((self.world if self.dist.active else 1) * width)
        first = (self.rank if self.dist.active else 0) * width
        flags[first:first + own.numel()] = own
        metrics_t = torch.cat([total.double(), state_losses.double(), flags])
        if self.dist.active:  # one gradient average per optimizer step; the metrics and the stop flags with it
            with self._nv("all-reduce"):  # (FSDP2's sharded gradients are reduce-scattered already)
                self.dist.all_reduce_mean_([p.grad for p in params if p.grad is not None and not fsdp.is_dtensor(p.grad)])
            sig = self._signals
            flags = torch.tensor([float(bool(sig and sig.sigterm)), float(bool(sig and sig.sigint))],
                                 dtype=torch.float64, device=metrics_t.device)
            metrics_t = self.dist.mean(torch.cat([metrics_t, flags]))
            n *= self.world
        # the global gradient norm (clip 0: measured, nothing clipped); DTensor shards reduce inside
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0
                                            else float("inf"))
        gn = fsdp.local(gn.full_tensor()) if fsdp.is_dtensor(gn) else gn
        # ONE device->host read per optimizer step: what the divergence guard decides on before the update
        host = torch.cat([metrics_t, gn.detach().double().reshape(1).to(metrics_t.device)]).tolist()
        gnorm = host.pop()
        if self.dist.active:  # every rank stops after this step if any rank received a signal before it
            sigint, sigterm = host.pop() > 0, host.pop() > 0
            self._stop_kind = "SIGTERM" if sigterm else "SIGINT" if sigint else None
        nflags = flags.numel()
        flag_values = [f * (self.world if self.dist.active else 1) for f in host[len(host) - nflags:]]
        host = host[:len(host) - nflags]
        if any(f > 0.5 for f in flag_values):
            self._raise_nonfinite_inputs(self.step + 1, flag_values)
        total, state_losses = host[0], host[1:]
        lr = self.lr_sched.get_last_lr()[0]
        self.guard.check_before_update(self.step + 1, total / accum, gnorm)
        mine = [fsdp.local(p) for p in params]  # the guard reads this rank's shards (all of a replicated tensor)
        before = self.guard.snapshot(mine) if self.cfg.lora.enabled else None  # LoRA: small; full FT: no copy
        with self._nv("optimizer"):
            self.optimizer.step()
        # full fine-tuning: the update's norm from AdamW's state (a snapshot would be a second model)
        update = None if before is not None else self.guard.adamw_update(self.optimizer, fsdp.local)
        update_ratio = self._guard_after_update(self.step + 1, [fsdp.local(p) for p in params], before, gnorm,
                                                update)
        self.lr_sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.ema_update(self.cfg.dopsd.ema_decay)
        self.step += 1
        if (self.dist.active and not self.sharded and self.cfg.train.check_sync_every
                and self.step % self.cfg.train.check_sync_every == 0):
            drift = self.dist.check_in_sync(params + list(self.weights.named_teacher().values()))
            if drift > 0:
                raise RuntimeError(f"step {self.step}: the ranks' weights drifted apart (checksum difference {drift:.3g})")
        # no device synchronize here: the optimizer, EMA and this step's tail overlap the next step's host
        # work; the step time is wall time between the host's step boundaries (its mean over steps is exact)
        dt = time.perf_counter() - t0
        metrics = {"loss": total / accum, "grad_norm": gnorm, "lr": lr, "step_time_s": dt, "samples_per_s": n / dt}
        if math.isfinite(update_ratio):
            metrics["update_ratio"] = update_ratio
        for k, v in enumerate(state_losses):
            metrics[f"loss_state/{k}"] = v / accum
        return metrics

    def _guard_after_update(self, step, params, before, gnorm, update=None) -> float:
        """The guard on this rank's weights; sharded, the ranks agree (any rank's failure stops all)."""

        err, ratio = None, float("nan")
        try:
            ratio = self.guard.check_after_update(step, params, before, gnorm, update)
        except DivergenceError as e:
            err = e
        if self.sharded and float(self.dist.mean(torch.tensor([1.0 if err else 0.0]), "guard")) > 0 and err is None:
            err = DivergenceError(f"step {step}: another rank's updated weights failed the divergence guard; stopping "
                                  "before anything is written (the last checkpoint is the last good state)")
        if err is not None:
            raise err
        return ratio

    # ---- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Path | None:
        vcfg = self.cfg.validation
        n = min(vcfg.num_samples, len(self.dataset))
        if (n == 0 and not vcfg.prompts) or (self.rank != 0 and not self.sharded):  # sharded: every rank runs the forwards, rank 0 saves
            return None
        rows = []
        for i in range(n):
            s = self.dataset.get(i, prompt_index=0)
            w, h = s.record.bucket
            shape = self.adapter.latent_shape(h, w)
            sig = self.adapter.sampling_sigmas(vcfg.steps, vcfg.schedule, shape[-2:])
            g = torch.Generator().manual_seed(_seed_of(vcfg.seed, i))
            noise = torch.randn((1, *shape), generator=g).to(self.device)
            ctx_s = [c.to(self.device) for c in self.contexts.student([s])]
            # SFT has no teacher context: its EMA copy samples under the student's prompt, as it is used
            ctx_t = ([c.to(self.device) for c in self.contexts.teacher([s])] if "teacher" in self.context_kinds
                     else ctx_s)
            with self.autocast():
                xs = euler_sample(lambda x, sg: self.pair.velocity("student", x, sg, ctx_s), noise, sig)
                xt = euler_sample(lambda x, sg: self.pair.velocity("teacher", x, sg, ctx_t), noise, sig)
            imgs = self.adapter.decode(torch.cat([xs, xt]))
            rows.append((s.prompt, [s.image, imgs[0].cpu(), imgs[1].cpu()]))
        for i, ((prompt, _, _), refs, ctx) in enumerate(zip(vcfg.held_out(), self.val_refs,
                                                             self._validation_contexts())):
            # on references: at the first one's bucket (an edit keeps its picture's aspect)
            w, h = (refs[0].shape[-1], refs[0].shape[-2]) if refs else self.dataset.records[0].bucket
            shape = self.adapter.latent_shape(h, w)
            sig = self.adapter.sampling_sigmas(vcfg.steps, vcfg.schedule, shape[-2:])
            g = torch.Generator().manual_seed(_seed_of(vcfg.seed, 1_000_000 + i))
            noise = torch.randn((1, *shape), generator=g).to(self.device)
            ctx_s = [ctx.to(self.device)]
            with self.autocast():
                xs = euler_sample(lambda x, sg: self.pair.velocity("student", x, sg, ctx_s), noise, sig)
            # no target (and so no teacher context) for a prompt without an image: the student's column only
            sample = self.adapter.decode(xs)[0].cpu()
            if refs:  # its first reference where a data row's target is
                label = "reference" if len(refs) == 1 else f"reference 1 of {len(refs)}"
                rows.append((f"(held out, on {len(refs)} reference(s)) " + prompt, [refs[0], sample], [label, "student"]))
            else:
                rows.append(("(held out) " + prompt, [None, sample]))
        if self.rank != 0:
            return None
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        ema = "teacher (EMA)" if "teacher" in self.context_kinds else "EMA (student prompt)"
        save_grid(rows, ["target", "student", ema], path, title=f"step {self.step}")
        self._plot_curves()
        return path

    def _plot_curves(self) -> None:
        """``curves.png`` from ``metrics.jsonl`` (rank 0; once per step, reading only the rows appended since
        the last picture): a picture that cannot be drawn (a full disk) is said once and costs the run nothing."""
        from dopsd_fast import curves

        if self.rank != 0 or not self.logger.enabled or getattr(self, "_curves_step", None) == self.step:
            return
        if getattr(self, "_curves", None) is None:
            self._curves = curves.Curves(self.out / "metrics.jsonl")
        try:
            curves.plot_run(self.out, title=f"{self.out.name}: step {self.step}", curves=self._curves)
            self._curves_step = self.step
        except Exception as e:  # noqa: BLE001 - a picture never stops training
            if not getattr(self, "_curves_failed", False):
                log.warning("curves.png not written (%s: %s); metrics.jsonl has the numbers", type(e).__name__, e)
            self._curves_failed = True

    def _decode_validation_references(self) -> dict:
        """Each field's reference images (``validation.references``, a ``validation.prompts`` entry's own
        ``references``) decoded before the model is built: one line naming a missing, unreadable or too
        small file, or a family without an editing mode, before the weights are read."""
        from dopsd_fast.sample import load_references

        decoded = {}
        try:
            for name, paths in self.cfg.validation.reference_fields().items():  # every field, used or not: a bad
                decoded[name] = load_references(self.cfg.data, self.cfg.model.family, paths, name)  # entry is named
        except ValueError as e:
            raise ConfigError(f"config field {e}") from None
        return decoded

    def _validation_references(self, decoded: dict) -> list:
        """Each held-out prompt's reference images (a ``validation.prompts`` entry's own ``references``,
        else ``validation.references``), from :meth:`_decode_validation_references`, each at a bucket
        the model takes (its latent grid), before any step."""
        from dopsd_fast.sample import check_reference_grid

        vcfg = self.cfg.validation
        held = vcfg.held_out()
        try:
            for name, paths in vcfg.reference_fields().items():
                check_reference_grid(self.adapter, decoded[name], paths, name)
        except ValueError as e:
            raise ConfigError(f"config field {e}") from None
        if vcfg.references and self.rank == 0 and all(name != "validation.references" for _, _, name in held):
            log.warning("validation.references is set, but no held-out prompt is conditioned on it (validation.prompts "
                        "is empty, or each entry has its own references)")
        return [decoded[name] for _, _, name in held]

    def _validation_contexts(self) -> list:
        """Student contexts of the held-out prompts (each on its references, when it has some), encoded
        once (a run on a feature cache loads the text encoder for this, then releases it)."""
        vcfg = self.cfg.validation
        prompts = [p for p, _, _ in vcfg.held_out()]
        key = (list(vcfg.prompts), list(vcfg.references))
        if getattr(self, "_val_ctx", None) is None or self._val_ctx[0] != key:
            loaded = getattr(self.adapter, "text_encoder", None) is not None
            refs = [list(r) for r in self.val_refs] if any(self.val_refs) else None
            ctx = self.adapter.encode_student(prompts, refs) if prompts and refs else \
                self.adapter.encode_student(prompts) if prompts else []
            if not loaded and prompts:
                self.adapter.release_encoders()
            self._val_ctx = (key, ctx)
        return self._val_ctx[1]

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "weights": self.weights.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "run_id": self.run_id,
            "data_fingerprint": self.data_fingerprint,
            "model_files": self._model_folders_fingerprint(),
        }

    def _folder_fingerprint(self, folder: str) -> dict:
        if folder not in self._model_files:
            self._model_files[folder] = file_fingerprint(Path(folder))
        return self._model_files[folder]

    def _model_folders_fingerprint(self) -> dict:
        """``{field: file_fingerprint}`` of ``model.path`` / ``model.vlm_path`` where set (about 18 MiB read per
        weight file), taken once, at start-up, by rank 0 (whose record a checkpoint keeps; other ranks: {}):
        what a resume compares (:meth:`_check_model_files`)."""
        if self.rank != 0:
            return {}
        m = self.cfg.model
        out = {k: self._folder_fingerprint(v) for k, v in (("model.path", m.path), ("model.vlm_path", m.vlm_path)) if v}
        shipped = self._shipped_weights()
        if shipped is not None:  # a preset's weights shipped with the package: another version may ship others
            folder, names = shipped  # the files the run loads (not those for evaluation alone)
            out["model.preset"] = {k: v for k, v in self._folder_fingerprint(str(folder)).items() if k in names}
        return out

    def _shipped_weights(self):
        """(folder, the file names the preset loads) of the weights the package ships for ``model.preset``
        (the toy model), or None."""
        m = self.cfg.model
        return FAMILIES[m.family].preset(m.preset).shipped_weights() if m.preset and not m.path else None

    def _check_model_files(self, ck: Path, state: dict) -> None:
        """The model folders' files against the checkpoint's record of them (``model_files``), decided by
        rank 0, every rank stopping with it: a folder at another path holding the same files (a copy on
        node-local disk) is the same model; one whose files differ (edited in place, or another model
        at the new path) is refused like a changed config field (``--allow-config-change`` resumes anyway,
        saying so)."""
        saved = state.get("model_files") if isinstance(state.get("model_files"), dict) else {}
        before = state.get("config", {}).get("model", {}) if isinstance(state.get("config"), dict) else {}
        err = None
        if self.rank == 0:
            problems = []
            now = self._model_folders_fingerprint()
            for k in MODEL_FOLDERS:
                name = k.split(".", 1)[1]
                a, b = (before.get(name) if isinstance(before, dict) else None), getattr(self.cfg.model, name)
                if k not in saved or k not in now:  # not recorded then, or not set now (a config change, if any)
                    continue
                diff = None if "missing" in now[k] else differing_files(saved[k], now[k])
                if diff == []:
                    if a != b:
                        log.info("resume: %s %r -> %r holds the same files as the checkpoint's (names, configs, sampled "
                                 "weights): the same model", k, a, b)
                    continue
                files = "" if diff is None else f"{', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}"
                problems.append(f"{k} {b} does not exist" if diff is None else
                                f"{k} {b}: its files changed since the checkpoint ({files})" if a == b else
                                f"{k} {a!r} -> {b!r}: other files ({files})")
            preset = self.cfg.model.preset
            if "model.preset" in now and "model.preset" not in saved:  # an earlier version's checkpoint
                log.warning("resume: %s records no fingerprint of model.preset %s's weights (written by an earlier "
                            "version): a run started before the package shipped its present weights continues on "
                            "other ones; start a new output_dir if its samples look wrong", ck, preset)
            elif "model.preset" in now and isinstance(before, dict) and before.get("preset") == preset:
                diff = differing_files(saved["model.preset"], now["model.preset"])
                if diff:
                    problems.append(f"model.preset {preset}: the weights the package ships for it changed since the "
                                    f"checkpoint ({', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}; another "
                                    "version of dopsd-fast: install the one the run started with to resume it)")
            if problems and self.allow_config_change:
                log.warning("resume from %s: %s: resuming on them (--allow-config-change)", ck, "; ".join(problems))
            elif problems:
                err = ConfigError(f"resume from {ck}: the model is not the one the run trained ({'; '.join(problems)}); "
                                  "restore its files, start a new output_dir, or pass --allow-config-change to resume "
                                  "anyway")
        self._follow_rank0(err, "model files check", ConfigError(f"resume from {ck}: refused by rank 0 (its message "
                                                                 "says why)"))

    def load(self, path: Path, state: dict | None = None) -> None:
        state = _load_train_state(path) if state is None else state
        forced, applied = self._config_check(path, state)
        for k, a, b in forced:
            log.warning("resume: %s %r -> %r (forced by --allow-config-change: it changes what the run computes%s)",
                        k, a, b, "; the data order keeps the checkpoint's seed (the sampler resumes its order), "
                        "the noise and the prompt variants take the new one" if k == "train.seed" else "")
        for k, a, b in applied:
            log.info("resume: %s %r -> %r (applied)", k, a, b)
        try:
            self.weights.load_state_dict(state["weights"])
            self._check_optimizer_shapes(state["optimizer"])
            osd = self._optimizer_state_for_here(state["optimizer"])
            live = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            if len(live) == len(osd["param_groups"]):  # every option is this run's: a received checkpoint's
                # maximize / amsgrad ... never reach the optimizer, and its load places each moment and step
                # where this run's fused / foreach AdamW keeps it (a CPU checkpoint resumed on a GPU)
                osd = {**osd, "param_groups": [{**o, "params": g["params"]} for o, g in zip(live, osd["param_groups"])]}
            self.optimizer.load_state_dict(osd)
        except (RuntimeError, ValueError, KeyError) as e:  # tensors that do not fit the model built here
            fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in forced + applied if k.startswith(("model.", "lora.")))
            raise ConfigError(f"resume from {path}: its weights do not fit the model of this config "
                              f"({fields or 'no model or LoRA field changed'}; {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); keep the checkpoint's model and "
                              "LoRA settings, or start a new run") from None
        sched = state["lr_scheduler"]  # its position only (a scheduler's load_state_dict sets any attribute it is given)
        self.lr_sched.last_epoch = sched["last_epoch"]
        self.lr_sched._step_count = sched.get("_step_count", sched["last_epoch"] + 1)
        o = self.cfg.optim  # the current optimizer settings win over the checkpoint's
        self.lr_sched.base_lrs = [o.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
            g["lr"] = o.lr * self.lr_sched.lr_lambdas[0](self.lr_sched.last_epoch)
        self.lr_sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports
        saved_fp, layout_changed = state.get("data_fingerprint"), None
        if "layout" not in state["sampler"] and isinstance(saved_fp, dict):  # an earlier version's: the fingerprint
            layout_changed = any(saved_fp.get(k) != self.data_fingerprint.get(k) for k in ("rows", "buckets"))
        self.sampler.load_state_dict(state["sampler"], layout_changed)
        gb = state["sampler"].get("global_batch")
        if self.rank == 0 and (self.sampler.resumed_as or gb is not None and gb != self.sampler.global_batch):
            what = self.sampler.resumed_as or "the data order from here differs from an uninterrupted run"
            log.warning("resume: %s: %s", f"the global batch changes from {gb} to {self.sampler.global_batch} samples "
                        "(data.batch_size x ranks)" if gb is not None and gb != self.sampler.global_batch
                        else "the data's rows changed", what)
        if (state["sampler"].get("grouping") != self.sampler.GROUPING and self.rank == 0
                and any(r.reference_buckets for r in self.dataset.records)):
            log.warning("resume: batches now group editing rows by their references' buckets (the checkpoint is of "
                        "an earlier version): the data order from here differs from an uninterrupted run")
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        # the run's id (checkpoints of earlier versions carry none: the run continues under a new one)
        self.run_id = state.get("run_id") or checkpoint_run_id(path) or self.run_id
        self._saved_step = self.step
        if self.step < self.cfg.train.max_steps:  # else nothing to train (train() says so), and nothing written:
            self.logger.truncate_after(self.step)  # the finished run's later rows stay with its later checkpoints
            if self.rank == 0:  # a run taken back to an earlier step: what it went on to is set aside, not read
                moved = set_aside_later(self.out / "checkpoints", self.step, self.run_id, self._skipped)
                if moved:
                    log.warning("resume from step %d: this run's later checkpoints (it went on past this step before, or "
                                "they did not load) moved aside (%s; not deleted): --resume latest continues this run from now on", self.step,
                                ", ".join(p.name for p in moved))
                grids = set_aside_later_grids(self.out / "samples", self.step)
                if grids:
                    log.info("resume from step %d: the validation grids of later steps (%s) moved to %s/ (not "
                                "deleted): samples/ shows this run's", self.step,
                                ", ".join(sorted(p.name for p in grids.iterdir())), grids)
        log.info("resumed from %s at step %d", path, self.step)

    def _run_files(self) -> tuple[float, float, int]:
        """:func:`~dopsd_fast.memory.run_files` of this run: one checkpoint's bytes, the exports', their folders."""
        trained = sum(p.numel() for p in self.weights.trainable_parameters())
        base = sum(p.numel() for p in self.adapter.transformer.parameters())
        return run_files(trained, base, torch.finfo(self.adapter.dtype).bits // 8, self.cfg.lora.enabled)

    def disk_plan(self, free: float | None = None):
        """:func:`~dopsd_fast.memory.disk_plan` of this run from its step on: its checkpoints (this run's
        already in ``checkpoints/`` counted) and exports."""
        ck, exports, folders = self._run_files()
        t = self.cfg.train
        mine = sum(1 for _, p in list_checkpoints(self.out / "checkpoints") if checkpoint_run_id(p) == self.run_id)
        names = ("lora", "lora_ema") if self.cfg.lora.enabled else tuple(n for _, n in self.FULL_EXPORTS)
        return disk_plan(ck, exports, folders, t.keep_checkpoints, checkpoint_steps(self.step, t.max_steps,
                         t.checkpoint_every), existing=mine, exports_each_checkpoint=self.cfg.lora.enabled, free=free,
                         exports_there=all((self.out / n).is_dir() for n in names))

    def _check_disk(self) -> None:
        """At start-up: the folders set aside in ``checkpoints/`` (kept for inspection: their count and
        bytes), and a warning when the checkpoints and exports the run will write do not fit the free
        space of its output folder's disk: the step whose checkpoint fails, and the ways out."""
        aside = set_aside_folders(self.out / "checkpoints")
        if aside:
            names = ", ".join(p.name for p, _ in aside[:4]) + (", ..." if len(aside) > 4 else "")
            log.info("%s/ keeps %d folder%s set aside (%s: %s in all): no run reads or deletes them; delete them "
                     "when you no longer need them", self.out / "checkpoints", len(aside),
                     "s" if len(aside) > 1 else "", names, fmt_bytes(sum(b for _, b in aside)))
        try:
            free = shutil.disk_usage(self.out).free
        except OSError:
            return
        d = self.disk_plan(free)
        if d.fails_at is not None:
            log.warning("%s, and that disk has %s free: step %d's checkpoint and exports will not fit "
                        "(train.keep_checkpoints=%d, plus the one being written); free space, lower "
                        "train.keep_checkpoints, or write the run to a larger disk (train.output_dir)",
                        d.describe(str(self.out)), fmt_bytes(free), d.fails_at, self.cfg.train.keep_checkpoints)

    def _check_optimizer_shapes(self, osd: dict) -> None:
        """Each saved moment has its parameter's shape (a ValueError naming it, else the optimizer would
        take it and fail, or broadcast, at the next step)."""
        params = self.weights.trainable_parameters()
        names = {id(p): n for n, p in self.weights.named_trainable().items()}
        for i, st in osd["state"].items():
            if i >= len(params):
                raise ValueError(f"optimizer state for parameter {i}, but this model trains {len(params)}")
            p = params[i]
            for k, v in st.items():
                if k != "step" and tuple(v.shape) != tuple(p.shape):  # step: AdamW's scalar count
                    raise ValueError(f"optimizer state {k} of {names.get(id(p), f'parameter {i}')} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")

    def _optimizer_state_for_here(self, osd: dict) -> dict:
        """Full optimizer-state tensors of sharded parameters -> this rank's shard (as DTensors)."""

        if not self.sharded:
            return osd
        params = self.weights.trainable_parameters()
        for i, st in osd["state"].items():
            p = params[int(i)]
            if fsdp.is_dtensor(p):
                for k, v in st.items():
                    if torch.is_tensor(v) and not fsdp.is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                        st[k] = fsdp.as_dtensor(fsdp.full_to_local(v, p).clone(), p)
        return osd

    ANNOUNCE_BYTES = 1e9  # a checkpoint this large is announced before it is written or read (it takes a while)

    def _require_own_folder(self) -> None:
        """Rank 0, before the writes of a step: the output folder is still the one whose lock it holds. A
        folder removed, moved or replaced while the run went on (a paused job, a long step) is not written
        again: a new run may hold that path now (both wrote it, each ending 'done')."""
        if self._lock is not None and not self._lock.still_ours():
            raise OutputDirError(f"train.output_dir {self.out} was removed, moved or replaced while this run went on "
                                 f"({self._lock.path} is not the lock it holds): stopped at step {self.step}, nothing "
                                 "more written there (another run may use that path now); its earlier checkpoints "
                                 "went with the folder")

    def save(self) -> Path:
        """A DCP checkpoint (every rank takes part: call it on all of them), then the LoRA exports
        (rank 0)."""
        self._require_own_folder()
        t0 = time.perf_counter()
        about = self._run_files()[0] if self.rank == 0 else 0
        if about >= self.ANNOUNCE_BYTES:  # a long write: the progress bar stands still meanwhile
            log.info("step %d: writing its checkpoint (about %s)", self.step, fmt_bytes(about))
        path = save_checkpoint(self.out / "checkpoints", self.step, self.state_dict(), self.cfg.train.keep_checkpoints,
                               run_id=self.run_id)
        took = time.perf_counter() - t0
        if self.rank == 0:
            size = folder_bytes(path)  # None: moved or removed meanwhile; the checkpoint was written all the same
            size = "" if size is None else f"{fmt_bytes(size)}, "
            log.info("checkpoint %s written (%s%.1f s)", path, size, took)
        self.export_lora()
        self._saved_step = self.step
        self._plot_curves()
        return path

    FULL_EXPORTS = (("student", "transformer"), ("teacher", "transformer_ema"))

    def export_full(self) -> None:
        """Full fine-tuning, at the end of the run: the student and its EMA copy as diffusers transformer
        folders (``transformer/``, ``transformer_ema/``: config + safetensors in the model dtype, what
        ``from_pretrained`` and ``dopsd-sample --transformer`` load). Not at every checkpoint: each is the
        whole model (the checkpoints hold the training state). A sharded run (FSDP2) gathers each tensor
        in turn (a collective every rank takes part in) to rank 0, which writes."""
        if self.cfg.lora.enabled or (self.rank != 0 and not self.sharded):
            return
        from safetensors.torch import save_file

        from dopsd_fast.fsdp import is_dtensor

        dtype = self.adapter.dtype
        for which, name in self.FULL_EXPORTS:
            module = self.weights.student() if which == "student" else self.weights.teacher()  # two modules
            sd = {}
            for k, v in module.state_dict().items():  # the same order on every rank
                v = v.full_tensor() if is_dtensor(v) else v
                if self.rank == 0:
                    sd[k] = v.detach().to("cpu", dtype).contiguous()
            if self.rank != 0:
                continue

            def write(d, module=module, sd=sd):
                module.save_config(str(d))
                # FSDP2 swaps the module's class for an FSDP<Class> subclass, whose name save_config writes:
                # the model's own class, which diffusers' loaders (AutoModel) look up by that name
                own = next((c for c in type(module).__mro__ if c.__module__.startswith("diffusers.")), None)
                conf = d / "config.json"
                if own is not None and conf.is_file():
                    data = json.loads(conf.read_text())
                    if data.get("_class_name") != own.__name__:
                        data["_class_name"] = own.__name__
                        conf.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
                save_file(sd, str(d / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
                self._mark_export(d)

            atomic_dir(self.out / name, write)
        if self.rank == 0:
            log.info("full fine-tuning: the student in %s/, its EMA copy in %s/ (dopsd-sample --transformer DIR)",
                     self.out / "transformer", self.out / "transformer_ema")

    EXPORT_MARK = "export.json"  # in each export folder: the step (and run) whose weights it holds

    def _mark_export(self, d: Path, more: dict | None = None) -> None:
        """``export.json``: the step and run whose weights the folder holds, the model they are for, and
        ``more`` (a LoRA's adapter, rank and strength)."""
        model = {k: v for k, v in (("family", self.cfg.model.family), ("path", self.cfg.model.path),
                                   ("preset", self.cfg.model.preset)) if v}
        (Path(d) / self.EXPORT_MARK).write_text(json.dumps({"step": self.step, "run_id": self.run_id, "model": model,
                                                            **(more or {})}, indent=1) + "\n")

    def _stale_final_exports(self) -> list[str]:
        """The run's final exports (``lora/`` and ``lora_ema/``, or ``transformer/`` and
        ``transformer_ema/``) that are missing or hold an earlier step than the loaded checkpoint: a
        stop during the last step (full fine-tuning exports at the end), or an export that failed
        after its checkpoint was written (a full disk). One without a step (an earlier version's) is
        left as it is, and so is one of a later step (an older checkpoint resumed)."""
        names = ["lora", "lora_ema"] if self.cfg.lora.enabled else [name for _, name in self.FULL_EXPORTS]
        stale = []
        for name in names:
            d = self.out / name
            if not d.is_dir():
                stale.append(f"{name}/ (missing)")
                continue
            try:
                step = int(json.loads((d / self.EXPORT_MARK).read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
                continue
            if step < self.step:
                stale.append(f"{name}/ (of step {step})")
        return stale

    def export_lora(self) -> None:
        if not self.cfg.lora.enabled:
            return

        meta = self.weights.lora_metadata()
        sds = {which: self.weights.lora_state_dict(which) for which in ("student", "teacher")}  # every rank (gathers)
        if self.rank != 0:
            return
        # alpha / r folded into lora_B, the metadata's alpha = r: the file's delta is B A at scale 1, so a loader
        # that drops the metadata (a state dict handed to load_lora_weights, load_lora_adapter with a prefix)
        # takes diffusers' default alpha = r and still applies the trained strength (it applied half of it)
        scale = meta["lora_alpha"] / meta["r"]
        meta = {**meta, "lora_alpha": meta["r"]}
        for which, name in (("student", "lora"), ("teacher", "lora_ema")):
            sd = {k: (v * scale if ".lora_B." in k else v) for k, v in sds[which].items()}
            def write(d, sd=sd, which=which):
                self.adapter.export_lora(sd, str(d), meta)
                write_comfyui_lora(d, meta["r"])  # the same LoRA at the trained strength in ComfyUI
                self._mark_export(d, {"adapter": "the student" if which == "student" else "the EMA teacher",
                                      "rank": meta["r"], "trained_alpha": self.cfg.lora.alpha,
                                      "alpha_in_lora_B": True})

            try:
                atomic_dir(self.out / name, write)
            except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
                text = f"{type(e).__name__}: {e}"
                if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
                        m in text for m in ("No space left", "StorageFull", "os error 28")):
                    raise OSError(errno.ENOSPC, f"writing the LoRA export {name}/ at step {self.step} failed (No space "
                                  f"left on the device): {name}/ still holds the previous export; free space, then "
                                  "resume with --resume latest (the next checkpoint writes it; at the run's end, the "
                                  "resume writes it from the checkpoint)", str(self.out / name)) from None
                raise

    # ---- loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """The loop. Ctrl-C and SIGTERM finish the step in progress, write its checkpoint, then raise
        (:class:`~dopsd_fast.safety.Interrupted`, :class:`~dopsd_fast.safety.Terminated`); a second
        Ctrl-C stops at once, writing nothing (:class:`~dopsd_fast.safety.Aborted`). Releases the output
        folder's lock at its end."""

        self._signals = StopSignals()
        nothing = False
        try:
            self._require_own_folder()  # the folder moved or removed since the trainer was built
            if self._saved_step is not None and self.step >= self.cfg.train.max_steps:
                nothing = True
                stale = self._stale_final_exports() if self.rank == 0 else []
                try:
                    if self.dist.min_max(float(bool(stale)), "the final exports")[1] > 0:  # every rank exports (gathers)
                        if self.rank == 0:
                            log.warning("the checkpoint is at step %d, train.max_steps=%d: nothing to train; the run's "
                                        "final export %s: writing it from the checkpoint", self.step,
                                        self.cfg.train.max_steps, ", ".join(stale))
                        self.export_lora()
                        self.export_full()
                        return {}
                except DistributedError:
                    raise
                except Exception as e:  # a collective of the gather: the same one line as the step's
                    if self.dist.active and is_collective_failure(e):
                        raise self.dist.failure("a collective of the final exports", e) from None
                    raise
                log.warning("the checkpoint is at step %d, train.max_steps=%d: nothing to train, nothing written "
                            "(set train.max_steps above %d to continue)", self.step, self.cfg.train.max_steps,
                            self.step)
                return {}
            if self.rank == 0:
                self.cfg.save(self.out / "config.yaml")
                self._list_skipped_rows()
            try:
                return self._train()
            except DistributedError:
                raise
            except Exception as e:  # FSDP2's collectives, the checkpoint's barriers and DCP: the same one line
                if self.dist.active and is_collective_failure(e):
                    raise self.dist.failure("a collective of FSDP2, the checkpoint or the step", e) from None
                raise
        finally:
            if not nothing and not isinstance(sys.exc_info()[1], KeyboardInterrupt):  # the end, or a failure (its
                self._plot_curves()  # curves show why); a stop drew them with its checkpoint, a second Ctrl-C writes nothing
            self._signals.restore()
            if getattr(self, "logger", None) is not None:  # a stop or a failure too: TensorBoard's writer thread
                try:  # (and a wandb run) would outlive the trainer in a process that goes on
                    self.logger.close(_exit_code(sys.exc_info()[1]))
                except Exception as e:  # never in place of the run's own error, nor before the lock's release
                    log.warning("closing the metrics loggers failed: %s: %s", type(e).__name__, e)
            self.close()

    def _say_small_groups(self) -> None:
        """A bucket (a batch group) with fewer rows than the global batch: each of its batches repeats its
        rows to fill up (the sampler's padding); said once, with the smallest, at start-up."""
        counts = collections.Counter(tuple(g) for g in self.sampler.buckets_of)
        n = self.sampler.global_batch
        small = {g: c for g, c in counts.items() if c < n}
        if small and not self.cfg.data.builtin:
            g, c = min(small.items(), key=lambda x: x[1])
            log.warning("%d of the data's %d batch groups (bucket, and references) hold fewer rows than the global "
                        "batch of %d (data.batch_size %d x %d ranks): their batches repeat rows to fill up (the "
                        "smallest: %s, %d rows)", len(small), len(counts), n, self.cfg.data.batch_size, self.world,
                        _group_name(g), c)

    def _list_skipped_rows(self) -> None:
        """data.skip_bad: the log names the first skipped row, ``skipped_rows.txt`` every one with why (written
        with config.yaml, when the run starts; a resume that skips none removes an earlier list). A file that
        cannot be written is said, and the run goes on."""
        listed = self.out / "skipped_rows.txt"
        try:
            if self.dataset.skipped:
                atomic_write(listed, lambda t: t.write_text("".join(e.replace("\n", " ") + "\n"
                                                                    for e in self.dataset.skipped)))
                log.info("the %d skipped rows are listed, each with why, in %s", len(self.dataset.skipped), listed)
            elif listed.is_file() and not listed.is_symlink():
                listed.unlink()
        except OSError as e:
            log.warning("the skipped rows could not be listed in %s (%s); the log names the first", listed, e)

    def _stop_requested(self) -> str | None:
        """The signal every rank stops for, at the same step (distributed: the flags ride on the step's
        metrics all-reduce; see :meth:`train_step`)."""
        return self._stop_kind if self.dist.active else self._signals.received

    def _train(self) -> dict:
        tcfg, vcfg = self.cfg.train, self.cfg.validation
        if self.step == 0 and vcfg.at_start:
            self.validate()
        bar = tqdm(total=tcfg.max_steps, initial=self.step, desc="D-OPSD", disable=not tcfg.progress or self.rank != 0)
        above = contextlib.ExitStack()
        above.enter_context(_log_above(bar))
        last = {}
        stop = None
        try:
            while self.step < tcfg.max_steps:
                # a signal before the step starts (single process): nothing of the next step is begun
                if not self.dist.active and self._signals.received:
                    stop = self._signals.received
                    break
                last = self.train_step()  # a signal during it is only recorded: the step completes
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4g}", gnorm=f"{last['grad_norm']:.3g}")
                self._require_own_folder()  # before anything of the step is written
                if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                    self.logger.log(self.step, last)
                if vcfg.every and self.step % vcfg.every == 0:
                    self.validate()
                if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0:
                    self.save()
                stop = self._stop_requested()
                if stop:
                    break
            if stop:
                self.prefetch.close()
                what = "SIGTERM" if stop == "SIGTERM" else "Ctrl-C"
                if stop == "SIGTERM" and launcher_died():
                    what = "SIGTERM (torchrun's agent, the launcher, died)"
                if self.step == 0:
                    kept = (sorted(p.name for p in self.out.iterdir() if not p.name.startswith("."))
                            if self.rank == 0 and self.out.is_dir() else [])
                    log.warning("%s before the first step: stopped, no checkpoint to write%s", what,
                                f"; {self.out} keeps {', '.join(kept)}: run again with --resume latest (it starts "
                                "at step 0) or --overwrite" if kept else "")
                else:
                    if self._saved_step != self.step:
                        self.save()
                    self._plot_curves()
                    log.warning("%s at step %d: stopped after writing its checkpoint (resume with --resume latest)",
                                what, self.step)
                raise (Terminated if stop == "SIGTERM" else Interrupted)(f"{stop} at step {self.step}")
        except (Terminated, Interrupted):
            raise
        except KeyboardInterrupt:  # a second Ctrl-C (Aborted), or one delivered around the handler
            log.warning("stopped at once after step %d, nothing more written (the last complete checkpoint stands; "
                        "resume with --resume latest)", self.step)
            raise
        finally:
            try:
                bar.close()
                self.prefetch.close()
                self.guard.summary()
            finally:
                above.close()  # the caller's log handlers back, whatever happened above
        try:
            if not tcfg.checkpoint_every or self.step % tcfg.checkpoint_every != 0:
                self.save()
            if vcfg.every and self.step % vcfg.every != 0:
                self.validate()
            self.export_full()
        except KeyboardInterrupt:  # a second Ctrl-C (Aborted) in the last checkpoint, validation or export
            log.warning("stopped at once at the end (step %d), nothing more written: the last complete checkpoint "
                        "stands; --resume latest continues from it and writes what is missing", self.step)
            raise
        self.logger.close()
        return last
