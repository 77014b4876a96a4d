"""The Z-Image adapter on the real diffusers / transformers classes at tiny size."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_close


@pytest.fixture(scope="module")
def adapter():
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.config import load_config

    return build_adapter(load_config(None).model)


def test_inference_schedule_matches_pipeline(adapter):
    # diffusers ZImagePipeline, 8 steps, shift 3 (shared/spec/dopsd.md)
    expected = [1, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    assert_close(torch.tensor(adapter.inference_sigmas()), torch.tensor(expected), atol=1e-4, name="sigmas")
    assert len(adapter.inference_sigmas(4)) == 5


def test_student_encoding_equals_pipeline(adapter):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    prompts = ["a [V] style dog", "a much longer prompt about a cat sitting on a red chair"]
    ours = adapter.encode_student(prompts)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler_config),
                          vae=adapter.vae, text_encoder=adapter.text_encoder, tokenizer=adapter.tokenizer,
                          transformer=adapter.transformer)
    ref = pipe._encode_prompt(list(prompts), device="cpu", max_sequence_length=512)
    for o, r in zip(ours, ref):
        assert o.features.shape == r.shape  # padding removed
        assert_close(o.features, r, atol=1e-5, rtol=1e-5, name="student features", scaled=True)


def test_student_truncation(adapter, monkeypatch, caplog):
    """A prompt past the context length is cut as the pipeline cuts it, and the run says so, once per
    context kind (it was silent: the prompt's end never reached the model)."""
    import logging

    monkeypatch.setattr(adapter, "_told", set(), raising=False)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        adapter.encode_student(["word " * 50])
        assert not caplog.records, caplog.text  # it fits: nothing said
        monkeypatch.setattr(adapter.cfg, "student_max_tokens", 10)
        assert adapter.encode_student(["word " * 50])[0].features.shape[0] == 10
        adapter.encode_student(["word " * 60])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "model.student_max_tokens=10" in said[0] and "'word word" in said[0], said
    monkeypatch.setattr(adapter.cfg, "teacher_max_tokens", 80)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        assert adapter.encode_teacher(["word " * 100], [torch.rand(3, 64, 64)])[0].features.shape[0] == 80
    said = [r.getMessage() for r in caplog.records if "teacher_max_tokens" in r.getMessage()]
    assert len(said) == 1 and "teacher context" in said[0], caplog.text


def test_teacher_context_contains_image(adapter):
    img = torch.rand(3, 128, 144)
    a = adapter.encode_teacher(["a [V] dog"], [img])[0].features
    b = adapter.encode_teacher(["a [V] dog"], [torch.rand(3, 128, 144)])[0].features
    s = adapter.encode_student(["a [V] dog"])[0].features
    assert a.shape[0] > s.shape[0] + 8  # image tokens + template, no padding
    assert a.shape == b.shape and not torch.allclose(a, b)  # the image matters
    again = adapter.encode_teacher(["a [V] dog"], [img])[0].features
    assert torch.equal(a, again)


def _patchify(image, patch_size, merge_size, temporal_patch_size):
    """Qwen2-VL's patch layout of one (C, H, W) image, as the processor lays it out: (gh * gw, C * T * P * P), the
    frame repeated T times (transformers >= 5.15's ``Qwen2VLImageProcessorPil.patchify``, written out here: the
    5.4 - 5.14 processors, which setup.py admits, lack the method)."""
    image = np.asarray(image, dtype=np.float32)
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    p = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    p = np.transpose(p, (1, 4, 2, 5, 0, 3, 6))
    p = np.broadcast_to(p[:, :, :, :, :, None], (*p.shape[:5], temporal_patch_size, *p.shape[5:]))
    return p.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size), gh, gw


def test_teacher_image_resized_in_float_like_the_authors_processor(adapter):
    """The VLM sees the target resized in floating point (bicubic, antialias: what the authors'
    torchvision processor does with a float tensor), never through an 8-bit image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = adapter.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    img = torch.rand(3, 40, 50)  # off the 8-bit grid, and not a multiple of patch x merge: resized
    rh, rw = smart_resize(40, 50, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size.shortest_edge,
                          max_pixels=ip.size.longest_edge)
    assert (rh, rw) != (40, 50)
    ref = torch.nn.functional.interpolate(img[None], size=(rh, rw), mode="bicubic", antialias=True,
                                          align_corners=False)[0]
    patches, gh, gw = _patchify(((ref - mean) / std).numpy(), ip.patch_size, ip.merge_size, ip.temporal_patch_size)
    pix = adapter.vlm_pixels(img)
    assert pix["image_grid_thw"].tolist() == [[1, gh, gw]]
    assert_close(pix["pixel_values"], torch.from_numpy(patches), 1e-6, 0, "pixel values", scaled=True)
    # already at a valid size: the values come back exactly (an 8-bit round trip is off by up to 1/510)
    img = torch.rand(3, 32, 40)
    pix = adapter.vlm_pixels(img)
    patches, _, _ = _patchify(((img - mean) / std).numpy(), ip.patch_size, ip.merge_size, ip.temporal_patch_size)
    assert (pix["pixel_values"] - torch.from_numpy(patches)).abs().max() < 1e-6


def test_velocity_convention(adapter):
    # Z-Image takes t = 1 - sigma and returns -v: the adapter must undo both.
    x = torch.randn(2, *adapter.latent_shape(128, 128))
    sigma = torch.tensor([0.9, 0.3])
    ctx = adapter.encode_student(["a", "b c"])
    v = adapter.velocity(adapter.transformer, x, sigma, ctx)
    raw = adapter.transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma,
                              [c.features for c in ctx], return_dict=False)[0]
    assert_close(v, -torch.stack(raw).squeeze(2), atol=1e-6, name="v", scaled=True)


def test_a_bf16_model_takes_the_timestep_in_fp32_as_the_pipeline_passes_it():
    """The eager call rounded 1 - sigma to the weights' dtype: in bf16, sigma 0.4732 reached the model as
    0.528 (the pipeline, and the fast path, pass 0.5268 in fp32); every sigma off bf16's grid (an 8-step
    schedule, validation, dopsd-sample) was moved."""
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.config import load_config

    ad = build_adapter(load_config(None).model)
    tr = ad.transformer.to(torch.bfloat16)
    seen = []
    tr.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    x = torch.randn(2, *ad.latent_shape(128, 128))
    sigma = torch.tensor([0.4732, 0.6429])
    ctx = ad.encode_student(["a", "b c"])
    v = ad.velocity(tr, x, sigma, ctx)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], 1 - sigma)
    raw = tr(list(x.bfloat16().unsqueeze(2).unbind(0)), 1 - sigma, [c.features.bfloat16() for c in ctx],
             return_dict=False)[0]
    assert torch.equal(v, -torch.stack(raw).squeeze(2))


def test_vae_roundtrip_shapes(adapter):
    img = torch.rand(1, 3, 128, 144)
    z = adapter.encode_images(img)
    assert z.shape == (1, 16, 16, 18) == (1, *adapter.latent_shape(128, 144))
    out = adapter.decode(z)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.latent_shape(120, 128)


def test_vlm_weight_swap_report_and_refusal(adapter):
    from transformers import Qwen3Config, Qwen3Model

    from dopsd_fast.adapters import tiny
    from dopsd_fast.adapters.zimage import WeightSwapError, swap_language_model

    rep = adapter.swap_report
    assert rep["missing"] == [] and rep["unexpected"] == [] and rep["shape_mismatch"] == []
    assert len(rep["matched"]) == len(adapter.text_encoder.state_dict())
    # the VLM's language model now carries exactly the text encoder's weights
    lm = adapter.vlm.language_model.state_dict()
    for k, v in adapter.text_encoder.state_dict().items():
        assert torch.equal(lm[k], v), k
    # a text encoder with another depth or width is refused, naming the problem
    wrong = Qwen3Model(Qwen3Config(**dict(tiny.TINY_TEXT, num_hidden_layers=3)))
    with pytest.raises(WeightSwapError, match="missing"):
        swap_language_model(adapter.vlm, wrong)
    wider = Qwen3Model(Qwen3Config(**dict(tiny.TINY_TEXT, intermediate_size=48)))
    with pytest.raises(WeightSwapError, match="other shapes"):
        swap_language_model(adapter.vlm, wider)


def test_load_from_local_directories(adapter, tmp_path):
    """The real-weights path: a diffusers-format directory + a Qwen3-VL directory on disk."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.config import load_config

    root = tmp_path / "zimage"
    adapter.transformer.save_pretrained(root / "transformer")
    adapter.vae.save_pretrained(root / "vae")
    adapter.text_encoder.save_pretrained(root / "text_encoder")
    adapter.tokenizer.save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(adapter.scheduler_config)))
    vlm_dir = tmp_path / "qwen3vl"
    full = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**adapter.vlm.config.to_dict()))
    full.model.load_state_dict(adapter.vlm.state_dict())
    full.save_pretrained(vlm_dir)
    adapter.tokenizer.save_pretrained(vlm_dir)
    adapter.image_processor.save_pretrained(vlm_dir)

    cfg = load_config(None, ["model.preset=null", f"model.path={root}", f"model.vlm_path={vlm_dir}",
                             "model.teacher_min_pixels=1024", "model.teacher_max_pixels=4096"])
    loaded = build_adapter(cfg.model)
    x = torch.randn(1, *adapter.latent_shape(128, 128))
    ctx = adapter.encode_student(["a [V] cat"])
    assert_close(loaded.encode_student(["a [V] cat"])[0].features, ctx[0].features, atol=1e-6, scaled=True)
    img = torch.rand(3, 128, 128)
    assert_close(loaded.encode_teacher(["a [V] cat"], [img])[0].features,
                 adapter.encode_teacher(["a [V] cat"], [img])[0].features, atol=1e-5, name="teacher")
    assert_close(loaded.velocity(loaded.transformer, x, torch.tensor([0.5]), ctx),
                 adapter.velocity(adapter.transformer, x, torch.tensor([0.5]), ctx), atol=1e-6)
    ident = loaded.encoder_identity()
    assert ident["weights"]["text_encoder"] and ident["settings"]["teacher_max_pixels"] == 4096

    # sampling encodes the student's prompts alone: no VLM loaded, no model.vlm_path needed; the teacher's
    # context then loads it (or says what is missing)
    student_only = load_config(None, ["model.preset=null", f"model.path={root}"])
    sampler = build_adapter(student_only.model, load_encoders=False)
    assert_close(sampler.encode_student(["a [V] cat"])[0].features, ctx[0].features, atol=1e-6, scaled=True)
    assert sampler.vlm is None and sampler.text_encoder is not None
    with pytest.raises(ValueError, match="model.vlm_path"):
        sampler.encode_teacher(["a [V] cat"], [img])
    lazy = build_adapter(cfg.model, load_encoders=False)
    lazy.encode_student(["a [V] cat"])
    assert lazy.vlm is None
    assert_close(lazy.encode_teacher(["a [V] cat"], [img])[0].features,
                 adapter.encode_teacher(["a [V] cat"], [img])[0].features, atol=1e-5, name="teacher, loaded late")

    # the SFT baseline reads the student's contexts alone: no VLM loaded, no model.vlm_path, and its cache
    # holds the student's contexts only
    from dopsd_fast.cli import cache_main
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    sft = ["method=sft", "model.preset=null", f"model.path={root}", "train.max_steps=1",
           "data.builtin=tiny", "data.bucket_scale=0.125", "data.prompt_keys=[prompt]"]
    tr = Trainer(tiny_config(tmp_path / "sft", *sft))
    assert tr.adapter.vlm is None and tr.adapter.text_encoder is not None
    assert tr.train_step()["loss"] > 0 and tr.validate() is not None and tr.adapter.vlm is None
    assert cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={tmp_path / 'sft-cache'}", "--set",
                       "train.progress=false"] + [x for kv in sft for x in ("--set", kv)]) == 0
    entries = json.loads((tmp_path / "sft-cache" / "manifest.json").read_text())["entries"]
    assert len(entries) == 6, entries  # 6 rows x 1 prompt, the student's contexts alone
    tr = Trainer(tiny_config(tmp_path / "sft2", *sft, f"cache.dir={tmp_path / 'sft-cache'}"))
    assert tr.train_step()["loss"] > 0
    # D-OPSD's dopsd-cache, with the VLM, extends the SFT run's cache (it holds no teacher context: its teacher
    # settings, the VLM's fingerprint None, become this run's), and a D-OPSD run reads it complete; a cache
    # whose kinds are not recorded (an earlier version's) is refused as before
    import shutil

    shutil.copytree(tmp_path / "sft-cache", tmp_path / "old-cache")
    old = json.loads((tmp_path / "old-cache" / "manifest.json").read_text())
    assert old.pop("kinds") == ["student"]
    (tmp_path / "old-cache" / "manifest.json").write_text(json.dumps(old))
    vlm = [f"model.vlm_path={vlm_dir}", "model.teacher_min_pixels=1024", "model.teacher_max_pixels=4096"]
    dopsd = [x for kv in sft[1:] + vlm for x in ("--set", kv)]
    assert cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={tmp_path / 'sft-cache'}", "--set",
                       "train.progress=false"] + dopsd) == 0
    extended = json.loads((tmp_path / "sft-cache" / "manifest.json").read_text())
    assert len(extended["entries"]) == 12 and extended["kinds"] == ["student", "teacher"]
    assert extended["identity"]["weights"]["vlm"]
    assert all(extended["entries"][k] == v for k, v in entries.items())  # the student's contexts kept
    tr = Trainer(tiny_config(tmp_path / "dopsd", *sft[1:], *vlm, f"cache.dir={tmp_path / 'sft-cache'}"))
    assert tr.train_step()["loss"] > 0
    with pytest.raises(SystemExit, match=r"differs in: .*weights.vlm"):
        cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={tmp_path / 'old-cache'}", "--set",
                    "train.progress=false"] + dopsd)
    # a D-OPSD run's cache (written with the VLM) serves an SFT run without model.vlm_path, and other
    # teacher settings (which SFT does not read) do not make it stale for SFT
    shared = ["--config", "tiny-zimage", "--set", f"cache.dir={tmp_path / 'shared'}", "--set", "train.progress=false"]
    teacher = [f"model.vlm_path={vlm_dir}", "model.teacher_min_pixels=1024", "model.teacher_max_pixels=4096"]
    assert cache_main(shared + [x for kv in sft[1:] + teacher for x in ("--set", kv)]) == 0
    tr = Trainer(tiny_config(tmp_path / "sft3", *sft, f"cache.dir={tmp_path / 'shared'}",
                             "model.teacher_max_tokens=77"))
    assert tr.train_step()["loss"] > 0 and tr.adapter.vlm is None

    # dopsd-cache reads neither the transformer's weights nor the VAE's (Z-Image's contexts use neither):
    # with both weight files made unreadable it encodes the same contexts, the transformer's config
    # (the context width) still there
    adapter_vae_bytes = next((root / "vae").glob("*.safetensors")).read_bytes()
    for sub in ("transformer", "vae"):
        for f in (root / sub).glob("*.safetensors"):
            f.write_bytes(b"not weights")
    with pytest.raises(Exception):
        build_adapter(cfg.model, load_encoders=False)
    enc = build_adapter(cfg.model, load_encoders=False, encoding_only=True)
    assert next(enc.transformer.parameters()).is_meta and next(enc.vae.parameters()).is_meta
    # dopsd-sample --transformer: the model's transformer weights not read (another replaces it), the VAE is
    for f in (root / "vae").glob("*.safetensors"):
        f.write_bytes(adapter_vae_bytes)
    swap = build_adapter(cfg.model, load_encoders=False, transformer_weights=False)
    assert next(swap.transformer.parameters()).is_meta and not next(swap.vae.parameters()).is_meta
    assert enc.transformer.config.cap_feat_dim == adapter.transformer.config.cap_feat_dim
    assert_close(enc.encode_teacher(["a [V] cat"], [img])[0].features,
                 adapter.encode_teacher(["a [V] cat"], [img])[0].features, atol=1e-5, name="teacher, cache's adapter")
    from dopsd_fast.cli import cache_main

    cache = tmp_path / "cache"
    assert cache_main(["--config", "tiny-zimage", "--set", "model.preset=null", "--set", f"model.path={root}",
                       "--set", f"model.vlm_path={vlm_dir}", "--set", "model.teacher_min_pixels=1024",
                       "--set", "model.teacher_max_pixels=4096", "--set", f"cache.dir={cache}",
                       "--set", "train.progress=false"]) == 0
    assert list(cache.glob("shard-*.safetensors"))

    bad = load_config(None, ["model.preset=null", f"model.path={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="model.path"):
        build_adapter(bad.model)


def test_import_is_lean():
    code = ("import sys, dopsd_fast; heavy = [m for m in ('diffusers', 'transformers', 'peft', 'transformer_engine', "
            "'flash_attn', 'torchao', 'triton') if m in sys.modules]; "
            "import torch; assert not torch.cuda.is_initialized(); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_vlm_weight_swap_runs_once_at_start_up(caplog):
    """Building an adapter with its encoders swaps the text encoder's weights into the VLM exactly once
    (the toy preset's builder and the adapter once both did it), and encoding does not swap again."""
    import logging

    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.families.zimage.toy import WEIGHTS_DIR

    presets = ["tiny-zimage"] + (["toy-zimage"] if (WEIGHTS_DIR / "text_encoder.safetensors").is_file() else [])
    for preset in presets:
        cfg = load_config(None, ["model.family=zimage", f"model.preset={preset}", "model.device=cpu"])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dopsd_fast"):
            adapter = build_adapter(cfg.model, load_encoders=True)
            adapter.ensure_encoders()
            adapter.encode_student(["a red square"])
        swaps = [r for r in caplog.records if r.getMessage().startswith("VLM weight swap")]
        assert len(swaps) == 1, (preset, [r.getMessage() for r in swaps])
        assert adapter.swap_report["matched"] and not adapter.swap_report["missing"], preset


def test_the_position_range_is_checked_where_the_model_would_fail(adapter):
    """Z-Image's RoPE tables (axes_lens) bound the context length and the image size: one past either
    is an IndexError deep in the transformer, at the first long prompt or large image of a run. The
    adapter names the setting instead, at the bound the transformer really has."""
    from dopsd_fast.config import ConfigError, load_config

    tr = adapter.transformer
    limit = adapter.context_limit()
    f = adapter.vae_scale_factor * 2
    _, rows, cols = tr.config.axes_lens
    t = torch.tensor([0.5])

    def run(tokens, h, w):  # the transformer alone, at a context length and a latent size
        x = [torch.randn(tr.config.in_channels, 1, h, w)]
        return tr(x, t, [torch.randn(tokens, tr.config.cap_feat_dim)], return_dict=False)

    with torch.no_grad():
        run(limit, 2, 2)
        with pytest.raises(IndexError):
            run(limit + 1, 2, 2)
        run(8, 2, 2 * cols)
        with pytest.raises(IndexError):
            run(8, 2, 2 * (cols + 1))
    assert adapter.latent_shape(f, cols * f)[-1] == 2 * cols
    for h, w in ((f, (cols + 1) * f), ((rows + 1) * f, f)):
        with pytest.raises(ValueError, match=rf"image size {w}x{h} is past Z-Image's position range: at most "
                                             rf"{cols * f}x{rows * f} pixels"):
            adapter.latent_shape(h, w)

    cfg = load_config(None, [f"model.teacher_max_tokens={limit + 1}"]).model
    saved = adapter.cfg
    try:
        adapter.cfg = cfg
        adapter.check_settings(teacher=False)  # sampling: the student alone
        with pytest.raises(ConfigError, match=rf"'model.teacher_max_tokens': {limit + 1} is past the model's "
                                              rf"position range: contexts of at most {limit} tokens"):
            adapter.check_settings(teacher=True)
        adapter.cfg = load_config(None, [f"model.student_max_tokens={limit + 1}"]).model
        with pytest.raises(ConfigError, match=r"'model.student_max_tokens'"):
            adapter.check_settings(teacher=False)
        adapter.cfg = load_config(None, [f"model.teacher_max_tokens={limit}"]).model
        adapter.check_settings(teacher=True)
    finally:
        adapter.cfg = saved


def test_a_run_past_the_position_range_stops_at_start_up(tmp_path):
    from dopsd_fast.cli import train_main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as ex:
        train_main(["--config", "tiny-zimage", "--set", f"train.output_dir={out}", "--set",
                    "model.teacher_max_tokens=4000"])
    assert str(ex.value.code).startswith("error: config field 'model.teacher_max_tokens': 4000 is past"), ex.value.code
    assert not (out / "checkpoints").exists()


def test_the_teachers_bound_is_checked_where_a_teacher_is_encoded_and_the_sample_size_names_its_flags(adapter, tmp_path):
    """SFT encodes no teacher context: its teacher_max_tokens is not refused. dopsd-sample's size past the
    range names --width / --height, before the encoder or a LoRA is read."""
    from dopsd_fast.config import ConfigError, load_config
    from dopsd_fast.families import check_buckets
    from dopsd_fast.sample import generate

    saved = adapter.cfg
    try:
        adapter.cfg = load_config(None, ["model.teacher_max_tokens=4000"]).model
        check_buckets(adapter, sizes=[(64, 64)], teacher=False)
        with pytest.raises(ConfigError, match="'model.teacher_max_tokens'"):
            check_buckets(adapter, sizes=[(64, 64)], teacher=True)
    finally:
        adapter.cfg = saved
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match=r"^--width / --height: image size 8208x16 is past Z-Image's position range"):
        generate(cfg, ["a dog"], width=8208, height=16, lora=str(tmp_path / "not-read"), out=str(tmp_path / "x.png"))
