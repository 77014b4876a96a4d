"""Data: the authors' JSONL format, image folders, aspect buckets and the built-in tiny dataset."""

from dopsd_fast.data.buckets import ONE_MEGAPIXEL_BUCKETS, assign_bucket, make_buckets
from dopsd_fast.data.dataset import DataError, ImageTextDataset, Record, Sample, build_dataset
from dopsd_fast.data.sampler import BucketBatchSampler

__all__ = [
    "ONE_MEGAPIXEL_BUCKETS",
    "BucketBatchSampler",
    "DataError",
    "ImageTextDataset",
    "Record",
    "Sample",
    "assign_bucket",
    "build_dataset",
    "make_buckets",
]
