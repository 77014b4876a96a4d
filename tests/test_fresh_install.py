"""The checkout imports as-is, and nothing in it shadows another project's top-level name.

Hugging Face's ``kernels`` package (a dependency of transformers >= 5.25) shares its top-level name
with our ``kernels/`` folder. The folder has no ``__init__.py``: wherever the repository root is on
``sys.path`` (``python -c`` / ``python -m`` from the root, pytest's rootdir), ``import kernels`` must
find Hugging Face's package, and ``dopsd_fast.kernels`` must still reach our folder. Checked with
Hugging Face's package installed (as CI installs it) and absent (a view of this environment's
site-packages without it, and without any install of dopsd-fast: the bare checkout)."""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if not p.name.startswith("_"))


def _py(code_or_args, cwd=ROOT, env_over=None, bare_site=None, timeout=300):
    """Python in a subprocess; ``bare_site``: run with ``-S`` and only that folder as site-packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(env_over or {})
    cmd = [sys.executable]
    if bare_site is not None:
        cmd.append("-S")
        env["PYTHONPATH"] = str(bare_site)
    cmd += ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _hf_kernels_expected() -> bool:
    """Hugging Face's ``kernels`` is installed, or the installed transformers requires it (>= 5.25, as CI pins):
    below that, an environment inside setup.py's range may lack it, and the clash the tests check is not there."""
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    reqs = [Requirement(r) for r in importlib.metadata.requires("transformers") or []]
    return any(r.name == "kernels" and (r.marker is None or r.marker.evaluate({"extra": ""})) for r in reqs)


needs_hf_kernels = pytest.mark.skipif(not _hf_kernels_expected(), reason="Hugging Face's kernels is neither installed "
                                      "nor required by this transformers (< 5.25)")


@pytest.fixture(scope="module")
def site_without_hf_kernels(tmp_path_factory):
    """This environment's site-packages as symlinks, less Hugging Face's ``kernels`` (module and
    metadata) and less every trace of an installed dopsd-fast (editable finder, metadata)."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path_factory.mktemp("site-view")
    for entry in site.iterdir():
        name = entry.name.lower()
        if name == "kernels" or name.startswith("kernels-") or "dopsd" in name or name.endswith(".pth"):
            continue
        (view / entry.name).symlink_to(entry)
    return view


@needs_hf_kernels
def test_hf_kernels_is_installed_here():
    """The pinned environment has Hugging Face's package: the tests below run against the real clash."""
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin and "site-packages" in spec.origin, spec


def test_our_folder_is_never_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "dopsd_fast" / "kernels" / "__init__.py").is_file()
    # every folder whose scripts run as scripts goes first on sys.path then: none may hold a `kernels` package
    for folder in {p.parent for p in SCRIPTS} | {ROOT}:
        assert not (folder / "kernels" / "__init__.py").exists(), folder


@needs_hf_kernels
@pytest.mark.parametrize("how", ["cwd", "pythonpath"])
def test_imports_from_the_root_with_hf_kernels(how):
    """With the root first on sys.path (``python -c`` from the root; PYTHONPATH=root from elsewhere)."""
    code = ("import sys, kernels, diffusers, transformers, dopsd_fast.kernels.attention as a\n"
            "from diffusers import ZImageTransformer2DModel, Flux2Transformer2DModel\n"
            "from kernels import CUDAProperties\n"  # what transformers' integration imports
            "from diffusers.utils.import_utils import is_kernels_available\n"
            "assert is_kernels_available()\n"
            f"assert not kernels.__file__.startswith({str(ROOT / 'kernels')!r}), kernels.__file__\n"
            f"assert a.__file__ == {str(ROOT / 'kernels' / 'attention.py')!r}, a.__file__\n"
            "print('ok')")
    r = _py(code, cwd=ROOT if how == "cwd" else "/", env_over={"PYTHONPATH": str(ROOT)} if how == "pythonpath" else None)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_bare_checkout_without_hf_kernels(site_without_hf_kernels):
    """No Hugging Face ``kernels``, no install of dopsd-fast: from the root, diffusers and transformers
    import (transformers finds no usable ``kernels``: at most our folder as an empty namespace portion,
    which it does not take for the package), and ``dopsd_fast.kernels`` comes from the checkout."""
    code = ("import importlib.util, importlib.metadata as md, dopsd_fast, dopsd_fast.kernels.swiglu as s\n"
            "from diffusers import ZImageTransformer2DModel\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "from diffusers.utils.import_utils import is_kernels_available as diffusers_sees_kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "assert spec is None or (spec.origin is None and not spec.has_location), spec\n"
            "import transformers\nfrom packaging.version import InvalidVersion, Version\n"
            # transformers < 5.14 parses the version of any importable ``kernels`` (ours from the root: 'N/A') and
            # raises: its bug, reached only by its flash-attn fallback and kernelize(), neither of which we use
            "try:\n    tf_sees = is_kernels_available()\n"
            "except InvalidVersion:\n    assert Version(transformers.__version__) < Version('5.14'), transformers.__version__\n"
            "    tf_sees = False\n"
            "assert not tf_sees and not diffusers_sees_kernels()\n"
            "try:\n    md.version('kernels')\n    raise AssertionError('HF kernels metadata visible')\n"
            "except md.PackageNotFoundError:\n    pass\n"
            f"assert dopsd_fast.__file__.startswith({str(ROOT)!r}) and s.__file__.startswith({str(ROOT / 'kernels')!r})\n"
            "print('ok')")
    r = _py(code, bare_site=site_without_hf_kernels)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("bare", [False, True], ids=["installed", "bare-checkout"])
def test_python_m_dopsd_fast_help(bare, site_without_hf_kernels):
    r = _py(["-m", "dopsd_fast", "--help"], bare_site=site_without_hf_kernels if bare else None)
    assert r.returncode == 0 and "usage:" in r.stdout and "--config" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT / "benchmarks")) for p in SCRIPTS])
def test_benchmark_scripts_help_as_scripts(script, site_without_hf_kernels):
    """Every benchmark script runs as a script (``python benchmarks/x.py --help``) from the bare
    checkout: it finds dopsd_fast by appending the root to the END of sys.path, never the front."""
    r = _py([str(script), "--help"], bare_site=site_without_hf_kernels, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, (r.stdout[-1000:], r.stderr[-3000:])
    text = script.read_text()
    # the only folder a script may put first is its own (benchmarks/, HERE): never the checkout's root
    front = re.findall(r"sys\.path\.insert\(0,\s*([^\n]*)\)", text)
    assert all(arg.strip() == "str(HERE)" for arg in front), front
