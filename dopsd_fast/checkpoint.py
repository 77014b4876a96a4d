"""Resumable checkpoints, written atomically (temp dir + rename), the last N kept."""

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


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(root: str | Path, step: int, state: dict, keep: int) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        torch.save(state, tmp / "state.pt")
    except RuntimeError as e:  # torch reports a full disk as "unexpected pos ..."
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(28, f"writing the checkpoint failed ({str(e).splitlines()[0][:120]}); is the disk full?",
                      str(tmp / "state.pt")) from None
    with open(tmp / "state.pt", "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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
    if not (p / "state.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {p} (expected {p / 'state.pt'})")
    return p


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
