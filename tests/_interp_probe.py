"""A one-line Triton kernel with a runtime loop bound, run through the interpreter (see conftest)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_kernel(X, Y, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, n, BLOCK):
        acc += tl.load(X + i + tl.arange(0, BLOCK))
    tl.store(Y + tl.arange(0, BLOCK), acc)


def runtime_loop_bound_works() -> str | None:
    """None when it runs and sums correctly, else the error."""
    x, y = torch.ones(32), torch.zeros(16)
    try:
        _sum_kernel[(1,)](x, y, 32, BLOCK=16)
    except Exception as exc:  # noqa: BLE001 - the interpreter wraps the cause; report it whole
        return f"{type(exc).__name__}: {exc}"
    return None if torch.all(y == 2) else f"wrong result {y.tolist()}"
