"""The fast Z-Image model, under its earlier import path (:mod:`dopsd_fast.families.zimage.fast`)."""

from dopsd_fast.families.zimage.fast import ContextShare, FastZImage  # noqa: F401
