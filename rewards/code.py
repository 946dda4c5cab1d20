"""Grade model-written code in the CWM format: optional `<think> ... </think>`, then exactly one
fenced code block, run against hidden tests in a sandbox (`envs.sandbox`; never on the host).

Two kinds of tests:
- stdin/stdout (competitive programming): one sandboxed run per test; it passes when the program
  exits 0 within its limits and its output matches (trailing whitespace per line and trailing
  blank lines ignored);
- function tests: HumanEval's `check(candidate)` (one test) or MBPP-style assert lines (one test
  each), run by a harness after the solution is defined.

Cheating does not pass. The harness reads a random nonce from stdin before running anything the
model wrote, points stdin at /dev/null, and prints the nonce with the results only after every
test ran: a solution that exits early (`sys.exit(0)`, `os._exit(0)`, a signal) or prints
"all tests passed" produces no nonce and fails. (A program that deliberately searches its own
process memory could find the nonce; the sandbox bounds what such a program can do, and the
episode transcript shows it.)
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

THINK_END = "</think>"
PYTHON_TAGS = {"", "python", "py", "python3"}
_FENCE = re.compile(r"^```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
EXCERPT_CHARS = 500

HARNESS = r'''
import json, os, sys, traceback
def _run():
    nonce = sys.stdin.readline().strip()
    sys.stdin = open(os.devnull)
    config = json.load(open("tests.json"))
    namespace = {"__name__": "solution"}
    results = []
    try:
        exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        results = [[False, "the solution raised while being defined"]] * max(1, len(config.get("asserts") or [0]))
    if not results and config["mode"] == "check":
        try:
            exec(compile(config["test"], "tests.py", "exec"), namespace)
            namespace["check"](namespace[config["entry_point"]])
            results = [[True, ""]]
        except BaseException as e:
            traceback.print_exc()
            results = [[False, type(e).__name__ + ": " + str(e)[:200]]]
    elif not results:
        for line in config["asserts"]:
            try:
                exec(compile(line, "tests.py", "exec"), namespace)
                results.append([True, ""])
            except BaseException as e:
                traceback.print_exc()
                results.append([False, type(e).__name__ + ": " + str(e)[:200]])
    sys.stdout.write("\n" + nonce + json.dumps(results) + "\n")
    sys.stdout.flush()
_run()
'''


@dataclass
class CodeVerdict:
    """The grade of one response: how many hidden tests passed, and what happened in each."""

    status: Literal["passed", "failed", "format_error"]
    reason: str
    passed: int = 0
    total: int = 0
    tests: list[dict[str, Any]] = field(default_factory=list)  # per test: index, passed, reason, excerpts

    @property
    def correct(self) -> bool:
        return self.status == "passed"

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def extract_code(response: str, think: bool = False) -> tuple[str | None, str]:
    """The code of the single fenced block in the answer part, or (None, why not)."""
    answer = response
    if think:
        if response.count(THINK_END) != 1:
            return None, f"expected exactly one {THINK_END}, found {response.count(THINK_END)}"
        answer = response.split(THINK_END, 1)[1]
    blocks = _FENCE.findall(answer)
    if len(blocks) != 1:
        return None, f"expected exactly one fenced code block (```python ... ```), found {len(blocks)}"
    tag, code = blocks[0]
    if tag.lower() not in PYTHON_TAGS:
        return None, f"the code block is tagged {tag!r}; only Python is run"
    if not code.strip():
        return None, "the code block is empty"
    return code, ""


def normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else "..." + text[-EXCERPT_CHARS:]


def grade_stdio(code: str, tests: list[dict[str, str]], sandbox, limits=None, stop_at_first_failure: bool = True) -> CodeVerdict:
    """Run `code` once per test with the test's input on stdin; compare stdout with its output."""
    records, passed = [], 0
    for index, test in enumerate(tests):
        result = sandbox.run(["python3", "solution.py"], files={"solution.py": code}, stdin=test.get("input", ""), limits=limits)
        if result.limits_hit:
            ok, reason = False, f"limit hit: {', '.join(result.limits_hit)}"
        elif result.exit_code != 0:
            ok, reason = False, f"exit code {result.exit_code}"
        elif normalize_output(result.stdout) != normalize_output(test.get("output", "")):
            ok, reason = False, "wrong output"
        else:
            ok, reason = True, ""
        passed += ok
        record = {"index": index, "passed": ok, "reason": reason}
        if not ok:
            record.update(input=_excerpt(test.get("input", "")), expected=_excerpt(test.get("output", "")),
                          got=_excerpt(result.stdout), stderr=_excerpt(result.stderr))
        records.append(record)
        if not ok and stop_at_first_failure:
            break
    return _verdict(passed, len(tests), records)


def grade_function(code: str, *, sandbox, test: str | None = None, entry_point: str | None = None,
                   asserts: list[str] | None = None, limits=None) -> CodeVerdict:
    """Run HumanEval's `check(entry_point)` (`test` defines `check`) or each assert line of `asserts`."""
    if asserts:
        config = {"mode": "asserts", "asserts": list(asserts)}
    elif test and entry_point:
        config = {"mode": "check", "test": test, "entry_point": entry_point}
    else:
        raise ValueError("a function task needs `test` (defining check(candidate)) and `entry_point`, or `asserts`")
    total = len(asserts) if asserts else 1
    nonce = secrets.token_hex(16)
    result = sandbox.run(["python3", "harness.py"], stdin=nonce + "\n", limits=limits,
                         files={"harness.py": HARNESS, "solution.py": code, "tests.json": json.dumps(config)})
    outcome = None
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(nonce):
            outcome = json.loads(line[len(nonce):])
            break
    if outcome is None or len(outcome) != total or result.limits_hit:
        why = (f"limit hit: {', '.join(result.limits_hit)}" if result.limits_hit else
               f"the test harness did not finish (exit code {result.exit_code}): the program exited or crashed before the tests ran")
        records = [{"index": i, "passed": False, "reason": why, "stderr": _excerpt(result.stderr)} for i in range(total)]
        return _verdict(0, total, records)
    records = []
    for index, (ok, why) in enumerate(outcome):
        record = {"index": index, "passed": bool(ok), "reason": why}
        if not ok:
            record.update(test=_excerpt(asserts[index]) if asserts else "check(candidate)", stderr=_excerpt(result.stderr))
        records.append(record)
    return _verdict(sum(1 for ok, _ in outcome if ok), total, records)


def _verdict(passed: int, total: int, records: list[dict[str, Any]]) -> CodeVerdict:
    if total and passed == total:
        return CodeVerdict("passed", f"all {total} tests passed", passed, total, records)
    failed = next((r for r in records if not r["passed"]), None)
    reason = f"{passed}/{total} tests passed" + (f"; test {failed['index']} failed: {failed['reason']}" if failed else "")
    return CodeVerdict("failed", reason, passed, total, records)
