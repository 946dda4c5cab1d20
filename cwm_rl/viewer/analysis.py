"""Replay, rescore and branch results for the viewer, read from `RUN_DIR/analysis.sqlite` (read-only).

The results file is written by `cwm-rl rollouts replay|rescore|branch` (`cwm_rl/replay/`); a run
that has none yet simply shows none, and the file is opened again on every request so results
made while the viewer is open appear on the next load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cwm_rl.replay.results import AnalysisStore, ReplayReport, RescoreResult, open_results
from cwm_rl.viewer import queries
from cwm_rl.viewer.runs import Run


@contextmanager
def _results(run: Run) -> Iterator[AnalysisStore | None]:
    store = open_results(run.dir)
    try:
        yield store
    finally:
        if store is not None:
            store.close()


def replay_dict(report: ReplayReport) -> dict[str, Any]:
    """A report with what the page shows first: identical or not, the first divergence, which turns diverged."""
    d = report.model_dump(mode="json")
    d["identical"] = report.identical
    d["first_divergence"] = report.first_divergence
    for turn, diff in zip(d["turns"], report.turns):
        turn["diverged"] = diff.diverged
    return d


def rescore_dict(result: RescoreResult) -> dict[str, Any]:
    return {**result.model_dump(mode="json"), "flipped": result.flipped}


def for_trajectory(run: Run, trajectory_id: str) -> dict[str, Any]:
    """Every replay, rescore and branch set of one trajectory (an exact id), newest first."""
    with _results(run) as store:
        if store is None:
            return {"replays": [], "rescores": [], "branches": []}
        rescores = store.rescores(trajectory_id=trajectory_id, limit=100)
        labels = {s.rescore_id: s.label for s in store.rescore_sets(limit=1000)}
        return {"replays": [replay_dict(r) for r in store.replays(trajectory_id, limit=50)],
                "rescores": [{**rescore_dict(r), "label": labels.get(r.rescore_id, "")} for r in rescores],
                "branches": [b.model_dump(mode="json") for b in store.branch_sets(trajectory_id, limit=50)]}


def overview(run: Run) -> dict[str, Any]:
    """The run's analysis page: rescore sets, branch sets, and the latest replays (newest first)."""
    with _results(run) as store:
        if store is None:
            return {"rescore_sets": [], "branch_sets": [], "replays": []}
        replays = [{"trajectory_id": r.trajectory_id, "env_id": r.env_id, "task_id": r.task_id, "created_at": r.created_at,
                    "identical": r.identical, "first_divergence": r.first_divergence, "target": r.target,
                    "recorded_return": r.recorded_return, "replayed_return": r.replayed_return} for r in store.replays(limit=200)]
        return {"rescore_sets": [s.model_dump(mode="json") for s in store.rescore_sets(limit=200)],
                "branch_sets": [b.model_dump(mode="json") for b in store.branch_sets(limit=200)], "replays": replays}


def rescore(run: Run, rescore_id: str, flipped_only: bool, limit: int, offset: int) -> dict[str, Any]:
    """One rescore set and a page of its per-trajectory results (flips first)."""
    with _results(run) as store:
        if store is None:
            raise LookupError(f"no rescore set {rescore_id!r}: nothing was rescored in this run yet")
        found = store.rescore_set(rescore_id)
        results = store.rescores(found.rescore_id, flipped_only=flipped_only, limit=limit + 1, offset=offset)
        return {"set": found.model_dump(mode="json"), "results": [rescore_dict(r) for r in results[:limit]],
                "more": len(results) > limit}


def branch(run: Run, branch_id: str) -> dict[str, Any]:
    """One branch set, its continuations, and the original trajectory from the rollout store (when still there)."""
    with _results(run) as store:
        if store is None:
            raise LookupError(f"no branch set {branch_id!r}: nothing was branched in this run yet")
        found, continuations = store.branch(branch_id)
    try:
        _, data, _ = queries.trajectory(run.store, found.trajectory_id)
        original = _turns(json.loads(data))
    except LookupError:
        original = None
    return {"set": found.model_dump(mode="json"), "original": original,
            "continuations": [_turns(t.model_dump(mode="json")) for t in continuations]}


def _turns(t: dict[str, Any]) -> dict[str, Any]:
    """The parts of a Trajectory a side-by-side column needs (no token arrays)."""
    return {key: t.get(key) for key in ("trajectory_id", "sample_index", "return", "finish_reason", "error", "turns", "messages")}
