"""`scripted_trajectory`: play an env with given actions (no model) and record it as a job would."""

from __future__ import annotations

from typing import Any

import pytest

from cwm_rl.types import NO_VERSION, Message, Span, Task, Trajectory, Turn


def scripted_trajectory(env_id: str, actions: list[str], *, seed: int | None = 0, task: Task | None = None,
                        env_kwargs: dict[str, Any] | None = None, make_env=None, **ids: Any) -> Trajectory:
    """Step a real env with `actions` and store what happened the way the agent loop does (one token per
    action and per observation, so the spans are valid)."""
    if make_env is None:
        from envs import make_env
    env = make_env(env_id, **(env_kwargs or {}))
    try:
        observation, info = env.reset(seed=seed, options={"task": task} if task else None)
        messages = [Message.model_validate(m) for m in observation]
        tokens: list[int] = [1]
        mask, logprobs, versions = [0], [0.0], [NO_VERSION]
        turns: list[Turn] = []
        terminated = truncated = False
        for index, action in enumerate(actions):
            start = len(tokens)
            tokens.append(2)
            mask.append(1)
            logprobs.append(-0.5)
            versions.append(0)
            observation, reward, terminated, truncated, step_info = env.step(action)
            turn = Turn(index=index, action=action, observation=observation, reward=reward, info=step_info,
                        action_span=Span(start=start, end=start + 1))
            turns.append(turn)
            messages.append(Message(role="assistant", content=action))
            if terminated or truncated:
                break
            tokens.append(3)
            mask.append(0)
            logprobs.append(0.0)
            versions.append(NO_VERSION)
            turn.observation_span = Span(start=len(tokens) - 1, end=len(tokens))
            messages += [Message.model_validate(m) for m in observation]
        finish = "terminated" if terminated else "truncated" if truncated else "max_turns"
        return Trajectory(env_id=env_id, task_id=info["task_id"], token_ids=tokens, loss_mask=mask, logprobs=logprobs,
                          policy_versions=versions, turns=turns, messages=messages, terminated=terminated,
                          truncated=truncated, finish_reason=finish, task=task, seed=seed, env_kwargs=env_kwargs or {},
                          **{"return": sum(t.reward for t in turns)}, **ids)
    finally:
        env.close()


@pytest.fixture
def scripted():
    return scripted_trajectory
