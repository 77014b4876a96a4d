"""Data loading, buckets, and every bad-input error (file, row and field named)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from dopsd_fast.config import load_config
from dopsd_fast.data import BucketBatchSampler, DataError, ONE_MEGAPIXEL_BUCKETS, assign_bucket, build_dataset, make_buckets


def _img(path, size=(160, 160), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def _cfg(**data):
    base = {"bucket_scale": 0.125, "prompt_keys": ["prompt"]}
    base.update(data)
    return load_config(None, [f"data.{k}={json.dumps(v)}" for k, v in base.items()] + ["data.builtin=null"]).data


def _jsonl(tmp_path, rows, raw=None):
    p = tmp_path / "train.jsonl"
    p.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_buckets():
    assert len(ONE_MEGAPIXEL_BUCKETS) == 11
    assert make_buckets("1mp")[0] == (1024, 1024)
    small = make_buckets("1mp", 0.125, 16)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in small) and len(set(small)) == len(small)
    assert assign_bucket(2000, 1000, make_buckets("1mp")) == (1280, 720)  # ratio 1.78 is nearest to 2
    assert assign_bucket(2400, 1000, make_buckets("1mp")) == (1344, 576)
    assert assign_bucket(1000, 1000, make_buckets("1mp")) is None  # smaller than every bucket: no upscale
    assert assign_bucket(1100, 1100, make_buckets("1mp")) == (1024, 1024)


def test_builtin_tiny_dataset_loads():
    ds = build_dataset(load_config(None).data, progress=False)
    assert len(ds) == 6
    s = ds.get(0, prompt_index=1)
    w, h = s.record.bucket
    assert s.image.shape == (3, h, w) and 0 <= float(s.image.min()) and float(s.image.max()) <= 1
    assert "[V]" in s.prompt and s.prompt == ds.records[0].prompts[1]


def test_jsonl_and_folder_sources(tmp_path, caplog):
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub.png", (300, 150))
    path = _jsonl(tmp_path, [{"image": "a.png", "short": "a dog", "long": "a big dog"},
                             {"image": ["a.png", "sub.png"], "short": "x", "long": "y"}])
    ds = build_dataset(_cfg(jsonl=path, prompt_keys=["short", "long"]), progress=False)
    assert ds.records[0].prompts == ["a dog", "a big dog"]
    assert ds.records[1].image_path.endswith("sub.png") and ds.records[1].reference_paths[0].endswith("a.png")
    assert ds.records[1].bucket[0] > ds.records[1].bucket[1]  # wide image -> wide bucket
    folder = tmp_path / "folder"
    folder.mkdir()
    _img(folder / "x.png")
    (folder / "x.txt").write_text("a caption\n")
    (folder / "._x.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a macOS copy's AppleDouble file
    ds = build_dataset(_cfg(folder=str(folder)), progress=False)
    assert ds.records[0].prompts == ["a caption"] and len(ds.records) == 1  # it stopped the run: no caption
    # TIFF and GIF are images too, a caption's or a JSONL's byte-order mark is no part of the text (it
    # became three tokens of every prompt), and images in subfolders (a run's samples, masks: no captions)
    # are not read but counted in a warning (they were skipped without a word)
    import logging

    from PIL import Image

    Image.new("RGB", (256, 256), (9, 9, 9)).save(folder / "y.gif")
    (folder / "y.txt").write_bytes("\ufeffa [V] cup".encode("utf-8"))
    Image.new("RGB", (256, 256), (9, 9, 9)).save(folder / "z.tif")
    (folder / "z.txt").write_text("a tiff")
    (folder / "runs" / "samples").mkdir(parents=True)
    _img(folder / "runs" / "samples" / "step-0000002.png")
    (folder / ".thumbs").mkdir()
    _img(folder / ".thumbs" / "x.png")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        ds = build_dataset(_cfg(folder=str(folder)), progress=False)
    assert [(Path(r.image_path).name, r.prompts) for r in ds.records] == \
        [("x.png", ["a caption"]), ("y.gif", ["a [V] cup"]), ("z.tif", ["a tiff"])]
    assert "1 image(s) in its subfolders are not read (first: runs/samples/step-0000002.png); the folder's own 3 are" \
        in caplog.text
    Path(path).write_bytes(b"\xef\xbb\xbf" + Path(path).read_bytes())
    assert build_dataset(_cfg(jsonl=path, prompt_keys=["short", "long"]), progress=False).records[0].prompts == \
        ["a dog", "a big dog"]


def test_prompt_draw_is_random_but_seeded(tmp_path):
    import random

    ds = build_dataset(load_config(None).data, progress=False)
    a = [ds.get(0, random.Random(i)).prompt for i in range(20)]
    b = [ds.get(0, random.Random(i)).prompt for i in range(20)]
    assert a == b and len(set(a)) == 2


@pytest.mark.parametrize("case,match", [
    ("missing_file", r"train.jsonl:1: field 'image': image file not found"),
    ("truncated", r"train.jsonl:1: field 'image': cannot read image"),
    ("not_image", r"train.jsonl:1: field 'image': cannot read image"),
    ("missing_prompt", r"train.jsonl:1: missing prompt field 'prompt'"),
    ("empty_prompt", r"train.jsonl:1: prompt field 'prompt' is empty"),
    ("missing_image_key", r"train.jsonl:1: missing field 'image'"),
    ("too_small", r"train.jsonl:1: field 'image': image .* is 40x40, which fits inside no bucket \(the nearest "
                  r"aspect's is 128x128\); .*data.bucket_scale"),
    ("malformed", r"train.jsonl:2: malformed JSON line"),
    # each ended in a line naming no file or row (a utf-8 encode error, a recursion error, PIL's "too many
    # characters in string" drawing the validation grid)
    ("surrogate", r"train.jsonl:1: prompt field 'prompt' holds '\\ud800' at character 2, not a character of text"),
    ("deep", r"train.jsonl:1: JSON nested too deeply to read"),
    ("huge_prompt", r"train.jsonl:1: prompt field 'prompt' is 3000000 characters long, over 20000"),
])
def test_bad_jsonl_rows(tmp_path, case, match):
    good = _img(tmp_path / "good.png")
    rows = {
        "missing_file": [{"image": "nope.png", "prompt": "x"}],
        "missing_prompt": [{"image": "good.png", "caption": "x"}],
        "empty_prompt": [{"image": "good.png", "prompt": "   "}],
        "missing_image_key": [{"img": "good.png", "prompt": "x"}],
    }
    raw = None
    if case == "truncated":
        data = good.read_bytes()
        (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
        rows[case] = [{"image": "t.png", "prompt": "x"}]
    elif case == "not_image":
        (tmp_path / "t.png").write_text("hello")
        rows[case] = [{"image": "t.png", "prompt": "x"}]
    elif case == "too_small":
        _img(tmp_path / "s.png", (40, 40))
        rows[case] = [{"image": "s.png", "prompt": "x"}]
    elif case == "surrogate":
        raw = '{"image": "good.png", "prompt": "x\\ud800y"}\n'
    elif case == "deep":
        raw = '{"image": "good.png", "prompt": "x", "z": ' + "[" * 100000 + "]" * 100000 + "}\n"
    elif case == "huge_prompt":
        rows[case] = [{"image": "good.png", "prompt": "a" * 3_000_000}]
    elif case == "malformed":
        raw = json.dumps({"image": "good.png", "prompt": "x"}) + "\n{\"image\": \"good.png\", \"prompt\": \n"
    path = _jsonl(tmp_path, rows.get(case, []), raw)
    with pytest.raises(DataError, match=match):
        build_dataset(_cfg(jsonl=path), progress=False)


def test_bad_folder_rows(tmp_path):
    _img(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a.png: no caption file a.txt"):
        build_dataset(_cfg(folder=str(tmp_path)), progress=False)
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"a.txt: caption is empty"):
        build_dataset(_cfg(folder=str(tmp_path)), progress=False)


def test_skip_bad_counts_and_keeps_good(tmp_path):
    _img(tmp_path / "good.png")
    path = _jsonl(tmp_path, [{"image": "good.png", "prompt": "x"}, {"image": "nope.png", "prompt": "y"},
                             {"image": "good.png", "prompt": ""}])
    ds = build_dataset(_cfg(jsonl=path, skip_bad=True), progress=False)
    assert len(ds) == 1 and len(ds.skipped) == 2
    assert "train.jsonl:2" in ds.skipped[0] and "train.jsonl:3" in ds.skipped[1]
    path = _jsonl(tmp_path, [{"image": "nope.png", "prompt": "y"}])
    with pytest.raises(DataError, match="no usable rows"):
        build_dataset(_cfg(jsonl=path, skip_bad=True), progress=False)


def test_missing_sources(tmp_path):
    with pytest.raises(DataError, match="data.jsonl: file not found"):
        build_dataset(_cfg(jsonl=str(tmp_path / "x.jsonl")), progress=False)
    with pytest.raises(DataError, match=rf"data.jsonl: {tmp_path} is a folder; give the JSONL file in it, or "
                                        rf"data.folder={tmp_path}"):
        build_dataset(_cfg(jsonl=str(tmp_path)), progress=False)
    with pytest.raises(DataError, match="data.folder: not a directory"):
        build_dataset(_cfg(folder=str(tmp_path / "x")), progress=False)


def test_sampler_resumable_and_rank_aware():
    buckets = [(1, 1)] * 5 + [(2, 1)] * 4
    s = BucketBatchSampler(buckets, 2, seed=3)
    seq = [s.next_batch() for _ in range(7)]
    for b in seq:
        assert len({buckets[i] for i in b}) == 1
    s2 = BucketBatchSampler(buckets, 2, seed=3)
    for _ in range(4):
        s2.next_batch()
    s3 = BucketBatchSampler(buckets, 2, seed=3)
    s3.load_state_dict(s2.state_dict())
    assert [s3.next_batch() for _ in range(3)] == seq[4:]
    # 2 ranks x batch 2 split the global batches of 1 rank x batch 4: rank r takes slice r of each
    r0 = BucketBatchSampler(buckets, 2, seed=3, rank=0, world_size=2).epoch_batches(0)
    r1 = BucketBatchSampler(buckets, 2, seed=3, rank=1, world_size=2).epoch_batches(0)
    allb = BucketBatchSampler(buckets, 4, seed=3).epoch_batches(0)
    assert [a + b for a, b in zip(r0, r1)] == allb
    # every global batch is full and one bucket: a bucket's last one is filled from its own samples
    for g in allb:
        assert len(g) == 4 and len({buckets[i] for i in g}) == 1
    assert sorted(set(i for g in allb for i in g)) == list(range(9))
    assert len(BucketBatchSampler(buckets, 4, seed=3, drop_last=True).epoch_batches(0)) == 2


def test_peek_batch_is_the_next_batch_and_advances_nothing():
    """What the image prefetcher reads: peek_batch() == the following next_batch(), across epoch ends,
    and the sampler's state (what a checkpoint saves) is untouched by a peek."""
    from dopsd_fast.data.sampler import BucketBatchSampler

    s = BucketBatchSampler([(64, 64)] * 5 + [(32, 64)] * 3, 2, seed=7)
    for _ in range(12):  # several epochs
        state = s.state_dict()
        peeked = s.peek_batch()
        assert s.state_dict() == state
        assert s.next_batch() == peeked


def test_builtin_dataset_location_logged_once_and_overridable(tmp_path, monkeypatch, caplog):
    """The built-in datasets go under $DOPSD_FAST_HOME (default ~/.cache/dopsd_fast); the first use
    logs where, a reuse says nothing."""
    import logging

    from dopsd_fast.data import tiny

    monkeypatch.setenv(tiny.HOME_ENV, str(tmp_path / "elsewhere"))
    assert tiny.home() == tmp_path / "elsewhere"
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        jl = tiny.ensure_tiny_dataset()
    assert jl.parent.parent == tmp_path / "elsewhere" and jl.is_file()
    lines = [r.getMessage() for r in caplog.records if "built-in dataset written to" in r.getMessage()]
    assert len(lines) == 1 and str(jl.parent) in lines[0] and tiny.HOME_ENV in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        assert tiny.ensure_tiny_dataset() == jl
    assert not [r for r in caplog.records if "built-in dataset written" in r.getMessage()]
    monkeypatch.delenv(tiny.HOME_ENV)
    assert tiny.home() == Path.home() / ".cache" / "dopsd_fast"


def test_an_image_damaged_during_the_run_is_named_with_its_row(tmp_path):
    """Checked at start-up, then truncated while the run goes on: the decode at its step was PIL's
    'image file is truncated' alone (no file, no row); now a DataError naming both, also through the
    prefetching threads."""
    from dopsd_fast.data.prefetch import ImagePrefetcher

    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png", color=(10, 200, 30))
    path = _jsonl(tmp_path, [{"image": "a.png", "prompt": "a"}, {"image": "b.png", "prompt": "b"}])
    ds = build_dataset(_cfg(jsonl=path), progress=False)
    data = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])
    assert ds.load_images(0)[0].shape[0] == 3
    with pytest.raises(DataError, match=r"train\.jsonl:2: image .*b\.png: .*truncated"):
        ds.load_images(1)
    pre = ImagePrefetcher(ds, 1)

    class _Peek:
        def peek_batch(self):
            return [1]

    pre.ahead(_Peek())
    with pytest.raises(DataError, match=r"train\.jsonl:2: image .*b\.png"):
        ds.get(1, images=pre.images(1)).image
    pre.close()


def test_a_batch_larger_than_the_workers_reads_every_prefetched_image(tmp_path):
    """The trainer takes a batch's decodes, then starts the next batch's: that cancelled every queued
    decode the next batch does not need, the current batch's included, so a batch larger than the workers
    with slow decodes ended in 'CancelledError' at the read."""
    import threading

    from dopsd_fast.data.prefetch import ImagePrefetcher

    gate = threading.Event()

    class _Slow:
        def load_images(self, i):
            gate.wait(5)  # decodes that have not finished (or started) when the next batch is queued
            return [i]

    class _Peek:
        def __init__(self, batch):
            self.batch = batch

        def peek_batch(self):
            return self.batch

    pre = ImagePrefetcher(_Slow(), 1)
    pre.ahead(_Peek([0, 1, 2, 3]))  # batch 1 queued: one worker, so 1..3 have not started
    taken = [pre.images(i) for i in (0, 1, 2, 3)]  # the trainer's next_samples: batch 1 handed over ...
    pre.ahead(_Peek([4, 5, 6, 7]))  # ... then batch 2 queued
    gate.set()
    assert [t() for t in taken] == [[0], [1], [2], [3]]
    pre.close()


def _declared_png(path, w, h):
    """A PNG whose header declares w x h RGB with one row of data: a few hundred bytes, undecodable."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * w))) + chunk(b"IEND", b""))
    return path


def test_an_image_over_max_image_pixels_is_refused_before_its_decode(tmp_path, monkeypatch):
    from dopsd_fast.cli import sample_main

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test

    _img(tmp_path / "good.png")
    _declared_png(tmp_path / "huge.png", 9000, 9000)  # 81 MP declared in ~200 bytes (a decode: ~2 GB)
    path = _jsonl(tmp_path, [{"image": "good.png", "prompt": "x"}, {"image": "huge.png", "prompt": "y"}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'image': image \S+huge\.png is 9000x9000 = 81 MP, over "
                                        r"data\.max_image_pixels = 67108864 \(67\.1 MP; decoding it would take ~2\.2 GB\): "
                                        r"downscale it, or raise data\.max_image_pixels$"):
        build_dataset(_cfg(jsonl=path), progress=False)
    ds = build_dataset(_cfg(jsonl=path, skip_bad=True), progress=False)
    assert len(ds) == 1 and "max_image_pixels" in ds.skipped[0]
    with pytest.raises(DataError, match=r"good\.png is 160x160 = 0\.0256 MP, over data\.max_image_pixels = 20000 "):
        build_dataset(_cfg(jsonl=path, max_image_pixels=20000), progress=False)
    # past twice the limit PIL's own check (set to ours) refuses first: the same field, named as ours
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'image': image \S+good\.png: over "
                                        r"data\.max_image_pixels = 100 \(Image size \(25600 pixels\) exceeds"):
        build_dataset(_cfg(jsonl=path, max_image_pixels=100), progress=False)
    with pytest.raises(SystemExit, match=r"huge\.png is 9000x9000 = 81 MP, over data\.max_image_pixels"):
        sample_main(["--config", "tiny-klein", "--prompt", "x", "--reference", str(tmp_path / "huge.png"),
                     "--out", str(tmp_path / "o.png")])
    from dopsd_fast.config import ConfigError
    with pytest.raises(ConfigError, match=r"'data\.max_image_pixels': must be an integer >= 1, got 0"):
        _cfg(jsonl=path, max_image_pixels=0)
    # a limit over PIL's default (179 MP) is ours to decide: a 196 MP header opens (PIL refused it at any
    # data.max_image_pixels), and is refused at a lower limit
    from dopsd_fast.data.dataset import open_image, set_max_image_pixels

    _declared_png(tmp_path / "huge2.png", 14000, 14000)
    set_max_image_pixels(250_000_000)
    with open_image(tmp_path / "huge2.png", "huge", DataError) as im:
        assert im.size == (14000, 14000)
    set_max_image_pixels(1 << 26)
    with pytest.raises(DataError, match=r"^huge: over data\.max_image_pixels = 67108864 \(Image size \(196000000"):
        open_image(tmp_path / "huge2.png", "huge", DataError)


def test_wrong_kinds_of_file_are_named(tmp_path, caplog):
    """A JSON array saved as .jsonl ('Expecting value' alone), a folder given as an image ('not found'),
    two images sharing one caption file (silently)."""
    import logging

    _img(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    arr = tmp_path / "rows.jsonl"
    arr.write_text('[\n  {"image": "a.png", "prompt": "x"}\n]\n')
    with pytest.raises(DataError, match=r"rows.jsonl:1: malformed JSON line: .*; a JSONL file holds one JSON object "
                                        r"per line, not a JSON array"):
        build_dataset(_cfg(jsonl=str(arr)), progress=False)
    path = _jsonl(tmp_path, [{"references": ["sub"], "target": "a.png", "prompt": "x"}])
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'references\[0\]': .*sub is a folder, not an image file"):
        build_dataset(_cfg(jsonl=path), progress=False)
    folder = tmp_path / "f"
    folder.mkdir()
    _img(folder / "a.png")
    _img(folder / "a.jpg")
    (folder / "a.txt").write_text("a caption")
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        ds = build_dataset(_cfg(folder=str(folder)), progress=False)
    assert len(ds) == 2 and "a.jpg and a.png share a.txt" in caplog.text


def test_a_second_start_reuses_the_check_of_unchanged_images_and_sees_every_change(tmp_path, monkeypatch, caplog):
    """Every start decoded and hashed every image again (a 50k-image resume: minutes to an hour). The check
    is kept per source in $DOPSD_FAST_HOME/datacheck: an unchanged file (path, size, times, inode) is not
    decoded again; an edit in place (its mtime set back), a truncated file and a mended bad row are."""
    import logging
    import os
    import time

    from dopsd_fast.data import dataset as D

    monkeypatch.setenv("DOPSD_FAST_HOME", str(tmp_path / "home"))
    folder = tmp_path / "data"
    folder.mkdir()
    past = time.time() - 100  # a file modified in the last 2 s is not recorded (it may change again unseen)
    for i in range(4):
        _img(folder / f"{i}.png", (160 + 16 * i, 160), (40 * i, 30, 30))
        (folder / f"{i}.txt").write_text(f"caption {i}")
        os.utime(folder / f"{i}.png", (past, past))
    decoded = []
    real = D._check_image
    monkeypatch.setattr(D, "_check_image", lambda p, *a: decoded.append(Path(p).name) or real(p, *a))
    cfg = _cfg(folder=str(folder))
    first = build_dataset(cfg, progress=False)
    assert sorted(decoded) == ["0.png", "1.png", "2.png", "3.png"]
    decoded.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        again = build_dataset(cfg, progress=False)
    assert decoded == [] and [(r.image_hash, r.bucket, r.width) for r in again.records] == \
        [(r.image_hash, r.bucket, r.width) for r in first.records]
    assert "data: 4 usable rows in" in caplog.text and "(4 images unchanged since an earlier check" in caplog.text
    assert "rows per bucket: " in caplog.text
    # an edit in place of the same size, its modification time set back: decoded again, and refused
    st = os.stat(folder / "1.png")
    good = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(good[:40] + bytes(b ^ 0xFF for b in good[40:60]) + good[60:])
    os.utime(folder / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(folder / "1.png").st_size == st.st_size
    with pytest.raises(DataError, match=r"1\.png"):
        build_dataset(cfg, progress=False)
    _img(folder / "1.png", (176, 160), (0, 200, 0))  # another picture: its new hash
    os.utime(folder / "1.png", (past, past))
    decoded.clear()
    edited = build_dataset(cfg, progress=False)
    assert decoded == ["1.png"] and edited.records[1].image_hash == D.file_sha256(folder / "1.png") != \
        first.records[1].image_hash
    # a file truncated since its check is decoded again, and refused by name
    data = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"2\.png"):
        build_dataset(cfg, progress=False)
    # the rows checked before the bad one were kept: once it is mended, only it is decoded
    _img(folder / "2.png", (192, 160), (9, 9, 9))
    os.utime(folder / "2.png", (past, past))
    decoded.clear()
    build_dataset(cfg, progress=False)
    assert decoded == ["2.png"], decoded
    # a record that cannot be read costs a full check, nothing else
    for f in (tmp_path / "home" / "datacheck").iterdir():
        f.write_text("{not json")
    decoded.clear()
    assert len(build_dataset(cfg, progress=False).records) == 4 and len(decoded) == 4


def test_rows_cropped_to_little_of_their_image_and_repeated_rows_are_warned(tmp_path, caplog):
    """A 16:1 strip kept 15 % of its width without a word, and a row listed twice was trained twice as often."""
    import logging

    from dopsd_fast.data.dataset import crop_kept

    assert crop_kept(1600, 100, (160, 80)) == pytest.approx((160 / 80) / 16)
    assert crop_kept(320, 320, (160, 160)) == 1.0
    _img(tmp_path / "strip.png", (1600, 100))
    _img(tmp_path / "sq.png", (160, 160))
    rows = [{"image": "sq.png", "prompt": "a"}, {"image": "strip.png", "prompt": "b"}, {"image": "sq.png", "prompt": "a"},
            {"image": "sq.png", "prompt": "another prompt"}]
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        ds = build_dataset(_cfg(jsonl=_jsonl(tmp_path, rows), buckets=[[160, 160], [160, 80]], bucket_scale=1.0),
                           progress=False)
    assert len(ds.records) == 4
    jl = tmp_path / "train.jsonl"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith(f"1 rows keep less than 60% of their image in their bucket's centre crop (the least: {jl}:2, "
                            "1600x100 in bucket 160x80 keeps 12%)") for m in warned), warned
    assert any(m.startswith(f"1 rows repeat an earlier row") and f"the first: {jl}:3 repeats {jl}:1" in m
               for m in warned), warned


def test_a_bucket_with_fewer_rows_than_the_global_batch_is_said(caplog):
    """The sampler fills a bucket's last batch with its own rows: a bucket of 3 rows at a global batch of 8
    trained each of its batches on each row two or three times, without a word."""
    import logging
    import types

    from dopsd_fast.data import BucketBatchSampler
    from dopsd_fast.trainer import Trainer

    groups = [(64, 64)] * 9 + [(96, 48)] * 3 + [(64, 64, 32, 32)] * 5
    said = {}
    for batch, world in ((4, 2), (3, 1)):
        t = types.SimpleNamespace(sampler=BucketBatchSampler(groups, batch, world_size=world), world=world,
                                  cfg=types.SimpleNamespace(data=types.SimpleNamespace(builtin=None, batch_size=batch)))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
            Trainer._say_small_groups(t)
        said[batch * world] = [r.getMessage() for r in caplog.records]
    assert said[3] == [], said[3]  # every group holds at least the global batch of 3
    from dopsd_fast.trainer import _group_name

    assert _group_name((64, 64, 32, 32, 48, 16)) == "bucket 64x64 with references at 32x32, 48x16"
    assert said[8] == [
        "2 of the data's 3 batch groups (bucket, and references) hold fewer rows than the global batch of 8 "
        "(data.batch_size 4 x 2 ranks): their batches repeat rows to fill up (the smallest: bucket 96x48, 3 rows)"]
