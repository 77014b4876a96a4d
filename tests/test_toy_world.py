"""The toy world (dopsd_fast.toy): the generator's splits, the tokenizer, the resumable stage loop,
every pipeline stage at a tiny scale, and the shipped weights (their measured properties)."""

from __future__ import annotations

import json
from pathlib import Path
import os
import signal

import pytest
import torch

from dopsd_fast.toy import models as M
from dopsd_fast.toy import pipeline as P
from dopsd_fast.toy import world as W

ROOT = Path(__file__).resolve().parents[1]

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


def test_curved_world_holds_out_shape_colour_pairs_and_keeps_the_v1_world():
    from dopsd_fast.toy import curved as C

    for split in C.SPLITS:
        x1, c1, _ = C.batch(split, [3, 9])
        x2, c2, _ = C.batch(split, [3, 9])
        assert torch.equal(x1, x2) and c1 == c2 and x1.shape == (2, 3, 64, 64)
    train = {_key(a) for a in C.TRAIN_COMBOS}
    held = {_key(a) for a in C.HELDOUT_COMBOS}
    assert len(train) == 2400 and len(held) == 480 and not train & held
    # one held-out (shape, colour) pair per shape, four colours; no training draw shows one
    assert sorted(s for s, _ in C.HELDOUT_PAIRS) == sorted(W.SHAPES) and len({c for _, c in C.HELDOUT_PAIRS}) == 4
    for i in range(300):
        a = C.example("train", i)
        assert _key(a) in train and (a["shape"], a["colour"]) not in C.HELDOUT_PAIRS
        assert abs(a["jitter"]["dx"]) <= C.POSITION_JITTER and C.example("patterned", i)["texture"] == "patterned"
    assert {C.example("patterned", i)["jitter"]["pattern"] for i in range(300)} == set(range(6))  # mosaics too
    assert max(abs(C.example("train", i)["jitter"]["dx"]) for i in range(300)) == C.POSITION_JITTER > 3
    # the v1 world (the shipped weights') is untouched: no mosaic, +-3 px
    assert {W.example("patterned", i)["jitter"]["pattern"] for i in range(300)} == set(range(5))
    assert max(abs(W.example("train", i)["jitter"]["dx"]) for i in range(300)) == 3
    assert C.example("concept", 2) == W.example("concept", 2)


def test_curved_held_out_prompts_are_fixed_and_never_trained_on():
    """The 256 held-out prompts: partial captions that name a held-out (shape, colour) pair, so no
    training caption or picture ever showed that combination; the list is fixed in the repo."""
    from pathlib import Path

    from dopsd_fast.toy import curved as C

    fixed = (Path(__file__).resolve().parents[1] / "benchmarks" / "science" / "heldout_prompts.txt").read_text()
    assert fixed.splitlines() == [e["prompt"] for e in C.HELDOUT_PROMPTS]
    assert len(C.HELDOUT_PROMPTS) == 256
    for e in C.HELDOUT_PROMPTS:
        a = e["attrs"]
        assert (a["shape"], a["colour"]) in C.HELDOUT_PAIRS and {"shape", "colour"} <= set(e["named"])
        assert e["prompt"] == W.caption(a, set(C.OPTIONAL) - set(e["named"]))
    assert {len(e["named"]) for e in C.HELDOUT_PROMPTS} >= {2, 3, 4, 5, 6}  # from "a red triangle" to the full caption


def test_partial_captions_leave_attributes_out():
    import random

    from dopsd_fast.toy import curved as C

    a = dict(shape="circle", colour="red", size="large", position="top left", background="navy", texture="striped")
    assert W.caption(a, set(C.OPTIONAL)) == "a circle"
    assert W.caption(a, {"size", "position", "background"}) == "a red circle on a striped background"
    rng = random.Random(0)
    drops = [C.draw_drop(rng, 0.5) for _ in range(2000)]
    for k in C.OPTIONAL:  # each attribute left out about half of the time, the shape never
        assert 0.45 < sum(k in d for d in drops) / len(drops) < 0.55
    assert all(C.draw_drop(rng, 0.5, keep=("colour",)).isdisjoint({"colour", "shape"}) for _ in range(200))
    # the base's text half: partial captions and ~10 % empty ones (guidance's unconditional branch)
    caps = [c for step in range(20) for c in P.curved_base_batch(0, step, 48)[1]]
    assert 0.05 < caps.count("") / len(caps) < 0.16 and len(set(caps)) > len(caps) // 2

def test_the_concept_background_is_a_checkerboard_no_pretraining_picture_has():
    x = W.to_tensor(W.render(W.example("concept", 0)))
    teal = torch.tensor(W.CONCEPT_COLOURS[0]) / 255
    assert torch.allclose(x[:, 1, 1], teal, atol=1e-6) and torch.allclose(x[:, 1, 17], torch.tensor(W.CONCEPT_COLOURS[1]) / 255)
    for i in range(64):  # patterned pictures never use (near) the concept's two colours
        j = W.example("patterned", i)["jitter"]
        assert sorted(map(tuple, j["pattern_colours"])) != sorted(W.CONCEPT_COLOURS)


def test_the_object_mask_covers_exactly_the_pixels_the_object_was_drawn_on():
    from dopsd_fast.toy import curved as C

    for i in range(12):
        a = C.example("train", i)
        mask = W.object_mask(a)[0] > 0.5
        x = W.to_tensor(W.render(a))
        a2 = dict(a, jitter=dict(a["jitter"], shade=0.0))  # the same picture with a black object
        changed = (x - W.to_tensor(W.render(a2))).abs().amax(0) > 0
        assert mask.sum() > 50 and (changed == mask).float().mean() > 0.99, a
    x, m = P.vae_batch(0, 0, 16, world="curved", masks=True)
    assert x.shape == (16, 3, 64, 64) and m.shape == (16, 1, 64, 64) and torch.equal(x, P.vae_batch(0, 0, 16, world="curved"))


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
    assert {"validation", "heldout_through_vae"} <= set(P.stage_classifier(out, steps=2, batch=16, eval_n=16))
    gate = P.stage_base(out, steps=2, batch=8, gate_n=2)
    assert {"mse_text", "mse_context", "mse_ratio"} <= set(gate["heldout"]) and (out / "in_context_base.png").is_file()
    assert P.stage_student(out, steps=2, batch=8, n_traj=8)["trajectories"] == 8
    res = P.stage_evaluate(out, n=8, gate_n=4)
    assert {"base_40", "base_4", "student_4", "in_context_base_40", "in_context_student_4"} <= set(res)
    meta = M.read_meta(out / "weights")
    assert all(meta[k]["steps"] == 2 for k in ("vae", "classifier", "base", "student"))
    # a finished stage is skipped, --force reruns it
    assert P.run_stage("student", out) is None


def test_every_curved_stage_runs_at_a_tiny_scale_and_evaluate_prints_the_gates(tmp_path, monkeypatch, caplog):
    import functools
    import logging

    monkeypatch.setenv("DOPSD_TOY_QUIET", "1")
    out = tmp_path / "curved"
    assert "psnr_validation" in P.stage_vae(out, steps=2, batch=8, world="curved")
    P.stage_classifier(out, steps=2, batch=16, world="curved", eval_n=16)
    in_context = P.stage_base(out, steps=2, batch=9, world="curved")
    assert {"background_error", "checker_correlation", "object_accuracy"} <= set(in_context["concept_train"])
    assert M.read_meta(out / "weights")["world"] == "curved" and (out / "base" / "in_context.png").is_file()
    assert P.stage_student(out, steps=2, batch=9, n_traj=9, world="curved")["trajectories"] == 9
    assert M.read_meta(out / "weights")["student"]["sigmas"] == [1.0, 0.5, 0.0]  # the curved student's K = 2
    t = P.guided_trajectories(out, 9)  # kept (weights_only load) and reused
    assert t["states"].shape == (9, 5, 16, 8, 8) and t["guidance"] == P.GUIDANCE and len(t["captions"]) == 9
    # a folder holds one world: a stage asked for another is refused in one line naming the right flag,
    # and the command line's default is the folder's own world
    with pytest.raises(SystemExit, match="--world curved"):
        P.stage_student(out, steps=2, batch=9, n_traj=9)
    with pytest.raises(SystemExit, match="holds the 'curved' world; rerun with --world curved"):
        P.run_stage("student", out, force=True, world="v1")
    assert P.main(["student", "--out", str(out)]) == 0  # curved, done: skipped (v1 would have been refused)
    # the trajectories are remade when the base they came from changes
    base = out / "weights" / "base.safetensors"
    os.utime(base, ns=(base.stat().st_atime_ns, base.stat().st_mtime_ns + 10 ** 9))
    t2 = P.guided_trajectories(out, 9)
    assert t2["base"] != t["base"] and t2["base"] == [base.stat().st_size, base.stat().st_mtime_ns]
    monkeypatch.setitem(P.STAGE_FUNCS, "evaluate", (functools.partial(P.stage_evaluate, n=8), "results.json"))
    with caplog.at_level(logging.INFO, logger="dopsd_fast.toy"):
        summary = P.run_stage("evaluate", out)
    res = json.loads((out / "results.json").read_text())
    assert set(res["text_to_image"]) == set(P.SAMPLERS) and summary["gates"] == len(res["gates"]) == 12
    assert summary["gates_passed"] == sum(g["pass"] for g in res["gates"])
    assert "| 3 teacher | checker correlation, concept_heldout |" in caplog.text  # printed
    assert {"real", "ghosts"} == set(res["controls"]) and "blotches" in res["texture_controls"]
    for name in ("text_to_image.png", "teacher.png", "texture_controls.png", "results.md", "timings.json"):
        assert (out / name).is_file()
    # two random-init steps pass no gate that needs a trained model; a curved run that failed a gate does not ship
    assert not all(g["pass"] for g in res["gates"])
    with pytest.raises(SystemExit, match="gate"):
        P.stage_ship(out)


def test_the_curved_students_levels_are_found_in_the_trajectory_cache_or_refused():
    from dopsd_fast.toy import curved as C

    assert P._trajectory_index(C.STUDENT_SIGMAS) == [0, 3, 4]  # of 1, 0.9, 0.75, 0.5, 0
    assert P._trajectory_index(M.STUDENT_SIGMAS) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="0.6"):
        P._trajectory_index([1.0, 0.6, 0.0])


def _gate_results(change=None):
    """Scores that pass every gate by a margin; ``change``: ((section, name, key), value) to set."""
    by = {"shape": 0.25, "colour": 0.9, "size": 0.9, "position": 0.9}  # shape at chance: not gated
    q = lambda s, f: {"sharpness": s, "frechet": f, "prompt_accuracy": 0.7, "prompt_accuracy_by_attribute": dict(by)}  # noqa: E731
    res = {"text_to_image": {"base_40": q(0.95, 100.0), "base_K": q(0.6, 150.0), "base_40_guided": q(0.97, 90.0),
                             "base_K_guided": q(0.75, 140.0), "student_K": q(0.96, 95.0),
                             "base_4": q(0.99, 90.0), "base_4_guided": q(0.99, 90.0)},  # reported, gate nothing
           "teacher": {s: {"background_error": 0.01, "checker_correlation": 0.95, "object_accuracy": 0.9}
                       for s in ("concept_train", "concept_heldout")}}
    if change is not None:
        (section, name, key), v = change
        res[section][name][key] = v
    k = str(P.K_CURVED)
    res["text_to_image"] = {name.replace("_K", "_" + k): v for name, v in res["text_to_image"].items()}
    return res


@pytest.mark.parametrize("change, failing", [
    ((("text_to_image", "base_K", "sharpness"), 0.85), "base sharpness, 40 steps - K steps"),  # no ghosting
    ((("text_to_image", "base_40", "sharpness"), 0.8), "base 40-step sharpness"),  # 40 steps not sharp either
    ((("text_to_image", "base_40", "prompt_accuracy_by_attribute"), {"shape": 0.9, "colour": 0.5, "size": 0.9}),
     "base 40-step prompt accuracy, shape aside"),  # sharp garbage
    ((("text_to_image", "student_K", "sharpness"), 1.1), "sharpness, |student K steps - guided base 40 steps|"),
    ((("text_to_image", "student_K", "frechet"), 200.0), "Frechet, student K steps / guided base 40 steps"),
    ((("text_to_image", "base_K_guided", "sharpness"), 0.92), "sharpness, student K steps - best base K steps"),
    ((("teacher", "concept_heldout", "background_error"), 0.05), "background error, concept_heldout"),
    ((("teacher", "concept_train", "checker_correlation"), 0.2), "checker correlation, concept_train"),
    ((("teacher", "concept_heldout", "object_accuracy"), 0.5), "object accuracy, concept_heldout"),
])
def test_each_gate_fails_alone_when_its_measure_misses(change, failing):
    assert all(g["pass"] for g in P.gates(_gate_results()))
    rows = P.gates(_gate_results(change))
    assert [g["measure"] for g in rows if not g["pass"]] == [failing.replace("K steps", f"{P.K_CURVED} steps")]
    assert "| NO |" in P.gates_markdown(rows)


def test_frechet_is_zero_for_equal_sets_and_grows_with_a_shift():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(P.frechet(f, f)) < 1e-6
    assert abs(P.frechet(f, f + 1.0) - 8.0) < 1e-4  # |mean shift|^2, same covariance


# ---- the shipped toy weights (package data): what they were measured to do ------------------------
def _shipped():
    return P.load_toy(M.WEIGHTS_DIR.parent, "student")


def test_shipped_weights_are_complete_small_gated_and_from_the_full_pipeline():
    """The package ships the curved world's build: every stage at its full step count, the K = 2
    student (its sigmas in the meta), and the committed evaluation of those weights passed every gate."""
    from dopsd_fast.toy import curved as C

    names = ["toy.json"] + [f"{k}.safetensors" for k in ("vae", "classifier", "text_encoder", "vision", "base", "student")]
    sizes = {n: (M.WEIGHTS_DIR / n).stat().st_size for n in names}
    assert sum(sizes.values()) <= 20 * 2 ** 20, sizes
    meta = M.read_meta(None)
    assert meta["world"] == "curved"
    assert all(meta[k]["steps"] == P.CURVED_STEPS[k] for k in P.CURVED_STEPS), meta
    assert meta["student"]["sigmas"] == list(C.STUDENT_SIGMAS) == M.student_sigmas()
    res = json.loads((ROOT / "benchmarks" / "science" / "curved" / "results.json").read_text())
    assert res["gates"] and all(g["pass"] for g in res["gates"]), [g for g in res["gates"] if not g["pass"]]
    assert res["cpu_seconds"]["student"] == meta["student"]["cpu_seconds"]  # the evaluation of these weights


def test_toy_preset_samples_the_shipped_student_at_its_own_schedule():
    """``model.preset=toy-zimage`` samples (``dopsd-sample``, validation) at the student's own sigmas
    (1, 0.5, 0): K steps of the Z-Image pipeline's schedule at the shift ``scheduler_shift`` finds; the
    Z-Image K = 4 roll-out comes out of shift 3; a schedule no shift gives is refused."""
    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.config import load_config

    ad = build_adapter(load_config(None, ["model.preset=toy-zimage", "model.device=cpu"]).model)
    assert ad.default_inference_steps == 2
    assert ad.inference_sigmas(latent_hw=(8, 8)) == pytest.approx(M.student_sigmas(), abs=1e-6)
    assert M.scheduler_shift(M.STUDENT_SIGMAS) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no shifted 3-step"):
        M.scheduler_shift([1.0, 0.9, 0.2, 0.0])


def test_shipped_classifier_reads_real_and_vae_decoded_pictures():
    from dopsd_fast.toy import curved as C

    net = P.load_classifier(M.WEIGHTS_DIR)
    vae = M.build_vae()
    x, _, attrs = C.batch("heldout", range(0, 256, 2))
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


def test_shipped_student_follows_held_out_prompts_in_two_steps_and_copies_in_context():
    """Measured on all of the shipped student (benchmarks/science/curved/results.md: 256 held-out
    partial prompts, 2 steps: colour .96, size .77, position .99, background 1.0, texture .99); here on
    16 full captions of held-out combinations + 32 [V] prompts, with margins for the smaller sample."""
    from dopsd_fast.toy import curved as C

    toy = _shipped()
    net = P.load_classifier(M.WEIGHTS_DIR)
    x, caps, attrs = C.batch("heldout", range(0, 288, 18))
    gen = P.generate(toy, caps, schedule=C.STUDENT_SIGMAS)
    acc = P.attribute_accuracy(net, gen, attrs)
    assert min(acc[k] for k in ("colour", "position", "background", "texture")) >= 0.85 and acc["size"] >= 0.6, acc
    gen_c = P.generate(toy, caps, images=x, schedule=C.STUDENT_SIGMAS)
    assert (gen_c - x).pow(2).mean() < 0.5 * (gen - x).pow(2).mean()
    xv, capv, _ = W.batch("concept-heldout", range(32))
    mse_t = (P.generate(toy, capv, schedule=C.STUDENT_SIGMAS) - xv).pow(2).mean()
    mse_c = (P.generate(toy, capv, images=xv, schedule=C.STUDENT_SIGMAS) - xv).pow(2).mean()
    assert mse_c < mse_t / 1.3


def test_shifted_noise_levels_and_the_partial_prompts_of_trained_combinations():
    from dopsd_fast.toy import curved as C

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.allclose(P.train_sigmas(g1, 64, shift=1.0), torch.sigmoid(torch.randn(64, generator=g2)))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1, s3 = torch.sigmoid(torch.randn(64, generator=g1)), P.train_sigmas(g2, 64)
    assert torch.allclose(s3, 3 * s1 / (1 + 2 * s1)) and (s3 >= s1).all()  # shift 3 moves every level toward noise
    entries = C.partial_prompts("validation", 32)
    assert all((e["attrs"]["shape"], e["attrs"]["colour"]) not in C.HELDOUT_PAIRS for e in entries)
    assert all({"shape", "colour"} <= set(e["named"]) for e in entries)
    assert [e["prompt"] for e in C.partial_prompts("heldout", 8)] == [e["prompt"] for e in C.HELDOUT_PROMPTS[:8]]
