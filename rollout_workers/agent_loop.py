"""The multi-turn agent loop: play one episode of any env (local or remote) with a vLLM engine and
return a Trajectory whose tokens are exactly what was sampled.

Token in, token out: the first messages are rendered with the chat template once (a raw prompt, role
`raw`, is tokenised from its parts instead: `cwm_rl.models.raw_prompt`); after that
the loop only appends tokens: the model's generated tokens (loss mask 1, with their behaviour
logprobs and policy versions), then the rendering of the env's NEW messages
(`render_delta`, loss mask 0). Earlier turns are never re-tokenised, so the trainer scores the
very tokens vLLM sampled.

An env that raises or runs past `env_timeout_s` ends its episode with finish reason
"env_error" / "timeout", an env server that cannot be reached with "env_unavailable", a
generation the engine refuses with "aborted", the error recorded; the caller keeps going.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cwm_rl.models.chat_template import detect_end_of_turn, render, render_delta
from cwm_rl.models.raw_prompt import RawPromptError, encode_raw, is_raw, stop_token_ids
from cwm_rl.types import NO_VERSION, Message, Span, Task, Trajectory, Turn, new_id
from envs.server.client import EnvServerUnavailable
from rollout_workers.config import EpisodeLimits, SamplingConfig
from rollout_workers.engine import RolloutEngine


class _Tokens:
    """The four aligned per-token arrays of a trajectory, appended to as the episode runs."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []

    def add_context(self, ids: list[int]) -> Span:
        start = len(self.ids)
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [NO_VERSION] * len(ids)
        return Span(start=start, end=len(self.ids))

    def add_generated(self, ids: list[int], logprobs: list[float], versions: list[int]) -> Span:
        start = len(self.ids)
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += logprobs
        self.versions += versions
        return Span(start=start, end=len(self.ids))


@dataclass
class EpisodePrefix:
    """The first `num_turns` turns of a recorded episode, to go on from: its tokens up to where turn
    `num_turns` was generated (everything the model had seen then), those turns and the transcript."""

    trajectory: Trajectory
    num_turns: int

    def __post_init__(self) -> None:
        if not 0 <= self.num_turns < len(self.trajectory.turns):
            raise ValueError(f"turn {self.num_turns} is not a turn of trajectory {self.trajectory.trajectory_id}, which has "
                             f"{len(self.trajectory.turns)} (turns are numbered from 0)")

    @property
    def num_tokens(self) -> int:
        return self.trajectory.turns[self.num_turns].action_span.start

    def copy_into(self, tokens: _Tokens, turns: list[Turn], messages: list[dict[str, str]]) -> None:
        t, n = self.trajectory, self.num_tokens
        tokens.ids, tokens.mask = list(t.token_ids[:n]), list(t.loss_mask[:n])
        tokens.logprobs, tokens.versions = list(t.logprobs[:n]), list(t.policy_versions[:n])
        turns += [turn.model_copy(deep=True) for turn in t.turns[:self.num_turns]]
        messages += [m.model_dump() for m in t.messages[:t.messages_before_turn(self.num_turns)]]


@functools.lru_cache(maxsize=8)
def _end_of_turn(tokenizer: Any) -> tuple[str, list[int]]:
    """The token a model ends its turn with, as text and ids (found once per tokenizer, not per episode)."""
    end_of_turn = detect_end_of_turn(tokenizer)
    return end_of_turn, tokenizer.encode(end_of_turn, add_special_tokens=False)


_PROMPT_IDS: OrderedDict[tuple, list[int]] = OrderedDict()  # (tokenizer, first messages) -> token ids, most recent last
_PROMPT_IDS_MAX = 256  # a group's samples reset together: the cache need only outlive the groups in flight


def first_prompt_ids(tokenizer: Any, observation: list[dict[str, Any]]) -> list[int]:
    """The token ids of a first observation rendered by the chat template, made once for the samples of a
    group (they all reset to the same task): rendering and tokenising were a tenth of a worker's CPU."""
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), json.dumps(observation, sort_keys=True, default=str))
    ids = _PROMPT_IDS.get(key)
    if ids is None:
        ids = tokenizer.encode(render(tokenizer, observation, add_generation_prompt=True), add_special_tokens=False)
        _PROMPT_IDS[key] = ids
        if len(_PROMPT_IDS) > _PROMPT_IDS_MAX:
            _PROMPT_IDS.popitem(last=False)  # the least recently used
    else:
        _PROMPT_IDS.move_to_end(key)
    return list(ids)


async def run_episode(
    engine: RolloutEngine,
    env: Any,
    *,
    env_id: str,
    sampling: SamplingConfig,
    limits: EpisodeLimits,
    task: Task | None = None,
    seed: int | None = None,
    tokenizer: Any = None,
    ids: dict[str, Any] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    prefix: EpisodePrefix | None = None,
) -> Trajectory:
    """Play one episode of `env` (a TextEnv or RemoteEnv: anything with `areset`/`astep`). The Trajectory
    keeps `task`, `seed` and `env_kwargs` (the env's constructor arguments), so a replay can rebuild it.

    With `prefix` the episode goes on from a recorded one's first turns (`cwm-rl rollouts branch`): `env` must
    already be at that point (reset and stepped with those turns' actions); generation starts from the exact
    recorded tokens."""
    tokenizer = tokenizer or engine.tokenizer
    end_of_turn, end_of_turn_ids = _end_of_turn(tokenizer)
    tokens = _Tokens()
    turns: list[Turn] = []
    messages: list[dict[str, str]] = []
    result: dict[str, Any] = {"terminated": False, "truncated": False, "finish_reason": "max_turns", "error": None}
    info: dict[str, Any] = {}
    stop_ids: list[int] = []  # a raw prompt's stop tokens (`cwm_rl.models.raw_prompt`)

    async def env_call(coro, what: str):
        try:
            return await asyncio.wait_for(coro, limits.env_timeout_s)
        except TimeoutError:
            result.update(finish_reason="timeout", error=f"env {what} took longer than {limits.env_timeout_s:g} s")
        except EnvServerUnavailable as e:
            result.update(finish_reason="env_unavailable", error=f"env {what}: {e}")
        except Exception as e:  # one boundary: an env failure is recorded, never raised
            # `cwm-rl rollouts replay` formats a replayed failure the same way (cwm_rl.replay.replay.env_error) to compare
            result.update(finish_reason="env_error", error=f"env {what} raised {type(e).__name__}: {e}")
        return None

    task_id = task.id if task else ""
    reset_ok = True  # False: the reset failed, the episode ends at once
    if prefix is None:
        reset = await env_call(env.areset(seed=seed, options={"task": task} if task is not None else None), "reset")
        reset_ok = reset is not None
        if reset_ok:
            observation, info = reset
            task_id = info.get("task_id", task_id)
            messages += observation
            try:
                if is_raw(observation):  # a prompt in a token format of its own (CWM's traces): parts, no chat template
                    raw_ids, stop_ids = encode_raw(tokenizer, observation)
                    tokens.add_context(raw_ids)
                else:
                    tokens.add_context(first_prompt_ids(tokenizer, observation))
            except RawPromptError as e:  # the model cannot read this env's format: say so on every episode
                result.update(finish_reason="env_error", error=f"env reset: {e}")
                reset_ok = False
    else:
        task_id = prefix.trajectory.task_id
        prefix.copy_into(tokens, turns, messages)
        last = next((i + 1 for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), 0)
        try:  # the stop tokens of the last raw observation recorded hold still, as in the live episode
            stop_ids = stop_token_ids(tokenizer, messages[last:]) if is_raw(messages[last:]) else []
        except RawPromptError as e:
            result.update(finish_reason="env_error", error=f"env reset: {e}")
            reset_ok = False
    if reset_ok:
        max_total = min(limits.max_total_tokens or engine.config.max_model_len, engine.config.max_model_len)
        for index in range(len(turns), limits.max_turns):
            room = max_total - len(tokens.ids)
            budget = min(sampling.max_tokens, room)
            if budget <= 0:
                result["finish_reason"] = "max_tokens"
                break
            started = time.perf_counter()
            try:
                gen = await engine.generate(tokens.ids, sampling.model_copy(update={
                    "max_tokens": budget, "stop_token_ids": sampling.stop_token_ids + stop_ids}))
            except Exception as e:  # the engine refused this request: end the episode, keep the worker
                result.update(finish_reason="aborted", error=f"generation failed: {type(e).__name__}: {e}")
                break
            generate_s = time.perf_counter() - started
            action_span = tokens.add_generated(gen.token_ids, gen.logprobs, gen.versions)
            # The action is the generated text verbatim (special tokens included: the env sees what
            # the model wrote) without the end-of-turn token that closed it.
            closed = gen.token_ids[-len(end_of_turn_ids):] == end_of_turn_ids
            action = tokenizer.decode(gen.token_ids[: -len(end_of_turn_ids)] if closed else gen.token_ids)
            messages.append({"role": "assistant", "content": action})
            turn = Turn(index=index, action=action, action_span=action_span, generate_s=generate_s)
            turns.append(turn)

            started = time.perf_counter()
            stepped = await env_call(env.astep(action), "step")
            turn.env_s = time.perf_counter() - started
            turn.verify_s = min(getattr(env, "verify_s", 0.0), turn.env_s)  # in-process envs time their verifier
            if stepped is None:
                break
            observation, reward, terminated, truncated, info = stepped
            turn.observation = [Message.model_validate(m) for m in observation]
            turn.reward, turn.info = float(reward), info
            if terminated or truncated:
                result.update(terminated=terminated, truncated=truncated, finish_reason="terminated" if terminated else "truncated")
                break
            try:
                raw = is_raw(observation)
                raw_ids, stop_ids = encode_raw(tokenizer, observation) if raw else ([], stop_ids)
            except RawPromptError as e:
                result.update(finish_reason="env_error", error=f"env step: {e}")
                break
            if raw:  # the env's next raw parts follow the generated tokens as they are
                turn.observation_span = tokens.add_context(raw_ids)
            else:
                if not closed:  # cut off by max_tokens: close the turn as the template would
                    tokens.add_context(end_of_turn_ids)
                delta = render_delta(tokenizer, messages, observation, add_generation_prompt=True, end_of_turn=end_of_turn)
                turn.observation_span = tokens.add_context(tokenizer.encode(delta, add_special_tokens=False))
            messages += observation
            if len(tokens.ids) >= max_total:
                result["finish_reason"] = "max_tokens"
                break
    ids = ids or {}
    return Trajectory(
        task_id=task_id, env_id=env_id, token_ids=tokens.ids, loss_mask=tokens.mask, logprobs=tokens.logprobs,
        policy_versions=tokens.versions, turns=turns, messages=[Message.model_validate(m) for m in messages],
        reward_details=info if turns else {}, created_at=time.time(), **{"return": sum(t.reward for t in turns)},
        task=task, seed=seed, env_kwargs=env_kwargs or {}, **result, **ids,
    )


async def run_group(
    engine: RolloutEngine,
    make_env: Any,
    *,
    env_id: str,
    group_size: int,
    sampling: SamplingConfig,
    limits: EpisodeLimits,
    task: Task | None = None,
    seed: int | None = None,
    run_id: str = "",
    env_kwargs: dict[str, Any] | None = None,
) -> list[Trajectory]:
    """`group_size` episodes of one task, run concurrently (a GRPO group).

    Every sample gets a fresh env from `make_env()`, reset with the same `task` (or, without one,
    the same `seed`, so the env samples the same task), and the group's id and its index."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    group_id = new_id()
    envs = [make_env() for _ in range(group_size)]
    try:
        return list(await asyncio.gather(*(
            run_episode(engine, env, env_id=env_id, sampling=sampling, limits=limits, task=task, seed=seed,
                        ids={"group_id": group_id, "sample_index": i, "run_id": run_id}, env_kwargs=env_kwargs)
            for i, env in enumerate(envs)
        )))
    finally:
        for env in envs:
            await (env.aclose() if hasattr(env, "aclose") else asyncio.to_thread(env.close))
