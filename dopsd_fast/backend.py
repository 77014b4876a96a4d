"""The drop-in backend: another D-OPSD trainer keeps its diffusers model, its adapters, its optimizer and
its checkpoint format, and gets the packed fast step by one call.

    from dopsd_fast import backend

    fast = backend.wrap(transformer, student_adapter="student", teacher_adapter="teacher")  # (i) two peft adapters
    fast = backend.wrap(transformer, student_adapter="default", teacher_shadow=ema_state)   # (ii) EMA shadow copy
    fast = backend.wrap(student_transformer, teacher=ema_transformer)                       # (iii) two modules

    res = fast.dopsd_step(noise, ctx_s, ctx_t, timesteps=[0, 100, 250, 500])  # roll-out, teacher, loss, backward
    optimizer.step()                                                         # the trainer's own, unchanged

``transformer`` is a diffusers ``ZImageTransformer2DModel`` or ``Flux2Transformer2DModel`` (or a peft
``PeftModel`` around one); the fast model reads its parameters in place, so the trainer's optimizer,
EMA and checkpoints see exactly the tensors they own. Contexts are what such trainers hold: Z-Image a
list of per-sample prompt embeddings ``(L_b, D)``; FLUX.2-klein prompt embeddings ``(B, L, D)`` plus,
for an editing teacher, reference latents (:func:`contexts`).

``timesteps`` are the model's own timesteps on a 1000 scale as the authors' loops write them (Z-Image:
``t / 1000`` is the model time ``1 - sigma``; FLUX.2: ``t / 1000`` is sigma); or pass ``sigmas`` (K + 1
values ending with 0) in this project's convention. Everything returned is in the (sigma, v)
convention: ``v = eps - x0``.

The callback form, for trainers that run their own loop per roll-out state (stepwise backward)::

    for state in fast.rollout(noise, ctx_s, ctx_t, timesteps=ts):
        v_s, v_t = state.predict()                 # one packed pass: student (autograd) + teacher batch
        loss = my_loss(v_s, v_t, state.sigma)      # e.g. dopsd_fast.state_loss(...) / state.states
        loss.backward()                            # the roll-out step happens when the loop resumes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from dopsd_fast.algorithm import RolloutResult, resolve_schedule
from dopsd_fast.context import Context
from dopsd_fast.families import family_of_transformer
from dopsd_fast.models.ops import build_ops
from dopsd_fast.models.paired import Shadow
from dopsd_fast.pair import FastPair as PackedPair
from dopsd_fast.pair import dopsd_step

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
            raise ValueError(f"contexts: references[{i}] must be (B={len(features)}, C, h, w), got {tuple(r.shape)}")
    return [Context(f, {f"ref{j}": r[b] for j, r in enumerate(refs)}) for b, f in enumerate(features)]


def _unwrap(module):
    """A peft ``PeftModel`` -> the diffusers model it wraps (the adapters live in its modules)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _shadow(model, adapter: str, state: dict):
    """An EMA shadow dict (the model's parameter names, with or without the adapter name, as peft's
    state dicts write them) -> a :class:`~dopsd_fast.models.paired.Shadow` keyed by the live
    parameters. Every LoRA parameter of ``adapter`` must have its shadow tensor, of the same shape."""
    tag = f".{adapter}."
    live = {n: p for n, p in model.named_parameters() if "lora_" in n and tag in n}
    if not live:
        raise ValueError(f"backend.wrap: the model has no LoRA parameters of adapter {adapter!r}")
    norm = {k.removeprefix("base_model.model.").removeprefix("transformer."): v for k, v in state.items()}
    out, missing = {}, []
    for n, p in live.items():
        t = norm.get(n, norm.get(n.replace(tag, ".")))
        if t is None:
            missing.append(n)
            continue
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"backend.wrap: teacher_shadow[{n!r}] has shape {tuple(t.shape)}, the parameter "
                             f"{tuple(p.shape)}")
        out[id(p)] = t
    if missing:
        raise ValueError(f"backend.wrap: teacher_shadow lacks {len(missing)} of {len(live)} LoRA tensors of adapter "
                         f"{adapter!r} (e.g. {missing[0]!r})")
    return Shadow(adapter, out)


def wrap(student, teacher=None, *, student_adapter: str | None = None, teacher_adapter: str | None = None,
         teacher_shadow: dict | None = None, kernels: str = "auto", attention: str = "auto",
         checkpoint_layers: int = 0, nvtx: bool = False) -> "Backend":
    """The packed fast pair over a trainer's own model(s). One of:

    (i) ``wrap(model, student_adapter="student", teacher_adapter="teacher")``: one model, two peft
        adapters (the authors' scripts);
    (ii) ``wrap(model, student_adapter="default", teacher_shadow=ema)``: one adapter; the teacher's LoRA
        tensors read from the EMA shadow dict ``ema`` (parameter name -> tensor), nothing swapped;
    (iii) ``wrap(model, teacher=ema_model)``: two modules (full fine-tuning; adapters optional).

    ``kernels`` / ``attention``: as ``fast.kernels`` / ``fast.attention`` (auto: our Triton kernels on
    CUDA, PyTorch elsewhere); ``checkpoint_layers``: main layers under gradient checkpointing.
    """
    ms = _unwrap(student)
    mt = _unwrap(teacher) if teacher is not None else ms
    spec = family_of_transformer(ms)
    if teacher is not None and teacher_shadow is not None:
        raise ValueError("backend.wrap: give either teacher= (a second module) or teacher_shadow= (an EMA of the "
                         "adapter), not both")
    if teacher is None:
        if student_adapter is None:
            raise ValueError("backend.wrap: one module needs student_adapter= (and teacher_adapter= or "
                             "teacher_shadow=); for full fine-tuning pass teacher=<the EMA module>")
        if teacher_shadow is not None:
            if teacher_adapter is not None:
                raise ValueError("backend.wrap: teacher_shadow= replaces teacher_adapter=")
            teacher_adapter = _shadow(ms, student_adapter, teacher_shadow)
        elif teacher_adapter is None:
            raise ValueError("backend.wrap: the teacher needs teacher_adapter= or teacher_shadow=")
        elif teacher_adapter == student_adapter:
            raise ValueError("backend.wrap: student and teacher adapters must differ (use teacher_shadow= for an EMA)")
    for name, m, ad in (("student", ms, student_adapter), ("teacher", mt, teacher_adapter)):
        if isinstance(ad, str) and not any(ad in getattr(x, "lora_A", {}) for x in m.modules()):
            raise ValueError(f"backend.wrap: the {name} adapter {ad!r} is on no module of the model")
    device = next(ms.parameters()).device
    ops = build_ops(kernels, attention, device)
    kw = dict(ops=ops, nvtx=nvtx)
    if checkpoint_layers:
        kw["checkpoint_layers"] = checkpoint_layers
    model = spec.fast_model_class()((ms, student_adapter), (mt, teacher_adapter), **kw)
    return Backend(spec, model, nvtx=nvtx)


@dataclass
class RolloutState:
    """One roll-out state of :meth:`Backend.rollout`: ``k`` of ``states``; ``x`` (detached, fp32),
    ``sigma`` (B,), ``sigma_next``; :meth:`predict` runs the packed pass once."""

    k: int
    states: int
    x: torch.Tensor
    sigma: torch.Tensor
    sigma_next: float
    _fn: object = None
    v_student: torch.Tensor | None = None
    v_teacher: torch.Tensor | None = None

    def predict(self):
        """(v_student with autograd, v_teacher constant) at this state."""
        self.v_student, self.v_teacher = self._fn(self.x, self.sigma)
        self.v_teacher = self.v_teacher.detach()
        return self.v_student, self.v_teacher


class Backend(PackedPair):
    """The pair protocol (:class:`~dopsd_fast.pair.FastPair`: ``pair_fn``, ``velocity``) over a trainer's own
    model, taking what such trainers hold (contexts as tensors, the model's own timesteps), plus the
    whole step (:meth:`dopsd_step`) and the per-state callback form (:meth:`rollout`)."""

    def __init__(self, spec, model, nvtx: bool = False):
        super().__init__(model, backward="stepwise", nvtx=nvtx)
        self.spec = spec

    # ---- the protocol ----------------------------------------------------------------------------
    def pair_fn(self, ctx_s, ctx_t, backward: str = "stepwise", finish: bool = False):
        """One micro-batch's ``(x, sigma) -> (v_s, v_t)``; work that depends only on the contexts and the
        weights is done at the first state and reused: the teacher's always, the student's with
        ``backward="once"`` (the caller back-propagates once per roll-out) or with ``finish=True`` (the
        caller calls ``fn.finish()`` after the roll-out's last backward)."""
        return super().pair_fn(contexts(ctx_s), contexts(ctx_t), backward=backward, finish=finish)

    def velocity(self, branch: str, x, sigma, ctx):
        """One branch alone; the teacher without autograd."""
        return super().velocity(branch, x, sigma, contexts(ctx))

    # ---- schedules -------------------------------------------------------------------------------
    def sigmas_from_timesteps(self, timesteps, scale: float = 1000.0) -> list[float]:
        """The model's own timesteps (the roll-out's K states, ``scale`` = 1000) -> K + 1 sigmas ending
        with 0, by the family's convention."""
        ts = [float(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
        sig = [float(self.spec.convention.sigma_of(t / scale)) for t in ts]
        return resolve_schedule(sig + [0.0] if sig[-1] != 0.0 else sig)

    def _sigmas(self, sigmas, timesteps):
        if (sigmas is None) == (timesteps is None):
            raise ValueError("give exactly one of sigmas= (this project's convention) or timesteps= (the model's)")
        return resolve_schedule(sigmas) if sigmas is not None else self.sigmas_from_timesteps(timesteps)

    # ---- a whole step -------------------------------------------------------------------------------
    def dopsd_step(self, noise, ctx_s, ctx_t, sigmas=None, *, timesteps=None, loss: str = "x0",
                   backward: str = "once", loss_scale: float = 1.0) -> RolloutResult:
        """Roll-out from ``noise``, the teacher on every student state, the loss, and its backward
        (``once``: after the roll-out, the authors' schedule; ``stepwise``: after each state, the same
        gradient with one state's activations alive), scaled by ``loss_scale`` (e.g. 1 / grad_accum).
        The gradients land on the trainer's own parameters; ``result.loss`` is detached."""
        return dopsd_step(self, noise, ctx_s, ctx_t, self._sigmas(sigmas, timesteps), loss=loss, backward=backward,
                          loss_scale=loss_scale)

    def rollout(self, noise, ctx_s, ctx_t, sigmas=None, *, timesteps=None) -> Iterator[RolloutState]:
        """The callback form: yields each :class:`RolloutState`; the caller calls ``state.predict()``,
        computes and back-propagates its loss; on resuming, the roll-out steps with the student's
        (detached) velocity: ``x <- x + (sigma_next - sigma) v_s``."""
        sig = self._sigmas(sigmas, timesteps)
        fn = self.pair_fn(ctx_s, ctx_t)
        x = noise.detach().float()
        K = len(sig) - 1
        for k in range(K):
            st = RolloutState(k, K, x, torch.full((x.shape[0],), sig[k], dtype=torch.float32, device=x.device),
                              sig[k + 1], fn)
            yield st
            if st.v_student is None:
                raise RuntimeError(f"backend.rollout: state {k} was not predicted (call state.predict())")
            x = x + (sig[k + 1] - sig[k]) * st.v_student.detach().float()


FastPair = Backend  # the drop-in backend's class under its earlier name
