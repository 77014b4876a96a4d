"""FP8 for the large GEMMs of the transformer blocks, chosen by ``fast.fp8``: ours (``native``), or
TransformerEngine / torchao (optional packages, imported only here, when asked for).

* ``native`` (LoRA runs): ``torch._scaled_mm`` called directly by the fast path's paired linears. The
  frozen base weights are quantized ONCE (float8_e4m3fn, ``rowwise``: one scale per output channel,
  or ``tensorwise``; re-quantized only if a weight tensor changes), the activations per call on each
  branch's own rows; the teacher's rows go through the same FP8 GEMMs without entering the autograd
  graph; the backward computes dX for the student rows only, in bf16 against the bf16 base weight
  (straight through the quantizer; LoRA trains no base weight, so there is no weight-gradient GEMM).
  The LoRA deltas stay bf16. Costs one byte per quantized weight on top of the bf16 base.

* ``te``: every selected ``nn.Linear`` becomes ``transformer_engine.pytorch.Linear`` (same weights),
  run under ``te.fp8_autocast`` with ``DelayedScaling`` (``fp8_recipe: delayed``) or
  ``Float8CurrentScaling`` (``current``). The no-grad teacher forward can stay in bf16
  (``fast.fp8_teacher: false``).
* ``torchao``: ``torchao.float8.convert_to_float8_training`` with the same module filter and the
  ``tensorwise`` or ``rowwise`` recipe.

Kept in bf16 (performance.md: small or sensitive layers lose): the timestep / caption / patch
embedders, every adaLN modulation linear and the final layer. Only the attention projections and
the feed-forward linears of the blocks (their base layers under LoRA: the adapters stay bf16) are
converted, and only when both dimensions are multiples of 16 (the FP8 GEMM's requirement).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

def fp8_module_filter(fqn: str, module: torch.nn.Module, spec) -> bool:
    """True for the block linears FP8 should take in a model of family ``spec`` (its ``fp8_linears``;
    see the module docstring)."""
    return spec.fp8_module(fqn, module)


def is_fp8_linear(module: torch.nn.Module) -> bool:
    """A linear whose forward runs an FP8 GEMM (torchao Float8Linear or a TransformerEngine layer)."""
    cls = type(module)
    return cls.__name__ == "Float8Linear" or cls.__module__.startswith("transformer_engine")


def _require(pkg: str, what: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        raise RuntimeError(f"fast.fp8={what}: the '{pkg}' package is not installed "
                           f"(pip install {'transformer-engine[pytorch]' if what == 'te' else 'torchao'}), "
                           "or set fast.fp8=off")


def require_fp8_gpu(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"fast.fp8={what} needs a CUDA GPU with FP8 tensor cores (H100/H200, sm_89+)")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise RuntimeError(f"fast.fp8={what}: this GPU (sm_{major}{minor}) has no FP8 tensor cores; needs sm_89+")


def apply_fp8(model: torch.nn.Module, mode: str, recipe: str, spec):
    """Converts the selected linears of ``model`` (a transformer of family ``spec``) in place. Returns a context factory
    ``ctx(enabled: bool)`` to wrap forwards in (TransformerEngine's fp8_autocast; a no-op for
    torchao, whose layers are always FP8)."""
    if mode in ("off", "native"):  # native: no module changes (the paired linears call the FP8 GEMM)
        return lambda enabled=True: contextlib.nullcontext()
    selected = [(n, m) for n, m in model.named_modules() if fp8_module_filter(n, m, spec)]
    if not selected:
        raise RuntimeError("fast.fp8: no linear of the model matches the FP8 filter (block attention/FFN linears)")
    if mode == "torchao":
        _require("torchao", "torchao")
        require_fp8_gpu("torchao")
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        names = {n for n, _ in selected}
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                   module_filter_fn=lambda m, fqn: fqn in names)
        return lambda enabled=True: contextlib.nullcontext()
    if mode == "te":
        _require("transformer_engine", "te")
        require_fp8_gpu("te")
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling

        for name, lin in selected:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = te.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            params_dtype=lin.weight.dtype, device=lin.weight.device)
            with torch.no_grad():
                new.weight.copy_(lin.weight)
                if lin.bias is not None:
                    new.bias.copy_(lin.bias)
            new.weight.requires_grad_(lin.weight.requires_grad)
            if lin.bias is not None:
                new.bias.requires_grad_(lin.bias.requires_grad)
            setattr(parent, child, new)
        rec = DelayedScaling() if recipe == "delayed" else Float8CurrentScaling()
        return lambda enabled=True: te.fp8_autocast(enabled=enabled, fp8_recipe=rec)
    raise ValueError(f"fast.fp8 must be off, te or torchao, got {mode!r}")


E4M3_MAX = 448.0


def quantize(t: torch.Tensor, rowwise: bool = True):
    """``t`` (M, K) -> (float8_e4m3fn values, fp32 scales (M, 1) rowwise or () tensorwise) with
    ``t ~= values * scales``: each row's (or the tensor's) absolute maximum maps to e4m3's 448."""
    if rowwise:  # one fused pass per row (dopsd_fast.kernels.fp8_quant; its PyTorch reference off the GPU)
        from dopsd_fast.kernels.fp8_quant import quantize_rows

        return quantize_rows(t)
    tf = t.detach().float()
    amax = tf.abs().amax()
    scale = (amax / E4M3_MAX).clamp_min(1e-12)
    return (tf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class NativeFP8:
    """``fast.fp8: native``: the frozen base weights quantized once, keyed by the weight tensor (a
    new tensor or an in-place change, seen by its version counter, re-quantizes); the FP8 GEMM
    ``x W^T``, with ``x`` quantized per call, runs in ``dopsd_fast.kernels.multi_lora`` (cuBLAS's
    ``_scaled_mm`` with fast accumulation, or our kernel). :meth:`emulate` is its arithmetic in
    PyTorch (quantize, dequantize, bf16 GEMM): what the CPU tests measure the numerics with.

    ``dgrad`` (``fast.fp8_dgrad``): the student's backward dX GEMM in FP8 too. A group of linears reading
    one input (q, k, v; w1, w3) is ONE GEMM ``dx = [dy_1 | ... | dy_G] [W_1; ...; W_G]``: the output
    gradients quantized as their concatenation (one scale per row, or one for all: tensorwise), against
    the group's weights quantized once more, transposed (:meth:`weights_t`: one scale per input channel,
    the output column of dx). The LoRA part of dx and the adapters' gradients stay in bf16."""

    def __init__(self, recipe: str = "rowwise", dgrad: bool = True):
        if recipe not in ("rowwise", "tensorwise"):
            raise ValueError(f"fast.fp8_recipe for fp8=native must be rowwise or tensorwise, got {recipe!r}")
        self.rowwise = recipe == "rowwise"
        self.dgrad = bool(dgrad)
        self._w: dict = {}
        self._wt: dict = {}

    def weight(self, w: torch.Tensor):
        hit = self._w.get(id(w))
        if hit is None or hit[0] is not w or hit[1] != w._version:
            q, s = quantize(w, self.rowwise)
            hit = (w, w._version, q, s)
            self._w[id(w)] = hit
        return hit[2], hit[3]

    def weights_t(self, ws: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``[W_1 (N_1, K), ...]`` -> ``(q (K, sum N_g) float8_e4m3fn, scale)``: ``[W_1^T | ... ]``
        quantized (rowwise: one scale per row of it, i.e. per input channel, ``(K, 1)``; tensorwise:
        ``()``), once per group and weight version; ``q.t()`` is the column-major B operand of the
        backward's dX GEMM."""
        key = tuple(id(w) for w in ws)
        versions = tuple(w._version for w in ws)
        hit = self._wt.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], ws)) or hit[1] != versions:
            wt = torch.cat([w.detach().t() for w in ws], 1) if len(ws) > 1 else ws[0].detach().t().contiguous()
            q, s = quantize(wt, self.rowwise)
            hit = (tuple(ws), versions, q, s)
            self._wt[key] = hit
        return hit[2], hit[3]

    def emulate(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize(x, self.rowwise)
        wq, ws = self.weight(w)
        return ((xq.float() * xs) @ (wq.float() * ws).t()).to(x.dtype)

    def emulate_dgrad(self, dys: list, ws: list) -> torch.Tensor:
        """The dX GEMM of :meth:`weights_t`'s form in PyTorch: the group's output gradients quantized
        as one concatenation, dequantized, times the dequantized transposed weights."""
        from dopsd_fast.kernels.fp8_quant import quantize_rows_cat

        dq, ds = quantize_rows_cat([d.reshape(-1, d.shape[-1]) for d in dys], self.rowwise)
        wq, wsc = self.weights_t(ws)
        return ((dq.float() * ds) @ (wq.float() * wsc).t()).to(dys[0].dtype)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of ``test`` against ``reference`` (what torchao
    reports for its FP8 layers; >= 20 dB is the target for the velocity)."""
    ref = reference.detach().double()
    err = test.detach().double() - ref
    return float(10 * torch.log10(ref.pow(2).mean() / err.pow(2).mean().clamp_min(1e-30)))
