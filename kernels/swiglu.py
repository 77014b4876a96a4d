"""SwiGLU ``silu(a) * b``, forward and backward (Z-Image / FLUX.2 feed-forward).

Reads top to bottom: reference, Triton kernels, launchers, registration (custom op + fake +
autograd), functional entry point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels._common import Cost, nbytes, register_cost, use_triton


# ---- reference -------------------------------------------------------------------------------
def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 math, result in the input dtype."""
    return (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)


# ---- kernels ---------------------------------------------------------------------------------
# a and b are read as rows of ``n_cols`` elements at row strides ``stride_a`` / ``stride_b`` (the two
# halves of one (rows, 2F) projection, or column blocks of a wider one, read in place: no copy); the
# outputs are contiguous.
@triton.jit
def _swiglu_fwd_kernel(A_ptr, B_ptr, Y_ptr, n, n_cols, stride_a, stride_b, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    row = offs // n_cols
    col = offs - row * n_cols
    row = row.to(tl.int64)  # rows x a wide projection's stride can pass 2^31 elements
    a = tl.load(A_ptr + row * stride_a + col, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + row * stride_b + col, mask=m, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(G_ptr, A_ptr, B_ptr, DA_ptr, DB_ptr, n, n_cols, stride_a, stride_b, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    row = offs // n_cols
    col = offs - row * n_cols
    row = row.to(tl.int64)  # rows x a wide projection's stride can pass 2^31 elements
    g = tl.load(G_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(A_ptr + row * stride_a + col, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + row * stride_b + col, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    da = g * b * s * (1.0 + a * (1.0 - s))
    tl.store(DA_ptr + offs, da.to(DA_ptr.dtype.element_ty), mask=m)
    tl.store(DB_ptr + offs, (g * silu).to(DB_ptr.dtype.element_ty), mask=m)


# ---- launchers -------------------------------------------------------------------------------
_BLOCK = 1024


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, last dim) with unit column stride, in place where its strides allow (a column
    block of a wider tensor), else a contiguous copy."""
    cols = t.shape[-1] if t.dim() else 1
    if t.dim() and t.stride(-1) == 1:
        try:
            return t.view(-1, cols)
        except RuntimeError:  # leading dimensions that do not fold into one row stride
            pass
    return t.contiguous().view(-1, cols)


def _fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a2, b2 = _rows(a), _rows(b)
    y = a.new_empty(a.shape)
    n = a.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](a2, b2, y, n, a2.shape[1], a2.stride(0), b2.stride(0),
                                                      BLOCK=_BLOCK)
    return y


def _bwd(g, a, b):
    g, a2, b2 = g.contiguous(), _rows(a), _rows(b)
    da, db = a.new_empty(a.shape), b.new_empty(b.shape)
    n = a.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](g, a2, b2, da, db, n, a2.shape[1], a2.stride(0), b2.stride(0),
                                                      BLOCK=_BLOCK)
    return da, db


def _bwd_ref(g, a, b):
    a32, b32, g32 = a.float(), b.float(), g.float()
    s = torch.sigmoid(a32)
    return ((g32 * b32 * s * (1 + a32 * (1 - s))).to(a.dtype), (g32 * a32 * s).to(b.dtype))


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::swiglu", mutates_args=())
def swiglu_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _fwd(a, b) if use_triton(a, b) else swiglu_ref(a, b)


@swiglu_op.register_fake
def _(a, b):
    return a.new_empty(a.shape)


@torch.library.custom_op("dopsd_fast::swiglu_backward", mutates_args=())
def swiglu_backward_op(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(g, a, b) if use_triton(g, a, b) else _bwd_ref(g, a, b)


@swiglu_backward_op.register_fake
def _(g, a, b):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    return swiglu_backward_op(grad, a, b)


swiglu_op.register_autograd(_backward, setup_context=_setup)


# ---- costs (benchmarks/perf_model.py) ---------------------------------------------------------
@register_cost("dopsd_fast::swiglu")
def _(a, b):
    return Cost(0, 3 * nbytes(a), 1)


@register_cost("dopsd_fast::swiglu_backward")
def _(g, a, b):
    return Cost(0, 5 * nbytes(a), 1)


# ---- entry point -----------------------------------------------------------------------------
def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` (same shapes, any float dtype; any row strides, e.g. the two halves of one
    projection: read in place); fp32 math inside; the result contiguous."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    return swiglu_op(a, b)
