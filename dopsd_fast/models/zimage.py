"""Fast Z-Image forward for the D-OPSD double forward, on the diffusers model's own parameters.

``FastZImage`` reads the weights of a diffusers ``ZImageTransformer2DModel`` in place (no copy, no
conversion: the state dict, the peft adapters, the optimizer and the EMA stay as they are) and
runs the same math as ``ZImageTransformer2DModel.forward`` in a packed layout:

* each branch is a flat token stream (per sample ``[image tokens ; caption tokens]``, both padded to
  multiples of 32 with the model's pad tokens exactly as diffusers does) with ``cu_seqlens``;
* the student stream (differentiable) and the teacher stream (constants, computed without autograd)
  go through each block side by side: every linear is ONE base GEMM for both streams with a
  per-branch LoRA delta (``paired_lora_linear``), attention is ONE launch for both
  (``dual_branch_attention``), the element-wise work runs per stream (fused kernels);
* work that does not depend on the branch is done once: the timestep embedding, every adaLN
  modulation (not LoRA-adapted), the patch embedding of x_k, and the image-only noise refiner when it
  carries no adapter and the image needs no padding (its output is then the same for both branches up
  to rounding: RoPE is relative and the branches differ only by a common position offset).

Z-Image's output is ``-v`` at ``t = 1 - sigma``; :meth:`FastZImage.velocity_pair` returns velocities
in the (sigma, v) convention of :mod:`dopsd_fast.algorithm`, exactly like ``ZImageAdapter.velocity``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dopsd_fast.fp8 import is_fp8_linear
from dopsd_fast.models.ops import TorchOps
from dopsd_fast.profiling import nvtx_range

SEQ_MULTI_OF = 32


def _lora_of(mod, adapter):
    """(weight, bias, (A, B, scale) or None) of a plain or peft-wrapped linear under ``adapter``."""
    if hasattr(mod, "base_layer"):
        if getattr(mod, "merged", False):
            raise RuntimeError("FastZImage: LoRA weights are merged into the base layer; unmerge them first")
        base = mod.base_layer
        if adapter is not None and adapter in mod.lora_A:
            if getattr(mod, "use_dora", {}).get(adapter, False):
                raise NotImplementedError("FastZImage: DoRA adapters are not supported by the fast path")
            return base.weight, base.bias, (mod.lora_A[adapter].weight, mod.lora_B[adapter].weight,
                                            float(mod.scaling[adapter]))
        return base.weight, base.bias, None
    return mod.weight, mod.bias, None


def _has_lora(module) -> bool:
    return any(hasattr(m, "lora_A") for m in module.modules())


@dataclass
class Stream:
    """One branch's packed tokens: h (T, dim), per-token cos/sin (T, head_dim/2), offsets."""

    h: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    cu: torch.Tensor  # int32 (B + 1)
    cu_list: list
    seq: torch.Tensor  # (T,) sample index of each token

    def mod(self, m):
        """Per-sample modulation (B, D) -> what the norm kernels take for this stream's layout."""
        return m if m.shape[0] == 1 else m[self.seq]

    def view3(self, x):
        B = len(self.cu_list) - 1
        return x.view(1, -1, x.shape[-1]) if B == 1 else x.view(-1, 1, x.shape[-1])


class PairedModel:
    """What the packed student/teacher models share: the two (module, adapter) branches, the ops,
    and how one linear runs for both streams (one base GEMM with per-branch LoRA deltas; FP8
    modules called as modules; two separate calls for two separate models)."""

    def __init__(self, student, teacher, ops=None, nvtx: bool = False, fp8_ctx=None, fp8_teacher: bool = True):
        self.ms, self.adapter_s = student
        self.mt, self.adapter_t = teacher
        self.ops = ops or TorchOps()
        self.nvtx = nvtx
        self.fp8_ctx = fp8_ctx or (lambda enabled=True: contextlib.nullcontext())
        self.fp8_teacher = fp8_teacher
        self.same_model = self.ms is self.mt

    def _nv(self, name):
        return nvtx_range(name) if self.nvtx else contextlib.nullcontext()

    @staticmethod
    def _delta(x, lora):
        a, b, s = lora
        return s * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def _lin(self, mod, adapter, x):
        base = getattr(mod, "base_layer", mod)
        if is_fp8_linear(base):  # FP8 base GEMM by the converted module, LoRA delta in bf16
            y = base(x)
            lora = _lora_of(mod, adapter)[2] if base is not mod else None
            return y + self._delta(x, lora) if lora is not None else y
        w, b, lora = _lora_of(mod, adapter)
        return self.ops.linear(x, w, b, lora)

    def _plin(self, path, x_s, x_t):
        """The same linear of both branches; either input may be None (one-branch run)."""
        mod_s, mod_t = path(self.ms), path(self.mt)
        if x_t is None:
            return self._lin(mod_s, self.adapter_s, x_s), None
        if x_s is None:
            with torch.no_grad():
                return None, self._lin(mod_t, self.adapter_t, x_t)
        base = getattr(mod_s, "base_layer", mod_s)
        if mod_s is mod_t and is_fp8_linear(base):
            lo_s = _lora_of(mod_s, self.adapter_s)[2] if base is not mod_s else None
            lo_t = _lora_of(mod_s, self.adapter_t)[2] if base is not mod_s else None
            if self.fp8_teacher:  # one FP8 GEMM over both streams' rows
                y = base(torch.cat([x_s, x_t.detach()]))
                y_s, y_t = y[:x_s.shape[0]], y[x_s.shape[0]:].detach()
            else:  # the teacher's rows in bf16 (TransformerEngine outside fp8_autocast)
                y_s = base(x_s)
                with torch.no_grad(), self.fp8_ctx(False):
                    y_t = base(x_t)
            if lo_s is not None:
                y_s = y_s + self._delta(x_s, lo_s)
            if lo_t is not None:
                with torch.no_grad():
                    y_t = y_t + self._delta(x_t, lo_t)
            return y_s, y_t
        if mod_s is mod_t:
            w, b, lo_s = _lora_of(mod_s, self.adapter_s)
            _, _, lo_t = _lora_of(mod_s, self.adapter_t)
            return self.ops.paired_linear(x_s, x_t, w, b, lo_s, lo_t)
        y_s = self._lin(mod_s, self.adapter_s, x_s)
        with torch.no_grad():
            y_t = self._lin(mod_t, self.adapter_t, x_t)
        return y_s, y_t

    def _each(self, fn, s, t):
        """Run ``fn`` on the student value (with autograd) and the teacher value (without)."""
        out_s = fn(s, "s") if s is not None else None
        if t is None:
            return out_s, None
        with torch.no_grad():
            return out_s, fn(t, "t")



class FastZImage(PairedModel):
    """Packed student/teacher forward of a diffusers Z-Image transformer.

    ``student``/``teacher``: ``(module, adapter_name)``: the same module with two peft adapters
    (LoRA), or two modules (full fine-tuning: the trainable model and its EMA copy; adapter None).
    ``ops``: :class:`~dopsd_fast.models.ops.FusedOps` or :class:`~dopsd_fast.models.ops.TorchOps`.
    ``checkpoint_layers``: how many main layers (from the first) run under gradient checkpointing.
    """

    def __init__(self, student, teacher, ops=None, checkpoint_layers: int = 0, nvtx: bool = False,
                 fp8_ctx=None, fp8_teacher: bool = True):
        super().__init__(student, teacher, ops, nvtx, fp8_ctx, fp8_teacher)
        self.checkpoint_layers = int(checkpoint_layers)
        cfg = self.ms.config
        if tuple(cfg.all_patch_size) != (2,) or tuple(cfg.all_f_patch_size) != (1,):
            raise NotImplementedError("FastZImage supports the released patch sizes (2, f 1) only")
        if getattr(cfg, "siglip_feat_dim", None):
            raise NotImplementedError("FastZImage: the Omni (SigLIP) variant is not supported")
        self.key = "2-1"
        self.dim, self.heads = cfg.dim, cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.eps = cfg.norm_eps
        self._layouts: dict = {}
        self.refiner_shareable = self.same_model and not _has_lora(self.ms.noise_refiner)

    def _rope_ids(self, cap_len_padded, ht, wt, n_img, n_img_pad, device):
        cap = torch.stack([torch.arange(1, cap_len_padded + 1), torch.zeros(cap_len_padded, dtype=torch.long),
                           torch.zeros(cap_len_padded, dtype=torch.long)], -1)
        hh, ww = torch.meshgrid(torch.arange(ht), torch.arange(wt), indexing="ij")
        img = torch.stack([torch.full((n_img,), cap_len_padded + 1), hh.flatten(), ww.flatten()], -1)
        pad = torch.zeros(n_img_pad - n_img, 3, dtype=torch.long)
        return torch.cat([img, pad]).to(device), cap.to(device)

    def _freqs(self, model, ids):
        fc = model.rope_embedder(ids)
        return fc.real.float().contiguous(), fc.imag.float().contiguous()

    # ---- blocks --------------------------------------------------------------------------------
    def _block(self, idx_path, s: Stream | None, t: Stream | None, mods, modulated: bool):
        """One Z-Image transformer block on both streams. ``mods``: per-sample (scale_msa, gate_msa,
        scale_mlp, gate_mlp) for each branch, or None (context refiner)."""
        ops, eps = self.ops, self.eps
        blk = lambda m: idx_path(m)  # noqa: E731
        lin = lambda sub, a, b: self._plin(lambda m: sub(blk(m)), a, b)  # noqa: E731

        def norm_in(x, which, norm_name, mod_i):
            st = s if which == "s" else t
            model = self.ms if which == "s" else self.mt
            w = getattr(blk(model), norm_name).weight
            sc = st.mod(mods[which][mod_i]) if modulated else None
            return ops.rms_mod(st.view3(x), w, sc, eps).view_as(x)

        def residual(x, y, which, norm_name, mod_i):
            st = s if which == "s" else t
            model = self.ms if which == "s" else self.mt
            yn = ops.rms_mod(st.view3(y), getattr(blk(model), norm_name).weight, None, eps)
            if modulated:
                return ops.gated(st.view3(x), st.mod(mods[which][mod_i]), yn).view_as(x)
            return x + yn.view_as(x)

        hs, ht = (s.h if s else None), (t.h if t else None)
        xs, xt = self._each(lambda h, w: norm_in(h, w, "attention_norm1", 0), hs, ht)
        qs, qt = lin(lambda b: b.attention.to_q, xs, xt)
        ks, kt = lin(lambda b: b.attention.to_k, xs, xt)
        vs, vt = lin(lambda b: b.attention.to_v, xs, xt)

        def rope(qkv, which):
            q, k = qkv
            st = s if which == "s" else t
            att = blk(self.ms if which == "s" else self.mt).attention
            shp = (1, q.shape[0], self.heads, self.head_dim)
            q, k = ops.rope_qk(q.view(shp), k.view(shp), att.norm_q.weight, att.norm_k.weight, st.cos, st.sin, 1e-5)
            return q[0], k[0]

        rs, rt = self._each(rope, (qs, ks) if s else None, (qt, kt) if t else None)
        hv = lambda v: v.view(v.shape[0], self.heads, self.head_dim) if v is not None else None  # noqa: E731
        if s is not None and t is not None:
            os_, ot = ops.attention_pair((rs[0], rs[1], hv(vs), s.cu, s.cu_list), (rt[0], rt[1], hv(vt), t.cu, t.cu_list))
        else:
            os_, ot = self._each(lambda st_r, w: ops.attention_one(st_r[0], st_r[1], hv(vs if w == "s" else vt),
                                                                    (s if w == "s" else t).cu,
                                                                    (s if w == "s" else t).cu_list), rs, rt)
        flat = lambda o: o.reshape(o.shape[0], -1) if o is not None else None  # noqa: E731
        as_, at = lin(lambda b: b.attention.to_out[0], flat(os_), flat(ot))
        hs, ht = self._each(lambda h, w: residual(h, as_ if w == "s" else at, w, "attention_norm2", 1), hs, ht)
        xs, xt = self._each(lambda h, w: norm_in(h, w, "ffn_norm1", 2), hs, ht)
        w1s, w1t = lin(lambda b: b.feed_forward.w1, xs, xt)
        w3s, w3t = lin(lambda b: b.feed_forward.w3, xs, xt)
        gs, gt = self._each(lambda ab, w: ops.swiglu(*ab), (w1s, w3s) if s else None, (w1t, w3t) if t else None)
        fs, ft = lin(lambda b: b.feed_forward.w2, gs, gt)
        return self._each(lambda h, w: residual(h, fs if w == "s" else ft, w, "ffn_norm2", 3), hs, ht)

    def _mods(self, layer_path, adaln):
        """adaLN modulation of a block for each branch: computed once when it is shared."""
        def one(model):
            m = layer_path(model).adaLN_modulation(adaln[model is self.mt and not self.same_model])
            sc_msa, g_msa, sc_mlp, g_mlp = m.chunk(4, dim=1)
            return sc_msa, g_msa, sc_mlp, g_mlp

        if self.same_model and not _has_lora(layer_path(self.ms).adaLN_modulation):
            m = one(self.ms)
            return {"s": m, "t": m}
        with torch.no_grad():
            mt = one(self.mt)
        return {"s": one(self.ms), "t": mt}

    # ---- layout (host-side work, cached per shape) ---------------------------------------------
    def layout(self, B, H, W, cap_lens_s, cap_lens_t, device):
        """Everything that depends only on shapes: RoPE tables, offsets, gather indices. Built once
        per (resolution, caption lengths) and cached, so the forward itself does no host work and no
        host-to-device copy (what CUDA-graph capture needs)."""
        key = (B, H, W, tuple(cap_lens_s or ()), tuple(cap_lens_t or ()), str(device))
        hit = self._layouts.get(key)
        if hit is not None:
            return hit
        ht_, wt_ = H // 2, W // 2
        n_img = ht_ * wt_
        n_img_pad = n_img + (-n_img) % SEQ_MULTI_OF
        lay = {"n_img": n_img, "n_img_pad": n_img_pad, "hw": (ht_, wt_)}
        i32 = dict(dtype=torch.int32, device=device)
        for which, lens, model in (("s", cap_lens_s, self.ms), ("t", cap_lens_t, self.mt)):
            if lens is None:
                continue
            padded = [n + (-n) % SEQ_MULTI_OF for n in lens]
            img_ids, cap_ids = zip(*[self._rope_ids(p, ht_, wt_, n_img, n_img_pad, "cpu") for p in padded])
            img_cs = self._freqs(model, torch.cat(img_ids).to(device))
            cap_cs = self._freqs(model, torch.cat(cap_ids).to(device))
            cap_cu = [0]
            for p in padded:
                cap_cu.append(cap_cu[-1] + p)
            # caption rows: embedded real tokens first, then one pad row per padded position
            n_real = sum(lens)
            cap_src, off = [], 0
            for n, p in zip(lens, padded):
                cap_src += list(range(off, off + n)) + [n_real] * (p - n)
                off += n
            # unified rows per sample [image ; caption] from cat([image rows, caption rows])
            uni_src, uni_cu, n_img_rows = [], [0], B * n_img_pad
            for b, p in enumerate(padded):
                uni_src += list(range(b * n_img_pad, (b + 1) * n_img_pad))
                uni_src += list(range(n_img_rows + cap_cu[b], n_img_rows + cap_cu[b + 1]))
                uni_cu.append(uni_cu[-1] + n_img_pad + p)
            uni_ids = torch.cat([torch.cat([img_ids[b], cap_ids[b]]) for b in range(B)]).to(device)
            out_rows = [r for b in range(B) for r in range(uni_cu[b], uni_cu[b] + n_img)]
            arange_b = torch.arange(B)
            lay[which] = {
                "cap_src": torch.tensor(cap_src, dtype=torch.long, device=device),
                "img": (img_cs, [i * n_img_pad for i in range(B + 1)],
                        arange_b.repeat_interleave(n_img_pad).to(device)),
                "cap": (cap_cs, cap_cu, torch.repeat_interleave(arange_b, torch.tensor(padded)).to(device)),
                "uni": (self._freqs(model, uni_ids), uni_cu,
                        torch.repeat_interleave(arange_b, torch.tensor([n_img_pad + p for p in padded])).to(device)),
                "uni_src": torch.tensor(uni_src, dtype=torch.long, device=device),
                "out_rows": torch.tensor(out_rows, dtype=torch.long, device=device),
            }
            for name in ("img", "cap", "uni"):
                (cos, sin), cu, seq = lay[which][name]
                lay[which][name] = (cos, sin, torch.tensor(cu, **i32), cu, seq)
        if len(self._layouts) >= 64:
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = lay
        return lay

    @staticmethod
    def _stream(h, spec):
        cos, sin, cu, cu_list, seq = spec
        return Stream(h, cos, sin, cu, cu_list, seq)

    # ---- forward -------------------------------------------------------------------------------
    def forward_pair(self, x, t, caps_s, caps_t=None, student=True):
        """Diffusers-equivalent outputs (``model_out``, i.e. -v) of the student and teacher branches.

        x: (B, C, H, W) latents; t: (B,) timesteps in [0, 1] (``1 - sigma``); caps_*: per-sample
        caption features (L_b, cap_feat_dim). ``student=False`` (or ``caps_s=None``) runs the teacher
        branch alone; ``caps_t=None`` the student alone.
        """
        ms, mt = self.ms, self.mt
        B, C, H, W = x.shape
        dtype = ms.all_x_embedder[self.key].weight.dtype
        run_s = bool(student) and caps_s is not None
        run_t = caps_t is not None
        lay = self.layout(B, H, W, [len(c) for c in caps_s] if run_s else None,
                          [len(c) for c in caps_t] if run_t else None, x.device)
        n_img, n_img_pad = lay["n_img"], lay["n_img_pad"]
        ht_, wt_ = lay["hw"]
        branches = ([("s", ms, caps_s)] if run_s else []) + ([("t", mt, caps_t)] if run_t else [])
        no_grad = lambda w: torch.no_grad() if w == "t" else contextlib.nullcontext()  # noqa: E731

        with self._nv("embed"):
            adaln = {}
            for which, model, _ in branches:
                if self.same_model and adaln:
                    adaln[which] = next(iter(adaln.values()))
                    continue
                with no_grad(which):
                    adaln[which] = model.t_embedder(t.to(torch.float32) * model.t_scale).to(dtype)
            adaln_list = [adaln.get("s", adaln.get("t")), adaln.get("t", adaln.get("s"))]
            patches = x.to(dtype).view(B, C, 1, 1, ht_, 2, wt_, 2).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(
                B, n_img, 4 * C)

            def img_embed(model):
                e = model.all_x_embedder[self.key](patches)
                if n_img_pad > n_img:
                    e = torch.cat([e, model.x_pad_token.to(e.dtype).expand(B, n_img_pad - n_img, -1)], 1)
                return e.reshape(B * n_img_pad, -1)

            cap_h = {}
            for which, model, caps in branches:
                with no_grad(which):
                    emb = model.cap_embedder(torch.cat([c.to(x.device, dtype) for c in caps]))
                    rows = torch.cat([emb, model.cap_pad_token.to(emb.dtype)])
                    cap_h[which] = rows[lay[which]["cap_src"]]

        with self._nv("noise_refiner"):
            n_ref = len(ms.noise_refiner)
            share = self.refiner_shareable and n_img_pad == n_img and run_s and run_t
            if share:
                st = self._stream(img_embed(ms), lay["s"]["img"])
                for i in range(n_ref):
                    path = lambda m, i=i: m.noise_refiner[i]  # noqa: E731
                    st.h = self._block(path, st, None, self._mods(path, adaln_list), True)[0]
                img = {"s": st.h, "t": st.h.detach()}
            else:
                sts = {}
                for which, model, _ in branches:
                    with no_grad(which):
                        sts[which] = self._stream(img_embed(model), lay[which]["img"])
                for i in range(n_ref):
                    path = lambda m, i=i: m.noise_refiner[i]  # noqa: E731
                    out_s, out_t = self._block(path, sts.get("s"), sts.get("t"), self._mods(path, adaln_list), True)
                    for which, out in (("s", out_s), ("t", out_t)):
                        if which in sts:
                            sts[which].h = out
                img = {w: st.h for w, st in sts.items()}

        with self._nv("context_refiner"):
            cap_st = {w: self._stream(cap_h[w], lay[w]["cap"]) for w, _, _ in branches}
            for i in range(len(ms.context_refiner)):
                path = lambda m, i=i: m.context_refiner[i]  # noqa: E731
                out_s, out_t = self._block(path, cap_st.get("s"), cap_st.get("t"), None, False)
                for which, out in (("s", out_s), ("t", out_t)):
                    if which in cap_st:
                        cap_st[which].h = out

        uni = {}
        for which, _, _ in branches:
            with no_grad(which):
                h = torch.cat([img[which], cap_st[which].h])[lay[which]["uni_src"]]
            uni[which] = self._stream(h, lay[which]["uni"])

        s_st, t_st = uni.get("s"), uni.get("t")
        for i in range(len(ms.layers)):
            with self._nv(f"layer{i}"):
                path = lambda m, i=i: m.layers[i]  # noqa: E731
                mods = self._mods(path, adaln_list)
                if s_st is not None and i < self.checkpoint_layers and torch.is_grad_enabled():
                    # the student under checkpointing (recomputed in backward); the teacher alone, no autograd
                    def run(h, path=path, mods=mods):
                        return self._block(path, Stream(h, s_st.cos, s_st.sin, s_st.cu, s_st.cu_list, s_st.seq),
                                           None, mods, True)[0]

                    new_s = checkpoint(run, s_st.h, use_reentrant=False)
                    new_t = self._block(path, None, t_st, mods, True)[1] if t_st is not None else None
                else:
                    new_s, new_t = self._block(path, s_st, t_st, mods, True)
                if s_st is not None:
                    s_st.h = new_s
                if t_st is not None:
                    t_st.h = new_t

        results = {}
        with self._nv("final"):
            for which, model, _ in branches:
                with no_grad(which):
                    st = uni[which]
                    fl = model.all_final_layer[self.key]
                    scale = fl.adaLN_modulation(adaln[which])
                    y = self.ops.ln_mod(st.view3(st.h), st.mod(scale), 1e-6).view_as(st.h)
                    out = fl.linear(y[lay[which]["out_rows"]]).view(B, 1, ht_, wt_, 1, 2, 2, C)
                    results[which] = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, 1, H, W)[:, :, 0]
        return results.get("s"), results.get("t")

    def velocity_pair(self, x, sigma, ctx_s, ctx_t):
        """(v_student, v_teacher) in the (sigma, v) convention; v_teacher without autograd."""
        feats = lambda ctxs: [c.features for c in ctxs] if ctxs is not None else None  # noqa: E731
        t = 1.0 - sigma.float()
        out_s, out_t = self.forward_pair(x, t, feats(ctx_s), feats(ctx_t), student=ctx_s is not None)
        neg = lambda o: -o.float() if o is not None else None  # noqa: E731
        return neg(out_s), neg(out_t)
