"""Feature cache: written once, read without encoders, stale or incomplete caches refused."""

import json
import logging
import re

import pytest
import torch

from tests.conftest import assert_close, compare_grads, tiny_config


def _write_cache(tmp_path, *extra):
    from dopsd_fast.cli import cache_main

    args = ["--config", "tiny-zimage", "--set", f"cache.dir={tmp_path / 'cache'}", "--set", "train.progress=false", "--set", "cache.shard_size=5"]
    for e in extra:
        args += ["--set", e]
    assert cache_main(args) == 0
    return tmp_path / "cache"


def test_cache_training_matches_on_the_fly_without_encoders(tmp_path):
    from dopsd_fast.cache import needed_entries
    from dopsd_fast.trainer import Trainer

    cache = _write_cache(tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    cached = Trainer(tiny_config(tmp_path / "c", f"cache.dir={cache}"))
    assert cached.adapter.text_encoder is None and cached.adapter.vlm is None  # encoders never loaded
    assert len(manifest["entries"]) == len(needed_entries(cached.dataset)) == 6 * 2 * 2
    assert len(list(cache.glob("shard-*.safetensors"))) == 5  # 24 entries, 5 per shard
    live = Trainer(tiny_config(tmp_path / "l"))
    # the same samples and noise through both: the loss and every gradient agree (compared before the
    # optimizer: AdamW's first update amplifies differences of gradients near its eps to ~lr)
    res, grads = {}, {}
    for name, tr in (("cached", cached), ("live", live)):
        samples = tr.next_samples(0, 0)
        res[name] = tr.compute_rollout(samples, tr.noise_for(samples, 0, 0))
        grads[name] = {n: p.grad.detach().clone() for n, p in tr.weights.named_trainable().items()}
    assert_close(res["cached"].loss.detach(), res["live"].loss.detach(), rtol=1e-6, name="loss")
    compare_grads(grads["cached"], grads["live"], 1e-6, 1e-5)


def test_stale_cache_refused(tmp_path):
    from dopsd_fast.cache import CacheError
    from dopsd_fast.trainer import Trainer

    cache = _write_cache(tmp_path)
    with pytest.raises(CacheError, match=r"differs in: .*teacher_max_tokens"):
        Trainer(tiny_config(tmp_path / "x", f"cache.dir={cache}", "model.teacher_max_tokens=900"))
    with pytest.raises(CacheError, match=r"differs in: .*weights.seed"):
        Trainer(tiny_config(tmp_path / "y", f"cache.dir={cache}", "model.seed=5"))


def test_incomplete_or_missing_cache_refused_and_resumed(tmp_path):
    from dopsd_fast.cache import CacheError
    from dopsd_fast.trainer import Trainer

    with pytest.raises(CacheError, match="run dopsd-cache first"):
        Trainer(tiny_config(tmp_path / "x", f"cache.dir={tmp_path / 'none'}"))
    cache = _write_cache(tmp_path)
    m = json.loads((cache / "manifest.json").read_text())
    dropped = sorted(m["entries"])[:3]
    for k in dropped:
        del m["entries"][k]
    (cache / "manifest.json").write_text(json.dumps(m))  # as if interrupted before those were written
    with pytest.raises(CacheError, match=r"lacks 3 of 24 contexts this dataset needs \(the first: .*train\.jsonl:\d+, "
                                         r"the (student|teacher) context of '.+': a row or image edited"):
        Trainer(tiny_config(tmp_path / "y", f"cache.dir={cache}"))
    _write_cache(tmp_path)  # resumes: writes only the 3 missing
    m2 = json.loads((cache / "manifest.json").read_text())
    assert len(m2["entries"]) == 24 and len(list(cache.glob("shard-*.safetensors"))) == 6
    Trainer(tiny_config(tmp_path / "z", f"cache.dir={cache}"))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return _write_cache(tmp_path_factory.mktemp("written"))


def _received(written, tmp_path, manifest=None, tensors=None):
    """A copy of ``written`` with its manifest (and the first shard's tensors) edited, as if received."""
    import shutil

    from safetensors.torch import load_file, save_file

    cache = tmp_path / "received"
    shutil.copytree(written, cache)
    m = json.loads((cache / "manifest.json").read_text())
    if manifest is not None:
        m = manifest(m)
        (cache / "manifest.json").write_text(json.dumps(m))
    if tensors is not None:
        shard = cache / "shard-00000.safetensors"
        save_file(tensors(load_file(str(shard))), str(shard))
    return cache, m


def _swap(m):
    a, b = sorted(m["entries"])[:2]
    m["entries"][a], m["entries"][b] = m["entries"][b], m["entries"][a]
    return m


def _first_features(edit):
    def tensors(sd):
        k = sorted(k for k in sd if k.endswith(".features"))[0]
        sd[k] = edit(sd[k])
        return sd
    return tensors


@pytest.mark.parametrize("manifest, tensors, match", [
    (_swap, None, r"entry \w+ points at the tensors of '\w+', not its own"),
    (lambda m: {**m, "entries": {k: next(iter(m["entries"].values())) for k in m["entries"]}}, None,
     r"points at the tensors of"),
    (lambda m: [], None, r"manifest.json is not a manifest"),
    (None, _first_features(lambda t: t[:, :-1].contiguous()), r"features is {w1} wide, this model's contexts are {w}"),
    (None, _first_features(lambda t: t[None]), r"features has shape \(1, \d+, {w}\), not \(tokens >= 1, width\)"),
    (None, _first_features(lambda t: t[:0]), r"features has shape \(0, {w}\)"),
    (None, _first_features(lambda t: t.long()), r"features is I64, not floating-point"),
], ids=["swapped", "all-one", "not-an-object", "width", "rank", "empty", "integer"])
def test_a_received_cache_of_the_wrong_kind_is_refused_naming_it(written, tmp_path, manifest, tensors, match):
    from dopsd_fast.cache import CacheError, FeatureCache

    from safetensors import safe_open

    with safe_open(str(written / "shard-00000.safetensors"), framework="pt") as f:  # the tiny model's width
        w = f.get_slice(next(k for k in f.keys() if k.endswith(".features"))).get_shape()[1]
    cache, m = _received(written, tmp_path, manifest, tensors)
    identity = json.loads((written / "manifest.json").read_text())["identity"]
    with pytest.raises(CacheError, match=match.replace("{w1}", str(w - 1)).replace("{w}", str(w))) as e:
        FeatureCache(cache, identity).check_shards(width=w)
    assert len(str(e.value).splitlines()) == 1


def test_bytes_changed_in_a_shard_are_named_at_the_read_and_dopsd_cache_rewrites_them(written, tmp_path, caplog):
    """A shard whose tensor bytes changed since dopsd-cache wrote them (finite values: no other check can
    see it) was read as features; each context's CRC-32 is now in the manifest and checked at each read.
    The shard deleted as the message says, dopsd-cache encodes its contexts again."""
    import struct

    from safetensors import safe_open

    from dopsd_fast.cache import CacheError, FeatureCache
    from dopsd_fast.cli import cache_main

    cache, m = _received(written, tmp_path)
    assert set(m["checksums"]) == set(m["entries"])
    identity = m["identity"]
    shard = cache / "shard-00000.safetensors"
    key = sorted(k for k, (sh, _) in m["entries"].items() if sh == shard.name)[0]
    want = FeatureCache(cache, identity).get(key).features.clone()
    with safe_open(str(shard), framework="pt") as f:
        assert f.get_slice(f"{key}.features").get_dtype() == "F32"
    raw = bytearray(shard.read_bytes())
    head = 8 + struct.unpack("<Q", raw[:8])[0]
    begin = json.loads(raw[8:head])[f"{key}.features"]["data_offsets"][0]
    raw[head + begin:head + begin + 4] = struct.pack("<f", 0.125)  # one finite value changed
    shard.write_bytes(bytes(raw))
    fc = FeatureCache(cache, identity)
    fc.check_shards()  # the header is sound: only the bytes' checksum sees it
    with pytest.raises(CacheError, match=rf"a context in {shard.name} is damaged .* delete .*{shard.name} and run "
                                         r"dopsd-cache again") as e:
        fc.get(key)
    assert len(str(e.value).splitlines()) == 1
    shard.unlink()
    assert cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false",
                       "--set", "cache.shard_size=5"]) == 0
    assert torch.equal(FeatureCache(cache, identity).get(key).features, want)
    # a manifest of an earlier version (no checksums) is read unchecked; checksums of another type refused
    m2 = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({k: v for k, v in m2.items() if k != "checksums"}))
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        assert torch.equal(FeatureCache(cache, identity).get(key).features, want)
        FeatureCache(cache, identity)
    said = [r.getMessage() for r in caplog.records if "have no checksum" in r.getMessage()]
    assert len(said) == 1 and f"{len(m2['entries'])} of its {len(m2['entries'])} contexts" in said[0], caplog.text
    (cache / "manifest.json").write_text(json.dumps({**m2, "checksums": {key: "x"}}))
    with pytest.raises(CacheError, match=r"'checksums' is not \{key: CRC-32\}"):
        FeatureCache(cache, identity)


def test_a_cache_manifest_linked_from_elsewhere_is_refused_and_the_trainer_checks_the_width(written, tmp_path):
    import shutil

    from dopsd_fast.cache import CacheError
    from dopsd_fast.trainer import Trainer

    cache = tmp_path / "linked"
    shutil.copytree(written, cache)
    (tmp_path / "elsewhere.json").write_text((cache / "manifest.json").read_text())
    (cache / "manifest.json").unlink()
    (cache / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CacheError, match=r"manifest.json leads outside"):
        Trainer(tiny_config(tmp_path / "a", f"cache.dir={cache}"))
    narrow, _ = _received(written, tmp_path, None, _first_features(lambda t: t[:, :-1].contiguous()))
    with pytest.raises(CacheError, match=r"is (\d+) wide, this model's contexts are (\d+)") as e:
        Trainer(tiny_config(tmp_path / "b", f"cache.dir={narrow}"))
    got, want = map(int, re.search(r"is (\d+) wide, this model's contexts are (\d+)", str(e.value)).groups())
    assert got == want - 1
    # a context longer than this config's encoder gives (past the model's positions: an IndexError in the
    # first forward, asking for a bug report, with no cache named)
    cfg = tiny_config(tmp_path / "c")
    long, _ = _received(written, tmp_path / "l", None,
                        _first_features(lambda t: t[:1].expand(cfg.model.student_max_tokens + 1, -1).contiguous()))
    with pytest.raises(CacheError, match=rf"feature cache {long}: shard shard-00000.safetensors: the student context "
                                         rf"of .* has {cfg.model.student_max_tokens + 1} tokens, more than the "
                                         rf"{cfg.model.student_max_tokens} this config's encoder gives"):
        Trainer(tiny_config(tmp_path / "d", f"cache.dir={long}"))


def test_dopsd_cache_repairs_a_missing_or_damaged_shard_and_refuses_what_it_cannot_use(tmp_path):
    """A shard deleted or torn after the build: dopsd-cache said '0 new contexts' and training kept
    refusing (its advice, 'run dopsd-cache again', went round in a loop). Now dopsd-cache re-encodes that
    shard's contexts, under a new shard name, and the cache trains again. A leftover temp shard of a
    killed build is removed; a second dopsd-cache on the same folder is refused while one holds it;
    --batch-size below 1 is one line."""
    from dopsd_fast.cli import cache_main
    from dopsd_fast.safety import OutputLock
    from dopsd_fast.trainer import Trainer

    cache = _write_cache(tmp_path)
    shards = sorted(cache.glob("shard-*.safetensors"))
    shards[1].unlink()
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:100])
    (cache / ".shard-00009.tmp-12345.safetensors").write_bytes(b"partial")
    from dopsd_fast.cache import CacheError

    with pytest.raises(CacheError, match="run dopsd-cache again"):
        Trainer(tiny_config(tmp_path / "x", f"cache.dir={cache}"))
    _write_cache(tmp_path)
    m = json.loads((cache / "manifest.json").read_text())
    assert len(m["entries"]) == 24
    assert not list(cache.glob(".shard-*.tmp-*"))
    Trainer(tiny_config(tmp_path / "y", f"cache.dir={cache}")).close()

    held = OutputLock(cache, "cache.dir")
    try:
        with pytest.raises(SystemExit, match=r"cache.dir .* is in use by"):
            cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false"])
    finally:
        held.release()
    with pytest.raises(SystemExit, match="--batch-size 0: must be at least 1"):
        cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--batch-size", "0"])


def test_a_manifest_naming_another_file_of_the_folder_as_a_shard_is_refused_and_the_file_kept(written, tmp_path):
    """A manifest entry naming notes.txt (or the .lock dopsd-cache holds) as its shard: the file failed the
    shard's checks, and dopsd-cache's repair deleted it. Only names dopsd-cache writes are shards now: the
    manifest is refused in one line naming it, and repair deletes nothing else."""
    from dopsd_fast.cache import CacheError, FeatureCache
    from dopsd_fast.cli import cache_main

    identity = json.loads((written / "manifest.json").read_text())["identity"]
    for name in ("notes.txt", ".lock"):
        def point(m, name=name):
            key = sorted(m["entries"])[0]
            m["entries"][key] = [name, key]
            return m
        cache, _ = _received(written, tmp_path / name, point)
        (cache / name).write_text("my notes")
        with pytest.raises(CacheError, match=rf"manifest.json names shard '{re.escape(name)}', not a shard name "
                                             r"dopsd-cache writes \(shard-NNNNN.safetensors\); refused") as e:
            FeatureCache(cache, identity)
        assert len(str(e.value).splitlines()) == 1
        with pytest.raises(SystemExit, match=rf"error: feature cache .*names shard '{re.escape(name)}'"):
            cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false"])
        assert (cache / name).is_file()  # the lock's text is its holder's; notes.txt's, the user's
        assert name == ".lock" or (cache / name).read_text() == "my notes"
    # repair, handed such an entry anyway, drops it from the manifest and deletes no file but a shard
    cache, m = _received(written, tmp_path / "repair")
    (cache / "notes.txt").write_text("my notes")
    fc = FeatureCache(cache, identity)
    key = sorted(fc.entries)[0]
    fc.entries[key] = ["notes.txt", key]
    said = fc.repair()
    assert len(said) == 1 and "shard notes.txt is damaged" in said[0]
    assert (cache / "notes.txt").read_text() == "my notes" and key not in fc.entries


def test_dopsd_cache_of_editing_rows_for_z_image_is_one_line(tmp_path, capsys):
    """An unexpected-error line ('include it in a bug report') before: the trainer's data-layer refusal now."""
    from PIL import Image

    from dopsd_fast.cli import cache_main

    for i in range(2):
        Image.new("RGB", (160, 160), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    rows = tmp_path / "edit.jsonl"
    rows.write_text(json.dumps({"references": ["0.png"], "target": "1.png", "prompt": "make it [V]"}) + "\n")
    with pytest.raises(SystemExit, match=r"^error: .*(editing|reference)") as e:
        cache_main(["--set", f"cache.dir={tmp_path / 'c'}", "--set", "data.builtin=null", "--set", f"data.jsonl={rows}",
                    "--set", "train.progress=false"])
    assert "unexpected" not in str(e.value)


def test_cache_keys_follow_reference_buckets_and_alpha_background(tmp_path):
    """A reference moved to another bucket (``data.buckets`` / ``data.bucket_scale`` changed) or another
    ``data.alpha_background`` under an image with an alpha channel gives other pixels: the cache used to
    key neither, so a complete-looking cache trained on stale reference latents and backgrounds. Rows
    with neither keep the key they had before (caches already written stay valid)."""
    from PIL import Image

    from dopsd_fast.cache import entry_key, record_key
    from dopsd_fast.config import load_config
    from dopsd_fast.data import build_dataset

    Image.new("RGB", (512, 384), (200, 40, 40)).save(tmp_path / "wide.png")
    Image.new("RGB", (512, 512), (40, 200, 40)).save(tmp_path / "out.png")
    Image.new("RGBA", (512, 512), (40, 40, 200, 128)).save(tmp_path / "clear.png")
    rows = [{"references": ["wide.png"], "target": "out.png", "prompt": "make it green"},
            {"image": "clear.png", "prompt": "a half-clear square"},
            {"image": "out.png", "prompt": "a green square"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def records(*sets):
        return build_dataset(load_config(None, [f"data.jsonl={tmp_path / 'd.jsonl'}", "data.builtin=null",
                                                "data.prompt_keys=[prompt]", "data.bucket_scale=1", *sets]).data,
                             progress=False).records

    def keys(rec):
        return [record_key(kind, rec.prompts[0], rec) for kind in ("student", "teacher")]

    one = records("data.buckets=[[128,128]]")
    two = records("data.buckets=[[128,128],[144,112]]")
    assert one[0].bucket == two[0].bucket and one[0].reference_buckets != two[0].reference_buckets
    assert all(a != b for a, b in zip(keys(one[0]), keys(two[0]))), "a reference's bucket changed: both keys change"
    try:
        black = records("data.buckets=[[128,128]]", "data.alpha_background=[0,0,0]")
    finally:
        records("data.buckets=[[128,128]]")  # data.alpha_background is the decoder's module state: back to white
    assert all(a != b for a, b in zip(keys(one[1])[1:], keys(black[1])[1:])), "the teacher sees the alpha image"
    assert keys(one[1])[0] == keys(black[1])[0] and keys(one[2]) == keys(black[2]), "no pixels of it differ"
    plain = one[2]
    assert keys(plain) == [entry_key("student", "a green square", None, None),
                           entry_key("teacher", "a green square", plain.image_hash, plain.bucket)]


def test_a_copied_model_folder_is_the_same_weights_and_other_bytes_are_not(tmp_path):
    """Weight files are identified by size and a hash of sampled content, not their mtime: a
    model folder copied to another disk (cp -r: new mtimes) keeps its feature caches (they were refused
    as 'written for other encoders'); the same size with other bytes is refused; a cache of an earlier
    version (size:mtime) is compared as it was."""
    import os
    import shutil

    from dopsd_fast.cache import _diff
    from dopsd_fast.families.common import file_fingerprint

    src = tmp_path / "model" / "text_encoder"
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"hidden_size": 8}')
    data = os.urandom(3 << 20)
    (src / "model.safetensors").write_bytes(data)
    os.utime(src / "model.safetensors", (1_000_000_000, 1_000_000_000))

    def identity(folder):
        return json.loads(json.dumps({"family": "x", "weights": {"text_encoder": file_fingerprint(folder)},
                                      "settings": {"layers": [1, 2]}}))

    written = identity(src)
    copy = tmp_path / "copy" / "text_encoder"
    shutil.copytree(src, copy, copy_function=shutil.copyfile)  # contents only: a new mtime
    assert int((copy / "model.safetensors").stat().st_mtime) != 1_000_000_000
    assert identity(copy) != written and _diff(written, identity(copy)) == []
    for at in (100, len(data) - 100):  # other bytes at the start or the end, the same size
        other = bytearray(data)
        other[at] ^= 0xFF
        (copy / "model.safetensors").write_bytes(bytes(other))
        assert _diff(written, identity(copy)) == ["weights.text_encoder.model.safetensors"], at
    (copy / "model.safetensors").write_bytes(data + b"x")  # another size
    assert _diff(written, identity(copy)) == ["weights.text_encoder.model.safetensors"]
    # a large file is sampled (its first and last MiB, 256 pieces between): one layer of 36 edited in place,
    # anywhere, is seen
    big = os.urandom(40 << 20)
    (src / "model.safetensors").write_bytes(big)
    written = identity(src)
    layer = len(big) // 36
    for k in (3, 17, 30):
        edited = bytearray(big)
        edited[k * layer:(k + 1) * layer] = os.urandom(layer)
        (copy / "model.safetensors").write_bytes(bytes(edited))
        assert _diff(written, identity(copy)) == ["weights.text_encoder.model.safetensors"], k
    (copy / "model.safetensors").write_bytes(big)
    assert _diff(written, identity(copy)) == []
    (src / "model.safetensors").write_bytes(data)
    os.utime(src / "model.safetensors", (1_000_000_000, 1_000_000_000))
    written = identity(src)
    # an earlier version's manifest: size:mtime, still compared by them
    old = json.loads(json.dumps(written))
    value = old["weights"]["text_encoder"]["model.safetensors"]
    old["weights"]["text_encoder"]["model.safetensors"] = ":".join(value.split(":")[:2])
    assert _diff(old, identity(src)) == []
    os.utime(src / "model.safetensors", (2_000_000_000, 2_000_000_000))
    assert _diff(old, identity(src)) == ["weights.text_encoder.model.safetensors"]
    (copy / "config.json").write_text('{"hidden_size": 9}')  # a config is compared by its contents, as before
    assert "weights.text_encoder.config.json" in _diff(written, identity(copy))


def test_a_run_without_the_teachers_encoder_folder_reads_a_complete_cache_written_with_it(tmp_path):
    """Z-Image: "model.vlm_path ... or a complete feature cache (cache.dir) for training" could not be
    followed: the run's identity without the VLM (weights.vlm None) was refused against the cache's
    fingerprint of it. Reading, an encoder folder not given takes the cache's contexts as written;
    writing, or another given folder, is refused as before."""
    from dopsd_fast.cache import CacheError, FeatureCache

    written = {"family": "zimage", "weights": {"text_encoder": {"model.safetensors": "10:1:ab"},
                                               "vlm": {"model.safetensors": "20:2:cd"}}, "settings": {"k": 1}}
    FeatureCache(tmp_path / "c", written, create=True)._save_manifest()
    run = {**written, "weights": {**written["weights"], "vlm": None}}
    cache = FeatureCache(tmp_path / "c", run)
    assert cache.identity == written  # the writer's, kept
    with pytest.raises(CacheError, match=r"differs in: weights.vlm"):
        FeatureCache(tmp_path / "c", run, create=True)
    other = {**written, "weights": {**written["weights"], "vlm": {"model.safetensors": "20:2:ef"}}}
    with pytest.raises(CacheError, match=r"differs in: weights.vlm.model.safetensors"):
        FeatureCache(tmp_path / "c", other)
    # a run that reads no teacher contexts (SFT) does not compare the teacher's fields, a file of it included
    assert FeatureCache(tmp_path / "c", other, teacher_fields=("weights.vlm",)).identity == written
    both = {**run, "settings": {"k": 2}}  # a setting changed too: refused, naming it
    with pytest.raises(CacheError, match=r"differs in: settings.k, weights.vlm"):
        FeatureCache(tmp_path / "c", both)


def test_dopsd_cache_under_torchrun_is_refused_in_one_line(tmp_path, monkeypatch):
    """Under torchrun every rank raced for the one cache folder (the loser's lock error named its own
    sibling; torchrun then stopped the winner, twice in four runs with an empty cache)."""
    from dopsd_fast.cli import cache_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match=r"dopsd-cache runs as one process .* run it once without torchrun"):
        cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={tmp_path / 'c'}"])
    assert not (tmp_path / "c").exists()


def test_a_manifest_of_another_version_or_not_a_file_is_named_as_such(written, tmp_path):
    import os
    import shutil

    from dopsd_fast.cache import CacheError, FeatureCache

    identity = json.loads((written / "manifest.json").read_text())["identity"]
    cache, _ = _received(written, tmp_path, lambda m: {**m, "version": str(m["version"])})
    with pytest.raises(CacheError, match=r"format version '1' != 1;"):
        FeatureCache(cache, identity)
    for make in (lambda p: p.mkdir(), lambda p: os.mkfifo(p)):  # never opened: a FIFO would block
        (cache / "manifest.json").unlink() if (cache / "manifest.json").is_file() else shutil.rmtree(cache / "manifest.json")
        make(cache / "manifest.json")
        with pytest.raises(CacheError, match=r"manifest.json is not a regular file; delete the directory"):
            FeatureCache(cache, identity)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_dopsd_cache_stops_on_a_signal_that_lands_inside_a_finalizer(tmp_path, monkeypatch, sig):
    """A SIGTERM (or Ctrl-C) arriving while a finalizer (``__del__``) ran was lost: the handler's
    ``KeyboardInterrupt`` raised there is discarded by Python, and dopsd-cache went on to write the whole
    cache and exit 0 where the scheduler had asked it to stop. The signal is now kept as a flag, checked
    after each batch: the contexts gathered so far are written as a shard, then it stops with 128 +
    the signal's number (143, 130); a second run completes the cache."""
    import gc
    import os
    import signal
    import time

    import dopsd_fast.cache as cache_mod
    from dopsd_fast.cli import cache_main

    crc, calls = cache_mod.context_crc, []

    class Finalized:
        def __del__(self):  # the signal arrives while Python runs this finalizer
            os.kill(os.getpid(), getattr(signal, sig))
            time.sleep(0.05)  # the handler runs here (inside __del__)

    def crc_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 12:  # in the third shard (shard_size 5): two shards are written before it
            obj = Finalized()
            del obj
            gc.collect()
        return crc(*a, **k)

    monkeypatch.setattr(cache_mod, "context_crc", crc_then_signal)
    cache = tmp_path / "cache"
    args = ["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false",
            "--set", "cache.shard_size=5", "--batch-size", "1"]
    assert cache_main(args) == 128 + getattr(signal, sig)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers given back
    m = json.loads((cache / "manifest.json").read_text())
    # two whole shards and the third's two contexts encoded before the stop, kept
    assert len(m["entries"]) == 12 and len(list(cache.glob("shard-*.safetensors"))) == 3
    monkeypatch.setattr(cache_mod, "context_crc", crc)
    assert cache_main(args) == 0
    assert len(json.loads((cache / "manifest.json").read_text())["entries"]) == 24


def test_dopsd_cache_leaves_an_ignored_sigint_ignored(tmp_path, monkeypatch):
    """Started with SIGINT ignored (a script's ``&``, ``trap '' INT``), dopsd-cache does not take it
    over: a Ctrl-C meant for the shell does not stop it."""
    import signal

    import dopsd_fast.cache as cache_mod
    from dopsd_fast.cli import cache_main

    crc, seen = cache_mod.context_crc, []

    def crc_seeing(*a, **k):
        seen.append(signal.getsignal(signal.SIGINT))
        return crc(*a, **k)

    monkeypatch.setattr(cache_mod, "context_crc", crc_seeing)
    prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={tmp_path / 'c'}",
                           "--set", "train.progress=false"]) == 0
        assert seen and all(h is signal.SIG_IGN for h in seen)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, prev)


def test_contexts_held_in_memory_are_said_as_they_grow_with_a_warning_past_the_host_memory(monkeypatch, caplog):
    """Without a feature cache every (record, prompt, branch) context stays in host memory for the run (a VLM
    teacher context is megabytes): each doubling is said with its projection to all the run's contexts, and a
    projection past the memory available is a warning naming the feature cache."""
    from types import SimpleNamespace

    from dopsd_fast import cache as C
    from dopsd_fast.context import Context
    from dopsd_fast.memory import fmt_bytes

    class Adapter:  # a student context 400 kB, a teacher's 800 kB (its extra tensor counted)
        def encode_student(self, prompts):
            return [Context(torch.zeros(100, 1000)) for _ in prompts]

        def encode_teacher(self, prompts, images):
            return [Context(torch.zeros(100, 1000), {"refs": torch.zeros(100_000)}) for _ in prompts]

    monkeypatch.setattr(C.ContextProvider, "REPORT_FROM", 1_000_000)
    monkeypatch.setattr(C, "host_memory_available", lambda: 10**12)
    provider = C.ContextProvider(Adapter(), total=1000)

    def sample(i, prompt=None):
        rec = SimpleNamespace(reference_paths=[], image_hash=f"h{i}", reference_hash=None, bucket=(16, 16),
                              prompts=[f"p{i}"])
        return SimpleNamespace(prompt=prompt or f"p{i}", image=None, references=[], record=rec)

    def said():
        return [r for r in caplog.records if "contexts held in host memory" in r.getMessage()]

    samples = [sample(i) for i in range(4)]
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        provider.student(samples[:2])  # 0.8 MB: under the first report
        provider.student(samples[:2])  # memoised: no new bytes
        assert provider.memo_bytes == 800_000 and not said()
        provider.teacher(samples[:1])  # 1.6 MB in 3 contexts: said
        provider.teacher(samples[1:3])  # 2.4 MB (past 2 MB: said), then 3.2 MB (the next report is at 4 MB)
    assert [r.levelname for r in said()] == ["INFO", "INFO"], caplog.text
    first, second = (r.getMessage() for r in said())
    assert first.startswith(f"contexts held in host memory: {fmt_bytes(1.6e6)} for the 3 encoded so far, about "
                            f"{fmt_bytes(1.6e6 * 1000 / 3)} when all 1000 of the run are"), first
    assert f"{fmt_bytes(2.4e6)} for the 4 encoded so far" in second and "dopsd-cache" in second, second
    monkeypatch.setattr(C, "host_memory_available", lambda: 10**6)  # the projection no longer fits: a warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        provider.student([sample(0, "q")])  # 3.6 MB: the next report is at 4 MB, nothing said
        assert not said()
        provider.teacher([samples[3]])  # 4.4 MB
    assert [r.levelname for r in said()] == ["WARNING"], caplog.text
    assert f"more than the {fmt_bytes(1e6)} of host memory available" in said()[0].getMessage()
    # under torchrun every rank of the machine holds its own: 8 of them, each projecting ~half of what is there
    # (9.2 MB in 19 contexts: 475 MB more to come on each rank, 3.8 GB on the machine, against 0.95 GB)
    monkeypatch.setattr(C, "host_memory_available", lambda: 950_000_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        provider.student([sample(i, f"r{i}") for i in range(12)])  # 9.2 MB: past 8 MB
    assert [r.levelname for r in said()] == ["WARNING"] and "on each of its 8 ranks" in said()[0].getMessage()


def test_cache_reads_use_pread_and_an_older_safetensors_without_it_reads_all_the_same(written, monkeypatch):
    """safetensors 0.8's default mmap read leaks per tensor read (each step reads the cache): the cache asks
    for its pread backend; a safetensors without that argument (an environment the package is dropped into)
    is read through its default."""
    import safetensors

    from dopsd_fast.cache import FeatureCache

    m = json.loads((written / "manifest.json").read_text())
    key = sorted(m["entries"])[0]
    want = FeatureCache(written, m["identity"]).get(key).features.clone()
    real, backends = safetensors.safe_open, []

    def old(*a, **kw):  # a safetensors before the backend argument
        backends.append(kw.get("backend"))
        if "backend" in kw:
            raise TypeError("safe_open() got an unexpected keyword argument 'backend'")
        return real(*a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", old)
    assert torch.equal(FeatureCache(written, m["identity"]).get(key).features, want)
    assert backends == ["pread", None]


def test_contexts_keep_the_encoders_dtype_and_a_bf16_cache_trains_as_its_fp32_copy(tmp_path):
    """With bf16 encoders (model.dtype=bf16, the GPU default) the contexts are kept as the encoders give
    them: the cache's shards and the contexts held in memory are bf16, half the bytes of an fp32 upcast,
    and nothing is lost by it: a run reading the cache computes the same loss and gradients, bit for bit,
    as one reading a copy whose shards are upcast to fp32 every other one (an earlier version's shards,
    extended after an upgrade): read, every context of both is bf16 (one dtype: one CUDA graph per shape)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dopsd_fast.cache import context_crc
    from dopsd_fast.trainer import Trainer

    cache = _write_cache(tmp_path, "model.dtype=bf16")
    upcast = tmp_path / "upcast"
    upcast.mkdir()
    m = json.loads((cache / "manifest.json").read_text())
    dtypes = set()
    for shard in sorted(cache.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".features")}
        up = int(shard.stem.split("-")[1]) % 2 == 0
        save_file({k: v.float() if up else v for k, v in load_file(str(shard)).items()}, str(upcast / shard.name))
    assert dtypes == {"BF16"}, dtypes
    with safe_open(str(upcast / "shard-00000.safetensors"), framework="pt") as f:  # the copy mixes both
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    for key, (shard, name) in m["entries"].items():
        sd = load_file(str(upcast / shard))
        extra = {k[len(f"{name}.extra."):]: v for k, v in sd.items() if k.startswith(f"{name}.extra.")}
        m["checksums"][key] = context_crc(sd[f"{name}.features"], extra)
    (upcast / "manifest.json").write_text(json.dumps(m))
    bytes_of = lambda d: sum(p.stat().st_size for p in d.glob("shard-*.safetensors"))  # noqa: E731
    assert bytes_of(cache) < 0.8 * bytes_of(upcast), (bytes_of(cache), bytes_of(upcast))
    res, grads = {}, {}
    for name, d in (("bf16", cache), ("fp32", upcast)):
        tr = Trainer(tiny_config(tmp_path / name, f"cache.dir={d}", "model.dtype=bf16"))
        samples = tr.next_samples(0, 0)
        ctx = tr.contexts.student(samples)
        assert {c.features.dtype for c in ctx} == {torch.bfloat16}, name
        got = {tr.contexts.cache.get(k).features.dtype for k in m["entries"]}  # every entry, of every shard
        assert got == {torch.bfloat16}, (name, got)
        res[name] = tr.compute_rollout(samples, tr.noise_for(samples, 0, 0)).loss.detach()
        grads[name] = {n: p.grad.detach().clone() for n, p in tr.weights.named_trainable().items()}
    assert torch.equal(res["bf16"], res["fp32"]), res
    assert grads["bf16"].keys() == grads["fp32"].keys()
    assert all(torch.equal(grads["bf16"][n], grads["fp32"][n]) for n in grads["bf16"])


def test_dopsd_cache_says_its_size_after_the_first_shard_and_warns_where_it_will_not_fit(tmp_path, monkeypatch,
                                                                                            caplog):
    """A cache of tens of thousands of rows is hundreds of GB; one that did not fit its disk stopped at the
    write that failed, hours in, with no word before. After the first shard dopsd-cache says what the rest
    will take (that shard's bytes per context times the contexts left) and warns where that passes the
    folder's free disk."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    for free, warned in ((10 ** 12, False), (1000, True)):
        monkeypatch.setattr(shutil, "disk_usage", lambda p, free=free: usage(2 * free, free, free))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dopsd_fast"):
            cache = _write_cache(tmp_path / str(free))
        first = cache / "shard-00000.safetensors"
        per = first.stat().st_size / 5  # cache.shard_size=5: 24 contexts, 19 after the first shard
        said = [r for r in caplog.records if r.getMessage().startswith("feature cache:")]
        info = [r.getMessage() for r in said if r.levelno == logging.INFO]
        assert len(info) == 1 and f"about {per * 19 / 1e6:.1f} MB more for 19 contexts" in info[0], info
        warn = [r.getMessage() for r in said if r.levelno == logging.WARNING]
        assert len(warn) == warned and (not warned or ("will not fit" in warn[0] and str(cache) in warn[0])), warn
        assert len(list(cache.glob("shard-*.safetensors"))) == 5  # a warning: the cache is still written
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):  # one shard holds it all: nothing left to project
        _write_cache(tmp_path / "one", "cache.shard_size=64")
    assert not any(r.getMessage().startswith("feature cache: about") for r in caplog.records), caplog.text


def test_dopsd_cache_saves_its_manifest_at_a_bounded_cost_and_keeps_every_shard_on_an_error(tmp_path, monkeypatch):
    """The manifest names every entry and was saved after each shard: 16 MB and 0.3 s a save at 50k rows,
    quadratic in all (hours at 500k). It is now saved where that costs at most 1/20 of the time since the
    last save, and always at the end, on a stop and on an error: an encoder's error in the third shard
    leaves the manifest naming the two shards written before it."""
    import dopsd_fast.cache as cache_mod
    from dopsd_fast.cli import cache_main

    t = [0.0]
    saver = cache_mod._ManifestSaver(lambda: t.__setitem__(0, t[0] + 1.0), clock=lambda: t[0])
    saves = []
    for _ in range(30):  # a shard every 2 s, each save 1 s: saved once 20 s have passed since the last
        t[0] += 2.0
        before = t[0]
        saver.wrote()
        saves.append(t[0] != before)
    assert sum(saves) == 3 and saves.index(True) == 0 and saver.dirty
    saver.flush()
    assert not saver.dirty and t[0] == 64.0

    crc, calls = cache_mod.context_crc, []

    def crc_then_fail(*a, **k):
        calls.append(1)
        if len(calls) == 12:  # in the third shard (shard_size 5, batch 1)
            raise RuntimeError("encoder ran out of memory")
        return crc(*a, **k)

    monkeypatch.setattr(cache_mod._ManifestSaver, "RATIO", 10 ** 9)  # no save between shards
    monkeypatch.setattr(cache_mod, "context_crc", crc_then_fail)
    cache = tmp_path / "cache"
    args = ["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false",
            "--set", "cache.shard_size=5", "--batch-size", "1"]
    with pytest.raises(SystemExit, match="encoder ran out of memory"):
        cache_main(args)
    m = json.loads((cache / "manifest.json").read_text())
    assert len(m["entries"]) == 10 and {s for s, _ in m["entries"].values()} == {
        "shard-00000.safetensors", "shard-00001.safetensors"}
    monkeypatch.setattr(cache_mod, "context_crc", crc)
    assert cache_main(args) == 0
    assert len(json.loads((cache / "manifest.json").read_text())["entries"]) == 24


def test_shards_the_manifest_does_not_name_are_adopted_not_encoded_again(written, tmp_path, caplog, monkeypatch):
    """A dopsd-cache killed (SIGKILL, a node lost) after writing shards and before the manifest's next save
    left them on disk, unnamed: never read, never deleted, their contexts encoded again. The next
    dopsd-cache now takes their contexts into the manifest with the checksums of their bytes, without the
    encoders; a shard that does not read is deleted and its contexts encoded."""
    import shutil

    import dopsd_fast.cache as cache_mod
    from dopsd_fast.cli import cache_main
    from dopsd_fast.trainer import Trainer

    cache = tmp_path / "cache"
    shutil.copytree(written, cache)
    full = json.loads((cache / "manifest.json").read_text())
    m = json.loads(json.dumps(full))
    lost = {"shard-00003.safetensors", "shard-00004.safetensors"}
    for k in [k for k, (s, _) in m["entries"].items() if s in lost]:
        del m["entries"][k], m["checksums"][k]
    assert len(m["entries"]) == 15
    (cache / "manifest.json").write_text(json.dumps(m))

    def no_encoding(*a, **k):
        raise AssertionError("encoded again")

    args = ["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false",
            "--set", "cache.shard_size=5"]
    with monkeypatch.context() as mp:
        mp.setattr(cache_mod.FeatureCache, "_write_shards", no_encoding)
        with caplog.at_level(logging.INFO, logger="dopsd_fast"):
            assert cache_main(args) == 0
    assert "9 contexts taken from 2 shards the manifest did not name yet" in caplog.text
    again = json.loads((cache / "manifest.json").read_text())
    assert again["entries"] == full["entries"] and again["checksums"] == full["checksums"]
    Trainer(tiny_config(tmp_path / "run", f"cache.dir={cache}"))

    (cache / "manifest.json").write_text(json.dumps(m))  # again unnamed, one of them now torn
    torn = cache / "shard-00004.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        assert cache_main(args) == 0
    assert "shard-00004.safetensors, not named in the manifest, does not read" in caplog.text
    assert "5 contexts taken from 1 shard the" in caplog.text
    again = json.loads((cache / "manifest.json").read_text())
    assert len(again["entries"]) == 24 and not torn.exists()  # deleted (said once, not at every later run)
    assert {s for s, _ in again["entries"].values()} >= {"shard-00003.safetensors"} and \
        "shard-00004.safetensors" not in {s for s, _ in again["entries"].values()}


def test_dopsd_cache_says_the_contexts_its_dataset_no_longer_uses_and_prune_drops_them(written, tmp_path, caplog,
                                                                                          monkeypatch):
    """Every caption edit left its old contexts in the shards and the manifest for good (a cache edited
    many times held thousands of them, and nothing said so). dopsd-cache now says how many the dataset
    does not use and their bytes; with --prune they are dropped: shards holding only them deleted, the
    others written again with the rest, the manifest naming exactly what the dataset needs, the
    checksums kept, training reading it as before."""
    import copy
    import shutil

    import dopsd_fast.cli as cli
    from dopsd_fast.cache import KINDS, needed_entries
    from dopsd_fast.data import build_dataset

    cache = tmp_path / "cache"
    shutil.copytree(written, cache)
    real = build_dataset(tiny_config(tmp_path / "x", f"cache.dir={cache}").data, progress=False)
    edited = copy.copy(real)
    edited.records = list(real.records)
    rec = copy.copy(edited.records[0])
    rec.prompts = [p + ", edited" for p in rec.prompts]
    edited.records[0] = rec
    stale = {k for k, _, _ in needed_entries(real)} - {k for k, _, _ in needed_entries(edited)}
    assert stale
    monkeypatch.setattr(cli, "build_dataset", lambda *a, **k: edited)
    args = ["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false",
            "--set", "cache.shard_size=5"]
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        assert cli.cache_main(args) == 0
    line = [r.getMessage() for r in caplog.records if "needed in all" in r.getMessage()][-1]
    assert f"; it also holds {len(stale)} (" in line and "dopsd-cache --prune drops them" in line, line
    before = json.loads((cache / "manifest.json").read_text())
    assert stale <= before["entries"].keys()
    size = sum(p.stat().st_size for p in cache.glob("shard-*.safetensors"))

    from dopsd_fast.cache import CacheError, FeatureCache

    from dopsd_fast.trainer import Trainer

    reading = Trainer(tiny_config(tmp_path / "reading", f"cache.dir={cache}"))  # prune would delete shards under it
    with pytest.raises(SystemExit, match=r"error: feature cache .*: a training run reads it now; --prune rewrites"):
        cli.cache_main(args + ["--prune"])
    reading.close()
    del reading
    import gc

    gc.collect()
    earlier = FeatureCache(cache, before["identity"])  # a reader of before the prune, without the lock
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        assert cli.cache_main(args + ["--prune"]) == 0
    assert f"{len(stale)} contexts this dataset does not use dropped" in caplog.text
    moved = next(k for k, (s, _) in before["entries"].items() if not (cache / s).exists())
    with pytest.raises(CacheError, match=r"shard-\d+\.safetensors is gone since the run started \(dopsd-cache --prune"):
        earlier.get(moved)
    after = json.loads((cache / "manifest.json").read_text())
    need = {k for k, _, _ in needed_entries(edited, KINDS)}
    assert after["entries"].keys() == need and after["checksums"].keys() == need
    assert all(after["checksums"][k] == before["checksums"][k] for k in need)
    on_disk = {p.name for p in cache.glob("shard-*.safetensors")}
    assert on_disk == {s for s, _ in after["entries"].values()}
    assert sum(p.stat().st_size for p in cache.glob("shard-*.safetensors")) < size
    fc = FeatureCache(cache, after["identity"])
    fc.require_complete(edited)
    for k in need:  # every context reads back with its checksum
        fc.get(k)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        assert cli.cache_main(args) == 0
    assert "this dataset does not use" not in caplog.text


def test_a_cache_written_again_under_a_running_trainer_is_said_so_not_called_damaged(written, tmp_path):
    """The cache deleted and written again (other encoder settings) while a trainer ran on it: the trainer's
    next read was refused as disk damage, with advice (delete the shard, run dopsd-cache) that led to a
    settings refusal. Where the manifest was written again since the run read it, it says so."""
    import os
    import struct

    from dopsd_fast.cache import CacheError, FeatureCache

    cache, m = _received(written, tmp_path)
    fc = FeatureCache(cache, m["identity"])  # the running trainer's view
    shard = cache / "shard-00000.safetensors"
    key = sorted(k for k, (sh, _) in m["entries"].items() if sh == shard.name)[0]
    raw = bytearray(shard.read_bytes())
    head = 8 + struct.unpack("<Q", raw[:8])[0]
    begin = json.loads(raw[8:head])[f"{key}.features"]["data_offsets"][0]
    raw[head + begin:head + begin + 4] = struct.pack("<f", 0.125)
    shard.write_bytes(bytes(raw))
    text = (cache / "manifest.json").read_text()
    (cache / "manifest.json").unlink()
    (cache / "manifest.json").write_text(text)  # another file now, as dopsd-cache's atomic rewrite leaves it
    os.utime(cache / "manifest.json", ns=(1, 1))
    with pytest.raises(CacheError, match=r"is not the one this run read of it: the cache was written again since the "
                                         r"run started"):
        fc.get(key)


def test_shards_the_manifest_does_not_name_are_adopted_only_under_the_identity_they_were_written_with(
        written, tmp_path, caplog):
    """A shard the manifest does not name carries no record of the encoders and settings it was written
    with: with the manifest gone (a dopsd-cache killed before its first save, or manifest.json deleted to
    start over) a run with another config took its contexts into a manifest of its own identity, and
    training read them as its own. A shard is now adopted only where its metadata names this identity."""
    import shutil

    from dopsd_fast.cli import cache_main
    from dopsd_fast.trainer import Trainer

    cache = tmp_path / "cache"
    shutil.copytree(written, cache)
    (cache / "manifest.json").unlink()
    args = ["--config", "tiny-zimage", "--set", f"cache.dir={cache}", "--set", "train.progress=false",
            "--set", "cache.shard_size=5"]
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        assert cache_main(args + ["--set", "model.teacher_max_tokens=900"]) == 0
    assert "taken from" not in caplog.text
    assert "was not written with this config's encoders and settings" in caplog.text
    m = json.loads((cache / "manifest.json").read_text())
    assert len(m["entries"]) == 24 and not {s for s, _ in m["entries"].values()} & {
        p.name for p in written.glob("shard-*.safetensors")}  # every context encoded again, in new shards
    Trainer(tiny_config(tmp_path / "run", f"cache.dir={cache}", "model.teacher_max_tokens=900"))

    same = tmp_path / "same"  # under the identity they were written with: adopted, nothing encoded
    shutil.copytree(written, same)
    (same / "manifest.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        assert cache_main(["--config", "tiny-zimage", "--set", f"cache.dir={same}", "--set", "train.progress=false",
                           "--set", "cache.shard_size=5"]) == 0
    assert "24 contexts taken from 5 shards" in caplog.text
    assert json.loads((same / "manifest.json").read_text())["entries"] == \
        json.loads((written / "manifest.json").read_text())["entries"]
