"""Held-out evaluation during a job: greedy episodes of every env's held-out tasks, split over the
rollout workers, accuracy per env (reward > 0 counts as correct).

`evaluate(workers, endpoints, config, held_out, step=..., policy_version=..., say=..., store=...)`
hands each env's episodes to `store` as soon as they are played (the job stores them with status
`eval`, so a failure mid-eval keeps what was played) and returns a `HeldOutEval`: `accuracy` (the
mean over envs), `per_env` and `metrics()`, the entry logged as `eval_accuracy` and
`eval_accuracy/ENV_ID`. Every job in `tests/cwm_rl/loop/test_driver.py` evaluates.

A worker that dies mid-eval is brought up to date and asked again (`RolloutWorkers.result`); an
episode whose env server was unreachable is played again on another server, up to
`MAX_ENV_RETRIES` times; while every server of an env is down the eval waits up to
`EVAL_WAIT_FOR_SERVER_S` for one, then leaves those tasks out and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cwm_rl.config import JobConfig
from cwm_rl.loop.env_servers import EnvEndpoints
from cwm_rl.loop.workers import MAX_ENV_RETRIES, RolloutWorkers
from cwm_rl.types import Trajectory

EVAL_WAIT_FOR_SERVER_S = 120  # an eval waits this long for an env server to come back before leaving its tasks out


@dataclass
class HeldOutEval:
    """One evaluation: accuracy per env, and their mean."""

    step: int
    policy_version: int
    per_env: dict[str, float]

    @property
    def accuracy(self) -> float:
        return sum(self.per_env.values()) / len(self.per_env)

    def metrics(self) -> dict[str, Any]:
        """As logged: step, policy_version, eval_accuracy and eval_accuracy/ENV_ID."""
        return {"step": self.step, "policy_version": self.policy_version, "eval_accuracy": self.accuracy,
                **{f"eval_accuracy/{k}": v for k, v in self.per_env.items()}}


def evaluate(workers: RolloutWorkers, endpoints: EnvEndpoints, config: JobConfig, held_out: dict[str, list[dict[str, Any]]],
             *, step: int, policy_version: int, say: Callable[[str], None],
             store: Callable[[list[Trajectory]], Any]) -> HeldOutEval:
    """Greedy accuracy on every env's held-out tasks; `store` gets each env's episodes as soon as they are played."""
    result = HeldOutEval(step=step, policy_version=policy_version, per_env={})
    for env_index, spec in enumerate(config.envs):
        trajectories = play_greedy(workers, endpoints, env_index, held_out[spec.id], config.eval.max_tokens, say)
        store(trajectories)
        result.per_env[spec.id] = sum(t.return_ > 0 for t in trajectories) / max(len(trajectories), 1)
    return result


def play_greedy(workers: RolloutWorkers, endpoints: EnvEndpoints, env_index: int, tasks: list[dict[str, Any]], max_tokens: int,
                say: Callable[[str], None]) -> list[Trajectory]:
    """One greedy episode per task, the tasks split over the workers (see the module docstring)."""
    env_id = endpoints.specs[env_index].id
    greedy = {"temperature": 0.0, "max_tokens": endpoints.specs[env_index].max_tokens or max_tokens}
    played: list[Trajectory] = []
    for attempt in range(MAX_ENV_RETRIES + 1):
        asked = []
        for w in range(len(workers)):
            share = tasks[w::len(workers)]
            if not share:
                continue
            payload = _wait_for_payload(endpoints, env_index)
            if payload is None:
                say(f"{env_id}: no env server up for {EVAL_WAIT_FOR_SERVER_S} s; this eval leaves out {len(share)} task(s)")
                continue
            asked.append((w, share, payload))
        refs = [workers.play(w, share, env, greedy) for w, share, (env, _) in asked]  # all workers at once
        unavailable = []
        for (w, share, (env, url)), ref in zip(asked, refs):
            got = workers.result(ref, w, retry=lambda w=w, share=share, env=env: workers.play(w, share, env, greedy))
            for task, t in zip(share, got):
                if t.finish_reason == "env_unavailable" and attempt < MAX_ENV_RETRIES:
                    unavailable.append(task)
                    endpoints.mark_down(env_index, url, t.error or "unreachable")
                else:
                    played.append(t)
        if not unavailable:
            break
        say(f"{env_id}: {len(unavailable)} eval episode(s) met an unreachable env server; playing them again")
        tasks = unavailable
    return played


def _wait_for_payload(endpoints: EnvEndpoints, env_index: int) -> tuple[dict[str, Any], str | None] | None:
    """The env's payload, waiting up to EVAL_WAIT_FOR_SERVER_S while every env server of it is down."""
    payload = endpoints.payload(env_index)
    waited = time.monotonic()
    while payload is None and time.monotonic() - waited < EVAL_WAIT_FOR_SERVER_S:
        time.sleep(1.0)
        endpoints.check()
        payload = endpoints.payload(env_index)
    return payload
