"""Flash attention (varlen) vs PyTorch SDPA (each available backend, best reported) at the real
shapes of Z-Image and FLUX.2-klein, forward and forward+backward; and the dual-branch mode vs two
separate calls. TFLOP/s count 4*Sq*Sk*H*D forward and 2.5x that backward (FlashAttention's rule).

    python benchmarks/kernels/bench_attention.py [--quick] [--out DIR]
"""

import _harness as H

# (name, heads, head_dim, student/query tokens, teacher extra tokens): 1024^2 images
SHAPES = [("zimage-1024", 30, 128, 4096 + 256, 1024), ("flux2-klein-4b-1024", 24, 128, 4096 + 512, 4096),
          ("flux2-klein-9b-1024", 32, 128, 4096 + 512, 4096), ("zimage-512-hd64", 60, 64, 1024 + 256, 512)]

SMOKE_SHAPES = [("smoke", 2, 32, 37, 11)]


def main():
    args = H.parser(__doc__).parse_args()
    dev = H.setup(args, "bench_attention")
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dopsd_fast.kernels.attention import dual_branch_attention, flash_attn_varlen

    torch.manual_seed(0)
    rows = []
    dt = torch.bfloat16
    for name, heads, hd, S, extra in H.pick(SHAPES, SMOKE_SHAPES, args.quick):
        q, k, v = (torch.randn(S, heads, hd, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        cu = torch.tensor([0, S], device=dev, dtype=torch.int32)
        do = torch.randn_like(q)
        fl_fwd = 4 * S * S * heads * hd
        o, _ = flash_attn_varlen(q, k, v, cu, cu)
        qb, kb, vb = (t.detach().transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1)
        par = H.parity(name, o, ref, atol=2e-2)

        def ours_fwd():
            flash_attn_varlen(q, k, v, cu, cu)

        def ours_fb():
            o, _ = flash_attn_varlen(q, k, v, cu, cu)
            torch.autograd.grad(o, (q, k, v), do)

        t_f, t_fb = H.median_ms(ours_fwd), H.median_ms(ours_fb)
        rows.append({"shape": name, "impl": "dopsd_fast triton", "tokens": S, "fwd_ms": t_f,
                     "fwd_tflops": fl_fwd / t_f / 1e9, "bwd_ms": t_fb - t_f,
                     "bwd_tflops": 2.5 * fl_fwd / (t_fb - t_f) / 1e9, **par})
        dob = do.transpose(0, 1)[None]
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    def sd_fwd():
                        torch.nn.functional.scaled_dot_product_attention(qb, kb, vb)

                    def sd_fb():
                        o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb)
                        torch.autograd.grad(o, (qb, kb, vb), dob)

                    sd_fwd()
                    s_f, s_fb = H.median_ms(sd_fwd), H.median_ms(sd_fb)
            except RuntimeError as e:  # backend not available for this shape/device
                rows.append({"shape": name, "impl": f"sdpa {backend.name}", "note": f"unavailable: {str(e)[:80]}"})
                continue
            rows.append({"shape": name, "impl": f"sdpa {backend.name}", "tokens": S, "fwd_ms": s_f,
                         "fwd_tflops": fl_fwd / s_f / 1e9, "bwd_ms": s_fb - s_f,
                         "bwd_tflops": 2.5 * fl_fwd / (s_fb - s_f) / 1e9})
        # dual-branch: student [shared S ; 0 private], teacher [shared S ; extra private] vs two calls
        qt = torch.randn(S, heads, hd, device=dev, dtype=dt)
        kt, vt = (torch.randn(extra, heads, hd, device=dev, dtype=dt) for _ in range(2))
        e = k[:0]
        cu_t = torch.tensor([0, extra], device=dev, dtype=torch.int32)
        cu_0 = torch.zeros(2, device=dev, dtype=torch.int32)
        k_t2, v_t2 = torch.cat([k.detach(), kt]), torch.cat([v.detach(), vt])
        cu_t2 = torch.tensor([0, S + extra], device=dev, dtype=torch.int32)

        def dual():
            dual_branch_attention(q, qt, (k, v, cu), (e, e, cu_0), (kt, vt, cu_t), cu, cu)

        def two():
            flash_attn_varlen(q, k, v, cu, cu)
            flash_attn_varlen(qt, k_t2, v_t2, cu, cu_t2)

        o_s, _, o_t, _ = dual_branch_attention(q, qt, (k, v, cu), (e, e, cu_0), (kt, vt, cu_t), cu, cu)
        par = H.parity(name + " dual teacher", o_t, flash_attn_varlen(qt, k_t2, v_t2, cu, cu_t2)[0], atol=1e-2)
        t_d, t_2 = H.median_ms(dual), H.median_ms(two)
        rows.append({"shape": name, "impl": "dual-branch vs two calls (fwd)", "tokens": S, "fwd_ms": t_d,
                     "two_calls_ms": t_2, "speedup": t_2 / t_d,
                     "fwd_tflops": (fl_fwd + 4 * S * (S + extra) * heads * hd) / t_d / 1e9, **par})
    H.write(rows, "attention", args.out)


if __name__ == "__main__":
    main()
