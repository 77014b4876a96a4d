"""FastZImage (packed student/teacher forward on the diffusers model's own weights) against the
diffusers ZImageTransformer2DModel: outputs of both branches and the student's gradients."""

import math
import re

import pytest
import torch

from tests.conftest import OpCount, assert_close, assert_grads_match, fp8_standins, compare_grads, grads_of


def _model(lora=True, **over):
    from diffusers import ZImageTransformer2DModel

    from dopsd_fast.adapters.tiny import TINY_ZIMAGE
    from dopsd_fast.config import LoraConfig
    from dopsd_fast.weights import StudentTeacher

    cfg = dict(TINY_ZIMAGE, **over)
    tr = ZImageTransformer2DModel(**cfg).float()
    with torch.no_grad():  # non-trivial pad tokens and adapters, different per branch
        tr.x_pad_token.normal_()
        tr.cap_pad_token.normal_()
    st = StudentTeacher(tr, LoraConfig(rank=4, alpha=8.0, enabled=lora),
                        ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"), torch.float32)
    with torch.no_grad():
        for p in st.named_trainable().values():
            p.add_(0.05 * torch.randn_like(p))
        for p in (st.named_teacher().values() if lora else st.teacher_module.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return st


def _fast(st, ops=None, **kw):
    from dopsd_fast.models.zimage import FastZImage
    from dopsd_fast.weights import STUDENT, TEACHER

    if st.lora:
        return FastZImage((st.transformer, STUDENT), (st.transformer, TEACHER), ops=ops, **kw)
    return FastZImage((st.transformer, None), (st.teacher_module, None), ops=ops, **kw)


def _eager(model, x, t, caps):
    out = model(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def _inputs(B, H, W, cap_lens_s, cap_lens_t):
    x = torch.randn(B, 16, H, W)
    t = torch.rand(B)
    caps_s = [torch.randn(n, 32) for n in cap_lens_s]
    caps_t = [torch.randn(n, 32) for n in cap_lens_t]
    return x, t, caps_s, caps_t


CASES = [  # (B, H, W, student caption lengths, teacher caption lengths)
    (1, 16, 16, [7], [45]),        # 64 image tokens (no padding): the noise refiner can be shared
    (2, 10, 6, [5, 33], [40, 3]),  # 15 image tokens (padded to 32), ragged captions
]


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_pair_matches_two_diffusers_calls(lora, case):
    st = _model(lora)
    fast = _fast(st)
    x, t, caps_s, caps_t = _inputs(*case)
    out_s, out_t = fast.forward_pair(x, t, caps_s, caps_t)
    ref_t = _eager(st.teacher(), x, t, caps_t)
    ref_s = _eager(st.student(), x, t, caps_s)
    assert_close(out_s, ref_s, 1e-5, 1e-4, "student output", scaled=True)
    assert_close(out_t, ref_t, 1e-5, 1e-4, "teacher output", scaled=True)
    assert not out_t.requires_grad
    # the student's gradients (every trainable tensor) equal the eager model's
    assert_grads_match(out_s, ref_s, st.named_trainable(), 1e-5, 1e-4)


def test_gradient_check_catches_a_one_percent_error():
    """The magnitude-scaled tolerances keep their power: the parity check above passes on the real
    gradients, and fails, naming the tensor, when any one trainable gradient is off by 1%."""
    st = _model(True)
    x, t, caps_s, caps_t = _inputs(*CASES[1])
    out_s, _ = _fast(st).forward_pair(x, t, caps_s, caps_t)
    ref_s = _eager(st.student(), x, t, caps_s)
    params = st.named_trainable()
    g = torch.randn_like(ref_s)
    fast_g, ref_g = grads_of(out_s, params, g), grads_of(ref_s, params, g)
    compare_grads(fast_g, ref_g, 1e-5, 1e-4)
    mutated = [n for n, v in fast_g.items() if v is not None and v.abs().max() > 0]
    assert any("lora_A" in n for n in mutated) and any("lora_B" in n for n in mutated)
    for n in mutated:
        with pytest.raises(AssertionError, match=re.escape(n)):
            compare_grads({**fast_g, n: fast_g[n] * 1.01}, ref_g, 1e-5, 1e-4)


def test_shared_refiner_and_single_branches():
    from dopsd_fast.models.zimage import FastZImage

    st = _model(True, n_refiner_layers=2)
    fast = _fast(st)
    # refiner carries LoRA here: not shared; without adapters in it, it is
    assert not fast.refiner_shareable
    x, t, caps_s, caps_t = _inputs(*CASES[0])
    only_s, none_t = fast.forward_pair(x, t, caps_s, None)
    assert none_t is None
    assert_close(only_s, _eager(st.student(), x, t, caps_s), 1e-5, 1e-4, "student alone", scaled=True)
    none_s, t_alone = fast.forward_pair(x, t, None, caps_t, student=False)
    assert none_s is None and not t_alone.requires_grad
    assert_close(t_alone, _eager(st.teacher(), x, t, caps_t), 1e-5, 1e-4, "teacher alone", scaled=True)

    from diffusers import ZImageTransformer2DModel

    from dopsd_fast.adapters.tiny import TINY_ZIMAGE

    plain = ZImageTransformer2DModel(**TINY_ZIMAGE).float()
    shared = FastZImage((plain, None), (plain, None))
    assert shared.refiner_shareable
    o_s, o_t = shared.forward_pair(x, t, caps_s, caps_t)
    assert_close(o_s, _eager(plain, x, t, caps_s), 1e-5, 1e-4, "shared-refiner student", scaled=True)
    assert_close(o_t, _eager(plain, x, t, caps_t), 1e-5, 1e-4, "shared-refiner teacher", scaled=True)

    # a padded image (15 tokens -> 32): shared when both branches pad their captions to the same
    # lengths (5 / 33 and 20 / 40 -> 32 / 64), per branch when they do not (5 / 33 vs 40 / 3)
    with torch.no_grad():
        plain.x_pad_token.normal_()
    runs = []
    inner = shared._run_blocks

    def spy(paths, s, t, *a, **kw):
        if paths[0].startswith("noise_refiner"):
            runs.append((s is not None) + (t is not None))
        return inner(paths, s, t, *a, **kw)

    shared._run_blocks = spy
    for caps_t_lens, n_passes in (([20, 40], 1), ([40, 3], 2)):
        x, t, caps_s, caps_t = _inputs(2, 10, 6, [5, 33], caps_t_lens)
        runs.clear()
        o_s, o_t = shared.forward_pair(x, t, caps_s, caps_t)
        assert runs == [n_passes], (caps_t_lens, runs)
        assert_close(o_s, _eager(plain, x, t, caps_s), 1e-5, 1e-4, f"padded image, student ({caps_t_lens})", scaled=True)
        assert_close(o_t, _eager(plain, x, t, caps_t), 1e-5, 1e-4, f"padded image, teacher ({caps_t_lens})", scaled=True)
    # why not shared there: forced (the layout told the lengths match), the teacher is ~10% off, since
    # diffusers lets the pad rows into the refiner's attention (should it mask them, widen the sharing)
    shared.layout(2, 10, 6, [5, 33], [40, 3], x.device)["t"]["padded"] = [32, 64]
    o_t = shared.forward_pair(x, t, caps_s, caps_t)[1].detach()
    ref = _eager(plain, x, t, caps_t).detach()
    assert runs[-1] == 1 and (o_t - ref).abs().max() > 0.01 * ref.abs().max()


@pytest.mark.parametrize("backward", ["once", "stepwise"])
@pytest.mark.parametrize("lora", [True, False])
def test_context_refiner_once_per_rollout(backward, lora):
    """The refined captions are computed once per roll-out (the teacher's always; the student's as one
    shared graph when the roll-out back-propagates once, or, with any schedule, as a leaf whose summed
    gradient ``finish()`` back-propagates) and the roll-out's losses and gradients are those of the
    per-state recomputation; without either, a backward after each state keeps the student's per state."""
    from dopsd_fast.adapters.base import Context
    from dopsd_fast.algorithm import rollout_loss_paired

    st = _model(lora, n_refiner_layers=2)
    fast = _fast(st)
    x, _, caps_s, caps_t = _inputs(*CASES[1])
    ctx_s, ctx_t = [Context(c) for c in caps_s], [Context(c) for c in caps_t]
    sig = [1.0, 0.9, 0.75, 0.5, 0.0]
    params = st.named_trainable()
    runs, results = {}, {}
    modes = (("per state", None), ("shared", fast.new_share(student=backward == "once")),
             ("deferred", fast.new_share(student="deferred")))
    for name, share in modes:
        calls = []
        orig = fast._run_blocks

        def counted(paths, s, t, adaln, checkpointed=0, orig=orig, calls=calls):
            if paths and paths[0].startswith("context_refiner"):
                calls.append((s is not None, t is not None))
            return orig(paths, s, t, adaln, checkpointed)

        fast._run_blocks = counted
        for p in params.values():
            p.grad = None
        res = rollout_loss_paired(lambda x, s: fast.velocity_pair(x, s, ctx_s, ctx_t, share=share), x, sig,
                                  backward=backward)
        if backward == "once":
            res.loss.backward()
        if name == "deferred":
            assert all(p.grad is None for n, p in params.items() if "context_refiner" in n)  # not yet
            share.finish()
        del fast._run_blocks
        results[name] = (res, {n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        runs[name] = (sum(c[0] for c in calls), sum(c[1] for c in calls))
    assert runs["per state"] == (4, 4)
    assert runs["shared"] == ((1, 1) if backward == "once" else (4, 1)), runs
    assert runs["deferred"] == (1, 1), runs
    ref, g_ref = results["per state"]
    assert any("context_refiner" in n for n in g_ref)  # the comparison covers the refiner's trainable tensors
    for name in ("shared", "deferred"):
        got, g_got = results[name]
        for a, b in zip(got.state_losses, ref.state_losses):
            assert_close(a, b, 1e-6, 1e-5, f"{name}: state loss")
        assert set(g_ref) == set(g_got) and g_ref
        compare_grads(g_got, g_ref, 1e-5, 1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_checkpointed_layers_same_gradients(fused):
    """Checkpointed main layers (the student alone in the recompute: with the fused ops, one-branch
    linears through the same paired op as the pair) give the un-checkpointed gradients; the teacher
    alone likewise equals the eager teacher."""
    from dopsd_fast.models.ops import FusedOps

    st = _model(True)
    x, t, caps_s, caps_t = _inputs(*CASES[1])
    params = list(st.named_trainable().values())
    ops = (lambda: FusedOps(attention="sdpa", gemm="cublas")) if fused else (lambda: None)
    res = []
    for n_ckpt in (0, 2):
        out_s, _ = _fast(st, ops=ops(), checkpoint_layers=n_ckpt).forward_pair(x, t, caps_s, caps_t)
        res.append(torch.autograd.grad(out_s.square().mean(), params, allow_unused=True))
    for a, b in zip(*res):
        if a is not None:
            assert_close(a, b, 1e-6, 1e-5, "checkpointed grad", scaled=True)
    if fused:
        _, t_alone = _fast(st, ops=ops()).forward_pair(x, t, None, caps_t, student=False)
        assert_close(t_alone, _eager(st.teacher(), x, t, caps_t), 1e-5, 1e-4, "teacher alone (fused)", scaled=True)


def test_fused_kernels_through_the_interpreter():
    """The whole packed forward + backward with our Triton kernels (interpreted on the CPU)."""
    from dopsd_fast.models.ops import FusedOps

    st = _model(True)
    fast = _fast(st, ops=FusedOps(attention="triton"))
    x, t, caps_s, caps_t = _inputs(1, 8, 8, [9], [20])
    with OpCount() as fwd:
        out_s, out_t = fast.forward_pair(x, t, caps_s, caps_t)
    ref_t = _eager(st.teacher(), x, t, caps_t)
    ref_s = _eager(st.student(), x, t, caps_s)
    assert_close(out_s, ref_s, 1e-4, 1e-3, "student (fused)", scaled=True)
    assert_close(out_t, ref_t, 1e-4, 1e-3, "teacher (fused)", scaled=True)
    with OpCount() as bwd:
        assert_grads_match(out_s, ref_s, st.named_trainable(), 1e-4, 1e-3)
    # every modulated block's attention residual with its FFN norm, and each block's FFN residual with the
    # next block's attention norm, in one op (per branch); the student's backward: one op each
    L, R = (len(st.transformer.layers), len(st.transformer.noise_refiner))
    per_branch = (L + R) + (L - 1) + (R - 1)
    assert fwd.n.get("dopsd_fast.residual_norm") == 2 * per_branch, fwd.n
    assert bwd.n.get("dopsd_fast.residual_norm_backward") == per_branch, bwd.n


def test_fp8_filter_and_fp8_module_dispatch():
    """The FP8 module filter takes only the block linears; a converted (FP8) base layer is called as
    a module by the fast path, with the LoRA delta added on top: outputs still match the eager model.
    (The stand-in, conftest.fp8_standins, is an nn.Linear under torchao's class name: it checks the dispatch, not FP8
    numerics, which need an sm_89+ GPU.)"""
    from dopsd_fast.families import ZIMAGE
    from dopsd_fast.fp8 import apply_fp8, fp8_module_filter, sqnr_db

    st = _model(True)
    tr = st.transformer
    picked = [n for n, m in tr.named_modules() if fp8_module_filter(n, m, ZIMAGE)]
    assert picked and all(".base_layer" in n for n in picked)
    assert not any("adaLN" in n or "embedder" in n or "final_layer" in n for n in picked)
    assert {n.split(".")[0] for n in picked} == {"layers", "noise_refiner", "context_refiner"}
    fp8_standins(tr, picked)
    x, t, caps_s, caps_t = _inputs(*CASES[1])
    out_s, out_t = _fast(st).forward_pair(x, t, caps_s, caps_t)
    assert_close(out_s, _eager(st.student(), x, t, caps_s), 1e-5, 1e-4, "student via FP8-module dispatch", scaled=True)
    assert_close(out_t, _eager(st.teacher(), x, t, caps_t), 1e-5, 1e-4, "teacher via FP8-module dispatch", scaled=True)
    assert sqnr_db(out_s, out_s + 1e-3 * out_s.std() * torch.randn_like(out_s)) > 55
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="fp8"):
            apply_fp8(_model(True).transformer, "torchao", "tensorwise", ZIMAGE)


def test_trainer_fast_path_matches_eager_step(tmp_path):
    """One optimizer step of the trainer, eager reference vs fast path (packed, stepwise and once):
    same loss, per-state losses and LoRA weights after the step."""
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    def run(sub, *extra):
        cfg = tiny_config(tmp_path / sub, "train.max_steps=1", *extra)
        tr = Trainer(cfg)
        m = tr.train_step()
        return m, {n: p.detach().clone() for n, p in tr.weights.named_trainable().items()}

    m_e, w_e = run("eager")
    for extra in (["fast.enabled=true"], ["fast.enabled=true", "dopsd.backward=stepwise", "fast.checkpoint=all"]):
        m_f, w_f = run("fast-" + "-".join(extra), *extra)
        assert abs(m_f["loss"] - m_e["loss"]) <= 1e-5 * abs(m_e["loss"]) + 1e-8, (m_f["loss"], m_e["loss"])
        for k in range(4):
            a, b = m_f[f"loss_state/{k}"], m_e[f"loss_state/{k}"]
            assert abs(a - b) <= 1e-5 * abs(b) + 1e-8, (k, a, b)
        for n in w_e:
            assert_close(w_f[n], w_e[n], 1e-6, 1e-5, n)


def test_twenty_steps_fast_vs_eager_converge_alike(tmp_path):
    """20 optimizer steps: the per-step losses and the final LoRA weights of the fast path follow
    the eager reference (fp32 on the CPU; differences are rounding, compounding over steps)."""
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    def run(sub, *extra):
        tr = Trainer(tiny_config(tmp_path / sub, "train.max_steps=20", *extra))
        losses = [tr.train_step()["loss"] for _ in range(20)]
        return losses, {n: p.detach().clone() for n, p in tr.weights.named_trainable().items()}

    le, we = run("eager")
    lf, wf = run("fast", "fast.enabled=true")
    for i, (a, b) in enumerate(zip(lf, le)):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-7, f"step {i}: fast {a} vs eager {b}"
    num = sum(float((wf[n] - we[n]).norm() ** 2) for n in we) ** 0.5
    den = sum(float(we[n].norm() ** 2) for n in we) ** 0.5
    assert num / den < 1e-4, f"relative LoRA weight difference after 20 steps: {num / den:.3g}"


def test_fast_config_validation_names_the_field(tmp_path):
    from dopsd_fast.config import ConfigError, load_config

    bad = {
        "fast.fp8": ["fast.fp8=te"],  # FP8 needs the fast path
        "fast.fp8_teacher": ["fast.enabled=true", "fast.fp8=torchao", "fast.fp8_teacher=false"],
        "fast.fp8_recipe": ["fast.enabled=true", "fast.fp8=te", "fast.fp8_recipe=rowwise"],
        "fast.compile": ["fast.enabled=true", "fast.kernels=on", "fast.compile=true"],
        "fast.graphs": ["fast.graphs=true"],
        "model.gradient_checkpointing": ["fast.checkpoint=some"],  # the renamed field, read under its new name
        "fast.attention": ["fast.attention=xformers"],
    }
    for field, over in bad.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, over)
    ok = load_config(None, ["fast.enabled=true", "fast.fp8=off", "fast.checkpoint=3"])
    assert ok.fast.fp8 == "off" and ok.model.gradient_checkpointing == 3  # a bare YAML `off` is the string
    assert load_config(None, ["fast.enabled=true", "fast.fp8=te"]).fast.fp8_recipe == "delayed"


def test_attention_backend_choice():
    from dopsd_fast.models.ops import build_ops, resolve_attention

    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu) == "sdpa"
    assert resolve_attention("triton", cpu) == "triton"
    with pytest.raises(RuntimeError, match="flash_attn"):
        resolve_attention("flash_attn", cpu)
    with pytest.raises(ValueError):
        resolve_attention("xformers", cpu)
    assert not build_ops("auto", "auto", cpu).fused and build_ops("on", "triton", cpu).fused


def test_attention_auto_on_cuda_follows_measurements(monkeypatch, caplog):
    """``auto`` on CUDA (faked device names: no GPU needed): cuDNN-first SDPA on H200 (measured) and
    H100 (inherited, said so); SDPA's own choice on other GPUs, with the reason logged; the next backend
    of the order where cuDNN is not available."""
    import logging

    from dopsd_fast.models import ops

    cuda = torch.device("cuda")
    monkeypatch.setattr(ops, "_cudnn_available", lambda: True)
    caplog.set_level(logging.INFO, logger="dopsd_fast")
    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert ops.resolve_attention("auto", cuda) == "cudnn"
    assert "benchmarks/results/2026-12-04-h200" in caplog.text and "NOT measured on an H100" in caplog.text
    for name in ("NVIDIA B200", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"):
        caplog.clear()
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert ops.resolve_attention("auto", cuda) == "sdpa"
        assert f"{name}: no measurement for this GPU" in caplog.text
    caplog.clear()
    monkeypatch.setattr(ops, "_cudnn_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert ops.resolve_attention("auto", cuda) == "sdpa" and "cudnn is not available here" in caplog.text
    with pytest.raises(RuntimeError, match="fast.attention=cudnn needs a CUDA device"):
        ops.resolve_attention("cudnn", torch.device("cpu"))


@pytest.mark.parametrize("lens", [[6, 6], [5, 9, 3, 12]], ids=["dense", "ragged"])
def test_cudnn_backend_path(lens, caplog):
    """The ``cudnn`` backend's code path (cuDNN-first order on dense calls; cuDNN alone on a jagged batch,
    with PyTorch's order taking over, logged once, where cuDNN has no kernel for it): outputs and
    gradients equal per-sample attention. On the CPU no cuDNN kernel exists: the fallback is what runs
    here; that cuDNN takes these calls is what the GPU check measures."""
    import logging

    import torch.nn.functional as F

    from dopsd_fast.models import ops

    caplog.set_level(logging.INFO, logger="dopsd_fast")
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], 2, 16, requires_grad=True) for _ in range(3))
    ops.JAGGED_CUDNN = None
    outs = [ops.varlen_attention("cudnn", q, k, v, torch.tensor(cu, dtype=torch.int32), cu) for _ in range(2)]
    g = torch.randn_like(outs[0])
    ref = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0]
                     .transpose(0, 1) for a, b in zip(cu, cu[1:])])
    for o in outs:
        assert_close(o, ref, 1e-5, 1e-5, "o", scaled=True)
    for name, a, r in zip("qkv", torch.autograd.grad(outs[0], (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, r, 1e-5, 1e-4, f"d{name}", scaled=True)
    if len(set(lens)) > 1:  # the jagged call: no cuDNN on the CPU, the fallback said once and remembered
        assert ops.JAGGED_CUDNN is False and caplog.text.count("cuDNN does not take this ragged batch") == 1
    ops.JAGGED_CUDNN = None


def test_fast_model_with_cudnn_backend_matches_diffusers():
    """The tiny fast model with the ``cudnn`` attention backend, ragged captions, both branches and the
    student's gradients against diffusers (on the CPU the backend's SDPA calls fall to PyTorch's CPU kernels)."""
    from dopsd_fast.models.ops import TorchOps

    st = _model(True)
    x, t, caps_s, caps_t = _inputs(*CASES[1])
    out_s, out_t = _fast(st, ops=TorchOps(attention="cudnn")).forward_pair(x, t, caps_s, caps_t)
    ref_s, ref_t = _eager(st.student(), x, t, caps_s), _eager(st.teacher(), x, t, caps_t)
    assert_close(out_s, ref_s, 1e-5, 1e-4, "student (cudnn)", scaled=True)
    assert_close(out_t, ref_t, 1e-5, 1e-4, "teacher (cudnn)", scaled=True)
    assert_grads_match(out_s, ref_s, st.named_trainable(), 1e-5, 1e-4)


def test_sdpa_varlen_is_one_call_for_ragged_samples(monkeypatch):
    """Samples of different lengths: ONE SDPA call on a jagged batch (no loop over samples), equal to
    per-sample attention, outputs and gradients."""
    import torch.nn.functional as F

    from dopsd_fast.models import ops

    lens, H, D = [5, 9, 3, 12], 2, 16
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], H, D, requires_grad=True) for _ in range(3))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    o = ops.varlen_attention("sdpa", q, k, v, torch.tensor(cu, dtype=torch.int32), cu)
    assert len(calls) == 1
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    ref = torch.cat([real(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
                     for a, b in zip(cu, cu[1:])])
    assert_close(o, ref, 1e-5, 1e-5, "o", scaled=True)
    for name, a, r in zip("qkv", grads, torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, r, 1e-5, 1e-4, f"d{name}", scaled=True)


def test_compiled_eager_ops_same_step(tmp_path):
    """fast.compile wires torch.compile around the element-wise ops (aot_eager here: no C++ build in
    a unit test); the step is unchanged."""
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    a = Trainer(tiny_config(tmp_path / "a", "fast.enabled=true")).train_step()
    tr = Trainer(tiny_config(tmp_path / "b", "fast.enabled=true", "fast.compile=true", "fast.compile_backend=aot_eager"))
    assert tr.pair.model.ops.compiled == "aot_eager"
    b = tr.train_step()
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])


def test_mid_size_parity():
    """A mid-size Z-Image (head dim 64, 4 main + 2 + 2 refiner layers, 256 image tokens, captions
    of 40 / 100 tokens): both branches and the gradients against diffusers, fp32."""
    st = _model(True, dim=192, n_heads=3, n_kv_heads=3, n_layers=4, n_refiner_layers=2, axes_dims=[16, 24, 24],
                cap_feat_dim=32)
    fast = _fast(st)
    x, t, caps_s, caps_t = _inputs(1, 32, 32, [40], [100])
    out_s, out_t = fast.forward_pair(x, t, caps_s, caps_t)
    ref_t = _eager(st.teacher(), x, t, caps_t)
    ref_s = _eager(st.student(), x, t, caps_s)
    assert_close(out_s, ref_s, 1e-4, 1e-4, "student output", scaled=True)
    assert_close(out_t, ref_t, 1e-4, 1e-4, "teacher output", scaled=True)
    assert_grads_match(out_s, ref_s, st.named_trainable(), 1e-5, 1e-3)


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_fastpath_velocity_equals_the_adapters(tmp_path, family):
    """FastPath.velocity (what validation and the CUDA graphs call) gives each branch's eager
    velocity: the student on its context, the teacher on its own (the reference for klein)."""
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    from dopsd_fast.families import FAMILIES

    extra = FAMILIES[family].tiny_overrides()
    tr = Trainer(tiny_config(tmp_path, "fast.enabled=true", *extra))
    tr.train_step()  # the adapters move away from their initial values, and the teacher from the student
    samples = tr.next_samples(1, 0)
    noise = tr.noise_for(samples, 1, 0)
    ctx_s = [c.to(tr.device) for c in tr.contexts.student(samples)]
    ctx_t = [c.to(tr.device) for c in tr.contexts.teacher(samples)]
    sigma = torch.full((noise.shape[0],), 0.6)
    with torch.no_grad():
        v_s = tr.pair.velocity("s", noise, sigma, ctx_s)
        v_t = tr.pair.velocity("t", noise, sigma, ctx_t)
        ref_s = tr.adapter.velocity(tr.weights.student(), noise, sigma, ctx_s)
        ref_t = tr.adapter.velocity(tr.weights.teacher(), noise, sigma, ctx_t)
    assert_close(v_s, ref_s, 1e-5, 1e-4, "student velocity", scaled=True)
    assert_close(v_t, ref_t, 1e-5, 1e-4, "teacher velocity", scaled=True)
    assert (v_s - v_t).abs().max() > 1e-4, "student and teacher contexts must differ"


def test_gemm_choice():
    """fast.gemm: cublas runs the paired linear's base GEMM on cuBLAS (addmm), triton on ours, auto per
    shape at the GPU's measured rates (cuBLAS where there are none: on the CPU); an unknown value is
    refused naming the field."""
    from dopsd_fast.config import ConfigError, load_config
    from dopsd_fast.kernels.multi_lora import resolve_impl
    from dopsd_fast.models.ops import build_ops

    cpu = torch.device("cpu")
    assert build_ops("on", "sdpa", cpu).gemm == "auto"
    x = torch.empty(8, 16)
    assert resolve_impl("auto", x, x, [torch.empty(24, 16)], [torch.empty(4, 16)], [1.0]) == "torch"
    assert build_ops("on", "sdpa", cpu, gemm="cublas").gemm == "cublas"
    assert build_ops("on", "sdpa", cpu, gemm="triton").gemm == "triton"
    with pytest.raises(ConfigError, match="fast.gemm"):
        load_config(None, ["fast.gemm=cutlass"])


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_native_fp8_gemm_and_velocity_sqnr(recipe):
    """fast.fp8=native: the paired linears' base GEMMs through torch._scaled_mm (it runs on the CPU too)
    equal the PyTorch emulation of the same arithmetic (quantize, dequantize), the student's gradients
    too (dX through the FP8 dX GEMM of the group, fast.fp8_dgrad's default); the weights are quantized
    once; and at the tiny model's
    bf16 velocities the FP8 path keeps an SQNR >= 20 dB against bf16, fused and emulated."""
    from dopsd_fast.fp8 import NativeFP8, sqnr_db
    from dopsd_fast.kernels.multi_lora import paired_lora_linears
    from dopsd_fast.models.ops import FusedOps, TorchOps

    fp8 = NativeFP8(recipe)
    bf = torch.bfloat16
    K, Ns, r = 64, (64, 48), 4
    ws = [torch.randn(n, K).to(bf) / 8 for n in Ns]
    lo_s = [(torch.randn(r, K).to(bf).requires_grad_(), torch.randn(n, r).to(bf).requires_grad_(), 0.5) for n in Ns]
    lo_t = [(torch.randn(r, K).to(bf), torch.randn(n, r).to(bf), 2.0) for n in Ns]
    x_s, x_t = torch.randn(37, K).to(bf).requires_grad_(), torch.randn(45, K).to(bf)
    fused = paired_lora_linears(x_s, x_t, ws, [None, None], lo_s, lo_t, impl="torch", fp8=fp8)
    emul = TorchOps().paired_linears(x_s, x_t, ws, [None, None], lo_s, lo_t, fp8=fp8)
    for (a_s, a_t), (b_s, b_t) in zip(fused, emul):
        assert_close(a_s.float(), b_s.float(), 2e-2, 2e-2, "y_s fp8 (scaled_mm vs emulation)", scaled=True)
        assert_close(a_t.float(), b_t.float(), 2e-2, 2e-2, "y_t fp8", scaled=True)
    g = [torch.randn_like(y) for y, _ in fused]
    ga = torch.autograd.grad([y for y, _ in fused], [x_s, lo_s[0][0]], g)
    gb = torch.autograd.grad([y for y, _ in emul], [x_s, lo_s[0][0]], g)
    for name, a, b in zip(("dx", "dA"), ga, gb):
        assert_close(a.float(), b.float(), 2e-2, 2e-2, f"{name} fp8", scaled=True)
    q0 = fp8.weight(ws[0])[0]
    assert fp8.weight(ws[0])[0] is q0  # quantized once
    with torch.no_grad():
        ws[0].mul_(2)
    assert fp8.weight(ws[0])[0] is not q0  # an in-place change re-quantizes

    if recipe != "rowwise":  # the model check once (bf16 on the CPU is slow)
        return
    st = _model(True)
    st.transformer.to(bf)
    x, t, caps_s, caps_t = _inputs(1, 8, 8, [7], [45])
    x, caps_s, caps_t = x.to(bf), [c.to(bf) for c in caps_s], [c.to(bf) for c in caps_t]
    for ops in (lambda: FusedOps(attention="sdpa", gemm="cublas"), lambda: TorchOps()):
        ref = _fast(st, ops=ops()).forward_pair(x, t, caps_s, caps_t)
        fast = _fast(st, ops=ops())
        fast.fp8_native = NativeFP8(recipe)
        out = fast.forward_pair(x, t, caps_s, caps_t)
        assert fast.fp8_native._w, "no linear took the FP8 path"
        for name, a, b in zip(("student", "teacher"), out, ref):
            db = sqnr_db(b.float(), a.float())
            print(f"fp8 native {recipe} {type(fast.ops).__name__} {name}: SQNR {db:.1f} dB")
            assert db >= 20.0, f"{name} velocity SQNR {db:.1f} dB < 20 dB"
            assert not torch.equal(a, b)  # FP8 really ran


def _quantized_weight_names(tr, fp8):
    """The parameter names of the weights ``fp8`` (a NativeFP8) quantized."""
    held = {id(hit[0]) for hit in fp8._w.values()}
    return {n for n, p in tr.named_parameters() if id(p) in held}


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_native_fp8_parity_rules(recipe, monkeypatch):
    """fast.fp8=native, each recipe, on the tiny Z-Image in bf16 (the fused cuBLAS-path ops the GPU runs):
    both velocities within SQNR >= 20 dB of the bf16 path; the weights quantized are exactly the block
    linears fp8_module_filter picks (embedders, adaLN modulation and the final layer stay bf16); the
    teacher's rows stay out of autograd (no graph on its velocity, and the student's gradients do not
    change when the teacher's context does)."""
    from dopsd_fast.families import ZIMAGE
    from dopsd_fast.fp8 import NativeFP8, fp8_module_filter, sqnr_db
    from dopsd_fast.models.ops import FusedOps

    # the fused element-wise ops through their PyTorch references (not Triton's interpreter: minutes on
    # the CPU); the paired linears and their FP8 GEMM (torch._scaled_mm) run as on the GPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    bf = torch.bfloat16
    st = _model(True)
    tr = st.transformer.to(bf)
    x, t, caps_s, caps_t = _inputs(1, 8, 8, [7], [45])
    x, caps_s, caps_t = x.to(bf), [c.to(bf) for c in caps_s], [c.to(bf) for c in caps_t]
    ops = lambda: FusedOps(attention="sdpa", gemm="cublas")  # noqa: E731
    ref = _fast(st, ops=ops()).forward_pair(x, t, caps_s, caps_t)
    fast = _fast(st, ops=ops())
    fast.fp8_native = NativeFP8(recipe)
    v_s, v_t = fast.forward_pair(x, t, caps_s, caps_t)
    for name, a, b in zip(("student", "teacher"), (v_s, v_t), ref):
        db = sqnr_db(b.float(), a.float())
        assert db >= 20.0 and not torch.equal(a, b), f"{recipe} {name} velocity SQNR {db:.1f} dB (needs >= 20, FP8 run)"

    picked = {n[: -len(".base_layer")] + ".base_layer.weight" for n, m in tr.named_modules()
              if fp8_module_filter(n, m, ZIMAGE)}
    quantized = _quantized_weight_names(tr, fast.fp8_native)
    assert quantized == picked, (sorted(quantized ^ picked)[:6])
    assert not any(k in n for n in quantized for k in ("adaLN", "embedder", "final_layer", "lora_"))

    assert not v_t.requires_grad and v_t.grad_fn is None
    params = list(st.named_trainable().values())
    g1 = torch.autograd.grad(v_s.float().square().mean(), params, allow_unused=True)
    v_s2, _ = fast.forward_pair(x, t, caps_s, [torch.randn_like(c) for c in caps_t])
    g2 = torch.autograd.grad(v_s2.float().square().mean(), params, allow_unused=True)
    assert any(g is not None for g in g1)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b), "the teacher's context reached a student gradient"
    assert all(p.grad is None for p in st.named_teacher().values())


def test_native_fp8_dgrad_runs_the_backward_dx_in_fp8_within_its_accuracy(monkeypatch):
    """fast.fp8_dgrad (on by default with fp8=native): the student's backward dX GEMMs run in FP8, one per
    group of linears (the transposed weights quantized once per group); the LoRA gradients differ from
    those of the FP8 forward alone and keep an SQNR >= 18 dB against the bf16 path on the tiny model
    (measured: 23.0 dB rowwise, 22.2 tensorwise; the forward-only FP8 24.3 / 23.7; real width:
    benchmarks/fp8_accuracy.py). fp8_dgrad=false keeps dX in bf16: refused with te and torchao."""
    from dopsd_fast.config import ConfigError, load_config
    from dopsd_fast.fp8 import NativeFP8
    from dopsd_fast.models.ops import FusedOps

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    bf = torch.bfloat16
    st = _model(True)
    st.transformer.to(bf)
    x, t, caps_s, caps_t = _inputs(1, 8, 8, [7], [45])
    x, caps_s, caps_t = x.to(bf), [c.to(bf) for c in caps_s], [c.to(bf) for c in caps_t]
    params = list(st.named_trainable().values())

    def grads(fp8):
        fast = _fast(st, ops=FusedOps(attention="sdpa", gemm="cublas"))
        fast.fp8_native = fp8
        v_s, _ = fast.forward_pair(x, t, caps_s, caps_t)
        return torch.autograd.grad(v_s.float().square().mean(), params, allow_unused=True)

    def sqnr_all(ref, test):
        live = [(a.double(), b.double()) for a, b in zip(ref, test) if a is not None and bool(a.any())]
        sig = sum(float(a.pow(2).sum()) for a, _ in live)
        return 10 * math.log10(sig / max(sum(float((b - a).pow(2).sum()) for a, b in live), 1e-300))

    ref = grads(None)
    fwd_only = grads(NativeFP8("rowwise", dgrad=False))
    fp8 = NativeFP8("rowwise")
    assert fp8.dgrad
    both = grads(fp8)
    assert fp8._wt, "no group's dX GEMM took the FP8 path"
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(fwd_only, both))
    db = sqnr_all(ref, both)
    assert db >= 18.0, f"LoRA gradients with FP8 dX: SQNR {db:.1f} dB against bf16 (needs >= 18)"
    q0 = next(iter(fp8._wt.values()))[2]
    grads(fp8)
    assert any(hit[2] is q0 for hit in fp8._wt.values()), "the transposed weights were quantized again"
    assert load_config(None, ["fast.enabled=true", "fast.fp8=native", "fast.fp8_dgrad=false"]).fast.fp8_dgrad is False
    with pytest.raises(ConfigError, match="fast.fp8_dgrad"):
        load_config(None, ["fast.enabled=true", "fast.fp8=torchao", "fast.fp8_dgrad=false"])
