"""nvtx ranges around the phases of a step (roll-out states, teacher, student, backward, optimizer):
visible in Nsight Systems, a no-op without CUDA."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def nvtx_range(name: str):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield
