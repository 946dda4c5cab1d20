"""Everything one run holds, and how it is set up and torn down (`setup_run`, `Run.close`).

`check_run_dir(config, resume)` refuses a run dir that holds a run (unless resuming), `Run(...)`
holds the parts, `setup_run(run, resume)` makes them (model, store, trainer, publisher, tasks,
buffer, env servers, workers, metric files) and `run.close()` stops them; `run_job` in
`driver.py` does exactly that around the loop.

Setup order matters: user env modules are imported before any env is made, the model is made and
warm-started before Ray and the engines start (the warm start gets every core), and on resume
the store hands back what the checkpoint had not trained on yet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cwm_rl.config import JobConfig
from cwm_rl.loop.bootstrap import bootstrap_model
from cwm_rl.loop.buffer import Buffer
from cwm_rl.loop.env_servers import EnvEndpoints
from cwm_rl.loop.sinks import Counts, Sinks
from cwm_rl.loop.tasks import TaskMix, held_out_tasks
from cwm_rl.loop.workers import RolloutWorkers

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The parts of one run; the loop calls into them."""

    config: JobConfig
    run_dir: Path
    sinks: Sinks
    started: float
    rl_started: float | None = None
    stop_reason: str | None = None
    model_dir: Path | None = None
    store: Any = None  # cwm_rl.store.RolloutStore
    trainer: Any = None  # trainer.train.Trainer
    publisher: Any = None  # trainer.publish.WeightPublisher
    tasks: TaskMix | None = None
    buffer: Buffer | None = None
    endpoints: EnvEndpoints | None = None
    workers: RolloutWorkers | None = None
    counts: Counts = field(default_factory=Counts)

    def checkpoint(self) -> None:
        """Trainer state (model, optimiser, RNGs) plus the task cursors: a resume continues from here."""
        self.trainer.save_checkpoint(data_cursor={"cursors": self.tasks.cursors()})

    def close(self) -> None:
        """Stop what setup started, whatever stage it reached; each part is closed even if another fails."""
        for part in (self.sinks, self.workers, self.publisher, self.store, self.endpoints, self.tasks):
            if part is not None:
                try:
                    part.close()
                except Exception:
                    log.exception("closing %s failed", type(part).__name__)


def check_run_dir(config: JobConfig, resume: bool) -> Path:
    """The run dir; a ValueError if it already holds a run and this is not a resume (it is never overwritten)."""
    run_dir = Path(config.run_dir)
    used = [p.name for p in (run_dir / "checkpoints", run_dir / "weights", run_dir / "rollouts.sqlite") if p.exists()]
    if used and not resume:
        raise ValueError(f"run_dir {run_dir} already holds a run ({', '.join(used)}): continue it with "
                         f"`cwm-rl train --resume {run_dir}`, or start a new one with --set run_dir=NEW_DIR")
    root = Path(config.publish.root) if config.publish.root else None
    if root is not None and not resume and root.is_dir() and any(p.name.startswith("v") for p in root.iterdir()):
        raise ValueError(f"publish.root {root} already holds published weights (of another run?): empty it, or give this "
                         "run its own publish.root")
    return run_dir


def setup_run(run: Run, resume: bool) -> None:
    """Set up every part of a run (see the module docstring); the caller closes the run, also on failure."""
    c, run_dir, say = run.config, run.run_dir, run.sinks.say
    if c.env_modules:
        from envs import load_env_modules

        load_env_modules(c.env_modules, from_cwd=True)  # modules next to the config, as `--import` finds them
    if c.trainer_threads:
        import torch

        torch.set_num_threads(c.trainer_threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False))
    if c.model.path is None and c.model.sft.steps:
        run.sinks.set_status("warm start (SFT)")
    run.model_dir = bootstrap_model(c, run_dir, say)

    from cwm_rl.store import RolloutStore
    from trainer.publish import latest_published, make_publisher
    from trainer.train import Trainer

    run.store = RolloutStore(run_dir)
    run.trainer = Trainer(c.trainer, run.model_dir, run_dir=run_dir, resume=run_dir if resume else None)
    run.publisher = make_publisher(c.publish, base_model_dir=run.model_dir, root=run_dir / "weights")
    published = latest_published(run.publisher.root)
    newest = run.publisher.latest_version  # LATEST, or a version dir written just before a kill
    if resume and newest is not None and newest > run.trainer.policy_version:
        # The run published past its last checkpoint before it stopped. Versions only grow (workers and
        # staleness rely on it), so the resumed weights become a new version.
        run.trainer.skip_to_version(newest + 1)
        log.warning("resumed from step %d, but weights up to version %d were published after that checkpoint; "
                    "publishing the resumed weights as version %d", run.trainer.step_count, newest, run.trainer.policy_version)
        path = run.publisher.publish(run.trainer.policy_version, run.trainer.model.state_dict())
        published = (run.trainer.policy_version, path)

    cursors = (run.trainer.data_cursor or {}).get("cursors", {})
    held_out = {spec.id: held_out_tasks(spec, c.seed, c.eval.num_tasks) for spec in c.envs}
    run.tasks = TaskMix(c.envs, c.seed, held_out, cursors, mix_seed=c.seed * 7919 + run.trainer.step_count)
    run.buffer = Buffer(signal_only=c.trainer.filters.drop_zero_advantage_groups)
    if resume:  # trajectories stored but never trained on come back; so do those trained after the checkpoint
        run.store.rewind(run.trainer.step_count)
        run.buffer.add(run.store.buffered())

    # Sandbox and SWE containers made by this job's envs (in-process, env servers, workers) carry the run's name.
    os.environ.setdefault("CWM_RL_RUN_ID", run_dir.name)
    run.endpoints = EnvEndpoints(c.envs, run_dir / "env_servers", c.env_modules, say)
    run.sinks.set_status("starting rollout workers")
    run.workers = RolloutWorkers(c, run.model_dir, run.endpoints, say=say, stopping=lambda: run.stop_reason is not None,
                                 published=(published[0], str(published[1])) if published else None)
    run.sinks.open()
