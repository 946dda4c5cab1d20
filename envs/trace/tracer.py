"""Trace one Python function call: the executed lines and the locals that changed before each.

This file runs INSIDE the sandbox as a script (`python3 tracer.py < request.json`), so it
imports nothing of cwm-rl and only the standard library. The request is
`{"source", "function", "args", "kwargs", "max_events"}` (or `{"calls": [request, ...]}` to trace
many calls in one run); it prints one JSON object per call:

    {"events": [...], "return_repr": "4", "return": 4, "stdout": "", "exception": null, "truncated": false}

Events (CWM's observation-action trace; line numbers are those of `source`):
    {"event": "call", "line": 1, "locals": {"x": 3}}          the arguments
    {"event": "line", "line": 2, "locals": {}}                about to run line 2; nothing changed
    {"event": "line", "line": 3, "locals": {"y": 4}}          line 2 set y
    {"event": "return", "line": 3, "locals": {}, "value": 4, "value_repr": "4"}
    {"event": "exception", "line": 3, "locals": {}, "exception": "ZeroDivisionError: division by zero"}
Only frames of the traced function itself are recorded (calls it makes run untraced); at
`max_events` the call is stopped and `truncated` is true. Values
are JSON: numbers, strings, booleans, null, lists (tuples too), objects with string keys;
anything else is its `repr` string. Unchanged locals are elided. Each event also has `reprs`: the changed
locals' `repr` strings (CWM's trace format writes reprs: `envs/trace/cwm_format.py`); `reprs` is left out
of the examples above.
"""

import io
import json
import sys

MAX_DEPTH = 6


class TraceLimit(BaseException):
    """Raised into the traced code at `max_events`: stops the program (an endless loop too)."""


def encode(value, depth=0):
    """A JSON-able copy of `value` (containers recursively, the rest by repr)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if depth >= MAX_DEPTH:
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [encode(v, depth + 1) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode(v, depth + 1) for k, v in value.items()}
    return repr(value)


def safe_repr(value):
    """`repr(value)`, or a placeholder when the object's own __repr__ fails (traced code may define one)."""
    try:
        return repr(value)
    except Exception as e:
        return f"<repr failed: {type(e).__name__}>"


def trace_call(source, function, args=(), kwargs=None, max_events=1000):
    namespace = {"__name__": "traced"}
    exec(compile(source, "<program>", "exec"), namespace)
    fn = namespace[function]
    code = fn.__code__
    events, seen = [], {}
    result = {"events": events, "return_repr": None, "return": None, "stdout": "", "exception": None, "truncated": False}

    def changed(frame):
        now = {name: (encode(value), safe_repr(value)) for name, value in frame.f_locals.items()}
        diff = {name: value for name, value in now.items() if name not in seen or seen[name] != value}
        seen.clear()
        seen.update(now)
        return diff

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None
        if len(events) >= max_events:
            result["truncated"] = True
            raise TraceLimit
        diff = changed(frame)
        record = {"event": event, "line": frame.f_lineno, "locals": {k: v[0] for k, v in diff.items()},
                  "reprs": {k: v[1] for k, v in diff.items()}}
        if event == "return":
            record["value"], record["value_repr"] = encode(arg), safe_repr(arg)
        elif event == "exception":
            record["exception"] = f"{arg[0].__name__}: {arg[1]}"
        if event in ("call", "line", "return", "exception"):
            events.append(record)
        return tracer

    printed = io.StringIO()
    real_stdout = sys.stdout
    sys.stdout = printed
    sys.settrace(tracer)
    try:
        value = fn(*args, **(kwargs or {}))
        result["return_repr"], result["return"] = repr(value), encode(value)
    except TraceLimit:
        pass
    except Exception as e:  # the traced call raised: recorded, not fatal
        result["exception"] = f"{type(e).__name__}: {e}"
    finally:
        sys.settrace(None)
        sys.stdout = real_stdout
    result["stdout"] = printed.getvalue()
    return result


if __name__ == "__main__":
    # One request object, or {"calls": [request, ...]}: one JSON line per call, in order.
    request = json.load(sys.stdin)
    results_out, sys.stdout = sys.stdout, io.StringIO()  # what programs print at module level is not a result
    for call in request.get("calls", [request]):
        out = trace_call(call["source"], call["function"], call.get("args", []), call.get("kwargs") or {},
                         call.get("max_events", 1000))
        results_out.write(json.dumps(out) + "\n")
