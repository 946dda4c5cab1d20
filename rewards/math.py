"""Grade a math answer in the CWM format: optional `<think> ... </think>`, then exactly one `\\boxed{}`.

Strict by design, because a lenient grader gets reward-hacked: no credit without exactly one
`\\boxed{}` in the answer part (two boxes such as `\\boxed{gold} \\boxed{other}` score nothing),
and with `think=True` exactly one `</think>`, with the box after it. These format checks are
cheap and run in the caller's process, as does comparing two plain integers ("72" against "072":
math-verify would compare the same sympy Integers). Any other equivalence check (math-verify,
which runs sympy on model output and can hang in C code) runs in a `VerifierPool` worker under a
hard timeout, with math-verify's own signal-based timeouts switched off (they fail outside the
main thread).

Outcomes (`MathVerdict.status`): "correct", "wrong", "format_error", "timeout" (the verifier was
killed at its time or memory limit; no credit), "error" (a verifier failure such as an unparseable gold answer: a dataset
bug, not the model's fault, but still no credit). Only "correct" is `.correct`.

math-verify is imported only inside the pool's workers (and preloaded in their zygote), so
importing this module stays cheap for callers that never parse anything themselves.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from rewards.pool import PoolResult, VerifierPool, default_pool

MAX_RESPONSE_CHARS = 20_000
THINK_END = "</think>"
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INTEGER = re.compile(r"[+-]?[0-9]{1,50}")  # a plain integer: graded without math-verify (`_integer_verdict`)
_MATH_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed")  # an unescaped $ (not the \$ of money), or a box


@dataclass(frozen=True)
class MathVerdict:
    """The grade of one response and why."""

    status: Literal["correct", "wrong", "format_error", "timeout", "error"]
    reason: str  # a sentence for humans: why this status
    extracted: str | None  # the content of the single \boxed{}, when there is one
    gold: str

    @property
    def correct(self) -> bool:
        return self.status == "correct"


# ---- format (in the caller's process) -----------------------------------------------------


def extract_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` in order; nested and escaped braces handled.

    A box nested in another counts once, as part of the outer one. An unclosed box is ignored.
    """
    found = []
    pos = 0
    while match := _BOX_OPEN.search(text, pos):
        end = _closing_brace(text, match.end())
        if end is None:
            break  # unclosed: nothing after it can be a complete top-level box either
        found.append(text[match.end() : end])
        pos = end + 1
    return found


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing a group whose body starts at `start`, skipping `\\{` and `\\}`."""
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def check_format(response: str, *, think: bool) -> tuple[str | None, str | None]:
    """Return `(answer_part, None)` when the format holds, else `(None, error sentence)`.

    With `think=True` the response needs exactly one `</think>` and the answer part is what
    follows it; otherwise the answer part is the whole response. The answer part needs exactly
    one non-empty `\\boxed{}`.
    """
    answer, thinking = response, ""
    if think:
        num_ends = response.count(THINK_END)
        if num_ends != 1:
            return None, f"found {num_ends} {THINK_END} tags; exactly one is required, before the answer"
        thinking, answer = response.split(THINK_END)
    boxes = extract_boxed(answer)
    if len(boxes) != 1:
        error = f"found {len(boxes)} \\boxed{{}} answers; exactly one is required"
        if think and not boxes and extract_boxed(thinking):
            error += f" after {THINK_END} (a box inside the thinking does not count)"
        return None, error
    if not boxes[0].strip():
        return None, "the \\boxed{} answer is empty"
    return answer, None


# ---- grading --------------------------------------------------------------------------------


def grade_math(
    response: str,
    gold: str,
    *,
    think: bool = False,
    timeout_s: float = 5.0,
    pool: VerifierPool | None = None,
    max_response_chars: int = MAX_RESPONSE_CHARS,
) -> MathVerdict:
    """Grade `response` against `gold`: the format and plain integers in-process, other equivalence in `pool` (blocking)."""
    checked = _check_response(response, gold, think, max_response_chars)
    if isinstance(checked, MathVerdict):
        return checked
    if (verdict := _integer_verdict(checked, gold)) is not None:
        return verdict
    result = (pool or default_pool()).run(verify_in_worker, checked, gold, timeout_s=timeout_s)
    return _verdict(result, checked, gold, timeout_s)


async def agrade_math(
    response: str,
    gold: str,
    *,
    think: bool = False,
    timeout_s: float = 5.0,
    pool: VerifierPool | None = None,
    max_response_chars: int = MAX_RESPONSE_CHARS,
) -> MathVerdict:
    """`grade_math` for event loops: the verifier call never blocks the loop."""
    checked = _check_response(response, gold, think, max_response_chars)
    if isinstance(checked, MathVerdict):
        return checked
    if (verdict := _integer_verdict(checked, gold)) is not None:
        return verdict
    result = await (pool or default_pool()).arun(verify_in_worker, checked, gold, timeout_s=timeout_s)
    return _verdict(result, checked, gold, timeout_s)


def grades_in_process(response: str, gold: str, *, think: bool = False, max_response_chars: int = MAX_RESPONSE_CHARS) -> bool:
    """Does grading `response` stay in this process (a format error, or a plain-integer answer against a plain-integer
    gold: microseconds, no math-verify)? An env may then grade on its event loop rather than in a thread."""
    checked = _check_response(response, gold, think, max_response_chars)
    return isinstance(checked, MathVerdict) or _integer_verdict(checked, gold) is not None


def _check_response(response: str, gold: str, think: bool, max_response_chars: int) -> str | MathVerdict:
    """The boxed content to verify, or the verdict when the response fails before verification."""
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str such as '72', got {type(gold).__name__} {gold!r}; pass str(gold)")
    if len(response) > max_response_chars:
        reason = f"response is {len(response)} chars; limit is {max_response_chars}"
        return MathVerdict("format_error", reason, None, gold)
    answer, error = check_format(response, think=think)
    if error is not None:
        return MathVerdict("format_error", error, None, gold)
    return extract_boxed(answer)[0].strip()


def _integer_verdict(extracted: str, gold: str) -> MathVerdict | None:
    """The verdict when the boxed answer and the gold are both plain integers ("72", "-5", "007"), compared in
    this process: math-verify would parse both to the same sympy Integer, and a round trip to the pool costs
    more than the rest of grading (an arithmetic task's step). None for anything else: math-verify decides."""
    if not (_INTEGER.fullmatch(extracted) and _INTEGER.fullmatch(gold.strip())):
        return None
    return _equivalence_verdict(int(extracted) == int(gold), extracted, gold)


def _equivalence_verdict(equal: bool, extracted: str, gold: str) -> MathVerdict:
    if equal:
        return MathVerdict("correct", f"boxed answer {extracted!r} matches gold {gold!r}", extracted, gold)
    return MathVerdict("wrong", f"boxed answer {extracted!r} does not match gold {gold!r}", extracted, gold)


def _verdict(result: PoolResult, extracted: str, gold: str, timeout_s: float) -> MathVerdict:
    if result.status == "timeout":
        reason = f"math-verify took longer than {timeout_s:g} s on {extracted!r}; no credit"
        return MathVerdict("timeout", reason, extracted, gold)
    if result.status == "memory":  # killed at its other limit: scored like a timeout
        return MathVerdict("timeout", f"math-verify ran out of memory on {extracted!r}; no credit", extracted, gold)
    if result.status == "error":
        return MathVerdict("error", f"verifier failed: {result.error}", extracted, gold)
    return _equivalence_verdict(bool(result.value), extracted, gold)


# ---- inside the pool's workers --------------------------------------------------------------


def verify_in_worker(extracted: str, gold: str) -> bool:
    """Is the boxed content `extracted` equivalent to `gold`? Runs in a pool worker.

    Raises ValueError when the gold answer does not parse (a dataset bug, not a wrong answer).
    math-verify's signal timeouts are off (`parsing_timeout=None`, `timeout_seconds=None`):
    the pool's kill is the timeout.
    """
    mv, config = _math_verify()
    gold_parsed = _parse_first_math(mv, config, _gold_forms(gold))
    if gold_parsed is None:
        raise ValueError(f"gold answer {gold!r} could not be parsed by math-verify; fix the dataset entry")
    pred_parsed = _parse_first_math(mv, config, [f"\\boxed{{{extracted}}}", f"${extracted}$"])
    if pred_parsed is None:
        return False
    return mv.verify(gold_parsed, pred_parsed, timeout_seconds=None)


def _gold_forms(gold: str) -> list[str]:
    """Ways to present a gold answer ("72", "1/2", "x^2+1") to math-verify, best first.

    No undelimited form: math-verify's plain-expression fallback reads a prefix ("2x+2" -> 2).
    """
    gold = gold.strip()
    if _MATH_DELIMITED.search(gold):
        return [gold]
    return [f"\\boxed{{{gold}}}", f"${gold}$"]


def _parse_first_math(mv: Any, config: list, forms: list[str]) -> list | None:
    """math-verify's parse of the first form that yields a sympy object (not just a string)."""
    for text in forms:
        parsed = mv.parse(text, extraction_config=config, parsing_timeout=None)
        if any(not isinstance(item, str) for item in parsed):
            return parsed
    return None


# One pair per common answer shape: integer, fraction/decimal, polynomial, root, set vs interval.
_WARM_UP_PAIRS = [
    ("72", "72"),
    ("\\frac{1}{2}", "0.5"),
    ("2(x+1)", "2x+2"),
    ("\\sqrt{2}", "1.414"),
    ("\\{1,2\\}", "(1,2)"),
]


def warm_up_worker() -> None:
    """Called once per pool worker before its first job (the pool's preload hook): math-verify's
    LaTeX parser spends 0.1-0.3 s on the first input of each new shape, which a call's deadline
    should not pay."""
    for extracted, gold in _WARM_UP_PAIRS:
        verify_in_worker(extracted, gold)


class _NoTimeoutWarning(logging.Filter):
    # math-verify warns once per process that its timeout is off; every fresh worker would.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify() -> tuple[Any, list]:
    """math-verify and its extraction config, imported on first use (in workers only)."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutWarning())
    return math_verify, [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
