"""`cwm_rl/Math-v0`: answer a math question with the final answer in exactly one `\\boxed{}`.

Format as CWM: optional reasoning in `<think> ... </think>` (with `think=True`, exactly one
`</think>` is required and only the text after it is graded), the final answer in exactly one
`\\boxed{}`. Reward `correct_reward` (+1) or `wrong_reward` (-1; set 0 for 1/0 rewards); a
format violation, a verifier timeout or an unparseable gold answer scores as wrong, with the
reason in `info`. Grading is `rewards.math.grade_math`: the format and plain-integer answers in
this process (then on the event loop, no thread: `astep`), anything else by math-verify in a
hard-timeout pool.

Tasks come from the seeded arithmetic generator (`difficulty` 1-5, `operators` to keep only some
of a level's operators, e.g. `difficulty=2, operators="+"` for 2-digit addition) unless
`tasks_path` names a GSM8K-form or plain question/answer .jsonl/.parquet file. With `tool_calls=N`
the model may run Python N times before answering (CWM's `python` tool, in the `sandbox`; `envs.tools`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cwm_rl.types import Task
from envs.base import SingleTurnEnv
from envs.tools import PythonToolMixin
from envs.tasks import read_task_file
from envs.tasks.math_tasks import DIFFICULTY_LEVELS, arithmetic_task, check_operators, load_math_tasks
from rewards.math import grade_math, grades_in_process

PROMPT_PLAIN = "Solve the problem. Put your final answer within \\boxed{}, exactly once."
PROMPT_THINK = (
    "Solve the problem. First reason inside <think> ... </think>, then give your final answer "
    "after </think> within \\boxed{}, exactly once."
)


# The methods a reset or step runs: the async twins stay on the event loop only when none is overridden.
_LOOP_SAFE = ("reset", "step", "respond", "score", "sample_task", "first_messages", "_gold")


class MathEnv(PythonToolMixin, SingleTurnEnv):
    def __init__(
        self,
        difficulty: int = 1,
        operators: str | None = None,
        tasks_path: str | Path | None = None,
        think: bool = False,
        correct_reward: float = 1.0,
        wrong_reward: float = -1.0,
        verify_timeout_s: float = 5.0,
        tool_calls: int = 0,
        sandbox: str = "bwrap",
        **kwargs: Any,
    ):
        if difficulty not in DIFFICULTY_LEVELS:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY_LEVELS)}, got {difficulty}")
        if correct_reward <= wrong_reward:
            raise ValueError(f"correct_reward ({correct_reward}) must exceed wrong_reward ({wrong_reward})")
        if not verify_timeout_s > 0:
            raise ValueError(f"verify_timeout_s must be > 0 seconds, got {verify_timeout_s}; pass e.g. 5.0")
        check_operators(difficulty, operators)
        super().__init__(**kwargs)
        self.difficulty = difficulty
        self.operators = operators
        self.tasks = read_task_file(tasks_path, load_math_tasks, "math task") if tasks_path else None
        self.think = think
        self.correct_reward = correct_reward
        self.wrong_reward = wrong_reward
        self.verify_timeout_s = verify_timeout_s
        self.system_prompt = PROMPT_THINK if think else PROMPT_PLAIN
        self._setup_python_tool(tool_calls, sandbox, timeout_s=10.0, memory_mb=512)

    def sample_task(self, rng) -> Task:
        if self.tasks is not None:
            return super().sample_task(rng)
        return arithmetic_task(rng, self.difficulty, self.operators)

    def _gold(self, task: Task) -> str:
        if task.answer is None or isinstance(task.answer, (dict, list)):
            raise ValueError(f"math task {task.id!r} needs a scalar answer, got {task.answer!r}")
        return str(task.answer)

    def score(self, task: Task, action: str) -> tuple[float, dict[str, Any]]:
        verdict = grade_math(action, self._gold(task), think=self.think, timeout_s=self.verify_timeout_s)
        reward = self.correct_reward if verdict.correct else self.wrong_reward
        return reward, {
            "verdict": verdict.status,
            "reason": verdict.reason,
            "extracted": verdict.extracted,
            "gold": verdict.gold,
        }

    def _on_loop(self) -> bool:
        """May the async twins skip the thread? Only with MathEnv's own code: a subclass's reset, step or score may be slow."""
        cls = type(self)
        return self.tool_calls == 0 and all(getattr(cls, name) is getattr(MathEnv, name) for name in _LOOP_SAFE)

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """On the event loop: drawing or taking a task builds nothing, and a thread hop costs more than the reset."""
        if not self._on_loop():
            return await super().areset(seed=seed, options=options)
        return self.reset(seed=seed, options=options)

    async def astep(self, action: str):
        """On the event loop when grading needs no math-verify (a plain-integer answer or a format error: microseconds);
        in a thread when it does, when the action may be a tool call, or in a subclass."""
        task = self.task
        if (task is not None and not self.done and isinstance(action, str) and self._on_loop()
                and grades_in_process(action, self._gold(task), think=self.think)):
            return self.step(action)
        return await super().astep(action)

    def reference_action(self) -> str | None:
        if self.task is None:
            return None
        answer = f"The answer is \\boxed{{{self._gold(self.task)}}}."
        if not self.think:
            return answer
        reasoning = self.task.metadata.get("solution") or f"I need to work out: {self.task.prompt}"
        return f"<think>\n{reasoning}\n</think>\n{answer}"

    def reward_hack_probes(self) -> dict[str, str]:
        """Ways to game a boxed-answer grader; none may score."""
        if self.task is None:
            return {}
        gold = self._gold(self.task)
        other = "0" if gold.strip() != "0" else "1"
        probes = {
            "two_boxes_gold_first": f"\\boxed{{{gold}}} or \\boxed{{{other}}}",
            "two_boxes_gold_last": f"\\boxed{{{other}}} or \\boxed{{{gold}}}",
            "gold_without_box": f"The answer is {gold}.",
        }
        if self.think:
            probes["box_inside_think_only"] = f"<think>\\boxed{{{gold}}}</think> done"
            probes["two_think_ends"] = f"<think>x</think></think>\\boxed{{{gold}}}"
            probes["no_think_end"] = f"\\boxed{{{gold}}}"
        return probes
