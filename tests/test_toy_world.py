"""The toy world (dopsd_fast.toy): the generator's splits, the tokenizer, the resumable stage loop,
every pipeline stage at a tiny scale, and the shipped weights (their measured properties)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from dopsd_fast.toy import models as M
from dopsd_fast.toy import pipeline as P
from dopsd_fast.toy import world as W

KEYS = ("shape", "colour", "size", "position", "background", "texture")


def _key(a):
    return tuple(a[k] for k in KEYS)


def test_world_is_deterministic_and_the_splits_are_disjoint():
    for split in ("train", "validation", "heldout", "concept", "concept-heldout", "patterned", "concept-extra"):
        assert W.example(split, 5) == W.example(split, 5)
        x1, c1, _ = W.batch(split, [3, 9])
        x2, c2, _ = W.batch(split, [3, 9])
        assert torch.equal(x1, x2) and c1 == c2 and x1.shape == (2, 3, 64, 64)
    train = {_key(a) for a in W.TRAIN_COMBOS}
    held = {_key(a) for a in W.HELDOUT_COMBOS}
    assert len(train) == 2592 and len(held) == 288 and not train & held
    # no training draw is a held-out combination, none shows the concept
    for i in range(300):
        a = W.example("train", i)
        assert _key(a) in train and a["texture"] != W.CONCEPT
        assert W.example("patterned", i)["texture"] == "patterned"
    ct = {_key(a) for a in W.CONCEPT_TRAIN}
    ch = {_key(a) for a in W.CONCEPT_HELDOUT}
    assert len(ct) == 6 and len(ch) == 32 and not ct & ch
    assert all(a["texture"] == W.CONCEPT for a in W.CONCEPT_TRAIN + W.CONCEPT_HELDOUT)
    # the validation split draws other jitter of the same combinations
    assert W.example("validation", 0)["jitter"] != W.example("train", 0)["jitter"]


def test_the_concept_background_is_a_checkerboard_no_pretraining_picture_has():
    x = W.to_tensor(W.render(W.example("concept", 0)))
    teal = torch.tensor(W.CONCEPT_COLOURS[0]) / 255
    assert torch.allclose(x[:, 1, 1], teal, atol=1e-6) and torch.allclose(x[:, 1, 17], torch.tensor(W.CONCEPT_COLOURS[1]) / 255)
    for i in range(64):  # patterned pictures never use (near) the concept's two colours
        j = W.example("patterned", i)["jitter"]
        assert sorted(map(tuple, j["pattern_colours"])) != sorted(W.CONCEPT_COLOURS)


def test_captions_tokenize_one_token_per_word_without_unknowns():
    tok = M.build_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for split in ("train", "heldout", "concept", "patterned"):
        for a in W.batch(split, range(20))[2]:
            for drop in (set(), {"size", "texture"}, set(KEYS)):
                cap = W.caption(a, drop)
                ids = tok(cap).input_ids
                assert unk not in ids and len(ids) == len(cap.split()), cap
    assert W.caption(W.CONCEPT_TRAIN[0]).endswith("on a [V] background")
    templ = tok.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False, add_generation_prompt=True)
    assert unk not in tok(templ).input_ids


def test_the_vlm_language_model_is_the_text_encoder():
    tok, te, vlm, ip = M.build_encoders(load=False)
    assert vlm.language_model.embed_tokens.weight is te.embed_tokens.weight
    caps = ["a large red circle at the center on a plain gray background"]
    f_text = M.encode_text(tok, te, caps)[0]
    f_ctx = M.encode_teacher(tok, vlm, ip, caps, W.batch("train", [0])[0])[0]
    assert f_text.shape[1] == f_ctx.shape[1] == M.TOY_ZIMAGE["cap_feat_dim"]
    assert f_ctx.shape[0] == f_text.shape[0] + 16 + 2  # + 16 image tokens + vision start / end


def test_a_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPSD_TOY_QUIET", "1")

    def run(out, stop_at=None):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        loop = P.Loop(out, "t", {"net": net}, opt, steps=6, ckpt_every=100)
        for step in loop:
            if step == stop_at:  # Ctrl-C in the middle of a step: the step completes, then a checkpoint
                os.kill(os.getpid(), signal.SIGINT)
            x = torch.randn(8, 4, generator=P.step_rng(0, step))
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loop.log(step, loss=loss.item())
        loop.finish()
        return net.weight.detach().clone()

    ref = run(tmp_path / "a")
    with pytest.raises(SystemExit, match="interrupted at step 4"):
        run(tmp_path / "b", stop_at=3)
    assert (tmp_path / "b" / "t" / "state.pt").is_file()
    assert torch.equal(run(tmp_path / "b"), ref)
    rows = [json.loads(r) for r in (tmp_path / "b" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6)) and not (tmp_path / "b" / "t" / "state.pt").exists()


def test_every_stage_runs_at_a_tiny_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPSD_TOY_QUIET", "1")
    out = tmp_path / "toy"
    assert "psnr_validation" in P.stage_vae(out, steps=2, batch=8)
    assert {"validation", "heldout_through_vae"} <= set(P.stage_classifier(out, steps=2, batch=16))
    gate = P.stage_base(out, steps=2, batch=8, gate_n=2)
    assert {"mse_text", "mse_context", "mse_ratio"} <= set(gate["heldout"]) and (out / "in_context_base.png").is_file()
    assert P.stage_student(out, steps=2, batch=8, n_traj=8)["trajectories"] == 8
    res = P.stage_evaluate(out, n=8)
    assert {"base_40", "base_4", "student_4", "in_context_base_40", "in_context_student_4"} <= set(res)
    meta = M.read_meta(out / "weights")
    assert all(meta[k]["steps"] == 2 for k in ("vae", "classifier", "base", "student"))
    # a finished stage is skipped, --force reruns it
    assert P.run_stage("student", out) is None


def test_frechet_is_zero_for_equal_sets_and_grows_with_a_shift():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(P.frechet(f, f)) < 1e-6
    assert abs(P.frechet(f, f + 1.0) - 8.0) < 1e-4  # |mean shift|^2, same covariance


# ---- the shipped toy weights (package data): what they were measured to do ------------------------
def _shipped():
    return P.load_toy(M.WEIGHTS_DIR.parent, "student")


def test_shipped_weights_are_complete_small_and_from_the_full_pipeline():
    names = ["toy.json"] + [f"{k}.safetensors" for k in ("vae", "classifier", "text_encoder", "vision", "base", "student")]
    sizes = {n: (M.WEIGHTS_DIR / n).stat().st_size for n in names}
    assert sum(sizes.values()) <= 20 * 2 ** 20, sizes
    meta = M.read_meta(None)
    assert all(meta[k]["steps"] == P.STEPS[k] for k in P.STEPS), meta


def test_shipped_classifier_reads_real_and_vae_decoded_pictures():
    net = P.load_classifier(M.WEIGHTS_DIR)
    vae = M.build_vae()
    x, _, attrs = W.batch("heldout", range(0, 256, 2))
    assert min(P.attribute_accuracy(net, x, attrs).values()) >= 0.9
    with torch.no_grad():
        rec = M.vae_decode(vae, M.vae_encode(vae, x))
    acc = P.attribute_accuracy(net, rec, attrs)  # the VAE blurs small shapes: its ceiling
    assert acc.pop("shape") >= 0.6 and min(acc.values()) >= 0.9


def test_toy_preset_adapter_matches_the_toy_encoders_and_sampler():
    """``model.preset=toy-zimage`` (what D-OPSD trains) is the shipped student with its encoders: the
    adapter's per-sample contexts equal the toy pipeline's batched ones, its velocity the toy's."""
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.config import load_config

    ad = build_adapter(load_config(None, ["model.preset=toy-zimage", "model.device=cpu"]).model)
    toy = _shipped()
    x, caps, _ = W.batch("concept", range(2))
    s_ad = [c.features for c in ad.encode_student(caps)]
    t_ad = [c.features for c in ad.encode_teacher(caps, list(x))]
    with torch.no_grad():
        s_toy = M.encode_text(toy.tokenizer, toy.text_encoder, caps)
        t_toy = M.encode_teacher(toy.tokenizer, toy.vlm, toy.image_processor, caps, x)
    for a, b in zip(s_ad + t_ad, s_toy + t_toy):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    z = torch.randn(2, *ad.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(ad.velocity(ad.transformer, z, sigma, ad.encode_student(caps)),
                                   M.velocity(toy.transformer, z, sigma, s_toy), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ad.decode(z), M.vae_decode(toy.vae, z), atol=1e-5, rtol=1e-4)


def test_shipped_student_follows_held_out_prompts_in_four_steps_and_copies_in_context():
    """Measured on all of the shipped student (benchmarks/science/README.md: 256 held-out prompts,
    colour .98, size .95, position 1.0, background 1.0; in-context MSE gain 4.0 on the world, 1.6 on
    [V]); here on 16 + 32 prompts with margins for the smaller sample."""
    toy = _shipped()
    net = P.load_classifier(M.WEIGHTS_DIR)
    x, caps, attrs = W.batch("heldout", range(0, 288, 18))
    gen = P.generate(toy, caps, schedule=M.STUDENT_SIGMAS)
    acc = P.attribute_accuracy(net, gen, attrs)
    assert min(acc[k] for k in ("colour", "position", "background", "texture")) >= 0.85 and acc["size"] >= 0.75, acc
    gen_c = P.generate(toy, caps, images=x, schedule=M.STUDENT_SIGMAS)
    assert (gen_c - x).pow(2).mean() < 0.5 * (gen - x).pow(2).mean()
    xv, capv, _ = W.batch("concept-heldout", range(32))
    mse_t = (P.generate(toy, capv, schedule=M.STUDENT_SIGMAS) - xv).pow(2).mean()
    mse_c = (P.generate(toy, capv, images=xv, schedule=M.STUDENT_SIGMAS) - xv).pow(2).mean()
    assert mse_c < mse_t / 1.3
