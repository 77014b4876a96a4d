"""SwiGLU silu(a) * b vs eager at the feed-forward shapes of Z-Image (10240) and FLUX.2-klein
(3 x dim); GB/s vs the measured copy bandwidth.

    python benchmarks/kernels/bench_swiglu.py [--quick] [--out DIR]
"""

import _harness as H

SHAPES = [("zimage-1024", 4096 + 256, 10240), ("flux2-klein-4b-1024", 4096 + 512, 9216),
          ("flux2-klein-9b-1024", 4096 + 512, 12288)]

SMOKE_SHAPES = [("smoke", 9, 48)]


def main():
    args = H.parser(__doc__).parse_args()
    dev = H.setup(args, "bench_swiglu")
    import torch

    from dopsd_fast.kernels.swiglu import swiglu

    torch.manual_seed(0)
    bw = H.copy_bandwidth_gbs()
    rows = [{"shape": "copy", "impl": "device-to-device copy", "gbs": bw}]
    for name, M, N in H.pick(SHAPES, SMOKE_SHAPES, args.quick):
        a, b = (torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn_like(a)
        eager = lambda: torch.nn.functional.silu(a) * b  # noqa: E731
        fast = lambda: swiglu(a, b)  # noqa: E731
        par = H.parity(name, fast(), eager(), atol=2e-2, rtol=1e-2)
        nbytes = 3 * a.numel() * 2
        for impl, fn in (("eager", eager), ("dopsd_fast triton", fast)):
            t_f = H.median_ms(fn)
            t_fb = H.median_ms(lambda: torch.autograd.grad(fn(), (a, b), g))
            rows.append({"shape": name, "impl": impl, "fwd_ms": t_f, "fwd_gbs": nbytes / t_f / 1e6,
                         "fwd_frac_of_copy_bw": nbytes / t_f / 1e6 / bw, "fwd_bwd_ms": t_fb, **par})
    H.write(rows, "swiglu", args.out)


if __name__ == "__main__":
    main()
