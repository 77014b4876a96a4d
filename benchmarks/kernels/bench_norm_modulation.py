"""Fused norm + modulation and gated residuals vs eager PyTorch at Z-Image (dim 3840) and
FLUX.2-klein (3072 / 4096) token counts, forward and forward+backward; GB/s vs the measured copy
bandwidth (target >= 75%).

    python benchmarks/kernels/bench_norm_modulation.py [--quick] [--out DIR]
"""

import _harness as H

SHAPES = [("zimage-1024", 4096 + 256, 3840), ("flux2-klein-4b-1024", 4096 + 512, 3072),
          ("flux2-klein-9b-1024", 4096 + 512, 4096)]

SMOKE_SHAPES = [("smoke", 9, 48)]


def main():
    args = H.parser(__doc__).parse_args()
    dev = H.setup(args, "bench_norm_modulation")
    import torch

    from dopsd_fast.kernels import norm_modulation as nm

    torch.manual_seed(0)
    bw = H.copy_bandwidth_gbs()
    rows = [{"shape": "copy", "impl": "device-to-device copy", "gbs": bw}]
    dt = torch.bfloat16
    for name, S, D in H.pick(SHAPES, SMOKE_SHAPES, args.quick):
        x, y = (torch.randn(1, S, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        w = torch.ones(D, device=dev, dtype=dt, requires_grad=True)
        s, t = (0.1 * torch.randn(1, D, device=dev, dtype=dt).requires_grad_() for _ in range(2))
        ops = {
            "rms_norm_modulate": (lambda: nm.rms_norm_modulate(x, w, s), lambda: nm.rms_norm_modulate_ref(x, w, s),
                                  (x, w, s), 2),
            "layer_norm_modulate": (lambda: nm.layer_norm_modulate(x, s, t),
                                    lambda: nm.layer_norm_modulate_ref(x, s, t), (x, s, t), 2),
            "gated_residual_tanh": (lambda: nm.gated_residual(x, s, y, True), lambda: nm.gated_residual_ref(x, s, y, True),
                                    (x, s, y), 3),
        }
        g = torch.randn_like(x)
        for op, (fast, ref, ins, n_tensors) in ops.items():
            par = H.parity(f"{name} {op}", fast(), ref(), atol=3e-2, rtol=1e-2)
            nbytes = n_tensors * x.numel() * 2
            for impl, fn in (("eager", ref), ("dopsd_fast triton", fast)):
                t_f = H.median_ms(fn)
                t_fb = H.median_ms(lambda: torch.autograd.grad(fn(), ins, g))
                rows.append({"shape": name, "op": op, "impl": impl, "fwd_ms": t_f, "fwd_gbs": nbytes / t_f / 1e6,
                             "fwd_frac_of_copy_bw": nbytes / t_f / 1e6 / bw, "fwd_bwd_ms": t_fb, **par})
    H.write(rows, "norm_modulation", args.out)


if __name__ == "__main__":
    main()
