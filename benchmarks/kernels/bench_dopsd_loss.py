"""Fused D-OPSD state loss (x0 / v, loss + gradient in one pass) vs the eager `state_loss` at the
latent shapes of Z-Image (16 x 128 x 128) and FLUX.2-klein (128 x 64 x 64 packed), batch 4.

    python benchmarks/kernels/bench_dopsd_loss.py [--quick] [--out DIR]
"""

import _harness as H

SHAPES = [("zimage-1024 latents", (4, 16, 128, 128)), ("flux2-klein-1024 latents", (4, 128, 64, 64))]

SMOKE_SHAPES = [("smoke", (2, 4, 8, 8))]


def main():
    args = H.parser(__doc__).parse_args()
    dev = H.setup(args, "bench_dopsd_loss")
    import torch

    from dopsd_fast.algorithm import state_loss
    from dopsd_fast.kernels.dopsd_loss import dopsd_loss

    torch.manual_seed(0)
    bw = H.copy_bandwidth_gbs()
    rows = [{"shape": "copy", "impl": "device-to-device copy", "gbs": bw}]
    for name, shape in H.pick(SHAPES, SMOKE_SHAPES, args.quick):
        vs = torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
        vt = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        sigma = torch.rand(shape[0], device=dev)
        for loss in ("x0", "v"):
            eager = lambda: state_loss(vs, vt, sigma, loss)  # noqa: E731
            fast = lambda: dopsd_loss(vs, vt, sigma, loss)  # noqa: E731
            par = H.parity(f"{name} {loss}", fast(), eager(), atol=1e-3, rtol=1e-3)
            nbytes = 3 * vs.numel() * 2  # read vs, vt; write grad
            for impl, fn in (("eager", eager), ("dopsd_fast triton", fast)):
                t_fb = H.median_ms(lambda: torch.autograd.grad(fn(), vs))
                rows.append({"shape": name, "loss": loss, "impl": impl, "fwd_bwd_ms": t_fb,
                             "gbs": nbytes / t_fb / 1e6, "frac_of_copy_bw": nbytes / t_fb / 1e6 / bw, **par})
    H.write(rows, "dopsd_loss", args.out)


if __name__ == "__main__":
    main()
