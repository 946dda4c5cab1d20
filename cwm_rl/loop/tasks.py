"""Where the job's tasks come from: one source per env of the mix, a weighted pick between them,
and the held-out tasks each eval plays. Tasks are drawn, never reset: no container, sandbox or
process starts here, and no reference answer is needed.

    >>> from cwm_rl.config import EnvSpec
    >>> spec = EnvSpec(id="cwm_rl/Math-v0", kwargs={"difficulty": 1})
    >>> held_out = {spec.id: held_out_tasks(make_task_env(spec), seed=0, num_tasks=5)}
    >>> tasks = TaskMix([spec], seed=0, held_out=held_out, cursors={}, mix_seed=0)
    >>> drawn = tasks.draw(4, env_index=tasks.pick_env())   # (env seed, task) pairs
    >>> [split_key(task) in held_out_keys(held_out[spec.id]) for _, task in drawn]   # never a held-out task
    [False, False, False, False]
    >>> tasks.cursors()[spec.id] >= 4   # saved in checkpoints: a resume continues there
    True
    >>> tasks.close()

An env offers its tasks in one of two ways (`envs.base.TextEnv`):
- a generator, `sample_task(rng)`: held-out tasks are the distinct tasks of the eval seeds (odd
  numbers), training draws take the seeds `seed * 10**9 + cursor` and skip held-out ids. A small
  task space (1-digit addition has 100 tasks) is not swallowed: the held-out set takes at most
  `share` of the distinct tasks a probe of the generator finds.
- a task list, `env.tasks` (a task file): held-out tasks are the first of a seeded permutation
  (at most `share` of the list), training walks the rest in a fresh seeded order each epoch.
Tasks that must be held out together share a split key (`split_key`: `metadata["split_key"]`, else
the task id): Trace-v0 gives every call of one program the program's key, so a held-out program
is never trained on with other inputs. Either way the driver knows every task it trains on, no
trained task (nor a task sharing its split key) is ever evaluated, a resumed
run continues where it stopped, and `cwm-rl model sft` holds out the same tasks (the job's
held-out set is a prefix of the warm start's when `model.sft.eval_tasks >= eval.num_tasks`).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from cwm_rl.types import Task

if TYPE_CHECKING:  # cwm_rl.config imports cwm_rl.sft, which draws its tasks from here
    from cwm_rl.config import EnvSpec

PROBE_DRAWS = 1_000  # generator draws that estimate the size of its task space
MAX_HELD_OUT_DRAWS_IN_A_ROW = 10_000  # draws that all hit held-out tasks before the task space is called too small


def make_task_env(spec: EnvSpec) -> Any:
    """The env a job draws `spec`'s tasks from: made, never reset (making one starts nothing)."""
    from envs import make_env

    return make_env(spec.id, **spec.kwargs)


def task_rng(seed: int) -> Any:
    """The numpy Generator `env.reset(seed=seed)` draws its task with."""
    from gymnasium.utils import seeding

    return seeding.np_random(seed)[0]


def train_seed(seed: int, k: int) -> int:
    """Env seed of the k-th warm-start (SFT) training draw: even numbers (held-out draws use the odd ones)."""
    return 2 * (seed * 2**32 + k)


def eval_seed(seed: int, k: int) -> int:
    """Env seed of the k-th held-out draw."""
    return train_seed(seed, k) + 1


def split_key(task: Task | dict[str, Any]) -> str:
    """What the held-out split is made on: tasks with the same key are held out together (Trace-v0: every call
    of one program), so a held-out task's key is never trained on. `metadata["split_key"]`, else the task id."""
    if isinstance(task, Task):
        return str(task.metadata.get("split_key") or task.id)
    return str((task.get("metadata") or {}).get("split_key") or task["id"])


def held_out_keys(tasks: list[dict[str, Any]]) -> set[str]:
    """The split keys of held-out tasks (as JSON): no training draw may have one."""
    return {split_key(t) for t in tasks}


def env_name(env: Any) -> str:
    return env.spec.id if getattr(env, "spec", None) else type(env).__name__


def draw_task(env: Any, seed: int) -> Task:
    """The task `env.reset(seed=seed)` would play, drawn without resetting."""
    try:
        return env.sample_task(task_rng(seed))
    except NotImplementedError:
        raise ValueError(f"{env_name(env)} offers no tasks: implement sample_task(self, rng) (draw a Task with rng) or set "
                         "self.tasks to a list of Task in its __init__") from None


def task_list(env: Any) -> list[Task] | None:
    """The env's fixed tasks (distinct ids, file order), or None when it draws from a generator."""
    tasks = getattr(env, "tasks", None)
    if not tasks:
        return None
    return list({t.id: t for t in tasks}.values())


def held_out_tasks(env: Any, seed: int, num_tasks: int, share: float = 0.25) -> list[dict[str, Any]]:
    """Up to `num_tasks` held-out tasks of `env`, as JSON: the tasks of its held-out split keys (at most `share` of
    its keys), one per key first; when there are fewer keys than `num_tasks` (Trace-v0 level 4 has 3 programs),
    more tasks of the same keys fill the set."""
    listed = task_list(env)
    if listed is not None:
        keys = list(dict.fromkeys(split_key(t) for t in listed))
        if len(keys) < 2:
            raise ValueError(f"{env_name(env)} has {len(keys)} distinct task(s) (or split key: one program of Trace-v0): a job "
                             "needs at least 2 (one held out for eval, the rest to train on); add tasks to its task file")
        target = max(1, min(num_tasks, math.floor(share * len(keys))))
        order = task_rng(eval_seed(seed, 0)).permutation(len(keys))
        by_key: dict[str, list[Task]] = {}
        for t in listed:
            by_key.setdefault(split_key(t), []).append(t)
        held = [keys[i] for i in order[:target]]
        chosen = [by_key[k][0] for k in held] + [t for k in held for t in by_key[k][1:]]
        return [t.model_dump(mode="json") for t in chosen[:num_tasks]]
    distinct = len({split_key(draw_task(env, train_seed(seed, k))) for k in range(max(PROBE_DRAWS, 4 * num_tasks))})
    target = max(1, min(num_tasks, math.floor(share * distinct)))
    found: dict[str, Task] = {}  # split key -> its first task
    more: dict[str, Task] = {}  # task id -> other tasks of those keys
    for k in range(20 * num_tasks + 100):
        if len(found) >= target:
            keyed = any(key != t.id for key, t in found.items())  # else every key is one task: nothing to fill with
            if not keyed or len(found) + len(more) >= num_tasks:
                break
        task = draw_task(env, eval_seed(seed, k))
        key = split_key(task)
        if key not in found and len(found) < target:
            found[key] = task
        elif key in found and task.id != found[key].id and len(found) >= target:
            more.setdefault(task.id, task)
    return [t.model_dump(mode="json") for t in [*found.values(), *more.values()][:num_tasks]]


class TaskSource:
    """Training tasks of one env: from its generator or its task list, never a held-out one."""

    def __init__(self, env: Any, seed: int, held_out: set[str], cursor: int = 0):
        self.env = env
        self.name = env_name(env)
        self.base = seed * 10**9
        self.held_out = held_out  # split keys
        self.cursor = cursor
        listed = task_list(env)
        self.training = None if listed is None else [t for t in listed if split_key(t) not in held_out]
        self._epoch: tuple[int, Any] = (-1, None)  # (epoch, its order of the training list)
        if self.training is not None and not self.training:
            raise ValueError(f"{self.name}: every task of its list is held out; lower eval.num_tasks or add tasks")

    def next_task(self) -> tuple[int, dict[str, Any]]:
        """(env seed, task as JSON) of the next training task."""
        if self.training is not None:  # a list: every task once per epoch, in a fresh order each epoch
            epoch, i = divmod(self.cursor, len(self.training))
            seed = self.base + self.cursor
            self.cursor += 1
            if self._epoch[0] != epoch:
                self._epoch = (epoch, task_rng(self.base + epoch).permutation(len(self.training)))
            task = self.training[int(self._epoch[1][i])]
            return seed, task.model_dump(mode="json")
        for _ in range(MAX_HELD_OUT_DRAWS_IN_A_ROW):
            seed = self.base + self.cursor
            self.cursor += 1
            task = draw_task(self.env, seed)
            if split_key(task) not in self.held_out:
                return seed, task.model_dump(mode="json")
        raise RuntimeError(f"{self.name}: {MAX_HELD_OUT_DRAWS_IN_A_ROW:,} draws in a row were held-out tasks; the task "
                           "space is too small for eval.num_tasks, lower it")

    def close(self) -> None:
        self.env.close()


class TaskMix:
    """The task mix of a job: each draw picks an env by weight, then takes tasks from its source."""

    def __init__(self, specs: list[EnvSpec], seed: int, held_out: dict[str, list[dict[str, Any]]], cursors: dict[str, int],
                 mix_seed: int, envs: list[Any] | None = None):
        self.specs = specs
        self.held_out = held_out
        envs = envs or [make_task_env(spec) for spec in specs]
        self.sources = [TaskSource(env, seed, held_out_keys(held_out[spec.id]), cursors.get(spec.id, 0))
                        for spec, env in zip(specs, envs)]
        self.rng = random.Random(mix_seed)

    def pick_env(self) -> int:
        """Index of the env the next group plays, drawn by the envs' weights."""
        return self.rng.choices(range(len(self.specs)), weights=[s.weight for s in self.specs])[0]

    def draw(self, n: int, env_index: int) -> list[tuple[int, dict[str, Any]]]:
        """`n` training tasks of env `env_index`, as (seed, task) pairs."""
        return [self.sources[env_index].next_task() for _ in range(n)]

    def held_out_ids(self) -> dict[str, list[str]]:
        """Each env's held-out task ids (checkpointed: a resume checks it holds out the same tasks)."""
        return {spec_id: sorted(t["id"] for t in tasks) for spec_id, tasks in self.held_out.items()}

    def continue_from(self, cursors: dict[str, int], mix_seed: int) -> None:
        """Continue a resumed run's task streams from its checkpointed cursors."""
        for spec, source in zip(self.specs, self.sources):
            source.cursor = cursors.get(spec.id, 0)
        self.rng = random.Random(mix_seed)

    def cursors(self) -> dict[str, int]:
        """Where each source stands (checkpointed, so a resume continues there)."""
        return {spec.id: source.cursor for spec, source in zip(self.specs, self.sources)}

    def close(self) -> None:
        for source in self.sources:
            source.close()


def job_tasks(specs: list[EnvSpec], seed: int, num_held_out: int, share: float, cursors: dict[str, int],
              mix_seed: int) -> TaskMix:
    """The job's TaskMix: each env made once, its held-out tasks split off, its cursor restored."""
    envs = [make_task_env(spec) for spec in specs]
    try:
        held_out = {spec.id: held_out_tasks(env, seed, num_held_out, share) for spec, env in zip(specs, envs)}
        return TaskMix(specs, seed, held_out, cursors, mix_seed, envs=envs)
    except BaseException:
        for env in envs:
            env.close()
        raise
