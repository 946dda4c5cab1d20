"""RUN_DIR/analysis.sqlite: replay reports, rescore sets and branch sets round-trip; readers never write."""

from __future__ import annotations

import sqlite3

import pytest

from cwm_rl.replay.results import (AnalysisStore, BranchSet, FieldDiff, ReplayReport, RescoreResult, RescoreSet, TurnDiff,
                                   open_results)


def test_reports_round_trip_and_readers_never_write(tmp_path, make_trajectory):
    assert open_results(tmp_path) is None  # nothing replayed yet: no file is made by looking
    assert not (tmp_path / "analysis.sqlite").exists()
    diverged = ReplayReport(trajectory_id="t1", env_id="e", task_id="k", target="in-process", recorded_return=1.0,
                            replayed_return=0.0, turns=[TurnDiff(turn=-1), TurnDiff(turn=0, diffs=[
                                FieldDiff(field="info.elapsed", recorded=1, replayed=2, expected="a clock"),
                                FieldDiff(field="reward", recorded=1.0, replayed=0.0)])])
    assert not diverged.identical and diverged.first_divergence == "turn 0: reward 1.0 -> 0.0"
    expected_only = diverged.model_copy(update={"turns": diverged.turns[:1] + [TurnDiff(turn=0, diffs=diverged.turns[1].diffs[:1])]})
    assert expected_only.identical and expected_only.first_divergence is None

    rescore_set = RescoreSet(label="import strict", num_trajectories=2, num_flipped=1)
    results = [RescoreResult(rescore_id=rescore_set.rescore_id, trajectory_id=i, env_id="e", task_id="k", old_return=old, new_return=new)
               for i, old, new in (("t1", 1.0, -1.0), ("t2", 1.0, 0.5))]
    assert [r.flipped for r in results] == [True, False]
    branches = [make_trajectory(sample_index=i, rewards=(0.0, float(i))) for i in range(3)]
    branch_set = BranchSet(trajectory_id="t1", env_id="e", task_id="k", turn=1, model="m", prefix_tokens=9, original_return=1.0,
                           returns=[b.return_ for b in branches])
    with AnalysisStore(tmp_path) as store:
        store.add_replay(diverged)
        store.add_replay(expected_only)
        store.add_rescore(rescore_set, results)
        store.add_branch(branch_set, branches)

    reader = open_results(tmp_path)
    assert [r.identical for r in reader.replays("t1")] == [True, False]  # newest first
    assert reader.rescore_set(rescore_set.rescore_id[:6]).label == "import strict"
    assert [r.trajectory_id for r in reader.rescores(rescore_set.rescore_id, flipped_only=True)] == ["t1"]
    assert [r.new_return for r in reader.rescores(trajectory_id="t2")] == [0.5]
    found, continuations = reader.branch(branch_set.branch_id[:8])
    assert found == branch_set and continuations == branches
    assert [b.branch_id for b in reader.branch_sets("t1")] == [branch_set.branch_id]
    with pytest.raises(LookupError, match="no branch set with id"):
        reader.branch("ffff")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.add_replay(diverged)
    reader.close()
