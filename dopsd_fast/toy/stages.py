"""The toy pipeline's machinery: a resumable, seeded training loop with a progress bar, atomic
checkpoints and safetensors outputs.

Every stage writes ``<out>/<stage>/state.pt`` (model + optimizer + step, atomically) every
``ckpt_every`` steps and on Ctrl-C / SIGTERM (after the running step; a second Ctrl-C stops at once),
and resumes from it; a stage whose output file exists
is skipped (``--force`` reruns it). The batch of step ``i`` derives from ``(seed, i)`` only, so a
resumed stage computes what an uninterrupted one computes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("dopsd_fast.toy")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is not what a model file should be
    os.replace(tmp, path)


def load_plain(path: Path):
    """A ``torch.save`` file of tensors and plain data, read with ``weights_only=True``: a state file
    from elsewhere runs no code; one holding anything else is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a refused global, or torn bytes
        from dopsd_fast.errors import load_error

        raise RuntimeError(f"{path} does not load as tensors and plain data ({load_error(e)}); delete it to redo its "
                           "stage") from None


class Interrupted(Exception):
    pass


class Loop:
    """``for step in loop:`` yields the steps still to run; ``loop.log(step, **scalars)`` records a
    row of ``<out>/<stage>/metrics.jsonl``; checkpoints and the interruption signal are handled."""

    def __init__(self, out: Path, stage: str, modules: dict, optimizer, steps: int, ckpt_every: int = 200,
                 scheduler=None, desc: str | None = None):
        self.dir = Path(out) / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.modules, self.opt, self.sched, self.steps = modules, optimizer, scheduler, steps
        self.ckpt_every, self.desc = ckpt_every, desc or stage
        self.state_path = self.dir / "state.pt"
        self.start = 0
        self.elapsed = 0.0  # seconds spent in this stage over all runs
        if self.state_path.is_file():
            st = load_plain(self.state_path)
            for k, m in modules.items():
                m.load_state_dict(st["modules"][k])
            optimizer.load_state_dict(st["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(st["scheduler"])
            self.start, self.elapsed = st["step"], st.get("elapsed", 0.0)
            log.info("%s: resumed at step %d / %d", stage, self.start, steps)
            self._cut_metrics()
        self._stop = False

    def _cut_metrics(self):
        p = self.dir / "metrics.jsonl"
        if p.is_file():
            rows = [r for r in p.read_text().splitlines() if r and json.loads(r)["step"] < self.start]
            atomic_write_text(p, "".join(r + "\n" for r in rows))

    def save(self, step: int) -> None:
        st = {"modules": {k: m.state_dict() for k, m in self.modules.items()}, "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict() if self.sched is not None else None, "step": step,
              "elapsed": self.elapsed + time.time() - self._t0}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".state.")
        os.close(fd)
        torch.save(st, tmp)
        os.replace(tmp, self.state_path)

    def log(self, step: int, **scalars) -> None:
        row = {"step": step, **{k: round(float(v), 6) for k, v in scalars.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._bar is not None:
            self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in scalars.items()})

    def __iter__(self):
        def handler(signum, frame):
            if self._stop and signum == signal.SIGINT:  # a second Ctrl-C: stop now, no checkpoint
                raise KeyboardInterrupt
            self._stop = True

        # Ctrl-C and SIGTERM finish the running step, then checkpoint and exit.
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        self._t0 = time.time()
        self._bar = tqdm(total=self.steps, initial=self.start, desc=self.desc, dynamic_ncols=True,
                         disable=os.environ.get("DOPSD_TOY_QUIET") == "1")
        step = self.start
        try:
            while step < self.steps:
                yield step
                step += 1
                self._bar.update(1)
                if step % self.ckpt_every == 0 and step < self.steps:
                    self.save(step)
                if self._stop:
                    raise Interrupted
        except Interrupted:
            self.save(step)
            raise SystemExit(f"{self.desc}: interrupted at step {step}; checkpoint written to {self.state_path}, "
                             f"run the same command again to resume") from None
        finally:
            self._bar.close()
            for sig, h in old.items():
                signal.signal(sig, h)
        self.elapsed += time.time() - self._t0

    def finish(self) -> float:
        """The stage's total seconds; removes the checkpoint (the output file now stands for it)."""
        self.state_path.unlink(missing_ok=True)
        return self.elapsed


def step_rng(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2 ** 63))
