"""Real CUDA-graph capture of both families' no-grad single-branch forwards (what ``fast.graphs``
captures: validation and sampling), GPU only (DOPSD_GPU_TESTS=1 on a CUDA machine). On the CPU they
are skipped, not passed: there, ``tests/test_graphs.py`` proves the same forwards free of host work
with the capture guard, which cannot see what happens inside a CUDA kernel launch or PyTorch's
jagged SDPA on CUDA (this test can)."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("DOPSD_GPU_TESTS") != "1" or not torch.cuda.is_available(),
                                reason="GPU-only: a real CUDA graph capture (set DOPSD_GPU_TESTS=1 on a CUDA machine)")


def _zimage(ops):
    """2 samples, captions of different lengths per branch, a padded image (15 tokens -> 32)."""
    from tests.test_fast_zimage import _fast, _model

    st = _model(True)
    fast = _fast(st, ops=ops)

    def fwd(which, x, sigma, *c):
        out = fast.forward_pair(x, 1 - sigma, list(c) if which == "s" else None, list(c) if which == "t" else None,
                                student=which == "s")
        return out[0] if which == "s" else out[1]

    ctx = {"s": [torch.randn(n, 32) for n in (5, 33)], "t": [torch.randn(n, 32) for n in (40, 3)]}
    return st, fwd, torch.randn(2, 16, 10, 6), ctx


def _klein(ops):
    """2 samples; the teacher with its reference image."""
    from dopsd_fast.adapters.base import Context
    from tests.test_fast_flux2 import _fast, _setup

    _, st, _, _ = _setup(True)
    fast = _fast(st, ops=ops)
    refs = [torch.randn(16, 6, 4) for _ in range(2)]

    def fwd(which, x, sigma, *c):
        cs = [Context(f, {"ref0": r} if which == "t" else {}) for f, r in zip(c, refs)]
        out = fast.velocity_pair(x, sigma, cs if which == "s" else None, cs if which == "t" else None)
        return out[0] if which == "s" else out[1]

    ctx = {"s": [torch.randn(24, 96) for _ in range(2)], "t": [torch.randn(24, 96) for _ in range(2)]}
    return st, fwd, torch.randn(2, 16, 6, 4), ctx


INPUTS = {"zimage": _zimage, "klein": _klein}


@pytest.mark.parametrize("kernels,attention", [("on", "triton"), ("off", "sdpa")])
@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_graph_replays_equal_launched_forwards(family, kernels, attention):
    """Each branch alone, captured once, replayed on new inputs (ragged captions: Z-Image 2 samples of
    different caption lengths and a padded image; klein the teacher with its reference image): equal
    to the same forward launched op by op."""
    from dopsd_fast.graphs import GraphCache
    from dopsd_fast.models.ops import build_ops

    dev = torch.device("cuda")
    st, fwd, x0, ctx = INPUTS[family](build_ops(kernels, attention, dev))
    for which in "st":
        cache = GraphCache(lambda x, s, *c, w=which: (fwd(w, x, s, *c),), lambda: list(st.transformer.parameters()),
                           name=f"{family} {which}")
        for scale in (1.0, 0.5, -2.0):
            x, sigma = scale * x0, torch.tensor([0.7, 0.2])
            got = cache("k", x, sigma, *ctx[which])[0]
            with torch.no_grad():
                want = fwd(which, x, sigma, *ctx[which])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert (cache.captures, cache.replays) == (1, 3)
