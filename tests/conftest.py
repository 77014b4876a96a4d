import os
import random
import warnings

# Kernel numerics are checked on the CPU through Triton's interpreter. Must be set before any
# kernel module is imported (triton.jit reads it at decoration time). DOPSD_GPU_TESTS=1 keeps the
# real compiler for a GPU run.
if os.environ.get("DOPSD_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")


def pytest_configure(config):
    """Triton 3.6's interpreter converts a runtime loop bound with ``int(1-element array)``, which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"; triton 3.9
    squeezes first). Every ``range(0, n, BLOCK)`` kernel would fail with that message: say why, once."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from tests._interp_probe import runtime_loop_bound_works

    err = runtime_loop_bound_works()
    if err:
        import triton

        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter cannot run a loop with a runtime bound with numpy "
            f"{np.__version__} ({err}); install numpy<2.4 for this triton (e.g. pip install 'numpy<2.4'), "
            "or triton>=3.9")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _home(tmp_path_factory):
    # The built-in tiny dataset is generated here, never in the user's home.
    os.environ["DOPSD_FAST_HOME"] = str(tmp_path_factory.mktemp("dopsd_home"))
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:
        pass
    yield


def tiny_config(tmp_path, *overrides):
    """The embedded default, quiet, short, writing under tmp_path."""
    from dopsd_fast.config import load_config

    base = [f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false",
            "validation.at_start=false", "validation.every=0", "train.max_steps=3", "train.checkpoint_every=0"]
    return load_config(None, base + list(overrides))


def assert_close(actual, expected, atol=0.0, rtol=0.0, name="tensor", *, scaled=False):
    """allclose that prints the first mismatches and NaN/inf disagreement.

    ``scaled=True``: ``atol`` is relative to the compared tensor's magnitude (the bound is
    ``atol x max|expected| + rtol x |expected|``). Use it wherever the two sides sum in different
    orders (another kernel, another CPU's BLAS, another thread count): their rounding grows with the
    tensor's largest entries, so a fixed atol on a gradient whose entries reach 25 fails by chance,
    while an error that is a sizeable fraction of the tensor still fails.
    ``DOPSD_TOL_REPORT=<file>`` appends each comparison's observed error and bound (headroom audit).
    """
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = ~torch.isfinite(actual), ~torch.isfinite(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: non-finite values disagree at {torch.nonzero(nan_a ^ nan_e)[:5].tolist()}"
    finite = ~nan_a
    scale = expected[finite].abs().max().item() if scaled and finite.any() else 1.0
    atol_eff = atol * scale
    err = (actual - expected).abs().masked_fill(~finite, 0.0)
    bad = (err > atol_eff + rtol * expected.abs()) & finite
    if os.environ.get("DOPSD_TOL_REPORT"):
        slack = (err / (atol_eff + rtol * expected.abs()).clamp_min(1e-300)).max().item() if err.numel() else 0.0
        with open(os.environ["DOPSD_TOL_REPORT"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{name}\t{scaled}\t"
                    f"{err.max().item() if err.numel() else 0:.3g}\t{scale:.3g}\t{slack:.3g}\n")
    if bad.any():
        idx = torch.nonzero(bad)[:5]
        rows = [f"  {tuple(i.tolist())}: {actual[tuple(i)].item():.6g} vs {expected[tuple(i)].item():.6g}" for i in idx]
        kind = f"atol={atol} x max|expected| {scale:.3g}" if scaled else f"atol={atol}"
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} mismatch ({kind}, rtol={rtol}), "
                             f"max abs err {err.max().item():.3g}\n" + "\n".join(rows))


def low_precision_rule(kernel_out, torch_low_out, ref32, atol, name="tensor"):
    """Kernel error vs an fp32 reference <= 2 x the PyTorch low-precision path's error + atol.

    Under TRITON_INTERPRET=1 one more bf16 ulp (at the reference's largest magnitude) is allowed: the
    interpreter casts fp32 -> bf16 by truncation, not round-to-nearest-even (measured: half of the
    values of a randn tensor differ by one ulp from torch's cast); its fp16 cast (numpy's) rounds to
    nearest, as GPUs do, so fp16 gets no allowance.
    """
    k_err = (kernel_out.double() - ref32.double()).abs().max().item()
    t_err = (torch_low_out.double() - ref32.double()).abs().max().item()
    extra = 0.0
    if os.environ.get("TRITON_INTERPRET") == "1" and kernel_out.dtype == torch.bfloat16:
        extra = torch.finfo(kernel_out.dtype).eps * ref32.abs().max().item()
    assert k_err <= 2 * t_err + atol + extra, (
        f"{name}: kernel err {k_err:.3g} > 2 x torch err {t_err:.3g} + {atol} (+ interpreter ulp {extra:.3g})")


def grads_of(out, named_params: dict, cotangent):
    """Gradients of ``out`` (with the given cotangent) for every named parameter (None: unused)."""
    return dict(zip(named_params, torch.autograd.grad(out, list(named_params.values()), cotangent,
                                                      allow_unused=True)))


def compare_grads(grads_a: dict, grads_b: dict, atol, rtol):
    """Every gradient of ``grads_a`` equals ``grads_b``'s, atol relative to the gradient's magnitude
    (``assert_close(scaled=True)``); a tensor unused on one side must get an all-zero gradient on the
    other."""
    for n, b in grads_b.items():
        a = grads_a[n]
        if a is None or b is None:
            other = a if a is not None else b
            assert other is None or other.abs().max() == 0, f"{n}: a gradient on one side only"
            continue
        assert_close(a, b, atol, rtol, n, scaled=True)


def assert_grads_match(out_fast, out_ref, named_params: dict, atol, rtol):
    """Back-propagate one random cotangent through both outputs: every parameter's gradient must
    match (``atol`` is relative to each gradient's largest entry, see :func:`compare_grads`)."""
    g = torch.randn_like(out_ref)
    compare_grads(grads_of(out_fast, named_params, g), grads_of(out_ref, named_params, g), atol, rtol)


def fp8_standins(module, names):
    """Replace the linears ``names`` of ``module`` with stand-ins under torchao's FP8 class name
    (same weights): what the fast path's FP8-module dispatch sees, without FP8 numerics (those need
    an sm_89+ GPU)."""
    import torch

    class Float8Linear(torch.nn.Linear):
        pass

    for n in names:
        parent, _, child = n.rpartition(".")
        old = module.get_submodule(n)
        new = Float8Linear(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        setattr(module.get_submodule(parent), child, new)


class OpCount(TorchDispatchMode):
    """How many times each op ran (``n``: overload packet name -> calls), custom ops included."""

    def __init__(self):
        super().__init__()
        self.n = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.n[name] = self.n.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# Tests whose FP8 GEMMs take per-row / per-column scales (torch._scaled_mm, rowwise) on the CPU: torch's
# CPU _scaled_mm gained them in 2.13 (CUDA's has them on sm_89+ in every torch this project supports).
# On an older torch on the CPU they are skipped, saying why; everything else still runs.
CPU_ROWWISE_FP8_TESTS = (
    "test_fp8_dgrad_cost_passes_are_the_launches_it_makes[True]",
    "test_cublas_fp8_forward_accumulates_fast_and_the_dgrad_promotes[rowwise]",
    "test_fp8_on_the_tma_kernel_equals_scaled_mm_and_its_delta[rowwise]",
    "test_native_fp8_gemm_and_velocity_sqnr[rowwise]",
    "test_native_fp8_parity_rules[rowwise]",
    "test_native_fp8_dgrad_runs_the_backward_dx_in_fp8_within_its_accuracy",
    "test_native_fp8_velocity_sqnr",
)


def cpu_rowwise_scaled_mm() -> bool:
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DOPSD_GPU_TESTS") == "1" or not any(i.name in CPU_ROWWISE_FP8_TESTS for i in items):
        return
    if cpu_rowwise_scaled_mm():
        return
    skip = pytest.mark.skip(reason=f"torch {torch.__version__}'s CPU _scaled_mm has no rowwise scales (torch>=2.13 "
                                   "has them; CUDA's has them)")
    for item in items:
        if item.name in CPU_ROWWISE_FP8_TESTS:
            item.add_marker(skip)
