"""Math task sources: a seeded arithmetic generator with difficulty levels, and JSONL/Parquet loaders.

File formats (one record per line / row):
- GSM8K form: `question`, and `answer` holding the worked solution ending in `#### N`;
  the gold answer is N (thousands separators dropped), the solution text is kept in
  `metadata["solution"]` for SFT warm starts.
- Plain form: `question` and `answer` (the final answer only).
An optional `id` field names the task; otherwise it is `<file stem>-<row index>`.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from cwm_rl.types import Task

# level -> what it asks. Level 1 is what a ~1 M-parameter model learns in minutes on a CPU.
DIFFICULTY_LEVELS = {
    1: "a + b with 1-digit numbers",
    2: "a + b or a - b with 2-digit numbers",
    3: "a * b with a 1-digit and a 2-digit number, or 3-digit addition",
    4: "three 2-digit numbers with + - * and parentheses",
    5: "two fractions added, subtracted, multiplied or divided (answer as a reduced fraction)",
}


# The operators each level draws from (where it has a choice); `operators` narrows them.
LEVEL_OPERATORS = {1: "+", 2: "+-", 3: "*+", 4: "+-*", 5: "+-*/"}


def check_operators(level: int, operators: str | None) -> None:
    if operators is None:
        return
    allowed = LEVEL_OPERATORS[level]
    if not operators or any(op not in allowed for op in operators):
        raise ValueError(f"operators {operators!r} for difficulty {level}: use a non-empty subset of {allowed!r}")
    if level == 4 and not set(operators) & set("+-"):
        raise ValueError("difficulty 4 needs + or - among its operators (the parenthesised part is a sum or difference)")


def _arith_question(rng: np.random.Generator, level: int, operators: str | None = None) -> tuple[str, str]:
    """(question expression, exact answer string) for one difficulty level, using only `operators` (default: all of the level's)."""
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731 - inclusive bounds read clearest here
    ops = "".join(o for o in LEVEL_OPERATORS.get(level, "") if o in (operators or "+-*/"))  # the level's order: "-+" == "+-"
    if level == 1:
        a, b = r(0, 9), r(0, 9)
        return f"{a} + {b}", str(a + b)
    if level == 2:
        a, b = r(10, 99), r(10, 99)
        if ops == "+" or (ops == "+-" and r(0, 1)):
            return f"{a} + {b}", str(a + b)
        return f"{a} - {b}", str(a - b)
    if level == 3:
        if ops == "*" or (ops == "*+" and r(0, 1)):
            a, b = r(2, 9), r(10, 99)
            return f"{a} * {b}", str(a * b)
        a, b = r(100, 999), r(100, 999)
        return f"{a} + {b}", str(a + b)
    if level == 4:
        a, b, c = r(10, 99), r(10, 99), r(2, 9)
        op1 = str(rng.choice([o for o in "+-" if o in ops]))
        op2 = str(rng.choice([o for o in "*+-" if o in ops]))
        inner = a + b if op1 == "+" else a - b
        value = {"*": inner * c, "+": inner + c, "-": inner - c}[op2]
        return f"({a} {op1} {b}) {op2} {c}", str(value)
    if level == 5:
        x = Fraction(r(1, 9), r(2, 9))
        y = Fraction(r(1, 9), r(2, 9))
        op = str(rng.choice([o for o in "+-*/" if o in ops]))
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]
        # Parenthesised so "1/2 / 1/3" cannot be read as ((1/2)/1)/3.
        return f"({x.numerator}/{x.denominator}) {op} ({y.numerator}/{y.denominator})", str(value)
    raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY_LEVELS)}, got {level}")


def arithmetic_task(rng: np.random.Generator, level: int, operators: str | None = None) -> Task:
    """One arithmetic task drawn with `rng` (the env's seeded np_random), with only `operators` if given."""
    expr, answer = _arith_question(rng, level, operators)
    return Task(
        id=f"arith-L{level}-{expr.replace(' ', '')}",
        prompt=f"What is {expr}?",
        answer=answer,
        source=f"arithmetic:L{level}",
        metadata={"difficulty": level},
    )


def gsm8k_gold(answer: str) -> tuple[str, str | None]:
    """Split a GSM8K answer into (gold, solution); plain answers have no solution."""
    if "####" not in answer:
        return answer.strip(), None
    solution, _, gold = answer.rpartition("####")
    return gold.strip().replace(",", ""), solution.strip()


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        return records
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install 'cwm-rl[parquet]'") from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported task file type {path.suffix!r}; use .jsonl or .parquet")


def load_math_tasks(path: str | Path) -> list[Task]:
    """Load GSM8K-form or plain question/answer tasks from a .jsonl or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"math task file {path} does not exist")
    tasks = []
    for i, rec in enumerate(_read_records(path)):
        if not isinstance(rec, dict) or not {"question", "answer"} <= set(rec):
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(f"{path} record {i} has {keys}; every record needs 'question' and 'answer' fields")
        gold, solution = gsm8k_gold(str(rec["answer"]))
        if not gold:
            raise ValueError(f"{path} record {i} has an empty answer")
        tasks.append(
            Task(
                id=str(rec.get("id", f"{path.stem}-{i}")),
                prompt=str(rec["question"]),
                answer=gold,
                source=str(path),
                metadata={"solution": solution} if solution else {},
            )
        )
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    return tasks
