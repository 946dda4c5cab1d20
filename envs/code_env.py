"""`cwm_rl/Code-v0`: write a program that passes hidden tests, run in a sandbox.

Format as CWM: optional reasoning in `<think> ... </think>` (with `think=True`, exactly one
`</think>` is required and only the text after it is graded), then exactly one fenced code block.
Reward `correct_reward` (+1) when every hidden test passes, else `wrong_reward` (-1); with
`partial_credit=True` the reward is interpolated by the fraction of tests passed. `info` names
the first failing test, the reason and a stderr excerpt.

Tasks: stdin/stdout programs and functions with assertion tests (`envs.tasks.code_tasks`), from
`tasks_path` (JSONL, HumanEval / MBPP / APPS-like forms) or the seeded generator of easy tasks
(`kind`: "function", "stdio" or both). Code runs under `sandbox` ("bwrap" or "docker") with
`test_timeout_s` per test and `memory_mb` per process: model-written code never runs on the host.
With `tool_calls=N` the model may first run code with the `python` tool N times (`envs.tools`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cwm_rl.types import Task
from envs.base import SingleTurnEnv
from envs.tasks import read_task_file
from envs.tasks.code_tasks import generated_code_task, load_code_tasks
from envs.tools import PythonToolMixin
from rewards.code import extract_code, grade_function, grade_stdio

PROMPT_PLAIN = "Solve the task in Python. Answer with exactly one ```python code block."
PROMPT_THINK = ("Solve the task in Python. First reason inside <think> ... </think>, then give exactly one "
                "```python code block after </think>.")
MAX_ANSWER_CHARS = 50_000
STDIO_HINT = "\n\nRead the input from standard input and write the answer to standard output."


class CodeEnv(PythonToolMixin, SingleTurnEnv):
    def __init__(
        self,
        tasks_path: str | Path | None = None,
        kind: str | None = None,
        think: bool = False,
        correct_reward: float = 1.0,
        wrong_reward: float = -1.0,
        partial_credit: bool = False,
        sandbox: str = "bwrap",
        test_timeout_s: float = 5.0,
        memory_mb: int = 512,
        tool_calls: int = 0,
        **kwargs: Any,
    ):
        from envs.sandbox import Limits, check_backend

        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward ({correct_reward}) must exceed wrong_reward ({wrong_reward})")
        check_backend(sandbox)
        if kind not in (None, "function", "stdio"):
            raise ValueError(f"kind must be 'function', 'stdio' or None (both), got {kind!r}")
        super().__init__(**kwargs)
        self.tasks = read_task_file(tasks_path, load_code_tasks, "code task") if tasks_path else None
        self.kind, self.think, self.partial_credit = kind, think, partial_credit
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward
        self.limits = Limits(timeout_s=test_timeout_s, cpu_s=max(1, int(test_timeout_s)), memory_mb=memory_mb)
        self.system_prompt = PROMPT_THINK if think else PROMPT_PLAIN
        self._setup_python_tool(tool_calls, sandbox, test_timeout_s, memory_mb)

    def sample_task(self, rng) -> Task:
        if self.tasks is not None:
            return super().sample_task(rng)
        return generated_code_task(rng, self.kind)

    def first_messages(self, task: Task) -> list[dict[str, str]]:
        hint = STDIO_HINT if task.metadata.get("kind") == "stdio" else ""
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": task.prompt + hint}]

    def score(self, task: Task, action: str) -> tuple[float, dict[str, Any]]:
        from envs.sandbox import shared_sandbox

        if len(action) > MAX_ANSWER_CHARS:  # a wall of text with a program buried in it does not count
            return self.wrong_reward, {"verdict": "format_error", "reason": f"answer longer than {MAX_ANSWER_CHARS} characters",
                                       "passed": 0, "total": None}
        code, why = extract_code(action, think=self.think)
        if code is None:
            return self.wrong_reward, {"verdict": "format_error", "reason": why, "passed": 0, "total": None}
        sandbox = shared_sandbox(self.sandbox_backend)
        meta = task.metadata
        if meta.get("kind") == "stdio":
            verdict = grade_stdio(code, meta["tests"], sandbox, self.limits, stop_at_first_failure=not self.partial_credit)
        elif meta.get("kind") == "function":
            verdict = grade_function(code, sandbox=sandbox, test=meta.get("test"), entry_point=meta.get("entry_point"),
                                     asserts=meta.get("asserts"), limits=self.limits)
        else:
            raise ValueError(f"code task {task.id!r} has metadata kind {meta.get('kind')!r}; expected 'stdio' or 'function'")
        fraction = verdict.fraction if self.partial_credit else float(verdict.correct)
        reward = self.wrong_reward + (self.correct_reward - self.wrong_reward) * fraction
        failed = next((t for t in verdict.tests if not t["passed"]), None)
        return reward, {"verdict": verdict.status, "reason": verdict.reason, "passed": verdict.passed,
                        "total": verdict.total, "failed_test": failed}

    def reference_action(self) -> str | None:
        if self.task is None or not isinstance(self.task.answer, str):
            return None
        answer = f"```python\n{self.task.answer.rstrip()}\n```"
        return f"<think>\nI write the program.\n</think>\n{answer}" if self.think else answer

    def reward_hack_probes(self) -> dict[str, str]:
        """Ways to fake passing; none may score."""
        probes = {
            "exit_early": "```python\nimport sys\nsys.exit(0)\n```",
            "os_exit": "```python\nimport os\nos._exit(0)\n```",
            "print_pass": "```python\nprint('All tests passed')\nprint('OK')\n```",
            "kill_self": "```python\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n```",
        }
        reference = self.reference_action()
        if reference and not self.think:
            probes["two_blocks"] = reference + "\n" + reference
            probes["reference_then_exit"] = reference.replace("\n```", "\nimport os\nos._exit(0)\n```", 1) \
                if self.task and self.task.metadata.get("kind") == "function" else probes["exit_early"]
        return probes
