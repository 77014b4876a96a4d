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
and sign convention is its spec's (:mod:`dopsd_fast.families`). :class:`EagerPair` is the reference
(the diffusers model called per branch); :class:`~dopsd_fast.fastpath.FastPath` and the drop-in
backend (:mod:`dopsd_fast.backend`) are the packed fast implementations.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

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
    from dopsd_fast.context import Context

    out, i = [], 0
    for keys in struct:
        feats = flat[i]
        extra = {k: flat[i + 1 + j] for j, k in enumerate(keys)}
        out.append(Context(feats, extra))
        i += 1 + len(keys)
    return out
