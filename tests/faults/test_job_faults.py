"""Fault battery, whole jobs (`cwm-rl train`, real Ray, vLLM, trainer, store): the trainer killed -9
mid-step, then the run dir's disk filling up. Each stops the job with a message naming the cause
and the resume command; the resume continues from the last checkpoint with every stored rollout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cwm_rl.store import RolloutStore

REPO_ROOT = Path(__file__).parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """A 160 MiB tmpfs to hold the run dir, so filling it is quick and harmless."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"mounting a tmpfs failed ({mounted.stderr.strip()}): the disk-full test needs root (CI has it)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _play(run_dir: Path, model: Path, steps: int, resume: bool, at_line: str | None, fault) -> tuple[int, str, float | None, float | None]:
    """Run `cwm-rl train` (or `--resume`) until it exits; call `fault()` once a line contains `at_line`.
    Returns the exit code, the output, when the first step of this start was printed and when the fault
    was made (time.time())."""
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    if resume:
        args = [cli, "train", "--resume", str(run_dir), "--set", f"steps={steps}"]
    else:
        settings = [f"run_dir={run_dir}", f"model.path={model}", "rollout.engine.enforce_eager=true", f"steps={steps}", "eval.num_tasks=4", "eval.every_steps=100",
                    "rollout.group_size=4", "rollout.groups_per_request=2", "buffer_groups=4", "rollout.sampling.max_tokens=8",
                    "trainer.batch.step_tokens=32", "checkpoint_every=2", "trainer.filters.drop_zero_advantage_groups=false"]
        args = [cli, "train", str(REPO_ROOT / "configs" / "quickstart.yaml")] + [a for s in settings for a in ("--set", s)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, first_step, fault_at = [], None, None
    for line in process.stdout:
        output.append(line)
        if first_step is None and "] step " in line:
            first_step = time.time()
        if fault_at is None and at_line is not None and at_line in line:
            fault(process.pid)
            fault_at = time.time()
    process.wait(timeout=120)
    return process.returncode, "".join(output), first_step, fault_at


def _kill_trainer(job_pid: int) -> None:
    # Ray titles an actor's process `ray::TrainerRank` when idle and `ray::TrainerRank.step` while it steps.
    ranks = [p for p in psutil.Process(job_pid).children(recursive=True) if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::TrainerRank")]
    assert len(ranks) == 1, ranks
    ranks[0].kill()


def _statuses(run_dir: Path) -> dict[str, str]:
    with RolloutStore(run_dir, create=False, readonly=True) as store:
        return {row.trajectory_id: row.status for row in store.query(limit=None)}


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_a_killed_trainer_and_a_full_disk_stop_the_job_and_resumes_keep_every_stored_rollout(tiny_model, small_disk,
                                                                                             fault_report):
    run_dir = small_disk / "run"

    # 1. kill -9 the trainer rank while it steps.
    code, text, _, killed_at = _play(run_dir, tiny_model, 30, False, "step    3", _kill_trainer)
    assert code != 0, text[-3000:]
    assert "trainer rank 0 died during" in text and f"cwm-rl train --resume {run_dir}" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "trainer_lost"
    after_kill = _statuses(run_dir)
    waiting = {i for i, s in after_kill.items() if s == "buffered"}  # stored, never trained: the resume owes them a step
    assert waiting

    # 2. resume; fill the disk once it steps again.
    def fill(_pid: int) -> None:
        subprocess.run(["dd", "if=/dev/zero", f"of={small_disk / 'ballast'}", "bs=1M"], capture_output=True)

    code, text, first_step, filled_at = _play(run_dir, tiny_model, 60, True, f"step {summary['steps'] + 2:>4}", fill)
    assert first_step is not None and filled_at is not None, text[-3000:]
    recover_kill_s = first_step - killed_at  # the job's exit, the resume's start-up, its first step
    assert code != 0, text[-3000:]
    assert f"the disk holding {run_dir} is full" in text and f"cwm-rl train --resume {run_dir}" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    after_full = _statuses(run_dir)  # the store stays readable on the full disk
    lost_kill = set(after_kill) - set(after_full)
    assert not lost_kill, f"{len(lost_kill)} stored trajectories disappeared"

    # 3. free the space, resume again: it finishes, with everything stored before still there.
    (small_disk / "ballast").unlink()
    code, text, first_step, _ = _play(run_dir, tiny_model, _steps(run_dir) + 12, True, None, None)
    assert first_step is not None, text[-3000:]
    recover_full_s = first_step - filled_at
    assert code == 0, text[-3000:]
    final = _statuses(run_dir)
    lost_full = set(after_full) - set(final)
    assert not lost_full, f"{len(lost_full)} stored trajectories disappeared"
    still_waiting = {i for i in waiting if final[i] == "buffered"}
    assert not still_waiting, f"{len(still_waiting)} of the {len(waiting)} rollouts stored before the kill were never trained on"
    retried = sum(final[i] in ("trained", "dropped_stale") for i in waiting)
    fault_report("trainer_kill_9", affected=len(waiting), retried=retried, lost=len(lost_kill),
                 recover_s=round(recover_kill_s, 1), stored=len(after_kill))
    fault_report("run_dir_disk_full", affected=len(after_full) - len(after_kill), lost=len(lost_full),
                 recover_s=round(recover_full_s, 1), stored=len(after_full))


def _steps(run_dir: Path) -> int:
    from trainer.checkpoint import latest_checkpoint

    return int(latest_checkpoint(run_dir / "checkpoints").name.removeprefix("step_"))
