"""Larger sweeps at the real head dims and widths: GPU only (DOPSD_GPU_TESTS=1 on a CUDA machine).
On the CPU they are skipped, not passed: the interpreter would take hours at these sizes."""

import os

import pytest
import torch

from tests.conftest import low_precision_rule

pytestmark = pytest.mark.skipif(os.environ.get("DOPSD_GPU_TESTS") != "1" or not torch.cuda.is_available(),
                                reason="GPU-only sweep (set DOPSD_GPU_TESTS=1 on a CUDA machine)")


@pytest.mark.parametrize("H,D,lq,lk", [(30, 128, [4352], [4352]), (24, 128, [1000, 3100], [1500, 4608]),
                                       (8, 64, [777, 1, 2048], [2048, 513, 9])])
def test_attention_real_sizes(H, D, lq, lk):
    from dopsd_fast.kernels.attention import attention_varlen_ref, flash_attn_varlen
    from tests.kernels.test_attention import _cu, _grads, _qkv, _sdpa_varlen

    cu_q, cu_k = _cu(lq), _cu(lk)
    low = _qkv(lq, lk, H, D, torch.bfloat16)
    g = torch.randn(low[0].shape).to(torch.bfloat16)
    fast = _grads(lambda q, k, v: flash_attn_varlen(q, k, v, cu_q, cu_k), low, g)
    ref = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k), [t.float() for t in low], g.float())
    torch_low = _grads(lambda q, k, v: _sdpa_varlen(q, k, v, cu_q, cu_k), low, g)
    for name, a, t, r in zip(["o", "lse", "dq", "dk", "dv"], fast, torch_low, ref):
        low_precision_rule(a, t, r, 1e-3 if name == "lse" else 1e-2 * max(1.0, r.abs().max().item()), name)


@pytest.mark.parametrize("K,N", [(3840, 3840), (3840, 10240), (3072, 9216)])
def test_multi_lora_real_sizes(K, N):
    from tests.kernels.test_multi_lora import NAMES, _params, _run_fused, _run_ref

    M, n = 2 * 1100, 1100
    x = torch.randn(M, K)
    params = _params(K, N, 32, bias=False)
    g = torch.randn(M, N)
    low = [t.bfloat16() if t is not None else None for t in (x, *params)]
    fast = _run_fused(*low, n, g.bfloat16(), "triton")
    ref = _run_ref(*[t.float() if t is not None else None for t in low], n, g.bfloat16().float())
    torch_low = _run_ref(*low, n, g.bfloat16())
    for name, a, t, r in zip(NAMES, fast, torch_low, ref):
        low_precision_rule(a, t, r, 2e-2 * max(1.0, r.abs().max().item()), name)


def test_rope_norm_swiglu_real_sizes():
    from dopsd_fast.kernels.norm_modulation import rms_norm_modulate, rms_norm_modulate_ref
    from dopsd_fast.kernels.rope_qk_norm import rope_qk_norm, rope_qk_norm_ref
    from dopsd_fast.kernels.swiglu import swiglu, swiglu_ref

    q, k = torch.randn(1, 4352, 30, 128).bfloat16(), torch.randn(1, 4352, 30, 128).bfloat16()
    w = (1 + 0.1 * torch.randn(128)).bfloat16()
    th = torch.rand(1, 4352, 64) * 6.28
    out = rope_qk_norm(q, k, w, w, torch.cos(th), torch.sin(th))
    r32 = rope_qk_norm_ref(q.float(), k.float(), w.float(), w.float(), torch.cos(th), torch.sin(th))
    r16 = rope_qk_norm_ref(q, k, w, w, torch.cos(th), torch.sin(th))
    for a, t, r in zip(out, r16, r32):
        low_precision_rule(a, t, r, 1e-2, "rope_qk_norm")
    x, s = torch.randn(1, 4352, 3840).bfloat16(), (0.1 * torch.randn(1, 3840)).bfloat16()
    low_precision_rule(rms_norm_modulate(x, w.new_ones(3840), s), rms_norm_modulate_ref(x, w.new_ones(3840), s),
                       rms_norm_modulate_ref(x.float(), w.new_ones(3840).float(), s.float()), 1e-2, "rms_norm_modulate")
    a, b = torch.randn(4352, 10240).bfloat16(), torch.randn(4352, 10240).bfloat16()
    low_precision_rule(swiglu(a, b), torch.nn.functional.silu(a) * b, swiglu_ref(a.float(), b.float()), 1e-2, "swiglu")
