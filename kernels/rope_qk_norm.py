"""Per-head RMSNorm of Q and K followed by rotary embedding, fused, forward and backward.

Both models rotate *interleaved pairs* ``(x[2i], x[2i+1])`` of each head by an angle per token and
pair; they differ only in how the angles are built and handed over:

* Z-Image: ``freqs_cis`` complex ``(B, S, D/2)`` from 3 axes (frame, height, width); the pair is a
  complex number multiplied by ``freqs_cis`` (``view_as_complex``).  -> :func:`zimage_cos_sin`
* FLUX.2: ``(cos, sin)`` real ``(S, D)`` from 4 axes, each value repeated for both members of a
  pair, applied as ``x * cos + rotate_half_interleaved(x) * sin``.  -> :func:`flux2_cos_sin`

Both reduce to ``cos, sin`` of shape ``(S, D/2)`` or ``(B, S, D/2)`` (fp32) and the same rotation
``out_even = y_e cos - y_o sin``, ``out_odd = y_o cos + y_e sin`` with ``y = RMSNorm_w(x)``.

``q``, ``k``: ``(B, S, H, D)`` (the layout after ``unflatten(-1, (heads, -1))``). On a GPU one program
per (token, q-or-k): all heads of the token in one tile. Statistics and rotation in fp32, one rounding
at the end (the eager models round once more after the norm in bf16). Gradients: ``q``, ``k`` and
both norm weights (reduced over tokens from fp32 per-token partials); the angles get none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels._common import Cost, nbytes, next_pow2, register_cost, rows_per_program, use_triton


# ---- angle conversion ------------------------------------------------------------------------
def zimage_cos_sin(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-Image's complex ``freqs_cis`` ``(..., D/2)`` -> fp32 ``(cos, sin)`` ``(..., D/2)``."""
    return freqs_cis.real.float().contiguous(), freqs_cis.imag.float().contiguous()


def flux2_cos_sin(rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.2's pair-repeated ``(cos, sin)`` ``(S, D)`` -> fp32 ``(cos, sin)`` ``(S, D/2)``."""
    cos, sin = rotary_emb
    return cos[..., 0::2].float().contiguous(), sin[..., 0::2].float().contiguous()


# ---- reference -------------------------------------------------------------------------------
def _expand(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return (t[None] if t.ndim == 2 else t)[:, :, None, :]  # (B|1, S, 1, D/2)


def rms_rope_ref(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    ye, yo = y[..., 0::2], y[..., 1::2]
    c, s = _expand(cos), _expand(sin)
    return torch.stack([ye * c - yo * s, yo * c + ye * s], dim=-1).flatten(-2).to(x.dtype)


def rope_qk_norm_ref(q, k, wq, wk, cos, sin, eps: float = 1e-5):
    return rms_rope_ref(q, wq, cos, sin, eps), rms_rope_ref(k, wk, cos, sin, eps)


# ---- kernels ---------------------------------------------------------------------------------
# A program takes ROWS tokens of q or of k, a (ROWS, BLOCK_H, BLOCK_P) tile of (token, head, pair): one
# token on a GPU (all its heads in one tile), up to 64 under Triton's interpreter, whose cost is per
# program (``rows_per_program``). M: the number of tokens (B * S).
@triton.jit
def _angles(C_ptr, S_ptr, rows, rmask, S_len, cs_bstride, D, BLOCK_P: tl.constexpr):
    """The (ROWS, 1, BLOCK_P) mask of the tile's (token, pair) and the tokens' fp32 cos, sin."""
    p = tl.arange(0, BLOCK_P)[None, None, :]
    r = rows[:, None, None]
    cs_off = (r // S_len) * cs_bstride + (r % S_len) * (D // 2) + p
    m = rmask[:, None, None] & (p < D // 2)
    return m, tl.load(C_ptr + cs_off, mask=m, other=0.0), tl.load(S_ptr + cs_off, mask=m, other=0.0)


@triton.jit
def _fwd_one(X_ptr, W_ptr, O_ptr, R_ptr, c, s, rows, rmask, pmask, H, D, eps, BLOCK_H: tl.constexpr,
             BLOCK_P: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[None, :, None]
    p = tl.arange(0, BLOCK_P)[None, None, :]
    m = pmask & (h < H)  # (ROWS, BLOCK_H, BLOCK_P)
    base = X_ptr + rows[:, None, None] * H * D + h * D + 2 * p
    xe = tl.load(base, mask=m, other=0.0).to(tl.float32)
    xo = tl.load(base + 1, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xe * xe + xo * xo, axis=2) / D + eps)  # (ROWS, BLOCK_H)
    we = tl.load(W_ptr + 2 * p, mask=p < D // 2, other=0.0).to(tl.float32)
    wo = tl.load(W_ptr + 2 * p + 1, mask=p < D // 2, other=0.0).to(tl.float32)
    ye = xe * rstd[:, :, None] * we
    yo = xo * rstd[:, :, None] * wo
    out = O_ptr + rows[:, None, None] * H * D + h * D + 2 * p
    tl.store(out, (ye * c - yo * s).to(O_ptr.dtype.element_ty), mask=m)
    tl.store(out + 1, (yo * c + ye * s).to(O_ptr.dtype.element_ty), mask=m)
    hh = tl.arange(0, BLOCK_H)[None, :]
    tl.store(R_ptr + rows[:, None] * H + hh, rstd, mask=rmask[:, None] & (hh < H))


@triton.jit
def _rope_qk_fwd_kernel(Q_ptr, K_ptr, WQ_ptr, WK_ptr, C_ptr, S_ptr, OQ_ptr, OK_ptr, RQ_ptr, RK_ptr,
                        M, S_len, cs_bstride, H, D, eps, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    which = tl.program_id(1)
    pmask, c, s = _angles(C_ptr, S_ptr, rows, rmask, S_len, cs_bstride, D, BLOCK_P)
    if which == 0:
        _fwd_one(Q_ptr, WQ_ptr, OQ_ptr, RQ_ptr, c, s, rows, rmask, pmask, H, D, eps, BLOCK_H, BLOCK_P)
    else:
        _fwd_one(K_ptr, WK_ptr, OK_ptr, RK_ptr, c, s, rows, rmask, pmask, H, D, eps, BLOCK_H, BLOCK_P)


@triton.jit
def _bwd_one(DO_ptr, X_ptr, W_ptr, R_ptr, DX_ptr, PW_ptr, c, s, rows, rmask, pmask, H, D,
             PARTIALS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[None, :, None]
    p = tl.arange(0, BLOCK_P)[None, None, :]
    m = pmask & (h < H)
    off = rows[:, None, None] * H * D + h * D + 2 * p
    doe = tl.load(DO_ptr + off, mask=m, other=0.0).to(tl.float32)
    doo = tl.load(DO_ptr + off + 1, mask=m, other=0.0).to(tl.float32)
    xe = tl.load(X_ptr + off, mask=m, other=0.0).to(tl.float32)
    xo = tl.load(X_ptr + off + 1, mask=m, other=0.0).to(tl.float32)
    hh = tl.arange(0, BLOCK_H)[None, :]
    rstd = tl.load(R_ptr + rows[:, None] * H + hh, mask=rmask[:, None] & (hh < H), other=0.0)[:, :, None]
    we = tl.load(W_ptr + 2 * p, mask=p < D // 2, other=0.0).to(tl.float32)
    wo = tl.load(W_ptr + 2 * p + 1, mask=p < D // 2, other=0.0).to(tl.float32)
    # rotation transposed: gradient with respect to the normalized y
    dye = doe * c + doo * s
    dyo = doo * c - doe * s
    xhe, xho = xe * rstd, xo * rstd
    ge, go = dye * we, dyo * wo
    dot = tl.sum(ge * xhe + go * xho, axis=2)[:, :, None] / D
    dxe = rstd * (ge - xhe * dot)
    dxo = rstd * (go - xho * dot)
    tl.store(DX_ptr + off, dxe.to(DX_ptr.dtype.element_ty), mask=m)
    tl.store(DX_ptr + off + 1, dxo.to(DX_ptr.dtype.element_ty), mask=m)
    if PARTIALS:  # the norm weights' per-token partials, only where they train (frozen under LoRA)
        pp = tl.arange(0, BLOCK_P)[None, :]
        pm = rmask[:, None] & (pp < D // 2)
        tl.store(PW_ptr + rows[:, None] * D + 2 * pp, tl.sum(dye * xhe, axis=1), mask=pm)
        tl.store(PW_ptr + rows[:, None] * D + 2 * pp + 1, tl.sum(dyo * xho, axis=1), mask=pm)


@triton.jit
def _rope_qk_bwd_kernel(DOQ_ptr, DOK_ptr, Q_ptr, K_ptr, WQ_ptr, WK_ptr, C_ptr, S_ptr, RQ_ptr, RK_ptr,
                        DQ_ptr, DK_ptr, PWQ_ptr, PWK_ptr, M, S_len, cs_bstride, H, D,
                        PARTIALS: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    which = tl.program_id(1)
    pmask, c, s = _angles(C_ptr, S_ptr, rows, rmask, S_len, cs_bstride, D, BLOCK_P)
    if which == 0:
        _bwd_one(DOQ_ptr, Q_ptr, WQ_ptr, RQ_ptr, DQ_ptr, PWQ_ptr, c, s, rows, rmask, pmask, H, D, PARTIALS, BLOCK_H,
                 BLOCK_P)
    else:
        _bwd_one(DOK_ptr, K_ptr, WK_ptr, RK_ptr, DK_ptr, PWK_ptr, c, s, rows, rmask, pmask, H, D, PARTIALS, BLOCK_H,
                 BLOCK_P)


# ---- launchers -------------------------------------------------------------------------------
def _cs(cos, sin, B, S, D):
    """fp32 contiguous angles and their batch stride (0 when shared by the batch)."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return cos, sin, (0 if cos.ndim == 2 else S * (D // 2))


def _fwd(q, k, wq, wk, cos, sin, eps):
    q, k = q.contiguous(), k.contiguous()
    B, S, H, D = q.shape
    cos, sin, bstride = _cs(cos, sin, B, S, D)
    oq, ok = torch.empty_like(q), torch.empty_like(k)
    rq = torch.empty((B * S, H), device=q.device, dtype=torch.float32)
    rk = torch.empty_like(rq)
    if B * S:
        R = rows_per_program(B * S)
        grid = (triton.cdiv(B * S, R), 2)
        _rope_qk_fwd_kernel[grid](q, k, wq.contiguous(), wk.contiguous(), cos, sin, oq, ok, rq, rk,
                                  B * S, S, bstride, H, D, eps, ROWS=R, BLOCK_H=next_pow2(H),
                                  BLOCK_P=next_pow2(D // 2))
    return oq, ok, rq, rk


def _bwd(doq, dok, q, k, wq, wk, cos, sin, rq, rk, params: bool = True):
    doq, dok, q, k = doq.contiguous(), dok.contiguous(), q.contiguous(), k.contiguous()
    B, S, H, D = q.shape
    cos, sin, bstride = _cs(cos, sin, B, S, D)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    # every element of a partial is written by the kernel: empty, not zero-filled; none when frozen
    pwq = torch.empty((B * S if params else 0, D), device=q.device, dtype=torch.float32)
    pwk = torch.empty_like(pwq)
    if B * S:
        R = rows_per_program(B * S)
        _rope_qk_bwd_kernel[(triton.cdiv(B * S, R), 2)](doq, dok, q, k, wq.contiguous(), wk.contiguous(), cos, sin, rq,
                                                        rk, dq, dk, pwq, pwk, B * S, S, bstride, H, D, PARTIALS=params,
                                                        ROWS=R, BLOCK_H=next_pow2(H), BLOCK_P=next_pow2(D // 2))
    if not params:
        return dq, dk, wq.new_empty(0), wk.new_empty(0)
    return dq, dk, pwq.sum(0).to(wq.dtype), pwk.sum(0).to(wk.dtype)


def _rstd_ref(x, eps):
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps).reshape(-1, x.shape[2])


def _bwd_one_ref(do, x, w, cos, sin, rstd):
    B, S, H, D = x.shape
    c, s = _expand(cos), _expand(sin)
    doe, doo = do.float()[..., 0::2], do.float()[..., 1::2]
    dy = torch.stack([doe * c + doo * s, doo * c - doe * s], dim=-1).flatten(-2)
    xhat = x.float() * rstd.view(B, S, H, 1)
    g = dy * w.float()
    dx = rstd.view(B, S, H, 1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dy * xhat).sum((0, 1, 2)).to(w.dtype)


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::rope_qk_norm", mutates_args=())
def rope_qk_norm_op(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q_out, k_out, rstd_q, rstd_k); the fp32 per-(token, head) rstd is kept for the backward."""
    if use_triton(q, k, wq, wk, cos, sin):
        return _fwd(q, k, wq, wk, cos, sin, eps)
    return (rms_rope_ref(q, wq, cos, sin, eps), rms_rope_ref(k, wk, cos, sin, eps), _rstd_ref(q, eps),
            _rstd_ref(k, eps))


@rope_qk_norm_op.register_fake
def _(q, k, wq, wk, cos, sin, eps):
    B, S, H, _ = q.shape
    return (torch.empty_like(q), torch.empty_like(k), q.new_empty((B * S, H), dtype=torch.float32),
            q.new_empty((B * S, H), dtype=torch.float32))


@torch.library.custom_op("dopsd_fast::rope_qk_norm_backward", mutates_args=())
def rope_qk_norm_backward_op(doq: torch.Tensor, dok: torch.Tensor, q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor,
                             wk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rq: torch.Tensor,
                             rk: torch.Tensor, params: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """-> (dq, dk, d wq, d wk); ``params`` False (the QK norm weights frozen, LoRA): the weight
    gradients are empty and nothing of them is computed."""
    if use_triton(doq, dok, q, k, wq, wk, cos, sin):
        return _bwd(doq, dok, q, k, wq, wk, cos, sin, rq, rk, params)
    dq, dwq = _bwd_one_ref(doq, q, wq, cos, sin, rq)
    dk, dwk = _bwd_one_ref(dok, k, wk, cos, sin, rk)
    if not params:
        return dq, dk, wq.new_empty(0), wk.new_empty(0)
    return dq, dk, dwq, dwk


@rope_qk_norm_backward_op.register_fake
def _(doq, dok, q, k, wq, wk, cos, sin, rq, rk, params):
    if not params:
        return torch.empty_like(q), torch.empty_like(k), wq.new_empty(0), wk.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(wq), torch.empty_like(wk)


def _setup(ctx, inputs, output):
    q, k, wq, wk, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, wq, wk, cos, sin, output[2], output[3])
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the rstd outputs


def _backward(ctx, doq, dok, _drq, _drk):
    q, k, wq, wk, cos, sin, rq, rk = ctx.saved_tensors
    doq = doq if doq is not None else torch.zeros_like(q)
    dok = dok if dok is not None else torch.zeros_like(k)
    params = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    dq, dk, dwq, dwk = rope_qk_norm_backward_op(doq, dok, q, k, wq, wk, cos, sin, rq, rk, params)
    if not params:
        return dq, dk, None, None, None, None, None
    return dq, dk, dwq, dwk, None, None, None


rope_qk_norm_op.register_autograd(_backward, setup_context=_setup)


# ---- costs (benchmarks/perf_model.py) ---------------------------------------------------------
@register_cost("dopsd_fast::rope_qk_norm")
def _(q, k, wq, wk, cos, sin, eps):
    return Cost(0, 2 * nbytes(q, k) + 2 * nbytes(cos, sin) + 8 * q.numel() // q.shape[-1], 3)


@register_cost("dopsd_fast::rope_qk_norm_backward")
def _(doq, dok, q, k, wq, wk, cos, sin, rq, rk, params):
    if not params:
        return Cost(0, 3 * nbytes(q, k) + 2 * nbytes(cos, sin), 1)
    part = 2 * 4 * q.shape[0] * q.shape[1] * q.shape[-1]  # per-row fp32 partials of the two norm weights
    return Cost(0, 3 * nbytes(q, k) + 2 * nbytes(cos, sin) + 2 * part, 5, scratch=part)


# ---- entry point -----------------------------------------------------------------------------
def rope_qk_norm(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope(RMSNorm_wq(q)), rope(RMSNorm_wk(k))`` for ``q, k`` of shape ``(B, S, H, D)``.

    ``cos``/``sin``: fp32 ``(S, D/2)`` or ``(B, S, D/2)`` (see :func:`zimage_cos_sin`,
    :func:`flux2_cos_sin`). ``eps``: 1e-5 for Z-Image, 1e-6 for FLUX.2.
    """
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"rope_qk_norm: q and k must be (B, S, H, D) and equal, got {tuple(q.shape)}, {tuple(k.shape)}")
    B, S, H, D = q.shape
    if D % 2:
        raise ValueError(f"rope_qk_norm: head dim {D} must be even")
    if wq.shape != (D,) or wk.shape != (D,):
        raise ValueError(f"rope_qk_norm: norm weights must be ({D},), got {tuple(wq.shape)}, {tuple(wk.shape)}")
    want = {(S, D // 2), (B, S, D // 2)}
    if tuple(cos.shape) not in want or cos.shape != sin.shape:
        raise ValueError(f"rope_qk_norm: cos/sin must be (S, D/2)={(S, D // 2)} or (B, S, D/2), got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    oq, ok, _, _ = rope_qk_norm_op(q, k, wq, wk, cos, sin, float(eps))
    return oq, ok
