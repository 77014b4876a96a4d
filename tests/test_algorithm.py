import pytest
import torch

from dopsd_fast import NAMED_SCHEDULES, ema_update_, resolve_schedule, rollout_loss, state_loss, x0_from_v
from tests.conftest import assert_close


def test_named_schedules():
    assert resolve_schedule("zimage-k4") == [1.0, 0.9, 0.75, 0.5, 0.0]
    # the authors' timestep table / 1000, exactly (their train_dopsd.py, num_training_steps == 8)
    assert resolve_schedule("zimage-k8") == [1.0, 0.9768991, 0.9477647, 0.9098782, 0.8585987, 0.7852998, 0.6719212,
                                             0.4732203, 0.0]
    assert resolve_schedule([1.0, 0.6, 0.0]) == [1.0, 0.6, 0.0]
    assert set(NAMED_SCHEDULES) >= {"zimage-k4", "zimage-k8"}


@pytest.mark.parametrize("bad", [[1.0, 0.5], [1.0, 0.5, 0.6, 0.0], [1.5, 0.0], [0.0], "nope", [1.0, float("nan"), 0.0]])
def test_bad_schedules(bad):
    with pytest.raises(ValueError):
        resolve_schedule(bad)


def _linear(a):
    return lambda x, sigma: a * x + sigma.view(-1, *([1] * (x.ndim - 1)))


def test_euler_rollout_by_hand():
    # student v = 0.5 x + sigma, teacher v = -x ; by hand on a scalar per sample
    noise = torch.tensor([[1.0], [-2.0]])
    sig = [1.0, 0.75, 0.0]
    with torch.no_grad():  # a student with no parameters: the values only
        res = rollout_loss(_linear(0.5), lambda x, s: -x, noise, sig, loss="v")
    x0 = noise
    vs0 = 0.5 * x0 + 1.0
    x1 = x0 + (0.75 - 1.0) * vs0
    vs1 = 0.5 * x1 + 0.75
    x2 = x1 + (0.0 - 0.75) * vs1
    assert_close(res.states[1], x1, atol=1e-7, name="x1")
    assert_close(res.states[2], x2, atol=1e-7, name="x2")
    l0 = ((vs0 - (-x0)) ** 2).mean()
    l1 = ((vs1 - (-x1)) ** 2).mean()
    assert_close(res.loss, (l0 + l1) / 2, atol=1e-7, name="loss")
    assert_close(torch.stack(res.state_losses), torch.stack([l0, l1]), atol=1e-7, name="state losses")


def test_x0_loss_is_sigma_squared_v_mse():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 6)
    vs, vt = torch.randn_like(x), torch.randn_like(x)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    x0s, x0t = x0_from_v(x, sigma, vs), x0_from_v(x, sigma, vt)
    direct = ((x0s - x0t) ** 2).mean()
    assert_close(state_loss(vs, vt, sigma, "x0"), direct, rtol=1e-5, name="x0 loss")
    same_sigma = torch.full((3,), 0.7)
    assert_close(state_loss(vs, vt, same_sigma, "x0"), 0.49 * state_loss(vs, vt, same_sigma, "v"), rtol=1e-6)


class _Lin(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(6, 6, generator=g) * 0.3)

    def forward(self, x, sigma):
        return x @ self.w + sigma[:, None]


def test_once_and_stepwise_equal_gradients_and_teacher_untouched():
    noise = torch.randn(2, 6)
    student, teacher = _Lin(0), _Lin(1)
    teacher.requires_grad_(False)
    t_before = teacher.w.clone()
    r1 = rollout_loss(student, teacher, noise, "zimage-k4", backward="once")
    r1.loss.backward()
    g_once = student.w.grad.clone()
    student.w.grad = None
    r2 = rollout_loss(student, teacher, noise, "zimage-k4", backward="stepwise")
    assert not r2.loss.requires_grad
    assert_close(student.w.grad, g_once, atol=1e-7, rtol=1e-6, name="grad once vs stepwise")
    assert_close(r2.loss, r1.loss.detach(), rtol=1e-6)
    assert torch.equal(teacher.w, t_before) and teacher.w.grad is None


def test_teacher_never_sees_grad_and_states_are_detached():
    noise = torch.randn(2, 6)
    student = _Lin(0)
    seen = []

    def teacher(x, s):
        seen.append((torch.is_grad_enabled(), x.requires_grad))
        return x * 0.1

    res = rollout_loss(student, teacher, noise, [1.0, 0.5, 0.25, 0.0])
    assert seen == [(False, False)] * 3
    assert all(not s.requires_grad for s in res.states)
    # the gradient equals the sum of per-state gradients computed on the detached states alone
    res.loss.backward()
    g = student.w.grad.clone()
    student.w.grad = None
    total = 0
    sig = [1.0, 0.5, 0.25, 0.0]
    for k in range(3):
        s = torch.full((2,), sig[k])
        total = total + state_loss(student(res.states[k], s), teacher(res.states[k], s), s) / 3
    total.backward()
    assert_close(student.w.grad, g, atol=1e-7, rtol=1e-6, name="no BPTT")


def test_stepwise_loss_scale():
    noise = torch.randn(2, 6)
    s = _Lin(0)
    rollout_loss(s, _Lin(1), noise, "zimage-k4", backward="stepwise", loss_scale=0.25)
    g = s.w.grad.clone()
    s.w.grad = None
    rollout_loss(s, _Lin(1), noise, "zimage-k4", backward="stepwise")
    assert_close(g, 0.25 * s.w.grad, rtol=1e-6, atol=1e-9)


def test_ema_math_and_modes():
    t = [torch.tensor([1.0, 2.0])]
    s = [torch.tensor([3.0, -2.0])]
    ema_update_(t, s, 0.9)
    assert_close(t[0], torch.tensor([1.2, 1.6]), atol=1e-6)
    frozen = [torch.tensor([1.0, 2.0])]
    ema_update_(frozen, s, 1.0)
    assert torch.equal(frozen[0], torch.tensor([1.0, 2.0]))
    live = [torch.tensor([1.0, 2.0])]
    ema_update_(live, s, 0.0)
    assert torch.equal(live[0], s[0])
    with pytest.raises(ValueError):
        ema_update_(t, s, 1.5)


def test_ema_groups_mixed_dtypes_and_matches_per_tensor_lerp():
    """Teacher tensors of several dtypes (an fp32 EMA beside bf16 ones) and a student of another dtype:
    each teacher gets decay * teacher + (1 - decay) * student in its own dtype, as a per-tensor lerp does,
    and nothing of a shape mismatch is written before the refusal."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2), (7, 1)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64]
    teach = [torch.randn(sh, generator=g).to(dt) for sh, dt in zip(shapes, dtypes)]
    stud = [torch.randn(sh, generator=g, dtype=torch.float64).to(torch.bfloat16) for sh in shapes]
    want = [t.clone().lerp_(s.to(t.dtype), 1.0 - 0.75) for t, s in zip(teach, stud)]
    ema_update_(teach, stud, 0.75)
    for t, w, dt in zip(teach, want, dtypes):
        assert t.dtype == dt
        assert torch.equal(t, w)
    before = [t.clone() for t in teach]
    with pytest.raises(ValueError, match="shape mismatch"):
        ema_update_(teach, stud[:3] + [torch.zeros(7)], 0.5)
    assert all(torch.equal(a, b) for a, b in zip(teach, before))


def test_named_errors_for_what_a_caller_hands_over():
    """NaN noise, a model function returning a tuple or None, and a student without autograd history
    end in a named error, not a NaN loss, an AttributeError or autograd's raw message."""
    noise = torch.randn(2, 6)
    bad = noise.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="noise holds 1 non-finite"):
        rollout_loss(_Lin(0), _Lin(1), bad, "zimage-k4")
    lin = _Lin(0)
    with pytest.raises(TypeError, match="student's model function returned tuple.*`.sample`"):
        rollout_loss(lambda x, s: (lin(x, s),), _Lin(1), noise, "zimage-k4")
    with pytest.raises(TypeError, match="teacher's model function returned None"):
        rollout_loss(lin, lambda x, s: None, noise, "zimage-k4")
    frozen = _Lin(0).requires_grad_(False)
    for backward in ("once", "stepwise"):
        with pytest.raises(ValueError, match="student's velocity carries no autograd history"):
            rollout_loss(frozen, _Lin(1), noise, "zimage-k4", backward=backward)
    with torch.no_grad():  # evaluating without gradients is allowed
        assert torch.isfinite(rollout_loss(frozen, _Lin(1), noise, "zimage-k4").loss)


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss"):
        rollout_loss(_Lin(0), _Lin(1), torch.randn(1, 6), "zimage-k4", loss="l1")
    with pytest.raises(ValueError, match="backward"):
        rollout_loss(_Lin(0), _Lin(1), torch.randn(1, 6), "zimage-k4", backward="later")
