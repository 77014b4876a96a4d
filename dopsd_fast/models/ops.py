"""The operations of the fast models behind one interface: fused (our Triton kernels through their
custom ops) or plain PyTorch, and the attention backends.

``FusedOps`` calls ``dopsd_fast.kernels``; on CUDA the Triton kernels run, on the CPU their PyTorch
references (or the kernels themselves under ``TRITON_INTERPRET=1``). ``TorchOps`` is the same math in
eager PyTorch (the structure of the fast path without the kernels: what the ablation compares).

Attention backends (``attention=``): ``cudnn`` (PyTorch SDPA with cuDNN's attention first, then
flash), ``triton`` (ours: varlen + dual-branch), ``sdpa`` (PyTorch ``scaled_dot_product_attention``
as PyTorch picks: flash before cuDNN), ``flash_attn`` (flash-attn 2 ``flash_attn_varlen_func``, or 3
from ``flash_attn_interface`` when installed), and ``auto``: on CUDA the first available backend of
the order MEASURED for that GPU (:data:`MEASURED_ATTENTION`), PyTorch SDPA's own choice on a GPU with
no measurement, and ``sdpa`` off CUDA; the choice and its reason are logged. An explicit choice that
is unavailable raises. The SDPA paths are varlen-native: samples of different lengths go to ONE call
as a jagged nested tensor (PyTorch's flash / efficient / cuDNN kernels take the offsets on CUDA), no
Python loop over samples and no padding. ``cudnn`` on a jagged batch asks for cuDNN alone; where
PyTorch's nested-tensor dispatch has no cuDNN path for it, the call falls back to PyTorch's own order
(flash first) once, logs it, and stays there (:data:`JAGGED_CUDNN`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("dopsd_fast")

ATTENTION_BACKENDS = ("auto", "cudnn", "triton", "sdpa", "flash_attn")


@dataclass(frozen=True)
class AttentionOrder:
    """Attention backends for one GPU, fastest first, and where that order comes from."""

    order: tuple[str, ...]
    source: str


# GPU name prefix (torch.cuda.get_device_name) -> the order `auto` follows (the first available backend).
# A GPU with no entry gets PyTorch SDPA's own choice. Measured at the Z-Image shapes (student 4608 /
# teacher 5120 tokens, 30 heads x 128, bf16), forward + student backward, by benchmarks/gpu_check.py m1.
MEASURED_ATTENTION: dict[str, AttentionOrder] = {
    "NVIDIA H200": AttentionOrder(("cudnn", "sdpa"), "measured on an H200, benchmarks/results/2026-12-04-h200 (m1): "
                                  "fwd+bwd SDPA cuDNN 2.74 ms, SDPA flash 5.16 ms, ours 7.21 ms"),
    "NVIDIA H100": AttentionOrder(("cudnn", "sdpa"), "the H200's order (same sm_90 cores), NOT measured on an H100"),
}
# cuDNN first, then PyTorch's usual order: SDPA's dispatcher takes the first backend that supports the call.
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
# Whether cuDNN took a jagged (ragged-batch) call in this process: None until one was tried.
JAGGED_CUDNN: bool | None = None


def _cudnn_available() -> bool:
    return torch.cuda.is_available() and torch.backends.cudnn.is_available() and \
        torch.backends.cuda.cudnn_sdp_enabled()


def _available(backend: str) -> bool:
    if backend == "flash_attn":
        return _has("flash_attn_interface") or _has("flash_attn")
    if backend == "triton":
        return _has("triton")
    if backend == "cudnn":
        return _cudnn_available()
    return backend == "sdpa"


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def resolve_attention(name: str, device: torch.device, gpu_name: str | None = None) -> str:
    """The attention backend ``name`` resolves to on ``device``. ``gpu_name`` plans for a GPU that is not
    here (the dry run): its measured order is used as is, with cuDNN assumed present, and no CUDA is touched."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"fast.attention must be one of {ATTENTION_BACKENDS}, got {name!r}")
    planned = gpu_name is not None
    if name == "auto":
        choice, why = "sdpa", "not a CUDA device"
        if device.type == "cuda" or planned:
            gpu = gpu_name if planned else torch.cuda.get_device_name(device)
            why = f"{gpu}: no measurement for this GPU, PyTorch SDPA's own choice"
            for prefix, measured in MEASURED_ATTENTION.items():
                if gpu.startswith(prefix):
                    choice = next((b for b in measured.order
                                   if (planned and b in ("cudnn", "sdpa")) or _available(b)), "sdpa")
                    why = f"{gpu}: {' > '.join(measured.order)}, {measured.source}"
                    if choice != measured.order[0]:
                        why += f"; {measured.order[0]} is not available here"
                    break
        log.info("attention backend: auto -> %s (%s)", choice, why)
        return choice
    if planned:
        return name
    if name == "cudnn" and (device.type != "cuda" or not _cudnn_available()):
        raise RuntimeError("fast.attention=cudnn needs a CUDA device with cuDNN's SDPA enabled "
                           "(torch.backends.cudnn.is_available()); use sdpa, triton or auto")
    if name == "triton" and not _has("triton"):
        raise RuntimeError("fast.attention=triton: the triton package is not installed")
    if name == "flash_attn":
        if device.type != "cuda":
            raise RuntimeError("fast.attention=flash_attn needs a CUDA device")
        if not (_has("flash_attn_interface") or _has("flash_attn")):
            raise RuntimeError("fast.attention=flash_attn: neither flash-attn 3 (flash_attn_interface) nor flash-attn 2 "
                               "(flash_attn) is installed; pip install flash-attn, or use triton / sdpa")
    return name


def _saved_tensor_hooks_active() -> bool:
    """Saved-tensor hooks are installed (non-reentrant gradient checkpointing, CPU offload): they cannot
    pack the nested tensors the jagged SDPA saves for its backward."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _dense_order(backend: str):
    """The SDPA backend order of a dense call: cuDNN first for ``cudnn``, PyTorch's own otherwise."""
    return sdpa_kernel(_CUDNN_FIRST, set_priority=True) if backend == "cudnn" else contextlib.nullcontext()


def _jagged_sdpa(q, k, v, backend: str):
    """SDPA on jagged nested batches. PyTorch's nested dispatch tries flash, efficient, math, cuDNN in a
    fixed order (it ignores priorities), so ``cudnn`` enables cuDNN alone; where that finds no kernel
    (PyTorch raises "No viable backend"), PyTorch's order takes over, once per process, logged."""
    global JAGGED_CUDNN
    if backend == "cudnn" and JAGGED_CUDNN is not False:
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as exc:  # the same math on another backend: a cuDNN refusal or failure costs speed only
            JAGGED_CUDNN = False
            say = log.info if "No viable backend" in str(exc) else log.warning
            say("attention cudnn: cuDNN does not take this ragged batch (%s: %s); PyTorch SDPA's own choice "
                "(flash first) for ragged batches from now on", type(exc).__name__, str(exc).splitlines()[0][:300])
        else:
            if JAGGED_CUDNN is None:
                log.info("attention cudnn: ragged batches run on cuDNN (one call on a jagged batch)")
            JAGGED_CUDNN = True
            return o
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_varlen(q, k, v, cu: list[int], cu_t: torch.Tensor | None = None, backend: str = "sdpa"):
    """SDPA over packed sequences (q, k, v: (T, H, D), same offsets ``cu``; ``cu_t`` the same offsets
    as a tensor on q's device): one dense batched call when all lengths are equal, else ONE call on a
    jagged nested batch (varlen kernels on CUDA). One call per sample instead where a sample has length
    0 (allowed by the offsets), and inside gradient checkpointing (its saved-tensor hooks cannot pack
    nested tensors: PyTorch raises "NestedTensorImpl doesn't support sizes"). ``backend``: ``sdpa``
    (PyTorch's order) or ``cudnn`` (cuDNN first)."""
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if len(set(lens)) == 1 and lens[0] > 0:
        B, S = len(lens), lens[0]
        qb, kb, vb = (t.view(B, S, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        with _dense_order(backend):
            return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
    if lens and min(lens) > 0 and not (torch.is_grad_enabled() and _saved_tensor_hooks_active()):
        off = cu_t if cu_t is not None else torch.tensor(cu, device=q.device)
        off = off.to(device=q.device, dtype=torch.int64)

        def jag(t):
            return torch.nested.nested_tensor_from_jagged(t, offsets=off, min_seqlen=min(lens),
                                                          max_seqlen=max(lens)).transpose(1, 2)

        with warnings.catch_warnings():  # the CPU fallback calls a prototype constructor that warns
            warnings.simplefilter("ignore")
            o = _jagged_sdpa(jag(q), jag(k), jag(v), backend)
        return o.transpose(1, 2).values()
    outs = []
    with _dense_order(backend):
        for a, b in zip(cu, cu[1:]):
            if b > a:
                qb, kb, vb = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def varlen_attention(backend: str, q, k, v, cu: torch.Tensor, cu_list: list[int]):
    """Self-attention over packed sequences; q, k, v: (T, H, D); cu: int32 (B + 1) offsets."""
    if backend == "triton":
        from dopsd_fast.kernels.attention import flash_attn_varlen

        m = max(b - a for a, b in zip(cu_list, cu_list[1:]))
        return flash_attn_varlen(q, k, v, cu, cu, max_seqlen_q=m, max_seqlen_k=m)[0]
    if backend == "flash_attn":
        max_len = max(b - a for a, b in zip(cu_list, cu_list[1:]))
        if _has("flash_attn_interface"):
            from flash_attn_interface import flash_attn_varlen_func  # flash-attn 3
        else:
            from flash_attn import flash_attn_varlen_func
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)
        return out[0] if isinstance(out, tuple) else out
    return _sdpa_varlen(q, k, v, cu_list, cu, backend=backend)


class _EmulatedFP8Group(torch.autograd.Function):
    """The FP8 forward of a group's base GEMMs (each ``x W_g^T``) with the FP8 dX GEMM of the group as
    its backward (``dopsd_fast.fp8.NativeFP8.emulate_dgrad``), in PyTorch: the CPU reference of the fused
    op's ``fast.fp8_dgrad``. The base weights are frozen (no weight gradient)."""

    @staticmethod
    def forward(ctx, fp8, weights, x2):
        ctx.fp8, ctx.weights = fp8, weights
        ctx.set_materialize_grads(False)
        return tuple(fp8.emulate(x2, w) for w in weights)

    @staticmethod
    def backward(ctx, *dys):
        live = [g for g, d in enumerate(dys) if d is not None]
        if not live:
            return None, None, None
        return None, None, ctx.fp8.emulate_dgrad([dys[g] for g in live], [ctx.weights[g] for g in live])


class TorchOps:
    """Eager PyTorch math of every fused operation."""

    fused = False

    def __init__(self, attention: str = "sdpa", gemm: str = "cublas"):
        self.attention = attention
        # the paired LoRA linear's base GEMM: cublas | triton (ours, the delta in its tile) | auto (per shape, the
        # faster at this GPU's measured rates: multi_lora.choose_paired_impl)
        self.gemm = gemm

    # x: (B, S, D); scale/shift/gate: (B, D). With ``seq``: x (1, T, D) packs samples of any lengths,
    # seq (T,) is the sample of each row, the modulation is per sample (n, D).
    @staticmethod
    def _bcast(m, seq):
        return m.float()[:, None] if seq is None else m.float()[seq][None]

    def rms_mod(self, x, w, scale, eps, seq=None):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        if scale is not None:
            y = y * (1 + self._bcast(scale, seq))
        return y.to(x.dtype)

    def ln_mod(self, x, scale, eps, shift=None, seq=None):
        y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + self._bcast(scale, seq))
        if shift is not None:
            y = y + self._bcast(shift, seq)
        return y.to(x.dtype)

    def gated(self, x, gate, y, tanh: bool = True, seq=None):
        """x + tanh(gate) * y (Z-Image), or x + gate * y with ``tanh=False`` (FLUX.2)."""
        g = self._bcast(gate, seq)
        g = torch.tanh(g) if tanh else g
        return (x.float() + g * y.float()).to(x.dtype)

    def norm_gated(self, x, gate, y, w, eps, tanh: bool = True, seq=None):
        """Z-Image's residual ``x + tanh(gate) * RMSNorm_w(y)``: the post-norm, then the gated residual."""
        return self.gated(x, gate, self.rms_mod(y, w, None, eps), tanh, seq)

    def residual_norm(self, x, gate, y, scale, eps, post=None, weight=None, shift=None, tanh: bool = True,
                      layer: bool = False, seq=None):
        """``(out, xn)``: a residual (``post = (w, eps)``: Z-Image's post-norm ``x + tanh(gate) *
        RMSNorm_w(y)``; None: ``x + gate * y``) and the next sublayer's input, ``RMSNorm_weight(out) * (1 +
        scale)`` or with ``layer`` ``LayerNorm(out) * (1 + scale) + shift``."""
        out = self.norm_gated(x, gate, y, *post, tanh, seq) if post is not None else self.gated(x, gate, y, tanh, seq)
        xn = self.ln_mod(out, scale, eps, shift, seq) if layer else self.rms_mod(out, weight, scale, eps, seq)
        return out, xn

    def swiglu(self, a, b):
        return (F.silu(a.float()) * b.float()).to(a.dtype)

    def rope_qk(self, q, k, wq, wk, cos, sin, eps):
        from dopsd_fast.kernels.rope_qk_norm import rope_qk_norm_ref

        return rope_qk_norm_ref(q, k, wq, wk, cos, sin, eps)

    def linear(self, x, weight, bias, lora):
        y = F.linear(x, weight, bias)
        if lora is not None:
            a, b, s = lora
            y = y + s * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return y

    def paired_linear(self, x_s, x_t, weight, bias, lora_s, lora_t):
        y_s = self.linear(x_s, weight, bias, lora_s)
        with torch.no_grad():
            y_t = self.linear(x_t, weight, bias, lora_t)
        return y_s, y_t

    def paired_linears(self, x_s, x_t, weights, biases, loras_s, loras_t, fp8=None):
        """A group of linears reading the same input (q, k, v; w1, w3): ``[(y_s, y_t)]`` per linear.
        ``fp8`` (a :class:`dopsd_fast.fp8.NativeFP8`): the base GEMMs' FP8 arithmetic emulated (quantize,
        dequantize), as the fused op does it: with its ``dgrad`` the student's dx of the group's base
        GEMMs is the FP8 dX GEMM's arithmetic (``NativeFP8.emulate_dgrad``), without it the gradient
        goes straight through to the bf16 weight."""
        if fp8 is None:
            return [self.paired_linear(x_s, x_t, w, b, ls, lt)
                    for w, b, ls, lt in zip(weights, biases, loras_s, loras_t)]
        x2 = x_s.reshape(-1, x_s.shape[-1])
        if fp8.dgrad and torch.is_grad_enabled() and x2.requires_grad:
            bases_s = _EmulatedFP8Group.apply(fp8, list(weights), x2)
        else:
            bases_s = []
            for w in weights:
                exact = F.linear(x2, w)
                bases_s.append(fp8.emulate(x2, w) + (exact - exact.detach()))  # its gradient through W
        out = []
        for w, b, ls, lt, base in zip(weights, biases, loras_s, loras_t, bases_s):
            y_s = self._fp8_linear(x_s, w, b, ls, fp8, base)
            with torch.no_grad():
                y_t = self._fp8_linear(x_t, w, b, lt, fp8)
            out.append((y_s, y_t))
        return out

    @staticmethod
    def _fp8_linear(x, w, b, lora, fp8, base=None):
        x2 = x.reshape(-1, x.shape[-1])
        y = fp8.emulate(x2, w) if base is None else base
        if b is not None:
            y = y + b
        if lora is not None:
            a, bb, s = lora
            y = y + s * F.linear(F.linear(x2, a.to(x.dtype)), bb.to(x.dtype))
        return y.reshape(*x.shape[:-1], w.shape[0])

    def attention_one(self, q, k, v, cu, cu_list):
        return varlen_attention(self.attention, q, k, v, cu, cu_list)

    def attention_pair(self, s, t):
        """s, t: (q, k, v, cu, cu_list) of the student (differentiable) and teacher (constant) streams."""
        o_s = self.attention_one(*s)
        with torch.no_grad():
            o_t = self.attention_one(*t)
        return o_s, o_t


class FusedOps(TorchOps):
    """Our kernels (``dopsd_fast.kernels``) for the same operations."""

    fused = True
    # a residual and the next sublayer's norm in one kernel (False: the two kernels and autograd's add of
    # out's gradients, the form before the fusion: how benchmarks/perf_model.py models a GPU run of it)
    fuse_residual_norm = True

    def __init__(self, attention: str = "triton", gemm: str = "triton"):
        super().__init__(attention, gemm)
        from dopsd_fast.kernels import multi_lora, norm_modulation, rope_qk_norm, swiglu

        self._nm, self._rope, self._sw, self._ml = norm_modulation, rope_qk_norm, swiglu, multi_lora

    def rms_mod(self, x, w, scale, eps, seq=None):
        if scale is None:
            scale, seq = x.new_zeros(x.shape[0], x.shape[-1]), None
        return self._nm.rms_norm_modulate(x, w.to(x.dtype), scale.to(x.dtype), eps, seq=seq)

    def ln_mod(self, x, scale, eps, shift=None, seq=None):
        shift = torch.zeros_like(scale, dtype=x.dtype) if shift is None else shift.to(x.dtype)
        return self._nm.layer_norm_modulate(x, scale.to(x.dtype), shift, eps, seq=seq)

    def gated(self, x, gate, y, tanh: bool = True, seq=None):
        return self._nm.gated_residual(x, gate.to(x.dtype), y, use_tanh=tanh, seq=seq)

    def norm_gated(self, x, gate, y, w, eps, tanh: bool = True, seq=None):
        """One pass: the normalized y is never written."""
        return self._nm.norm_gated_residual(x, gate.to(x.dtype), y, w.to(x.dtype), eps, use_tanh=tanh, seq=seq)

    def residual_norm(self, x, gate, y, scale, eps, post=None, weight=None, shift=None, tanh: bool = True,
                      layer: bool = False, seq=None):
        """One pass (out not read back, its two gradients summed in the backward's kernel) where the
        gate, norm weights and modulation are frozen (LoRA); where any trains, the unfused kernels."""
        params = [gate, scale, shift, weight] + ([post[0]] if post is not None else [])
        trains = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
        if trains and not getattr(self, "_told_unfused", False):
            self._told_unfused = True
            log.info("residual + norm: the gate, norm weights or modulation train; the unfused kernels (the "
                     "fused backward computes dx and dy only)")
        if trains or not self.fuse_residual_norm:
            return super().residual_norm(x, gate, y, scale, eps, post, weight, shift, tanh, layer, seq)
        dt = x.dtype
        cast = lambda t: t.to(dt) if t is not None else None  # noqa: E731
        return self._nm.residual_norm(x, cast(gate), y, cast(scale), post_weight=cast(post[0]) if post else None,
                                      weight=cast(weight), shift=cast(shift), eps_post=post[1] if post else 1e-5,
                                      eps=eps, use_tanh=tanh, layer=layer, seq=seq)

    def swiglu(self, a, b):
        return self._sw.swiglu(a, b)  # halves of one projection read in place (row strides)

    def rope_qk(self, q, k, wq, wk, cos, sin, eps):
        return self._rope.rope_qk_norm(q, k, wq.to(q.dtype), wk.to(k.dtype), cos, sin, eps)

    def paired_linear(self, x_s, x_t, weight, bias, lora_s, lora_t):
        return self.paired_linears(x_s, x_t, [weight], [bias], [lora_s], [lora_t])[0]

    def paired_linears(self, x_s, x_t, weights, biases, loras_s, loras_t, fp8=None):
        """One op for the group: per-branch GEMMs on each branch's own rows (no concatenation), the
        student's dx of the group accumulated in one buffer; with ``fp8`` the base GEMMs in FP8."""
        if any(lo is None for lo in (*loras_s, *loras_t)):
            return super().paired_linears(x_s, x_t, weights, biases, loras_s, loras_t, fp8)
        dt = x_s.dtype

        def cast(lo):
            return lo[0].to(dt), lo[1].to(dt), lo[2]

        # the base weight and bias too: an fp32 model under bf16 autocast (a drop-in caller's accelerate
        # loop) has bf16 activations, as autocast's own linear casts its weight per call
        if fp8 is not None and any(w.dtype != dt for w in weights):  # its cache keeps each quantized weight
            raise ValueError(f"fast.fp8: the model's weights are {weights[0].dtype} and its activations {dt} (an "
                             "fp32 model under autocast): load the model in the activations' dtype")
        weights = [w.to(dt) for w in weights]
        biases = [b if b is None else b.to(dt) for b in biases]
        return self._ml.paired_lora_linears(x_s, x_t, weights, biases, [cast(lo) for lo in loras_s],
                                            [cast(lo) for lo in loras_t], impl=_PAIRED_IMPL[self.gemm], fp8=fp8)

    def attention_pair(self, s, t):
        if self.attention != "triton":
            return super().attention_pair(s, t)
        from dopsd_fast.kernels.attention import dual_branch_attention

        (q_s, k_s, v_s, cu_s, l_s), (q_t, k_t, v_t, cu_t, l_t) = s, t
        if len(l_s) != len(l_t):
            raise ValueError("attention_pair: student and teacher streams hold different numbers of samples")
        # no shared keys: a fresh empty tensor (a slice of k_s would make autograd zero-fill and copy a
        # k_s-sized gradient for it)
        empty = k_s.new_empty((0,) + tuple(k_s.shape[1:]))
        zeros = torch.zeros_like(cu_s)
        m_s = max(b - a for a, b in zip(l_s, l_s[1:]))
        m_t = max(b - a for a, b in zip(l_t, l_t[1:]))
        o_s, _, o_t, _ = dual_branch_attention(q_s, q_t, (empty, empty, zeros), (k_s, v_s, cu_s), (k_t, v_t, cu_t),
                                               cu_s, cu_t, max_seqlens=(max(m_s, m_t), 0, m_s, m_t))
        return o_s, o_t


def compile_ops(ops: TorchOps, backend: str = "inductor") -> TorchOps:
    """torch.compile the element-wise operations (norm + modulation, gated residual, SwiGLU, RoPE +
    QK norm): what Inductor makes of the eager math, as the alternative to our kernels."""
    for name in ("rms_mod", "ln_mod", "gated", "norm_gated", "residual_norm", "swiglu", "rope_qk"):
        setattr(ops, name, torch.compile(getattr(ops, name), backend=backend, dynamic=True))
    ops.compiled = backend
    return ops


GEMMS = ("auto", "cublas", "triton")
_PAIRED_IMPL = {"cublas": "torch", "triton": "triton", "auto": "auto"}  # fast.gemm -> multi_lora's impl


def build_ops(kernels: str, attention: str, device: torch.device, compile_backend: str | None = None,
              gemm: str = "auto"):
    """``kernels``: ``auto`` (fused on CUDA, eager elsewhere), ``on``, ``off``. With
    ``compile_backend`` the eager ops are compiled instead of using our kernels. ``gemm``: the paired
    LoRA linear's base GEMM: ``cublas`` (the LoRA delta first, the base ``addmm_`` accumulating into it)
    or ``triton`` (ours, one kernel with the delta in its tile); ``auto``: per shape, the faster at the
    GPU's measured rates (``multi_lora.PAIRED_RATES``; cuBLAS on a GPU with none)."""
    if gemm not in GEMMS:
        raise ValueError(f"fast.gemm must be one of {GEMMS}, got {gemm!r}")
    if kernels not in ("auto", "on", "off"):
        raise ValueError(f"fast.kernels must be auto, on or off, got {kernels!r}")
    if compile_backend:
        if kernels == "on":
            raise ValueError("fast.compile replaces the fused kernels: use fast.kernels=auto or off")
        attn = resolve_attention(attention, device)
        return compile_ops(TorchOps(attention="sdpa" if attn == "triton" and device.type != "cuda" else attn),
                           compile_backend)
    use = kernels == "on" or (kernels == "auto" and device.type == "cuda")
    attn = resolve_attention(attention, device)
    if use:
        return FusedOps(attention=attn, gemm=gemm)
    if attn == "triton" and kernels == "off":
        attn = "sdpa"
    return TorchOps(attention=attn)
