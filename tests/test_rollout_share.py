"""What a roll-out shares across its K states on the fast path, common to both families: the LoRA
weights cast to the compute dtype once per roll-out (fp32 masters -> bf16), not at every linear call
of every state; the gradient still reaches each fp32 master per use, as the per-call cast's does."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import assert_close


class CastCounter(TorchDispatchMode):
    """Counts the casts of the LoRA tensors (inputs at ``ptrs``), forward and backward."""

    def __init__(self, ptrs):
        super().__init__()
        self.ptrs, self.n = ptrs, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _bf16_base(st):
    """The base weights in bf16, the LoRA adapters (student and teacher) kept fp32: a real run's dtypes."""
    with torch.no_grad():
        for n, p in st.transformer.named_parameters():
            if "lora_" not in n:
                p.data = p.data.to(torch.bfloat16)
    return st


def _zimage(ckpt):
    from dopsd_fast.adapters.base import Context
    from tests.test_fast_zimage import _fast, _inputs, _model

    st = _bf16_base(_model(True, n_refiner_layers=2))
    x, _, caps_s, caps_t = _inputs(2, 10, 6, [5, 33], [40, 3])
    return st, _fast(st, checkpoint_layers=ckpt), x, [Context(c) for c in caps_s], [Context(c) for c in caps_t]


def _klein(ckpt):
    from tests.test_fast_flux2 import _fast, _setup as klein_setup

    _, st, ctx_s, ctx_t = klein_setup(True)
    _bf16_base(st)
    return st, _fast(st, checkpoint_layers=ckpt), torch.randn(2, 16, 6, 4), ctx_s, ctx_t


SETUPS = {"zimage": _zimage, "klein": _klein}


@pytest.mark.parametrize("backward,ckpt", [("once", 0), ("stepwise", 0), ("stepwise", 2)])
@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_lora_casts_once_per_rollout(family, backward, ckpt):
    """bf16 base, fp32 adapters: with the roll-out's share every LoRA tensor (student and teacher) is
    cast once for the K = 4 states, and the state losses and every fp32 LoRA gradient equal the
    per-call casts' (Z-Image's student context refiner per state in both, to compare the casts alone),
    with gradient checkpointing too (its recompute reads the same shared casts)."""
    from dopsd_fast.algorithm import rollout_loss_paired

    st, fast, x, ctx_s, ctx_t = SETUPS[family](ckpt)
    params = st.named_trainable()
    assert all(p.dtype == torch.float32 for p in params.values())
    sig = [1.0, 0.9, 0.75, 0.5, 0.0]
    results = {}
    for name in ("per call", "shared"):
        share = fast.new_share(student=False) if name == "shared" else None
        counts = []

        def fn(x_, s_, share=share, counts=counts):
            out = fast.velocity_pair(x_, s_, ctx_s, ctx_t, share=share)
            counts.append(share.casts if share is not None else 0)
            return out

        for p in params.values():
            p.grad = None
        with CastCounter({t.data_ptr() for t in (*params.values(), *st.named_teacher().values())}) as cc:
            res = rollout_loss_paired(fn, x, sig, backward=backward)
            if backward == "once":
                res.loss.backward()
            if share is not None:
                share.finish()
        if share is None:
            assert cc.n > len(params) + len(st.named_teacher())
        results[name] = (res, {n: p.grad.clone() for n, p in params.items()})
        if share is not None:
            n_lora = len(params) + len(st.named_teacher())
            assert counts == [n_lora] * 4, (counts, n_lora)  # all at the first state, none after
            assert share.casts == cc.n == n_lora  # nor in the backward's recompute of checkpointed layers
    (ref, g_ref), (got, g_got) = results["per call"], results["shared"]
    for a, b in zip(got.state_losses, ref.state_losses):
        assert_close(a, b, 1e-6, 1e-5, "state loss")
    assert all(g.dtype == torch.float32 for g in g_got.values())
    for n in g_ref:
        assert_close(g_got[n], g_ref[n], 1e-5, 1e-4, n, scaled=True)
