"""Fused per-head RMSNorm + RoPE on Q and K vs the eager model code (norm module, then the complex or
real rotation), forward and forward+backward, at Z-Image and FLUX.2-klein shapes; GB/s against the
measured copy bandwidth.

    python benchmarks/kernels/bench_rope_qk_norm.py [--quick] [--out DIR]
"""

import _harness as H

SHAPES = [("zimage-1024", 4096 + 256, 30, 128, 1e-5), ("flux2-klein-4b-1024", 4096 + 512, 24, 128, 1e-6),
          ("flux2-klein-9b-1024", 4096 + 512, 32, 128, 1e-6)]

SMOKE_SHAPES = [("smoke", 9, 3, 32, 1e-5)]


def main():
    args = H.parser(__doc__).parse_args()
    dev = H.setup(args, "bench_rope_qk_norm")
    import torch

    from dopsd_fast.kernels.rope_qk_norm import rope_qk_norm

    torch.manual_seed(0)
    bw = H.copy_bandwidth_gbs()
    rows = [{"shape": "copy", "impl": "device-to-device copy", "gbs": bw}]
    dt = torch.bfloat16
    for name, S, heads, hd, eps in H.pick(SHAPES, SMOKE_SHAPES, args.quick):
        q, k = (torch.randn(1, S, heads, hd, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        wq, wk = (torch.ones(hd, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        theta = torch.rand(1, S, hd // 2, device=dev) * 6.28
        cos, sin = torch.cos(theta), torch.sin(theta)
        fc = torch.polar(torch.ones_like(theta), theta)

        def eager():  # Z-Image's processor: RMSNorm then complex rotation
            def one(x, w):
                xf = x.float()
                y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt) * w
                xc = torch.view_as_complex(y.float().reshape(*y.shape[:-1], -1, 2))
                return torch.view_as_real(xc * fc.unsqueeze(2)).flatten(3).type_as(x)
            return one(q, wq), one(k, wk)

        def fused():
            return rope_qk_norm(q, k, wq, wk, cos, sin, eps)

        par = H.parity(name, fused()[0], eager()[0], atol=3e-2)
        g = torch.randn_like(q)
        nbytes = 2 * (2 * q.numel() * 2) + 2 * cos.numel() * 4  # read + write q and k, read cos/sin
        for impl, fn in (("eager", eager), ("dopsd_fast triton", fused)):
            t_f = H.median_ms(fn)

            def fb():
                a, b = fn()
                torch.autograd.grad((a, b), (q, k, wq, wk), (g, g))

            t_fb = H.median_ms(fb)
            rows.append({"shape": name, "impl": impl, "fwd_ms": t_f, "fwd_gbs": nbytes / t_f / 1e6,
                         "fwd_frac_of_copy_bw": nbytes / t_f / 1e6 / bw, "fwd_bwd_ms": t_fb, **par})
    H.write(rows, "rope_qk_norm", args.out)


if __name__ == "__main__":
    main()
