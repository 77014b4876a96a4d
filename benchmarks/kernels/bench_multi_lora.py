"""Multi-LoRA linear for the double forward (student + teacher rows, one base GEMM) vs two separate
peft-style LoRA layers and vs the stacked algorithm on cuBLAS, at Z-Image / FLUX.2-klein GEMM
shapes, forward and forward+backward. TFLOP/s count the base GEMM plus both adapters.

    python benchmarks/kernels/bench_multi_lora.py [--quick] [--out DIR]
"""

import _harness as H

# (name, rows per branch, K, N): attention projections and FFN of Z-Image at 1024^2, FLUX.2-klein-4B
SHAPES = [("zimage qkv-proj", 4096 + 256, 3840, 3840), ("zimage ffn-w1", 4096 + 256, 3840, 10240),
          ("zimage ffn-w2", 4096 + 256, 10240, 3840), ("flux2-klein-4b qkv", 4096 + 512, 3072, 3072)]
RANK = 32

SMOKE_SHAPES = [("smoke", 9, 40, 24)]


def main():
    args = H.parser(__doc__).parse_args()
    dev = H.setup(args, "bench_multi_lora")
    import torch

    from dopsd_fast.kernels.multi_lora import multi_lora_linear, multi_lora_linear_ref

    torch.manual_seed(0)
    dt = torch.bfloat16
    rows = []
    for name, n, K, N in H.pick(SHAPES, SMOKE_SHAPES, args.quick):
        x = torch.randn(2 * n, K, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        a_s, a_t = (torch.randn(RANK, K, device=dev, dtype=dt) / K ** 0.5 for _ in range(2))
        b_s, b_t = (0.1 * torch.randn(N, RANK, device=dev, dtype=dt) for _ in range(2))
        a_s.requires_grad_(), b_s.requires_grad_()
        g = torch.randn(2 * n, N, device=dev, dtype=dt)
        flops = 2 * 2 * n * (K * N + RANK * (K + N))
        impls = {
            "two peft-style layers": lambda: multi_lora_linear_ref(x, w, None, a_s, b_s, a_t, b_t, 1.0, 1.0, n),
            "stacked, cuBLAS": lambda: multi_lora_linear(x, w, None, (a_s, b_s, 1.0), (a_t, b_t, 1.0), n, impl="torch"),
            "stacked, dopsd_fast triton": lambda: multi_lora_linear(x, w, None, (a_s, b_s, 1.0), (a_t, b_t, 1.0), n),
        }
        ref = impls["two peft-style layers"]()
        for impl, fn in impls.items():
            par = H.parity(f"{name} {impl}", fn(), ref, atol=0.1, rtol=2e-2)
            t_f = H.median_ms(fn)
            t_fb = H.median_ms(lambda: torch.autograd.grad(fn(), (x, a_s, b_s), g))
            rows.append({"shape": name, "impl": impl, "M": 2 * n, "K": K, "N": N, "rank": RANK, "fwd_ms": t_f,
                         "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_ms": t_fb, **par})
    H.write(rows, "multi_lora", args.out)


if __name__ == "__main__":
    main()
