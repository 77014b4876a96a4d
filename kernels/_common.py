"""Shared helpers of the kernel files: when the Triton path runs, and launch sizes."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``
    (how the tests check kernel numerics without a GPU). Elsewhere the PyTorch reference runs."""
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
