import os
import random
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")


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


def assert_close(actual, expected, atol=0.0, rtol=0.0, name="tensor"):
    """allclose that prints the first mismatches and NaN/inf disagreement."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = ~torch.isfinite(actual), ~torch.isfinite(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: non-finite values disagree at {torch.nonzero(nan_a ^ nan_e)[:5].tolist()}"
    bad = (actual - expected).abs() > atol + rtol * expected.abs()
    bad &= ~nan_a
    if bad.any():
        idx = torch.nonzero(bad)[:5]
        rows = [f"  {tuple(i.tolist())}: {actual[tuple(i)].item():.6g} vs {expected[tuple(i)].item():.6g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} mismatch (atol={atol}, rtol={rtol}), "
                             f"max abs err {(actual - expected).abs().max().item():.3g}\n" + "\n".join(rows))
