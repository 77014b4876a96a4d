"""A resume that changes the global batch (data.batch_size, the number of ranks) or the data's rows: the
sampler neither skips nor repeats a row within an epoch."""

import json
import logging

import pytest
from PIL import Image

from dopsd_fast.data import BucketBatchSampler
from tests.conftest import tiny_config

BUCKETS = [(1, 1)] * 5 + [(2, 1)] * 4 + [(1, 2)] * 2


def _epoch_after_resume(old_batch, new_batch, taken, buckets=BUCKETS, world=1):
    """(rows served before the checkpoint, global batches served after it until the next epoch)."""
    s = BucketBatchSampler(buckets, old_batch, seed=5)
    before = [i for _ in range(taken) for i in s.next_batch()]
    state = s.state_dict()
    ranks = [BucketBatchSampler(buckets, new_batch, seed=5, rank=r, world_size=world) for r in range(world)]
    for r in ranks:
        r.load_state_dict(state)
    epoch, after = state["epoch"], []
    while True:
        got = [r.next_batch() for r in ranks]
        if ranks[0].epoch != epoch:
            break
        after.append([i for g in got for i in g])
    return before, after


@pytest.mark.parametrize("old,new,world", [(1, 2, 1), (2, 1, 1), (1, 3, 1), (3, 2, 1), (1, 1, 2), (2, 3, 2)])
def test_a_changed_global_batch_serves_each_row_of_the_epoch_once(old, new, world):
    """The rows of the epoch not seen before the checkpoint, and only those, at the new global batch;
    every global batch full and of one bucket; then the next epoch from its start."""
    n_old = len(BucketBatchSampler(BUCKETS, old, seed=5).global_batches(0))
    for taken in range(1, n_old):
        before, after = _epoch_after_resume(old, new, taken, world=world)
        rows = [i for b in after for i in b]
        assert not set(rows) & set(before), (taken, before, after)  # nothing seen twice in the epoch
        assert set(rows) | set(before) == set(range(len(BUCKETS))), (taken, before, after)  # nothing skipped
        for b in after:
            assert len(b) == new * world and len({BUCKETS[i] for i in b}) == 1


def test_the_rest_of_an_epoch_survives_a_checkpoint_and_another_change():
    s = BucketBatchSampler(BUCKETS, 1, seed=5)
    before = [i for _ in range(3) for i in s.next_batch()]
    t = BucketBatchSampler(BUCKETS, 2, seed=5)
    t.load_state_dict(s.state_dict())
    assert "not yet seen" in t.resumed_as
    mid = [i for i in t.next_batch()]
    state = t.state_dict()
    assert state["rest"]
    same = BucketBatchSampler(BUCKETS, 2, seed=5)  # a checkpoint in the rest of the epoch: resumes exactly
    same.load_state_dict(json.loads(json.dumps(state)))
    assert same.resumed_as == ""
    assert [same.next_batch() for _ in range(6)] == [t.next_batch() for _ in range(6)]
    other = BucketBatchSampler(BUCKETS, 3, seed=5)  # ... and at yet another global batch
    other.load_state_dict(state)
    rows = []
    while True:
        b = other.next_batch()
        if other.epoch != 0:
            break
        rows += b
    assert not set(rows) & set(before + mid)
    assert set(rows) | set(before + mid) == set(range(len(BUCKETS)))


def test_other_rows_start_the_next_epoch_over_all_of_them():
    s = BucketBatchSampler(BUCKETS[:6], 1, seed=5)
    for _ in range(4):
        s.next_batch()
    grown = BucketBatchSampler(BUCKETS, 1, seed=5)
    grown.load_state_dict(s.state_dict())
    assert (grown.epoch, grown.position) == (1, 0) and "epoch 1" in grown.resumed_as
    assert sorted(i for _ in range(len(BUCKETS)) for i in grown.next_batch()) == list(range(len(BUCKETS)))
    # an earlier version's state records no layout: the caller says whether the rows changed
    old = {k: v for k, v in s.state_dict().items() if k != "layout"}
    again = BucketBatchSampler(BUCKETS, 1, seed=5)
    again.load_state_dict(old, layout_changed=True)
    assert (again.epoch, again.position) == (1, 0)
    kept = BucketBatchSampler(BUCKETS[:6], 1, seed=5)  # the same rows: the position, exactly
    kept.load_state_dict(s.state_dict())
    assert (kept.epoch, kept.position, kept.resumed_as) == (0, 4, "")


def _recording(tr):
    seen, nb = [], tr.sampler.next_batch

    def next_batch():
        b = nb()
        seen.append((tr.sampler.epoch, list(b)))
        return b

    tr.sampler.next_batch = next_batch
    return seen


def test_trainer_resume_at_another_batch_size_sees_each_row_once_per_epoch(tmp_path, caplog):
    from dopsd_fast.trainer import Trainer

    first = Trainer(tiny_config(tmp_path, "train.max_steps=4"))
    a = _recording(first)
    first.train()
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        resumed = Trainer(tiny_config(tmp_path, "train.max_steps=6", "data.batch_size=2"), resume="latest")
    assert "the 2 rows of epoch 0 not yet seen come first" in caplog.text
    b = _recording(resumed)
    resumed.train()
    before, after = {i for _, r in a for i in r}, {i for e, r in b if e == 0 for i in r}
    assert not before & after and before | after == set(range(6)), (a, b)  # (a bucket's batch pads with its own rows)


def test_trainer_resume_on_grown_data_starts_an_epoch_over_every_row(tmp_path, caplog):
    from dopsd_fast.trainer import Trainer

    def data(n):
        for i in range(n):
            Image.new("RGB", (160, 160), (40 * i % 256, 90, 30)).save(tmp_path / f"{i}.png")
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "prompt": f"[V] {i}"}) + "\n"
                                                  for i in range(n)))

    args = ["data.builtin=null", f"data.jsonl={tmp_path / 'd.jsonl'}", "data.prompt_keys=[prompt]"]
    data(4)
    first = Trainer(tiny_config(tmp_path, "train.max_steps=2", *args))
    first.train()
    data(6)
    with caplog.at_level(logging.WARNING, logger="dopsd_fast"):
        resumed = Trainer(tiny_config(tmp_path, "train.max_steps=8", *args), resume="latest",
                          allow_config_change=True)
    assert "the data order starts epoch 1, over all 6 rows" in caplog.text
    b = _recording(resumed)
    resumed.train()
    assert all(e == 1 for e, _ in b) and sorted(i for _, r in b for i in r) == list(range(6)), b


def test_lora_init_is_no_change_on_resume():
    """The checkpoint's adapters replace the initial ones: another lora.init resumes, applied, not refused."""
    from dopsd_fast.config import Config
    from dopsd_fast.safety import config_changes

    a, b = Config().to_dict(), Config().to_dict()
    b["lora"]["init"] = "default"
    frozen, applied = config_changes(a, b, Config().to_dict())
    assert frozen == [] and applied == [("lora.init", "gaussian", "default")]


def test_a_forced_change_is_said_as_forced_and_a_new_seed_says_what_it_changes(tmp_path, caplog):
    """A change --allow-config-change forced through was logged '(applied)' at INFO, the words of a change
    that alters nothing computed (max_steps); and a forced train.seed left unsaid that the data order keeps
    the checkpoint's seed while the noise and the prompt variants take the new one."""
    from dopsd_fast.trainer import Trainer

    Trainer(tiny_config(tmp_path, "train.max_steps=2")).train()
    with caplog.at_level(logging.INFO, logger="dopsd_fast"):
        Trainer(tiny_config(tmp_path, "train.max_steps=4", "train.seed=5"), resume="latest", allow_config_change=True)
    said = {r.getMessage(): r.levelno for r in caplog.records if r.getMessage().startswith("resume: train.")}
    assert said == {
        "resume: train.max_steps 2 -> 4 (applied)": logging.INFO,
        "resume: train.seed 0 -> 5 (forced by --allow-config-change: it changes what the run computes; the data "
        "order keeps the checkpoint's seed (the sampler resumes its order), the noise and the prompt variants take "
        "the new one)": logging.WARNING}, said


def test_a_forced_resume_onto_another_model_names_the_model_fields_that_changed(tmp_path):
    """--allow-config-change onto a model the checkpoint's tensors do not fit: one line naming the model
    fields forced, not a library's shape error."""
    from dopsd_fast.config import ConfigError
    from dopsd_fast.families import FAMILIES
    from dopsd_fast.trainer import Trainer

    Trainer(tiny_config(tmp_path, "train.max_steps=1")).train()
    other = next(s for s in FAMILIES.values() if s.name != tiny_config(tmp_path).model.family)
    with pytest.raises(ConfigError, match=r"its weights do not fit the model of this config \(model\.family: '\w+' -> "
                                          rf"'{other.name}'"):
        Trainer(tiny_config(tmp_path, "train.max_steps=2", f"model.family={other.name}",
                            f"model.preset={other.tiny_preset}", *other.tiny_overrides()),
                resume="latest", allow_config_change=True)
