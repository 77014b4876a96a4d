"""The drop-in backend inside other trainers' real loops (accelerate / DeepSpeed, peft adapter
switching, packed latents, conventions):

* ``examples/authors_loop.py`` (the authors' loop structure: accelerate, two peft adapters, EMA,
  periodic ``set_adapter("teacher")`` sampling) with the backend swapped in matches the same loop's
  eager step: losses per micro-step, gradients at each optimizer step, final adapters; in one process
  (gradient accumulation, both backward schedules, bf16 autocast) and in two on gloo (DDP through
  accelerate: one gradient all-reduce per optimizer step, ranks equal);
* what loops hand over: wrapped models, the adapter state ``set_adapter`` left, both latent layouts
  (klein packed / unpacked, Z-Image's list), an EMA dict whose entries are rebound;
* conventions checked: a flipped velocity sign and a loss weighted by (1 - sigma) are refused with a
  named error; random tiny models never trip the sign check."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close, compare_grads
from tests.test_backend import TIMESTEPS, _grads, _inputs, _klein_two_adapters, _perturb, _zimage

ROOT = Path(__file__).resolve().parents[1]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _train(**kw):
    from accelerate.state import AcceleratorState

    from examples.authors_loop import train

    AcceleratorState._reset_state(True)  # a fresh Accelerator per run in this process
    try:
        return train(**kw)
    finally:
        AcceleratorState._reset_state(True)


def _same_run(a, b, tol):
    assert len(a["losses"]) == len(b["losses"]) and len(a["grads"]) == len(b["grads"])
    for i, (x, y) in enumerate(zip(a["losses"], b["losses"])):
        assert abs(x - y) <= tol * abs(y), f"loss {i}: {x} vs {y}"
    for i, (x, y) in enumerate(zip(a["grads"], b["grads"])):
        assert float(y.norm()) > 0 and _rel(x, y) <= 10 * tol, f"gradient {i}: rel {_rel(x, y):.2e}"
    assert _rel(a["student"], b["student"]) <= tol and _rel(a["teacher"], b["teacher"]) <= tol


# ---- the authors' loop, one process ------------------------------------------------------------------
@pytest.mark.parametrize("backward,grad_accum", [("once", 1), ("stepwise", 2)])
def test_authors_loop_one_process(backward, grad_accum):
    eager = _train(mode="eager", steps=3, grad_accum=grad_accum)
    fast = _train(mode="backend", steps=3, grad_accum=grad_accum, backward=backward)
    _same_run(fast, eager, 2e-5)
    assert fast["syncs"] == 0  # one process: nothing to average


@pytest.mark.parametrize("backward,kernels", [("once", "auto"), ("stepwise", "auto"), ("once", "on")])
def test_authors_loop_bf16_autocast(backward, kernels, monkeypatch):
    """accelerate's bf16 autocast reaches the backend's forwards as it reaches the eager ones: the
    backend's bf16 run is as close to the eager bf16 run as bf16 itself is to fp32 (2x + atol). With
    the fused kernels (what ``auto`` takes on a GPU; interpreted here) the fp32 model's frozen base weight
    reached the paired linear beside bf16 activations and the step raised."""
    from dopsd_fast import backend

    wrap = backend.wrap
    monkeypatch.setattr(backend, "wrap", lambda *a, **k: wrap(*a, **{**k, "kernels": kernels}))
    ref32 = _train(mode="eager", steps=2, sample_every=0)
    eager = _train(mode="eager", steps=2, sample_every=0, mixed_precision="bf16")
    fast = _train(mode="backend", steps=2, sample_every=0, mixed_precision="bf16", backward=backward)
    bf16_err = _rel(eager["grads"][0], ref32["grads"][0])
    assert bf16_err > 1e-4  # autocast really ran in bf16 (else this test checks nothing)
    assert _rel(fast["grads"][0], eager["grads"][0]) <= 2 * bf16_err + 1e-3
    assert abs(fast["losses"][0] - eager["losses"][0]) <= 2 * abs(eager["losses"][0] - ref32["losses"][0]) + 1e-6


# ---- the authors' loop, two processes on gloo -------------------------------------------------------------
def _launch(out, *args, timeout=240, module="examples.authors_loop"):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("TRITON_INTERPRET", None)
    # as a module (cwd = the root on sys.path), never as a script (see tests/test_distributed.py)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", module, *(["--out", str(out)] if module == "examples.authors_loop" else [str(out)]), *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{err[-3000:]}") from None
    assert p.returncode == 0, err[-4000:]
    return [torch.load(Path(out) / f"rank{r}.pt") for r in (0, 1)]


def test_authors_loop_two_processes_gloo(tmp_path):
    """DDP through accelerate, 2 ranks, gradient accumulation 2, sampling with set_adapter between steps:
    the backend (both schedules) equals the eager loop on every rank; its gradients are averaged once
    per optimizer step (3 all-reduces for 3 steps, also with K = 4 backwards per micro-step)."""
    common = ["--steps", "3", "--grad-accum", "2"]
    eager = _launch(tmp_path / "eager", "--mode", "eager", *common)
    for backward in ("once", "stepwise"):
        fast = _launch(tmp_path / backward, "--mode", "backend", "--backward", backward, *common)
        for r in (0, 1):
            assert fast[r]["world"] == 2
            _same_run(fast[r], eager[r], 2e-5)
            assert fast[r]["syncs"] == 3
        assert eager[0]["losses"] != eager[1]["losses"]  # the ranks saw different data ...
        for g0, g1 in zip(fast[0]["grads"], fast[1]["grads"]):
            assert torch.equal(g0, g1)  # ... and hold the same averaged gradient


def test_ddp_reducer_silent_one_average_per_step(tmp_path):
    """A plain torch DDP wrapper: its reducer runs no all-reduce during the backend's K stepwise
    backwards (a counting communication hook); under no_sync() the backend averages nothing, at the
    next step once, and the result is the mean over ranks of the two micro-steps' local sums; a module the
    caller trains beside the LoRA is averaged as DDP would."""
    for r in _launch(tmp_path, module="tests.backend_ddp_worker"):
        assert r["ddp_hook_calls"] == 0 and r["syncs_in_no_sync"] == 0 and r["syncs"] == 1
        assert r["rel_err"] < 1e-6 and r["local_vs_mean"] > 1e-3  # averaged, not the rank's own sum
        # the bare model on 2 ranks: said at wrap() and again at its first step (the DDP-wrapped one: not)
        assert len(r["warned"]) == 2 and r["warned"][1].startswith("backend: at the first step"), r["warned"]
        # a module the caller trains beside the LoRA is averaged too (it got each rank's own gradient)
        assert r["beside_rel_err"] < 1e-6 and r["beside_local_vs_mean"] > 1e-3
        assert r["disagree_same"] is True  # ranks that disagree on it: no mismatched collective, one average


# ---- what loops hand over ----------------------------------------------------------------------------
def _ref_two_adapters():
    model, _, train = _zimage("two-adapters")
    noise, ps, pt = _inputs()
    from dopsd_fast import backend

    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    res = fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    return model, train, res.loss, _grads(train)


def test_wrapped_models_are_unwrapped_or_named():
    from dopsd_fast import backend
    from dopsd_fast.errors import BackendError

    model, train, loss_ref, g_ref = _ref_two_adapters()
    noise, ps, pt = _inputs()

    class Engine(torch.nn.Module):  # what DeepSpeed's engine and similar wrappers look like: .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = [torch.nn.DataParallel(model), Engine(model), torch.compile(model), Engine(torch.compile(model))]
    for w in wrapped:
        fast = backend.wrap(w, student_adapter="student", teacher_adapter="teacher")
        assert fast.model.ms is model and fast.ddp is None
        res = fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
        assert_close(res.loss, loss_ref, 0, 1e-6, "loss")
        compare_grads(_grads(train), g_ref, 1e-6, 1e-5)

    class DeepSpeedEngine(Engine):  # by its class name, as the backend recognises it (DeepSpeed is not installed)
        pass

    fast = backend.wrap(DeepSpeedEngine(model), student_adapter="student", teacher_adapter="teacher")
    assert fast.engine and fast.ddp is None
    with pytest.raises(BackendError, match="DeepSpeed engine: pass backward_fn=accelerator.backward"):
        fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    with pytest.raises(BackendError, match="under DeepSpeed use backward='once'"):
        fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS, backward="stepwise", backward_fn=torch.autograd.backward)
    with pytest.raises(BackendError, match="under DeepSpeed use backward='once'"):
        for st in fast.rollout(noise, ps, pt, timesteps=TIMESTEPS, backward_fn=torch.autograd.backward):
            st.backward(F.mse_loss(*st.predict()))
    assert all(p.grad is None for p in train.values())
    res = fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS, backward_fn=torch.autograd.backward)
    assert_close(res.loss, loss_ref, 0, 1e-6, "loss")
    compare_grads(_grads(train), g_ref, 1e-6, 1e-5)

    class FullyShardedDataParallel(Engine):
        pass

    with pytest.raises(BackendError, match="FSDP-wrapped .* wrap it with DDP or DeepSpeed ZeRO-1/2"):
        backend.wrap(FullyShardedDataParallel(model), student_adapter="student", teacher_adapter="teacher")
    with pytest.raises(TypeError, match="not a transformer of a known family"):
        backend.wrap(Engine(torch.nn.Linear(2, 2)), teacher=torch.nn.Linear(2, 2))


@pytest.mark.parametrize("what", ["root", "blocks"])
def test_a_model_sharded_by_fsdp2_is_refused(tmp_path, what):
    """FSDP2's fully_shard keeps the model's class (a subclass of it): wrap took the sharded model as a
    plain transformer, and the first step died in torch ("mixed torch.Tensor and DTensor"). Sharded at
    its root or only in its blocks, it is refused at wrap, as FSDP1's wrapper is, for the student and
    the teacher."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dopsd_fast import backend
    from dopsd_fast.backend import BackendError
    from dopsd_fast.families import ZIMAGE

    m = ZIMAGE.diffusers_class()(**ZIMAGE.tiny_config()).float()
    ZIMAGE.init_random(m)
    plain = copy.deepcopy(m)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for layer in m.layers:
            fully_shard(layer)
        if what == "root":
            fully_shard(m)
        with pytest.raises(BackendError, match="the student is FSDP-wrapped"):
            backend.wrap(m, teacher=plain)
        with pytest.raises(BackendError, match="the teacher is FSDP-wrapped"):
            backend.wrap(plain, teacher=m)
    finally:
        dist.destroy_process_group()


def test_adapter_state_left_by_set_adapter():
    """peft's set_adapter("teacher") (a sampling pass) turns the student's requires_grad off: the step
    trains the student anyway (its contract, read at wrap) and leaves the caller's flags as they were;
    the callback form too, also when its loop is left early."""
    from dopsd_fast import backend

    model, train, loss_ref, g_ref = _ref_two_adapters()
    noise, ps, pt = _inputs()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    model.set_adapter("teacher")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(p.requires_grad for p in train.values())
    res = fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS, backward="stepwise")
    assert_close(res.loss, loss_ref, 0, 1e-6, "loss")
    compare_grads(_grads(train), g_ref, 1e-6, 1e-5)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for st in fast.rollout(noise, ps, pt, timesteps=TIMESTEPS):
        v_s, v_t = st.predict()
        st.backward(F.mse_loss(st.x0(v_s), st.x0(v_t)) / st.states)
    compare_grads(_grads(train), g_ref, 1e-6, 1e-5)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    it = fast.rollout(noise, ps, pt, timesteps=TIMESTEPS)
    next(it).predict()
    it.close()
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # wrapped while the teacher was active: the whole student adapter is the contract
    late = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    assert {id(p) for p in late.trainable} == {id(p) for p in train.values()}


def test_zimage_latents_in_the_models_list_layout():
    from dopsd_fast import backend
    from dopsd_fast.errors import BackendError, ConventionError

    model, train, loss_ref, g_ref = _ref_two_adapters()
    noise, ps, pt = _inputs()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    res = fast.dopsd_step(list(noise.unsqueeze(2).unbind(0)), ps, pt, timesteps=TIMESTEPS)
    assert_close(res.loss, loss_ref, 0, 1e-6, "loss")
    compare_grads(_grads(train), g_ref, 1e-6, 1e-5)
    assert isinstance(res.states[-1], list) and res.states[-1][0].shape == (16, 1, 8, 8)
    # the callback form in that layout: state.x, v and state.x0(v) are lists of the samples (the weighting
    # check and x0 read tensors: an AttributeError on 'list'); the per-sample MSE, averaged, is the step's
    for st in fast.rollout(list(noise.unsqueeze(2).unbind(0)), ps, pt, timesteps=TIMESTEPS):
        v_s, v_t = st.predict()
        x0_s, x0_t = st.x0(v_s), st.x0(v_t)
        assert isinstance(st.x, list) and isinstance(x0_s, list) and x0_s[0].shape == (16, 1, 8, 8)
        st.backward(sum(F.mse_loss(a, b) for a, b in zip(x0_s, x0_t)) / len(x0_s) / st.states)
    compare_grads(_grads(train), g_ref, 1e-6, 1e-5)
    fresh = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")  # checks a first roll-out
    with pytest.raises(ConventionError, match="weighted by \\(1 - sigma\\)"):  # the check reads the lists too
        for st in fresh.rollout(list(noise.unsqueeze(2).unbind(0)), ps, pt, timesteps=TIMESTEPS):
            v_s, v_t = st.predict()
            st.backward(sum(F.mse_loss(a, b) for a, b in zip(v_s, v_t)) * (1 - st.sigma[0]) ** 2)
    with pytest.raises(BackendError, match=r"Z-Image latents must be \(B, C, h, w\), \(B, C, 1, h, w\)"):
        fast.dopsd_step(noise.flatten(2), ps, pt, timesteps=TIMESTEPS)
    mixed = [noise[0].unsqueeze(1), torch.randn(16, 1, 4, 12)]  # diffusers' list takes sizes a step cannot
    with pytest.raises(BackendError, match=r"the list's latents differ in size \(\(16, 1, 4, 12\), \(16, 1, 8, 8\)\)"):
        fast.dopsd_step(mixed, ps, pt, timesteps=TIMESTEPS)


def _klein():
    tr = _klein_two_adapters()
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(2, 16, 4, 6, generator=g)  # h != w: a layout mix-up cannot pass unseen
    txt_s, txt_t = torch.randn(2, 8, 96, generator=g), torch.randn(2, 8, 96, generator=g)
    return tr, {n: p for n, p in tr.named_parameters() if ".student." in n}, noise, txt_s, txt_t


def test_klein_packed_latents():
    """klein's pipeline layout (B, h*w, C) with latent_hw gives the unpacked step's loss and gradients,
    and its states / velocities back packed; without latent_hw one error says what to pass."""
    from dopsd_fast import backend
    from dopsd_fast.errors import BackendError

    tr, train, noise, txt_s, txt_t = _klein()
    fast = backend.wrap(tr, student_adapter="student", teacher_adapter="teacher")
    ts = [1000, 750, 500, 250]
    ref = fast.dopsd_step(noise, txt_s, txt_t, timesteps=ts)
    g_ref = _grads(train)
    packed = noise.reshape(2, 16, 24).permute(0, 2, 1)  # the pipeline's _pack_latents
    res = fast.dopsd_step(packed, txt_s, txt_t, timesteps=ts, latent_hw=(4, 6))
    assert_close(res.loss, ref.loss, 0, 1e-6, "loss")
    compare_grads(_grads(train), g_ref, 1e-5, 1e-4)
    assert res.states[-1].shape == (2, 24, 16)
    assert_close(res.states[-1], ref.states[-1].reshape(2, 16, 24).permute(0, 2, 1), 1e-6, 1e-5, "state")
    from dopsd_fast.families.klein.adapter import image_ids

    ids = image_ids(4, 6).unsqueeze(0).expand(2, -1, -1)  # the pipeline's latent ids (t, h, w, l)
    by_ids = fast.dopsd_step(packed, txt_s, txt_t, timesteps=ts, latent_hw=ids)
    assert_close(by_ids.loss, ref.loss, 0, 1e-6, "loss (latent ids)")
    _grads(train)
    v = fast.velocity("teacher", packed, torch.full((2,), 0.5), txt_t, latent_hw=(4, 6))
    v_ref = fast.velocity("teacher", noise, torch.full((2,), 0.5), txt_t)
    assert_close(v, v_ref.reshape(2, 16, 24).permute(0, 2, 1), 1e-6, 1e-5, "velocity")
    for st in fast.rollout(packed, txt_s, txt_t, timesteps=ts, latent_hw=(4, 6)):
        v_s, v_t = st.predict()
        assert v_s.shape == (2, 24, 16)
        st.backward(F.mse_loss(st.x0(v_s), st.x0(v_t)) / st.states)
    compare_grads(_grads(train), g_ref, 1e-5, 1e-4)
    with pytest.raises(BackendError, match=r"packed latents \(2, 24, 16\) need latent_hw=\(h, w\)"):
        fast.dopsd_step(packed, txt_s, txt_t, timesteps=ts)
    with pytest.raises(BackendError, match="24 tokens, latent_hw=.* gives 25"):
        fast.dopsd_step(packed, txt_s, txt_t, timesteps=ts, latent_hw=(5, 5))
    with pytest.raises(BackendError, match=r"references\[0\] must be .* r.permute\(0, 2, 1\)"):
        backend.contexts(txt_t, references=[packed])
    with pytest.raises(BackendError, match=r"share the text length .* got text lengths \[5, 8\]"):
        fast.dopsd_step(noise, [txt_s[0], txt_s[1, :5]], txt_t, timesteps=ts)


def test_ema_dict_rebound_entries_are_followed():
    """An EMA kept as a dict of tensors and updated by rebinding (ema[k] = new): the backend reads the
    new tensors (the same step as a backend wrapped on the new dict); a deleted entry is named."""
    from dopsd_fast import backend
    from dopsd_fast.errors import BackendError

    model, ema, train = _zimage("shadow")
    noise, ps, pt = _inputs()
    fast = backend.wrap(model, student_adapter="default", teacher_shadow=ema)
    fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    _grads(train)
    for k in list(ema):  # rebinding, not in place
        ema[k] = 0.5 * ema[k] + 0.5 * train[k].detach()
    res = fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    g = _grads(train)
    fresh = backend.wrap(model, student_adapter="default", teacher_shadow=dict(ema))
    ref = fresh.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    assert_close(res.loss, ref.loss, 0, 1e-7, "loss")
    compare_grads(g, _grads(train), 1e-7, 1e-6)
    k = next(iter(ema))
    ema[k] = ema[k][:1]
    with pytest.raises(BackendError, match="has shape"):
        fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    del ema[k]
    with pytest.raises(BackendError, match="is gone from the EMA dict"):
        fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)


# ---- conventions -------------------------------------------------------------------------------------
def _gaussian_flow(sign=1.0, mu=0.3, s=0.8):
    """The exact flow-matching velocity of data x0 ~ N(mu, s^2 I) (a perfectly trained model):
    E[x0 | x] at noise level sigma, v = (x - E[x0 | x]) / sigma; ``sign=-1``: the other convention."""
    def v(x, sigma):
        sg = sigma.view(-1, *([1] * (x.dim() - 1)))
        a, var = 1 - sg, (1 - sg) ** 2 * s * s + sg * sg
        x0 = mu + a * s * s / var * (x - a * mu)
        return sign * (x - x0) / sg
    return v


def test_velocity_sign_check():
    """A trained model's velocity at sigma = 1 points along the noise; read with the other sign it is
    refused. The tiny random models of both families stay far inside the limit (|cos| < 0.1), so the
    check cannot fire on them."""
    from dopsd_fast.algorithm import SIGN_COS_LIMIT, check_velocity_sign, rollout_loss, velocity_sign_cos
    from dopsd_fast.errors import ConventionError

    x = torch.randn(2, 16, 8, 8)
    one = torch.ones(2)
    assert velocity_sign_cos(x, _gaussian_flow()(x, one)) > 0.7
    check_velocity_sign(x, _gaussian_flow()(x, one), one)
    with pytest.raises(ConventionError, match="looks like x0 - eps; return v = eps - x0"):
        check_velocity_sign(x, _gaussian_flow(-1.0)(x, one), one)
    check_velocity_sign(x, _gaussian_flow(-1.0)(x, one), torch.full((2,), 0.5))  # not a noise state: no claim
    with torch.no_grad():  # students with no parameters: the values only
        with pytest.raises(ConventionError, match="teacher_fn's velocity"):
            rollout_loss(_gaussian_flow(), _gaussian_flow(-1.0), x, [1.0, 0.5, 0.0], check_sign=True)
        rollout_loss(_gaussian_flow(), _gaussian_flow(), x, [1.0, 0.5, 0.0], check_sign=True)

    from dopsd_fast import backend

    model, train, _, _ = _ref_two_adapters()
    noise, ps, pt = _inputs()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    cos = [velocity_sign_cos(noise, fast.velocity(b, noise, one, c)) for b, c in (("s", ps), ("t", pt))]
    tr, _, kn, txt_s, txt_t = _klein()
    kfast = backend.wrap(tr, student_adapter="student", teacher_adapter="teacher")
    cos += [velocity_sign_cos(kn, kfast.velocity(b, kn, one, c)) for b, c in (("s", txt_s), ("t", txt_t))]
    assert all(abs(c) < 0.1 for c in cos), cos
    assert SIGN_COS_LIMIT <= -0.3


def test_backend_refuses_a_flipped_velocity_before_any_backward():
    """A model whose output the family's convention reads with the wrong sign (simulated: the fast
    model's velocities made to point against the noise) is refused at the first state, before any
    gradient lands; once the first step passed, the check is not run again."""
    from dopsd_fast import backend
    from dopsd_fast.errors import ConventionError

    model, train, _, _ = _ref_two_adapters()
    noise, ps, pt = _inputs()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    orig = fast.model.velocity_pair

    def flipped(x, sigma, cs, ct, share=None):
        v_s, v_t = orig(x, sigma, cs, ct, share=share)
        return v_s - 3 * x, (v_t - 3 * x if v_t is not None else None)

    fast.model.velocity_pair = flipped
    with pytest.raises(ConventionError, match="the teacher's velocity at sigma = 1 points away from the noise"):
        fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS, backward="stepwise")
    assert all(p.grad is None for p in train.values())
    fast.model.velocity_pair = orig
    fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    fast.model.velocity_pair = flipped
    fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)  # checked at the first step only
    _grads(train)
    fresh = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")  # a new backend checks again
    fresh.model.velocity_pair = flipped
    with pytest.raises(ConventionError):
        fresh.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    off = backend.wrap(model, student_adapter="student", teacher_adapter="teacher", check_conventions=False)
    off.model.velocity_pair = flipped
    off.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)


@pytest.mark.parametrize("sigmas", [[1.0, 0.9, 0.75, 0.5, 0.0], [0.8, 0.6, 0.3, 0.0]])
def test_callback_form_refuses_sigma_used_as_t(sigmas):
    """The callback form's loss weighted by (1 - sigma) (sigma taken for the model's time t, the
    authors' x0 = x + (1 - t) * out with t = state.sigma) is refused with a named error: at state 0
    when sigma_0 = 1 (before its backward), else at state 1 by the ratio of the two states' weights;
    the x0 loss, the v loss and a scaled one pass."""
    from dopsd_fast import backend
    from dopsd_fast.errors import ConventionError

    model, train, _, _ = _ref_two_adapters()
    noise, ps, pt = _inputs()

    def run(loss_fn, **kw):
        fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
        for st in fast.rollout(noise, ps, pt, sigmas=sigmas, **kw):
            v_s, v_t = st.predict()
            st.backward(loss_fn(st, v_s, v_t))
        _grads(train)

    def bc(st):
        return st.sigma.view(-1, 1, 1, 1)

    def authors(st, v_s, v_t):  # their x0 = x + (1 - t) * out, out = -v, with the model's own t
        assert torch.allclose(st.t, 1 - st.sigma)  # Z-Image: t = 1 - sigma
        t = st.t.view(-1, 1, 1, 1)
        return F.mse_loss(st.x + (1 - t) * -v_s, st.x + (1 - t) * -v_t)

    run(lambda st, v_s, v_t: F.mse_loss(st.x0(v_s), st.x0(v_t)))  # x0 loss
    run(lambda st, v_s, v_t: 0.25 * F.mse_loss(v_s, v_t))  # v loss, scaled
    run(authors)
    flipped = lambda st, v_s, v_t: F.mse_loss(st.x + (1 - bc(st)) * v_s, st.x + (1 - bc(st)) * v_t)  # noqa: E731
    with pytest.raises(ConventionError, match="(sigma used as|sigma is used as) the model's time t.*an MSE of "
                                              r"predicted noises.* check_weighting=False\)$"):
        run(flipped)
    if sigmas[0] == 1.0:  # refused before state 0's backward
        assert all(p.grad is None for p in train.values())
    run(flipped, check_weighting=False)  # the same weighting on purpose (a noise-space MSE): the caller says so


def test_import_of_the_backend_is_lean():
    code = ("import sys, dopsd_fast.backend; print([m for m in ('accelerate', 'peft', 'deepspeed', 'diffusers') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("backward", ["once", "stepwise"])
def test_caller_owned_backward_sees_every_gradient(backward, monkeypatch):
    """With a backward_fn, every backward of the step is the caller's: once per roll-out (once) or once
    per state (stepwise), none outside it (no separate backward of shared work an engine would miss),
    and the gradients equal the default step's."""
    from dopsd_fast import backend

    model, train, loss_ref, g_ref = _ref_two_adapters()
    noise, ps, pt = _inputs()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    outside, calls = [], []
    real = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (outside.append(1), real(self, *a, **k)))

    def mine(loss):
        calls.append(float(loss))
        torch.autograd.backward(loss * 0.5)  # e.g. a loss scaler's factor

    res = fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS, backward=backward, backward_fn=mine)
    assert len(calls) == (1 if backward == "once" else len(TIMESTEPS)) and not outside
    assert_close(res.loss, loss_ref, 0, 1e-6, "loss")
    compare_grads({n: 2 * g for n, g in _grads(train).items()}, g_ref, 1e-6, 1e-5)
    assert any("context_refiner" in n and g.abs().sum() > 0 for n, g in g_ref.items())  # the shared work's too


def test_timesteps_in_the_other_familys_convention_are_named():
    from dopsd_fast import backend
    from dopsd_fast.errors import ConventionError

    model, _, _, _ = _ref_two_adapters()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    with pytest.raises(ConventionError, match=r"Z-Image's convention \(t / 1000 is 1 - sigma\)"):
        fast.sigmas_from_timesteps([1000, 750, 500, 250])  # klein's (t = sigma) given to Z-Image


def test_grad_scaler_as_the_callers_backward():
    """A GradScaler's scaled backward as backward_fn (stepwise: K scaled backwards): unscaled by the
    scaler before the optimizer step, the gradients are the default step's."""
    from dopsd_fast import backend

    model, train, loss_ref, g_ref = _ref_two_adapters()
    noise, ps, pt = _inputs()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    opt = torch.optim.SGD(list(train.values()), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS, backward="stepwise",
                    backward_fn=lambda l: scaler.scale(l).backward())
    assert float(next(iter(train.values())).grad.abs().max()) > 100 * float(next(iter(g_ref.values())).abs().max())
    scaler.unscale_(opt)
    compare_grads(_grads(train), g_ref, 1e-6, 1e-5)
