"""Model adapters (see :mod:`dopsd_fast.adapters.base` for the interface)."""

from __future__ import annotations

import os

import torch

from dopsd_fast.adapters.base import Context, ModelAdapter



def resolve_device_dtype(cfg) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA + bf16 when a GPU is there, else CPU + fp32 (called at run time, not import)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as e:
            raise ValueError(f"model.device: {cfg.device!r} is not a device ({str(e).splitlines()[0]}); use auto, cpu, "
                             "cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model.device: {cfg.device!r}, but this machine has no CUDA GPU; use auto or cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"model.device: {cfg.device!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per process
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def build_adapter(cfg, load_encoders: bool = True, empty_weights: bool = False) -> ModelAdapter:
    """Build the adapter of ``cfg.family`` (a :class:`~dopsd_fast.config.ModelConfig`); ``empty_weights``:
    the architecture on the meta device, nothing read (``dopsd-train --dry-run``)."""
    from dopsd_fast.families import family

    spec = family(cfg.family)
    device, dtype = resolve_device_dtype(cfg)
    return spec.adapter_class()(cfg, device, dtype, load_encoders=load_encoders, empty_weights=empty_weights)


__all__ = ["Context", "ModelAdapter", "build_adapter", "resolve_device_dtype"]
