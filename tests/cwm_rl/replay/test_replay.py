"""Replay and rescore on real envs (Math with its verifier pool, multi-turn Echo, an env server), from
trajectories recorded by stepping the envs with scripted actions; the CLI on a store of them.
Replays of what real jobs stored are in tests/cwm_rl/loop/test_job_envs.py and test_driver.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest

from cwm_rl.replay.replay import replay
from cwm_rl.replay.rescore import rescore, return_histogram
from cwm_rl.store import RolloutStore
from cwm_rl.types import Task
from envs import SingleTurnEnv

CLI = str(Path(sys.executable).with_name("cwm-rl"))


class Clock(SingleTurnEnv):
    """Scores like a verifier but also reports the time it took: a field that is never the same twice."""

    def sample_task(self, rng):
        return Task(id=f"clock-{int(rng.integers(100))}", prompt="Say yes.", answer="yes")

    def score(self, task, action):
        return float(action == task.answer), {"verdict": action == task.answer, "checked_at": time.time()}


class DeclaredClock(Clock):
    replay_may_differ = {"info.checked_at": "the time of the check"}


class Broken(SingleTurnEnv):
    """A verifier that raises on every answer once `broken=True`."""

    def __init__(self, broken: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.broken = broken

    def sample_task(self, rng):
        return Task(id="broken-1", prompt="Say yes.", answer="yes")

    def score(self, task, action):
        if self.broken:
            raise KeyError("verdict")
        return float(action == task.answer), {}


class FewShot(SingleTurnEnv):
    """Its first observation holds an example answer in the assistant role, as few-shot prompts do."""

    def sample_task(self, rng):
        return Task(id="few-shot", prompt="Say yes.", answer="yes")

    def first_messages(self, task):
        return [{"role": "user", "content": "Say no."}, {"role": "assistant", "content": "no"},
                {"role": "user", "content": task.prompt}]

    def score(self, task, action):
        return float(action == task.answer), {}


gym.register(id="test_replay/Clock-v0", entry_point=Clock)
gym.register(id="test_replay/DeclaredClock-v0", entry_point=DeclaredClock)
gym.register(id="test_replay/Broken-v0", entry_point=Broken)
gym.register(id="test_replay/FewShot-v0", entry_point=FewShot)


def test_math_replays_identically_and_a_changed_record_is_named(scripted):
    t = scripted("cwm_rl/Math-v0", ["The answer is \\boxed{5}."], seed=3, env_kwargs={"difficulty": 2})
    report = replay(t)
    assert report.identical and report.first_divergence is None and report.replayed_return == t.return_
    assert [d.turn for d in report.turns] == [-1, 0] and not any(d.diffs for d in report.turns)
    tampered = t.model_copy(deep=True)
    tampered.turns[0].info["gold"] = "not the gold answer"
    report = replay(tampered)
    assert not report.identical
    assert report.first_divergence == f'turn 0: info.gold "not the gold answer" -> "{t.turns[0].info["gold"]}"'


def test_multi_turn_echo_replays_and_divergences_say_where(scripted):
    task = Task(id="echo-3", prompt="Repeat exactly: apple", answer=["apple", "river", "stone"])
    t = scripted("cwm_rl/Echo-v0", ["apple", "nope", "stone"], task=task, env_kwargs={"num_rounds": 3})
    assert [turn.reward for turn in t.turns] == [1.0, 0.0, 1.0]
    report = replay(t)
    assert report.identical and report.replayed_rewards == [1.0, 0.0, 1.0]
    wrong = t.model_copy(deep=True)
    wrong.turns[1].observation[0].content = "Repeat exactly: ember"
    assert replay(wrong).first_divergence.startswith('turn 1: observation [{"role": "user", "content": "Repeat exactly: ember"}]')
    # An env that ends sooner than the record: the turn it ended at is named, and nothing after it is stepped.
    short = Task(id="echo-3", prompt="Repeat exactly: apple", answer=["apple", "river"])  # same id, fewer rounds
    ended = replay(t.model_copy(update={"task": short}))
    assert ended.first_divergence == 'turn 1: observation [{"role": "user", "content": "Repeat exactly: stone"}] -> []'
    assert [d.turn for d in ended.turns] == [-1, 0, 1]
    assert any(d.field == "terminated" and d.replayed is True for d in ended.turns[2].diffs)


def test_replay_against_an_env_server(scripted, server):
    t = scripted("cwm_rl/Math-v0", ["\\boxed{12}"], seed=7)
    report = replay(t, server=server.url)
    assert report.identical and report.target == server.url


def test_fields_an_env_declares_nondeterministic_are_reported_not_counted(scripted):
    plain = replay(scripted("test_replay/Clock-v0", ["yes"], seed=1))
    assert not plain.identical and plain.first_divergence.startswith("turn 0: info.checked_at")
    declared = replay(scripted("test_replay/DeclaredClock-v0", ["yes"], seed=1))
    assert declared.identical
    assert [(d.field, d.expected) for d in declared.turns[1].diffs] == [("info.checked_at", "the time of the check")]


def test_what_cannot_be_replayed_says_why(scripted):
    t = scripted("cwm_rl/Echo-v0", ["apple"], seed=2, env_kwargs={"num_rounds": 1})
    old = replay(t.model_copy(update={"task": None, "seed": None}))
    assert "records neither its task nor its seed" in old.error and not old.identical
    gone = replay(t.model_copy(update={"env_id": "gone/Env-v0"}))
    assert "gone/Env-v0 is not registered in this process" in gone.error and "--import" in gone.error
    # A recorded step that failed outside the env (the server was unreachable) replays fine: reported, not a divergence.
    unreachable = t.model_copy(update={"finish_reason": "env_unavailable", "error": "env step: connection refused", "terminated": False})
    report = replay(unreachable)
    assert report.identical and report.turns[1].diffs[0].field == "step_error"
    crashed = unreachable.model_copy(update={"finish_reason": "env_error", "error": "env step raised KeyError: 'x'"})
    assert replay(crashed).first_divergence == "turn 0: step_error \"env step raised KeyError: 'x'\" -> null"


def test_rescore_with_changed_kwargs_flips_and_keeps_the_originals(scripted):
    wrong_answer = [scripted("cwm_rl/Math-v0", ["\\boxed{-1}"], seed=s) for s in range(4)]
    assert all(t.return_ == -1.0 for t in wrong_answer)
    kind = scripted("cwm_rl/Math-v0", ["\\boxed{-1}"], seed=9, env_kwargs={"wrong_reward": 0.0})
    rescore_set, results = rescore(wrong_answer + [kind], env_kwargs={"wrong_reward": 0.5})
    assert rescore_set.num_trajectories == 5 and rescore_set.num_changed == 5 and rescore_set.num_flipped == 5
    assert [r.new_return for r in results] == [0.5] * 5 and [r.old_return for r in results] == [-1.0] * 4 + [0.0]
    assert rescore_set.mean_return_before == pytest.approx(-0.8) and rescore_set.mean_return_after == pytest.approx(0.5)
    assert rescore_set.label == "wrong_reward=0.5"
    assert return_histogram([-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]) == [("-1", 2, 0), ("0", 1, 0), ("0.5", 0, 3)]


STRICT_VERIFIER = '''
import gymnasium as gym
from envs.math_env import MathEnv


class Strict(MathEnv):
    """A changed verifier: every answer is wrong."""

    def score(self, task, action):
        reward, info = super().score(task, action)
        return self.wrong_reward, {**info, "verdict": "strict"}


gym.register(id="cwm_rl/Math-v0", entry_point=Strict)
'''


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "rollouts", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_the_cli_replays_many_rescores_with_an_imported_verifier_and_never_writes_the_store(scripted, tmp_path):
    gold = [scripted("cwm_rl/Math-v0", [answer], seed=s) for s in range(3) for answer in ("\\boxed{0}",)]
    env = __import__("envs").make_env("cwm_rl/Math-v0")
    right = []
    for s in range(3):  # the right answers, found by resetting with the same seed
        env.reset(seed=10 + s)
        right.append(scripted("cwm_rl/Math-v0", [env.reference_action()], seed=10 + s))
    env.close()
    assert all(t.return_ == 1.0 for t in right)
    with RolloutStore(tmp_path) as store:
        store.add(gold + right)
    before = (tmp_path / "rollouts.sqlite").read_bytes()

    done = _cli("replay", str(tmp_path), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    reports = json.loads(done.stdout)
    assert len(reports) == 6 and all(r["identical"] for r in reports)

    one = _cli("replay", str(tmp_path), right[0].trajectory_id[:8], cwd=tmp_path)
    assert one.returncode == 0 and "turn 0: identical" in one.stdout and "identical" in one.stdout.splitlines()[-1]

    (tmp_path / "strict_verifier.py").write_text(STRICT_VERIFIER)
    rescored = _cli("rescore", str(tmp_path), "--import", "strict_verifier", "--json", cwd=tmp_path)
    assert rescored.returncode == 0, rescored.stderr
    summary = json.loads(rescored.stdout)
    assert sorted(summary["flipped"]) == sorted(t.trajectory_id for t in right)  # right answers became wrong
    assert summary["num_trajectories"] == 6 and summary["mean_return_after"] == -1.0
    assert summary["label"] == "import strict_verifier"

    # Replaying with the changed verifier diverges: exit 1 and the first divergence named.
    diverged = _cli("replay", str(tmp_path), right[1].trajectory_id, "--import", "strict_verifier", cwd=tmp_path)
    assert diverged.returncode == 1 and "turn 0: reward DIVERGED" in diverged.stdout, diverged.stdout
    assert "diverged: turn 0: reward 1.0 -> -1.0" in diverged.stdout.replace("\n", " ")

    bad = _cli("replay", str(tmp_path), "zzzz", cwd=tmp_path)
    assert bad.returncode == 2 and "no trajectory with id or id prefix 'zzzz'" in bad.stderr
    assert (tmp_path / "rollouts.sqlite").read_bytes() == before  # only analysis.sqlite was written

    from cwm_rl.replay.results import open_results

    results = open_results(tmp_path)
    assert len(results.replays(limit=100)) == 8 and results.rescore_sets()[0].num_flipped == 3
    results.close()

    # A change no trajectory can be replayed with is bad input, not an empty result.
    typo = _cli("rescore", str(tmp_path), "--kwarg", "wrong_rewrd=0", cwd=tmp_path)
    assert typo.returncode == 2 and "none of the 6 trajectories could be replayed" in typo.stderr, typo.stderr
    assert "unexpected keyword argument 'wrong_rewrd'" in typo.stderr


def test_a_verifier_that_now_raises_is_an_error_not_a_flip_and_a_recorded_crash_that_recurs_is_identical(scripted):
    t = scripted("test_replay/Broken-v0", ["yes"], seed=0)
    assert t.return_ == 1.0
    rescore_set, (result,) = rescore([t], env_kwargs={"broken": True})
    assert result.new_return is None and not result.flipped and "KeyError" in result.error
    assert (rescore_set.num_errors, rescore_set.num_flipped, rescore_set.mean_return_after) == (1, 0, None)
    # Recorded as the agent loop records a crash; the replay crashes the same way: nothing diverged.
    crashed = t.model_copy(update={"finish_reason": "env_error", "error": "env step raised KeyError: 'verdict'",
                                   "terminated": False, "env_kwargs": {"broken": True}})
    assert replay(crashed).identical


def test_assistant_messages_sent_by_the_env_are_not_taken_for_actions(scripted):
    t = scripted("test_replay/FewShot-v0", ["yes"], seed=0)
    assert t.messages_before_turn(0) == 3 and [m.role for m in t.messages] == ["user", "assistant", "user", "assistant"]
    assert replay(t).identical


def test_branch_rebuilds_the_env_at_a_turn_and_refuses_a_prefix_that_diverges(scripted):
    """What `rollouts branch` does before generating (no model needed): replay turns < K on a fresh env and check them."""
    from cwm_rl.replay.branch import BranchError, _env_at

    task = Task(id="echo-3", prompt="Repeat exactly: apple", answer=["apple", "river", "stone"])
    t = scripted("cwm_rl/Echo-v0", ["apple", "nope", "stone"], task=task, env_kwargs={"num_rounds": 3})
    env = _env_at(t, 2, None, None)  # reset + turns 0 and 1 replayed and checked
    try:
        observation, reward, terminated, *_ = env.step(t.turns[2].action)
        assert (reward, terminated) == (1.0, True)
    finally:
        env.close()
    tampered = t.model_copy(deep=True)
    tampered.turns[0].reward = 0.0
    with pytest.raises(BranchError, match=r"replaying turns < 2 .*\(turn 0: reward 0.0 -> 1.0\)"):
        _env_at(tampered, 2, None, None)
