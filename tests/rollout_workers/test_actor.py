"""The rollout worker as a real Ray actor (local Ray on 127.0.0.1), and `cwm-rl rollout` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_rl.types import Task, Trajectory

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow]


def test_actor_plays_groups_and_reloads(tiny_model, perturbed_model):
    import ray

    from rollout_workers.actor import rollout_worker_actor
    from rollout_workers.config import WorkerConfig

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        config = WorkerConfig(engine={"model": str(tiny_model), "max_model_len": 512}, env_id="cwm_rl/Echo-v0",
                              env_kwargs={"num_rounds": 2}, sampling={"max_tokens": 16}, limits={"max_total_tokens": 512})
        worker = rollout_worker_actor().remote(config.model_dump())
        first = [Trajectory.model_validate_json(t) for t in ray.get(worker.run_groups.remote([0, 1], 2, "run-1"), timeout=300)]
        assert len(first) == 4 and {t.run_id for t in first} == {"run-1"}
        assert len({t.group_id for t in first}) == 2 and all(t.finish_reason == "terminated" for t in first)
        assert {v for t in first for v in t.policy_versions if v >= 0} == {0}
        assert ray.get(worker.update_weights.remote(1, str(perturbed_model)), timeout=120) == 1
        assert ray.get(worker.version.remote()) == 1
        after = [Trajectory.model_validate_json(t) for t in ray.get(worker.run_groups.remote([2], 1), timeout=300)]
        assert {v for t in after for v in t.policy_versions if v >= 0} == {1}
        ray.get(worker.shutdown.remote())
    finally:
        ray.shutdown()


def test_rollout_command_writes_trajectories(tiny_model, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    r = subprocess.run([cli, "model", "play", "--model", str(tiny_model), "--env", "cwm_rl/Math-v0", "-n", "5", "--group-size", "2",
                        "--out", str(out), "--max-tokens", "16", "--max-model-len", "512", "--kwarg", "difficulty=2"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = out.read_text().splitlines()
    trajectories = [Trajectory.model_validate_json(line) for line in lines]
    assert len(trajectories) == 5
    assert all(t.env_id == "cwm_rl/Math-v0" and t.return_ in (1.0, -1.0) for t in trajectories)
    assert len({t.group_id for t in trajectories}) == 3  # ceil(5 / 2) groups
    assert "5 episodes" in r.stdout and json.loads(lines[0])["return"] in (1.0, -1.0)


def test_rollout_command_bad_input(tmp_path):
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    r = subprocess.run([cli, "model", "play", "--model", str(tmp_path), "--env", "cwm_rl/Math-v0", "-n", "1", "--out", str(tmp_path / "x.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a model directory" in r.stderr
    r = subprocess.run([cli, "model", "play", "--model", str(tmp_path), "--env", "cwm_rl/Nope-v0", "-n", "1", "--out", str(tmp_path / "x.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown env id" in r.stderr


def test_a_request_of_trace_tasks_is_traced_in_one_sandbox_run_before_its_episodes_reset(tiny_model, monkeypatch, fresh_trace_cache):
    """The worker hands a request's tasks to an env that prepares tasks (Trace-v0: one sandbox run for every call);
    an env that does not (Math-v0) gets no extra env made. No engine is needed for this part."""
    import envs.trace as trace_pkg
    from cwm_rl.loop.tasks import draw_task
    from envs import make_env
    from rollout_workers.actor import RolloutWorker
    from rollout_workers.config import WorkerConfig

    runs = []
    real = trace_pkg.run_traces
    monkeypatch.setattr(trace_pkg, "run_traces", lambda calls, **kw: runs.append(len(calls)) or real(calls, **kw))
    worker = RolloutWorker(WorkerConfig(engine={"model": str(tiny_model)}, env_id="cwm_rl/Trace-v0").model_dump())
    kwargs = {"mode": "output", "difficulty": 3}
    tasks = [draw_task(make_env("cwm_rl/Trace-v0", **kwargs), 5_000 + k) for k in range(8)]
    _, _, make = worker._env_factory({"id": "cwm_rl/Trace-v0", "kwargs": kwargs})
    worker._prepare_tasks("cwm_rl/Trace-v0", kwargs, make, tasks)
    assert runs == [len({json.dumps(t.metadata["args"]) + t.metadata["source"] for t in tasks})]
    env = make()
    for task in tasks:  # what each episode's reset does: no sandbox run
        env.reset(options={"task": task})
    assert len(runs) == 1
    _, _, make_math = worker._env_factory({"id": "cwm_rl/Math-v0", "kwargs": {}})
    worker._prepare_tasks("cwm_rl/Math-v0", {}, make_math, [])
    assert [type(e).__name__ if e else None for e in worker._preparers.values()] == ["TraceEnv", None]

    # A user env registered with its class (not a "module:Class" string) is prepared too; one whose preparation
    # fails does not fail the request (each reset then meets the problem and records it per episode).
    import gymnasium as gym

    from envs import SingleTurnEnv

    class Prepared(SingleTurnEnv):
        seen: list = []
        fail = False

        def sample_task(self, rng):
            return Task(id=f"t{int(rng.integers(100))}", prompt="hi")

        def prepare_tasks(self, tasks):
            if Prepared.fail:
                raise RuntimeError("no sandbox here")
            Prepared.seen.extend(t.id for t in tasks)

    for env_id in ("cwm_rl_test/Prepared-v0",):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=Prepared)
    _, _, make_user = worker._env_factory({"id": "cwm_rl_test/Prepared-v0", "kwargs": {}})
    worker._prepare_tasks("cwm_rl_test/Prepared-v0", {}, make_user, [Task(id="a", prompt="x"), Task(id="b", prompt="y")])
    assert Prepared.seen == ["a", "b"]
    Prepared.fail = True
    worker._prepare_tasks("cwm_rl_test/Prepared-v0", {}, make_user, [Task(id="c", prompt="z")])  # logged, not raised
    assert Prepared.seen == ["a", "b"] and worker._prepare_failed
    worker.shutdown()
    assert not worker._preparers
