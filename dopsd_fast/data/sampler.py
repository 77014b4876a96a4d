"""Deterministic, resumable, rank-aware batch sampler over aspect buckets."""

from __future__ import annotations

import random


class BucketBatchSampler:
    """Batches of indices that share one bucket.

    The order of epoch ``e`` is a pure function of ``(seed, e)``, so the position ``(epoch,
    batch_index)`` is all a checkpoint needs to resume exactly. With ``world_size > 1`` each rank
    takes every ``world_size``-th batch of the same global order (DDP/FSDP-ready).
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
        self.position = 0  # index of the next batch of this rank within the epoch
        if not self.buckets_of:
            raise ValueError("the dataset is empty")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict = {}
        for i, b in enumerate(self.buckets_of):
            groups.setdefault(tuple(b), []).append(i)
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append(chunk)
        rng.shuffle(batches)
        return batches[self.rank::self.world_size]

    def next_batch(self) -> list[int]:
        while True:
            batches = self.epoch_batches(self.epoch)
            if self.position < len(batches):
                b = batches[self.position]
                self.position += 1
                return b
            if not batches:
                raise ValueError("no batch for this rank: dataset smaller than world_size x batch_size")
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
