"""What the drop-in backend would otherwise get silently wrong, refused in one line (each case gave a
wrong loss or gradient, or lost the gradient, with no error before): peft state the fast model does
not apply as the eager model does, a LoRA'd teacher module given no adapter name, timesteps on the
[0, 1] scale, a backward after the callback loop, EMA dicts keyed by a wrapped model's names."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dopsd_fast.errors import AdapterError, BackendError, ConventionError

TIMESTEPS = [0, 100, 250, 500]
DEFAULT = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


def _model(names=("student", "teacher"), targets=DEFAULT, **lora_kw):
    from peft import LoraConfig

    from dopsd_fast.families import ZIMAGE

    torch.manual_seed(0)
    tr = ZIMAGE.diffusers_class()(**ZIMAGE.tiny_config()).float()
    ZIMAGE.init_random(tr)
    tr.requires_grad_(False)
    kw = dict(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(targets))
    kw.update(lora_kw)
    for n in names:
        tr.add_adapter(LoraConfig(**kw), adapter_name=n)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if names:
        tr.set_adapter(names[0])
    return tr


def _inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 16, 8, 8, generator=g), [torch.randn(7, 32, generator=g), torch.randn(12, 32, generator=g)],
            [torch.randn(20, 32, generator=g), torch.randn(15, 32, generator=g)])


@pytest.mark.parametrize("extra,match", [
    (dict(targets=DEFAULT + ["linear"]), "runs whole"),                 # the final layer's linear
    (dict(targets=DEFAULT + ["t_embedder.mlp.0"]), "runs whole"),       # the timestep MLP
    (dict(lora_dropout=0.5), "lora_dropout=0.5"),
    (dict(lora_bias=True, init_lora_weights=True), "LoRA bias"),
])
def test_peft_state_the_fast_model_would_not_apply_is_refused(extra, match):
    from dopsd_fast import backend

    with pytest.raises(AdapterError, match=match):
        backend.wrap(_model(**extra), student_adapter="student", teacher_adapter="teacher")


def test_an_adapter_activated_after_wrap_is_refused_at_the_step():
    from peft import LoraConfig

    from dopsd_fast import backend

    model = _model()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), adapter_name="style")
    model.set_adapter(["student", "style"])  # a fixed style LoRA stacked with the student
    with pytest.raises(AdapterError, match=r"\['style'\] active"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    model.set_adapter("teacher")  # which of the two is active does not matter
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)


def test_modules_to_save_is_refused():
    from peft import LoraConfig, get_peft_model

    from dopsd_fast import backend

    base = _model(names=())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT,
                                                 modules_to_save=["all_final_layer.2-1"]))
    with pytest.raises(AdapterError, match="modules_to_save"):
        backend.wrap(peft_model, student_adapter="default", teacher_shadow={
            n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n})


def test_a_lora_teacher_module_needs_its_adapter_name():
    from dopsd_fast import backend

    student = _model(names=("default",))
    teacher = copy.deepcopy(student)
    with pytest.raises(AdapterError, match="pass teacher_adapter="):
        backend.wrap(student, teacher=teacher, student_adapter="default")
    with pytest.raises(AdapterError, match="pass student_adapter="):
        backend.wrap(student, teacher=teacher)
    with pytest.raises(BackendError, match="module of the student's class"):
        backend.wrap(student, teacher=torch.nn.Linear(2, 2), student_adapter="default")
    backend.wrap(student, teacher=teacher, student_adapter="default", teacher_adapter="default")


def test_timesteps_on_the_unit_scale_are_refused():
    from dopsd_fast import backend

    fast = backend.wrap(_model(), student_adapter="student", teacher_adapter="teacher")
    with pytest.raises(ConventionError, match="within \\[0, 1\\]"):
        fast.dopsd_step(*_inputs(), timesteps=[0, 0.1, 0.25, 0.5])
    assert fast.sigmas_from_timesteps(TIMESTEPS) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_a_backward_after_the_callback_loop_is_refused_and_one_inside_works():
    from dopsd_fast import backend

    model = _model()
    model.set_adapter("teacher")  # the student's LoRA does not require grad now
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    noise, ps, pt = _inputs()
    total = 0
    with pytest.raises(BackendError, match="no backward reached the student"):
        for st in fast.rollout(noise, ps, pt, timesteps=TIMESTEPS):
            v_s, v_t = st.predict()
            total = total + F.mse_loss(st.x0(v_s), st.x0(v_t)) / st.states
    for st in fast.rollout(noise, ps, pt, timesteps=TIMESTEPS):
        v_s, v_t = st.predict()
        F.mse_loss(st.x0(v_s), st.x0(v_t)).div(st.states).backward()  # the caller's own backward, per state
    grads = [p.grad for p in fast.trainable]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # backwards that leave no .grad behind still count: an optimizer step in a post-accumulate hook that
    # clears each gradient, and a backward_fn collecting them with autograd.grad
    stepped = []
    model.set_adapter("student")  # (a hook needs a tensor that requires grad)
    def step_in_backward(p):  # an optimizer step per parameter inside the backward, its gradient freed
        stepped.append(1)
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(step_in_backward) for p in fast.trainable]
    for p in fast.trainable:
        p.grad = None
    for st in fast.rollout(noise, ps, pt, timesteps=TIMESTEPS):
        v_s, v_t = st.predict()
        st.backward(F.mse_loss(st.x0(v_s), st.x0(v_t)) / st.states)
    assert stepped and all(p.grad is None for p in fast.trainable)
    for h in hooks:
        h.remove()
    got = []
    for st in fast.rollout(noise, ps, pt, timesteps=TIMESTEPS,
                           backward_fn=lambda loss: got.append(torch.autograd.grad(loss, fast.trainable))):
        v_s, v_t = st.predict()
        st.backward(F.mse_loss(st.x0(v_s), st.x0(v_t)) / st.states)
    assert len(got) == len(TIMESTEPS)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_an_ema_dict_keyed_by_a_wrapped_models_names_is_read(prefix):
    from dopsd_fast import backend

    model = _model(names=("default",))
    plain = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    fast = backend.wrap(model, student_adapter="default", teacher_shadow={prefix + n: t for n, t in plain.items()})
    ref = backend.wrap(model, student_adapter="default", teacher_shadow=plain)
    a = fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS).loss
    b = ref.dopsd_step(*_inputs(), timesteps=TIMESTEPS).loss
    assert float(a) == float(b)
    with pytest.raises(BackendError, match="must be a dict of parameter name -> tensor"):
        backend.wrap(model, student_adapter="default", teacher_shadow=list(plain.values()))


def test_inputs_that_do_not_fit_the_transformer_are_named():
    """Each ended in a shape error deep inside the model (or an AttributeError) before."""
    from dopsd_fast import backend

    fast = backend.wrap(_model(), student_adapter="student", teacher_adapter="teacher")
    noise, ps, pt = _inputs()
    cases = [
        (dict(ctx_s=ps + ps[:1]), "ctx_s holds 3 prompt embedding\\(s\\) for a batch of 2"),
        (dict(ctx_t=[t[:, :16] for t in pt]), "ctx_t\\[0\\] has 16 features per token; the transformer takes 32"),
        (dict(noise=torch.randn(2, 8, 8, 8)), "8 channels .* in_channels=16"),
        (dict(noise=torch.randn(2, 16, 7, 7)), "7 x 7, not a multiple of the transformer's patch size 2"),
    ]
    for change, match in cases:
        args = dict(noise=noise, ctx_s=ps, ctx_t=pt)
        args.update(change)
        with pytest.raises(BackendError, match=match):
            fast.dopsd_step(args["noise"], args["ctx_s"], args["ctx_t"], timesteps=TIMESTEPS)
    with torch.no_grad(), pytest.raises(BackendError, match="needs autograd"):
        fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS)
    # one noise level as a float or a 0-dim tensor: the batch's
    v = fast.velocity("teacher", noise, 0.5, pt)
    assert torch.equal(v, fast.velocity("teacher", noise, torch.tensor(0.5), pt))
    assert torch.equal(v, fast.velocity("teacher", noise, torch.full((2,), 0.5), pt))


def test_the_models_gradient_checkpointing_is_followed_and_full_ft_needs_a_trainable_student():
    """A loop that called enable_gradient_checkpointing() (the authors' scripts do) got none in the fast
    pass (memory as without it); now every main layer is checkpointed, the same gradients."""
    from dopsd_fast import backend

    model = _model()
    plain = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    assert plain.model.checkpoint_layers == 0
    ref = plain.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    g_ref = [p.grad.clone() for p in plain.trainable]
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    assert fast.model.checkpoint_layers == len(model.layers)
    res = fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    assert float(res.loss) == pytest.approx(float(ref.loss), rel=1e-6)
    for p, g in zip(fast.trainable, g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    fixed = backend.wrap(model, student_adapter="student", teacher_adapter="teacher", checkpoint_layers=0)
    assert fixed.model.checkpoint_layers == 0
    # the switch turned after wrap() is followed at the next step (it was read once, at wrap()); a number
    # given to wrap() stays
    model.disable_gradient_checkpointing()
    plain.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    assert plain.model.checkpoint_layers == fast.model.checkpoint_layers == 0
    model.enable_gradient_checkpointing()
    plain.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    fixed.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    assert plain.model.checkpoint_layers == len(model.layers) and fixed.model.checkpoint_layers == 0

    full = _model(names=())
    with pytest.raises(BackendError, match="nothing of the student requires grad"):
        backend.wrap(full, teacher=copy.deepcopy(full))
    with pytest.raises(BackendError, match="teacher= holds torch.bfloat16 weights"):
        backend.wrap(full.requires_grad_(True), teacher=copy.deepcopy(full).to(torch.bfloat16))


def _replace_student_lora(model):
    """A resume's load_state_dict(..., assign=True): new Parameter objects for the student's LoRA."""
    sd = {n: p.detach().clone() for n, p in model.named_parameters() if ".student." in n}
    model.load_state_dict(sd, strict=False, assign=True)


@pytest.mark.parametrize("replace", ["assign", "re-added", "deleted"])
def test_student_parameters_replaced_after_wrap_are_refused_at_the_step(replace):
    """The backend reads the student's trainable tensors at wrap(). Replaced since (a resume's assign=True,
    the adapter deleted and added again), they trained nothing, were not averaged over DDP ranks, and an
    EMA teacher_shadow fell back to the live student's LoRA as the teacher (loss 2.5e-3 against 7.6e-2
    eager, the gradient ~100 % off, no error): now one line at the next step."""
    from peft import LoraConfig

    from dopsd_fast import backend

    model = _model(names=("student",))
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    fast = backend.wrap(model, student_adapter="student", teacher_shadow=ema)
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)  # wrapped as it is: runs
    if replace == "assign":
        _replace_student_lora(model)
    else:
        model.delete_adapters("student")
        if replace == "re-added":
            model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT), adapter_name="student")
    with pytest.raises(BackendError, match=r"the student's parameter .*lora_.* is (another tensor|gone) since "
                                           r"backend.wrap read it .* call backend.wrap again") as e:
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    assert len(str(e.value).splitlines()) == 1
    fast = backend.wrap(model, student_adapter="student", teacher_shadow=ema) if replace != "deleted" else None
    if fast is not None:  # wrapped again: runs
        assert float(fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS).loss) > 0


def test_a_teacher_adapter_deleted_after_wrap_is_refused_not_read_as_the_base_model():
    from dopsd_fast import backend

    model = _model()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    model.delete_adapters("teacher")  # the step used to take the bare base model for the teacher
    with pytest.raises(AdapterError, match=r"the teacher adapter 'teacher' is on no module of the model any more"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)


def test_a_backward_fn_that_defers_the_backward_is_refused():
    """backward_fn=held.append, then (held[0] + reg).backward() after the step: the student's flags were
    restored (set_adapter('teacher') left them off) and DDP had averaged already: no gradient, no error.
    Now refused; a backward_fn that back-propagates inside (loss plus a term of the caller's) is the way."""
    from dopsd_fast import backend

    model = _model()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    model.set_adapter("teacher")
    held = []
    with pytest.raises(BackendError, match="backward_fn returned without back-propagating the loss"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS, backward="once", backward_fn=held.append)
    student = [p for n, p in model.named_parameters() if ".student." in n]
    assert not any(p.requires_grad for p in student)  # the caller's flags restored after the refusal
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS, backward="once", backward_fn=lambda l: (l + 0.0).backward())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student)


def test_inputs_that_do_not_fit_are_named_in_one_line():
    """Each used to end in a torch error from deep inside (or a silent truncation): named instead."""
    from dopsd_fast import backend

    model = _model()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    noise, cs, ct = _inputs()
    with pytest.raises(BackendError, match=r"timesteps= is empty"):
        fast.dopsd_step(noise, cs, ct, timesteps=[])
    for sigma in (torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.5]), torch.ones(1, 2)):
        with pytest.raises(BackendError, match=r"backend.velocity: sigma has shape .*one noise level per sample \(2,\)"):
            fast.velocity("student", noise, sigma, cs)
    with pytest.raises(BackendError, match=r"the latents are on meta, the model's weights on cpu"):
        fast.dopsd_step(noise.to("meta"), cs, ct, timesteps=TIMESTEPS)
    refs = [torch.randn(2, 8, 8, 8)]  # reference latents of another channel count than the latents' 16
    with pytest.raises(BackendError, match=r"ctx_t\[0\]'s reference latents ref0 have 8 channels .* the latents have 16"):
        fast.dopsd_step(noise, cs, backend.contexts(ct, references=refs), timesteps=TIMESTEPS)


def test_merged_and_dora_adapters_are_adapter_errors():
    """Merged LoRA and DoRA were a RuntimeError / NotImplementedError, which a caller catching the
    documented AdapterError missed."""
    from peft import LoraConfig

    from dopsd_fast import backend

    model = _model()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    layer = next(m for m in model.modules() if hasattr(m, "base_layer") and "student" in m.lora_A)
    layer.merge(["student"])
    with pytest.raises(AdapterError, match=r"merged into the base layer .* unmerge them first"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    layer.unmerge()
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    dora = _model(names=())
    dora.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT, use_dora=True), adapter_name="student")
    dora.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT), adapter_name="teacher")
    dora.set_adapter("student")
    with pytest.raises(AdapterError, match=r"'student' is a DoRA adapter"):
        backend.wrap(dora, student_adapter="student", teacher_adapter="teacher").dopsd_step(*_inputs(),
                                                                                          timesteps=TIMESTEPS)


@pytest.mark.parametrize("variant", ["kasa", "bdlora"])
def test_peft_lora_variants_other_than_dora_are_adapter_errors(variant):
    """peft's other LoRA variants (KaSA's diagonal between A and B, BD-LoRA's block-diagonal factors, VeLoRA,
    MonteCLoRA) change the adapter's forward: the fast path applied plain B @ A, so KaSA gave a silently wrong
    loss and gradients (30 % off), BD-LoRA a shape error deep in F.linear."""
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig

    from dopsd_fast import backend

    kw = dict(kasa_config=KasaConfig()) if variant == "kasa" else dict(use_bdlora=BdLoraConfig(
        target_modules_bd_a=["to_out", "w2"], target_modules_bd_b=["to_q", "to_k", "to_v", "w1", "w3"], nblocks=2))
    model = _model(**kw)
    with pytest.raises(AdapterError, match=r"is a peft LoRA variant \((Kasa|BdLora)LinearVariant\)"):
        backend.wrap(model, student_adapter="student", teacher_adapter="teacher")


def test_an_inactive_adapter_outside_the_blocks_is_accepted_an_active_one_refused():
    """An adapter neither branch reads, on a module the fast path runs whole, inactive: peft applies it to
    neither branch, as the eager model does; it was refused, saying peft would apply it. Active, refused."""
    from peft import LoraConfig

    from dopsd_fast import backend

    model = _model()
    ref = backend.wrap(model, student_adapter="student", teacher_adapter="teacher").dopsd_step(
        *_inputs(), timesteps=TIMESTEPS)
    model.zero_grad(set_to_none=True)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["t_embedder.mlp.0"]),
                      adapter_name="extra")
    model.set_adapter("student")
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    assert float(fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS).loss) == pytest.approx(float(ref.loss), rel=1e-6)
    model.set_adapter(["student", "extra"])
    with pytest.raises(AdapterError, match=r"\['extra'\] on t_embedder.mlp.0, a module the fast path runs whole"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)


def test_a_used_generator_autocast_is_named_and_the_base_model_teacher_runs():
    import contextlib

    from dopsd_fast import backend

    model = _model(names=("student",))
    fast = backend.wrap(model, teacher=model, student_adapter="student")  # the base model as the teacher
    cm = contextlib.nullcontext()
    gen = contextlib.contextmanager(lambda: (yield))()  # accelerator.autocast()'s kind: enters once
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS, autocast=gen)
    with pytest.raises(BackendError, match=r"autocast= was used already: .* a new one at each step"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS, autocast=gen)
    for _ in range(2):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS, autocast=cm)
    with pytest.raises(BackendError, match=r"or teacher=<the same model> for the base model"):
        backend.wrap(model, student_adapter="student")


def test_a_teacher_module_of_another_config_is_refused(tmp_path):
    """The packed pass walks the student's layers and reads its settings for both branches: a teacher=
    with more layers (or another norm eps) was computed wrongly and silently (its extra layers skipped)."""
    from dopsd_fast import backend
    from dopsd_fast.families import ZIMAGE

    full = _model(names=()).requires_grad_(True)
    for change, shown in ((dict(n_layers=ZIMAGE.tiny_config()["n_layers"] + 1), "n_layers: "),
                          (dict(norm_eps=1e-3), "norm_eps: 1e-05 vs 0.001")):
        other = ZIMAGE.diffusers_class()(**{**ZIMAGE.tiny_config(), **change}).float()
        with pytest.raises(BackendError, match=rf"teacher= has another config than the student \({shown}"):
            backend.wrap(full, teacher=other)
    backend.wrap(full, teacher=copy.deepcopy(full))  # its EMA copy
    full.save_pretrained(tmp_path / "ema")  # read back from disk: its config's tuples are lists, the same model
    backend.wrap(full, teacher=ZIMAGE.diffusers_class().from_pretrained(tmp_path / "ema").float())


def test_a_teacher_module_cast_or_moved_after_wrap_is_refused_at_the_step():
    """An EMA module cast (or moved to the CPU) between steps failed deep in F.linear."""
    from dopsd_fast import backend

    full = _model(names=()).requires_grad_(True)
    teacher = copy.deepcopy(full).requires_grad_(False)
    fast = backend.wrap(full, teacher=teacher)
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    teacher.to(torch.bfloat16)
    with pytest.raises(BackendError, match=r"teacher= holds torch.bfloat16 weights on cpu now, the student "
                                           r"torch.float32 on cpu"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    teacher.float()
    fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)


def test_an_ema_dict_on_another_device_is_refused():
    """A meta tensor stands in for another device on the CPU: the step ran and gave a NaN loss."""
    from dopsd_fast import backend

    model = _model(names=("default",))
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    fast = backend.wrap(model, student_adapter="default", teacher_shadow=ema)
    key = next(iter(ema))
    ema[key] = ema[key].to("meta")
    with pytest.raises(BackendError, match=rf"teacher_shadow\['{key}'\] is a torch.float32 tensor on meta, the "
                                           r"parameter on cpu"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)


def test_arguments_of_the_wrong_kind_are_named():
    """Each ended in an error that did not name the argument (or was accepted)."""
    from peft import LoraConfig

    from dopsd_fast import backend

    model = _model()
    with pytest.raises(BackendError, match=r"student_adapter= takes the adapter's name \(a str, e.g. 'default'\), "
                                           r"got a LoraConfig"):
        backend.wrap(model, student_adapter=LoraConfig(r=4), teacher_adapter="teacher")
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    noise, ps, pt = _inputs()
    with pytest.raises(BackendError, match=r"autocast= takes a context manager .*, got True"):
        fast.dopsd_step(noise, ps, pt, timesteps=TIMESTEPS, autocast=True)
    with pytest.raises(BackendError, match=r"sigmas= has shape \(2, 3\): it is the roll-out's schedule"):
        fast.dopsd_step(noise, ps, pt, sigmas=torch.tensor([[1.0, 0.5, 0.0]] * 2))
    with pytest.raises(BackendError, match=r"sigmas= is the roll-out's schedule"):
        fast.dopsd_step(noise, ps, pt, sigmas=[[1.0, 0.5, 0.0]])
    res = fast.dopsd_step(noise, ps, pt, sigmas=torch.tensor([1.0, 0.5, 0.0]))
    assert len(res.state_losses) == 2
    with pytest.raises(BackendError, match=r"sigma 1.5 is outside \[0, 1\]: it is the noise level"):
        fast.velocity("teacher", noise, 1.5, pt)


def test_full_fine_tuning_says_once_that_a_parameter_frozen_after_wrap_still_trains(caplog):
    from dopsd_fast import backend

    full = _model(names=()).requires_grad_(True)
    fast = backend.wrap(full, teacher=copy.deepcopy(full))
    full.layers[0].requires_grad_(False)
    with caplog.at_level("WARNING", logger="dopsd_fast.backend"):
        for _ in range(2):
            fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    said = [r.getMessage() for r in caplog.records if "require no grad now" in r.getMessage()]
    n = sum(1 for _ in full.layers[0].parameters())
    assert len(said) == 1 and said[0].startswith(f"backend: {n} of the student's")


def test_the_mixed_precision_hint_is_not_said_under_the_callers_own_autocast(caplog):
    from dopsd_fast import backend

    model = _model()
    fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
    fast.autocast_hint = True  # as for a model accelerate prepared with mixed precision
    with caplog.at_level("WARNING", logger="dopsd_fast.backend"), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    assert not [r for r in caplog.records if "mixed precision" in r.getMessage()]
    fast.autocast_hint = True
    with caplog.at_level("WARNING", logger="dopsd_fast.backend"):
        fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    assert len([r for r in caplog.records if "mixed precision" in r.getMessage()]) == 1


def test_the_mixed_precision_hint_when_accelerate_prepares_the_model_after_wrap(caplog):
    """accelerate's prepare() patches the model's own forward with its autocast (the same module object
    the backend holds, under DDP too): wrap() before prepare() left the hint unsaid, and the forwards ran
    in fp32 while the caller's eager loop ran in bf16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dopsd_fast import backend

    AcceleratorState._reset_state(True)
    try:
        model = _model()
        fast = backend.wrap(model, student_adapter="student", teacher_adapter="teacher")
        model = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
        with caplog.at_level("WARNING", logger="dopsd_fast.backend"):
            for _ in range(2):
                fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    finally:
        AcceleratorState._reset_state(True)
    assert len([r for r in caplog.records if "pass autocast=accelerator.autocast()" in r.getMessage()]) == 1


def test_ranks_without_a_ddp_wrapper_are_said_again_at_the_first_step(caplog, monkeypatch):
    """wrap() on the bare model, then accelerator.prepare() (or DDP) around it: the wrapper is bypassed and
    the ranks' gradients are never averaged (two gloo ranks drifted 1.45 apart, relative). It was said once,
    at wrap(), before the prepare() a reader takes for the fix; it is said again at the first step."""
    import torch.distributed as dist

    from dopsd_fast import backend

    fast = backend.wrap(_model(), student_adapter="student", teacher_adapter="teacher")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with caplog.at_level("WARNING", logger="dopsd_fast.backend"):
        for _ in range(2):
            fast.dopsd_step(*_inputs(), timesteps=TIMESTEPS)
    said = [r.getMessage() for r in caplog.records if "data-parallel ranks" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("backend: at the first step: 2 data-parallel ranks") and \
        "a DDP / accelerate wrapper made after wrap() is bypassed" in said[0], said
