"""`cwm-rl train`: the whole async RL loop on Ray, read top to bottom in `run_job`.

    summary = run_job(load_config("configs/quickstart.yaml"))

Setup: run dir (resolved config saved), model (a local dir, or made here and SFT-warm-started),
local Ray (or `ray_address`), N rollout worker actors (one vLLM engine each), the trainer (in
this process), the rollout store, the task sources and the held-out eval sets.

The loop, one iteration:
1. keep every worker busy with groups of tasks, unless the buffer is full (backpressure);
2. collect finished groups: store them (status buffered) and put them in the buffer;
3. when the buffer holds `trainer.batch.step_tokens` generated tokens with a learning signal
   (async), or the whole batch it asked for (sync): one trainer step on the oldest groups; the
   store records which trajectories were trained on and which were dropped and why;
4. the new version is published; every worker reloads it in flight (async) or before it gets
   new work (sync);
5. every `eval.every_steps`: greedy accuracy on held-out tasks; every `checkpoint_every`: a
   checkpoint (trainer state + task cursors); metrics to the console, TensorBoard, metrics.jsonl.
At the end (steps done, `max_minutes`, or Ctrl-C): final eval, checkpoint, `summary.json`, a
plot of reward and eval accuracy. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cwm_rl.config import EnvSpec, JobConfig
from cwm_rl.types import Trajectory

log = logging.getLogger(__name__)


# -- tasks ------------------------------------------------------------------------------------------

class TaskSource:
    """Training tasks of one env: seeds 0, 1, 2, ... from a cursor, skipping held-out task ids.

    Tasks are drawn here (a local env instance), so the driver knows every task id it trains on
    and the cursor makes a resumed run continue where it stopped."""

    def __init__(self, spec: EnvSpec, seed: int, held_out_ids: set[str], cursor: int = 0):
        from envs import make_env

        self.spec = spec
        self.env = make_env(spec.id, **spec.kwargs)
        self.base = seed * 10**9
        self.held_out_ids = held_out_ids
        self.cursor = cursor

    def next_task(self) -> tuple[int, dict[str, Any]]:
        for _ in range(10_000):
            seed = self.base + self.cursor
            self.cursor += 1
            self.env.reset(seed=seed)
            task = self.env.task
            if task.id not in self.held_out_ids:
                return seed, task.model_dump(mode="json")
        raise RuntimeError(f"{self.spec.id}: 10,000 draws in a row were held-out tasks; the task space is too small "
                           "for eval.num_tasks, lower it")


def held_out_tasks(spec: EnvSpec, seed: int, num_tasks: int) -> list[dict[str, Any]]:
    """Distinct held-out tasks of an env, as `cwm-rl model sft` picks them (so SFT never trained on them)."""
    from cwm_rl.sft import SFTConfig, held_out_examples
    from envs import make_env

    env = make_env(spec.id, **spec.kwargs)
    try:
        examples, _ = held_out_examples(env, SFTConfig(env_id=spec.id, env_kwargs=spec.kwargs, steps=0, eval_tasks=num_tasks, seed=seed))
    finally:
        env.close()
    return [e.task.model_dump(mode="json") for e in examples]


# -- the buffer -------------------------------------------------------------------------------------

@dataclass
class Buffer:
    """Finished groups waiting for the trainer, oldest first.

    With `signal_only` (the trainer drops zero-advantage groups) only groups whose returns differ
    count towards a step's tokens; the others ride along and are dropped by the trainer."""

    signal_only: bool = True
    groups: deque[list[Trajectory]] = field(default_factory=deque)

    def add(self, trajectories: list[Trajectory]) -> None:
        by_group: dict[str, list[Trajectory]] = {}
        for t in trajectories:
            by_group.setdefault(t.group_id or t.trajectory_id, []).append(t)
        self.groups.extend(by_group.values())

    def _counts(self, group: list[Trajectory]) -> bool:
        return not self.signal_only or len({t.return_ for t in group}) > 1

    def signal_tokens(self) -> int:
        """Generated tokens in the groups a step counts (see the class docstring)."""
        return sum(sum(t.num_generated_tokens for t in g) for g in self.groups if self._counts(g))

    def take(self, step_tokens: float) -> list[Trajectory]:
        """Oldest groups until `step_tokens` counted tokens are taken (or all; math.inf takes all)."""
        taken: list[Trajectory] = []
        counted = 0
        while self.groups and counted < step_tokens:
            group = self.groups.popleft()
            taken += group
            if self._counts(group):
                counted += sum(t.num_generated_tokens for t in group)
        return taken

    def __len__(self) -> int:
        return len(self.groups)


# -- the job ----------------------------------------------------------------------------------------

class Job:
    """State of one run; `run()` is the loop. Use `run_job` rather than this class directly."""

    def __init__(self, config: JobConfig, resume: bool = False):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.resume = resume
        self.stop_reason: str | None = None
        self.started = time.time()
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.counts = {"trajectories_stored": 0, "trajectories_trained": 0, "trajectories_dropped_stale": 0,
                       "trajectories_dropped_other": 0, "generated_tokens": 0}

    # ---- setup ----

    def setup(self) -> None:
        c = self.config
        used = [p.name for p in (self.run_dir / "checkpoints", self.run_dir / "weights", self.run_dir / "rollouts.sqlite") if p.exists()]
        if used and not self.resume:
            raise ValueError(f"run_dir {self.run_dir} already holds a run ({', '.join(used)}): continue it with "
                             f"`cwm-rl train --resume {self.run_dir}`, or start a new one with --set run_dir=NEW_DIR")
        if c.env_modules:
            import sys

            from envs import load_env_modules

            if os.getcwd() not in sys.path:  # modules next to the config, as `cwm-rl env --import` finds them
                sys.path.insert(0, os.getcwd())
            load_env_modules(c.env_modules)
        if c.trainer_threads:
            import torch

            torch.set_num_threads(c.trainer_threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False))
        self.model_dir = self._bootstrap_model()

        from cwm_rl.store import RolloutStore
        from trainer.train import Trainer

        self.store = RolloutStore(self.run_dir)
        # The job checkpoints on the trainer's schedule itself, adding the task cursors.
        self.trainer = Trainer(c.trainer.model_copy(update={"checkpoint_every": 0}), self.model_dir, run_dir=self.run_dir,
                               resume=self.run_dir if self.resume else None)
        cursor = self.trainer.data_cursor or {}
        self.held_out = {spec.id: held_out_tasks(spec, c.seed, c.eval.num_tasks) for spec in c.envs}
        self.sources = [TaskSource(spec, c.seed, {t["id"] for t in self.held_out[spec.id]}, cursor.get("cursors", {}).get(spec.id, 0))
                        for spec in c.envs]
        self.mix = random.Random(c.seed * 7919 + self.trainer.step_count)
        self.buffer = Buffer(signal_only=c.trainer.filters.drop_zero_advantage_groups)
        if self.resume:  # trajectories stored but never trained on come back; so do those trained after the checkpoint
            self.store.rewind(self.trainer.step_count)
            self.buffer.add(self.store.buffered())
        self.published = (0, str(self.model_dir))  # (version, path) the workers should hold
        if self.trainer.publisher is not None and self.trainer.publisher.latest_version:
            from trainer.publish import latest_published

            found = latest_published(self.trainer.publisher.root)
            if found is not None:
                self.published = (found[0], str(found[1]))
        self._start_workers()
        self._start_logging()

    def _bootstrap_model(self) -> Path:
        c = self.config.model
        if c.path is not None:
            if not (Path(c.path) / "config.json").is_file():
                raise FileNotFoundError(f"model.path {c.path} is not a Hugging Face model directory (no config.json)")
            return Path(c.path)
        from cwm_rl.models import init_model

        init_dir = self.run_dir / "model" / "init"
        if not (init_dir / "config.json").is_file():
            init_model(init_dir, preset=c.init_preset, arch=c.init_arch, seed=c.init_seed, force=True)
        if c.sft.steps == 0:
            return init_dir
        sft_dir = self.run_dir / "model" / "sft"
        if not (sft_dir / "sft_summary.json").is_file():
            from cwm_rl.sft import SFTConfig, run_sft

            first = self.config.envs[0]
            sft = SFTConfig(env_id=c.sft.env_id or first.id, env_kwargs=c.sft.env_kwargs if c.sft.env_kwargs is not None else first.kwargs,
                            steps=c.sft.steps, batch_size=c.sft.batch_size, lr=c.sft.lr, eval_tasks=c.sft.eval_tasks,
                            seed=self.config.seed, num_threads=self.config.trainer_threads)
            self._say(f"warm start: SFT {sft.steps} steps on {sft.env_id} ...")
            summary = run_sft(init_dir, sft_dir, sft, force=True)
            self._say(f"warm start: held-out accuracy {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}")
        return sft_dir

    def _start_workers(self) -> None:
        import ray

        from rollout_workers.actor import rollout_worker_actor
        from rollout_workers.engine import EngineConfig

        c = self.config
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            ray.init(address=c.ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({} if c.ray_address else {"num_cpus": max(c.rollout.num_workers, os.cpu_count() or 1)}))
        r = c.rollout
        first = c.envs[0]
        self.worker_config = {
            "engine": EngineConfig(model=str(self.model_dir), dtype=r.dtype, max_model_len=r.max_model_len, kv_cache_gib=r.kv_cache_gib,
                                   max_num_seqs=r.max_num_seqs, seed=c.seed).model_dump(),
            "env_id": first.id, "env_kwargs": first.kwargs, "sampling": r.sampling.model_dump(), "limits": r.limits.model_dump(),
            "env_modules": c.env_modules, "sys_path": [os.getcwd()] if c.env_modules else [],
        }
        # A worker that dies is restarted by Ray (max_restarts); its lost calls are re-submitted.
        worker_class = rollout_worker_actor(num_cpus=1).options(max_restarts=3)
        self.workers = [worker_class.remote(self.worker_config) for _ in range(r.num_workers)]
        self.pending: dict[Any, tuple[int, list[tuple[int, dict]], EnvSpec]] = {}  # ref -> (worker, tasks, env)
        self.reloads: list[Any] = []
        if self.published[0] > 0:  # resumed: workers start from the base model, bring them up to date
            self._publish_to_workers(wait=True)

    def _start_logging(self) -> None:
        self.tensorboard = None
        if self.config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = None
        if self.config.logging.wandb_project:
            import wandb

            self.wandb = wandb.init(project=self.config.logging.wandb_project, mode=self.config.logging.wandb_mode,
                                    dir=str(self.run_dir), config=self.config.model_dump(mode="json"))
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")

    # ---- the loop ----

    def run(self) -> dict[str, Any]:
        c = self.config
        self.rl_started = time.time()
        self._evaluate()
        last_eval_step = self.trainer.step_count
        while self.trainer.step_count < c.steps and self.stop_reason is None:
            if c.max_minutes is not None and time.time() - self.rl_started > 60 * c.max_minutes:
                self.stop_reason = "max_minutes"
                break
            self._fill_workers()
            self._collect(timeout=0.2)
            # A full buffer trains too: its groups may all lack signal, and would block the workers.
            enough = self.buffer.signal_tokens() >= c.trainer.batch.step_tokens or len(self.buffer) >= c.buffer_groups
            if not enough or (c.mode == "sync" and self.pending):  # sync: every round asked for has come back
                continue
            self._train_step()
            if c.eval.every_steps and self.trainer.step_count - last_eval_step >= c.eval.every_steps:
                self._evaluate()
                last_eval_step = self.trainer.step_count
            if c.trainer.checkpoint_every and self.trainer.step_count % c.trainer.checkpoint_every == 0:
                self._checkpoint()
        self.stop_reason = self.stop_reason or "steps"
        return self.finish()

    def _fill_workers(self) -> None:
        c = self.config
        r = c.rollout
        in_flight_groups = sum(len(tasks) for _, tasks, _ in self.pending.values())
        if c.mode == "sync":
            # On-policy: one round of groups per worker at a time, collected in full before more are
            # asked for; the trainer steps once the rounds hold a step's tokens.
            if self.pending:
                return
            budget = r.groups_per_request * len(self.workers)
        else:
            budget = c.buffer_groups - len(self.buffer) - in_flight_groups
        for w in range(len(self.workers)):
            while budget > 0 and sum(1 for wi, _, _ in self.pending.values() if wi == w) < r.requests_in_flight:
                spec_index = self._pick_env()
                n = min(r.groups_per_request, budget)
                tasks = [self.sources[spec_index].next_task() for _ in range(n)]
                self._submit(w, tasks, c.envs[spec_index])
                budget -= n
                if c.mode == "sync":
                    break

    def _pick_env(self) -> int:
        weights = [e.weight for e in self.config.envs]
        return self.mix.choices(range(len(weights)), weights=weights)[0]

    def _submit(self, w: int, tasks: list[tuple[int, dict]], spec: EnvSpec) -> None:
        ref = self.workers[w].run_groups.remote([s for s, _ in tasks], self.config.rollout.group_size, self.run_dir.name,
                                                env=spec.model_dump(), tasks=[t for _, t in tasks])
        self.pending[ref] = (w, tasks, spec)

    def _collect(self, timeout: float) -> None:
        import ray

        if not self.pending:
            time.sleep(min(timeout, 0.05))
            return
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in done:
            w, tasks, spec = self.pending.pop(ref)
            try:
                trajectories = [Trajectory.model_validate_json(j) for j in ray.get(ref)]
            except Exception as e:  # the worker died: Ray restarts it; play the same tasks again
                log.warning("rollout worker %d failed (%s: %s); re-submitting its %d groups", w, type(e).__name__, e, len(tasks))
                self._say(f"worker {w} failed ({type(e).__name__}); restarting it and re-submitting {len(tasks)} groups")
                self._publish_to_workers(wait=False, only=[w])
                self._submit(w, tasks, spec)
                continue
            self.store.add(trajectories)
            self.counts["trajectories_stored"] += len(trajectories)
            self.counts["generated_tokens"] += sum(t.num_generated_tokens for t in trajectories)
            self.buffer.add(trajectories)

    def _train_step(self) -> None:
        import ray

        c = self.config
        batch = self.buffer.take(c.trainer.batch.step_tokens if c.mode == "async" else math.inf)  # sync: all of it
        for ref in self.reloads:  # the previous reload must be in before staleness is judged against the new version
            try:
                ray.get(ref)
            except Exception as e:  # that worker died; it gets the weights again when its lost work is re-submitted
                log.warning("a weight reload failed (%s: %s)", type(e).__name__, e)
        self.reloads = []
        step = self.trainer.step_count
        metrics = self.trainer.step(batch)
        prepared = self.trainer.last_prepared
        trained = {s.trajectory_id for s in prepared.samples}
        self.store.mark_trained(sorted(trained), step)
        for reason, ids in prepared.dropped_ids.items():
            self.store.mark_dropped(ids, reason, step)
        self.counts["trajectories_trained"] += len(trained)
        self.counts["trajectories_dropped_stale"] += len(prepared.dropped_ids.get("stale", []))
        self.counts["trajectories_dropped_other"] += sum(len(v) for k, v in prepared.dropped_ids.items() if k != "stale")
        if "published" in metrics:
            self.published = (self.trainer.policy_version, metrics["published"])
            self._publish_to_workers(wait=c.mode == "sync")
        if metrics.get("skipped"):
            dropped = {k.removeprefix("dropped_"): v for k, v in metrics.items() if k.startswith("dropped_") and v}
            self._say(f"step skipped: none of {len(batch)} trajectories had a learning signal (dropped: {dropped})")
            return
        metrics.update(reward_mean=sum(t.return_ for t in batch) / max(len(batch), 1), buffer_groups=len(self.buffer),
                       in_flight_groups=sum(len(t) for _, t, _ in self.pending.values()),
                       tokens_per_s=self.counts["generated_tokens"] / max(time.time() - self.rl_started, 1e-9),
                       wall_s=time.time() - self.started)
        self._log(metrics)

    def _publish_to_workers(self, wait: bool, only: list[int] | None = None) -> None:
        import ray

        version, path = self.published
        refs = [self.workers[w].update_weights.remote(version, path) for w in (only or range(len(self.workers)))]
        if wait:
            ray.get(refs)
        else:
            self.reloads += refs

    # ---- eval, logging, checkpoints ----

    def _evaluate(self) -> None:
        import ray

        c = self.config
        results: dict[str, float] = {}
        greedy = {"temperature": 0.0, "max_tokens": c.eval.max_tokens}
        for spec in c.envs:
            def play(w: int, share: list[dict[str, Any]]):
                return self.workers[w].run_groups.remote([0] * len(share), 1, self.run_dir.name, env=spec.model_dump(),
                                                         tasks=share, sampling=greedy)

            tasks = self.held_out[spec.id]
            shares = [(w, tasks[w::len(self.workers)]) for w in range(len(self.workers))]
            refs = [(w, share, play(w, share)) for w, share in shares if share]
            trajectories = []
            for w, share, ref in refs:
                for attempt in range(3):
                    try:
                        trajectories += [Trajectory.model_validate_json(j) for j in ray.get(ref)]
                        break
                    except Exception as e:  # the worker died mid-eval: Ray restarts it; bring it up to date, ask again
                        if attempt == 2:
                            raise RuntimeError(f"evaluation failed 3 times on rollout worker {w}: {e}") from e
                        self._say(f"worker {w} failed during eval ({type(e).__name__}); retrying on the restarted worker")
                        self._publish_to_workers(wait=True, only=[w])
                        ref = play(w, share)
            self.store.add(trajectories, status="eval")
            results[spec.id] = sum(t.return_ > 0 for t in trajectories) / max(len(trajectories), 1)
        accuracy = sum(results.values()) / len(results)
        entry = {"step": self.trainer.step_count, "policy_version": self.trainer.policy_version, "eval_accuracy": accuracy,
                 **{f"eval_accuracy/{k}": v for k, v in results.items()}}
        self.eval_history.append(entry)
        self._log(entry, console=False)
        self._say(f"eval at step {entry['step']}: held-out greedy accuracy {accuracy:.1%}"
                  + ("" if len(results) == 1 else f" {results}"))

    def _checkpoint(self) -> None:
        self.trainer.save_checkpoint(data_cursor={"cursors": {s.spec.id: s.cursor for s in self.sources}})

    def _log(self, metrics: dict[str, Any], console: bool = True) -> None:
        step = metrics.get("step", self.trainer.step_count)
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "loss" in metrics:
            self.history.append(scalars)
        self.metrics_file.write(json.dumps(scalars) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if console and "loss" in metrics:
            staleness = metrics.get("staleness_mean", 0.0)
            self._say(f"step {step + 1:>4}  v{metrics.get('new_policy_version', 0):<4} reward {metrics['reward_mean']:+.3f}  "
                      f"loss {metrics['loss']:+.4f}  seqs {metrics.get('sequences', 0):>3}  dropped stale {metrics.get('dropped_stale', 0)}  "
                      f"staleness {staleness:.2f}  buffer {metrics['buffer_groups']}/{self.config.buffer_groups}  "
                      f"{metrics['tokens_per_s']:.0f} tok/s  {metrics['step_time_s']:.2f} s")

    def _say(self, text: str) -> None:
        if self.config.logging.progress:
            print(f"[{time.time() - self.started:7.1f}s] {text}", flush=True)

    def finish(self) -> dict[str, Any]:
        """Final eval, checkpoint, summary.json and the plot. Runs on every exit path that can."""
        if not self.eval_history or self.eval_history[-1]["step"] != self.trainer.step_count:
            self._evaluate()
        self._checkpoint()
        summary = {
            "stop_reason": self.stop_reason,
            "eval_accuracy_initial": self.eval_history[0]["eval_accuracy"] if self.eval_history else None,
            "eval_accuracy_final": self.eval_history[-1]["eval_accuracy"] if self.eval_history else None,
            "steps": self.trainer.step_count,
            "policy_versions": self.trainer.policy_version,
            **self.counts,
            "wall_seconds": round(time.time() - self.started, 1),
            "rl_seconds": round(time.time() - self.rl_started, 1),
            "eval_history": self.eval_history,
            "model_dir": str(self.model_dir),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._plot()
        return summary

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if self.history:
            ax.plot([h["step"] + 1 for h in self.history], [h["reward_mean"] for h in self.history], label="train reward (mean)", alpha=0.6)
        ax.plot([e["step"] for e in self.eval_history], [e["eval_accuracy"] for e in self.eval_history], "o-", label="held-out accuracy (greedy)")
        ax.set_xlabel("trainer step")
        ax.set_title(f"{self.run_dir.name}: {self.config.mode} GRPO")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / "progress.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception:  # a dead worker has nothing to shut down
                pass
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()
        if getattr(self, "store", None) is not None:
            self.store.close()
        if getattr(self, "started_ray", False) and ray.is_initialized():
            ray.shutdown()


def run_job(config: JobConfig, resume: bool = False) -> dict[str, Any]:
    """Run a whole job; Ctrl-C stops it cleanly (checkpoint, summary), a second Ctrl-C at once."""
    job = Job(config, resume=resume)
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        if job.stop_reason == "interrupted":
            raise KeyboardInterrupt
        job.stop_reason = "interrupted"
        print("\nstopping after the current step (checkpoint, summary); Ctrl-C again to exit at once", flush=True)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        job.setup()
        return job.run()
    finally:
        signal.signal(signal.SIGINT, previous)
        job.close()

