"""The tracer (run in the real bubblewrap sandbox), trace scoring, `cwm_rl/Trace-v0` and `cwm-rl trace`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from envs import make_env
from envs.trace.programs import LEVELS, generate_program
from rewards.trace import render_trace, score_output, score_trace

PROGRAM = "def f(x):\n    y = x + 1\n    if y > 3:\n        y = y * 2\n    print('y is', y)\n    return [y, x]\n"


@pytest.fixture(scope="module")
def traced(sandbox_root):
    from envs.trace import run_trace

    return run_trace(PROGRAM, "f", [3])


def test_tracer_records_lines_changed_locals_and_the_return(traced):
    assert [(e["event"], e["line"]) for e in traced["events"]] == [
        ("call", 1), ("line", 2), ("line", 3), ("line", 4), ("line", 5), ("line", 6), ("return", 6)]
    assert traced["events"][0]["locals"] == {"x": 3}
    assert traced["events"][2]["locals"] == {"y": 4}  # set by line 2, seen before line 3 runs
    assert traced["events"][4]["locals"] == {"y": 8}
    assert traced["events"][5]["locals"] == {}  # printing changed nothing: elided
    assert (traced["return_repr"], traced["return"], traced["stdout"]) == ("[8, 3]", [8, 3], "y is 8\n")


def test_tracer_reports_exceptions_and_runs_sandboxed(sandbox_root):
    from envs.trace import TraceError, run_trace

    result = run_trace("def g(a):\n    return 1 // a\n", "g", [0])
    assert result["exception"] == "ZeroDivisionError: integer division or modulo by zero" and result["return_repr"] is None
    assert [e["event"] for e in result["events"]][-2:] == ["exception", "return"]
    result = run_trace("import os\ndef h():\n    return os.getuid(), os.path.exists('/work/main')\n", "h")
    assert result["return"][0] != 0 and result["return"][1] is False  # not root, and not on the host's filesystem
    with pytest.raises(TraceError, match="SyntaxError"):
        run_trace("def broken(:\n", "broken")
    result = run_trace("def spin(n):\n    while True:\n        n += 1\n", "spin", [0], max_events=50)
    assert result["truncated"] and len(result["events"]) == 50


def test_trace_scoring_gives_partial_credit(traced):
    reference = traced["events"]
    exact = f"<trace>\n{render_trace(reference)}\n</trace>"
    assert score_trace(exact, reference)[0] == 1.0
    # Spacing and key order inside the JSON do not matter.
    loose = exact.replace('{"x": 3}', '{ "x":3 }')
    assert score_trace(loose, reference)[0] == 1.0
    wrong_value = exact.replace('{"y": 8}', '{"y": 9}')
    score, info = score_trace(wrong_value, reference)
    assert 0.8 < score < 1.0 and info["first_mismatch"] == 4 and info["verdict"] == "partial"
    half = "<trace>\n" + "\n".join(render_trace(reference).splitlines()[:3]) + "\n</trace>"
    assert score_trace(half, reference)[0] == pytest.approx(2 * 3 / (3 + 7))
    assert score_trace("no tags", reference) == (0.0, {"verdict": "format_error", "score": 0.0,
                                                        "reason": "expected exactly one <trace>...</trace>, found 0"})


def test_output_scoring(traced):
    assert score_output("<return>[8,3]</return><stdout>y is 8</stdout>", traced)[0]
    assert not score_output("<return>[8, 3]</return>", traced)[0]  # the print is part of the answer
    assert not score_output("<return>[8.0, 3]</return><stdout>y is 8\n</stdout>", traced)[0]
    assert not score_output("<return>f(3)</return><stdout>y is 8</stdout>", traced)[0]
    correct, info = score_output("<return>[8, 3]</return> <return>[8, 3]</return>", traced)
    assert not correct and info["verdict"] == "format_error"


@pytest.mark.parametrize("level", LEVELS)
def test_generated_programs_trace_and_score_their_reference(sandbox_root, level):
    for mode in ("output", "trace"):
        env = make_env("cwm_rl/Trace-v0", mode=mode, difficulty=level)
        obs, _ = env.reset(seed=level)
        assert "The call: `f(" in obs[-1]["content"] and " 1 | def f(" in obs[-1]["content"]
        assert env.step(env.reference_action())[1:3] == (1.0, True)
    rng = np.random.default_rng(level)
    assert len({generate_program(rng, level)[0] + repr(generate_program(rng, level)[2]) for _ in range(10)}) > 2


def test_trace_mode_reward_is_interpolated(sandbox_root):
    env = make_env("cwm_rl/Trace-v0", mode="trace", difficulty=3)
    env.reset(seed=0)
    lines = env.reference_action().splitlines()
    _, reward, _, _, info = env.step("\n".join(lines[:1] + lines[2:]))  # one event left out
    assert -1.0 < reward < 1.0 and reward == pytest.approx(-1 + 2 * info["score"], abs=1e-3)


def test_env_checks_pass_locally_and_served(sandbox_root):
    from cwm_rl.env_check import run_env_checks

    for kwargs in ({"mode": "output", "difficulty": 4}, {"mode": "trace", "difficulty": 2}):
        results = run_env_checks("cwm_rl/Trace-v0", kwargs, seeds=[0, 1], served=True)
        assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_cli_trace_and_dataset_feed_the_env(sandbox_root, tmp_path):
    (tmp_path / "progs").mkdir()
    (tmp_path / "progs" / "calc.py").write_text("def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n")
    (tmp_path / "progs" / "calc.inputs.jsonl").write_text('{"function": "total", "args": [[1, 2]]}\n'
                                                           '{"function": "total", "args": [[]]}\n')
    cli = [sys.executable, "-m", "cwm_rl.cli", "trace"]
    r = subprocess.run([*cli, f"{tmp_path}/progs/calc.py::total", "--args", "[[4, 5]]"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "line 4: {\"x\": 4}" in r.stdout and "return 5: 9" in r.stdout and "returned: 9" in r.stdout
    out = tmp_path / "traces.jsonl"
    r = subprocess.run([*cli, "dataset", str(tmp_path / "progs"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "wrote 2 traced calls" in r.stdout, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["return"] for r in records] == [3, 0] and records[0]["trace"].startswith('call 1: {"xs": [1, 2]}')
    env = make_env("cwm_rl/Trace-v0", mode="trace", tasks_path=str(out))
    env.reset(seed=0)
    assert env.task.id.startswith("calc-total-") and env.step(env.reference_action())[1] == 1.0
    r = subprocess.run([*cli, "dataset", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: cwm-rl trace dataset DIR --out FILE.jsonl" in r.stderr


def test_bad_kwargs_are_refused():
    with pytest.raises(ValueError, match="mode must be"):
        make_env("cwm_rl/Trace-v0", mode="guess")
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_env("cwm_rl/Trace-v0", difficulty=9)


def test_many_calls_trace_in_one_run_and_module_prints_stay_out(sandbox_root):
    from envs.trace import run_traces

    noisy = "print('imported!')\ndef f(x):\n    print('called', x)\n    return x * 2\n"
    results = run_traces([{"source": noisy, "function": "f", "args": [i]} for i in range(5)])
    assert [r["return"] for r in results] == [0, 2, 4, 6, 8]
    assert [r["stdout"] for r in results] == [f"called {i}\n" for i in range(5)]


def test_cli_generate_writes_distinct_traced_programs(sandbox_root, tmp_path):
    out = tmp_path / "level2.jsonl"
    r = subprocess.run([sys.executable, "-m", "cwm_rl.cli", "trace", "generate", "--difficulty", "2", "--count", "30",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "wrote 30 traced programs" in r.stdout, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["id"] for r in records}) == 30 and all(r["events"][0]["event"] == "call" for r in records)
    env = make_env("cwm_rl/Trace-v0", mode="output", tasks_path=str(out))
    env.reset(seed=3)
    assert env.step(env.reference_action())[1] == 1.0
