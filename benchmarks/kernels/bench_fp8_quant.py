"""Rowwise FP8 quantization of activations (what fast.fp8=native runs before every FP8 GEMM) vs the
same in eager PyTorch, at the Z-Image linear inputs (3840 and the FFN's 10240 wide, both branches'
rows); GB/s vs the measured copy bandwidth.

    python benchmarks/kernels/bench_fp8_quant.py [--quick] [--out DIR]
"""

import _harness as H

SHAPES = [("zimage-1024-dim", 2 * (4096 + 512) + 512, 3840), ("zimage-1024-ffn", 2 * (4096 + 512) + 512, 10240)]

SMOKE_SHAPES = [("smoke", 9, 48)]


def main():
    args = H.parser(__doc__).parse_args()
    dev = H.setup(args, "bench_fp8_quant")
    import torch

    from dopsd_fast.kernels.fp8_quant import quantize_rows, quantize_rows_ref

    torch.manual_seed(0)
    bw = H.copy_bandwidth_gbs()
    rows = [{"shape": "copy", "impl": "device-to-device copy", "gbs": bw}]
    for name, M, K in H.pick(SHAPES, SMOKE_SHAPES, args.quick):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        eager = lambda: quantize_rows_ref(x)  # noqa: E731
        fast = lambda: quantize_rows(x)  # noqa: E731
        (qf, sf), (qe, se) = fast(), eager()
        # dequantized values: equal up to one e4m3 step on exact rounding ties (the interpreter's)
        par = H.parity(name, qf.float() * sf, qe.float() * se, atol=1e-6, rtol=0.125)
        nbytes = x.numel() * 2 + x.numel() + 4 * M  # read bf16, write e4m3 and the scales
        for impl, fn in (("eager", eager), ("dopsd_fast triton", fast)):
            t = H.median_ms(fn)
            rows.append({"shape": name, "impl": impl, "ms": t, "gbs": nbytes / t / 1e6,
                         "frac_of_copy_bw": nbytes / t / 1e6 / bw, **par})
    H.write(rows, "fp8_quant", args.out)


if __name__ == "__main__":
    main()
