"""Execution traces: run a function under the tracer in the sandbox, and generate small programs.

`run_trace(source, "f", args=[3], sandbox=shared_sandbox())` returns the call's `events`,
`return_repr` and `stdout` (`tests/envs/test_trace_env.py` and `cwm-rl trace` use it).
`tracer.py` (run inside the sandbox) defines the event format; `rewards/trace.py` renders and
scores traces; `programs.py` generates programs at four levels for `cwm_rl/Trace-v0`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRACER_SOURCE = (Path(__file__).with_name("tracer.py")).read_text()


class TraceError(RuntimeError):
    """The tracer could not run the program (a syntax error, a missing function, a limit hit)."""


def run_trace(source: str, function: str, args: list | tuple = (), kwargs: dict | None = None, *, sandbox=None,
              limits=None, max_events: int = 1000) -> dict[str, Any]:
    """Trace `function(*args, **kwargs)` defined in `source`, inside the sandbox."""
    return run_traces([{"source": source, "function": function, "args": list(args), "kwargs": kwargs or {}}],
                      sandbox=sandbox, limits=limits, max_events=max_events)[0]


def run_traces(calls: list[dict[str, Any]], *, sandbox=None, limits=None, max_events: int = 1000) -> list[dict[str, Any]]:
    """Trace many calls (`{"source", "function", "args", "kwargs"}` each) in one sandbox run: one
    process start for all of them, which matters when making thousands of references."""
    from envs.sandbox import Limits, shared_sandbox

    sandbox = sandbox or shared_sandbox("bwrap")
    request = {"calls": [{**call, "max_events": max_events} for call in calls]}
    timeout = 10 + 0.05 * len(calls)
    result = sandbox.run(["python3", "tracer.py"], files={"tracer.py": TRACER_SOURCE}, stdin=json.dumps(request),
                         limits=limits or Limits(timeout_s=timeout, cpu_s=int(timeout) + 1, output_bytes=64 << 20))
    if result.exit_code != 0 or result.limits_hit:
        why = f"limits hit: {', '.join(result.limits_hit)}" if result.limits_hit else f"exit code {result.exit_code}"
        name = calls[0]["function"] if len(calls) == 1 else f"{len(calls)} calls"
        raise TraceError(f"tracing {name} failed ({why}): {result.stderr.strip()[-800:]}")
    lines = result.stdout.strip().splitlines()
    return [json.loads(line) for line in lines[-len(calls):]]
