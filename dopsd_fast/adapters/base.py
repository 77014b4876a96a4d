"""The adapter interface, under its earlier import path (:mod:`dopsd_fast.families.adapter`)."""

from dopsd_fast.context import Context
from dopsd_fast.families.adapter import ModelAdapter

__all__ = ["Context", "ModelAdapter"]
