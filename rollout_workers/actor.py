"""The rollout worker as a Ray actor: one vLLM engine, many concurrent episodes, in-flight reloads.

`rollout_worker_actor(num_cpus=1)` is the actor class; `Worker.remote(WorkerConfig(...).model_dump())`
starts one, `worker.run_groups.remote(seeds=[0, 1], group_size=4)` plays a group per seed and
returns Trajectories as JSON strings, `worker.update_weights.remote(version, path)` reloads in
flight (`tests/rollout_workers/test_actor.py` runs these on a real Ray actor).

The engine starts on the first call, or at once with `worker.start_engine.remote()` (a job does
that for every worker, `cwm_rl/loop/workers.py`): an engine that cannot start raises
`EngineStartError` with vLLM's own reason, which `root_cause` finds in the error or, when vLLM
only says "see root cause above", in what its engine processes wrote to the worker's log.

Episodes are asyncio tasks in the actor's event loop; env calls never block it (local envs step
in threads, remote envs over async HTTP). Trajectories travel as JSON strings, so the caller
needs only the core types to read them. Ray is imported only by `rollout_worker_actor`.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from cwm_rl.types import ShippedWeights
from rollout_workers.agent_loop import run_group
from rollout_workers.config import WorkerConfig
from rollout_workers.engine import RolloutEngine
from rollout_workers.weights import LocalWeights

# "SomeError: message", after the prefixes vLLM's logger and its engine processes put before a line.
_ERROR_LINE = re.compile(r"^(?:\([^)]*\)\s*)?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \S+ \[[^\]]*\]\s*)?"
                         r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit): .+)$")


class EngineStartError(RuntimeError):
    """The worker's vLLM engine did not start; the message is the root cause, one line."""


def root_cause(*texts: str) -> str | None:
    """The last "SomeError: message" line in the texts, the first text first, skipping vLLM's wrappers
    that only point at it ("See root cause above", "See stack trace (above) for the root cause");
    None if there is none."""
    for text in texts:
        lines = [m.group(1).strip() for line in text.splitlines() if (m := _ERROR_LINE.match(line.strip()))]
        lines = [line for line in lines if "root cause" not in line.lower()]
        if lines:
            return lines[-1]
    return None


def _log_files() -> list[Path]:
    """The files this process's stderr and stdout go to (Ray points both at the worker's log files); where
    vLLM's engine processes, which inherit them, write why they failed. [] when they are not files."""
    files = []
    for fd in (2, 1):
        try:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
        if path.is_file():
            files.append(path)
    return files


# Runs beside a worker (its own session, so nothing that kills the worker kills it) and, once the worker is gone,
# kills the engine processes the worker had: a worker killed with -9, or whose raylet died, cannot stop its vLLM
# engine, and vLLM's engine processes do not notice their parent is gone. Processes are matched by pid and start time.
_REAPER = """
import sys, time, psutil
def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
worker, children = int(sys.argv[1]), [(int(p), float(t)) for p, t in (a.split(":") for a in sys.argv[2:])]
while not gone(worker):
    time.sleep(1)
for pid, started in children:
    try:
        process = psutil.Process(pid)
        if process.create_time() == started:
            process.kill()
    except psutil.Error:
        pass
"""


def reap_when_gone(worker_pid: int) -> None:
    """Start the watchdog that kills the worker's child processes (its vLLM engine) once the worker is gone."""
    import subprocess

    import psutil

    children = psutil.Process(worker_pid).children(recursive=True)
    if children:
        subprocess.Popen([sys.executable, "-c", _REAPER, str(worker_pid), *(f"{c.pid}:{c.create_time()!r}" for c in children)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class RolloutWorker:
    """Plays groups of episodes with one engine. Plain class: `rollout_worker_actor` makes it a Ray actor."""

    def __init__(self, config: dict[str, Any]):
        self.config = WorkerConfig.model_validate(config)
        self.local_weights: LocalWeights | None = None  # versions shipped through Ray's object store, on this node
        for path in self.config.sys_path:
            if path not in sys.path:
                sys.path.insert(0, path)
        from envs import load_env_modules

        load_env_modules(self.config.env_modules)
        self.engine: RolloutEngine | None = None
        self._starting = asyncio.Lock()
        self._preparers: dict[str, Any] = {}  # one env per (id, kwargs) that prepares a request's tasks at once
        self._preparing = threading.Lock()
        self._prepare_failed: set[str] = set()

    async def _engine(self, weights: ShippedWeights | None = None) -> RolloutEngine:
        """The engine, started on first use: from the config's model, or from `weights` shipped through Ray's object
        store (written into this node's directory first) when this node cannot read the driver's files."""
        async with self._starting:  # created inside the actor's event loop, once
            if self.engine is None:
                engine_config, version = self.config.engine, 0
                if weights is not None:
                    path = await asyncio.to_thread(self._local_weights().materialise, weights)
                    engine_config, version = engine_config.model_copy(update={"model": str(path)}), weights.version
                # Blocking envs step in the loop's default thread pool (asyncio.to_thread), which holds
                # only cpu_count + 4 threads: with 64 episodes whose steps wait on sandboxes, most would queue.
                from concurrent.futures import ThreadPoolExecutor

                workers = max(32, 2 * self.config.engine.max_num_seqs)
                asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix="env-step"))
                self.engine = RolloutEngine(engine_config, version=version)
                reap_when_gone(os.getpid())
        return self.engine

    def _local_weights(self) -> LocalWeights:
        if self.local_weights is None:
            self.local_weights = LocalWeights()
        return self.local_weights

    async def start_engine(self, weights: ShippedWeights | None = None) -> int:
        """Start the engine now, not on the first call, so a job learns at once (and once) that it cannot
        start; the worker's pid on success, else EngineStartError with vLLM's reason (often only in the log).
        `weights`: start from these (the base model through Ray's object store) instead of the config's model."""
        logs = {path: path.stat().st_size for path in _log_files()}
        try:
            await self._engine(weights)
        except Exception as e:
            written = []
            for path, start in logs.items():  # what the engine processes wrote while starting, the last 64 KiB
                with path.open("rb") as f:
                    f.seek(max(start, path.stat().st_size - 2**16))
                    written.append(f.read().decode(errors="replace"))
            own = f"{type(e).__name__}: {e}"
            cause = root_cause(*written, own) if "root cause" in own.lower() else root_cause(own)
            raise EngineStartError(cause or own.splitlines()[0]) from e
        return os.getpid()

    def _env_factory(self, env: dict[str, Any] | None):
        """(env id, its kwargs, a function making fresh envs): the config's env, or `env` ({id, kwargs, url, token})
        for multi-task jobs."""
        c = self.config
        env_id, kwargs, url, token = c.env_id, c.env_kwargs, c.env_url, c.env_token
        if env is not None:
            env_id, kwargs, url, token = env["id"], env.get("kwargs") or {}, env.get("url"), env.get("token")
        if url:
            from envs.server.client import RemoteEnv

            return env_id, kwargs, lambda: RemoteEnv(url, env_id, token=token, env_kwargs=kwargs)
        from envs import make_env

        return env_id, kwargs, lambda: make_env(env_id, **kwargs)

    async def run_groups(self, seeds: list[int], group_size: int = 1, run_id: str = "", *, env: dict[str, Any] | None = None,
                         tasks: list[dict[str, Any]] | None = None, sampling: dict[str, Any] | None = None) -> list[str]:
        """One group of `group_size` episodes per seed (or per task in `tasks`, reset with that exact
        task), all concurrently; Trajectories as JSON. `sampling` overrides fields of the config's
        sampling (e.g. {"temperature": 0} for greedy evaluation); `env` may carry its own `limits`
        and `max_tokens` (a job mixing envs of different turn counts and token budgets)."""
        from cwm_rl.types import Task
        from rollout_workers.config import EpisodeLimits

        engine = await self._engine()
        env_id, env_kwargs, make_env = self._env_factory(env)
        env = env or {}
        turn_sampling = self.config.sampling.model_copy(update={**({"max_tokens": env["max_tokens"]} if env.get("max_tokens") else {}),
                                                                **(sampling or {})})
        limits = EpisodeLimits.model_validate(env["limits"]) if env.get("limits") else self.config.limits
        jobs = [(seed, Task.model_validate(tasks[i]) if tasks else None) for i, seed in enumerate(seeds)]
        remote = env.get("url") if env else self.config.env_url
        if tasks and not remote:
            await asyncio.to_thread(self._prepare_tasks, env_id, env_kwargs, make_env, [task for _, task in jobs])
        groups = await asyncio.gather(*(
            run_group(engine, make_env, env_id=env_id, group_size=group_size, sampling=turn_sampling,
                      limits=limits, seed=seed, task=task, run_id=run_id, env_kwargs=env_kwargs)
            for seed, task in jobs
        ))
        return [t.model_dump_json() for group in groups for t in group]

    def _prepare_tasks(self, env_id: str, kwargs: dict[str, Any], make_env: Any, tasks: list[Any]) -> None:
        """Let an in-process env whose per-task setup is costly (its class overrides TextEnv.prepare_tasks) do it for a
        request's tasks at once, before its episodes reset (Trace-v0: one sandbox run traces every call, instead of
        one per episode). A failure is logged once and left to the resets, which report it per episode."""
        import json
        import logging

        from envs.base import TextEnv
        from envs.registry import text_env_class

        key = json.dumps([env_id, kwargs], sort_keys=True, default=str)
        try:
            with self._preparing:
                if key not in self._preparers:
                    cls = text_env_class(env_id)
                    overrides = cls is not None and cls.prepare_tasks is not TextEnv.prepare_tasks
                    self._preparers[key] = make_env() if overrides else None
            if self._preparers[key] is not None:
                self._preparers[key].prepare_tasks(tasks)
        except Exception as e:  # noqa: BLE001 - the episodes' own resets meet (and record) the same problem
            if key not in self._prepare_failed:
                self._prepare_failed.add(key)
                logging.getLogger(__name__).warning("%s: preparing %d task(s) failed (%s: %s); each episode's reset "
                                                    "does its own setup", env_id, len(tasks), type(e).__name__, e)

    async def update_weights(self, version: int, weights: str | ShippedWeights) -> int:
        """Reload version `version` in flight: a published dir (files backend), or weights shipped through Ray's object
        store, written into this node's directory first (in a thread: episodes keep playing meanwhile)."""
        if isinstance(weights, ShippedWeights):
            if self.engine is None:  # a restarted worker, on a node without the driver's files: start from these
                await self._engine(weights)
                return version
            weights = str(await asyncio.to_thread(self._local_weights().materialise, weights))
        await (await self._engine()).update_weights(version, weights)
        return version

    async def version(self) -> int:
        return (await self._engine()).version

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        """Stop the engine and remove the containers this worker's envs made (Ray kills the process after, atexit never runs)."""
        if self.engine is not None:
            self.engine.shutdown(process_exits=True)
            self.engine = None
        for env in self._preparers.values():
            if env is not None:
                env.close()
        self._preparers.clear()
        from envs.sandbox import close_shared_sandboxes
        from envs.swe.containers import close_shared_pools

        close_shared_pools()
        close_shared_sandboxes()
        if self.local_weights is not None:
            self.local_weights.close()


def rollout_worker_actor(num_cpus: float = 1, num_gpus: float = 0, resources: dict[str, float] | None = None):
    """The Ray actor class of `RolloutWorker` (imports Ray; call after `ray.init`); `resources` places it."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(RolloutWorker)
