"""Flash attention (varlen, LSE, fwd + bwd) and its dual-branch mode: Triton (interpreted) vs the
fp32 reference, PyTorch SDPA in low precision, and two separate calls."""

import pytest
import torch

from tests.conftest import assert_close, low_precision_rule


def _cu(lengths):
    return torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)


def _qkv(lq, lk, H, D, dtype=torch.float32):
    q = torch.randn(sum(lq), H, D) * 1.5
    k, v = torch.randn(sum(lk), H, D) * 1.5, torch.randn(sum(lk), H, D)
    return [t.to(dtype) for t in (q, k, v)]


def _grads(fn, ins, g):
    ins = [t.detach().clone().requires_grad_() for t in ins]
    o, lse = fn(*ins)
    o.backward(g)
    return [o.detach(), lse.detach()] + [t.grad for t in ins]


def _sdpa_varlen(q, k, v, cu_q, cu_k):
    """PyTorch's own path per sample (SDPA in the input dtype); lse from fp32 scores."""
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qb, kb, vb = (t.transpose(0, 1) for t in (q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qb, kb, vb).transpose(0, 1))
        lses.append(torch.logsumexp(qb.float() @ kb.float().transpose(1, 2) * q.shape[-1] ** -0.5, -1))
    return torch.cat(outs), torch.cat(lses, dim=1)


CASES = [([5, 18, 17], [7, 1, 33], 2, 16), ([1, 23], [30, 9], 3, 40), ([9], [21], 1, 64), ([0, 13, 4], [6, 11, 0], 2, 32),
         ([6, 3], [5, 19], 1, 128)]
NAMES = ["o", "lse", "dq", "dk", "dv"]


def _varlen_vs_reference(lq, lk, H, D, atol):
    """flash_attn_varlen's output, lse and gradients against autograd through the fp32 reference."""
    from dopsd_fast.kernels.attention import attention_varlen_ref, flash_attn_varlen

    cu_q, cu_k = _cu(lq), _cu(lk)
    ins = _qkv(lq, lk, H, D)
    g = torch.randn_like(ins[0])
    fast = _grads(lambda q, k, v: flash_attn_varlen(q, k, v, cu_q, cu_k), ins, g)
    ref = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k), ins, g)
    for name, a, b in zip(NAMES, fast, ref):
        assert_close(a, b, atol, 1e-4, name, scaled=True)
    return cu_q, cu_k, ins, g, fast


@pytest.mark.parametrize("lq,lk,H,D", CASES)
def test_varlen_fp32(lq, lk, H, D):
    cu_q, cu_k, _, _, fast = _varlen_vs_reference(lq, lk, H, D, 2e-5)
    # a sample without keys: output 0 and lse -inf, as documented
    for b in range(len(lq)):
        if lk[b] == 0 and lq[b]:
            rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
            assert fast[0][rows].abs().max() == 0 and torch.isneginf(fast[1][:, rows]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq,lk,H,D", [CASES[0], CASES[1], CASES[4]])
def test_varlen_low_precision(dtype, lq, lk, H, D):
    from dopsd_fast.kernels.attention import attention_varlen_ref, flash_attn_varlen

    cu_q, cu_k = _cu(lq), _cu(lk)
    low = _qkv(lq, lk, H, D, dtype)
    g = torch.randn(low[0].shape).to(dtype)
    fast = _grads(lambda q, k, v: flash_attn_varlen(q, k, v, cu_q, cu_k), low, g)
    ref = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k), [t.float() for t in low], g.float())
    torch_low = _grads(lambda q, k, v: _sdpa_varlen(q, k, v, cu_q, cu_k), low, g)
    for name, a, t, r in zip(NAMES, fast, torch_low, ref):
        atol = 1e-3 if name == "lse" else 1e-2 * max(1.0, r.abs().max().item())
        low_precision_rule(a, t, r, atol, name)


@pytest.mark.parametrize("case", ["general", "no_shared", "some_shared_empty", "no_student_rows", "no_teacher_rows"])
def test_dual_branch_equals_two_calls(case):
    from dopsd_fast.kernels.attention import _concat_kv, dual_branch_attention, flash_attn_varlen

    H, D = 2, 24
    lq_s, lq_t = [17, 5, 20], [17, 9, 3]
    l_sh, l_s, l_t = [19, 4, 33], [6, 0, 11], [14, 7, 1]
    if case == "no_shared":
        l_sh = [0, 0, 0]
    if case == "some_shared_empty":
        l_sh = [19, 0, 33]
    if case == "no_student_rows":
        lq_s = [0, 0, 0]
    if case == "no_teacher_rows":
        lq_t = [0, 0, 0]
    q_s, q_t = torch.randn(sum(lq_s), H, D), torch.randn(sum(lq_t), H, D)
    kv = {n: (torch.randn(sum(l), H, D), torch.randn(sum(l), H, D), _cu(l)) for n, l in
          (("sh", l_sh), ("s", l_s), ("t", l_t))}
    leaves = [q_s, kv["sh"][0], kv["sh"][1], kv["s"][0], kv["s"][1]]
    leaves = [t.clone().requires_grad_() for t in leaves]
    q_t_leaf = q_t.clone().requires_grad_()
    o_s, l_s_, o_t, l_t_ = dual_branch_attention(
        leaves[0], q_t_leaf, (leaves[1], leaves[2], kv["sh"][2]), (leaves[3], leaves[4], kv["s"][2]), kv["t"],
        _cu(lq_s), _cu(lq_t))
    g = torch.randn_like(o_s)
    if o_s.numel():
        o_s.backward(g)
    assert not o_t.requires_grad and q_t_leaf.grad is None

    # two separate calls on the concatenated key sets
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    k_s, cu_k_s = _concat_kv(kv["sh"][2], ref_leaves[1], kv["s"][2], ref_leaves[3])
    v_s, _ = _concat_kv(kv["sh"][2], ref_leaves[2], kv["s"][2], ref_leaves[4])
    ro_s, rl_s = flash_attn_varlen(ref_leaves[0], k_s, v_s, _cu(lq_s), cu_k_s)
    k_t, cu_k_t = _concat_kv(kv["sh"][2], kv["sh"][0], kv["t"][2], kv["t"][0])
    v_t, _ = _concat_kv(kv["sh"][2], kv["sh"][1], kv["t"][2], kv["t"][1])
    ro_t, rl_t = flash_attn_varlen(q_t, k_t, v_t, _cu(lq_t), cu_k_t)
    assert_close(o_s, ro_s, 1e-6, 1e-5, "o_student", scaled=True)
    assert_close(l_s_, rl_s, 1e-6, 1e-5, "lse_student", scaled=True)
    assert_close(o_t, ro_t, 1e-6, 1e-5, "o_teacher", scaled=True)
    assert_close(l_t_, rl_t, 1e-6, 1e-5, "lse_teacher", scaled=True)
    if o_s.numel():
        ro_s.backward(g)
        for name, a, b in zip(["dq_s", "dk_shared", "dv_shared", "dk_student", "dv_student"], leaves, ref_leaves):
            assert_close(a.grad, b.grad, 1e-5, 1e-4, name, scaled=True)


@pytest.mark.parametrize("lq,lk,H,D", [CASES[0], CASES[3]])
def test_the_pytorch_fallback_has_a_backward(monkeypatch, lq, lk, H, D):
    """Off the Triton path (CPU tensors without the interpreter) the backward ran autograd inside the
    custom op's body, which records nothing: every backward raised "element 0 of tensors does not require
    grad". Its closed form matches autograd through the reference, for one branch and for both."""
    from dopsd_fast.kernels import attention
    from dopsd_fast.kernels.attention import _concat_kv, attention_varlen_ref, dual_branch_attention

    monkeypatch.setattr(attention, "use_triton", lambda *t: False)
    cu_q, _, ins, g, _ = _varlen_vs_reference(lq, lk, H, D, 1e-5)
    # both branches: shared keys + the student's own (the teacher's take no gradient)
    l_sh, l_s = [3] + [2] * (len(lq) - 1), list(lk)
    sh = [torch.randn(sum(l_sh), H, D).requires_grad_() for _ in range(2)]
    own = [torch.randn(sum(l_s), H, D).requires_grad_() for _ in range(2)]
    q_s = ins[0].clone().requires_grad_()
    o_s, _, _, _ = dual_branch_attention(q_s, ins[0], (*sh, _cu(l_sh)), (*own, _cu(l_s)),
                                         (own[0].detach(), own[1].detach(), _cu(l_s)), cu_q, cu_q)
    got = torch.autograd.grad(o_s, [q_s, *sh, *own], g)
    leaves = [t.detach().clone().requires_grad_() for t in (q_s, *sh, *own)]
    k, cu_kk = _concat_kv(_cu(l_sh), leaves[1], _cu(l_s), leaves[3])
    v, _ = _concat_kv(_cu(l_sh), leaves[2], _cu(l_s), leaves[4])
    want = torch.autograd.grad(attention_varlen_ref(leaves[0], k, v, cu_q, cu_kk)[0], leaves, g)
    for name, a, b in zip(["dq_s", "dk_shared", "dv_shared", "dk_student", "dv_student"], got, want):
        assert_close(a, b, 1e-5, 1e-4, name, scaled=True)


def test_opcheck_and_errors():
    from dopsd_fast.kernels.attention import (attn_varlen_backward_op, dual_branch_attention_op, flash_attn_varlen,
                                              flash_attn_varlen_op)

    H, D = 2, 16
    cu_q, cu_k = _cu([3, 5]), _cu([4, 2])
    q, k, v = (t.requires_grad_() for t in _qkv([3, 5], [4, 2], H, D))
    torch.library.opcheck(flash_attn_varlen_op, (q, k, v, cu_q, cu_k, 5, 4, 0.25))
    o, lse = flash_attn_varlen_op(q.detach(), k.detach(), v.detach(), cu_q, cu_k, 5, 4, 0.25)
    e = k.detach()[:0]
    torch.library.opcheck(attn_varlen_backward_op, (torch.randn_like(o), q.detach(), o, lse, k.detach(), v.detach(), e,
                                                    e, cu_q, cu_k, torch.zeros_like(cu_k), 5, 4, 0, 0.25))
    kt, vt = torch.randn(3, H, D), torch.randn(3, H, D)
    torch.library.opcheck(dual_branch_attention_op, (q, torch.randn(8, H, D), k, v, k.detach()[:2].clone(),
                                                     v.detach()[:2].clone(), kt, vt, cu_q, cu_q, cu_k, _cu([1, 1]),
                                                     _cu([2, 1]), 5, 4, 1, 2, 0.25))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        flash_attn_varlen(q, k, v, cu_q, _cu([4, 3]))
    with pytest.raises(ValueError, match="heads/head_dim"):
        flash_attn_varlen(q, k[..., :8], v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"^k is torch.bfloat16, q is torch.float32: attention takes one dtype$"):
        flash_attn_varlen(q, k.bfloat16(), v.bfloat16(), cu_q, cu_k)
