"""Where the job's tasks come from: one source per env of the mix, a weighted pick between them,
and the held-out tasks each eval plays.

    >>> spec = EnvSpec(id="cwm_rl/Math-v0", kwargs={"difficulty": 1})
    >>> held_out = {spec.id: held_out_tasks(spec, seed=0, num_tasks=5)}
    >>> tasks = TaskMix([spec], seed=0, held_out=held_out, cursors={}, mix_seed=0)
    >>> drawn = tasks.draw(4, env_index=tasks.pick_env())   # (env seed, task) pairs
    >>> [task["id"] in {t["id"] for t in held_out[spec.id]} for _, task in drawn]   # never a held-out task
    [False, False, False, False]
    >>> tasks.cursors()[spec.id] >= 4   # saved in checkpoints: a resume continues there
    True
    >>> tasks.close()

A source draws seeds 0, 1, 2, ... (offset by the job's seed) from a cursor and skips the
held-out task ids, so the driver knows every task it trains on, no trained task is ever
evaluated, and a resumed run continues where it stopped.
"""

from __future__ import annotations

import random
from typing import Any

from cwm_rl.config import EnvSpec

MAX_HELD_OUT_DRAWS_IN_A_ROW = 10_000  # draws that all hit held-out tasks before the task space is called too small


class TaskSource:
    """Training tasks of one env: seeds from a cursor, skipping held-out task ids."""

    def __init__(self, spec: EnvSpec, seed: int, held_out_ids: set[str], cursor: int = 0):
        from envs import make_env

        self.spec = spec
        self.env = make_env(spec.id, **spec.kwargs)
        self.base = seed * 10**9
        self.held_out_ids = held_out_ids
        self.cursor = cursor

    def next_task(self) -> tuple[int, dict[str, Any]]:
        """(env seed, task as JSON) of the next training task."""
        for _ in range(MAX_HELD_OUT_DRAWS_IN_A_ROW):
            seed = self.base + self.cursor
            self.cursor += 1
            self.env.reset(seed=seed)
            task = self.env.task
            if task.id not in self.held_out_ids:
                return seed, task.model_dump(mode="json")
        raise RuntimeError(f"{self.spec.id}: {MAX_HELD_OUT_DRAWS_IN_A_ROW:,} draws in a row were held-out tasks; the task "
                           "space is too small for eval.num_tasks, lower it")

    def close(self) -> None:
        self.env.close()


def held_out_tasks(spec: EnvSpec, seed: int, num_tasks: int) -> list[dict[str, Any]]:
    """Distinct held-out tasks of an env, as `cwm-rl model sft` picks them (so SFT never trained on them)."""
    from cwm_rl.sft import SFTConfig, held_out_examples
    from envs import make_env

    env = make_env(spec.id, **spec.kwargs)
    try:
        examples, _ = held_out_examples(env, SFTConfig(env_id=spec.id, env_kwargs=spec.kwargs, steps=0, eval_tasks=num_tasks, seed=seed))
    finally:
        env.close()
    return [e.task.model_dump(mode="json") for e in examples]


class TaskMix:
    """The task mix of a job: each draw picks an env by weight, then takes tasks from its source."""

    def __init__(self, specs: list[EnvSpec], seed: int, held_out: dict[str, list[dict[str, Any]]], cursors: dict[str, int],
                 mix_seed: int):
        self.specs = specs
        self.held_out = held_out
        self.sources = [TaskSource(spec, seed, {t["id"] for t in held_out[spec.id]}, cursors.get(spec.id, 0)) for spec in specs]
        self.rng = random.Random(mix_seed)

    def pick_env(self) -> int:
        """Index of the env the next group plays, drawn by the envs' weights."""
        return self.rng.choices(range(len(self.specs)), weights=[s.weight for s in self.specs])[0]

    def draw(self, n: int, env_index: int) -> list[tuple[int, dict[str, Any]]]:
        """`n` training tasks of env `env_index`, as (seed, task) pairs."""
        return [self.sources[env_index].next_task() for _ in range(n)]

    def cursors(self) -> dict[str, int]:
        """Where each source stands (checkpointed, so a resume continues there)."""
        return {s.spec.id: s.cursor for s in self.sources}

    def close(self) -> None:
        for source in self.sources:
            source.close()
