"""Image decoding off the training step's critical path.

``data.num_workers`` threads decode the images of the NEXT micro-batch while the current one computes
(PIL releases the GIL while it decodes and resizes, so threads overlap the step's host work; no worker
processes, no pickling). The next batch is peeked from the sampler (nothing advanced): it is
deterministic, so the peeked batch is the one the run will take (after a resume too, from the restored
state). A sample whose images were not prefetched decodes when first read, as with ``num_workers: 0``.
Only the records whose images a sample may still read are decoded ahead (the trainer says which: a
context not encoded yet); a run whose contexts come from the feature cache never reads them, so nothing
is decoded at all.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class ImagePrefetcher:
    def __init__(self, dataset, workers: int):
        self.dataset = dataset
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dopsd-decode") if workers > 0 else None
        self.pending: dict[int, Future] = {}

    def images(self, index: int):
        """What :meth:`~dopsd_fast.data.dataset.ImageTextDataset.get` takes as ``images=``: the prefetched
        decode of record ``index`` (waited for when read), or None (decoded when first read). The decode
        is handed over: :meth:`ahead` no longer holds it, so it cannot cancel it (a decode not started yet,
        cancelled with the batch's read still to come, raised CancelledError at that read)."""
        fut = self.pending.pop(index, None)
        return fut.result if fut is not None else None

    def ahead(self, sampler, wanted=None) -> None:
        """Start decoding the batch ``sampler`` will give next (the sampler itself is not advanced); with
        ``wanted``, only the records for which it is true (the others' images would not be read)."""
        if self.pool is None:
            return
        nxt = {i for i in sampler.peek_batch() if wanted is None or wanted(i)}
        for i in [i for i in self.pending if i not in nxt]:  # done with: drop (a running decode finishes alone)
            self.pending.pop(i).cancel()
        for i in nxt:
            if i not in self.pending:
                self.pending[i] = self.pool.submit(self.dataset.load_images, i)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        self.pending.clear()
