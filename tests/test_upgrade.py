"""Artifacts of an earlier version met by this one: a resume on a preset whose shipped weights changed,
a feature cache written before a change of how images are decoded, a dry run of a resume."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dopsd_fast.config import load_config
from dopsd_fast.errors import ConfigError
from dopsd_fast.families.zimage import toy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _toy_cfg(out, steps):
    return load_config(CONFIGS / "toy-concept.yaml", [
        f"train.output_dir={out}", f"train.max_steps={steps}", "train.checkpoint_every=1", "train.progress=false",
        "train.tensorboard=false", "validation.every=0", "validation.at_start=false", "data.builtin=toy-concept"])


@pytest.mark.skipif(not (toy.WEIGHTS_DIR / "student.safetensors").is_file(), reason="no toy weights shipped")
def test_resume_on_other_shipped_preset_weights_is_refused(tmp_path, monkeypatch, caplog):
    """A toy run resumed after an upgrade that ships other toy weights: refused in one line naming the
    preset and the file (it resumed the LoRA on the other base model without a word)."""
    from dopsd_fast.checkpoint import load_checkpoint, save_checkpoint
    from dopsd_fast.trainer import Trainer

    shipped = tmp_path / "weights"
    shutil.copytree(toy.WEIGHTS_DIR, shipped)
    monkeypatch.setattr(toy, "WEIGHTS_DIR", shipped)
    out = tmp_path / "run"
    tr = Trainer(_toy_cfg(out, 1))
    tr.train()
    tr.close()

    def edit(name):  # the next version's file
        sd = load_file(shipped / name)
        k = sorted(k for k in sd if sd[k].is_floating_point())[0]
        sd[k] = sd[k] + 0.01
        save_file(sd, shipped / name)
    edit("classifier.safetensors")  # evaluation's metric network alone: never trained on, the resume goes on
    Trainer(_toy_cfg(out, 2), resume="latest").close()
    edit("student.safetensors")
    with pytest.raises(ConfigError, match=r"model.preset toy-zimage: the weights the package ships for it changed "
                                          r"since the checkpoint \(student.safetensors"):
        Trainer(_toy_cfg(out, 2), resume="latest")
    # an earlier version's checkpoint (no record of the shipped weights): resumed, saying so
    state = load_checkpoint(out / "checkpoints" / "step-0000001")
    state["model_files"].pop("model.preset")
    old = save_checkpoint(tmp_path / "old", 1, state, keep=5, run_id=state["run_id"])
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        tr = Trainer(_toy_cfg(tmp_path / "old-run", 2), resume=str(old))
    assert tr.step == 1 and "records no fingerprint of model.preset toy-zimage's weights" in caplog.text
    tr.close()


def test_cache_of_a_float_image_from_before_its_range_decode_is_not_used(tmp_path):
    """A 32-bit float image with a pixel just over 1 was decoded 255x darker by earlier versions; its
    teacher contexts in a feature cache they wrote are not this version's: they are asked for again
    (named), the 8-bit rows' contexts kept (a cache of an earlier version was read silently)."""
    import json

    import numpy as np
    from PIL import Image

    from dopsd_fast.cache import CacheError, FeatureCache, entry_key, needed_entries, record_key
    from dopsd_fast.data import build_dataset

    rng = np.random.default_rng(0)
    px = rng.random((64, 64), dtype=np.float32)
    px[0, 0] = 1.2  # HDR rounding: one pixel over 1
    Image.fromarray(px, mode="F").save(tmp_path / "f.tif")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": n, "prompt": f"a picture {n}"}) + "\n"
                                                  for n in ("f.tif", "p.png")))
    cfg = load_config(None, ["data.builtin=null", f"data.jsonl={tmp_path / 'train.jsonl'}",
                             "data.prompt_keys=[prompt]", "data.buckets=[[64, 64]]", "data.bucket_scale=1.0"])
    ds = build_dataset(cfg.data, progress=False)
    # the keys an earlier version wrote: the prompt (and, for the teacher, the image's hash and bucket)
    earlier = {entry_key("student", p, None, None) if kind == "student" else
               entry_key("teacher", p, rec.image_hash, rec.bucket) for _k, kind, (p, rec) in needed_entries(ds)}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"version": 1, "identity": {"v": 1}, "entries": {
        k: ["shard-00000.safetensors", k] for k in earlier}}))
    cache = FeatureCache(tmp_path / "cache", {"v": 1})
    assert [(kind, prompt) for _k, kind, (prompt, _r) in cache.missing(ds)] == [("teacher", "a picture f.tif")]
    with pytest.raises(CacheError, match=r"lacks 1 of 4 contexts .* the teacher context of 'a picture f.tif': a row "
                                         r"with a 32-bit float image, added since, or in a cache an earlier version "
                                         r"wrote"):
        cache.require_complete(ds)
    png = next(r for r in ds.records if r.image_path.endswith("p.png"))
    assert record_key("teacher", "a picture p.png", png) in earlier  # an 8-bit row keeps its context


def test_dry_run_of_a_resume_checks_the_checkpoint(tmp_path, capsys):
    """``--dry-run --resume latest`` meets the refusal the resume would meet (it ignored --resume and
    said FITS for a resume the run then refused), and names the checkpoint it would resume."""
    from dopsd_fast.cli import train_main
    from dopsd_fast.trainer import Trainer

    sets = [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.checkpoint_every=1",
            "train.progress=false", "train.tensorboard=false", "validation.every=0", "validation.at_start=false"]
    tr = Trainer(load_config(CONFIGS / "tiny-zimage.yaml", sets))
    tr.train()
    tr.close()
    argv = ["--config", "tiny-zimage", "--resume", "latest", "--dry-run"] + [a for s in sets for a in ("--set", s)]
    assert train_main(argv + ["--set", "train.max_steps=2"]) == 0
    ck = tmp_path / "run" / "checkpoints" / "step-0000001"
    assert f"resume: from {ck} at step 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: resume from .*step-0000001: the config changes what the run "
                                         r"computes \(train.seed: 0 -> 1\)"):
        train_main(argv + ["--set", "train.max_steps=2", "--set", "train.seed=1"])


def test_dry_run_of_a_resume_reads_no_large_tensor(tmp_path, monkeypatch, capsys):
    """The dry run of a resume read the whole checkpoint (a full fine-tuning one is ~100 GB) to compare its
    config and step: now its large tensors are meta placeholders, neither read nor checked; the small
    entries (step, config, random states) are. Another run's checkpoint is refused in one line."""
    from dopsd_fast import checkpoint as C
    from dopsd_fast.cli import train_main
    from dopsd_fast.trainer import Trainer

    sets = [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.checkpoint_every=1",
            "train.progress=false", "train.tensorboard=false", "validation.every=0", "validation.at_start=false",
            "lora.enabled=false"]
    tr = Trainer(load_config(CONFIGS / "tiny-zimage.yaml", sets))
    tr.train()
    tr.close()
    ck = tmp_path / "run" / "checkpoints" / "step-0000001"
    monkeypatch.setattr(C, "PEEK_BYTES", 8192)  # the tiny model's weights: a few KB to a few hundred
    full, peek = C.load_checkpoint(ck), C.load_checkpoint(ck, tensors=False)
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    big = {k for k, v in flat(full).items() if torch.is_tensor(v) and v.numel() * v.element_size() > 8192}
    assert len(big) > 10, len(big)
    got = flat(peek)
    assert all(got[k].is_meta and got[k].shape == flat(full)[k].shape for k in big)
    assert peek["step"] == 1 and peek["config"] == full["config"] and peek["rng"]["torch"].equal(full["rng"]["torch"])
    read = []
    orig = C._dcp_load

    def spy(f, p, md):
        read.append(sum(t.numel() * t.element_size() for t in f.values() if torch.is_tensor(t)))
        return orig(f, p, md)
    monkeypatch.setattr(C, "_dcp_load", spy)
    argv = ["--config", "tiny-zimage", "--resume", "latest", "--dry-run"] + [a for s in sets for a in ("--set", s)]
    assert train_main(argv + ["--set", "train.max_steps=2"]) == 0
    assert f"resume: from {ck} at step 1 (its config and step checked" in capsys.readouterr().out
    assert read and max(read) < 0.5 * sum(v.numel() * v.element_size() for v in flat(full).values()
                                          if torch.is_tensor(v)), read
    other = [s.replace(str(tmp_path / "run"), str(tmp_path / "other")) for s in sets]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text('{"step": 1}\n')  # another run's output
    argv = ["--config", "tiny-zimage", "--resume", str(ck), "--dry-run"] + [a for s in other for a in ("--set", s)]
    with pytest.raises(SystemExit, match=r"^error: --resume .*step-0000001: train.output_dir .*other holds another "
                                         r"run; resume it into an output_dir of its own"):
        train_main(argv + ["--set", "train.max_steps=2"])
