"""The D-OPSD state loss, fused: per-state x0 / v MSE with the sigma weighting, its reduction and
its gradient in ONE pass over the two predictions.

``loss = mean_b,i( w_b * (v_s - v_t)^2 )`` with ``w_b = sigma_b^2`` ("x0") or 1 ("v"); the teacher
prediction is a constant. The forward writes ``dloss/dv_s = 2 w_b (v_s - v_t) / numel`` alongside
the partial sums, so the backward is a scale by the incoming gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels._common import Cost, nbytes, register_cost, use_triton


# ---- reference -------------------------------------------------------------------------------
def dopsd_loss_ref(v_s: torch.Tensor, v_t: torch.Tensor, sigma: torch.Tensor, x0: bool = True) -> torch.Tensor:
    d = v_s.float() - v_t.detach().float()
    sq = d * d
    if x0:
        sq = sq * (sigma.float() ** 2).reshape(-1, *([1] * (v_s.ndim - 1)))
    return sq.mean()


# ---- kernel ----------------------------------------------------------------------------------
@triton.jit
def _dopsd_loss_kernel(VS_ptr, VT_ptr, SIG_ptr, GRAD_ptr, PART_ptr, per_sample, n, inv_n,
                       X0: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    vs = tl.load(VS_ptr + offs, mask=m, other=0.0).to(tl.float32)
    vt = tl.load(VT_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = vs - vt
    if X0:
        sig = tl.load(SIG_ptr + offs // per_sample, mask=m, other=0.0).to(tl.float32)
        w = sig * sig
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    tl.store(GRAD_ptr + offs, (2.0 * inv_n * w * d).to(GRAD_ptr.dtype.element_ty), mask=m)
    tl.store(PART_ptr + pid, tl.sum(tl.where(m, w * d * d, 0.0), axis=0))


_BLOCK = 1024


def _fwd(v_s, v_t, sigma, x0: bool):
    v_s, v_t = v_s.contiguous(), v_t.contiguous()
    n = v_s.numel()
    grad = torch.empty_like(v_s)
    nblk = triton.cdiv(n, _BLOCK)
    part = torch.empty(nblk, device=v_s.device, dtype=torch.float32)
    _dopsd_loss_kernel[(nblk,)](v_s, v_t, sigma.float().contiguous(), grad, part, n // v_s.shape[0], n, 1.0 / n,
                                X0=x0, BLOCK=_BLOCK)
    return part.sum() / n, grad  # deterministic: fixed-order reduction of the block sums


def _fwd_ref(v_s, v_t, sigma, x0: bool):
    d = v_s.float() - v_t.float()
    w = (sigma.float() ** 2).reshape(-1, *([1] * (v_s.ndim - 1))) if x0 else torch.ones((), device=v_s.device)
    return (w * d * d).mean(), (2.0 * w * d / v_s.numel()).to(v_s.dtype)


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::dopsd_loss", mutates_args=())
def dopsd_loss_op(v_s: torch.Tensor, v_t: torch.Tensor, sigma: torch.Tensor, x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss fp32 scalar, dloss/dv_s)."""
    return _fwd(v_s, v_t, sigma, x0) if use_triton(v_s, v_t, sigma) else _fwd_ref(v_s, v_t, sigma, x0)


@dopsd_loss_op.register_fake
def _(v_s, v_t, sigma, x0):
    return v_s.new_empty((), dtype=torch.float32), torch.empty_like(v_s)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, g_grad):
    if g_loss is None:
        return None, None, None, None
    (grad,) = ctx.saved_tensors
    return (g_loss * grad).to(grad.dtype), None, None, None


dopsd_loss_op.register_autograd(_backward, setup_context=_setup)


# ---- cost (benchmarks/perf_model.py) ----------------------------------------------------------
@register_cost("dopsd_fast::dopsd_loss")
def _(v_s, v_t, sigma, x0):
    return Cost(0, 3 * nbytes(v_s), 3)


# ---- entry point -----------------------------------------------------------------------------
def dopsd_loss(v_s: torch.Tensor, v_t: torch.Tensor, sigma: torch.Tensor, loss: str = "x0") -> torch.Tensor:
    """Drop-in for :func:`dopsd_fast.algorithm.state_loss` (gradient into ``v_s`` only)."""
    if loss not in ("x0", "v"):
        raise ValueError(f"loss must be 'x0' or 'v', got {loss!r}")
    if v_s.shape != v_t.shape or sigma.shape != (v_s.shape[0],):
        raise ValueError(f"dopsd_loss: v_s {tuple(v_s.shape)}, v_t {tuple(v_t.shape)}, sigma {tuple(sigma.shape)}")
    return dopsd_loss_op(v_s, v_t.detach(), sigma.detach(), loss == "x0")[0]
