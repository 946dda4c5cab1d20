"""The train progress view: a live panel on a terminal, plain greppable lines in a log."""

from __future__ import annotations

import io

from rich.console import Console

from cwm_rl.loop.progress import ProgressView


def metrics(step: int, reward: float) -> dict:
    return {"step": step, "new_policy_version": step + 1, "reward_mean": reward, "loss": 0.01, "sequences": 32,
            "dropped_stale": 0, "staleness_mean": 0.5, "buffer_groups": 3, "tokens_per_s": 812.0, "step_time_s": 0.4}


def test_in_a_log_every_step_is_one_plain_line_and_there_is_no_panel():
    out = io.StringIO()
    view = ProgressView(enabled=True, total_steps=10, buffer_groups=16, title="runs/x", console=Console(file=out, width=200))
    assert view.live is None  # not a terminal
    view.say("warm start: SFT 10 steps")
    view.eval(0, 0.25, {"cwm_rl/Math-v0": 0.25})
    view.step(metrics(0, 0.5))
    view.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in out.getvalue()  # no colour codes in a log
    assert lines[1].endswith("eval at step 0: held-out greedy accuracy 25.0%")
    assert "step    1  v1    reward +0.500" in lines[2] and "buffer 3/16" in lines[2] and "812 tok/s" in lines[2]


def test_on_a_terminal_the_live_panel_shows_the_run_numbers():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    view = ProgressView(enabled=True, total_steps=10, buffer_groups=16, title="runs/x", console=console)
    assert view.live is not None
    view.eval(0, 0.25, {"m": 0.25})
    for step, reward in enumerate([0.1, 0.3, 0.5]):
        view.step(metrics(step, reward))
    view.eval(3, 0.5, {"m": 0.5})
    panel = Console(file=io.StringIO(), width=120, record=True)
    panel.print(view.panel())
    text = panel.export_text()
    view.close()
    assert "cwm-rl train: runs/x" in text and "3 / 10" in text
    assert "+0.500 (last 10: +0.300)" in text  # last step's reward and the running mean
    assert "25.0% -> 50.0%" in text and "812" in text and "3/16 groups" in text and "0.50" in text
    assert "step    3" in out.getvalue()  # the lines still scroll above the panel


def test_a_mix_shows_each_envs_held_out_accuracy_in_the_panel_and_the_eval_lines():
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)
    view = ProgressView(enabled=True, total_steps=10, buffer_groups=16, title="runs/x", console=console)
    view.eval(0, 0.47, {"cwm_rl/Math-v0": 0.6, "cwm_rl/Trace-v0": 0.34})
    view.eval(10, 0.57, {"cwm_rl/Math-v0": 0.725, "cwm_rl/Trace-v0": 0.415})
    panel = Console(file=io.StringIO(), width=160, record=True)
    panel.print(view.panel())
    text = panel.export_text()
    view.close()
    assert "47.0% -> 57.0%" in text  # the mean over envs
    assert "cwm_rl/Math-v0" in text and "60.0% -> 72.5%" in text and "cwm_rl/Trace-v0" in text and "34.0% -> 41.5%" in text
    assert "eval at step 10: held-out greedy accuracy 57.0% (mean over envs): cwm_rl/Math-v0 72.5%, cwm_rl/Trace-v0 41.5%" in out.getvalue()


def test_disabled_view_prints_nothing():
    out = io.StringIO()
    view = ProgressView(enabled=False, total_steps=10, buffer_groups=16, title="x", console=Console(file=out, force_terminal=True))
    view.say("hello")
    view.step(metrics(0, 0.0))
    view.close()
    assert view.live is None and out.getvalue() == ""
