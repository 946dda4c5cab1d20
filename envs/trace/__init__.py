"""Execution traces: run a function under the tracer in the sandbox, and generate small programs.

    from envs.trace import run_trace
    result = run_trace(source, "f", args=[3], sandbox=shared_sandbox())
    result["events"], result["return_repr"], result["stdout"]

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
    from envs.sandbox import Limits, shared_sandbox

    sandbox = sandbox or shared_sandbox("bwrap")
    request = {"source": source, "function": function, "args": list(args), "kwargs": kwargs or {}, "max_events": max_events}
    result = sandbox.run(["python3", "tracer.py"], files={"tracer.py": TRACER_SOURCE}, stdin=json.dumps(request),
                         limits=limits or Limits(timeout_s=10, output_bytes=8 << 20))
    if result.exit_code != 0 or result.limits_hit:
        why = f"limits hit: {', '.join(result.limits_hit)}" if result.limits_hit else f"exit code {result.exit_code}"
        raise TraceError(f"tracing {function} failed ({why}): {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
