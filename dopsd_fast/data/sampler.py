"""Deterministic, resumable, rank-aware batch sampler over aspect buckets."""

from __future__ import annotations

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
        self.position = 0  # index of the next global batch within the epoch
        if not self.buckets_of:
            raise ValueError("the dataset is empty")

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

    def _global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict = {}
        for i, b in enumerate(self.buckets_of):
            groups.setdefault(tuple(b), []).append(i)
        n = self.global_batch
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            rng.shuffle(idx)
            for s in range(0, len(idx), n):
                chunk = idx[s:s + n]
                if len(chunk) < n:
                    if self.drop_last:
                        continue
                    chunk = chunk + [idx[j % len(idx)] for j in range(n - len(chunk))]
                batches.append(chunk)
        rng.shuffle(batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch`` (its slice of every global batch)."""
        b, r = self.batch_size, self.rank
        return [g[r * b:(r + 1) * b] for g in self.global_batches(epoch)]

    def _next(self) -> tuple[int, int, list[int]]:
        """(epoch, position, this rank's slice) of the next global batch, without advancing."""
        epoch, position = self.epoch, self.position
        while True:
            batches = self.global_batches(epoch)
            if position < len(batches):
                return epoch, position, batches[position][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if not batches:
                raise ValueError(f"no full global batch of {self.global_batch} samples in any bucket "
                                 "(drop_last with a dataset smaller than batch_size x world_size)")
            epoch, position = epoch + 1, 0

    def next_batch(self) -> list[int]:
        """This rank's slice of the next global batch."""
        self.epoch, position, batch = self._next()
        self.position = position + 1
        return batch

    def peek_batch(self) -> list[int]:
        """What :meth:`next_batch` will return next (nothing advanced)."""
        return self._next()[2]

    # 1: the groups are ImageTextDataset.batch_groups (editing rows by their references too); absent: by
    # the target's bucket alone (earlier versions): an editing run resumed across the change reorders
    GROUPING = 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_batch": self.global_batch,
                "grouping": self.GROUPING}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
