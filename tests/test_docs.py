"""The documentation: every relative link and anchor resolves, the README stays a first hour's read, and
docs/config.md is what the config classes generate."""

import re
from pathlib import Path

import pytest

from dopsd_fast import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (not '-' or '_'), spaces to '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_slug_is_githubs():
    assert _slug("Memory per GPU, Z-Image-Turbo 6 B at 1024^2 (model figures)") == \
        "memory-per-gpu-z-image-turbo-6-b-at-10242-model-figures"
    assert _slug("`gpu_check.sh`: a one-command GPU check") == "gpu_checksh-a-one-command-gpu-check"
    assert _slug("Differences from the authors' scripts") == "differences-from-the-authors-scripts"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    bad = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, "\n".join(bad)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move reference material to docs/"


def test_readme_holds_cis_commands():
    """.ci/run runs the README's test command; the quick start installs as CI does (constraints.txt)."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    test_cmd = "python -m pytest -q tests"
    assert f"```bash\n{test_cmd}\n```" in readme and f"\n{test_cmd}\n" in ci
    assert 'pip install -c constraints.txt -e ".[dev]"' in readme and "-c constraints.txt" in ci


def test_config_doc_is_generated():
    """docs/config.md is `python -m dopsd_fast.config --markdown`: regenerate it after changing a field."""
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config.config_markdown(), \
        "docs/config.md is stale: python -m dopsd_fast.config --markdown > docs/config.md"


def test_every_config_field_documented():
    names = [name for name, _, _ in config.config_fields()]
    assert len(names) == len(set(names))
    assert [n for n in names if not config.FIELD_HELP.get(n, "").strip()] == []
    assert sorted(set(config.FIELD_HELP) - set(names)) == []  # no help for a field that is gone
    doc = (ROOT / "docs" / "config.md").read_text()
    assert all(f"| `{n}` |" in doc for n in names)


def test_config_doc_shows_the_dataclass_defaults():
    """The defaults are the dataclasses' own (what a YAML file leaving a field out gets), not a preset's."""
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `([\w.]+)` \| (.+?) \|", (ROOT / "docs" / "config.md").read_text(), flags=re.M)}
    assert rows["lora.rank"] == "`64`" and rows["train.max_steps"] == "`2000`"
    assert rows["dopsd.ema_decay"] == "`0.9999`" and rows["optim.lr"] == "`0.0001`"
    assert rows["fast.enabled"] == "`false`" and rows["data.builtin"] == "`tiny`"
    assert config.config_fields()[0][0] == "method"
