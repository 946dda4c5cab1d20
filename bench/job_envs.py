"""Benchmark a whole job per env: episodes/s and trainer steps/min of a short `run_job` against the same
episodes played by the bare env loop with a frozen model, and the time to a SWE job's first episode.

For each env (Math, Code, Trace, SWE), in one process, on one fresh random `tiny` model:
1. the job: `run_job` on configs/quickstart.yaml with that env alone (local Ray, one rollout worker,
   the trainer in this process, zero-advantage groups kept so the random model still makes steps,
   EOS ignored so every turn generates exactly its `max_tokens`, a 2-task eval at start and end).
   Its rate = training episodes stored / the time from the end of the initial eval (when the workers
   get their first training calls) to the last training episode stored (store rows' `stored_at`):
   evals, setup and the final eval + checkpoint are left out. Also given: the same episodes over
   the summary's `initial_eval_seconds` + `rl_seconds` (evals and checkpoint included) and trainer steps/min over the window;
2. the bare loop: a `RolloutEngine` with the job's worker's engine config (`worker_config`), and
   `run_group` calls shaped like the worker's (`groups_per_request` groups per call,
   `requests_in_flight` calls in flight, the same sampling, limits and env kwargs), on the same tasks
   in the same order (`job_tasks(...).draw`, as the job draws them), no trainer and no reloads, until
   as many episodes as the job stored came back (the calls still in flight then finish untimed, as
   the job's are cut off by its stop). Warmed up first, as the job's engine is by its initial eval.
   Its time-to-first-episode counterpart: `RolloutEngine(...)` construction is timed, and for SWE one
   cold container start (`ContainerPool.acquire_cold` until its bash session answers, median of 3), and
   the same engine started in a fresh process (vLLM's import included, as the worker actor pays it);
3. where the gap goes, right after the bare loop that follows the job, on the same engine and episodes:
   (a) with the job's reloads (an in-flight `update_weights` of the same weights each time a step's worth
   of episodes came back), (b) with those reloads and the job's trainer steps replayed alongside in a
   process of their own (its trained episodes, its step size, busy the same share of the time as the
   job's trainer was). `reloads_factor` = (a) / bare, `trainer_load_factor` = (b) / (a), `rest_factor`
   = job / (b): what the job's own machinery costs beyond those (driver loop, Ray, store).
Ratio = job episodes/s / bare episodes/s. Per env: the bare loop (the episodes the job's steps need), the
job, the bare loop again (the episodes the job stored); the bare rate is the mean of its two runs, so a
machine that drifts (others use it too) hits both sides alike.

Time to the first SWE episode: from the `run_job` call to the first training episode's `created_at`
(the time its episode ended in the worker); the job first sets up (trainer, store, Ray, the worker
and its vLLM engine) and plays its initial eval (the held-out task: an episode with its grading run).

    .venv/bin/python bench/job_envs.py [--envs math,code,trace,swe] [--steps 8] [--swe-steps 6] [--quick]

Goals (issue 15): job >= 0.8x the bare loop for Math/Code/Trace, >= 0.6x for SWE; first SWE episode
<= 2x (one cold container start + one engine start). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# `python bench/job_envs.py` puts bench/ first on sys.path, where bench/trainer.py would shadow the `trainer` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

SWE_KWARGS = {"max_turns": 2, "output_chars": 300, "submit_at_end": True, "command_timeout_s": 10}
# Per env: its `envs[0]` entry (YAML), the rollout shape, buffer, step size, engine length, held-out tasks, and turns per
# episode (for the episode count a job's steps need). Single-turn envs take the quickstart's rollout shape (groups of 8,
# 4 groups per call, 8 calls in flight), SWE configs/swe.yaml's (groups of 4, 1 per call, 2 calls in flight).
ENVS: dict[str, dict[str, Any]] = {
    "math": {"spec": "{id: cwm_rl/Math-v0, kwargs: {difficulty: 1}, max_tokens: 32}",
             "rollout": {"group_size": 8, "groups_per_request": 4, "requests_in_flight": 8}, "buffer_groups": 64,
             "step_tokens": 4096, "max_model_len": 1024, "eval_tasks": 2, "turns": 1},
    "code": {"spec": "{id: cwm_rl/Code-v0, max_tokens: 64}",
             "rollout": {"group_size": 8, "groups_per_request": 4, "requests_in_flight": 8}, "buffer_groups": 64,
             "step_tokens": 4096, "max_model_len": 1024, "eval_tasks": 2, "turns": 1},
    "trace": {"spec": "{id: cwm_rl/Trace-v0, max_tokens: 32}",
              "rollout": {"group_size": 8, "groups_per_request": 4, "requests_in_flight": 8}, "buffer_groups": 64,
              "step_tokens": 4096, "max_model_len": 1024, "eval_tasks": 2, "turns": 1},
    "swe": {"spec": "{id: cwm_rl/SWE-v0, kwargs: " + json.dumps(SWE_KWARGS) +
                    ", limits: {max_turns: 3, max_total_tokens: 2048}, max_tokens: 12, servers: 0}",
            "rollout": {"group_size": 4, "groups_per_request": 1, "requests_in_flight": 2}, "buffer_groups": 4,
            "step_tokens": 96, "max_model_len": 2048, "eval_tasks": 1, "turns": 2},
}
GOALS = {"math": 0.8, "code": 0.8, "trace": 0.8, "swe": 0.6}
GOAL_SWE_FIRST_EPISODE_RATIO = 2.0


def say(text: str) -> None:
    print(f"[job_envs] {text}", file=sys.stderr, flush=True)


def job_config(name: str, run_dir: Path, model: Path, steps: int):
    from cwm_rl.config import load_config

    e = ENVS[name]
    r = e["rollout"]
    overrides = [
        f"run_dir={run_dir}", f"model.path={model}", f"steps={steps}", "max_minutes=10", "checkpoint_every=0",
        f"envs=[{e['spec']}]", f"buffer_groups={e['buffer_groups']}",
        f"rollout.group_size={r['group_size']}", f"rollout.groups_per_request={r['groups_per_request']}",
        f"rollout.requests_in_flight={r['requests_in_flight']}", "rollout.num_workers=1",
        f"rollout.engine.max_model_len={e['max_model_len']}", "rollout.limits.max_total_tokens=null",
        "rollout.sampling.ignore_eos=true",  # every turn generates exactly max_tokens: the same work whatever the weights
        f"trainer.batch.step_tokens={e['step_tokens']}", "trainer.filters.drop_zero_advantage_groups=false",
        "trainer.filters.max_staleness=100", "stop_without_signal_groups=0", "warn_without_signal_groups=0",
        "eval.every_steps=0", f"eval.num_tasks={e['eval_tasks']}", "logging.tensorboard=false", "logging.progress=false",
    ]
    return load_config(QUICKSTART, overrides=overrides)


# -- the job ------------------------------------------------------------------------------------------------

class PhaseTimer:
    """Times stages of the job's setup by wrapping the functions that run them (in this process only, restored
    after): Ray's start, the trainer's, and the rollout workers' (actor process, vLLM import, engine start: from
    making the actors to the end of `start_engines`, which the trainer's start overlaps); `worker_engine_wait_s` is
    what was left of it once the trainer had started."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started: dict[str, float] = {}  # phase -> when it last started
        self.saved: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, name: str, since: tuple[str, str] | None = None) -> None:
        """Time `owner.attr` as phase `name`; `since` = (an earlier phase, a key): also the time from that phase's start
        to this one's end, under the key."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            started = self.started[name] = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                self.seconds[name] = self.seconds.get(name, 0.0) + ended - started
                if since and since[0] in self.started:
                    self.seconds[since[1]] = ended - self.started[since[0]]

        self.saved.append((owner, attr, original))
        setattr(owner, attr, timed)

    def __enter__(self) -> PhaseTimer:
        import cwm_rl.loop.run as run
        import cwm_rl.loop.workers as workers
        import trainer.group

        self.wrap(run, "start_ray", "ray_start_s")
        self.wrap(workers.RolloutWorkers, "__init__", "workers_init_s")
        self.wrap(workers.RolloutWorkers, "start_engines", "worker_engine_wait_s", since=("workers_init_s", "worker_engine_start_s"))
        self.wrap(trainer.group.TrainerGroup, "__init__", "trainer_init_s")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self.saved):
            setattr(owner, attr, original)


def measure_job(config) -> dict[str, Any]:
    """Run the job; its rates from the store's timestamps and metrics.jsonl."""
    from cwm_rl.loop.driver import run_job
    from cwm_rl.store import RolloutStore

    run_dir = Path(config.run_dir)
    with PhaseTimer() as phases:
        called = time.time()
        summary = run_job(config)
        returned = time.time()
    with RolloutStore(run_dir, create=False) as store:
        rows = store.query(limit=None)
        stored_training = store.count() - store.count(status="eval")  # training episodes: every stored one but the evals'
    training = [r for r in rows if r.status != "eval"]
    evals = [r for r in rows if r.status == "eval"]
    assert len(training) == stored_training, (len(training), stored_training)
    if not training:
        raise RuntimeError(f"the {config.envs[0].id} job stored no training episode: {summary}")
    first_training_stored = min(r.stored_at for r in training)
    initial_eval = [r for r in evals if r.stored_at <= first_training_stored]
    window_start = max(r.stored_at for r in initial_eval)  # the workers get their first training calls right after
    window_end = max(r.stored_at for r in training)
    steps_logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [m for m in steps_logged if "loss" in m]
    last_step_at = called + steps_logged[-1]["wall_s"]  # wall_s counts from run_job's start
    in_window = [m for m in steps_logged if called + m["wall_s"] <= window_end]
    setup_s = summary["wall_seconds"] - summary["rl_seconds"] - summary["initial_eval_seconds"]
    episodes = len(training)
    window = window_end - window_start
    return {
        "episodes": episodes,
        "groups": len({r.group_id for r in training}),
        "generated_tokens": sum(r.num_generated_tokens for r in training),
        "steps": summary["steps"],
        "trajectories_trained": summary["trajectories_trained"],
        "episodes_per_s": episodes / window,
        "episodes_per_s_incl_evals": episodes / (summary["rl_seconds"] + summary["initial_eval_seconds"]),
        "steps_per_min": 60 * summary["steps"] / (last_step_at - window_start),
        "window_s": window,
        "setup_s": setup_s,
        "initial_eval_s": window_start - (called + setup_s),
        "rl_s": summary["rl_seconds"],
        "wall_s": returned - called,
        "first_episode_s": min(r.created_at for r in training) - called,  # the episode's end, in the worker
        "first_eval_episode_s": min(r.created_at for r in evals) - called,
        "first_stored_s": first_training_stored - called,
        "finish_reasons": sorted({r.finish_reason for r in training}),
        # The trainer's share of the window (its steps and publishes, in this process), and whether the workers were
        # held back: groups in flight at each step (at most groups_per_request x requests_in_flight), the buffer's size.
        "trainer_busy_s": sum(m.get("step_time_s", 0.0) + m.get("publish_s", 0.0) for m in in_window),
        "mean_in_flight_groups": statistics.mean(m["in_flight_groups"] for m in steps_logged),
        "max_buffer_groups": max(m["buffer_groups"] for m in steps_logged),
        **phases.seconds,
    }


def predicted_episodes(name: str, config) -> int:
    """Training episodes a job of `config.steps` steps needs at least (every turn generates max_tokens), in whole calls."""
    spec, r = config.envs[0], config.rollout
    per_episode = (spec.max_tokens or r.sampling.max_tokens) * ENVS[name]["turns"]
    groups_per_step = -(-config.trainer.batch.step_tokens // (per_episode * r.group_size))
    calls = -(-config.steps * groups_per_step // r.groups_per_request)
    return calls * r.groups_per_request * r.group_size


# -- the bare loop ------------------------------------------------------------------------------------------

TRAINER_LOAD = """
import json, sys, time
import torch
from cwm_rl.store import RolloutStore
from trainer.config import TrainerConfig
from trainer.train import Trainer

run_dir, model_dir, trainer_config, per_step, share, threads = sys.argv[1:7]
per_step, share = int(per_step), float(share)
torch.set_num_threads(int(threads))
with RolloutStore(run_dir, create=False) as store:
    episodes = [store.get(r.trajectory_id) for r in store.query(status="trained", limit=None)]
trainer = Trainer(TrainerConfig.model_validate_json(trainer_config), model_dir)
batches = [episodes[i:i + per_step] for i in range(0, len(episodes) - per_step + 1, per_step)] or [episodes]
trainer.step(batches[0])
print("ready", flush=True)
for k in range(10**6):  # until killed: the job's steps, with its share of busy time
    started = time.perf_counter()
    trainer.step(batches[k % len(batches)])
    time.sleep((time.perf_counter() - started) * (1 - share) / share)
"""


class TrainerLoad:
    """The job's trainer steps replayed in a process of their own while the bare loop plays: the same model and
    trainer config, the job's trained episodes in batches of its step size, busy the same share of the time as
    the job's trainer was (steps back to back, each followed by a pause). It stands for the CPU the trainer takes
    from the rollouts on a shared machine (publishing and reloads are left out)."""

    def __init__(self, config, job: dict[str, Any]):
        self.args = [sys.executable, "-c", TRAINER_LOAD, str(config.run_dir), str(config.model.path),
                     config.trainer.model_dump_json(), str(max(config.rollout.group_size, round(job["episodes_per_step"]))),
                     str(min(max(job["trainer_busy_share"], 0.05), 1.0)), str(config.trainer_threads or os.cpu_count())]
        self.proc = None

    async def __aenter__(self) -> TrainerLoad:
        import subprocess

        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the trainer load did not start:\n{self.proc.stderr.read()[-3000:]}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


async def bare_loop(config, episodes: int, job: dict[str, Any] | None = None, warmup_calls: int = 1) -> dict[str, Any]:
    """The job's worker's engine and call shape, no trainer, no reloads, until `episodes` came back; with `job`
    (the job's figures), then the same episodes again with the job's trainer steps replayed alongside (TrainerLoad)."""
    from concurrent.futures import ThreadPoolExecutor

    from cwm_rl.loop.tasks import job_tasks
    from cwm_rl.loop.workers import worker_config
    from cwm_rl.types import Task
    from envs import make_env
    from rollout_workers.agent_loop import run_group
    from rollout_workers.engine import RolloutEngine

    spec, r = config.envs[0], config.rollout
    wc = worker_config(r, spec, config.model.path, config.seed, config.env_modules, with_server=False)
    # What RolloutWorker.run_groups plays with: the env's max_tokens over the sampling, the env's limits.
    sampling = wc.sampling.model_copy(update={"max_tokens": spec.max_tokens} if spec.max_tokens else {})
    limits = config.env_limits(0)
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max(32, 2 * wc.engine.max_num_seqs), thread_name_prefix="env-step"))  # as the worker does

    started = time.perf_counter()
    engine = RolloutEngine(wc.engine)
    engine_start_s = time.perf_counter() - started

    def make():
        return make_env(spec.id, **spec.kwargs)

    async def call(drawn) -> list:
        groups = await asyncio.gather(*(
            run_group(engine, make, env_id=spec.id, group_size=r.group_size, sampling=sampling, limits=limits,
                      seed=seed, task=Task.model_validate(task), run_id="bench")
            for seed, task in drawn))
        return [t for g in groups for t in g]

    reloads = {"version": 0}

    async def play(reload_every: int | None = None) -> tuple[list, float]:
        """The job's tasks in the job's order, `requests_in_flight` calls in flight, until `episodes` came back;
        with `reload_every`, an in-flight reload of the (same) weights each time that many more came back, as the
        job's workers reload after each step."""
        tasks = job_tasks(config.envs, config.seed, config.eval.num_tasks, config.model.sft.eval_share, {},
                          mix_seed=config.seed * 7919)
        try:
            played: list = []
            pending: set = set()
            reloading: list = []
            started = time.perf_counter()
            while len(played) < episodes:
                while len(pending) < r.requests_in_flight:
                    pending.add(asyncio.ensure_future(call(tasks.draw(r.groups_per_request, env_index=0))))
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    before = len(played)
                    played += future.result()
                    if reload_every and len(played) // reload_every > before // reload_every:
                        reloads["version"] += 1
                        reloading.append(asyncio.ensure_future(engine.update_weights(reloads["version"], str(config.model.path))))
            elapsed = time.perf_counter() - started
            if pending or reloading:  # as the job's calls in flight at its stop: played, not counted
                await asyncio.gather(*pending, *reloading)
        finally:
            tasks.close()
        return played, elapsed

    try:
        # Warm-up on the held-out tasks (the job's engine is warmed by its initial eval; its envs' pools too).
        probe = job_tasks(config.envs, config.seed, config.eval.num_tasks, config.model.sft.eval_share, {}, mix_seed=0)
        held = [(0, t) for t in probe.held_out[spec.id]]
        probe.close()
        await asyncio.gather(*(call(held) for _ in range(warmup_calls)))
        played, elapsed = await play()
        result = {"episodes": len(played), "episodes_per_s": len(played) / elapsed, "window_s": elapsed,
                  "generated_tokens": sum(t.num_generated_tokens for t in played), "engine_start_s": engine_start_s,
                  "finish_reasons": sorted({t.finish_reason for t in played})}
        if job is not None:
            every = max(1, round(job["episodes_per_step"]))
            reloaded, reloaded_s = await play(reload_every=every)
            async with TrainerLoad(config, job):
                loaded, loaded_s = await play(reload_every=every)
            result.update(reloads_episodes_per_s=len(reloaded) / reloaded_s, reloads_window_s=reloaded_s,
                          loaded_episodes=len(loaded), loaded_episodes_per_s=len(loaded) / loaded_s, loaded_window_s=loaded_s)
    finally:
        engine.shutdown()
    return result


def run_bare(config, episodes: int, job: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bare loop in this process, with the job's container labels and pool sizing (SWE sizes its pool by
    the episodes in flight, which `cwm-rl train` puts in the environment)."""
    from cwm_rl.loop.run import episodes_in_flight
    from envs.sandbox import close_shared_sandboxes
    from envs.swe.containers import close_shared_pools

    saved = {k: os.environ.get(k) for k in ("CWM_RL_RUN_ID", "CWM_RL_EPISODES_IN_FLIGHT")}
    os.environ["CWM_RL_RUN_ID"] = "bench-job-envs"
    os.environ["CWM_RL_EPISODES_IN_FLIGHT"] = str(episodes_in_flight(config))
    try:
        return asyncio.run(bare_loop(config, episodes, job))
    finally:
        close_shared_pools()
        close_shared_sandboxes()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- SWE preparation and the cold container start ------------------------------------------------------------

def prepare_swe() -> None:
    """Build (or find) the Docker base and every shipped task's image before anything is timed."""
    from envs.swe.containers import ContainerPool
    from envs.swe.images import task_image
    from envs.swe.tasks import SWEInstance, load_tasks

    pool = ContainerPool(pool_size=0, max_containers=2)
    try:
        for task in load_tasks():
            task_image(SWEInstance.from_task(task), pool.client, log=lambda line: say(f"image: {line}"))
    finally:
        pool.close()


def cold_container_s(runs: int = 3) -> float:
    """One cold SWE container start until its bash session answers (what an episode's reset waits for with an
    empty pool), median of `runs`, after one untimed start."""
    from envs.swe.containers import ContainerPool
    from envs.swe.images import task_image
    from envs.swe.tasks import SWEInstance, load_tasks

    instance = SWEInstance.from_task(next(t for t in load_tasks() if t.id == "cwm-rl__minicalc-1"))
    pool = ContainerPool(pool_size=0, max_containers=2, run_id="bench-job-envs")
    times = []
    try:
        image = task_image(instance, pool.client)
        for i in range(runs + 1):
            started = time.perf_counter()
            container = pool.acquire_cold(image, instance.workdir)
            container.shell().close()
            if i:
                times.append(time.perf_counter() - started)
            container.release()
    finally:
        pool.close()
    return statistics.median(times)


FRESH_ENGINE = """
import json, sys, time
started = time.perf_counter()
from rollout_workers.config import EngineConfig
from rollout_workers.engine import RolloutEngine
config = EngineConfig.model_validate_json(sys.argv[1])
constructed = time.perf_counter()
engine = RolloutEngine(config)
done = time.perf_counter()
engine.shutdown()
print(json.dumps({"total_s": done - started, "construct_s": done - constructed}))
"""


def fresh_engine_start(config) -> dict[str, float]:
    """The job's engine started in a fresh Python process, as the worker actor starts it: imports (vLLM, torch)
    plus `RolloutEngine(...)`; the interpreter's own start is not counted."""
    import subprocess

    from cwm_rl.loop.workers import worker_config

    engine = worker_config(config.rollout, config.envs[0], config.model.path, config.seed, config.env_modules).engine
    done = subprocess.run([sys.executable, "-c", FRESH_ENGINE, engine.model_dump_json()], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the fresh-process engine start failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- main ---------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="math,code,trace,swe", help="Comma-separated: math, code, trace, swe.")
    parser.add_argument("--steps", type=int, default=8, help="Trainer steps of the Math, Code and Trace jobs.")
    parser.add_argument("--swe-steps", type=int, default=6, help="Trainer steps of the SWE job (one group of 4 episodes each).")
    parser.add_argument("--quick", action="store_true", help="3 steps per job (SWE 2): a smoke test, noisy figures.")
    args = parser.parse_args()
    names = [n.strip() for n in args.envs.split(",") if n.strip()]
    unknown = set(names) - set(ENVS)
    if unknown:
        parser.error(f"unknown envs {sorted(unknown)}; choose from {', '.join(ENVS)}")
    steps, swe_steps = (3, 2) if args.quick else (args.steps, args.swe_steps)

    from cwm_rl.models import init_model

    out: dict[str, Any] = {"bench": "job_envs", "steps": steps, "swe_steps": swe_steps}
    if "code" in names or "trace" in names:
        from envs.sandbox.rootfs import sandbox_root

        sandbox_root(build=True, log=lambda line: say(f"sandbox root: {line}"))
    if "swe" in names:
        prepare_swe()
    with tempfile.TemporaryDirectory(prefix="bench-job-envs-") as tmp:
        model = init_model(Path(tmp) / "tiny", preset="tiny", seed=0)
        for name in names:
            env_steps = swe_steps if name == "swe" else steps
            config = job_config(name, Path(tmp) / f"run-{name}", model, env_steps)
            if name == "swe":
                out["swe_cold_container_s"] = round(cold_container_s(), 3)
                fresh = fresh_engine_start(config)
                say(f"swe: cold container {out['swe_cold_container_s']:.2f} s, engine in a fresh process {fresh['total_s']:.1f} s "
                    f"({fresh['construct_s']:.1f} s of it RolloutEngine(...))")
            # Bare, job, bare: the bare side before the job plays the episode count the job's steps need, after it
            # the count the job stored; its rate is the mean of the two (a drifting machine hits both sides alike).
            before = run_bare(config, predicted_episodes(name, config))
            say(f"{name} bare (before): {before['episodes']} episodes, {before['episodes_per_s']:.1f}/s over "
                f"{before['window_s']:.1f} s, engine start {before['engine_start_s']:.1f} s")
            job = measure_job(config)
            say(f"{name} job: {job['episodes']} episodes, {job['episodes_per_s']:.1f}/s over {job['window_s']:.1f} s, "
                f"{job['steps_per_min']:.1f} steps/min, setup {job['setup_s']:.1f} s, initial eval {job['initial_eval_s']:.1f} s, "
                f"trainer busy {job['trainer_busy_s']:.1f} s")
            job["episodes_per_step"] = job["trajectories_trained"] / max(job["steps"], 1)
            job["trainer_busy_share"] = job["trainer_busy_s"] / job["window_s"]
            after = run_bare(config, job["episodes"], job)
            say(f"{name} bare (after): {after['episodes']} episodes, {after['episodes_per_s']:.1f}/s over "
                f"{after['window_s']:.1f} s, engine start {after['engine_start_s']:.1f} s; with reloads "
                f"{after['reloads_episodes_per_s']:.1f}/s, with reloads and the trainer's load "
                f"{after['loaded_episodes_per_s']:.1f}/s over {after['loaded_window_s']:.1f} s")
            bare = {"episodes_per_s": statistics.mean([before["episodes_per_s"], after["episodes_per_s"]]),
                    "engine_start_s": statistics.mean([before["engine_start_s"], after["engine_start_s"]]),
                    "episodes": after["episodes"], "window_s": after["window_s"],
                    "generated_tokens": after["generated_tokens"]}
            per_step = job["episodes_per_step"]
            rollout_bound = 60 * bare["episodes_per_s"] / per_step  # steps/min if the trainer never held rollouts up
            out[name] = {
                "job_episodes_per_s": round(job["episodes_per_s"], 2),
                "bare_episodes_per_s": round(bare["episodes_per_s"], 2),
                "bare_episodes_per_s_before_after": [round(before["episodes_per_s"], 2), round(after["episodes_per_s"], 2)],
                "ratio": round(job["episodes_per_s"] / bare["episodes_per_s"], 3),
                # Where the gap goes: the bare loop with the job's reloads (one per step's worth of episodes), then with
                # the reloads and the job's trainer steps replayed alongside; the rest is the job's own machinery.
                "bare_with_reloads_episodes_per_s": round(after["reloads_episodes_per_s"], 2),
                "bare_with_reloads_and_trainer_episodes_per_s": round(after["loaded_episodes_per_s"], 2),
                "reloads_factor": round(after["reloads_episodes_per_s"] / after["episodes_per_s"], 3),
                "trainer_load_factor": round(after["loaded_episodes_per_s"] / after["reloads_episodes_per_s"], 3),
                "rest_factor": round(job["episodes_per_s"] / after["loaded_episodes_per_s"], 3),
                "job_episodes_per_s_incl_evals": round(job["episodes_per_s_incl_evals"], 2),
                "ratio_incl_evals": round(job["episodes_per_s_incl_evals"] / bare["episodes_per_s"], 3),
                "job_steps_per_min": round(job["steps_per_min"], 1),
                "bare_rate_steps_per_min": round(rollout_bound, 1),
                "episodes": job["episodes"], "bare_episodes_before_after": [before["episodes"], after["episodes"]],
                "steps": job["steps"],
                "episodes_per_step": round(per_step, 1),
                "job_window_s": round(job["window_s"], 1), "bare_window_s_after": round(after["window_s"], 1),
                "job_setup_s": round(job["setup_s"], 1), "job_initial_eval_s": round(job["initial_eval_s"], 1),
                "job_rl_s": job["rl_s"], "job_wall_s": round(job["wall_s"], 1),
                "bare_engine_start_s": round(bare["engine_start_s"], 1),
                **{f"job_{k}": round(job[k], 1) for k in ("ray_start_s", "worker_engine_start_s", "worker_engine_wait_s", "trainer_init_s") if k in job},
                "job_trainer_busy_s": round(job["trainer_busy_s"], 1),
                "job_trainer_busy_share": round(job["trainer_busy_share"], 2),
                "job_mean_in_flight_groups": round(job["mean_in_flight_groups"], 1),
                "max_in_flight_groups": config.rollout.groups_per_request * config.rollout.requests_in_flight,
                "job_max_buffer_groups": job["max_buffer_groups"],
                "job_tokens_per_episode": round(job["generated_tokens"] / job["episodes"], 1),
                "bare_tokens_per_episode": round(bare["generated_tokens"] / bare["episodes"], 1),
            }
            if name == "swe":
                out["swe_first_episode_s"] = round(job["first_episode_s"], 1)
                out["swe_first_eval_episode_s"] = round(job["first_eval_episode_s"], 1)
                out["swe_engine_start_s"] = round(bare["engine_start_s"], 1)
                base = out["swe_cold_container_s"] + bare["engine_start_s"]
                out["swe_cold_container_plus_engine_s"] = round(base, 1)
                out["swe_first_episode_ratio"] = round(job["first_episode_s"] / base, 2)
                out["swe_fresh_process_engine_start_s"] = round(fresh["total_s"], 1)
                out["swe_first_episode_ratio_vs_fresh_process_engine"] = round(
                    job["first_episode_s"] / (out["swe_cold_container_s"] + fresh["total_s"]), 2)
                out["swe_job_setup_s"] = round(job["setup_s"], 1)
                out["swe_job_initial_eval_s"] = round(job["initial_eval_s"], 1)
            say(f"{name}: ratio {out[name]['ratio']}")
    out["goals"] = {**{f"{n}_ratio": GOALS[n] for n in names}, **({"swe_first_episode_ratio": GOAL_SWE_FIRST_EPISODE_RATIO}
                                                                    if "swe" in names else {})}
    out["goals_met"] = {**{f"{n}_ratio": out[n]["ratio"] >= GOALS[n] for n in names},
                        **({"swe_first_episode_ratio": out["swe_first_episode_ratio"] <= GOAL_SWE_FIRST_EPISODE_RATIO}
                           if "swe" in names else {})}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
