"""The drop-in backend: a small D-OPSD loop written the way other trainers write theirs (the authors'
Z-Image / klein scripts: their own model, adapters, contexts, timesteps t / 1000) switched to
``dopsd_fast.backend`` by one call gives the same loss and gradients (fp32, tiny models)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close, compare_grads

TIMESTEPS = [0, 100, 250, 500]  # the authors' Z-Image roll-out (t / 1000 = 1 - sigma)


def _lora(r=4):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights="gaussian",
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"])


def _perturb(params, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-2))


def _zimage(mode):
    """A tiny Z-Image as a trainer of ``mode`` holds it: (model, teacher module or shadow, trainable dict)."""
    from dopsd_fast.families import ZIMAGE

    torch.manual_seed(0)
    tr = ZIMAGE.diffusers_class()(**ZIMAGE.tiny_config()).float()
    ZIMAGE.init_random(tr)
    tr.requires_grad_(False)
    if mode == "two-adapters":
        tr.add_adapter(_lora(), adapter_name="student")
        tr.add_adapter(_lora(), adapter_name="teacher")
        _perturb([p for n, p in tr.named_parameters() if "lora_" in n], 1)
        tr.set_adapter("student")
        train = {n: p for n, p in tr.named_parameters() if ".student." in n}
        other = None
    elif mode == "shadow":
        tr.add_adapter(_lora(), adapter_name="default")
        train = {n: p for n, p in tr.named_parameters() if "lora_" in n}
        _perturb(train.values(), 1)
        other = {n: p.detach().clone() for n, p in train.items()}  # the EMA shadow, a step behind
        _perturb(other.values(), 2)
    else:  # two modules, full fine-tuning
        train = dict(tr.named_parameters())
        other = copy.deepcopy(tr)
        _perturb(other.parameters(), 2, 0.02)
    for p in train.values():
        p.requires_grad_(True)
    return tr, other, train


def _their_zimage_step(model, noise, prompt_s, prompt_t, teacher_call):
    """The authors' train_dopsd.py loop, abridged: Z-Image time t = timestep / 1000, the model output used
    as is (it is -v), x0 = x + (1 - t) * out, Euler in t, mean of the per-state x0 MSE, one backward."""
    bsz = noise.shape[0]
    latents = noise.clone()
    total, n = 0.0, 0
    for i in range(len(TIMESTEPS)):
        t = torch.tensor(float(TIMESTEPS[i])).expand(bsz) / 1000
        next_t = torch.tensor(float(TIMESTEPS[i + 1])).expand(bsz) / 1000 if i < len(TIMESTEPS) - 1 else torch.ones_like(t)
        dt = (next_t - t).reshape(bsz, 1, 1, 1)
        latents = latents.detach()
        lat_list = list(latents.unsqueeze(2).unbind(0))
        with torch.no_grad():
            v_t = torch.stack(teacher_call(lat_list, t, prompt_t), 0).squeeze(2)
            x0_t = latents + (1 - t.reshape(bsz, 1, 1, 1)) * v_t
        v_s = torch.stack(model(lat_list, t, prompt_s, return_dict=False)[0], 0).squeeze(2)
        x0_s = latents + (1 - t.reshape(bsz, 1, 1, 1)) * v_s
        latents = latents + v_s * dt
        total = total + F.mse_loss(x0_s, x0_t.detach())
        n += 1
    total = total / n
    total.backward()
    return total.detach()


def _inputs():
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    prompt_s = [torch.randn(7, 32, generator=g), torch.randn(12, 32, generator=g)]  # per-sample lengths
    prompt_t = [torch.randn(20, 32, generator=g), torch.randn(15, 32, generator=g)]
    return noise, prompt_s, prompt_t


def _grads(params):
    out = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return out


@pytest.mark.parametrize("mode", ["two-adapters", "shadow", "two-modules"])
def test_their_loop_switched_to_the_backend_same_loss_and_gradients(mode):
    from dopsd_fast import backend

    model, other, train = _zimage(mode)
    noise, prompt_s, prompt_t = _inputs()

    if mode == "two-adapters":
        def teacher_call(lat, t, p):
            model.set_adapter("teacher")
            out = model(lat, t, p, return_dict=False)[0]
            model.set_adapter("student")
            return out
    elif mode == "shadow":  # swap the EMA shadow into the adapter for the teacher pass, then back
        def teacher_call(lat, t, p):
            live = {n: q.detach().clone() for n, q in train.items()}
            for n, q in train.items():
                q.data.copy_(other[n])
            out = model(lat, t, p, return_dict=False)[0]
            for n, q in train.items():
                q.data.copy_(live[n])
            return out
    else:
        def teacher_call(lat, t, p):
            return other(lat, t, p, return_dict=False)[0]

    loss_ref = _their_zimage_step(model, noise, prompt_s, prompt_t, teacher_call)
    g_ref = _grads(train)

    # the switch: one call, the trainer's own model, adapters / shadow / modules and contexts
    if mode == "two-adapters":
        fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    elif mode == "shadow":
        fast = backend.wrap(model, student_adapter="default", teacher_shadow=other)
    else:
        fast = backend.wrap(model, teacher=other)
    res = fast.dopsd_step(noise, prompt_s, prompt_t, timesteps=TIMESTEPS, loss="x0", backward="once")
    g_fast = _grads(train)
    assert_close(res.loss, loss_ref, 1e-6, 1e-5, "loss")
    assert float(loss_ref) > 0 and any(g.abs().sum() > 0 for g in g_ref.values())
    compare_grads(g_fast, g_ref, 1e-5, 1e-4)
    if mode == "shadow":  # nothing was swapped: the live adapter is untouched, the shadow too
        assert all(not torch.equal(train[n], other[n]) for n in list(train)[:3])

    # the callback form with a stepwise backward: the same gradients
    for st in fast.rollout(noise, prompt_s, prompt_t, timesteps=TIMESTEPS):
        v_s, v_t = st.predict()
        x0_s, x0_t = st.x - st.sigma.view(-1, 1, 1, 1) * v_s, st.x - st.sigma.view(-1, 1, 1, 1) * v_t
        (F.mse_loss(x0_s, x0_t) / st.states).backward()
    compare_grads(_grads(train), g_ref, 1e-5, 1e-4)


def test_wrap_refuses_what_cannot_work():
    from dopsd_fast import backend

    model, other, train = _zimage("shadow")
    with pytest.raises(ValueError, match="teacher_adapter= or teacher_shadow="):
        backend.wrap(model, student_adapter="default")
    with pytest.raises(ValueError, match="adapter 'nope' is on no module"):
        backend.wrap(model, student_adapter="nope", teacher_adapter="default")
    bad = dict(list(other.items())[1:])
    with pytest.raises(ValueError, match="teacher_shadow lacks 1 of"):
        backend.wrap(model, student_adapter="default", teacher_shadow=bad)
    with pytest.raises(TypeError, match="not a transformer of a known family"):
        backend.wrap(torch.nn.Linear(2, 2), teacher=torch.nn.Linear(2, 2))
    fast = backend.wrap(model, student_adapter="default", teacher_shadow=other)
    with pytest.raises(ValueError, match="exactly one of sigmas"):
        fast.dopsd_step(*_inputs())
    assert fast.sigmas_from_timesteps(TIMESTEPS) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def _klein_two_adapters():
    """A tiny FLUX.2-klein with "student" and "teacher" peft adapters (perturbed: not the identity),
    the student selected, as the authors' klein scripts hold it."""
    from peft import LoraConfig

    from dopsd_fast.families import KLEIN

    torch.manual_seed(0)
    tr = KLEIN.diffusers_class()(**KLEIN.tiny_config()).float().requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                     target_modules=list(KLEIN.default_lora_targets(tr.config)))
    tr.add_adapter(cfg, adapter_name="student")
    tr.add_adapter(copy.deepcopy(cfg), adapter_name="teacher")
    _perturb([p for n, p in tr.named_parameters() if "lora_" in n], 3)
    tr.set_adapter("student")
    return tr


def test_klein_two_adapters_and_references():
    """FLUX.2-klein held as the authors' klein scripts hold it (one model, "student" / "teacher" peft
    adapters; the teacher sees the target's latents as a reference image): the backend's step equals
    the eager reference step on the same model (adapters selected per branch)."""
    from dopsd_fast import backend
    from dopsd_fast.algorithm import rollout_loss
    from dopsd_fast.families import KLEIN

    tr = _klein_two_adapters()
    train = {n: p for n, p in tr.named_parameters() if ".student." in n}
    for p in train.values():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(2, 16, 4, 4, generator=g)
    txt_s, txt_t = torch.randn(2, 8, 96, generator=g), torch.randn(2, 8, 96, generator=g)
    target = torch.randn(2, 16, 4, 4, generator=g)
    ctx_s, ctx_t = backend.contexts(txt_s), backend.contexts(txt_t, references=[target])
    timesteps = [1000, 750, 500, 250]  # klein: t / 1000 is sigma

    def vel(adapter, ctx):
        def fn(x, sigma):
            tr.set_adapter(adapter)
            v = KLEIN.eager_velocity(tr, x, sigma, ctx)
            tr.set_adapter("student")
            return v
        return fn

    sig = [1.0, 0.75, 0.5, 0.25, 0.0]
    ref = rollout_loss(vel("student", ctx_s), vel("teacher", ctx_t), noise, sig)
    ref.loss.backward()
    g_ref = _grads(train)
    fast = backend.wrap(tr, student_adapter="student", teacher_adapter="teacher")
    assert fast.sigmas_from_timesteps(timesteps) == pytest.approx(sig)
    res = fast.dopsd_step(noise, txt_s, ctx_t, timesteps=timesteps)
    assert_close(res.loss, ref.loss.detach(), 1e-6, 1e-5, "loss")
    compare_grads(_grads(train), g_ref, 1e-5, 1e-4)
    v = fast.velocity("teacher", noise, torch.full((2,), 0.5), ctx_t)
    assert_close(v, vel("teacher", ctx_t)(noise, torch.full((2,), 0.5)), 1e-5, 1e-4, "teacher velocity", scaled=True)
