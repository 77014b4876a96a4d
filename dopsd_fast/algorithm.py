"""The D-OPSD algorithm, with no model code (``shared/spec/dopsd.md``).

Convention used everywhere in this module: flow matching in *sigma* time, ``sigma = 1`` is pure
noise, ``x_sigma = (1 - sigma) * x0 + sigma * eps``, velocity ``v = eps - x0`` and therefore
``x0_hat = x_sigma - sigma * v``. Model adapters translate their model's own convention into this
one (Z-Image takes ``1 - sigma`` and returns ``-v``).

The public entry point other trainers can call with their own model functions is
:func:`rollout_loss`::

    result = dopsd_fast.rollout_loss(student_fn, teacher_fn, noise, sigmas, loss="x0",
                                     backward="once")
    result.loss.backward()          # "once": the caller back-propagates (the authors' schedule)

``student_fn(x, sigma) -> v`` runs with autograd; ``teacher_fn(x, sigma) -> v`` is evaluated under
``torch.no_grad()`` on the *student's* state. ``sigma`` is a tensor of shape ``(batch,)``.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from dopsd_fast.errors import ConventionError

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES = ("x0", "v")
BACKWARDS = ("once", "stepwise")

# Named training roll-out schedules (K + 1 values ending with 0): each model family registers its own
# (dopsd_fast.families, imported by ``import dopsd_fast``), e.g. Z-Image's ``zimage-k4``.
NAMED_SCHEDULES: dict[str, tuple[float, ...]] = {}


def register_schedules(schedules: dict[str, Sequence[float]]) -> None:
    """Add named schedules (a family's); a name registered twice with other values is refused."""
    for name, values in schedules.items():
        values = tuple(float(v) for v in values)
        if NAMED_SCHEDULES.get(name, values) != values:
            raise ValueError(f"roll-out schedule {name!r} is registered already with other values")
        NAMED_SCHEDULES[name] = values


def resolve_schedule(schedule: str | Sequence[float]) -> list[float]:
    """Return a validated roll-out schedule: strictly decreasing, first value <= 1, last value 0.

    ``schedule`` is a name from :data:`NAMED_SCHEDULES` or an explicit list of K + 1 sigmas.
    """
    if isinstance(schedule, str):
        if schedule not in NAMED_SCHEDULES:
            raise ValueError(
                f"unknown roll-out schedule {schedule!r}; known: {sorted(NAMED_SCHEDULES)} "
                "or an explicit list of sigmas ending with 0"
            )
        values = list(NAMED_SCHEDULES[schedule])
    else:
        bad = [s for s in schedule if isinstance(s, bool) or not isinstance(s, (int, float, str))]
        if bad:  # a nested list, null or mapping: the caller names its field (float()'s own error named none)
            raise TypeError(f"a roll-out schedule is a list of numbers (sigmas), got an entry {reprlib.repr(bad[0])}")
        values = [float(s) for s in schedule]
    if len(values) < 2:
        raise ValueError(f"a roll-out schedule needs at least 2 values (K >= 1), got {values}")
    if values[-1] != 0.0:
        raise ValueError(f"a roll-out schedule must end with sigma = 0, got {values}")
    if not (0.0 < values[0] <= 1.0):
        raise ValueError(f"a roll-out schedule must start in (0, 1], got {values[0]}")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"a roll-out schedule must be finite, got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"a roll-out schedule must be strictly decreasing, got {values}")
    return values


# At a pure-noise state (sigma = 1: x is the noise eps) a flow-matching model's velocity v = eps - E[x0]
# points along x: cos(v, x) ~ |eps| / |eps - x0| > 0 (about 0.7 for |x0| = |eps|, a distilled model's sharp
# x0; about 1 for a model predicting the data mean). A model output read with the other sign gives the
# negative of that. An untrained (random) model's output is uncorrelated with x: |cos| ~ 1 / sqrt(numel),
# 0.03 at the tiny test sizes, less at real ones. A limit of -0.3 refuses a flipped trained model and
# cannot fire on a random one.
SIGN_COS_LIMIT = -0.3


def velocity_sign_cos(x: torch.Tensor, v: torch.Tensor) -> float | None:
    """The mean over the batch of cos(v_b, x_b) (None where every v_b is ~0, e.g. a zero-initialised
    output layer: no evidence either way)."""
    xf, vf = x.detach().float().flatten(1), v.detach().float().flatten(1)
    nx, nv = xf.norm(dim=1), vf.norm(dim=1)
    ok = (nx > 0) & (nv > 1e-6 * nx)
    if not bool(ok.any()):
        return None
    return float(((xf * vf).sum(1)[ok] / (nx * nv)[ok]).mean())


def check_velocity_sign(x: torch.Tensor, v: torch.Tensor, sigma, who: str = "the model") -> None:
    """Refuse a velocity with the opposite sign (``x0 - eps``, e.g. Z-Image's raw output) at a pure-noise
    state (every sigma >= 0.99; elsewhere nothing is checked): :class:`ConventionError` when
    cos(v, x) < :data:`SIGN_COS_LIMIT` (see there why a random model cannot trip it)."""
    s = torch.as_tensor(sigma)
    if float(s.min()) < 0.99:
        return
    cos = velocity_sign_cos(x, v)
    if cos is not None and cos < SIGN_COS_LIMIT:
        raise ConventionError(f"{who}'s velocity at sigma = 1 points away from the noise (cos(v, x) = {cos:.2f}): it "
                              "looks like x0 - eps; return v = eps - x0 (negate the output of a model that "
                              "returns -v, as Z-Image's transformer does)")


def x0_from_v(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x0_hat = x - sigma * v`` with ``sigma`` of shape ``(batch,)`` broadcast over the rest."""
    return x - _bcast(sigma, x) * v


def state_loss(v_student: torch.Tensor, v_teacher: torch.Tensor, sigma: torch.Tensor, loss: str = "x0"):
    """Loss of one roll-out state, in fp32.

    ``"x0"``: ``mean((x0_s - x0_t)^2) = mean(sigma^2 * (v_s - v_t)^2)`` (the authors' scripts);
    ``"v"``: ``mean((v_s - v_t)^2)`` (the paper). The teacher prediction is treated as a constant.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    diff = v_student.float() - v_teacher.detach().float()
    sq = diff * diff
    if loss == "x0":
        sq = sq * _bcast(sigma.float(), sq) ** 2
    return sq.mean()


@dataclass
class RolloutResult:
    """What :func:`rollout_loss` returns.

    ``loss``: mean of the K state losses; with autograd for ``backward="once"``, detached (already
    back-propagated) for ``"stepwise"``. ``state_losses``: the K detached per-state losses.
    ``states``: the K + 1 detached states x_0 (the noise) ... x_K (the student's sample).
    ``student_v`` / ``teacher_v``: the detached per-state predictions (for parity checks).
    """

    loss: torch.Tensor
    state_losses: list[torch.Tensor]
    states: list[torch.Tensor]
    student_v: list[torch.Tensor]
    teacher_v: list[torch.Tensor]


def rollout_loss(
    student_fn: VelocityFn,
    teacher_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: Sequence[float] | str,
    loss: str = "x0",
    backward: str = "once",
    loss_scale: float = 1.0,
    check_sign: bool = False,
) -> RolloutResult:
    """One D-OPSD roll-out: deterministic Euler from ``noise`` along ``sigmas``, the teacher
    evaluated on every student state, the loss averaged over the K states.

    Args:
        student_fn: ``(x, sigma) -> v`` of the trainable model under the student context.
        teacher_fn: ``(x, sigma) -> v`` of the EMA/frozen model under the teacher context; always
            called under ``torch.no_grad()``.
        noise: x_0, shape ``(batch, ...)``; the roll-out runs in fp32 whatever the model dtype.
        sigmas: K + 1 values, strictly decreasing, ending with 0 (or a name of
            :data:`NAMED_SCHEDULES`).
        loss: ``"x0"`` (default, sigma^2-weighted) or ``"v"``.
        backward: ``"once"``: return the loss with autograd, the caller calls ``backward()``
            (activations of K student forwards alive at once). ``"stepwise"``: call
            ``backward()`` after each state (same gradient, memory of one forward).
        loss_scale: multiplies what is back-propagated in ``"stepwise"`` mode (e.g.
            ``1 / grad_accum``); ignored for ``"once"``, where the caller scales.
        check_sign: at the first state, when it is pure noise (sigma >= 0.99), refuse velocities with
            the opposite sign (:func:`check_velocity_sign`: a :class:`~dopsd_fast.errors.ConventionError`
            before any backward; a random model cannot trip it). Off by default: synthetic velocity
            functions (``lambda x, s: -x``) are legitimate here; the drop-in backend checks always.

    Conventions: ``sigma`` is noise level (1 = noise), NOT a model time ``t = 1 - sigma``; the
    functions return ``v = eps - x0`` (a model that returns ``x0 - eps``, like Z-Image's transformer
    called with ``t = 1 - sigma``, must be negated).
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def pair_fn(x, sigma):
        with torch.no_grad():
            v_t = teacher_fn(x, sigma)
        return student_fn(x, sigma), v_t

    return _rollout(pair_fn, noise, sigmas, loss, backward, loss_scale, check_sign=check_sign)


def rollout_loss_paired(pair_fn, noise: torch.Tensor, sigmas: Sequence[float] | str, loss: str = "x0",
                        backward: str = "once", loss_scale: float = 1.0, backward_fn=None,
                        check_inputs: bool = True) -> RolloutResult:
    """:func:`rollout_loss` with one callable for both branches: ``pair_fn(x, sigma) -> (v_student,
    v_teacher)`` (the fast path's packed double forward). ``v_teacher`` must carry no autograd
    history; it is treated as a constant either way. Same semantics, same result. ``backward_fn(t)``:
    who runs the stepwise schedule's per-state backward (default ``t.backward()``). ``check_inputs``:
    read the noise once to refuse non-finite values (a host read; the trainer, which draws its own
    noise and reads its loss once per optimizer step, passes False)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return _rollout(pair_fn, noise, sigmas, loss, backward, loss_scale, backward_fn, check_inputs=check_inputs)


def _concrete(t: torch.Tensor) -> bool:
    """``t``'s values can be read here: not a meta or fake tensor (the step models), not inside a CUDA
    graph capture (where a read is a forbidden sync)."""
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type == "meta" or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_noise(noise, read: bool = True) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"rollout_loss: noise must be a tensor (x_0 of shape (batch, ...)), got {type(noise).__name__}")
    if noise.ndim < 2 or noise.shape[0] == 0:
        raise ValueError(f"rollout_loss: noise must have shape (batch, ...) with batch >= 1, got {tuple(noise.shape)}")
    if read and _concrete(noise) and not bool(torch.isfinite(noise).all()):  # one read per roll-out
        bad = int((~torch.isfinite(noise)).sum())
        raise ValueError(f"rollout_loss: the noise holds {bad} non-finite values (NaN / inf) of {noise.numel()}: "
                         "draw it from torch.randn, finite, before the roll-out")


def _check_outputs(k: int, v_s, v_t) -> None:
    for who, v in (("student", v_s), ("teacher", v_t)):
        if not isinstance(v, torch.Tensor):
            what = "None" if v is None else type(v).__name__
            raise TypeError(f"state {k}: the {who}'s model function returned {what}, not a tensor: return the "
                            "velocity itself (a diffusers model's output: `.sample`, or `[0]` of its tuple)")
    if torch.is_grad_enabled() and not v_s.requires_grad:
        raise ValueError(f"state {k}: the student's velocity carries no autograd history, so D-OPSD has nothing to "
                         "train: call the student with gradients enabled (not under torch.no_grad() / "
                         "inference_mode) and make sure its trainable parameters (the LoRA) have requires_grad=True")


def _rollout(pair_fn, noise, sigmas, loss, backward, loss_scale, backward_fn=None, check_sign=False,
             check_inputs=True) -> RolloutResult:
    sig = resolve_schedule(sigmas)
    _check_noise(noise, read=check_inputs)
    k_states = len(sig) - 1
    batch = noise.shape[0]
    x = noise.detach().float()
    states = [x]
    losses: list[torch.Tensor] = []
    student_vs: list[torch.Tensor] = []
    teacher_vs: list[torch.Tensor] = []
    total = None
    for k in range(k_states):
        sigma = torch.full((batch,), sig[k], dtype=torch.float32, device=x.device)
        x_in = x.detach()  # no back-propagation through time across states
        v_s, v_t = pair_fn(x_in, sigma)
        _check_outputs(k, v_s, v_t)
        v_t = v_t.detach()
        if v_s.shape != x_in.shape or v_t.shape != x_in.shape:
            raise ValueError(
                f"state {k}: model outputs must have the state's shape {tuple(x_in.shape)}, got "
                f"student {tuple(v_s.shape)} and teacher {tuple(v_t.shape)}"
            )
        if check_sign and k == 0:
            check_velocity_sign(x_in, v_t, sigma, "teacher_fn")
            check_velocity_sign(x_in, v_s, sigma, "student_fn")
        lk = state_loss(v_s, v_t, sigma, loss) / k_states
        if backward == "stepwise":
            if backward_fn is None:
                (lk * loss_scale).backward()
            else:
                backward_fn(lk * loss_scale)
            lk = lk.detach()
        total = lk if total is None else total + lk
        losses.append(lk.detach() * k_states)
        student_vs.append(v_s.detach())
        teacher_vs.append(v_t.detach())
        x = x_in + (sig[k + 1] - sig[k]) * v_s.detach().float()
        states.append(x)
    return RolloutResult(total, losses, states, student_vs, teacher_vs)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Deterministic Euler sampling along ``sigmas`` (inference / validation), fp32 state."""
    x = noise.float()
    for k in range(len(sigmas) - 1):
        sigma = torch.full((x.shape[0],), float(sigmas[k]), dtype=torch.float32, device=x.device)
        x = x + (float(sigmas[k + 1]) - float(sigmas[k])) * velocity_fn(x, sigma).float()
    return x


@torch.no_grad()
def ema_update_(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], decay: float) -> None:
    """``theta_bar <- decay * theta_bar + (1 - decay) * theta`` in place.

    ``decay = 1`` leaves the teacher frozen, ``decay = 0`` copies the live student. The student
    tensors may live on another device or dtype than the teacher's (e.g. an EMA kept on the CPU).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    teacher = list(teacher)
    student = list(student)
    if len(teacher) != len(student):
        raise ValueError(f"EMA: {len(teacher)} teacher tensors but {len(student)} student tensors")
    if decay == 1.0:
        return
    for t, s in zip(teacher, student):
        if t.shape != s.shape:
            raise ValueError(f"EMA: shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
    # pairs of one device and dtype: one multi-tensor launch per (device, dtype), not one per tensor
    # (hundreds of LoRA factors); a student tensor of another device or dtype (an EMA kept on the CPU,
    # fp32 masters of a bf16 model) moved / cast one at a time, never a second copy of the whole model
    groups: dict = {}
    for t, s in zip(teacher, student):
        s = s.detach()
        if s.device != t.device or s.dtype != t.dtype:
            s = s.to(device=t.device, dtype=t.dtype)
            if decay == 0.0:
                t.copy_(s)
            else:
                t.lerp_(s, 1.0 - decay)
            continue
        ts, ss = groups.setdefault((t.device, t.dtype), ([], []))
        ts.append(t)
        ss.append(s)
    for ts, ss in groups.values():
        if decay == 0.0:
            torch._foreach_copy_(ts, ss)
        else:
            torch._foreach_lerp_(ts, ss, 1.0 - decay)


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)
