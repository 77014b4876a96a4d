"""Rowwise FP8 quantization (interpreted Triton) vs its PyTorch reference: the scales and the e4m3
values exactly (the interpreter's own fp32 -> e4m3 conversion is wrong near powers of two, so there the
kernel's scaled fp32 values are rounded by PyTorch: kernels/fp8_quant.py), and the dequantized rows
within e4m3's precision."""

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K", [(7, 70), (3, 2100), (1, 16), (0, 32)])
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
