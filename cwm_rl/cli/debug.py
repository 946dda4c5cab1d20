"""`cwm-rl debug`: the neural debugger (`cwm_rl/debug.py`): pdb's commands, the model's frames beside the real ones."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from cwm_rl.cli.common import call_target


def debug(
    target: Annotated[str | None, typer.Argument(help="FILE.py::FUNC, the call to step through.")] = None,
    model: Annotated[Path, typer.Option("--model", help="A model that speaks CWM's trace format (a CWM checkpoint, or "
                                                        "a model made with `model init --tokenizer cwm` and trained on traces).")] = Path(),
    args: Annotated[str, typer.Option("--args", help="Positional arguments as a JSON list.")] = "[]",
    kwargs: Annotated[str, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")] = "{}",
    check: Annotated[bool, typer.Option("--check", help="Predict every frame and print the model's frame accuracy.")] = False,
    tasks: Annotated[Path | None, typer.Option("--tasks", help="With --check: the calls of a `cwm-rl trace generate` "
                                                               "JSONL file instead of FILE.py::FUNC.")] = None,
    held_out_of: Annotated[Path | None, typer.Option("--held-out-of", help="With --check --tasks: only the programs "
                                                                         "`model sft` held out when it made this model "
                                                                         "(its held-out figure, reproduced).")] = None,
    commands: Annotated[str | None, typer.Option("--commands", help="Run these commands (separated by `;`) instead of "
                                                                     "reading them from the terminal.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --check: print the figures as one JSON object.")] = False,
    backend: Annotated[str, typer.Option(help="Sandbox backend that runs the real call: bwrap or docker.")] = "bwrap",
    max_model_len: Annotated[int, typer.Option(help="The engine's longest sequence in tokens.")] = 2048,
) -> None:
    """Step through a call where each next frame is the model's prediction, the real frame beside it."""
    from cwm_rl import debug as dbg

    if not (model / "config.json").is_file():
        raise ValueError(f"--model {model} is not a model directory (no config.json); pass the model to debug with")
    if held_out_of is not None and tasks is None:
        raise ValueError("--held-out-of goes with --check --tasks FILE (the file `model sft` trained on)")
    if tasks is not None:
        if not check:
            raise ValueError("--tasks goes with --check (the interactive debugger steps through one call: FILE.py::FUNC)")
        calls = dbg.calls_of(str(tasks), dbg.held_out_ids(str(held_out_of)) if held_out_of else None)
    else:
        if target is None:
            raise ValueError("name the call: cwm-rl debug FILE.py::FUNC --args JSON --model DIR (or --check --tasks FILE)")
        path, function, call_args, call_kwargs = call_target(target, args, kwargs)
        source = path.read_text()
        frames, result = dbg.real_frames(source, function, call_args, call_kwargs, backend=backend)
        if result["truncated"]:
            raise ValueError(f"the call ran past the tracer's {len(result['events'])} events; debug a shorter call")
        calls = [{"id": target, "source": source, "function": function, "frames": frames,
                  "lines": [e["line"] for e in result["events"]]}]
    console = Console(highlight=False)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's start-up lines would bury the frames
    predictor = dbg.FramePredictor(str(model), max_model_len=max_model_len)
    figures = None
    try:
        if not check:
            _interact(dbg, predictor, calls[0], target or "", commands, console)
        else:
            figures = dbg.check(predictor, calls)
            predictions = figures.pop("predictions")
            if not as_json:  # the JSON is printed once the engine is down: its shutdown lines must not follow it
                _show_check(dbg, predictor, calls, predictions, figures, console)
    finally:
        predictor.close()
    if as_json and figures is not None:
        print(json.dumps(figures))


def _interact(dbg: Any, predictor: Any, call: dict, target: str, commands: str | None, console: Console) -> None:
    """The pdb-like loop over one call: commands from the terminal, or from --commands."""
    session = dbg.Session(predictor, call["source"], call["function"], call["frames"], call["lines"], console)
    console.print(f"[bold]{escape(target)}[/]: {len(call['frames']) - 1} frames after the call; the model predicts "
                  f"each, the real one beside it.\n{dbg.COMMANDS}")
    console.print(f"  frame 0 (the call): {escape(dbg.frame_text(call['frames'][0]))}")
    script = commands.split(";") if commands is not None else None
    while True:
        if script is not None:
            if not script:
                break
            line = script.pop(0)
            console.print(f"(cwmdb) {escape(line.strip())}")
        else:
            try:
                line = input("(cwmdb) ")
            except EOFError:
                break
        if not session.command(line):
            break


def _show_check(dbg: Any, predictor: Any, calls: list[dict], predictions: list, figures: dict, console: Console) -> None:
    """--check for people: each frame of a single call (or a line per call), then the figures."""
    for call, preds in zip(calls, predictions):
        if len(calls) == 1:
            session = dbg.Session(predictor, call["source"], call["function"], call["frames"], call["lines"], console)
            for p in preds:
                session.show(p)
        else:
            console.print(f"{escape(call['id'])}: {sum(p.correct for p in preds)}/{len(preds)} frames")
    accuracy = figures["frame_accuracy"]
    console.print(f"[bold]frame accuracy:[/] {figures['correct']}/{figures['frames']} "
                  f"({accuracy:.1%}) over {figures['calls']} call(s)" if accuracy is not None else "no frames to predict")
    if accuracy is not None:
        console.print("by kind: " + ", ".join(f"{kind} {v['accuracy']:.1%} of {v['frames']}"
                                              for kind, v in figures["by_kind"].items()))
        console.print(f"one frame per call, the one Trace-v0 asks (as `model sft` evaluates): "
                      f"{figures['asked_frame_accuracy']:.1%}")
