"""Request and response bodies of the env server's HTTP API (shared by server and client)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cwm_rl.types import Message, Task


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionRequest(_Body):
    env_id: str = Field(max_length=256, description="Registered env id, e.g. 'cwm_rl/Math-v0' (GET /v1/envs lists them).")
    seed: int | None = Field(default=None, ge=0, description="Seed for env.reset (a non-negative integer, as Gymnasium requires).")
    task: Task | None = Field(default=None, description="Task to reset to; None lets the env sample one.")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="Constructor kwargs for the env.")
    request_id: str | None = Field(default=None, max_length=128, description="Client id of this request; a retry with the same id returns the same session.")


class CreateSessionResponse(_Body):
    session_id: str
    env_id: str
    observation: list[Message]
    info: dict[str, Any]


class StepRequest(_Body):
    action: str = Field(description="The model's text for one turn.")
    request_id: str = Field(min_length=1, max_length=128, description="Client id of this step; a retry with the same id is answered from the first attempt, never stepped twice.")


class StepResponse(_Body):
    observation: list[Message]
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


class SessionState(_Body):
    session_id: str
    env_id: str
    age_s: float
    idle_s: float
    num_steps: int
    done: bool
    state: dict[str, Any]


class SessionDeleted(_Body):
    deleted: str


class EnvDescription(_Body):
    id: str
    description: str


class ErrorBody(_Body):
    code: str
    message: str


class ErrorResponse(_Body):
    error: ErrorBody
