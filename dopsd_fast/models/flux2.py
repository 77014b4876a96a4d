"""Fast FLUX.2-klein forward for the D-OPSD double forward, on the diffusers model's own parameters.

Same contract as :class:`dopsd_fast.models.zimage.FastZImage`: it reads a diffusers
``Flux2Transformer2DModel`` in place and computes ``Flux2Transformer2DModel.forward`` for the student
stream (with autograd) and the teacher stream (constants) side by side. Per branch a sample's
sequence is ``[text (L) ; x_k tokens (N) ; reference tokens (teacher, editing branch)]``:

* every LoRA linear is ONE base GEMM over both streams' rows (``paired_lora_linear``), the joint
  attention is ONE launch for both (``dual_branch_attention``, each branch its own sequence length);
* the timestep embedding and the three shared modulation linears (double img / double txt / single)
  run once for both branches, as does the patch embedding of x_k (the reference tokens are embedded
  for the teacher alone);
* QK RMSNorm + RoPE are fused per part (text tokens with ``norm_added_q/k``, image tokens with
  ``norm_q/k``; RoPE is per token, so splitting the concatenation is exact).

Samples of a batch must share the structure within a branch (same text length, same image and
reference sizes), which the bucketed, padded-to-512 klein batches do.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dopsd_fast.models.zimage import PairedModel, _has_lora


class FastFlux2(PairedModel):
    def __init__(self, student, teacher, ops=None, nvtx: bool = False):
        super().__init__(student, teacher, ops, nvtx)
        cfg = self.ms.config
        if cfg.patch_size != 1 or cfg.guidance_embeds:
            raise NotImplementedError("FastFlux2 supports the klein configuration (patch 1, no guidance embedding)")
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.checkpoint_layers = 0  # no gradient checkpointing on this path yet
        self.eps = cfg.eps
        self._rope: dict = {}

    def _tables(self, model, L: int, h: int, w: int, ref_hw: tuple, dev):
        """RoPE cos/sin of the text and of the image tokens ([x_k ; references]), fp32, (n, hd/2):
        built once per structure (text length, image and reference sizes), never per call."""
        from dopsd_fast.adapters.klein import image_ids, text_ids

        key = (id(model), L, h, w, ref_hw, str(dev))
        if key not in self._rope:
            ids = torch.cat([image_ids(h, w)] + [image_ids(rh, rw, t=10 * (i + 1)) for i, (rh, rw) in enumerate(ref_hw)])

            def cs(i):
                cos, sin = model.pos_embed(i.to(dev))
                return cos[:, 0::2].float().contiguous(), sin[:, 0::2].float().contiguous()

            self._rope[key] = (cs(text_ids(L)), cs(ids), ids.shape[0])
            if len(self._rope) > 64:
                self._rope.pop(next(iter(self._rope)))
        return self._rope[key]

    def _ln(self, x, scale, shift, B):
        """LayerNorm (no affine) * (1 + scale) + shift; x (B*S, D), scale/shift (B, D)."""
        xv = x.view(B, -1, x.shape[-1])
        if self.ops.fused:
            y = self.ops._nm.layer_norm_modulate(xv, scale.to(x.dtype), shift.to(x.dtype), self.eps)
        else:
            y = (F.layer_norm(xv.float(), (x.shape[-1],), eps=self.eps) * (1 + scale.float()[:, None])
                 + shift.float()[:, None]).to(x.dtype)
        return y.reshape(x.shape)

    def _gate(self, x, gate, y, B):
        """x + gate * y with a per-sample gate (FLUX.2: no tanh)."""
        if self.ops.fused:
            return self.ops._nm.gated_residual(x.view(B, -1, x.shape[-1]), gate.to(x.dtype),
                                               y.view(B, -1, y.shape[-1]), use_tanh=False).reshape(x.shape)
        return (x.float() + gate.float().repeat_interleave(x.shape[0] // B, 0) * y.float()).to(x.dtype)

    def _swiglu(self, h):
        half = h.shape[-1] // 2
        a, b = h[..., :half], h[..., half:]
        return self.ops.swiglu(a.contiguous(), b.contiguous()) if self.ops.fused else F.silu(a) * b

    def _qk(self, q, k, wq, wk, cs, B):
        cos, sin = cs
        shp = (B, -1, self.heads, self.head_dim)
        qq, kk = self.ops.rope_qk(q.reshape(shp), k.reshape(shp), wq, wk, cos, sin, self.eps)
        return qq.reshape(-1, self.heads, self.head_dim), kk.reshape(-1, self.heads, self.head_dim)

    # ---- forward -------------------------------------------------------------------------------
    def velocity_pair(self, x, sigma, ctx_s, ctx_t):
        """(v_student, v_teacher) for latents ``x`` (B, C, h, w) in the (sigma, v) convention."""
        from dopsd_fast.adapters.klein import pack, refs_of

        ms = self.ms
        dtype = ms.x_embedder.weight.dtype
        B, C, h, w = x.shape
        N = h * w
        dev = x.device
        branches = []
        for which, ctxs, model in (("s", ctx_s, self.ms), ("t", ctx_t, self.mt)):
            if ctxs is None:
                continue
            refs = [refs_of(c) for c in ctxs]
            if len({tuple(tuple(r.shape) for r in rr) for rr in refs}) > 1 or len({c.features.shape for c in ctxs}) > 1:
                raise ValueError("FastFlux2: samples of a batch must share text length and reference sizes")
            txt = torch.stack([c.features for c in ctxs]).to(dev, dtype)
            ref_tok = [pack(torch.stack([rr[i] for rr in refs]).to(dev, dtype)) for i in range(len(refs[0]))]
            L = txt.shape[1]
            cs_txt, cs_img, M = self._tables(model, L, h, w, tuple((r.shape[-2], r.shape[-1]) for r in refs[0]), dev)
            branches.append(dict(which=which, model=model, txt=txt, refs=ref_tok, L=L, M=M, cs_txt=cs_txt,
                                 cs_img=cs_img))
        run = {b["which"]: b for b in branches}
        no_grad = lambda wh: torch.no_grad() if wh == "t" else contextlib.nullcontext()  # noqa: E731

        with self._nv("embed"):
            mods = {}
            for b in branches:
                if self.same_model and mods:
                    mods[b["which"]] = next(iter(mods.values()))
                    continue
                m = b["model"]
                with no_grad(b["which"]):
                    temb = m.time_guidance_embed(sigma.to(dtype) * 1000, None)
                    mods[b["which"]] = (temb, m.double_stream_modulation_img(temb), m.double_stream_modulation_txt(temb),
                                        m.single_stream_modulation(temb))
            x_emb = {}
            tok = pack(x.to(dtype))
            shared_x = self.same_model and not _has_lora(ms.x_embedder)
            for b in branches:
                with no_grad(b["which"]):
                    if shared_x and x_emb:
                        e = next(iter(x_emb.values()))[0]
                        e = e.detach() if b["which"] == "t" else e
                    else:
                        e = b["model"].x_embedder(tok)
                    parts = [e] + [b["model"].x_embedder(r) for r in b["refs"]]
                    x_emb[b["which"]] = (e, torch.cat(parts, 1).reshape(B * b["M"], -1))
        img = {wh: x_emb[wh][1] for wh in run}
        txt_h = {}
        for wh, b in run.items():
            with no_grad(wh):
                txt_h[wh] = b["model"].context_embedder(b["txt"]).reshape(B * b["L"], -1)

        def split3(mod, i):
            sh, sc, g = mod.chunk(6 if i is not None else 3, dim=-1)[(3 * i if i is not None else 0):][:3]
            return sh, sc, g

        # ---- double-stream blocks ----
        for bi in range(len(ms.transformer_blocks)):
            with self._nv(f"double{bi}"):
                blk = lambda m, bi=bi: m.transformer_blocks[bi]  # noqa: E731
                S, T = run.get("s"), run.get("t")

                def prep(v, wh):
                    _, mi, mt_, _ = mods[wh]
                    sh, sc, _ = split3(mi, 0)
                    csh, csc, _ = split3(mt_, 0)
                    return (self._ln(img[wh], sc, sh, B), self._ln(txt_h[wh], csc, csh, B))

                ns, nt = self._each(prep, 1 if S else None, 1 if T else None)
                qi = self._plin(lambda m: blk(m).attn.to_q, ns[0] if ns else None, nt[0] if nt else None)
                ki = self._plin(lambda m: blk(m).attn.to_k, ns[0] if ns else None, nt[0] if nt else None)
                vi = self._plin(lambda m: blk(m).attn.to_v, ns[0] if ns else None, nt[0] if nt else None)
                qc = self._plin(lambda m: blk(m).attn.add_q_proj, ns[1] if ns else None, nt[1] if nt else None)
                kc = self._plin(lambda m: blk(m).attn.add_k_proj, ns[1] if ns else None, nt[1] if nt else None)
                vc = self._plin(lambda m: blk(m).attn.add_v_proj, ns[1] if ns else None, nt[1] if nt else None)

                def qkv(_, wh):
                    j = 0 if wh == "s" else 1
                    b, a = run[wh], blk(run[wh]["model"]).attn
                    qi_, ki_ = self._qk(qi[j], ki[j], a.norm_q.weight, a.norm_k.weight, b["cs_img"], B)
                    qc_, kc_ = self._qk(qc[j], kc[j], a.norm_added_q.weight, a.norm_added_k.weight, b["cs_txt"], B)
                    cat = lambda t_, i_: torch.cat([t_.view(B, b["L"], -1), i_.view(B, b["M"], -1)], 1).reshape(  # noqa: E731
                        -1, self.heads, self.head_dim)
                    return cat(qc_, qi_), cat(kc_, ki_), cat(vc[j].view(-1, self.heads, self.head_dim),
                                                             vi[j].view(-1, self.heads, self.head_dim))

                qs, qt = self._each(qkv, 1 if S else None, 1 if T else None)
                o_s, o_t = self._attend(qs, qt, B)

                def after_attn(o, wh):
                    b = run[wh]
                    o = o.reshape(B, b["L"] + b["M"], -1)
                    return o[:, :b["L"]].reshape(B * b["L"], -1), o[:, b["L"]:].reshape(B * b["M"], -1)

                ao_s, ao_t = self._each(after_attn, o_s, o_t)
                ai = self._plin(lambda m: blk(m).attn.to_out[0], ao_s[1] if ao_s else None, ao_t[1] if ao_t else None)
                ac = self._plin(lambda m: blk(m).attn.to_add_out, ao_s[0] if ao_s else None, ao_t[0] if ao_t else None)

                def resid1(_, wh):
                    j = 0 if wh == "s" else 1
                    _, mi, mt_, _ = mods[wh]
                    _, _, gi = split3(mi, 0)
                    _, _, gc = split3(mt_, 0)
                    new_i = self._gate(img[wh], gi, ai[j], B)
                    new_c = self._gate(txt_h[wh], gc, ac[j], B)
                    shi, sci, _ = split3(mi, 1)
                    shc, scc, _ = split3(mt_, 1)
                    return new_i, new_c, self._ln(new_i, sci, shi, B), self._ln(new_c, scc, shc, B)

                r_s, r_t = self._each(resid1, 1 if S else None, 1 if T else None)
                fi = self._plin(lambda m: blk(m).ff.linear_in, r_s[2] if r_s else None, r_t[2] if r_t else None)
                fc = self._plin(lambda m: blk(m).ff_context.linear_in, r_s[3] if r_s else None, r_t[3] if r_t else None)
                gi_ = self._each(lambda v, wh: self._swiglu(v), fi[0], fi[1])
                gc_ = self._each(lambda v, wh: self._swiglu(v), fc[0], fc[1])
                fo = self._plin(lambda m: blk(m).ff.linear_out, gi_[0], gi_[1])
                fco = self._plin(lambda m: blk(m).ff_context.linear_out, gc_[0], gc_[1])

                def resid2(r, wh):
                    j = 0 if wh == "s" else 1
                    _, mi, mt_, _ = mods[wh]
                    _, _, gi = split3(mi, 1)
                    _, _, gc = split3(mt_, 1)
                    return self._gate(r[0], gi, fo[j], B), self._gate(r[1], gc, fco[j], B)

                n_s, n_t = self._each(resid2, r_s, r_t)
                for wh, new in (("s", n_s), ("t", n_t)):
                    if new is not None:
                        img[wh], txt_h[wh] = new

        # ---- single-stream blocks on [text ; image] ----
        hs = {}
        for wh, b in run.items():
            with no_grad(wh):
                hs[wh] = torch.cat([txt_h[wh].view(B, b["L"], -1), img[wh].view(B, b["M"], -1)], 1).reshape(
                    B * (b["L"] + b["M"]), -1)
        for bi in range(len(ms.single_transformer_blocks)):
            with self._nv(f"single{bi}"):
                blk = lambda m, bi=bi: m.single_transformer_blocks[bi]  # noqa: E731
                S, T = run.get("s"), run.get("t")
                nrm = self._each(lambda h, wh: self._ln(h, split3(mods[wh][3], None)[1], split3(mods[wh][3], None)[0],
                                                        B), hs.get("s"), hs.get("t"))
                pr = self._plin(lambda m: blk(m).attn.to_qkv_mlp_proj, nrm[0], nrm[1])
                inner = self.heads * self.head_dim

                def qkv1(p, wh):
                    b, a = run[wh], blk(run[wh]["model"]).attn
                    q, k, v = p[:, :inner], p[:, inner:2 * inner], p[:, 2 * inner:3 * inner]
                    S_ = b["L"] + b["M"]
                    q3, k3 = q.reshape(B, S_, -1), k.reshape(B, S_, -1)
                    qt_, kt_ = self._qk(q3[:, :b["L"]], k3[:, :b["L"]], a.norm_q.weight, a.norm_k.weight, b["cs_txt"], B)
                    qi_, ki_ = self._qk(q3[:, b["L"]:], k3[:, b["L"]:], a.norm_q.weight, a.norm_k.weight, b["cs_img"],
                                        B)
                    cat = lambda t_, i_: torch.cat([t_.view(B, b["L"], -1), i_.view(B, b["M"], -1)], 1).reshape(  # noqa: E731
                        -1, self.heads, self.head_dim)
                    return cat(qt_, qi_), cat(kt_, ki_), v.reshape(-1, self.heads, self.head_dim)

                qs, qt = self._each(qkv1, pr[0], pr[1])
                o_s, o_t = self._attend(qs, qt, B)
                cat_s, cat_t = self._each(lambda po, wh: torch.cat([po[1].reshape(po[1].shape[0], -1),
                                                                    self._swiglu(po[0][:, 3 * inner:])], -1),
                                          (pr[0], o_s) if S else None, (pr[1], o_t) if T else None)
                out = self._plin(lambda m: blk(m).attn.to_out, cat_s, cat_t)
                new = self._each(lambda h, wh: self._gate(h, split3(mods[wh][3], None)[2], out[0 if wh == "s" else 1], B),
                                 hs.get("s"), hs.get("t"))
                for wh, n_ in zip(("s", "t"), new):
                    if n_ is not None:
                        hs[wh] = n_

        # ---- output: the x_k tokens only ----
        res = {}
        with self._nv("final"):
            for wh, b in run.items():
                with no_grad(wh):
                    m = b["model"]
                    hh = hs[wh].view(B, b["L"] + b["M"], -1)[:, b["L"]:b["L"] + N]
                    emb = m.norm_out.linear(F.silu(mods[wh][0]).to(hh.dtype))
                    scale, shift = emb.chunk(2, dim=1)
                    y = self._ln(hh.reshape(B * N, -1), scale, shift, B)
                    out = m.proj_out(y).view(B, N, -1).float()
                    res[wh] = out.permute(0, 2, 1).reshape(B, C, h, w)
        return res.get("s"), res.get("t")

    def _attend(self, qs, qt, B):
        """Joint attention per sample for both branches (each (q, k, v) of (B*S, H, hd))."""
        def spec(q3):
            if q3 is None:
                return None
            S_ = q3[0].shape[0] // B
            cu = [i * S_ for i in range(B + 1)]
            return (*q3, torch.tensor(cu, dtype=torch.int32, device=q3[0].device), cu)

        s, t = spec(qs), spec(qt)
        if s is not None and t is not None:
            return self.ops.attention_pair(s, t)
        return self._each(lambda sp, wh: self.ops.attention_one(*sp), s, t)
