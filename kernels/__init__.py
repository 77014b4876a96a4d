"""Triton kernels of dopsd-fast, installed as ``dopsd_fast.kernels`` (never a top-level ``kernels``
module). Import the modules you need (``dopsd_fast.kernels.attention``, ``.multi_lora``,
``.rope_qk_norm``, ``.norm_modulation``, ``.swiglu``, ``.dopsd_loss``); importing this package
imports nothing heavy."""
