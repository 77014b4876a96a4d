"""Kernel tests run on the CPU through Triton's interpreter (default) or, with DOPSD_GPU_TESTS=1, on
the GPU: every tensor a test creates then lives on CUDA, so the compiled kernels run."""

import os

import pytest
import torch

GPU = os.environ.get("DOPSD_GPU_TESTS") == "1"


@pytest.fixture(autouse=True)
def _kernel_device():
    if not GPU:
        yield
        return
    if not torch.cuda.is_available():
        pytest.fail("DOPSD_GPU_TESTS=1 but no CUDA GPU is visible")
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")
