"""Norm + modulation and gated residuals: Triton (interpreted) vs references, forward + every grad."""

import pytest
import torch

from tests.conftest import assert_close, low_precision_rule
from tests.kernels.conftest import GPU

# (2, 65, 40): 130 rows, 3 programs of 64 rows under the interpreter (the last partial, a sample
# boundary inside the first)
SHAPES = [(2, 7, 40), (3, 5, 123), (1, 1, 64), (2, 65, 40)]


def test_rows_per_program(monkeypatch):
    """A program per row on a GPU; up to 64 rows per program under the interpreter."""
    from dopsd_fast.kernels._common import rows_per_program

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert [rows_per_program(m) for m in (1, 5, 64, 130)] == [1, 8, 64, 64]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert rows_per_program(130) == 1


def _run(fn, inputs, grad_out):
    ins = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*ins)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in ins]


def _compare(fast, ref, inputs, dtype, atol32=1e-5):
    torch.manual_seed(3)
    g = torch.randn(inputs[0].shape)
    low = [t.to(dtype) for t in inputs]
    out_k, grads_k = _run(fast, low, g.to(dtype))
    out_r, grads_r = _run(ref, [t.float() for t in low], g.to(dtype).float())
    if dtype == torch.float32:
        assert_close(out_k, out_r, atol32, 1e-5, "out", scaled=True)
        for i, (a, b) in enumerate(zip(grads_k, grads_r)):
            assert_close(a, b, atol32, 1e-4, f"grad[{i}]", scaled=True)
    else:
        out_t, grads_t = _run(ref, low, g.to(dtype))  # PyTorch's own low-precision path
        low_precision_rule(out_k, out_t, out_r, 1e-2, "out")
        for i, (a, t, b) in enumerate(zip(grads_k, grads_t, grads_r)):
            low_precision_rule(a, t, b, 1e-2 * max(1.0, b.abs().max().item()), f"grad[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_modulate(dtype, shape):
    from dopsd_fast.kernels.norm_modulation import rms_norm_modulate, rms_norm_modulate_ref

    B, S, D = shape
    inputs = [torch.randn(B, S, D) * 2, 1 + 0.1 * torch.randn(D), 0.3 * torch.randn(B, D)]
    _compare(rms_norm_modulate, rms_norm_modulate_ref, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_modulate(dtype, shape):
    from dopsd_fast.kernels.norm_modulation import layer_norm_modulate, layer_norm_modulate_ref

    B, S, D = shape
    inputs = [torch.randn(B, S, D) * 2 + 0.5, 0.3 * torch.randn(B, D), 0.3 * torch.randn(B, D)]
    _compare(layer_norm_modulate, layer_norm_modulate_ref, inputs, dtype)


@pytest.mark.parametrize("use_tanh", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual(use_tanh, dtype, shape):
    from dopsd_fast.kernels.norm_modulation import gated_residual, gated_residual_ref

    B, S, D = shape
    inputs = [torch.randn(B, S, D), 2 * torch.randn(B, D), torch.randn(B, S, D)]
    _compare(lambda x, g, y: gated_residual(x, g, y, use_tanh), lambda x, g, y: gated_residual_ref(x, g, y, use_tanh),
             inputs, dtype)


def test_matches_zimage_block_norm():
    """The reference is Z-Image's own: RMSNorm module output x (1 + scale)."""
    from diffusers.models.normalization import RMSNorm

    from dopsd_fast.kernels.norm_modulation import rms_norm_modulate

    norm = RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(40))
    x, s = torch.randn(2, 9, 40), torch.randn(2, 40) * 0.2
    assert_close(rms_norm_modulate(x, norm.weight.detach(), s), norm(x) * (1 + s[:, None]), 1e-5, 1e-5, scaled=True)


def test_opcheck_and_errors():
    from dopsd_fast.kernels.norm_modulation import (gated_residual, gated_residual_backward_op, gated_residual_op,
                                                     norm_modulate_backward_op, norm_modulate_op)

    x, w, s, t = torch.randn(2, 3, 24), torch.randn(24), torch.randn(2, 24), torch.randn(2, 24)
    for layer in (False, True):
        torch.library.opcheck(norm_modulate_op, (x.requires_grad_(), w, s.requires_grad_(), t, 1e-5, layer))
        y, rstd, mean = norm_modulate_op(x.detach(), w, s.detach(), t, 1e-5, layer)
        for params in (True, False):
            torch.library.opcheck(norm_modulate_backward_op, (torch.randn_like(x), x.detach(), w, s.detach(), rstd, mean,
                                                              layer, params))
    torch.library.opcheck(gated_residual_op, (torch.randn(2, 3, 24), torch.randn(2, 24), torch.randn(2, 3, 24), True))
    for need_gate in (True, False):
        torch.library.opcheck(gated_residual_backward_op, (torch.randn(2, 3, 24), torch.randn(2, 24), torch.randn(2, 3, 24),
                                                           False, need_gate))
    with pytest.raises(ValueError):
        gated_residual(torch.randn(2, 3, 24), torch.randn(3, 24), torch.randn(2, 3, 24))


@pytest.mark.parametrize("kind", ["rms", "layer", "gated"])
def test_frozen_modulation_computes_dx_only(kind):
    """Under LoRA the norm weight, scale, shift and gate are frozen: the backward computes dx (and the
    gated residual's dy) alone, writes no fp32 partials, and dx is the reference's (interpreted Triton)."""
    from dopsd_fast.kernels._common import COSTS
    from dopsd_fast.kernels.norm_modulation import (gated_residual, gated_residual_backward_op, gated_residual_ref,
                                                     layer_norm_modulate, layer_norm_modulate_ref,
                                                     norm_modulate_backward_op, norm_modulate_op, rms_norm_modulate,
                                                     rms_norm_modulate_ref)

    B, S, D = 2, 5, 40
    x, g = torch.randn(B, S, D), torch.randn(B, S, D)
    if kind == "gated":
        gate, y = torch.randn(B, D), torch.randn(B, S, D)
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        gated_residual(xs, gate, ys).backward(g)
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        gated_residual_ref(xr, gate, yr).backward(g)
        assert_close(ys.grad, yr.grad, 1e-5, 1e-5, "dy", scaled=True)
        dy, dg = gated_residual_backward_op(g, gate, y, True, False)
        assert dg.numel() == 0
        full = COSTS["dopsd_fast::gated_residual_backward"](g, gate, y, True, True)["bytes"]
        assert COSTS["dopsd_fast::gated_residual_backward"](g, gate, y, True, False)["bytes"] < full / 2
        return
    w, s, t = 1 + 0.1 * torch.randn(D), 0.3 * torch.randn(B, D), 0.3 * torch.randn(B, D)
    fn, ref = ((lambda x_: rms_norm_modulate(x_, w, s), lambda x_: rms_norm_modulate_ref(x_, w, s)) if kind == "rms"
               else (lambda x_: layer_norm_modulate(x_, s, t), lambda x_: layer_norm_modulate_ref(x_, s, t)))
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fn(xs).backward(g)
    ref(xr).backward(g)
    assert_close(xs.grad, xr.grad, 1e-5, 1e-4, "dx", scaled=True)
    layer = kind == "layer"
    _, rstd, mean = norm_modulate_op(x, w if not layer else torch.ones(D), s, t if layer else torch.zeros_like(s),
                                     1e-5, layer)
    out = norm_modulate_backward_op(g, x, w, s, rstd, mean, layer, False)
    assert len(out) == 1 and out[0].shape == x.shape
    cost = COSTS["dopsd_fast::norm_modulate_backward"]
    dx_only = 3 * x.numel() * x.element_size() + 2 * rstd.numel() * 4  # read dy and x, write dx; the row stats
    assert cost(g, x, w, s, rstd, mean, layer, False)["bytes"] == dx_only
    assert cost(g, x, w, s, rstd, mean, layer, True)["bytes"] >= dx_only + 2 * x.numel() * 4  # fp32 partials


@pytest.mark.parametrize("lens", [[5, 2, 9], [70, 1, 59]])  # the second: 3 programs of 64 rows when interpreted
@pytest.mark.parametrize("kind", ["rms", "layer", "gated"])
@pytest.mark.parametrize("train", [True, False])
def test_packed_samples_read_modulation_by_seq(kind, train, lens):
    """Samples of different lengths packed as (1, T, D) with per-sample modulation read through the
    row -> sample index (no per-row copy) == the same rows run with the modulation expanded per row;
    the modulation gradients come back per sample."""
    from dopsd_fast.kernels.norm_modulation import gated_residual, layer_norm_modulate, rms_norm_modulate

    D = 40
    T, n = sum(lens), len(lens)
    seq = torch.repeat_interleave(torch.arange(n), torch.tensor(lens))
    x, y, g = torch.randn(1, T, D), torch.randn(1, T, D), torch.randn(1, T, D)
    w = 1 + 0.1 * torch.randn(D)
    mods = [0.3 * torch.randn(n, D) for _ in range(2)]

    def run(packed):
        xs = x.clone().requires_grad_()
        ys = y.clone().requires_grad_()
        ms = [m.clone().requires_grad_(train) for m in mods]
        if packed:
            args, kw, x_in, y_in = ms, {"seq": seq}, xs, ys
        else:  # one row per "sample", the modulation expanded per row
            args, kw, x_in, y_in = [m[seq] for m in ms], {}, xs.view(T, 1, D), ys.view(T, 1, D)
        if kind == "rms":
            out = rms_norm_modulate(x_in, w, args[0], **kw)
        elif kind == "layer":
            out = layer_norm_modulate(x_in, args[0], args[1], **kw)
        else:
            out = gated_residual(x_in, args[0], y_in, **kw)
        out.reshape(1, T, D).backward(g)
        grads = [xs.grad] + ([ys.grad] if kind == "gated" else []) + ([m.grad for m in ms[:1 + (kind == "layer")]]
                                                                      if train else [])
        return [out.detach().reshape(1, T, D)] + grads

    for i, (a, b) in enumerate(zip(run(True), run(False))):
        assert a is not None and b is not None, i
        assert_close(a, b, 1e-5, 1e-4, f"{kind} output/grad {i}", scaled=True)
    with pytest.raises(ValueError, match="seq"):
        rms_norm_modulate(x.view(T, 1, D), w, mods[0], seq=seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_norm_gated_residual_equals_norm_then_gated(dtype, packed, train):
    """``x + tanh(g) * RMSNorm_w(y)`` in one pass == the post-norm followed by the gated residual
    (fp32 references), output and every gradient; frozen weight and gate: dx, dy only."""
    from dopsd_fast.kernels.norm_modulation import (norm_gated_residual, norm_gated_residual_backward_op,
                                                     norm_gated_residual_op)

    D = 48
    if packed:
        lens = [6, 3, 8, 60, 1, 65]  # 143 rows: 3 programs of 64 when interpreted
        seq = torch.repeat_interleave(torch.arange(6), torch.tensor(lens))
        shape, n = (1, sum(lens), D), 6
    else:
        seq, shape, n = None, (2, 70, D), 2
    x, y, g = torch.randn(shape), 3 * torch.randn(shape), torch.randn(shape)
    w, gate = 1 + 0.2 * torch.randn(D), 0.7 * torch.randn(n, D)

    def run(fused, dt):
        ins = [t.to(dt).detach().clone().requires_grad_(req) for t, req in
               ((x, True), (gate, train), (y, True), (w, train))]
        xs, gs, ys, ws = ins
        if fused:
            out = norm_gated_residual(xs, gs, ys, ws, 1e-5, seq=seq)
        else:
            yf = ys.float()
            yn = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + 1e-5) * ws.float()
            gg = gs.float()[:, None, :] if seq is None else gs.float()[seq][None]
            out = (xs.float() + torch.tanh(gg) * yn).to(dt)
        out.backward(g.to(dt))
        return [out.detach()] + [t.grad for t in ins if t.requires_grad]

    fast, ref = run(True, dtype), run(False, torch.float32)
    assert len(fast) == (5 if train else 3)
    for i, (a, b) in enumerate(zip(fast, ref)):
        if dtype == torch.float32:
            assert_close(a, b, 1e-5, 1e-4, f"out/grad {i}", scaled=True)
        else:
            low = run(False, dtype)[i]
            low_precision_rule(a, low, b, 2e-2 * max(1.0, b.abs().max().item()), f"out/grad {i}")
    for params in (True, False):
        out, rstd = norm_gated_residual_op(x, gate, y, w, 1e-5, True, seq)
        torch.library.opcheck(norm_gated_residual_backward_op, (g, gate, y, w, rstd, 1e-5, True, params, seq))
    torch.library.opcheck(norm_gated_residual_op, (x.requires_grad_(), gate, y.requires_grad_(), w, 1e-5, True, seq))


@pytest.mark.parametrize("form", ["zimage: post-norm, tanh gate, RMSNorm", "flux2: gate, LayerNorm + shift"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_residual_norm_equals_residual_then_norm(form, dtype, packed, path, monkeypatch):
    """A residual and the next sublayer's norm in one pass == the residual, then the norm + modulation
    (fp32 references in PyTorch), both outputs; the backward (out's gradient from below and the one
    through the norm summed in the kernel) == autograd through the two, dx and dy. ``reference``: the
    op's own PyTorch path (where no Triton kernel runs)."""
    if path == "reference":
        if GPU:
            pytest.skip("the reference path is the CPU's: a GPU run takes the kernel")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    from dopsd_fast.kernels.norm_modulation import residual_norm, residual_norm_backward_op, residual_norm_op

    D, zimage = 48, form.startswith("zimage")
    if packed:
        lens = [6, 3, 8, 60, 1, 65]  # 143 rows: 3 programs of 64 when interpreted, samples straddling them
        seq = torch.repeat_interleave(torch.arange(6), torch.tensor(lens))
        shape, n = (1, sum(lens), D), 6
    else:
        seq, shape, n = None, (2, 70, D), 2
    x, y = torch.randn(shape), 3 * torch.randn(shape)
    gate, scale, shift = 0.7 * torch.randn(n, D), 0.3 * torch.randn(n, D), 0.5 * torch.randn(n, D)
    w_post, w = 1 + 0.2 * torch.randn(D), 1 + 0.2 * torch.randn(D)
    d_out, d_xn = torch.randn(shape), torch.randn(shape)
    kw = dict(post_weight=w_post, weight=w, use_tanh=True) if zimage else dict(shift=shift, use_tanh=False, layer=True)

    def rows(m, dt):
        return m.to(dt).float()[:, None, :] if seq is None else m.to(dt).float()[seq][None]

    def reference(xs, ys, dt):
        yf = ys.float()
        if zimage:
            yf = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + 1e-5) * w_post.to(dt).float()
        g = rows(gate, dt)
        out = (xs.float() + (torch.tanh(g) if zimage else g) * yf).to(dt)
        of = out.float()
        if zimage:
            xn = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + 1e-5) * w.to(dt).float() * (1 + rows(scale, dt))
        else:
            xn = torch.nn.functional.layer_norm(of, (D,), eps=1e-5) * (1 + rows(scale, dt)) + rows(shift, dt)
        return out, xn.to(dt)

    def run(fused, dt, ref_dt=None):
        xs, ys = (t.to(dt).detach().clone().requires_grad_() for t in (x, y))
        if fused:
            cast = {k: (v.to(dt) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            out, xn = residual_norm(xs, gate.to(dt), ys, scale.to(dt), seq=seq, **cast)
        else:
            out, xn = reference(xs, ys, dt)
        torch.autograd.backward([out, xn], [d_out.to(dt), d_xn.to(dt)])
        return [out.detach(), xn.detach(), xs.grad, ys.grad]

    fast, ref = run(True, dtype), run(False, torch.float32)
    names = ("out", "xn", "dx", "dy")
    for i, (a, b) in enumerate(zip(fast, ref)):
        if dtype == torch.float32:
            assert_close(a, b, 1e-5, 1e-4, f"{form}: {names[i]}", scaled=True)
        else:
            atol = 2e-2 * max(1.0, b.abs().max().item())
            low_precision_rule(a, run(False, dtype)[i], b, atol, f"{form}: {names[i]}")
    # the op's schema, fake and autograd registrations
    post, sh, wt = (w_post, None, w) if zimage else (None, shift, None)
    res = residual_norm_op(x, gate, y, post, scale, sh, wt, 1e-5, 1e-5, zimage, not zimage, seq)
    torch.library.opcheck(residual_norm_backward_op, (d_out, d_xn, res[0], gate, y, post, scale, wt, *res[2:],
                                                      zimage, not zimage, seq))
    torch.library.opcheck(residual_norm_op, (x.requires_grad_(), gate, y.requires_grad_(), post, scale, sh, wt, 1e-5,
                                             1e-5, zimage, not zimage, seq))


def test_residual_norm_refuses_a_training_gate_and_the_ops_fall_back():
    """The fused backward computes dx and dy only: a gate / norm weight / modulation that trains is an
    error there (never a silent None gradient), and FusedOps then takes the unfused kernels, whose
    gradients for them match the eager composition."""
    from dopsd_fast.kernels.norm_modulation import residual_norm
    from dopsd_fast.models.ops import FusedOps, TorchOps

    B, S, D = 2, 9, 32
    x, y = torch.randn(B, S, D, requires_grad=True), torch.randn(B, S, D, requires_grad=True)
    gate, scale = torch.randn(B, D, requires_grad=True), 0.3 * torch.randn(B, D)
    w_post, w = 1 + 0.1 * torch.randn(D), 1 + 0.1 * torch.randn(D)
    out, xn = residual_norm(x, gate, y, scale, post_weight=w_post, weight=w)
    with pytest.raises(RuntimeError, match="residual_norm: gate train"):
        (out.sum() + xn.sum()).backward()
    grads = []
    for ops in (FusedOps(), TorchOps()):
        ins = [t.detach().clone().requires_grad_() for t in (x, gate, y)]
        o, n = ops.residual_norm(ins[0], ins[1], ins[2], scale, 1e-5, post=(w_post, 1e-5), weight=w)
        (o.square().sum() + n.sum()).backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        assert_close(a, b, 1e-5, 1e-4, "fallback grad", scaled=True)
    with pytest.raises(ValueError, match="needs its shift"):
        residual_norm(x, gate, y, scale, layer=True)


@pytest.mark.parametrize("triton_path", [True, False])
def test_samples_without_tokens_give_zero_gradients(monkeypatch, triton_path):
    """x of shape (B, 0, D) with trainable modulation: the per-sample sums reshaped 0 elements with -1
    ("cannot reshape tensor of 0 elements") on the Triton path, and in norm_gated_residual's fallback."""
    from dopsd_fast.kernels import norm_modulation as nm

    if not triton_path:
        monkeypatch.setattr(nm, "use_triton", lambda *t: False)
    x = torch.randn(2, 0, 8, requires_grad=True)
    cases = {"rms": lambda p: nm.rms_norm_modulate(x, torch.ones(8), p),
             "layer": lambda p: nm.layer_norm_modulate(x, p, torch.zeros(2, 8)),
             "gated": lambda p: nm.gated_residual(x, p, x.detach()),
             "norm_gated": lambda p: nm.norm_gated_residual(x, p, x.detach(), torch.ones(8))}
    for name, fn in cases.items():
        p = torch.randn(2, 8, requires_grad=True)
        y = fn(p)
        dx, dp = torch.autograd.grad(y.sum(), [x, p])
        assert y.shape == (2, 0, 8) and dx.shape == x.shape and dp.shape == (2, 8) and not dp.any(), name
