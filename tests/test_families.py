"""The family registry is the one place that knows the families; the pair protocol is the one seam
between the step and a model."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BRANCH_ON_FAMILY = re.compile(r"""family\s*(==|!=)|(==|!=)\s*["'](zimage|klein)["']|family\s+(not\s+)?in\s*[\(\[]""")


def test_no_family_comparisons_outside_the_registry():
    """No code compares family names outside dopsd_fast/families/ (assertions in tests that check
    what a config loaded excepted); and no lambda assigned to a name in the fast models' block code."""
    offenders = []
    for d in ("dopsd_fast", "benchmarks", "kernels", "tests"):
        for f in sorted((ROOT / d).rglob("*.py")):
            if (ROOT / "dopsd_fast" / "families") in f.parents or f == Path(__file__).resolve():
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if BRANCH_ON_FAMILY.search(code) and not code.strip().startswith("assert"):
                    offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "family comparisons outside the registry:\n" + "\n".join(offenders)
    for f in ("dopsd_fast/families/zimage/fast.py", "dopsd_fast/families/klein/fast.py", "dopsd_fast/models/paired.py"):
        assert "noqa: E731" not in (ROOT / f).read_text(), f


def test_the_grep_catches_a_family_branch():
    """The check above can fail: the patterns match the forms the code used to have."""
    for bad in ('if cfg.model.family == "klein":', 'x = 1 if self.family != "zimage" else 2',
                'if family in ("zimage", "klein"):', 'if spec.name == "klein":'):
        assert BRANCH_ON_FAMILY.search(bad), bad
    assert not BRANCH_ON_FAMILY.search("spec = family(cfg.model.family)")


def test_unsupported_combinations_refused_when_the_config_is_validated():
    """Before any weight is loaded: klein takes every fast feature (graphs, FP8 of all kinds,
    checkpointing, compile); a family without one refuses it naming the field; a klein schedule is not
    a Z-Image one, an unknown preset or family is named."""
    from dataclasses import replace

    from dopsd_fast.config import ConfigError, load_config
    from dopsd_fast.families import FAST_FEATURES, KLEIN

    klein = KLEIN.tiny_overrides()
    assert KLEIN.fast_features == frozenset(FAST_FEATURES)
    for over in (["fast.graphs=true"], ["fast.fp8=native"], ["fast.fp8=torchao"], ["fast.fp8=te"],
                 ["fast.checkpoint=all"], ["fast.compile=true"]):
        cfg = load_config(None, klein + ["fast.enabled=true"] + over)
        KLEIN.validate(cfg)
    partial = replace(KLEIN, fast_features=frozenset({"kernels", "attention"}))
    with pytest.raises(ConfigError, match=re.escape("'fast.graphs': not implemented on the FLUX.2-klein fast path")):
        partial.validate(load_config(None, klein + ["fast.enabled=true", "fast.graphs=true"]))
    with pytest.raises(ConfigError, match="not a Z-Image schedule"):
        load_config(None, ["dopsd.rollout=klein-k2"])
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(None, ["model.preset=tiny-klein"])
    with pytest.raises(ConfigError, match="model.family"):
        load_config(None, ["model.family=sd3"])


def test_flavours_build_and_match_the_spec():
    """Every tiny flavour builds the real diffusers class; the default LoRA targets match modules;
    the memory shape and token counts come from the spec."""
    from dopsd_fast.families import FAMILIES, flavour

    for spec in FAMILIES.values():
        cfg = spec.flavour_config(spec.tiny_preset)
        tr = spec.diffusers_class()(**cfg)
        names = [n for n, _ in tr.named_modules()]
        for t in spec.default_lora_targets(cfg):
            assert any(n == t or n.endswith("." + t) for n in names), (spec.name, t)
        width, layers = spec.memory_layers(tr.config)
        assert width > 0 and sum(layers.values()) > 0
        assert spec.fast_model_class().__name__.startswith("Fast")
        assert spec.adapter_class().spec is spec
        lat = spec.latent_shape(cfg, 128)
        assert spec.image_tokens(lat[1:]) > 0
        assert flavour(spec.tiny_preset)[0] is spec
    assert FAMILIES["klein"].teacher_image_tokens(10) == 20 and FAMILIES["zimage"].teacher_image_tokens(10) == 10


@pytest.mark.parametrize("name", ["zimage", "klein"])
def test_convention_written_once_matches_the_adapter(name):
    """The spec's convention, applied to a raw diffusers call, is what the adapter's velocity returns;
    sigma_of inverts model_time."""
    from dopsd_fast.config import load_config
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.families import FAMILIES

    spec = FAMILIES[name]
    sigma = torch.tensor([0.9, 0.3])
    assert torch.allclose(spec.convention.sigma_of(spec.convention.model_time(sigma)), sigma)
    cfg = load_config(None, spec.tiny_overrides() + ["model.device=cpu"])
    ad = build_adapter(cfg.model, load_encoders=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *spec.latent_shape(ad.transformer.config, 64), generator=g)
    ctx_s, _ = spec.random_contexts(ad.transformer.config, x.shape[1:], 8, 8, 2, g, "cpu", torch.float32)
    v = ad.velocity(ad.transformer, x, sigma, ctx_s)
    torch.testing.assert_close(v, spec.eager_velocity(ad.transformer, x, sigma, ctx_s))
    if spec.convention.output_is_minus_v:  # Z-Image by hand: t = 1 - sigma, the output is -v
        out = ad.transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, [c.features for c in ctx_s],
                             return_dict=False)[0]
        torch.testing.assert_close(v, -torch.stack(out).squeeze(2))
    else:  # FLUX.2: timestep = sigma, v as returned; a different sigma gives a different v
        assert spec.convention.model_time(sigma) is not None and torch.equal(spec.convention.model_time(sigma), sigma)
        assert not torch.allclose(v, ad.velocity(ad.transformer, x, sigma.flip(0), ctx_s))


@pytest.mark.parametrize("name", ["zimage", "klein"])
def test_sft_through_the_protocol_fast_equals_eager(tmp_path, name):
    """method=sft calls pair.velocity("student", ...) with autograd, so it runs on the fast path too:
    one step, fast vs eager, same loss and LoRA weights (fp32)."""
    from dopsd_fast.families import FAMILIES
    from dopsd_fast.pair import EagerPair
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    fam = FAMILIES[name].tiny_overrides() if name != "zimage" else []
    runs = {}
    for path, extra in (("eager", []), ("fast", ["fast.enabled=true"])):
        tr = Trainer(tiny_config(tmp_path / path, "method=sft", "model.device=cpu", *fam, *extra))
        assert isinstance(tr.pair, EagerPair) == (path == "eager")
        m = tr.train_step()
        runs[path] = (m["loss"], {n: p.detach().clone() for n, p in tr.weights.named_trainable().items()})
    assert runs["fast"][0] == pytest.approx(runs["eager"][0], rel=1e-5)
    moved = 0
    for n, w in runs["eager"][1].items():
        torch.testing.assert_close(runs["fast"][1][n], w, atol=1e-6, rtol=1e-5)
        moved += 1
    assert moved > 0
