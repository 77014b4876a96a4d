"""FLUX.2-klein adapter (tiny real classes): prompt encoding, latents, the editing-branch teacher's
token layout against Flux2KleinPipeline's own reference-image packing, training steps, the cache,
and the exported LoRA loading into the diffusers pipeline."""

import torch

from dopsd_fast.config import load_config
from tests.conftest import assert_close, tiny_config


def _adapter():
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.config import load_config

    cfg = load_config("configs/tiny-klein.yaml")
    return build_adapter(cfg.model)


def _pipeline(ad):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    sched = FlowMatchEulerDiscreteScheduler.from_config(ad.scheduler_config)
    return Flux2KleinPipeline(scheduler=sched, vae=ad.vae, text_encoder=ad.text_encoder, tokenizer=ad.tokenizer,
                              transformer=ad.transformer, is_distilled=True)


def test_prompt_latents_and_teacher_layout_match_the_pipeline():
    ad = _adapter()
    pipe = _pipeline(ad)
    L = ad.cfg.student_max_tokens
    # prompt encoding == the pipeline's (layers stacked, padded to L)
    emb, txt_ids = pipe.encode_prompt(["a red circle"], device="cpu", max_sequence_length=L,
                                      text_encoder_out_layers=ad.text_layers)
    ctx = ad.encode_student(["a red circle"])[0]
    assert_close(ctx.features, emb[0], 1e-6, 1e-6, "prompt features", scaled=True)
    # target image -> reference latents and ids == pipeline.prepare_image_latents
    img = torch.rand(3, 128, 96)
    ref_lat, ref_ids = pipe.prepare_image_latents([img[None] * 2 - 1], batch_size=1, generator=None, device="cpu",
                                                  dtype=torch.float32)
    tctx = ad.encode_teacher(["a red circle"], [img])[0]
    from dopsd_fast.adapters.klein import image_ids, pack

    assert_close(pack(tctx.extra["ref0"][None])[0], ref_lat[0], 1e-5, 1e-5, "reference tokens", scaled=True)
    assert torch.equal(image_ids(8, 6, t=10), ref_ids[0]), "reference ids (time coordinate 10)"
    # the noisy latents' ids == the pipeline's
    x = torch.randn(1, 16, 8, 6)
    assert torch.equal(image_ids(8, 6), pipe._prepare_latent_ids(x)[0])
    # teacher velocity == the pipeline's denoiser call: [x ; reference] tokens, output sliced to x's
    sigma = torch.tensor([0.7])
    t_emb, _ = pipe.encode_prompt([ad.teacher_prompt("a red circle")], device="cpu", max_sequence_length=L,
                                  text_encoder_out_layers=ad.text_layers)
    with torch.no_grad():
        ref_out = ad.transformer(hidden_states=torch.cat([pack(x), ref_lat], 1), timestep=sigma,
                                 encoder_hidden_states=t_emb, txt_ids=txt_ids, guidance=None,
                                 img_ids=torch.cat([pipe._prepare_latent_ids(x), ref_ids], 1),
                                 return_dict=False)[0][:, :48]
        v = ad.velocity(ad.transformer, x, sigma, [tctx])
    assert_close(pack(v), ref_out, 1e-5, 1e-5, "editing-branch teacher velocity", scaled=True)
    # the student (no reference) differs from the teacher: the context matters
    with torch.no_grad():
        vs = ad.velocity(ad.transformer, x, sigma, [ctx])
    assert (vs - v).abs().max() > 1e-4


def test_training_schedule_uses_the_empirical_mu():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    ad = _adapter()
    s64 = ad.training_sigmas("klein-k4", (8, 8))
    s4096 = ad.training_sigmas("klein-k4", (64, 64))
    assert len(s64) == 5 and s64[-1] == 0.0 and s64[0] == 1.0 and s64 != s4096
    mu = compute_empirical_mu(64, 4)
    s = 0.75  # second base sigma of linspace(1, 1/4, 4): exponential time shift with mu
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / s - 1))
    assert abs(s64[1] - float(expected)) < 1e-5


def test_klein_training_cache_and_lora_export(tmp_path):
    """Two D-OPSD steps on tiny-klein from the feature cache (the encoders never loaded), then the
    exported LoRA loads into Flux2KleinPipeline and reproduces the student's velocity."""
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.cache import FeatureCache
    from dopsd_fast.data import build_dataset
    from dopsd_fast.trainer import Trainer

    over = ["model.family=klein", "model.preset=tiny-klein", "model.student_max_tokens=160", "dopsd.rollout=klein-k4",
            f"cache.dir={tmp_path / 'cache'}", "train.max_steps=2"]
    cfg = tiny_config(tmp_path, *over)
    adapter = build_adapter(cfg.model, load_encoders=False)
    cache = FeatureCache(cfg.cache.dir, adapter.encoder_identity(), create=True)
    assert cache.write(adapter, build_dataset(cfg.data, progress=False), progress=False) > 0
    tr = Trainer(cfg)
    assert tr.adapter.text_encoder is None  # contexts come from the cache
    # a received cache is untrusted: a reference latent of another size than its row's bucket (or one the
    # row does not have) is named at start-up, where it trained silently on the wrong reference
    import shutil

    import pytest
    from safetensors.torch import load_file, save_file

    from dopsd_fast.cache import CacheError

    for name, edit, match in (("ref0", lambda t: torch.randn(t.shape[0], t.shape[1] + 1, t.shape[2]),
                               r"its ref0 has shape \(\d+, \d+, \d+\); its reference 0, at its bucket \d+x\d+, is "),
                              ("ref5", lambda t: t.clone(), r"its ref5 is a reference latent the context does not have")):
        bad = tmp_path / f"cache-{name}"
        shutil.copytree(cache.dir, bad)
        shard = sorted(bad.glob("shard-*.safetensors"))[0]
        sd = load_file(shard)
        key = next(k for k in sorted(sd) if k.endswith(".extra.ref0"))
        sd[key.replace(".ref0", f".{name}")] = edit(sd[key])
        save_file(sd, shard)
        with pytest.raises(CacheError, match=rf"feature cache {bad}: shard {shard.name}: the context of .*: {match}"):
            Trainer(tiny_config(tmp_path / f"r-{name}", *over[:-2], f"cache.dir={bad}", "train.max_steps=2"))
    losses = [tr.train_step()["loss"] for _ in range(2)]
    assert all(l > 0 for l in losses)
    tr.export_lora()

    ad = _adapter()
    pipe = _pipeline(ad)
    pipe.load_lora_weights(str(tr.out / "lora"))
    s = tr.dataset.get(0, prompt_index=0)
    ctx = tr.contexts.student([s])
    x = torch.randn(1, *tr.adapter.latent_shape(*s.record.bucket[::-1]))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        mine = tr.adapter.velocity(tr.weights.student(), x, sigma, ctx)
        theirs = ad.velocity(pipe.transformer, x, sigma, ctx)
    assert_close(theirs, mine, 1e-5, 1e-4, "student velocity through the exported LoRA", scaled=True)


def test_sft_baseline_steps_both_families(tmp_path):
    """method: sft trains on the target latents (loss decreases over a few steps at a high LR) for
    Z-Image and klein; only the method line differs from a D-OPSD run."""
    from dopsd_fast.trainer import Trainer

    for fam in (["model.family=zimage", "model.preset=tiny-zimage"],
                ["model.family=klein", "model.preset=tiny-klein", "model.student_max_tokens=160",
                 "dopsd.rollout=klein-k4"]):
        cfg = tiny_config(tmp_path / fam[1], "method=sft", "optim.lr=1e-2", "train.max_steps=12", *fam)
        tr = Trainer(cfg)
        m = [tr.train_step() for _ in range(12)]
        assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m)
        first, last = sum(x["loss"] for x in m[:3]) / 3, sum(x["loss"] for x in m[-3:]) / 3
        assert last < first, (fam[1], first, last)
        assert set(m[0]) >= {"loss", "grad_norm", "lr", "loss_state/0"}


def test_sft_sigma_sampling_follows_the_shift():
    ad = _adapter()
    s = torch.tensor([0.25, 0.5, 0.75])
    mu = ad.dynamic_mu((8, 8))
    assert_close(ad.shift_sigmas(s, (8, 8)), torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1 / s - 1),
                 1e-6, 1e-6, "klein exponential shift")
    from dopsd_fast.adapters.zimage import ZImageAdapter

    z = ZImageAdapter.__new__(ZImageAdapter)
    z.scheduler_config = {"shift": 3.0, "use_dynamic_shifting": False}
    assert_close(z.shift_sigmas(s), 3 * s / (1 + 2 * s), 1e-7, 1e-7, "Z-Image static shift 3")


def _editing_data(tmp_path, rows=None):
    import json

    from PIL import Image

    cols = {"a": (200, 40, 40), "b": (40, 200, 40), "c": (40, 40, 200), "d": (200, 200, 40)}
    for n, c in cols.items():
        Image.new("RGB", (128, 128), c).save(tmp_path / f"{n}.png")
    rows = rows or [{"references": ["a.png"], "target": "b.png", "prompt": "make the red square green"},
                    {"image": ["c.png", "a.png", "d.png"], "prompt": "blend the blue and red squares into yellow"}]
    p = tmp_path / "edit.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_editing_rows_parse_both_forms_and_bad_rows_are_named(tmp_path, caplog):
    import logging

    import pytest

    from dopsd_fast.config import load_config
    from dopsd_fast.data import DataError, build_dataset

    p = _editing_data(tmp_path)
    cfg = load_config(None, [f"data.jsonl={p}", "data.builtin=null", "data.bucket_scale=0.125", "data.prompt_keys=[prompt]"]).data
    ds = build_dataset(cfg, progress=False)
    assert [len(r.reference_paths) for r in ds.records] == [1, 2]
    assert ds.records[0].image_path.endswith("b.png") and ds.records[1].image_path.endswith("d.png")
    s = ds.get(1, prompt_index=0)
    assert len(s.references) == 2 and s.references[0].shape[0] == 3
    bad = {
        "field 'references' must be a list": {"references": "a.png", "target": "b.png", "prompt": "x"},
        "both 'image' and 'target'": {"image": "a.png", "target": "b.png", "prompt": "x"},
        "'references' given without 'target'": {"references": ["a.png"], "prompt": "x"},
        "field 'references\\[0\\]': image file not found": {"references": ["zzz.png"], "target": "b.png",
                                                            "prompt": "x"},
        "field 'target': image file not found": {"references": ["a.png"], "target": "zzz.png", "prompt": "x"},
        "field 'image\\[1\\]': image file not found": {"image": ["a.png", "zzz.png", "b.png"], "prompt": "x"},
        "field 'image\\[2\\]': image file not found": {"image": ["a.png", "b.png", "zzz.png"], "prompt": "x"},
    }
    for msg, row in bad.items():
        q = _editing_data(tmp_path, [row])
        c = load_config(None, [f"data.jsonl={q}", "data.builtin=null", "data.bucket_scale=0.125", "data.prompt_keys=[prompt]"]).data
        with pytest.raises(DataError, match=msg) as e:
            build_dataset(c, progress=False)
        assert "edit.jsonl:1" in str(e.value)
    # a 'target' row without references trains as text-to-image (the editing-branch teacher), as before:
    # said, not silent (the teacher's mode follows each row)
    q = _editing_data(tmp_path, [{"references": [], "target": "b.png", "prompt": "x"},
                                 {"target": "a.png", "prompt": "y"}])
    c = load_config(None, [f"data.jsonl={q}", "data.builtin=null", "data.bucket_scale=0.125",
                           "data.prompt_keys=[prompt]"]).data
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        ds = build_dataset(c, progress=False)
    assert [r.reference_paths for r in ds.records] == [[], []]
    assert "2 'target' rows name no references (first: " in caplog.text and "edit.jsonl:1" in caplog.text


def test_gt_reference_contexts_layout_and_training(tmp_path):
    from dopsd_fast.adapters.klein import image_ids, pack
    from dopsd_fast.data import DataError
    from dopsd_fast.trainer import Trainer

    p = _editing_data(tmp_path)
    base = [f"data.jsonl={p}", "data.builtin=null", "data.prompt_keys=[prompt]", "train.max_steps=2"]
    with pytest_raises(DataError, "no editing mode"):
        Trainer(tiny_config(tmp_path / "z", *base))
    klein = ["model.family=klein", "model.preset=tiny-klein", "model.student_max_tokens=160", "dopsd.rollout=klein-k4",
             f"cache.dir={tmp_path / 'cache'}"]
    cfg = tiny_config(tmp_path / "k", *base, *klein)
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.cache import FeatureCache
    from dopsd_fast.data import build_dataset

    ad = build_adapter(cfg.model, load_encoders=False)
    FeatureCache(cfg.cache.dir, ad.encoder_identity(), create=True).write(ad, build_dataset(cfg.data, progress=False),
                                                                          progress=False)
    tr = Trainer(cfg)
    s = tr.dataset.get(1, prompt_index=0)
    cs, ct = tr.contexts.student([s])[0], tr.contexts.teacher([s])[0]
    assert sorted(cs.extra) == ["ref0", "ref1"] and sorted(ct.extra) == ["ref0", "ref1", "ref2"]
    target = tr.adapter.encode_images(s.image[None])[0]
    assert_close(ct.extra["ref2"], target, 1e-6, 1e-6, "the target is the teacher's last reference", scaled=True)
    assert_close(ct.extra["ref0"], cs.extra["ref0"], 1e-6, 1e-6, "the row's references come first", scaled=True)
    # the DiT call: references at time coordinates 10, 20, 30 (the pipeline's _prepare_image_ids)
    from diffusers import Flux2KleinPipeline

    ids = Flux2KleinPipeline._prepare_image_ids([ct.extra[f"ref{i}"][None] for i in range(3)])[0]
    x = torch.randn(1, *target.shape)
    sigma = torch.tensor([0.5])
    tf = tr.weights.teacher()
    from dopsd_fast.adapters.klein import text_ids

    with torch.no_grad():
        ref = tf(hidden_states=torch.cat([pack(x)] + [pack(ct.extra[f"ref{i}"][None]) for i in range(3)], 1),
                 encoder_hidden_states=ct.features[None], timestep=sigma, guidance=None,
                 img_ids=torch.cat([image_ids(*target.shape[-2:]), ids]), txt_ids=text_ids(ct.features.shape[0]),
                 return_dict=False)[0][:, :x[0, 0].numel()]
        v = tr.adapter.velocity(tf, x, sigma, [ct])
    tr.weights.student()
    assert_close(pack(v), ref, 1e-5, 1e-5, "gt-reference teacher velocity", scaled=True)
    m = [tr.train_step() for _ in range(2)]
    assert all(x["loss"] > 0 for x in m)


def pytest_raises(exc, match):
    import pytest

    return pytest.raises(exc, match=match)


def test_klein_validation_grid(tmp_path):
    from PIL import Image

    from dopsd_fast.trainer import Trainer

    cfg = tiny_config(tmp_path, "model.family=klein", "model.preset=tiny-klein", "model.student_max_tokens=160",
                      "dopsd.rollout=klein-k4", "validation.num_samples=1")
    tr = Trainer(cfg)
    path = tr.validate()
    with Image.open(path) as im:
        w, h = im.size
    assert w >= 3 * 128 and h >= 128  # target, student, teacher columns at the bucket size


def test_local_klein_directory_loads(tmp_path):
    """model.path: a diffusers-layout klein directory (written from the tiny parts) loads, with a
    named error when a part is missing."""
    import pytest

    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.config import load_config

    ad = _adapter()
    pipe = _pipeline(ad)
    pipe.save_pretrained(tmp_path / "klein")
    cfg = load_config("configs/tiny-klein.yaml", ["model.preset=null", f"model.path={tmp_path / 'klein'}",
                                                  "model.text_layers=[1, 2, 3]"])
    loaded = build_adapter(cfg.model)
    assert loaded.text_layers == (1, 2, 3)
    from dopsd_fast.errors import ConfigError

    far = load_config("configs/tiny-klein.yaml", ["model.preset=null", f"model.path={tmp_path / 'klein'}",
                                                 "model.text_layers=[1, 2, 99]"])
    with pytest.raises(ConfigError, match=r"\[99\] not among"):  # from the folder's config, no encoder loaded
        build_adapter(far.model, load_encoders=False)
    ctx = loaded.encode_student(["a red circle"])[0]
    assert_close(ctx.features, ad.encode_student(["a red circle"])[0].features, 1e-6, 1e-6, "features", scaled=True)
    # dopsd-cache: the transformer's weights are never read (unreadable here), the VAE's are (the
    # teacher's target enters as reference latents): the same contexts
    for f in (tmp_path / "klein" / "transformer").glob("*.safetensors"):
        f.write_bytes(b"not weights")
    enc = build_adapter(cfg.model, load_encoders=False, encoding_only=True)
    assert next(enc.transformer.parameters()).is_meta and not next(enc.vae.parameters()).is_meta
    img = torch.rand(3, 64, 64)
    want, got = ad.encode_teacher(["a red circle"], [img])[0], enc.encode_teacher(["a red circle"], [img])[0]
    assert_close(got.features, want.features, 1e-6, 1e-6, "teacher features", scaled=True)
    assert_close(got.extra["ref0"], want.extra["ref0"], 1e-5, 1e-5, "the target's reference latents")
    import shutil

    shutil.rmtree(tmp_path / "klein" / "vae")
    with pytest.raises(FileNotFoundError, match="'vae/'"):
        build_adapter(cfg.model)


def test_authors_variants_schedule_instructions_and_lora_targets(tmp_path):
    """The authors' klein choices, each one config line away: their training roll-out (set_timesteps
    without sigmas), their instruction texts, and their LoRA target names (which in diffusers' Flux2
    reach the double blocks' attention only)."""
    from dopsd_fast.adapters.klein import AUTHORS_GT_INSTRUCTION, AUTHORS_TEACHER_INSTRUCTION
    from dopsd_fast.trainer import Trainer

    ad = _adapter()
    ours = ad.training_sigmas("klein-k4", (64, 64))  # 1024^2: the pipeline's 4-step inference schedule
    theirs = ad.training_sigmas("klein-k4-authors", (64, 64))
    assert_close(torch.tensor(ours), torch.tensor([1.0, 0.967, 0.908, 0.767, 0.0]), 1e-3)
    assert_close(torch.tensor(theirs), torch.tensor([1.0, 0.952, 0.832, 0.0098, 0.0]), 1e-3)

    cfg = load_config("configs/tiny-klein.yaml", ["model.teacher_instruction=authors", "model.gt_instruction=authors"])
    from dopsd_fast.adapters import build_adapter

    ad2 = build_adapter(cfg.model)
    assert ad2.teacher_prompt("a [V] dog") == f"a [V] dog {AUTHORS_TEACHER_INSTRUCTION}"
    assert ad2.gt_instruction == AUTHORS_GT_INSTRUCTION
    assert ad2.encoder_identity() != ad.encoder_identity()  # a cache of the other text is refused

    losses = {}
    for fast in ("false", "true"):
        tr = Trainer(tiny_config(tmp_path / fast, "model.family=klein", "model.preset=tiny-klein",
                                 "dopsd.rollout=klein-k4-authors", "lora.targets=authors", "train.max_steps=1",
                                 f"fast.enabled={fast}"))
        names = list(tr.weights.named_trainable())
        assert names and all(n.startswith("transformer_blocks.") and ".attn." in n for n in names), names[:5]
        assert not any(".ff" in n or "single_transformer_blocks" in n for n in names)
        losses[fast] = tr.train_step()["loss"]
    assert abs(losses["true"] - losses["false"]) <= 1e-5 * abs(losses["false"])


def test_a_long_teacher_prompt_keeps_its_instruction(caplog):
    """The teacher prompt (prompt + instruction) was cut from the right at model.student_max_tokens, so a
    long prompt lost the instruction (the teacher's mode) and the chat template's end, silently. Now its
    prompt part is cut, the instruction and template kept, and the run says so once."""
    import logging

    ad = _adapter()
    L = ad.cfg.student_max_tokens
    short = "a red circle"
    assert ad.teacher_prompt(short) == f"{short} {ad.teacher_instruction}"  # fits: as before
    long = " ".join(f"word{i}" for i in range(L))
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        fitted = ad.teacher_prompt(long)
        ad.teacher_prompt(long + " again")
    assert fitted.endswith(ad.teacher_instruction) and fitted.startswith("word0 word1")
    ids = ad.tokenizer(ad._template(fitted)).input_ids
    assert L - 8 <= len(ids) <= L, (len(ids), L)  # as much of the prompt as fits
    assert ad.tokenizer.decode(ids).endswith(ad._template("x").split("x")[-1]), "the template's end is kept"
    said = [r for r in caplog.records if "prompt's end is cut" in r.getMessage()]
    assert len(said) == 1, caplog.text
    gt = ad.encode_teacher([long], [torch.rand(3, 64, 64)], references=[[torch.rand(3, 64, 64)]])[0]
    want = ad.encode_prompts([ad._fit(long, ad.gt_instruction)])[0]
    assert_close(gt.features, want, 0, 0, "gt-reference teacher: its instruction kept too")
    assert ad._fit(long, ad.gt_instruction).endswith(ad.gt_instruction)


def test_a_student_prompt_past_the_context_length_is_said_once(caplog, monkeypatch):
    """klein pads and cuts every prompt to model.student_max_tokens; a longer one lost its end silently. The
    teacher's prompts (encoded by the same function) do not take the student's one line."""
    import logging

    ad = _adapter()
    monkeypatch.setattr(ad.cfg, "teacher_instruction", "")  # the teacher's prompt is the prompt, not fitted
    L = ad.cfg.student_max_tokens
    long = " ".join(f"word{i}" for i in range(L))
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        ad.encode_student(["a red circle"])
        assert not caplog.records, caplog.text
        ad.encode_teacher([long], [torch.rand(3, 64, 64)])  # the student's line still to come
        caplog.clear()
        assert ad.encode_student([long, "a red circle"])[0].features.shape[0] == L
        ad.encode_student([long])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"model.student_max_tokens={L}" in said[0] and "'word0 word1" in said[0], said


def test_fast_path_batches_editing_rows_by_their_references(tmp_path, caplog):
    """The fast path stacks a batch's references per place, so its samples must share their number and
    sizes; the sampler grouped by the target's bucket alone, and a batch of 2 editing rows with other
    references stopped the run at its first such batch ("samples of a batch must share ... reference
    sizes"). The sampler now groups by the references too."""
    from PIL import Image

    from dopsd_fast.trainer import Trainer

    _editing_data(tmp_path)
    Image.new("RGB", (256, 128), (90, 90, 90)).save(tmp_path / "wide.png")
    rows = [{"references": ["a.png"], "target": "b.png", "prompt": "make the red square green"},
            {"image": ["c.png", "a.png", "d.png"], "prompt": "blend the blue and red squares into yellow"},
            {"references": ["wide.png"], "target": "d.png", "prompt": "make it yellow"},
            {"references": ["c.png"], "target": "a.png", "prompt": "make it red"}]
    p = _editing_data(tmp_path, rows)
    cfg = tiny_config(tmp_path / "k", f"data.jsonl={p}", "data.builtin=null", "data.prompt_keys=[prompt]",
                      "data.bucket_scale=0.125", "data.batch_size=2", "train.max_steps=4", "model.family=klein",
                      "model.preset=tiny-klein", "model.student_max_tokens=160", "dopsd.rollout=klein-k4",
                      "fast.enabled=true")
    tr = Trainer(cfg)
    groups = tr.dataset.batch_groups
    assert groups[0] == groups[3] and len({groups[0], groups[1], groups[2]}) == 3, groups
    for _ in range(4):  # every group's batches, each one a fast step
        assert tr.train_step()["loss"] > 0
    # a checkpoint of an earlier version (batches by the target's bucket alone): its order differs, said
    import logging
    from pathlib import Path

    state = tr.state_dict()
    state["sampler"].pop("grouping")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr.load(Path(tmp_path / "old-checkpoint"), state)
    assert "group editing rows by their references" in caplog.text, caplog.text


def test_text_layers_and_buckets_are_checked_at_start_up(tmp_path):
    """model.text_layers out of the encoder's range gave an IndexError ("unexpected") and a wrong count a
    shapes error at step 1; a bucket off klein's 16-pixel grid a reshape error in dopsd-cache. Each is now
    one line naming the field, before any encoding."""
    import pytest

    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.cli import cache_main
    from dopsd_fast.errors import ConfigError
    from dopsd_fast.trainer import Trainer

    far = load_config("configs/tiny-klein.yaml", ["model.text_layers=[1, 2, 99]"])
    with pytest.raises(ConfigError, match=r"'model.text_layers'.*\[99\] not among"):
        build_adapter(far.model)
    two = load_config("configs/tiny-klein.yaml", ["model.text_layers=[1, 2]"])
    with pytest.raises(ConfigError, match=r"'model.text_layers': 2 layers .*joint_attention_dim\): give 3 layers"):
        build_adapter(two.model)
    p = _editing_data(tmp_path)
    off_grid = [f"data.jsonl={p}", "data.builtin=null", "data.prompt_keys=[prompt]", "data.bucket_scale=1",
                "data.buckets=[[120,120]]", "data.bucket_multiple=8"]
    with pytest.raises(ConfigError, match=r"data.bucket_multiple.*120x120 must be a multiple of 16"):
        Trainer(tiny_config(tmp_path / "t", "model.family=klein", "model.preset=tiny-klein",
                            "model.student_max_tokens=160", "dopsd.rollout=klein-k4", *off_grid))
    args = ["--config", "tiny-klein", "--set", f"cache.dir={tmp_path / 'c'}", "--set", "train.progress=false"]
    with pytest.raises(SystemExit, match=r"error: config fields .*data.bucket_multiple.*multiple of 16"):
        cache_main(args + [x for kv in off_grid for x in ("--set", kv)])


def test_memory_shape_counts_the_references_tokens(tmp_path):
    """The memory model (the dry run and the automatic plan) sized an editing row by its target alone: a
    row with two references has them in both branches' sequences (the teacher's target after them)."""
    from dopsd_fast.trainer import Trainer

    p = _editing_data(tmp_path)  # row 2: two references and a target, all 128 x 128
    cfg = tiny_config(tmp_path / "k", f"data.jsonl={p}", "data.builtin=null", "data.prompt_keys=[prompt]",
                      "data.bucket_scale=0.125", "model.family=klein", "model.preset=tiny-klein",
                      "model.student_max_tokens=160", "dopsd.rollout=klein-k4")
    tr = Trainer(cfg)
    assert {tuple(r.bucket) for r in tr.dataset.records} == {(128, 128)}
    n = 8 * 8  # a 128 x 128 image: an 8 x 8 grid of klein tokens (16 pixels each)
    shape = tr.memory_shape()
    assert (shape.tokens_student, shape.tokens_teacher) == (n + 2 * n + 160, n + 2 * n + n + 160), shape


def test_dopsd_sample_with_a_reference_matches_the_pipelines_edit(tmp_path):
    """``dopsd-sample --reference``: the editing model's sample on a reference image equals diffusers'
    own Flux2KleinPipeline(image=...) from the same noise (the reference decoded, encoded and placed as
    the pipeline does), differs from the text-only sample, and the grid shows the reference beside it."""
    import numpy as np
    from PIL import Image

    from dopsd_fast.cli import sample_main
    from dopsd_fast.sample import load_references, sample_images

    ad = _adapter()
    pipe = _pipeline(ad)
    cfg = load_config("configs/tiny-klein.yaml")
    rng = np.random.default_rng(0)
    ref_file = tmp_path / "ref.png"
    Image.fromarray(rng.integers(0, 256, (112, 144, 3), dtype=np.uint8)).save(ref_file)  # 144x112: a bucket
    refs = load_references(cfg.data, "klein", [str(ref_file)])
    assert [tuple(r.shape) for r in refs] == [(3, 112, 144)]
    w, h, steps = 144, 112, 2
    ours = sample_images(ad, ["make it blue"], w, h, steps, seed=3, references=refs)[0]
    noise = torch.randn((1, *ad.latent_shape(h, w)), generator=torch.Generator().manual_seed(3))
    theirs = pipe(image=Image.open(ref_file), prompt="make it blue", height=h, width=w, num_inference_steps=steps,
                  latents=noise, output_type="pt", max_sequence_length=ad.cfg.student_max_tokens,
                  text_encoder_out_layers=ad.text_layers).images[0]
    assert_close(ours, theirs.clamp(0, 1), 1e-4, 1e-4, "edited sample", scaled=True)
    plain = sample_images(ad, ["make it blue"], w, h, steps, seed=3)[0]
    assert (plain - ours).abs().max() > 1e-3  # the reference conditions the sample

    out = tmp_path / "s.png"
    assert sample_main(["--config", "tiny-klein", "--prompt", "make it blue", "--reference", str(ref_file),
                        "--steps", "1", "--out", str(out)]) == 0
    with Image.open(out) as grid:  # two cells (the reference, the sample) of at least 144 px, side by side
        assert grid.width >= 2 * 144 + 3 * 6


def test_dopsd_sample_references_are_refused_in_one_line(tmp_path):
    import numpy as np
    import pytest
    from PIL import Image

    from dopsd_fast.cli import sample_main

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(small)
    torn = tmp_path / "torn.png"
    Image.fromarray(np.zeros((200, 200, 3), dtype=np.uint8)).save(torn)
    torn.write_bytes(torn.read_bytes()[:60])
    cases = [("tiny-klein", str(tmp_path / "none.png"), "no such image file"),
             ("tiny-klein", str(small), "is 20x20, which fits inside no bucket"),
             ("tiny-klein", str(torn), "cannot read the image"),
             ("tiny-zimage", str(small), "has no editing mode")]
    for config, ref, match in cases:
        with pytest.raises(SystemExit, match=match):
            sample_main(["--config", config, "--prompt", "x", "--reference", ref, "--out", str(tmp_path / "o.png")])
    assert not (tmp_path / "o.png").exists()


def test_held_out_validation_prompts_sample_on_validation_references(tmp_path):
    """A ground-truth-reference run's held-out prompts sampled text-to-image: with validation.references
    they are conditioned on them (the student's context carries each reference's latents), sample at
    the first one's bucket, and their grid row shows it; a ``validation.prompts`` entry with its own
    ``references`` is conditioned on those instead (``[]``: text-to-image); a bad entry is one line at
    start-up, naming its field."""
    import pytest
    from PIL import Image

    from dopsd_fast.errors import ConfigError
    from dopsd_fast.trainer import Trainer

    p = _editing_data(tmp_path)
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.new("RGB", (256, 128), (90, 90, 90)).save(wide)
    Image.new("RGB", (128, 256), (30, 30, 30)).save(tall)
    klein = [f"data.jsonl={p}", "data.builtin=null", "data.prompt_keys=[prompt]", "data.bucket_scale=0.125",
             "model.family=klein", "model.preset=tiny-klein", "model.student_max_tokens=160", "dopsd.rollout=klein-k4",
             "validation.num_samples=1", "validation.steps=1"]
    prompts = f"[make it blue, make it red, {{prompt: make it tall, references: [{tall}]}}, {{prompt: a cat, references: []}}]"
    cfg = tiny_config(tmp_path / "k", *klein, f"validation.prompts={prompts}", f"validation.references=[{wide}]")
    tr = Trainer(cfg)
    assert [len(r) for r in tr.val_refs] == [1, 1, 1, 0]
    (h, w), (th, tw) = tr.val_refs[0][0].shape[-2:], tr.val_refs[2][0].shape[-2:]
    assert w > h and (w, h) != tuple(tr.dataset.records[0].bucket)  # the wide picture's own bucket
    assert th > tw  # the tall one's
    ctx = tr._validation_contexts()
    grids = [tuple(c.extra["ref0"].shape[-2:]) if "ref0" in c.extra else None for c in ctx]
    assert grids == [tr.adapter.latent_shape(h, w)[-2:]] * 2 + [tr.adapter.latent_shape(th, tw)[-2:], None]
    grid = tr.validate()
    with Image.open(grid) as im:
        assert im.height > 5 * 128  # the data row and the four held-out rows
    tr.close()

    with pytest.raises(ConfigError, match=r"'validation.references\[0\]' .*none.png: no such image file"):
        Trainer(tiny_config(tmp_path / "m", *klein, f"validation.references=[{tmp_path / 'none.png'}]"))
    with pytest.raises(ConfigError, match=r"'validation.prompts\[1\].references\[0\]' .*none.png: no such image file"):
        Trainer(tiny_config(tmp_path / "n", *klein,
                            f"validation.prompts=[x, {{prompt: y, references: [{tmp_path / 'none.png'}]}}]"))
    # checked before the model is built: a bad reference is named before a real model's weights are read
    with pytest.raises(ConfigError, match=r"'validation.prompts\[0\].references\[0\]' .*: a folder, not an image file"):
        Trainer(tiny_config(tmp_path / "f", *klein, "model.preset=null", f"model.path={tmp_path / 'no-model'}",
                            f"validation.prompts=[{{prompt: y, references: [{tmp_path}]}}]"))
    with pytest.raises(ConfigError, match="'validation.references': model.family=zimage has no editing mode"):
        Trainer(tiny_config(tmp_path / "z", f"validation.references=[{wide}]"))
    with pytest.raises(ConfigError, match=r"'validation.prompts\[0\].references': model.family=zimage has no editing"):
        Trainer(tiny_config(tmp_path / "y", f"validation.prompts=[{{prompt: x, references: [{wide}]}}]"))


def test_resume_from_a_copy_of_the_model_folder(tmp_path, caplog):
    """A resume whose model.path is a copy of the checkpoint's folder elsewhere (node-local disk: new mtimes)
    is the same model and resumes without --allow-config-change; a folder of other weights is refused,
    naming the file that differs."""
    import logging
    import os
    import shutil

    import pytest
    from safetensors.torch import load_file, save_file

    from dopsd_fast.errors import ConfigError
    from dopsd_fast.trainer import Trainer

    pipe = _pipeline(_adapter())
    pipe.save_pretrained(tmp_path / "a")
    out = tmp_path / "run"
    args = ["--config", "configs/tiny-klein.yaml", "model.preset=null", "model.text_layers=[1, 2, 3]",
            f"train.output_dir={out}", "train.progress=false", "train.tensorboard=false", "validation.every=0",
            "validation.at_start=false", "train.checkpoint_every=1"]
    cfg = lambda folder, steps: load_config("configs/tiny-klein.yaml", args[2:] + [  # noqa: E731
        f"model.path={folder}", f"train.max_steps={steps}"])
    tr = Trainer(cfg(tmp_path / "a", 1))
    tr.train()
    tr.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for f in (tmp_path / "b").rglob("*"):
        os.utime(f, (1, 1))  # a copy that keeps no modification time
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        tr = Trainer(cfg(tmp_path / "b", 2), resume="latest")
    assert tr.step == 1 and "holds the same files as the checkpoint's" in caplog.text
    tr.train()
    tr.close()
    # other weights in a folder of the same layout: refused, naming the file (and still with the override)
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    w = next((tmp_path / "c" / "transformer").glob("*.safetensors"))
    sd = load_file(w)
    k = sorted(sd)[len(sd) // 2]
    sd[k] = sd[k] + 0.01
    save_file(sd, w, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"the model is not the one the run trained \(model.path '.*b' -> '.*c': "
                                          r"other files \(transformer/" + w.name):
        Trainer(cfg(tmp_path / "c", 3), resume="latest")
    with pytest.raises(ConfigError, match=r"model.path .*nowhere does not exist"):
        Trainer(cfg(tmp_path / "nowhere", 3), resume="latest")
    # the same folder, its weights edited in place since the checkpoint: refused too (it resumed silently)
    save_file(sd, next((tmp_path / "b" / "transformer").glob("*.safetensors")), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.path .*b: its files changed since the checkpoint \(transformer/"):
        Trainer(cfg(tmp_path / "b", 3), resume="latest")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr = Trainer(cfg(tmp_path / "c", 3), resume="latest", allow_config_change=True)
    assert tr.step == 2 and "other files" in caplog.text and "--allow-config-change" in caplog.text
    tr.close()
    # a checkpoint of an earlier version (no record of the files): the change refused, saying why
    from dopsd_fast.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(out / "checkpoints" / "step-0000002")
    del state["model_files"]
    old = save_checkpoint(tmp_path / "old", 2, state, keep=5, run_id=state["run_id"])
    with pytest.raises(ConfigError, match=r"model.path: .* records no fingerprints of the model's files"):
        Trainer(load_config("configs/tiny-klein.yaml", args[2:] + [f"model.path={tmp_path / 'a'}", "train.max_steps=3",
                                                                  f"train.output_dir={tmp_path / 'old-run'}"]),
                resume=str(old))


def test_cached_reference_latents_are_checked_at_their_buckets_width_by_height():
    """A cached context's reference latents against its row's buckets (w, h), non-square so that a
    swapped width and height is seen: the row's references, then (the teacher's) its target."""
    from types import SimpleNamespace

    ad = _adapter()
    row = SimpleNamespace(reference_buckets=[(64, 32)], bucket=(32, 48))
    C = ad.latent_shape(32, 64)[0]
    ref, target = ad.latent_shape(32, 64), ad.latent_shape(48, 32)
    assert ref[1:] == (2, 4) and target[1:] == (3, 2)  # (C, h, w) at 16 pixels a latent cell
    assert ad.cache_extra_problem("teacher", "ref0", ref, row) is None
    assert ad.cache_extra_problem("teacher", "ref1", target, row) is None
    assert ad.cache_extra_problem("student", "ref0", ref, row) is None
    assert "its reference 0, at its bucket 64x32, is" in ad.cache_extra_problem("teacher", "ref0", (C, 4, 2), row)
    assert "does not have (it has 1 reference(s))" in ad.cache_extra_problem("student", "ref1", target, row)
    assert ad.cache_extra_problem("teacher", "something_else", (1,), row) is None  # not read: not checked
