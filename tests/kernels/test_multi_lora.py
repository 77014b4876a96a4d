"""Multi-LoRA linear: one shared base GEMM + per-branch adapters == two separate (peft) LoRA layers."""

import pytest
import torch

from tests.conftest import assert_close, low_precision_rule


def _params(K, N, r, bias=True):
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    a_s, b_s = torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    a_t, b_t = torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    return w, b, a_s, b_s, a_t, b_t


def _run_fused(x, w, b, a_s, b_s, a_t, b_t, n, g, impl):
    from dopsd_fast.kernels.multi_lora import multi_lora_linear

    x, a_s, b_s = (t.detach().clone().requires_grad_() for t in (x, a_s, b_s))
    y = multi_lora_linear(x, w, b, (a_s, b_s, 0.75), (a_t, b_t, 1.5), n, impl=impl)
    (y.float() * g.float()).sum().backward()
    return [y.detach(), x.grad, a_s.grad, b_s.grad]


def _run_ref(x, w, b, a_s, b_s, a_t, b_t, n, g):
    from dopsd_fast.kernels.multi_lora import multi_lora_linear_ref

    x, a_s, b_s = (t.detach().clone().requires_grad_() for t in (x, a_s, b_s))
    y = multi_lora_linear_ref(x, w, b, a_s, b_s, a_t, b_t, 0.75, 1.5, n)
    (y.float() * g.float()).sum().backward()
    return [y.detach(), x.grad, a_s.grad if a_s.grad is not None else torch.zeros_like(a_s),
            b_s.grad if b_s.grad is not None else torch.zeros_like(b_s)]


NAMES = ["y", "dx", "d lora_A (student)", "d lora_B (student)"]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r,n", [(37, 48, 40, 4, 20), (19, 33, 70, 8, 0), (19, 33, 70, 8, 19), (5, 16, 16, 2, 3)])
def test_matches_two_lora_layers(impl, dtype, M, K, N, r, n):
    x = torch.randn(M, K)
    params = _params(K, N, r, bias=(M % 2 == 1))
    g = torch.randn(M, N)
    low = [t.to(dtype) if t is not None else None for t in (x, *params)]
    fast = _run_fused(*low, n, g.to(dtype), impl)
    ref = _run_ref(*[t.float() if t is not None else None for t in low], n, g.to(dtype).float())
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, fast, ref):
            assert_close(a, b, 1e-4, 1e-4, name, scaled=True)
    else:
        torch_low = _run_ref(*low, n, g.to(dtype))
        for name, a, t, b in zip(NAMES, fast, torch_low, ref):
            low_precision_rule(a, t, b, 2e-2 * max(1.0, b.abs().max().item()), name)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_equals_peft_layers_3d_input():
    """Against real peft LoRA layers (two adapters on one nn.Linear), input (B, S, K) packed as
    [student batch; teacher batch] exactly as the double forward packs it."""
    from peft import LoraConfig, inject_adapter_in_model

    from dopsd_fast.kernels.multi_lora import multi_lora_linear

    B, S, K, N = 2, 5, 24, 32
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(K, N)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False), model,
                            adapter_name="student")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["lin"], init_lora_weights=False), model,
                            adapter_name="teacher")
    lin = model.lin
    xs, xt = torch.randn(B, S, K), torch.randn(B, S, K)
    lin.set_adapter("student")
    ys = lin(xs)
    lin.set_adapter("teacher")
    yt = lin(xt)
    for p in lin.parameters():
        p.requires_grad_(False)
    ad = lambda n: (lin.lora_A[n].weight, lin.lora_B[n].weight, lin.scaling[n])  # noqa: E731
    y = multi_lora_linear(torch.cat([xs, xt]), lin.base_layer.weight, lin.base_layer.bias, ad("student"),
                          ad("teacher"), n_split=B * S)
    assert_close(y, torch.cat([ys, yt]), 1e-5, 1e-5, "y", scaled=True)


def test_opcheck_and_errors():
    from dopsd_fast.kernels.multi_lora import (multi_lora_linear, multi_lora_linear_backward_op,
                                               multi_lora_linear_op)

    w, b, a_s, b_s, a_t, b_t = _params(16, 24, 2)
    x = torch.randn(9, 16, requires_grad=True)
    for impl in ("triton", "torch"):
        torch.library.opcheck(multi_lora_linear_op, (x, w, b, a_s.requires_grad_(), b_s.requires_grad_(), a_t, b_t,
                                                     0.5, 2.0, 4, impl))
        y, u = multi_lora_linear_op(x.detach(), w, b, a_s.detach(), b_s.detach(), a_t, b_t, 0.5, 2.0, 4, impl)
        torch.library.opcheck(multi_lora_linear_backward_op, (torch.randn_like(y), x.detach(), w, u, a_s.detach(),
                                                              b_s.detach(), a_t, b_t, 0.5, 2.0, 4, impl))
    with pytest.raises(ValueError, match="weight require grad"):
        multi_lora_linear(x, w.requires_grad_(), b, (a_s, b_s, 1.0), (a_t, b_t, 1.0), 4)
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="n_split"):
        multi_lora_linear(x, w, b, (a_s, b_s, 1.0), (a_t, b_t, 1.0), 10)
    with pytest.raises(ValueError, match="ranks differ"):
        multi_lora_linear(x, w, b, (a_s, b_s, 1.0), (a_t[:1], b_t[:, :1], 1.0), 4)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_paired_form_equals_two_layers(impl):
    from dopsd_fast.kernels.multi_lora import lora_linear_ref, paired_lora_linear, paired_lora_linear_op

    w, b, a_s, b_s, a_t, b_t = _params(24, 40, 4)
    xs, xt = torch.randn(2, 7, 24, requires_grad=True), torch.randn(9, 24)
    a_s.requires_grad_(), b_s.requires_grad_()
    ys, yt = paired_lora_linear(xs, xt, w, b, (a_s, b_s, 0.5), (a_t, b_t, 2.0), impl=impl)
    assert not yt.requires_grad
    g = torch.randn_like(ys)
    gx, ga, gb = torch.autograd.grad(ys, (xs, a_s, b_s), g)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (xs, a_s, b_s))
    yr = lora_linear_ref(xr, w, b, ar, br, 0.5)
    assert_close(ys, yr, 1e-5, 1e-5, "y_s", scaled=True)
    assert_close(yt, lora_linear_ref(xt, w, b, a_t, b_t, 2.0), 1e-5, 1e-5, "y_t", scaled=True)
    for name, a, r in zip(["dx_s", "dA_s", "dB_s"], (gx, ga, gb), torch.autograd.grad(yr, (xr, ar, br), g)):
        assert_close(a, r, 1e-4, 1e-4, name, scaled=True)
    torch.library.opcheck(paired_lora_linear_op, (xs.detach().reshape(-1, 24).requires_grad_(), xt, w, b, a_s, b_s, a_t,
                                                  b_t, 0.5, 2.0, impl))
