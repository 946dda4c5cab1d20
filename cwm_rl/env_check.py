"""`cwm-rl env check`: is an env safe to train on?

Checks, each a named `CheckResult`:
- gymnasium: `gymnasium.utils.env_checker.check_env` passes with no warnings;
- seed determinism: two fresh envs reset with the same seed show the same observation;
- reference: the env's `reference_action()` plays a whole episode and scores above 0;
- reward-hack probes: an empty answer, the question echoed back, huge output (padding before
  the reference answer, the reference answer repeated) and the env's own
  `reward_hack_probes()` (e.g. two boxed answers): none may score (reward must be <= 0 and
  below the reference).
With `served=True` the env is also served by a real env server on a loopback port and the same
checks run through `RemoteEnv` over HTTP.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
from gymnasium.utils.env_checker import check_env

from envs.base import TextEnv
from envs.registry import make_env

HUGE_CHARS = 200_000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _warnings_text(caught: list[warnings.WarningMessage]) -> str:
    return "; ".join(_ANSI.sub("", str(w.message)) for w in caught)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def _gymnasium_check(env_id: str, env_kwargs: dict[str, Any]) -> CheckResult:
    env = gym.make(env_id, disable_env_checker=True, **env_kwargs).unwrapped
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env, skip_render_check=False)
    except Exception as e:
        return CheckResult("gymnasium check_env", False, f"{type(e).__name__}: {e}")
    finally:
        env.close()
    if caught:
        return CheckResult("gymnasium check_env", False, _warnings_text(caught))
    return CheckResult("gymnasium check_env", True, "passes with no warnings")


def _determinism(make: Callable[[], Any], seeds: list[int]) -> CheckResult:
    a, b = make(), make()
    try:
        for seed in seeds:
            if a.reset(seed=seed)[0] != b.reset(seed=seed)[0]:
                return CheckResult("seed determinism", False, f"seed {seed} gave two different first observations")
        firsts = {str(a.reset(seed=s)[0]) for s in seeds}
    finally:
        a.close()
        b.close()
    note = "" if len(firsts) > 1 or len(seeds) == 1 else " (note: every seed gave the same task)"
    return CheckResult("seed determinism", True, f"seeds {seeds} reproduce their observations{note}")


def _probes(first_obs: list[dict[str, str]], reference: str | None) -> dict[str, str]:
    question = next((m["content"] for m in reversed(first_obs) if m["role"] == "user"), "")
    probes = {"empty answer": "", "question echoed": question, "huge filler": "9" * HUGE_CHARS}
    if reference:
        probes["huge padding, then the reference"] = "x " * (HUGE_CHARS // 2) + reference
        probes["reference repeated"] = (reference + "\n") * max(2, HUGE_CHARS // max(len(reference), 1) // 10)
    return probes


def _episodes(make: Callable[[], Any], local: TextEnv, seeds: list[int]) -> list[CheckResult]:
    """Reference episodes and hack probes, played on `make()` envs (local or remote) with `local` as the oracle."""
    results = []
    env = make()
    try:
        for seed in seeds:
            first_obs, _ = local.reset(seed=seed)
            reference = local.reference_action()
            probes = _probes(first_obs, reference) | local.reward_hack_probes()
            if reference is None:
                results.append(CheckResult(f"reference (seed {seed})", True, "skipped: the env has no reference_action()"))
                ref_return = float("inf")
            else:
                # Play the whole episode with the oracle's reference actions.
                env.reset(seed=seed)
                ref_return, done, turns = 0.0, False, 0
                while not done and reference is not None and turns < 100:
                    _, reward, term, trunc, _ = env.step(reference)
                    local.step(reference)
                    ref_return, done, turns = ref_return + reward, term or trunc, turns + 1
                    reference = local.reference_action() if not done else None
                ok = ref_return > 0
                results.append(CheckResult(f"reference (seed {seed})", ok, f"return {ref_return:g} over {turns} turn(s)"
                                           + ("" if ok else "; the reference solution must score above 0")))
            bad = []
            for name, action in probes.items():
                env.reset(seed=seed)
                reward = env.step(action)[1]
                if reward > 0 or reward >= ref_return:
                    bad.append(f"{name!r} scored {reward:g}")
            results.append(CheckResult(f"reward-hack probes (seed {seed})", not bad,
                                       "; ".join(bad) if bad else f"{len(probes)} probes, none scored"))
    finally:
        env.close()
    return results


def run_env_checks(env_id: str, env_kwargs: dict[str, Any] | None = None, seeds: list[int] | None = None,
                   served: bool = False) -> list[CheckResult]:
    env_kwargs = dict(env_kwargs or {})
    seeds = seeds or [0, 1, 2]
    local = make_env(env_id, **env_kwargs)  # first: a bad id or bad kwargs fail here with a clear ValueError
    try:
        results = [_gymnasium_check(env_id, env_kwargs)]
        results.append(_determinism(lambda: make_env(env_id, **env_kwargs), seeds))
        results += _episodes(lambda: make_env(env_id, **env_kwargs), local, seeds)
        if served:
            results += _served_checks(env_id, env_kwargs, local, seeds)
    finally:
        local.close()
    return results


def _served_checks(env_id: str, env_kwargs: dict[str, Any], local: TextEnv, seeds: list[int]) -> list[CheckResult]:
    from envs.server.client import RemoteEnv
    from envs.server.config import EnvServerConfig
    from envs.server.local import ServerThread

    with ServerThread(EnvServerConfig(host="127.0.0.1", port=0, max_action_bytes=4 * HUGE_CHARS)) as server:
        make_remote = lambda: RemoteEnv(server.url, env_id, env_kwargs=env_kwargs)  # noqa: E731
        remote = make_remote()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check_env(remote, skip_render_check=True, skip_close_check=True)
            gym_result = CheckResult("served: gymnasium check_env", not caught,
                                     _warnings_text(caught) or f"passes over HTTP at {server.url}")
        except Exception as e:
            gym_result = CheckResult("served: gymnasium check_env", False, f"{type(e).__name__}: {e}")
        finally:
            remote.close()
        results = [gym_result, _determinism(make_remote, seeds)]
        results += _episodes(make_remote, local, seeds)
    return [CheckResult(r.name if r.name.startswith("served") else f"served: {r.name}", r.ok, r.detail) for r in results]
