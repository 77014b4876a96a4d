"""Rowwise FP8 quantization of activations, one pass per row: ``x (M, K)`` -> ``q`` float8_e4m3fn and
``scale (M, 1)`` fp32 with ``x ~= q * scale``, each row's absolute maximum mapped to e4m3's 448.

What ``fast.fp8: native`` runs before every FP8 GEMM (``torch._scaled_mm``) on each branch's rows. In
PyTorch the same takes about five passes over the activations (float copy, abs, amax, divide + clamp,
cast); the kernel reads each row twice (max, then scale and cast: the second read mostly from L2) and
writes one byte per element, rounding to nearest even (the hardware's cvt.rn.satfinite). Triton's
interpreter converts fp32 -> e4m3 wrongly just below powers of two (124 -> 64, -31.4 -> -16: measured
with triton 3.9), so under the interpreter the kernel writes the scaled fp32 values and PyTorch rounds
them (to nearest even, like the hardware): the tests check everything else of the kernel exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels._common import Cost, interpreting, nbytes, next_pow2, register_cost, use_triton

E4M3_MAX = 448.0


# ---- reference -------------------------------------------------------------------------------
def quantize_rows_ref(x: torch.Tensor):
    xf = x.detach().float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(1e-12)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


# ---- kernel ----------------------------------------------------------------------------------
@triton.jit
def _quant_rows_kernel(X, Q, S, K, stride_x, F32_OUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        if F32_OUT:  # the interpreter: PyTorch rounds (see the module docstring)
            tl.store(Q + row * K + cols, q, mask=cols < K)
        else:
            tl.store(Q + row * K + cols, q.to(tl.float8e4nv), mask=cols < K)
    tl.store(S + row, scale)


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(x):
        return quantize_rows_ref(x)
    M, K = x.shape
    f32 = interpreting()
    q = torch.empty((M, K), device=x.device, dtype=torch.float32 if f32 else torch.float8_e4m3fn)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    if M and K:
        _quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), F32_OUT=f32, BLOCK=min(2048, next_pow2(K)), num_warps=4)
    return (q.to(torch.float8_e4m3fn) if f32 else q), s


@quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@register_cost("dopsd_fast::quantize_rows")
def _(x):
    return Cost(0, 2 * nbytes(x) + x.numel() + 4 * x.shape[0], 1)


# ---- entry point -----------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor):
    """``x (M, K)`` (rows contiguous) -> ``(q float8_e4m3fn (M, K), scale fp32 (M, 1))``; no autograd."""
    if x.ndim != 2:
        raise ValueError(f"quantize_rows: expected (M, K), got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    return quantize_rows_op(x.detach())
