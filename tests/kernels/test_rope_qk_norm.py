"""Fused per-head RMSNorm + RoPE on Q and K: Triton (interpreted) vs reference, and vs the exact code
paths of diffusers' Z-Image (complex, 3 axes) and FLUX.2 (real cos/sin, 4 axes)."""

import pytest
import torch

from tests.conftest import assert_close, low_precision_rule


def _angles(B, S, D, per_batch):
    theta = torch.rand(B if per_batch else 1, S, D // 2) * 6.28
    if not per_batch:
        theta = theta[0]
    return torch.cos(theta), torch.sin(theta)


def _run(fn, q, k, wq, wk, cos, sin, gq, gk):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, wq, wk)]
    oq, ok = fn(*ins, cos, sin)
    (oq.float() * gq.float()).sum().add((ok.float() * gk.float()).sum()).backward()
    return [oq.detach(), ok.detach()] + [t.grad for t in ins]


NAMES = ["q_out", "k_out", "dq", "dk", "dwq", "dwk"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# the last two: 134 and 130 tokens, 3 programs of 64 tokens under the interpreter (the last partial)
@pytest.mark.parametrize("B,S,H,D,per_batch", [(2, 7, 3, 16, True), (1, 5, 5, 64, False), (2, 3, 2, 40, True),
                                               (1, 2, 1, 128, False), (2, 67, 3, 16, True), (1, 130, 2, 24, False)])
def test_matches_reference(dtype, B, S, H, D, per_batch):
    from dopsd_fast.kernels.rope_qk_norm import rope_qk_norm, rope_qk_norm_ref

    q, k = torch.randn(B, S, H, D) * 2, torch.randn(B, S, H, D)
    wq, wk = 1 + 0.2 * torch.randn(D), 1 + 0.2 * torch.randn(D)
    cos, sin = _angles(B, S, D, per_batch)
    gq, gk = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    low = [t.to(dtype) for t in (q, k, wq, wk)]
    fast = _run(lambda *a: rope_qk_norm(*a, eps=1e-5), *low, cos, sin, gq.to(dtype), gk.to(dtype))
    ref = _run(lambda *a: rope_qk_norm_ref(*a, eps=1e-5), *[t.float() for t in low], cos, sin,
               gq.to(dtype).float(), gk.to(dtype).float())
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, fast, ref):
            assert_close(a, b, 1e-5, 1e-4, name, scaled=True)
    else:
        torch_low = _run(lambda *a: rope_qk_norm_ref(*a, eps=1e-5), *low, cos, sin, gq.to(dtype), gk.to(dtype))
        for name, a, t, b in zip(NAMES, fast, torch_low, ref):
            low_precision_rule(a, t, b, 1e-2 * max(1.0, b.abs().max().item()), name)


def test_zimage_convention():
    """Equals Z-Image's attention processor math: diffusers RMSNorm, then complex RoPE from its
    3-axis RopeEmbedder (per-sample freqs_cis)."""
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    from dopsd_fast.kernels.rope_qk_norm import rope_qk_norm, zimage_cos_sin

    B, S, H, D = 2, 6, 2, 32
    emb = RopeEmbedder(theta=256.0, axes_dims=[8, 12, 12], axes_lens=[16, 16, 16])
    ids = torch.randint(0, 16, (B * S, 3))
    freqs_cis = emb(ids).view(B, S, D // 2)
    nq, nk = RMSNorm(D, eps=1e-5), RMSNorm(D, eps=1e-5)
    with torch.no_grad():
        nq.weight.copy_(1 + 0.1 * torch.randn(D))
        nk.weight.copy_(1 + 0.1 * torch.randn(D))
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, H, D)

    def rot(x):  # verbatim from ZSingleStreamAttnProcessor
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)

    cos, sin = zimage_cos_sin(freqs_cis)
    oq, ok = rope_qk_norm(q, k, nq.weight.detach(), nk.weight.detach(), cos, sin, eps=1e-5)
    assert_close(oq, rot(nq(q)), 1e-5, 1e-5, "q", scaled=True)
    assert_close(ok, rot(nk(k)), 1e-5, 1e-5, "k", scaled=True)


def test_flux2_convention():
    """Equals FLUX.2's: torch RMSNorm (eps 1e-6), then real cos/sin RoPE from its 4-axis Flux2PosEmbed,
    applied with diffusers' apply_rotary_emb(sequence_dim=1)."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    from dopsd_fast.kernels.rope_qk_norm import flux2_cos_sin, rope_qk_norm

    B, S, H, D = 2, 9, 3, 32
    pe = Flux2PosEmbed(theta=2000, axes_dim=[8, 8, 8, 8])
    ids = torch.randint(0, 20, (S, 4))
    rot = pe(ids)
    nq, nk = torch.nn.RMSNorm(D, eps=1e-6), torch.nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        nq.weight.copy_(1 + 0.1 * torch.randn(D))
        nk.weight.copy_(1 + 0.1 * torch.randn(D))
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    cos, sin = flux2_cos_sin(rot)
    oq, ok = rope_qk_norm(q, k, nq.weight.detach(), nk.weight.detach(), cos, sin, eps=1e-6)
    assert_close(oq, apply_rotary_emb(nq(q), rot, sequence_dim=1), 1e-5, 1e-5, "q", scaled=True)
    assert_close(ok, apply_rotary_emb(nk(k), rot, sequence_dim=1), 1e-5, 1e-5, "k", scaled=True)


def test_opcheck_and_errors():
    from dopsd_fast.kernels.rope_qk_norm import rope_qk_norm, rope_qk_norm_backward_op, rope_qk_norm_op

    B, S, H, D = 2, 3, 2, 16
    q, k = torch.randn(B, S, H, D, requires_grad=True), torch.randn(B, S, H, D, requires_grad=True)
    w = torch.randn(D, requires_grad=True)
    cos, sin = _angles(B, S, D, True)
    torch.library.opcheck(rope_qk_norm_op, (q, k, w, w, cos, sin, 1e-5))
    _, _, rq, rk = rope_qk_norm_op(q.detach(), k.detach(), w.detach(), w.detach(), cos, sin, 1e-5)
    for params in (True, False):
        torch.library.opcheck(rope_qk_norm_backward_op, (torch.randn_like(q), torch.randn_like(k), q.detach(),
                                                         k.detach(), w.detach(), w.detach(), cos, sin, rq, rk, params))
    # frozen QK-norm weights (LoRA): the same dq, dk, and no weight-gradient work at all
    g = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    full = torch.autograd.grad(rope_qk_norm(q, k, w, w, cos, sin), (q, k, w), g)
    wf = w.detach()
    frozen = torch.autograd.grad(rope_qk_norm(q, k, wf, wf, cos, sin), (q, k), g)
    for name, a, b in zip(("dq", "dk"), frozen, full):
        assert torch.equal(a, b), name
    dq, dk, dwq, dwk = rope_qk_norm_backward_op(g[0], g[1], q.detach(), k.detach(), wf, wf, cos, sin, rq, rk, False)
    assert dwq.numel() == 0 and dwk.numel() == 0
    with pytest.raises(ValueError, match="cos/sin"):
        rope_qk_norm(q, k, w, w, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="even"):
        rope_qk_norm(torch.randn(1, 2, 1, 5), torch.randn(1, 2, 1, 5), torch.ones(5), torch.ones(5),
                     torch.ones(2, 2), torch.ones(2, 2))
