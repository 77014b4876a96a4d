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
from packaging.version import Version

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


def test_the_runtime_floors_are_setup_pys():
    from dopsd_fast.errors import LIBRARY_FLOORS

    reqs = install_requires()
    for name, floor in LIBRARY_FLOORS.items():
        lows = [s.version for s in reqs[name].specifier if s.operator == ">="]
        assert lows and Version(lows[0]) == Version(floor), (name, floor, str(reqs[name].specifier))


def test_an_older_library_than_the_floor_is_one_line_at_import(tmp_path):
    """pip checks the range when it installs, but not an install with --no-deps, or a library moved later
    inside another trainer's environment: there `import dopsd_fast` went on and failed later, deep in a
    library (peft 0.17: "cannot import name 'HybridCache'"; transformers 5.3: a missing module). Now the
    import stops at once, in one line naming the library, its version and the floor."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site"
    meta = fake / "peft-0.17.1.dist-info"  # what an install of peft 0.17.1 leaves, found before the real one
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.17.1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", "import dopsd_fast"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last == ("ImportError: dopsd_fast: peft 0.17.1 (needs >= 0.18) installed; upgrade: "
                                          "pip install 'peft>=0.18'"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import dopsd_fast"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # this environment's versions pass


def test_release_numbers_compare_as_releases():
    from dopsd_fast.errors import _release

    assert _release("5.10.0") > _release("5.4") > _release("5.3.99") and _release("0.18.0.dev0") >= _release("0.18")
    assert _release("5.4.0+cpu") == (5, 4, 0) and _release("garbage") == ()
