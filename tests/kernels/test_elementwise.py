"""SwiGLU and the fused D-OPSD loss: Triton (interpreted on the CPU) vs the PyTorch references."""

import pytest
import torch

from tests.conftest import assert_close, low_precision_rule

TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-2, 0), torch.float16: (2e-3, 0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 42, 123), (1, 1), (3, 1031)])
def test_swiglu_forward_backward(dtype, shape):
    from dopsd_fast.kernels.swiglu import swiglu, swiglu_ref

    a32, b32 = torch.randn(shape) * 3, torch.randn(shape)
    g32 = torch.randn(shape)
    a, b = a32.to(dtype).requires_grad_(), b32.to(dtype).requires_grad_()
    y = swiglu(a, b)
    y.backward(g32.to(dtype))
    # fp32 reference on the same (rounded) inputs
    ar, br = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    yr = torch.nn.functional.silu(ar) * br
    yr.backward(g32.to(dtype).float())
    atol, rtol = TOL[dtype]
    if dtype == torch.float32:
        assert_close(y, yr, atol, rtol, "y")
        assert_close(a.grad, ar.grad, atol, rtol, "da")
        assert_close(b.grad, br.grad, atol, rtol, "db")
    else:
        at, bt = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        yt = torch.nn.functional.silu(at) * bt  # PyTorch's own low-precision path
        yt.backward(g32.to(dtype))
        low_precision_rule(y, yt, yr, atol, "y")
        low_precision_rule(a.grad, at.grad, ar.grad, atol, "da")
        low_precision_rule(b.grad, bt.grad, br.grad, atol, "db")
    # the reference rounds the same fp32 math: at most one ulp apart in low precision
    assert_close(swiglu_ref(a.detach(), b.detach()), y.detach(), atol=atol, rtol=rtol if dtype == torch.float32 else 2 ** -7,
                 name="ref")


def test_swiglu_opcheck():
    from dopsd_fast.kernels.swiglu import swiglu_backward_op, swiglu_op

    a, b = torch.randn(5, 37, requires_grad=True), torch.randn(5, 37, requires_grad=True)
    torch.library.opcheck(swiglu_op, (a, b))
    torch.library.opcheck(swiglu_backward_op, (torch.randn(5, 37), a.detach(), b.detach()))


@pytest.mark.parametrize("loss", ["x0", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dopsd_loss_matches_state_loss(loss, dtype):
    from dopsd_fast.algorithm import state_loss
    from dopsd_fast.kernels.dopsd_loss import dopsd_loss

    shape = (3, 16, 7, 9)
    vs = torch.randn(shape).to(dtype).requires_grad_()
    vt = torch.randn(shape).to(dtype)
    sigma = torch.tensor([0.9, 0.45, 0.1])
    out = dopsd_loss(vs, vt, sigma, loss)
    (out * 3.0).backward()
    ref_in = vs.detach().clone().requires_grad_()
    ref = state_loss(ref_in, vt, sigma, loss)
    (ref * 3.0).backward()
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=1e-5, atol=1e-8, name="loss")
    atol = 1e-9 if dtype == torch.float32 else 1e-4
    assert_close(vs.grad.float(), ref_in.grad.float(), atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                 name="grad")


def test_dopsd_loss_opcheck_and_errors():
    from dopsd_fast.kernels.dopsd_loss import dopsd_loss, dopsd_loss_op

    vs, vt = torch.randn(2, 33, requires_grad=True), torch.randn(2, 33)
    torch.library.opcheck(dopsd_loss_op, (vs, vt, torch.tensor([0.5, 0.2]), True))
    with pytest.raises(ValueError):
        dopsd_loss(vs, vt, torch.tensor([0.5]), "x0")
    with pytest.raises(ValueError):
        dopsd_loss(vs, vt, torch.tensor([0.5, 0.2]), "l1")
