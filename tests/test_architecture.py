"""The package's structure, checked on its source: the layer order of docs/architecture.md (no module
imports from a higher layer, no import cycles; every import counts, also the ones inside functions),
and no model family named outside ``dopsd_fast/families/`` (no family, preset, flavour or schedule
name in a string literal of code; docstrings and comments may name them)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dopsd_fast"

# Lowest first. A module may import from its own layer and the layers below. The first matching prefix
# (longest first) places a module; every module must be placed.
LAYERS = [
    ("base", ["dopsd_fast.errors", "dopsd_fast.context", "dopsd_fast.algorithm", "dopsd_fast.profiling",
              "dopsd_fast.offline", "dopsd_fast.vlm", "dopsd_fast.kernels", "dopsd_fast.safety",
              "dopsd_fast.distributed", "dopsd_fast.graphs", "dopsd_fast.memory", "dopsd_fast.export",
              "dopsd_fast.toy.world", "dopsd_fast.toy.curved", "dopsd_fast.toy.stages", "dopsd_fast.data.buckets", "dopsd_fast.data.sampler",
              "dopsd_fast.data.prefetch", "dopsd_fast.families.common"]),
    ("ops", ["dopsd_fast.models.ops", "dopsd_fast.models.paired", "dopsd_fast.models", "dopsd_fast.fp8",
             "dopsd_fast.fsdp", "dopsd_fast.weights", "dopsd_fast.data", "dopsd_fast.logging_utils",
             "dopsd_fast.validation", "dopsd_fast.curves"]),
    ("families", ["dopsd_fast.families"]),
    ("run", ["dopsd_fast.config", "dopsd_fast.cache", "dopsd_fast.checkpoint", "dopsd_fast.pair", "dopsd_fast.plan",
             "dopsd_fast.fastpath", "dopsd_fast.backend", "dopsd_fast.dryrun", "dopsd_fast.sample",
             "dopsd_fast.adapters", "dopsd_fast.models.zimage", "dopsd_fast.models.flux2", "dopsd_fast.toy"]),
    ("trainer", ["dopsd_fast.trainer"]),
    ("entry", ["dopsd_fast.cli", "dopsd_fast.__main__", "dopsd_fast.toy.__main__", "dopsd_fast"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise AssertionError(f"{module}: in no layer of tests/test_architecture.py LAYERS (and docs/architecture.md)")
    return best[0]


def imports_of(source: str, known: set[str]) -> set[str]:
    """The package modules a source imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dopsd_fast":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dopsd_fast")
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(f): f for f in PKG.rglob("*.py")}
    return {m: imports_of(f.read_text(), set(files)) - {m} for m, f in files.items()}


def upward_imports(g: dict) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in sorted(g.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def cycles(g: dict) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_every_module_has_a_layer_and_no_import_goes_up():
    g = graph()
    assert len(g) > 40
    bad = upward_imports(g)
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_layer_and_cycle_checks_can_fail():
    """A planted upward import and a planted cycle are found."""
    g = graph()
    planted = dict(g, **{"dopsd_fast.algorithm": g["dopsd_fast.algorithm"] | {"dopsd_fast.trainer"}})
    assert any("dopsd_fast.algorithm (base) imports dopsd_fast.trainer" in b for b in upward_imports(planted))
    assert any(c[0] == "dopsd_fast.algorithm" or "dopsd_fast.algorithm" in c for c in cycles(planted))
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("somewhere.else")
    src = "def f():\n    from dopsd_fast.trainer import Trainer\n"
    assert imports_of(src, {"dopsd_fast.trainer"}) == {"dopsd_fast.trainer"}  # imports inside functions count


# ---- no family named outside families/ ----------------------------------------------------------------
def family_words() -> set[str]:
    from dopsd_fast.families import FAMILIES

    words = set()
    for spec in FAMILIES.values():
        words |= {spec.name, *spec.presets, *spec.flavours, *spec.named_schedules, f"{spec.name}-k"}
    return words


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def family_literals(source: str, words: set[str]) -> list[str]:
    tree = ast.parse(source)
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            hit = sorted(w for w in words if w in node.value.lower())
            if hit:
                out.append(f"line {node.lineno}: {node.value[:60]!r} names {hit}")
    return out


def test_no_family_named_outside_families():
    words = family_words()
    assert {"zimage", "klein", "tiny-zimage", "toy-zimage", "zimage-k4", "zimage-6b"} <= words
    offenders = []
    for f in sorted(PKG.rglob("*.py")):
        if (PKG / "families") in f.parents:
            continue
        offenders += [f"{f.relative_to(ROOT)} {hit}" for hit in family_literals(f.read_text(), words)]
    assert not offenders, "family names in code outside dopsd_fast/families/:\n" + "\n".join(offenders)


def test_the_family_name_check_can_fail():
    words = family_words()
    assert family_literals('x = cfg.model.family == "klein"\n', words)
    assert family_literals('P = {"model.preset": "toy-zimage"}\n', words)
    assert not family_literals('"""A docstring may name zimage."""\nx = 1  # and a comment: klein\n', words)
