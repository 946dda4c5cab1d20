"""Rescore stored trajectories with a changed env or verifier, by replaying them (so checks that need
the runtime, a sandbox or a container, run too), and keep the new scores beside the originals.

`rescore(trajectories, env_kwargs={"partial_credit": True})` returns a RescoreSet (`num_flipped`,
`mean_return_before`, `mean_return_after`, ...) and one RescoreResult per trajectory
(`tests/cwm_rl/replay/test_replay.py` runs it, and `cwm-rl rollouts rescore`). What changed is whatever the caller set up: `env_kwargs` override the recorded constructor
arguments, and modules imported before (`cwm-rl rollouts rescore --import my_verifier`) may register
a changed env under the same id or patch a verifier. The originals are never touched: the CLI
stores the set in `RUN_DIR/analysis.sqlite` (`AnalysisStore.add_rescore`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cwm_rl.replay.replay import replay
from cwm_rl.replay.results import RescoreResult, RescoreSet
from cwm_rl.types import Trajectory


def rescore(trajectories: Sequence[Trajectory], *, env_kwargs: dict[str, Any] | None = None, server: str | None = None,
            token: str | None = None, label: str = "", imports: Sequence[str] = (), filters: dict[str, Any] | None = None,
            num_threads: int = 4, progress: Callable[[int], None] | None = None) -> tuple[RescoreSet, list[RescoreResult]]:
    """Replay every trajectory (in `num_threads` threads) and collect its new rewards; see the module docstring."""
    rescore_set = RescoreSet(label=label or describe(imports, env_kwargs), imports=list(imports), env_kwargs=env_kwargs or {},
                             filters={k: v for k, v in (filters or {}).items() if v not in (None, [], ())})

    def one(t: Trajectory) -> RescoreResult:
        report = replay(t, server=server, token=token, env_kwargs=env_kwargs)
        result = RescoreResult(rescore_id=rescore_set.rescore_id, trajectory_id=t.trajectory_id, env_id=t.env_id, task_id=t.task_id,
                               old_return=t.return_, old_rewards=[turn.reward for turn in t.turns], error=report.error,
                               new_rewards=report.replayed_rewards, new_info=report.replayed_info)
        if report.error is None:
            result.new_return = sum(report.replayed_rewards)
        if progress is not None:
            progress(1)
        return result

    with ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="rescore") as pool:
        results = list(pool.map(one, trajectories))
    scored = [r for r in results if r.new_return is not None]
    rescore_set.num_trajectories = len(results)
    rescore_set.num_errors = len(results) - len(scored)
    rescore_set.num_changed = sum(abs(r.new_return - r.old_return) > 1e-9 for r in scored)
    rescore_set.num_flipped = sum(r.flipped for r in scored)
    if scored:
        rescore_set.mean_return_before = sum(r.old_return for r in scored) / len(scored)
        rescore_set.mean_return_after = sum(r.new_return for r in scored) / len(scored)
    return rescore_set, results


def describe(imports: Sequence[str], env_kwargs: dict[str, Any] | None) -> str:
    """A label saying what was changed: 'import my_verifier, partial_credit=True'."""
    parts = [f"import {m}" for m in imports] + [f"{k}={v!r}" for k, v in (env_kwargs or {}).items()]
    return ", ".join(parts) or "unchanged env (a determinism check)"


def return_histogram(before: Sequence[float], after: Sequence[float], num_bins: int = 8) -> list[tuple[str, int, int]]:
    """(label, count before, count after): one row per distinct return when there are few (rewards are
    often -1/0/1), else `num_bins` equal bins over both."""
    both = [*before, *after]
    distinct = sorted(set(round(v, 6) for v in both))
    if len(distinct) <= num_bins:
        return [(f"{v:g}", sum(round(x, 6) == v for x in before), sum(round(x, 6) == v for x in after)) for v in distinct]
    low, width = min(both), (max(both) - min(both)) / num_bins

    def counts(values: Sequence[float]) -> list[int]:
        out = [0] * num_bins
        for v in values:
            out[min(int((v - low) / width), num_bins - 1)] += 1
        return out

    b, a = counts(before), counts(after)
    return [(f"[{low + i * width:.3g}, {low + (i + 1) * width:.3g})", b[i], a[i]) for i in range(num_bins)]
