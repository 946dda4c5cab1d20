"""Score execution-trace predictions (`cwm_rl/Trace-v0`).

The trace text format, one event per line (the model writes it; `render_trace` makes it):

    call 1: {"x": 3}            the function was entered with these arguments
    line 2: {}                  line 2 is about to run; no local changed since the last event
    line 3: {"y": 4}            line 3 is about to run; y changed (to 4) since the last event
    return 3: 4                 the function returned 4 from line 3
    exception 3: ZeroDivisionError: division by zero

Locals are JSON objects, return values JSON (both as the tracer encodes them, `envs/trace/tracer.py`).

Scores:
- output prediction (CruxEval-O style): exact match of the return value (compared as Python
  literals, so `[1,2]` equals `[1, 2]` but `1` is not `1.0`) and of the printed output;
- trace prediction: events are compared as (kind, line, value) with JSON values parsed, and the
  score is difflib's similarity of the two event sequences, 2*M / (len(predicted) + len(reference))
  where M counts events in matching blocks: 1 for an exact trace, partial credit otherwise.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from typing import Any

_EVENT = re.compile(r"^\s*(call|line|return|exception)\s+(\d+)\s*:\s?(.*?)\s*$")
_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.S) for name in ("return", "stdout", "trace")}


def render_event(event: dict[str, Any]) -> str:
    kind, line = event["event"], event["line"]
    if kind == "return":
        return f"return {line}: {json.dumps(event.get('value'))}"
    if kind == "exception":
        return f"exception {line}: {event.get('exception', '')}"
    return f"{kind} {line}: {json.dumps(event.get('locals', {}), sort_keys=True)}"


def render_trace(events: list[dict[str, Any]]) -> str:
    return "\n".join(render_event(e) for e in events)


def _key(kind: str, line: str, payload: str) -> tuple:
    if kind == "exception":
        return kind, int(line), payload.strip()
    try:
        value = json.loads(payload) if payload else None
    except json.JSONDecodeError:
        return kind, int(line), ("unparsed", payload)
    return kind, int(line), json.dumps(value, sort_keys=True)


def parse_trace(text: str) -> tuple[list[tuple], list[str]]:
    """Events of a trace text as comparable tuples, and the lines that are not events."""
    events, bad = [], []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        match = _EVENT.match(line)
        if match:
            events.append(_key(*match.groups()))
        else:
            bad.append(line)
    return events, bad


def tag(text: str, name: str) -> tuple[str | None, str]:
    """The content of exactly one <name>...</name> in `text`, or (None, why not)."""
    found = _TAG[name].findall(text)
    if len(found) != 1:
        return None, f"expected exactly one <{name}>...</{name}>, found {len(found)}"
    return found[0], ""


def score_output(answer: str, reference: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Exact match of the predicted return value (and printed output, when the call prints)."""
    predicted, why = tag(answer, "return")
    if predicted is None:
        return False, {"verdict": "format_error", "reason": why}
    try:
        value_ok = repr(ast.literal_eval(predicted.strip())) == reference["return_repr"]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value_ok = predicted.strip() == (reference["return_repr"] or "")  # not a literal: compare the text
    printed = _TAG["stdout"].findall(answer)
    expected_stdout = reference.get("stdout", "")
    stdout_ok = (printed[0] if len(printed) == 1 else "" if not printed else None)
    stdout_ok = stdout_ok is not None and stdout_ok.strip("\n").rstrip() == expected_stdout.strip("\n").rstrip()
    correct = value_ok and stdout_ok
    reason = "correct" if correct else ("wrong return value" if not value_ok else "wrong printed output")
    return correct, {"verdict": "correct" if correct else "wrong", "reason": reason,
                     "expected_return": reference["return_repr"], "expected_stdout": expected_stdout}


def score_trace(answer: str, reference_events: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    """Similarity of the predicted trace to the reference, in [0, 1]."""
    text, why = tag(answer, "trace")
    if text is None:
        return 0.0, {"verdict": "format_error", "reason": why, "score": 0.0}
    predicted, bad = parse_trace(text)
    reference = [_key(*_EVENT.match(render_event(e)).groups()) for e in reference_events]
    matcher = difflib.SequenceMatcher(None, predicted, reference, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    total = len(predicted) + len(reference)
    score = 2 * matched / total if total else 1.0
    first_mismatch = next((i for i, (p, r) in enumerate(zip(predicted, reference, strict=False)) if p != r),
                          None if len(predicted) == len(reference) else min(len(predicted), len(reference)))
    return score, {"verdict": "correct" if score == 1.0 else "partial" if score > 0 else "wrong", "score": round(score, 4),
                   "matched_events": matched, "predicted_events": len(predicted), "reference_events": len(reference),
                   "first_mismatch": first_mismatch, "unparsed_lines": len(bad),
                   "reason": "exact trace" if score == 1.0 else f"{matched} of {len(reference)} reference events matched"}
