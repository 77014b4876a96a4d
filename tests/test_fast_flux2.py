"""FastFlux2 (packed student/teacher klein forward on the diffusers weights) against the eager klein
adapter (diffusers Flux2Transformer2DModel): both branches (the teacher with its reference image)
and every student LoRA gradient."""

import pytest
import torch

from tests.conftest import assert_close, assert_grads_match, fp8_standins


def _setup(lora=True):
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.adapters.base import Context
    from dopsd_fast.config import LoraConfig, load_config
    from dopsd_fast.weights import StudentTeacher

    cfg = load_config("configs/tiny-klein.yaml")
    ad = build_adapter(cfg.model, load_encoders=False)
    st = StudentTeacher(ad.transformer, LoraConfig(rank=4, alpha=8.0, enabled=lora), ad.default_lora_targets,
                        torch.float32)
    with torch.no_grad():
        for p in st.named_trainable().values():
            p.add_(0.05 * torch.randn_like(p))
        for p in (st.named_teacher().values() if lora else st.teacher_module.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    B, L = 2, 24
    ctx_s = [Context(torch.randn(L, 96)) for _ in range(B)]
    ctx_t = [Context(torch.randn(L, 96), {"ref0": torch.randn(16, 6, 4)}) for _ in range(B)]
    return ad, st, ctx_s, ctx_t


def _fast(st, ops=None, **kw):
    from dopsd_fast.models.flux2 import FastFlux2
    from dopsd_fast.weights import STUDENT, TEACHER

    if st.lora:
        return FastFlux2((st.transformer, STUDENT), (st.transformer, TEACHER), ops=ops, **kw)
    return FastFlux2((st.transformer, None), (st.teacher_module, None), ops=ops, **kw)


@pytest.mark.parametrize("lora", [True, False])
def test_pair_matches_the_eager_adapter(lora):
    ad, st, ctx_s, ctx_t = _setup(lora)
    x, sigma = torch.randn(2, 16, 6, 4), torch.tensor([0.8, 0.3])
    v_s, v_t = _fast(st).velocity_pair(x, sigma, ctx_s, ctx_t)
    ref_t = ad.velocity(st.teacher(), x, sigma, ctx_t)
    ref_s = ad.velocity(st.student(), x, sigma, ctx_s)
    assert_close(v_s, ref_s, 1e-5, 1e-4, "student", scaled=True)
    assert_close(v_t, ref_t, 1e-5, 1e-4, "teacher (editing branch)", scaled=True)
    assert not v_t.requires_grad
    assert_grads_match(v_s, ref_s, st.named_trainable(), 1e-5, 1e-4)


def test_fused_kernels_through_the_interpreter():
    from dopsd_fast.models.ops import FusedOps

    from tests.conftest import OpCount

    ad, st, ctx_s, ctx_t = _setup(True)
    x, sigma = torch.randn(1, 16, 6, 4), torch.tensor([0.6])
    with OpCount() as fwd:
        v_s, v_t = _fast(st, FusedOps(attention="triton")).velocity_pair(x, sigma, ctx_s[:1], ctx_t[:1])
    assert_close(v_t, ad.velocity(st.teacher(), x, sigma, ctx_t[:1]), 1e-4, 1e-3, "teacher (fused)", scaled=True)
    ref_s = ad.velocity(st.student(), x, sigma, ctx_s[:1])
    assert_close(v_s, ref_s, 1e-4, 1e-3, "student (fused)", scaled=True)
    with OpCount() as bwd:
        assert_grads_match(v_s, ref_s, st.named_trainable(), 1e-4, 1e-3)
    # per branch, in one op each: a double block's attention residuals with its FFN norms (image, text),
    # its FFN residuals with the next double block's norms, a single block's residual with the next one's
    tr = st.transformer
    nd, ns = len(tr.transformer_blocks), len(tr.single_transformer_blocks)
    per_branch = 2 * nd + 2 * (nd - 1) + (ns - 1)
    assert fwd.n.get("dopsd_fast.residual_norm") == 2 * per_branch, fwd.n
    assert bwd.n.get("dopsd_fast.residual_norm_backward") == per_branch, bwd.n


def test_trainer_klein_fast_path_matches_eager_step(tmp_path):
    """One trainer step on tiny-klein, eager vs fast path: same loss, per-state losses, LoRA weights."""
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    klein = ["model.family=klein", "model.preset=tiny-klein", "model.student_max_tokens=160", "dopsd.rollout=klein-k4",
             "train.max_steps=1"]

    def run(sub, *extra):
        tr = Trainer(tiny_config(tmp_path / sub, *klein, *extra))
        m = tr.train_step()
        return m, {n: p.detach().clone() for n, p in tr.weights.named_trainable().items()}

    m_e, w_e = run("eager")
    m_f, w_f = run("fast", "fast.enabled=true")
    assert abs(m_f["loss"] - m_e["loss"]) <= 1e-5 * abs(m_e["loss"]) + 1e-9, (m_f["loss"], m_e["loss"])
    for n in w_e:
        assert_close(w_f[n], w_e[n], 1e-6, 1e-5, n)
    with pytest.raises(Exception, match="'fast.graphs': CUDA graphs need a CUDA device"):
        Trainer(tiny_config(tmp_path / "g", *klein, "fast.enabled=true", "fast.graphs=true", "model.device=cpu"))


def test_native_fp8_velocity_sqnr():
    """fast.fp8=native on FLUX.2-klein: the double and single blocks' linears through the FP8 GEMM
    (torch._scaled_mm, on the CPU too): bf16 velocities within >= 20 dB SQNR of bf16, both branches."""
    from dopsd_fast.fp8 import NativeFP8, sqnr_db
    from dopsd_fast.models.ops import FusedOps

    ad, st, ctx_s, ctx_t = _setup(True)
    bf = torch.bfloat16
    st.transformer.to(bf)
    for c in ctx_s + ctx_t:
        c.features = c.features.to(bf)
        c.extra = {k: v.to(bf) for k, v in c.extra.items()}
    x, sigma = torch.randn(1, 16, 6, 4).to(bf), torch.tensor([0.6])
    ref = _fast(st, FusedOps(attention="sdpa", gemm="cublas")).velocity_pair(x, sigma, ctx_s[:1], ctx_t[:1])
    fast = _fast(st, FusedOps(attention="sdpa", gemm="cublas"))
    fast.fp8_native = NativeFP8("rowwise")
    out = fast.velocity_pair(x, sigma, ctx_s[:1], ctx_t[:1])
    assert len(fast.fp8_native._w) >= 4, "the klein block linears did not take the FP8 path"
    for name, a, b in zip(("student", "teacher"), out, ref):
        db = sqnr_db(b.float(), a.float())
        print(f"klein fp8 native {name}: SQNR {db:.1f} dB over {len(fast.fp8_native._w)} linears")
        assert db >= 20.0 and not torch.equal(a, b), (name, db)


@pytest.mark.parametrize("lora", [True, False])
def test_checkpointed_blocks_same_gradients(lora):
    """Gradient checkpointing on the klein fast path (double blocks first, then single blocks; the
    student recomputed, the teacher alone without autograd): the same velocities and gradients as
    without, LoRA and full fine-tuning."""
    ad, st, ctx_s, ctx_t = _setup(lora)
    x, sigma = torch.randn(2, 16, 6, 4), torch.tensor([0.8, 0.3])
    cfg = st.transformer.config
    params = list(st.named_trainable().values())
    res = []
    for n in (0, 1, cfg.num_layers + cfg.num_single_layers):
        v_s, v_t = _fast(st, checkpoint_layers=n).velocity_pair(x, sigma, ctx_s, ctx_t)
        res.append((v_s.detach(), v_t, torch.autograd.grad(v_s.square().mean(), params, allow_unused=True)))
    for v_s, v_t, grads in res[1:]:
        assert_close(v_s, res[0][0], 1e-6, 1e-5, "student", scaled=True)
        assert_close(v_t, res[0][1], 1e-6, 1e-5, "teacher", scaled=True)
        for a, b in zip(grads, res[0][2]):
            if b is not None:
                assert_close(a, b, 1e-6, 1e-5, "checkpointed grad", scaled=True)


def test_fp8_module_dispatch():
    """fast.fp8=te / torchao on klein: the FP8 filter takes the double and single blocks' linears (their
    base layers under LoRA), and a converted base layer is called as a module by the paired linears with
    the LoRA delta on top: both branches still match the eager model. (The stand-in,
    conftest.fp8_standins, is an nn.Linear under torchao's class name: it checks the dispatch, not FP8
    numerics, which need an sm_89+ GPU.)"""
    from dopsd_fast.families import KLEIN
    from dopsd_fast.fp8 import fp8_module_filter

    ad, st, ctx_s, ctx_t = _setup(True)
    tr = st.transformer
    picked = [n for n, m in tr.named_modules() if fp8_module_filter(n, m, KLEIN)]
    assert picked and all(n.endswith(".base_layer") for n in picked)
    assert {n.split(".")[0] for n in picked} == {"transformer_blocks", "single_transformer_blocks"}
    assert not any("modulation" in n or "embed" in n or "norm_out" in n or "proj_out" in n for n in picked)
    fp8_standins(tr, picked)
    x, sigma = torch.randn(2, 16, 6, 4), torch.tensor([0.8, 0.3])
    fast = _fast(st)
    assert fast._fusable(["transformer_blocks.0.attn.to_q"]) is None  # the FP8 module route, not the fused op
    v_s, v_t = fast.velocity_pair(x, sigma, ctx_s, ctx_t)
    ref_s = ad.velocity(st.student(), x, sigma, ctx_s)
    assert_close(v_s, ref_s, 1e-5, 1e-4, "student via FP8-module dispatch", scaled=True)
    assert_close(v_t, ad.velocity(st.teacher(), x, sigma, ctx_t), 1e-5, 1e-4, "teacher via FP8-module dispatch",
                 scaled=True)
    assert_grads_match(v_s, ref_s, st.named_trainable(), 1e-5, 1e-4)


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_native_fp8_parity_rules(recipe, monkeypatch):
    """fast.fp8=native on FLUX.2-klein, each recipe, bf16: both velocities within SQNR >= 20 dB of the
    bf16 path; exactly the double and single blocks' linears that fp8_module_filter picks are quantized
    (embedders, modulation and the output layers stay bf16); the teacher's rows (with its reference
    image) stay out of autograd."""
    from dopsd_fast.families import KLEIN
    from dopsd_fast.fp8 import NativeFP8, fp8_module_filter, sqnr_db
    from dopsd_fast.models.ops import FusedOps

    # the fused element-wise ops through their PyTorch references (not Triton's interpreter: minutes on
    # the CPU); the paired linears and their FP8 GEMM (torch._scaled_mm) run as on the GPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    ad, st, ctx_s, ctx_t = _setup(True)
    bf = torch.bfloat16
    tr = st.transformer.to(bf)
    for c in ctx_s + ctx_t:
        c.features = c.features.to(bf)
        c.extra = {k: v.to(bf) for k, v in c.extra.items()}
    x, sigma = torch.randn(1, 16, 6, 4).to(bf), torch.tensor([0.6])
    ref = _fast(st, FusedOps(attention="sdpa", gemm="cublas")).velocity_pair(x, sigma, ctx_s[:1], ctx_t[:1])
    fast = _fast(st, FusedOps(attention="sdpa", gemm="cublas"))
    fast.fp8_native = NativeFP8(recipe)
    v_s, v_t = fast.velocity_pair(x, sigma, ctx_s[:1], ctx_t[:1])
    for name, a, b in zip(("student", "teacher"), (v_s, v_t), ref):
        db = sqnr_db(b.float(), a.float())
        assert db >= 20.0 and not torch.equal(a, b), f"klein {recipe} {name} velocity SQNR {db:.1f} dB"

    held = {id(hit[0]) for hit in fast.fp8_native._w.values()}
    quantized = {n for n, p in tr.named_parameters() if id(p) in held}
    picked = {n + ".weight" for n, m in tr.named_modules() if fp8_module_filter(n, m, KLEIN)}
    assert quantized == picked, sorted(quantized ^ picked)[:6]
    assert not any(k in n for n in quantized for k in ("modulation", "embed", "norm_out", "proj_out", "lora_"))

    assert not v_t.requires_grad and v_t.grad_fn is None
    params = list(st.named_trainable().values())
    g = torch.autograd.grad(v_s.float().square().mean(), params, allow_unused=True)
    assert any(x is not None and bool(x.any()) for x in g)
    assert all(p.grad is None for p in st.named_teacher().values())
