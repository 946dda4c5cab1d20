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

MAX_ENV_RETRIES = 5  # times a group whose env server was unreachable is played again before it is given up
WORKER_RESTARTS = 3  # Ray restarts a dead rollout worker this many times
WORKER_RESTART_TIMEOUT_S = 300  # a failed worker that does not answer again within this stops the job (checkpointed)
EVAL_WAIT_FOR_SERVER_S = 120  # an eval waits this long for an env server to come back before leaving its tasks out


@dataclass
class Request:
    """One `run_groups` call in flight: which worker, which tasks of which env, on which env server."""

    worker: int
    tasks: list[tuple[int, dict[str, Any]]]
    env_index: int
    url: str | None = None
    attempt: int = 0


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
        from cwm_rl.progress import ProgressView

        self.view = ProgressView(enabled=config.logging.progress, total_steps=config.steps, buffer_groups=config.buffer_groups,
                                 title=str(self.run_dir))
        self.counts = {"trajectories_stored": 0, "trajectories_trained": 0, "trajectories_dropped_stale": 0,
                       "trajectories_dropped_other": 0, "generated_tokens": 0, "groups_replayed_env_unavailable": 0}

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
        # Sandbox and SWE containers made by this job's envs (in-process, env servers, workers) carry the run's name.
        os.environ.setdefault("CWM_RL_RUN_ID", self.run_dir.name)
        self._start_env_servers()
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
                            eval_every=c.sft.eval_every, stop_at_accuracy=c.sft.stop_at_accuracy,
                            seed=self.config.seed, num_threads=c.sft.threads or os.cpu_count())
            self.view.set_status("warm start (SFT)")
            self._say(f"warm start: SFT {sft.steps} steps on {sft.env_id} ...")
            summary = run_sft(init_dir, sft_dir, sft, force=True)
            self._say(f"warm start: held-out accuracy {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%} "
                      f"after {summary['steps']} steps")
        return sft_dir

    def _start_env_servers(self) -> None:
        from cwm_rl.env_servers import EnvServers

        self.env_servers: dict[int, EnvServers] = {}
        for i, spec in enumerate(self.config.envs):
            if spec.servers or spec.endpoints:
                self.env_servers[i] = EnvServers(spec, self.run_dir / "env_servers", self.config.env_modules)
                if spec.servers:
                    self._say(f"{spec.id}: {spec.servers} env server(s) started: {', '.join(self.env_servers[i].urls)}")
        self.replays: deque[Request] = deque()  # groups to play again: their env server was unreachable
        self.last_server_check = time.monotonic()

    def _start_workers(self) -> None:
        import ray

        self.view.set_status("starting rollout workers")
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
        worker_class = rollout_worker_actor(num_cpus=1).options(max_restarts=WORKER_RESTARTS)
        self.workers = [worker_class.remote(self.worker_config) for _ in range(r.num_workers)]
        self.pending: dict[Any, Request] = {}  # ray ref -> the request it answers
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
            self._check_env_servers()
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
        in_flight_groups = sum(len(q.tasks) for q in self.pending.values()) + sum(len(q.tasks) for q in self.replays)
        for _ in range(len(self.replays)):  # groups whose env server was unreachable go first, to any free worker
            request = self.replays.popleft()
            idle = [w for w in range(len(self.workers)) if self._requests_of(w) < r.requests_in_flight]
            if not idle or not self._submit(idle[0], request.tasks, request.env_index, request.attempt):
                self.replays.append(request)
        if c.mode == "sync":
            # On-policy: one round of groups per worker at a time, collected in full before more are
            # asked for; the trainer steps once the rounds hold a step's tokens.
            if self.pending:
                return
            budget = r.groups_per_request * len(self.workers)
        else:
            budget = c.buffer_groups - len(self.buffer) - in_flight_groups
        for w in range(len(self.workers)):
            while budget > 0 and self._requests_of(w) < r.requests_in_flight:
                env_index = self._pick_env()
                n = min(r.groups_per_request, budget)
                tasks = [self.sources[env_index].next_task() for _ in range(n)]
                if not self._submit(w, tasks, env_index):  # every env server of that env is down: wait
                    self.replays.append(Request(w, tasks, env_index))
                budget -= n
                if c.mode == "sync":
                    break

    def _wait_for_worker(self, w: int, interruptible: bool = False) -> bool:
        """Block until worker `w` answers again (Ray restarts a dead one; calls made while it restarts fail at
        once), or False after WORKER_RESTART_TIMEOUT_S (Ray gave up on it, or its node is gone) or, when
        `interruptible`, once Ctrl-C asked the job to stop."""
        import ray

        deadline = time.monotonic() + WORKER_RESTART_TIMEOUT_S
        while time.monotonic() < deadline and not (interruptible and self.stop_reason is not None):
            try:
                ray.get(self.workers[w].pid.remote(), timeout=30)
                return True
            except Exception:  # restarting (ActorUnavailableError), or the call timed out: ask again
                time.sleep(1.0)
        return False

    def _requests_of(self, w: int) -> int:
        return sum(1 for q in self.pending.values() if q.worker == w)

    def _pick_env(self) -> int:
        weights = [e.weight for e in self.config.envs]
        return self.mix.choices(range(len(weights)), weights=weights)[0]

    def _env_payload(self, env_index: int) -> tuple[dict[str, Any], str | None] | None:
        """What a worker needs to make the env (id, kwargs, the env server to use), or None while all its servers are down."""
        spec = self.config.envs[env_index]
        url = None
        if env_index in self.env_servers:
            url = self.env_servers[env_index].pick()
            if url is None:
                return None
        return {"id": spec.id, "kwargs": spec.kwargs, "url": url, "token": spec.token}, url

    def _submit(self, w: int, tasks: list[tuple[int, dict]], env_index: int, attempt: int = 0) -> bool:
        """Ask worker `w` to play one group per task; False (nothing sent) while every env server of the env is down."""
        payload = self._env_payload(env_index)
        if payload is None:
            return False
        env, url = payload
        ref = self.workers[w].run_groups.remote([s for s, _ in tasks], self.config.rollout.group_size, self.run_dir.name,
                                                env=env, tasks=[t for _, t in tasks])
        self.pending[ref] = Request(w, tasks, env_index, url, attempt)
        return True

    def _check_env_servers(self) -> None:
        """About once a second: restart env servers the job started that died, take back the ones answering again."""
        if not self.env_servers or time.monotonic() - self.last_server_check < 1.0:
            return
        self.last_server_check = time.monotonic()
        for i, servers in self.env_servers.items():
            for url in servers.check():
                self._say(f"{self.config.envs[i].id}: env server {url} is up again")

    def _collect(self, timeout: float) -> None:
        import ray

        if not self.pending:
            time.sleep(min(timeout, 0.05))
            return
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in done:
            request = self.pending.pop(ref)
            w = request.worker
            try:
                trajectories = [Trajectory.model_validate_json(j) for j in ray.get(ref)]
            except Exception as e:  # the worker died: Ray restarts it; play the same tasks again
                log.warning("rollout worker %d failed (%s: %s); re-submitting its %d groups", w, type(e).__name__, e, len(request.tasks))
                self._say(f"worker {w} failed ({type(e).__name__}); waiting for Ray to restart it, then re-submitting {len(request.tasks)} groups")
                if not self._wait_for_worker(w, interruptible=True):
                    if self.stop_reason is None:  # not Ctrl-C: the worker is gone for good
                        self.stop_reason = "rollout_workers_lost"
                        self.lost_error = (f"rollout worker {w} failed ({type(e).__name__}: {e}) and did not answer again "
                                           f"within {WORKER_RESTART_TIMEOUT_S} s")
                    return
                self._publish_to_workers(wait=False, only=[w])
                if not self._submit(w, request.tasks, request.env_index, request.attempt):
                    self.replays.append(request)
                continue
            self.store.add(trajectories)
            self.counts["trajectories_stored"] += len(trajectories)
            self.counts["generated_tokens"] += sum(t.num_generated_tokens for t in trajectories)
            self.buffer.add(self._replay_unavailable(request, trajectories))

    def _replay_unavailable(self, request: Request, trajectories: list[Trajectory]) -> list[Trajectory]:
        """Groups with an episode whose env server was unreachable: dropped (reason env_unavailable), their
        server marked down, their tasks played again elsewhere. Returns the groups that are fine."""
        size = self.config.rollout.group_size
        groups = [trajectories[i:i + size] for i in range(0, len(trajectories), size)]  # one per task, in order
        failed = [k for k, g in enumerate(groups) if any(t.finish_reason == "env_unavailable" for t in g)]
        if not failed:
            return trajectories
        errors = [t.error for k in failed for t in groups[k] if t.finish_reason == "env_unavailable"]
        self.store.mark_dropped([t.trajectory_id for k in failed for t in groups[k]], "env_unavailable")
        self.counts["trajectories_dropped_other"] += sum(len(groups[k]) for k in failed)
        spec = self.config.envs[request.env_index]
        if request.url is not None:
            self.env_servers[request.env_index].mark_down(request.url, errors[0] or "unreachable")
        retry = [request.tasks[k] for k in failed]
        if request.attempt + 1 > MAX_ENV_RETRIES:
            self._say(f"{spec.id}: giving up {len(retry)} group(s) after {MAX_ENV_RETRIES} replays; last error: {errors[0]}")
        else:
            self.counts["groups_replayed_env_unavailable"] += len(retry)
            self._say(f"{spec.id}: env server {request.url} unreachable; playing {len(retry)} group(s) again elsewhere ({errors[0]})")
            self.replays.append(Request(request.worker, retry, request.env_index, None, request.attempt + 1))
        return [t for k, g in enumerate(groups) if k not in failed for t in g]

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
                       in_flight_groups=sum(len(q.tasks) for q in self.pending.values()),
                       tokens_per_s=self.counts["generated_tokens"] / max(time.time() - self.rl_started, 1e-9),
                       wall_s=time.time() - self.started)
        self._log(metrics)
        self.view.step(metrics)

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
        c = self.config
        self.view.set_status("evaluating")
        results: dict[str, float] = {}
        for env_index, spec in enumerate(c.envs):
            trajectories = self._play_eval(env_index, self.held_out[spec.id])
            self.store.add(trajectories, status="eval")
            results[spec.id] = sum(t.return_ > 0 for t in trajectories) / max(len(trajectories), 1)
        accuracy = sum(results.values()) / len(results)
        entry = {"step": self.trainer.step_count, "policy_version": self.trainer.policy_version, "eval_accuracy": accuracy,
                 **{f"eval_accuracy/{k}": v for k, v in results.items()}}
        self.eval_history.append(entry)
        self._log(entry)
        self.view.eval(entry["step"], accuracy, results)

    def _play_eval(self, env_index: int, tasks: list[dict[str, Any]]) -> list[Trajectory]:
        """Greedy episodes of `tasks`, split over the workers. A worker that dies is brought up to date and
        asked again; an episode whose env server was unreachable is played again on another server."""
        import ray

        greedy = {"temperature": 0.0, "max_tokens": self.config.eval.max_tokens}
        played: list[Trajectory] = []
        for attempt in range(MAX_ENV_RETRIES + 1):
            asked = []
            for w in range(len(self.workers)):
                share = tasks[w::len(self.workers)]
                payload = self._env_payload(env_index)
                waited = time.monotonic()
                while share and payload is None and time.monotonic() - waited < EVAL_WAIT_FOR_SERVER_S:
                    time.sleep(1.0)  # every env server of this env is down: wait for one to come back
                    self._check_env_servers()
                    payload = self._env_payload(env_index)
                if share and payload is None:
                    self._say(f"{self.config.envs[env_index].id}: no env server up for {EVAL_WAIT_FOR_SERVER_S} s; "
                              f"this eval leaves out {len(share)} task(s)")
                elif share:
                    asked.append((w, share, payload))
            play = lambda w, share, env: self.workers[w].run_groups.remote(  # noqa: E731
                [0] * len(share), 1, self.run_dir.name, env=env, tasks=share, sampling=greedy)
            refs = [play(w, share, env) for w, share, (env, _) in asked]  # all workers at once
            unavailable = []
            for (w, share, (env, url)), ref in zip(asked, refs):
                for tries in range(WORKER_RESTARTS + 2):
                    try:
                        got = [Trajectory.model_validate_json(j) for j in ray.get(ref)]
                        break
                    except Exception as e:  # the worker died mid-eval: Ray restarts it; bring it up to date, ask again
                        if tries == WORKER_RESTARTS + 1:
                            raise RuntimeError(f"evaluation failed {tries + 1} times on rollout worker {w}: {e}") from e
                        self._say(f"worker {w} failed during eval ({type(e).__name__}); retrying on the restarted worker")
                        if not self._wait_for_worker(w):
                            raise RuntimeError(f"rollout worker {w} failed during eval and did not answer again within "
                                               f"{WORKER_RESTART_TIMEOUT_S} s: {e}") from e
                        try:
                            self._publish_to_workers(wait=True, only=[w])
                        except Exception as reload_error:  # it died again: the next try tells
                            log.warning("reloading worker %d after a failure failed: %s", w, reload_error)
                        ref = play(w, share, env)
                for task, t in zip(share, got):
                    if t.finish_reason == "env_unavailable" and attempt < MAX_ENV_RETRIES:
                        unavailable.append(task)
                        self.env_servers[env_index].mark_down(url, t.error or "unreachable")
                    else:
                        played.append(t)
            if not unavailable:
                break
            self._say(f"{self.config.envs[env_index].id}: {len(unavailable)} eval episode(s) met an unreachable env server; playing them again")
            tasks = unavailable
        return played

    def _checkpoint(self) -> None:
        self.trainer.save_checkpoint(data_cursor={"cursors": {s.spec.id: s.cursor for s in self.sources}})

    def _log(self, metrics: dict[str, Any]) -> None:
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

    def _say(self, text: str) -> None:
        self.view.say(text)

    def finish(self) -> dict[str, Any]:
        """Final eval, checkpoint, summary.json and the plot. Runs on every exit path that can."""
        self.view.set_status(f"finishing ({self.stop_reason})")
        evaluated = self.eval_history and self.eval_history[-1]["step"] == self.trainer.step_count
        if self.stop_reason != "rollout_workers_lost" and not evaluated:  # lost workers cannot evaluate
            self._evaluate()
        self._checkpoint()
        summary = {
            "stop_reason": self.stop_reason,
            "eval_accuracy_initial": self.eval_history[0]["eval_accuracy"] if self.eval_history else None,
            "eval_accuracy_final": self.eval_history[-1]["eval_accuracy"] if self.eval_history else None,
            "steps": self.trainer.step_count,
            "policy_versions": self.trainer.policy_version,
            **self.counts,
            "env_server_restarts": sum(servers.restarts() for servers in self.env_servers.values()),
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

        self.view.close()
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
        for servers in getattr(self, "env_servers", {}).values():
            servers.close()
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
        job.view.set_status("stopping")
        job.view.say("stopping after the current step (checkpoint, summary); Ctrl-C again to exit at once")

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        job.setup()
        summary = job.run()
        if job.stop_reason == "rollout_workers_lost":
            raise RuntimeError(f"{job.lost_error}. The run is checkpointed at step {summary['steps']}; once the cause is fixed, "
                               f"continue it with: cwm-rl train --resume {job.run_dir}")
        return summary
    finally:
        signal.signal(signal.SIGINT, previous)
        job.close()

