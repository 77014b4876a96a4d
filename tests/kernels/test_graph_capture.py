"""Real CUDA-graph capture of both families' no-grad single-branch forwards (what ``fast.graphs``
captures: validation and sampling), GPU only (DOPSD_GPU_TESTS=1 on a CUDA machine). On the CPU they
are skipped, not passed: there, ``tests/test_graphs.py`` proves the same forwards free of host work
with the capture guard (on ``meta`` too, where a tensor made on the host per call stands out), which
cannot see what happens inside a CUDA kernel launch or PyTorch's jagged SDPA on CUDA (this test can).

Each family runs in fp32 and in bf16 (the adapters fp32, as in training): a replay and the same
forward launched op by op need not be bitwise equal (cuBLAS may pick other kernels on another stream
and workspace), so bf16 compares at its rounding; a replay that did not read its new inputs is off
by the whole output (each call scales the latents). A failure names the case and the phase and
keeps the error text (the GPU check keeps the output's tail)."""

import os
import traceback

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("DOPSD_GPU_TESTS") != "1" or not torch.cuda.is_available(),
                                reason="GPU-only: a real CUDA graph capture (set DOPSD_GPU_TESTS=1 on a CUDA machine)")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = [("on", "triton"), ("off", "sdpa")]


def _in_dtype(st, dtype):
    """The base in ``dtype``, the LoRA adapters fp32 (as StudentTeacher keeps them)."""
    st.transformer.to(dtype)
    for p in (*st.named_trainable().values(), *st.named_teacher().values()):
        p.data = p.data.float()
    return st


def _zimage(ops, dtype):
    """2 samples, captions of different lengths per branch, a padded image (15 tokens -> 32)."""
    from tests.test_fast_zimage import _fast, _model

    st = _in_dtype(_model(True), dtype)
    fast = _fast(st, ops=ops)

    def fwd(which, x, sigma, *c):
        out = fast.forward_pair(x, 1 - sigma, list(c) if which == "s" else None, list(c) if which == "t" else None,
                                student=which == "s")
        return (out[0] if which == "s" else out[1]).float()

    ctx = {"s": [torch.randn(n, 32) for n in (5, 33)], "t": [torch.randn(n, 32) for n in (40, 3)]}
    return st, fwd, torch.randn(2, 16, 10, 6), ctx


def _klein(ops, dtype):
    """2 samples; the teacher with its reference image."""
    from dopsd_fast.adapters.base import Context
    from tests.test_fast_flux2 import _fast, _setup

    _, st, _, _ = _setup(True)
    st = _in_dtype(st, dtype)
    fast = _fast(st, ops=ops)
    refs = [torch.randn(16, 6, 4) for _ in range(2)]

    def fwd(which, x, sigma, *c):
        cs = [Context(f, {"ref0": r} if which == "t" else {}) for f, r in zip(c, refs)]
        out = fast.velocity_pair(x, sigma, cs if which == "s" else None, cs if which == "t" else None)
        return out[0] if which == "s" else out[1]

    fwd.constants = refs  # what the forward reads beside its inputs and the model (the teacher's references)

    ctx = {"s": [torch.randn(24, 96) for _ in range(2)], "t": [torch.randn(24, 96) for _ in range(2)]}
    return st, fwd, torch.randn(2, 16, 6, 4), ctx


def _replays_equal_launched(family, build, kernels, attention, dtype):
    """Each branch alone, captured once, replayed on new inputs: equal to the same forward launched op
    by op (fp32: to 1e-4; bf16: to 3e-2 of the output's scale)."""
    from dopsd_fast.graphs import GraphCache
    from dopsd_fast.models.ops import build_ops

    dev = torch.device("cuda")
    st, fwd, x0, ctx = build(build_ops(kernels, attention, dev), DTYPES[dtype])
    tol = 1e-4 if dtype == "fp32" else 3e-2
    for which in "st":
        case = f"{family} {dtype} kernels={kernels} attention={attention} branch={which}"
        cache = GraphCache(lambda x, s, *c, w=which: (fwd(w, x, s, *c),), lambda: list(st.transformer.parameters()),
                           name=f"{family} {which}")
        previous = None
        for scale in (1.0, 0.5, -2.0):
            x, sigma = scale * x0, torch.tensor([0.7, 0.2])
            phase = "warm-up, capture and first replay" if cache.captures == 0 else "replay"
            try:
                got = cache("k", x, sigma, *ctx[which])[0]
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - the text is what the next GPU run must keep
                text = f"GRAPH CAPTURE FAILED: {case}, {phase}: {type(exc).__name__}: {exc}"
                print("".join(traceback.format_exc().splitlines(True)[-16:]) + text, flush=True)  # text last: in the tail
                pytest.fail(text, pytrace=False)
            if cache.failures:  # the cache ran the forward eagerly after a failed capture: no graph to test
                text = f"GRAPH CAPTURE FAILED: {case}, {phase}: {next(iter(cache.failures.values()))}"
                print(text, flush=True)
                pytest.fail(text, pytrace=False)
            with torch.no_grad():
                want = fwd(which, x, sigma, *ctx[which])
            scale_out = float(want.abs().max())
            diff = float((got - want).abs().max())
            print(f"{case} scale {scale}: replay vs launched max abs diff {diff:.3g} of {scale_out:.3g} "
                  f"(bitwise equal: {diff == 0})", flush=True)
            assert diff <= tol * scale_out, (f"GRAPH REPLAY DIFFERS: {case}, scale {scale}: max abs diff {diff:.3g}, "
                                             f"allowed {tol * scale_out:.3g}")
            if previous is not None:  # the replay read the new inputs
                assert float((previous - want).abs().max()) > tol * scale_out, f"GRAPH REPLAY STALE: {case}"
            previous = got
        assert (cache.captures, cache.replays) == (1, 3), case


@pytest.mark.parametrize("kernels,attention", OPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_klein_graph_replays_equal_launched_forwards(dtype, kernels, attention):
    """klein (first: its capture failed on the H200, 2026-12-04, text not kept): the teacher with its
    reference image."""
    _replays_equal_launched("klein", _klein, kernels, attention, dtype)


@pytest.mark.parametrize("kernels,attention", OPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_zimage_graph_replays_equal_launched_forwards(dtype, kernels, attention):
    """Z-Image: 2 samples of different caption lengths and a padded image."""
    _replays_equal_launched("zimage", _zimage, kernels, attention, dtype)
