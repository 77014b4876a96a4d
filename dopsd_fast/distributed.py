"""Data-parallel training on torchrun (``torch.distributed``): one process per GPU, the frozen base
replicated, the trainable tensors' gradients averaged once per optimizer step.

Why not ``DistributedDataParallel``: DDP's reducer assumes one forward and one backward per
iteration through the wrapped module's ``forward``. A D-OPSD micro-batch calls the model K times
(and the fast path reads the parameters without calling ``forward`` at all), and the stepwise
schedule runs K backwards per micro-batch. So the gradients of the trainable tensors (LoRA adapters:
small) are averaged here with one bucketed ``all_reduce`` per optimizer step, after the last
micro-batch: no reduction per micro-batch or per roll-out state, the same result DDP would give.

Everything else follows from the randomness of a step being keyed by (seed, step, micro-batch,
global sample index) and every rank applying the same averaged gradient: the weights, optimizer
state and EMA teacher stay identical on every rank (checked by :meth:`Dist.check_in_sync`).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

log = logging.getLogger("dopsd_fast")


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or hangs."""

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 1800.0
    store: object = field(default=None, repr=False)  # the rendezvous store: the roll call after a failure
    roll_call_s: float = 3.0  # how long the ranks that see a collective fail wait for each other

    @property
    def active(self) -> bool:
        return self.world > 1

    def _call(self, what: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - gloo / NCCL raise several types; one message
            raise self.failure(what, e) from None

    def failure(self, what: str, e: BaseException) -> DistributedError:
        """The one-line error of a failed collective ``what`` (ours, FSDP2's or the checkpoint's): after
        a roll call, it names the ranks that died or hang, or the error a rank stopped with."""
        log.error("rank %d/%d: the collective '%s' failed; asking the other ranks who is there", self.rank,
                  self.world, what)
        who = self._who_is_missing(what)
        return DistributedError(
            f"rank {self.rank}/{self.world}: the collective '{what}' failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}); {who}"
            + ("" if "stopped with an error" in who else f" (timeout train.dist_timeout_s={self.timeout_s:g} s). With "
               "torchrun --max-restarts the run restarts from the last checkpoint (--resume latest)"))

    def _who_is_missing(self, what: str) -> str:
        """A roll call after a failed collective: every rank that sees it fail answers in the store and
        waits ``roll_call_s`` for the others; the ranks that never answer are the ones that died (or
        hang). Rank 0 hosts the store: when it is gone, nobody can answer, and that is said too."""
        if self.store is None:
            return "another rank died or hangs"
        key = f"roll_call/{what}"
        try:
            self.store.set_timeout(datetime.timedelta(seconds=max(1.0, self.roll_call_s)))
            self.store.set(f"{key}/{self.rank}", "here")
            deadline = time.monotonic() + self.roll_call_s
            missing = list(range(self.world))
            while missing and time.monotonic() < deadline:
                missing = [r for r in missing if not self.store.check([f"{key}/{r}"])]
                if missing:
                    time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the store itself is unreachable: its host, rank 0, is gone
            return "rank 0 (the host of the rendezvous store) died or hangs" if self.rank else \
                "another rank died or hangs"
        if not missing:
            return "every rank answered the roll call after it: a rank's collective timed out or its network failed"
        failed = {r: rank_error(r) for r in missing}
        # a rank other than 0 keeps its failure's full text in errors.rank<N>.log; rank 0's one line is the whole of a
        # user error (a library's error it keeps in errors.log, named on its own screen)
        said = [f"rank {r} stopped with an error: {line.removeprefix('error: ')}"
                + (f" (its errors.rank{r}.log has the full text)" if r else "")
                for r, line in failed.items() if line]
        gone = [r for r, line in failed.items() if not line]
        if gone:
            names = ", ".join(str(r) for r in gone)
            said.append(f"rank{'s' if len(gone) > 1 else ''} {names} did not answer the roll call after it: died or hangs")
        return "; ".join(said)

    def all_reduce_mean_(self, tensors: list[torch.Tensor], what: str = "gradients") -> None:
        """Average ``tensors`` over the ranks in place, one flat bucket per dtype and device."""
        if not self.active or not tensors:
            return

        groups: dict = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for ts in groups.values():
            flat = _flatten_dense_tensors(ts)
            self._call(what, dist.all_reduce, flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world)
            for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
                t.copy_(v)

    def mean(self, values: torch.Tensor, what: str = "metrics") -> torch.Tensor:
        """The mean over the ranks of a small tensor (a copy; world 1: unchanged)."""
        if not self.active:
            return values

        out = values.detach().clone()
        self._call(what, dist.all_reduce, out, op=dist.ReduceOp.SUM)
        return out / self.world

    def min_max(self, value: float, what: str) -> tuple[float, float]:
        """(min, max) of ``value`` over the ranks (world 1: ``(value, value)``)."""
        if not self.active:
            return value, value
        t = torch.tensor([float(value), -float(value)], dtype=torch.float64)
        self._call(what, dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return -float(t[1]), float(t[0])

    def barrier(self, what: str = "barrier") -> None:
        if self.active:
            self._call(what, dist.barrier)

    @torch.no_grad()
    def check_in_sync(self, tensors: list[torch.Tensor], what: str = "weights") -> float:
        """Max over ranks of |rank's checksum - rank 0's| for ``tensors`` (0 when identical)."""
        if not self.active:
            return 0.0

        s = torch.stack([t.detach().double().sum() for t in tensors]).sum().reshape(1)
        ref = s.clone()
        self._call(what, dist.broadcast, ref, src=0)
        diff = (s - ref).abs()
        self._call(what, dist.all_reduce, diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def close(self) -> None:
        if self.active:
            if dist.is_initialized():
                dist.destroy_process_group()


# where gloo's and NCCL's errors come from when a peer is gone or a collective timed out (raised from
# inside FSDP2's all-gathers, the checkpoint's barriers and DCP, which do not go through Dist._call):
# the source paths and classes they name, not the words an OS or a user message may also use
_COLLECTIVE_SIGNS = ("gloo/transport/", "ProcessGroupNCCL", "ProcessGroupGloo")


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` (or what it wraps) is a collective's failure: torch's distributed errors
    (``DistError``: ``DistBackendError``, ``DistNetworkError``, ...), or a RuntimeError carrying gloo's
    or a process group's own text. Not an OSError, a ValueError (a DataError) or any other error that
    merely mentions a connection or a timeout."""
    dist_error = getattr(dist, "DistError", ())
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, DistributedError) or (dist_error and isinstance(e, dist_error)):
            return True
        if type(e) is RuntimeError and any(s in str(e) for s in _COLLECTIVE_SIGNS):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


_STORE: list = []  # this process's rendezvous store (from_env): where a failing rank leaves its one line


def post_error(line: str) -> None:
    """This rank's one-line failure into the rendezvous store, for the other ranks' messages (nothing
    without a store; a store that does not answer is skipped: the line is on this rank's screen and log)."""
    if not _STORE:
        return
    try:
        _STORE[-1].set_timeout(datetime.timedelta(seconds=2))
        _STORE[-1].set(f"error/{int(os.environ.get('RANK', 0))}", line)
    except Exception:  # noqa: BLE001 - best effort while failing
        pass


def rank_error(rank: int, wait_s: float = 0.0) -> str | None:
    """The one line rank ``rank`` left in the store when it failed (:func:`post_error`), waiting up to
    ``wait_s`` for it; None when there is none (or no store)."""
    if not _STORE:
        return None
    key = f"error/{rank}"
    deadline = time.monotonic() + wait_s
    try:
        _STORE[-1].set_timeout(datetime.timedelta(seconds=max(1.0, wait_s)))
        while True:
            if _STORE[-1].check([key]):
                return _STORE[-1].get(key).decode("utf-8", "replace")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store's host is gone
        return None


def stop_with_the_launcher() -> bool:
    """Under torchrun on Linux: this worker gets a SIGTERM when the agent that started it dies (``kill -9``
    or an out-of-memory kill of the launcher), so it finishes its step, writes that step's checkpoint
    and stops, as for a SIGTERM from the agent, instead of training on as an orphan that holds its GPU
    and the output folder. Returns whether it is set."""
    if not sys.platform.startswith("linux") or not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    _LAUNCHER.append(os.getppid())
    if os.getppid() == 1:  # the agent died before the request: as if after it
        os.kill(os.getpid(), signal.SIGTERM)
    return True


_LAUNCHER: list = []  # the agent's pid, where stop_with_the_launcher() is set


def launcher_died() -> bool:
    """Whether the torchrun agent that started this worker is gone (the SIGTERM was its death's)."""
    return bool(_LAUNCHER) and os.getppid() != _LAUNCHER[0]


def from_env(timeout_s: float = 1800.0) -> Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) -> a process group (NCCL with CUDA, gloo
    on the CPU); a plain process -> world 1, nothing initialised."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    d = Dist(rank, world, local, timeout_s)
    if world == 1:
        return d
    stop_with_the_launcher()

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=timeout_s)
        # the store under a prefix per torchrun attempt: after an elastic restart the rendezvous store can
        # still hold the previous attempt's addresses, which a fast rank would otherwise read and dial
        use_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ.get("MASTER_ADDR", "localhost"), int(os.environ.get("MASTER_PORT", 29500)),
                              world, is_master=not use_agent and rank == 0, timeout=timeout,
                              **({} if use_agent else {"multi_tenant": True}))
        store = dist.PrefixStore(f"dopsd/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        d.store = store
        _STORE.append(store)
        # CUDA: NCCL for device tensors and gloo for the few host-side ones (metrics flags, checksums)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
    log.info("data parallel: rank %d of %d (local rank %d, backend %s)", rank, world, local, dist.get_backend())
    return d
