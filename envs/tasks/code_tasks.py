"""Code tasks: loaders for the two common JSONL forms, and a seeded generator of easy tasks.

A code `Task` keeps its hidden tests in `metadata`:
- stdin/stdout: `{"kind": "stdio", "tests": [{"input": "...", "output": "..."}, ...]}`
- function: `{"kind": "function", "entry_point": "f", "test": "def check(candidate): ..."}` (HumanEval)
  or `{"kind": "function", "asserts": ["assert f(1) == 2", ...]}` (MBPP)
and a reference solution, when the source has one, in `answer`.

Accepted JSONL lines (one task each; extra fields are kept in metadata):
- stdin/stdout: `prompt` (or `question` / `description`) and `tests` as a list of
  `{"input", "output"}`, or `inputs` + `outputs` lists, or `input_output: {"inputs", "outputs"}` (APPS);
  `solution` (or `solutions[0]`) as the reference;
- function: `prompt` + `test` + `entry_point` (+ `canonical_solution`) as in HumanEval, or `text` +
  `test_list` (+ `code`) as in MBPP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cwm_rl.types import Task


def task_from_record(record: dict[str, Any], index: int, source: str) -> Task:
    """One JSONL record as a Task, or a ValueError saying which fields are missing."""
    ident = str(record.get("id") or record.get("task_id") or record.get("problem_id") or f"{Path(source).stem}-{index}")
    if "test_list" in record or ("test" in record and "entry_point" in record):
        prompt = record.get("prompt") or record.get("text")
        if not prompt:
            raise ValueError(f"{source} line {index + 1}: a function task needs `prompt` (HumanEval) or `text` (MBPP)")
        if "test_list" in record:
            metadata = {"kind": "function", "asserts": list(record["test_list"])}
            answer = record.get("code")
        else:
            metadata = {"kind": "function", "test": record["test"], "entry_point": record["entry_point"]}
            answer = record.get("canonical_solution")
            if answer is not None and not answer.lstrip().startswith(("def ", "import ", "from ", "class ")):
                answer = prompt + answer  # HumanEval's canonical solution is the body that follows the prompt
        return Task(id=ident, prompt=prompt, answer=answer, source=source, metadata=metadata)
    prompt = record.get("prompt") or record.get("question") or record.get("description")
    tests = record.get("tests")
    if tests is None:
        io = record.get("input_output")
        io = json.loads(io) if isinstance(io, str) else io
        pairs = io if isinstance(io, dict) else record
        if "inputs" in pairs and "outputs" in pairs:
            tests = [{"input": i, "output": o} for i, o in zip(pairs["inputs"], pairs["outputs"], strict=True)]
    if not prompt or not tests:
        raise ValueError(f"{source} line {index + 1}: a code task needs a statement (`prompt`, `question` or "
                         "`description`) and tests (`tests`, `inputs`+`outputs`, or `input_output`), or the HumanEval "
                         "(`prompt`, `test`, `entry_point`) or MBPP (`text`, `test_list`) fields")
    for t in tests:
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise ValueError(f"{source} line {index + 1}: each test must be {{\"input\": ..., \"output\": ...}}, got {t!r}")
    solutions = record.get("solutions")
    answer = record.get("solution") or (json.loads(solutions)[0] if isinstance(solutions, str) and solutions.strip()
                                        else solutions[0] if solutions else None)
    return Task(id=ident, prompt=prompt, answer=answer, source=source,
                metadata={"kind": "stdio", "tests": [{"input": str(t["input"]), "output": str(t["output"])} for t in tests]})


def load_code_tasks(path: str | Path) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"code task file {path} does not exist")
    tasks = []
    with open(path) as f:
        for index, line in enumerate(f):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {index + 1} is not JSON: {e}") from None
                tasks.append(task_from_record(record, index, str(path)))
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    return tasks


# ---- the seeded generator: easy tasks a tiny model can learn, each with a reference solution ----

def _function_task(rng: np.random.Generator) -> Task:
    k = int(rng.integers(2, 10))
    name, doc, body, fn = [
        ("add_k", f"returns x plus {k}", f"return x + {k}", lambda x: x + k),
        ("times_k", f"returns x times {k}", f"return x * {k}", lambda x: x * k),
        ("minus_k", f"returns x minus {k}", f"return x - {k}", lambda x: x - k),
        ("mod_k", f"returns x modulo {k}", f"return x % {k}", lambda x: x % k),
        ("is_multiple", f"returns True when x is a multiple of {k}, else False", f"return x % {k} == 0", lambda x: x % k == 0),
    ][int(rng.integers(5))]
    xs = [int(v) for v in rng.integers(0, 100, size=5)]
    asserts = [f"assert {name}({x}) == {fn(x)!r}" for x in xs]
    prompt = f"Write a Python function `{name}(x)` that {doc}."
    return Task(id=f"code-fn-{name}-{k}-{'-'.join(map(str, xs))}", prompt=prompt, source="generator:code",
                answer=f"def {name}(x):\n    {body}\n", metadata={"kind": "function", "asserts": asserts, "difficulty": 1})


def _stdio_task(rng: np.random.Generator) -> Task:
    op, symbol, fn = [("sum", "+", lambda a, b: a + b), ("difference", "-", lambda a, b: a - b),
                      ("product", "*", lambda a, b: a * b), ("maximum", "max", max)][int(rng.integers(4))]
    pairs = [(int(a), int(b)) for a, b in rng.integers(-50, 100, size=(4, 2))]
    expr = "max(a, b)" if symbol == "max" else f"a {symbol} b"
    tests = [{"input": f"{a} {b}\n", "output": f"{fn(a, b)}\n"} for a, b in pairs]
    prompt = f"Read two integers a and b from one line of standard input and print their {op}."
    return Task(id=f"code-io-{op}-{'-'.join(f'{a}_{b}' for a, b in pairs)}", prompt=prompt, source="generator:code",
                answer=f"a, b = map(int, input().split())\nprint({expr})\n",
                metadata={"kind": "stdio", "tests": tests, "difficulty": 1})


def generated_code_task(rng: np.random.Generator, kind: str | None = None) -> Task:
    """One easy task: a small function with 5 asserts, or a stdin/stdout program with 4 tests."""
    kind = kind or ("function" if rng.random() < 0.5 else "stdio")
    if kind not in ("function", "stdio"):
        raise ValueError(f"kind must be 'function', 'stdio' or None (both), got {kind!r}")
    return _function_task(rng) if kind == "function" else _stdio_task(rng)
