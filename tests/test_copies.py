"""Item 4 of the fast-path issue: inside a layer of the packed fast path, forward and backward, no
activation-sized copy is executed: no cat, clone, contiguous copy, dtype copy, index gather or scatter,
zero-fill. Counted at the aten level by the profiler, INSIDE our custom ops too (their launchers' aten
calls are profiled like any other; the Triton kernels themselves run in the interpreter, whose own
host-side argument traffic is not device work: it runs inside a marked range and is left out)."""

from dataclasses import replace

import pytest
import torch

# aten ops that move or fill memory without math: what a copy-free layer never executes on activations
COPY_OPS = {"aten::copy_", "aten::index_select", "aten::gather", "aten::index_add_", "aten::scatter_add_",
            "aten::zero_", "aten::fill_", "aten::repeat", "aten::masked_fill_", "aten::where",
            "aten::select_backward", "aten::slice_backward"}
# ops whose tensor arguments come as a list (the profiler records no shapes for them): none at all
LIST_OPS = {"aten::cat", "aten::stack", "aten::index", "aten::index_put_", "aten::_index_put_impl_"}


def _capture(fast, x, t, caps_s, caps_t):
    """The two branches (streams, adaLN inputs) as they enter the main layers, detached: the student's
    hidden states a leaf that requires grad, so a backward from one layer stays in that layer. (Computed
    with the eager-math ops: only the layer under test runs the ops being counted.)"""
    from dopsd_fast.models.ops import TorchOps
    from dopsd_fast.models.zimage import FastZImage

    seen = {}
    orig = FastZImage._run_blocks

    def spy(self, paths, s, t_, adaln, checkpointed=0):
        if paths and paths[0].startswith("layers.") and "s" not in seen:
            seen["s"] = replace(s, stream=replace(s.stream, h=s.stream.h.detach().clone().requires_grad_()))
            seen["t"] = replace(t_, stream=replace(t_.stream, h=t_.stream.h.detach().clone()))
            seen["adaln"] = {k: v.detach() for k, v in adaln.items()}
        return orig(self, paths, s, t_, adaln, checkpointed)

    FastZImage._run_blocks = spy
    ops, fast.ops = fast.ops, TorchOps(attention="sdpa")
    try:
        with torch.no_grad():
            fast.forward_pair(x, t, caps_s, caps_t)
    finally:
        FastZImage._run_blocks = orig
        fast.ops = ops
    return seen["s"], seen["t"], seen["adaln"]


INTERP = "triton_interpreter_launch"


def _inside_interpreter(e):
    while e is not None:
        if e.name == INTERP:
            return True
        e = e.cpu_parent
    return False


def _copies(fast, s, t, adaln, path="layers.1"):
    """(op, input shapes) of every activation-sized copy in one layer's forward + the student's backward."""
    from torch.profiler import ProfilerActivity, profile, record_function

    try:  # the interpreter's host-side argument copies: marked, then left out
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        GridExecutor = None
    orig = GridExecutor.__call__ if GridExecutor is not None else None

    def marked(self, *a, **k):
        with record_function(INTERP):
            return orig(self, *a, **k)

    fast._set_mods(path, s, t, adaln)
    rows = {s.stream.h.shape[0], t.stream.h.shape[0]}
    if orig is not None:
        GridExecutor.__call__ = marked
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            new_s, new_t = fast._block(path, s, t)
            new_s.backward(torch.randn_like(new_s))
    finally:
        if orig is not None:
            GridExecutor.__call__ = orig
    assert new_t is not None and s.stream.h.grad is not None
    found = []
    for e in prof.events():
        sized = e.name in COPY_OPS and any(d in rows for shp in e.input_shapes for d in (shp or []))
        if (sized or e.name in LIST_OPS) and not _inside_interpreter(e):
            found.append((e.name, e.input_shapes))
    return found, rows


def _setup(B):
    from tests.test_fast_zimage import _fast, _inputs, _model

    st = _model(True)
    lens = ([40], [100]) if B == 1 else ([7, 40], [70, 3])  # rows 96 / 160, 160 / 192: no weight dimension
    x, t, caps_s, caps_t = _inputs(B, 8, 8, *lens)
    return st, _fast, x, t, caps_s, caps_t


@pytest.mark.parametrize("B,gemm", [(1, "cublas"), (2, "cublas"), (2, "triton")])
def test_fused_layer_executes_no_activation_copy(B, gemm):
    from dopsd_fast.models.ops import FusedOps

    st, make, x, t, caps_s, caps_t = _setup(B)
    fast = make(st, ops=FusedOps(attention="triton", gemm=gemm))
    s, t_, adaln = _capture(fast, x, t, caps_s, caps_t)
    params = {d for p in st.transformer.parameters() for d in p.shape}
    found, rows = _copies(fast, s, t_, adaln)
    assert not rows & params, f"row counts {rows} collide with a weight dimension: the count would be ambiguous"
    assert not found, f"{len(found)} activation-sized copies in one fused layer: {found[:8]}"


def test_the_count_sees_copies():
    """The same count on the eager-math structure (TorchOps: per-row modulation gathered by index, the
    ragged SDPA path concatenating per-sample outputs) finds them: the check can fail."""
    from dopsd_fast.models.ops import TorchOps

    st, make, x, t, caps_s, caps_t = _setup(2)
    fast = make(st, ops=TorchOps(attention="sdpa"))
    found, _ = _copies(fast, *_capture(fast, x, t, caps_s, caps_t))
    names = {n for n, _ in found}
    assert {"aten::index", "aten::cat"} <= names, names
