"""Shared helpers of the kernel files: when the Triton path runs, and launch sizes."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


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


def rows_per_program(m: int) -> int:
    """Rows per program of the row-wise kernels (norms, RoPE, FP8 quantization): 1 on a GPU (a program
    per row, the arithmetic as written), up to 64 under Triton's interpreter, whose cost is per
    program (one-row programs made the CPU's kernel tests take minutes)."""
    return min(64, next_pow2(m)) if interpreting() else 1


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs for :func:`mma`: IEEE fp32 products for fp32 inputs (no TF32 in parity runs), and an
    fp32 upcast of bf16 operands under the interpreter, whose bf16 ``tl.dot`` returns garbage
    (triton 3.9, measured: errors of ~1e10 on a 16x16x16 product; fp16 and fp32 are exact). The upcast
    is exact: bf16 x bf16 products are representable in fp32, as on the tensor cores."""
    return {"IEEE": dtype == torch.float32, "UPCAST": interpreting() and dtype == torch.bfloat16}


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32 (see :func:`dot_flags`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ---- cost model ------------------------------------------------------------------------------
# A fake-tensor run (benchmarks/perf_model.py) sees each registered op as ONE op: its fake
# implementation hides the launches, copies and scratch buffers inside. So each op states its own
# cost here, beside its registration: FLOPs executed, bytes read + written in device memory, kernel
# launches, peak scratch bytes, and a kind that says at which rate it runs ("gemm", "attn_fwd",
# "attn_bwd", "memory").
COSTS: dict = {}


class Cost(dict):
    def __init__(self, flops=0.0, bytes=0.0, launches=1, kind="memory", scratch=0):
        super().__init__(flops=float(flops), bytes=float(bytes), launches=int(launches), kind=kind,
                         scratch=int(scratch))


def register_cost(name: str):
    """``@register_cost("dopsd_fast::op")`` on ``fn(*op_args) -> Cost``."""
    def deco(fn):
        COSTS[name] = fn
        return fn
    return deco


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def attention_pairs(cu_q, cu_k, tq: int, tk: int) -> float:
    """sum_b len_q(b) * len_k(b): exact when the offsets are readable (built outside a fake mode),
    else the one-sample value (exact for B = 1) scaled down by the sample count."""
    try:
        q, k = cu_q.tolist(), cu_k.tolist()
        return float(sum((q[i + 1] - q[i]) * (k[i + 1] - k[i]) for i in range(len(q) - 1)))
    except Exception:  # noqa: BLE001 - fake offsets: no data
        b = max(cu_q.numel() - 1, 1)
        return float(tq) * float(tk) / b
