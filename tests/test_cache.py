"""Feature cache: written once, read without encoders, stale or incomplete caches refused."""

import json

import pytest

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
    with pytest.raises(CacheError, match="lacks 3 of 24"):
        Trainer(tiny_config(tmp_path / "y", f"cache.dir={cache}"))
    _write_cache(tmp_path)  # resumes: writes only the 3 missing
    m2 = json.loads((cache / "manifest.json").read_text())
    assert len(m2["entries"]) == 24 and len(list(cache.glob("shard-*.safetensors"))) == 6
    Trainer(tiny_config(tmp_path / "z", f"cache.dir={cache}"))
