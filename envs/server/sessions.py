"""Live env sessions of the env server: create, step (idempotent by request id), state, delete, reap.

Each session owns one env instance. Steps on one session run one at a time; a step that comes
back with a request id already seen is answered from the first attempt (awaiting it if it is
still running), so a client that lost a response can retry without stepping twice. Errors are
`ApiError`s carrying the HTTP status and a message a person can act on; `app.py` renders them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cwm_rl.types import new_id
from envs.base import TextEnv
from envs.registry import make_env
from envs.server.config import EnvServerConfig
from envs.server.schemas import CreateSessionRequest, CreateSessionResponse

REMEMBERED_REQUESTS = 16  # step results kept per session for retries


class ApiError(Exception):
    """An error answered to the client as `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class Session:
    session_id: str
    env_id: str
    env: TextEnv
    created: CreateSessionResponse
    created_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    num_steps: int = 0
    done: bool = False
    step_seconds: Any = None  # this env's step-time histogram child (looked up once, not per step)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    results: OrderedDict[str, asyncio.Future] = field(default_factory=OrderedDict)


class SessionManager:
    def __init__(self, config: EnvServerConfig, metrics: Any):
        self.config = config
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.creations: OrderedDict[str, str] = OrderedDict()  # create request id -> session id
        self.reserved = 0  # sessions being created: they count against max_sessions

    # ----- create -----
    async def create(self, req: CreateSessionRequest) -> CreateSessionResponse:
        if req.request_id and req.request_id in self.creations:
            session = self.sessions.get(self.creations[req.request_id])
            if session is not None:
                return session.created
        self._check_env_allowed(req)
        if len(self.sessions) + self.reserved >= self.config.max_sessions:
            self.metrics.errors.labels(code="too_many_sessions").inc()
            raise ApiError(
                429, "too_many_sessions",
                f"the server holds its maximum of {self.config.max_sessions} sessions; delete finished "
                "sessions (DELETE /v1/sessions/{id}) or retry later",
                headers={"Retry-After": "1"},
            )
        self.reserved += 1
        try:
            env, observation, info = await self._start_env(req)
        finally:
            self.reserved -= 1
        session_id = new_id()
        created = CreateSessionResponse(session_id=session_id, env_id=req.env_id, observation=observation, info=info)
        self.sessions[session_id] = Session(session_id, req.env_id, env, created,
                                            step_seconds=self.metrics.step_seconds.labels(env_id=req.env_id))
        if req.request_id:
            self.creations[req.request_id] = session_id
            while len(self.creations) > 4 * self.config.max_sessions:
                self.creations.popitem(last=False)
        self.metrics.sessions_created.labels(env_id=req.env_id).inc()
        self.metrics.sessions_active.set(len(self.sessions))
        return created

    def _check_env_allowed(self, req: CreateSessionRequest) -> None:
        allowed = self.config.env_ids
        if allowed is not None and req.env_id not in allowed:
            raise ApiError(404, "unknown_env", f"env {req.env_id!r} is not served here; served envs: {', '.join(allowed)}")
        if req.env_kwargs and not self.config.allow_client_env_kwargs:
            raise ApiError(403, "env_kwargs_forbidden", "this server does not accept env_kwargs from clients; drop them")

    async def _start_env(self, req: CreateSessionRequest) -> tuple[TextEnv, list, dict]:
        try:
            env = await asyncio.to_thread(make_env, req.env_id, **req.env_kwargs)
        except ValueError as e:
            code = 404 if str(e).startswith("unknown env id") else 422
            raise ApiError(code, "unknown_env" if code == 404 else "bad_env_kwargs", str(e)) from None
        except Exception as e:
            raise ApiError(502, "env_error", f"creating {req.env_id} failed: {type(e).__name__}: {e}") from None
        options = {"task": req.task} if req.task is not None else None
        try:
            observation, info = await asyncio.wait_for(env.areset(seed=req.seed, options=options), self.config.step_timeout_s)
        except Exception as e:
            await self._close_env(env)
            if isinstance(e, TimeoutError):
                raise ApiError(504, "env_timeout", f"env reset took longer than {self.config.step_timeout_s} s") from None
            if isinstance(e, ValueError):
                raise ApiError(422, "bad_task", f"{req.env_id} rejected the reset: {e}") from None
            raise ApiError(502, "env_error", f"{req.env_id} reset failed: {type(e).__name__}: {e}") from None
        return env, observation, info

    # ----- step -----
    def get(self, session_id: str, touch: bool = True) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(
                404, "unknown_session",
                f"no session {session_id!r}: it was never created, was deleted, or was reaped after "
                f"{self.config.idle_timeout_s:g} s idle; create a new session",
            )
        if touch:
            session.last_active = time.monotonic()
        return session

    async def step(self, session_id: str, action: str, request_id: str) -> dict[str, Any]:
        """The step result as a `StepResponse`-shaped dict (plain dicts: this is the hot path)."""
        session = self.get(session_id)
        size = len(action.encode("utf-8"))
        if size > self.config.max_action_bytes:
            self.metrics.errors.labels(code="action_too_large").inc()
            raise ApiError(413, "action_too_large", f"the action is {size} bytes; this server accepts at most {self.config.max_action_bytes}")
        future = session.results.get(request_id)
        if future is None:
            # A task of its own: a client that drops the connection cancels its handler, not the step.
            future = asyncio.ensure_future(self._step_once(session, action))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
            session.results[request_id] = future
            while len(session.results) > REMEMBERED_REQUESTS:
                session.results.popitem(last=False)
        return await asyncio.shield(future)

    async def _step_once(self, session: Session, action: str) -> dict[str, Any]:
        async with session.lock:
            if session.done:
                raise ApiError(409, "episode_over", "this episode has ended; create a new session (or reset) to play again")
            if time.monotonic() - session.created_at > self.config.episode_timeout_s:
                session.done = True
                return {"observation": [], "reward": 0.0, "terminated": False, "truncated": True,
                        "info": {"truncated_reason": "episode_deadline"}}
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.config.step_timeout_s):
                    observation, reward, terminated, truncated, info = await session.env.astep(action)
            except TimeoutError:
                await self.delete(session.session_id)
                self.metrics.errors.labels(code="env_timeout").inc()
                raise ApiError(504, "env_timeout", f"the env step took longer than {self.config.step_timeout_s} s; the session was closed") from None
            except Exception as e:
                await self.delete(session.session_id)
                self.metrics.errors.labels(code="env_error").inc()
                raise ApiError(502, "env_error", f"the env raised {type(e).__name__}: {e}; the session was closed") from None
            session.step_seconds.observe(time.perf_counter() - started)
            session.num_steps += 1
            session.done = bool(terminated or truncated)
            session.last_active = time.monotonic()
            if not math.isfinite(reward):
                await self.delete(session.session_id)
                raise ApiError(502, "env_error", f"the env returned a non-finite reward ({reward}); the session was closed")
            return {"observation": observation, "reward": reward, "terminated": terminated, "truncated": truncated, "info": info}

    # ----- state, delete, reap -----
    def state(self, session_id: str) -> dict[str, Any]:
        session = self.get(session_id, touch=False)
        now = time.monotonic()
        return {
            "session_id": session.session_id,
            "env_id": session.env_id,
            "age_s": now - session.created_at,
            "idle_s": now - session.last_active,
            "num_steps": session.num_steps,
            "done": session.done,
            "state": session.env.state(),
        }

    async def delete(self, session_id: str) -> bool:
        session = self.sessions.pop(session_id, None)
        self.metrics.sessions_active.set(len(self.sessions))
        if session is None:
            return False
        await self._close_env(session.env)
        return True

    async def _close_env(self, env: TextEnv) -> None:
        try:
            await asyncio.to_thread(env.close)
        except Exception:  # a failing close must not keep the session (or crash the reaper)
            self.metrics.errors.labels(code="env_close_failed").inc()

    async def reap(self) -> int:
        """Close sessions idle past `idle_timeout_s`; returns how many were removed."""
        now = time.monotonic()
        stale = [
            s.session_id for s in self.sessions.values()
            if now - s.last_active > self.config.idle_timeout_s and not s.lock.locked()
        ]
        for session_id in stale:
            await self.delete(session_id)
        self.metrics.sessions_reaped.inc(len(stale))
        return len(stale)

    async def close_all(self) -> None:
        for session_id in list(self.sessions):
            await self.delete(session_id)
