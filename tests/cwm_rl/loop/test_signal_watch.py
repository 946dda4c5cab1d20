"""No silent spinning: groups without a learning signal are counted, explained and, past a limit,
stop the job checkpointed. Unit tests on hand-built trajectories, then one real job that never scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_rl.config import JobConfig, load_config
from cwm_rl.loop.signal_watch import SignalWatch
from cwm_rl.types import Span, Trajectory, Turn

MATH, CODE = "cwm_rl/Math-v0", "cwm_rl/Code-v0"


def episode(group: str, ret: float, verdict: str | None = "wrong", *, env_id: str = MATH, generated: int = 3,
            finish_reason: str = "terminated") -> Trajectory:
    """A one-turn episode: one prompt token, `generated` tokens, the env's verdict in the turn's info."""
    turns = [] if finish_reason == "env_error" else [
        Turn(index=0, action="x", reward=ret, info={} if verdict is None else {"verdict": verdict},
             action_span=Span(start=1, end=1 + generated))]
    return Trajectory(task_id="t", env_id=env_id, group_id=group, token_ids=[1] * (1 + generated), loss_mask=[0] + [1] * generated,
                      logprobs=[0.0] + [-0.5] * generated, policy_versions=[-1] + [0] * generated, turns=turns,
                      finish_reason=finish_reason, terminated=finish_reason == "terminated", **{"return": ret if turns else 0.0})


def group(name: str, *returns: float, verdict: str = "wrong", **kw) -> list[Trajectory]:
    """Episodes of one group: a positive return is verdict "correct", the others `verdict`."""
    return [episode(name, r, "correct" if r > 0 else verdict, **kw) for r in returns]


def test_counts_groups_and_zero_advantage_share_per_env():
    watch = SignalWatch(stop_after=0, warn_every=0)
    watch.add(group("a", -1, 1) + group("b", -1, -1) + group("c", 1, 1, env_id=CODE))
    watch.add(group("d", -1, -1, -1, -1))
    m = watch.metrics()
    assert m["zero_advantage_share"] == 0.75 and m["groups_without_signal_in_a_row"] == 3  # b, c, d: over all envs
    assert m[f"zero_advantage_share/{MATH}"] == pytest.approx(2 / 3) and m[f"zero_advantage_share/{CODE}"] == 1.0
    assert (m[f"reward_min/{MATH}"], m[f"reward_mean/{MATH}"], m[f"reward_max/{MATH}"]) == (-1.0, -0.75, 1.0)
    assert m[f"solved_share/{CODE}"] == 1.0 and m[f"solved_share/{MATH}"] == 0.125
    summary = watch.summary()
    assert summary["groups"] == 4 and summary["zero_advantage_groups"] == 3
    assert summary["groups_per_env"] == {MATH: 3, CODE: 1} and summary["zero_advantage_groups_per_env"] == {MATH: 2, CODE: 1}


def test_metrics_cover_only_the_last_window_of_groups():
    watch = SignalWatch(stop_after=0, warn_every=0, window=2)
    watch.add(group("a", -1, 1) + group("b", -1, -1) + group("c", -1, -1))
    assert watch.metrics()["zero_advantage_share"] == 1.0  # a has left the window
    assert watch.summary()["groups"] == 3  # the totals have not


def test_a_group_with_signal_resets_the_streak_and_says_the_signal_is_back():
    said = []
    watch = SignalWatch(stop_after=10, warn_every=2, say=said.append)
    watch.add(group("a", -1, -1) + group("b", -1, -1))
    assert watch.in_a_row == 2 and len(said) == 1 and said[0].startswith("no learning signal in the last 2 groups in a row")
    watch.add(group("c", -1, 1))
    assert watch.in_a_row == 0 and watch.streak == {} and said[-1].startswith("learning signal is back after 2 groups")
    watch.add(group("d", -1, -1))
    assert watch.in_a_row == 1 and watch.report() != "every recent group had a learning signal"
    assert [s.groups for s in watch.streak.values()] == [1]  # the report covers the new streak only


def test_warns_at_warn_every_then_each_time_the_streak_doubles_and_logs_the_metrics():
    said, logged = [], []
    watch = SignalWatch(stop_after=0, warn_every=2, say=said.append, log=logged.append)
    for i in range(20):
        watch.add(group(f"g{i}", -1, -1))
    assert [int(s.split("last ")[1].split()[0]) for s in said] == [2, 4, 8, 16]
    assert [m["groups_without_signal_in_a_row"] for m in logged] == [2, 4, 8, 16]
    assert not watch.stop  # stop_after=0: never


def test_stops_at_the_limit_and_says_so_once():
    said = []
    watch = SignalWatch(stop_after=5, warn_every=0, say=said.append)
    for i in range(4):
        watch.add(group(f"g{i}", -1, -1))
    assert not watch.stop and said == []
    watch.add(group("a", -1, -1) + group("b", -1, -1))  # a batch may cross the limit
    assert watch.stop and watch.in_a_row == 6
    assert len(said) == 1 and "stopping (stop_without_signal_groups=5)" in said[0]
    watch.add(group("c", -1, -1))
    assert len(said) == 1


def _cause(*groups: list[Trajectory], max_tokens: int | None = 16) -> str:
    watch = SignalWatch(stop_after=0, warn_every=0, max_tokens=max_tokens)
    for g in groups:
        watch.add(g)
    return watch.report()


def test_the_likely_cause_every_episode_failed():
    report = _cause(group("a", -1, -1, -1), group("b", -1, -1, -1))
    assert "every episode failed" in report and "returns -1 x6 (min -1, mean -1, max -1)" in report
    assert "likely cause: the tasks are too hard for the model" in report


def test_the_likely_cause_a_format_the_model_never_produces():
    report = _cause(group("a", -1, -1, -1, verdict="format_error"), group("b", -1, -1, verdict="wrong"))
    assert "60% verdict format_error" in report and "likely cause: a format the model never produces" in report


def test_the_likely_cause_episodes_cut_at_max_tokens():
    report = _cause(group("a", -1, -1, generated=16, verdict="format_error"), group("b", -1, -1, generated=16))
    assert "100% cut at max_tokens (16)" in report
    assert "likely cause: episodes are cut at max_tokens (16 per turn) before the model answers" in report
    # the context filling up counts too, whatever max_tokens is
    report = _cause(group("a", -1, -1, finish_reason="max_tokens"), max_tokens=None)
    assert "likely cause: episodes are cut at" in report


def test_the_likely_cause_tasks_too_easy():
    report = _cause(group("a", 1, 1, 1), group("b", 1, 1, 1, env_id=CODE))
    assert report.count("every episode succeeded") == 2 and report.count("likely cause: the tasks are too easy") == 2
    assert f"  {MATH}: 1 groups" in report and f"  {CODE}: 1 groups" in report  # one line per env


def test_the_likely_cause_env_errors_groups_of_one_and_tasks_always_or_never_solved():
    assert "likely cause: the env fails, not the model" in _cause(group("a", 0, 0, finish_reason="env_error"))
    assert "likely cause: rollout.group_size is 1" in _cause(group("a", -1), group("b", 1))
    report = _cause(group("a", 1, 1), group("b", -1, -1))
    assert "50% of episodes succeeded" in report and "likely cause: every sample of a task scores alike" in report


def test_without_a_verdict_a_positive_return_counts_as_solved():
    report = _cause([episode("a", 1.0, verdict=None), episode("a", 1.0, verdict=None)])
    assert "every episode succeeded" in report


def test_sinks_log_the_watch_between_steps(tmp_path):
    from cwm_rl.loop.sinks import Sinks

    sinks = Sinks(JobConfig(logging={"tensorboard": False, "progress": False}), tmp_path)
    sinks.open()
    watch = SignalWatch(stop_after=0, warn_every=1, log=lambda metrics: sinks.log_signal(metrics, step=3))
    watch.add(group("a", -1, -1))
    sinks.close()
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 3 and line["zero_advantage_share"] == 1.0 and line["groups_without_signal_in_a_row"] == 1
    assert line[f"reward_mean/{MATH}"] == -1.0


def test_config_limits():
    config = JobConfig()
    assert (config.warn_without_signal_groups, config.stop_without_signal_groups) == (32, 512)
    assert load_config(None, ["stop_without_signal_groups=0"]).stop_without_signal_groups == 0
    with pytest.raises(ValueError, match="stop_without_signal_groups"):
        load_config(None, ["stop_without_signal_groups=-1"])


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_job_without_learning_signal_stops_checkpointed_and_says_why(tiny_model, tmp_path):
    """The random tiny model never solves 3-digit arithmetic: every group is zero-advantage, no step
    is ever made, and the job stops by itself with the likely cause, a checkpoint and a summary."""
    run_dir = tmp_path / "run"
    cli = str(Path(sys.executable).with_name("cwm-rl"))
    settings = [f"run_dir={run_dir}", f"model.path={tiny_model}", "rollout.engine.enforce_eager=true", "steps=50", "eval.num_tasks=4", "max_minutes=8",
                "envs=[{id: cwm_rl/Math-v0, kwargs: {difficulty: 3}}]", "trainer.filters.drop_zero_advantage_groups=true",
                "rollout.group_size=4", "rollout.groups_per_request=2", "buffer_groups=8", "rollout.sampling.max_tokens=8",
                "eval.max_tokens=8", "trainer.batch.step_tokens=32", "checkpoint_every=0", "logging.tensorboard=false",
                "warn_without_signal_groups=8", "stop_without_signal_groups=24"]
    args = [cli, "train", str(Path(__file__).parents[3] / "configs" / "quickstart.yaml")] + [a for s in settings for a in ("--set", s)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=540)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-4000:]
    assert "no learning signal in the last 8 groups in a row" in done.stdout, text[-4000:]  # the warning, before the stop
    assert "stopping (stop_without_signal_groups=24)" in done.stdout, text[-4000:]
    assert "every episode failed" in done.stderr and "likely cause:" in done.stderr, text[-4000:]
    assert f"cwm-rl train --resume {run_dir}" in done.stderr, text[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "no_learning_signal" and summary["steps"] == 0
    signal = summary["learning_signal"]
    assert signal["groups_without_signal_in_a_row"] >= 24 and signal["zero_advantage_share"] == 1.0
    assert signal["groups"] == signal["zero_advantage_groups"] and "likely cause" in signal["report"]
    assert any((run_dir / "checkpoints").iterdir())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "zero_advantage_share" in x]
    assert logged and logged[-1]["zero_advantage_share"] == 1.0 and logged[-1]["groups_without_signal_in_a_row"] >= 24
    assert "reward_mean/cwm_rl/Math-v0" in logged[-1]
