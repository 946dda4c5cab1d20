"""Replay a stored trajectory: a fresh env with the recorded id, kwargs, seed and task, the recorded
actions stepped again, and every observation, reward, termination flag and info field compared.

`replay(trajectory)` replays in-process (`envs.make_env(env_id, **kwargs)`), `replay(trajectory,
server=URL)` on an env server; the ReplayReport says `identical`, names the `first_divergence` and
lists per-turn FieldDiffs in `turns` (`tests/cwm_rl/replay/test_replay.py` runs each).

An env whose steps are not reproducible declares which fields may differ and why, in its class
attribute `replay_may_differ` (e.g. SWE-v0: `{"reset.info.session_id": "a new container each
episode"}`); such a difference is reported with that reason and does not count as a divergence.
`env_kwargs` overrides the recorded constructor arguments (rescore uses that). The rollout store is
only read. The job tests (tests/cwm_rl/loop/) replay every built-in env's stored episodes.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cwm_rl.replay.results import FieldDiff, ReplayReport, TurnDiff
from cwm_rl.types import Trajectory

# Finish reasons whose failed last step says nothing about the env: a replay that steps fine is not a divergence.
_OUTSIDE_THE_ENV = {"env_unavailable": "the env server could not be reached when it was recorded",
                    "timeout": "the recorded step ran past the worker's deadline (a loaded machine)"}
_STEP_FAILURES = ("env_error", "timeout", "env_unavailable")


class ReplayError(ValueError):
    """The trajectory cannot be replayed as it is (no task or seed recorded, an env that no longer exists)."""


def replay(trajectory: Trajectory, *, server: str | None = None, token: str | None = None,
           env_kwargs: dict[str, Any] | None = None) -> ReplayReport:
    """Re-step `trajectory`'s actions in a fresh env and diff against the record (see the module docstring)."""
    t = trajectory
    kwargs = {**t.env_kwargs, **(env_kwargs or {})}
    try:
        env = open_env(t, server=server, token=token, env_kwargs=kwargs)
    except ReplayError as e:
        return ReplayReport(trajectory_id=t.trajectory_id, env_id=t.env_id, task_id=t.task_id, target=server or "in-process",
                            env_kwargs=kwargs, recorded_return=t.return_, error=str(e))
    try:
        return replay_in(env, t, target=server or "in-process", env_kwargs=kwargs)
    finally:
        try:
            env.close()
        except Exception:  # a broken env must not hide the report
            pass


def open_env(t: Trajectory, *, server: str | None = None, token: str | None = None, env_kwargs: dict[str, Any] | None = None) -> Any:
    """A fresh env for replaying `t` (its recorded kwargs, overridden by `env_kwargs`); ReplayError if there is none."""
    if t.task is None and t.seed is None:
        raise ReplayError("the trajectory records neither its task nor its seed (stored before cwm-rl kept them), "
                          "so its episode cannot be rebuilt")
    return _make(t.env_id, {**t.env_kwargs, **(env_kwargs or {})}, server, token)


def replay_in(env: Any, t: Trajectory, *, target: str = "in-process", env_kwargs: dict[str, Any] | None = None) -> ReplayReport:
    """Reset `env` (fresh, made for `t`) as recorded and step the recorded actions; the env is left open."""
    report = ReplayReport(trajectory_id=t.trajectory_id, env_id=t.env_id, task_id=t.task_id, target=target,
                          env_kwargs=t.env_kwargs if env_kwargs is None else env_kwargs, recorded_return=t.return_)
    _replay_into(report, env, t, declared_differences(t.env_id))
    report.replayed_return = sum(report.replayed_rewards) if report.error is None else None
    return report


def _replay_into(report: ReplayReport, env: Any, t: Trajectory, may_differ: dict[str, str]) -> None:
    reset = TurnDiff(turn=-1)
    report.turns.append(reset)
    recorded_first = _first_observation(t)
    failed_at_reset = not t.turns and t.finish_reason in _STEP_FAILURES
    try:
        observation, info = env.reset(seed=t.seed, options={"task": t.task.model_dump(mode="json")} if t.task else None)
    except Exception as e:
        error = env_error("reset", e)
        if failed_at_reset:
            _compare(reset, "step_error", t.error, error, may_differ, prefix="reset.")
        else:
            report.error = f"the fresh env failed where the record did not: {error}"
        return
    if failed_at_reset:
        _compare(reset, "step_error", t.error, None, may_differ, prefix="reset.",
                 outside=_OUTSIDE_THE_ENV.get(t.finish_reason))
        return
    _compare(reset, "observation", recorded_first, _json(observation), may_differ, prefix="reset.")
    _compare(reset, "task_id", t.task_id, info.get("task_id", t.task_id), may_differ, prefix="reset.")
    for key in sorted(set(info) - {"task_id"}):  # reset info is not recorded beyond the task id: only declared keys are named
        if f"reset.info.{key}" in may_differ:
            reset.diffs.append(FieldDiff(field=f"reset.info.{key}", recorded=None, replayed=_json(info[key]),
                                         expected=may_differ[f"reset.info.{key}"]))
    last = len(t.turns) - 1
    for turn in t.turns:
        diff = TurnDiff(turn=turn.index)
        report.turns.append(diff)
        step_failed = turn.index == last and t.finish_reason in _STEP_FAILURES
        try:
            observation, reward, terminated, truncated, info = env.step(turn.action)
        except Exception as e:
            if step_failed:  # the record failed here too: the same error or not
                _compare(diff, "step_error", t.error, env_error("step", e), may_differ)
            else:  # no new rewards to report: a rescore counts this as an error, not as a changed return
                report.error = f"the fresh env failed at turn {turn.index} where the record did not: {env_error('step', e)}"
            return
        report.replayed_rewards.append(float(reward))
        report.replayed_info.append(_json(info))
        if step_failed:  # the record has no observation for this step: only its failure can be compared
            _compare(diff, "step_error", t.error, None, may_differ, outside=_OUTSIDE_THE_ENV.get(t.finish_reason))
            return
        ended_here = turn.index == last
        _compare(diff, "observation", [m.model_dump() for m in turn.observation], _json(observation), may_differ)
        _compare(diff, "reward", turn.reward, float(reward), may_differ)
        _compare(diff, "terminated", t.terminated if ended_here else False, bool(terminated), may_differ)
        _compare(diff, "truncated", t.truncated if ended_here else False, bool(truncated), may_differ)
        replayed_info = _json(info)
        for key in sorted(set(turn.info) | set(replayed_info)):
            _compare(diff, f"info.{key}", turn.info.get(key), replayed_info.get(key), may_differ)
        if (terminated or truncated) and not ended_here:
            return  # the episode ended earlier than the record's: nothing left to step


def _compare(diff: TurnDiff, field: str, recorded: Any, replayed: Any, may_differ: dict[str, str], *, prefix: str = "",
             outside: str | None = None) -> None:
    if _same(_json(recorded), replayed):
        return
    name = prefix + field
    wildcard = name[:name.index("info.") + 5] + "*" if "info." in name else None  # "info.*" covers every info key
    expected = outside or may_differ.get(name) or (may_differ.get(wildcard) if wildcard else None)
    diff.diffs.append(FieldDiff(field=name, recorded=_json(recorded), replayed=replayed, expected=expected))


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: exactly (Python's JSON round trip keeps every float bit), 1 == 1.0, NaN == NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _json(value: Any) -> Any:
    """The value as the store keeps it (JSON types): tuples become lists, odd types their str."""
    return json.loads(json.dumps(value, default=str))


def _first_observation(t: Trajectory) -> list[dict[str, str]]:
    """The messages the env's reset gave: the transcript before the first action."""
    return [m.model_dump() for m in t.messages[:t.messages_before_turn(0)]]


def env_error(what: str, e: BaseException) -> str:
    """An env failure as the agent loop records it in `Trajectory.error`, so a replayed one compares equal."""
    return f"env {what} raised {type(e).__name__}: {e}"


def _make(env_id: str, kwargs: dict[str, Any], server: str | None, token: str | None) -> Any:
    if server:
        from envs.server.client import RemoteEnv

        try:
            return RemoteEnv(server, env_id, token=token, env_kwargs=kwargs)
        except Exception as e:
            raise ReplayError(f"could not open {env_id} on the env server {server}: {e}") from None
    import gymnasium

    from envs import make_env

    if env_id not in gymnasium.registry:
        raise ReplayError(f"env {env_id} is not registered in this process; pass --import MODULE for the module that "
                          "registers it, or --server URL for an env server that serves it")
    try:
        return make_env(env_id, **kwargs)
    except Exception as e:
        raise ReplayError(f"could not make {env_id} with kwargs {kwargs}: {type(e).__name__}: {e}") from None


def declared_differences(env_id: str) -> dict[str, str]:
    """The env class's `replay_may_differ` (field -> why it may differ between runs), found through
    Gymnasium's registry without making an env; {} when the env is not registered here."""
    import gymnasium

    try:
        entry_point = gymnasium.spec(env_id).entry_point
    except Exception:
        return {}
    if isinstance(entry_point, str):
        module, _, name = entry_point.partition(":")
        try:
            import importlib

            entry_point = getattr(importlib.import_module(module), name)
        except Exception:
            return {}
    return dict(getattr(entry_point, "replay_may_differ", {}) or {})
