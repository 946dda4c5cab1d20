"""The RL job: its buffer and task sources, and `cwm-rl train` end to end (real Ray, real vLLM,
real trainer, real store) with a rollout worker killed mid-run, Ctrl-C and a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwm_rl.config import EnvSpec
from cwm_rl.job import Buffer, TaskSource, held_out_tasks
from cwm_rl.types import Trajectory


def traj(group: str, ret: float, n: int = 3) -> Trajectory:
    return Trajectory(task_id="t", env_id="e", group_id=group, token_ids=[1] * (2 + n), loss_mask=[0, 0] + [1] * n,
                      logprobs=[0.0, 0.0] + [-1.0] * n, policy_versions=[-1, -1] + [0] * n, finish_reason="terminated",
                      terminated=True, **{"return": ret})


def test_buffer_counts_only_groups_with_signal_and_takes_oldest_first():
    buffer = Buffer()
    buffer.add([traj("a", 1), traj("a", 1)])  # no signal: same returns
    buffer.add([traj("b", 1), traj("b", -1)])
    buffer.add([traj("c", 0), traj("c", 1)])
    assert len(buffer) == 3 and buffer.signal_tokens() == 12
    taken = buffer.take(step_tokens=5)
    assert [t.group_id for t in taken] == ["a", "a", "b", "b"]  # the old no-signal group goes along, then b
    assert len(buffer) == 1 and buffer.signal_tokens() == 6


def test_task_source_skips_held_out_tasks_and_resumes_from_its_cursor():
    spec = EnvSpec(id="cwm_rl/Math-v0", kwargs={"difficulty": 1})
    held_out = held_out_tasks(spec, seed=0, num_tasks=10)
    held_ids = {t["id"] for t in held_out}
    assert len(held_ids) == len(held_out) >= 5
    source = TaskSource(spec, seed=0, held_out_ids=held_ids)
    drawn = [source.next_task() for _ in range(200)]
    assert not {t["id"] for _, t in drawn} & held_ids
    assert len({seed for seed, _ in drawn}) == 200  # every draw a fresh seed
    resumed = TaskSource(spec, seed=0, held_out_ids=held_ids, cursor=source.cursor)
    assert [resumed.next_task() for _ in range(5)] == [source.next_task() for _ in range(5)]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
def test_train_survives_a_killed_worker_stops_on_ctrl_c_and_resumes(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    settings = [f"run_dir={run_dir}", f"model.path={tiny_model}", "steps=50", "eval.num_tasks=8", "eval.every_steps=2",
                "rollout.group_size=4", "rollout.groups_per_request=2", "buffer_groups=4", "rollout.sampling.max_tokens=8",
                "trainer.batch.step_tokens=32", "trainer.checkpoint_every=2", "logging.tensorboard=true",
                # the random tiny model never scores, so keep zero-advantage groups: the loop still steps and publishes
                "trainer.filters.drop_zero_advantage_groups=false"]
    args = [cli, "train", str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")] + [a for s in settings for a in ("--set", s)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    deadline = time.time() + 500
    killed = False
    for line in process.stdout:
        output.append(line)
        if "step    2" in line and not killed:  # kill the rollout worker: Ray restarts it, the job goes on
            pids = subprocess.run(["pgrep", "-f", "^ray::RolloutWorker"], capture_output=True, text=True).stdout.split()
            assert len(pids) == 1, pids
            os.kill(int(pids[0]), signal.SIGKILL)
            killed = True
        if killed and "step    4" in line:  # then Ctrl-C
            process.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(output[-40:])
    rest, _ = process.communicate(timeout=300)
    text = "".join(output) + rest
    assert process.returncode == 0, text[-4000:]
    assert "stopping after the current step" in text
    assert "worker 0 failed" in text, text[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
    first_steps = summary["steps"]
    assert 4 <= first_steps < 50 and summary["policy_versions"] == first_steps
    for key in ("eval_accuracy_initial", "eval_accuracy_final", "trajectories_stored", "trajectories_trained",
                "trajectories_dropped_stale", "wall_seconds"):
        assert key in summary, key
    assert summary["trajectories_trained"] > 0
    assert (run_dir / "progress.png").stat().st_size > 1000
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "weights" / "LATEST").is_file()

    from cwm_rl.store import RolloutStore

    with RolloutStore(run_dir, create=False) as store:
        trained = store.count(status="trained")
        assert trained == summary["trajectories_trained"]
        assert store.count(status="eval") == 8 * len(summary["eval_history"])
        versions = {r.newest_version for r in store.query(status="trained")}
        assert max(versions) >= 1  # workers reloaded published weights in flight

    resumed = subprocess.run([cli, "train", "--resume", str(run_dir), "--set", f"steps={first_steps + 2}"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "steps" and summary["steps"] == first_steps + 2
    assert summary["policy_versions"] >= first_steps + 2
