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
from pathlib import Path
from typing import Any

from cwm_rl.types import Task
from envs.base import SingleTurnEnv
from envs.tasks import read_task_file
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


def numbered(source: str) -> str:
    return "\n".join(f"{i:>2} | {line}" for i, line in enumerate(source.rstrip("\n").splitlines(), 1))


def call_text(function: str, args: list, kwargs: dict) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{function}({', '.join(parts)})"


def trace_task(source: str, function: str, args: list, kwargs: dict | None = None, reference: dict | None = None,
               ident: str | None = None, source_name: str = "generator:trace", level: int | None = None) -> Task:
    kwargs = kwargs or {}
    digest = hashlib.sha256(json.dumps([source, function, args, kwargs]).encode()).hexdigest()[:10]
    prompt = f"```python\n{numbered(source)}\n```\n\nThe call: `{call_text(function, args, kwargs)}`"
    return Task(id=ident or f"trace-L{level}-{digest}", prompt=prompt, answer=reference, source=source_name,
                metadata={"source": source, "function": function, "args": args, "kwargs": kwargs, "level": level})


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
                 correct_reward: float = 1.0, wrong_reward: float = -1.0, sandbox: str = "bwrap", **kwargs: Any):
        from envs.sandbox import check_backend

        if mode not in PROMPTS:
            raise ValueError(f"mode must be 'output' or 'trace', got {mode!r}")
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty must be one of {list(LEVELS)}, got {difficulty!r}")
        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward ({correct_reward}) must exceed wrong_reward ({wrong_reward})")
        check_backend(sandbox)
        super().__init__(**kwargs)
        self.tasks = read_task_file(tasks_path, load_trace_tasks, "trace task") if tasks_path else None
        self.mode, self.difficulty, self.sandbox_backend = mode, difficulty, sandbox
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward
        self.system_prompt = PROMPTS[mode]
        self._references: dict[str, dict[str, Any]] = {}  # the current task's traced result

    def sample_task(self, rng) -> Task:
        if self.tasks is not None:
            return super().sample_task(rng)
        source, function, args = generate_program(rng, self.difficulty)
        return trace_task(source, function, args, level=self.difficulty)

    def reference(self, task: Task) -> dict[str, Any]:
        """The traced result of the task's call: the task file's, or run in the sandbox once per task."""
        if isinstance(task.answer, dict) and "events" in task.answer:
            return task.answer
        if task.id not in self._references:
            from envs.sandbox import shared_sandbox
            from envs.trace import run_trace

            meta = task.metadata
            result = run_trace(meta["source"], meta["function"], meta["args"], meta.get("kwargs"),
                               sandbox=shared_sandbox(self.sandbox_backend))
            self._references = {task.id: {k: result[k] for k in ("events", "return_repr", "stdout", "exception")}}
        return self._references[task.id]

    def score(self, task: Task, action: str) -> tuple[float, dict[str, Any]]:
        if len(action) > MAX_ANSWER_CHARS:  # a wall of text with the answer buried in it does not count
            return self.wrong_reward, {"verdict": "format_error", "reason": f"answer longer than {MAX_ANSWER_CHARS} characters"}
        reference = self.reference(task)
        if self.mode == "output":
            correct, info = score_output(action, reference)
            return (self.correct_reward if correct else self.wrong_reward), info
        score, info = score_trace(action, reference["events"])
        return self.wrong_reward + (self.correct_reward - self.wrong_reward) * score, info

    def reference_action(self) -> str | None:
        if self.task is None:
            return None
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
        if self.mode == "output":
            return {"two_returns": "<return>0</return> <return>1</return>", "untagged": reference.replace("<return>", ""),
                    "python_expression": f"<return>{call_text(self.task.metadata['function'], self.task.metadata['args'], {})}</return>"}
        return {"two_traces": reference + "\n" + reference, "empty_trace": "<trace>\n</trace>",
                "return_only": "<trace>\n" + reference.strip().splitlines()[-2] + "\n</trace>" if reference else ""}
