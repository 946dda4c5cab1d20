"""`cwm-rl train`: run an RL job from a YAML config (docs/training.md).

    cwm-rl train configs/quickstart.yaml [--set KEY=VALUE ...]
    cwm-rl train --resume RUN_DIR [--set steps=200]

The config is loaded and validated before torch, vLLM or Ray is imported, so a bad config is
answered at once; the job itself is `cwm_rl.loop.driver.run_job`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cwm_rl.cli.common import console


def train(
    config: Annotated[Path | None, typer.Argument(help="Job config YAML, e.g. configs/quickstart.yaml (omit with --resume).")] = None,
    overrides: Annotated[list[str], typer.Option("--set", help="Override a config field: --set trainer.optim.lr=1e-4 (repeatable).")] = [],
    resume: Annotated[Path | None, typer.Option(help="Resume the run in this run directory (its config.yaml unless CONFIG is given).")] = None,
) -> None:
    """Run an async (or sync) GRPO job on Ray: rollout workers, trainer, store, eval, checkpoints."""
    from cwm_rl.config import load_config

    if config is None and resume is None:
        raise ValueError("give a job config (e.g. cwm-rl train configs/quickstart.yaml) or --resume RUN_DIR")
    if resume is not None:
        if not (resume / "config.yaml").is_file():
            raise FileNotFoundError(f"{resume} is not a run directory (no config.yaml); pass the run_dir of an earlier run")
        overrides = [*overrides, f"run_dir={resume}"]
    job_config = load_config(config if config is not None else resume / "config.yaml", overrides)
    from cwm_rl.loop.driver import run_job  # heavy imports after the config is known to be valid

    summary = run_job(job_config, resume=resume is not None)
    keys = ("stop_reason", "eval_accuracy_initial", "eval_accuracy_final", "steps", "policy_versions", "trajectories_stored",
            "trajectories_trained", "trajectories_dropped_stale", "wall_seconds")
    table = Table("summary", "value")
    for k in keys:
        v = summary.get(k)
        table.add_row(k, f"{v:.1%}" if k.startswith("eval_accuracy") and v is not None else str(v))
    console.print(table)
    console.print(f"run directory: {job_config.run_dir} (summary.json, progress.png, tensorboard/, rollouts.sqlite)")
