"""Metrics to a JSONL file, TensorBoard and (optionally) wandb; rank 0 only."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from dopsd_fast.safety import atomic_write

log = logging.getLogger("dopsd_fast")


class _RankStartup(logging.Filter):
    """Under torchrun, a rank other than 0 keeps its start-up warnings off the screen: the start-up
    checks that its config and data are rank 0's (any difference stops the run with an error), so rank
    0's lines speak for every rank (at 64 ranks each warning was printed 64 times). Errors always pass;
    from the first step (``quiet`` False) each rank's warnings are its own and shown."""

    quiet = False

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not self.quiet


RANK_STARTUP = _RankStartup()  # the CLI puts it on a rank's console handlers; the trainer lifts it when built


def parse_row(line: str):
    """``(row, step)`` of one ``metrics.jsonl`` line, or None for a line that is not a row (torn by a crash,
    not a JSON object, a step that is no number)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # not JSON; a number past json's digit limit; nested too deeply
        return None
    at = row.get("step", 0) if isinstance(row, dict) else None
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        return row, at
    return None


def metrics_rows(path: Path):
    """``(line, step)`` for each row of a ``metrics.jsonl``; a line that is not a row is skipped."""
    for line in Path(path).read_text(errors="replace").splitlines():
        parsed = parse_row(line)
        if parsed is not None:
            yield line, parsed[1]


def require_wandb():
    """The wandb module, or a RuntimeError (one line) saying how to get it or turn it off."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("train.wandb=true: the 'wandb' package is not installed (pip install wandb), or set "
                           "train.wandb=false") from None
    return wandb


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb: bool = False, config: dict | None = None,
                 enabled: bool = True):
        self.enabled = enabled
        self.run_id: str | None = None  # the training run's id (the trainer sets it): the wandb run's
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.wandb = self._tb_writer = self._wandb_run = None
        self._purge = None  # on resume: TensorBoard's events past the checkpoint's step dropped (truncate_after)
        self._dropped = False  # whether that resume dropped rows past its checkpoint's step
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: logging to metrics.jsonl only")
            else:  # the folder is made at the first row: a run refused before its first step leaves none
                self._tb_writer = lambda: SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=self._purge)
        if wandb:
            self._wandb = require_wandb()
            # started at the first row, like the tensorboard folder: a run refused at load opens no wandb run
            self._wandb_run = lambda: self._start_wandb(config)

    WANDB_RUN_FILE = "wandb_run_id"  # in the output folder: the wandb run the run's rows go to

    def _start_wandb(self, config):
        """The wandb run of this training run (``run_id``), in the project ``$WANDB_PROJECT`` (else
        dopsd-fast), grouped by ``run_id``. A resume continues the wandb run its rows went to; a resume
        that dropped rows past its checkpoint (a crash after it, or a run taken back to an earlier one)
        starts a new wandb run in the group, "(from step N)": wandb keeps a resumed run's rows up to its
        last step, so the dropped rows' steps could not be logged again there."""
        f = self.path.parent / self.WANDB_RUN_FILE
        try:
            last = f.read_text().strip()
        except (OSError, UnicodeDecodeError):
            last = ""
        run_id = self.run_id or uuid.uuid4().hex[:16]
        name = self.path.parent.absolute().name
        mine = last == run_id or last.startswith(run_id + "-")
        if self._dropped and self._purge > 1:  # dropped past a checkpoint (a step-0 restart: a run of its own)
            wid, name = f"{run_id}-{uuid.uuid4().hex[:6]}", f"{name} (from step {self._purge - 1})"
        else:
            wid = last if mine else run_id
        if os.environ.get("WANDB_RUN_ID"):
            log.warning("WANDB_RUN_ID is set and not used: the wandb run is the training run's (%s)", wid)
        run = self._wandb.init(project=os.environ.get("WANDB_PROJECT") or "dopsd-fast", name=name, id=wid,
                               group=run_id, resume="allow", config=config, dir=str(self.path.parent))
        atomic_write(f, lambda t: t.write_text(wid + "\n"))
        return run

    def truncate_after(self, step: int) -> None:
        """On resume: keep the lines of steps <= ``step`` (the checkpoint's) and drop a line torn by a
        crash (or any line that is not a metrics row), so the file reads as one run; TensorBoard's events
        of the later steps are dropped when its writer opens (``purge_step``)."""
        self._purge = step + 1
        if not self.enabled or not self.path.exists():
            return
        rows = list(metrics_rows(self.path))
        keep = [line for line, at in rows if at <= step]
        self._dropped = len(keep) < len(rows)

        atomic_write(self.path, lambda t: t.write_text("".join(x + "\n" for x in keep)))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = (json.dumps({"step": step, **metrics}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one write of the whole line, then fsync: a crash leaves whole lines
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.tb is None and self._tb_writer is not None:
            self.tb, self._tb_writer = self._tb_writer(), None
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is None and self._wandb_run is not None:
            self.wandb, self._wandb_run = self._wandb_run(), None
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self, exit_code: int = 0) -> None:
        """``exit_code``: the run's, as its process exits (0 done, 1 failed, 130 / 143 stopped by Ctrl-C /
        SIGTERM after a checkpoint): a wandb run not ended by 0 is marked failed, not finished."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None
