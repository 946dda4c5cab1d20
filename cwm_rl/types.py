"""Core types shared by every part of cwm-rl: Task, Message, Turn, Trajectory, TrainingRecord, ShippedWeights.

This module imports nothing else of the project (and no torch, vLLM or Ray), so an env
server, a worker and the trainer can all depend on it. Everything is a pydantic model
with a JSON round trip: `Trajectory.model_validate_json(t.model_dump_json()) == t`.

Token arrays in a Trajectory are aligned with `token_ids`: position i of `loss_mask`,
`logprobs` and `policy_versions` describes token i. Positions the policy did not generate
(prompt and environment tokens, loss mask 0) carry logprob 0.0 and version -1, so the
trainer can index all four arrays with the same slice.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_serializer, model_validator

Role = Literal["system", "user", "assistant", "tool", "raw"]

FinishReason = Literal[
    "terminated",  # the env said the episode is over (Gymnasium `terminated`)
    "truncated",  # the env cut the episode short (Gymnasium `truncated`)
    "max_turns",  # the worker's turn limit
    "max_tokens",  # the worker's total-token limit (context full)
    "env_error",  # the env raised, or the env server returned an error
    "env_unavailable",  # the env server could not be reached (or kept answering 503): says nothing of the policy
    "timeout",  # an env call or generation ran past its deadline
    "aborted",  # the job stopped the episode (shutdown, weight-version cut-off)
]

NO_VERSION = -1  # policy version of tokens the policy did not generate


def new_id() -> str:
    """A short random id (32 hex chars) for trajectories, groups and sessions."""
    return uuid.uuid4().hex


class _Model(BaseModel):
    # Unknown fields are errors: a typo in a saved rollout or a request is caught, not dropped.
    model_config = ConfigDict(extra="forbid")


class Part(_Model):
    """One piece of a raw message: text, tokenised as text (a special token's name in it stays text), or one
    special token given by its name, which goes in as its id."""

    text: str | None = Field(default=None, description="Plain text.")
    token: str | None = Field(default=None, description="A special token's name, e.g. '<|frame_sep|>'.")

    @model_validator(mode="after")
    def _one(self) -> Part:
        if (self.text is None) == (self.token is None):
            raise ValueError("a raw message part is either {'text': ...} or {'token': NAME}, exactly one of them")
        return self

    @model_serializer(mode="wrap")
    def _one_key(self, handler: Any):  # no return annotation: pydantic would publish the schema as a bare object
        return {k: v for k, v in handler(self).items() if v is not None}


class Message(_Model):
    """One chat message, as an env emits it and a chat template renders it.

    Role `raw` is a prompt in a token format of its own, given as `parts` and tokenised as they are, with no
    chat template (CWM's execution-trace format: `envs.trace.cwm_format`); `content` is then the parts' text
    with each special token's name in place, for people to read. `stop` names the special tokens that end the
    model's turn after it. `name` is the tool's name of a `tool` message (CWM's chat template writes the
    header `tool: NAME`)."""

    role: Role = Field(description="Who speaks: system, user, assistant, tool, or raw (a prompt given as token parts).")
    content: str = Field(description="The message text.")
    name: str | None = Field(default=None, description="role tool: the tool's name (e.g. bash).")
    parts: list[Part] | None = Field(default=None, description="role raw: the prompt as text and special-token parts.")
    stop: list[str] = Field(default_factory=list, description="role raw: special tokens that end the model's turn.")

    @model_validator(mode="after")
    def _raw(self) -> Message:
        if (self.role == "raw") != (self.parts is not None):
            raise ValueError("a raw message needs parts, and only a raw message has them")
        if self.stop and self.role != "raw":
            raise ValueError("only a raw message names stop tokens")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any):  # no return annotation, as above
        """A plain chat message stays {role, content} (stored trajectories and replays compare them so)."""
        data = handler(self)
        for key, empty in (("name", None), ("parts", None), ("stop", [])):
            if data.get(key) == empty:
                data.pop(key, None)
        return data


class Task(_Model):
    """One problem an env can be reset to: `env.reset(options={"task": task})`."""

    id: str = Field(description="Stable id of the task within its source, e.g. 'gsm8k-train-17'.")
    prompt: str = Field(description="The problem statement shown to the model.")
    answer: JsonValue = Field(default=None, description="Reference answer or solution the verifier checks against.")
    source: str | None = Field(default=None, description="Where the task came from: a generator name or a file path.")
    metadata: dict[str, JsonValue] = Field(default_factory=dict, description="Env-specific extras (difficulty, tests, ...).")


class Span(_Model):
    """A half-open token range [start, end) inside `Trajectory.token_ids`."""

    start: int = Field(ge=0)
    end: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end < self.start:
            raise ValueError(f"span end {self.end} is before its start {self.start}")
        return self

    def __len__(self) -> int:
        return self.end - self.start


class Turn(_Model):
    """One model action and the env's answer to it."""

    index: int = Field(ge=0, description="0-based turn number within the episode.")
    action: str = Field(description="The model's raw text for this turn, as sent to env.step.")
    observation: list[Message] = Field(default_factory=list, description="New messages the env returned.")
    reward: float = Field(default=0.0, description="Reward env.step returned for this turn.")
    info: dict[str, Any] = Field(default_factory=dict, description="The info dict env.step returned (verifier details).")
    action_span: Span = Field(description="Tokens the policy generated this turn (loss mask 1).")
    observation_span: Span | None = Field(default=None, description="Tokens of the rendered observation (loss mask 0).")
    generate_s: float = Field(default=0.0, ge=0, description="Seconds spent generating this turn.")
    env_s: float = Field(default=0.0, ge=0, description="Seconds the env took to step this turn.")
    verify_s: float = Field(default=0.0, ge=0, description="Of env_s, seconds an in-process env spent scoring the turn (its verifier); 0 where unknown (an env server).")


class Trajectory(_Model):
    """One episode, token for token: what the trainer scores is exactly what was sampled."""

    # --- ids ---
    trajectory_id: str = Field(default_factory=new_id, description="Unique id of this episode.")
    run_id: str = Field(default="", description="The training run that produced it.")
    task_id: str = Field(description="Id of the task the env was reset to.")
    env_id: str = Field(description="Registered env id, e.g. 'cwm_rl/Math-v0'.")
    group_id: str = Field(default="", description="GRPO group: episodes of the same task sampled together.")
    sample_index: int = Field(default=0, ge=0, description="Index of this episode within its group.")

    # --- what replay needs to rebuild the episode (None/{} in trajectories stored before cwm-rl kept them) ---
    task: Task | None = Field(default=None, description="The task the env was reset with (options={'task': task}).")
    seed: int | None = Field(default=None, description="The seed the env was reset with.")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="The env's constructor arguments.")

    # --- tokens (all aligned with token_ids) ---
    token_ids: list[int] = Field(default_factory=list, description="Prompt, generated and env tokens, in order.")
    loss_mask: list[int] = Field(default_factory=list, description="1 = generated by the policy, 0 = prompt or env.")
    logprobs: list[float] = Field(default_factory=list, description="Behaviour logprob per token; 0.0 where mask is 0.")
    policy_versions: list[int] = Field(default_factory=list, description="Policy version per token; -1 where mask is 0.")

    # --- episode ---
    turns: list[Turn] = Field(default_factory=list, description="Per-turn records, in order.")
    messages: list[Message] = Field(default_factory=list, description="Chat transcript for humans (not for training).")
    return_: float = Field(default=0.0, alias="return", description="Sum of turn rewards.")
    reward_details: dict[str, Any] = Field(default_factory=dict, description="Verifier details for the episode.")
    terminated: bool = Field(default=False, description="Gymnasium terminated flag of the last step.")
    truncated: bool = Field(default=False, description="Gymnasium truncated flag of the last step.")
    finish_reason: FinishReason = Field(description="Why the episode ended.")
    error: str | None = Field(default=None, description="The env or worker error that ended the episode, if any.")
    created_at: float = Field(default=0.0, ge=0, description="Unix time the episode finished.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _consistent(self) -> Trajectory:
        n = len(self.token_ids)
        for name in ("loss_mask", "logprobs", "policy_versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries but token_ids has {n}; "
                    "every per-token array must be aligned with token_ids"
                )
        for i, (m, lp, v) in enumerate(zip(self.loss_mask, self.logprobs, self.policy_versions)):
            if m not in (0, 1):
                raise ValueError(f"loss_mask[{i}] is {m}; only 0 and 1 are allowed")
            if m == 1 and (v < 0 or not math.isfinite(lp) or lp > 0):
                raise ValueError(
                    f"generated token {i} has version {v} and logprob {lp}; a generated token needs "
                    "a version >= 0 and a finite logprob <= 0"
                )
            if m == 0 and (v != NO_VERSION or lp != 0.0):
                raise ValueError(
                    f"token {i} has loss mask 0 but version {v} / logprob {lp}; "
                    f"non-generated tokens carry version {NO_VERSION} and logprob 0.0"
                )
        if self.finish_reason == "terminated" and not self.terminated:
            raise ValueError("finish_reason is 'terminated' but terminated is False")
        if self.finish_reason == "truncated" and not self.truncated:
            raise ValueError("finish_reason is 'truncated' but truncated is False")
        previous_end = 0
        for position, turn in enumerate(self.turns):
            if turn.index != position:
                raise ValueError(f"turn {position} has index {turn.index}; turns must be numbered 0, 1, 2, ... in order")
            spans = [turn.action_span] + ([turn.observation_span] if turn.observation_span else [])
            for span in spans:
                if span.end > n:
                    raise ValueError(f"turn {turn.index} has span [{span.start}, {span.end}) past the {n} tokens")
                if span.start < previous_end:
                    raise ValueError(f"turn {turn.index} has span [{span.start}, {span.end}) overlapping an earlier span")
                previous_end = span.end
            if any(self.loss_mask[i] != 1 for i in range(turn.action_span.start, turn.action_span.end)):
                raise ValueError(f"turn {turn.index}'s action span holds tokens with loss mask 0")
            if turn.observation_span and any(self.loss_mask[i] for i in range(turn.observation_span.start, turn.observation_span.end)):
                raise ValueError(f"turn {turn.index}'s observation span holds tokens with loss mask 1")
        total = sum(t.reward for t in self.turns)
        if self.turns and not math.isclose(total, self.return_, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"return is {self.return_} but the turn rewards sum to {total}")
        return self

    # Derived views, kept out of the stored JSON.
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def newest_version(self) -> int:
        """Newest policy version among generated tokens (-1 if none): staleness is measured from it."""
        return max(self.policy_versions, default=NO_VERSION)

    @property
    def oldest_version(self) -> int:
        generated = [v for v in self.policy_versions if v != NO_VERSION]
        return min(generated, default=NO_VERSION)

    def messages_before_turn(self, index: int) -> int:
        """How many messages of the transcript the model had seen when it wrote turn `index` (0 = the reset's).
        Counted from the turns, not from roles (an env may itself send "assistant" messages): each turn adds its
        action and, when the episode went on after it (`observation_span` set), its observation."""
        after = sum(1 + (len(t.observation) if t.observation_span is not None else 0) for t in self.turns)
        first = len(self.messages) - after
        return first + sum(1 + len(t.observation) for t in self.turns[:index])


class TrainingRecord(_Model):
    """What a trainer step did with one trajectory, kept beside it in the rollout store.

    The per-token lists are aligned with the trajectory's GENERATED tokens (the positions where
    `loss_mask` is 1, in order), so a record costs nothing for prompt and environment tokens;
    `per_token(trajectory)` spreads them over all of `token_ids` (None where nothing was generated).
    """

    trajectory_id: str = Field(description="The trajectory trained on.")
    step: int = Field(ge=0, description="The trainer step that trained on it.")
    advantage: float = Field(description="Its advantage (return minus the group baseline).")
    trainer_logprobs: list[float] = Field(default_factory=list, description="The trainer's logprob of each generated token.")
    is_weights: list[float] = Field(default_factory=list, description="Truncated importance weight of each generated token (1 without TIS).")
    clipped: list[int] = Field(default_factory=list, description="-1 clipped low, 1 clipped high, 0 not clipped, per generated token.")

    @model_validator(mode="after")
    def _aligned(self) -> TrainingRecord:
        if not len(self.trainer_logprobs) == len(self.is_weights) == len(self.clipped):
            raise ValueError(f"trainer_logprobs, is_weights and clipped must be aligned; got {len(self.trainer_logprobs)}, "
                             f"{len(self.is_weights)} and {len(self.clipped)} entries")
        return self

    def per_token(self, trajectory: Trajectory) -> dict[str, list[Any]]:
        """`trainer_logprob`, `is_weight` and `clipped` over all of `trajectory.token_ids` (None where mask is 0)."""
        generated = [i for i, m in enumerate(trajectory.loss_mask) if m]
        if len(generated) != len(self.trainer_logprobs):
            raise ValueError(f"the training record of {self.trajectory_id} has {len(self.trainer_logprobs)} tokens but the "
                             f"trajectory generated {len(generated)}; is it the record of another trajectory?")
        out: dict[str, list[Any]] = {name: [None] * trajectory.num_tokens for name in ("trainer_logprob", "is_weight", "clipped")}
        for k, i in enumerate(generated):
            out["trainer_logprob"][i] = self.trainer_logprobs[k]
            out["is_weight"][i] = self.is_weights[k]
            out["clipped"][i] = self.clipped[k]
        return out


@dataclass(frozen=True)
class ShippedWeights:
    """A policy version sent through Ray's object store (`publish.backend: object_store`), for workers on any node.

    `files` is a Ray ObjectRef of `{file name: bytes}`: a Hugging Face model directory (for the base model: all of
    it; for a trained version: its config, tokenizer and chat template, the same object every time). `weights` is
    the ObjectRef of that version's `model.safetensors` as `{"header": bytes, "buffers": [uint8 arrays]}` (the file
    is the header, then the buffers in order), or None when `files` holds the weights. A worker
    writes both into a directory of its own node (`rollout_workers/weights.py`) and loads it like a published dir.
    """

    version: int
    files: Any
    weights: Any = None
    nbytes: int = 0  # bytes of the weights carried, for transfer metrics
