"""`cwm_rl/Code-v0` and its grader with the real bubblewrap sandbox (and Docker once): formats,
stdin/stdout and function tests, partial credit, cheating that must not pass, loaders, the server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from envs import make_env
from envs.tasks.code_tasks import generated_code_task, load_code_tasks
from rewards.code import extract_code, grade_function, grade_stdio

SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}, {"input": "0 0\n", "output": "0\n"}]
HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
             "canonical_solution": "    return a + b\n", "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}


@pytest.fixture(scope="module")
def bwrap(sandbox_root):
    from envs.sandbox import shared_sandbox

    return shared_sandbox("bwrap")


def code(text: str) -> str:
    return f"```python\n{text}\n```"


def test_extract_code_wants_exactly_one_python_block():
    assert extract_code(code("print(1)")) == ("print(1)\n", "")
    assert extract_code("Here:\n```\nprint(2)\n```\nDone.")[0] == "print(2)\n"
    assert extract_code("print(1)")[0] is None
    assert "found 2" in extract_code(code("a = 1") + "\n" + code("b = 2"))[1]
    assert "tagged 'bash'" in extract_code("```bash\nrm -rf /\n```")[1]
    assert extract_code(code("   "))[0] is None
    assert extract_code("<think>plan</think>\n" + code("x = 1"), think=True)[0] == "x = 1\n"
    assert "exactly one </think>" in extract_code(code("x = 1"), think=True)[1]
    assert extract_code(code("x = 1") + "<think></think>", think=True)[0] is None  # the block must follow </think>


def test_stdio_grading(bwrap):
    good = "a, b = map(int, input().split())\nprint(a + b)\n"
    verdict = grade_stdio(good, SUM_TESTS, bwrap)
    assert verdict.correct and (verdict.passed, verdict.total) == (3, 3)
    # Trailing spaces and a missing final newline are fine; a wrong answer on one test is not.
    assert grade_stdio("a, b = map(int, input().split())\nprint(str(a + b) + '   ', end='')\n", SUM_TESTS, bwrap).correct
    bad = "a, b = map(int, input().split())\nprint(a + b if a != 10 else 0)\n"
    verdict = grade_stdio(bad, SUM_TESTS, bwrap, stop_at_first_failure=False)
    assert not verdict.correct and (verdict.passed, verdict.total) == (2, 3)
    failed = [t for t in verdict.tests if not t["passed"]]
    assert len(failed) == 1 and failed[0]["index"] == 1 and failed[0]["reason"] == "wrong output" and failed[0]["got"] == "0\n"
    crash = grade_stdio("raise ValueError('boom')\n", SUM_TESTS, bwrap)
    assert crash.tests[0]["reason"] == "exit code 1" and "ValueError: boom" in crash.tests[0]["stderr"]
    assert len(crash.tests) == 1  # stopped at the first failure


def test_function_grading_humaneval_and_asserts(bwrap):
    task = load_code_tasks_from([HUMANEVAL])[0]
    verdict = grade_function(task.answer, sandbox=bwrap, test=task.metadata["test"], entry_point="add")
    assert verdict.correct, verdict
    verdict = grade_function("def add(a, b):\n    return a - b\n", sandbox=bwrap, test=task.metadata["test"], entry_point="add")
    assert not verdict.correct and "AssertionError" in verdict.tests[0]["stderr"]
    asserts = ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1"]
    verdict = grade_function("def sq(x):\n    return x * x if x > 0 else 0\n", sandbox=bwrap, asserts=asserts)
    assert (verdict.passed, verdict.total, verdict.status) == (2, 3, "failed") and not verdict.tests[2]["passed"]


@pytest.mark.parametrize("cheat", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "def add(a, b):\n    return 0\nimport os\nos._exit(0)",
    "print('All tests passed')\nprint('[[true, \"\"]]')",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return 0",
    "import sys\nclass Fake:\n    def __eq__(self, other): return True\ndef add(a, b):\n    sys.exit(0)",
])
def test_cheats_never_pass(bwrap, cheat):
    verdict = grade_function(cheat, sandbox=bwrap, test=HUMANEVAL["test"], entry_point="add")
    assert not verdict.correct and verdict.passed == 0, verdict
    verdict = grade_function(cheat, sandbox=bwrap, asserts=["assert add(1, 2) == 3"])
    assert not verdict.correct, verdict


def test_a_hanging_solution_meets_the_per_test_timeout(bwrap):
    from envs.sandbox import Limits

    verdict = grade_stdio("while True:\n    pass\n", SUM_TESTS, bwrap, Limits(timeout_s=1, cpu_s=5))
    assert not verdict.correct and verdict.tests[0]["reason"] == "limit hit: timeout"


def load_code_tasks_from(records, tmp_path_factory=None):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_code_tasks(path)


def test_loaders_read_the_common_forms():
    tasks = load_code_tasks_from([
        HUMANEVAL,
        {"task_id": 11, "text": "Write sq(x).", "test_list": ["assert sq(2) == 4"], "code": "def sq(x):\n    return x * x"},
        {"id": "io-1", "question": "Sum two ints.", "tests": SUM_TESTS, "solution": "print(sum(map(int, input().split())))"},
        {"problem_id": 7, "description": "Echo.", "input_output": json.dumps({"inputs": ["a\n"], "outputs": ["a\n"]})},
        {"prompt": "Double.", "inputs": ["2\n"], "outputs": ["4\n"]},
    ])
    assert [t.metadata["kind"] for t in tasks] == ["function", "function", "stdio", "stdio", "stdio"]
    assert tasks[0].id == "HumanEval/0" and tasks[0].answer.startswith("def add(a, b):") and "return a + b" in tasks[0].answer
    assert tasks[1].id == "11" and tasks[1].metadata["asserts"] == ["assert sq(2) == 4"]
    assert tasks[2].metadata["tests"] == SUM_TESTS and tasks[3].metadata["tests"] == [{"input": "a\n", "output": "a\n"}]
    assert tasks[4].id.endswith("-4")


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "no tests"}, "needs a statement"),
    ({"prompt": "bad tests", "tests": [{"stdin": "1"}]}, "each test must be"),
    ({"text": "", "test_list": ["assert f()"]}, "needs `prompt`"),
])
def test_loaders_refuse_bad_records_clearly(record, message):
    with pytest.raises(ValueError, match=message):
        load_code_tasks_from([record])


def test_generated_tasks_are_solved_by_their_reference(bwrap):
    rng = np.random.default_rng(0)
    for _ in range(6):
        task = generated_code_task(rng)
        meta = task.metadata
        if meta["kind"] == "stdio":
            verdict = grade_stdio(task.answer, meta["tests"], bwrap)
        else:
            verdict = grade_function(task.answer, sandbox=bwrap, asserts=meta["asserts"])
        assert verdict.correct, (task, verdict)


def test_env_rewards_info_and_partial_credit(sandbox_root):
    env = make_env("cwm_rl/Code-v0", kind="stdio", partial_credit=True)
    obs, info = env.reset(seed=3)
    assert obs[0]["role"] == "system" and "```python" in obs[0]["content"] and "standard input" in obs[1]["content"]
    assert env.step(env.reference_action())[1:3] == (1.0, True)
    env.reset(seed=3)
    tests = env.task.metadata["tests"]
    first = tests[0]["output"].strip()  # right on the first test only
    _, reward, _, _, info = env.step(code(f"print({first})"))
    right = sum(t["output"].strip() == first for t in tests)
    assert reward == pytest.approx(-1 + 2 * right / len(tests)) and info["total"] == len(tests)
    assert info["failed_test"]["reason"] == "wrong output"
    env.reset(seed=3)
    _, reward, _, _, info = env.step("no code here")
    assert reward == -1.0 and info["verdict"] == "format_error"


def test_env_check_passes_locally_and_served(sandbox_root):
    from cwm_rl.env_check import run_env_checks

    results = run_env_checks("cwm_rl/Code-v0", seeds=[0, 1, 2], served=True)
    assert len(results) >= 5 and all(r.ok for r in results), [r for r in results if not r.ok]


def test_env_under_docker(sandbox_root, docker_ready):
    env = make_env("cwm_rl/Code-v0", kind="function", sandbox="docker")
    env.reset(seed=1)
    assert env.step(env.reference_action())[1] == 1.0
    env.reset(seed=1)
    assert env.step(code("import os\nos._exit(0)"))[1] == -1.0


def test_bad_kwargs_are_refused():
    with pytest.raises(ValueError, match="sandbox must be one of"):
        make_env("cwm_rl/Code-v0", sandbox="chroot")
    with pytest.raises(ValueError, match="kind must be"):
        make_env("cwm_rl/Code-v0", kind="sql")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_env("cwm_rl/Code-v0", tasks_path="/nonexistent.jsonl")


def test_python_tool_in_code_env(sandbox_root):
    env = make_env("cwm_rl/Code-v0", kind="function", tool_calls=2)
    obs, _ = env.reset(seed=2)
    assert "<tool: python>" in obs[0]["content"] and env.max_turns == 3
    tool_obs, reward, terminated, truncated, info = env.step("<tool: python>\nprint(sum(range(5)))\n</tool>")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert tool_obs == [{"role": "tool", "content": "<output>\n10\n</output>\n[1 tool call(s) left]"}]
    tool_obs, *_ , info = env.step("<tool: python>\nprint(1)\n</tool> and <tool: python>\nprint(2)\n</tool>")
    assert "one tool call per turn" in tool_obs[0]["content"] and info["tool_calls_left"] == 0
    # No calls left: this turn is the answer, and a tool call is not a code block.
    _, reward, terminated, truncated, info = env.step("<tool: python>\nprint(3)\n</tool>")
    assert reward == -1.0 and info["verdict"] == "format_error" and (terminated or truncated)
    env.reset(seed=2)
    env.step("<tool: python>\nimport os; print(os.getuid() != 0, os.getcwd())\n</tool>")
    _, reward, terminated, _, _ = env.step(env.reference_action())
    assert (reward, terminated) == (1.0, True)


def test_python_tool_in_math_env_over_the_env_server(server, sandbox_root):
    from envs.server.client import RemoteEnv

    env = RemoteEnv(server.url, "cwm_rl/Math-v0", env_kwargs={"difficulty": 3, "tool_calls": 1})
    try:
        obs, _ = env.reset(seed=5)
        expression = obs[-1]["content"].removeprefix("What is ").removesuffix("?")
        tool_obs, reward, terminated, _, _ = env.step(f"<tool: python>\nprint({expression})\n</tool>")
        assert tool_obs[0]["role"] == "tool" and reward == 0.0 and not terminated
        value = tool_obs[0]["content"].split("\n")[1]
        assert env.step(f"\\boxed{{{value}}}")[1:3] == (1.0, True)
    finally:
        env.close()
