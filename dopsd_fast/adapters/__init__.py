"""Model adapters, under their earlier import path: each family's adapter lives in its folder
(``dopsd_fast/families/<name>/adapter.py``, the interface in :mod:`dopsd_fast.families.adapter`)."""

from dopsd_fast.context import Context
from dopsd_fast.families import build_adapter
from dopsd_fast.families.adapter import ModelAdapter, resolve_device_dtype

__all__ = ["Context", "ModelAdapter", "build_adapter", "resolve_device_dtype"]
