"""What the `cwm-rl` sub-commands share: the console, the option types, and how they read them.

One syntax everywhere: env constructor arguments are `--kwarg KEY=VALUE` (repeatable, the value
read as YAML: `--kwarg difficulty=2 --kwarg operators=+`), user env modules are `--import MODULE`
(found in the current directory too), and JSON options go through `json_option`, whose error shows
an example.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

console = Console()

ImportOpt = Annotated[list[str], typer.Option("--import", "-i", help="Module that registers user envs (repeatable).")]
KwargOpt = Annotated[list[str], typer.Option("--kwarg", "-k", help="Env constructor argument KEY=VALUE (YAML value; repeatable).")]


def parse_kwargs(pairs: list[str]) -> dict[str, Any]:
    """`--kwarg KEY=VALUE` options as a dict (values read as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--kwarg {pair!r} is not KEY=VALUE (e.g. --kwarg difficulty=2)")
        out[key] = yaml.safe_load(value)
    return out


def json_option(text: str, name: str, kind: type, example: str) -> dict | list:
    """A JSON command-line option of the given kind (dict or list), or a ValueError that shows an example."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} {text!r} is not JSON ({e.msg}); e.g. {name} '{example}'") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'list'}, got {text!r}; e.g. {name} '{example}'")
    return value


def load_user_envs(modules: list[str]) -> None:
    """Import the modules that register user envs; `--import my_envs` finds my_envs.py in the current directory."""
    from envs import load_env_modules

    load_env_modules(modules, from_cwd=True)


def need_training_stack() -> None:
    """ImportError naming the install command when torch or transformers is missing."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed; `bash scripts/setup.sh dev,train` installs the training stack")


def say(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    typer.echo(message, err=True)


def call_target(target: str, args: str, kwargs: str, *, other_forms: str = "") -> tuple[Path, str, list, dict]:
    """A `FILE.py::FUNC` argument and its `--args`/`--kwargs` JSON (`cwm-rl trace`, `cwm-rl debug`): (file, function,
    args, kwargs), or a ValueError / FileNotFoundError that says what was wrong."""
    path_text, sep, function = target.partition("::")
    if not sep or not function:
        raise ValueError(f"{target!r} is not FILE.py::FUNC (e.g. examples/sum.py::total){other_forms}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    return path, function, json_option(args, "--args", list, "[3, [1, 2]]"), json_option(kwargs, "--kwargs", dict, '{"n": 3}')
