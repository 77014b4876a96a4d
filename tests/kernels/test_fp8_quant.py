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
