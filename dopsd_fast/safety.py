"""Nothing lost, nothing silently wrong: the run's output lock and folder, atomic writes, the divergence
guard, SIGTERM and Ctrl-C, and the config check on resume."""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import socket
import statistics
from pathlib import Path

import torch

from dopsd_fast.errors import OutputDirError

log = logging.getLogger("dopsd_fast")


# ---- one trainer per output directory --------------------------------------------------------------
_HELD: set = set()  # (device, inode) of the lock files this process holds


class OutputLock:
    """An exclusive ``flock`` on ``<out>/.lock``, held for the trainer's life. The kernel drops it when
    the holder dies (kill -9 included), so a lock left by a killed run is simply taken over; a live
    holder is named. The file is opened with ``O_NOFOLLOW`` and must be a regular file: a planted
    ``.lock`` link never makes the trainer write the link's target."""

    def __init__(self, out: Path, what: str = "train.output_dir"):
        import errno
        import fcntl
        import stat

        self.fd = None
        self.path = Path(out) / ".lock"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputDirError(f"{what} {out}: {self.path} is a symbolic link, not a lock file; "
                                     "remove it (nothing was written through it)") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputDirError(f"{what} {out}: {self.path} is not a regular file; remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            st = os.fstat(fd)
            os.close(fd)
            mine = (st.st_dev, st.st_ino) in _HELD  # this process's own lock (not one of its pid in a container)
            raise OutputDirError(f"{what} {out} is in use by {holder}"
                                 + (" (an earlier trainer of this process: call its close())" if mine else "")
                                 + f"; wait for it, or use another {what.split('.')[-1]}") from None
        self.fd = fd
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)
        _HELD.add(self._key)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)

    def still_ours(self) -> bool:
        """Whether ``<out>/.lock`` is still the file this lock holds: False once the folder was removed,
        moved or replaced while the holder ran (a pause, a long step), when a new run may hold the path."""
        if self.fd is None:
            return False
        try:
            here, held = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
            _HELD.discard(self._key)

    def __del__(self):
        self.release()


# What a run writes into its output folder: a folder holding any of them holds an earlier run.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.yaml", "lora", "lora_ema", "transformer", "transformer_ema",
               "samples", "tensorboard", "curves.png", "skipped_rows.txt")
RUN_FOLDERS = tuple(n for n in RUN_OUTPUTS if n not in ("metrics.jsonl", "config.yaml", "curves.png", "skipped_rows.txt"))


def run_outputs(out: Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` present in ``out`` (an empty ``checkpoints/`` does not count)."""
    out = Path(out)
    found = []
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_symlink() or p.exists():
            if name == "checkpoints" and p.is_dir() and not any(p.iterdir()):
                continue
            found.append(name)
    return found


def move_aside(out: Path) -> Path:
    """Rename ``out`` to the first free ``<out>.old-N`` next to it (nothing deleted) and return that."""
    out = Path(out).absolute()
    if out.name in ("", ".", ".."):  # "a/..": the folder it names
        out = out.resolve()
    n = 1
    while True:
        aside = out.with_name(f"{out.name}.old-{n}")
        if not (aside.exists() or aside.is_symlink()):
            break
        n += 1
    try:
        os.rename(out, aside)
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.EXDEV):  # a mount point (or a bind mount) cannot be renamed
            raise OSError(e.errno, f"{out} is a mount point (or on a mount of its own): --overwrite cannot move it "
                                   "aside; choose a folder inside it as train.output_dir", str(out)) from None
        raise
    _fsync_dir(out.parent)
    return aside


# ---- atomic writes -------------------------------------------------------------------------------
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux: /proc), else by
    setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _readable(path: Path) -> None:
    """A written file gets the mode a plain ``open(..., "w")`` gives (0666 less the umask: 0644 with
    the usual 022): writers that go through a private temporary file (safetensors' save_file) leave
    0600, and an exported LoRA is meant to be read by other users and tools."""
    os.chmod(path, 0o666 & ~_umask())


def os_error_of(e: BaseException, path) -> OSError | None:
    """A writer's error that is an OS error under another type (safetensors' ``SafetensorError: ... I/O
    error: No space left on device (os error 28)``), as an ``OSError`` naming ``path``; None for any other."""
    import re

    if isinstance(e, OSError):
        return None
    m = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) if m else None


def _tmp_tag() -> str:
    """Digits naming one write's temporary file or folder: the pid and 8 random digits (two processes of one
    pid, in two containers on a shared disk, wrote one temporary file: one said 'wrote' of the other's bytes)."""
    import secrets

    return f"{os.getpid()}{secrets.randbelow(10 ** 8):08d}"


def atomic_write(path: Path, write) -> Path:
    """``write(tmp_path)`` then fsync and rename over ``path``: a reader sees the old file or the new
    one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{_tmp_tag()}{path.suffix}")  # the suffix kept: writers infer formats
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _readable(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a writer's error without a file (PIL's on a full disk): the file named
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' full disk or file-size limit: an OSError naming the file
        oserr = os_error_of(e, path)
        if oserr is None:
            raise
        raise oserr from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def why_not_written(e: OSError) -> str:
    """An OS error of a write, in plain words (no errno number, no file name)."""
    words = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EROFS: "a read-only file system", errno.ENOSPC: "the disk is full",
             errno.EDQUOT: "the disk quota is used up", errno.ENOENT: "the folder takes no new files",
             errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EFBIG: "over the file-size limit"}
    said = words.get(e.errno) or e.strerror or str(e) or type(e).__name__
    return said[:1].lower() + said[1:]  # within a sentence; a path in it kept as it is


def file_write_problem(path) -> str | None:
    """Why a file could not be written at ``path`` (its folder part, created as ``atomic_write`` does):
    a part of it is a file, or the nearest existing folder takes no new file (tried with a hidden
    temporary file, removed at once); None when it can. No folder is created."""
    import tempfile

    path = Path(path)
    folder = path.parent
    while not folder.is_dir():  # the nearest existing folder: where the first new folder (or the file) is made
        if folder.exists() or folder.is_symlink():
            return f"{folder} is a file, not a folder" if folder.is_file() else f"{folder} is not a folder"
        if folder.parent == folder:
            break
        folder = folder.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".dopsd-write-check-")
    except OSError as e:
        return f"cannot write in {folder} ({why_not_written(e)})"
    os.close(fd)
    os.unlink(tmp)
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or the filesystem cannot."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_dir(path: Path, write) -> Path:
    """``write(tmp_dir)`` fills a fresh folder, which then replaces ``path`` in one step (the two
    folders swapped by ``renameat2``): at every moment ``path`` is the old folder or the new one, both
    complete. Where the swap is not available, the old folder is moved aside first and removed after;
    a crash between those two renames leaves ``.<name>.old-*``, which :func:`recover_dirs` puts back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = _tmp_tag()
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    old = path.with_name(f".{path.name}.old-{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            write(tmp)
        except Exception as e:  # noqa: BLE001 - safetensors' full disk or file-size limit: an OSError naming the folder
            oserr = os_error_of(e, path)
            if oserr is None:
                raise
            raise oserr from None
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                _readable(f)
        _fsync_dir(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # tmp now holds the old folder (removed below)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def recover_dirs(out: Path, names) -> None:
    """Start-up repair of folders written by :func:`atomic_dir` in ``out``: a folder missing with its
    previous version left aside (``.<name>.old-*``, a crash between two renames) is put back, and the
    leftover ``.<name>.tmp-*`` / ``.<name>.old-*`` folders are removed, each named in the log."""
    out = Path(out)
    for name in names:
        path = out / name
        olds = sorted(out.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if not (path.exists() or path.is_symlink()) and olds:
            back = olds.pop()
            os.replace(back, path)
            log.warning("%s was missing (a write interrupted between two renames): restored the previous one "
                        "from %s", path, back.name)
        for stale in olds + sorted(out.glob(f".{name}.tmp-*")):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            log.info("removed %s, left over by an interrupted write of %s", stale, path)
    _fsync_dir(out)


def remove_stale_temp_files(out: Path, subfolders=("",)) -> None:
    """Start-up repair on resume: the temporary files of :func:`atomic_write` (``.<stem>.tmp-<pid><suffix>``)
    that a process killed between the write and the rename left in ``out`` (and its ``subfolders``); one
    trainer per folder (its lock is held), so none of them is being written."""
    import re

    pattern = re.compile(r"^\..+\.tmp-\d+(\.[A-Za-z0-9]+)?$")
    for sub in subfolders:
        folder = Path(out) / sub
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if pattern.match(f.name) and f.is_file() and not f.is_symlink():
                f.unlink(missing_ok=True)
                log.info("removed %s, left over by an interrupted write", f)


# ---- files named by received data ----------------------------------------------------------------
# The floating-point dtypes of a received safetensors file (safetensors' header names), all a weight or
# feature file of ours holds: integer, bool and fp8 tensors are another format, which torch and diffusers
# would cast to the model's dtype without a word.
SAFETENSORS_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


def file_in_folder(folder: Path, name) -> Path:
    """``folder / name`` where ``name`` (read from a received manifest or metadata) is a bare file name
    and the file, symlinks followed, is a regular file inside ``folder``; else ``ValueError`` saying why
    (``FileNotFoundError`` for a proper name with no file). A received checkpoint, cache or LoRA folder
    is untrusted: nothing it names may lead outside it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a file name in {folder} (a path leading elsewhere is refused)")
    path = Path(folder) / name
    real, home = path.resolve(), Path(folder).resolve()
    if real.parent != home:
        raise ValueError(f"{path} leads outside {folder} (to {real}); refused")
    if not real.exists():
        raise FileNotFoundError(f"{path} is missing")
    if not real.is_file():
        raise ValueError(f"{path} is not a regular file")
    return path


# ---- SIGTERM and Ctrl-C --------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM: the step in progress finished, a checkpoint written, then exit."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT): the step in progress finished, a checkpoint written, then exit."""


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C: stopped at once, nothing written (the last checkpoint stands)."""


class StopSignals:
    """Installs SIGTERM and SIGINT handlers that only record the signal: the loop finishes the step in
    progress (never a half-applied one), writes a checkpoint of it and raises :class:`Terminated` or
    :class:`Interrupted`. A second SIGINT raises :class:`Aborted` at once (nothing more written).
    Under torchrun the workers run in sessions of their own: a Ctrl-C reaches the elastic agent, which
    sends each worker one SIGINT. ``restore()`` puts the previous handlers back."""

    def __init__(self):
        self.sigterm = False
        self.sigint = False
        self.prev = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.prev[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default
                pass

    @property
    def received(self) -> str | None:
        """``"SIGTERM"`` if one was received, else ``"SIGINT"`` if one was, else None."""
        return "SIGTERM" if self.sigterm else "SIGINT" if self.sigint else None

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM:
            self.sigterm = True
        elif not self.sigint:
            self.sigint = True
            log.warning("Ctrl-C: finishing the step in progress, then writing a checkpoint (Ctrl-C again to stop at "
                        "once without writing)")
        else:
            raise Aborted("a second Ctrl-C")

    def restore(self):
        for sig, prev in self.prev.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self.prev = {}


# ---- the guard -------------------------------------------------------------------------------------
class DivergenceError(FloatingPointError):
    pass


UPDATE_OVER_WEIGHTS = "update larger than the weights"  # the Guard's count of such steps (said once per window)


class Guard:
    """Checks a step before anything of it is written: a non-finite loss, gradient norm or updated
    weight, or an update ``max_update_ratio`` times the weights' norm, stops the run (nothing of the
    step saved; the last checkpoint is the last good state). A gradient norm or update-to-weight ratio
    above ``warn_factor`` x its running median (or an update larger than the weights), warns: the first
    such spike in full; later ones of the same quantity within ``quiet_steps`` of the last printed one
    are counted, and the count (with the largest) comes with the next printed one or at the end of the
    run (:meth:`summary`). Isolated spikes are common with small batches; a run that keeps spiking still
    says so every ``quiet_steps`` steps."""

    def __init__(self, max_update_ratio: float, warn_factor: float, window: int = 50, quiet_steps: int = 500,
                 verbose: bool = True):
        self.max_update_ratio, self.warn_factor, self.window = max_update_ratio, warn_factor, window
        # the warnings on one rank only (torchrun: every rank sees the same averaged gradient); the
        # refusals (DivergenceError) on every rank
        self._say = log.warning if verbose else log.debug
        self.quiet_steps = quiet_steps
        self.gnorms: list[float] = []
        self.ratios: list[float] = []
        self._spikes: dict[str, dict] = {}  # per quantity: the last printed step, the count since, the largest

    def check_before_update(self, step: int, loss: float, gnorm: float) -> None:
        for name, v in (("loss", loss), ("gradient norm", gnorm)):
            if not math.isfinite(v):
                raise DivergenceError(f"step {step}: the {name} is {v}; stopping before the update (nothing of this "
                                      "step written; the last checkpoint is the last good state: --resume latest "
                                      "goes on from it, with a lower optim.lr if it diverged)")

    @staticmethod
    def snapshot(params) -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    @staticmethod
    def adamw_update(optimizer, local=lambda t: t):
        """``(|update|, |weights before|)`` of the step a ``torch.optim.AdamW`` just made, as 0-dim tensors,
        from its state and the new weights (no copy of the weights: full fine-tuning's guard). Per tensor,
        AdamW made ``w' = w (1 - lr wd) - a`` with ``a = lr / bc1 * m / (sqrt(v / bc2) + eps)``, so the
        update is ``-(lr wd w' + a) / (1 - lr wd)`` and ``w = (w' + a) / (1 - lr wd)``. None where the
        optimizer is not a plain AdamW (amsgrad, maximize) or has taken no step. ``local``: a tensor's
        local shard (FSDP2)."""
        ups, olds, t = [], [], None
        for g in optimizer.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                return None
            lr, wd, eps = float(g["lr"]), float(g["weight_decay"]), float(g["eps"])
            b1, b2 = g["betas"]
            shrink = 1 - lr * wd
            for p in g["params"]:
                st = optimizer.state.get(p)
                if not st or "exp_avg" not in st or p.grad is None:  # no gradient this step: AdamW left it
                    continue
                if t is None:  # every tensor takes every step: one count (one read)
                    t = float(st["step"])
                a = local(st["exp_avg"]).float() / (local(st["exp_avg_sq"]).float().sqrt() / math.sqrt(1 - b2 ** t)
                                                  + eps) * (lr / (1 - b1 ** t))
                w = local(p.detach()).float()  # (the weights themselves where fp32: read, never written)
                ups.append(torch.linalg.vector_norm(torch.add(a, w, alpha=lr * wd)) / shrink)
                olds.append(torch.linalg.vector_norm(a.add_(w)) / shrink)
        if not ups:
            return None
        return torch.stack(ups).norm(), torch.stack(olds).norm()

    @staticmethod
    def _norm(ts) -> float:
        """Global norm: fused fp32 per-tensor norms (a few launches, one sync); where fp32 overflows
        (|w| ~ 1e19 squared), fp64 one tensor at a time."""
        if not ts:
            return 0.0
        n = float(torch.stack(torch._foreach_norm(ts)).norm())
        if math.isfinite(n):
            return n
        return float(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in ts]).norm())

    def check_after_update(self, step: int, params, before, gnorm: float, update=None) -> float:
        """``before``: the weights before the step (a snapshot), or ``update``: ``(|update|, |weights
        before|)`` as :meth:`adamw_update` gives them; neither: no update ratio."""
        ps = [p.detach() for p in params]
        # the weights', the update's and the old weights' norms in one device->host read (fused fp32
        # norms; fp64 one tensor at a time only where fp32 overflows)
        norms = [torch.stack(torch._foreach_norm(ps)).norm()] if ps else [torch.zeros(())]
        if update is not None and ps:
            norms += [update[0].to(norms[0].device), update[1].to(norms[0].device)]
        elif before is not None and ps:
            norms += [torch.stack(torch._foreach_norm(torch._foreach_sub(ps, before))).norm(),
                      torch.stack(torch._foreach_norm(before)).norm()]
        vals = torch.stack([n.float() for n in norms]).tolist()
        if not all(math.isfinite(v) for v in vals) and update is None:
            vals = [self._norm(ps)] + ([self._norm(torch._foreach_sub(ps, before)), self._norm(before)]
                                       if len(vals) == 3 else [])
        if not math.isfinite(vals[0]):  # inf or nan even in fp64: a non-finite weight
            bad = next(i for i, p in enumerate(ps) if not bool(torch.isfinite(p).all()))
            raise DivergenceError(f"step {step}: updated weights are not finite (tensor #{bad}); stopping before "
                                  "anything is written (the last checkpoint is the last good state)")
        ratio = vals[1] / max(vals[2], 1e-12) if len(vals) == 3 else float("nan")
        if ratio > self.max_update_ratio:
            raise DivergenceError(f"step {step}: the update is {ratio:.3g} x the weights' norm (train.max_update_ratio="
                                  f"{self.max_update_ratio:g}); diverged, stopping before anything is written (the "
                                  "last checkpoint is the last good state; lower optim.lr)")
        self._warn(step, "gradient norm", gnorm, self.gnorms)
        if math.isfinite(ratio):
            if ratio > 1.0:
                said = self._spikes.get(UPDATE_OVER_WEIGHTS)
                if said is None or step - said["printed"] >= self.quiet_steps:  # once per quiet_steps, not every step
                    self._say("step %d: the update is %.3g x the weights' norm (larger than the weights): the run is "
                              "likely diverging; lower optim.lr%s", step, ratio,
                              f" ({said['n']} more such steps since step {said['printed']})" if said and said["n"] else "")
                    self._spikes[UPDATE_OVER_WEIGHTS] = {"printed": step, "n": 0, "largest": (ratio, step)}
                else:
                    said["n"] += 1
                    said["largest"] = max(said["largest"], (ratio, step))
            self._warn(step, "update-to-weight ratio", ratio, self.ratios)
        return ratio

    def _warn(self, step, name, v, hist):
        if len(hist) >= 5:
            med = statistics.median(hist)
            if med > 0 and v > self.warn_factor * med:
                self._spike(step, name, v, med)
        hist.append(v)
        del hist[:-self.window]

    def _spike(self, step, name, v, med):
        s = self._spikes.get(name)
        if s is not None and step - s["printed"] < self.quiet_steps:
            s["n"] += 1
            s["largest"] = max(s["largest"], (v / med, step))
            return
        more = f"; {self._counted(s)}" if s is not None and s["n"] else ""
        self._say("step %d: %s %.3g is %.0f x its running median %.3g: a spike (harmless while the loss's moving "
                    "mean in curves.png holds or falls, e.g. a few rows far from the rest; if it rises with them, "
                    "divergence: lower optim.lr)%s; further spikes within %d steps are counted, not printed",
                    step, name, v, v / med, med, more, self.quiet_steps)
        self._spikes[name] = {"printed": step, "n": 0, "largest": (0.0, step)}

    @staticmethod
    def _counted(s) -> str:
        return (f"{s['n']} more since step {s['printed']} (the largest {s['largest'][0]:.0f} x at step "
                f"{s['largest'][1]})")

    def summary(self) -> None:
        """At the end of a run: the spikes counted since the last printed one, per quantity, in one line."""
        for name, s in self._spikes.items():
            if s["n"] and name == UPDATE_OVER_WEIGHTS:
                self._say("steps whose update was larger than the weights: %s; lower optim.lr", self._counted(s))
            elif s["n"]:
                self._say("%s spikes over %g x the running median: %s", name, self.warn_factor, self._counted(s))
            s["n"], s["largest"] = 0, (0.0, s["printed"])


# ---- the config on resume ----------------------------------------------------------------------------
# Fields that change the math of the run: a resume with another value is refused (unless overridden).
FROZEN = ("method", "model.", "lora.", "data.builtin", "data.jsonl", "data.folder", "data.image_key",
          "data.prompt_keys", "data.buckets", "data.bucket_scale", "data.bucket_multiple", "dopsd.rollout",
          "dopsd.loss", "dopsd.ema_decay", "sft.", "train.seed", "train.grad_accum")
# Fields under a frozen prefix that do not change the math (the same gradients, other memory or time; lora.init:
# the checkpoint's weights replace the initial ones).
NOT_FROZEN = ("model.gradient_checkpointing", "model.device", "lora.init")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


# Fields a method does not read: a change of them on resume changes nothing of its math.
UNREAD_BY = {"sft": ("dopsd.rollout", "dopsd.loss"), "dopsd": ("sft.",)}


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> tuple[list, list]:
    """``(frozen, applied)``: ``[(field, saved value, current value)]`` that differ. ``defaults``: the
    config's defaults; a field the saved config lacks (a checkpoint of a version before the field) and
    the current config has at its default is no change (a new field's default keeps the old behaviour)."""
    a, b = _flat(saved), _flat(current)
    d = _flat(defaults) if defaults is not None else {}
    unread = UNREAD_BY.get(b.get("method"), ()) if a.get("method") == b.get("method") else ()
    frozen, applied = [], []
    for k in sorted(set(a) | set(b)):
        if k not in a and k in d and b.get(k) == d[k]:
            continue
        if a.get(k) != b.get(k):
            is_frozen = (k.startswith(FROZEN) or k in FROZEN) and k not in NOT_FROZEN and not k.startswith(unread)
            (frozen if is_frozen else applied).append((k, a.get(k), b.get(k)))
    return frozen, applied
