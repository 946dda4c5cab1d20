"""The environment API: `TextEnv`, a `gymnasium.Env` whose action is the model's text for one turn.

Contract (DESIGN.md): `reset(seed=None, options=None) -> (observation, info)` and
`step(action) -> (observation, reward, terminated, truncated, info)`, where an observation is
the list of NEW chat messages to append (never a re-render of history) and
`options={"task": Task | dict}` picks the task (without it the env samples one from its own
seeded generator).

A subclass implements three methods:
    sample_task(rng)   -> Task                  draw a task with the numpy Generator `rng`
    first_messages(t)  -> list of messages      what the model sees first (default: the prompt)
    respond(action)    -> (obs, reward, terminated, truncated, info)   react to one turn
(an env with a fixed task list sets `self.tasks` instead of writing `sample_task`) and may add
`reference_action()` (a correct answer, for checks and SFT), `reward_hack_probes()` (actions
that must not score) and `prepare_tasks(tasks)` (costly per-task setup done for many tasks at once). `SingleTurnEnv` reduces this to `sample_task` and `score`. Bookkeeping (turn count, `max_turns`, order checks, the transcript,
`state()`) lives here once.

Tasks are drawn without building an episode: `sample_task(rng)` must only draw (no container,
sandbox or process), so a job can draw its training tasks and split off held-out ones
(`cwm_rl.loop.tasks`) from an env it never resets. `reset(seed=s)` draws with the Generator
that `s` seeds, so `sample_task(gymnasium.utils.seeding.np_random(s)[0])` is the task it plays.

`areset`/`astep` are async twins: they run the sync methods in a worker thread so blocking
env work never stalls an event loop. Envs whose steps are pure and fast (microseconds, no I/O)
set `blocking = False` and are stepped on the loop directly: they get no step deadline, so a
slow or hanging step there would stall every session of an env server.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import gymnasium as gym
import numpy as np
from pydantic import ValidationError

from cwm_rl.types import Message, Task
from envs.spaces import ROLES, MessagesSpace, TextSpace

Messages = list[dict[str, str]]
StepResult = tuple[Messages, float, bool, bool, dict[str, Any]]


def as_messages(messages: list[Message | dict[str, str]]) -> Messages:
    """Normalise Message models or dicts into fresh `{"role", "content"}` dicts, plus `name`, `parts` and `stop`
    where set (validated)."""
    out = []
    for m in messages:
        if (isinstance(m, dict) and m.keys() == {"role", "content"} and m["role"] in ROLES and m["role"] != "raw"
                and isinstance(m["content"], str)):
            out.append({"role": m["role"], "content": m["content"]})  # the common case, without pydantic's cost
        else:
            msg = m if isinstance(m, Message) else Message.model_validate(m)
            out.append(msg.model_dump())  # role and content, and a tool's name or a raw prompt's parts when set
    return out


class TextEnv(gym.Env[Messages, str]):
    """Base class of every cwm-rl environment. See the module docstring for what to override."""

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # fps is meaningless for text; declared so check_env is quiet
    blocking = True  # True: the async twins offload to a thread
    system_prompt: str | None = None

    tasks: list[Task] | None = None  # a fixed task list (a task file): `sample_task` picks from it; None = a generator
    verify_s: float = 0.0  # seconds the last step spent scoring (SingleTurnEnv sets it; the job's step timeline reads it)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("sample_task")
        if method is not None and len(inspect.signature(method).parameters) < 2:
            raise TypeError(f"{cls.__name__}.sample_task(self) must take the random generator to draw with: "
                            f"`def sample_task(self, rng) -> Task` (use rng where it used self.np_random)")

    def __init__(self, max_turns: int | None = None, max_action_chars: int = 1_000_000, render_mode: str | None = None):
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.max_turns = max_turns
        self.render_mode = render_mode
        self.observation_space = MessagesSpace()
        self.action_space = TextSpace(max_action_chars)
        self.task: Task | None = None
        self.transcript: Messages = []
        self.num_turns = 0
        self.episode_return = 0.0
        self.done = False
        self.closed = False

    # ----- what a subclass implements -----
    def sample_task(self, rng: np.random.Generator) -> Task:
        """Draw a task with `rng`, building nothing else. The default picks from `self.tasks`."""
        if self.tasks:
            return self.tasks[int(rng.integers(len(self.tasks)))]
        raise NotImplementedError(f"{type(self).__name__} offers no tasks: implement sample_task(self, rng) or set "
                                  "self.tasks (a list of Task); or pass reset(options={'task': ...})")

    def first_messages(self, task: Task) -> list[Message | dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": task.prompt}]

    def respond(self, action: str) -> StepResult:
        """React to one model turn: (new messages, reward, terminated, truncated, info)."""
        raise NotImplementedError

    def reference_action(self) -> str | None:
        """A correct action for the current state, if the env knows one (checks and SFT use it)."""
        return None

    def reward_hack_probes(self) -> dict[str, str]:
        """Env-specific actions that must not score on the current task (see `cwm-rl env check`)."""
        return {}

    def prepare_tasks(self, tasks: list[Task]) -> None:
        """`tasks` are about to be reset (SFT data, a held-out set): an env whose per-task setup is costly does it
        here for all of them at once (Trace-v0 traces every program in one sandbox run). The default does nothing."""

    # ----- the Gymnasium API -----
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Messages, dict[str, Any]]:
        super().reset(seed=seed)
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed; make a new env")
        options = dict(options or {})
        task = options.pop("task", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; the only option is 'task'")
        self.task = self._coerce_task(task) if task is not None else self.sample_task(self.np_random)
        self.num_turns = 0
        self.episode_return = 0.0
        self.done = False
        observation = as_messages(self.first_messages(self.task))
        self.transcript = [dict(m) for m in observation]
        return observation, {"task_id": self.task.id}

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start a new one")
        if not isinstance(action, str):
            raise TypeError(f"an action is the model's text (str), got {type(action).__name__}")
        self.verify_s = 0.0
        observation, reward, terminated, truncated, info = self.respond(action)
        observation = as_messages(observation)
        self.num_turns += 1
        if self.max_turns is not None and self.num_turns >= self.max_turns and not terminated:
            truncated = True
            info = {**info, "truncated_reason": "max_turns"}
        self.done = bool(terminated or truncated)
        self.episode_return += float(reward)
        self.transcript += [{"role": "assistant", "content": action}] + [dict(m) for m in observation]
        return observation, float(reward), bool(terminated), bool(truncated), info

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Messages, dict[str, Any]]:
        if not self.blocking:
            return self.reset(seed=seed, options=options)
        return await asyncio.to_thread(self.reset, seed=seed, options=options)

    async def astep(self, action: str) -> StepResult:
        if not self.blocking:
            return self.step(action)
        return await asyncio.to_thread(self.step, action)

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot for debugging (the env server's GET /sessions/{id})."""
        return {
            "env_id": self.spec.id if self.spec else type(self).__name__,
            "task": self.task.model_dump(mode="json") if self.task else None,
            "num_turns": self.num_turns,
            "max_turns": self.max_turns,
            "episode_return": self.episode_return,
            "done": self.done,
            "transcript": [dict(m) for m in self.transcript],
        }

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n".join(f"[{m['role']}] {m['content']}" for m in self.transcript)

    def close(self) -> None:
        """Release resources; safe to call more than once. Subclasses extend it and call super()."""
        self.closed = True

    @staticmethod
    def _coerce_task(task: Task | dict[str, Any]) -> Task:
        if isinstance(task, Task):
            return task
        try:
            return Task.model_validate(task)
        except ValidationError as e:
            raise ValueError(f"options['task'] is not a valid Task ({e.error_count()} problem(s)): {e}") from None


class SingleTurnEnv(TextEnv):
    """One prompt, one answer, one reward: implement `sample_task` and `score`."""

    def __init__(self, **kwargs: Any):
        super().__init__(**{"max_turns": 1, **kwargs})

    def score(self, task: Task, action: str) -> tuple[float, dict[str, Any]]:
        """Grade the answer: (reward, info)."""
        raise NotImplementedError

    def respond(self, action: str) -> StepResult:
        assert self.task is not None
        started = time.perf_counter()
        reward, info = self.score(self.task, action)
        self.verify_s = time.perf_counter() - started  # the step timeline's `verify` (cwm_rl/loop/timeline.py)
        return [], reward, True, False, info
