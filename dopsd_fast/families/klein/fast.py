"""Fast FLUX.2-klein forward for the D-OPSD double forward, on the diffusers model's own parameters.

Same contract and entry point as :class:`dopsd_fast.families.zimage.fast.FastZImage`
(``velocity_pair``; the shared machinery is :mod:`dopsd_fast.models.paired`): it reads a diffusers
``Flux2Transformer2DModel`` in place and computes ``Flux2Transformer2DModel.forward`` for the student
stream (with autograd) and the teacher stream (constants) side by side. Per branch a sample's
sequence is ``[text (L) ; x_k tokens (N) ; reference tokens (teacher, editing branch)]``:

* every LoRA linear is ONE op over both streams' rows, each branch on its own (``paired_lora_linears``), the joint
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

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dopsd_fast.families.klein.spec import SPEC
from dopsd_fast.graphs import hold
from dopsd_fast.models.paired import Branch, PairedModel, has_lora
from dopsd_fast.families.klein.adapter import image_ids, pack, refs_of, text_ids


@dataclass(eq=False)
class KleinBranch(Branch):
    """A klein branch: text length ``n_txt``, image tokens ``n_img`` ([x_k ; references]), the text features and
    reference tokens, the RoPE tables, and the running image / text / joint hidden states. ``mods``:
    (temb, double-img, double-txt, single modulation); ``mlp_in``: a single block's MLP input columns
    (split off its fused projection with q, k, v)."""

    n_txt: int = 0
    n_img: int = 0
    txt: torch.Tensor | None = None
    refs: list = field(default_factory=list)
    cs_txt: tuple | None = None
    cs_img: tuple | None = None
    img: torch.Tensor | None = None
    txt_h: torch.Tensor | None = None
    hs: torch.Tensor | None = None
    mlp_in: torch.Tensor | None = None


def _split3(mod, i):
    """(shift, scale, gate) number ``i`` of a 6-way modulation, or of a 3-way one (``i`` None)."""
    sh, sc, g = mod.chunk(6 if i is not None else 3, dim=-1)[(3 * i if i is not None else 0):][:3]
    return sh, sc, g


class FastFlux2(PairedModel):
    spec = SPEC

    def __init__(self, student, teacher, ops=None, checkpoint_layers: int = 0, nvtx: bool = False, fp8_ctx=None,
                 fp8_teacher: bool = True):
        # ``checkpoint_layers`` counts the double blocks first, then the single blocks (the memory model's
        # order); an FP8 module (te / torchao) is called as a module by the shared paired linears
        super().__init__(student, teacher, ops, nvtx, fp8_ctx, fp8_teacher, checkpoint_layers)
        cfg = self.ms.config
        if cfg.patch_size != 1 or cfg.guidance_embeds:
            raise NotImplementedError("FastFlux2 supports the klein configuration (patch 1, no guidance embedding)")
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.eps = cfg.eps
        self._rope: dict = {}
        self._cu: dict = {}

    def _tables(self, model, n_txt: int, h: int, w: int, ref_hw: tuple, dev):
        """RoPE cos/sin of the text and of the image tokens ([x_k ; references]), fp32, (n, hd/2):
        built once per structure (text length, image and reference sizes), never per call."""
        key = (id(model), n_txt, h, w, ref_hw, str(dev))
        if key not in self._rope:
            ids = torch.cat([image_ids(h, w)] + [image_ids(rh, rw, t=10 * (i + 1)) for i, (rh, rw) in enumerate(ref_hw)])

            def cs(i):
                cos, sin = model.pos_embed(i.to(dev))
                return cos[:, 0::2].float().contiguous(), sin[:, 0::2].float().contiguous()

            self._rope[key] = (cs(text_ids(n_txt)), cs(ids), ids.shape[0])
            if len(self._rope) > 64:
                self._rope.pop(next(iter(self._rope)))
        return hold(self._rope[key])  # kept with a graph captured now: the cache may drop it later

    # ---- element-wise pieces, through the ops interface --------------------------------------------
    def _ln(self, x, scale, shift, B):
        """LayerNorm (no affine) * (1 + scale) + shift; x (B*S, D), scale/shift (B, D)."""
        return self.ops.ln_mod(x.view(B, -1, x.shape[-1]), scale, self.eps, shift=shift).reshape(x.shape)

    def _gate(self, x, gate, y, B):
        """x + gate * y with a per-sample gate (FLUX.2: no tanh)."""
        D = x.shape[-1]
        return self.ops.gated(x.view(B, -1, D), gate, y.view(B, -1, D), tanh=False).reshape(x.shape)

    # Parts of one tensor are taken with ONE split (its gradient: one concatenation of the parts'
    # gradients), not several slices (each slice's gradient: a zero-filled tensor of the whole, then
    # added to the others).
    def _swiglu(self, b, h):
        return self.ops.swiglu(*h.chunk(2, dim=-1))

    def _qk(self, q, k, wq, wk, cs, B):
        cos, sin = cs
        shp = (B, -1, self.heads, self.head_dim)
        qq, kk = self.ops.rope_qk(q.reshape(shp), k.reshape(shp), wq, wk, cos, sin, self.eps)
        return qq.reshape(-1, self.heads, self.head_dim), kk.reshape(-1, self.heads, self.head_dim)

    def _joint(self, b: KleinBranch, t_part, i_part, B):
        """[text ; image] per sample, as (B * (n_txt + n_img), heads, head_dim)."""
        return torch.cat([t_part.view(B, b.n_txt, -1), i_part.view(B, b.n_img, -1)], 1).reshape(-1, self.heads, self.head_dim)

    # ---- double-stream block, per branch ------------------------------------------------------------
    def _double_in(self, b: KleinBranch, B):
        if b.x_in is not None:  # computed ahead by the previous block's last residuals
            x, b.x_in = b.x_in, None
            return x
        _, mi, mt_, _ = b.mods
        sh, sc, _ = _split3(mi, 0)
        csh, csc, _ = _split3(mt_, 0)
        return self._ln(b.img, sc, sh, B), self._ln(b.txt_h, csc, csh, B)

    def _double_qkv(self, b: KleinBranch, qi, ki, vi, qc, kc, vc, B):
        a = b.block.attn
        qi_, ki_ = self._qk(qi, ki, a.norm_q.weight, a.norm_k.weight, b.cs_img, B)
        qc_, kc_ = self._qk(qc, kc, a.norm_added_q.weight, a.norm_added_k.weight, b.cs_txt, B)
        hd = (-1, self.heads, self.head_dim)
        return self._joint(b, qc_, qi_, B), self._joint(b, kc_, ki_, B), self._joint(b, vc.view(hd), vi.view(hd), B)

    def _split_out(self, b: KleinBranch, o, B):
        """Attention output -> (text rows, image rows)."""
        o_t, o_i = o.reshape(B, b.n_txt + b.n_img, -1).split([b.n_txt, b.n_img], 1)
        return o_t.reshape(B * b.n_txt, -1), o_i.reshape(B * b.n_img, -1)

    def _gate_ln(self, x, gate, y, scale, shift, B):
        """(x + gate * y, its LayerNorm * (1 + scale) + shift): the residual and the next sublayer's
        input in one pass."""
        D = x.shape[-1]
        out, xn = self.ops.residual_norm(x.view(B, -1, D), gate, y.view(B, -1, D), scale, self.eps, shift=shift,
                                         tanh=False, layer=True)
        return out.reshape(x.shape), xn.reshape(x.shape)

    def _double_mid(self, b: KleinBranch, ai, ac, B):
        _, mi, mt_, _ = b.mods
        shi, sci, _ = _split3(mi, 1)
        shc, scc, _ = _split3(mt_, 1)
        b.img, xi = self._gate_ln(b.img, _split3(mi, 0)[2], ai, sci, shi, B)
        b.txt_h, xc = self._gate_ln(b.txt_h, _split3(mt_, 0)[2], ac, scc, shc, B)
        return xi, xc

    def _double_out(self, b: KleinBranch, fo, fco, B, tail: bool = False):
        """The block's last residuals; with ``tail`` also the next double block's inputs, in one pass
        each (the modulation is shared by every double block)."""
        _, mi, mt_, _ = b.mods
        if not tail:
            b.img = self._gate(b.img, _split3(mi, 1)[2], fo, B)
            b.txt_h = self._gate(b.txt_h, _split3(mt_, 1)[2], fco, B)
            return
        sh, sc, _ = _split3(mi, 0)
        csh, csc, _ = _split3(mt_, 0)
        b.img, xi = self._gate_ln(b.img, _split3(mi, 1)[2], fo, sc, sh, B)
        b.txt_h, xc = self._gate_ln(b.txt_h, _split3(mt_, 1)[2], fco, csc, csh, B)
        b.x_in = (xi, xc)

    def _double(self, path, S, T, B, tail: bool = False):
        for b in (S, T):
            if b is not None:
                b.at(path)
        ns, nt = self.per_branch(self._double_in, S, T, B=B)
        xi, xc = (ns[0] if ns else None, nt[0] if nt else None), (ns[1] if ns else None, nt[1] if nt else None)
        qi, ki, vi = self.linear_group([f"{path}.attn.{n}" for n in ("to_q", "to_k", "to_v")], *xi)
        qc, kc, vc = self.linear_group([f"{path}.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj")], *xc)
        q = self.per_branch(self._double_qkv, S, T, qi, ki, vi, qc, kc, vc, B=B)
        o = self._attend(q, B)
        split = self.per_branch(self._split_out, S, T, o, B=B)
        txt_o, img_o = ((split[0][j] if split[0] else None, split[1][j] if split[1] else None) for j in (0, 1))
        ai = self.linear_pair(f"{path}.attn.to_out.0", *img_o)
        ac = self.linear_pair(f"{path}.attn.to_add_out", *txt_o)
        r = self.per_branch(self._double_mid, S, T, ai, ac, B=B)
        ri, rc = (r[0][0] if r[0] else None, r[1][0] if r[1] else None), (r[0][1] if r[0] else None,
                                                                          r[1][1] if r[1] else None)
        gi = self.per_branch(self._swiglu, S, T, self.linear_pair(f"{path}.ff.linear_in", *ri))
        gc = self.per_branch(self._swiglu, S, T, self.linear_pair(f"{path}.ff_context.linear_in", *rc))
        self.per_branch(self._double_out, S, T, self.linear_pair(f"{path}.ff.linear_out", *gi),
                        self.linear_pair(f"{path}.ff_context.linear_out", *gc), B=B, tail=tail)

    # ---- single-stream block, per branch ------------------------------------------------------------
    def _single_in(self, b: KleinBranch, B):
        if b.x_in is not None:  # computed ahead by the previous block's last residual
            x, b.x_in = b.x_in, None
            return x
        sh, sc, _ = _split3(b.mods[3], None)
        return self._ln(b.hs, sc, sh, B)

    def _single_qkv(self, b: KleinBranch, p, B):
        a, inner = b.block.attn, self.heads * self.head_dim
        q, k, v, b.mlp_in = p.split([inner, inner, inner, p.shape[1] - 3 * inner], 1)
        q_t, q_i = q.reshape(B, b.n_txt + b.n_img, -1).split([b.n_txt, b.n_img], 1)
        k_t, k_i = k.reshape(B, b.n_txt + b.n_img, -1).split([b.n_txt, b.n_img], 1)
        qt_, kt_ = self._qk(q_t, k_t, a.norm_q.weight, a.norm_k.weight, b.cs_txt, B)
        qi_, ki_ = self._qk(q_i, k_i, a.norm_q.weight, a.norm_k.weight, b.cs_img, B)
        return self._joint(b, qt_, qi_, B), self._joint(b, kt_, ki_, B), v.reshape(-1, self.heads, self.head_dim)

    def _single_cat(self, b: KleinBranch, p, o):
        mlp, b.mlp_in = b.mlp_in, None
        return torch.cat([o.reshape(o.shape[0], -1), self._swiglu(b, mlp)], -1)

    def _single_out(self, b: KleinBranch, out, B, tail: bool = False):
        """The block's residual; with ``tail`` also the next single block's input, in one pass (the
        modulation is shared by every single block)."""
        sh, sc, gate = _split3(b.mods[3], None)
        if tail:
            b.hs, b.x_in = self._gate_ln(b.hs, gate, out, sc, sh, B)
        else:
            b.hs = self._gate(b.hs, gate, out, B)

    def _single(self, path, S, T, B, tail: bool = False):
        for b in (S, T):
            if b is not None:
                b.at(path)
        p = self.linear_pair(f"{path}.attn.to_qkv_mlp_proj", *self.per_branch(self._single_in, S, T, B=B))
        o = self._attend(self.per_branch(self._single_qkv, S, T, p, B=B), B)
        out = self.linear_pair(f"{path}.attn.to_out", *self.per_branch(self._single_cat, S, T, p, o))
        self.per_branch(self._single_out, S, T, out, B=B, tail=tail)

    # ---- forward -------------------------------------------------------------------------------
    def _branch(self, name, ctxs, x):
        model, adapter = (self.ms, self.adapter_s) if name == "s" else (self.mt, self.adapter_t)
        B, _, h, w = x.shape
        dtype = self.ms.x_embedder.weight.dtype
        refs = [refs_of(c) for c in ctxs]
        if len({tuple(tuple(r.shape) for r in rr) for rr in refs}) > 1 or len({c.features.shape for c in ctxs}) > 1:
            from dopsd_fast.errors import BackendError

            raise BackendError(f"FLUX.2-klein: the samples of a batch must share the text length (the pipeline pads "
                               f"every prompt to max_sequence_length) and the reference sizes; got text lengths "
                               f"{sorted({c.features.shape[0] for c in ctxs})}, reference sizes "
                               f"{sorted({tuple(tuple(r.shape) for r in rr) for rr in refs}) if any(refs) else 'none'}")
        txt = torch.stack([c.features for c in ctxs]).to(x.device, dtype)
        ref_tok = [pack(torch.stack([rr[i] for rr in refs]).to(x.device, dtype)) for i in range(len(refs[0]))]
        n_txt = txt.shape[1]
        cs_txt, cs_img, n_img = self._tables(model, n_txt, h, w, tuple((r.shape[-2], r.shape[-1]) for r in refs[0]),
                                         x.device)
        return KleinBranch(name, model, adapter, n_txt=n_txt, n_img=n_img, txt=txt, refs=ref_tok, cs_txt=cs_txt, cs_img=cs_img)

    def velocity_pair(self, x, sigma, ctx_s, ctx_t, share=None):
        """(v_student, v_teacher) for latents ``x`` (B, C, h, w) in the (sigma, v) convention. ``share``:
        the roll-out's :class:`~dopsd_fast.models.paired.RolloutShare` (the LoRA casts once per roll-out);
        FLUX.2 has no state-independent stream to share beyond that (its text tokens are modulated by
        the timestep in every double block)."""
        with self.sharing(share):
            return self._velocity_pair(x, sigma, ctx_s, ctx_t)

    def _velocity_pair(self, x, sigma, ctx_s, ctx_t):
        ms = self.ms
        dtype = ms.x_embedder.weight.dtype
        B, C, h, w = x.shape
        N = h * w
        S = self._branch("s", ctx_s, x) if ctx_s is not None else None
        T = self._branch("t", ctx_t, x) if ctx_t is not None else None
        live = [b for b in (S, T) if b is not None]

        with self._nv("embed"):
            shared = None
            for b in live:
                if self.same_model and shared is not None:
                    b.mods = shared
                    continue
                m = b.model
                with b.grad_ctx():
                    temb = m.time_guidance_embed(SPEC.convention.model_time(sigma).to(dtype) * 1000, None)
                    b.mods = shared = (temb, m.double_stream_modulation_img(temb),
                                       m.double_stream_modulation_txt(temb), m.single_stream_modulation(temb))
            tok = pack(x.to(dtype))
            e_x = None
            share_x = self.same_model and not has_lora(ms.x_embedder)
            for b in live:
                with b.grad_ctx():
                    if share_x and e_x is not None:
                        e = e_x if b.student else e_x.detach()
                    else:
                        e = e_x = b.model.x_embedder(tok)
                    parts = [e] + [b.model.x_embedder(r) for r in b.refs]
                    b.img = torch.cat(parts, 1).reshape(B * b.n_img, -1)
                    b.txt_h = b.model.context_embedder(b.txt).reshape(B * b.n_txt, -1)

        n_double = len(ms.transformer_blocks)
        for bi in range(n_double):
            with self._nv(f"double{bi}"):
                self._run(self._double, f"transformer_blocks.{bi}", S, T, B, ("img", "txt_h"), bi,
                          tail=bi + 1 < n_double)

        for b in live:  # single-stream blocks on [text ; image]
            with b.grad_ctx():
                b.hs = torch.cat([b.txt_h.view(B, b.n_txt, -1), b.img.view(B, b.n_img, -1)], 1).reshape(B * (b.n_txt + b.n_img), -1)
        n_single = len(ms.single_transformer_blocks)
        for bi in range(n_single):
            with self._nv(f"single{bi}"):
                self._run(self._single, f"single_transformer_blocks.{bi}", S, T, B, ("hs",), n_double + bi,
                          tail=bi + 1 < n_single)

        res = {}
        with self._nv("final"):  # the x_k tokens only
            for b in live:
                with b.grad_ctx():
                    hh = b.hs.view(B, b.n_txt + b.n_img, -1)[:, b.n_txt:b.n_txt + N]
                    emb = b.model.norm_out.linear(F.silu(b.mods[0]).to(hh.dtype))
                    scale, shift = emb.chunk(2, dim=1)
                    y = self._ln(hh.reshape(B * N, -1), scale, shift, B)
                    out = b.model.proj_out(y).view(B, N, -1)
                    res[b.name] = SPEC.convention.velocity(out).permute(0, 2, 1).reshape(B, C, h, w)
        return res.get("s"), res.get("t")

    def _run(self, block, path, S, T, B, fields, index, tail: bool = False):
        """Block ``path`` on both branches; among the first ``checkpoint_layers`` blocks the student runs
        under gradient checkpointing (only its input hidden states ``fields`` kept; the recompute sees
        the modulation of this block's forward) and the teacher alone, without autograd. ``tail``: the
        block's last residuals also compute the next block's inputs (not the checkpointed student's: its
        boundary is ``fields`` alone)."""
        if S is None or index >= self.checkpoint_layers or not torch.is_grad_enabled():
            return block(path, S, T, B, tail=tail)
        if T is not None:
            block(path, None, T, B, tail=tail)

        def run(*hs, snap=replace(S), share=self._share):  # the recompute reads the same shared casts
            b = replace(snap, **dict(zip(fields, hs)))
            with self.sharing(share):
                block(path, b, None, B)
            return tuple(getattr(b, f) for f in fields)

        out = checkpoint(run, *(getattr(S, f) for f in fields), use_reentrant=False)
        for f, v in zip(fields, out):
            setattr(S, f, v)

    def _offsets(self, B: int, S: int, dev):
        """The attention's per-sample offsets (int32 on the device, and as a list) of B samples of S
        tokens: made once per shape, never per call (no host-to-device copy inside a CUDA graph)."""
        key = (B, S, str(dev))
        if key not in self._cu:
            cu = [i * S for i in range(B + 1)]
            self._cu[key] = (torch.tensor(cu, dtype=torch.int32, device=dev), cu)
        return hold(self._cu[key])

    def _attend(self, q, B):
        """Joint attention per sample for both branches (each (q, k, v) of (B*S, H, hd), or None)."""
        def spec(q3):
            if q3 is None:
                return None
            return (*q3, *self._offsets(B, q3[0].shape[0] // B, q3[0].device))

        s, t = spec(q[0]), spec(q[1])
        if s is not None and t is not None:
            return self.ops.attention_pair(s, t)
        out_s = self.ops.attention_one(*s) if s is not None else None
        if t is None:
            return out_s, None
        with torch.no_grad():
            return out_s, self.ops.attention_one(*t)
