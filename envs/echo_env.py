"""`cwm_rl/Echo-v0`: a trivial multi-turn env. Each turn the model must repeat a word.

It exists to test and benchmark the machinery (multi-turn masks, the env server, rollout
throughput) with an env whose own cost is near zero, so `blocking = False`.
"""

from __future__ import annotations

from typing import Any

from cwm_rl.types import Task
from envs.base import StepResult, TextEnv

WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "ember", "north", "quartz", "violet")


class EchoEnv(TextEnv):
    """Repeat `num_rounds` words, one per turn; reward 1 per exact echo (whitespace-stripped), else 0."""

    blocking = False

    def __init__(self, num_rounds: int = 3, **kwargs: Any):
        if not 1 <= num_rounds <= 10_000:  # an episode of 10**9 rounds would ask numpy for gigabytes at reset
            raise ValueError(f"num_rounds must be between 1 and 10000, got {num_rounds}")
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.words: list[str] = []

    def sample_task(self, rng) -> Task:
        words = [str(w) for w in rng.choice(WORDS, size=self.num_rounds)]
        return Task(id="echo-" + "-".join(words), prompt=f"Repeat exactly: {words[0]}", answer=words, source="echo")

    def first_messages(self, task: Task) -> list[dict[str, str]]:
        words = task.answer  # checked once here: a malformed task fails at reset, not mid-episode
        if not (isinstance(words, list) and words and all(isinstance(w, str) for w in words)):
            raise ValueError("an Echo task's answer must be a non-empty list of words")
        self.words = words
        return super().first_messages(task)

    def respond(self, action: str) -> StepResult:
        words = self.words
        expected = words[self.num_turns]
        correct = action.strip() == expected
        info = {"expected": expected, "correct": correct}
        if self.num_turns + 1 >= len(words):
            return [], float(correct), True, False, info
        return [{"role": "user", "content": f"Repeat exactly: {words[self.num_turns + 1]}"}], float(correct), False, False, info

    def reference_action(self) -> str | None:
        return self.words[self.num_turns] if self.task and not self.done else None
