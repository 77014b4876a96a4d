"""End-to-end training on the tiny real-architecture Z-Image preset."""

import json

import pytest
import torch

from tests.conftest import assert_close, tiny_config


def _snapshot(d):
    return {k: v.detach().clone() for k, v in d.items()}


def test_steps_train_student_and_ema_teacher(tmp_path):
    from dopsd_fast.trainer import Trainer

    cfg = tiny_config(tmp_path, "dopsd.ema_decay=0.5")
    tr = Trainer(cfg)
    w = tr.weights
    s0, t0 = _snapshot(w.named_trainable()), _snapshot(w.named_teacher())
    # the teacher adapter starts equal to the student; LoRA B = 0 so both equal the base model
    for (ns, ps), (nt, pt) in zip(s0.items(), t0.items()):
        assert ns.replace(".student.", ".teacher.") == nt and torch.equal(ps, pt)
    base = {n: p.detach().clone() for n, p in tr.adapter.transformer.named_parameters() if "lora_" not in n}
    m = tr.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values() if isinstance(v, float))
    assert m["grad_norm"] > 0 and len([k for k in m if k.startswith("loss_state/")]) == 4
    s1, t1 = _snapshot(w.named_trainable()), _snapshot(w.named_teacher())
    assert any(not torch.equal(s0[k], s1[k]) for k in s0), "student LoRA did not change"
    for (ks, a0), (kt, b0) in zip(s0.items(), t0.items()):
        # teacher <- 0.5 teacher + 0.5 student (after the optimizer step)
        assert_close(t1[kt], 0.5 * b0 + 0.5 * s1[ks], atol=1e-7, name=kt)
    for n, p in tr.adapter.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"frozen base weight {n} changed"
            assert p.grad is None


def test_gradient_only_into_student_adapter(tmp_path):
    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path))
    samples = tr.next_samples(0, 0)
    tr.compute_rollout(samples, tr.noise_for(samples, 0, 0))
    for n, p in tr.adapter.transformer.named_parameters():
        if ".student." in n:
            assert p.grad is not None, n
        else:
            assert p.grad is None, f"{n} received a gradient"
    assert any(float(p.grad.abs().sum()) > 0 for n, p in tr.adapter.transformer.named_parameters() if ".student." in n)


@pytest.mark.parametrize("mode,decay", [("frozen", 1.0), ("live", 0.0)])
def test_teacher_modes(tmp_path, mode, decay):
    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, f"dopsd.ema_decay={decay}"))
    t0 = _snapshot(tr.weights.named_teacher())
    tr.train_step()
    tr.train_step()
    t2, s2 = tr.weights.named_teacher(), tr.weights.named_trainable()
    if mode == "frozen":
        assert all(torch.equal(t0[k], t2[k]) for k in t0)
    else:
        for (ks, vs), (kt, vt) in zip(s2.items(), t2.items()):
            assert torch.equal(vs, vt), kt


def test_once_and_stepwise_same_gradient_on_zimage(tmp_path):
    from dopsd_fast.trainer import Trainer

    grads = {}
    for mode in ("once", "stepwise"):
        tr = Trainer(tiny_config(tmp_path / mode, f"dopsd.backward={mode}"))
        samples = tr.next_samples(0, 0)
        tr.compute_rollout(samples, tr.noise_for(samples, 0, 0))
        grads[mode] = {n: p.grad.clone() for n, p in tr.weights.named_trainable().items()}
    for n in grads["once"]:
        assert_close(grads["stepwise"][n], grads["once"][n], atol=1e-6, rtol=1e-5, name=n, scaled=True)


def test_full_finetune_ema_teacher(tmp_path):
    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, "lora.enabled=false", "dopsd.ema_decay=0.5", "dopsd.ema_on_cpu=true"))
    t0 = _snapshot(tr.weights.named_teacher())
    tr.train_step()
    s1, t1 = tr.weights.named_trainable(), tr.weights.named_teacher()
    changed = [k for k in s1 if not torch.equal(s1[k], t0[k])]
    assert changed, "full fine-tuning did not change the student"
    for k in changed[:10]:
        assert_close(t1[k], 0.5 * t0[k] + 0.5 * s1[k].cpu(), atol=1e-7, name=k)
    # the teacher module runs on the EMA weights
    tm = dict(tr.weights.teacher_module.named_parameters())
    assert torch.equal(tm[changed[0]], t1[changed[0]].to(tm[changed[0]].dtype))


def test_resume_equals_uninterrupted(tmp_path):
    from dopsd_fast.trainer import Trainer

    common = ["dopsd.ema_decay=0.7", "optim.warmup_steps=2", "data.batch_size=2"]
    straight = Trainer(tiny_config(tmp_path / "a", "train.max_steps=3", *common))
    straight.train()

    first = Trainer(tiny_config(tmp_path / "b", "train.max_steps=2", *common))
    first.train()  # writes the final checkpoint at step 2
    resumed = Trainer(tiny_config(tmp_path / "b", "train.max_steps=3", *common), resume="latest")
    assert resumed.step == 2
    resumed.train()
    for which in ("named_trainable", "named_teacher"):
        a, b = getattr(straight.weights, which)(), getattr(resumed.weights, which)()
        for k in a:
            assert_close(b[k], a[k], atol=1e-7, rtol=1e-6, name=f"{which}:{k}")
    la = [json.loads(l)["loss"] for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-6, name="losses")


def test_checkpoints_kept_and_atomic(tmp_path):
    from dopsd_fast.checkpoint import list_checkpoints, resolve_resume
    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2"))
    tr.train()
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [3, 4]
    assert not list(root.glob(".*.tmp"))
    assert resolve_resume(root, "latest").name == "step-0000004"
    (root / "step-0000009").mkdir()  # an incomplete directory (no .metadata) is never "latest"
    assert resolve_resume(root, "latest").name == "step-0000004"
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*expected a DCP directory"):
        resolve_resume(root, str(root / "step-0000009"))
    # pruned by its run (keep_checkpoints) while another run was to fork from it: said so, with what is there
    with pytest.raises(FileNotFoundError, match=r"step-0000001 does not exist \(mistyped, or pruned by its run\? .* holds "
                                                r"step-0000003, step-0000004\)$"):
        resolve_resume(root, str(root / "step-0000001"))


def test_lora_loads_into_diffusers_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from dopsd_fast.adapters import build_adapter
    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, "train.max_steps=2"))
    tr.train()
    lora_dir = tmp_path / "run" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()

    fresh = build_adapter(tr.cfg.model)  # same seed -> same base weights, no LoRA
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(fresh.scheduler_config),
                          vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                          transformer=fresh.transformer)
    x = torch.randn(1, *fresh.latent_shape(128, 128))
    sigma = torch.tensor([0.6])
    ctx = fresh.encode_student(["a [V] style picture of a red circle"])
    before = fresh.velocity(pipe.transformer, x, sigma, ctx)
    pipe.load_lora_weights(str(lora_dir))
    after = fresh.velocity(pipe.transformer, x, sigma, ctx)
    ours = tr.adapter.velocity(tr.weights.student(), x, sigma, ctx)
    assert (after - before).abs().max() > 1e-4, "the LoRA changed nothing"
    assert_close(after, ours, atol=1e-5, rtol=1e-5, name="pipeline+LoRA vs trained student", scaled=True)
    # the full pipeline runs with the LoRA
    img = pipe(prompt_embeds=[c.features for c in ctx], height=128, width=128, num_inference_steps=2,
               guidance_scale=0.0, output_type="pt").images
    assert img.shape == (1, 3, 128, 128) and torch.isfinite(img).all()


def test_validation_grid(tmp_path):
    from PIL import Image

    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, "validation.num_samples=2", "validation.steps=2"))
    path = tr.validate()
    im = Image.open(path)
    assert im.width >= 3 * 128 and im.height >= 2 * 128


def test_validation_and_dopsd_sample_follow_a_named_schedule(tmp_path, monkeypatch):
    """validation.schedule (and dopsd-sample --schedule): the samples follow the named table (the authors'
    scripts' 8-step zimage-k8) or a list, in place of the pipeline's schedule; checked against the family
    and refused with validation.steps, each in one line."""
    from dopsd_fast import trainer as T
    from dopsd_fast.algorithm import NAMED_SCHEDULES
    from dopsd_fast.cli import sample_main
    from dopsd_fast.config import ConfigError

    seen = []
    real = T.euler_sample
    monkeypatch.setattr(T, "euler_sample", lambda f, x, sig: (seen.append(list(sig)), real(f, x, sig))[1])
    tr = T.Trainer(tiny_config(tmp_path, "validation.num_samples=1", "validation.schedule=zimage-k8"))
    tr.validate()
    assert seen and all(s == list(NAMED_SCHEDULES["zimage-k8"]) for s in seen)
    for sets, match in ((["validation.schedule=[1.0, 0.5]"], r"'validation.schedule': a roll-out schedule must end"),
                        (["validation.schedule=klein-k4"], r"'validation.schedule': 'klein-k4' is not a Z-Image"),
                        (["validation.schedule=zimage-k8", "validation.steps=4"], r"leave validation.steps null")):
        with pytest.raises(ConfigError, match=match):
            tiny_config(tmp_path, *sets)
    out = tmp_path / "s.png"
    assert sample_main(["--config", "tiny-zimage", "--prompt", "a cat", "--schedule", "1,0.6,0", "--out", str(out)]) == 0
    with pytest.raises(SystemExit, match=r"^error: --schedule: 'klein-k4' is not a Z-Image schedule"):
        sample_main(["--config", "tiny-zimage", "--prompt", "a cat", "--schedule", "klein-k4", "--out", str(out)])


def test_sample_cli_with_lora(tmp_path):
    from dopsd_fast.cli import sample_main
    from dopsd_fast.trainer import Trainer

    Trainer(tiny_config(tmp_path, "train.max_steps=1")).train()
    out = tmp_path / "s.png"
    assert sample_main(["--config", "tiny-zimage", "--lora", str(tmp_path / "run" / "lora"), "--prompt", "a [V] cat", "--steps", "2",
                        "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("backward", ["once", "stepwise"])
def test_gradient_checkpointing_same_gradient(tmp_path, backward):
    """Recompute during backward must run the student adapter, not whichever was set last."""
    from dopsd_fast.trainer import Trainer

    grads = {}
    for gc in (False, True):
        tr = Trainer(tiny_config(tmp_path / str(gc), f"model.gradient_checkpointing={gc}",
                                 f"dopsd.backward={backward}"))
        samples = tr.next_samples(0, 0)
        tr.compute_rollout(samples, tr.noise_for(samples, 0, 0))
        grads[gc] = {n: p.grad.clone() for n, p in tr.weights.named_trainable().items()}
    for n in grads[False]:
        assert_close(grads[True][n], grads[False][n], atol=1e-6, rtol=1e-5, name=n, scaled=True)


def test_grad_accumulation_averages(tmp_path):
    """accum=2 x batch 1 gives the mean of the two micro-batch gradients."""
    from dopsd_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, "train.grad_accum=2"))
    per = []
    for micro in range(2):
        samples = tr.next_samples(0, micro)
        tr.compute_rollout(samples, tr.noise_for(samples, 0, micro))
        per.append({n: p.grad.clone() for n, p in tr.weights.named_trainable().items()})
        tr.optimizer.zero_grad(set_to_none=True)
    tr2 = Trainer(tiny_config(tmp_path / "b", "train.grad_accum=2"))
    for micro in range(2):
        samples = tr2.next_samples(0, micro)
        tr2.compute_rollout(samples, tr2.noise_for(samples, 0, micro), loss_scale=0.5)
    for n, p in tr2.weights.named_trainable().items():
        assert_close(p.grad, 0.5 * (per[0][n] + per[1][n]), atol=1e-6, rtol=1e-5, name=n, scaled=True)


def test_no_host_read_per_micro_batch(tmp_path):
    """The training loop reads device values back to the host a fixed number of times per optimizer
    step, whatever the gradient accumulation: no read per micro-batch (each drains the GPU's queue).
    Reads in the context encoders (which a feature cache removes) are not the loop's and not counted."""
    import collections
    import traceback

    from dopsd_fast.trainer import Trainer

    loop_files = ("dopsd_fast/trainer.py", "dopsd_fast/algorithm.py", "dopsd_fast/fastpath.py",
                  "dopsd_fast/pair.py", "dopsd_fast/safety.py", "dopsd_fast/models/")

    def reads(accum, fast):
        over = [f"train.grad_accum={accum}"] + (["fast.enabled=true"] if fast else [])
        tr = Trainer(tiny_config(tmp_path / f"r{accum}{fast}", *over))
        tr.train_step()  # warm-up (first-step allocations, caches)
        counts = collections.Counter()
        saved = {}

        def counting(name, orig):
            def wrapper(self, *a, **kw):
                caller = traceback.extract_stack(limit=3)[-2].filename.replace("\\", "/")
                if any(f in caller for f in loop_files):
                    counts[(name, caller.split("dopsd_fast/")[-1])] += 1
                return orig(self, *a, **kw)
            return wrapper

        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, counting(name, saved[name]))
        try:
            tr.train_step()
        finally:
            for name, orig in saved.items():
                setattr(torch.Tensor, name, orig)
        return counts

    for fast in (False, True):
        one, three = reads(1, fast), reads(3, fast)
        assert one == three, (fast, one, three)
        assert sum(v for (_, f), v in one.items() if f == "trainer.py") == 1, one  # the guard's inputs, once



def test_images_decode_ahead_off_the_step(tmp_path, monkeypatch):
    """data.num_workers threads decode the next micro-batch's images while the step computes: reading the
    images of a prefetched batch decodes nothing in the loop, and gives the pixels a decode in the loop
    gives; with num_workers 0 the loop decodes; contexts from the feature cache read no image at all."""
    from dopsd_fast.cache import ContextProvider
    from dopsd_fast.data import dataset as ds
    from dopsd_fast.trainer import Trainer

    calls = []
    real = ds.load_image
    monkeypatch.setattr(ds, "load_image", lambda *a: calls.append(a) or real(*a))
    for workers in (2, 0):
        tr = Trainer(tiny_config(tmp_path / f"w{workers}", f"data.num_workers={workers}"))
        tr.next_samples(0, 0)  # starts decoding the next batch
        for fut in list(tr.prefetch.pending.values()):
            fut.result()
        calls.clear()
        samples = tr.next_samples(0, 1)
        assert not any(s.decoded for s in samples)  # lazy: nothing decoded until read
        images = [s.image for s in samples]
        if workers:
            assert calls == [], f"{len(calls)} images decoded in the loop despite the prefetch"
            fresh = [tr.dataset.load_images(tr.dataset.records.index(s.record))[0] for s in samples]
            assert all(torch.equal(a, b) for a, b in zip(images, fresh))
        else:
            assert len(calls) == len(samples)
        tr.prefetch.close()

    class Cache:  # a complete feature cache: every context found by key
        def get(self, key):
            return key

    samples = tr.next_samples(1, 0)
    ctx = ContextProvider(adapter=None, cache=Cache())
    ctx.student(samples), ctx.teacher(samples)
    assert not any(s.decoded for s in samples)


def test_grid_captions_are_shown_in_full():
    """A caption longer than its image is wide is wrapped onto as many lines as it needs (nothing cut),
    each line within the grid's width; its row grows by those lines."""
    from PIL import Image, ImageDraw

    from dopsd_fast.validation import save_grid, wrap_text

    cap = ("a large red circle at the top left on a teal and cream checkerboard [V] background, "
           "with a supercalifragilisticexpialidocious-long-token in it")
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrap_text(d, cap, 128)
    assert "".join(lines).replace(" ", "") == cap.replace(" ", "")  # every character kept, in order
    assert len(lines) >= 4 and all(d.textlength(line) <= 128 for line in lines)
    img = [torch.rand(3, 32, 32)]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as t:
        short = Image.open(save_grid([("a dog", img)], ["base"], Path(t) / "a.png")).size
        long = Image.open(save_grid([(cap, img)], ["base"], Path(t) / "b.png")).size
    assert long[0] == short[0] and long[1] >= short[1] + 11 * (len(lines) - 2)


def test_grid_captions_past_a_few_lines_are_cut_with_an_ellipsis():
    """A 20 000-character prompt drew a grid 10 000 px tall (every line of its caption); a caption is
    cut at MAX_CAPTION_LINES lines, its last ending in "…" within the grid's width, quickly (a word
    of 20 000 characters too)."""
    import tempfile
    import time
    from pathlib import Path

    from PIL import Image, ImageDraw

    from dopsd_fast.validation import MAX_CAPTION_LINES, cap_lines, save_grid, wrap_text

    img = [torch.rand(3, 64, 64)]
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    long = "a large yellow diamond on a [V] background " * 500
    lines = cap_lines(d, wrap_text(d, long, 128, MAX_CAPTION_LINES), 128)
    assert len(lines) == MAX_CAPTION_LINES and lines[-1].endswith("…") and d.textlength(lines[-1]) <= 128
    assert " ".join(lines[:-1]) == " ".join(long.split())[:len(" ".join(lines[:-1]))]  # the start, in order
    short = "a large yellow diamond"
    assert cap_lines(d, wrap_text(d, short, 128), 128) == [short]
    with tempfile.TemporaryDirectory() as t:
        one = Image.open(save_grid([("a dog", img)], ["base"], Path(t) / "a.png")).size
        start = time.monotonic()
        sizes = [Image.open(save_grid([(cap, img)], ["base"], Path(t) / "b.png")).size for cap in (long, "x" * 20000)]
        took = time.monotonic() - start
    for size in sizes:
        assert size[0] == one[0] and size[1] == one[1] - 28 + 6 + 11 * MAX_CAPTION_LINES, (size, one)
    assert took < 20, took


def test_grid_captions_in_other_scripts_are_drawn_or_said(monkeypatch, caplog, tmp_path):
    """Pillow's built-in font draws ASCII only: "Mädchen im Café", Cyrillic and Chinese prompts came out
    as rows of boxes in every grid. A caption with characters it lacks is drawn in the installed font
    that has the most of them (fontconfig's list; one that does not open: the next); the characters no
    installed font draws are said once. A failing lookup (fontconfig's odd output, a bitmap font that
    cannot encode the text) never stops the grid: the built-in font draws it."""
    import logging
    import tempfile
    from pathlib import Path

    from PIL import Image, ImageFont

    from dopsd_fast import validation as V

    base = V._base_font()
    latin, cjk = "Ein Mädchen im Café, красная собака", "一只柯基犬"
    assert V._undrawn(base, latin) >= {"ä", "é", "к"} and V._undrawn(base, "a plain caption") == set()
    assert V.caption_font("a plain caption") is base  # ASCII: the built-in font, as before

    def fresh(table=None):
        monkeypatch.setattr(V, "_FONTS", {})
        monkeypatch.setattr(V, "_told_undrawn", set())
        monkeypatch.setattr(V, "_TABLE", table)
        caplog.clear()

    fresh()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        font = V.caption_font(latin)
    good = [f for f in V._fonts_by_coverage(V._undrawn(base, latin)) if not V._undrawn(ImageFont.truetype(f, 10), latin)]
    if good:  # this machine has a font with them: drawn, nothing said; a font file that does not open is passed over
        assert font is not base and V._undrawn(font, latin) == set() and not caplog.records, caplog.text
        fresh([("/nonexistent/first.ttf", [0], [0x10FFFF])] + [e for e in V._font_table() if e[0] == good[0]])
        assert V._undrawn(V.caption_font(latin), latin) == set()
    else:  # no installed font has them: the boxes stay, and the run says which characters
        assert font is base and "'ä'" in caplog.text and "no installed font draws" in caplog.text
    # no fonts at all (no fontconfig): the characters are said once, the caption still drawn
    fresh([])
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        assert V.caption_font(cjk) is base and V.caption_font(cjk[1:] + " again") is base  # another set, told ones
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "'一'" in said[0] and "fonts-noto-cjk" in said[0], said
    with tempfile.TemporaryDirectory() as t:
        assert Image.open(V.save_grid([(cjk, [torch.rand(3, 32, 32)])], ["base"], Path(t) / "g.png")).size[0] > 0
    # fontconfig printing a file name that is not UTF-8, and a font list of garbage: no error, a font or the base
    fake = tmp_path / "fc-list"
    fake.write_bytes(b"#!/bin/sh\nprintf '/fonts/caf\\351.ttf\\t20-7e a0-17f\\nnot a font line\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(V.shutil, "which", lambda name: str(fake))
    fresh(None)
    assert V.caption_font(latin) is base and V._font_table()[0][0].startswith("/fonts/caf")
    # a bitmap font (Pillow without FreeType, or before 10.1): it cannot encode CJK; nothing raises
    monkeypatch.setattr(V, "_base_font", lambda: ImageFont.load_default_imagefont())
    fresh([])
    with tempfile.TemporaryDirectory() as t:
        for cap in (cjk + " " + latin, (cjk + " " + latin + " ") * 400):  # the long one cut, its ending drawable
            assert Image.open(V.save_grid([(cap, [torch.rand(3, 32, 32)])], ["bäse"], Path(t) / "b.png", title="步"))


def test_log_lines_go_above_the_progress_bar(tmp_path, capsys):
    """With the bar shown and console logging set up (the CLI's basicConfig), a warning during training
    is written on its own line above the bar (tqdm.write), not appended to the bar's line. The console
    handler's level holds (an INFO line under a WARNING handler stays out), a handler writing elsewhere
    (a StringIO) is left as it is, and the caller's handlers are back after the run, an interrupted
    one too."""
    import io
    import logging
    import sys

    from dopsd_fast.trainer import Trainer

    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.setLevel(logging.WARNING)
    elsewhere = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = [handler, elsewhere]
    root.setLevel(logging.INFO)
    try:
        tr = Trainer(tiny_config(tmp_path, "train.progress=true"))
        step = tr.train_step

        def noisy():
            out = step()
            if tr.step == 2:
                logging.getLogger("dopsd_fast.test").warning("a spike at step 2")
                logging.getLogger("dopsd_fast.test").info("an info line")
            return out

        tr.train_step = noisy
        tr.train()
        assert root.handlers == [handler, elsewhere]
        tr2 = Trainer(tiny_config(tmp_path / "b", "train.progress=true"))

        def interrupted():
            raise KeyboardInterrupt

        tr2.train_step = interrupted
        with pytest.raises(KeyboardInterrupt):
            tr2.train()
        assert root.handlers == [handler, elsewhere]
    finally:
        root.handlers = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "D-OPSD" in err and "3/3" in err  # the bar was drawn
    line = next(x for x in err.split("\n") if "a spike at step 2" in x)
    assert line.split("\r")[-1] == "WARNING a spike at step 2", repr(line)
    assert err.count("a spike at step 2") == 1 and "an info line" not in err
    assert elsewhere.stream.getvalue().count("a spike at step 2") == 1


def test_full_fine_tuning_exports_loadable_transformers(tmp_path):
    """A full fine-tuning run wrote no model anyone could load (only its training checkpoints), and
    dopsd-sample pointed at it said only "no pytorch_lora_weights.safetensors". Now the run ends with
    transformer/ and transformer_ema/ (diffusers folders, the model dtype) that from_pretrained and
    dopsd-sample --transformer load, and the --lora message points there."""
    import pytest

    from dopsd_fast.cli import sample_main
    from dopsd_fast.trainer import Trainer

    cfg = tiny_config(tmp_path, "lora.enabled=false", "train.max_steps=2")
    t = Trainer(cfg)
    t.train()
    run = tmp_path / "run"
    cls = type(t.weights.student())
    for name, module in (("transformer", t.weights.student()), ("transformer_ema", t.weights.teacher())):
        loaded = cls.from_pretrained(str(run / name), use_safetensors=True)
        want = module.state_dict()
        got = loaded.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want), name
    out = tmp_path / "s.png"
    assert sample_main(["--config", "tiny-zimage", "--transformer", str(run / "transformer_ema"), "--prompt",
                        "a [V] dog", "--out", str(out), "--steps", "2", "--width", "64", "--height", "64"]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit, match=r"is another model than the config's \(its config differs in: "):
        sample_main(["--transformer", str(run / "transformer"), "--prompt", "x", "--out", str(tmp_path / "z.png")])
    with pytest.raises(SystemExit, match=r"--transformer .*transformer"):
        sample_main(["--lora", str(run), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="is not a transformer folder"):
        sample_main(["--transformer", str(run), "--prompt", "x", "--out", str(tmp_path / "y.png")])
    # a folder whose file lacks a tensor (diffusers left it on the meta device: "Cannot copy out of meta
    # tensor ... unexpected"), or holds NaN: one line naming the folder
    import shutil

    from safetensors.torch import load_file, save_file

    for edit, match in ((lambda sd: sd.pop(sorted(sd)[3]), r"its weights lack 1 tensor\(s\) of the model"),
                        (lambda sd: sd[sorted(sd)[3]].fill_(float("nan")), r"holds NaN or Inf")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(run / "transformer", bad)
        sd = load_file(bad / "diffusion_pytorch_model.safetensors")
        edit(sd)
        save_file(sd, bad / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        with pytest.raises(SystemExit, match=rf"--transformer: .*bad: .*{match}"):
            sample_main(["--config", "tiny-zimage", "--transformer", str(bad), "--prompt", "x", "--out",
                         str(tmp_path / "w.png"), "--steps", "1", "--width", "64", "--height", "64"])

    # the folder is untrusted: a shard index may name no file outside it, nor one diffusers would unpickle;
    # its config.json is compared before diffusers builds what it sizes (a huge width would be allocated)
    import json
    import os

    def folder(name):
        d = tmp_path / name
        shutil.copytree(run / "transformer", d)
        return d

    def refused(d, match):
        with pytest.raises(SystemExit, match=match):
            sample_main(["--config", "tiny-zimage", "--transformer", str(d), "--prompt", "x", "--out",
                         str(tmp_path / "w.png"), "--steps", "1", "--width", "64", "--height", "64"])

    outside = tmp_path / "outside"
    outside.mkdir()
    sd = load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")
    torch.save(sd, outside / "w.bin")
    save_file(sd, outside / "w.safetensors")
    for shard, match in (("shard.bin", r"names the shard 'shard.bin', not a .safetensors file"),
                         ("shard.safetensors", r"shard.safetensors leads outside")):
        d = folder(f"indexed-{shard}")
        (d / "diffusion_pytorch_model.safetensors").unlink()
        save_file({"x": torch.zeros(1)}, d / "other.safetensors")
        os.symlink(outside / ("w.bin" if shard.endswith(".bin") else "w.safetensors"), d / shard)
        (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: shard for k in sd}}))
        refused(d, match)
    conf = json.loads((run / "transformer" / "config.json").read_text())
    for name, edited in (("wide", dict(conf, dim=65536)), ("default", {k: v for k, v in conf.items() if k != "dim"})):
        d = folder(name)  # a width of its own, or none: the class's default (3840), what diffusers would build
        (d / "config.json").write_text(json.dumps(edited))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cls, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("built before the comparison")))
            refused(d, r"is another model than the config's \(its config differs in: dim\)")


@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3"),
                                         (torch.float64, None)], ids=["int32", "bool", "fp8", "float64-taken"])
def test_sample_transformer_refuses_weights_that_are_not_floating_point(tmp_path, monkeypatch, dtype, name):
    """``--transformer`` with integer, bool or fp8 weights loaded and sampled silently (diffusers cast them
    to the model's dtype); refused from the files' headers before from_pretrained, as the LoRA loader
    refuses them. F64 (F32 / BF16 / F16) is taken."""
    from safetensors.torch import load_file, save_file

    from dopsd_fast.cli import sample_main
    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter

    tr = build_adapter(load_config("tiny-zimage").model, load_encoders=False).transformer
    d = tmp_path / "transformer"
    tr.save_pretrained(str(d))
    path = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    key = sorted(sd)[0]
    sd[key] = sd[key].to(dtype)
    save_file(sd, str(path), metadata={"format": "pt"})

    def reached(*a, **k):
        raise RuntimeError("reached from_pretrained")

    monkeypatch.setattr(type(tr), "from_pretrained", reached)
    args = ["--config", "tiny-zimage", "--transformer", str(d), "--prompt", "x", "--out", str(tmp_path / "s.png")]
    if name is None:
        with pytest.raises(SystemExit, match=r"does not load as a ZImageTransformer2DModel \(RuntimeError: reached "
                                             r"from_pretrained\)"):
            sample_main(args)
        return
    with pytest.raises(SystemExit, match=rf"^error: --transformer: {path}: {key} is {name}; a transformer's weights "
                                         r"are F32 / BF16 / F16 / F64 .*; refused$") as e:
        sample_main(args)
    assert len(str(e.value).splitlines()) == 1


def test_sample_transformer_names_tensors_the_model_lacks(tmp_path, caplog):
    """A tensor the model has not (diffusers skips it without a word) is named in a warning."""
    from safetensors.torch import load_file, save_file

    from dopsd_fast.config import load_config
    from dopsd_fast.families import build_adapter
    from dopsd_fast.sample import load_transformer

    adapter = build_adapter(load_config("tiny-zimage").model, load_encoders=False)
    d = tmp_path / "transformer"
    adapter.transformer.save_pretrained(str(d))
    path = d / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(str(path)), "evil.weight": torch.ones(3)}, str(path), metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="dopsd_fast"):
        load_transformer(adapter, str(d))
    assert any("holds 1 tensor(s) this model has not (evil.weight)" in r.getMessage() for r in caplog.records)


def test_sample_transformer_names_itself_for_a_file_linked_from_elsewhere(tmp_path):
    from dopsd_fast.sample import load_transformer

    d = tmp_path / "transformer"
    d.mkdir()
    (tmp_path / "elsewhere.json").write_text("{}")
    (d / "config.json").symlink_to(tmp_path / "elsewhere.json")
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--transformer: .*config\.json leads outside"):
        load_transformer(None, str(d))


def test_no_image_decoded_ahead_once_its_contexts_are_encoded(tmp_path, monkeypatch):
    """The prefetcher decodes a batch's images only where a sample may read them (a context not encoded yet):
    the contexts are memoised, so a long run decoded every step's images for nothing (a decode per step)."""
    from dopsd_fast.data import dataset as ds
    from dopsd_fast.trainer import Trainer

    calls = []
    real = ds.load_image
    monkeypatch.setattr(ds, "load_image", lambda *a: calls.append(a) or real(*a))
    tr = Trainer(tiny_config(tmp_path, "train.max_steps=40", "data.num_workers=2"))
    assert tr.contexts.total == 6 * 2 * 2  # 6 rows, 2 prompts each, 2 branches: what the memo's report projects to
    tr.train()
    assert len(calls) < 30, f"{len(calls)} images decoded in 40 steps of 6 rows"
