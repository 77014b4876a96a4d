"""CUDA graphs for the no-grad single-branch forwards (validation and sampling roll-outs, a drop-in
caller's teacher-only calls; never the training roll-out, which stays the packed pair), one graph
per input structure, in a bounded cache.

A graph is captured the first time a key (caller's key + the shapes/dtypes of the inputs) is seen,
with static input buffers the later calls copy into. Shapes beyond ``max_graphs`` run eagerly (and
say so once). The parameters the graph reads are fingerprinted at capture (address, shape, dtype):
in-place updates (optimizer step, EMA) keep it valid, while a replaced tensor (a reloaded checkpoint
that swapped parameters, a new adapter, a dtype change) would make the graph read stale memory, so
it raises :class:`GraphStructureError` instead of silently re-capturing or replaying garbage;
:meth:`GraphCache.clear` after such a change is the explicit way on. A graph holds no reference to
what it reads: each entry keeps the cached tables its capture read (:func:`hold`: a per-shape table
taken from a bounded cache stays alive when the cache drops it). A capture that fails (CUDA refuses
an op inside it) costs the run nothing but the graph: that input structure runs eagerly from then on,
one warning line names the graph, the structure and the error, and :attr:`GraphCache.failures` keeps
the error text (the benchmark and the GPU test report it; they do not count an eager call as a graph).

What a graph cannot hold is host work inside the forward: a device-to-host read (``.item()``,
``.tolist()``, a ``nonzero``, a data-dependent shape) or a tensor made from Python data (``torch.tensor(list)``, a
host-to-device copy). :func:`capture_guard` finds those on ANY device (the CPU included: it looks at
the ops, not at a stream), so the tests prove a forward capturable without a GPU: run it once (the
warm-up, where the per-shape tables are built and cached), then again under the guard. On the CPU a
tensor the forward makes on the host per call (``torch.arange(n)`` without a device, a table moved
with ``.to(x.device)``) is on the forward's own device, so nothing shows; on a GPU it is a copy from
host memory, which a capture refuses. ``capture_guard(device=...)`` names such a tensor: the tests
run the forward with its weights and inputs on ``meta`` (a stand-in accelerator: shapes, no data),
where a host-made tensor stands out as a CPU tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("dopsd_fast")


class GraphStructureError(RuntimeError):
    pass


class GraphCaptureError(RuntimeError):
    """Host work inside a forward that a CUDA graph would capture (see :func:`capture_guard`)."""

# ops that read device values on the host (a sync: illegal while capturing) or put host data on
# the device (a copy from pageable memory per call: illegal while capturing, stale on replay)
_HOST_OPS = {
    "aten::_local_scalar_dense": "reads a device value on the host (.item(), bool(), a Python number)",
    "aten::lift_fresh": "makes a tensor from Python data (torch.tensor(...)) per call",
    "aten::lift_fresh_copy": "makes a tensor from Python data (torch.tensor(...)) per call",
    "aten::nonzero": "has a data-dependent output shape (nonzero / boolean indexing)",
    "aten::masked_select": "has a data-dependent output shape (masked_select / boolean indexing)",
    "aten::unique_dim": "has a data-dependent output shape (unique)",
    "aten::_unique2": "has a data-dependent output shape (unique)",
    "aten::repeat_interleave.Tensor": "has a data-dependent output shape (repeat_interleave by a tensor)",
    # CUDA kernels that read a device value on the host INSIDE the op (the .item() is below the dispatcher,
    # so the op is all a guard sees): a sync, illegal while capturing
    "aten::equal": "compares on the device and returns a Python bool (a device-to-host read inside the op)",
    "aten::bincount": "reads its output length on the host (a data-dependent shape)",
    "aten::unique_consecutive": "has a data-dependent output shape (unique_consecutive)",
    "aten::unique_dim_consecutive": "has a data-dependent output shape (unique_consecutive)",
    "aten::_unique": "has a data-dependent output shape (unique)",
}

# Python-level CUDA calls that dispatch no op: each is illegal inside a capture (a sync, or a query of
# the capturing stream), whatever the forward's device
_HOST_CALLS = {
    ("torch.cuda", "synchronize"): "waits for the device (a sync)",
    ("torch.cuda", "empty_cache"): "frees cached device memory (not allowed while a graph captures)",
    ("torch.cuda.Stream", "synchronize"): "waits for a stream (a sync)",
    ("torch.cuda.Stream", "query"): "queries a stream (illegal on a capturing stream)",
    ("torch.cuda.Event", "synchronize"): "waits for an event (a sync)",
    ("torch.cuda.Event", "query"): "queries an event (illegal while capturing)",
}


def _host_work(func, args, kwargs) -> str | None:
    """Why ``func`` cannot be captured (host work), or None."""
    name = func._schema.name + ("." + func._overloadname if func._overloadname != "default" else "")
    why = _HOST_OPS.get(name) or _HOST_OPS.get(func._schema.name)
    if name == "aten::repeat_interleave.Tensor" and kwargs.get("output_size") is not None:
        why = None
    if name == "aten::histc":
        # histc(input, bins=100, min=0, max=0): min == max means "the input's own range"
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        if lo == hi:
            why = "reads the input's min / max on the host (no range given: a sync)"
    if why is None and func._schema.name in ("aten::index", "aten::index_put", "aten::index_put_"):
        idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
            why = "indexes by a boolean mask (a data-dependent shape)"
    if why is None and func._schema.name in ("aten::_to_copy", "aten::copy_"):
        devs = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        if "device" in kwargs and kwargs["device"] is not None:
            devs.add(torch.device(kwargs["device"]).type)
        if len(devs) > 1:
            why = f"copies between devices ({' -> '.join(sorted(devs))})"
    return why


def _off_device(func, args, kwargs, out, device: torch.device) -> str | None:
    """A tensor this op reads or makes on another device than the forward's (0-dim CPU tensors are
    scalars, read without a copy)."""
    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from tensors(y)

    for role, group in (("reads", (*args, *kwargs.values())), ("makes", (out,))):
        for t in tensors(group):
            if t.device.type != device.type and not (t.device.type == "cpu" and t.dim() == 0):
                return (f"{role} a {t.device.type} tensor of shape {tuple(t.shape)} while the forward runs on "
                        f"{device.type}: a tensor made on the host per call (on a GPU a host-to-device copy)")
    return None


def _resolve(dotted: str):
    """``torch.cuda`` / ``torch.cuda.Stream``: the object, or None where this build lacks it."""
    obj = torch
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def capture_guard(device: torch.device | str | None = None):
    """A context in which an op a CUDA graph cannot capture raises :class:`GraphCaptureError`
    naming it (see :data:`_HOST_OPS`, CUDA kernels that sync inside included; also any copy between
    devices, ``Tensor.tolist()`` / ``.numpy()``, host reads that dispatch no op, and the Python-level
    CUDA calls of :data:`_HOST_CALLS`: ``torch.cuda.synchronize()``, a stream's or event's
    ``synchronize()`` / ``query()``, ``torch.cuda.empty_cache()``). It inspects the dispatched ops, so it works on the
    CPU. ``aten::repeat_interleave`` given ``output_size`` is allowed (no sync).
    ``device``: the forward's device; any other tensor an op reads or makes is host work too (run
    the forward on ``meta`` to see on the CPU what would be a host-to-device copy on a GPU)."""

    dev = torch.device(device) if device is not None else None

    class _Guard(TorchDispatchMode):
        # reads of a tensor's values on the host that dispatch no op (so __torch_dispatch__ never sees
        # them): on a GPU each is a device-to-host copy and a sync
        _HOST_READS = ("tolist", "numpy", "__array__")

        def __enter__(self):
            self._saved = {(torch.Tensor, n): getattr(torch.Tensor, n) for n in self._HOST_READS}
            for n in self._HOST_READS:
                def refuse(*_a, _n=n, **_k):
                    raise GraphCaptureError(f"Tensor.{_n}() reads a tensor's values on the host (a device-to-host "
                                            "copy and a sync): a CUDA graph cannot capture it; keep the host copy "
                                            "(a Python list) beside the tensor, built once per shape")
                setattr(torch.Tensor, n, refuse)
            for (owner_name, n), why in _HOST_CALLS.items():
                owner = _resolve(owner_name)
                if owner is None or not hasattr(owner, n):
                    continue
                self._saved[(owner, n)] = getattr(owner, n)

                def refuse_call(*_a, _what=f"{owner_name}.{n}()", _why=why, **_k):
                    raise GraphCaptureError(f"{_what} {_why}: a CUDA graph cannot capture it; do it outside the "
                                            "captured forward")
                setattr(owner, n, refuse_call)
            return super().__enter__()

        def __exit__(self, *exc):
            for (owner, n), f in self._saved.items():
                setattr(owner, n, f)
            return super().__exit__(*exc)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            why = _host_work(func, args, kwargs)
            out = func(*args, **kwargs) if why is None else None
            if why is None and dev is not None:
                why = _off_device(func, args, kwargs, out, dev)
            if why is not None:
                name = func._schema.name + ("." + func._overloadname if func._overloadname != "default" else "")
                raise GraphCaptureError(f"{name} {why}: a CUDA graph cannot capture it; build it once per shape "
                                        "outside the forward (a cached table) or keep it on the device")
            return out

    return _Guard()


@dataclass
class GraphEntry:
    static_inputs: list
    outputs: tuple
    replay: Callable[[], None]
    fingerprint: tuple = field(default=())
    keep: tuple = field(default=())  # the cached tables its capture read (see :func:`hold`)


_HELD: list | None = None  # while a graph is captured: what its forward took from caches of its own


def hold(obj):
    """``obj`` (a cached per-shape table, or a structure of them), returned as is. While a CUDA graph is
    captured it is kept with that graph: a graph holds no reference to the memory it reads, and a bounded
    cache that later drops the table (other shapes) would free memory every replay still reads, silently
    wrong. The fast models pass each table they take from their caches through this (no dispatch mode:
    one would turn ``fast.compile: ops`` off, as torch.compile declines to run under one)."""
    if _HELD is not None:
        _HELD.append(obj)
    return obj


class CudaGraphBackend:
    """Warm-up on a side stream, then capture into a graph sharing one memory pool."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = None

    def capture(self, fn, inputs) -> GraphEntry:
        static = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        global _HELD
        _HELD, held = [], _HELD
        try:
            with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
                out = fn(*static)
            keep = tuple(_HELD)
        finally:
            _HELD = held
        return GraphEntry(static, out if isinstance(out, tuple) else (out,), graph.replay, keep=keep)


class GraphCache:
    """``cache(key, *inputs)`` == ``fn(*inputs)`` (a tuple of tensors), through captured graphs.

    ``params``: returns the tensors the graphs read (for the structure fingerprint).
    ``backend``: how to capture (CUDA graphs by default; tests pass a stand-in).
    """

    def __init__(self, fn: Callable, params: Callable[[], Iterable[torch.Tensor]], max_graphs: int = 8,
                 backend=None, name: str = "graph"):
        if max_graphs < 1:
            raise ValueError("max_graphs must be >= 1")
        self.fn, self.params, self.max_graphs, self.name = fn, params, max_graphs, name
        self.backend = backend or CudaGraphBackend()
        self.entries: dict = {}
        self.captures = self.replays = self.eager_calls = 0
        self.failures: dict = {}  # {input structure: "ErrorType: text"} of the captures that failed
        self._warned = False

    def fingerprint(self) -> tuple:
        return tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in self.params())

    def clear(self) -> None:
        self.entries.clear()
        self.failures.clear()

    def _eager(self, inputs) -> tuple:
        self.eager_calls += 1
        with torch.no_grad():
            out = self.fn(*inputs)
        return out if isinstance(out, tuple) else (out,)

    def __call__(self, key, *inputs: torch.Tensor) -> tuple:
        sig = (key, tuple((tuple(x.shape), x.dtype, str(x.device)) for x in inputs))
        fp = self.fingerprint()
        entry = self.entries.get(sig)
        if entry is None:
            if sig in self.failures:
                return self._eager(inputs)
            if len(self.entries) >= self.max_graphs:
                if not self._warned:
                    log.warning("%s: %d graphs captured (the limit); new shapes run eagerly", self.name,
                                self.max_graphs)
                    self._warned = True
                return self._eager(inputs)
            try:
                entry = self.backend.capture(self.fn, inputs)
            except Exception as exc:  # noqa: BLE001 - the run goes on without this graph, and says why
                text = f"{type(exc).__name__}: {exc}".strip()
                self.failures[sig] = text
                first = text.splitlines()[0] if text else type(exc).__name__
                log.warning("%s: CUDA graph capture failed for %s %s (%s); this input structure runs eagerly "
                            "from now on (fast.graphs=false turns graphs off)", self.name, sig[0],
                            [s for s, _, _ in sig[1]], first[:300])
                return self._eager(inputs)
            entry.fingerprint = fp
            self.entries[sig] = entry
            self.captures += 1
            log.info("%s: captured a graph for %s (%d cached)", self.name, sig[0], len(self.entries))
        elif entry.fingerprint != fp:
            raise GraphStructureError(
                f"{self.name}: the parameters a captured graph reads were replaced (address, shape or dtype "
                "changed); call .clear() after changing the model's structure")
        for buf, x in zip(entry.static_inputs, inputs):
            buf.copy_(x)
        entry.replay()
        self.replays += 1
        return tuple(o.clone() for o in entry.outputs)
