"""`cwm-rl train` end to end (real Ray, real vLLM, real trainer, real store): a rollout worker killed
mid-run, Ctrl-C, a resume, a kill -9 of the driver, and env servers that die."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwm_rl.store import RolloutStore


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_train_survives_a_killed_worker_stops_on_ctrl_c_and_resumes(tiny_model, tmp_path, fault_report):
    run_dir = tmp_path / "run"
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    settings = [f"run_dir={run_dir}", f"model.path={tiny_model}", "rollout.engine.enforce_eager=true", "steps=50", "eval.num_tasks=8", "eval.every_steps=2",
                "rollout.group_size=4", "rollout.groups_per_request=2", "buffer_groups=4", "rollout.sampling.max_tokens=8",
                "trainer.batch.step_tokens=32", "checkpoint_every=2", "logging.tensorboard=true",
                # the random tiny model never scores, so keep zero-advantage groups: the loop still steps and publishes
                "trainer.filters.drop_zero_advantage_groups=false"]
    args = [cli, "train", str(Path(__file__).parents[3] / "configs" / "quickstart.yaml")] + [a for s in settings for a in ("--set", s)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    deadline = time.time() + 500
    killed, recover_s = False, None
    for line in process.stdout:
        output.append(line)
        if "step    2" in line and not killed:  # kill the rollout worker: Ray restarts it, the job goes on
            pids = _worker_pids(process.pid)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            killed, killed_at = True, time.time()
            with RolloutStore(run_dir, create=False, readonly=True) as store:
                stored_at_kill = {row.trajectory_id for row in store.query(limit=None)}
        if killed and "step    3" in line and recover_s is None:
            recover_s = time.time() - killed_at
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

    with RolloutStore(run_dir, create=False) as store:
        trained = store.count(status="trained")
        assert trained == summary["trajectories_trained"]
        assert store.count(status="eval") == 8 * len(summary["eval_history"])
        lost = stored_at_kill - {row.trajectory_id for row in store.query(limit=None)}
        assert not lost
    # The worker's groups in flight at the kill were never stored: they are played again (lost: stored ones missing).
    assert summary["rollout_worker_restarts"] >= 1  # the kill lands in the eval at step 2: its retry counts too
    affected = len(re.findall(r"worker \d+ failed", text))  # a batch of calls re-submitted, or an eval retried
    fault_report("rollout_worker_kill_9", affected=affected, retried=affected, lost=len(lost),
                 recover_s=round(recover_s, 1) if recover_s else None, worker_restarts=summary["rollout_worker_restarts"])

    # Resume, then kill -9 the whole job (driver) once it has checkpointed again, and resume once more.
    process = subprocess.Popen([cli, "train", "--resume", str(run_dir), "--set", f"steps={first_steps + 40}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if f"step {first_steps + 3:>4}" in line:  # checkpoint_every=2: step first+2 is checkpointed
            workers = _worker_pids(process.pid)
            process.kill()
            break
        assert time.time() < deadline + 400, "".join(output[-40:])
    process.wait(timeout=60)
    text = "".join(output)
    assert f"step {first_steps + 1:>4}" in text, text[-3000:]  # it continued from the checkpoint, not from 0
    _reap(workers)

    with RolloutStore(run_dir, create=False) as store:
        stored_before = store.count()
    resumed = subprocess.run([cli, "train", "--resume", str(run_dir), "--set", f"steps={first_steps + 5}"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "steps" and summary["steps"] == first_steps + 5
    assert summary["policy_versions"] >= first_steps + 5

    with RolloutStore(run_dir, create=False) as store:
        assert store.count() >= stored_before  # nothing stored before the kill was lost
        rows = store.query(status="trained")
        assert max(r.newest_version for r in rows) >= first_steps  # later trajectories carry later versions
        # No trajectory was trained on while staler than max_staleness (quickstart: 4). The trainer's
        # version at step s is at least s (a resume after publishing past a checkpoint skips versions).
        assert all(r.step - r.newest_version <= 4 for r in rows), [(r.step, r.newest_version) for r in rows if r.step - r.newest_version > 4]
        # What training did with each trajectory is kept beside it, also across the kill -9 and the resumes.
        records = {r.trajectory_id: store.training(r.trajectory_id) for r in rows}
        assert all(rec is not None and rec.step == r.step for r, rec in zip(rows, records.values())), \
            [(r.step, rec and rec.step) for r, rec in zip(rows, records.values())]
        t = store.get(rows[-1].trajectory_id)
        assert len(records[t.trajectory_id].trainer_logprobs) == t.num_generated_tokens

    # Every stored episode of the job, trained or evaluated, replays identically in a fresh env.
    replayed = subprocess.run([cli, "rollouts", "replay", str(run_dir), "--limit", "400", "--json"], capture_output=True,
                              text=True, timeout=300)
    reports = json.loads(replayed.stdout or "[]")
    assert replayed.returncode == 0 and len(reports) >= 40, (replayed.stdout[-2000:], replayed.stderr[-2000:])
    assert {r["env_id"] for r in reports} == {"cwm_rl/Math-v0"} and all(r["identical"] for r in reports)


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_plays_groups_again_when_an_env_server_dies(tiny_model, tmp_path, fault_report):
    """Env servers the job starts, plus one named by URL that never answers: groups sent there fail with
    a reason and are played again elsewhere; a started server killed with -9 is restarted; nothing
    the job trains on came from an unreachable server; no server outlives the job. The rollout worker's engine has an
    engine-core process of its own here (executor uni: vLLM's AsyncLLM, the path a GPU takes); the other jobs run
    vLLM in the worker's process (a CPU's default)."""
    from envs.server.local import free_port

    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    settings = [f"run_dir={run_dir}", f"model.path={tiny_model}", "rollout.engine.enforce_eager=true", "rollout.engine.executor=uni",
                "steps=8", "eval.num_tasks=8", "eval.every_steps=4",
                f"envs=[{{id: cwm_rl/Math-v0, kwargs: {{difficulty: 1}}, servers: 1, urls: ['{gone}']}}]",
                "rollout.group_size=4", "rollout.groups_per_request=2", "buffer_groups=4", "rollout.sampling.max_tokens=8",
                "trainer.batch.step_tokens=32", "checkpoint_every=0", "trainer.filters.drop_zero_advantage_groups=false"]
    args = [cli, "train", str(Path(__file__).parents[3] / "configs" / "quickstart.yaml")] + [a for s in settings for a in ("--set", s)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, killed, deadline, recover_s = [], None, time.time() + 400, None
    for line in process.stdout:
        output.append(line)
        if "step    2" in line and killed is None:
            (killed,) = _env_server_pids(process.pid)
            os.kill(killed, signal.SIGKILL)
            killed_at = time.time()
            with RolloutStore(run_dir, create=False, readonly=True) as store:
                stored_at_kill = {row.trajectory_id for row in store.query(limit=None)}
        if killed is not None and "is up again" in line and recover_s is None:
            recover_s = time.time() - killed_at
        assert time.time() < deadline, "".join(output[-40:])
    process.wait(timeout=60)
    text = "".join(output)
    assert process.returncode == 0, text[-4000:]
    assert f"env server {gone} unreachable; playing" in text, text[-4000:]
    assert "is up again" in text, text[-4000:]  # the killed server was restarted

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "steps" and summary["steps"] == 8
    assert summary["groups_replayed_env_unavailable"] >= 1 and summary["env_server_restarts"] >= 1
    assert summary["eval_accuracy_final"] is not None

    # Episodes cut short by an unreachable server (at reset: the URL that never answers; at the step: the killed
    # server) replay without error, their one difference the recorded failure, which was not the env's.
    replayed = subprocess.run([cli, "rollouts", "replay", str(run_dir), "--finish-reason", "env_unavailable", "--json"],
                              capture_output=True, text=True, timeout=300)
    assert replayed.returncode == 0, (replayed.stdout[-2000:], replayed.stderr[-2000:])
    reports = json.loads(replayed.stdout)
    assert reports and all(r["identical"] for r in reports), replayed.stdout[-2000:]
    for r in reports:
        (diff,) = [d for turn in r["turns"] for d in turn["diffs"]]
        assert diff["field"] in ("reset.step_error", "step_error") and diff["replayed"] is None and diff["expected"], r
    assert any(r["turns"][0]["diffs"] for r in reports)  # the never-answering URL fails every episode at reset

    with RolloutStore(run_dir, create=False) as store:
        failed = store.query(finish_reason="env_unavailable")
        assert failed and all(r.status == "dropped_other" and r.drop_reason == "env_unavailable" for r in failed)
        assert gone.split("//")[1] in failed[0].error  # the reason names the server
        assert store.count(status="trained") == summary["trajectories_trained"] > 0
        for row in store.query(status="trained", limit=None):  # whole groups are dropped, never a part of one
            assert all(r.finish_reason != "env_unavailable" for r in store.query(group=row.group_id))
        assert store.count(status="eval") == 8 * len(summary["eval_history"])
        rows = store.query(limit=None)
        lost = stored_at_kill - {r.trajectory_id for r in rows}
        assert not lost, f"{len(lost)} trajectories stored before the kill went missing"
        # (a group failed near the end may still be in flight when the job reaches its steps: not counted as lost)
        not_played_again = {r.task_id for r in failed} - {r.task_id for r in rows if r.finish_reason != "env_unavailable"}
    assert not _env_server_pids(None), "an env server outlived the job"
    fault_report("math_env_server_kill_9_in_a_job", affected=len(failed), retried=summary["groups_replayed_env_unavailable"],
                 lost=len(lost), tasks_not_played_again_by_the_end=len(not_played_again), recover_s=round(recover_s, 1) if recover_s else None, server_restarts=summary["env_server_restarts"])


def _env_server_pids(root: int | None) -> list[int]:
    """`cwm-rl env serve` processes that are children of process `root` (None: any)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"cwm_rl.cli\x00env\x00serve" in cmdline and (root is None or parent == root) and b"zombie" not in _state(int(proc.name)):
            found.append(int(proc.name))
    return found


def _worker_pids(root: int) -> list[int]:
    """Rollout worker actor processes descending from process `root` (its local Ray's raylet forks them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid: int) -> bool:
        for _ in range(50):
            pid = parents.get(pid, 0)
            if pid == root:
                return True
            if pid <= 1:
                return False
        return False

    workers = []
    for pid in parents:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::RolloutWorker") and descends(pid):
            workers.append(pid)
    return workers


def _reap(pids: list[int]) -> None:
    """After a kill -9 of the driver, its local Ray tears the worker processes down; fail if one
    outlives that by a minute (it would hold a vLLM engine), and clean it up either way."""
    assert pids, "the job had no rollout worker process to watch"
    deadline = time.time() + 60
    left = pids
    while time.time() < deadline:
        left = [p for p in pids if Path(f"/proc/{p}").exists() and b"zombie" not in _state(p)]
        if not left:
            return
        time.sleep(2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"rollout worker processes {left} outlived the killed job by 60 s")


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b"zombie"
