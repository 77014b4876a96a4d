"""Rowwise FP8 quantization of activations, one pass per row: ``x (M, K)`` -> ``q`` float8_e4m3fn and
``scale (M, 1)`` fp32 with ``x ~= q * scale``, each row's absolute maximum mapped to e4m3's 448.

What ``fast.fp8: native`` runs before every FP8 GEMM (``torch._scaled_mm``) on each branch's rows. In
PyTorch the same takes about five passes over the activations (float copy, abs, amax, divide + clamp,
cast); the kernel reads each row twice (max, then scale and cast: the second read mostly from L2) and
writes one byte per element, rounding to nearest even (the hardware's cvt.rn.satfinite). Triton's
interpreter converts fp32 -> e4m3 wrongly just below powers of two (124 -> 64, -31.4 -> -16: measured
with triton 3.9), so under the interpreter the kernel writes the scaled fp32 values and PyTorch rounds
them (to nearest even, like the hardware): the tests check everything else of the kernel exactly.

``quantize_rows_cat`` quantizes several row-aligned tensors (a group's output gradients dy_1, ..., dy_G,
each (M, N_g)) as their concatenation (M, sum N_g) with ONE scale per row (or one for all, tensorwise),
written straight into the concatenated e4m3 buffer: the A operand of the backward's single FP8 dX GEMM
``dx = [dy_1 | ... | dy_G] [W_1; ...; W_G]`` (no concatenated bf16 copy is made).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels._common import (Cost, interpreting, nbytes, next_pow2, register_cost, rows_per_program,
                                        use_triton)

E4M3_MAX = 448.0


# ---- reference -------------------------------------------------------------------------------
def quantize_rows_ref(x: torch.Tensor):
    return quantize_rows_cat_ref([x], True)


# ---- kernel ----------------------------------------------------------------------------------
# Each program takes ROWS rows (a (ROWS, BLOCK) tile per step along the row): 1 on a GPU (a program per
# row, the rows long), many under Triton's interpreter, whose cost is per program (tens of thousands of
# one-row programs made the CPU's FP8 step take minutes).
@triton.jit
def _max_nan(a, b):
    """max that keeps a NaN (``tl.maximum``'s default drops it: a NaN row would quantize to finite values)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_max(amax):
    """Per row of ``amax`` (ROWS, BLOCK, every value >= 0, +inf or NaN) its maximum, NaN if the row holds
    one (as PyTorch's ``amax``). ``tl.max`` drops a NaN; the row's sum is NaN exactly when the row holds
    one (no -inf to meet a +inf). Two built-in reductions, not ``tl.reduce`` with ``_max_nan``: the
    interpreter runs a custom combine element by element in Python (the CPU's FP8 step took minutes)."""
    total = tl.sum(amax, 1)
    return tl.where(total != total, total, tl.max(amax, 1))


@triton.jit
def _absmax_rows(X, offs, rmask, K, amax, BLOCK: tl.constexpr):
    """``amax`` (ROWS, BLOCK) updated with |X[offs[r] : offs[r] + K]| of each row r (``rmask``: the rows
    that exist), in BLOCK-wide chunks."""
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        m = rmask[:, None] & (cols[None, :] < K)
        amax = _max_nan(amax, tl.abs(tl.load(X + offs[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)))
    return amax


@triton.jit
def _cast_rows(X, Q, x_offs, q_offs, rmask, K, scale, F32_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """Q[q_offs[r] :][:K] = e4m3(X[x_offs[r] :][:K] / scale[r]) per row r, clamped to e4m3's range (under
    the interpreter the scaled fp32 values: PyTorch rounds them, see the module docstring)."""
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        m = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(X + x_offs[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale[:, None], -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                       propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN (e4m3fn has one), as in PyTorch
        if F32_OUT:
            tl.store(Q + q_offs[:, None] + cols[None, :], q, mask=m)
        else:
            tl.store(Q + q_offs[:, None] + cols[None, :], q.to(tl.float8e4nv), mask=m)


@triton.jit
def _row_amax_kernel(X, AMAX, M, K, stride_x, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """AMAX[row] = max(AMAX[row], max |X[row, :]|): one tensor of the group per launch (same stream)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    amax = _absmax_rows(X, rows * stride_x, rmask, K, tl.zeros((ROWS, BLOCK), tl.float32), BLOCK)
    prev = tl.load(AMAX + rows, mask=rmask, other=0.0)
    tl.store(AMAX + rows, _max_nan(prev, _row_max(amax)), mask=rmask)


@triton.jit
def _quant_scaled_kernel(X, Q, S, M, K, stride_x, stride_q, ROWWISE: tl.constexpr, F32_OUT: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Q[row, :K] = e4m3(X[row, :] / scale) with the scale given (per row, or one), Q a column slice
    of the concatenated buffer (row stride ``stride_q``)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    if ROWWISE:
        scale = tl.load(S + rows, mask=rmask, other=1.0)
    else:
        scale = tl.zeros((ROWS,), tl.float32) + tl.load(S)
    _cast_rows(X, Q, rows * stride_x, rows * stride_q, rmask, K, scale, F32_OUT, BLOCK)


@triton.jit
def _quant_rows_cat3_kernel(X0, X1, X2, Q, S, M, K0, K1, K2, s0, s1, s2, stride_q, NUM: tl.constexpr,
                            F32_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rowwise, one to three tensors in ONE launch (``quantize_rows``: one): each row's maximum over all
    of them, then each scaled and cast into its columns of Q (the second read mostly from L2: the row
    was just read)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    amax = _absmax_rows(X0, rows * s0, rmask, K0, tl.zeros((ROWS, BLOCK), tl.float32), BLOCK)
    if NUM > 1:
        amax = _absmax_rows(X1, rows * s1, rmask, K1, amax, BLOCK)
    if NUM > 2:
        amax = _absmax_rows(X2, rows * s2, rmask, K2, amax, BLOCK)
    scale = _max_nan(_row_max(amax) / 448.0, 1e-12)
    tl.store(S + rows, scale, mask=rmask)
    q_offs = rows * stride_q
    _cast_rows(X0, Q, rows * s0, q_offs, rmask, K0, scale, F32_OUT, BLOCK)
    if NUM > 1:
        _cast_rows(X1, Q, rows * s1, q_offs + K0, rmask, K1, scale, F32_OUT, BLOCK)
    if NUM > 2:
        _cast_rows(X2, Q, rows * s2, q_offs + K0 + K1, rmask, K2, scale, F32_OUT, BLOCK)


def quantize_rows_cat_ref(xs: list[torch.Tensor], rowwise: bool = True):
    xf = torch.cat([x.detach().float() for x in xs], 1)
    if rowwise:  # a row without columns has no maximum: 0, as the kernel's
        amax = xf.abs().amax(dim=1, keepdim=True) if xf.shape[1] else xf.new_zeros((xf.shape[0], 1))
    else:  # an empty group (no rows) has no maximum: 0, as the kernel's
        amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    scale = (amax / E4M3_MAX).clamp_min(1e-12)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(x):
        return quantize_rows_ref(x)
    M, K = x.shape
    f32 = interpreting()
    q = torch.empty((M, K), device=x.device, dtype=torch.float32 if f32 else torch.float8_e4m3fn)
    s = (torch.empty if K else torch.full)((M, 1), *(() if K else (1e-12,)), device=x.device, dtype=torch.float32)
    if M and K:
        # the group kernel with one tensor (the other pointers unused)
        R = rows_per_program(M)
        _quant_rows_cat3_kernel[(triton.cdiv(M, R),)](x, x, x, q, s, M, K, 0, 0, x.stride(0), 0, 0, K, NUM=1,
                                                      F32_OUT=f32, ROWS=R, BLOCK=min(2048, next_pow2(K)), num_warps=4)
    return (q.to(torch.float8_e4m3fn) if f32 else q), s


@quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@register_cost("dopsd_fast::quantize_rows")
def _(x):
    return Cost(0, 2 * nbytes(x) + x.numel() + 4 * x.shape[0], 1)


@torch.library.custom_op("dopsd_fast::quantize_rows_cat", mutates_args=())
def quantize_rows_cat_op(xs: list[torch.Tensor], rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(*xs):
        return quantize_rows_cat_ref(xs, rowwise)
    M, widths = xs[0].shape[0], [x.shape[1] for x in xs]
    f32 = interpreting()
    q = torch.empty((M, sum(widths)), device=xs[0].device, dtype=torch.float32 if f32 else torch.float8_e4m3fn)
    if M == 0:
        s = torch.zeros((M, 1) if rowwise else (), device=xs[0].device, dtype=torch.float32)
        return q.to(torch.float8_e4m3fn), (s if rowwise else s.fill_(1e-12))  # as the reference
    if rowwise and len(xs) <= 3:  # one launch for the group (the usual case: q, k, v or w1, w3)
        s = torch.empty((M, 1), device=xs[0].device, dtype=torch.float32)
        pad = xs + [xs[0]] * (3 - len(xs))
        R = rows_per_program(M)
        _quant_rows_cat3_kernel[(triton.cdiv(M, R),)](*pad, q, s, M,
                                                      *[x.shape[1] if i < len(xs) else 0 for i, x in enumerate(pad)],
                                                      *[x.stride(0) for x in pad], q.stride(0), NUM=len(xs),
                                                      F32_OUT=f32, ROWS=R, BLOCK=min(2048, next_pow2(max(widths))),
                                                      num_warps=4)
        return (q.to(torch.float8_e4m3fn) if f32 else q), s
    amax = torch.zeros((M,), device=xs[0].device, dtype=torch.float32)
    R = rows_per_program(M)
    for x in xs:  # per tensor: the rows' maxima, then the cast with the group's scale
        _row_amax_kernel[(triton.cdiv(M, R),)](x, amax, M, x.shape[1], x.stride(0), ROWS=R,
                                               BLOCK=min(2048, next_pow2(x.shape[1])), num_warps=4)
    scale = (amax / E4M3_MAX).clamp_min(1e-12).view(M, 1) if rowwise else (amax.amax() / E4M3_MAX).clamp_min(1e-12)
    col = 0
    for x in xs:
        K = x.shape[1]
        _quant_scaled_kernel[(triton.cdiv(M, R),)](x, q[:, col:], scale, M, K, x.stride(0), q.stride(0),
                                                   ROWWISE=rowwise, F32_OUT=f32, ROWS=R, BLOCK=min(2048, next_pow2(K)),
                                                   num_warps=4)
        col += K
    return (q.to(torch.float8_e4m3fn) if f32 else q), scale


@quantize_rows_cat_op.register_fake
def _(xs, rowwise):
    M = xs[0].shape[0]
    q = xs[0].new_empty((M, sum(x.shape[1] for x in xs)), dtype=torch.float8_e4m3fn)
    return q, xs[0].new_empty((M, 1) if rowwise else (), dtype=torch.float32)


@register_cost("dopsd_fast::quantize_rows_cat")
def _(xs, rowwise):
    M = xs[0].shape[0]  # each row read twice (max, then cast), e4m3 written: one launch for up to 3 (rowwise)
    one = rowwise and len(xs) <= 3
    return Cost(0, sum(2 * nbytes(x) + x.numel() for x in xs) + 4 * M, 1 if one else 2 * len(xs) + 2)


# ---- entry point -----------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor):
    """``x (M, K)`` (rows contiguous) -> ``(q float8_e4m3fn (M, K), scale fp32 (M, 1))``; no autograd."""
    if x.ndim != 2:
        raise ValueError(f"quantize_rows: expected (M, K), got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    return quantize_rows_op(x.detach())


def quantize_rows_cat(xs: list[torch.Tensor], rowwise: bool = True):
    """``[x_1 (M, N_1), ...]`` -> ``(q float8_e4m3fn (M, sum N_g), scale)``: the concatenation quantized
    with one scale per row (``(M, 1)``; ``rowwise=False``: one scale ``()`` for all), no autograd."""
    if not xs or any(x.ndim != 2 or x.shape[0] != xs[0].shape[0] for x in xs):
        raise ValueError(f"quantize_rows_cat: expected (M, N_g) tensors of equal M, got {[tuple(x.shape) for x in xs]}")
    return quantize_rows_cat_op([(x if x.stride(1) == 1 else x.contiguous()).detach() for x in xs], bool(rowwise))
