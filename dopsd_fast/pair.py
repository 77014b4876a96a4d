"""The pair protocol: the one interface between the D-OPSD step and a model, eager or fast.

* ``pair_fn(ctx_s, ctx_t, finish=False) -> fn(x, sigma) -> (v_student, v_teacher)``: one roll-out
  state, the student with autograd, the teacher without (what
  :func:`dopsd_fast.algorithm.rollout_loss_paired` calls), for one micro-batch's roll-out (the same
  contexts and weights at every call). With ``finish=True`` the caller calls ``fn.finish()`` once after
  the roll-out's last backward (the fast path then back-propagates work it shared across the states;
  a no-op elsewhere);
* ``velocity(branch, x, sigma, ctx) -> v``: one branch (``"student"`` / ``"teacher"``, or ``"s"`` /
  ``"t"``) for validation, sampling and the SFT baseline; the student with autograd when grad is
  enabled, the teacher never.

Everything is in the (sigma, v) convention of :mod:`dopsd_fast.algorithm`; each family's own time
and sign convention is its spec's (:mod:`dopsd_fast.families`). Eager and fast differ only in the
pair object: :class:`EagerPair` is the reference (the diffusers model called per branch),
:class:`FastPair` the packed fast model (a family's ``PairedModel``); the trainer's
:class:`~dopsd_fast.fastpath.FastPath` and the drop-in :class:`~dopsd_fast.backend.Backend` extend it.
:func:`dopsd_step` is the one D-OPSD step over any pair: what the trainer, the drop-in backend and
``benchmarks/step_time.py`` call.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch

from dopsd_fast.algorithm import RolloutResult, rollout_loss_paired
from dopsd_fast.context import Context
from dopsd_fast.profiling import nvtx_range

BRANCHES = {"student": "s", "s": "s", "teacher": "t", "t": "t"}


def branch_key(branch: str) -> str:
    try:
        return BRANCHES[branch]
    except KeyError:
        raise ValueError(f"branch must be 'student' or 'teacher', got {branch!r}") from None


class Pair(Protocol):
    def pair_fn(self, ctx_s, ctx_t, backward: str | None = None, finish: bool = False) -> Callable:
        ...

    def velocity(self, branch: str, x: torch.Tensor, sigma: torch.Tensor, ctx) -> torch.Tensor:
        ...


class EagerPair:
    """The eager reference: ``velocity_fn(module, x, sigma, contexts)`` (the family's diffusers call,
    e.g. an adapter's ``velocity``) on ``student()`` / ``teacher()``, the callables that select the
    module and adapter of each branch (:class:`~dopsd_fast.weights.StudentTeacher`'s). After any call
    the student is selected again (what a gradient-checkpoint recompute must see)."""

    def __init__(self, velocity_fn, student: Callable, teacher: Callable):
        self.velocity_fn, self.student, self.teacher = velocity_fn, student, teacher

    def pair_fn(self, ctx_s, ctx_t, backward: str | None = None, finish: bool = False):
        def fn(x, sigma):
            with torch.no_grad():
                v_t = self.velocity_fn(self.teacher(), x, sigma, ctx_t)
            return self.velocity_fn(self.student(), x, sigma, ctx_s), v_t
        fn.finish = lambda: None  # nothing shared across states here
        return fn

    def velocity(self, branch, x, sigma, ctx):
        if branch_key(branch) == "t":
            with torch.no_grad():
                v = self.velocity_fn(self.teacher(), x, sigma, ctx)
            self.student()
            return v
        return self.velocity_fn(self.student(), x, sigma, ctx)


class FastPair:
    """The packed fast model behind the protocol: ``model`` (a family's
    :class:`~dopsd_fast.models.paired.PairedModel`) runs the student (with autograd) and the teacher
    (without) in one packed pass per state. What depends only on the contexts and the weights is done
    at the first state of a roll-out and reused (:meth:`pair_fn`). ``fp8_ctx(enabled)``: the context a
    forward runs in (TransformerEngine's FP8 autocast; a no-op otherwise); ``nvtx``: ranges per state."""

    def __init__(self, model, backward: str = "once", fp8_ctx=None, fp8_teacher: bool = True, nvtx: bool = False):
        self.model = model
        self.backward = backward
        self.fp8_ctx = fp8_ctx or (lambda enabled=True: contextlib.nullcontext())
        self.fp8_teacher = fp8_teacher
        self.nvtx = nvtx

    def _region(self, name: str):
        if not self.nvtx:
            return contextlib.nullcontext()

        return nvtx_range(name)

    def single_branch(self, which: str, x, sigma, ctx):
        """One branch (``"s"`` / ``"t"``) through the packed model, the other not run."""
        with self.fp8_ctx(which == "s" or self.fp8_teacher):
            v_s, v_t = self.model.velocity_pair(x, sigma, ctx if which == "s" else None, ctx if which == "t" else None)
        return v_s if which == "s" else v_t

    def velocity(self, branch: str, x, sigma, ctx):
        """One branch's velocity: the teacher always without autograd, the student with autograd when
        grad is enabled."""
        which = branch_key(branch)
        if which == "s" and torch.is_grad_enabled():
            with self._region("student"):
                return self.single_branch("s", x, sigma, ctx)
        with torch.no_grad(), self._region(f"{which} forward"):
            return self.single_branch(which, x, sigma, ctx)

    def pair_fn(self, ctx_s, ctx_t, backward: str | None = None, finish: bool = False):
        """``(x, sigma) -> (v_student, v_teacher)`` for one micro-batch's roll-out (the same contexts and
        weights at every call), ALWAYS the packed pair. Work that depends only on them is computed at
        the first state and reused: the teacher's always; the student's where ``backward`` (default: the
        pair's schedule) is ``once``, or with ``finish`` (any schedule: the caller then calls
        ``fn.finish()`` after the roll-out's last backward)."""
        once = (backward or self.backward) == "once"
        share = self.model.new_share(student="deferred" if finish else "graph" if once else False)

        def fn(x, sigma):
            with self._region("state"), self.fp8_ctx(True):
                return self.model.velocity_pair(x, sigma, ctx_s, ctx_t, share=share)
        fn.share = share
        fn.finish = share.finish if share is not None else (lambda: None)
        return fn


def dopsd_step(pair, noise: torch.Tensor, ctx_s, ctx_t, sigmas, *, loss: str = "x0", backward: str = "once",
               loss_scale: float = 1.0, autocast=None, backward_fn: Callable | None = None,
               region: Callable | None = None, check_inputs: bool = True) -> RolloutResult:
    """One D-OPSD step of one micro-batch over any pair (:class:`Pair`): the K-state roll-out from
    ``noise``, the teacher on every student state, the loss, and its backward (``once``: after the
    roll-out, the authors' schedule; ``stepwise``: after each state, the same gradient with one state's
    activations alive), scaled by ``loss_scale`` (e.g. 1 / grad_accum); then the shared work's backward
    (``fn.finish()``). ``autocast``: the context the forwards run in; ``backward_fn(tensor)``: who runs
    each backward (default ``tensor.backward()``; e.g. ``accelerator.backward``, a DeepSpeed engine's):
    given one, EVERY gradient goes through it (once per roll-out, or once per state), so the student's
    state-independent work is not deferred to a separate ``fn.finish()`` backward the caller's engine
    would not see (stepwise then recomputes it per state); ``region(name)``: a context around the
    backward work (nvtx). ``result.loss`` comes back detached. ``check_inputs``: the noise read once for non-finite
    values (:func:`~dopsd_fast.algorithm.rollout_loss_paired`)."""
    finish = backward_fn is None
    backward_fn = backward_fn or (lambda t: t.backward())
    region = region or (lambda name: contextlib.nullcontext())
    fn = pair.pair_fn(ctx_s, ctx_t, backward=backward, finish=finish)
    with autocast if autocast is not None else contextlib.nullcontext():
        res = rollout_loss_paired(fn, noise, sigmas, loss=loss, backward=backward, loss_scale=loss_scale,
                                  backward_fn=backward_fn, check_inputs=check_inputs)
    if backward == "once":
        with region("backward"):
            backward_fn(res.loss * loss_scale)
    with region("backward (shared)"):
        fn.finish()
    res.loss = res.loss.detach()
    return res


def flatten_contexts(ctx) -> tuple[tuple, list]:
    """Contexts -> (structure, tensors): the features and extra tensors in a fixed order, and the
    structure (extra keys per context) that :func:`unflatten_contexts` needs (CUDA-graph inputs)."""
    struct, flat = [], []
    for c in ctx:
        keys = tuple(sorted(k for k, v in c.extra.items() if torch.is_tensor(v)))
        struct.append(keys)
        flat.append(c.features)
        flat.extend(c.extra[k] for k in keys)
    return tuple(struct), flat


def unflatten_contexts(struct, flat) -> list:
    out, i = [], 0
    for keys in struct:
        feats = flat[i]
        extra = {k: flat[i + 1 + j] for j, k in enumerate(keys)}
        out.append(Context(feats, extra))
        i += 1 + len(keys)
    return out
