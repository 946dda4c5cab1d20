"""The job's rollout workers: Ray actors with one vLLM engine each, kept busy, restarted when they die.

`RolloutWorkers(config, model_dir, endpoints, say=..., stopping=...)` starts the actors and their engines (Ray is
started by the run, `start_ray`), `start_engines(published)` waits for the engines (call it before anything else);
`fill(tasks, budget)` keeps their calls in flight, `collect(timeout)` yields finished
calls as (request, trajectories), `requeue_unavailable` splits off the groups that met a dead env
server, `reload(version, path)` makes every worker reload in flight, `close()` stops them. The
driver's loop (`driver.py`) is the reference use; `tests/cwm_rl/loop/test_driver.py` kills a
worker mid-run.

Why it is built this way:
- A worker plays `groups_per_request` groups per call and has `requests_in_flight` calls
  outstanding, so its engine never waits for the driver.
- The engines start as the actors are made and the job waits for them (`start_engines`) after making
  the trainer's actors, which start meanwhile. An engine that cannot start (a
  config vLLM refuses) stops the job at once with vLLM's reason and the key to change; it is not
  retried, since a restart would fail the same way. Only a worker whose engine had started is.
- A worker that dies is restarted by Ray (`max_restarts`); the calls it lost are asked again once
  it answers (calls made while it restarts fail at once), after it got the current weights. One
  that does not come back within `WORKER_RESTART_TIMEOUT_S` sets `lost`: the job stops checkpointed.
- A group with an episode whose env server was unreachable is dropped whole (reason
  `env_unavailable`), the server marked down, and its tasks played again elsewhere, up to
  `MAX_ENV_RETRIES` times.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwm_rl.config import EnvSpec, JobConfig, RolloutConfig
from cwm_rl.loop.env_servers import EnvEndpoints
from cwm_rl.loop.tasks import TaskMix
from cwm_rl.types import ShippedWeights, Trajectory
from rollout_workers.config import WorkerConfig

log = logging.getLogger(__name__)

MAX_ENV_RETRIES = 5  # times a group whose env server was unreachable is played again before it is given up
WORKER_RESTARTS = 3  # Ray restarts a dead rollout worker this many times
WORKER_RESTART_TIMEOUT_S = 300  # a failed worker that does not answer again within this stops the job (checkpointed)


def worker_config(rollout: RolloutConfig, env: EnvSpec, model_dir: str | Path, seed: int, env_modules: list[str],
                  with_server: bool = True) -> WorkerConfig:
    """The one place a rollout worker's config is made (`cwm-rl train` and `cwm-rl model play`). `env` is the
    worker's default env; `with_server=False` leaves out its env server (a job names one per call)."""
    engine = rollout.engine.model_copy(update={"model": str(model_dir), "seed": seed if rollout.engine.seed is None else rollout.engine.seed})
    url, token = (env.url, env.bearer_token) if with_server else (None, None)
    return WorkerConfig(engine=engine, env_id=env.id, env_kwargs=env.kwargs, env_url=url, env_token=token,
                        env_modules=env_modules, sys_path=[os.getcwd()] if env_modules else [],
                        sampling=rollout.sampling, limits=rollout.limits)


def start_ray(address: str | None, num_cpus: float) -> bool:
    """Join `address`, or start a local Ray with a CPU per core (at least `num_cpus`, what the actors reserve).
    True if started here. A local Ray is always a new one: a plain `ray.init()` would join whatever `ray start`
    left running on the machine (or fail on its stale address)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             **({} if address else {"num_cpus": max(math.ceil(num_cpus), os.cpu_count() or 1)}))
    return True


def engine_fix(reason: str, config: JobConfig, model_dir: Path) -> str:
    """What to change when an engine did not start for `reason` (vLLM's error line)."""
    engine = config.rollout.engine
    if not engine.enforce_eager and any(word in reason.lower() for word in ("inductor", "compil", "python.h", "c++")):
        return "set rollout.engine.enforce_eager=true (no torch.compile), or install g++ and the Python headers"
    if any(word in reason.lower() for word in ("memory", "kv cache", "cache blocks")):
        return (f"raise rollout.engine.kv_cache_gib (now {engine.kv_cache_gib}) or lower rollout.engine.max_model_len "
                f"(now {engine.max_model_len})")
    keys = [k for k in ("max_model_len", "dtype", "max_num_seqs", *engine.extra_engine_args) if k in reason]
    named = ", ".join(f"rollout.engine.{'extra_engine_args.' if k in engine.extra_engine_args else ''}{k}" for k in keys)
    return (f"check {named}" if named else "check rollout.engine (max_model_len, dtype, kv_cache_gib, extra_engine_args)") + \
        f" and the model at {model_dir}"


@dataclass
class Request:
    """One `run_groups` call in flight: which worker, which tasks of which env, on which env server."""

    worker: int
    tasks: list[tuple[int, dict[str, Any]]]
    env_index: int
    url: str | None = None
    attempt: int = 0
    incarnation: int = 0  # how many times the worker had been restarted when the call was made


class RolloutWorkers:
    """The worker actors of a job and the calls in flight to them (see the module docstring)."""

    def __init__(self, config: JobConfig, model_dir: Path, endpoints: EnvEndpoints, *, say: Callable[[str], None],
                 stopping: Callable[[], bool], shipped_model: ShippedWeights | None = None):
        """Make the actors and have them start their engines; `start_engines` waits for them. `shipped_model`: the base
        model through Ray's object store (publish.backend: object_store), for workers that cannot read `model_dir`."""
        from rollout_workers.actor import rollout_worker_actor

        self.config, self.endpoints, self.say, self.stopping = config, endpoints, say, stopping
        self.worker_config = worker_config(config.rollout, config.envs[0], model_dir, config.seed, config.env_modules,
                                           with_server=False).model_dump()
        self.actors: list[Any] = []
        self.pending: dict[Any, Request] = {}  # ray ref -> the request it answers
        self.replays: deque[Request] = deque()  # groups to play again: their env server was unreachable
        self.reloads: list[Any] = []  # update_weights calls not yet waited for
        self.published: tuple[int, Any] = (0, shipped_model or str(model_dir))  # (version, weights) the workers should hold
        self.model_dir = model_dir
        self.engine_starts: list[Any] = []  # the actors' start_engine calls, waited for by start_engines
        self.lost: str | None = None  # why a worker is gone for good (the job stops)
        self.groups_replayed = 0
        self.incarnations = [0] * config.rollout.num_workers  # times each worker was restarted (and brought up to date)
        try:
            # The run's container label and SWE pool size reach workers on other nodes too (a local Ray inherits them).
            job_env = {k: os.environ[k] for k in ("CWM_RL_RUN_ID", "CWM_RL_EPISODES_IN_FLIGHT") if k in os.environ}
            r = config.rollout
            worker_class = rollout_worker_actor(num_cpus=1, num_gpus=r.num_gpus, resources=r.resources).options(
                max_restarts=WORKER_RESTARTS, runtime_env={"env_vars": job_env})
            self.actors = [worker_class.remote(self.worker_config) for _ in range(r.num_workers)]
            self.engine_starts = [actor.start_engine.remote(shipped_model) for actor in self.actors]
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def restarts(self) -> int:
        """Rollout workers Ray restarted during the job."""
        return sum(self.incarnations)

    # -- training rollouts --------------------------------------------------------------------------

    def pending_groups(self) -> int:
        """Groups in calls the workers are playing now."""
        return sum(len(q.tasks) for q in self.pending.values())

    def in_flight_groups(self) -> int:
        """Groups asked for and not yet back: in calls, or waiting to be played again."""
        return self.pending_groups() + sum(len(q.tasks) for q in self.replays)

    def fill(self, tasks: TaskMix, budget: int, one_round: bool = False) -> None:
        """Give every worker calls up to `requests_in_flight`, `budget` groups at most (replays first).
        `one_round` (sync mode): only while nothing is in flight, and one call per worker."""
        r = self.config.rollout
        for _ in range(len(self.replays)):  # groups whose env server was unreachable go first, to any free worker
            request = self.replays.popleft()
            idle = [w for w in range(len(self.actors)) if self._requests_of(w) < r.requests_in_flight]
            if not idle or not self._submit(idle[0], request.tasks, request.env_index, request.attempt):
                self.replays.append(request)
        if one_round and self.pending:  # sync: the round asked for has not all come back
            return
        for w in range(len(self.actors)):
            while budget > 0 and self._requests_of(w) < r.requests_in_flight:
                env_index = tasks.pick_env()
                n = min(r.groups_per_request, budget)
                drawn = tasks.draw(n, env_index)
                if not self._submit(w, drawn, env_index):  # every env server of that env is down: wait
                    self.replays.append(Request(w, drawn, env_index))
                budget -= n
                if one_round:
                    break

    def collect(self, timeout: float) -> Iterator[tuple[Request, list[Trajectory]]]:
        """The calls that finished within `timeout`: (request, its trajectories). A dead worker's calls are
        asked again once Ray restarted it; if it does not come back, `lost` says why and collecting ends."""
        import ray

        if not self.pending:
            time.sleep(min(timeout, 0.05))
            return
        done, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)  # back as soon as one is done
        if done:
            done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)  # and all that are
        for ref in done:
            request = self.pending.pop(ref)
            try:
                trajectories = [Trajectory.model_validate_json(j) for j in ray.get(ref)]
            except Exception as e:  # the worker died: Ray restarts it; play the same tasks again
                w = request.worker
                if request.incarnation == self.incarnations[w]:  # the first lost call of that process: wait for its restart
                    lost_calls = sum(1 for q in self.pending.values() if q.worker == w) + 1
                    log.warning("rollout worker %d failed (%s: %s); re-submitting its %d calls once Ray restarted it", w,
                                type(e).__name__, e, lost_calls)
                    self.say(f"worker {w} failed ({type(e).__name__}); waiting for Ray to restart it (its node may be "
                             f"coming back), then re-submitting its {lost_calls} call(s)")
                    if not self.wait_for_worker(w, interruptible=True):
                        if not self.stopping():  # not Ctrl-C: the worker is gone for good
                            self.lost = (f"rollout worker {w} failed ({type(e).__name__}: {e}) and did not answer again "
                                         f"within {WORKER_RESTART_TIMEOUT_S} s")
                        return
                    self.incarnations[w] += 1
                    self.reload(*self.published, only=[w])
                if not self._submit(w, request.tasks, request.env_index, request.attempt):
                    self.replays.append(request)
                continue
            yield request, trajectories

    def requeue_unavailable(self, request: Request, trajectories: list[Trajectory]) -> tuple[list[Trajectory], list[Trajectory]]:
        """Split a call's trajectories into (fine, unavailable): groups with an episode whose env server was
        unreachable are unavailable whole; their server is marked down and their tasks are played again elsewhere."""
        size = self.config.rollout.group_size
        groups = [trajectories[i:i + size] for i in range(0, len(trajectories), size)]  # one per task, in order
        failed = [k for k, g in enumerate(groups) if any(t.finish_reason == "env_unavailable" for t in g)]
        if not failed:
            return trajectories, []
        errors = [t.error for k in failed for t in groups[k] if t.finish_reason == "env_unavailable"]
        spec = self.config.envs[request.env_index]
        self.endpoints.mark_down(request.env_index, request.url, errors[0] or "unreachable")
        retry = [request.tasks[k] for k in failed]
        if request.attempt + 1 > MAX_ENV_RETRIES:
            self.say(f"{spec.id}: giving up {len(retry)} group(s) after {MAX_ENV_RETRIES} replays; last error: {errors[0]}")
        else:
            self.groups_replayed += len(retry)
            self.say(f"{spec.id}: env server {request.url} unreachable; playing {len(retry)} group(s) again elsewhere ({errors[0]})")
            self.replays.append(Request(request.worker, retry, request.env_index, None, request.attempt + 1))
        fine = [t for k, g in enumerate(groups) if k not in failed for t in g]
        return fine, [t for k in failed for t in groups[k]]

    # -- held-out evaluation ------------------------------------------------------------------------

    def play(self, w: int, tasks: list[dict[str, Any]], env: dict[str, Any], sampling: dict[str, Any]) -> Any:
        """Start one episode per task on worker `w` (one group of 1 each); `result` waits for it."""
        return self.actors[w].run_groups.remote([0] * len(tasks), 1, self.run_id, env=env, tasks=tasks, sampling=sampling)

    def result(self, ref: Any, w: int, retry: Callable[[], Any]) -> list[Trajectory]:
        """The trajectories of a `play` call; if worker `w` died meanwhile, wait for its restart, bring it up to
        date and `retry()` (up to WORKER_RESTARTS + 1 times). RuntimeError when it does not come back."""
        import ray

        for tries in range(WORKER_RESTARTS + 2):
            try:
                return [Trajectory.model_validate_json(j) for j in ray.get(ref)]
            except Exception as e:  # the worker died: Ray restarts it; bring it up to date, ask again
                if tries == WORKER_RESTARTS + 1:
                    raise RuntimeError(f"evaluation failed {tries + 1} times on rollout worker {w}: {e}") from e
                self.say(f"worker {w} failed during eval ({type(e).__name__}); retrying on the restarted worker")
                if not self.wait_for_worker(w):
                    raise RuntimeError(f"rollout worker {w} failed during eval and did not answer again within "
                                       f"{WORKER_RESTART_TIMEOUT_S} s: {e}") from e
                self.incarnations[w] += 1  # a restart like any other: its training calls lost with it need no second wait
                try:
                    self.reload(*self.published, only=[w], wait=True)
                except Exception as reload_error:  # it died again: the next try tells
                    log.warning("reloading worker %d after a failure failed: %s", w, reload_error)
                ref = retry()
        raise AssertionError("unreachable")

    # -- weights ------------------------------------------------------------------------------------

    def reload(self, version: int, weights: str | Path | ShippedWeights, *, wait: bool = False, only: list[int] | None = None) -> None:
        """Every worker (or `only` these) reloads version `version` in flight, from a published dir or weights shipped
        through Ray's object store; `wait` blocks until done. The reloads sent before are waited for first: a worker
        loads one version at a time, in order, while the trainer's next step runs beside the last one."""
        import ray

        self.wait_reloads()
        weights = str(weights) if isinstance(weights, Path) else weights
        self.published = (version, weights)
        refs = [self.actors[w].update_weights.remote(version, weights) for w in (only or range(len(self.actors)))]
        if wait:
            ray.get(refs)
        else:
            self.reloads += refs

    def wait_reloads(self) -> None:
        """Wait for the reloads sent so far. A failed one is logged: its worker died, and a restarted worker is brought up
        to date when the loop finds it (`collect`)."""
        import ray

        for ref in self.reloads:
            try:
                ray.get(ref)
            except Exception as e:  # that worker died; it gets the weights again when its lost work is re-submitted
                log.warning("a weight reload failed (%s: %s)", type(e).__name__, e)
        self.reloads = []

    # -- lifecycle ----------------------------------------------------------------------------------

    def start_engines(self, published: tuple[int, Any] | None = None) -> None:
        """Wait until every worker's engine has started, then, with `published` (a resumed run's newest version), have
        them load it. An engine that fails stops the job in one line (the cause, the key to change); every actor is
        killed without restart first, as a restarted one would fail the same way."""
        import ray

        from rollout_workers.actor import EngineStartError, root_cause

        starts, self.engine_starts = self.engine_starts, []
        for w, ref in enumerate(starts):
            try:
                ray.get(ref)
            except Exception as e:
                for actor in self.actors:
                    ray.kill(actor, no_restart=True)
                cause = getattr(e, "cause", None)  # a RayTaskError carries the exception the actor raised
                if isinstance(cause, EngineStartError):
                    reason = str(cause)
                else:  # the actor died (or never started): Ray's text is all there is
                    reason = root_cause(str(e)) or (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RuntimeError(f"rollout worker {w} could not start its vLLM engine: {reason.rstrip('.')}; "
                                   f"{engine_fix(reason, self.config, self.model_dir)}") from None
        if published is not None:
            self.published = tuple(published)
            if published[0] > 0:  # resumed: the workers started from the base model
                self.reload(*published, wait=True)

    @property
    def run_id(self) -> str:
        return Path(self.config.run_dir).name

    def wait_for_worker(self, w: int, interruptible: bool = False) -> bool:
        """Block until worker `w` answers again (Ray restarts a dead one; calls made while it restarts fail at
        once), or False after WORKER_RESTART_TIMEOUT_S (Ray gave up on it, or its node is gone) or, when
        `interruptible`, once the job is stopping."""
        import ray

        deadline = time.monotonic() + WORKER_RESTART_TIMEOUT_S
        while time.monotonic() < deadline and not (interruptible and self.stopping()):
            try:
                ray.get(self.actors[w].pid.remote(), timeout=30)
                return True
            except Exception:  # restarting (ActorUnavailableError), or the call timed out: ask again
                time.sleep(1.0)
        return False

    def _requests_of(self, w: int) -> int:
        return sum(1 for q in self.pending.values() if q.worker == w)

    def _submit(self, w: int, tasks: list[tuple[int, dict]], env_index: int, attempt: int = 0) -> bool:
        """Ask worker `w` to play one group per task; False (nothing sent) while every env server of the env is down."""
        payload = self.endpoints.payload(env_index)
        if payload is None:
            return False
        env, url = payload
        ref = self.actors[w].run_groups.remote([s for s, _ in tasks], self.config.rollout.group_size, self.run_id,
                                               env=env, tasks=[t for _, t in tasks])
        self.pending[ref] = Request(w, tasks, env_index, url, attempt, self.incarnations[w])
        return True

    def close(self) -> None:
        """Shut the workers down (their env containers; a dead worker has nothing to shut down), then end their processes,
        which a shut-down worker expects (on a cluster the job joined, too). Workers whose engine start was never waited
        for (the trainer failed to start meanwhile) are killed at once: a shutdown would wait for the start to finish."""
        import ray

        if not self.engine_starts:
            for actor in self.actors:
                try:
                    ray.get(actor.shutdown.remote(), timeout=60)
                except Exception:
                    pass
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # gone already (its node too)
                pass
        self.actors, self.engine_starts = [], []
