"""Settings of the env server (`cwm-rl env serve`): bind address, auth, limits, deadlines."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, model_validator


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EnvServerConfig(BaseModel):
    """How the env server listens, who may call it, and how much one client may take."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Bind address; anything but loopback requires a token.")
    port: int = Field(default=8765, ge=0, le=65535, description="TCP port (0 picks a free one).")
    token: str | None = Field(default=None, min_length=8, description="Bearer token clients must send; None disables auth (loopback only).")
    env_ids: list[str] | None = Field(default=None, description="Env ids clients may create; None allows every registered text env.")
    allow_client_env_kwargs: bool | None = Field(default=None, description="Let clients pass env constructor kwargs (which can name files the server reads); None: only when bound to loopback.")
    max_sessions: int = Field(default=256, ge=1, description="Live sessions at most; creating one more answers 429.")
    max_action_bytes: int = Field(default=1_000_000, ge=1, description="Largest action (UTF-8 bytes); larger answers 413.")
    step_timeout_s: float = Field(default=60.0, gt=0, description="Deadline of one reset or step; past it the session ends with 504.")
    episode_timeout_s: float = Field(default=3600.0, gt=0, description="Wall time an episode may take; a step after it returns truncated.")
    idle_timeout_s: float = Field(default=600.0, gt=0, description="A session untouched this long is closed and removed by the reaper.")
    reap_interval_s: float = Field(default=5.0, gt=0, description="How often the reaper looks for idle sessions.")
    max_env_threads: int = Field(default=32, ge=1, description="Threads that run blocking env work (resets, steps, closes).")

    @property
    def client_env_kwargs_allowed(self) -> bool:
        if self.allow_client_env_kwargs is None:
            return is_loopback(self.host)
        return self.allow_client_env_kwargs

    @model_validator(mode="after")
    def _auth_beyond_loopback(self) -> EnvServerConfig:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"binding to {self.host} exposes the server beyond this machine; set a bearer token "
                "(--token or CWM_RL_ENV_TOKEN) or bind to 127.0.0.1"
            )
        return self
