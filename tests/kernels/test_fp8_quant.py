"""Rowwise FP8 quantization (interpreted Triton) vs its PyTorch reference: the scales and the e4m3
values exactly (the interpreter's own fp32 -> e4m3 conversion is wrong near powers of two, so there the
kernel's scaled fp32 values are rounded by PyTorch: kernels/fp8_quant.py), and the dequantized rows
within e4m3's precision."""

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K", [(7, 70), (3, 2100), (1, 16), (0, 32), (130, 40)])  # 130: 3 programs, the last partial
def test_quantize_rows_matches_reference(dtype, M, K):
    from dopsd_fast.kernels.fp8_quant import quantize_rows, quantize_rows_ref, quantize_rows_op

    x = (torch.randn(M, K) * torch.logspace(-3, 3, M).view(-1, 1) if M else torch.randn(M, K)).to(dtype)
    if M:
        x[0, 3] = 0.0
    q, s = quantize_rows(x)
    rq, rs = quantize_rows_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (M, 1)
    assert torch.equal(s, rs)
    a = q.float()
    assert torch.equal(a, rq.float())
    assert ((a * s - x.float()).abs() <= 0.0625 * x.float().abs().amax(dim=1, keepdim=True) + 1e-12).all()
    if M:
        torch.library.opcheck(quantize_rows_op, (x,))


@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("M,widths", [(5, (48, 16, 80)), (3, (2100,)), (0, (32, 16)), (4, (16, 32, 48, 16)),
                                      (130, (16, 48)), (130, (16, 32, 48, 16))])
def test_quantize_rows_cat_matches_reference(rowwise, M, widths):
    """A group's output gradients quantized as one concatenated (M, sum N) e4m3 buffer with one scale per
    row (the largest of the group's rows) or one for all: the interpreted kernel (one launch for up to
    three tensors rowwise, per-tensor launches otherwise) equals the PyTorch reference exactly, and a row
    whose largest value sits in a later tensor scales the earlier ones."""
    from dopsd_fast.kernels.fp8_quant import quantize_rows_cat, quantize_rows_cat_op, quantize_rows_cat_ref

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(M, n, generator=g).to(torch.bfloat16) for n in widths]
    if M:
        xs[-1][0, -1] = 900.0  # row 0's scale comes from the last tensor
        xs[0][1] *= 1e-3
    q, s = quantize_rows_cat(xs, rowwise)
    rq, rs = quantize_rows_cat_ref(xs, rowwise)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (M, sum(widths))
    assert s.shape == ((M, 1) if rowwise else ())
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())
    if M:
        cat = torch.cat([x.float() for x in xs], 1)
        assert float(s.view(-1)[0]) == pytest.approx(900.0 / 448.0)
        err = (q.float() * s - cat).abs()
        assert (err <= 0.0625 * cat.abs().amax(dim=1 if rowwise else None, keepdim=rowwise) + 2e-3 * s).all()
        torch.library.opcheck(quantize_rows_cat_op, (xs, rowwise))
    with pytest.raises(ValueError, match="equal M"):
        quantize_rows_cat([torch.randn(2, 16), torch.randn(3, 16)])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("widths", [(70,), (16, 48, 32), (16, 32, 48, 16)])
@pytest.mark.parametrize("rowwise", [True, False])
def test_a_nan_or_inf_is_kept_as_pytorch_keeps_it(rowwise, widths):
    """``tl.maximum`` drops a NaN by default: a row holding one quantized to finite values under a finite
    scale ([1, nan, -2, 0.5] -> q [224, -448, -448, 112]), so a diverging activation or gradient in the FP8
    step vanished. Now the scales and values are NaN where PyTorch's are, for both recipes and any group."""
    from dopsd_fast.kernels.fp8_quant import quantize_rows, quantize_rows_cat, quantize_rows_cat_ref, quantize_rows_ref

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, n, generator=g).to(torch.bfloat16) for n in widths]
    xs[-1][1, 5] = float("nan")  # row 1: a NaN in the group's last tensor
    xs[0][3, 2] = float("inf")  # row 3: an inf
    q, s = quantize_rows_cat(xs, rowwise=rowwise)
    rq, rs = quantize_rows_cat_ref(xs, rowwise=rowwise)
    assert torch.equal(s.isnan(), rs.isnan()) and s.isnan().any()
    assert torch.equal(s[~s.isnan()], rs[~rs.isnan()])
    a, r = q.float(), rq.float()
    assert torch.equal(a.isnan(), r.isnan()) and a.isnan().any()
    assert torch.equal(a[~a.isnan()], r[~r.isnan()])
    if len(widths) == 1 and rowwise:
        q1, s1 = quantize_rows(xs[0])
        rq1, rs1 = quantize_rows_ref(xs[0])
        assert torch.equal(s1.isnan(), rs1.isnan()) and torch.equal(q1.float().isnan(), rq1.float().isnan())
        assert torch.equal(q1.float().nan_to_num(), rq1.float().nan_to_num())
