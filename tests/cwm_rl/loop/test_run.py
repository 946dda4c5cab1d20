"""Run setup: a run dir holding a run is never overwritten; a setup that fails leaves nothing running."""

from __future__ import annotations

import pytest

from cwm_rl.config import JobConfig


def test_a_run_dir_holding_a_run_is_not_overwritten(tmp_path):
    from cwm_rl.loop.run import check_run_dir

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="already holds a run .*--resume"):
        check_run_dir(JobConfig(run_dir=str(tmp_path)), resume=False)
    assert check_run_dir(JobConfig(run_dir=str(tmp_path)), resume=True) == tmp_path


def test_a_publish_root_holding_another_runs_weights_is_refused(tmp_path):
    from cwm_rl.loop.run import check_run_dir

    root = tmp_path / "shm-weights"
    (root / "v00000007").mkdir(parents=True)
    config = JobConfig(run_dir=str(tmp_path / "run"), publish={"root": str(root)})
    with pytest.raises(ValueError, match="publish.root .* already holds published weights"):
        check_run_dir(config, resume=False)
    assert check_run_dir(config, resume=True) == tmp_path / "run"  # a resume continues its own versions
