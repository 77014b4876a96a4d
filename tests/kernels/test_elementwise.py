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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_reads_strided_halves_in_place(dtype):
    """a and b as the two halves of one (rows, 2F) projection and as column blocks of a wider one (the
    FLUX.2 single block's fused projection): read in place at their row strides, output and both
    gradients equal to the contiguous call's, bit for bit (same math, same inputs)."""
    from dopsd_fast.kernels.swiglu import swiglu

    for width, lo in ((2 * 37, 0), (2 * 37 + 29, 13)):
        h = (torch.randn(11, width) * 3).to(dtype).requires_grad_()
        a, b = h[:, lo:lo + 37], h[:, lo + 37:lo + 74]
        assert not a.is_contiguous()
        g = torch.randn(11, 37).to(dtype)
        y = swiglu(a, b)
        y.backward(g)
        ac, bc = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        yc = swiglu(ac, bc)
        yc.backward(g)
        assert y.is_contiguous() and torch.equal(y, yc)
        assert torch.equal(h.grad[:, lo:lo + 37], ac.grad) and torch.equal(h.grad[:, lo + 37:lo + 74], bc.grad)
        assert torch.equal(h.grad[:, :lo], torch.zeros_like(h.grad[:, :lo]))


def test_swiglu_opcheck():
    from dopsd_fast.kernels.swiglu import swiglu_backward_op, swiglu_op

    a, b = torch.randn(5, 37, requires_grad=True), torch.randn(5, 37, requires_grad=True)
    torch.library.opcheck(swiglu_op, (a, b))
    torch.library.opcheck(swiglu_backward_op, (torch.randn(5, 37), a.detach(), b.detach()))
    h = torch.randn(5, 74, requires_grad=True)
    torch.library.opcheck(swiglu_op, tuple(h.chunk(2, -1)))
