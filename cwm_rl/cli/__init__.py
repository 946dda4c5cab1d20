"""The `cwm-rl` command line, one module per group of commands:

- `train` (`train.py`): run an RL job from a YAML config, or resume one
- `env list|check|serve|play` (`env.py`): define, check, serve and play environments
- `model init|check-template|sft|play` (`model.py`): tiny models, templates, warm starts, a frozen model playing an env
- `rollouts list|show|stats|export` (`rollouts.py`): look into a run's rollout store
- `rollouts replay|rescore|branch` (`replay.py`): debug stored rollouts against a live env and a model
- `view` (`view.py`): a live, read-only web page over a run's rollouts
- `sandbox exec|build-root|reap` (`sandbox.py`), `swe build-base|build|validate` (`swe.py`), `trace` (`trace.py`)
- `debug` (`debug.py`): the neural debugger, pdb over a model's predicted frames
- `doctor` (`doctor.py`): what is installed and how to get what is missing

Shared option types and parsers live in `common.py`. Every failure ends with one line saying
what went wrong and what to do: exit code 2 for bad input, 1 for a failed check. Heavy imports
happen inside the commands that need them, so `cwm-rl --help` answers at once.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from cwm_rl.cli.debug import debug
from cwm_rl.cli.doctor import doctor
from cwm_rl.cli.env import env_app
from cwm_rl.cli.model import model_app
from cwm_rl.cli.replay import branch, replay, rescore
from cwm_rl.cli.rollouts import rollouts_app
from cwm_rl.cli.sandbox import sandbox_app
from cwm_rl.cli.swe import swe_app
from cwm_rl.cli.trace import trace
from cwm_rl.cli.train import train
from cwm_rl.cli.view import view

app = typer.Typer(help="cwm-rl: RL for code models in executable environments.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.command("train")(train)
app.add_typer(env_app, name="env")
app.add_typer(model_app, name="model")
app.add_typer(rollouts_app, name="rollouts")
rollouts_app.command("replay")(replay)
rollouts_app.command("rescore")(rescore)
rollouts_app.command("branch")(branch)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(swe_app, name="swe")
app.command("trace")(trace)
app.command("debug")(debug)
app.command("view")(view)
app.command("doctor")(doctor)


@app.command("rollout", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def rollout_renamed() -> None:
    """Renamed: `cwm-rl model play` (a frozen model plays an env); `cwm-rl rollouts` inspects a run."""
    raise ValueError("`cwm-rl rollout` is now `cwm-rl model play` (same options): a frozen model plays an env; "
                     "`cwm-rl rollouts ...` looks into a run's stored rollouts")


def main() -> None:
    """Console entry point: run the app, turning expected errors into one clear line."""
    try:
        app()
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
