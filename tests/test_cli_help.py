"""Every option of every command has a help text: the console scripts of setup.py, ``python -m
dopsd_fast.dryrun`` and ``python -m dopsd_fast.toy``. Each parser is caught as its command parses."""

import argparse
import re
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _Parsed(BaseException):  # not an Exception: the commands end every Exception in one line
    pass


def _entry_points():
    text = (ROOT / "setup.py").read_text()
    scripts = re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', text)
    assert {s[0] for s in scripts} >= {"dopsd-train", "dopsd-cache", "dopsd-sample"}, scripts
    return scripts + [("python -m dopsd_fast.dryrun", "dopsd_fast.dryrun", "main"),
                      ("python -m dopsd_fast.toy", "dopsd_fast.toy.pipeline", "main")]


def _parser_of(module, func, monkeypatch) -> argparse.ArgumentParser:
    caught = []

    def parse_args(self, *a, **k):
        caught.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Parsed):
        getattr(import_module(module), func)([])
    return caught[0]


@pytest.mark.parametrize("name,module,func", _entry_points(), ids=lambda v: str(v))
def test_every_option_has_help(name, module, func, monkeypatch):
    parser = _parser_of(module, func, monkeypatch)
    missing = [a.option_strings or [a.dest] for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"{name}: options without a help text: {missing}"
    assert parser.description, f"{name}: no description"
