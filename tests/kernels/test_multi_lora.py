"""Multi-LoRA linear: one shared base GEMM + per-branch adapters == two separate (peft) LoRA layers."""

import pytest
import torch

from tests.conftest import assert_close, low_precision_rule


def _params(K, N, r, bias=True):
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    a_s, b_s = torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    a_t, b_t = torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    return w, b, a_s, b_s, a_t, b_t


def _run_fused(x, w, b, a_s, b_s, a_t, b_t, n, g, impl):
    from dopsd_fast.kernels.multi_lora import multi_lora_linear

    x, a_s, b_s = (t.detach().clone().requires_grad_() for t in (x, a_s, b_s))
    y = multi_lora_linear(x, w, b, (a_s, b_s, 0.75), (a_t, b_t, 1.5), n, impl=impl)
    (y.float() * g.float()).sum().backward()
    return [y.detach(), x.grad, a_s.grad, b_s.grad]


def _run_ref(x, w, b, a_s, b_s, a_t, b_t, n, g):
    from dopsd_fast.kernels.multi_lora import multi_lora_linear_ref

    x, a_s, b_s = (t.detach().clone().requires_grad_() for t in (x, a_s, b_s))
    y = multi_lora_linear_ref(x, w, b, a_s, b_s, a_t, b_t, 0.75, 1.5, n)
    (y.float() * g.float()).sum().backward()
    return [y.detach(), x.grad, a_s.grad if a_s.grad is not None else torch.zeros_like(a_s),
            b_s.grad if b_s.grad is not None else torch.zeros_like(b_s)]


NAMES = ["y", "dx", "d lora_A (student)", "d lora_B (student)"]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r,n", [(37, 48, 40, 4, 20), (19, 33, 70, 8, 0), (19, 33, 70, 8, 19), (5, 16, 16, 2, 3)])
def test_matches_two_lora_layers(impl, dtype, M, K, N, r, n):
    x = torch.randn(M, K)
    params = _params(K, N, r, bias=(M % 2 == 1))
    g = torch.randn(M, N)
    low = [t.to(dtype) if t is not None else None for t in (x, *params)]
    fast = _run_fused(*low, n, g.to(dtype), impl)
    ref = _run_ref(*[t.float() if t is not None else None for t in low], n, g.to(dtype).float())
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, fast, ref):
            assert_close(a, b, 1e-4, 1e-4, name, scaled=True)
    else:
        torch_low = _run_ref(*low, n, g.to(dtype))
        for name, a, t, b in zip(NAMES, fast, torch_low, ref):
            low_precision_rule(a, t, b, 2e-2 * max(1.0, b.abs().max().item()), name)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_equals_peft_layers_3d_input():
    """Against real peft LoRA layers (two adapters on one nn.Linear), input (B, S, K) packed as
    [student batch; teacher batch] exactly as the double forward packs it."""
    from peft import LoraConfig, inject_adapter_in_model

    from dopsd_fast.kernels.multi_lora import multi_lora_linear

    B, S, K, N = 2, 5, 24, 32
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(K, N)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False), model,
                            adapter_name="student")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["lin"], init_lora_weights=False), model,
                            adapter_name="teacher")
    lin = model.lin
    xs, xt = torch.randn(B, S, K), torch.randn(B, S, K)
    lin.set_adapter("student")
    ys = lin(xs)
    lin.set_adapter("teacher")
    yt = lin(xt)
    for p in lin.parameters():
        p.requires_grad_(False)
    ad = lambda n: (lin.lora_A[n].weight, lin.lora_B[n].weight, lin.scaling[n])  # noqa: E731
    y = multi_lora_linear(torch.cat([xs, xt]), lin.base_layer.weight, lin.base_layer.bias, ad("student"),
                          ad("teacher"), n_split=B * S)
    assert_close(y, torch.cat([ys, yt]), 1e-5, 1e-5, "y", scaled=True)


def test_opcheck_and_errors():
    from dopsd_fast.kernels.multi_lora import (multi_lora_linear, multi_lora_linear_backward_op,
                                               multi_lora_linear_op)

    w, b, a_s, b_s, a_t, b_t = _params(16, 24, 2)
    x = torch.randn(9, 16, requires_grad=True)
    for impl in ("triton", "torch"):
        torch.library.opcheck(multi_lora_linear_op, (x, w, b, a_s.requires_grad_(), b_s.requires_grad_(), a_t, b_t,
                                                     0.5, 2.0, 4, impl))
        y, u = multi_lora_linear_op(x.detach(), w, b, a_s.detach(), b_s.detach(), a_t, b_t, 0.5, 2.0, 4, impl)
        torch.library.opcheck(multi_lora_linear_backward_op, (torch.randn_like(y), x.detach(), w, u, a_s.detach(),
                                                              b_s.detach(), a_t, b_t, 0.5, 2.0, 4, impl))
    with pytest.raises(ValueError, match="weight require grad"):
        multi_lora_linear(x, w.requires_grad_(), b, (a_s, b_s, 1.0), (a_t, b_t, 1.0), 4)
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="n_split"):
        multi_lora_linear(x, w, b, (a_s, b_s, 1.0), (a_t, b_t, 1.0), 10)
    with pytest.raises(ValueError, match="ranks differ"):
        multi_lora_linear(x, w, b, (a_s, b_s, 1.0), (a_t[:1], b_t[:, :1], 1.0), 4)


def test_a_dtype_mix_is_refused_in_one_line_naming_the_tensor():
    """bf16 activations with an fp32 adapter or weight ran under the interpreter (its dots upcast by the
    first operand), failed on cuBLAS, and would be a compile error of the GPU kernel."""
    from dopsd_fast.kernels.multi_lora import multi_lora_linear, paired_lora_linears

    w, b, a_s, b_s, a_t, b_t = _params(16, 24, 2)
    x = torch.randn(9, 16).bfloat16()
    wb, bb, at, bt = (t.bfloat16() for t in (w, b, a_t, b_t))
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"^multi_lora_linear: x is torch.bfloat16 but student_A is torch.float32, "
                                             r"student_B is torch.float32: one dtype throughout"):
            multi_lora_linear(x, wb, bb, (a_s, b_s, 1.0), (at, bt, 1.0), 4, impl=impl)
        with pytest.raises(ValueError, match=r"^paired_lora_linear\[1\]: x is torch.bfloat16 but weight is torch.float32"):
            paired_lora_linears(x, x, [wb, w], [bb, bb], [(a_s.bfloat16(), b_s.bfloat16(), 1.0)] * 2, [(at, bt, 1.0)] * 2,
                                impl=impl)
    with pytest.raises(ValueError, match=r"paired_lora_linear\[0\]: x is torch.bfloat16 but x_t is torch.float32"):
        paired_lora_linears(x, x.float(), [wb], [bb], [(a_s.bfloat16(), b_s.bfloat16(), 1.0)], [(at, bt, 1.0)])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_paired_form_equals_two_layers(impl):
    from dopsd_fast.kernels.multi_lora import lora_linear_ref, paired_lora_linear, paired_lora_linears_op

    w, b, a_s, b_s, a_t, b_t = _params(24, 40, 4)
    xs, xt = torch.randn(2, 7, 24, requires_grad=True), torch.randn(9, 24)
    a_s.requires_grad_(), b_s.requires_grad_()
    ys, yt = paired_lora_linear(xs, xt, w, b, (a_s, b_s, 0.5), (a_t, b_t, 2.0), impl=impl)
    assert not yt.requires_grad
    g = torch.randn_like(ys)
    gx, ga, gb = torch.autograd.grad(ys, (xs, a_s, b_s), g)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (xs, a_s, b_s))
    yr = lora_linear_ref(xr, w, b, ar, br, 0.5)
    assert_close(ys, yr, 1e-5, 1e-5, "y_s", scaled=True)
    assert_close(yt, lora_linear_ref(xt, w, b, a_t, b_t, 2.0), 1e-5, 1e-5, "y_t", scaled=True)
    for name, a, r in zip(["dx_s", "dA_s", "dB_s"], (gx, ga, gb), torch.autograd.grad(yr, (xr, ar, br), g)):
        assert_close(a, r, 1e-4, 1e-4, name, scaled=True)
    # the op alone (its autograd is paired_lora_linears' Function, checked above): schema, fake, dispatch
    torch.library.opcheck(paired_lora_linears_op, (xs.detach().reshape(-1, 24), xt, [w], [b], [a_s.detach()],
                                                   [b_s.detach()], [a_t], [b_t], [0.5], [2.0], impl, [], [], True))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("same_scale", [False, True])
def test_paired_group_equals_separate_layers(impl, dtype, same_scale):
    """q, k, v as ONE op (the student's dx of the group in one buffer, the adapters stacked: x read once
    for u, the LoRA part of dx one product) == three peft-style LoRA layers, outputs and every student
    gradient, with one scale for the group (folded into the GEMM) and one per linear; a projection whose
    output is unused gets no gradient."""
    from dopsd_fast.kernels.multi_lora import (lora_linear_ref, paired_lora_linears, paired_lora_linears_backward_op,
                                               paired_lora_linears_op)

    K, r = 32, 4
    layers = [_params(K, N, r, bias=(N == 48)) for N in (40, 48, 24)]
    xs, xt = torch.randn(37, K), torch.randn(45, K)
    gs = [torch.randn(37, w.shape[0]) for w, *_ in layers]
    scale = (lambda i: 1.5) if same_scale else (lambda i: 0.5 + i)  # noqa: E731

    def run(fused, cast):
        x = cast(xs).detach().clone().requires_grad_()
        ad = [(cast(a_s).detach().clone().requires_grad_(), cast(b_s).detach().clone().requires_grad_())
              for _, _, a_s, b_s, _, _ in layers]
        lows = [tuple(cast(t) if t is not None else None for t in lay) for lay in layers]
        if fused:
            outs = paired_lora_linears(x, cast(xt), [lw[0] for lw in lows], [lw[1] for lw in lows],
                                       [(a, b, scale(i)) for i, (a, b) in enumerate(ad)],
                                       [(lw[4], lw[5], 2.0) for lw in lows], impl=impl)
            ys, yts = [o[0] for o in outs], [o[1] for o in outs]
        else:
            ys = [lora_linear_ref(x, lw[0], lw[1], a, b, scale(i)) for i, (lw, (a, b)) in enumerate(zip(lows, ad))]
            yts = [lora_linear_ref(cast(xt), lw[0], lw[1], lw[4], lw[5], 2.0) for lw in lows]
        loss = sum((y.float() * g).sum() for y, g in zip(ys, gs))
        grads = torch.autograd.grad(loss, [x] + [t for pair in ad for t in pair])
        return [y.detach() for y in ys + yts] + list(grads)

    names = ["y_q", "y_k", "y_v", "yt_q", "yt_k", "yt_v", "dx", "dA_q", "dB_q", "dA_k", "dB_k", "dA_v", "dB_v"]
    fast = run(True, lambda t: t.to(dtype))
    ref = run(False, lambda t: t.float())
    if dtype == torch.float32:
        for name, a, b in zip(names, fast, ref):
            assert_close(a, b, 1e-4, 1e-4, name, scaled=True)
    else:
        low = run(False, lambda t: t.to(dtype))
        for name, a, t, b in zip(names, fast, low, ref):
            low_precision_rule(a, t, b, 2e-2 * max(1.0, b.abs().max().item()), name)
    # only k's output used: q and v adapters get no gradient, dx is k's alone
    x = xs.clone().requires_grad_()
    ad = [(a_s.detach().clone().requires_grad_(), b_s.detach().clone().requires_grad_())
          for _, _, a_s, b_s, _, _ in layers]
    outs = paired_lora_linears(x, xt, [lw[0] for lw in layers], [lw[1] for lw in layers],
                               [(a, b, 1.0) for a, b in ad], [(lw[4], lw[5], 1.0) for lw in layers], impl=impl)
    outs[1][0].sum().backward()
    assert ad[0][0].grad is None and ad[2][1].grad is None and ad[1][0].grad is not None
    xr = xs.clone().requires_grad_()
    ar, br = ad[1][0].detach().clone().requires_grad_(), ad[1][1].detach().clone().requires_grad_()
    lora_linear_ref(xr, layers[1][0], layers[1][1], ar, br, 1.0).sum().backward()
    assert_close(x.grad, xr.grad, 1e-4, 1e-4, "dx (k only)", scaled=True)
    assert_close(ad[1][0].grad, ar.grad, 1e-4, 1e-4, "dA_k (k only)", scaled=True)  # k's own block of u
    assert_close(ad[1][1].grad, br.grad, 1e-4, 1e-4, "dB_k (k only)", scaled=True)
    # q and v used, k not: the outer blocks of u and of the stacked adapters
    x = xs.clone().requires_grad_()
    ad = [(a_s.detach().clone().requires_grad_(), b_s.detach().clone().requires_grad_())
          for _, _, a_s, b_s, _, _ in layers]
    outs = paired_lora_linears(x, xt, [lw[0] for lw in layers], [lw[1] for lw in layers],
                               [(a, b, 0.5 + i) for i, (a, b) in enumerate(ad)],
                               [(lw[4], lw[5], 1.0) for lw in layers], impl=impl)
    (outs[0][0].sum() + 2 * outs[2][0].sum()).backward()
    assert ad[1][0].grad is None and ad[1][1].grad is None
    xr = xs.clone().requires_grad_()
    refs = [(ad[i][0].detach().clone().requires_grad_(), ad[i][1].detach().clone().requires_grad_()) for i in (0, 2)]
    (lora_linear_ref(xr, layers[0][0], layers[0][1], *refs[0], 0.5).sum()
     + 2 * lora_linear_ref(xr, layers[2][0], layers[2][1], *refs[1], 2.5).sum()).backward()
    assert_close(x.grad, xr.grad, 1e-4, 1e-4, "dx (q and v)", scaled=True)
    for i, (ar, br) in zip((0, 2), refs):
        assert_close(ad[i][0].grad, ar.grad, 1e-4, 1e-4, f"dA[{i}] (q and v)", scaled=True)
        assert_close(ad[i][1].grad, br.grad, 1e-4, 1e-4, f"dB[{i}] (q and v)", scaled=True)
    # adapters of different ranks in one group (a per-module rank pattern): each linear on its own
    x = xs.clone().requires_grad_()
    mixed = [(a[:r - 1 - i].clone().requires_grad_(), b[:, :r - 1 - i].clone().requires_grad_())
             for i, (_, _, a, b, _, _) in enumerate(layers)]
    outs = paired_lora_linears(x, xt, [lw[0] for lw in layers], [lw[1] for lw in layers],
                               [(a, b, 1.0) for a, b in mixed], [(lw[4], lw[5], 1.0) for lw in layers], impl=impl)
    sum((o[0] * g).sum() for o, g in zip(outs, gs)).backward()
    xr = xs.clone().requires_grad_()
    sum((lora_linear_ref(xr, lw[0], lw[1], a.detach(), b.detach(), 1.0) * g).sum()
        for lw, (a, b), g in zip(layers, mixed, gs)).backward()
    assert_close(x.grad, xr.grad, 1e-4, 1e-4, "dx (mixed ranks)", scaled=True)
    for (y, yt), lw in zip(outs, layers):
        assert_close(yt, lora_linear_ref(xt, lw[0], lw[1], lw[4], lw[5], 1.0), 1e-4, 1e-4, "y_t (mixed ranks)", scaled=True)
    with pytest.raises(ValueError, match="base weight requires grad"):
        paired_lora_linears(x, xt, [layers[0][0].clone().requires_grad_()], [None], [(ad[0][0], ad[0][1], 1.0)],
                            [(layers[0][4], layers[0][5], 1.0)])
    lq, lv = layers[0], layers[2]
    a_q, b_q, a_v, b_v = (t.detach() for t in (ad[0][0], ad[0][1], ad[2][0], ad[2][1]))
    y = paired_lora_linears_op(xs, xt, [lq[0], lv[0]], [torch.empty(0), torch.randn(24)], [a_q, a_v], [b_q, b_v],
                               [lq[4], lv[4]], [lq[5], lv[5]], [0.5, 1.5], [2.0, 1.0], impl, [], [], True)
    torch.library.opcheck(paired_lora_linears_op, (xs, xt, [lq[0], lv[0]], [torch.empty(0), torch.randn(24)],
                                                   [a_q, a_v], [b_q, b_v], [lq[4], lv[4]], [lq[5], lv[5]], [0.5, 1.5],
                                                   [2.0, 1.0], impl, [], [], True))
    torch.library.opcheck(paired_lora_linears_backward_op, ([torch.randn_like(y[0]), torch.randn_like(y[1])], xs,
                                                            [lq[0], lv[0]], y[4], [a_q, a_v], [b_q, b_v],
                                                            [0.5, 1.5], impl, [], True))


def _python_calls(fn) -> int:
    """Python function calls made on this thread by ``fn()`` (host work that does not depend on the
    tensors' size: what a short GEMM on a GPU can leave exposed)."""
    import sys

    calls = [0]

    def count(frame, event, arg):
        if event == "call":
            calls[0] += 1

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[0]


def test_paired_forward_backward_host_work_is_close_to_two_plain_layers():
    """The paired linear's forward + backward as the step runs it (one op for both branches, the
    student's backward) does at most 4x the Python calls of two plain LoRA layers (student with
    autograd, teacher without). Through ``register_autograd`` on the tensor-list op it made 18x (609 vs
    34 calls: pytrees of every list argument, the schema's defaults refilled, per forward and per
    backward): host work of a fixed size per call, which left the H200's 3840 -> 3840 microbenchmark
    (m2) host-bound at ~1.8 ms per forward + backward whatever the shape."""
    from dopsd_fast.kernels.multi_lora import lora_linear_ref, paired_lora_linear

    torch.manual_seed(0)
    w, b, a_s, b_s, a_t, b_t = _params(8, 8, 2, bias=False)
    xs, xt, dy = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8), torch.randn(4, 8)
    a_s.requires_grad_(), b_s.requires_grad_()

    def paired():
        torch.autograd.grad(paired_lora_linear(xs, xt, w, None, (a_s, b_s, 2.0), (a_t, b_t, 2.0), impl="torch")[0],
                            (xs, a_s, b_s), dy)

    def two_layers():
        y = lora_linear_ref(xs, w, None, a_s, b_s, 2.0)
        with torch.no_grad():
            lora_linear_ref(xt, w, None, a_t, b_t, 2.0)
        torch.autograd.grad(y, (xs, a_s, b_s), dy)

    paired(), two_layers()  # first calls: lazy initialisation out of the count
    ours, ref = _python_calls(paired), _python_calls(two_layers)
    assert ours <= 4 * ref, (ours, ref)


def test_paired_linears_compile_with_their_gradients():
    """The autograd.Function around the op traces whole (fullgraph) and its gradients are the eager ones."""
    from dopsd_fast.kernels.multi_lora import lora_linear_ref, paired_lora_linears

    torch.manual_seed(0)
    layers = [_params(24, N, 4) for N in (40, 16)]
    xs, xt = torch.randn(7, 24, requires_grad=True), torch.randn(9, 24)
    ad = [(lay[2].requires_grad_(), lay[3].requires_grad_()) for lay in layers]

    def fused(x, a0, b0, a1, b1):
        outs = paired_lora_linears(x, xt, [lay[0] for lay in layers], [lay[1] for lay in layers],
                                   [(a0, b0, 0.5), (a1, b1, 1.5)], [(lay[4], lay[5], 2.0) for lay in layers],
                                   impl="torch")
        return outs[0][0].sum() + outs[1][0].square().sum()

    args = (xs, *ad[0], *ad[1])
    got = torch.autograd.grad(torch.compile(fused, backend="aot_eager", fullgraph=True)(*args), args)
    ref = lora_linear_ref(xs, layers[0][0], layers[0][1], *ad[0], 0.5).sum() + \
        lora_linear_ref(xs, layers[1][0], layers[1][1], *ad[1], 1.5).square().sum()
    for name, a, r in zip(["dx", "dA_0", "dB_0", "dA_1", "dB_1"], got, torch.autograd.grad(ref, args)):
        assert_close(a, r, 1e-4, 1e-4, name, scaled=True)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_an_input_that_needs_no_gradient_gets_no_dx_gemm(impl):
    """A group whose input needs no gradient (the first layer of a refiner, fed by frozen embedders):
    its dX GEMMs were run and thrown away (1.5 TFLOP a Z-Image step). Now the backward skips them: the
    adapters' gradients equal those of the run that computes dx, bit for bit, and the step model's
    passes of the group have no dX GEMM."""
    from dopsd_fast.kernels import multi_lora as ml

    K, r = 32, 4
    layers = [_params(K, N, r) for N in (40, 48, 24)]
    xs, xt = torch.randn(37, K), torch.randn(45, K)
    gs = [torch.randn(37, w.shape[0]) for w, *_ in layers]

    def run(x_grad):
        x = xs.clone().requires_grad_(x_grad)
        ad = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for _, _, a, b, _, _ in layers]
        outs = ml.paired_lora_linears(x, xt, [lw[0] for lw in layers], [lw[1] for lw in layers],
                                      [(a, b, 0.5 + i) for i, (a, b) in enumerate(ad)],
                                      [(lw[4], lw[5], 2.0) for lw in layers], impl=impl)
        loss = sum((o[0] * g).sum() for o, g in zip(outs, gs))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()  # the matrix products it launches, inside the op too (the cuBLAS form)
        products = sum(1 for ev in prof.events() if ev.name in ("aten::mm", "aten::addmm", "aten::addmm_"))
        return x.grad, [t.grad for pair in ad for t in pair], products

    dx, with_dx, n_with = run(True)
    no_dx, without, n_without = run(False)
    assert dx is not None and no_dx is None
    if impl == "torch":  # dx = du [A_1; ..] and the three dx += dy_g W_g: not launched
        assert n_with - n_without == 4, (n_with, n_without)
    for a, b in zip(with_dx, without):
        assert torch.equal(a, b)
    names = lambda passes: [p["name"] for p in passes]  # noqa: E731
    for form in ("torch", "triton"):
        full, skip = (ml.paired_bwd_passes(37, K, [40, 48, 24], r, 2, form, need_dx=n) for n in (True, False))
        assert not any("dX" in n or n == ml.LORA_DELTA_DX_FIRST for n in names(skip)), names(skip)
        assert sum(p["flops"] for p in full) - sum(p["flops"] for p in skip) == pytest.approx(
            2.0 * 37 * K * (40 + 48 + 24) + 2.0 * 37 * 3 * r * K)  # the base dX GEMMs and du [A_1; ..]


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_the_backward_s_adapter_copies_are_the_passes_priced(impl, need_dx, monkeypatch):
    """The small copies of the student's backward (the group's A's stacked for ``dx = du [A_1; ..]``,
    each dA split out of the group's one product): as many as the step model prices. Ours reads each
    A_g in its own dX GEMM: no stacked copy (the model priced one after the code stopped making it)."""
    from dopsd_fast.kernels import multi_lora as ml

    copies = []
    stack, own = ml._stack_rows, ml._own
    monkeypatch.setattr(ml, "_stack_rows", lambda As: copies.extend([1] * (len(As) if len(As) > 1 else 0)) or stack(As))
    monkeypatch.setattr(ml, "_own", lambda t, dtype: copies.append(1) or own(t, dtype))
    torch.manual_seed(0)
    M, K, r, Ns = 24, 32, 4, [48, 16, 40]
    x = torch.randn(M, K)
    ws = [torch.randn(N, K) for N in Ns]
    As, Bs = [torch.randn(r, K) for _ in Ns], [torch.randn(N, r) for N in Ns]
    dys = [torch.randn(M, N) for N in Ns]
    ml._student_bwd(dys, x, ws, torch.randn(M, 3 * r), As, Bs, [0.5] * 3, impl == "triton", need_dx=need_dx)
    priced = [p for p in ml.paired_bwd_passes(M, K, Ns, r, 4, impl, need_dx=need_dx) if p["name"] == ml.LORA_STACK]
    assert len(copies) == sum(p["launches"] for p in priced), (len(copies), len(priced))


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("group", [1, 3])
def test_cost_passes_are_the_launches_the_torch_form_makes(group, need_dx):
    """The step model prices the paired op by the passes its cost states (benchmarks/perf_model.py): each
    is one launch of the cuBLAS form, with that launch's GEMM shape and bytes (read + written). Here
    the implementation runs under a dispatch mode that records every aten op it launches, forward
    (both branches) and the student's backward (the group's dx in one buffer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dopsd_fast.kernels import multi_lora as ml

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.launches = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.name()
            if func.is_view or name in ("aten::empty", "aten::empty_strided", "aten::new_empty", "aten::t",
                                        "aten::_to_copy"):
                return out
            ts = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
            written = args[0] if name.endswith("_") else out  # in place: the first argument is rewritten
            byts = sum(t.numel() * t.element_size() for t in ts) + written.numel() * written.element_size()
            if name == "aten::new_zeros":  # a fill: reads nothing
                byts = out.numel() * out.element_size()
            if name == "aten::copy_":  # reads the source, writes the destination
                byts = 2 * args[1].numel() * args[1].element_size()
            if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::addmm.out"):
                a, b = (args[0], args[1]) if name == "aten::mm" else (args[1], args[2])
                self.launches.append(((a.shape[0], a.shape[1], b.shape[1]), byts))
            else:  # a fill of the 0-dim zero (reads nothing), a copy (the adapters stacked, dA split out)
                self.launches.append((None, byts))
            return out

    torch.manual_seed(0)
    Ms, Mt, K, r = 24, 40, 32, 4
    Ns = [48, 16, 40][:group]
    e = 2
    xs, xt = torch.randn(Ms, K, dtype=torch.bfloat16), torch.randn(Mt, K, dtype=torch.bfloat16)
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for N in Ns]
    As = [torch.randn(r, K, dtype=torch.bfloat16) for _ in Ns]
    Bs = [torch.randn(N, r, dtype=torch.bfloat16) for N in Ns]
    dys = [torch.randn(Ms, N, dtype=torch.bfloat16) for N in Ns]
    with Record() as rec:
        ys, u = ml._branch_fwd(xs, ws, [None] * group, As, Bs, [0.5] * group, False)
        ml._branch_fwd(xt, ws, [None] * group, As, Bs, [2.0] * group, False)
        ml._student_bwd(dys, xs, ws, u, As, Bs, [0.5] * group, False, need_dx=need_dx)
    passes = [p for M in (Ms, Mt) for p in ml.paired_fwd_passes(M, K, Ns, r, e, "torch")]
    passes += ml.paired_bwd_passes(Ms, K, Ns, r, e, "torch", need_dx=need_dx)
    # launches in a different order (both branches' forward per linear in the cost): compare as multisets
    got = sorted((shape or (), byts) for shape, byts in rec.launches)
    want = sorted((p["shape"] or (), p["bytes"]) for p in passes for _ in range(p["launches"]))
    assert len(got) == len(want) and [g[0] for g in got] == [w[0] for w in want], (got, want)
    for (shape, b_got), (_, b_want) in zip(got, want):  # the 0-dim zero read by addmm(beta=0): 2 bytes
        assert abs(b_got - b_want) <= 2 * e, (shape, b_got, b_want)


@pytest.mark.parametrize("rowwise", [True, False])
def test_fp8_dgrad_cost_passes_are_the_launches_it_makes(rowwise):
    """fast.fp8_dgrad: the student's backward of a group (q, k, v) makes the launches its cost states:
    the du GEMMs, ONE FP8 dX GEMM over the concatenated output gradients (shape (M, sum N, K)), the LoRA
    part of dx added after it, dA and dB; and the group's dy's are quantized by one op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dopsd_fast.fp8 import NativeFP8
    from dopsd_fast.kernels import multi_lora as ml

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.gemms, self.quant = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::addmm.out", "aten::_scaled_mm"):
                a, b = (args[1], args[2]) if name.startswith("aten::addmm") else (args[0], args[1])
                self.gemms.append(("fp8" if name == "aten::_scaled_mm" else "bf16", (a.shape[0], a.shape[1], b.shape[1])))
            self.quant += name == "dopsd_fast::quantize_rows_cat"
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    M, K, r, Ns = 24, 32, 4, [48, 16, 32]
    bf = torch.bfloat16
    ws = [torch.randn(N, K, dtype=bf) for N in Ns]
    As, Bs = [torch.randn(r, K, dtype=bf) for _ in Ns], [torch.randn(N, r, dtype=bf) for N in Ns]
    x, dys = torch.randn(M, K, dtype=bf), [torch.randn(M, N, dtype=bf) for N in Ns]
    u = torch.randn(M, len(Ns) * r, dtype=bf)
    fp8 = NativeFP8("rowwise" if rowwise else "tensorwise")
    wt = list(fp8.weights_t(ws))
    with Record() as rec:
        dx, das, dbs = ml._student_bwd(dys, x, ws, u, As, Bs, [0.5] * 3, False, wt, rowwise)
    passes = ml.paired_bwd_passes(M, K, Ns, r, 2, "torch", fp8_dgrad=True)
    want = sorted(("fp8" if p["kind"] == "gemm_fp8" else "bf16", p["shape"]) for p in passes
                  if p["kind"].startswith("gemm") or p["shape"] is not None)
    assert sorted(rec.gemms) == want
    assert rec.quant == 1 and sum(p["kind"] == "gemm_fp8" for p in passes) == 1
    # the FP8 dX GEMM is the dequantized arithmetic; dA, dB are those of the bf16 backward exactly
    ref_dx, ref_da, ref_db = ml._student_bwd(dys, x, ws, u, As, Bs, [0.5] * 3, False)
    du = torch.cat([0.5 * d.float() @ b.float() for d, b in zip(dys, Bs)], 1)
    emul = fp8.emulate_dgrad(dys, ws).float() + du @ torch.cat([a.float() for a in As])
    assert_close(dx.float(), emul, 2e-2, 2e-2, "fp8 dx vs its emulation", scaled=True)
    assert not torch.equal(dx, ref_dx)
    for a, b in zip(das + dbs, ref_da + ref_db):
        assert torch.equal(a, b)


def test_gemm_tile_is_what_the_gpu_launches_and_is_restored(monkeypatch):
    """The GPU launch tile: 128 x 128 by default; ``gemm_tile`` (the GPU check's candidate) sets it for
    the GEMMs launched inside, a product narrower than the tile keeps 128 columns, and it is restored
    after (also on an error). The interpreter keeps its small tiles either way."""
    import dopsd_fast.kernels.multi_lora as ml

    monkeypatch.setattr(ml, "interpreting", lambda: False)
    assert ml._blocks(4608, 3840, 3840) == (128, 128, 64, 8, 3)
    with ml.gemm_tile(128, 256):
        assert ml._blocks(4608, 3840, 3840) == (128, 256, 64, 8, 3)
        assert ml._blocks(4608, 128, 3840)[:2] == (128, 128)  # u = x A^T of two rank-64 adapters
    with pytest.raises(RuntimeError), ml.gemm_tile(128, 256):
        raise RuntimeError("inside")
    assert ml.TILE == (128, 128)
    monkeypatch.setattr(ml, "interpreting", lambda: True)
    with ml.gemm_tile(128, 256):
        assert ml._blocks(4608, 3840, 3840)[:3] == (64, 64, 64)
        assert ml._blocks(37, 70, 48)[:3] == (16, 32, 16)
        assert ml._blocks(64, 170, 127)[:3] == (32, 64, 32)  # a tiny model's FFN: still 3 tiles wide


class _Count:
    """Counts the launches of a jit kernel (``kernel[grid](...)``), passing them on."""

    def __init__(self, kernel):
        self.kernel, self.n, self.constexprs = kernel, 0, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.n += 1
            self.constexprs.append(kwargs)
            return launch(*args, **kwargs)
        return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_gemm_kernel_forms_and_fallback(dtype, monkeypatch):
    """The TMA kernel (``gemm_kernel("tma")``): ``y = a W^T + a2 B2^T + bias`` (both B operands read
    transposed from their stored (N, K) layout), ``acc += a W + a2 A`` (B row-major, accumulated), a
    column slice as the output; several tiles per persistent program and edges past the descriptors'
    shapes. Operands a descriptor cannot read (a transposed ``a``; a row stride that is not 16-byte
    aligned) take the pointer kernel, with the same result."""
    import dopsd_fast.kernels.multi_lora as ml

    tma, ptr = _Count(ml._gemm_tma_kernel), _Count(ml._gemm_kernel)
    monkeypatch.setattr(ml, "_gemm_tma_kernel", tma)
    monkeypatch.setattr(ml, "_gemm_kernel", ptr)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    M, K, N, r = 70, 48, 56, 16
    a, w, a2, b2 = (torch.randn(*s).to(dtype) for s in ((M, K), (N, K), (M, r), (N, r)))
    bias, acc0 = torch.randn(N).to(dtype), torch.randn(M, K).to(dtype)
    f = lambda t: t.float()  # noqa: E731
    with ml.gemm_kernel("tma"):
        y = ml._gemm(a, w.t(), dtype, a2=a2, b2=b2.t(), bias=bias)
        assert (tma.n, ptr.n) == (1, 0)
        acc = ml._gemm(y, w, dtype, a2=a2 @ b2.t(), b2=w, acc=acc0.clone())
        assert (tma.n, ptr.n) == (2, 0)
        wide = torch.zeros(M, N + 24, dtype=dtype)
        ml._gemm(a, w.t(), dtype, out=wide[:, 8:8 + N])
        assert (tma.n, ptr.n) == (3, 0)
        at = a.t().contiguous().t()  # (M, K) with column-major strides: not a descriptor's layout
        y_t = ml._gemm(at, w.t(), dtype, bias=bias)
        assert (tma.n, ptr.n) == (3, 1)
        narrow = torch.randn(M, 4).to(dtype)  # 4 columns of a (M, 4) tensor: 8 or 16 bytes a row
        b_n = torch.randn(N, 4).to(dtype)
        y_n = ml._gemm(a, w.t(), dtype, a2=narrow, b2=b_n.t())
        assert tma.n == (4 if dtype == torch.float32 else 3)
    ref_y = f(a) @ f(w).t() + f(a2) @ f(b2).t() + f(bias)
    assert_close(f(y), ref_y, tol, tol, "y (tma)", scaled=True)
    assert_close(f(acc), f(acc0) + f(y) @ f(w) + f(a2 @ b2.t()) @ f(w), tol, tol, "acc (tma)", scaled=True)
    assert_close(f(wide[:, 8:8 + N]), f(a) @ f(w).t(), tol, tol, "column slice (tma)", scaled=True)
    assert torch.equal(wide[:, :8], torch.zeros(M, 8, dtype=dtype)) and not wide[:, N + 8:].any()
    assert_close(f(y_t), f(a) @ f(w).t() + f(bias), tol, tol, "transposed a (pointer kernel)", scaled=True)
    narrow_ref = f(a) @ f(w).t() + f(narrow) @ f(b_n).t()
    assert_close(f(y_n), narrow_ref, tol, tol, "8- / 16-byte rows of the second operand", scaled=True)
    assert ml.KERNEL == "pointer"
    with pytest.raises(ValueError, match="unknown kernel 'wgmma'"), ml.gemm_kernel("wgmma"):
        pass
    with pytest.raises(RuntimeError), ml.gemm_kernel("tma"):
        raise RuntimeError("inside")
    assert ml.KERNEL == "pointer"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paired_group_on_the_tma_kernel_equals_the_pointer_kernel(dtype, monkeypatch):
    """q, k, v as one paired op, forward and backward, with the TMA kernel: its base GEMMs (the delta in
    the tile, dx accumulated over the group) run on descriptors and give the pointer kernel's outputs and
    gradients; the masked u / du and the adapter gradients keep the pointer kernel."""
    import dopsd_fast.kernels.multi_lora as ml

    K, r = 32, 8
    layers = [_params(K, N, r, bias=(N == 48)) for N in (40, 48, 24)]
    xs, xt = torch.randn(37, K).to(dtype), torch.randn(45, K).to(dtype)
    gs = [torch.randn(37, w.shape[0]) for w, *_ in layers]

    def run():
        x = xs.detach().clone().requires_grad_()
        ad = [(a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()) for _, _, a, b, _, _ in layers]
        outs = ml.paired_lora_linears(x, xt, [lw[0].to(dtype) for lw in layers],
                                      [lw[1].to(dtype) if lw[1] is not None else None for lw in layers],
                                      [(a, b, 0.5 + i) for i, (a, b) in enumerate(ad)],
                                      [(lw[4].to(dtype), lw[5].to(dtype), 2.0) for lw in layers], impl="triton")
        loss = sum((ys.float() * g).sum() for (ys, _), g in zip(outs, gs))
        grads = torch.autograd.grad(loss, [x] + [t for pair in ad for t in pair])
        return [t.detach().float() for o in outs for t in o] + [g.float() for g in grads]

    ref = run()
    tma = _Count(ml._gemm_tma_kernel)
    monkeypatch.setattr(ml, "_gemm_tma_kernel", tma)
    with ml.gemm_kernel("tma"):
        got = run()
    assert tma.n == 2 * 3 + 3  # both branches' base GEMMs, and the student's dx of each linear
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, tol, tol, f"output / gradient {i}", scaled=True)


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_cublas_fp8_forward_accumulates_fast_and_the_dgrad_promotes(recipe, monkeypatch):
    """The cuBLAS form of fast.fp8=native follows torchao's float8 training recipe: each branch's forward
    FP8 GEMM calls ``_scaled_mm(..., use_fast_accum=True)``, the student's dX GEMM of the group the
    promoted default; the cost passes say so (the forward's impl ``CUBLAS_FAST``, the step model prices
    it by the fast rows), and the outputs and gradients stay within the emulation's tolerance."""
    import dopsd_fast.kernels.multi_lora as ml
    from dopsd_fast.fp8 import NativeFP8

    calls = []
    real = torch._scaled_mm

    def record(*args, **kwargs):
        calls.append((args[0].shape[0], args[1].shape[0], bool(kwargs.get("use_fast_accum", False))))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", record)
    bf = torch.bfloat16
    K, Ns, r, Ms, Mt = 64, (64, 48), 8, 37, 45
    ws = [torch.randn(n, K).to(bf) / 8 for n in Ns]
    lo_s = [(torch.randn(r, K).to(bf).requires_grad_(), torch.randn(n, r).to(bf).requires_grad_(), 0.5) for n in Ns]
    lo_t = [(torch.randn(r, K).to(bf), torch.randn(n, r).to(bf), 2.0) for n in Ns]
    x_s = torch.randn(Ms, K).to(bf).requires_grad_()
    x_t = torch.randn(Mt, K).to(bf)
    fp8 = NativeFP8(recipe)
    outs = ml.paired_lora_linears(x_s, x_t, ws, [None, None], lo_s, lo_t, impl="torch", fp8=fp8)
    forward = list(calls)
    loss = sum(y.float().sum() for y, _ in outs)
    (dx,) = torch.autograd.grad(loss, [x_s])
    dgrad = calls[len(forward):]
    # per branch and linear one fast forward GEMM; one promoted dX GEMM over the group's rows
    assert sorted(forward) == sorted((m, K, True) for m in (Ms, Mt) for _ in Ns), forward
    assert dgrad == [(Ms, sum(Ns), False)], dgrad
    emul = fp8.emulate_dgrad([torch.ones(Ms, n).to(bf) for n in Ns], ws).float()  # dy = 1 for loss = sum(y)
    emul = emul + sum(s * (torch.ones(Ms, n) @ b.detach().float()) @ a.detach().float() for (a, b, s), n in zip(lo_s, Ns))
    assert_close(dx.float(), emul, 2e-2, 2e-2, "dx: FP8 dX GEMM vs emulation", scaled=True)
    for (y, _), w, (a, b, s) in zip(outs, ws, lo_s):
        ref = fp8.emulate(x_s.detach(), w).float() + s * (x_s.detach().float() @ a.detach().float().t()) @ b.detach().float().t()
        assert_close(y.detach().float(), ref, 2e-2, 2e-2, "y_s: fast-accumulated FP8 vs emulation", scaled=True)
    from dopsd_fast.kernels._common import COSTS

    wq = [fp8.weight(w) for w in ws]
    no_bias = [torch.empty(0, dtype=bf)] * 2
    fwd = COSTS["dopsd_fast::paired_lora_linears"](
        x_s, x_t, ws, no_bias, [a for a, _, _ in lo_s], [b for _, b, _ in lo_s], [a for a, _, _ in lo_t],
        [b for _, b, _ in lo_t], [0.5, 0.5], [2.0, 2.0], "torch", [q for q, _ in wq], [sc for _, sc in wq],
        recipe == "rowwise")["passes"]
    bwd = COSTS["dopsd_fast::paired_lora_linears_backward"](
        [torch.randn(Ms, n).to(bf) for n in Ns], x_s, ws, torch.randn(Ms, 2 * r).to(bf), [a for a, _, _ in lo_s],
        [b for _, b, _ in lo_s], [0.5, 0.5], "torch", list(fp8.weights_t(ws)), recipe == "rowwise")["passes"]
    assert [p["impl"] for p in fwd if p["kind"] == "gemm_fp8"] == [ml.CUBLAS_FAST] * len(forward)
    assert [p["impl"] for p in bwd if p["kind"] == "gemm_fp8"] == ["cublas"]


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_fp8_on_the_tma_kernel_equals_scaled_mm_and_its_delta(recipe, monkeypatch):
    """fast.fp8=native with our GEMM: each base GEMM is ONE launch of the TMA kernel (e4m3 operands, the
    dequantization scales in its epilogue, then the bf16 LoRA delta and the bias in the same tile; the
    student's dX GEMM of the group likewise, with the LoRA part of dx), equal to ``torch._scaled_mm``
    followed by the delta (the cuBLAS form), outputs and student gradients; both equal the emulation."""
    import dopsd_fast.kernels.multi_lora as ml
    from dopsd_fast.fp8 import NativeFP8

    bf = torch.bfloat16
    K, Ns, r = 64, (64, 48), 8
    ws = [torch.randn(n, K).to(bf) / 8 for n in Ns]
    biases = [None, torch.randn(48).to(bf)]
    lo_s = [(torch.randn(r, K).to(bf), torch.randn(n, r).to(bf), 0.5) for n in Ns]
    lo_t = [(torch.randn(r, K).to(bf), torch.randn(n, r).to(bf), 2.0) for n in Ns]
    x_s, x_t = torch.randn(37, K).to(bf), torch.randn(45, K).to(bf)
    gs = [torch.randn(37, n) for n in Ns]

    def run(impl):
        x = x_s.clone().requires_grad_()
        ad = [(a.clone().requires_grad_(), b.clone().requires_grad_(), s) for a, b, s in lo_s]
        outs = ml.paired_lora_linears(x, x_t, ws, biases, ad, lo_t, impl=impl, fp8=NativeFP8(recipe))
        loss = sum((y.float() * g).sum() for (y, _), g in zip(outs, gs))
        grads = torch.autograd.grad(loss, [x] + [t for a, b, _ in ad for t in (a, b)])
        return [t.detach().float() for o in outs for t in o] + [g.float() for g in grads]

    ref = run("torch")
    tma = _Count(ml._gemm_tma_kernel)
    monkeypatch.setattr(ml, "_gemm_tma_kernel", tma)
    got = run("triton")
    assert tma.n == 2 * len(Ns) + 1  # each branch's base GEMMs, and the group's dX GEMM
    # the forward's FP8 products accumulated in the tensor cores (torchao's forward recipe), the dX GEMM's
    # accumulator promoted to fp32 once per K step (_scaled_mm's default)
    assert [k["PROMOTE"] for k in tma.constexprs] == [False] * 2 * len(Ns) + [True]
    assert {k["SCALE"] for k in tma.constexprs} == {1 if recipe == "rowwise" else 2}
    names = ["y_s 1", "y_t 1", "y_s 2", "y_t 2", "dx", "dA 1", "dB 1", "dA 2", "dB 2"]
    for name, a, b in zip(names, got, ref):
        assert_close(a, b, 2e-2, 2e-2, f"{name}: TMA fp8 vs scaled_mm + delta", scaled=True)
    # the step model's cost of the op is these launches: per branch and linear one FP8 GEMM on our kernel
    # (its delta in the same launch), no pass re-reading y or dx; the dX GEMM of the group likewise
    from dopsd_fast.kernels._common import COSTS

    fp8 = NativeFP8(recipe)
    wq = [fp8.weight(w) for w in ws]
    no_bias = [b if b is not None else torch.empty(0, dtype=bf) for b in biases]
    fwd = COSTS["dopsd_fast::paired_lora_linears"](
        x_s, x_t, ws, no_bias, [a for a, _, _ in lo_s], [b for _, b, _ in lo_s], [a for a, _, _ in lo_t],
        [b for _, b, _ in lo_t], [0.5, 0.5], [2.0, 2.0], "triton", [q for q, _ in wq], [sc for _, sc in wq],
        recipe == "rowwise")["passes"]
    bwd = COSTS["dopsd_fast::paired_lora_linears_backward"](
        [torch.randn(37, n).to(bf) for n in Ns], x_s, ws, torch.randn(37, 2 * r).to(bf), [a for a, _, _ in lo_s],
        [b for _, b, _ in lo_s], [0.5, 0.5], "triton", list(fp8.weights_t(ws)), recipe == "rowwise")["passes"]
    for passes, n in ((fwd, 2 * len(Ns)), (bwd, 1)):
        ours = [p for p in passes if p["kind"] == "gemm_fp8"]
        assert len(ours) == n and all(p["impl"] == "triton" and p["launches"] == 1 for p in ours), ours
        assert not {p["name"] for p in passes} & {ml.LORA_DELTA_Y, ml.LORA_DELTA_DX, ml.ZERO_FILL}
    assert sum(p["launches"] for p in fwd + bwd if p["kind"] in ("gemm", "gemm_fp8") and p["impl"] == "triton"
               and p["name"].startswith("FP8")) == tma.n
    for g, (w, bias, (a, b, s)) in enumerate(zip(ws, biases, lo_s)):  # the student's outputs, emulated
        emul = fp8.emulate(x_s, w).float() + s * (x_s.float() @ a.float().t()) @ b.float().t()
        emul = emul + (bias.float() if bias is not None else 0.0)
        assert_close(got[2 * g], emul, 2e-2, 2e-2, f"y_s {g + 1}: TMA fp8 vs emulation", scaled=True)
