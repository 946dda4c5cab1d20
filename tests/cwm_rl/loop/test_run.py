"""Run setup: a run dir holding a run is never overwritten; a setup that fails leaves nothing running."""

from __future__ import annotations

import pytest

from cwm_rl.config import JobConfig


def test_a_run_dir_holding_a_run_is_not_overwritten(tmp_path):
    from cwm_rl.loop.run import check_run_dir

    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds a run .*--resume"):
        check_run_dir(JobConfig(run_dir=str(tmp_path)), resume=False)
    assert check_run_dir(JobConfig(run_dir=str(tmp_path)), resume=True) == tmp_path


def test_a_start_that_failed_before_its_first_trajectory_leaves_a_run_dir_a_new_start_may_take(tmp_path, make_trajectory):
    """A bad engine config stops the job after the store and weights dir exist: rerunning with the fix must work."""
    from cwm_rl.loop.run import check_run_dir
    from cwm_rl.store import RolloutStore

    RolloutStore(tmp_path).close()
    (tmp_path / "weights").mkdir()
    (tmp_path / "checkpoints").mkdir()
    assert check_run_dir(JobConfig(run_dir=str(tmp_path)), resume=False) == tmp_path
    with pytest.raises(ValueError, match="has no checkpoint to resume from .* --set run_dir=NEW_DIR"):
        check_run_dir(JobConfig(run_dir=str(tmp_path)), resume=True)
    with RolloutStore(tmp_path) as store:
        store.add([make_trajectory()])
    with pytest.raises(ValueError, match=r"already holds a run \(rollouts.sqlite\)"):
        check_run_dir(JobConfig(run_dir=str(tmp_path)), resume=False)


def test_a_resume_that_would_hold_out_other_tasks_is_refused():
    from cwm_rl.loop.run import check_held_out

    check_held_out(None, {"cwm_rl/Math-v0": ["a", "b"]})  # a checkpoint from before held-out ids were saved
    check_held_out({"cwm_rl/Math-v0": ["b", "a"]}, {"cwm_rl/Math-v0": ["a", "b"]})
    with pytest.raises(ValueError, match="held-out tasks of cwm_rl/Math-v0 differ .* eval.num_tasks"):
        check_held_out({"cwm_rl/Math-v0": ["a", "b"]}, {"cwm_rl/Math-v0": ["a", "c"]})


def test_an_env_playing_more_turns_than_the_workers_allow_is_refused():
    from cwm_rl.config import load_config
    from cwm_rl.loop.run import check_turn_limits
    from cwm_rl.loop.tasks import job_tasks

    def check(envs: str) -> None:
        config = load_config(None, [f"envs={envs}", "eval.num_tasks=2"])
        mix = job_tasks(config.envs, 0, 2, 0.25, {}, mix_seed=0)
        try:
            check_turn_limits(config, mix)
        finally:
            mix.close()

    with pytest.raises(ValueError, match=r"envs\[0\] \(cwm_rl/Math-v0\) plays up to 3 turns .* set envs\[0\].limits.max_turns >= 3"):
        check("[{id: cwm_rl/Math-v0, kwargs: {tool_calls: 2}}]")
    check("[{id: cwm_rl/Math-v0, kwargs: {tool_calls: 2}, limits: {max_turns: 3}}, {id: cwm_rl/Echo-v0, limits: {max_turns: 3}}]")


def test_a_publish_root_holding_another_runs_weights_is_refused(tmp_path):
    from cwm_rl.loop.run import check_run_dir

    root = tmp_path / "shm-weights"
    (root / "v00000007").mkdir(parents=True)
    config = JobConfig(run_dir=str(tmp_path / "run"), publish={"root": str(root)})
    with pytest.raises(ValueError, match="publish.root .* already holds published weights"):
        check_run_dir(config, resume=False)
    (tmp_path / "run" / "checkpoints" / "step_00000007").mkdir(parents=True)
    assert check_run_dir(config, resume=True) == tmp_path / "run"  # a resume continues its own versions
