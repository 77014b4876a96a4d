"""What the packed student/teacher models of every family share (each family's fast model, e.g.
``dopsd_fast/families/<name>/fast.py``, subclasses :class:`PairedModel`).

A pair is two :class:`Branch` objects: the student (autograd) and the teacher (constants, computed
without autograd), each a (module, LoRA adapter) with its packed token :class:`Stream` and its
per-block modulation. The branches are either one module with two peft adapters (LoRA), one module
with one adapter whose teacher weights come from a :class:`Shadow` (an EMA copy held by the caller,
read in place), or two modules (full fine-tuning: the trainable model and its EMA copy).

Every linear of a block runs for both streams in ONE op with a per-branch LoRA delta, each branch on
its own rows (``ops.paired_linear``; linears that read the same input, q/k/v and w1/w3, as one group:
:meth:`PairedModel.linear_group`); element-wise work runs per branch through :meth:`PairedModel.both`.
The entry point of every fast model is ``velocity_pair(x, sigma, ctx_s, ctx_t) -> (v_s, v_t)`` in
this project's (sigma, v) convention (either context may be None: one branch alone).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dopsd_fast.errors import AdapterError, BackendError
from dopsd_fast.fp8 import fp8_module_filter, is_fp8_linear
from dopsd_fast.models.ops import TorchOps
from dopsd_fast.profiling import nvtx_range
from dopsd_fast.models.ops import FusedOps


@dataclass(eq=False)
class Shadow:
    """The teacher's LoRA weights held outside the module (an EMA shadow copy): adapter ``name``'s
    ``lora_A`` / ``lora_B`` parameters are read from ``tensors`` (keyed by the parameter object's id)
    instead of the module. With ``source`` (the caller's name -> tensor dict) and ``keys`` (the
    parameter's id -> its key there), each read looks the tensor up in ``source`` at that moment: an
    entry rebound by the caller (``ema[k] = new`` rather than in place) is followed, never a stale copy.
    Built by :func:`dopsd_fast.backend.wrap`."""

    name: str
    tensors: dict = field(default_factory=dict)
    source: dict | None = None
    keys: dict = field(default_factory=dict)

    def get(self, param):
        if self.source is not None:
            key = self.keys.get(id(param))
            if key is None:  # never the live student's tensor in the teacher's place
                raise BackendError(f"teacher_shadow: a LoRA tensor of adapter {self.name!r} {tuple(param.shape)} is not "
                                   "one backend.wrap read (the model's LoRA parameters were replaced since): call "
                                   "backend.wrap again")
            try:
                return self.source[key]
            except KeyError:
                raise BackendError(f"teacher_shadow[{key!r}] is gone from the EMA dict handed to backend.wrap; "
                                   "keep every entry (update or rebind it, never delete it)") from None
        return self.tensors.get(id(param), param)


def adapter_name(adapter):
    return adapter.name if isinstance(adapter, Shadow) else adapter


def lora_adapters(module) -> set:
    """The names of the peft LoRA adapters on any submodule of ``module``."""
    return {n for m in module.modules() for n in (getattr(m, "lora_A", None) or {})}


def check_adapters(model, adapters, paired: str, role: str = "student") -> None:
    """Refuse (one line naming the module) peft state that the fast model would silently not apply as
    the eager model does. The fast model reads the adapters ``adapters`` (names or :class:`Shadow`) BY
    NAME on the blocks' linears (``paired``: the family's regex of those module paths) and runs every
    other module whole, through its own forward, where peft applies its ACTIVE adapters to both
    branches; so refused: LoRA on a module outside ``paired`` of an adapter read or active (an inactive
    one neither branch reads is applied by neither, as eagerly), a ``modules_to_save``
    copy, LoRA dropout > 0 or a LoRA bias on a read adapter, an active adapter that is neither read
    one, and LoRA layers in a module handed over with no adapter name."""
    names = {adapter_name(a) for a in adapters if adapter_name(a) is not None}
    pat = re.compile(paired)
    for path, m in model.named_modules():
        if type(m).__name__ == "ModulesToSaveWrapper":
            raise AdapterError(f"fast path: {role} module {path} is a peft modules_to_save copy (one per adapter, "
                               "the active one run for both branches): train only LoRA adapters on the blocks' "
                               "linears, or use the eager path")
        lora_a = getattr(m, "lora_A", None)
        if not lora_a:
            continue
        if not names:
            raise AdapterError(f"fast path: the {role} module carries LoRA adapters {sorted(lora_a)} (e.g. on "
                               f"{path}) but no adapter name was given: pass {role}_adapter=<name>")
        if not pat.fullmatch(path):
            active = getattr(m, "active_adapters", None)
            active = {active} if isinstance(active, str) else set(active or ())
            applied = sorted(set(lora_a) & (names | active))
            if not applied:  # an adapter neither branch reads, inactive: peft applies it to neither, as eagerly
                continue
            raise AdapterError(f"fast path: LoRA adapter(s) {applied} on {path}, a module the fast path runs "
                               "whole (peft would apply its active adapter to the student and the teacher alike): "
                               "put LoRA only on the blocks' attention and feed-forward linears (the family's "
                               "default targets), or use the eager path (the trainer: fast.enabled=false)")
        for n in names & set(lora_a):
            drops = getattr(m, "lora_dropout", None)
            drop = drops[n] if drops is not None and n in drops else None
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                raise AdapterError(f"fast path: adapter {n!r} on {path} has lora_dropout={drop.p:g}, which the fast path "
                                   "does not apply: set lora_dropout=0")
            variant = (getattr(m, "lora_variant", None) or {}).get(n)
            if variant is not None and not getattr(m, "use_dora", {}).get(n, False):
                raise AdapterError(f"fast path: adapter {n!r} on {path} is a peft LoRA variant "
                                   f"({type(variant).__name__}), whose forward the fast path does not apply (it "
                                   "computes plain LoRA, B @ A): use plain LoRA, or the eager path")
            if getattr(m.lora_B[n], "bias", None) is not None:
                raise AdapterError(f"fast path: adapter {n!r} on {path} has a LoRA bias (lora_bias=True), which the "
                                   "fast path does not apply: use lora_bias=False")
        active = getattr(m, "active_adapters", None) or []
        extra = [a for a in ([active] if isinstance(active, str) else active) if a in lora_a and a not in names]
        if extra:
            raise AdapterError(f"fast path: adapter(s) {extra} active on {path} beside the {role}'s "
                               f"{sorted(names)}: the fast path applies only the student and teacher adapters "
                               "(merge a fixed adapter into the base weights, or deactivate it)")


def _adapter_signature(model) -> tuple:
    """What :func:`check_adapters` depends on that a caller changes between steps: the adapters peft
    added (``peft_config``: names, config objects) and the active ones (of the first LoRA layer:
    ``set_adapter`` sets every layer's)."""
    configs = tuple(sorted((k, id(v)) for k, v in (getattr(model, "peft_config", None) or {}).items()))
    layer = next((m for m in model.modules() if getattr(m, "lora_A", None)), None)
    active = getattr(layer, "active_adapters", None) if layer is not None else None
    return configs, tuple([active] if isinstance(active, str) else active or ())


def lora_of(mod, adapter):
    """(weight, bias, (A, B, scale) or None) of a plain or peft-wrapped linear under ``adapter`` (a peft
    adapter name, a :class:`Shadow`, or None for the bare base layer)."""
    if hasattr(mod, "base_layer"):
        if getattr(mod, "merged", False):
            raise AdapterError("fast path: LoRA weights are merged into the base layer (merge_adapter, fuse_lora); "
                               "unmerge them first (unmerge_adapter, unfuse_lora)")
        base = mod.base_layer
        name = adapter_name(adapter)
        if name is not None and name in mod.lora_A:
            if getattr(mod, "use_dora", {}).get(name, False):
                raise AdapterError(f"fast path: adapter {name!r} is a DoRA adapter (use_dora=True), which the fast path "
                                   "does not apply: use plain LoRA, or the eager path (the trainer: fast.enabled=false)")
            a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
            if isinstance(adapter, Shadow):
                a, b = adapter.get(a), adapter.get(b)
            return base.weight, base.bias, (a, b, float(mod.scaling[name]))
        return base.weight, base.bias, None
    return mod.weight, mod.bias, None


class _SharedCast(torch.autograd.Function):
    """``param.to(dtype)`` whose forward returns ``cached`` (that cast, made once per roll-out) and
    whose backward is the cast's own, per use: the gradient goes to ``param`` in its dtype (fp32 for
    LoRA), accumulated there like the per-call cast's (no bf16 sum of the states' gradients)."""

    @staticmethod
    def forward(ctx, cached, param):
        ctx.dtype = param.dtype
        return cached.view_as(cached)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.to(ctx.dtype)


class RolloutShare:
    """What one micro-batch's roll-out reuses across its K states (the same contexts and weights at
    every state; the weights change only at the optimizer step). Here: the LoRA weights cast to the
    compute dtype (fp32 masters -> bf16) once per roll-out instead of at every linear call of every
    state, both branches; the student's through :class:`_SharedCast` (its gradient per use, exact).
    Families add their own (e.g. a context refiner's output shared across the states). ``casts``: the
    cast kernels actually run (what the tests read)."""

    def __init__(self):
        self._casts: dict = {}
        self.casts = 0

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t.to(dtype)``, the cast made once per tensor (and version) in this roll-out."""
        if t.dtype == dtype:
            return t
        key = (id(t), dtype)
        hit = self._casts.get(key)
        if hit is None or hit[0] is not t or hit[1] != t._version:
            with torch.no_grad():  # (no detach(): a view of the master; a cast under no_grad has no history)
                hit = (t, t._version, t.to(dtype))
            self._casts[key] = hit
            self.casts += 1
        if t.requires_grad and torch.is_grad_enabled():
            return _SharedCast.apply(hit[2], t)
        return hit[2]

    def finish(self) -> None:
        """After the roll-out's last backward (see :meth:`PairedModel.new_share`); nothing to do here."""

def _fused_ops():
    return FusedOps


def has_lora(module) -> bool:
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

    @property
    def mod_seq(self):
        """What the norm / gated kernels take beside per-sample modulation (B, D): the sample of each
        row, read in the kernel (no per-row copy of the modulation); None for one sample."""
        return None if len(self.cu_list) == 2 else self.seq

    @staticmethod
    def rows(x):
        """The packed rows as the norm kernels take them: (1, T, D), a view."""
        return x.view(1, -1, x.shape[-1])


@dataclass(eq=False)
class Branch:
    """One side of the pair: ``name`` ``"s"`` (student, with autograd) or ``"t"`` (teacher, constants);
    the module it reads and its adapter; its packed stream; the current block's submodule and
    modulation; ``extra``: a family's per-branch data (text length, RoPE tables, ...); ``x_in``: the
    current block's first input, computed ahead."""

    name: str
    model: torch.nn.Module
    adapter: object = None
    stream: Stream | None = None
    mods: tuple | None = None
    block: torch.nn.Module | None = None
    extra: dict = field(default_factory=dict)
    # the current block's first normalized input, where the previous block computed it with its last
    # residual in one pass (read once, then cleared)
    x_in: object = None  # a tensor, or a family's tuple of them (FLUX.2's double blocks: image, text)

    @property
    def student(self) -> bool:
        return self.name == "s"

    def grad_ctx(self):
        """The teacher's work never enters the autograd graph."""
        return contextlib.nullcontext() if self.student else torch.no_grad()

    def at(self, path: str) -> "Branch":
        """Point :attr:`block` at the submodule ``path`` of this branch's model (e.g. ``layers.3``)."""
        self.block = self.model.get_submodule(path)
        return self


class PairedModel:
    """The two branches, the ops, and how one linear runs for both streams (one base GEMM with
    per-branch LoRA deltas; FP8 modules called as modules; two calls for two separate models). A
    family's subclass sets ``spec`` (its FamilySpec: the convention, the linears FP8 may take)."""

    spec = None

    def __init__(self, student, teacher, ops=None, nvtx: bool = False, fp8_ctx=None, fp8_teacher: bool = True,
                 checkpoint_layers: int = 0):
        self.ms, self.adapter_s = student
        self.mt, self.adapter_t = teacher
        self.ops = ops or TorchOps()
        self.nvtx = nvtx
        self.fp8_ctx = fp8_ctx or (lambda enabled=True: contextlib.nullcontext())
        self.fp8_teacher = fp8_teacher
        self.checkpoint_layers = int(checkpoint_layers)
        self.same_model = self.ms is self.mt
        self.fp8_native = None  # a dopsd_fast.fp8.NativeFP8 (fast.fp8: native): the block linears' GEMMs in FP8
        self._share = None  # the RolloutShare of the forward in progress (set by velocity_pair)
        self.check_adapters()

    def check_adapters(self) -> None:
        """:func:`check_adapters` on the branches' modules: peft state this model would not apply as the
        eager model does is refused here, at construction (and by the drop-in backend at every step:
        a caller may add or activate adapters later)."""
        if self.spec is None:
            return
        # the walk over every module costs ~15 ms at Z-Image's size: made again only when the models'
        # adapters (peft_config) or the active ones change
        sig = tuple(_adapter_signature(m) for m in ((self.ms,) if self.same_model else (self.ms, self.mt)))
        if sig == getattr(self, "_adapters_checked", None):
            return
        for role, m, ad in (("student", self.ms, self.adapter_s), ("teacher", self.mt, self.adapter_t)):
            name = adapter_name(ad)  # the adapters read by name are still there (not deleted since)
            if name is not None and name not in lora_adapters(m):
                raise AdapterError(f"fast path: the {role} adapter {name!r} is on no module of the model any more "
                                   f"(deleted since the fast model was built: delete_adapters, unload): add it back, "
                                   "or build it again (backend.wrap) over the adapters the model has")
        if self.same_model:
            check_adapters(self.ms, [self.adapter_s, self.adapter_t], self.spec.fp8_linears)
        else:
            check_adapters(self.ms, [self.adapter_s], self.spec.fp8_linears, "student")
            check_adapters(self.mt, [self.adapter_t], self.spec.fp8_linears, "teacher")
        self._adapters_checked = sig

    @contextlib.contextmanager
    def sharing(self, share):
        """Inside: the linears read the LoRA weights through ``share`` (a :class:`RolloutShare`, or None)."""
        prev, self._share = self._share, share
        try:
            yield
        finally:
            self._share = prev

    def _cast(self, lora, dtype):
        """A LoRA triple (A, B, scale) with A and B in ``dtype``: through the roll-out's share when there
        is one (cast once per roll-out), else as it is (the op casts per call)."""
        sh = self._share
        if lora is None or sh is None:
            return lora
        return sh.cast(lora[0], dtype), sh.cast(lora[1], dtype), lora[2]

    def _nv(self, name):
        return nvtx_range(name) if self.nvtx else contextlib.nullcontext()

    def branches(self, run_s: bool, run_t: bool) -> tuple[Branch | None, Branch | None]:
        s = Branch("s", self.ms, self.adapter_s) if run_s else None
        t = Branch("t", self.mt, self.adapter_t) if run_t else None
        return s, t

    @staticmethod
    def per_branch(fn, s: Branch | None, t: Branch | None, *pairs, **kw):
        """``fn(branch, *values, **kw)`` for the student (with autograd) and the teacher (without);
        each of ``pairs`` is (student value, teacher value). An absent branch gives None."""
        out_s = fn(s, *[p[0] for p in pairs], **kw) if s is not None else None
        if t is None:
            return out_s, None
        with torch.no_grad():
            return out_s, fn(t, *[p[1] for p in pairs], **kw)

    # ---- linears -----------------------------------------------------------------------------
    @staticmethod
    def _delta(x, lora):
        a, b, s = lora
        return s * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def _lin(self, mod, adapter, x):
        base = getattr(mod, "base_layer", mod)
        if is_fp8_linear(base):  # FP8 base GEMM by the converted module, LoRA delta in bf16
            y = base(x)
            lora = self._cast(lora_of(mod, adapter)[2], x.dtype) if base is not mod else None
            return y + self._delta(x, lora) if lora is not None else y
        w, b, lora = lora_of(mod, adapter)
        return self.ops.linear(x, w, b, self._cast(lora, x.dtype))

    def linear_pair(self, name: str, x_s, x_t):
        """The linear ``name`` (a submodule path, e.g. ``layers.3.attention.to_q``) of both branches;
        either input may be None (one-branch run)."""
        return self.linear_group([name], x_s, x_t)[0]

    def _linear_pair(self, name: str, x_s, x_t):
        if x_t is None:
            return self._lin(self.ms.get_submodule(name), self.adapter_s, x_s), None
        mod_t = self.mt.get_submodule(name)
        if x_s is None:
            with torch.no_grad():
                return None, self._lin(mod_t, self.adapter_t, x_t)
        mod_s = mod_t if self.same_model else self.ms.get_submodule(name)
        base = getattr(mod_s, "base_layer", mod_s)
        if mod_s is mod_t and is_fp8_linear(base):
            lo_s = self._cast(lora_of(mod_s, self.adapter_s)[2], x_s.dtype) if base is not mod_s else None
            lo_t = self._cast(lora_of(mod_s, self.adapter_t)[2], x_t.dtype) if base is not mod_s else None
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
            w, b, lo_s = lora_of(mod_s, self.adapter_s)
            _, _, lo_t = lora_of(mod_s, self.adapter_t)
            return self.ops.paired_linear(x_s, x_t, w, b, self._cast(lo_s, x_s.dtype), self._cast(lo_t, x_t.dtype))
        y_s = self._lin(mod_s, self.adapter_s, x_s)
        with torch.no_grad():
            y_t = self._lin(mod_t, self.adapter_t, x_t)
        return y_s, y_t

    def linear_group(self, names, x_s, x_t):
        """Several linears reading the same input (``names``: e.g. the paths of to_q, to_k, to_v):
        ``[(y_s, y_t)]`` per linear. Both branches of one module with LoRA on every linear: ONE op
        (``ops.paired_linears``: no concatenation, the student's dx of the group in one buffer);
        otherwise :meth:`linear_pair` per linear."""
        lor = self._fusable(names)
        fp8 = self._fp8_for(names) if lor is not None else None
        if lor is not None and x_s is not None and x_t is not None:
            ls, lt = lor
            ls = [(w, b, self._cast(lo, x_s.dtype)) for w, b, lo in ls]
            lt = [(w, b, self._cast(lo, x_t.dtype)) for w, b, lo in lt]
            return self.ops.paired_linears(x_s, x_t, [lo[0] for lo in ls], [lo[1] for lo in ls],
                                           [lo[2] for lo in ls], [lo[2] for lo in lt], fp8=fp8)
        if lor is not None and (isinstance(self.ops, _fused_ops()) or fp8 is not None):  # one branch
            return self._one_branch(x_s, x_t, *lor, fp8=fp8)
        return [self._linear_pair(n, x_s, x_t) for n in names]

    def _fp8_for(self, names):
        """The native FP8 GEMM for linears ``names`` when FP8 is on and every one passes the filter
        (block attention / feed-forward linears with dimensions that are multiples of 16)."""
        if self.fp8_native is None:
            return None
        for n in names:
            m = self.ms.get_submodule(n)
            base = getattr(m, "base_layer", m)
            if not fp8_module_filter(n + (".base_layer" if base is not m else ""), base, self.spec):
                return None
        return self.fp8_native

    def _fusable(self, names):
        """(student, teacher) LoRA triples of linears ``names`` when one op can run them (one module
        with both adapters on every linear, no FP8 base), else None."""
        if not self.same_model:
            return None
        mods = [self.ms.get_submodule(n) for n in names]
        if any(is_fp8_linear(getattr(m, "base_layer", m)) for m in mods):
            return None
        ls = [lora_of(m, self.adapter_s) for m in mods]
        lt = [lora_of(m, self.adapter_t) for m in mods]
        return (ls, lt) if all(lo[2] is not None for lo in ls + lt) else None

    def _one_branch(self, x_s, x_t, ls, lt, fp8=None):
        """One branch through the same fused op as the pair (the other side with no rows): the group's
        dx in one buffer, the LoRA delta fused, as on the main path."""
        x, los = (x_s, ls) if x_t is None else (x_t, lt)
        los = [(w, b, self._cast(lo, x.dtype)) for w, b, lo in los]
        none = x.new_empty((0, x.shape[-1]))
        with contextlib.nullcontext() if x_t is None else torch.no_grad():
            outs = self.ops.paired_linears(x, none, [lo[0] for lo in los], [lo[1] for lo in los],
                                           [lo[2] for lo in los], [lo[2] for lo in los], fp8=fp8)
        return [(y, None) if x_t is None else (None, y) for y, _ in outs]

    # ---- the pair entry point ------------------------------------------------------------------
    def velocity_pair(self, x, sigma, ctx_s, ctx_t, share=None):
        """(v_student, v_teacher) in the (sigma, v) convention; v_teacher without autograd; a None
        context runs that branch not at all (its velocity is None). ``share``: what :meth:`new_share`
        gave for this micro-batch's roll-out (the same contexts and weights at every state)."""
        raise NotImplementedError

    def new_share(self, student: bool | str = False) -> RolloutShare:
        """State reused across the K states of one micro-batch's roll-out (work that depends on the
        contexts and the weights only): a :class:`RolloutShare` (the LoRA casts), a family's subclass
        for more. ``student``: share the student's family-specific work too, ``"graph"`` (True) where the
        roll-out back-propagates once, ``"deferred"`` where the caller calls the share's ``finish()``
        after the roll-out's last backward (a family's share subclass); the
        LoRA casts are shared in every mode (their gradient is per use)."""
        return RolloutShare()
