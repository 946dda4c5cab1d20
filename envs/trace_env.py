"""`cwm_rl/Trace-v0`: predict what a Python function does when called (CWM's code world modelling).

Two modes:
- `mode="output"` (CruxEval-O style): answer `<return>VALUE</return>` (a Python literal) and, when
  the call prints, `<stdout>TEXT</stdout>`; reward `correct_reward` for an exact match, else
  `wrong_reward`;
- `mode="trace"`: answer `<trace> ... </trace>` with the step-by-step execution trace, one event
  per line in the format of `rewards/trace.py` (`line 3: {"y": 4}`: line 3 is about to run and y
  changed); reward `wrong + (correct - wrong) * score`, where score in [0, 1] is the similarity of
  the event sequences (1 only for the exact trace).

Programs come from the seeded generator (`difficulty` 1-4: straight-line arithmetic, branches,
loops, strings and lists) or from `tasks_path` (JSONL made by `cwm-rl trace dataset` or
`cwm-rl trace generate`, references included). The
reference comes from running the program under the tracer inside the sandbox.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cwm_rl.types import Task
from envs.base import SingleTurnEnv
from envs.tasks import read_task_file
from envs.trace import cwm_format as cwm
from envs.trace.programs import LEVELS, generate_program
from rewards.trace import render_trace, score_output, score_trace

MAX_ANSWER_CHARS = 20_000
PROMPTS = {
    "output": ("Predict what the call returns and prints. Answer with <return>VALUE</return>, the return value as a "
               "Python literal, followed by <stdout>TEXT</stdout> when the call prints something."),
    "trace": ("Trace the call step by step. Answer inside <trace> ... </trace>, one event per line: `call N: {args}` "
              "first, then `line N: {changed}` for each line about to run (N its number, {changed} the local variables "
              "that changed since the previous event, as JSON), and `return N: VALUE` last."),
}


REFERENCE_CACHE_SIZE = 50_000  # traced results kept per process (a level-1 result is a few hundred bytes)
_references: OrderedDict[str, dict[str, Any]] = OrderedDict()  # call digest -> traced result, shared by every env


def call_key(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([meta["source"], meta["function"], meta["args"], meta.get("kwargs") or {}]).encode()).hexdigest()


def _remember(key: str, result: dict[str, Any]) -> None:
    _references[key] = {k: result[k] for k in ("events", "return_repr", "stdout", "exception")}
    _references.move_to_end(key)
    while len(_references) > REFERENCE_CACHE_SIZE:
        _references.popitem(last=False)


FORMATS = ("text", "cwm")
MODES = {"text": ("output", "trace"), "cwm": ("output", "trace", "next_frame")}


def numbered(source: str) -> str:
    return "\n".join(f"{i:>2} | {line}" for i, line in enumerate(source.rstrip("\n").splitlines(), 1))


def call_text(function: str, args: list, kwargs: dict) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{function}({', '.join(parts)})"


def trace_task(source: str, function: str, args: list, kwargs: dict | None = None, reference: dict | None = None,
               ident: str | None = None, source_name: str = "generator:trace", level: int | None = None) -> Task:
    """A task to trace `function(*args, **kwargs)`. Its split key names the program (source and function), so a job
    or a warm start that holds the program out never trains on it with other arguments."""
    kwargs = kwargs or {}
    digest = hashlib.sha256(json.dumps([source, function, args, kwargs]).encode()).hexdigest()[:10]
    program = hashlib.sha256(json.dumps([source, function]).encode()).hexdigest()[:10]
    prompt = f"```python\n{numbered(source)}\n```\n\nThe call: `{call_text(function, args, kwargs)}`"
    return Task(id=ident or f"trace-L{level}-{digest}", prompt=prompt, answer=reference, source=source_name,
                metadata={"source": source, "function": function, "args": args, "kwargs": kwargs, "level": level,
                          "split_key": f"program-{program}"})


def asked_frame(task_id: str, num_frames: int, position: float | None = None) -> int:
    """The frame next_frame mode asks for, 1 .. num_frames - 1, at `position` in [0, 1), or, for a task without one (a
    task of a list, as a job's held-out set and its epochs take them), at a position the task id fixes."""
    if position is None:
        position = int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) / 16**8
    return 1 + min(int(float(position) * (num_frames - 1)), num_frames - 2)


def cwm_carriable(tasks: list[Task], path: str) -> list[Task]:
    """The tasks CWM's format can carry: an answer is decoded text, so a program or value holding a special
    token's name (`"<|frame_sep|>"`) would read as that token. Such tasks are left out, with a warning."""
    kept = [t for t in tasks if not cwm.has_special_name(t.metadata.get("source", "") + json.dumps(t.answer))]
    if len(kept) < len(tasks):
        warnings.warn(f"{path}: {len(tasks) - len(kept)} of {len(tasks)} programs hold a special token's name in their "
                      "source or values, which CWM's format cannot carry in an answer; they are left out", stacklevel=3)
    if not kept:
        raise ValueError(f"{path}: every program holds a special token's name; none can be played in format='cwm'")
    return kept


def load_trace_tasks(path: str) -> list[Task]:
    """Trace tasks from JSONL made by `cwm-rl trace dataset` (references included)."""
    tasks = []
    for index, line in enumerate(open(path)):
        if line.strip():
            r = json.loads(line)
            missing = {"source", "function", "args"} - r.keys()
            if missing:
                raise ValueError(f"{path} line {index + 1} lacks {sorted(missing)} (make files with `cwm-rl trace dataset`)")
            reference = {k: r[k] for k in ("events", "return_repr", "stdout", "exception") if k in r} or None
            tasks.append(trace_task(r["source"], r["function"], r["args"], r.get("kwargs"), reference if reference and
                                    "events" in reference else None, ident=r.get("id"), source_name=path))
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    return tasks


class TraceEnv(SingleTurnEnv):
    def __init__(self, mode: str = "output", difficulty: int = 1, tasks_path: str | Path | None = None,
                 correct_reward: float = 1.0, wrong_reward: float = -1.0, sandbox: str = "bwrap", format: str = "text",
                 **kwargs: Any):
        from envs.sandbox import check_backend

        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
        if mode not in MODES[format]:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES[format]))} with format={format!r}, got "
                             f"{mode!r}" + (" (next_frame needs format='cwm')" if mode == "next_frame" else ""))
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty must be one of {list(LEVELS)}, got {difficulty!r}")
        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward ({correct_reward}) must exceed wrong_reward ({wrong_reward})")
        check_backend(sandbox)
        super().__init__(**kwargs)
        self.tasks = read_task_file(tasks_path, load_trace_tasks, "trace task") if tasks_path else None
        if self.tasks is not None and format == "cwm":
            self.tasks = cwm_carriable(self.tasks, str(tasks_path))
        self.mode, self.difficulty, self.sandbox_backend, self.format = mode, difficulty, sandbox, format
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward
        self.system_prompt = PROMPTS[mode] if format == "text" else None  # CWM's trace prompt is the source alone

    def sample_task(self, rng) -> Task:
        if self.tasks is not None:
            task = super().sample_task(rng)
        else:
            source, function, args = generate_program(rng, self.difficulty)
            task = trace_task(source, function, args, level=self.difficulty)
        if self.mode == "next_frame":  # which frame to predict, as a share of the trace (its length is known at reset)
            task = task.model_copy(update={"metadata": {**task.metadata, "frame_position": float(rng.random())}})
        return task

    # ---- CWM's format (envs/trace/cwm_format.py) ----
    def frames(self, task: Task) -> list[cwm.Frame]:
        return cwm.event_frames(self.reference(task)["events"], task.metadata["source"])

    def frame_index(self, task: Task) -> int:
        """next_frame: the frame to predict, 1 .. len-1 (the call frame, 0, is always given), at the task's
        `frame_position` (drawn with the task), or, for a task without one, at a position its id fixes."""
        n = len(self.frames(task))
        if n < 2:
            raise ValueError(f"task {task.id}'s trace has {n} frame(s): nothing after the call to predict")
        return asked_frame(task.id, n, task.metadata.get("frame_position"))

    def given_frames(self, task: Task) -> list[cwm.Frame]:
        """The frames the prompt holds: the call (its arguments) and, for next_frame, every frame before the one asked."""
        return self.frames(task)[: self.frame_index(task) if self.mode == "next_frame" else 1]

    def first_messages(self, task: Task) -> list[dict[str, Any]]:
        if self.format == "text":
            return super().first_messages(task)
        meta = task.metadata
        parts = cwm.prompt_parts(meta["source"], meta["function"]) + cwm.frames_parts(self.given_frames(task), end=False)
        stop = [cwm.END_OF_TEXT]
        if self.mode == "output":  # CWM's output prediction: the return frame forced right after the call
            parts.append({"token": cwm.RETURN_SEP})
            stop = [cwm.FRAME_SEP]
        elif self.mode == "next_frame":
            stop = [cwm.FRAME_SEP]
        return [{"role": "raw", "content": cwm.parts_text(parts), "parts": parts, "stop": stop}]

    def expected_frames(self, task: Task) -> list[cwm.Frame]:
        """What the model is asked for: the return frame (output), every frame after the call (trace), one frame;
        none for a trace the tracer cut at max_events (trace, output) or a call that raised (output)."""
        frames, reference = self.frames(task), self.reference(task)
        whole = cwm.scope_exited(reference["events"])
        if self.mode == "output":  # a `finally` runs lines after the exception: ask the tracer, not the frames
            raised = reference["exception"] is not None if "exception" in reference else any(f.kind == "exception" for f in frames)
            return frames[-1:] if whole and not raised else []
        if self.mode == "next_frame":
            return [frames[self.frame_index(task)]]
        return frames[1:] if whole else []

    def score_cwm(self, task: Task, action: str) -> tuple[float, dict[str, Any]]:
        expected = self.expected_frames(task)
        text = (cwm.RETURN_SEP + action) if self.mode == "output" else action
        try:
            predicted, ended = cwm.parse_frames(text)
        except cwm.FormatError as e:
            return self.wrong_reward, {"verdict": "format_error", "reason": str(e), "score": 0.0}
        if self.mode in ("output", "next_frame"):
            if len(predicted) != 1:
                return self.wrong_reward, {"verdict": "format_error", "score": 0.0,
                                           "reason": f"expected exactly one frame, got {len(predicted)}"}
            (got,) = predicted
            want = expected[0] if expected else None
            if self.mode == "output":
                correct = want is not None and got.kind == "return" and got.key()[3] == want.key()[3]
                details = {"expected_return": want.value if want else None, "predicted_return": got.value}
            else:
                correct = want is not None and got.key() == want.key()
                details = {"frame": self.frame_index(task), "expected": cwm.parts_text(cwm.frame_parts(want)),
                           "mismatch": cwm.frame_mismatch(got, want)}
            reward = self.correct_reward if correct else self.wrong_reward
            return reward, {"verdict": "correct" if correct else "wrong", "score": float(correct), **details}
        score, info = cwm.similarity(predicted, expected)
        if not ended:
            info["reason"] += f"; no {cwm.END_OF_TEXT} after the last frame"
        return self.wrong_reward + (self.correct_reward - self.wrong_reward) * score, info

    def reference_cwm(self, task: Task) -> str | None:
        expected = self.expected_frames(task)
        if not expected or any(cwm.has_special_name(f.source_line + json.dumps(f.locals) + (f.value or "")) for f in expected):
            return None  # nothing to answer, or an answer the format cannot carry (see cwm_carriable)
        if self.mode == "output":
            return cwm.parts_text(cwm.frame_parts(expected[0])[1:])  # <|return_sep|> is in the prompt
        if self.mode == "next_frame":
            return cwm.parts_text(cwm.frame_parts(expected[0]))
        return cwm.parts_text(cwm.frames_parts(expected))

    def reference(self, task: Task) -> dict[str, Any]:
        """The traced result of the task's call: the task file's, or run in the sandbox once per call (a process keeps
        the last REFERENCE_CACHE_SIZE, so the episodes of a group, and every eval, trace a call once)."""
        if isinstance(task.answer, dict) and "events" in task.answer:
            return task.answer
        key = call_key(task.metadata)
        if key not in _references:
            self.prepare_tasks([task])
        return _references[key]

    def prepare_tasks(self, tasks: list[Task]) -> None:
        """Trace the calls of `tasks` not traced yet, 500 per sandbox run (one process start for all of them)."""
        from envs.sandbox import shared_sandbox
        from envs.trace import run_traces

        todo: dict[str, dict[str, Any]] = {}  # call key -> the call, each call once
        for t in tasks:
            if not (isinstance(t.answer, dict) and "events" in t.answer):
                m = t.metadata
                todo.setdefault(call_key(m), {"source": m["source"], "function": m["function"], "args": m["args"],
                                              "kwargs": m.get("kwargs") or {}})
        pending = [(key, call) for key, call in todo.items() if key not in _references]
        for start in range(0, len(pending), 500):
            chunk = pending[start:start + 500]
            results = run_traces([call for _, call in chunk], sandbox=shared_sandbox(self.sandbox_backend))
            for (key, _), result in zip(chunk, results, strict=True):
                _remember(key, result)

    def score(self, task: Task, action: str) -> tuple[float, dict[str, Any]]:
        if len(action) > MAX_ANSWER_CHARS:  # a wall of text with the answer buried in it does not count
            return self.wrong_reward, {"verdict": "format_error", "reason": f"answer longer than {MAX_ANSWER_CHARS} characters"}
        if self.format == "cwm":
            return self.score_cwm(task, action)
        reference = self.reference(task)
        if self.mode == "output":
            correct, info = score_output(action, reference)
            return (self.correct_reward if correct else self.wrong_reward), info
        score, info = score_trace(action, reference["events"])
        return self.wrong_reward + (self.correct_reward - self.wrong_reward) * score, info

    def reference_action(self) -> str | None:
        if self.task is None:
            return None
        if self.format == "cwm":
            return self.reference_cwm(self.task)
        reference = self.reference(self.task)
        if self.mode == "trace":
            return f"<trace>\n{render_trace(reference['events'])}\n</trace>"
        if reference["return_repr"] is None:
            return None  # the call raised: output mode has no answer to give
        stdout = f"\n<stdout>{reference['stdout']}</stdout>" if reference["stdout"] else ""
        return f"<return>{reference['return_repr']}</return>{stdout}"

    def reward_hack_probes(self) -> dict[str, str]:
        if self.task is None:
            return {}
        reference = self.reference_action() or ""
        if self.format == "cwm":  # no frame, or the given call frame again (and, asked for one frame, two)
            call = cwm.parts_text(cwm.frame_parts(self.frames(self.task)[0]))
            probes = {"no_frame": cwm.END_OF_TEXT, "call_frame_again": call}
            if self.mode != "trace":  # a trace with its frames repeated earns the partial credit its similarity gives
                probes["frame_twice"] = reference + reference
            return probes
        if self.mode == "output":
            return {"two_returns": "<return>0</return> <return>1</return>", "untagged": reference.replace("<return>", ""),
                    "python_expression": f"<return>{call_text(self.task.metadata['function'], self.task.metadata['args'], {})}</return>"}
        return {"two_traces": reference + "\n" + reference, "empty_trace": "<trace>\n</trace>",
                "return_only": "<trace>\n" + reference.strip().splitlines()[-2] + "\n</trace>" if reference else ""}
