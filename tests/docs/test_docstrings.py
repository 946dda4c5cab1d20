"""Docstring examples are real: Python examples are doctests that run here, and every `cwm-rl ...`
synopsis line names a command and options that exist.

A docstring line that looks like Python code (an import, an assignment from a call, a method call)
must be a `>>>` doctest line; examples too heavy to run (an engine, a Ray actor, a whole job)
belong in the tests, and the docstring names the test that runs them instead.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import re
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).parents[2]
PACKAGES = ("cwm_rl", "envs", "rewards", "rollout_workers", "trainer")
# An indented docstring line that is Python, not prose, a table or a format sample.
CODE_LINE = re.compile(r"^\s{4,}(from \S+ import |import \w|[\w.]+(, [\w.]+)* = [\w.]+\(|await [\w.]+\(|[\w]+(\.\w+)+\()")


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "swe/data" in path.as_posix() or path.name == "__main__.py":
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def docstrings(module: str) -> list[tuple[str, str]]:
    path = ROOT / (module.replace(".", "/") + ("/__init__.py" if (ROOT / module.replace(".", "/")).is_dir() else ".py"))
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [(getattr(n, "name", "<module>"), doc) for n in nodes if (doc := ast.get_docstring(n, clean=True))]


@pytest.mark.parametrize("module", modules())
def test_python_examples_in_docstrings_are_doctests(module):
    loose = [f"{name}: {line.strip()}" for name, doc in docstrings(module) for line in doc.splitlines()
             if CODE_LINE.match(line) and not line.strip().startswith((">>>", "..."))]
    assert not loose, f"{module}: code examples that never run (make them >>> doctests, or name the test that runs them): {loose}"


@pytest.mark.parametrize("module", [m for m in modules() if any(re.search(r"^\s*>>> ", doc, re.M) for _, doc in docstrings(m))])
def test_doctests_run(module, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples name repository paths like configs/quickstart.yaml
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{module}: {result.failed} of {result.attempted} doctest lines failed (output above)"


def _synopses() -> list[tuple[str, str]]:
    return [(module, line.strip()) for module in modules() for _, doc in docstrings(module)
            for line in doc.splitlines() if line.strip().startswith("cwm-rl ")]


def _command(words: list[str]):
    """The (Typer-made click) command a synopsis names, and the words after its name."""
    from cwm_rl.cli import app

    command = typer.main.get_command(app)
    rest = list(words)
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


@pytest.mark.parametrize(("module", "line"), _synopses())
def test_cli_synopses_in_docstrings_name_real_commands_and_options(module, line):
    words = line.split("#")[0].replace("\\", " ").split()[1:]
    command, rest = _command(words)
    assert not hasattr(command, "commands") or not rest or rest[0].startswith(("-", "[")) or rest[0].isupper(), \
        f"{module}: `{line}`: no command {rest[0]!r} under `{command.name}`"
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    named = {m for w in rest for m in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", w)}
    assert named <= known, f"{module}: `{line}`: {sorted(named - known)} are not options of that command (it has {sorted(known)})"
