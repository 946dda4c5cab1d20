"""`cwm-rl model ...`: make tiny models locally and check chat templates.

    cwm-rl model init --out models/tiny [--preset tiny|small] [--arch cwm|qwen2] [--seed 0] [--force]
    cwm-rl model check-template models/tiny     # exit 0 "template OK", 1 with the problems listed

Heavy imports (torch, transformers) happen inside the commands, so `cwm-rl --help` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

model_app = typer.Typer(help="Create tiny models locally and check chat templates.", no_args_is_help=True)


@model_app.command("init")
def model_init(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the model and tokenizer into.")],
    preset: Annotated[str, typer.Option(help="Model size: tiny (0.85 M parameters) or small (5.2 M).")] = "tiny",
    arch: Annotated[str, typer.Option(help="Architecture: cwm (sliding-window + global attention) or qwen2.")] = "cwm",
    seed: Annotated[int, typer.Option(help="Seed for the tokenizer's training text and the weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out directory.")] = False,
) -> None:
    """Make a model with random weights and a byte-level BPE tokenizer trained on env task text."""
    import json

    from cwm_rl.models.create import count_parameters, init_model

    _need_training_stack()

    path = init_model(out, preset=preset, arch=arch, seed=seed, force=force)
    config = json.loads((path / "config.json").read_text())
    num_params = count_parameters(path)
    typer.echo(f"created {preset} {arch} model: {num_params / 1e6:.2f} M parameters, vocab {config['vocab_size']}, "
               f"{config['num_hidden_layers']} layers, context {config['max_position_embeddings']} -> {path}")


@model_app.command("check-template")
def model_check_template(
    model_dir: Annotated[str, typer.Argument(help="Model or tokenizer directory (with a chat template).")],
) -> None:
    """Check the chat template is prefix-consistent for multi-turn token-in/token-out rollouts."""
    _need_training_stack()
    from transformers import AutoTokenizer

    from cwm_rl.models.template_check import check_template

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory; pass a local model or tokenizer directory")
    problems = check_template(AutoTokenizer.from_pretrained(model_dir))
    if problems:
        typer.echo(f"{len(problems)} problem(s) with the chat template of {model_dir}:")
        for p in problems:
            typer.echo(f"- {p}")
        typer.echo("Fix the template (it must only append text as a conversation grows) before multi-turn rollouts.")
        raise typer.Exit(1)
    typer.echo("template OK")


def _need_training_stack() -> None:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed; `bash scripts/setup.sh dev,train` installs the training stack")
