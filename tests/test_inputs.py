"""Right pixels and one-line errors for bad inputs (tiny, CPU)."""

import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config


def _decode(im):
    from dopsd_fast.data.dataset import decode_image

    return decode_image(im)


def test_16bit_png_exif_orientation_palette_and_alpha(tmp_path, caplog):
    from dopsd_fast.data.dataset import load_image

    # 16-bit grayscale at half range: 0.5, not saturated at 1.0 by an 8-bit clip
    p16 = tmp_path / "g16.png"
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(p16)
    img = load_image(str(p16), (32, 32))
    assert abs(img.mean().item() - 0.5) < 1e-3
    # EXIF orientation 6 (rotate 90): a 40 x 20 sensor image is 20 wide, 40 high upright
    jpg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 10, 10)).save(jpg, "JPEG", exif=exif.tobytes())
    assert _decode(Image.open(io.BytesIO(jpg.getvalue()))).shape == (40, 20, 3)
    # palette with transparency and RGBA: composited on data.alpha_background (white), logged once
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    with caplog.at_level(logging.INFO):
        arr = _decode(rgba)
    assert np.allclose(arr[1, 1], [1, 1, 1]) and np.allclose(arr[0, 0], [0, 0, 1])
    assert "alpha channel" in caplog.text
    pal = rgba.convert("P")
    pal.info["transparency"] = 0
    assert _decode(pal).shape == (8, 8, 3)


def _jsonl(tmp_path, lines: list[bytes]):
    img = tmp_path / "a.png"
    Image.new("RGB", (160, 160), (10, 20, 30)).save(img)
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_non_utf8_rows_and_captions_are_one_line_errors(tmp_path):
    from dopsd_fast.config import load_config
    from dopsd_fast.data import DataError, build_dataset

    good = json.dumps({"image": "a.png", "prompt": "a red circle"}).encode()
    bad = b'{"image": "a.png", "prompt": "caf\xe9"}'  # Latin-1, not UTF-8
    jl = _jsonl(tmp_path, [good, bad])
    cfg = load_config(None, [f"data.jsonl={jl}", "data.prompt_keys=[prompt]", "data.bucket_scale=0.125"])
    with pytest.raises(DataError, match=rf"{jl}:2: not UTF-8 text"):
        build_dataset(cfg.data, progress=False)
    cfg = load_config(None, [f"data.jsonl={jl}", "data.prompt_keys=[prompt]", "data.bucket_scale=0.125", "data.skip_bad=true"])
    ds = build_dataset(cfg.data, progress=False)
    assert len(ds.records) == 1 and "not UTF-8" in ds.skipped[0]
    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("RGB", (160, 160)).save(folder / "x.png")
    (folder / "x.txt").write_bytes(b"caf\xe9")
    cfg = load_config(None, [f"data.folder={folder}", "data.bucket_scale=0.125"])
    with pytest.raises(DataError, match=r"x.txt: caption is not UTF-8"):
        build_dataset(cfg.data, progress=False)


def test_damaged_caches_are_refused_at_start_up(tmp_path):
    from dopsd_fast.cache import CacheError
    from dopsd_fast.cli import cache_main
    from dopsd_fast.trainer import Trainer

    cache = tmp_path / "cache"
    assert cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false", "--set",
                       "cache.shard_size=5"]) == 0
    shards = sorted(cache.glob("shard-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # torn
    with pytest.raises(CacheError, match=rf"{shards[1].name} is damaged|lacks"):
        Trainer(tiny_config(tmp_path / "r1", f"cache.dir={cache}"))
    shards[1].unlink()  # deleted
    with pytest.raises(CacheError, match=rf"shard {shards[1].name} is missing"):
        Trainer(tiny_config(tmp_path / "r2", f"cache.dir={cache}"))
    m = cache / "manifest.json"
    m.write_text(m.read_text()[:50])  # truncated manifest
    with pytest.raises(CacheError, match="manifest.json is damaged"):
        Trainer(tiny_config(tmp_path / "r3", f"cache.dir={cache}"))
    m.write_text("[" * 200000 + "]" * 200000)  # nested past Python's recursion limit
    with pytest.raises(CacheError, match=r"manifest.json is damaged \(its JSON nests too deeply to read\)"):
        Trainer(tiny_config(tmp_path / "r4", f"cache.dir={cache}"))


def test_bad_device_sample_lora_and_full_disk_are_one_line_errors(tmp_path, monkeypatch):
    from dopsd_fast.cli import sample_main, train_main

    with pytest.raises(SystemExit, match=r"error: model.device: 'gpu'"):
        train_main(["--config", "tiny-zimage", "--set", "model.device=gpu", "--set", f"train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(SystemExit, match=r"error: --lora .*: no such file or folder"):
        sample_main(["--config", "tiny-zimage", "--prompt", "a cat", "--lora", str(tmp_path / "nolora"), "--out", str(tmp_path / "s.png")])
    torn = tmp_path / "lora"
    torn.mkdir()
    (torn / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(SystemExit, match=r"error: --lora: .* does not load as a LoRA"):
        sample_main(["--config", "tiny-zimage", "--prompt", "a cat", "--lora", str(torn), "--out", str(tmp_path / "s.png")])

    def full_disk(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"error: writing the checkpoint failed \(a file could not grow: the disk "
                                         r"is full, or a file size limit was reached"):
        train_main(["--config", "tiny-zimage", "--set", f"train.output_dir={tmp_path / 'full'}", "--set", "train.max_steps=1",
                    "--set", "train.progress=false", "--set", "validation.at_start=false", "--set",
                    "train.tensorboard=false"])


def test_alpha_message_names_each_file_and_an_empty_folder_is_named(tmp_path, caplog):
    """Each RGBA file is named in its alpha message (exif_transpose returns a copy without a file
    name), once per file; a data.folder with no usable images names the folder."""
    from dopsd_fast.config import load_config
    from dopsd_fast.data import DataError, build_dataset
    from dopsd_fast.data.dataset import load_image

    paths = []
    for name in ("first.png", "second.png"):
        p = tmp_path / name
        Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(p)
        paths.append(p)
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        for p in paths + paths:
            load_image(str(p), (16, 16))
    lines = [r.getMessage() for r in caplog.records if "alpha channel" in r.getMessage()]
    assert len(lines) == 2 and str(paths[0]) in lines[0] and str(paths[1]) in lines[1], lines
    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    cfg = load_config(None, ["data.builtin=null", f"data.folder={empty}"]).data
    with pytest.raises(DataError, match=f"data.folder {empty} has no usable rows"):
        build_dataset(cfg, progress=False)
    nothing = tmp_path / "rows.jsonl"  # an empty data.jsonl: told about its rows, not about caption files
    nothing.write_text("\n")
    cfg = load_config(None, ["data.builtin=null", f"data.jsonl={nothing}"]).data
    with pytest.raises(DataError, match=rf"data.jsonl {nothing} has no usable rows \(the file has no rows: one JSON "
                                        r"object per line"):
        build_dataset(cfg, progress=False)


@pytest.mark.parametrize("args,match", [
    (["--width", "0"], r"--width 0: must be at least 1"),
    (["--height", "-16"], r"--height -16: must be at least 1"),
    (["--steps", "0"], r"--steps 0: must be at least 1"),
    (["--seed", "-1"], r"--seed -1: must be in \[0, 2\^63\)"),
    (["--seed", str(2 ** 64)], r"--seed \d+: must be in"),
    (["--out", "{tmp}"], r"--out .* is a folder"),
    (["--lora-scale", "0.5"], r"--lora-scale scales a LoRA: give it with --lora DIR"),
])
def test_dopsd_sample_flags_out_of_range_are_one_line(tmp_path, args, match):
    """0 was taken as 'not given' (the default size or steps, silently); a negative one or a huge seed
    ended in an error inside torch, an output folder in a rename error naming a temp file."""
    from dopsd_fast.cli import sample_main

    (tmp_path / "d.png").mkdir()
    args = [a.replace("{tmp}", str(tmp_path / "d.png")) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "s.png")]
    with pytest.raises(SystemExit, match=match):
        sample_main(["--config", "tiny-zimage", "--prompt", "a cat", *out, *args])
    assert not (tmp_path / "s.png").exists()


def test_dopsd_sample_out_is_checked_before_the_model_is_read(tmp_path, monkeypatch):
    """``--out`` whose folder part is a file, or a folder that takes no file, ended after the model was
    read and sampled, in an errno line naming the writer's hidden temporary file (or "File exists" of the
    folder part). Now one line naming --out and the cause, before anything is loaded; a write that fails
    later (a full disk) names --out too."""
    import errno
    from pathlib import Path

    import dopsd_fast.sample as S
    from dopsd_fast.cli import sample_main

    (tmp_path / "base.png").write_bytes(b"not a folder")
    loaded = []
    real = S.build_adapter
    monkeypatch.setattr(S, "build_adapter", lambda *a, **k: loaded.append(1) or real(*a, **k))
    common = ["--config", "tiny-zimage", "--prompt", "a cat", "--steps", "1"]
    for out, match in ((tmp_path / "base.png" / "x.png", rf"{re.escape(str(tmp_path / 'base.png'))} is a file, not a "
                                                         r"folder$"),
                       (tmp_path / "base.png" / "new" / "x.png", r".*/base\.png is a file, not a folder$"),
                       ("/proc/x.png", r"cannot write in /proc \(the folder takes no new files\)$")):
        with pytest.raises(SystemExit, match=rf"^error: --out {re.escape(str(out))}: {match}") as e:
            sample_main([*common, "--out", str(out)])
        assert ".tmp-" not in str(e.value) and "Errno" not in str(e.value)
    assert not loaded

    def full_disk(rows, headers, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path).parent / ".s.tmp-1.png"))

    monkeypatch.setattr(S, "save_grid", full_disk)
    out = tmp_path / "fine" / "s.png"
    with pytest.raises(SystemExit, match=rf"^error: --out {re.escape(str(out))}: cannot write it \(the disk is full\)$"):
        sample_main([*common, "--out", str(out)])


def test_dopsd_sample_refuses_a_prompt_over_the_datas_limit(tmp_path):
    """The data refuses a caption over MAX_PROMPT_CHARS; --prompt took any length (a 20k-character prompt
    drew a grid 10 000 px tall)."""
    from dopsd_fast.cli import sample_main
    from dopsd_fast.data.dataset import MAX_PROMPT_CHARS

    long = "a cat " * (MAX_PROMPT_CHARS // 6 + 1)
    with pytest.raises(SystemExit, match=rf"^error: --prompt: a prompt {len(long)} characters long, over "
                                         rf"{MAX_PROMPT_CHARS}"):
        sample_main(["--config", "tiny-zimage", "--prompt", "a dog", "--prompt", long, "--out", str(tmp_path / "s.png")])
    assert not (tmp_path / "s.png").exists()


def test_dopsd_sample_lora_scales_are_columns_from_the_same_noise(tmp_path):
    """``--lora-scale 0 --lora-scale 1``: two columns from the same noise; strength 0 is the model without
    the LoRA, 1 the LoRA as loaded by default."""
    import numpy as np

    from dopsd_fast.cli import sample_main
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "train.max_steps=2", "optim.lr=0.05")  # a LoRA that changes the samples
    Trainer(cfg).train()
    lora = str(tmp_path / "run" / "lora")
    common = ["--config", "tiny-zimage", "--prompt", "a photo of a cup", "--steps", "2"]

    def cells(out, n):
        """The n sample cells of the grid's one row (the layout of validation.save_grid), below their labels."""
        a = np.asarray(Image.open(out).convert("RGB"), dtype=int)
        w = (a.shape[1] - 6) // n - 6
        return [a[24 + 16:24 + w, 6 + c * (w + 6):6 + c * (w + 6) + w] for c in range(n)]

    sample_main([*common, "--out", str(tmp_path / "base.png")])
    sample_main([*common, "--lora", lora, "--out", str(tmp_path / "lora.png")])
    sample_main([*common, "--lora", lora, "--lora-scale", "0", "--lora-scale", "1", "--out", str(tmp_path / "s.png")])
    (base,), (full,) = cells(tmp_path / "base.png", 1), cells(tmp_path / "lora.png", 1)
    zero, one = cells(tmp_path / "s.png", 2)
    assert np.abs(base - full).max() > 8  # the LoRA changes the sample
    assert np.abs(zero - base).max() <= 1 and np.abs(one - full).max() <= 1
    for bad in ("nan", "1e300", "-101"):  # 1e300 drew a grid of NaN cast to bytes, with a numpy warning
        with pytest.raises(SystemExit, match=re.escape(f"--lora-scale {float(bad):g}: must be a number from -100 to 100")):
            sample_main([*common, "--lora", lora, "--lora-scale", bad, "--out", str(tmp_path / "n.png")])
    # samples that are not finite (an update that overflows the model's dtype) are one line, no grid
    import dopsd_fast.sample as S

    real = S.sample_images
    S.sample_images = lambda *a, **k: [im * float("nan") for im in real(*a, **k)]
    try:
        with pytest.raises(SystemExit, match=r"the samples at --lora-scale 3 are not finite \(NaN / inf\)"):
            sample_main([*common, "--lora", lora, "--lora-scale", "3", "--out", str(tmp_path / "n.png")])
    finally:
        S.sample_images = real
    assert not (tmp_path / "n.png").exists()


def test_a_float_image_is_scaled_by_its_range_never_by_one_pixel(tmp_path):
    """A [0, 1] float image with one pixel just over 1 (HDR rounding) was divided by 255 and trained on
    near-black, silently; a range that is neither [0, 1] nor [0, 255] is now refused at start-up."""
    from dopsd_fast.config import load_config
    from dopsd_fast.data import DataError, build_dataset

    def f(arr):
        return Image.fromarray(np.asarray(arr, np.float32), "F")

    half = np.full((8, 8), 0.5, np.float32)
    over = half.copy()
    over[0, 0] = 1.0001
    assert abs(_decode(f(over))[4, 4, 0] - 0.5) < 1e-4  # was 0.00196
    assert abs(_decode(f(half * 255))[4, 4, 0] - 0.5) < 1e-4  # a [0, 255] float image
    dark = _decode(f(half + np.eye(8, dtype=np.float32) * 6.5))  # a dark [0, 255] image: its top is no bound
    assert abs(dark[0, 0, 0] - 7 / 255) < 1e-6 and abs(dark[0, 1, 0] - 0.5 / 255) < 1e-6
    with pytest.raises(DataError, match=r"pixels in \[0.5, 1000\], neither in \[0, 1\] nor in \[0, 255\]"):
        _decode(f(half + np.eye(8, dtype=np.float32) * 999.5))
    with pytest.raises(DataError, match="NaN or infinite"):
        _decode(f(np.full((8, 8), np.nan)))
    folder = tmp_path / "d"
    folder.mkdir()
    f(np.full((160, 160), -300.0)).save(folder / "x.tif")
    (folder / "x.txt").write_text("a grey square")
    cfg = load_config(None, [f"data.folder={folder}", "data.bucket_scale=0.125"])
    with pytest.raises(DataError, match=r"x.tif.*neither in \[0, 1\] nor in \[0, 255\]"):
        build_dataset(cfg.data, progress=False)


def test_json_past_its_digit_limit_names_the_file_and_row(tmp_path):
    """json raises a plain ValueError (not a JSONDecodeError) for an integer of more than 4300 digits: the
    data row was an unnamed one-line stop that data.skip_bad did not skip, and one such line in
    metrics.jsonl stopped every resume."""
    from dopsd_fast.config import load_config
    from dopsd_fast.data import DataError, build_dataset
    from dopsd_fast.logging_utils import parse_row

    good = json.dumps({"image": "a.png", "prompt": "a red circle"}).encode()
    bad = b'{"image": "a.png", "prompt": "x", "size": ' + b"9" * 5000 + b"}"
    jl = _jsonl(tmp_path, [good, bad])
    cfg = load_config(None, [f"data.jsonl={jl}", "data.prompt_keys=[prompt]", "data.bucket_scale=0.125"])
    with pytest.raises(DataError, match=rf"{jl}:2: malformed JSON line: a number of more than \d+ digits"):
        build_dataset(cfg.data, progress=False)
    cfg = load_config(None, [f"data.jsonl={jl}", "data.prompt_keys=[prompt]", "data.bucket_scale=0.125", "data.skip_bad=true"])
    assert len(build_dataset(cfg.data, progress=False).records) == 1
    assert parse_row('{"step": ' + "9" * 5000 + "}") is None
    assert parse_row("[" * 100000 + "]" * 100000) is None
    assert parse_row('{"step": 3, "loss": 0.5}') == ({"step": 3, "loss": 0.5}, 3)


def test_a_bad_export_mark_is_an_export_without_a_step(tmp_path):
    """export.json is read on the resume of a finished run; a step of 1e999 or nested past the recursion
    limit was an "unexpected" stop (OverflowError / RecursionError) instead of "no step"."""
    from types import SimpleNamespace

    from dopsd_fast.trainer import Trainer

    fake = SimpleNamespace(cfg=SimpleNamespace(lora=SimpleNamespace(enabled=True)), out=tmp_path, step=5,
                           EXPORT_MARK=Trainer.EXPORT_MARK)
    for name, mark in (("lora", '{"step": 1e999}'), ("lora_ema", '{"step": ' + "[" * 100000 + "]" * 100000 + "}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "export.json").write_text(mark)
    assert Trainer._stale_final_exports(fake) == []
    (tmp_path / "lora" / "export.json").write_text('{"step": 4}')
    assert Trainer._stale_final_exports(fake) == ["lora/ (of step 4)"]


def test_a_model_folders_json_past_the_digit_limit_names_the_file(tmp_path):
    from dopsd_fast.sample import _small_json

    p = tmp_path / "config.json"
    p.write_text('{"num_layers": ' + "9" * 5000 + "}")
    with pytest.raises(ValueError, match=rf"--transformer: {p} is not JSON text"):
        _small_json(p, "--transformer", 1 << 20)


def test_a_caption_file_in_upper_case_is_the_images_caption(tmp_path):
    """Image suffixes matched in any case (A.PNG), the caption's did not: a.png + a.TXT was "no caption"."""
    from dopsd_fast.config import load_config
    from dopsd_fast.data import build_dataset

    folder = tmp_path / "f"
    folder.mkdir()
    for stem, txt in (("a", "a.TXT"), ("b", "b.txt")):
        Image.new("RGB", (160, 160)).save(folder / f"{stem}.png")
        (folder / txt).write_text(f"caption {stem}")
    cfg = load_config(None, [f"data.folder={folder}", "data.bucket_scale=0.125"])
    ds = build_dataset(cfg.data, progress=False)
    assert sorted(r.prompts[0] for r in ds.records) == ["caption a", "caption b"]


def test_an_empty_config_file_is_one_line_naming_it(tmp_path):
    """The fields' own defaults are no run (built-in tiny data at 1024-pixel buckets): an empty file failed
    on a hidden cache file's image size."""
    from dopsd_fast.config import ConfigError, load_config

    p = tmp_path / "empty.yaml"
    p.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=rf"config file {p} holds no settings; start from a shipped recipe"):
        load_config(str(p))


def test_buckets_given_and_changed_by_scale_or_rounding_are_said(tmp_path, caplog):
    """A recipe's data.bucket_scale applies to data.buckets given on the command line, and sides round to
    data.bucket_multiple: [[100, 100]] under tiny-zimage became 16 x 16 without a word."""
    from dopsd_fast.config import load_config
    from dopsd_fast.data import build_dataset

    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("RGB", (160, 160)).save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    for over, said in ((["data.buckets=[[100,100]]", "data.bucket_scale=0.125"], "[[100, 100]] -> [[16, 16]] (x data.bucket_scale 0.125"),
                       (["data.buckets=[[96,96]]", "data.bucket_scale=1"], None)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dopsd_fast"):
            build_dataset(load_config(None, [f"data.folder={folder}", *over]).data, progress=False)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data.buckets")]
        assert lines == ([] if said is None else [lines[0]]) and (said is None or said in lines[0]), caplog.text


def test_rows_reading_images_outside_the_data_folder_are_said(tmp_path, caplog):
    """An absolute path or `..` leading out: accepted (a user's own index may mean it), and said in one line (a
    received dataset's rows could name any image the user can read); a link is not followed (a hub snapshot's
    images are links into its blob store)."""
    from dopsd_fast.config import load_config
    from dopsd_fast.data import build_dataset

    (tmp_path / "d").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (160, 160)).save(tmp_path / "d" / "in.png")
    Image.new("RGB", (160, 160)).save(tmp_path / "elsewhere" / "out.png")
    (tmp_path / "d" / "link.png").symlink_to(tmp_path / "elsewhere" / "out.png")
    jl = tmp_path / "d" / "train.jsonl"
    for rows, n in (([{"image": "in.png"}], 0), ([{"image": "in.png"}, {"image": "../elsewhere/out.png"},
                                                   {"image": str(tmp_path / "elsewhere" / "out.png")},
                                                   {"image": "link.png"}], 2)):
        jl.write_text("".join(json.dumps({**r, "prompt": "p"}) + "\n" for r in rows))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dopsd_fast"):
            build_dataset(load_config(None, [f"data.jsonl={jl}", "data.prompt_keys=[prompt]",
                                             "data.bucket_scale=0.125"]).data, progress=False)
        said = [r.getMessage() for r in caplog.records if "lead outside" in r.getMessage()]
        assert len(said) == (1 if n else 0), caplog.text
        assert not n or f"{n} image path(s) of its rows lead outside" in said[0] and f"{jl}:2" in said[0]


def test_a_jsonl_row_with_a_key_twice_is_refused(tmp_path):
    """json keeps the last of a repeated key: a row's first image was dropped without a word."""
    from dopsd_fast.config import load_config
    from dopsd_fast.data import DataError, build_dataset

    jl = _jsonl(tmp_path, [b'{"image": "a.png", "prompt": "x", "image": "b.png"}'])
    cfg = load_config(None, [f"data.jsonl={jl}", "data.prompt_keys=[prompt]", "data.bucket_scale=0.125"])
    with pytest.raises(DataError, match=rf"{jl}:1: field 'image' given twice"):
        build_dataset(cfg.data, progress=False)
    jl.write_text('{"image": "a.png", "prompt": "x", "meta": {"src": "1", "src": "2"}}\n')
    assert len(build_dataset(cfg.data, progress=False).records) == 1  # inside a field: not the row's fields


def test_every_row_data_skip_bad_skips_is_listed_in_the_run_folder(tmp_path, caplog):
    """data.skip_bad named the first skipped row only: with 1 % of 50k rows bad, the others were nowhere. A
    run lists every one, with why, in skipped_rows.txt (a run output: a reused folder is refused as before)."""
    import logging

    from dopsd_fast.safety import RUN_OUTPUTS
    from dopsd_fast.trainer import Trainer
    from tests.conftest import tiny_config

    rows = [json.dumps({"image": "a.png", "prompt": f"a red circle {i}"}).encode() for i in range(3)]
    rows[1:1] = [b'{"image": "missing.png", "prompt": "x"}', b"{not json"]
    jl = _jsonl(tmp_path, rows)
    args = ("data.builtin=null", f"data.jsonl={jl}", "data.prompt_keys=[prompt]", "data.skip_bad=true")
    Trainer(tiny_config(tmp_path, *args)).close()  # a start that goes no further (it failed, or was stopped)
    assert not (tmp_path / "run" / "skipped_rows.txt").exists()  # wrote nothing: the same command runs again
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        Trainer(tiny_config(tmp_path, *args, "train.max_steps=1")).train()
    listed = (tmp_path / "run" / "skipped_rows.txt").read_text().splitlines()
    assert len(listed) == 2 and listed[0].startswith(f"{jl}:2: ") and "missing.png" in listed[0], listed
    assert listed[1].startswith(f"{jl}:3: malformed JSON line"), listed
    assert f"the 2 skipped rows are listed, each with why, in {tmp_path / 'run' / 'skipped_rows.txt'}" in caplog.text
    assert "skipped_rows.txt" in RUN_OUTPUTS
