"""Flash attention, forward and backward: packed variable-length sequences, non-causal, returning the
log-sum-exp, plus the dual-branch mode of the teacher/student double forward.

Layout (as flash-attn's varlen API): ``q (Tq, H, D)``, ``k, v (Tk, H, D)`` packed over the batch,
``cu_seqlens_q / cu_seqlens_k`` int32 ``(B + 1)`` offsets; sample ``b`` attends
``q[cu_q[b]:cu_q[b+1]]`` to ``k[cu_k[b]:cu_k[b+1]]``; no padding token is ever computed. ``lse`` is
``(H, Tq)`` fp32, natural log. A sample with no keys gives output 0 and lse -inf.

**Dual-branch mode** (:func:`dual_branch_attention`). Per sample the student queries attend to
``[shared_b ; student_b]`` and the teacher queries to ``[shared_b ; teacher_b]``; ``shared`` holds the
key/value rows that are identical in both branches, stored once. Both branches run in ONE launch,
one branch per program (grid axis 0 interleaves the student and teacher tiles of a query block), so
a program holds one query tile and one accumulator: the register budget of a plain attention (the
earlier design, both branches' tiles in one program to reuse each shared K/V tile from registers,
did not compile for sm_90 and, renamed, spilled at 255 registers). Shared tiles are read by both
branches' programs, from L2 when they run side by side. What it saves over two calls is one launch
and, where a shared segment exists, its memory; the FLOPs are those of two attentions. The fast
models pass an empty shared segment: with LoRA on q/k/v (and in full fine-tuning) the two branches'
keys and values differ at every layer, so nothing is exactly shared there. Keys are order-free in
attention, so the result equals two separate calls on the concatenated key sets. The backward
computes the student branch only (the teacher's outputs are constants: no gradient reaches the
teacher queries or the teacher's private keys; shared keys get the student's gradient).

Forward: one launch. Backward: ``delta = rowsum(o * do)`` (one small kernel: o and dO read once in
their own dtype, fp32 delta written in the (H, T) layout the others read), a dK/dV kernel
(one program per key tile, over the shared and the private segment) and a dQ kernel (one program per
query tile): no atomics, deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels._common import Cost, attention_pairs, dot_flags, interpreting, mma, nbytes, next_pow2, register_cost, use_triton

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---- reference -------------------------------------------------------------------------------
def attention_varlen_ref(q, k, v, cu_q, cu_k, scale=None):
    """Per-sample softmax attention in fp32; returns ``(o in q's dtype, lse (H, Tq) fp32)``."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if qe == qs or ke == ks:
            continue
        s = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), k[ks:ke].float()) * scale
        lse[:, qs:qe] = torch.logsumexp(s, dim=-1)
        o[qs:qe] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v[ks:ke].float())
    return o.to(q.dtype), lse


def _concat_kv(cu_a, a, cu_b, b):
    """Per sample ``[a_b ; b_b]`` packed: the key set a branch attends to."""
    ca, cb = cu_a.tolist(), cu_b.tolist()
    parts = []
    for i in range(len(ca) - 1):
        parts += [a[ca[i]:ca[i + 1]], b[cb[i]:cb[i + 1]]]
    cu = torch.as_tensor([0] + [ca[i + 1] - ca[i] + cb[i + 1] - cb[i] for i in range(len(ca) - 1)]).cumsum(0)
    return torch.cat(parts), cu.to(torch.int32)


# ---- kernels ---------------------------------------------------------------------------------
@triton.jit
def _load_rows(P, start, m0, length, h, H, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    offs = m0 + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    mask = (offs < length)[:, None] & (d < D)[None, :]
    return tl.load(P + (start + offs)[:, None] * H * D + h * D + d[None, :], mask=mask, other=0.0), offs < length


@triton.jit
def _segment(CU, b):
    """(start, length) of sample ``b``'s rows from its int32 offsets."""
    start = tl.load(CU + b)
    return start, tl.load(CU + b + 1) - start


@triton.jit
def _store_rows(P, x, start, m0, length, h, H, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    offs = m0 + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    mask = (offs < length)[:, None] & (d < D)[None, :]
    tl.store(P + (start + offs)[:, None] * H * D + h * D + d[None, :], x.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _online_update(q, k, v, kmask, acc, m_i, l_i, scale2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    s = mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE, UPCAST) * scale2
    s = tl.where(kmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attend(q, K, V, start, length, h, H, D, acc, m_i, l_i, scale2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    for n0 in range(0, length, BLOCK_N):
        k, kmask = _load_rows(K, start, n0, length, h, H, D, BLOCK_N, BLOCK_D)
        v, vmask = _load_rows(V, start, n0, length, h, H, D, BLOCK_N, BLOCK_D)
        acc, m_i, l_i = _online_update(q, k, v, kmask, acc, m_i, l_i, scale2, BLOCK_M, BLOCK_N, IEEE, UPCAST)
    return acc, m_i, l_i


@triton.jit
def _finish(O, L, acc, m_i, l_i, start, m0, length, h, H, D, T, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    _store_rows(O, o, start, m0, length, h, H, D, BLOCK_M, BLOCK_D)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    offs = m0 + tl.arange(0, BLOCK_M)
    tl.store(L + h * T + start + offs, lse, mask=offs < length)


@triton.jit
def _fwd_branch(Q, KA, VA, KB, VB, O, L, CU_Q, CU_A, CU_B, T, H, D, scale2, m0, b, h, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One query tile of one branch attends to its two key segments ``[A_b ; B_b]``."""
    q_start, q_len = _segment(CU_Q, b)
    act = m0 < q_len
    a_start, a_len = _segment(CU_A, b)
    b_start, b_len = _segment(CU_B, b)
    q, qmask = _load_rows(Q, q_start, m0, q_len, h, H, D, BLOCK_M, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc, m_i, l_i = _attend(q, KA, VA, a_start, tl.where(act, a_len, 0), h, H, D, acc, m_i, l_i, scale2,
                            BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)
    acc, m_i, l_i = _attend(q, KB, VB, b_start, tl.where(act, b_len, 0), h, H, D, acc, m_i, l_i, scale2,
                            BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)
    _finish(O, L, acc, m_i, l_i, q_start, m0, q_len, h, H, D, T, BLOCK_M, BLOCK_D)


@triton.jit(do_not_specialize=["T1", "T2"])  # chosen per program at run time: one type for both
def _fwd_kernel(Q1, Q2, KA, VA, KB, VB, KC, VC, O1, O2, L1, L2, CU_Q1, CU_Q2, CU_A, CU_B, CU_C, T1, T2, H, D, scale2,
                N_BRANCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Branch 1 attends to A + B; with N_BRANCH=2, branch 2 attends to A + C in the same launch.

    One branch per program (grid axis 0 = query tile x branch, branch fastest): the register
    footprint of a single attention (one query tile, one accumulator). Holding both branches' tiles
    in one program, to reuse each shared K/V tile from registers, needs two of each and spills on
    sm_90 (255 registers measured by the compile gate); the shared segment is still stored once and
    the two branches' programs of a tile run side by side, so its tiles are read from L2."""
    pid = tl.program_id(0)
    m0 = (pid // N_BRANCH) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if pid % N_BRANCH == 0:
        Q, KB_, VB_, O, L, CU_Q, CU_B_, T = Q1, KB, VB, O1, L1, CU_Q1, CU_B, T1
    else:
        Q, KB_, VB_, O, L, CU_Q, CU_B_, T = Q2, KC, VC, O2, L2, CU_Q2, CU_C, T2
    _fwd_branch(Q, KA, VA, KB_, VB_, O, L, CU_Q, CU_A, CU_B_, T, H, D, scale2, m0, b, h, BLOCK_M, BLOCK_N, BLOCK_D,
                IEEE, UPCAST)


@triton.jit
def _dkdv_tile(Q, DO, LSE, DELTA, K, V, DK, DV, k_start, n0, k_len, q_start, q_len, h, H, D, Tq, scale, scale2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr):
    k, kmask = _load_rows(K, k_start, n0, k_len, h, H, D, BLOCK_N, BLOCK_D)
    v, vmask = _load_rows(V, k_start, n0, k_len, h, H, D, BLOCK_N, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, tl.where(n0 < k_len, q_len, 0), BLOCK_M):
        q, qmask = _load_rows(Q, q_start, m0, q_len, h, H, D, BLOCK_M, BLOCK_D)
        do, domask = _load_rows(DO, q_start, m0, q_len, h, H, D, BLOCK_M, BLOCK_D)
        rows = q_start + m0 + tl.arange(0, BLOCK_M)
        lse2 = tl.load(LSE + h * Tq + rows, mask=qmask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + h * Tq + rows, mask=qmask, other=0.0)
        # S^T, P^T, dP^T directly (K Q^T, V dO^T): the (BLOCK_N, BLOCK_M) tiles are the A operands of
        # the dV and dK products as they are, with no register transpose; transposing P and dS in
        # registers serialised the wgmma pipeline (ptxas advisory C7515, compile gate).
        s_t = mma(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), IEEE, UPCAST) * scale2
        p_t = tl.where(kmask[:, None] & qmask[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
        dv = mma(p_t.to(do.dtype), do, dv, IEEE, UPCAST)
        dp_t = mma(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), IEEE, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(q.dtype), q, dk, IEEE, UPCAST)
    _store_rows(DK, dk * scale, k_start, n0, k_len, h, H, D, BLOCK_N, BLOCK_D)
    _store_rows(DV, dv, k_start, n0, k_len, h, H, D, BLOCK_N, BLOCK_D)


@triton.jit
def _delta_kernel(O, DO, DELTA, Tq, H, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, t] = sum_d o[t, h, d] * do[t, h, d] in fp32 (o, do: (T, H, D) contiguous)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < Tq) & (cols[None, :] < D)
    off = rows[:, None] * (H * D) + h * D + cols[None, :]
    o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + h * Tq + rows, tl.sum(o * do, axis=1), mask=rows < Tq)


@triton.jit
def _dkdv_kernel(Q, DO, LSE, DELTA, KA, VA, KB, VB, DKA, DVA, DKB, DVB, CU_Q, CU_A, CU_B, NBLK_A, Tq, H, D, scale,
                 scale2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, q_len = _segment(CU_Q, b)
    # One code path for both key segments (pointers chosen per program): one copy of the loop, so
    # one shared-memory budget and one register allocation.
    if pid < NBLK_A:
        K, V, DK, DV, CU_K, n0 = KA, VA, DKA, DVA, CU_A, pid * BLOCK_N
    else:
        K, V, DK, DV, CU_K, n0 = KB, VB, DKB, DVB, CU_B, (pid - NBLK_A) * BLOCK_N
    k_start, k_len = _segment(CU_K, b)
    _dkdv_tile(Q, DO, LSE, DELTA, K, V, DK, DV, k_start, n0, k_len, q_start, q_len, h, H, D, Tq, scale, scale2,
               BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, qmask, K, V, start, length, h, H, D, scale2, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    for n0 in range(0, length, BLOCK_N):
        k, kmask = _load_rows(K, start, n0, length, h, H, D, BLOCK_N, BLOCK_D)
        v, vmask = _load_rows(V, start, n0, length, h, H, D, BLOCK_N, BLOCK_D)
        s = mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE, UPCAST) * scale2
        p = tl.where(qmask[:, None] & kmask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq, IEEE, UPCAST)
    return dq


@triton.jit
def _dq_kernel(Q, DO, LSE, DELTA, KA, VA, KB, VB, DQ, CU_Q, CU_A, CU_B, Tq, H, D, scale, scale2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, q_len = _segment(CU_Q, b)
    act = m0 < q_len
    a_start, a_len = _segment(CU_A, b)
    b_start, b_len = _segment(CU_B, b)
    q, qmask = _load_rows(Q, q_start, m0, q_len, h, H, D, BLOCK_M, BLOCK_D)
    do, domask = _load_rows(DO, q_start, m0, q_len, h, H, D, BLOCK_M, BLOCK_D)
    rows = q_start + m0 + tl.arange(0, BLOCK_M)
    lse2 = tl.load(LSE + h * Tq + rows, mask=qmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * Tq + rows, mask=qmask, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dq = _dq_loop(dq, q, do, lse2, delta, qmask, KA, VA, a_start, tl.where(act, a_len, 0), h, H, D, scale2,
                  BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)
    dq = _dq_loop(dq, q, do, lse2, delta, qmask, KB, VB, b_start, tl.where(act, b_len, 0), h, H, D, scale2,
                  BLOCK_M, BLOCK_N, BLOCK_D, IEEE, UPCAST)
    _store_rows(DQ, dq * scale, q_start, m0, q_len, h, H, D, BLOCK_M, BLOCK_D)


# ---- launchers -------------------------------------------------------------------------------
def _cfg(D, backward=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if interpreting():
        return 16, 16, 4, 1
    if backward:
        return 64, 64, (8 if D > 64 else 4), 2
    return 128, 64, (8 if D > 64 else 4), 3


def _empty_like_kv(k):
    return k.new_empty((0,) + tuple(k.shape[1:]))


def _fwd(q1, ka, va, kb, vb, cu_q1, cu_a, cu_b, max_q, scale, q2=None, kc=None, vc=None, cu_q2=None, cu_c=None):
    T1, H, D = q1.shape
    dual = q2 is not None
    o1 = torch.empty_like(q1)
    l1 = torch.empty((H, T1), device=q1.device, dtype=torch.float32)
    if dual:
        o2 = torch.empty_like(q2)
        l2 = torch.empty((H, q2.shape[0]), device=q1.device, dtype=torch.float32)
    else:
        q2, kc, vc, cu_q2, cu_c, o2, l2 = q1, ka, va, cu_q1, cu_a, o1, l1
    B = cu_q1.numel() - 1
    BM, BN, warps, stages = _cfg(D)
    if max_q > 0 and B > 0 and H > 0:
        nb = 2 if dual else 1
        _fwd_kernel[(triton.cdiv(max_q, BM) * nb, B * H)](
            q1, q2, ka, va, kb, vb, kc, vc, o1, o2, l1, l2, cu_q1, cu_q2, cu_a, cu_b, cu_c, T1, q2.shape[0], H, D,
            scale * _LOG2E, N_BRANCH=nb, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=max(16, next_pow2(D)), num_warps=warps,
            num_stages=stages, **dot_flags(q1.dtype))
    else:
        o1.zero_(), l1.fill_(float("-inf"))
        if dual:
            o2.zero_(), l2.fill_(float("-inf"))
    return (o1, l1, o2, l2) if dual else (o1, l1)


def _bwd(do, q, o, lse, ka, va, kb, vb, cu_q, cu_a, cu_b, max_q, max_a, max_b, scale):
    Tq, H, D = q.shape
    do, o = do.contiguous(), o.contiguous()
    delta = torch.empty((H, Tq), device=q.device, dtype=torch.float32)
    if Tq and H:
        BMD = 16 if interpreting() else 64
        _delta_kernel[(triton.cdiv(Tq, BMD), H)](o, do, delta, Tq, H, D, BLOCK_M=BMD, BLOCK_D=max(16, next_pow2(D)))
    dq = torch.empty_like(q)
    # the dK/dV kernel writes every key row its offsets cover (zeros where no query attends), and the
    # offsets cover every row (checked by the entry points): empty, not zero-filled
    dka, dva, dkb, dvb = (torch.empty_like(t) for t in (ka, va, kb, vb))
    B = cu_q.numel() - 1
    BM, BN, warps, stages = _cfg(D, backward=True)
    flags = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=max(16, next_pow2(D)), num_warps=warps, num_stages=stages,
                 **dot_flags(q.dtype))
    if B == 0 or H == 0 or max_q == 0:
        return dq.zero_(), dka.zero_(), dva.zero_(), dkb.zero_(), dvb.zero_()
    nblk_a, nblk_b = triton.cdiv(max_a, BN), triton.cdiv(max_b, BN)
    if nblk_a + nblk_b:
        _dkdv_kernel[(nblk_a + nblk_b, B * H)](q, do, lse, delta, ka, va, kb, vb, dka, dva, dkb, dvb, cu_q, cu_a,
                                               cu_b, nblk_a, Tq, H, D, scale, scale * _LOG2E, **flags)
    _dq_kernel[(triton.cdiv(max_q, BM), B * H)](q, do, lse, delta, ka, va, kb, vb, dq, cu_q, cu_a, cu_b, Tq, H, D,
                                                scale, scale * _LOG2E, **flags)
    return dq, dka, dva, dkb, dvb


def _bwd_ref(do, q, ka, va, kb, vb, cu_q, cu_a, cu_b, scale):
    """The backward of softmax attention over per-sample keys ``[A_b ; B_b]`` in closed form, fp32 (it runs
    inside a custom op's body, where autograd records nothing): ``dV = P^T dO``, ``dS = P (dO V^T - delta)``
    with ``delta = rowsum(P * dO V^T)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``."""
    f = [t.float() for t in (do, q, ka, va, kb, vb)]
    do32, q32, ka32, va32, kb32, vb32 = f
    dq, dka, dva, dkb, dvb = (torch.zeros_like(t) for t in (q32, ka32, va32, kb32, vb32))
    cq, ca, cb = cu_q.tolist(), cu_a.tolist(), cu_b.tolist()
    for i in range(len(cq) - 1):
        qs, qe, as_, ae, bs, be = cq[i], cq[i + 1], ca[i], ca[i + 1], cb[i], cb[i + 1]
        if qe == qs or (ae == as_ and be == bs):
            continue
        k = torch.cat([ka32[as_:ae], kb32[bs:be]])
        v = torch.cat([va32[as_:ae], vb32[bs:be]])
        qi, doi = q32[qs:qe], do32[qs:qe]
        p = torch.softmax(torch.einsum("qhd,khd->hqk", qi, k) * scale, dim=-1)
        dv = torch.einsum("hqk,qhd->khd", p, doi)
        dp = torch.einsum("qhd,khd->hqk", doi, v)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, k) * scale
        dk = torch.einsum("hqk,qhd->khd", ds, qi) * scale
        na = ae - as_
        dka[as_:ae], dkb[bs:be], dva[as_:ae], dvb[bs:be] = dk[:na], dk[na:], dv[:na], dv[na:]
    return tuple(g.to(t.dtype) for g, t in zip((dq, dka, dva, dkb, dvb), (q, ka, va, kb, vb)))


def _two_source_ref(q, ka, va, kb, vb, cu_q, cu_a, cu_b, scale):
    k, cu_k = _concat_kv(cu_a, ka, cu_b, kb)
    v, _ = _concat_kv(cu_a, va, cu_b, vb)
    return attention_varlen_ref(q, k, v, cu_q, cu_k, scale)


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::flash_attn_varlen", mutates_args=())
def flash_attn_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                         max_q: int, max_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q, k, v):
        e = _empty_like_kv(k)
        return _fwd(q, k, v, e, e, cu_q, cu_k, torch.zeros_like(cu_k), max_q, scale)
    return attention_varlen_ref(q, k, v, cu_q, cu_k, scale)


@flash_attn_varlen_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dopsd_fast::attn_varlen_backward", mutates_args=())
def attn_varlen_backward_op(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, ka: torch.Tensor,
                            va: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, cu_q: torch.Tensor,
                            cu_a: torch.Tensor, cu_b: torch.Tensor, max_q: int, max_a: int, max_b: int,
                            scale: float) -> list[torch.Tensor]:
    """Gradients of one branch whose keys are ``[A_b ; B_b]`` per sample: (dq, dkA, dvA, dkB, dvB)."""
    if use_triton(do, q, ka, va):
        return list(_bwd(do, q, o, lse, ka, va, kb, vb, cu_q, cu_a, cu_b, max_q, max_a, max_b, scale))
    return list(_bwd_ref(do, q, ka, va, kb, vb, cu_q, cu_a, cu_b, scale))


@attn_varlen_backward_op.register_fake
def _(do, q, o, lse, ka, va, kb, vb, cu_q, cu_a, cu_b, max_q, max_a, max_b, scale):
    return [torch.empty_like(q), torch.empty_like(ka), torch.empty_like(va), torch.empty_like(kb), torch.empty_like(vb)]


def _single_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    ctx.args = (max_q, max_k, scale)
    ctx.save_for_backward(q, k, v, cu_q, cu_k, output[0], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _single_backward(ctx, do, _dlse):
    if do is None:
        return (None,) * 8
    q, k, v, cu_q, cu_k, o, lse = ctx.saved_tensors
    max_q, max_k, scale = ctx.args
    e = _empty_like_kv(k)
    dq, dk, dv, _, _ = attn_varlen_backward_op(do, q, o, lse, k, v, e, e, cu_q, cu_k, torch.zeros_like(cu_k), max_q,
                                               max_k, 0, scale)
    return dq, dk, dv, None, None, None, None, None


flash_attn_varlen_op.register_autograd(_single_backward, setup_context=_single_setup)


@torch.library.custom_op("dopsd_fast::dual_branch_attention", mutates_args=())
def dual_branch_attention_op(q_s: torch.Tensor, q_t: torch.Tensor, k_sh: torch.Tensor, v_sh: torch.Tensor,
                             k_s: torch.Tensor, v_s: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                             cu_q_s: torch.Tensor, cu_q_t: torch.Tensor, cu_sh: torch.Tensor, cu_s: torch.Tensor,
                             cu_t: torch.Tensor, max_q: int, max_sh: int, max_s: int, max_t: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (o_s, lse_s, o_t, lse_t)."""
    if use_triton(q_s, q_t, k_sh, k_s, k_t):
        return _fwd(q_s, k_sh, v_sh, k_s, v_s, cu_q_s, cu_sh, cu_s, max_q, scale, q2=q_t, kc=k_t, vc=v_t,
                    cu_q2=cu_q_t, cu_c=cu_t)
    o_s, l_s = _two_source_ref(q_s, k_sh, v_sh, k_s, v_s, cu_q_s, cu_sh, cu_s, scale)
    o_t, l_t = _two_source_ref(q_t, k_sh, v_sh, k_t, v_t, cu_q_t, cu_sh, cu_t, scale)
    return o_s, l_s, o_t, l_t


@dual_branch_attention_op.register_fake
def _(q_s, q_t, k_sh, v_sh, k_s, v_s, k_t, v_t, cu_q_s, cu_q_t, cu_sh, cu_s, cu_t, max_q, max_sh, max_s, max_t, scale):
    f32 = torch.float32
    return (torch.empty_like(q_s), q_s.new_empty((q_s.shape[1], q_s.shape[0]), dtype=f32), torch.empty_like(q_t),
            q_t.new_empty((q_t.shape[1], q_t.shape[0]), dtype=f32))


def _dual_setup(ctx, inputs, output):
    q_s, q_t, k_sh, v_sh, k_s, v_s, k_t, v_t, cu_q_s, cu_q_t, cu_sh, cu_s, cu_t, max_q, max_sh, max_s, max_t, scale = inputs
    ctx.args = (max_q, max_sh, max_s, scale)
    ctx.save_for_backward(q_s, k_sh, v_sh, k_s, v_s, cu_q_s, cu_sh, cu_s, output[0], output[1])
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the teacher's output and the lse


def _dual_backward(ctx, do_s, _dl_s, _do_t, _dl_t):
    q_s, k_sh, v_sh, k_s, v_s, cu_q_s, cu_sh, cu_s, o_s, lse_s = ctx.saved_tensors
    max_q, max_sh, max_s, scale = ctx.args
    if do_s is None:
        return (None,) * 18
    dq, dksh, dvsh, dks, dvs = attn_varlen_backward_op(do_s, q_s, o_s, lse_s, k_sh, v_sh, k_s, v_s, cu_q_s, cu_sh,
                                                       cu_s, max_q, max_sh, max_s, scale)
    return (dq, None, dksh, dvsh, dks, dvs) + (None,) * 12


dual_branch_attention_op.register_autograd(_dual_backward, setup_context=_dual_setup)


# ---- costs (benchmarks/perf_model.py) ---------------------------------------------------------
def _attn_flops(q, kv_pairs):
    return 4.0 * q.shape[1] * q.shape[2] * kv_pairs


@register_cost("dopsd_fast::flash_attn_varlen")
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return Cost(_attn_flops(q, attention_pairs(cu_q, cu_k, q.shape[0], k.shape[0])),
                nbytes(q, k, v) + 2 * nbytes(q) + 4 * q.shape[0] * q.shape[1], 1, "attn_fwd")


@register_cost("dopsd_fast::dual_branch_attention")
def _(q_s, q_t, k_sh, v_sh, k_s, v_s, k_t, v_t, cu_q_s, cu_q_t, cu_sh, cu_s, cu_t, max_q, max_sh, max_s, max_t, scale):
    pairs = (attention_pairs(cu_q_s, cu_sh, q_s.shape[0], k_sh.shape[0]) + attention_pairs(cu_q_s, cu_s, q_s.shape[0], k_s.shape[0])
             + attention_pairs(cu_q_t, cu_sh, q_t.shape[0], k_sh.shape[0])
             + attention_pairs(cu_q_t, cu_t, q_t.shape[0], k_t.shape[0]))
    out = 2 * nbytes(q_s, q_t) + 4 * (q_s.shape[0] + q_t.shape[0]) * q_s.shape[1]
    return Cost(_attn_flops(q_s, pairs), nbytes(q_s, q_t, k_sh, v_sh, k_s, v_s, k_t, v_t) + out, 1, "attn_fwd")


@register_cost("dopsd_fast::attn_varlen_backward")
def _(do, q, o, lse, ka, va, kb, vb, cu_q, cu_a, cu_b, max_q, max_a, max_b, scale):
    pairs = attention_pairs(cu_q, cu_a, q.shape[0], ka.shape[0]) + attention_pairs(cu_q, cu_b, q.shape[0], kb.shape[0])
    # delta = rowsum(o * do): one kernel reading o and dO once, writing fp32 (H, T); then the dK/dV kernel (S, P, dV, dP, dK: 4 products) and the dQ kernel (S, P, dP, dQ again: 3):
    # 7 products against the forward's 2 -> 3.5x its FLOPs
    delta_bytes = nbytes(o, do) + 4 * q.shape[0] * q.shape[1]
    kernel_bytes = nbytes(q, do, ka, va, kb, vb) * 2 + 8 * q.shape[0] * q.shape[1]
    return Cost(3.5 * _attn_flops(q, pairs), delta_bytes + kernel_bytes, 3, "attn_bwd")


# ---- entry points ----------------------------------------------------------------------------
def _check_cu(name, cu, total):
    if cu.ndim != 1 or cu.numel() < 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected a 1-D int tensor of B + 1 offsets, got {tuple(cu.shape)} {cu.dtype}")
    c = cu.tolist()
    if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] != total:
        raise ValueError(f"{name}: offsets must start at 0, never decrease and end at {total} rows, got {c}")
    return cu.to(torch.int32).contiguous(), max((b - a for a, b in zip(c, c[1:])), default=0)


def _check_qkv(*named):
    shape = dtype = None
    for name, t in named:
        if t.ndim != 3:
            raise ValueError(f"{name}: expected (tokens, heads, head_dim), got {tuple(t.shape)}")
        if shape is not None and t.shape[1:] != shape:
            raise ValueError(f"{name}: heads/head_dim {tuple(t.shape[1:])} differ from {tuple(shape)}")
        if dtype is not None and t.dtype != dtype:  # the kernel's dots take one dtype (a GPU compile error)
            raise ValueError(f"{name} is {t.dtype}, {named[0][0]} is {dtype}: attention takes one dtype")
        shape, dtype = t.shape[1:], t.dtype


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float | None = None,
                      max_seqlen_q: int | None = None, max_seqlen_k: int | None = None):
    """Packed variable-length attention -> ``(o (Tq, H, D), lse (H, Tq) fp32)``; differentiable in q, k, v.

    With ``max_seqlen_q``/``max_seqlen_k`` given (int32 contiguous offsets assumed valid: from 0 to the
    row count, non-decreasing; the backward writes only the rows they cover), the offsets
    are not read back to the host: no device sync, capturable in a CUDA graph."""
    _check_qkv(("q", q), ("k", k), ("v", v))
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} rows but v has {v.shape[0]}")
    if max_seqlen_q is not None and max_seqlen_k is not None:
        cu_q, max_q, cu_k, max_k = cu_seqlens_q, int(max_seqlen_q), cu_seqlens_k, int(max_seqlen_k)
    else:
        cu_q, max_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        cu_k, max_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel() - 1} samples, cu_seqlens_k {cu_k.numel() - 1}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return flash_attn_varlen_op(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, float(scale))


def dual_branch_attention(q_s, q_t, shared_kv, student_kv, teacher_kv, cu_seqlens_q_s, cu_seqlens_q_t,
                          softmax_scale: float | None = None, max_seqlens: tuple | None = None):
    """The double forward's attention in one launch.

    ``shared_kv``, ``student_kv``, ``teacher_kv``: ``(k, v, cu_seqlens)`` each, packed over the same B
    samples (a segment may be empty for some or all samples). Returns ``(o_s, lse_s, o_t, lse_t)``;
    only ``o_s``/``lse_s`` are differentiable (to ``q_s``, the shared and the student keys/values).
    ``max_seqlens=(max query rows, max shared, max student, max teacher keys)`` skips reading the
    offsets back to the host (no sync; capturable in a CUDA graph).
    """
    (k_sh, v_sh, cu_sh), (k_s, v_s, cu_s), (k_t, v_t, cu_t) = shared_kv, student_kv, teacher_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_s.shape[-1])
    c = lambda t: t.contiguous()  # noqa: E731
    if max_seqlens is not None:
        mq, m_sh, m_s, m_t = (int(m) for m in max_seqlens)
        return dual_branch_attention_op(c(q_s), c(q_t), c(k_sh), c(v_sh), c(k_s), c(v_s), c(k_t), c(v_t), cu_seqlens_q_s,
                                        cu_seqlens_q_t, cu_sh, cu_s, cu_t, mq, m_sh, m_s, m_t, float(scale))
    _check_qkv(("q_s", q_s), ("q_t", q_t), ("k_shared", k_sh), ("v_shared", v_sh), ("k_student", k_s),
               ("v_student", v_s), ("k_teacher", k_t), ("v_teacher", v_t))
    cu_q_s, mq_s = _check_cu("cu_seqlens_q_s", cu_seqlens_q_s, q_s.shape[0])
    cu_q_t, mq_t = _check_cu("cu_seqlens_q_t", cu_seqlens_q_t, q_t.shape[0])
    cu_sh, m_sh = _check_cu("shared cu_seqlens", cu_sh, k_sh.shape[0])
    cu_s, m_s = _check_cu("student cu_seqlens", cu_s, k_s.shape[0])
    cu_t, m_t = _check_cu("teacher cu_seqlens", cu_t, k_t.shape[0])
    if len({c.numel() for c in (cu_q_s, cu_q_t, cu_sh, cu_s, cu_t)}) != 1:
        raise ValueError("dual_branch_attention: all cu_seqlens must describe the same number of samples")
    for name, k, v in (("shared", k_sh, v_sh), ("student", k_s, v_s), ("teacher", k_t, v_t)):
        if k.shape != v.shape:
            raise ValueError(f"dual_branch_attention: {name} k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    return dual_branch_attention_op(c(q_s), c(q_t), c(k_sh), c(v_sh), c(k_s), c(v_s), c(k_t), c(v_t), cu_q_s, cu_q_t,
                                    cu_sh, cu_s, cu_t, max(mq_s, mq_t), m_sh, m_s, m_t, float(scale))
