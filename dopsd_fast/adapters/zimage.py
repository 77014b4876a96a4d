"""The Z-Image adapter, under its earlier import path (:mod:`dopsd_fast.families.zimage.adapter`)."""

from dopsd_fast.families.zimage.adapter import ZImageAdapter, zimage_velocity  # noqa: F401
from dopsd_fast.vlm import WeightSwapError, swap_language_model  # noqa: F401
