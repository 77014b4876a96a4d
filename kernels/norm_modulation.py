"""Norm + modulation and gated residuals, fused, forward and backward.

* Z-Image:  ``rms_norm_modulate(x, w, s) = RMSNorm_w(x) * (1 + s)`` and
  ``gated_residual(x, g, y, tanh=True) = x + tanh(g) * y``.
* FLUX.2:   ``layer_norm_modulate(x, s, t) = LayerNorm_noaffine(x) * (1 + s) + t`` and
  ``gated_residual(x, g, y, tanh=False) = x + g * y``.
* Z-Image's residuals, fused: ``norm_gated_residual(x, g, y, w) = x + tanh(g) * RMSNorm_w(y)`` (the
  block's post-norm and gated residual in one pass: the normalized y is never written).
* A residual and the next sublayer's norm, fused (both families): ``residual_norm`` returns
  ``out = x + act(g) * N(y)`` and ``xn = Norm(out) * (1 + s) (+ t)`` from one pass (out is not read
  back), and its backward sums out's two gradients (from below and through the norm) in the kernel that
  computes dy: no separate add pass. Frozen gate, norm weights and modulation (LoRA).

``x``/``y`` are ``(B, S, D)``; the modulation tensors ``s``, ``t``, ``g`` are per sample ``(B, D)``
(broadcast over the S tokens). fp32 statistics whatever the input dtype. One program per row on a GPU; the
per-sample parameter gradients are reduced over rows from fp32 per-row partials (simple and
deterministic; a blocked reduction is a fast-path optimization, not a correctness matter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels._common import Cost, nbytes, next_pow2, register_cost, rows_per_program, use_triton


# ---- references ------------------------------------------------------------------------------
def rms_norm_modulate_ref(x, weight, scale, eps: float = 1e-5):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (y * (1 + scale.float()[:, None, :])).to(x.dtype)


def layer_norm_modulate_ref(x, scale, shift, eps: float = 1e-6):
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]).to(x.dtype)


def gated_residual_ref(x, gate, y, use_tanh: bool = True):
    g = gate.float()[:, None, :]
    g = torch.tanh(g) if use_tanh else g
    return (x.float() + g * y.float()).to(x.dtype)


# ---- kernels ---------------------------------------------------------------------------------
# Each program takes ROWS rows, a (ROWS, BLOCK_D) tile: 1 on a GPU (a program per row), up to 64 under
# Triton's interpreter, whose cost is per program (``rows_per_program``). M: the number of rows.
@triton.jit
def _tile(row0, M, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows, rmask, cols, mask (ROWS, BLOCK_D)) of the program's tile."""
    rows = row0 + tl.arange(0, ROWS)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_D)
    return rows, rmask, cols, rmask[:, None] & (cols[None, :] < D)


@triton.jit
def _at(P, rows, cols, D):
    """Pointers (ROWS, BLOCK_D) to the elements of (M, D) tensor P (computed where used, not kept)."""
    return P + rows[:, None] * D + cols[None, :]


@triton.jit
def _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ: tl.constexpr):
    """The sample of each row (ROWS,): ``seq[row]`` (packed samples of any lengths) or ``row // S_len``."""
    if HAS_SEQ:
        return tl.load(SEQ_ptr + rows, mask=rmask, other=0)
    else:
        return rows // S_len


@triton.jit
def _norm_mod(x, m, b, S_ptr, T_ptr, W_ptr, cols, D, eps, LAYER: tl.constexpr, ROWS: tl.constexpr):
    """(``LayerNorm(x) * (1 + s) + t`` or ``RMSNorm_w(x) * (1 + s)``, rstd, mean) of the rows ``x``
    (ROWS, BLOCK_D; 0 outside ``m``), the modulation of each row's sample ``b``."""
    if LAYER:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(m, x - mean[:, None], 0.0)
    else:
        mean = tl.zeros((ROWS,), tl.float32)
        xc = x
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    s = tl.load(_at(S_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    if LAYER:
        t = tl.load(_at(T_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
        return xhat * (1.0 + s) + t, rstd, mean
    else:
        w = tl.load(W_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        return xhat * w[None, :] * (1.0 + s), rstd, mean


@triton.jit
def _norm_mod_fwd_kernel(X_ptr, W_ptr, S_ptr, T_ptr, Y_ptr, RSTD_ptr, MEAN_ptr, SEQ_ptr, M, S_len, D, eps,
                         LAYER: tl.constexpr, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    x = tl.load(_at(X_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    y, rstd, mean = _norm_mod(x, m, b, S_ptr, T_ptr, W_ptr, cols, D, eps, LAYER, ROWS)
    tl.store(_at(Y_ptr, rows, cols, D), y.to(Y_ptr.dtype.element_ty), mask=m)
    tl.store(RSTD_ptr + rows, rstd, mask=rmask)
    tl.store(MEAN_ptr + rows, mean, mask=rmask)


@triton.jit
def _norm_mod_dx(dy, xhat, s, rstd, W_ptr, cols, D, LAYER: tl.constexpr):
    """dx of ``LayerNorm(x) * (1 + s)`` (+ shift) or ``RMSNorm_w(x) * (1 + s)``, from the output's
    gradient ``dy``, the normalized rows ``xhat`` (0 outside the row) and their ``rstd`` (ROWS, 1)."""
    if LAYER:
        gy = dy * (1.0 + s)
        c1 = tl.sum(gy * xhat, axis=1)[:, None] / D
        c2 = tl.sum(gy, axis=1)[:, None] / D
        return rstd * (gy - c2 - xhat * c1)
    else:
        w = tl.load(W_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        gy = dy * w * (1.0 + s)
        c1 = tl.sum(gy * xhat, axis=1)[:, None] / D
        return rstd * (gy - xhat * c1)


@triton.jit
def _norm_mod_bwd_kernel(DY_ptr, X_ptr, W_ptr, S_ptr, RSTD_ptr, MEAN_ptr, DX_ptr, PW_ptr, PS_ptr, SEQ_ptr, M, S_len,
                         D, LAYER: tl.constexpr, PARTIALS: tl.constexpr, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    dy = tl.load(_at(DY_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    x = tl.load(_at(X_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD_ptr + rows, mask=rmask, other=0.0)[:, None]
    mean = tl.load(MEAN_ptr + rows, mask=rmask, other=0.0)[:, None]
    s = tl.load(_at(S_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    xhat = tl.where(m, (x - mean) * rstd, 0.0)
    dx = _norm_mod_dx(dy, xhat, s, rstd, W_ptr, cols, D, LAYER)
    if PARTIALS:
        if LAYER:
            tl.store(_at(PS_ptr, rows, cols, D), dy * xhat, mask=m)  # d scale partial; d shift = sum dy
        else:
            w = tl.load(W_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
            tl.store(_at(PW_ptr, rows, cols, D), dy * xhat * (1.0 + s), mask=m)
            tl.store(_at(PS_ptr, rows, cols, D), dy * xhat * w, mask=m)
    tl.store(_at(DX_ptr, rows, cols, D), dx.to(DX_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tanh(g):
    # tanh from exp of a non-positive argument: no overflow for large |g|
    e = tl.exp(-2.0 * tl.abs(g))
    return tl.where(g >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)


@triton.jit
def _gate_act(g, TANH: tl.constexpr):
    """(act(g), act'(g)): tanh (Z-Image) or the identity (FLUX.2)."""
    if TANH:
        act = _tanh(g)
        return act, 1.0 - act * act
    else:
        return g, g * 0.0 + 1.0


@triton.jit
def _gated_fwd_kernel(X_ptr, G_ptr, Y_ptr, O_ptr, SEQ_ptr, M, S_len, D, TANH: tl.constexpr, HAS_SEQ: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    x = tl.load(_at(X_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    y = tl.load(_at(Y_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    g = tl.load(_at(G_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    if TANH:
        g = _tanh(g)
    tl.store(_at(O_ptr, rows, cols, D), (x + g * y).to(O_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_bwd_kernel(DO_ptr, G_ptr, Y_ptr, DY_ptr, PG_ptr, SEQ_ptr, M, S_len, D, TANH: tl.constexpr,
                      PARTIALS: tl.constexpr, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    do = tl.load(_at(DO_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    g = tl.load(_at(G_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    act, dact = _gate_act(g, TANH)
    tl.store(_at(DY_ptr, rows, cols, D), (do * act).to(DY_ptr.dtype.element_ty), mask=m)
    if PARTIALS:  # the gate's gradient only where the gate trains (not under LoRA): y not even read
        y = tl.load(_at(Y_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
        tl.store(_at(PG_ptr, rows, cols, D), do * y * dact, mask=m)


@triton.jit
def _norm_gated_fwd_kernel(X_ptr, G_ptr, Y_ptr, W_ptr, O_ptr, RSTD_ptr, SEQ_ptr, M, S_len, D, eps,
                           TANH: tl.constexpr, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    y = tl.load(_at(Y_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / D + eps)
    w = tl.load(W_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    g = tl.load(_at(G_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    if TANH:
        g = _tanh(g)
    x = tl.load(_at(X_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    tl.store(_at(O_ptr, rows, cols, D), (x + g * (y * rstd[:, None] * w)).to(O_ptr.dtype.element_ty), mask=m)
    tl.store(RSTD_ptr + rows, rstd, mask=rmask)


@triton.jit
def _norm_gated_bwd_kernel(DO_ptr, G_ptr, Y_ptr, W_ptr, RSTD_ptr, DY_ptr, PW_ptr, PG_ptr, SEQ_ptr, M, S_len, D,
                           TANH: tl.constexpr, PARTIALS: tl.constexpr, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """dy of ``x + act(g) * RMSNorm_w(y)`` (dx is dout itself); the norm weight's and gate's per-row
    partials only where they train."""
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    do = tl.load(_at(DO_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    y = tl.load(_at(Y_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD_ptr + rows, mask=rmask, other=0.0)[:, None]
    w = tl.load(W_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    g = tl.load(_at(G_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    act, dact = _gate_act(g, TANH)
    yhat = y * rstd
    dyn = do * act
    gy = dyn * w
    c1 = tl.sum(gy * yhat, axis=1)[:, None] / D
    tl.store(_at(DY_ptr, rows, cols, D), (rstd * (gy - yhat * c1)).to(DY_ptr.dtype.element_ty), mask=m)
    if PARTIALS:
        tl.store(_at(PW_ptr, rows, cols, D), dyn * yhat, mask=m)
        tl.store(_at(PG_ptr, rows, cols, D), do * yhat * w * dact, mask=m)


@triton.jit
def _residual_norm_fwd_kernel(X_ptr, G_ptr, Y_ptr, WY_ptr, S_ptr, T_ptr, W_ptr, O_ptr, XN_ptr, RY_ptr, RO_ptr, MO_ptr,
                              SEQ_ptr, M, S_len, D, eps_y, eps, TANH: tl.constexpr, POST_NORM: tl.constexpr,
                              LAYER: tl.constexpr, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out = x + act(g) * N(y)`` (N: RMSNorm_wy, or none) and ``xn = Norm(out) * (1 + s) (+ t)``:
    out is written once, its normalization reads it from registers (rounded to out's dtype, as a
    second kernel would read it)."""
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    y = tl.load(_at(Y_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    if POST_NORM:
        ry = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / D + eps_y)
        wy = tl.load(WY_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        y = y * ry[:, None] * wy
        tl.store(RY_ptr + rows, ry, mask=rmask)
    g = tl.load(_at(G_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    if TANH:
        g = _tanh(g)
    x = tl.load(_at(X_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    o = (x + g * y).to(O_ptr.dtype.element_ty)
    tl.store(_at(O_ptr, rows, cols, D), o, mask=m)
    xn, ro, mean = _norm_mod(o.to(tl.float32), m, b, S_ptr, T_ptr, W_ptr, cols, D, eps, LAYER, ROWS)
    tl.store(_at(XN_ptr, rows, cols, D), xn.to(XN_ptr.dtype.element_ty), mask=m)
    tl.store(RO_ptr + rows, ro, mask=rmask)
    tl.store(MO_ptr + rows, mean, mask=rmask)


@triton.jit
def _residual_norm_bwd_kernel(DO_ptr, DXN_ptr, O_ptr, G_ptr, Y_ptr, WY_ptr, S_ptr, W_ptr, RY_ptr, RO_ptr, MO_ptr,
                              DX_ptr, DY_ptr, SEQ_ptr, M, S_len, D, TANH: tl.constexpr, POST_NORM: tl.constexpr,
                              LAYER: tl.constexpr, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx (out's whole gradient: dout from below plus the norm's, summed here in fp32) and dy; the gate,
    the norms' weights and the modulation are frozen (their gradients: the unfused kernels)."""
    rows, rmask, cols, m = _tile(tl.program_id(0) * ROWS, M, D, ROWS, BLOCK_D)
    b = _sample(SEQ_ptr, rows, rmask, S_len, HAS_SEQ)
    dxn = tl.load(_at(DXN_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    o = tl.load(_at(O_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    ro = tl.load(RO_ptr + rows, mask=rmask, other=0.0)[:, None]
    mo = tl.load(MO_ptr + rows, mask=rmask, other=0.0)[:, None]
    s = tl.load(_at(S_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    d = _norm_mod_dx(dxn, tl.where(m, (o - mo) * ro, 0.0), s, ro, W_ptr, cols, D, LAYER)
    d += tl.load(_at(DO_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
    tl.store(_at(DX_ptr, rows, cols, D), d.to(DX_ptr.dtype.element_ty), mask=m)
    g = tl.load(_at(G_ptr, b, cols, D), mask=m, other=0.0).to(tl.float32)
    if TANH:
        g = _tanh(g)
    dyn = d * g
    if POST_NORM:
        y = tl.load(_at(Y_ptr, rows, cols, D), mask=m, other=0.0).to(tl.float32)
        ry = tl.load(RY_ptr + rows, mask=rmask, other=0.0)[:, None]
        wy = tl.load(WY_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        yhat = y * ry
        gy2 = dyn * wy
        c = tl.sum(gy2 * yhat, axis=1)[:, None] / D
        dyn = ry * (gy2 - yhat * c)
    tl.store(_at(DY_ptr, rows, cols, D), dyn.to(DY_ptr.dtype.element_ty), mask=m)


# ---- launchers -------------------------------------------------------------------------------
def _rows(x):
    B, S, D = x.shape
    return B, S, D, B * S


def _seq_arg(seq, x):
    """(pointer argument, HAS_SEQ) for the kernels."""
    return (seq, True) if seq is not None else (x, False)


def _per_sample(part, B, S, seq, n):
    """fp32 per-row partials (M, D) -> per-sample sums (n, D): by ``seq`` or by S rows per sample."""
    if seq is None:
        return part.view(B, S, part.shape[-1]).sum(1)  # S = 0: zeros, not a reshape error
    return part.new_zeros((n, part.shape[-1])).index_add_(0, seq, part.view(-1, part.shape[-1]))


def _norm_fwd(x, weight, scale, shift, eps, layer, seq=None):
    x = x.contiguous()
    B, S, D, M = _rows(x)
    y = torch.empty_like(x)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    sq, has = _seq_arg(seq, x)
    if M:
        R = rows_per_program(M)
        grid = (triton.cdiv(M, R),)
        _norm_mod_fwd_kernel[grid](x, weight.contiguous(), scale.contiguous(), shift.contiguous(), y, rstd,
                                   mean, sq, M, S, D, eps, LAYER=layer, HAS_SEQ=has, ROWS=R,
                                   BLOCK_D=next_pow2(D))
    return y, rstd, mean


def _norm_bwd(dy, x, weight, scale, rstd, mean, layer, params: bool = True, seq=None):
    """``params``: also the weight / scale / shift gradients (False: dx alone, no partials written)."""
    dy, x = dy.contiguous(), x.contiguous()
    B, S, D, M = _rows(x)
    dx = torch.empty_like(x)
    # every row of a partial is written by the kernel: empty, not zero-filled
    pw = x.new_empty((M, D), dtype=torch.float32) if params and not layer else dx.new_empty(0, dtype=torch.float32)
    ps = x.new_empty((M, D), dtype=torch.float32) if params else dx.new_empty(0, dtype=torch.float32)
    sq, has = _seq_arg(seq, x)
    if M:
        R = rows_per_program(M)
        grid = (triton.cdiv(M, R),)
        _norm_mod_bwd_kernel[grid](dy, x, weight.contiguous(), scale.contiguous(), rstd, mean, dx, pw, ps,
                                   sq, M, S, D, LAYER=layer, PARTIALS=params, HAS_SEQ=has, ROWS=R,
                                   BLOCK_D=next_pow2(D))
    if not params:
        return dx, None, None, None
    n = scale.shape[0]
    dscale = _per_sample(ps, B, S, seq, n).to(scale.dtype)
    if layer:
        return dx, torch.zeros_like(weight), dscale, _per_sample(dy.float(), B, S, seq, n).to(scale.dtype)
    return dx, pw.sum(0).to(weight.dtype), dscale, None


def _stats_ref(x, eps, layer):
    xf = x.float()
    mean = xf.mean(-1) if layer else torch.zeros(xf.shape[:-1], device=x.device)
    xc = xf - mean[..., None]
    rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
    return rstd.reshape(-1), mean.reshape(-1)


def _norm_bwd_ref(dy, x, weight, scale, rstd, mean, layer, params: bool = True):
    B, S, D = x.shape
    xhat = (x.float() - mean.view(B, S, 1)) * rstd.view(B, S, 1)
    s1 = 1 + scale.float()[:, None, :]
    dyf = dy.float()
    if layer:
        gy = dyf * s1
        dx = rstd.view(B, S, 1) * (gy - gy.mean(-1, keepdim=True) - xhat * (gy * xhat).mean(-1, keepdim=True))
        if not params:
            return dx.to(x.dtype), None, None, None
        return dx.to(x.dtype), torch.zeros_like(weight), (dyf * xhat).sum(1).to(scale.dtype), dyf.sum(1).to(scale.dtype)
    gy = dyf * weight.float() * s1
    dx = rstd.view(B, S, 1) * (gy - xhat * (gy * xhat).mean(-1, keepdim=True))
    if not params:
        return dx.to(x.dtype), None, None, None
    return (dx.to(x.dtype), (dyf * xhat * s1).sum((0, 1)).to(weight.dtype),
            (dyf * xhat * weight.float()).sum(1).to(scale.dtype), None)


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::norm_modulate", mutates_args=())
def norm_modulate_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                     layer: bool, seq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, rstd, mean) with the fp32 row statistics saved for the backward. ``seq``: the
    sample of each row of ``x (1, T, D)`` (packed samples of any lengths; ``scale``/``shift`` per sample)."""
    if use_triton(x, weight, scale, shift):
        return _norm_fwd(x, weight, scale, shift, eps, layer, seq)
    if seq is not None:  # the reference: per-row modulation (the kernels read it by seq in place)
        y, rstd, mean = norm_modulate_op(x.view(-1, 1, x.shape[-1]), weight, scale[seq], shift[seq], eps, layer)
        return y.view_as(x), rstd, mean
    rstd, mean = _stats_ref(x, eps, layer)
    y = layer_norm_modulate_ref(x, scale, shift, eps) if layer else rms_norm_modulate_ref(x, weight, scale, eps)
    return y, rstd, mean


@norm_modulate_op.register_fake
def _(x, weight, scale, shift, eps, layer, seq=None):
    m = x.shape[0] * x.shape[1]
    return torch.empty_like(x), x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("dopsd_fast::norm_modulate_backward", mutates_args=())
def norm_modulate_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              rstd: torch.Tensor, mean: torch.Tensor, layer: bool, params: bool,
                              seq: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[dx]``, plus ``[d weight, d scale, d shift]`` when ``params`` (the norm weight or the modulation
    trains); frozen (LoRA) nothing but dx is computed or written."""
    if use_triton(dy, x, weight, scale):
        dx, dw, ds, dt = _norm_bwd(dy, x, weight, scale, rstd, mean, layer, params, seq)
    elif seq is not None:  # the reference on per-row modulation, reduced per sample
        x3 = x.view(-1, 1, x.shape[-1])
        dx, dw, ds, dt = _norm_bwd_ref(dy.reshape(x3.shape), x3, weight, scale[seq], rstd, mean, layer, params)
        dx = dx.view_as(x)
        if params:
            ds = _per_sample(ds.float(), 0, 0, seq, scale.shape[0]).to(scale.dtype)
            dt = _per_sample(dt.float(), 0, 0, seq, scale.shape[0]).to(scale.dtype) if dt is not None else None
    else:
        dx, dw, ds, dt = _norm_bwd_ref(dy, x, weight, scale, rstd, mean, layer, params)
    if not params:
        return [dx]
    return [dx, dw, ds, dt if dt is not None else torch.zeros_like(scale)]


@norm_modulate_backward_op.register_fake
def _(dy, x, weight, scale, rstd, mean, layer, params, seq=None):
    if not params:
        return [torch.empty_like(x)]
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(scale), torch.empty_like(scale)]


def _norm_setup(ctx, inputs, output):
    x, weight, scale, shift, eps, layer, seq = inputs
    ctx.layer = layer
    ctx.save_for_backward(x, weight, scale, output[1], output[2], seq)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the row statistics


def _norm_backward(ctx, dy, _drstd, _dmean):
    if dy is None:
        return (None,) * 7
    x, weight, scale, rstd, mean, seq = ctx.saved_tensors
    params = any(ctx.needs_input_grad[1:4])  # norm weight, scale, shift: frozen under LoRA
    out = norm_modulate_backward_op(dy, x, weight, scale, rstd, mean, ctx.layer, params, seq)
    if not params:
        return out[0], None, None, None, None, None, None
    dx, dw, ds, dt = out
    return dx, (None if ctx.layer else dw), ds, (dt if ctx.layer else None), None, None, None


norm_modulate_op.register_autograd(_norm_backward, setup_context=_norm_setup)


@torch.library.custom_op("dopsd_fast::gated_residual", mutates_args=())
def gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, use_tanh: bool,
                      seq: torch.Tensor | None = None) -> torch.Tensor:
    if not use_triton(x, gate, y):
        if seq is not None:
            x3 = x.view(-1, 1, x.shape[-1])
            return gated_residual_ref(x3, gate[seq], y.reshape(x3.shape), use_tanh).view_as(x)
        return gated_residual_ref(x, gate, y, use_tanh)
    x, y = x.contiguous(), y.contiguous()
    B, S, D, M = _rows(x)
    out = torch.empty_like(x)
    sq, has = _seq_arg(seq, x)
    if M:
        R = rows_per_program(M)
        _gated_fwd_kernel[(triton.cdiv(M, R),)](x, gate.contiguous(), y, out, sq, M, S, D, TANH=use_tanh, HAS_SEQ=has,
                                                ROWS=R, BLOCK_D=next_pow2(D))
    return out


@gated_residual_op.register_fake
def _(x, gate, y, use_tanh, seq=None):
    return torch.empty_like(x)


@torch.library.custom_op("dopsd_fast::gated_residual_backward", mutates_args=())
def gated_residual_backward_op(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, use_tanh: bool,
                               need_gate: bool, seq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dy, d gate); ``need_gate`` False (a frozen gate, LoRA): d gate is empty and nothing of it is
    computed (y is not even read)."""
    B, S, D = y.shape
    if not use_triton(dout, gate, y) and seq is not None:
        y3 = y.view(-1, 1, D)
        dy, dg = gated_residual_backward_op(dout.reshape(y3.shape), gate[seq], y3, use_tanh, need_gate)
        if need_gate:
            dg = _per_sample(dg.float(), 0, 0, seq, gate.shape[0]).to(gate.dtype)
        return dy.view_as(y), dg
    if not use_triton(dout, gate, y):
        g = gate.float()[:, None, :]
        act, dact = (torch.tanh(g), 1 - torch.tanh(g) ** 2) if use_tanh else (g, torch.ones_like(g))
        dg = (dout.float() * y.float() * dact).sum(1).to(gate.dtype) if need_gate else gate.new_empty(0)
        return (dout.float() * act).to(y.dtype), dg
    dout, y = dout.contiguous(), y.contiguous()
    dy = torch.empty_like(y)
    pg = y.new_empty((B * S, D), dtype=torch.float32) if need_gate else y.new_empty(0, dtype=torch.float32)
    sq, has = _seq_arg(seq, y)
    M = B * S
    if M:
        R = rows_per_program(M)
        _gated_bwd_kernel[(triton.cdiv(M, R),)](dout, gate.contiguous(), y, dy, pg, sq, M, S, D, TANH=use_tanh,
                                                PARTIALS=need_gate, HAS_SEQ=has, ROWS=R, BLOCK_D=next_pow2(D))
    return dy, (_per_sample(pg, B, S, seq, gate.shape[0]).to(gate.dtype) if need_gate else gate.new_empty(0))


@gated_residual_backward_op.register_fake
def _(dout, gate, y, use_tanh, need_gate, seq=None):
    return torch.empty_like(y), (torch.empty_like(gate) if need_gate else gate.new_empty(0))


def _gated_setup(ctx, inputs, output):
    x, gate, y, use_tanh, seq = inputs
    ctx.use_tanh = use_tanh
    ctx.save_for_backward(gate, y, seq)


def _gated_backward(ctx, dout):
    gate, y, seq = ctx.saved_tensors
    need_gate = ctx.needs_input_grad[1]
    dy, dg = gated_residual_backward_op(dout, gate, y, ctx.use_tanh, need_gate, seq)
    return dout, (dg if need_gate else None), dy, None, None


gated_residual_op.register_autograd(_gated_backward, setup_context=_gated_setup)


def _norm_gated_ref(x, gate, y, weight, eps, use_tanh, seq):
    """(out, rstd) in PyTorch."""
    yf = y.float()
    rstd = torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)
    g = gate.float()[:, None, :] if seq is None else gate.float()[seq][None]
    g = torch.tanh(g) if use_tanh else g
    out = (x.float() + g * (yf * rstd * weight.float())).to(x.dtype)
    return out, rstd.reshape(-1)


@torch.library.custom_op("dopsd_fast::norm_gated_residual", mutates_args=())
def norm_gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                           use_tanh: bool, seq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out, rstd): ``x + act(gate) * RMSNorm_weight(y)``, the fp32 row rstd of y kept for the backward."""
    if not use_triton(x, gate, y, weight):
        return _norm_gated_ref(x, gate, y, weight, eps, use_tanh, seq)
    x, y = x.contiguous(), y.contiguous()
    B, S, D, M = _rows(x)
    out = torch.empty_like(x)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    sq, has = _seq_arg(seq, x)
    if M:
        R = rows_per_program(M)
        grid = (triton.cdiv(M, R),)
        _norm_gated_fwd_kernel[grid](x, gate.contiguous(), y, weight.contiguous(), out, rstd, sq, M, S, D,
                                     eps, TANH=use_tanh, HAS_SEQ=has, ROWS=R, BLOCK_D=next_pow2(D))
    return out, rstd


@norm_gated_residual_op.register_fake
def _(x, gate, y, weight, eps, use_tanh, seq=None):
    return torch.empty_like(x), x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


@torch.library.custom_op("dopsd_fast::norm_gated_residual_backward", mutates_args=())
def norm_gated_residual_backward_op(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                                    rstd: torch.Tensor, eps: float, use_tanh: bool, params: bool,
                                    seq: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[dy]``, plus ``[d weight, d gate]`` when ``params`` (frozen under LoRA: nothing of them computed)."""
    B, S, D = y.shape
    if not use_triton(dout, gate, y, weight):
        yf, dof = y.float(), dout.float()
        r = torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)
        g = gate.float()[:, None, :] if seq is None else gate.float()[seq][None]
        act = torch.tanh(g) if use_tanh else g
        yhat, dyn = yf * r, dof * act
        gy = dyn * weight.float()
        dy = (r * (gy - yhat * (gy * yhat).mean(-1, keepdim=True))).to(y.dtype)
        if not params:
            return [dy]
        pg = (dof * yhat * weight.float() * ((1 - act * act) if use_tanh else 1.0)).reshape(-1, D)
        return [dy, (dyn * yhat).sum((0, 1)).to(weight.dtype), _per_sample(pg, B, S, seq, gate.shape[0]).to(gate.dtype)]
    dout, y = dout.contiguous(), y.contiguous()
    M = B * S
    dy = torch.empty_like(y)
    pw = y.new_empty((M, D) if params else (0,), dtype=torch.float32)
    pg = y.new_empty((M, D) if params else (0,), dtype=torch.float32)
    sq, has = _seq_arg(seq, y)
    if M:
        R = rows_per_program(M)
        grid = (triton.cdiv(M, R),)
        _norm_gated_bwd_kernel[grid](dout, gate.contiguous(), y, weight.contiguous(), rstd, dy, pw, pg, sq,
                                     M, S, D, TANH=use_tanh, PARTIALS=params, HAS_SEQ=has, ROWS=R,
                                     BLOCK_D=next_pow2(D))
    if not params:
        return [dy]
    return [dy, pw.sum(0).to(weight.dtype), _per_sample(pg, B, S, seq, gate.shape[0]).to(gate.dtype)]


@norm_gated_residual_backward_op.register_fake
def _(dout, gate, y, weight, rstd, eps, use_tanh, params, seq=None):
    if not params:
        return [torch.empty_like(y)]
    return [torch.empty_like(y), torch.empty_like(weight), torch.empty_like(gate)]


def _norm_gated_setup(ctx, inputs, output):
    x, gate, y, weight, eps, use_tanh, seq = inputs
    ctx.use_tanh, ctx.eps = use_tanh, eps
    ctx.save_for_backward(gate, y, weight, output[1], seq)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _norm_gated_backward(ctx, dout, _drstd):
    if dout is None:
        return (None,) * 7
    gate, y, weight, rstd, seq = ctx.saved_tensors
    params = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
    out = norm_gated_residual_backward_op(dout, gate, y, weight, rstd, ctx.eps, ctx.use_tanh, params, seq)
    if not params:
        return dout, None, out[0], None, None, None, None
    return (dout, out[2] if ctx.needs_input_grad[1] else None, out[0], out[1] if ctx.needs_input_grad[3] else None,
            None, None, None)


norm_gated_residual_op.register_autograd(_norm_gated_backward, setup_context=_norm_gated_setup)


# ---- a residual and the next sublayer's norm, fused --------------------------------------------
def _modulation_rows(m, seq):
    """Per-sample modulation (n, D) -> fp32, broadcast over the rows of x (B, S, D) / (1, T, D)."""
    return m.float()[:, None, :] if seq is None else m.float()[seq][None]


def _residual_norm_ref(x, gate, y, post_weight, scale, shift, weight, eps_post, eps, use_tanh, layer, seq):
    """(out, xn, rstd of y, rstd of out, mean of out) in PyTorch."""
    yf = y.float()
    ry = x.new_empty(0, dtype=torch.float32)
    if post_weight is not None:
        r = torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps_post)
        yf, ry = yf * r * post_weight.float(), r.reshape(-1)
    g = _modulation_rows(gate, seq)
    out = (x.float() + (torch.tanh(g) if use_tanh else g) * yf).to(x.dtype)
    of = out.float()
    mean = of.mean(-1, keepdim=True) if layer else torch.zeros_like(of[..., :1])
    oc = of - mean
    ro = torch.rsqrt(oc.pow(2).mean(-1, keepdim=True) + eps)
    s1 = 1 + _modulation_rows(scale, seq)
    xn = oc * ro * s1 + _modulation_rows(shift, seq) if layer else oc * ro * weight.float() * s1
    return out, xn.to(x.dtype), ry, ro.reshape(-1), mean.reshape(-1)


@torch.library.custom_op("dopsd_fast::residual_norm", mutates_args=())
def residual_norm_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, post_weight: torch.Tensor | None,
                     scale: torch.Tensor, shift: torch.Tensor | None, weight: torch.Tensor | None, eps_post: float,
                     eps: float, use_tanh: bool, layer: bool, seq: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, xn, rstd of y, rstd of out, mean of out): the residual ``out = x + act(gate) * N(y)``
    (N: RMSNorm_post_weight, Z-Image's post-norm; none without ``post_weight``, FLUX.2) and the next
    sublayer's input ``xn = RMSNorm_weight(out) * (1 + scale)`` (``layer``: ``LayerNorm(out) * (1 + scale)
    + shift``), in one pass."""
    if not use_triton(x, gate, y, scale):
        return _residual_norm_ref(x, gate, y, post_weight, scale, shift, weight, eps_post, eps, use_tanh, layer, seq)
    x, y = x.contiguous(), y.contiguous()
    B, S, D, M = _rows(x)
    out, xn = torch.empty_like(x), torch.empty_like(x)
    ry = torch.empty(M if post_weight is not None else 0, device=x.device, dtype=torch.float32)
    ro = torch.empty(M, device=x.device, dtype=torch.float32)
    mo = torch.empty(M, device=x.device, dtype=torch.float32)
    sq, has = _seq_arg(seq, x)
    scale = scale.contiguous()
    if M:  # an absent tensor's pointer: one the kernel does not read
        R = rows_per_program(M)
        _residual_norm_fwd_kernel[(triton.cdiv(M, R),)](
            x, gate.contiguous(), y, post_weight.contiguous() if post_weight is not None else scale, scale,
            shift.contiguous() if layer else scale, weight.contiguous() if not layer else scale, out, xn, ry, ro, mo,
            sq, M, S, D, eps_post, eps, TANH=use_tanh, POST_NORM=post_weight is not None, LAYER=layer,
            HAS_SEQ=has, ROWS=R, BLOCK_D=next_pow2(D))
    return out, xn, ry, ro, mo


@residual_norm_op.register_fake
def _(x, gate, y, post_weight, scale, shift, weight, eps_post, eps, use_tanh, layer, seq=None):
    m = x.shape[0] * x.shape[1]
    stat = lambda n: x.new_empty(n, dtype=torch.float32)  # noqa: E731
    return torch.empty_like(x), torch.empty_like(x), stat(m if post_weight is not None else 0), stat(m), stat(m)


def _residual_norm_bwd_ref(dout, dxn, out, gate, y, post_weight, scale, weight, ry, ro, mo, use_tanh, layer, seq):
    shp = out.shape[:-1] + (1,)
    ohat = (out.float() - mo.view(shp)) * ro.view(shp)
    s1 = 1 + _modulation_rows(scale, seq)
    gy = dxn.float() * s1 if layer else dxn.float() * weight.float() * s1
    d = ro.view(shp) * (gy - (gy.mean(-1, keepdim=True) if layer else 0.0) - ohat * (gy * ohat).mean(-1, keepdim=True))
    d = d + dout.float()
    g = _modulation_rows(gate, seq)
    dyn = d * (torch.tanh(g) if use_tanh else g)
    if post_weight is not None:
        r = ry.view(shp)
        yhat, gy2 = y.float() * r, dyn * post_weight.float()
        dyn = r * (gy2 - yhat * (gy2 * yhat).mean(-1, keepdim=True))
    return [d.to(out.dtype), dyn.to(y.dtype)]


@torch.library.custom_op("dopsd_fast::residual_norm_backward", mutates_args=())
def residual_norm_backward_op(dout: torch.Tensor, dxn: torch.Tensor, out: torch.Tensor, gate: torch.Tensor,
                              y: torch.Tensor, post_weight: torch.Tensor | None, scale: torch.Tensor,
                              weight: torch.Tensor | None, ry: torch.Tensor, ro: torch.Tensor, mo: torch.Tensor,
                              use_tanh: bool, layer: bool, seq: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[dx, dy]`` of :func:`residual_norm_op` (dx: out's gradient from below plus the one through the
    norm, summed in the kernel: no separate add pass); the gate, norm weights and modulation frozen."""
    if not use_triton(dout, dxn, out, gate, y, scale):
        return _residual_norm_bwd_ref(dout, dxn, out, gate, y, post_weight, scale, weight, ry, ro, mo, use_tanh,
                                      layer, seq)
    dout, dxn, out, y = dout.contiguous(), dxn.contiguous(), out.contiguous(), y.contiguous()
    B, S, D, M = _rows(out)
    dx, dy = torch.empty_like(out), torch.empty_like(y)
    sq, has = _seq_arg(seq, out)
    scale = scale.contiguous()
    if M:
        R = rows_per_program(M)
        _residual_norm_bwd_kernel[(triton.cdiv(M, R),)](
            dout, dxn, out, gate.contiguous(), y, post_weight.contiguous() if post_weight is not None else scale,
            scale, weight.contiguous() if not layer else scale, ry if post_weight is not None else ro, ro, mo, dx,
            dy, sq, M, S, D, TANH=use_tanh, POST_NORM=post_weight is not None, LAYER=layer, HAS_SEQ=has, ROWS=R,
            BLOCK_D=next_pow2(D))
    return [dx, dy]


@residual_norm_backward_op.register_fake
def _(dout, dxn, out, gate, y, post_weight, scale, weight, ry, ro, mo, use_tanh, layer, seq=None):
    return [torch.empty_like(out), torch.empty_like(y)]


def _residual_norm_setup(ctx, inputs, output):
    x, gate, y, post_weight, scale, shift, weight, eps_post, eps, use_tanh, layer, seq = inputs
    ctx.use_tanh, ctx.layer = use_tanh, layer
    ctx.save_for_backward(output[0], gate, y, post_weight, scale, weight, output[2], output[3], output[4], seq)
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


_FROZEN = ("gate", "post_weight", "scale", "shift", "weight")


def _residual_norm_backward(ctx, dout, dxn, *_stats):
    trains = [n for n, i in zip(_FROZEN, (1, 3, 4, 5, 6)) if ctx.needs_input_grad[i]]
    if trains:
        raise RuntimeError(f"residual_norm: {', '.join(trains)} train, and the fused backward computes dx and dy "
                           "only; use norm_gated_residual / gated_residual and the norm op (FusedOps does)")
    if dout is None and dxn is None:
        return (None,) * 12
    out, gate, y, post_weight, scale, weight, ry, ro, mo, seq = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dxn = torch.zeros_like(out) if dxn is None else dxn
    dx, dy = residual_norm_backward_op(dout, dxn, out, gate, y, post_weight, scale, weight, ry, ro, mo, ctx.use_tanh,
                                       ctx.layer, seq)
    return (dx, None, dy) + (None,) * 9


residual_norm_op.register_autograd(_residual_norm_backward, setup_context=_residual_norm_setup)


# ---- costs (benchmarks/perf_model.py) ---------------------------------------------------------
@register_cost("dopsd_fast::norm_gated_residual")
def _(x, gate, y, weight, eps, use_tanh, seq=None):
    return Cost(0, 3 * nbytes(x) + 4 * x.numel() // x.shape[-1], 1)


@register_cost("dopsd_fast::norm_gated_residual_backward")
def _(dout, gate, y, weight, rstd, eps, use_tanh, params, seq=None):
    if not params:  # read dout and y, write dy
        return Cost(0, 3 * nbytes(y) + nbytes(rstd), 1)
    part = 2 * 4 * y.numel()  # fp32 per-row partials of the norm weight and the gate: write + reduce
    return Cost(0, 3 * nbytes(y) + nbytes(rstd) + 2 * part, 3, scratch=part)
@register_cost("dopsd_fast::norm_modulate")
def _(x, weight, scale, shift, eps, layer, seq=None):
    return Cost(0, 2 * nbytes(x) + nbytes(weight, scale, shift) + 8 * x.numel() // x.shape[-1], 1)


@register_cost("dopsd_fast::norm_modulate_backward")
def _(dy, x, weight, scale, rstd, mean, layer, params, seq=None):
    if not params:  # dx alone: read dy and x, write dx
        return Cost(0, 3 * nbytes(x) + nbytes(rstd, mean), 1)
    part = 4 * x.numel() * (1 if layer else 2)  # fp32 per-row partials for the scale (and weight): write + reduce
    return Cost(0, 3 * nbytes(x) + 2 * part + nbytes(rstd, mean), 5, scratch=part)


@register_cost("dopsd_fast::gated_residual")
def _(x, gate, y, use_tanh, seq=None):
    return Cost(0, 3 * nbytes(x), 1)


@register_cost("dopsd_fast::gated_residual_backward")
def _(dout, gate, y, use_tanh, need_gate, seq=None):
    if not need_gate:  # read dout, write dy
        return Cost(0, 2 * nbytes(y), 1)
    part = 4 * y.numel()
    return Cost(0, 3 * nbytes(y) + 2 * part, 3, scratch=part)


@register_cost("dopsd_fast::residual_norm")
def _(x, gate, y, post_weight, scale, shift, weight, eps_post, eps, use_tanh, layer, seq=None):
    rows = x.numel() // x.shape[-1]  # read x and y, write out and xn; fp32 row statistics
    return Cost(0, 4 * nbytes(x) + 4 * rows * (3 if post_weight is not None else 2), 1)


@register_cost("dopsd_fast::residual_norm_backward")
def _(dout, dxn, out, gate, y, post_weight, scale, weight, ry, ro, mo, use_tanh, layer, seq=None):
    # read dout, dxn, out (and y under a post-norm), write dx and dy
    return Cost(0, (6 if post_weight is not None else 5) * nbytes(out) + nbytes(ry, ro, mo), 1)


# ---- entry points ----------------------------------------------------------------------------
def _check(x, *mods, seq=None):
    if x.ndim != 3:
        raise ValueError(f"expected x of shape (B, S, D), got {tuple(x.shape)}")
    if seq is not None:  # packed samples: x (1, T, D), per-sample modulation (n, D), seq (T,) sample indices
        if x.shape[0] != 1 or seq.shape != (x.shape[1],) or seq.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"with seq, x must be (1, T, D) and seq (T,) integer sample indices; got x "
                             f"{tuple(x.shape)}, seq {tuple(seq.shape)} {seq.dtype}")
        for m in mods:
            if m.ndim != 2 or m.shape[1] != x.shape[2]:
                raise ValueError(f"modulation must be (samples, D={x.shape[2]}), got {tuple(m.shape)}")
        return
    for m in mods:
        if m.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"modulation must be (B, D) = {(x.shape[0], x.shape[2])}, got {tuple(m.shape)}")


def rms_norm_modulate(x, weight, scale, eps: float = 1e-5, seq=None):
    """Z-Image: ``RMSNorm_w(x) * (1 + scale)``. ``seq``: with ``x (1, T, D)`` packing samples of any
    lengths, the sample index of each row (``scale`` per sample, read in place: no per-row copy)."""
    _check(x, scale, seq=seq)
    return norm_modulate_op(x, weight, scale, torch.zeros_like(scale), eps, False, seq)[0]


def layer_norm_modulate(x, scale, shift, eps: float = 1e-6, seq=None):
    """FLUX.2: ``LayerNorm_noaffine(x) * (1 + scale) + shift`` (``seq`` as in :func:`rms_norm_modulate`)."""
    _check(x, scale, shift, seq=seq)
    return norm_modulate_op(x, x.new_ones(x.shape[-1]), scale, shift, eps, True, seq)[0]


def gated_residual(x, gate, y, use_tanh: bool = True, seq=None):
    """``x + tanh(gate) * y`` (Z-Image) or ``x + gate * y`` (FLUX.2, ``use_tanh=False``); ``seq`` as in
    :func:`rms_norm_modulate`."""
    _check(x, gate, seq=seq)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: y {tuple(y.shape)} must match x {tuple(x.shape)}")
    return gated_residual_op(x, gate, y, use_tanh, seq)


def norm_gated_residual(x, gate, y, weight, eps: float = 1e-5, use_tanh: bool = True, seq=None):
    """Z-Image's residual: ``x + tanh(gate) * RMSNorm_weight(y)`` in one pass (``seq`` as in
    :func:`rms_norm_modulate`); differentiable in x, y, and the weight and gate where they train."""
    _check(x, gate, seq=seq)
    if y.shape != x.shape or weight.shape != (x.shape[-1],):
        raise ValueError(f"norm_gated_residual: y {tuple(y.shape)} must match x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)} be ({x.shape[-1]},)")
    return norm_gated_residual_op(x, gate, y, weight, float(eps), use_tanh, seq)[0]


def residual_norm(x, gate, y, scale, *, post_weight=None, weight=None, shift=None, eps_post: float = 1e-5,
                  eps: float = 1e-5, use_tanh: bool = True, layer: bool = False, seq=None):
    """``(out, xn)``: a block's residual and the next sublayer's normalized, modulated input in one pass.

    * Z-Image: ``out = x + tanh(gate) * RMSNorm_post_weight(y)``, ``xn = RMSNorm_weight(out) * (1 + scale)``;
    * FLUX.2 (``post_weight=None, use_tanh=False, layer=True``): ``out = x + gate * y``,
      ``xn = LayerNorm(out) * (1 + scale) + shift``.

    Differentiable in x and y (the backward sums out's two gradients in its kernel); the gate, the
    norms' weights and the modulation must be frozen (LoRA): where they train, use the unfused ops."""
    if not layer and weight is None:
        raise ValueError("residual_norm: the RMS norm (layer=False) needs its weight")
    if layer and shift is None:
        raise ValueError("residual_norm: the LayerNorm (layer=True) needs its shift")
    _check(x, gate, scale, *([shift] if layer else []), seq=seq)
    D = x.shape[-1]
    if y.shape != x.shape:
        raise ValueError(f"residual_norm: y {tuple(y.shape)} must match x {tuple(x.shape)}")
    for name, w in (("post_weight", post_weight), ("weight", None if layer else weight)):
        if w is not None and w.shape != (D,):
            raise ValueError(f"residual_norm: {name} {tuple(w.shape)} must be ({D},)")
    out, xn = residual_norm_op(x, gate, y, post_weight, scale, shift if layer else None,
                               None if layer else weight, float(eps_post), float(eps), use_tanh, layer, seq)[:2]
    return out, xn
