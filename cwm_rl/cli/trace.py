"""`cwm-rl trace`: the execution tracer as a tool (the code runs in the sandbox, never on the host).

    cwm-rl trace FILE.py::FUNC [--args JSON] [--kwargs JSON] [--json]    # one call's trace
    cwm-rl trace dataset DIR --out FILE.jsonl                             # a folder of functions -> trace data
    cwm-rl trace generate --difficulty 1 --count 4000 --out FILE.jsonl    # generated programs -> trace data
    cwm-rl trace generate --format cwm --count 4000 --out FILE.jsonl      # ... in CWM's trace format

`--format cwm` writes CWM's trace format (`envs/trace/cwm_format.py`: special tokens by name) instead of
cwm-rl's event lines: printed for one call, or as each record's `text` (the document to train on).

A dataset folder holds `NAME.py` files, each with a `NAME.inputs.jsonl` beside it: one call per
line, `{"function": "f", "args": [...], "kwargs": {...}}`. Every call becomes one JSONL record
(`id`, `source`, `function`, `args`, `kwargs`, `events`, `return_repr`, `return`, `stdout`,
`exception`, `trace`) that `cwm_rl/Trace-v0` reads with `tasks_path`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cwm_rl.cli.common import call_target


def trace(
    target: Annotated[str, typer.Argument(help="FILE.py::FUNC to trace, `dataset` to trace a folder (then DIR), or "
                                               "`generate` to trace generated programs.")],
    directory: Annotated[Path | None, typer.Argument(help="With `dataset`: the folder of NAME.py + NAME.inputs.jsonl.")] = None,
    args: Annotated[str, typer.Option("--args", help="Positional arguments as a JSON list.")] = "[]",
    kwargs: Annotated[str, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")] = "{}",
    out: Annotated[Path | None, typer.Option("--out", help="With `dataset`: the JSONL file to write.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the tracer's JSON instead of the text trace.")] = False,
    backend: Annotated[str, typer.Option(help="Sandbox backend: bwrap or docker.")] = "bwrap",
    max_events: Annotated[int, typer.Option(help="Stop recording after this many events.")] = 1000,
    format: Annotated[str, typer.Option("--format", help="text: cwm-rl's event lines; cwm: CWM's trace format (special "
                                                         "tokens by name), the text of mid-training data.")] = "text",
    difficulty: Annotated[int, typer.Option(help="With `generate`: the program level (1-4).")] = 1,
    count: Annotated[int, typer.Option(help="With `generate`: how many programs.")] = 1000,
    seed: Annotated[int, typer.Option(help="With `generate`: the generator's seed.")] = 0,
) -> None:
    """Trace a function call (CWM-style: line, call, return and exception events; changed locals as JSON)."""
    from envs.sandbox import make_sandbox

    if format not in ("text", "cwm"):
        raise ValueError(f"--format must be text or cwm, got {format!r}")
    if target == "generate":
        if out is None:
            raise ValueError("usage: cwm-rl trace generate --difficulty N --count N --out FILE.jsonl")
        with make_sandbox(backend, **({"pool_size": 1} if backend == "docker" else {})) as sandbox:
            written = write_traces(generated_calls(difficulty, count, seed), out, sandbox, max_events, format)
        typer.echo(f"wrote {written} traced programs to {out}")
        return
    if target == "dataset":
        if directory is None or out is None:
            raise ValueError("usage: cwm-rl trace dataset DIR --out FILE.jsonl")
        with make_sandbox(backend, **({"pool_size": 1} if backend == "docker" else {})) as sandbox:
            written = write_traces(folder_calls(directory), out, sandbox, max_events, format)
        typer.echo(f"wrote {written} traced calls to {out}")
        return
    path, function, call_args, call_kwargs = call_target(target, args, kwargs, other_forms=", nor `dataset`")
    from envs.trace import run_trace
    from rewards.trace import render_event

    with make_sandbox(backend, **({"pool_size": 0} if backend == "docker" else {})) as sandbox:
        result = run_trace(path.read_text(), function, call_args, call_kwargs, sandbox=sandbox, max_events=max_events)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if format == "cwm":
        from envs.trace.cwm_format import render_cwm

        print(render_cwm(path.read_text(), function, result["events"]))
        return
    lines = path.read_text().splitlines()
    console = Console(highlight=False)
    for event in result["events"]:
        code = lines[event["line"] - 1].strip() if 0 < event["line"] <= len(lines) else ""
        console.print(f"{escape(render_event(event)):<60} [dim]# {escape(code)}[/]")
    if result["stdout"]:
        console.print(f"[bold]printed:[/] {escape(result['stdout'].rstrip())}")
    console.print(f"[bold]returned:[/] {escape(str(result['return_repr']))}" if result["exception"] is None
                  else f"[bold red]raised:[/] {escape(result['exception'])}")
    if result["truncated"]:
        console.print(f"[yellow]trace cut at {max_events} events[/]")


def folder_calls(directory: Path) -> list[tuple[str, dict]]:
    """(id, call) for every line of every NAME.inputs.jsonl beside a NAME.py in `directory`."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder")
    programs = sorted(directory.glob("*.py"))
    if not programs:
        raise ValueError(f"{directory} holds no .py files (each NAME.py needs a NAME.inputs.jsonl beside it)")
    calls = []
    for program in programs:
        inputs = program.with_suffix(".inputs.jsonl")
        if not inputs.is_file():
            raise FileNotFoundError(f"{program} has no {inputs.name} beside it (one call per line: "
                                    '{"function": "f", "args": [...], "kwargs": {...}})')
        source = program.read_text()
        for index, line in enumerate(inputs.read_text().splitlines()):
            if not line.strip():
                continue
            call = json.loads(line)
            if "function" not in call:
                raise ValueError(f"{inputs} line {index + 1} has no \"function\"")
            calls.append((f"{program.stem}-{call['function']}-{index}", {
                "source": source, "function": call["function"], "args": call.get("args", []), "kwargs": call.get("kwargs") or {}}))
    return calls


def generated_calls(difficulty: int, count: int, seed: int) -> list[tuple[str, dict]]:
    """(id, call) for `count` distinct generated programs at `difficulty` (fewer if the level has fewer)."""
    import numpy as np

    from envs.trace.programs import generate_program
    from envs.trace_env import trace_task

    rng, seen, calls = np.random.default_rng(seed), set(), []
    for _ in range(count * 50):
        if len(calls) == count:
            break
        source, function, args = generate_program(rng, difficulty)
        if (source, repr(args)) not in seen:
            seen.add((source, repr(args)))
            ident = trace_task(source, function, args, level=difficulty).id
            calls.append((ident, {"source": source, "function": function, "args": args, "kwargs": {}}))
    return calls


def write_traces(calls: list[tuple[str, dict]], out: Path, sandbox, max_events: int = 1000, format: str = "text") -> int:
    """Trace the calls in the sandbox, 500 per run, and write one JSONL record each (what Trace-v0 reads):
    `trace` holds the text-format trace, or with format "cwm" `text` holds the CWM-format document."""
    from envs.trace import run_traces
    from envs.trace.cwm_format import render_cwm
    from rewards.trace import render_trace

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for start in range(0, len(calls), 500):
            chunk = calls[start:start + 500]
            results = run_traces([call for _, call in chunk], sandbox=sandbox, max_events=max_events)
            for (ident, call), result in zip(chunk, results, strict=True):
                rendered = ({"text": render_cwm(call["source"], call["function"], result["events"])} if format == "cwm"
                            else {"trace": render_trace(result["events"])})
                f.write(json.dumps({"id": ident, **call, **result, **rendered}) + "\n")
    return len(calls)
