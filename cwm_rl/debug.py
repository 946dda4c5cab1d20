"""The neural debugger: step through a Python call the way pdb does, where each next frame is the model's
prediction, shown beside the real tracer's frame with the mismatches marked.

    cwm-rl debug examples/sum.py::total --args '[[1, 2, 3]]' --model models/tiny-trace
    cwm-rl debug examples/sum.py::total --args '[[1, 2, 3]]' --model models/tiny-trace --check
    cwm-rl debug --check --tasks held_out.jsonl --model models/tiny-trace     # many calls (`trace generate` files)

The real call runs under the tracer in the sandbox (`envs.trace.run_trace`), never on the host. The
model, on the rollout engine (vLLM, greedy), reads CWM's trace format (`envs/trace/cwm_format.py`):
the marked source, then the REAL frames so far; it writes the next frame, up to `<|frame_sep|>`. The
session follows the real execution (teacher forcing), so a wrong prediction never derails the frames
after it, and every frame is scored on its own: `--check` predicts each frame after the call and prints
the share predicted exactly (CWM's next-frame accuracy; the same scoring as Trace-v0
`format="cwm", mode="next_frame"`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from envs.trace import cwm_format as cwm
from envs.trace_env import asked_frame, trace_task

COMMANDS = """\
  s, step       predict the next frame (only the traced function's frames exist: step and next are the same)
  n, next       the same as step
  r, out        predict frames until the function returns
  c, continue   predict frames until a breakpoint or the end
  b N           break before line N (b alone lists breakpoints; cl N clears one)
  p [NAME]      the locals at this frame (or one), real and predicted
  l, list       the source, with the current line marked
  w, where      the frame number and line
  q, quit       leave"""


@dataclass
class Prediction:
    """The model's guess at frame `index`, the real frame, and what differs."""

    index: int
    text: str  # the model's output, decoded (special tokens by name)
    predicted: cwm.Frame | None  # None: the output is not one frame
    real: cwm.Frame
    mismatch: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return self.predicted is not None and not self.mismatch


class FramePredictor:
    """Next-frame predictions of one model on the rollout engine (greedy), any number at once."""

    def __init__(self, model: str, *, max_model_len: int = 2048, max_tokens: int = 256, engine: Any = None):
        from rollout_workers.config import EngineConfig, SamplingConfig
        from rollout_workers.engine import RolloutEngine

        self.engine = engine or RolloutEngine(EngineConfig(model=model, max_model_len=max_model_len, kv_cache_gib=0.5))
        self.owns_engine = engine is None
        self.loop = asyncio.new_event_loop()  # vLLM's AsyncLLM stays bound to the loop it first ran in: one loop for all
        from cwm_rl.models.raw_prompt import stop_token_ids

        self.tokenizer = self.engine.tokenizer
        stop = stop_token_ids(self.tokenizer, [{"stop": [cwm.FRAME_SEP, cwm.END_OF_TEXT]}])
        self.sampling = SamplingConfig(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop)

    async def predict(self, source: str, function: str, frames: list[cwm.Frame], index: int) -> Prediction:
        """The model's frame `index` after the prompt and the real `frames[:index]`."""
        from cwm_rl.models.raw_prompt import encode_raw

        parts = cwm.prompt_parts(source, function) + cwm.frames_parts(frames[:index], end=False)
        ids, _ = encode_raw(self.tokenizer, [{"parts": parts}])
        room = self.engine.config.max_model_len - len(ids)
        if room < 1:  # scored as a miss (the model cannot see this far), not a crash of the whole check
            return Prediction(index, "", None, frames[index], [f"the prompt is {len(ids)} tokens, past the engine's "
                                                               f"max_model_len {self.engine.config.max_model_len}"])
        sampling = self.sampling.model_copy(update={"max_tokens": min(self.sampling.max_tokens, room)})
        generation = await self.engine.generate(ids, sampling)
        text = self.tokenizer.decode(generation.token_ids)
        real = frames[index]
        try:
            predicted, _ = cwm.parse_frames(text)
        except cwm.FormatError as e:
            return Prediction(index, text, None, real, [f"not a frame: {e}"])
        if len(predicted) != 1:
            return Prediction(index, text, None, real, [f"{len(predicted)} frames, not one"])
        return Prediction(index, text, predicted[0], real, cwm.frame_mismatch(predicted[0], real))

    async def predict_all(self, source: str, function: str, frames: list[cwm.Frame]) -> list[Prediction]:
        """Every frame after the call, each from the real frames before it (all requests batched by the engine)."""
        return list(await asyncio.gather(*(self.predict(source, function, frames, k) for k in range(1, len(frames)))))

    def run(self, coroutine: Any) -> Any:
        """Run `coroutine` (anything using the engine) to completion on the predictor's own event loop."""
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        pending = asyncio.all_tasks(self.loop)  # an AsyncLLM's output handler: stopped before its loop closes, not after
        for task in pending:
            task.cancel()
        if pending:  # (an empty gather would belong to another loop; an in-process engine leaves no task)
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        if self.owns_engine:
            self.engine.shutdown()
        self.loop.close()


def real_frames(source: str, function: str, args: list, kwargs: dict, *, backend: str = "bwrap",
                max_events: int = 1000) -> tuple[list[cwm.Frame], dict[str, Any]]:
    """The call's real frames (traced in the sandbox) and the tracer's result (its events hold each frame's line)."""
    from envs.sandbox import make_sandbox
    from envs.trace import run_trace

    with make_sandbox(backend, **({"pool_size": 0} if backend == "docker" else {})) as sandbox:
        result = run_trace(source, function, args, kwargs, sandbox=sandbox, max_events=max_events)
    return cwm.event_frames(result["events"], source), result


def check(predictor: FramePredictor, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Next-frame accuracy over every frame after the call of every call (`{"id", "source", "function", "frames"}`),
    in all and by the real frame's kind (line, return, exception); and over one frame per call, the frame
    Trace-v0's next_frame mode asks of a listed task with that id (`asked_frame_accuracy`: what `model sft`'s
    held-out evaluation measures, so `--held-out-of` reproduces its figure)."""
    async def run() -> list[list[Prediction]]:
        return list(await asyncio.gather(*(predictor.predict_all(c["source"], c["function"], c["frames"]) for c in calls)))

    per_call = predictor.run(run())
    flat = [p for preds in per_call for p in preds]
    # the one frame per call that Trace-v0's next_frame mode asks of a listed task (what `model sft` evaluates)
    asked = [preds[asked_frame(c.get("id", ""), len(c["frames"])) - 1].correct for c, preds in zip(calls, per_call) if preds]
    by_kind = {}
    for kind in sorted({p.real.kind for p in flat}):
        of_kind = [p.correct for p in flat if p.real.kind == kind]
        by_kind[kind] = {"frames": len(of_kind), "accuracy": sum(of_kind) / len(of_kind)}
    correct = sum(p.correct for p in flat)
    return {"calls": len(calls), "frames": len(flat), "correct": correct,
            "frame_accuracy": correct / len(flat) if flat else None, "by_kind": by_kind,
            "asked_frame_accuracy": sum(asked) / len(asked) if asked else None, "predictions": per_call}


def locals_at(frames: list[cwm.Frame], index: int) -> dict[str, str]:
    """Every local's repr at frame `index`, from the diff-based frames before it (".." means: as before)."""
    values: dict[str, str] = {}
    for frame in frames[: index + 1]:
        values.update({k: v for k, v in frame.locals.items() if v != cwm.UNCHANGED})
    return values


class Session:
    """The interactive loop's state: where we are in the real trace, breakpoints, what the model said."""

    def __init__(self, predictor: FramePredictor, source: str, function: str, frames: list[cwm.Frame], line_numbers: list[int],
                 out: Any):
        self.predictor, self.source, self.function, self.frames, self.out = predictor, source, function, frames, out
        self.lines = source.rstrip("\n").split("\n")
        self.position = 0  # the frame shown last (0: the call)
        self.breakpoints: set[int] = set()
        self.predictions: dict[int, Prediction] = {}
        self.line_numbers = line_numbers  # the tracer's, per frame: a line's text may appear twice in the source

    @property
    def done(self) -> bool:
        return self.position >= len(self.frames) - 1

    def advance(self) -> Prediction:
        index = self.position + 1
        prediction = self.predictor.run(self.predictor.predict(self.source, self.function, self.frames, index))
        self.predictions[index] = prediction
        self.position = index
        self.show(prediction)
        return prediction

    def show(self, p: Prediction) -> None:
        from rich.markup import escape

        mark = "[green]✓[/]" if p.correct else "[red]✗[/]"
        real = frame_text(p.real)
        self.out.print(f"{mark} frame {p.index} (line {self.line_numbers[p.index]})  real:  {escape(real)}")
        if not p.correct:
            self.out.print(f"   {' ' * len(str(p.index))}       model: {escape(frame_text(p.predicted) if p.predicted else p.text)}")
            for item in p.mismatch:
                self.out.print(f"   [red]≠ {escape(item)}[/]")

    def command(self, line: str) -> bool:
        """Run one command; False to leave."""
        from rich.markup import escape

        word, _, arg = line.strip().partition(" ")
        if word in ("q", "quit", "exit"):
            return False
        if word in ("b", "break", "cl", "clear") and arg and not arg.strip().isdigit() or word in ("cl", "clear") and not arg:
            self.out.print(f"{word} takes a line number: {word} N")
            return True
        if word in ("", "s", "step", "n", "next"):
            self.advance() if not self.done else self.out.print("the call has returned; q to leave")
        elif word in ("r", "out", "return"):
            while not self.done:
                if self.advance().real.kind == "return":
                    break
        elif word in ("c", "cont", "continue"):
            while not self.done:
                self.advance()
                if self.line_numbers[self.position] in self.breakpoints and self.frames[self.position].kind == "line":
                    self.out.print(f"breakpoint at line {self.line_numbers[self.position]}")
                    break
        elif word in ("b", "break"):
            if arg:
                self.breakpoints.add(int(arg.strip()))
            self.out.print(f"breakpoints: {sorted(self.breakpoints) or 'none'}")
        elif word in ("cl", "clear"):
            self.breakpoints.discard(int(arg.strip()))
        elif word in ("p", "print"):
            real = locals_at(self.frames, self.position)
            predicted = self.predictions.get(self.position)
            guess = predicted.predicted.locals if predicted and predicted.predicted else {}
            for name in ([arg] if arg else list(real)):
                said = guess.get(name)
                note = "" if said is None else f"   model: {said}" + ("" if said == cwm.UNCHANGED or said == real.get(name) else "  ≠")
                self.out.print(f"{escape(name)} = {escape(real.get(name, '(not defined)'))}{escape(note)}")
        elif word in ("l", "list"):
            current = self.line_numbers[self.position]
            for number, text in enumerate(self.lines, 1):
                self.out.print(f"{'->' if number == current else '  '}{'B' if number in self.breakpoints else ' '}{number:>3}  {escape(text)}")
        elif word in ("w", "where"):
            self.out.print(f"frame {self.position} of {len(self.frames) - 1}, line {self.line_numbers[self.position]}")
        else:
            self.out.print(f"unknown command {word!r}; the commands:\n{COMMANDS}")
        return True


def frame_text(frame: cwm.Frame) -> str:
    """A frame for people: the kind, the line, the locals that changed, the value."""
    changed = {k: v for k, v in frame.locals.items() if v != cwm.UNCHANGED}
    text = f"{frame.kind:<9} {frame.source_line.strip()}"
    if changed:
        text += "   " + ", ".join(f"{k}={v}" for k, v in changed.items())
    if frame.value is not None:
        text += f"   -> {frame.value}"
    return text


def calls_of(path: str, ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Calls with their real frames from a `cwm-rl trace generate` / `trace dataset` JSONL file (events included);
    only those whose id is in `ids` when given."""
    calls = []
    for number, line in enumerate(open(path), 1):
        if line.strip():
            record = json.loads(line)
            if "events" not in record or "source" not in record:
                raise ValueError(f"{path} line {number} has no traced events (make the file with `cwm-rl trace generate`)")
            ident = record.get("id") or trace_task(record["source"], record["function"], record.get("args", []),
                                                   record.get("kwargs")).id  # the id Trace-v0 gives it
            if ids is not None and ident not in ids:
                continue
            calls.append({"id": ident, "source": record["source"], "function": record["function"],
                          "frames": cwm.event_frames(record["events"], record["source"]),
                          "lines": [e["line"] for e in record["events"]]})
    if not calls:
        raise ValueError(f"{path} holds no calls" + (" with those ids" if ids is not None else ""))
    return calls


def held_out_ids(model_dir: str) -> set[str]:
    """The task ids `cwm-rl model sft` held out when it made `model_dir` (from its sft_summary.json)."""
    from pathlib import Path

    summary = Path(model_dir) / "sft_summary.json"
    if not summary.is_file():
        raise ValueError(f"{model_dir} has no sft_summary.json: --held-out-of names a model made by `cwm-rl model sft`")
    ids = json.loads(summary.read_text()).get("held_out_ids")
    if not ids:
        raise ValueError(f"{summary} lists no held-out ids (made before cwm-rl recorded them); rerun the SFT")
    return set(ids)
