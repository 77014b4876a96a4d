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


SHORT = os.environ.get("DOPSD_GPU_TESTS_SHORT") == "1"


def pytest_collection_modifyitems(config, items):
    """DOPSD_GPU_TESTS_SHORT=1 (the GPU check's short form): one case per test function and dtype, the
    first one collected; the rest deselected (and reported as deselected, not passed)."""
    if not SHORT:
        return
    keep, drop, seen = [], [], set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        key = (item.nodeid.split("[")[0], str(params.get("dtype", "")))
        (drop if key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
