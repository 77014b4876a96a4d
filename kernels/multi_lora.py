"""Multi-LoRA linear for the teacher/student double forward.

Rows ``[0, n_split)`` of ``x`` belong to the student branch, rows ``[n_split, M)`` to the teacher;
both share the frozen base weight ``W (N, K)`` and differ by their low-rank delta::

    y[r] = x[r] W^T + bias + s_b * (x[r] A_b^T) B_b^T        b = student if r < n_split else teacher

(peft layout: ``A_b`` is ``lora_A.weight (rank, K)``, ``B_b`` is ``lora_B.weight (N, rank)``, ``s_b`` the
adapter's ``alpha / rank``). The two adapters are stacked, ``Ac = [A_s; A_t] (2r, K)`` and
``Bc = [B_s^T; B_t^T] (2r, N)``, and the per-row branch becomes a mask on the 2r low-rank columns:

* launch 1: ``u = mask_scale(x Ac^T)``            (M, 2r): the row's own adapter, scaled; zeros elsewhere
* launch 2: ``y = x W^T + u Bc (+ bias)``         one pass over W for all rows, the delta in the same tile

Two launches is the documented minimum here: fusing ``u`` into launch 2 would recompute it once per
column tile of ``y`` (2r/BLOCK_N extra work). Backward (base weight frozen; teacher adapter frozen):

* ``du = mask_scale(dy Bc^T)``, ``dx = dy W + du Ac`` (the same two kernels, transposed strides)
* ``dA_s = du[:n, :r]^T x[:n]``, ``dB_s = dy[:n]^T u[:n, :r]`` (student adapter only)

One generic strided Triton GEMM (grouped tile order, an optional accumulate into its output) serves
all six products. ``impl="torch"`` runs the same stacked algorithm on cuBLAS (``mm`` + ``addmm``): the
benchmark compares both with two separate LoRA layers. The double forward itself uses the PAIRED form
at the end of this file (branches in their own tensors, never concatenated).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from dopsd_fast.kernels import CUBLAS_FAST  # a pass's impl: _scaled_mm with use_fast_accum=True
from dopsd_fast.kernels._common import Cost, dot_flags, interpreting, mma, nbytes, next_pow2, register_cost, use_triton


# ---- reference -------------------------------------------------------------------------------
def lora_linear_ref(x, weight, bias, a, b, scale):
    """One peft-style LoRA layer (dropout 0): ``x W^T + bias + scale * (x A^T) B^T``."""
    base = torch.nn.functional.linear(x, weight, bias)
    return base + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)


def multi_lora_linear_ref(x, weight, bias, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split):
    """Two separate LoRA layers on the two row segments (what the fused op must equal)."""
    x2 = x.reshape(-1, x.shape[-1])
    ys = lora_linear_ref(x2[:n_split], weight, bias, a_s, b_s, scale_s)
    yt = lora_linear_ref(x2[n_split:], weight, bias, a_t, b_t, scale_t)
    return torch.cat([ys, yt]).reshape(*x.shape[:-1], weight.shape[0])


# ---- kernel ----------------------------------------------------------------------------------
@triton.jit
def _gemm_kernel(A_ptr, B_ptr, A2_ptr, B2_ptr, BIAS_ptr, C_ptr, M, N, K, K2, n_split, rank, scale_s, scale_t,
                 sam, sak, sbk, sbn, sa2m, sa2k, sb2k, sb2n, scm, scn,
                 HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, BRANCH_MASK: tl.constexpr, ACCUM: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B (+ A2 @ B2) (+ bias) (+ C with ACCUM), optionally masked/scaled by branch: column c of
    the 2r low-rank columns belongs to adapter c // rank, row r to adapter (r >= n_split). Tiles in
    grouped order: GROUP_M row tiles sweep the column tiles together, so a wave reuses its A rows and
    B columns from L2 instead of streaming all rows for a couple of weight tiles."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(A_ptr + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(B_ptr + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = mma(a, b, acc, IEEE, UPCAST)
    if HAS_SECOND:
        for k0 in range(0, K2, BLOCK_K):
            kk = k0 + rk
            a2 = tl.load(A2_ptr + rm[:, None] * sa2m + kk[None, :] * sa2k, mask=(rm[:, None] < M) & (kk[None, :] < K2),
                         other=0.0)
            b2 = tl.load(B2_ptr + kk[:, None] * sb2k + rn[None, :] * sb2n, mask=(kk[:, None] < K2) & (rn[None, :] < N),
                         other=0.0)
            acc = mma(a2, b2, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if BRANCH_MASK:
        row_t = rm >= n_split
        col_t = rn >= rank
        col_scale = tl.where(col_t, scale_t, scale_s)
        acc = tl.where(row_t[:, None] == col_t[None, :], acc * col_scale[None, :], 0.0)
    c_ptrs = C_ptr + rm[:, None] * scm + rn[None, :] * scn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUM:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(C_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _tma_dot(a_desc, b_desc, acc, om, on, K, B_NK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_K: tl.constexpr, PROMOTE: tl.constexpr = False):
    """``acc + A[om:, :K] @ B[:K, on:]`` over K in ``BLOCK_K`` steps, both tiles read through their
    descriptors (``B_NK``: ``b_desc`` holds B^T, each tile read transposed from shared memory).
    ``PROMOTE`` (e4m3 tiles): the tensor cores' reduced-precision FP8 accumulator promoted to fp32 once
    per K step (``max_num_imprecise_acc``; ``torch._scaled_mm``'s default). Without it, Triton's sm_90
    default: FP8 products accumulated in the tensor cores alone (``use_fast_accum=True``)."""
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([om, k0])
        if B_NK:
            b = b_desc.load([on, k0]).T
        else:
            b = b_desc.load([k0, on])
        if PROMOTE:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = mma(a, b, acc, IEEE, UPCAST)
    return acc


@triton.jit
def _gemm_tma_kernel(a_desc, b_desc, a2_desc, b2_desc, BIAS_ptr, C_ptr, SA_ptr, SB_ptr, M, N, K, K2, scm, scn,
                     NUM_PROGRAMS, B_NK: tl.constexpr, B2_NK: tl.constexpr, HAS_SECOND: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, SCALE: tl.constexpr, PROMOTE: tl.constexpr,
                     IEEE: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE2: tl.constexpr, UPCAST2: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr, GROUP_M: tl.constexpr):
    """:func:`_gemm_kernel`'s product (no branch mask) with its operands brought in by the TMA unit
    (tensor descriptors: asynchronous bulk copies into shared memory, no address arithmetic in the
    warps), persistent: ``NUM_PROGRAMS`` programs (one per SM) walk the output tiles in the same
    grouped order. ``B_NK``: ``b_desc`` holds B^T, (N, K) row-major (a weight as stored: ``y = x W^T``),
    and each tile is read transposed from shared memory; else B, (K, N) row-major (``dx = dy W``). The
    descriptors zero-fill past the edges, so only the epilogue is masked. FP8 (``SCALE``: 1 rowwise, 2
    tensorwise): ``a`` and ``b`` in e4m3 (``b`` as (N, K), K-major, as the FP8 tensor cores read it), their
    product times the dequantization scales ``SA[m] SB[n]`` (or the two scalars), then the second product
    (the LoRA delta, in bf16) added in full precision: ``torch._scaled_mm`` and the delta in one pass."""
    start = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    for tile in tl.range(start, tiles_m * tiles_n, NUM_PROGRAMS):
        first_m = (tile // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_m
        pid_n = (tile % per_group) // group_m
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = _tma_dot(a_desc, b_desc, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), om, on, K, B_NK, IEEE, UPCAST,
                       BLOCK_K, PROMOTE)
        rm = om + tl.arange(0, BLOCK_M)
        rn = on + tl.arange(0, BLOCK_N)
        if SCALE == 1:
            acc *= (tl.load(SA_ptr + rm, mask=rm < M, other=0.0)[:, None]
                    * tl.load(SB_ptr + rn, mask=rn < N, other=0.0)[None, :])
        elif SCALE == 2:
            acc *= tl.load(SA_ptr) * tl.load(SB_ptr)
        if HAS_SECOND:
            acc = _tma_dot(a2_desc, b2_desc, acc, om, on, K2, B2_NK, IEEE2, UPCAST2, BLOCK_K2)
        if HAS_BIAS:
            acc += tl.load(BIAS_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_ptrs = C_ptr + rm[:, None] * scm + rn[None, :] * scn
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if ACCUM:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(C_ptr.dtype.element_ty), mask=c_mask)


# ---- launchers -------------------------------------------------------------------------------
# The GEMM's output tile on a GPU, (BLOCK_M, BLOCK_N): 128 x 128 (8 warps, 3 stages) is what the H200
# measured (2026-12-04). 128 x 256 (each warp group one m64n256 wgmma; 147 KB of shared memory, no
# spills in the sm_90a compile gate) is the candidate the GPU check times beside it (:func:`gemm_tile`);
# a product narrower than the tile keeps 128 columns.
TILE = (128, 128)


@contextlib.contextmanager
def gemm_tile(block_m: int, block_n: int):
    """Inside: the GEMMs launched (forward and backward) use a ``block_m x block_n`` output tile (a
    benchmark's alternative; the interpreter keeps its small tiles)."""
    global TILE
    prev, TILE = TILE, (int(block_m), int(block_n))
    try:
        yield
    finally:
        TILE = prev


def _interp_tile(d: int) -> int:
    """Under the interpreter, whose cost is per program and per K step: 16 below 64 (the kernel tests'
    small products keep several tiles per dimension), 32 from 64 up and 64 from 128 up (the tiny
    models' products, e.g. their 170-wide FFN: still three tiles, the last one partial, in half the
    programs and K steps)."""
    return 16 if d < 64 else 32 if d < 128 else 64


def _blocks(M, N, K):
    if interpreting():
        return _interp_tile(M), _interp_tile(N), _interp_tile(K), 4, 1
    bm, bn = TILE
    return bm, bn if N >= bn else 128, 64 if K >= 64 else max(16, next_pow2(K)), 8, 3


# How the GEMM's operands reach the tensor cores on a GPU: "pointer" (:func:`_gemm_kernel`: addresses
# computed by the warps, what the H200 measured on 2026-12-04) or "tma" (:func:`_gemm_tma_kernel`: tensor
# descriptors, persistent programs), the candidate the GPU check times beside it (:func:`gemm_kernel`).
KERNEL = "pointer"
KERNELS = ("pointer", "tma")


@contextlib.contextmanager
def gemm_kernel(name: str):
    """Inside: the GEMMs launched (forward and backward) use operand path ``name`` (:data:`KERNELS`)
    wherever their operands allow it (:func:`_tma_views`); the others keep the pointer kernel."""
    global KERNEL
    if name not in KERNELS:
        raise ValueError(f"gemm_kernel: unknown kernel {name!r} (choose from {', '.join(KERNELS)})")
    prev, KERNEL = KERNEL, name
    try:
        yield
    finally:
        KERNEL = prev


def _row_major(t: torch.Tensor) -> bool:
    """What a tensor descriptor can read: the last dimension contiguous, the base and the row stride
    16-byte aligned."""
    es = t.element_size()
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0 and t.shape[1] * es >= 16


def _tma_views(a, b):
    """``(a, b as stored, b_nk)`` when a descriptor can read both: ``a`` row-major; ``b`` (K, N)
    row-major (``b_nk`` False) or the transpose of a row-major (N, K) tensor, e.g. ``W.t()`` (True).
    None otherwise (e.g. a transposed ``a``: the adapter gradients)."""
    if not _row_major(a):
        return None
    if b.stride(1) == 1 and _row_major(b):
        return a, b, False
    if b.stride(0) == 1 and _row_major(b.t()):
        return a, b.t(), True
    return None


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(a: torch.Tensor, tiles: int) -> int:
    """Persistent programs: one per SM (132 on an H100 / H200, and for the compile gate's CPU tensors), at
    most one per tile; 3 under the interpreter, so its programs each walk several tiles."""
    if interpreting():
        return min(tiles, 3)
    return min(tiles, _sm_count(a.device.index or 0) if a.is_cuda else 132)


def _gemm_tma(a, b, a2, b2, bias, c, accumulate, blocks, scales=None) -> bool:
    """The TMA kernel's launch, or False (nothing launched) where an operand does not qualify.
    ``scales=(sa, sb, rowwise, fast_accum)``: ``a``, ``b`` in FP8 with their dequantization scales (``b``
    K-major); without ``fast_accum`` the accumulator is promoted once per K step, on 128-column tiles (the
    second accumulator of 256 columns spills). ``accumulate`` also keeps 128 columns."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    views = _tma_views(a, b)
    views2 = _tma_views(a2, b2) if a2 is not None else (None, None, False)
    if views is None or views2 is None or (scales is not None and not views[2]):
        return False
    (a, b, b_nk), (a2, b2, b2_nk) = views, views2
    BM, BN, BK, warps, stages = blocks
    promote = scales is not None and not scales[3]
    if scales is not None and not interpreting():  # e4m3: a K step of 128 bytes, as bf16's 64 elements are
        BK, BN = 2 * BK, min(BN, 128) if promote else BN
    if accumulate:  # the accumulated output's tile read back in the epilogue: at 256 columns, 255 registers and a
        BN = min(BN, 128)  # spill (the sm_90a gate, klein's shapes)
    desc = lambda t, nk, bk=BK: TensorDescriptor.from_tensor(t, [BN, bk] if nk else [bk, BN])  # noqa: E731
    a_d, b_d = TensorDescriptor.from_tensor(a, [BM, BK]), desc(b, b_nk)
    a2_d, b2_d = (TensorDescriptor.from_tensor(a2, [BM, blocks[2]]), desc(b2, b2_nk, blocks[2])) if a2 is not None \
        else (a_d, b_d)
    M, N = c.shape
    K = a.shape[1]
    sa, sb, rowwise = scales[:3] if scales is not None else (c, c, True)
    programs = _programs(c, triton.cdiv(M, BM) * triton.cdiv(N, BN))
    flags2 = dot_flags(a2.dtype if a2 is not None else a.dtype)
    _gemm_tma_kernel[(programs,)](a_d, b_d, a2_d, b2_d, bias if bias is not None else c, c, sa, sb, M, N, K,
                                  a2.shape[1] if a2 is not None else 0, c.stride(0), c.stride(1), programs,
                                  B_NK=b_nk, B2_NK=b2_nk, HAS_SECOND=a2 is not None, HAS_BIAS=bias is not None,
                                  ACCUM=accumulate, SCALE=0 if scales is None else 1 if rowwise else 2, PROMOTE=promote,
                                  **dot_flags(a.dtype), IEEE2=flags2["IEEE"], UPCAST2=flags2["UPCAST"], BLOCK_M=BM,
                                  BLOCK_N=BN, BLOCK_K=BK, BLOCK_K2=blocks[2], GROUP_M=8, num_warps=warps,
                                  num_stages=stages)
    return True


def _fp8_gemm(aq, sa, bq, sb, rowwise, out_dtype, a2=None, b2=None, bias=None, fast_accum=False):
    """``(aq bq) * sa sb (+ a2 b2) (+ bias)``: ``torch._scaled_mm``'s product (``aq`` (M, K) and ``bq``
    (K, N) in e4m3, ``bq`` the transpose of a row-major tensor; ``sa`` (M, 1) and ``sb`` (N, 1) rowwise,
    or two scalars) with the bf16 LoRA delta and the bias in the same tile: the TMA kernel, one pass
    (``_scaled_mm`` has no accumulate input, so its form writes y, then re-reads and rewrites it for the
    delta). ``fast_accum``: the FP8 products accumulated in the tensor cores alone, as ``_scaled_mm``'s
    ``use_fast_accum=True`` (torchao's float8 training recipe does it for the forward GEMM, not for the
    gradients'); else promoted to fp32 once per K step, as ``_scaled_mm``'s default. None where the
    operands do not suit the kernel (nothing launched)."""
    M, N = aq.shape[0], bq.shape[1]
    c = torch.empty((M, N), device=aq.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    k = max(aq.shape[1], a2.shape[1] if a2 is not None else 0)
    scales = (sa.reshape(-1).float().contiguous(), sb.reshape(-1).float().contiguous(), rowwise, fast_accum)
    return c if _gemm_tma(aq, bq, a2, b2, bias, c, False, _blocks(M, N, k), scales) else None


def _gemm(a, b, out_dtype, a2=None, b2=None, bias=None, branch=None, acc=None, out=None):
    """``a (M, K) @ b (K, N) [+ a2 @ b2] [+ bias]`` with any strides; ``branch=(n_split, rank, s_s, s_t)``;
    ``acc``: an (M, N) tensor the product is added to, in place (returned); ``out``: an (M, N) tensor
    (any strides, e.g. a column slice) the product is written to (returned)."""
    M, K = a.shape
    N = b.shape[1]
    c = acc if acc is not None else out if out is not None else torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    blocks = _blocks(M, N, max(K, a2.shape[1] if a2 is not None else 0))
    if KERNEL == "tma" and branch is None and _gemm_tma(a, b, a2, b2, bias, c, acc is not None, blocks):
        return c
    BM, BN, BK, warps, stages = blocks
    n_split, rank, s_s, s_t = branch if branch is not None else (0, 1, 1.0, 1.0)
    a2_, b2_ = (a2, b2) if a2 is not None else (a, b)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _gemm_kernel[grid](a, b, a2_, b2_, bias if bias is not None else c, c, M, N, K, a2_.shape[1], n_split, rank,
                       float(s_s), float(s_t), a.stride(0), a.stride(1), b.stride(0), b.stride(1), a2_.stride(0),
                       a2_.stride(1), b2_.stride(0), b2_.stride(1), c.stride(0), c.stride(1),
                       HAS_SECOND=a2 is not None, HAS_BIAS=bias is not None, BRANCH_MASK=branch is not None,
                       ACCUM=acc is not None, **dot_flags(a.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
                       num_warps=warps, num_stages=stages)
    return c


def _mask_scale(u, n_split, rank, s_s, s_t):
    keep = torch.zeros_like(u)
    keep[:n_split, :rank] = s_s
    keep[n_split:, rank:] = s_t
    return u * keep


def _stack(a_s, b_s, a_t, b_t):
    return torch.cat([a_s, a_t]), torch.cat([b_s, b_t], dim=1)  # Ac (2r, K), Bc^T (N, 2r)


def _fwd(x, weight, bias, a_s, b_s, a_t, b_t, s_s, s_t, n_split, triton_path):
    ac, bct = _stack(a_s, b_s, a_t, b_t)
    r = a_s.shape[0]
    if triton_path:
        u = _gemm(x, ac.t(), x.dtype, branch=(n_split, r, s_s, s_t))
        y = _gemm(x, weight.t(), x.dtype, a2=u, b2=bct.t(), bias=bias)
        return y, u
    u = _mask_scale(x @ ac.t(), n_split, r, s_s, s_t).to(x.dtype)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return y.addmm_(u, bct.t()), u


def _bwd(dy, x, weight, u, a_s, b_s, a_t, b_t, s_s, s_t, n_split, triton_path):
    ac, bct = _stack(a_s, b_s, a_t, b_t)
    r = a_s.shape[0]
    if triton_path:
        du = _gemm(dy, bct, dy.dtype, branch=(n_split, r, s_s, s_t))
        dx = _gemm(dy, weight, x.dtype, a2=du, b2=ac)
        da = _gemm(du[:n_split, :r].t(), x[:n_split], a_s.dtype)
        db = _gemm(dy[:n_split].t(), u[:n_split, :r], b_s.dtype)
        return dx, da, db
    du = _mask_scale(dy @ bct, n_split, r, s_s, s_t).to(dy.dtype)
    dx = (dy @ weight).addmm_(du, ac)
    return dx, (du[:n_split, :r].t() @ x[:n_split]).to(a_s.dtype), (dy[:n_split].t() @ u[:n_split, :r]).to(b_s.dtype)


# ---- registration ----------------------------------------------------------------------------
@torch.library.custom_op("dopsd_fast::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_s: torch.Tensor,
                         b_s: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, scale_s: float, scale_t: float,
                         n_split: int, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K)`` -> ``(y (M, N), u (M, 2r))``; ``u`` (the masked, scaled low-rank activations) is kept
    for the backward."""
    tri = impl == "triton" and use_triton(x, weight, a_s, b_s, a_t, b_t)
    return _fwd(x, weight, bias, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split, tri)


@multi_lora_linear_op.register_fake
def _(x, weight, bias, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split, impl):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], 2 * a_s.shape[0]))


@torch.library.custom_op("dopsd_fast::multi_lora_linear_backward", mutates_args=())
def multi_lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor,
                                  a_s: torch.Tensor, b_s: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
                                  scale_s: float, scale_t: float, n_split: int,
                                  impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(dx, d a_s, d b_s)``: the student adapter only; the base weight and teacher are frozen."""
    tri = impl == "triton" and use_triton(dy, x, weight, a_s, b_s, a_t, b_t)
    return _bwd(dy, x, weight, u, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split, tri)


@multi_lora_linear_backward_op.register_fake
def _(dy, x, weight, u, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split, impl):
    return torch.empty_like(x), torch.empty_like(a_s), torch.empty_like(b_s)


def _setup(ctx, inputs, output):
    x, weight, bias, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split, impl = inputs
    ctx.args = (scale_s, scale_t, n_split, impl)
    ctx.save_for_backward(x, weight, output[1], a_s, b_s, a_t, b_t)


def _backward(ctx, dy, _du):
    x, weight, u, a_s, b_s, a_t, b_t = ctx.saved_tensors
    dx, da, db = multi_lora_linear_backward_op(dy.contiguous(), x, weight, u, a_s, b_s, a_t, b_t, *ctx.args)
    return dx, None, None, da, db, None, None, None, None, None, None


multi_lora_linear_op.register_autograd(_backward, setup_context=_setup)


# ---- costs (benchmarks/perf_model.py) ---------------------------------------------------------
def _fwd_cost(M, K, N, r2, weight, bias):
    """launch 1 (u = x Ac^T, masked) and 2 (y = x W^T + u Bc), plus the two small stacking copies."""
    e = weight.element_size()
    return Cost(2.0 * M * K * r2 + 2.0 * M * K * N + 2.0 * M * r2 * N,
                2 * M * K * e + nbytes(weight, bias) + 2 * M * r2 * e + M * N * e, 4, "gemm")


@register_cost("dopsd_fast::multi_lora_linear")
def _(x, weight, bias, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split, impl):
    return _fwd_cost(x.shape[0], x.shape[1], weight.shape[0], 2 * a_s.shape[0], weight, bias)


@register_cost("dopsd_fast::multi_lora_linear_backward")
def _(dy, x, weight, u, a_s, b_s, a_t, b_t, scale_s, scale_t, n_split, impl):
    M, K = x.shape
    N, r = weight.shape[0], a_s.shape[0]
    e = x.element_size()
    flops = 2.0 * M * N * 2 * r + 2.0 * M * N * K + 2.0 * M * 2 * r * K + 2.0 * r * n_split * K + 2.0 * N * n_split * r
    byts = 2 * nbytes(dy) + nbytes(weight) + 2 * M * 2 * r * e + M * K * e + nbytes(x) + nbytes(u)
    return Cost(flops, byts, 6, "gemm")


# ---- entry point -----------------------------------------------------------------------------
def _one_dtype(op: str, x: torch.Tensor, **others) -> None:
    """The input, base weight, bias and adapters in x's dtype (cast the adapters first): a mix ran under the
    interpreter, failed on cuBLAS, and is a compile error of the GPU kernel; one line naming the tensor."""
    bad = [f"{n} is {t.dtype}" for n, t in others.items() if t is not None and t.numel() and t.dtype != x.dtype]
    if bad:
        raise ValueError(f"{op}: x is {x.dtype} but {', '.join(bad)}: one dtype throughout (cast the weights "
                         "to the activations' dtype)")


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, student: tuple,
                      teacher: tuple, n_split: int, impl: str = "triton") -> torch.Tensor:
    """Shared frozen base linear + per-branch LoRA. ``student``/``teacher``: ``(lora_A (r, K), lora_B (N, r),
    scale)``. Rows of ``x.reshape(-1, K)`` before ``n_split`` use the student adapter, the rest the
    teacher. Gradients flow to ``x`` and the student adapter only."""
    a_s, b_s, s_s = student
    a_t, b_t, s_t = teacher
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape != (N, K):
        raise ValueError(f"multi_lora_linear: weight {tuple(weight.shape)} does not fit x's last dim {K}")
    for name, (a, b) in (("student", (a_s, b_s)), ("teacher", (a_t, b_t))):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != K or b.shape[0] != N or a.shape[0] != b.shape[1]:
            raise ValueError(f"multi_lora_linear: {name} adapter A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                             f"a ({N}, {K}) linear")
    if a_s.shape != a_t.shape:
        raise ValueError(f"multi_lora_linear: student and teacher ranks differ ({a_s.shape[0]} vs {a_t.shape[0]})")
    _one_dtype("multi_lora_linear", x, weight=weight, bias=bias, student_A=a_s, student_B=b_s, teacher_A=a_t,
               teacher_B=b_t)
    x2 = x.reshape(-1, K)
    if not 0 <= n_split <= x2.shape[0]:
        raise ValueError(f"multi_lora_linear: n_split={n_split} outside [0, {x2.shape[0]}] rows")
    if torch.is_grad_enabled():
        frozen = {"weight": weight, "bias": bias, "teacher lora_A": a_t, "teacher lora_B": b_t}
        bad = [k for k, t in frozen.items() if t is not None and t.requires_grad]
        if bad:
            raise ValueError(f"multi_lora_linear: {', '.join(bad)} require grad, but this op trains only the student "
                             "adapter (freeze them, or use two separate layers)")
    if impl not in ("triton", "torch"):
        raise ValueError(f"multi_lora_linear: impl must be 'triton' or 'torch', got {impl!r}")
    y, _ = multi_lora_linear_op(x2.contiguous(), weight, bias, a_s, b_s, a_t, b_t, float(s_s), float(s_t),
                                int(n_split), impl)
    return y.reshape(*x.shape[:-1], N)


# ---- paired form: student and teacher rows as two tensors, never concatenated ---------------------
# The double forward's linears. Each branch's rows stay in their own tensor: the base GEMM runs per
# branch (cuBLAS, or ours with the LoRA delta in the epilogue), each branch's LoRA on its own rows
# only (r columns, not the 2r of the stacked form), outputs are fresh tensors (no cat of the inputs, no
# clone of output halves). A GROUP of linears reading the same input (q, k, v; w1, w3) is one op: the
# backward accumulates the student's dx of the whole group into one buffer (no autograd adds), and x
# is saved once. Nothing of the teacher is kept for the backward; only the student's dx and adapter
# gradients are computed; the rank-sized gradient GEMMs (dA = du^T x, dB = dy^T u) go to cuBLAS,
# which picks split-K for these short, wide products (a 64-row output on 132 SMs).
def _stack_rows(As):
    """``[A_1; ...; A_G]`` (G r, K): each adapter copied into its rows (G small copies; one A alone as is)."""
    if len(As) == 1:
        return As[0]
    r = As[0].shape[0]
    out = As[0].new_empty((len(As) * r, As[0].shape[1]))
    for g, a in enumerate(As):
        out[g * r:(g + 1) * r].copy_(a)
    return out


def _low_rank_in(x, As, scales, tri):
    """``u = [s_1 x A_1^T | ... | s_G x A_G^T]`` (M, G r): the group's adapters stacked (a (G r, K)
    copy of the small A's), so x is read ONCE for the whole group; one scale folds into the GEMM's
    alpha (the usual case: one adapter config), several scale their column blocks after."""
    n, r, G = x.shape[0], As[0].shape[0], len(As)
    a_cat = _stack_rows(As)
    same = all(s == scales[0] for s in scales)
    if tri:
        if same:
            return _gemm(x, a_cat.t(), x.dtype, branch=(n, G * r, scales[0], scales[0]))
        u = x.new_empty((n, G * r))
        for g, (a, s) in enumerate(zip(As, scales)):  # one launch per scale: x read per adapter
            _gemm(x, a.t(), x.dtype, branch=(n, r, s, s), out=u[:, g * r:(g + 1) * r])
        return u
    if same:
        return torch.addmm(x.new_zeros(()), x, a_cat.t(), beta=0, alpha=scales[0])
    u = x.new_empty((n, G * r))
    for g, (a, s) in enumerate(zip(As, scales)):  # each scale in its GEMM's alpha: no scale tensor made on the host
        torch.addmm(x.new_zeros(()), x, a.t(), beta=0, alpha=s, out=u[:, g * r:(g + 1) * r])
    return u


def _branch_fwd(x, weights, biases, As, Bs, scales, tri, fp8=None):
    """-> (ys, u): ``y = x W^T (+ bias) + u_g B^T`` per linear ``g`` of the group, ``u`` (M, G r) the
    group's low-rank activations (``u_g``: its columns ``[g r, (g + 1) r)``). cuBLAS: the delta FIRST,
    ``y = u_g B^T (+ bias)`` (a rank-r product: y written once), then the base GEMM accumulates into it
    (``addmm_``, beta = 1: y read in the GEMM's epilogue, where a compute-bound GEMM hides it), not a
    second call after the base GEMM that re-reads and rewrites y. Ours: one GEMM, the delta and the
    bias in the same tile. ``fp8=(quantized weights, their scales, rowwise)``: the base GEMM in FP8
    (``torch._scaled_mm``, x quantized here, on this branch's rows; no accumulate input: the delta
    after it), the delta in the activations' dtype. The forward's FP8 products accumulate in the tensor
    cores (``use_fast_accum=True``, torchao's float8 training recipe for the forward GEMM; our kernel
    does the same); the backward's dX GEMM promotes its accumulator (``_scaled_mm``'s default)."""
    if x.shape[0] == 0 and fp8 is not None:  # a branch with no rows (one-branch calls)
        return [x.new_empty((0, w.shape[0])) for w in weights], x.new_empty((0, sum(a.shape[0] for a in As)))
    u = _low_rank_in(x, As, scales, tri)
    r = As[0].shape[0]
    if fp8 is not None:
        from dopsd_fast.fp8 import quantize

        xq, xs = quantize(x, fp8[2])
    ys = []
    for g, (w, bias, b) in enumerate(zip(weights, biases, Bs)):
        u_g = u[:, g * r:(g + 1) * r]
        if fp8 is not None:
            ws = fp8[1][g]
            y = _fp8_gemm(xq, xs, fp8[0][g].t(), ws, fp8[2], x.dtype, u_g, b.t(), bias, fast_accum=True) if tri \
                else None
            if y is None:
                y = torch._scaled_mm(xq, fp8[0][g].t(), scale_a=xs, scale_b=ws.t() if fp8[2] else ws,
                                     out_dtype=x.dtype, use_fast_accum=True)
                if bias is not None:
                    y += bias
                y.addmm_(u_g, b.t())
        elif tri:
            y = _gemm(x, w.t(), x.dtype, a2=u_g, b2=b.t(), bias=bias)
        else:
            y = torch.addmm(bias, u_g, b.t()) if bias is not None else torch.mm(u_g, b.t())
            y.addmm_(x, w.t())
        ys.append(y)
    return ys, u


def _own(t, dtype):
    """``t`` in ``dtype`` in a storage of its own (an op's outputs may not be views of one another)."""
    return t.clone() if t.dtype == dtype else t.to(dtype)


def _student_bwd(dys, x, weights, u, As, Bs, scales, tri, fp8_wt=None, fp8_rowwise=True, need_dx=True):
    """-> (dx, dAs, dBs) of the group, dx accumulated over its linears in one buffer. ``du_g = s dy_g
    B_g`` into the columns of one (M, G r) ``du``. cuBLAS: the group's LoRA part of dx FIRST, ``dx =
    du [A_1; ...; A_G]`` (one rank-(G r) product: dx written once), then each base dX GEMM accumulates
    into it (``addmm_``, beta = 1: dx read in its epilogue), not a second call per linear that re-reads
    and rewrites dx. Ours: one GEMM per linear for ``dy W + du A``, accumulating into dx. The
    adapters' ``dA = du^T x`` of the whole group is one product (x read once). ``fp8_wt`` (the
    group's transposed weights quantized, :meth:`dopsd_fast.fp8.NativeFP8.weights_t`): the base part of
    dx is ONE FP8 GEMM over the concatenated output gradients (quantized as one, into one e4m3 buffer),
    then the LoRA part added into it (``addmm_``, beta = 1)."""
    n, r, G = x.shape[0], As[0].shape[0], len(As)
    du = x.new_empty((n, G * r))
    zero = None if tri else dys[0].new_zeros(())
    for g, (dy, b, s) in enumerate(zip(dys, Bs, scales)):
        if tri:
            _gemm(dy, b, dy.dtype, branch=(n, r, s, s), out=du[:, g * r:(g + 1) * r])
        else:
            torch.addmm(zero, dy, b, beta=0, alpha=s, out=du[:, g * r:(g + 1) * r])
    dx = None
    if not need_dx:  # the group's input needs no gradient (a first layer fed by frozen embedders): no dX GEMM
        pass
    elif fp8_wt:
        from dopsd_fast.kernels.fp8_quant import quantize_rows_cat

        dq, ds = quantize_rows_cat(dys, fp8_rowwise)
        wq, ws = fp8_wt
        a_cat = _stack_rows(As)
        dx = _fp8_gemm(dq, ds, wq.t(), ws, fp8_rowwise, x.dtype, du, a_cat) if tri else None
        if dx is None:
            dx = torch._scaled_mm(dq, wq.t(), scale_a=ds, scale_b=ws.t() if fp8_rowwise else ws, out_dtype=x.dtype)
            dx.addmm_(du, a_cat)
    elif tri:
        for g, (dy, w, a) in enumerate(zip(dys, weights, As)):
            dx = _gemm(dy, w, x.dtype, a2=du[:, g * r:(g + 1) * r], b2=a, acc=dx)
    else:
        dx = torch.mm(du, _stack_rows(As))
        for dy, w in zip(dys, weights):
            dx.addmm_(dy, w)
    da_cat = torch.mm(du.t(), x)
    das = [da_cat.to(As[0].dtype)] if G == 1 else [_own(da_cat[g * r:(g + 1) * r], a.dtype) for g, a in enumerate(As)]
    dbs = [torch.mm(dy.t(), u[:, g * r:(g + 1) * r]).to(b.dtype) for g, (dy, b) in enumerate(zip(dys, Bs))]
    return dx, das, dbs


@torch.library.custom_op("dopsd_fast::paired_lora_linears", mutates_args=())
def paired_lora_linears_op(x_s: torch.Tensor, x_t: torch.Tensor, weights: list[torch.Tensor],
                           biases: list[torch.Tensor], a_s: list[torch.Tensor], b_s: list[torch.Tensor],
                           a_t: list[torch.Tensor], b_t: list[torch.Tensor], scales_s: list[float],
                           scales_t: list[float], impl: str, fp8_w: list[torch.Tensor],
                           fp8_scale: list[torch.Tensor], fp8_rowwise: bool) -> list[torch.Tensor]:
    """-> ``[y_s per linear] + [y_t per linear] + [u_s]`` (u_s (M_s, G r), the student's low-rank
    activations of the group, kept for the backward); an
    empty bias tensor is no bias (a list of optional tensors is not a stable pytree for autograd).
    Differentiable through :func:`paired_lora_linears` (its autograd: ``_PairedLinears``), not alone.
    ``fp8_w`` / ``fp8_scale``: the base weights quantized (float8_e4m3fn) and their scales, for an FP8
    forward GEMM (empty lists: none); the backward is the same either way (dX in bf16 against W)."""
    biases = [b if b.numel() else None for b in biases]
    impl = resolve_impl(impl, x_s, x_t, weights, a_s, scales_s)
    tri = impl == "triton" and use_triton(x_s, x_t, *weights, *a_s, *b_s, *a_t, *b_t)
    fp8 = (fp8_w, fp8_scale, fp8_rowwise) if fp8_w else None
    ys, u_s = _branch_fwd(x_s, weights, biases, a_s, b_s, scales_s, tri, fp8)
    yt, _ = _branch_fwd(x_t, weights, biases, a_t, b_t, scales_t, tri, fp8)
    return ys + yt + [u_s]


@paired_lora_linears_op.register_fake
def _(x_s, x_t, weights, biases, a_s, b_s, a_t, b_t, scales_s, scales_t, impl, fp8_w, fp8_scale, fp8_rowwise):
    return ([x_s.new_empty((x_s.shape[0], w.shape[0])) for w in weights]
            + [x_t.new_empty((x_t.shape[0], w.shape[0])) for w in weights]
            + [x_s.new_empty((x_s.shape[0], sum(a.shape[0] for a in a_s)))])


@torch.library.custom_op("dopsd_fast::paired_lora_linears_backward", mutates_args=())
def paired_lora_linears_backward_op(dys: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                                    u: torch.Tensor, a_s: list[torch.Tensor], b_s: list[torch.Tensor],
                                    scales: list[float], impl: str, fp8_wt: list[torch.Tensor],
                                    fp8_rowwise: bool, need_dx: bool = True) -> list[torch.Tensor]:
    """-> ``[dx] + [d a_s per linear] + [d b_s per linear]`` (the student's; the rest is frozen); ``u``
    (M, G r): the forward's low-rank activations of these linears; ``impl`` as the forward resolved it;
    ``fp8_wt``: ``[q, scale]`` of the group's transposed weights for an FP8 dX GEMM (empty: bf16);
    ``need_dx`` false: the input needs no gradient, dx is not computed (an empty tensor in its place)."""
    tri = impl == "triton" and use_triton(x, *dys, *weights, *a_s, *b_s)
    dx, das, dbs = _student_bwd(dys, x, weights, u, a_s, b_s, scales, tri, fp8_wt or None, fp8_rowwise, need_dx)
    return [dx if need_dx else x.new_empty(0)] + das + dbs


@paired_lora_linears_backward_op.register_fake
def _(dys, x, weights, u, a_s, b_s, scales, impl, fp8_wt, fp8_rowwise, need_dx=True):
    return ([torch.empty_like(x) if need_dx else x.new_empty(0)] + [torch.empty_like(a) for a in a_s]
            + [torch.empty_like(b) for b in b_s])


class _PairedLinears(torch.autograd.Function):
    """The autograd of the paired op, around it (the op itself registers none: call it through
    :func:`paired_lora_linears`), the differentiable tensors as the Function's own arguments. Not
    ``register_autograd`` on the op: with tensor-list arguments that flattens and rebuilds every list
    (pytrees) and refills the schema's defaults at each forward and backward, ~6x the Python calls of
    this form per forward + backward: host work of a fixed size per call, exposed wherever one call's
    GPU work is shorter (tested: tests/kernels/test_multi_lora.py, host work)."""

    @staticmethod
    def forward(ctx, spec, x_s, *lora_s):
        x_t, weights, biases, a_t, b_t, scales_s, scales_t, impl, fp8_w, fp8_scale, fp8_rowwise, fp8 = spec
        G = len(weights)
        a_s, b_s = list(lora_s[:G]), list(lora_s[G:])
        impl = resolve_impl(impl, x_s, x_t, weights, a_s, scales_s)  # the backward runs the forward's choice
        out = paired_lora_linears_op(x_s, x_t, weights, biases, a_s, b_s, a_t, b_t, scales_s, scales_t, impl, fp8_w,
                                     fp8_scale, fp8_rowwise)
        ctx.G, ctx.scales, ctx.impl = G, list(scales_s), impl
        ctx.fp8 = fp8 if fp8 is not None and fp8.dgrad and fp8_w else None  # the dX GEMM in FP8 too
        ctx.save_for_backward(x_s, *weights, *out[2 * G:], *a_s, *b_s)  # the teacher rows are not kept
        ctx.mark_non_differentiable(*out[G:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the teacher outputs and u
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        G = ctx.G
        x_s, *rest = ctx.saved_tensors
        weights, u, a_s, b_s = rest[:G], rest[G], rest[G + 1:2 * G + 1], rest[2 * G + 1:]
        live = [g for g in range(G) if grads[g] is not None]
        da, db = [None] * G, [None] * G
        if not live:
            return None, None, *da, *db
        pick = lambda seq: [seq[g] for g in live]  # noqa: E731
        if len(live) < G:  # the live linears' column blocks of u (a small copy)
            r = a_s[0].shape[0]
            u = torch.cat([u[:, g * r:(g + 1) * r] for g in live], 1)
        # FP8 dX only where dx is wanted (no quantized copies for a group whose input needs no gradient)
        fp8_wt = list(ctx.fp8.weights_t(pick(weights))) if ctx.fp8 is not None and ctx.needs_input_grad[1] else []
        need_dx = ctx.needs_input_grad[1]  # false for a first layer fed by frozen embedders: no dX GEMM
        out = paired_lora_linears_backward_op([grads[g].contiguous() for g in live], x_s, pick(weights), u,
                                              pick(a_s), pick(b_s), pick(ctx.scales), ctx.impl, fp8_wt,
                                              ctx.fp8.rowwise if ctx.fp8 is not None else True, need_dx)
        for j, g in enumerate(live):
            da[g], db[g] = out[1 + j], out[1 + len(live) + j]
        return None, out[0] if need_dx else None, *da, *db


def _pass(name, kind, flops, byts, launches=1, shape=None, impl=None):
    """One kernel launch (or a run of identical ones) inside a fused op, as the step model prices it:
    ``kind`` "gemm" / "gemm_fp8" (``shape`` (M, inner, N), ``impl`` "cublas" | "triton" |
    ``CUBLAS_FAST``: priced at that GEMM's rate) or "memory" (a pass priced by its bytes)."""
    return {"name": name, "kind": kind, "flops": float(flops), "bytes": float(byts), "launches": int(launches),
            "shape": shape, "impl": impl}


def _with_passes(passes, kind="gemm"):
    """A :class:`Cost` whose totals are the sum of ``passes``, which it carries (``cost["passes"]``)."""
    cost = Cost(sum(p["flops"] for p in passes), sum(p["bytes"] for p in passes),
                sum(p["launches"] for p in passes), kind)
    cost["passes"] = passes
    return cost


# pass names, shared by the forward and backward costs (the traffic table groups by them)
LORA_DOWN = "LoRA rank-r GEMM (u = s x A^T, du = s dy B, dA, dB): reads an activation"
LORA_DELTA_Y = "LoRA delta into y: second GEMM call re-reads and rewrites y (cuBLAS, delta after)"
LORA_DELTA_DX = "LoRA du A into dx: second GEMM call re-reads and rewrites dx (cuBLAS, delta after)"
LORA_DELTA_Y_FIRST = "LoRA delta y = u B^T (+ bias), written once: the base GEMM accumulates into it"
LORA_DELTA_DX_FIRST = "LoRA part of the group's dx = du [A_1; ..] written once: the dX GEMMs accumulate"
FP8_X_QUANT = "FP8: a branch's x quantized once per group (read twice, e4m3 written)"
BASE_GEMM_AFTER = "base GEMM y = x W^T (+ bias)"
BASE_GEMM_OURS = "base GEMM y = x W^T + u B^T (delta in the epilogue)"
FP8_DY_QUANT = "FP8: the group's dy quantized as one (read twice, e4m3 written)"
FP8_OURS = "FP8 GEMM on our TMA kernel (e4m3 operands; scales, LoRA delta and bias in its tile)"
FP8_OURS_DELTA = "its bf16 LoRA delta, in the same launch (priced at the bf16 rate)"
LORA_STACK = "the group's adapters stacked (the small A's copied into one, dA's split out)"
ZERO_FILL = "0-dim zero for addmm(beta=0): one fill launch"


def paired_fwd_passes(M, K, Ns, r, e, impl, biases=(), same_scale=True, delta="first"):
    """One branch (M rows) of a group of linears (K -> each N of ``Ns``, rank r), as ``_branch_fwd``
    runs it: u (M, G r) = s x [A_1; ..]^T, x read once for the group (the A's stacked); then per linear,
    cuBLAS: ``y = u_g B^T (+ bias)`` (a rank-r product, priced by its bytes: y written once) and the base
    GEMM ``y += x W^T`` (beta = 1: y read in its epilogue, inside the GEMM's bytes); ours: one GEMM with
    the delta and the bias in its tile. ``delta="after"``: the earlier cuBLAS form (per linear: u, the
    base GEMM, then a second call that re-reads and rewrites y), what the H200 run of 2026-12-04
    measured (the calibration's rows)."""
    G = len(Ns)
    biases = list(biases) or [False] * G
    lib = "triton" if impl == "triton" else "cublas"
    if M == 0:  # no rows: the 0-dim zero's fill alone (one per linear in the earlier form)
        return [] if impl == "triton" else [_pass(ZERO_FILL, "memory", 0, e, 1)] * (G if delta == "after" else 1)
    if delta == "after":
        out = []
        for N, bias in zip(Ns, biases):
            out += [_pass(ZERO_FILL, "memory", 0, e, 1),
                    _pass(LORA_DOWN, "gemm", 2.0 * M * K * r, (M * K + r * K + M * r) * e, 1, (M, K, r), lib),
                    _pass(BASE_GEMM_AFTER, "gemm", 2.0 * M * K * N,
                          (M * K + N * K + M * N + (N if bias else 0)) * e, 1, (M, K, N), "cublas"),
                    _pass(LORA_DELTA_Y, "memory", 2.0 * M * r * N, (2 * M * N + M * r + N * r) * e, 1, (M, r, N),
                          "cublas")]
        return out
    Gr = G * r
    out = [_pass(ZERO_FILL, "memory", 0, e, 1)] if impl != "triton" and same_scale else []
    if G > 1:
        out += [_pass(LORA_STACK, "memory", 0, 2 * r * K * e, 1) for _ in Ns]
    if impl == "triton" and not same_scale:  # one launch per adapter, each reading x
        out += [_pass(LORA_DOWN, "gemm", 2.0 * M * K * r, (M * K + r * K + M * r) * e, 1, (M, K, r), lib)] * G
    else:
        out.append(_pass(LORA_DOWN, "gemm", 2.0 * M * K * Gr, (M * K + Gr * K + M * Gr) * e, 1, (M, K, Gr), lib))
        if not same_scale:
            out.append(_pass("per-adapter scales of u", "memory", 0, 2 * M * Gr * e, 1))
    for N, bias in zip(Ns, biases):
        b = N if bias else 0
        if impl == "triton":
            out.append(_pass(BASE_GEMM_OURS, "gemm",
                             2.0 * M * K * N + 2.0 * M * r * N, (M * K + N * K + M * N + b + M * r + N * r) * e, 1,
                             (M, K, N), impl))
        else:
            out += [_pass(LORA_DELTA_Y_FIRST, "memory", 2.0 * M * r * N, (M * r + N * r + M * N + b) * e, 1,
                          (M, r, N), "cublas"),
                    _pass("base GEMM y += x W^T (beta = 1: the delta read in the epilogue)", "gemm", 2.0 * M * K * N,
                          (M * K + N * K + 2 * M * N) * e, 1, (M, K, N), "cublas")]
    return out


def _bwd_passes_delta_after(M, K, Ns, r, e, impl):
    """The earlier form of the backward, per linear: du = s dy B; dx (written by the first linear,
    accumulated into by the others) += dy W, then du A by a second call that re-reads and rewrites dx
    (cuBLAS), or one kernel for both (ours); dA = du^T x and dB = dy^T u per linear."""
    out = []
    for g, N in enumerate(Ns):
        acc = M * K * e if g else 0
        lib = "triton" if impl == "triton" else "cublas"
        du = _pass(LORA_DOWN, "gemm", 2.0 * M * N * r, (M * N + N * r + M * r) * e, 1, (M, N, r), lib)
        grads = [_pass(LORA_DOWN, "gemm", 2.0 * r * M * K, (M * r + M * K + r * K) * e, 1, (r, M, K), "cublas"),
                 _pass(LORA_DOWN, "gemm", 2.0 * N * M * r, (M * N + M * r + N * r) * e, 1, (N, M, r), "cublas")]
        base_bytes = (M * N + N * K + M * K) * e + acc
        if impl == "triton":
            out += [du, _pass("base dX GEMM dx (+)= dy W + du A (one kernel)", "gemm",
                              2.0 * M * N * K + 2.0 * M * r * K, base_bytes + (M * r + r * K) * e, 1, (M, N, K), impl),
                    *grads]
            continue
        name = "base dX GEMM dx += dy W (beta = 1: dx read in the epilogue)" if g else "base dX GEMM dx = dy W"
        out += [_pass(ZERO_FILL, "memory", 0, e, 1), du,
                _pass(name, "gemm", 2.0 * M * N * K, base_bytes, 1, (M, N, K), "cublas"),
                _pass(LORA_DELTA_DX, "memory", 2.0 * M * r * K, (2 * M * K + M * r + r * K) * e, 1, (M, r, K),
                      "cublas"), *grads]
    return out


def paired_bwd_passes(M, K, Ns, r, e, impl, delta="first", fp8_dgrad=False, need_dx=True):
    """The student's backward of a group of linears, as ``_student_bwd`` runs it: ``du_g = s dy_g B_g``
    into the columns of one (M, G r) du; cuBLAS: the group's LoRA part of dx first, ``dx = du [A_1;
    ..]`` (dx written once, priced by its bytes), then each base dX GEMM ``dx += dy_g W_g`` (beta = 1: dx
    read in its epilogue); ours: one GEMM per linear for ``dy W + du A``, accumulating into dx; then
    ``dA = du^T x`` for the whole group (x read once; split per linear) and ``dB_g = dy_g^T u_g``
    (cuBLAS, both). ``delta="after"``: the earlier form (:func:`paired_fwd_passes`). ``fp8_dgrad``: the
    base part of dx as one FP8 GEMM over the group (its dy's quantized into one e4m3 buffer), the LoRA
    part added after it. ``need_dx`` false (the input needs no gradient; the current form only, the
    earlier one computed dx always): du, dA and dB, no dX GEMM."""
    G = len(Ns)
    Gr = G * r
    if M == 0:
        return [] if impl == "triton" else [_pass(ZERO_FILL, "memory", 0, e, 1)] * (G if delta == "after" else 1)
    if fp8_dgrad and (need_dx or delta == "after"):  # the earlier form computed dx always
        SN = sum(Ns)
        lib = "triton" if impl == "triton" else "cublas"
        out = [] if impl == "triton" else [_pass(ZERO_FILL, "memory", 0, e, 1)]
        out += [_pass(LORA_DOWN, "gemm", 2.0 * M * N * r, (M * N + N * r + M * r) * e, 1, (M, N, r), lib)
                for N in Ns]
        if G > 1:
            out += [_pass(LORA_STACK, "memory", 0, 2 * r * K * e, 1) for _ in Ns]
        quant = sum(2 * M * N * e + M * N for N in Ns) + 4 * M  # one launch for up to 3 (quantize_rows_cat)
        out.append(_pass(FP8_DY_QUANT, "memory", 0, quant, 1 if G <= 3 else 2 * G + 2))
        if impl == "triton":  # ours: the LoRA part of dx in the FP8 dX GEMM's tile (one launch, dx written once)
            out += [_pass(FP8_OURS + ": dX = [dy_1 | ..] [W_1; ..] + du [A_1; ..]", "gemm_fp8", 2.0 * M * SN * K,
                          M * SN + SN * K + (M * K + M * Gr + Gr * K) * e, 1, (M, SN, K), "triton"),
                    _pass(FP8_OURS_DELTA, "gemm", 2.0 * M * Gr * K, 0, 0, (M, Gr, K), "triton")]
        else:
            out += [_pass("FP8 dX GEMM dx = [dy_1 | ..] [W_1; ..] (one per group, e4m3 operands)", "gemm_fp8",
                          2.0 * M * SN * K, M * SN + SN * K + M * K * e, 1, (M, SN, K), "cublas"),
                    _pass(LORA_DELTA_DX, "memory", 2.0 * M * Gr * K, (M * Gr + Gr * K + 2 * M * K) * e, 1,
                          (M, Gr, K), "cublas")]
        out.append(_pass(LORA_DOWN, "gemm", 2.0 * Gr * M * K, (M * Gr + M * K + Gr * K) * e, 1, (Gr, M, K), "cublas"))
        if G > 1:
            out += [_pass(LORA_STACK, "memory", 0, 2 * r * K * e, 1) for _ in Ns]
        return out + [_pass(LORA_DOWN, "gemm", 2.0 * N * M * r, (M * N + M * r + N * r) * e, 1, (N, M, r), "cublas")
                      for N in Ns]
    if delta == "after":
        return _bwd_passes_delta_after(M, K, Ns, r, e, impl)
    lib = "triton" if impl == "triton" else "cublas"
    out = [] if impl == "triton" else [_pass(ZERO_FILL, "memory", 0, e, 1)]
    out += [_pass(LORA_DOWN, "gemm", 2.0 * M * N * r, (M * N + N * r + M * r) * e, 1, (M, N, r), lib) for N in Ns]
    if need_dx and G > 1 and impl != "triton":  # [A_1; ..] for dx = du [A_1; ..] (ours reads each A_g in its dX GEMM)
        out += [_pass(LORA_STACK, "memory", 0, 2 * r * K * e, 1) for _ in Ns]
    if not need_dx:  # the input needs no gradient: no dX GEMM
        pass
    elif impl == "triton":
        out += [_pass("base dX GEMM dx (+)= dy W + du A (one kernel)", "gemm", 2.0 * M * N * K + 2.0 * M * r * K,
                      (M * N + N * K + M * K + (M * K if g else 0) + M * r + r * K) * e, 1, (M, N, K), impl)
                for g, N in enumerate(Ns)]
    else:
        out.append(_pass(LORA_DELTA_DX_FIRST, "memory", 2.0 * M * Gr * K, (M * Gr + Gr * K + M * K) * e, 1,
                         (M, Gr, K), "cublas"))
        out += [_pass("base dX GEMM dx += dy W (beta = 1: dx read in the epilogue)", "gemm", 2.0 * M * N * K,
                      (M * N + N * K + 2 * M * K) * e, 1, (M, N, K), "cublas") for N in Ns]
    out.append(_pass(LORA_DOWN, "gemm", 2.0 * Gr * M * K, (M * Gr + M * K + Gr * K) * e, 1, (Gr, M, K), "cublas"))
    if G > 1:
        out += [_pass(LORA_STACK, "memory", 0, 2 * r * K * e, 1) for _ in Ns]
    out += [_pass(LORA_DOWN, "gemm", 2.0 * N * M * r, (M * N + M * r + N * r) * e, 1, (N, M, r), "cublas") for N in Ns]
    return out


# The form the op costs describe: "first" (what the code runs), or "after" while a calibration made on
# the earlier form is derived and checked (benchmarks/perf_model.py: a GPU run's time is modelled as the
# form that ran, so its rates are not fitted to a form it did not run).
COST_FORM = {"delta": "first", "gpu": None}  # gpu: the GPU whose choice ``impl="auto"`` prices (the model's)


@contextlib.contextmanager
def costs_of_form(delta: str | None = None, gpu: str | None = None):
    """Within: the paired op's costs are those of the form ``delta`` ("first" | "after"; None: as is),
    ``impl="auto"`` resolved for ``gpu``."""
    prev = dict(COST_FORM)
    COST_FORM.update({"delta": delta or prev["delta"], "gpu": gpu})
    try:
        yield
    finally:
        COST_FORM.update(prev)


@register_cost("dopsd_fast::paired_lora_linears")
def _(x_s, x_t, weights, biases, a_s, b_s, a_t, b_t, scales_s, scales_t, impl, fp8_w=(), fp8_scale=(),
      fp8_rowwise=True):
    e = x_s.element_size()
    Ns, K, r = [w.shape[0] for w in weights], x_s.shape[1], a_s[0].shape[0]
    impl = resolve_impl(impl, x_s, x_t, weights, a_s, scales_s)
    has_bias = [bias.numel() > 0 for bias in biases]
    passes = []
    ours_fp8 = bool(fp8_w) and impl == "triton"  # the TMA kernel: scales, delta and bias in the FP8 GEMM's tile
    for rows, scales in ((x_s.shape[0], scales_s), (x_t.shape[0], scales_t)):
        same = all(s == scales[0] for s in scales)
        form = "first" if ours_fp8 else "after" if fp8_w else COST_FORM["delta"]
        passes += paired_fwd_passes(rows, K, Ns, r, e, impl, has_bias, same, form)
    if not fp8_w:
        return _with_passes(passes)
    if ours_fp8:  # per linear: the FP8 GEMM (x, W one byte each) and, in the same launch, the bf16 delta
        out = []
        for p in passes:
            if p["name"] == BASE_GEMM_OURS:
                M, _, N = p["shape"]
                delta = 2.0 * M * r * N
                out += [_pass(FP8_OURS, "gemm_fp8", p["flops"] - delta, p["bytes"] - (M * K + N * K) * (e - 1), 1,
                              p["shape"], "triton"),
                        _pass(FP8_OURS_DELTA, "gemm", delta, 0, 0, (M, r, N), "triton")]
            else:
                out.append(p)
        for rows in (x_s.shape[0], x_t.shape[0]):
            if rows:
                out.append(_pass(FP8_X_QUANT, "memory", 0, rows * K * (2 * e + 1) + 4 * rows, 1))
        return _with_passes(out, "gemm_fp8")
    # FP8 (fast.fp8=native), as _branch_fwd runs it per branch: x quantized once (read twice, e4m3
    # written), per linear the FP8 GEMM at its shape (x and W read as one byte each, y written in the
    # activations' dtype), then the LoRA delta by a second call (the "after" form); u's GEMM as in bf16
    out = []
    for p in passes:
        if p["name"] == BASE_GEMM_AFTER:
            M, _, N = p["shape"]
            p = _pass("FP8 base GEMM y = x W^T (e4m3 operands)", "gemm_fp8", p["flops"], M * K + N * K + M * N * e, 1,
                      p["shape"], CUBLAS_FAST)
        out.append(p)
    for rows in (x_s.shape[0], x_t.shape[0]):
        if rows:
            out.append(_pass(FP8_X_QUANT, "memory", 0, rows * K * (2 * e + 1) + 4 * rows, 1))
    return _with_passes(out, "gemm_fp8")


@register_cost("dopsd_fast::paired_lora_linears_backward")
def _(dys, x, weights, u, a_s, b_s, scales, impl, fp8_wt=(), fp8_rowwise=True, need_dx=True):
    M, K = x.shape
    return _with_passes(paired_bwd_passes(M, K, [w.shape[0] for w in weights], a_s[0].shape[0], x.element_size(),
                                          impl, COST_FORM["delta"], fp8_dgrad=bool(fp8_wt), need_dx=need_dx))


# ---- the implementation per shape: ours (delta and dx in the GEMM) where it wins, else cuBLAS ---------
# Rates measured per GPU: the base GEMM's FLOP/s by "inner x out" shape per implementation, the device
# copy's bandwidth (bytes read + written per second) and the cost of one launch, as the step model
# derives them from the calibration file (benchmarks/perf_model.py derive_rates of
# benchmarks/calibration/h200-2026-12-04.json: m2's paired linear at 4608 + 5120 rows, rank 64;
# tests/test_perf_model.py checks these equal it).
PAIRED_RATES = {
    "NVIDIA H200": {"gemm": {"cublas": {"3840x3840": 695.9e12, "3840x10240": 656.8e12, "10240x3840": 679.5e12},
                             "triton": {"3840x3840": 510.7e12, "3840x10240": 599.0e12, "10240x3840": 536.7e12}},
                    "bandwidth": 4.024e12, "launch_s": 0.925e-6},
}


def _paired_seconds(passes, rates) -> float:
    """Seconds of ``passes`` at ``rates``, as the step model prices them: per pass, launches x launch +
    max(FLOPs / the GEMM rate of its (inner, out) shape and implementation, bytes / bandwidth); a shape
    not measured at the slowest measured rate of its implementation."""
    t = 0.0
    for p in passes:
        secs = p["bytes"] / rates["bandwidth"]
        if p["kind"] == "gemm":
            table = rates["gemm"][p["impl"]]
            rate = table.get(f"{p['shape'][1]}x{p['shape'][2]}", min(table.values()))
            secs = max(secs, p["flops"] / rate)
        t += p["launches"] * rates["launch_s"] + secs
    return t


@functools.lru_cache(maxsize=256)
def choose_paired_impl(K: int, Ns: tuple, rows_s: int, rows_t: int, r: int, gpu: str | None,
                       same_scale: bool = True) -> str:
    """``"triton"`` (ours: the LoRA delta in the base GEMM's tile, dx accumulated in the dX GEMM) or
    ``"torch"`` (cuBLAS, delta first): whichever the GPU's measured rates (:data:`PAIRED_RATES`) price
    faster for this group's forward (both branches) and the student's backward, each form with the
    passes it launches. A GPU with no measurement: cuBLAS."""
    rates = next((v for k, v in PAIRED_RATES.items() if gpu is not None and gpu.startswith(k)), None)
    if rates is None:
        return "torch"

    def seconds(impl):
        passes = [p for rows in (rows_s, rows_t) for p in paired_fwd_passes(rows, K, list(Ns), r, 2, impl,
                                                                            same_scale=same_scale)]
        return _paired_seconds(passes + paired_bwd_passes(rows_s, K, list(Ns), r, 2, impl), rates)

    return "triton" if seconds("triton") < seconds("torch") else "torch"


@functools.lru_cache(maxsize=16)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def resolve_impl(impl: str, x_s, x_t, weights, a_s, scales_s) -> str:
    """``impl`` with ``"auto"`` resolved for this group on ``x_s``'s GPU (within :func:`costs_of_form`
    naming a GPU: that one, as the step model prices it)."""
    if impl != "auto":
        return impl
    gpu = COST_FORM["gpu"]
    if gpu is None and x_s.is_cuda:
        gpu = _gpu_name(x_s.device.index if x_s.device.index is not None else torch.cuda.current_device())
    return choose_paired_impl(int(x_s.shape[1]), tuple(int(w.shape[0]) for w in weights), int(x_s.shape[0]),
                              int(x_t.shape[0]), int(a_s[0].shape[0]), gpu, all(s == scales_s[0] for s in scales_s))


def paired_lora_linears(x_s: torch.Tensor, x_t: torch.Tensor, weights: list, biases: list, students: list,
                        teachers: list, impl: str = "triton", fp8=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A group of linears reading the same input (e.g. q, k, v): ``x_s`` (student rows, differentiable)
    and ``x_t`` (teacher rows, constants) through each base weight with each branch's own adapter
    ``(lora_A (r, K), lora_B (N, r), scale)``. Returns ``[(y_s, y_t)]`` per linear; ``y_t`` carries no
    gradient, nothing of the teacher rows is kept for the backward, and the student's dx of the whole
    group is one buffer. ``fp8``: a :class:`dopsd_fast.fp8.NativeFP8` (its weights quantized once): the base
    GEMMs in FP8, and with its ``dgrad`` the student's dX GEMM too (one per group)."""
    K = x_s.shape[-1]
    if x_t.shape[-1] != K:
        raise ValueError(f"paired_lora_linear: x_s and x_t last dims differ ({K} vs {x_t.shape[-1]})")
    if not (len(weights) == len(biases) == len(students) == len(teachers)) or not weights:
        raise ValueError("paired_lora_linears: one weight, bias, student and teacher adapter per linear")
    for i, (w, lo_s, lo_t) in enumerate(zip(weights, students, teachers)):
        N = w.shape[0]
        if w.shape[1] != K:
            raise ValueError(f"paired_lora_linear[{i}]: weight {tuple(w.shape)} does not fit x's last dim {K}")
        for name, (a, b, _) in (("student", lo_s), ("teacher", lo_t)):
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != K or b.shape[0] != N or a.shape[0] != b.shape[1]:
                raise ValueError(f"paired_lora_linear[{i}]: {name} adapter A {tuple(a.shape)} / B {tuple(b.shape)} "
                                 f"do not fit a ({N}, {K}) linear")
        _one_dtype(f"paired_lora_linear[{i}]", x_s, x_t=x_t, weight=w, bias=biases[i], student_A=lo_s[0],
                   student_B=lo_s[1], teacher_A=lo_t[0], teacher_B=lo_t[1])
        if torch.is_grad_enabled() and (w.requires_grad or (biases[i] is not None and biases[i].requires_grad)):
            raise ValueError(f"paired_lora_linear[{i}]: the base weight requires grad, but this op trains only the "
                             "student adapter (freeze it, or use two separate layers)")
    if impl not in ("triton", "torch", "auto"):
        raise ValueError(f"paired_lora_linear: impl must be 'triton', 'torch' or 'auto', got {impl!r}")
    if len(weights) > 1 and any(len({lo[0].shape[0] for lo in los}) > 1 for los in (students, teachers)):
        # adapters of different ranks (a per-module rank pattern): the group's stacked low-rank form needs
        # one rank, so each linear is its own group
        return [paired_lora_linears(x_s, x_t, [w], [b], [lo_s], [lo_t], impl, fp8)[0]
                for w, b, lo_s, lo_t in zip(weights, biases, students, teachers)]
    nob = weights[0].new_empty(0)
    fq = [fp8.weight(w) for w in weights] if fp8 is not None else []
    x2, x_t2 = x_s.reshape(-1, K).contiguous(), x_t.reshape(-1, K).contiguous().detach()
    a_s, b_s = [lo[0] for lo in students], [lo[1] for lo in students]
    frozen = ([lo[0].detach() for lo in teachers], [lo[1].detach() for lo in teachers],
              [float(lo[2]) for lo in students], [float(lo[2]) for lo in teachers], impl, [q for q, _ in fq],
              [s for _, s in fq], bool(fp8.rowwise) if fp8 is not None else True)
    weights, biases = list(weights), [nob if b is None else b for b in biases]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x2, *a_s, *b_s)):
        out = _PairedLinears.apply((x_t2, weights, biases, *frozen, fp8), x2, *a_s, *b_s)
    else:  # nothing to differentiate (the teacher alone, a no-grad roll-out, a CUDA-graph capture)
        out = paired_lora_linears_op(x2, x_t2, weights, biases, a_s, b_s, *frozen)
    G = len(weights)
    return [(out[g].reshape(*x_s.shape[:-1], w.shape[0]), out[G + g].reshape(*x_t.shape[:-1], w.shape[0]))
            for g, w in enumerate(weights)]


def paired_lora_linear(x_s: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       student: tuple, teacher: tuple, impl: str = "triton", fp8=None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """One linear of the double forward (:func:`paired_lora_linears` with a group of one)."""
    return paired_lora_linears(x_s, x_t, [weight], [bias], [student], [teacher], impl, fp8)[0]
