"""Fast Z-Image forward for the D-OPSD double forward, on the diffusers model's own parameters.

``FastZImage`` reads the weights of a diffusers ``ZImageTransformer2DModel`` in place (no copy, no
conversion: the state dict, the peft adapters, the optimizer and the EMA stay as they are) and
runs the same math as ``ZImageTransformer2DModel.forward`` in a packed layout:

* each branch is a flat token stream (per sample ``[image tokens ; caption tokens]``, both padded to
  multiples of 32 with the model's pad tokens exactly as diffusers does) with ``cu_seqlens``;
* the student stream (differentiable) and the teacher stream (constants, computed without autograd)
  go through each block side by side: every linear is ONE op for both streams with a per-branch
  LoRA delta on each branch's own rows (``paired_lora_linears``: q/k/v and w1/w3 as groups, nothing
  concatenated), attention is ONE launch for both
  (``dual_branch_attention``), the element-wise work runs per stream (fused kernels);
* work that does not depend on the branch is done once: the timestep embedding, every adaLN
  modulation (not LoRA-adapted), the patch embedding of x_k, and the image-only noise refiner when it
  carries no adapter and the image needs no padding (its output is then the same for both branches up
  to rounding: RoPE is relative and the branches differ only by a common position offset) or both
  branches pad their captions to the same lengths (then the same input, bitwise). With image padding
  and different padded caption lengths it runs per branch: diffusers lets the image's pad rows (RoPE
  ids (0, 0, 0)) into the refiner's attention, and their offset to the image rows differs per branch;
* work that does not depend on the roll-out state is done once per micro-batch: the context refiner
  (caption tokens only, no timestep modulation) gives the same output at every state of a roll-out,
  since the weights change only at the optimizer step. With a :class:`ContextShare` (what
  ``FastPath.pair_fn`` passes) the teacher's refined captions are computed at the first state and
  reused (no autograd: exact), and, for a schedule that back-propagates once per roll-out, the
  student's too: one refiner forward whose graph the K states' losses all reach, so its backward also
  runs once, with their summed gradient (exact up to summation order).

Z-Image's time/sign convention (``t = 1 - sigma``, output ``-v``) is the family spec's
(:mod:`dopsd_fast.families.zimage.spec`); :meth:`FastZImage.velocity_pair` returns velocities in the
(sigma, v) convention of :mod:`dopsd_fast.algorithm`, exactly like ``ZImageAdapter.velocity``.
The shared packed machinery (branches, streams, paired linears) is :mod:`dopsd_fast.models.paired`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.checkpoint import checkpoint

from dopsd_fast.families.zimage.spec import SPEC
from dopsd_fast.graphs import hold
from dopsd_fast.models.paired import Branch, PairedModel, RolloutShare, Stream, has_lora

SEQ_MULTI_OF = 32


class ContextShare(RolloutShare):
    """The refined captions of one micro-batch's roll-out, reused across its states.

    ``student``: share the student's too. ``"graph"``: one output whose graph every state's loss
    reaches (for a roll-out that back-propagates once; a backward after each state would free it);
    ``"deferred"``: the states read a detached leaf that collects their gradients, and
    :meth:`finish`, called once after the roll-out's last backward, back-propagates the sum through the
    refiner (any schedule; the caller MUST call it, or the refiner's adapters get no gradient).
    ``False``: the student's refiner runs at every state. ``runs``: context-refiner passes actually
    computed, per branch (what the tests read)."""

    def __init__(self, student: bool | str = False):
        if student is True:
            student = "graph"
        if student not in (False, "graph", "deferred"):
            raise ValueError(f"ContextShare(student=...): False, 'graph' or 'deferred', got {student!r}")
        super().__init__()
        self.student = student
        self.h: dict = {}
        self.runs = {"s": 0, "t": 0}
        self._pending = None  # deferred: (refiner output with its graph, the leaf the states read)

    def keep(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Keep branch ``name``'s refined captions ``h`` for the next states; returns what this state
        reads (deferred: the leaf, from the first state on)."""
        if name == "t" or self.student == "graph":
            self.h[name] = h
        elif self.student == "deferred":
            leaf = h.detach().requires_grad_(h.requires_grad)
            self._pending = (h, leaf) if h.requires_grad else None
            self.h["s"] = h = leaf
        return h

    def finish(self) -> None:
        """Deferred mode: back-propagate the states' summed gradient through the student's refiner,
        once; a no-op otherwise (and when no state back-propagated)."""
        if self._pending is not None:
            out, leaf = self._pending
            self._pending = None
            if leaf.grad is not None:
                out.backward(leaf.grad)


def _flat(o):
    return o.reshape(o.shape[0], -1) if o is not None else None


class FastZImage(PairedModel):
    """Packed student/teacher forward of a diffusers Z-Image transformer.

    ``student``/``teacher``: ``(module, adapter)``: the same module with two peft adapters (LoRA; or
    one adapter and a :class:`~dopsd_fast.models.paired.Shadow` of the teacher's), or two modules (full
    fine-tuning: the trainable model and its EMA copy; adapter None). ``ops``:
    :class:`~dopsd_fast.models.ops.FusedOps` or :class:`~dopsd_fast.models.ops.TorchOps`.
    ``checkpoint_layers``: how many main layers (from the first) run under gradient checkpointing.
    """

    spec = SPEC

    def __init__(self, student, teacher, ops=None, checkpoint_layers: int = 0, nvtx: bool = False,
                 fp8_ctx=None, fp8_teacher: bool = True):
        super().__init__(student, teacher, ops, nvtx, fp8_ctx, fp8_teacher, checkpoint_layers)
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
        self.refiner_shareable = self.same_model and not has_lora(self.ms.noise_refiner)

    def new_share(self, student: bool | str = False) -> ContextShare:
        """A :class:`ContextShare` for one micro-batch's roll-out."""
        return ContextShare(student)

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

    # ---- one block, per branch -------------------------------------------------------------------
    def _norm_in(self, b: Branch, x, norm: str, mod: int):
        st = b.stream
        sc = b.mods[mod] if b.mods is not None else None
        return self.ops.rms_mod(st.rows(x), getattr(b.block, norm).weight, sc, self.eps,
                                seq=st.mod_seq if sc is not None else None).view_as(x)

    def _residual(self, b: Branch, x, y, norm: str, mod: int):
        st = b.stream
        w = getattr(b.block, norm).weight
        if b.mods is not None:  # x + tanh(gate) * RMSNorm(y), one pass
            return self.ops.norm_gated(st.rows(x), b.mods[mod], st.rows(y), w, self.eps, seq=st.mod_seq).view_as(x)
        return x + self.ops.rms_mod(st.rows(y), w, None, self.eps).view_as(x)

    def _residual_norm(self, b: Branch, x, y, norm: str, mod: int, next_norm: str, next_mod: int):
        """(the residual, the next sublayer's input): one pass where the stream is modulated."""
        if b.mods is None:
            h = self._residual(b, x, y, norm, mod)
            return h, self._norm_in(b, h, next_norm, next_mod)
        return self._fused(b, x, y, norm, mod, getattr(b.block, next_norm).weight, b.mods[next_mod])

    def _fused(self, b: Branch, x, y, norm: str, mod: int, next_weight, next_scale):
        """``x + tanh(gate) * RMSNorm(y)`` (this block's ``norm``, modulation ``mod``) and its
        ``RMSNorm_next_weight(.) * (1 + next_scale)``, in one op."""
        st = b.stream
        out, xn = self.ops.residual_norm(st.rows(x), b.mods[mod], st.rows(y), next_scale, self.eps,
                                         post=(getattr(b.block, norm).weight, self.eps), weight=next_weight,
                                         seq=st.mod_seq)
        return out.view_as(x), xn.view_as(x)

    def _rope(self, b: Branch, q, k):
        att = b.block.attention
        shp = (1, q.shape[0], self.heads, self.head_dim)
        q, k = self.ops.rope_qk(q.view(shp), k.view(shp), att.norm_q.weight, att.norm_k.weight, b.stream.cos,
                                b.stream.sin, 1e-5)
        return q.squeeze(0), k.squeeze(0)  # views: an index [0] would copy in its backward

    def _heads(self, v):
        return v.view(v.shape[0], self.heads, self.head_dim)

    def _attn_args(self, b: Branch, qk, v):
        return qk[0], qk[1], self._heads(v), b.stream.cu, b.stream.cu_list

    def _attend_one(self, b: Branch, qk, v):
        return self.ops.attention_one(*self._attn_args(b, qk, v))

    def _swiglu(self, b: Branch, a, g):
        return self.ops.swiglu(a, g)

    def _first_in(self, b: Branch, h):
        """The block's first normalized input: computed ahead by the previous block's last residual, or here."""
        x, b.x_in = b.x_in, None
        return x if x is not None else self._norm_in(b, h, norm="attention_norm1", mod=0)

    def _tail(self, b: Branch, h, f, nxt):
        """The block's last residual; with ``nxt`` (the next block's path and this branch's modulation
        of it) also the next block's first input, in one pass (kept in :attr:`Branch.x_in`)."""
        if nxt is None or b.mods is None:
            return self._residual(b, h, f, norm="ffn_norm2", mod=3)
        path, mods = nxt
        out, b.x_in = self._fused(b, h, f, "ffn_norm2", 3, b.model.get_submodule(path).attention_norm1.weight,
                                  mods[0])
        return out

    def _block(self, path: str, s: Branch | None, t: Branch | None, nxt=(None, None)):
        """One Z-Image transformer block (``path``, e.g. ``layers.3``) on both branches' streams, with
        each branch's :attr:`~Branch.mods` (None: the unmodulated context refiner). ``nxt``: per branch,
        None or (the next block's path, the branch's modulation of it): the last residual then computes
        the next block's first input too. Returns the new hidden states (student, teacher)."""
        for b in (s, t):
            if b is not None:
                b.at(path)
        h = (s.stream.h if s else None, t.stream.h if t else None)
        x = self.per_branch(self._first_in, s, t, h)
        q, k, v = self.linear_group([f"{path}.attention.to_{n}" for n in "qkv"], *x)
        qk = self.per_branch(self._rope, s, t, q, k)
        if s is not None and t is not None:
            o = self.ops.attention_pair(self._attn_args(s, qk[0], v[0]), self._attn_args(t, qk[1], v[1]))
        else:
            o = self.per_branch(self._attend_one, s, t, qk, v)
        a = self.linear_pair(f"{path}.attention.to_out.0", _flat(o[0]), _flat(o[1]))
        hx = self.per_branch(self._residual_norm, s, t, h, a, norm="attention_norm2", mod=1, next_norm="ffn_norm1",
                             next_mod=2)
        h, x = ((hx[0][j] if s else None, hx[1][j] if t else None) for j in (0, 1))
        w1, w3 = self.linear_group([f"{path}.feed_forward.w1", f"{path}.feed_forward.w3"], *x)
        g = self.per_branch(self._swiglu, s, t, w1, w3)
        f = self.linear_pair(f"{path}.feed_forward.w2", *g)
        return self.per_branch(self._tail, s, t, h, f, nxt)

    def _mods(self, path: str, s: Branch | None, t: Branch | None, adaln: dict) -> tuple:
        """(student's, teacher's) adaLN modulation of block ``path`` (computed once when it is shared)."""
        def one(b):
            m = b.model.get_submodule(path).adaLN_modulation(adaln[b.name])
            return tuple(m.chunk(4, dim=1))

        if self.same_model and not has_lora(self.ms.get_submodule(path).adaLN_modulation):
            m = one(s or t)
            return (m if s is not None else None, m if t is not None else None)
        mt = None
        if t is not None:
            with torch.no_grad():
                mt = one(t)
        return (one(s) if s is not None else None, mt)

    def _set_mods(self, path: str, s: Branch | None, t: Branch | None, adaln: dict, mods=None) -> None:
        """Each branch's modulation of block ``path``: ``mods`` (computed ahead), or computed here."""
        for b, m in zip((s, t), mods or self._mods(path, s, t, adaln)):
            if b is not None:
                b.mods = m

    def _run_blocks(self, paths, s: Branch | None, t: Branch | None, adaln: dict | None, checkpointed: int = 0):
        """Blocks ``paths`` in order on both streams (``adaln`` None: unmodulated); the first
        ``checkpointed`` with the student under gradient checkpointing (the teacher alone, no autograd).
        A modulated block's last residual also computes the next block's first input (one pass), except
        for the student around its checkpointed blocks (their boundary is the hidden state alone)."""
        ahead = None
        for i, path in enumerate(paths):
            with self._nv(path):
                if adaln is not None:
                    self._set_mods(path, s, t, adaln, ahead)
                ckpt = s is not None and torch.is_grad_enabled() and i < checkpointed
                nxt = (None, None)
                if adaln is not None and i + 1 < len(paths):
                    ahead = self._mods(paths[i + 1], s, t, adaln)
                    nxt = (None if s is None or ckpt else (paths[i + 1], ahead[0]),
                           None if t is None else (paths[i + 1], ahead[1]))
                if ckpt:
                    # the student as it is now (its modulation: later blocks replace s.mods before
                    # the backward recomputes this one)
                    def run(h, path=path, snap=replace(s), share=self._share):  # the recompute: same casts
                        with self.sharing(share):
                            return self._block(path, replace(snap, stream=replace(snap.stream, h=h)), None)[0]

                    new_s = checkpoint(run, s.stream.h, use_reentrant=False)
                    new_t = self._block(path, None, t, nxt)[1] if t is not None else None
                else:
                    new_s, new_t = self._block(path, s, t, nxt)
                if s is not None:
                    s.stream.h = new_s
                if t is not None:
                    t.stream.h = new_t

    # ---- layout (host-side work, cached per shape) ---------------------------------------------
    def layout(self, B, H, W, cap_lens_s, cap_lens_t, device):
        """Everything that depends only on shapes: RoPE tables, offsets, gather indices. Built once
        per (resolution, caption lengths) and cached, so the forward itself does no host work and no
        host-to-device copy (what CUDA-graph capture needs)."""
        key = (B, H, W, tuple(cap_lens_s or ()), tuple(cap_lens_t or ()), str(device))
        hit = self._layouts.get(key)
        if hit is not None:
            return hold(hit)  # kept with a graph captured now: the cache may drop it later
        ht_, wt_ = H // 2, W // 2
        n_img = ht_ * wt_
        n_img_pad = n_img + (-n_img) % SEQ_MULTI_OF
        layout = {"n_img": n_img, "n_img_pad": n_img_pad, "hw": (ht_, wt_)}
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
            unified_src, unified_cu, n_img_rows = [], [0], B * n_img_pad
            for b, p in enumerate(padded):
                unified_src += list(range(b * n_img_pad, (b + 1) * n_img_pad))
                unified_src += list(range(n_img_rows + cap_cu[b], n_img_rows + cap_cu[b + 1]))
                unified_cu.append(unified_cu[-1] + n_img_pad + p)
            unified_ids = torch.cat([torch.cat([img_ids[b], cap_ids[b]]) for b in range(B)]).to(device)
            out_rows = [r for b in range(B) for r in range(unified_cu[b], unified_cu[b] + n_img)]
            arange_b = torch.arange(B)
            layout[which] = {
                "padded": padded,
                "cap_src": torch.tensor(cap_src, dtype=torch.long, device=device),
                "img": (img_cs, [i * n_img_pad for i in range(B + 1)],
                        arange_b.repeat_interleave(n_img_pad).to(device)),
                "cap": (cap_cs, cap_cu, torch.repeat_interleave(arange_b, torch.tensor(padded)).to(device)),
                "unified": (self._freqs(model, unified_ids), unified_cu,
                        torch.repeat_interleave(arange_b, torch.tensor([n_img_pad + p for p in padded])).to(device)),
                "unified_src": torch.tensor(unified_src, dtype=torch.long, device=device),
                "out_rows": torch.tensor(out_rows, dtype=torch.long, device=device),
            }
            for name in ("img", "cap", "unified"):
                (cos, sin), cu, seq = layout[which][name]
                layout[which][name] = (cos, sin, torch.tensor(cu, **i32), cu, seq)
        if len(self._layouts) >= 64:
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = layout
        return hold(layout)

    @staticmethod
    def _stream(h, spec):
        cos, sin, cu, cu_list, seq = spec
        return Stream(h, cos, sin, cu, cu_list, seq)

    # ---- forward -------------------------------------------------------------------------------
    def forward_pair(self, x, t, caps_s, caps_t=None, student=True, share: ContextShare | None = None):
        """Diffusers-equivalent outputs (``model_out``, i.e. -v) of the student and teacher branches.

        x: (B, C, H, W) latents; t: (B,) timesteps in [0, 1] (``1 - sigma``); caps_*: per-sample
        caption features (L_b, cap_feat_dim). ``student=False`` (or ``caps_s=None``) runs the teacher
        branch alone; ``caps_t=None`` the student alone. ``share``: the micro-batch's
        :class:`ContextShare` (the same captions and weights at every call with it).
        """
        with self.sharing(share):
            return self._forward_pair(x, t, caps_s, caps_t, student, share)

    def _forward_pair(self, x, t, caps_s, caps_t, student, share):
        ms = self.ms
        B = x.shape[0]
        dtype = ms.all_x_embedder[self.key].weight.dtype
        S, T = self.branches(bool(student) and caps_s is not None, caps_t is not None)
        live = [b for b in (S, T) if b is not None]
        layout = self.layout(B, *x.shape[-2:], [len(c) for c in caps_s] if S else None,
                             [len(c) for c in caps_t] if T else None, x.device)
        with self._nv("embed"):
            adaln = self._time_embedding(live, t, dtype)
            img_embed = self._image_embedder(x.to(dtype), layout)
            cap_h = self._caption_embedding(live, {"s": caps_s, "t": caps_t}, layout, share, x.device, dtype)
        with self._nv("noise_refiner"):
            img = self._noise_refiner(S, T, live, layout, img_embed, adaln)
        with self._nv("context_refiner"):
            self._context_refiner(S, T, live, layout, cap_h, share)
        for b in live:  # [image ; caption] rows per sample: the main layers' unified stream
            with b.grad_ctx():
                h = torch.cat([img[b.name], b.stream.h])[layout[b.name]["unified_src"]]
            b.stream = self._stream(h, layout[b.name]["unified"])
        self._run_blocks([f"layers.{i}" for i in range(len(ms.layers))], S, T, adaln, self.checkpoint_layers)
        with self._nv("final"):
            results = self._final_layer(live, layout, adaln, x.shape)
        return results.get("s"), results.get("t")

    def _time_embedding(self, live, t, dtype) -> dict:
        """The timestep embedding per branch (once when both read one model); a missing branch's key maps
        to the other's embedding (the shared modulation reads either)."""
        adaln = {}
        for b in live:
            if self.same_model and adaln:
                adaln[b.name] = next(iter(adaln.values()))
                continue
            with b.grad_ctx():
                adaln[b.name] = b.model.t_embedder(t.to(torch.float32) * b.model.t_scale).to(dtype)
        return {"s": adaln.get("s", adaln.get("t")), "t": adaln.get("t", adaln.get("s"))}

    def _image_embedder(self, x, layout):
        """``model -> rows``: the 2 x 2 patches of ``x`` embedded by ``model``, padded with its pad token."""
        B, C = x.shape[:2]
        n_img, n_img_pad = layout["n_img"], layout["n_img_pad"]
        ht_, wt_ = layout["hw"]
        patches = x.view(B, C, 1, 1, ht_, 2, wt_, 2).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, n_img, 4 * C)

        def embed(model):
            e = model.all_x_embedder[self.key](patches)
            if n_img_pad > n_img:
                e = torch.cat([e, model.x_pad_token.to(e.dtype).expand(B, n_img_pad - n_img, -1)], 1)
            return e.reshape(B * n_img_pad, -1)
        return embed

    def _caption_embedding(self, live, caps, layout, share, device, dtype) -> dict:
        """The embedded caption rows (padded per sample) of each branch whose refined captions are not
        reused from the share."""
        cap_h = {}
        for b in live:
            if share is not None and b.name in share.h:
                continue  # refined captions reused: no embedding needed
            with b.grad_ctx():
                emb = b.model.cap_embedder(torch.cat([c.to(device, dtype) for c in caps[b.name]]))
                rows = torch.cat([emb, b.model.cap_pad_token.to(emb.dtype)])
                cap_h[b.name] = rows[layout[b.name]["cap_src"]]
        return cap_h

    def _noise_refiner(self, S, T, live, layout, img_embed, adaln) -> dict:
        """The image-only noise refiner; the refined image rows per branch."""
        ms = self.ms
        refiner = [f"noise_refiner.{i}" for i in range(len(ms.noise_refiner))]
        same_input = bool(S and T) and (layout["n_img_pad"] == layout["n_img"]
                                        or layout["s"]["padded"] == layout["t"]["padded"])
        if S and T and self.refiner_shareable and same_input:
            # one pass: the branches differ only by a common RoPE offset of the image rows (exact up
            # to rounding), or not at all (the same padded caption lengths: bitwise the same input).
            # Not otherwise: diffusers does not mask the image's pad rows (x_pad_token, RoPE ids
            # (0, 0, 0) in both branches) out of the refiner's attention, so an image row's offset
            # to a pad row differs between branches whose padded caption lengths differ.
            shared = Branch("s", ms, self.adapter_s, self._stream(img_embed(ms), layout["s"]["img"]))
            self._run_blocks(refiner, shared, None, adaln)
            return {"s": shared.stream.h, "t": shared.stream.h.detach()}
        for b in live:
            with b.grad_ctx():
                b.stream = self._stream(img_embed(b.model), layout[b.name]["img"])
        self._run_blocks(refiner, S, T, adaln)
        return {b.name: b.stream.h for b in live}

    def _context_refiner(self, S, T, live, layout, cap_h, share) -> None:
        """The caption-only context refiner into each branch's stream: computed where the share holds no
        refined captions yet (then kept in it: the teacher's always, the student's as the share says)."""
        run = {}
        for b in live:
            hit = share.h.get(b.name) if share is not None else None
            b.stream, b.mods = self._stream(hit if hit is not None else cap_h[b.name], layout[b.name]["cap"]), None
            run[b.name] = hit is None
        rs, rt = (S if S is not None and run["s"] else None), (T if T is not None and run["t"] else None)
        if rs is not None or rt is not None:
            self._run_blocks([f"context_refiner.{i}" for i in range(len(self.ms.context_refiner))], rs, rt, None)
        if share is not None:
            for b in (rs, rt):
                if b is not None:
                    share.runs[b.name] += 1
                    if b.name == "t" or (share.student and torch.is_grad_enabled()):
                        b.stream.h = share.keep(b.name, b.stream.h)

    def _final_layer(self, live, layout, adaln, shape) -> dict:
        """The final layer's output per branch, unpatchified to ``shape`` (diffusers' ``model_out``)."""
        B, C, H, W = shape
        ht_, wt_ = layout["hw"]
        results = {}
        for b in live:
            with b.grad_ctx():
                st = b.stream
                fl = b.model.all_final_layer[self.key]
                scale = fl.adaLN_modulation(adaln[b.name])
                y = self.ops.ln_mod(st.rows(st.h), scale, 1e-6, seq=st.mod_seq).view_as(st.h)
                out = fl.linear(y[layout[b.name]["out_rows"]]).view(B, 1, ht_, wt_, 1, 2, 2, C)
                results[b.name] = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, 1, H, W)[:, :, 0]
        return results

    def velocity_pair(self, x, sigma, ctx_s, ctx_t, share: ContextShare | None = None):
        """(v_student, v_teacher) in the (sigma, v) convention; v_teacher without autograd. ``share``:
        see :meth:`forward_pair`."""
        conv = SPEC.convention
        out_s, out_t = self.forward_pair(x, conv.model_time(sigma), _features(ctx_s), _features(ctx_t),
                                         student=ctx_s is not None, share=share)
        return (conv.velocity(out_s) if out_s is not None else None,
                conv.velocity(out_t) if out_t is not None else None)


def _features(ctxs):
    return [c.features for c in ctxs] if ctxs is not None else None
