"""Everything one run holds, and how it is set up and torn down (`setup_run`, `Run.close`).

`check_run_dir(config, resume)` refuses a run dir that holds a run (unless resuming), `Run(...)`
holds the parts, `setup_run(run, resume)` makes them (model, store, Ray, env servers, workers, the
trainer's actors, tasks, buffer, metric files) and `run.close()` stops them; `run_job` in
`driver.py` does exactly that around the loop.

Setup order matters: user env modules are imported before any env is made, the model is made and
warm-started before Ray and the engines start (the warm start gets every core), the engines start
while the trainer's actors are made (each takes seconds of imports), and on resume the store hands
back what the checkpoint had not trained on yet. A config the engine cannot
serve is refused once the model is known (`preflight.py`), before the trainer, Ray or vLLM start.
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
from cwm_rl.loop.cleanup import RUN_LABEL_VAR, reap_run_containers, run_label
from cwm_rl.loop.env_servers import EnvEndpoints
from cwm_rl.loop.preflight import check_engine_config
from cwm_rl.loop.signal_watch import SignalWatch
from cwm_rl.loop.sinks import Counts, Sinks
from cwm_rl.loop.tasks import TaskMix, job_tasks
from cwm_rl.loop.timeline import Timeline
from cwm_rl.loop.workers import RolloutWorkers, start_ray
from envs.swe_env import EPISODES_IN_FLIGHT_VAR

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The parts of one run; the loop calls into them."""

    config: JobConfig
    run_dir: Path
    sinks: Sinks
    started: float
    rl_started: float | None = None  # after the initial eval: max_minutes and rl_s count RL only
    initial_eval_s: float = 0.0
    stop_reason: str | None = None
    trainer_lost: str | None = None  # why the trainer died, when stop_reason is "trainer_lost"
    model_dir: Path | None = None
    store: Any = None  # cwm_rl.store.RolloutStore
    trainer: Any = None  # trainer.group.TrainerGroup: the trainer's Ray actors (rank 0 publishes the weights)
    ray_started: bool = False  # a local Ray started by this run (shut down by close)
    shipped_model: Any = None  # the base model in Ray's object store (publish.backend: object_store), kept referenced
    tasks: TaskMix | None = None
    buffer: Buffer | None = None
    endpoints: EnvEndpoints | None = None
    workers: RolloutWorkers | None = None
    signal_watch: SignalWatch | None = None  # groups without a learning signal: warn, log, stop
    counts: Counts = field(default_factory=Counts)
    timeline: Timeline = field(default_factory=Timeline)  # where each step's wall time went (time/* metrics)
    environ_before: dict[str, str | None] = field(default_factory=dict)  # what set_environ replaced, restored by close

    def set_environ(self, values: dict[str, str]) -> None:
        """Set process environment variables for the run's envs and workers; `close` puts the old values back."""
        for key, value in values.items():
            self.environ_before.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def checkpoint(self) -> None:
        """Trainer state (model, optimiser, RNGs) plus the task cursors: a resume continues from here."""
        self.trainer.save_checkpoint(data_cursor={"cursors": self.tasks.cursors(), "held_out": self.tasks.held_out_ids()})

    def close(self) -> None:
        """Stop what setup started, whatever stage it reached; each part is closed even if another fails. Then no
        container of the run is left: the workers' and env servers' own are gone with them, and any a crashed
        process left are removed by the run's label."""
        for part in (self.sinks, self.workers, self.trainer, self.store, self.endpoints, self.tasks):
            if part is not None:
                try:
                    part.close()
                except Exception:
                    log.exception("closing %s failed", type(part).__name__)
        if self.ray_started:
            import ray

            ray.shutdown()
        try:
            reap_run_containers(run_label(self.run_dir))
        except Exception:
            log.exception("removing the run's containers failed (`cwm-rl sandbox reap --run %s` retries)", self.run_dir)
        for key, value in self.environ_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def episodes_in_flight(config: JobConfig) -> int:
    """Episodes one rollout worker plays at once at most: its training calls, plus (async: while they run) its
    share of a held-out eval."""
    r = config.rollout
    training, eval_share = r.group_size * r.groups_per_request * r.requests_in_flight, -(-config.eval.num_tasks // r.num_workers)
    return training + eval_share if config.mode == "async" else max(training, eval_share)


def check_turn_limits(config: JobConfig, tasks: TaskMix) -> None:
    """An env that plays more turns than the workers allow would be cut short without a word: refuse it."""
    for i, (spec, source) in enumerate(zip(config.envs, tasks.sources)):
        env_turns, worker_turns = getattr(source.env, "max_turns", None), config.env_limits(i).max_turns
        if env_turns is not None and worker_turns < env_turns:
            raise ValueError(f"envs[{i}] ({spec.id}) plays up to {env_turns} turns (its max_turns) but the rollout workers cut "
                             f"its episodes after {worker_turns}: set envs[{i}].limits.max_turns >= {env_turns} (or lower the "
                             f"env's max_turns kwarg)")


def check_held_out(saved: dict[str, list[str]] | None, now: dict[str, list[str]]) -> None:
    """A resumed run evaluates the tasks it held out from the start: a changed split would evaluate trained tasks."""
    if saved is None:  # a checkpoint from before held-out ids were saved
        return
    changed = [env for env in now if env in saved and set(saved[env]) != set(now[env])]
    if changed:
        raise ValueError(f"the held-out tasks of {', '.join(changed)} differ from the ones this run held out when it started, so "
                         "evaluation would play tasks it trained on: resume with the env kwargs, task files, seed, eval.num_tasks "
                         "and model.sft.eval_share it started with (run_dir/config.yaml), or start a new run (a Trace-v0 run "
                         "started before 2026-12-07 held out single calls; it now holds out whole programs, so only a new run "
                         "can go on)")


def check_run_dir(config: JobConfig, resume: bool) -> Path:
    """The run dir; a ValueError if it already holds a run and this is not a resume (it is never overwritten)."""
    run_dir = Path(config.run_dir)
    used = [p.name for p in (run_dir / "checkpoints", run_dir / "weights", run_dir / "rollouts.sqlite") if _holds_data(p)]
    if used and not resume:
        raise ValueError(f"run_dir {run_dir} already holds a run ({', '.join(used)}): continue it with "
                         f"`cwm-rl train --resume {run_dir}`, or start a new one with --set run_dir=NEW_DIR")
    if resume and not _holds_data(run_dir / "checkpoints"):
        raise ValueError(f"run_dir {run_dir} has no checkpoint to resume from (it stopped before its first one, "
                         f"checkpoint_every={config.checkpoint_every}): start a new run with --set run_dir=NEW_DIR, or delete {run_dir}")
    root = Path(config.publish.root) if config.publish.root else None
    if root is not None and not resume and root.is_dir() and any(p.name.startswith("v") for p in root.iterdir()):
        raise ValueError(f"publish.root {root} already holds published weights (of another run?): empty it, or give this "
                         "run its own publish.root")
    return run_dir


def _holds_data(path: Path) -> bool:
    """Whether `path` holds what a run made: a start that failed before its first trajectory (a bad engine config,
    say) leaves an empty store and weights dir, which a new start may take over."""
    if not path.exists():
        return False
    if path.is_dir():
        return any(p.name.startswith("v") for p in path.iterdir()) if path.name == "weights" else any(path.iterdir())
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM trajectories").fetchone()[0] > 0
    except sqlite3.Error:  # not a store we can read: keep it
        return True


def setup_run(run: Run, resume: bool) -> None:
    """Set up every part of a run (see the module docstring); the caller closes the run, also on failure."""
    c, run_dir, say = run.config, run.run_dir, run.sinks.say
    if c.env_modules:
        from envs import load_env_modules

        load_env_modules(c.env_modules, from_cwd=True)  # modules next to the config, as `--import` finds them
    if c.trainer_threads:
        import torch

        torch.set_num_threads(c.trainer_threads)
    # Sandbox and SWE containers made by this job's envs (warm start, workers, env servers) carry the run's label;
    # what an earlier start of this run left (kill -9) goes now, the rest when the run closes.
    run.set_environ({RUN_LABEL_VAR: run_label(run_dir), EPISODES_IN_FLIGHT_VAR: str(episodes_in_flight(c))})
    if removed := reap_run_containers(run_label(run_dir)):
        say(f"removed {removed} container(s) an earlier start of this run left behind")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False))
    if c.model.path is None and c.model.sft.steps:
        run.sinks.set_status("warm start (SFT)")
    # Every env of the mix offers its tasks and a held-out split: a bad env fails here, before any warm start.
    run.tasks = job_tasks(c.envs, c.seed, c.eval.num_tasks, c.model.sft.eval_share, cursors={}, mix_seed=c.seed * 7919)
    check_turn_limits(c, run.tasks)
    # A config the engine cannot serve stops here, before any warm start, Ray or vLLM.
    run.model_dir = bootstrap_model(c, run_dir, say, check=lambda model_dir: check_engine_config(c, model_dir))

    from cwm_rl.store import RolloutStore
    from trainer.group import TrainerGroup

    run.store = RolloutStore(run_dir)
    # Ray (local, or the cluster at ray_address) holds the trainer's and the workers' actors.
    t = c.trainer
    run.ray_started = start_ray(c.ray_address, num_cpus=c.rollout.num_workers + t.num_workers * t.num_cpus)
    if c.publish.backend == "object_store":  # workers on other nodes cannot read model_dir: it travels to them
        from trainer.publish import ship_model_dir

        run.shipped_model = ship_model_dir(run.model_dir)
    run.endpoints = EnvEndpoints(c.envs, run_dir / "env_servers", c.env_modules, say,
                                 episodes_in_flight=episodes_in_flight(c) * c.rollout.num_workers,
                                 limits=[c.env_limits(i) for i in range(len(c.envs))])
    # The engines start (vLLM's imports and profiling: most of a job's start) while the trainer's actors are made.
    run.sinks.set_status("starting rollout workers and the trainer")
    run.workers = RolloutWorkers(c, run.model_dir, run.endpoints, say=say, stopping=lambda: run.stop_reason is not None,
                                 shipped_model=run.shipped_model)
    run.trainer = TrainerGroup(t, run.model_dir, run_dir=run_dir, publish=c.publish, resume=resume, num_threads=c.trainer_threads)
    saved = run.trainer.data_cursor or {}
    check_held_out(saved.get("held_out"), run.tasks.held_out_ids())
    run.workers.start_engines(published=run.trainer.initial_weights(resume))  # a resumed run's workers load its newest weights

    run.tasks.continue_from(saved.get("cursors", {}), mix_seed=c.seed * 7919 + run.trainer.step_count)
    run.buffer = Buffer(signal_only=c.trainer.filters.drop_zero_advantage_groups)
    run.signal_watch = SignalWatch(c.stop_without_signal_groups, c.warn_without_signal_groups, c.rollout.sampling.max_tokens,
                                   say=say, log=lambda metrics: run.sinks.log_signal(metrics, run.trainer.step_count),
                                   env_max_tokens={s.id: s.max_tokens for s in c.envs if s.max_tokens})
    if resume:  # trajectories stored but never trained on come back; so do those trained after the checkpoint
        run.store.rewind(run.trainer.step_count - 1)  # a checkpoint at step_count N holds steps 0..N-1; step N was lost
        run.buffer.add(run.store.buffered())
    run.sinks.open()
