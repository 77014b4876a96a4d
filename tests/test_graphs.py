"""The CUDA-graph cache's logic, checked without CUDA through a stand-in capture backend that
records captures and replays the function on its static buffers (what a graph does)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dopsd_fast.graphs import GraphCache, GraphEntry, GraphStructureError


class FakeBackend:
    def __init__(self):
        self.captured = 0

    def capture(self, fn, inputs):
        self.captured += 1
        static = [x.clone() for x in inputs]
        outs = list(fn(*static))

        def replay():  # recompute into the same output buffers, from the static inputs
            with torch.no_grad():
                for o, new in zip(outs, fn(*static)):
                    o.copy_(new)

        return GraphEntry(static, tuple(outs), replay)


def test_capture_once_per_structure_replay_with_new_values_and_limit():
    w = torch.nn.Parameter(torch.randn(4, 4))
    fn = lambda x: (x @ w,)  # noqa: E731
    cache = GraphCache(fn, lambda: [w], max_graphs=2, backend=FakeBackend())
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(cache("a", x1)[0], x1 @ w.detach())
    torch.testing.assert_close(cache("a", x2)[0], x2 @ w.detach())  # replay reads the new input values
    assert (cache.captures, cache.replays) == (1, 2)
    cache("a", torch.randn(5, 4))  # new shape: new graph
    assert cache.captures == 2
    y = cache("b", x1)[0]  # over the limit: eager, still correct
    torch.testing.assert_close(y, x1 @ w.detach())
    assert cache.eager_calls == 1 and cache.captures == 2
    # in-place parameter updates (optimizer / EMA) are seen by the graph
    with torch.no_grad():
        w.mul_(2)
    torch.testing.assert_close(cache("a", x1)[0], x1 @ w.detach())


def test_replaced_parameter_raises_and_clear_recovers():
    lin = torch.nn.Linear(4, 4)
    cache = GraphCache(lambda x: (lin(x),), lambda: list(lin.parameters()), backend=FakeBackend())
    x = torch.randn(2, 4)
    cache("k", x)
    lin.weight = torch.nn.Parameter(torch.randn(4, 4))  # structure change: a new tensor
    with pytest.raises(GraphStructureError, match="replaced"):
        cache("k", x)
    cache.clear()
    torch.testing.assert_close(cache("k", x)[0], lin(x).detach())


def test_outputs_are_not_aliased_to_the_graph_buffers():
    w = torch.randn(3, 3)
    cache = GraphCache(lambda x: (x @ w,), lambda: [w], backend=FakeBackend())
    a = cache("k", torch.ones(2, 3))[0]
    cache("k", torch.zeros(2, 3))
    assert a.abs().sum() > 0  # the first result survived the second replay


def _cuda_standins(monkeypatch):
    """The CUDA calls of :class:`CudaGraphBackend`'s capture, as CPU stand-ins: the capture runs the
    forward once (no replay is recorded: these tests look at what a captured entry keeps)."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())


def test_a_graph_keeps_alive_the_tables_it_reads(monkeypatch):
    """A CUDA graph holds no reference to the memory it reads: a table its forward took from a bounded
    cache, dropped by that cache later (another shape), would be freed and its memory reused while every
    replay still reads it, silently wrong. The entry keeps what the forward passed through ``hold``
    during the capture (the table), nothing from the warm-up."""
    import gc
    import weakref

    from dopsd_fast.graphs import CudaGraphBackend, hold

    _cuda_standins(monkeypatch)
    tables, w = {}, torch.randn(4)

    def fwd(x):
        n = x.shape[0]
        if n not in tables:
            tables.clear()  # a bounded cache (of one): a new shape drops the table of the last
            tables[n] = torch.arange(float(n))[:, None]
        return ((x * hold(tables[n])).exp() + w,)

    cache = GraphCache(fwd, lambda: [w], backend=CudaGraphBackend())
    cache("k", torch.randn(3, 4))
    table = weakref.ref(tables[3])
    fwd(torch.randn(5, 4))  # another shape, launched: the cache drops the table the graph reads
    gc.collect()
    assert 3 not in tables and table() is not None, "the graph's table was freed while the graph is cached"
    (entry,) = cache.entries.values()
    assert len(entry.keep) == 1 and entry.keep[0] is table()  # the capture's call alone, not the warm-ups'
    cache.clear()
    del entry
    gc.collect()
    assert table() is None  # dropped with the graph


class _ReadsBeyond(TorchDispatchMode):
    """Inside: the tensors the ops read that were not made inside, as {storage key: tensor} (a jagged
    batch's values and offsets in place of the nested tensor)."""

    def __init__(self):
        super().__init__()
        self.made, self.read = set(), {}

    @staticmethod
    def key(t):
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        return (t.device.type, ptr) if ptr else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in _plain(((args, kwargs or {}))):
            k = self.key(t)
            if k is not None and k not in self.made:
                self.read.setdefault(k, t)
        out = func(*args, **(kwargs or {}))
        for t in _plain(out):
            k = self.key(t)
            if k is not None and k not in self.read:
                self.made.add(k)
        return out


def _plain(x):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from torch.utils._pytree import tree_flatten

    for t in tree_flatten(x)[0]:
        if isinstance(t, torch.Tensor):
            if is_traceable_wrapper_subclass(t):
                yield from _plain([getattr(t, n) for n in t.__tensor_flatten__()[0]])
            else:
                yield t


@pytest.mark.parametrize("builder", ["_zimage", "_klein"])
def test_every_cached_table_a_captured_forward_reads_is_held(monkeypatch, builder):
    """Both families' no-grad forwards, captured (CPU stand-ins for the CUDA calls): every tensor the
    capture reads beyond its inputs and the model's parameters is held with the graph (a table of the
    model's caches not passed through ``hold`` would be freed when its cache drops it)."""
    from dopsd_fast.graphs import CudaGraphBackend
    from dopsd_fast.models.ops import build_ops
    from tests.kernels import test_graph_capture as gpu_test

    _cuda_standins(monkeypatch)
    st, fwd, x0, ctx = getattr(gpu_test, builder)(build_ops("off", "sdpa", torch.device("cpu")), torch.float32)
    for which in "st":
        reads = _ReadsBeyond()
        monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None, **k: reads)  # the capture's call recorded
        cache = GraphCache(lambda x, s, *c, w=which: (fwd(w, x, s, *c),), lambda: list(st.transformer.parameters()),
                           backend=CudaGraphBackend())
        inputs = (x0, torch.tensor([0.7, 0.2]), *ctx[which])
        cache("k", *inputs)
        (entry,) = cache.entries.values()
        known = {reads.key(t) for t in (*inputs, *entry.static_inputs, *st.transformer.parameters(), *_plain(entry.keep),
                                        *getattr(fwd, "constants", ()))}
        loose = [tuple(t.shape) for k, t in reads.read.items() if k not in known and t.dim() > 0]
        assert entry.keep and not loose, f"{builder} {which}: tables read but not held: {loose}"


def test_klein_graph_keeps_its_rope_tables_when_the_cache_drops_them(monkeypatch):
    """klein's RoPE tables (a bounded cache of 64 structures) read by a captured forward stay alive
    after 65 other text lengths have gone through the forward and the cache dropped them."""
    import gc
    import weakref

    from dopsd_fast.adapters.base import Context
    from dopsd_fast.graphs import CudaGraphBackend
    from dopsd_fast.models.ops import build_ops
    from tests.test_fast_flux2 import _fast, _setup

    _cuda_standins(monkeypatch)
    _, st, _, _ = _setup(True)
    fast = _fast(st, ops=build_ops("off", "sdpa", torch.device("cpu")))

    def fwd(x, sigma, *feats):
        return (fast.velocity_pair(x, sigma, [Context(f) for f in feats], None)[0],)

    x, sigma = torch.randn(2, 16, 6, 4), torch.tensor([0.7, 0.2])
    cache = GraphCache(fwd, lambda: list(st.transformer.parameters()), backend=CudaGraphBackend())
    cache("k", x, sigma, *[torch.randn(24, 96) for _ in range(2)])
    tables = [weakref.ref(t) for v in fast._rope.values() for cs in v[:2] for t in cs]
    assert len(tables) == 4  # text and image, cos and sin
    with torch.no_grad():
        for n in range(25, 90):  # 65 other text lengths, launched
            fwd(x, sigma, *[torch.randn(n, 96) for _ in range(2)])
    gc.collect()
    assert all(t() is not None for t in tables), "a table the captured graph reads was freed"
    assert not any(t() is c for t in tables for v in fast._rope.values() for cs in v[:2] for c in cs)  # dropped
    (entry,) = cache.entries.values()
    assert {id(t()) for t in tables} <= {id(t) for t in _plain(entry.keep)}


class RefusingBackend(FakeBackend):
    """A capture that fails the way CUDA refuses an op inside a capture."""

    def capture(self, fn, inputs):
        self.captured += 1
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore text")


def test_failed_capture_runs_eagerly_says_so_once_and_keeps_the_error(caplog):
    """A capture CUDA refuses costs the run the graph, not the run: that structure runs eagerly (right
    values, no second capture attempt), one warning line names it and the error, and the error text is
    kept for the benchmark and the GPU test; another structure still gets its own capture attempt."""
    w = torch.randn(4, 4)
    backend = RefusingBackend()
    cache = GraphCache(lambda x: (x @ w,), lambda: [w], backend=backend, name="s forward")
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    with caplog.at_level("WARNING", logger="dopsd_fast"):
        for x in (x1, x2, x1):
            torch.testing.assert_close(cache("k", x)[0], x @ w)
    assert (backend.captured, cache.captures, cache.replays, cache.eager_calls) == (1, 0, 0, 3)
    warned = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(warned) == 1 and "s forward" in warned[0] and "not permitted when stream is capturing" in warned[0]
    assert "\n" not in warned[0]  # one line
    (err,) = cache.failures.values()
    assert err.startswith("RuntimeError: CUDA error: operation not permitted")
    cache("k", torch.randn(5, 4))  # a new structure is tried
    assert backend.captured == 2 and len(cache.failures) == 2
    cache.clear()  # and clear() forgets the failures (a changed model may capture)
    cache("k", x1)
    assert backend.captured == 3


class GuardedBackend(FakeBackend):
    """The stand-in with what a CUDA graph demands of the function: a warm-up call (where per-shape
    tables get built and cached, as on the GPU's side stream), then the capture and every replay
    under :func:`~dopsd_fast.graphs.capture_guard` (no host work inside)."""

    def capture(self, fn, inputs):
        from dopsd_fast.graphs import capture_guard

        self.captured += 1
        static = [x.clone() for x in inputs]
        with torch.no_grad():
            fn(*static)
            with capture_guard():
                outs = list(fn(*static))

        def replay():
            with torch.no_grad(), capture_guard():
                for o, new in zip(outs, fn(*static)):
                    o.copy_(new)

        return GraphEntry(static, tuple(outs), replay)


def test_capture_guard_names_host_work():
    """What a CUDA graph cannot hold is found on the CPU, by op: a device value read on the host, a
    tensor from Python data, a data-dependent shape, a copy between devices; device work passes."""
    from dopsd_fast.graphs import GraphCaptureError, capture_guard

    x = torch.randn(6)
    bad = {"_local_scalar_dense": lambda: x.sum().item(), "lift_fresh": lambda: torch.tensor([0, 3]),
           "boolean mask": lambda: x[x > 0], "nonzero": lambda: torch.nonzero(x),
           "repeat_interleave": lambda: torch.repeat_interleave(x, torch.full((6,), 2)),
           "between devices": lambda: x.to("meta")}
    for what, fn in bad.items():
        with pytest.raises(GraphCaptureError, match=what), capture_guard():
            fn()
    with capture_guard():  # device work, shapes known on the host: allowed
        y = (x * 2 + torch.arange(6)).view(2, 3)[:, 1:].sum(-1)
        torch.repeat_interleave(torch.arange(2), torch.ones(2, dtype=torch.long), output_size=2)
        x[torch.arange(3)]
    assert y.shape == (2,)


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_fast_path_graphs_capture_safe_and_training_stays_packed(tmp_path, family):
    """fast.graphs on both families: each branch's no-grad forward (validation, sampling) through the
    graph cache is capture-safe after its warm-up (no host work: the guard) and equals the launched
    forward; the training roll-out never goes through a graph (the packed pair, the teacher never
    unpacked) and gives the same step."""
    from dopsd_fast.families import FAMILIES
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    extra = FAMILIES[family].tiny_overrides()
    tr = Trainer(tiny_config(tmp_path, "fast.enabled=true", *extra))
    tr.train_step()
    fp = tr.pair
    samples = tr.next_samples(1, 0)
    noise = tr.noise_for(samples, 1, 0)
    ctx = {"s": [c.to(tr.device) for c in tr.contexts.student(samples)],
           "t": [c.to(tr.device) for c in tr.contexts.teacher(samples)]}
    sigma = torch.full((noise.shape[0],), 0.6)
    with torch.no_grad():
        launched = {b: [fp.velocity(b, x, sigma, ctx[b]) for x in (noise, 0.5 * noise)] for b in "st"}
    fp.graphs, fp.graph_backend = {}, GuardedBackend()
    with torch.no_grad():
        graphed = {b: [fp.velocity(b, x, sigma, ctx[b]) for x in (noise, 0.5 * noise)] for b in "st"}
    for b in "st":
        for got, want in zip(graphed[b], launched[b]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fp.graph_backend.captured == 2 and sum(c.replays for c in fp.graphs.values()) == 4

    calls = []
    inner = fp.model.velocity_pair
    fp.model.velocity_pair = lambda x, s, cs, ct, **kw: calls.append((cs is not None, ct is not None)) or inner(
        x, s, cs, ct, **kw)
    tr.train_step()
    assert calls and set(calls) == {(True, True)}, calls  # every state: both branches in one packed pass
    assert fp.graph_backend.captured == 2  # the step captured nothing


def test_capture_guard_names_host_work_the_cpu_cannot_see():
    """Two kinds of host work a CPU run of a forward hides: a host read that dispatches no op
    (``.tolist()``, ``.numpy()``: on a GPU a device-to-host copy and a sync), and a tensor made on
    the host per call and moved to the forward's device (on the CPU it already is there: no copy, no
    op; on a GPU a copy from host memory). The guard names the first on any device and, given the
    forward's device, the second on ``meta`` (a stand-in accelerator: shapes, no data)."""
    from dopsd_fast.graphs import GraphCaptureError, capture_guard

    x = torch.randn(2, 6)
    for what, fn in {"tolist": lambda: x.sum(0).tolist(), "numpy": lambda: x.numpy()}.items():
        with pytest.raises(GraphCaptureError, match=what), capture_guard():
            fn()
    assert x.tolist() and x.numpy().shape == (2, 6)  # restored after the guard

    def host_table(x):  # positions built per call on the host, then moved: the CPU run shows no copy
        return x + torch.arange(x.shape[-1]).to(x.device, x.dtype)

    with capture_guard():
        host_table(x)  # on the CPU: nothing to see
    xm = x.to("meta")
    with pytest.raises(GraphCaptureError, match="arange makes a cpu tensor of shape \\(6,\\)"), \
            capture_guard(device="meta"):
        host_table(xm)
    table = torch.arange(6, device="meta", dtype=x.dtype)  # built once per shape, outside the forward
    scalar = torch.tensor(2.0)
    with capture_guard(device="meta"):
        y = xm + table * scalar  # a 0-dim CPU tensor is a scalar argument: no copy
    assert y.device.type == "meta"


def test_capture_guard_names_syncs_inside_ops_and_python_cuda_calls():
    """Host work a forward's ops hide below the dispatcher: CUDA kernels that read a device value on
    the host inside the op (``torch.equal``, ``bincount``, ``unique_consecutive``, ``histc`` without a
    range), and Python-level CUDA calls that dispatch no op at all (``torch.cuda.synchronize()``, a
    stream's or event's ``synchronize()`` / ``query()``, ``empty_cache()``). Each is named on the CPU;
    the patched calls are restored after the guard, and device work with known shapes passes."""
    from dopsd_fast.graphs import GraphCaptureError, capture_guard

    x, i = torch.randn(6), torch.tensor([0, 0, 2, 1])
    bad = {"aten::equal": lambda: torch.equal(x, x), "aten::bincount": lambda: torch.bincount(i),
           "unique_consecutive": lambda: torch.unique_consecutive(i), "aten::histc": lambda: torch.histc(x, bins=4),
           "torch.cuda.synchronize": lambda: torch.cuda.synchronize(),
           "torch.cuda.empty_cache": lambda: torch.cuda.empty_cache(),
           "torch.cuda.Stream.synchronize": lambda: torch.cuda.Stream.synchronize(None),
           "torch.cuda.Stream.query": lambda: torch.cuda.Stream.query(None),
           "torch.cuda.Event.synchronize": lambda: torch.cuda.Event.synchronize(None),
           "torch.cuda.Event.query": lambda: torch.cuda.Event.query(None)}
    for what, fn in bad.items():
        with pytest.raises(GraphCaptureError, match=what.replace(".", "\\.")), capture_guard():
            fn()
    with pytest.raises(GraphCaptureError, match="aten::histc"), capture_guard():
        torch.histc(x, 4, 1, 1)  # min == max, given positionally: the input's own range again
    originals = (torch.cuda.synchronize, torch.cuda.Stream.query, torch.Tensor.tolist)
    with capture_guard():
        torch.histc(x, bins=4, min=-3, max=3)  # a range given: no host read
        torch.histc(x, 4, -3, 3)
        y = x[torch.arange(3)] * 2  # device work, shapes known on the host
    assert y.shape == (3,)
    assert (torch.cuda.synchronize, torch.cuda.Stream.query, torch.Tensor.tolist) == originals  # restored


def _klein_forward(ops, meta):
    from dopsd_fast.adapters.base import Context
    from tests.test_fast_flux2 import _fast, _setup

    _, st, _, _ = _setup(True)
    st.transformer.to(meta)
    fast = _fast(st, ops=ops)
    refs = [torch.randn(16, 6, 4, device=meta) for _ in range(2)]

    def fwd(which):
        cs = [Context(torch.randn(24, 96, device=meta), {"ref0": r} if which == "t" else {}) for r in refs]
        return fast.velocity_pair(torch.randn(2, 16, 6, 4, device=meta), torch.rand(2, device=meta),
                                  *((cs, None) if which == "s" else (None, cs)))
    return fwd


def _zimage_forward(ops, meta):
    from tests.test_fast_zimage import _fast, _model

    st = _model(True)
    st.transformer.to(meta)
    fast = _fast(st, ops=ops)

    def fwd(which):
        caps = [torch.randn(n, 32, device=meta) for n in ((5, 33) if which == "s" else (40, 3))]
        return fast.forward_pair(torch.randn(2, 16, 10, 6, device=meta), torch.rand(2, device=meta),
                                 caps if which == "s" else None, caps if which == "t" else None,
                                 student=which == "s")
    return fwd


_JAGGED = pytest.mark.skip(reason="PyTorch's jagged SDPA has no meta path (autocast dispatch on an unknown device)")


@pytest.mark.parametrize("build,kernels,attention", [
    pytest.param(_zimage_forward, "off", "sdpa", marks=_JAGGED, id="zimage-off-sdpa"),
    pytest.param(_zimage_forward, "on", "triton", id="zimage-on-triton"),
    pytest.param(_klein_forward, "off", "sdpa", id="klein-off-sdpa"),
    pytest.param(_klein_forward, "on", "triton", id="klein-on-triton"),
])
def test_no_grad_forwards_make_nothing_on_the_host(build, kernels, attention):
    """Both families' single-branch no-grad forwards (what fast.graphs captures) with their weights
    and inputs on ``meta``: after the warm-up (per-shape tables built and cached), nothing of theirs is
    made on the host, read back, or copied between devices. (Z-Image with ``sdpa`` runs its ragged
    captions through PyTorch's jagged SDPA, which has no meta path: not checked here; the GPU test
    captures it.)"""
    from dopsd_fast.graphs import capture_guard
    from dopsd_fast.models.ops import build_ops

    meta = torch.device("meta")
    fwd = build(build_ops(kernels, attention, torch.device("cpu")), meta)
    for which in "st":
        with torch.no_grad():
            fwd(which)  # the warm-up
            with capture_guard(device=meta):
                out = fwd(which)
        assert out[0 if which == "s" else 1].device == meta


@pytest.mark.parametrize("builder", ["_zimage", "_klein"])
def test_the_gpu_capture_test_runs_its_models_in_the_dtype_it_names(monkeypatch, builder):
    """The GPU capture test compares fp32 replays at 1e-4 and bf16 at its rounding: its models must be in
    the dtype it names where ``model.dtype: auto`` would pick bf16 (a GPU machine: on the H200, klein's
    tiny config built through ``auto`` ran in bf16 and was compared at the fp32 tolerance). The base in
    that dtype, the adapters fp32."""
    import dopsd_fast.families as families
    from dopsd_fast.models.ops import build_ops
    from tests.kernels import test_graph_capture as gpu_test

    monkeypatch.setattr(families, "resolve_device_dtype", lambda cfg: (torch.device("cpu"), torch.bfloat16))
    for name, dtype in gpu_test.DTYPES.items():
        st = getattr(gpu_test, builder)(build_ops("off", "sdpa", torch.device("cpu")), dtype)[0]
        adapters = {id(p) for p in (*st.named_trainable().values(), *st.named_teacher().values())}
        base = {p.dtype for p in st.transformer.parameters() if id(p) not in adapters}
        assert base == {dtype}, f"{builder} {name}: base weights in {base}"
        assert {st.named_trainable()[k].dtype for k in st.named_trainable()} == {torch.float32}


class ReplayBackend:
    """A CPU stand-in with a CUDA graph's replay semantics: the capture call's dispatched ops are recorded
    with the tensors they read and wrote, and a replay runs that op list again into the same output
    tensors. The forward's Python does not run at replay, as on a GPU: a value it decided on the host at
    capture (a cached per-shape value made from an input, a Python number read from a tensor, a branch)
    stays what it was. (:class:`FakeBackend` re-runs the Python: it cannot see that.)"""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup

    def capture(self, fn, inputs):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ops.append((func, args, kwargs or {}, out))
                return out

        def tensors(x):  # a jagged batch's values and offsets in place of the nested tensor
            return list(_plain(x))

        static = [x.clone() for x in inputs]
        with torch.no_grad():
            for _ in range(self.warmup):
                fn(*static)
            with Record():
                out = fn(*static)

        def replay():
            with torch.no_grad():
                for func, args, kwargs, was in ops:
                    for old, new in zip(tensors(was), tensors(func(*args, **kwargs))):
                        if (old.data_ptr(), old.shape, old.stride()) != (new.data_ptr(), new.shape, new.stride()):
                            old.copy_(new)  # (a view of the same memory, or an in-place op's own result: as is)

        return GraphEntry(static, out if isinstance(out, tuple) else (out,), replay)


def test_replay_backend_sees_a_value_baked_in_at_capture():
    """The stand-in can fail: a per-shape cache of a value made from an input replays stale."""
    cache_of_shape = {}

    def fwd(x, sigma):
        if x.shape not in cache_of_shape:
            cache_of_shape[x.shape] = sigma * 2  # made from an input, cached by shape: stale on replay
        return (x + cache_of_shape[x.shape],)

    def honest(x, sigma):
        return (x + sigma * 2,)

    x = torch.randn(3)
    for f, stale in ((fwd, True), (honest, False)):
        cache_of_shape.clear()
        cache = GraphCache(f, lambda: [], backend=ReplayBackend())
        cache("k", x, torch.tensor(1.0))
        got = cache("k", x, torch.tensor(5.0))[0]
        assert torch.equal(got, x + 2.0) is stale and torch.equal(got, x + 10.0) is not stale


# Z-Image's captions padded to one length per branch (32, 64): dense SDPA (the stand-in records no jagged batch)
_EQUAL_CAPTIONS = {"s": (5, 30), "t": (40, 33)}


@pytest.mark.parametrize("builder,captions", [
    pytest.param("_zimage", _EQUAL_CAPTIONS, id="zimage-off-sdpa"),
    pytest.param("_klein", None, id="klein-off-sdpa"),
])
def test_graph_replays_of_both_families_equal_their_launched_forwards(builder, captions):
    """Each branch of both families' no-grad forwards captured once (ReplayBackend: the op list, no
    Python at replay) and replayed on new latents and sigmas: bitwise equal to the forward launched op
    by op (the same CPU kernels), so nothing the forward reads is decided once at capture. (Z-Image's
    ragged captions, a jagged batch, are the GPU test's.)"""
    from dopsd_fast.models.ops import build_ops
    from tests.kernels import test_graph_capture as gpu_test

    st, fwd, x0, ctx = getattr(gpu_test, builder)(build_ops("off", "sdpa", torch.device("cpu")), torch.float32)
    if captions:
        ctx = {w: [torch.randn(n, ctx[w][0].shape[1]) for n in lens] for w, lens in captions.items()}
    for which in "st":
        cache = GraphCache(lambda x, s, *c, w=which: (fwd(w, x, s, *c),), lambda: list(st.transformer.parameters()),
                           backend=ReplayBackend())
        for scale, sigma in ((1.0, (0.7, 0.2)), (0.5, (0.3, 0.9)), (-2.0, (0.5, 0.5))):
            x, s = scale * x0, torch.tensor(sigma)
            got = cache("k", x, s, *ctx[which])[0]
            with torch.no_grad():
                want = fwd(which, x, s, *ctx[which])
            assert torch.equal(got, want), f"{builder} {which}: replay differs from the launched forward at {sigma}"
        assert (cache.captures, cache.replays) == (1, 3)
