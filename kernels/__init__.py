"""Triton kernels of dopsd-fast, installed as ``dopsd_fast.kernels`` (never a top-level
``kernels`` module). The kernel suite is tracked in its own issue; nothing here yet."""
