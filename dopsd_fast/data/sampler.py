"""Deterministic, resumable, rank-aware batch sampler over aspect buckets."""

from __future__ import annotations

import hashlib
import json
import random


class BucketBatchSampler:
    """Global batches of ``batch_size x world_size`` indices that share one bucket (``buckets_of``: per
    record, a tuple: its bucket, or what its batch must share, ``ImageTextDataset.batch_groups``); rank
    ``r`` takes the ``r``-th slice of ``batch_size``.

    The order of epoch ``e`` is a pure function of ``(seed, e, batch_size x world_size)``, so the
    position ``(epoch, global batch index)`` is all a checkpoint needs to resume exactly, at any world
    size with the same global batch (N ranks x b == M ranks x N b / M). A bucket's last global batch of
    an epoch is filled up with the bucket's own first samples of that epoch (as
    ``DistributedSampler`` pads), so every step sees exactly the global batch size, whatever the world
    size; ``drop_last`` drops it instead.

    A resume that changes the global batch in mid-epoch serves the rows of the epoch not yet seen (the
    ``rest``, at the new global batch), then the next epoch; one whose rows or buckets changed (another
    ``layout``) starts the next epoch, over every row: no row is skipped or repeated within an epoch.
    """

    def __init__(self, buckets_of: list, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        self.buckets_of = list(buckets_of)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index of the next global batch within the epoch (or within ``rest``)
        self.rest: list[int] | None = None  # the epoch's rows not yet seen, after a change of the global batch
        self.resumed_as = ""  # what load_state_dict changed of the saved position ('' = nothing)
        if not self.buckets_of:
            raise ValueError("the dataset is empty")
        self.layout = hashlib.sha256(json.dumps([list(b) for b in self.buckets_of]).encode()).hexdigest()[:32]

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (computed once per epoch and kept: read, do not modify)."""
        key = (self.seed, epoch, self.global_batch, self.drop_last)
        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        batches = self._global_batches(epoch)
        self._cached = (key, batches)
        return batches

    def _global_batches(self, epoch: int, n: int | None = None) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict = {}
        for i, b in enumerate(self.buckets_of):
            groups.setdefault(tuple(b), []).append(i)
        n = n or self.global_batch
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            rng.shuffle(idx)
            batches += self._chunks(idx, n)
        rng.shuffle(batches)
        return batches

    def _chunks(self, idx: list[int], n: int) -> list[list[int]]:
        """One group's rows in global batches of ``n``: the last filled up with the group's first rows
        (``drop_last``: dropped)."""
        out = []
        for s in range(0, len(idx), n):
            chunk = idx[s:s + n]
            if len(chunk) < n:
                if self.drop_last:
                    continue
                chunk = chunk + [idx[j % len(idx)] for j in range(n - len(chunk))]
            out.append(chunk)
        return out

    def _rest_batches(self, epoch: int, rows: list[int], n: int | None = None) -> list[list[int]]:
        """Global batches of ``n`` over ``rows`` (the rest of epoch ``epoch``), grouped and padded as an epoch's."""
        n = n or self.global_batch
        key = ("rest", self.seed, epoch, n, self.drop_last, tuple(rows))
        cached = getattr(self, "_rest_cached", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        groups: dict = {}
        for i in rows:
            groups.setdefault(tuple(self.buckets_of[i]), []).append(i)
        batches = []
        for g in sorted(groups):
            batches += self._chunks(groups[g], n)
        random.Random(self.seed * 1_000_003 + epoch + 500_009).shuffle(batches)
        self._rest_cached = (key, batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch`` (its slice of every global batch)."""
        b, r = self.batch_size, self.rank
        return [g[r * b:(r + 1) * b] for g in self.global_batches(epoch)]

    def _next(self) -> tuple[int, int, list[int] | None, list[int]]:
        """(epoch, position, rest, this rank's slice) of the next global batch, without advancing."""
        epoch, position, rest = self.epoch, self.position, self.rest
        while True:
            batches = self.global_batches(epoch) if rest is None else self._rest_batches(epoch, rest)
            if position < len(batches):
                return epoch, position, rest, \
                    batches[position][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if not batches and rest is None:
                raise ValueError(f"no full global batch of {self.global_batch} samples in any bucket "
                                 "(drop_last with a dataset smaller than batch_size x world_size)")
            epoch, position, rest = epoch + 1, 0, None

    def next_batch(self) -> list[int]:
        """This rank's slice of the next global batch."""
        self.epoch, position, self.rest, batch = self._next()
        self.position = position + 1
        return batch

    def peek_batch(self) -> list[int]:
        """What :meth:`next_batch` will return next (nothing advanced)."""
        return self._next()[3]

    # 1: the groups are ImageTextDataset.batch_groups (editing rows by their references too); absent: by
    # the target's bucket alone (earlier versions): an editing run resumed across the change reorders
    GROUPING = 1

    def state_dict(self) -> dict:
        out = {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_batch": self.global_batch,
               "grouping": self.GROUPING, "layout": self.layout}
        if self.rest is not None:
            out["rest"] = list(self.rest)
        return out

    def load_state_dict(self, state: dict, layout_changed: bool | None = None) -> None:
        """The saved position; ``layout_changed``: whether the rows or their groups differ from the saved
        sampler's (None: its recorded ``layout`` decides; a state of an earlier version records none)."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self.rest = [int(i) for i in state["rest"]] if state.get("rest") is not None else None
        self.resumed_as = ""
        if layout_changed is None:
            layout_changed = state.get("layout", self.layout) != self.layout
        started = self.position > 0 or self.rest is not None
        if layout_changed:  # other rows: the saved order's indices mean other rows; a new epoch over them all
            if started:
                self.epoch, self.position, self.rest = self.epoch + 1, 0, None
                self.resumed_as = f"the data order starts epoch {self.epoch}, over all {len(self.buckets_of)} rows"
            return
        old = int(state.get("global_batch") or self.global_batch)
        if old == self.global_batch or not started:
            return
        # the rows of this epoch the saved run has not seen yet, at the new global batch; then the next epoch
        before = (self._global_batches(self.epoch, old) if self.rest is None
                  else self._rest_batches(self.epoch, self.rest, old))
        seen = {i for b in before[:self.position] for i in b}
        rest = list(dict.fromkeys(i for b in before[self.position:] for i in b if i not in seen))
        if not rest:  # the epoch was served in full
            self.epoch, self.position, self.rest = self.epoch + 1, 0, None
            return
        self.rest, self.position = rest, 0
        self.resumed_as = (f"the {len(rest)} rows of epoch {self.epoch} not yet seen come first, then epoch "
                           f"{self.epoch + 1}")
