"""rewards/code.py on its own: what `extract_code` takes as the answer, `normalize_output`, and how
`grade_stdio` and `grade_function` count (partial credit, the first-failure stop, excerpts, early
exits and forged result lines), with the real bubblewrap sandbox. The env around the grader and
the list of cheats that must fail are in tests/envs/test_code_env.py."""

from __future__ import annotations

import pytest

from envs.sandbox import Limits
from rewards.code import EXCERPT_CHARS, extract_code, grade_function, grade_stdio, normalize_output

ECHO = [{"input": "1\n", "output": "1\n"}, {"input": "2\n", "output": "2\n"}, {"input": "3\n", "output": "3\n"}]
WRONG_ON_2 = "n = int(input())\nprint(0 if n == 2 else n)\n"


@pytest.fixture(scope="module")
def bwrap(sandbox_root):
    from envs.sandbox import shared_sandbox

    return shared_sandbox("bwrap")


def block(code: str, tag: str = "python") -> str:
    return f"```{tag}\n{code}\n```"


def test_a_block_inside_the_think_part_is_not_the_answer():
    response = "<think>\n" + block("wrong = 1") + "\n</think>\n" + block("right = 1")
    assert extract_code(response, think=True) == ("right = 1\n", "")
    assert "found 2" in extract_code(response)[1]  # without think mode both blocks count
    assert "found 0" in extract_code("<think>\n" + block("x = 1") + "\n</think>\nno code", think=True)[1]
    assert "found 2" in extract_code("<think>a</think>b</think>\n" + block("x = 1"), think=True)[1]


@pytest.mark.parametrize("tag", ["Python", "PY", "python3", "", "py  "])
def test_python_tags_are_accepted_in_any_case(tag):
    assert extract_code(f"Answer:\n```{tag}\nprint(1)\n```\n") == ("print(1)\n", "")


@pytest.mark.parametrize("tag", ["javascript", "c++", "sh", "python2"])
def test_other_languages_are_refused(tag):
    code, why = extract_code(block("print(1)", tag))
    assert code is None and f"tagged {tag!r}" in why


def test_fences_open_and_close_on_their_own_lines():
    assert extract_code("```python print(1)```")[0] is None
    assert extract_code("```python\nprint(1)\n")[0] is None  # never closed
    assert extract_code("```python\n```") == (None, "the code block is empty")
    body = "def f(x):\n\n    return x  \n"
    assert extract_code(f"```python\n{body}```   \nThat is all.") == (body, "")  # kept verbatim


def test_normalize_output_ignores_only_trailing_whitespace():
    assert normalize_output("1 2  \n3\t\n\n\n") == "1 2\n3"
    assert normalize_output("a\r\nb\r\n") == "a\nb"
    assert normalize_output("a\n\nb\n") == "a\n\nb"  # a blank line between lines counts
    assert normalize_output("") == normalize_output(" \n\n") == ""
    assert normalize_output(" a") != normalize_output("a")
    assert normalize_output("\na") != normalize_output("a")


def test_stdio_stops_at_the_first_failure_but_counts_every_test(bwrap):
    verdict = grade_stdio(WRONG_ON_2, ECHO, bwrap)
    assert (verdict.status, verdict.passed, verdict.total) == ("failed", 1, 3)
    assert [t["passed"] for t in verdict.tests] == [True, False]  # test 2 never ran
    assert verdict.fraction == pytest.approx(1 / 3)
    assert verdict.reason == "1/3 tests passed; test 1 failed: wrong output"
    everything = grade_stdio(WRONG_ON_2, ECHO, bwrap, stop_at_first_failure=False)
    assert (everything.passed, [t["passed"] for t in everything.tests]) == (2, [True, False, True])


def test_stdio_needs_exit_code_zero_and_ignores_stderr(bwrap):
    verdict = grade_stdio("print(int(input()))\nraise SystemExit(3)\n", ECHO, bwrap, stop_at_first_failure=False)
    assert verdict.passed == 0 and {t["reason"] for t in verdict.tests} == {"exit code 3"}
    chatty = "import sys\nprint(int(input()))\nprint('debug', file=sys.stderr)\n"
    assert grade_stdio(chatty, ECHO, bwrap).correct


def test_a_test_without_input_gets_empty_stdin(bwrap):
    assert grade_stdio("import sys\nprint(repr(sys.stdin.read()))\n", [{"output": "''\n"}], bwrap).correct


def test_failure_records_keep_the_tail_of_long_texts(bwrap):
    tests = [{"input": "i" * 2000, "output": "x" * 1999 + "X"}]
    record = grade_stdio("print('y' * 1999 + 'Y')\n", tests, bwrap).tests[0]
    assert record["expected"] == "..." + "x" * (EXCERPT_CHARS - 1) + "X"
    assert record["got"] == "..." + "y" * (EXCERPT_CHARS - 2) + "Y\n"
    assert record["input"] == "..." + "i" * EXCERPT_CHARS


def test_no_tests_is_never_a_pass(bwrap):
    verdict = grade_stdio("print(1)\n", [], bwrap)
    assert not verdict.correct and verdict.fraction == 0.0 and verdict.total == 0


@pytest.mark.parametrize("kwargs", [{}, {"asserts": []}, {"test": "def check(c): pass"}, {"entry_point": "f"}])
def test_a_function_task_needs_tests(bwrap, kwargs):
    with pytest.raises(ValueError, match="needs `test`"):
        grade_function("def f(): pass\n", sandbox=bwrap, **kwargs)


def test_every_assert_runs_in_order_in_one_namespace(bwrap):
    asserts = ["assert sq(2) == 4", "assert sq(3) == 9", "n = sq(4)", "assert n == 16", "assert cube(2) == 8"]
    verdict = grade_function("def sq(x):\n    return None if x == 3 else x * x\n", sandbox=bwrap, asserts=asserts)
    assert [t["passed"] for t in verdict.tests] == [True, False, True, True, False]
    assert (verdict.passed, verdict.total, verdict.status) == (3, 5, "failed")
    assert verdict.tests[1]["reason"].startswith("AssertionError") and verdict.tests[1]["test"] == "assert sq(3) == 9"
    assert verdict.tests[4]["reason"].startswith("NameError")
    assert verdict.reason.startswith("3/5 tests passed; test 1 failed: AssertionError")


def test_a_solution_that_raises_while_defined_fails_every_test(bwrap):
    broken = "import no_such_module\ndef sq(x):\n    return x * x\n"
    verdict = grade_function(broken, sandbox=bwrap, asserts=["assert sq(1) == 1", "assert sq(2) == 4"])
    assert (verdict.passed, verdict.total) == (0, 2)
    assert {t["reason"] for t in verdict.tests} == {"the solution raised while being defined"}
    check = grade_function(broken, sandbox=bwrap, test="def check(c):\n    assert c(2) == 4\n", entry_point="sq")
    assert (check.passed, check.total, check.status) == (0, 1, "failed")


def test_exiting_midway_loses_the_tests_already_passed(bwrap):
    solution = "import os\ndef sq(x):\n    if x == 3:\n        os._exit(0)\n    return x * x\n"
    verdict = grade_function(solution, sandbox=bwrap, asserts=["assert sq(2) == 4", "assert sq(3) == 9"])
    assert (verdict.passed, verdict.total) == (0, 2) and all("did not finish" in t["reason"] for t in verdict.tests)


def test_printed_result_lines_with_a_guessed_nonce_are_ignored(bwrap):
    fake = 'print("\\n" + "0" * 32 + "[[true, \\"\\"], [true, \\"\\"]]")'
    solution = f"{fake}\ndef sq(x):\n    {fake}\n    return 4\n"
    asserts = ["assert sq(2) == 4", "assert sq(3) == 9"]
    verdict = grade_function(solution, sandbox=bwrap, asserts=asserts)
    assert (verdict.passed, [t["passed"] for t in verdict.tests]) == (1, [True, False])
    verdict = grade_function(f"{fake}\nimport os\nos._exit(0)\n", sandbox=bwrap, asserts=asserts)  # the fake is last
    assert verdict.passed == 0 and "did not finish" in verdict.tests[0]["reason"]


def test_the_nonce_cannot_be_read_back_from_stdin(bwrap):
    solution = "import os, sys\nrest = os.read(0, 1000)\ntext = sys.stdin.read()\n"
    verdict = grade_function(solution, sandbox=bwrap, asserts=["assert rest == b''", "assert text == ''"])
    assert verdict.correct, verdict


def test_a_hanging_function_meets_the_limit(bwrap):
    verdict = grade_function("def add(a, b):\n    while True:\n        pass\n", sandbox=bwrap,
                             asserts=["assert add(1, 2) == 3"], limits=Limits(timeout_s=1, cpu_s=5))
    assert verdict.passed == 0 and verdict.tests[0]["reason"] == "limit hit: timeout"
