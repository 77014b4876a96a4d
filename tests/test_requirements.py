"""setup.py's install_requires admits only versions the code runs on.

Each floor below was found by installing the lowest admitted versions together (torch 2.13.0, diffusers 0.42.0)
and running the suite and the default job: a floor under one of these lets pip install an environment in which
the package fails on import or on its default run. pip cannot catch either itself (peft's metadata does not bound
transformers; our import of the processor module is ours alone)."""

import ast
import importlib.metadata as md
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

# name: (a version that fails, the lowest that works, why)
FLOORS = {
    "transformers": ("5.3.0", "5.4.0", "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl, which the Z-Image "
                     "family imports, first ships in 5.4.0 (ModuleNotFoundError on 5.2/5.3)"),
    "peft": ("0.17.1", "0.18.0", "peft < 0.18 imports transformers.HybridCache, which transformers 5 removed "
             "(ImportError on import of peft, and of diffusers' LoRA loader)"),
    "safetensors": ("0.7.0", "0.8.0", "diffusers 0.42 requires safetensors >= 0.8"),
    "tokenizers": ("0.21.4", "0.22.0", "transformers 5.4 requires tokenizers >= 0.22"),
}


def install_requires() -> dict[str, Requirement]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = [Requirement(s) for s in ast.literal_eval(node.value)]
            return {r.name.lower(): r for r in reqs}
    raise AssertionError("setup.py: no install_requires")


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_floor_excludes_the_versions_that_fail(name):
    bad, good, why = FLOORS[name]
    spec = install_requires()[name].specifier
    assert bad not in spec, f"setup.py admits {name} {bad} ({spec}): {why}"
    assert good in spec, f"setup.py refuses {name} {good} ({spec})"


def test_the_installed_versions_are_the_declared_ones():
    """This environment lies inside the declared range (a run outside it tests nothing the range promises)."""
    env = default_environment()
    outside = []
    for name, req in install_requires().items():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            outside.append(f"{name} not installed")
            continue
        if not req.specifier.contains(have.split("+")[0], prereleases=True):
            outside.append(f"{name} {have} (setup.py: {req.specifier})")
    assert not outside, outside
