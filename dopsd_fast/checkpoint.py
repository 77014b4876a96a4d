"""Resumable checkpoints in ``torch.distributed.checkpoint`` (DCP) format, written atomically (temp
directory renamed when complete), the last N kept.

A checkpoint is a DCP directory: every tensor of the trainer's state under a flat key (``t00000``,
...), and the rest of the state (structure, step, sampler, RNG, config) as one pickled blob
(``__meta__``). Every rank calls :func:`save_checkpoint` (DCP writes each replicated tensor once);
:func:`load_checkpoint` reads it in any process count (N ranks -> M), allocating from the
checkpoint's own metadata, and still reads the single-file ``state.pt`` checkpoints of earlier
versions.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _complete(p: Path) -> bool:
    return (p / ".metadata").is_file() or (p / "state.pt").is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and _complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


class _Ref(int):
    """A tensor's place in the flat DCP dict (in the pickled structure)."""


def _split(obj, tensors: list):
    if torch.is_tensor(obj):
        tensors.append(obj.detach())
        return _Ref(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _split(v, tensors) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_split(v, tensors) for v in obj)
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, _Ref):
        return tensors[f"t{int(obj):05d}"]
    if isinstance(obj, dict):
        return {k: _join(v, tensors) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_join(v, tensors) for v in obj)
    return obj


def _cause(e: BaseException) -> BaseException:
    """The first rank's underlying error of a DCP ``CheckpointException`` (a BaseException), else ``e``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier():
    d = _dist()
    if d is not None:
        d.barrier()


def save_checkpoint(root: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as ``root/step-NNNNNNN`` (DCP). Call it on every rank of a distributed run (the
    directory must be on a filesystem all ranks share); rank 0 renames the finished directory into
    place and prunes old ones."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    d = _dist()
    rank0 = d is None or d.get_rank() == 0
    root = Path(root)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    tensors: list = []
    skeleton = _split(state, tensors)
    from dopsd_fast.fsdp import is_dtensor

    flat = {f"t{i:05d}": (t if is_dtensor(t) else t.cpu()) for i, t in enumerate(tensors)}  # DCP writes shards
    flat["__meta__"] = pickle.dumps(skeleton)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # a single process: DCP says it assumes one
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(flat, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a full disk as one line
        e = _cause(e)
        text = f"{type(e).__name__}: {e}"
        if isinstance(e, OSError) and e.errno == 28 or "No space left" in text or "unexpected pos" in text:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(28, "writing the checkpoint failed (no space left on the device); is the disk full?",
                          str(tmp)) from None
        raise RuntimeError(f"writing the checkpoint {final} failed: {text.splitlines()[0][:300]}") from None
    _barrier()
    if rank0:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve_resume(root: str | Path, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> the newest complete checkpoint (None if none);
    otherwise a checkpoint directory path."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(root)
        return ckpts[-1][1] if ckpts else None
    p = Path(resume)
    if not _complete(p):
        raise FileNotFoundError(f"--resume: no checkpoint at {p} (expected a DCP directory with .metadata, or "
                                f"{p / 'state.pt'})")
    return p


def load_checkpoint(path: Path) -> dict:
    """The state :func:`save_checkpoint` wrote (any process count), or an earlier ``state.pt``."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if (path / "state.pt").is_file():
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    md = dcp.FileSystemReader(str(path)).read_metadata()
    flat = {}
    for key, m in md.state_dict_metadata.items():
        flat[key] = (torch.empty(tuple(m.size), dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata)
                     else b"")
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(flat, checkpoint_id=str(path))
    except CheckpointException as e:  # a BaseException: as a plain error naming the checkpoint
        c = _cause(e)
        raise RuntimeError(f"checkpoint {path} does not load ({type(c).__name__}: "
                           f"{str(c).splitlines()[0][:200] if str(c) else ''})") from None
    return _join(pickle.loads(flat.pop("__meta__")), flat)
