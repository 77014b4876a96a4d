"""The drop-in backend: another D-OPSD trainer keeps its diffusers model, its adapters, its optimizer,
its accelerate / DDP / DeepSpeed setup and its checkpoint format, and gets the packed fast step by one
call (full reference: ``docs/backend.md``; ``examples/authors_loop.py``: the authors' loop with it).

    from dopsd_fast import backend

    fast = backend.wrap(transformer, student_adapter="student", teacher_adapter="teacher")  # (i) two peft adapters
    fast = backend.wrap(transformer, student_adapter="default", teacher_shadow=ema_state)   # (ii) EMA shadow dict
    fast = backend.wrap(student_transformer, teacher=ema_transformer)                       # (iii) two modules

Three integration styles:

    res = fast.dopsd_step(noise, ctx_s, ctx_t, timesteps=[0, 100, 250, 500])    # 1. the whole step
    res = fast.dopsd_step(noise, ctx_s, ctx_t, timesteps=ts,                    # 2. caller-owned backward
                          backward_fn=accelerator.backward, autocast=accelerator.autocast())
    for state in fast.rollout(noise, ctx_s, ctx_t, timesteps=ts):               # 3. callback form
        v_s, v_t = state.predict()                                             #    v = eps - x0
        state.backward(my_loss(state.x0(v_s), state.x0(v_t)) / state.states)    #    x0 = x - sigma * v
    optimizer.step()                                                           # the trainer's own

``transformer`` is a diffusers ``ZImageTransformer2DModel`` or ``Flux2Transformer2DModel``, or what a
loop holds around one (DDP, accelerate, a DeepSpeed engine, ``torch.compile``, a peft ``PeftModel``:
unwrapped); the fast model reads its parameters in place, so the trainer's optimizer, EMA and
checkpoints see exactly the tensors they own. Contexts are what such trainers hold: Z-Image a list of
per-sample prompt embeddings ``(L_b, D)``; FLUX.2-klein prompt embeddings ``(B, L, D)`` plus, for an
editing teacher, reference latents (:func:`contexts`). Latents in the family's layouts
(``spec.latent_layouts``: klein's packed ``(B, h*w, C)`` with ``latent_hw``; Z-Image's list of
``(C, 1, h, w)``), returned in the same.

Conventions: ``timesteps`` are the model's own on a 1000 scale as the authors' loops write them
(Z-Image: ``t / 1000`` is the model time ``1 - sigma``; FLUX.2: ``t / 1000`` is sigma); or pass
``sigmas`` (K + 1 noise levels, 1 = noise, ending with 0). Everything returned is ``v = eps - x0``.
The first step refuses a flipped velocity sign and (callback form) a loss weighted by ``1 - sigma``
(:class:`~dopsd_fast.errors.ConventionError`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from dopsd_fast.algorithm import RolloutResult, check_velocity_sign, resolve_schedule
from dopsd_fast.context import Context
from dopsd_fast.errors import BackendError, ConventionError
from dopsd_fast.families import family_of_transformer
from dopsd_fast.models.ops import build_ops
from dopsd_fast.models.paired import Shadow
from dopsd_fast.pair import FastPair as PackedPair
from dopsd_fast.pair import dopsd_step

log = logging.getLogger(__name__)
SYNC_BUCKET = 1 << 24  # elements per gradient all-reduce (64 MiB in fp32), as DDP's buckets bound its copies

__all__ = ["Backend", "Context", "FastPair", "RolloutState", "contexts", "wrap"]


def contexts(features, references=None) -> list[Context]:
    """Per-sample :class:`Context` objects from what a trainer holds: a list of ``(L_b, D)`` tensors or
    one ``(B, L, D)`` tensor; ``references``: a list of ``(B, C, h, w)`` latents (an editing teacher's
    reference images, the target last), stored as ``extra["ref0"], ["ref1"], ...``."""
    if isinstance(features, torch.Tensor) and features.dim() == 3:
        features = list(features.unbind(0))
    if isinstance(features, (list, tuple)) and features and isinstance(features[0], Context):
        return list(features)
    if not isinstance(features, (list, tuple)) or not all(isinstance(f, torch.Tensor) and f.dim() == 2
                                                          for f in features):
        raise TypeError("contexts: features must be a list of (L, D) tensors, a (B, L, D) tensor or Contexts")
    refs = list(references or [])
    for i, r in enumerate(refs):
        if r.dim() != 4 or r.shape[0] != len(features):
            raise BackendError(f"contexts: references[{i}] must be (B={len(features)}, C, h, w), got {tuple(r.shape)} "
                               "(a packed (B, h*w, C) reference: r.permute(0, 2, 1).reshape(B, C, h, w))")
    return [Context(f, {f"ref{j}": r[b] for j, r in enumerate(refs)}) for b, f in enumerate(features)]


def _is_fsdp(module) -> bool:
    return any(c.__name__ in ("FullyShardedDataParallel", "FSDPModule") for c in type(module).__mro__)


def _known_family(module) -> bool:
    try:
        family_of_transformer(module)
        return True
    except TypeError:
        return False


def _is_deepspeed(module) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(module).__mro__)


def _unwrap(module, role: str = "student"):
    """What a trainer's loop holds -> ``(the diffusers model, the torch DDP wrapper or None, whether a
    DeepSpeed engine was around it)``: a DDP /
    DataParallel / DeepSpeed engine / accelerate-prepared model (``.module``), a ``torch.compile``
    module (``._orig_mod``) and a peft ``PeftModel`` (``get_base_model()``) are unwrapped, in any
    nesting. FSDP shards the parameters the fast model reads: refused."""
    ddp, engine = None, False
    refused = BackendError(f"backend.wrap: the {role} is FSDP-wrapped (sharded parameters); the drop-in backend "
                           "needs whole parameters: wrap it with DDP or DeepSpeed ZeRO-1/2, or train with "
                           "dopsd_fast's own trainer (dist.fsdp: on)")
    for _ in range(8):
        # FSDP2's fully_shard keeps the model's class (a subclass of it), so this comes before the family
        # test; a model with only its blocks sharded, or with DTensor parameters, is refused too
        if _is_fsdp(module):
            raise refused
        if _known_family(module):
            if any(_is_fsdp(m) for m in module.modules()):
                raise refused
            if any(type(p).__name__ == "DTensor" for p in module.parameters()):
                raise BackendError(f"backend.wrap: the {role} has sharded (DTensor) parameters (tensor parallel?); "
                                   "the drop-in backend needs whole parameters: wrap it with DDP or DeepSpeed "
                                   "ZeRO-1/2")
            return module, ddp, engine
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            ddp = ddp or module
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        elif hasattr(module, "get_base_model"):
            module = module.get_base_model()
        elif isinstance(getattr(module, "module", None), torch.nn.Module):  # DataParallel, DeepSpeed's engine
            engine = engine or _is_deepspeed(module)
            module = module.module
        else:
            return module, ddp, engine
    raise BackendError(f"backend.wrap: the {role} is wrapped more than 8 deep; pass the diffusers transformer")


def _autocast_wrapped(module) -> bool:
    """Whether accelerate's mixed precision wrapped the ``forward`` of ``module`` or of a module inside
    it (``prepare`` keeps the original as ``_original_forward``): an autocast the fast model, which
    calls the blocks directly, never enters."""
    for _ in range(8):
        if module is None:
            return False
        if "_original_forward" in vars(module):
            return True
        inner = getattr(module, "module", None)
        module = inner if isinstance(inner, torch.nn.Module) else getattr(module, "_orig_mod", None)
    return False


def _shadow(model, adapter: str, state: dict):
    """An EMA shadow dict (the model's parameter names, with or without the adapter name, as peft's
    state dicts write them) -> a :class:`~dopsd_fast.models.paired.Shadow` over the live parameters that
    reads ``state`` by key at every use (an entry the caller rebinds is followed). Every LoRA parameter of
    ``adapter`` must have its shadow tensor, of the same shape."""
    tag = f".{adapter}."
    live = {n: p for n, p in model.named_parameters() if "lora_" in n and tag in n}
    if not live:
        raise BackendError(f"backend.wrap: the model has no LoRA parameters of adapter {adapter!r}")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise BackendError(f"backend.wrap: teacher_shadow must be a dict of parameter name -> tensor (e.g. "
                           f"{{n: p.detach().clone() for n, p in model.named_parameters() if 'lora_' in n}}), got "
                           f"{type(state).__name__}; for diffusers' EMAModel, pass teacher= a module holding its "
                           "weights (ema.copy_to(teacher.parameters()))")

    def plain(k: str) -> str:  # the wrappers' prefixes: DDP / accelerate (module.), torch.compile (_orig_mod.), peft
        for _ in range(8):
            k0 = k
            for pre in ("module.", "_orig_mod.", "base_model.model.", "transformer."):
                k = k.removeprefix(pre)
            if k == k0:
                return k
        return k

    norm = {plain(k): k for k in state}
    keys, missing = {}, []
    for n, p in live.items():
        k = norm.get(n, norm.get(n.replace(tag, ".")))
        if k is None:
            missing.append(n)
            continue
        keys[id(p)] = k
    if missing:
        seen = f"the dict's keys are like {next(iter(state))!r}" if state else "the dict is empty"
        raise BackendError(f"backend.wrap: teacher_shadow lacks {len(missing)} of {len(live)} LoRA tensors of adapter "
                           f"{adapter!r} (e.g. {missing[0]!r}; {seen})")
    sh = Shadow(adapter, source=state, keys=keys)
    sh.params = list(live.values())
    _check_shadow(sh)
    return sh


def _check_shadow(sh) -> None:
    """Every shadow entry still there and of its parameter's shape (checked at each step: cheap)."""
    for p in sh.params:
        t = sh.get(p)
        if tuple(t.shape) != tuple(p.shape):
            raise BackendError(f"backend: teacher_shadow[{sh.keys[id(p)]!r}] has shape {tuple(t.shape)}, the parameter "
                               f"{tuple(p.shape)}")
        if t.device != p.device or not t.is_floating_point():
            raise BackendError(f"backend: teacher_shadow[{sh.keys[id(p)]!r}] is a {t.dtype} tensor on {t.device}, the "
                               f"parameter on {p.device}: keep the EMA's tensors on the model's device (floating point)")


def wrap(student, teacher=None, *, student_adapter: str | None = None, teacher_adapter: str | None = None,
         teacher_shadow: dict | None = None, kernels: str = "auto", attention: str = "auto",
         checkpoint_layers: int | None = None, nvtx: bool = False, check_conventions: bool = True) -> "Backend":
    """The packed fast pair over a trainer's own model(s). One of:

    (i) ``wrap(model, student_adapter="student", teacher_adapter="teacher")``: one model, two peft
        adapters (the authors' scripts);
    (ii) ``wrap(model, student_adapter="default", teacher_shadow=ema)``: one adapter; the teacher's LoRA
        tensors read from the EMA shadow dict ``ema`` (parameter name -> tensor) by key at every step
        (updated in place or rebound, ``ema[k] = new``: both followed), nothing swapped;
    (iii) ``wrap(model, teacher=ema_model)``: two modules (full fine-tuning; adapters optional).

    ``model`` may be what the loop holds: a DDP / accelerate-prepared / DeepSpeed-engine wrapper, a
    ``torch.compile`` module or a peft ``PeftModel`` (unwrapped; a torch DDP wrapper is kept to average
    the gradients, see :meth:`Backend.sync_gradients`). The student's trainable parameters (the student
    adapter's LoRA tensors; in (iii) what requires grad) are read here, once: every step trains exactly
    those, whatever ``set_adapter`` left behind, and restores the caller's ``requires_grad`` after.
    ``kernels`` / ``attention``: as ``fast.kernels`` / ``fast.attention`` (auto: our Triton kernels on
    CUDA, PyTorch elsewhere); ``checkpoint_layers``: main layers under gradient checkpointing (None:
    all of them where the caller turned on the model's own, ``enable_gradient_checkpointing()``, else 0);
    ``check_conventions``: the first step's convention checks (:class:`Backend`).
    """
    ms, ddp, engine = _unwrap(student, "student")
    if ddp is None and not engine:
        _warn_if_unsynced()
    mt = _unwrap(teacher, "teacher")[0] if teacher is not None else ms
    spec = family_of_transformer(ms)
    if mt is not ms:
        try:
            same = family_of_transformer(mt) is spec
        except TypeError:
            same = False
        if not same:
            raise BackendError(f"backend.wrap: teacher= is a {type(mt).__name__}, the student a {type(ms).__name__}: the "
                               "teacher must be a module of the student's class (its EMA copy); for diffusers' "
                               "EMAModel, copy its weights into one (ema.copy_to(teacher_module.parameters()))")
        _check_same_config(ms, mt)
    for name, ad in (("student_adapter", student_adapter), ("teacher_adapter", teacher_adapter)):
        if ad is not None and not isinstance(ad, str):
            raise BackendError(f"backend.wrap: {name}= takes the adapter's name (a str, e.g. 'default'), got a "
                               f"{type(ad).__name__}: add the adapter to the model first (model.add_adapter(config, "
                               f"adapter_name=...)), then name it here")
    if teacher is not None and teacher_shadow is not None:
        raise BackendError("backend.wrap: give either teacher= (a second module) or teacher_shadow= (an EMA of the "
                           "adapter), not both")
    shadow = None
    if teacher is None:
        if student_adapter is None:
            raise BackendError("backend.wrap: one module needs student_adapter= (and teacher_adapter= or "
                               "teacher_shadow=); for full fine-tuning pass teacher=<the EMA module>")
        if teacher_shadow is not None:
            if teacher_adapter is not None:
                raise BackendError("backend.wrap: teacher_shadow= replaces teacher_adapter=")
            teacher_adapter = shadow = _shadow(ms, student_adapter, teacher_shadow)
        elif teacher_adapter is None:
            raise BackendError("backend.wrap: the teacher needs teacher_adapter= or teacher_shadow= (or teacher=<the "
                               "same model> for the base model, its adapters off, as the teacher)")
        elif teacher_adapter == student_adapter:
            raise BackendError("backend.wrap: student and teacher adapters must differ (use teacher_shadow= for an "
                               "EMA)")
    for name, m, ad in (("student", ms, student_adapter), ("teacher", mt, teacher_adapter)):
        if isinstance(ad, str) and not any(ad in getattr(x, "lora_A", {}) for x in m.modules()):
            raise BackendError(f"backend.wrap: the {name} adapter {ad!r} is on no module of the model")
    p0 = next(ms.parameters())
    device = p0.device
    if mt is not ms:
        q0 = next(mt.parameters())
        if (q0.dtype, q0.device) != (p0.dtype, device):
            raise BackendError(f"backend.wrap: teacher= holds {q0.dtype} weights on {q0.device}, the student {p0.dtype} on "
                               f"{device}: the packed pass runs both on the student's; keep an EMA master elsewhere "
                               "and copy it into a module like the student (teacher.load_state_dict(...))")
    trainable = _trainable(ms, student_adapter)
    if not trainable:
        raise BackendError("backend.wrap: nothing of the student requires grad (full fine-tuning reads its trainable "
                           "parameters here): call student.requires_grad_(True) for what it trains before wrap()")
    follow = checkpoint_layers is None
    if follow:  # the caller's own switch, enable_gradient_checkpointing(), followed (at every step, too)
        on = bool(getattr(ms, "is_gradient_checkpointing", False))
        checkpoint_layers = _main_layers(ms) if on else 0
        if on:
            log.info("backend.wrap: the model has gradient checkpointing on: all %d main layers of the fast pass "
                     "checkpointed (checkpoint_layers=0 turns it off)", checkpoint_layers)
    ops = build_ops(kernels, attention, device)
    kw = dict(ops=ops, nvtx=nvtx)
    if checkpoint_layers:
        kw["checkpoint_layers"] = checkpoint_layers
    model = spec.fast_model_class()((ms, student_adapter), (mt, teacher_adapter), **kw)
    fast = Backend(spec, model, nvtx=nvtx, ddp=ddp, engine=engine, trainable=trainable,
                   shadow=shadow, check_conventions=check_conventions)
    fast.owned = _owned(ms, trainable)
    fast.teacher_module = mt if mt is not ms else None
    fast.student_adapter = student_adapter
    fast.teacher_adapter_name = teacher_adapter if isinstance(teacher_adapter, str) else None
    fast.follow_checkpointing = follow
    fast.autocast_hint = _autocast_wrapped(student)
    return fast


def _check_same_config(ms, mt) -> None:
    """teacher= (a second module) must be the student's architecture: the packed pass walks the student's
    layers and reads its settings (norm eps, ...) for both branches, so a teacher with other layer counts
    or settings would be computed wrongly, silently."""
    a, b = getattr(ms, "config", None), getattr(mt, "config", None)
    if a is None or b is None:
        return
    import json

    def plain(v):  # as config.json holds it: a model built in code (tuples) equals one read from disk (lists)
        return json.loads(json.dumps(v, default=str))

    diff = sorted(k for k in set(a) | set(b) if not str(k).startswith("_") and plain(a.get(k)) != plain(b.get(k)))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:4])
        raise BackendError(f"backend.wrap: teacher= has another config than the student ({shown}"
                           f"{', ...' if len(diff) > 4 else ''}; student vs teacher): the teacher must be the "
                           "student's architecture (its EMA copy)")


def _warn_if_unsynced(where: str = "backend.wrap") -> None:
    """Several data-parallel ranks and a bare model: nothing averages the backend's gradients (its
    forward bypasses any DDP wrapper the caller keeps elsewhere, one ``accelerator.prepare()`` built after
    ``wrap()`` too). Said at ``wrap()`` and again at the first step, not refused: a caller may average
    them itself."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        log.warning("%s: %d data-parallel ranks and an unwrapped model: the backend does not average the "
                    "gradients (a DDP / accelerate wrapper made after wrap() is bypassed); pass the DDP / "
                    "accelerate-prepared model to wrap(), or average them yourself", where, dist.get_world_size())


def _main_layers(model) -> int:
    return sum(len(getattr(model, a, ())) for a in ("layers", "transformer_blocks", "single_transformer_blocks"))


def _owned(model, params) -> list:
    """``[(module path, attribute, parameter)]`` of ``params`` in ``model``: where :meth:`Backend.check_wrapped`
    looks for each at every step."""
    want = {id(p) for p in params}
    out = []
    for path, m in model.named_modules():
        for n, p in m._parameters.items():
            if p is not None and id(p) in want:
                want.discard(id(p))
                out.append((path, n, p))
    return out


def _trainable(model, adapter) -> list:
    """The student's trainable parameters by the backend's contract: the LoRA tensors of ``adapter``
    (those that require grad now, or all of them when none does: wrapped after ``set_adapter`` of
    another adapter); without an adapter, what requires grad now (full fine-tuning)."""
    if adapter is None:
        return [p for p in model.parameters() if p.requires_grad]
    tag = f".{adapter}."
    params = [p for n, p in model.named_parameters() if "lora_" in n and tag in n]
    return [p for p in params if p.requires_grad] or params


@dataclass
class RolloutState:
    """One roll-out state of :meth:`Backend.rollout`, in this project's convention:

    * ``sigma`` (B,): the noise level, 1 = pure noise (NOT the model's time); ``t`` (B,): the model's
      own time as its loop writes ``timestep / 1000`` (Z-Image: ``t = 1 - sigma``; FLUX.2: ``t = sigma``);
    * :meth:`predict` -> ``(v_s, v_t)`` with ``v = eps - x0`` (NOT the raw output of a model that returns
      ``x0 - eps``); hence ``x0 = x - sigma * v`` (:meth:`x0`);
    * ``x``: the state (detached, fp32) in the caller's latent layout; ``k`` of ``states``;
      ``sigma_next``: where the roll-out steps next (``x <- x + (sigma_next - sigma) * v_s``, done by the
      backend when the loop resumes).

    :meth:`backward` runs the caller's loss through the backend's ``backward_fn`` (checked at the first
    roll-out's first states: a loss weighted by ``(1 - sigma)`` where ``sigma`` is meant is refused)."""

    k: int
    states: int
    x: torch.Tensor
    sigma: torch.Tensor
    sigma_next: float
    t: torch.Tensor | None = None
    _fn: object = None
    _x_model: torch.Tensor | None = None
    _back: Callable | None = None
    _backward: Callable | None = None
    v_student: torch.Tensor | None = None
    v_teacher: torch.Tensor | None = None

    _reached: list | None = None  # the roll-out's record: a backward reached a student velocity

    def predict(self):
        """(v_student with autograd, v_teacher constant) at this state, ``v = eps - x0``."""
        v_s, v_t = self._fn(self._x_model, self.sigma)
        self._v_model = v_s
        if self._reached is not None and v_s.requires_grad:  # any backward through it: loss.backward(),
            v_s.register_hook(lambda g, r=self._reached: r.append(1))  # autograd.grad, a hooked optimizer step
        back = self._back or (lambda y: y)
        self.v_student, self.v_teacher = back(v_s), back(v_t.detach())
        return self.v_student, self.v_teacher

    def x0(self, v):
        """``x0 = x - sigma * v`` (the clean estimate of a velocity at this state), in the caller's layout: a
        tensor, or Z-Image's list of one tensor per sample."""
        if isinstance(self.x, (list, tuple)):
            return [x - s.to(vi.dtype) * vi for x, s, vi in zip(self.x, self.sigma, v)]
        return self.x - self.sigma.view(-1, *([1] * (self.x.dim() - 1))).to(v.dtype) * v

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this state's loss with the roll-out's ``backward_fn`` (the caller's, e.g.
        ``accelerator.backward``; default ``loss.backward()``)."""
        if self.v_student is None:
            raise BackendError(f"backend.rollout: state {self.k}: call state.predict() before state.backward(loss)")
        self._backward(self, loss)


_ON_PURPOSE = ("; a loss weighted so on purpose (an MSE of predicted noises: eps = x + (1 - sigma) v) looks the same: "
               "pass rollout(..., check_weighting=False)")


def _flat(v) -> torch.Tensor:
    """A velocity in the caller's layout as one flat tensor (Z-Image's list of per-sample tensors joined)."""
    return torch.cat([t.reshape(-1) for t in v]) if isinstance(v, (list, tuple)) else v


def _check_weighting(rec: list) -> None:
    """The σ-versus-t check of the callback form's first roll-out. ``rec``: (sigma, loss, d) of its
    first states, d = mean((v_s - v_t)^2) > 0. A D-OPSD state loss is ``c * w(sigma) * d`` with w = sigma^2
    (the x0 loss) or 1 (the v loss); the flipped time gives ``w = (1 - sigma)^2``. At sigma_0 = 1 that is
    exactly 0 for a nonzero d; otherwise the scale-free ratio of two states names it. Custom losses that
    match none of these pass (nothing is known about them)."""
    (s0, l0, d0) = rec[0]
    if len(rec) == 1:
        if s0 >= 1.0 and abs(l0) <= 1e-12 * max(d0, 1e-30) and d0 > 1e-20:
            raise ConventionError("backend.rollout: the state loss at sigma = 1 is 0 while the student and teacher "
                                  "differ: it is weighted by (1 - sigma), i.e. sigma used as the model's time t; use "
                                  "state.sigma as the noise level (x0 = x - sigma * v, state.x0(v)), or state.t (a state "
                                  "meant to be skipped: call no state.backward for it)" + _ON_PURPOSE)
        return
    (s1, l1, d1) = rec[1]
    if s0 >= 1.0 or l0 == 0 or d0 <= 0 or d1 <= 0:
        return
    r = (l1 / d1) / (l0 / d0)
    flipped = ((1 - s1) / (1 - s0)) ** 2
    right = ((s1 / s0) ** 2, 1.0)
    if abs(r - flipped) <= 0.01 * flipped and all(abs(r - w) > 0.1 * w for w in right):
        raise ConventionError("backend.rollout: the state losses scale as (1 - sigma)^2 across states: sigma is used "
                              "as the model's time t; use state.sigma as the noise level (x0 = x - sigma * v, "
                              "state.x0(v)), or state.t; state 0's gradient is already in .grad: zero it" + _ON_PURPOSE)


class Backend(PackedPair):
    """The pair protocol (:class:`~dopsd_fast.pair.FastPair`: ``pair_fn``, ``velocity``) over a trainer's own
    model, taking what such trainers hold (contexts as tensors, the model's own timesteps, the family's
    latent layouts), plus the whole step (:meth:`dopsd_step`) and the per-state callback form
    (:meth:`rollout`); both take the caller's ``backward_fn`` and ``autocast``.

    ``ddp``: the torch DDP wrapper the caller handed to :func:`wrap` (its gradients are averaged once per
    step, :meth:`sync_gradients`); ``trainable``: the student's parameters by contract (set to require
    grad for the step, the caller's flags restored after: :meth:`training`); ``check_conventions``: at
    the first step, the velocities' sign at the pure-noise state and (callback form) the loss's
    sigma weighting are checked (:class:`~dopsd_fast.errors.ConventionError`)."""

    def __init__(self, spec, model, nvtx: bool = False, *, ddp=None, engine: bool = False, trainable=(), shadow=None,
                 check_conventions: bool = True):
        super().__init__(model, backward="stepwise", nvtx=nvtx)
        self.spec = spec
        self.ddp = ddp
        self.engine = engine
        self.trainable = list(trainable)
        self.shadow = shadow
        self._check_sign = check_conventions
        self._check_loss = check_conventions
        self.owned: list = []  # (module path, attribute, parameter) of the trainable ones (wrap(): check_wrapped)
        self._reached: list | None = None  # dopsd_step with backward_fn: a backward reached a student velocity
        self.follow_checkpointing = False  # wrap() without checkpoint_layers: the model's own switch, at every step
        self.syncs = 0  # gradient all-reduces run by sync_gradients (what the tests read)
        self.autocast_hint = False  # accelerate's mixed precision on the wrapped model (said once at a step)
        self.autocast_said = False
        self._unsynced_said = False  # the first step's word on ranks without a DDP wrapper (sync_gradients)
        self.teacher_module = None  # teacher= (a second module), checked at each step (check_wrapped)
        self.student_adapter = None
        self.teacher_adapter_name = None  # the teacher's adapter on the student module (not averaged)
        self._frozen_said = False

    # ---- the protocol ----------------------------------------------------------------------------
    def pair_fn(self, ctx_s, ctx_t, backward: str = "stepwise", finish: bool = False):
        """One micro-batch's ``(x, sigma) -> (v_s, v_t)``; work that depends only on the contexts and the
        weights is done at the first state and reused: the teacher's always, the student's with
        ``backward="once"`` (the caller back-propagates once per roll-out) or with ``finish=True`` (the
        caller calls ``fn.finish()`` after the roll-out's last backward). Used directly, run it inside
        :meth:`training` and call :meth:`sync_gradients` after the last backward."""
        self.check_wrapped()
        if self.follow_checkpointing:  # enable_ / disable_gradient_checkpointing() called after wrap()
            on = bool(getattr(self.model.ms, "is_gradient_checkpointing", False))
            self.model.checkpoint_layers = _main_layers(self.model.ms) if on else 0
        if self.shadow is not None:
            _check_shadow(self.shadow)
        self.model.check_adapters()  # adapters added or activated since wrap()
        fn = super().pair_fn(contexts(ctx_s), contexts(ctx_t), backward=backward, finish=finish)
        reached = self._reached
        if not self._check_sign and reached is None:
            return fn

        def checked(x, sigma):
            v_s, v_t = fn(x, sigma)
            if reached is not None and v_s.requires_grad:  # any backward through it
                v_s.register_hook(lambda g: reached.append(1))
            if self._check_sign and float(sigma.min()) >= 0.99:
                self._check_sign = False
                check_velocity_sign(x, v_t, sigma, "the teacher")
                check_velocity_sign(x, v_s, sigma, "the student")
            return v_s, v_t
        checked.share, checked.finish = getattr(fn, "share", None), fn.finish
        return checked

    def check_wrapped(self) -> None:
        """The student's trainable parameters are still the tensors :func:`wrap` read, where it read them:
        one replaced since (``load_state_dict(..., assign=True)``, an adapter deleted and added again, a
        ``.to()`` that swaps parameters) would neither train nor be averaged, and a ``teacher_shadow``
        would not find its entry: refused in one line (checked at every step: a lookup per tensor). A
        teacher= module moved or cast since (an EMA kept on the CPU between steps) is refused too."""
        mt = self.teacher_module
        if mt is not None:
            p0, q0 = next(self.model.ms.parameters()), next(mt.parameters())
            if (q0.dtype, q0.device) != (p0.dtype, p0.device):
                raise BackendError(f"backend: teacher= holds {q0.dtype} weights on {q0.device} now, the student "
                                   f"{p0.dtype} on {p0.device}: one of them was moved or cast since wrap(); the "
                                   "packed pass runs both on the student's device and dtype: bring them together "
                                   "before the step")
        for path, attr, p in self.owned:
            try:
                now = self.model.ms.get_submodule(path)._parameters.get(attr) if path else \
                    self.model.ms._parameters.get(attr)
            except AttributeError:
                now = None
            if now is not p:
                where = f"{path}.{attr}" if path else attr
                raise BackendError(f"backend: the student's parameter {where} is {'gone' if now is None else 'another tensor'} "
                                   "since backend.wrap read it (load_state_dict(..., assign=True), an adapter deleted "
                                   "or added again, a .to() that replaces parameters): it would neither train nor be "
                                   "averaged; call backend.wrap again after replacing parameters (and give the "
                                   "optimizer the new ones)")

    def velocity(self, branch: str, x, sigma, ctx, *, latent_hw=None):
        """One branch alone (``v = eps - x0``, ``sigma`` the noise level), in the caller's latent layout;
        the teacher without autograd."""
        self.check_wrapped()
        if self.shadow is not None:
            _check_shadow(self.shadow)
        self.model.check_adapters()
        xm, back = self.spec.latents_in(x, latent_hw)
        self._check_inputs(xm, ("ctx", ctx), step=False)
        if not torch.is_tensor(sigma) or sigma.device.type == "cpu":  # a GPU tensor is not read back (no sync)
            low_high = torch.as_tensor(sigma, dtype=torch.float32)
            if not bool(((low_high >= 0) & (low_high <= 1)).all()):
                raise BackendError(f"backend.velocity: sigma {low_high.tolist()} is outside [0, 1]: it is the noise "
                                   "level (1 = noise), not the model's timestep (pass timestep / 1000, in the "
                                   "convention of RolloutState.sigma)")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=xm.device)
        if sigma.dim() == 0:  # one noise level for the batch
            sigma = sigma.expand(xm.shape[0])
        if tuple(sigma.shape) != (xm.shape[0],):
            raise BackendError(f"backend.velocity: sigma has shape {tuple(sigma.shape)}; it takes a float, a 0-dim "
                               f"tensor or one noise level per sample ({xm.shape[0]},)")
        return back(super().velocity(branch, xm, sigma, contexts(ctx)))

    @contextlib.contextmanager
    def training(self):
        """Inside: the student's parameters by contract require grad (whatever ``set_adapter`` or the
        caller left), restored to the caller's flags on exit. Must span the forwards AND the backwards
        (autograd accumulates no gradient into a tensor that no longer requires it)."""
        self._say_if_frozen()
        saved = [(p, p.requires_grad) for p in self.trainable]
        for p in self.trainable:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    def sync_gradients(self) -> bool:
        """Average the student's gradients over the data-parallel ranks of the torch DDP wrapper handed to
        :func:`wrap`, in one all-reduce per dtype, when that wrapper is set to sync (outside ``no_sync()``,
        i.e. on accelerate's gradient-accumulation boundary). The fast forward bypasses DDP's own
        forward, so DDP's reducer never fires: the K stepwise backwards communicate nothing, this runs
        once per step (what :meth:`dopsd_step` and :meth:`rollout` call at their end). Returns whether it
        communicated. DDP communication hooks are not applied."""
        ddp = self.ddp
        if ddp is None and not self.engine and not self._unsynced_said:  # said again at the first step: wrap() then prepare() (the
            self._unsynced_said = True  # wrapper prepare() builds after wrap() is bypassed) warned only before it
            _warn_if_unsynced("backend: at the first step")
        if ddp is None or not getattr(ddp, "require_backward_grad_sync", True):
            return False
        import torch.distributed as dist

        group = getattr(ddp, "process_group", None)
        world = dist.get_world_size(group)
        if world == 1:
            return False
        params = self.trainable + self._extra_trained(dist, group)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_kind: dict = {}
        for p in params:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_kind.values():  # buckets of at most SYNC_BUCKET elements: no full copy of a full FT
            bucket, size = [], 0
            for g in grads + [None]:
                if g is not None and (not bucket or size + g.numel() <= SYNC_BUCKET):
                    bucket.append(g)
                    size += g.numel()
                    continue
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                flat.div_(world)
                off = 0
                for b in bucket:
                    b.copy_(flat[off:off + b.numel()].view_as(b))
                    off += b.numel()
                bucket, size = ([g], g.numel()) if g is not None else ([], 0)
        self.syncs += 1
        return True

    def _extra_trained(self, dist, group) -> list:
        """The student's parameters outside the contract's set that the caller made require grad (a module
        trained beside a LoRA, a layer unfrozen after wrap()) and that got a gradient on some rank: they
        are averaged too (a rank without one adds zeros), so the replicas stay equal. Which ones is agreed
        in one all-reduce of a flag per parameter of the student, made at every sync by every rank (the
        same size everywhere: ranks that disagree on what requires grad cannot mismatch the collectives)."""
        own = {id(p) for p in self.trainable}
        tag = f".{self.teacher_adapter_name}." if self.teacher_adapter_name else None
        params = [p for n, p in self.model.ms.named_parameters() if id(p) not in own and not (tag and "lora_" in n and tag in n)]
        got = torch.tensor([p.requires_grad and p.grad is not None for p in params], dtype=torch.float32,
                           device=self.trainable[0].device)
        dist.all_reduce(got, group=group)
        return [p for p, n in zip(params, got.tolist()) if n > 0]

    def _say_if_frozen(self) -> None:
        """Full fine-tuning: a parameter the caller froze since wrap() still trains (the set is wrap()'s):
        said once."""
        if self._frozen_said or self.student_adapter is not None:
            return
        frozen = sum(1 for p in self.trainable if not p.requires_grad)
        if frozen:
            self._frozen_said = True
            log.warning("backend: %d of the student's %d parameters read as trainable by wrap() require no grad now; "
                        "the step trains them still (the set is fixed at wrap()): call backend.wrap again after "
                        "freezing or unfreezing parameters", frozen, len(self.trainable))

    @staticmethod
    def _engine_ok(backward_fn, backward: str) -> None:
        """A model that came in a DeepSpeed engine: every backward must be the engine's (its loss scaling
        and gradient partitioning), and only one per micro-batch (accelerate's backward steps the engine
        at the accumulation boundary: a backward per state would step it K times)."""
        if backward_fn is None:
            raise BackendError("backend: the model came in a DeepSpeed engine: pass backward_fn=accelerator.backward "
                               "(or engine.backward); the backend's own backward would bypass the engine")
        if backward != "once":
            raise BackendError("backend: under DeepSpeed use backward='once' (dopsd_step) and no per-state "
                               "state.backward: accelerator.backward steps the engine at the accumulation boundary, "
                               "a backward per roll-out state would step it K times")

    def _check_inputs(self, x, *named_contexts, step: bool = True) -> None:
        """One line naming what does not fit the transformer (instead of a shape error deep inside it):
        the latents' channels and patch grid, each context list's length (one per sample) and width;
        ``step``: autograd must be on."""
        if step and not torch.is_grad_enabled():
            raise BackendError("backend: the step needs autograd, and it runs under torch.no_grad() or "
                               "torch.inference_mode(); call it outside (a teacher-only prediction: "
                               "fast.velocity('teacher', ...))")
        cfg = dict(self.model.ms.config)
        B, C, h, w = x.shape
        dev = next(self.model.ms.parameters()).device
        if x.device != dev:
            raise BackendError(f"backend: the latents are on {x.device}, the model's weights on {dev}: move the noise "
                               f"there (noise.to({str(dev)!r}))")
        c_in = cfg.get("in_channels")
        if c_in is not None and C != int(c_in):
            raise BackendError(f"backend: the latents have {C} channels (shape {tuple(x.shape)} read as (B, C, h, w)); "
                               f"the {self.spec.title} transformer takes in_channels={int(c_in)}")
        p = int(cfg.get("patch_size") or (cfg.get("all_patch_size") or [1])[0])
        if h % p or w % p:
            raise BackendError(f"backend: the latents are {h} x {w}, not a multiple of the transformer's patch size {p}")
        width = self.spec.context_width(cfg)
        for name, ctx in named_contexts:
            if ctx is None:
                continue
            cs = contexts(ctx)
            if len(cs) != B:
                raise BackendError(f"backend: {name} holds {len(cs)} prompt embedding(s) for a batch of {B} latents "
                                   "(one per sample)")
            for i, c in enumerate(cs):
                if width is not None and c.features.shape[-1] != width:
                    raise BackendError(f"backend: {name}[{i}] has {c.features.shape[-1]} features per token; the "
                                       f"transformer takes {width} ({self.spec.context_width_key})")
                for k, r in c.extra.items():  # an editing teacher's reference latents: the latents' channels
                    if k.startswith("ref") and torch.is_tensor(r) and r.dim() == 3 and r.shape[0] != C:
                        raise BackendError(f"backend: {name}[{i}]'s reference latents {k} have {r.shape[0]} channels "
                                           f"(shape {tuple(r.shape)} read as (C, h, w)); the latents have {C}")

    # ---- schedules -------------------------------------------------------------------------------
    def sigmas_from_timesteps(self, timesteps, scale: float = 1000.0) -> list[float]:
        """The model's own timesteps (the roll-out's K states, ``scale`` = 1000) -> K + 1 sigmas ending
        with 0, by the family's convention."""
        ts = [float(t) for t in (timesteps.reshape(-1).tolist() if torch.is_tensor(timesteps) else timesteps)]
        if not ts:
            raise BackendError("timesteps= is empty: give the roll-out's K states in the model's own timesteps "
                               "(e.g. [0, 100, 250, 500])")
        if scale == 1000.0 and ts and max(abs(t) for t in ts) <= 1.0 and any(t != 0 for t in ts):
            raise ConventionError(f"timesteps {ts} are all within [0, 1]: timesteps= takes the model's own on the 1000 "
                                  "scale the authors' loops write (e.g. [0, 100, 250, 500]); these look like the "
                                  "transformer's input t = timestep / 1000: multiply by 1000, or pass sigmas= "
                                  "(1 = noise, decreasing to 0)")
        sig = [float(self.spec.convention.sigma_of(t / scale)) for t in ts]
        try:
            return resolve_schedule(sig + [0.0] if sig[-1] != 0.0 else sig)
        except ValueError as e:
            raise ConventionError(f"timesteps {ts} read in {self.spec.title}'s convention (t / {scale:g} is "
                                  f"{'1 - sigma' if self.spec.convention.time_is_one_minus_sigma else 'sigma'}) give "
                                  f"sigmas {sig}: {e}; or pass sigmas= (1 = noise, decreasing to 0)") from None

    def _sigmas(self, sigmas, timesteps):
        if (sigmas is None) == (timesteps is None):
            raise BackendError("give exactly one of sigmas= (this project's convention) or timesteps= (the model's)")
        if sigmas is not None and torch.is_tensor(sigmas) and sigmas.dim() > 1:
            raise BackendError(f"sigmas= has shape {tuple(sigmas.shape)}: it is the roll-out's schedule, one list for "
                               "the batch (K + 1 noise levels from 1 down to 0), not one per sample")
        if sigmas is None:
            return self.sigmas_from_timesteps(timesteps)
        try:
            return resolve_schedule(sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)
        except TypeError as e:  # e.g. a list of lists
            raise BackendError(f"sigmas= is the roll-out's schedule, K + 1 noise levels (floats) from 1 down to 0: "
                               f"{e}") from None

    # ---- a whole step -------------------------------------------------------------------------------
    def dopsd_step(self, noise, ctx_s, ctx_t, sigmas=None, *, timesteps=None, loss: str = "x0",
                   backward: str = "once", loss_scale: float = 1.0, backward_fn: Callable | None = None,
                   autocast=None, latent_hw=None) -> RolloutResult:
        """Roll-out from ``noise``, the teacher on every student state, the loss, and its backward
        (``once``: after the roll-out, the authors' schedule; ``stepwise``: after each state, the same
        gradient with one state's activations alive), scaled by ``loss_scale`` (e.g. 1 / grad_accum).

        Caller-owned backward: ``backward_fn(tensor)`` runs every backward (``accelerator.backward``, a
        GradScaler's ``lambda l: scaler.scale(l).backward()``, a DeepSpeed engine's ``backward``); it is
        called once (``once``) or K times (``stepwise``; with accelerate's scaling by 1 / accumulation
        steps each time: the same sum), plus the shared work's backward, which goes to autograd
        directly. ``autocast``: the context the forwards run in (``accelerator.autocast()``).
        ``noise``: the family's latent layout (``spec.latent_layouts``; klein's packed one with
        ``latent_hw``); states and velocities come back in it. The gradients land on the trainer's own
        parameters (averaged over DDP ranks at a sync step: :meth:`sync_gradients`); ``result.loss`` is
        detached."""
        sig = self._sigmas(sigmas, timesteps)
        x, back = self.spec.latents_in(noise, latent_hw)
        self._check_inputs(x, ("ctx_s", ctx_s), ("ctx_t", ctx_t))
        if autocast is not None and not hasattr(autocast, "__enter__"):
            raise BackendError(f"backend.dopsd_step: autocast= takes a context manager (accelerator.autocast(), "
                               f"torch.autocast('cuda', dtype=torch.bfloat16)), got {autocast!r}")
        # said once; not under the caller's own autocast; also where accelerate prepared the model after wrap()
        if autocast is None and (self.autocast_hint or (not self.autocast_said and _autocast_wrapped(self.model.ms))):
            self.autocast_hint, self.autocast_said = False, True
            if not torch.is_autocast_enabled(x.device.type):
                log.warning("backend: the model was prepared by accelerate with mixed precision, which wraps "
                            "model.forward; the backend calls the blocks directly, so the forwards run in the weights' "
                            "dtype: pass autocast=accelerator.autocast()")
        if self.engine:
            self._engine_ok(backward_fn, backward)
        if isinstance(autocast, contextlib._GeneratorContextManager) and not hasattr(autocast, "func"):
            raise BackendError("backend: autocast= was used already: accelerator.autocast() (a generator's context "
                               "manager) enters once; pass a new one at each step (autocast=accelerator.autocast()) "
                               "or a torch.autocast object, which may be reused")
        reached = self._reached = [] if backward_fn is not None else None
        try:
            with self.training():
                res = dopsd_step(self, x, ctx_s, ctx_t, sig, loss=loss, backward=backward, loss_scale=loss_scale,
                                 backward_fn=backward_fn, autocast=autocast)
                if reached is not None and not reached and len(sig) > 1:
                    raise BackendError("backend.dopsd_step: backward_fn returned without back-propagating the loss (no "
                                       "gradient reached the student): a backward after the step reaches none (the "
                                       "student's requires_grad flags are restored, DDP averages at the step's end); "
                                       "back-propagate inside backward_fn, e.g. lambda l: accelerator.backward(l + "
                                       "my_term), or use the callback form (rollout) for a loss of your own")
                self.sync_gradients()
        finally:
            self._reached = None
        res.states = [back(t) for t in res.states]
        res.student_v = [back(t) for t in res.student_v]
        res.teacher_v = [back(t) for t in res.teacher_v]
        return res

    def rollout(self, noise, ctx_s, ctx_t, sigmas=None, *, timesteps=None, backward_fn: Callable | None = None,
                latent_hw=None, check_weighting: bool = True) -> Iterator[RolloutState]:
        """The callback form: yields each :class:`RolloutState` (``sigma`` the noise level, ``t`` the model's
        time, ``v = eps - x0``); the caller calls ``state.predict()``, computes its loss and calls
        ``state.backward(loss)`` (through ``backward_fn``, e.g. ``accelerator.backward``; or its own
        backward, unchecked). On resuming, the roll-out steps with the student's (detached) velocity:
        ``x <- x + (sigma_next - sigma) v_s``. After the last state the gradients are averaged over DDP
        ranks (:meth:`sync_gradients`). The caller's ``requires_grad`` flags are restored when the loop
        ends (or is left). ``check_weighting=False``: the first roll-out's sigma-versus-t check of the loss's
        weighting is not made (a loss weighted by ``(1 - sigma)^2`` on purpose); the velocity-sign check stays."""
        sig = self._sigmas(sigmas, timesteps)
        xm, back = self.spec.latents_in(noise, latent_hw)
        self._check_inputs(xm, ("ctx_s", ctx_s), ("ctx_t", ctx_t))
        run = backward_fn or (lambda t: t.backward())
        rec = []

        def backward(st, loss):
            if self.engine:
                self._engine_ok(backward_fn, "stepwise")
            if self._check_loss and check_weighting and len(rec) < 2 and st.k == len(rec):
                d = float((_flat(st.v_student).detach().float() - _flat(st.v_teacher).float()).pow(2).mean())
                rec.append((float(st.sigma[0]), float(loss.detach()), d))
                _check_weighting(rec)
                if len(rec) == 2:
                    self._check_loss = False
            run(loss)

        fn = self.pair_fn(ctx_s, ctx_t)
        x = xm.detach().float()
        K = len(sig) - 1
        conv = self.spec.convention
        reached: list = []
        with self.training():
            for k in range(K):
                sigma = torch.full((x.shape[0],), sig[k], dtype=torch.float32, device=x.device)
                st = RolloutState(k, K, back(x), sigma, sig[k + 1], conv.model_time(sigma), fn, x, back, backward)
                st._reached = reached
                yield st
                if st.v_student is None:
                    raise BackendError(f"backend.rollout: state {k} was not predicted (call state.predict())")
                x = x + (sig[k + 1] - sig[k]) * st._v_model.detach().float()
            if K and not reached:
                raise BackendError("backend.rollout: no backward reached the student during the roll-out; a backward "
                                   "after the loop reaches no gradient (the student's requires_grad flags are restored "
                                   "and DDP averages at the loop's end): call state.backward(loss) for each state "
                                   "inside the loop, or use dopsd_step(..., backward='once') for one backward of the "
                                   "summed losses")
            self.sync_gradients()


FastPair = Backend  # the drop-in backend's class under its earlier name
