"""Live env sessions of the env server: create, step (idempotent by request id), state, delete, reap.

Each session owns one env instance. Steps on one session run one at a time, under the session's
lock; closing an env also takes that lock, so an env is never closed in the middle of a step.
A request that comes back with a request id already seen (a client retrying after a lost
response) is answered from the first attempt, awaiting it if it is still running: a step is
never applied twice and a create never opens two sessions.

An env call that runs past its deadline is abandoned, not killed (Python cannot kill a thread):
the client gets 504, the session is removed, and its env is closed once the stuck call returns.
Abandoned calls still hold env threads, so they are counted; `/health` reports them and new
sessions are refused (503) while they hold all but one thread.

Errors are `ApiError`s carrying the HTTP status and a message a person can act on; `app.py`
renders them. Whose fault an env's exception is decides its status: an exception while creating,
resetting or stepping an env the client configured (a `task` or `env_kwargs`) that is one of
`REJECTED_INPUT` (what Python and envs raise for arguments they refuse) is the client's (422:
the env rejects that task or those kwargs); any other env exception, or one from an env the
client did not configure, is the env's (502, logged with its traceback). An action outside the
env's action space is refused (422) before the env sees it; any text inside it is the model's
turn, which an env must score, never raise on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cwm_rl.types import new_id
from envs.base import TextEnv
from envs.sandbox.base import SandboxUnavailable
from envs.registry import make_env
from envs.server.config import EnvServerConfig
from envs.server.schemas import CreateSessionRequest, CreateSessionResponse

REMEMBERED_REQUESTS = 16  # step results kept per session for retries
REJECTED_INPUT = (ValueError, TypeError, OverflowError)

log = logging.getLogger("envs.server")


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
    step_seconds: Any  # this env's step-time histogram child (looked up once, not per step)
    client_config: str | None = None  # "task" / "env_kwargs" the client chose, for blaming env errors
    created_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    num_steps: int = 0
    done: bool = False
    closed: bool = False  # removed from the server; a step that was queued on the lock must not run
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    results: OrderedDict[str, asyncio.Future] = field(default_factory=OrderedDict)


def _retrieve(future: asyncio.Future) -> None:
    """Done callback: mark a background future's exception as seen (no "never retrieved" log)."""
    if not future.cancelled():
        future.exception()


def _client_config(req: CreateSessionRequest) -> str | None:
    """What of the env's setup the client chose: "task", "env_kwargs", both, or None."""
    chosen = [name for name, given in (("task", req.task is not None), ("env_kwargs", bool(req.env_kwargs))) if given]
    return " and ".join(chosen) or None


def _config_code(config: str) -> str:
    return "bad_task" if config.startswith("task") else "bad_env_kwargs"


class SessionManager:
    def __init__(self, config: EnvServerConfig, metrics: Any):
        self.config = config
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.creations: OrderedDict[str, asyncio.Future] = OrderedDict()  # create request id -> its result
        # Ids the reaper closed (the newest 10,000): their client gets 410, not 404, so it can tell "idle too long"
        # (raise the idle timeout) from "this server does not know it" (it restarted: play the episode again).
        self.expired: OrderedDict[str, None] = OrderedDict()
        self.reserved = 0  # sessions being created: they count against max_sessions
        self.abandoned = 0  # env calls past their deadline that still hold a thread

    # ----- create -----
    async def create(self, req: CreateSessionRequest) -> CreateSessionResponse:
        if not req.request_id:
            return await self._create(req)
        future = self.creations.get(req.request_id)
        if future is None:
            future = asyncio.ensure_future(self._create(req))
            request_id = req.request_id

            def forget_failure(f: asyncio.Future) -> None:  # a failed create (e.g. 429) may be retried for real
                if f.cancelled() or f.exception() is not None:
                    self.creations.pop(request_id, None)

            future.add_done_callback(forget_failure)
            self.creations[req.request_id] = future
            while len(self.creations) > 4 * self.config.max_sessions:
                self.creations.popitem(last=False)
        return await asyncio.shield(future)

    async def _create(self, req: CreateSessionRequest) -> CreateSessionResponse:
        self._check_env_allowed(req)
        if len(self.sessions) + self.reserved >= self.config.max_sessions:
            self.metrics.errors.labels(code="too_many_sessions").inc()
            raise ApiError(
                429, "too_many_sessions",
                f"the server holds its maximum of {self.config.max_sessions} sessions; delete finished "
                "sessions (DELETE /v1/sessions/{id}) or retry later",
                headers={"Retry-After": "1"},
            )
        if self.abandoned >= self.config.max_env_threads - 1:
            raise ApiError(503, "server_degraded", f"{self.abandoned} env calls ran past their deadline and still hold "
                           "env threads; the server takes no new sessions until they return (restart it if they never do)",
                           headers={"Retry-After": "5"})
        self.reserved += 1
        try:
            env, observation, info = await self._start_env(req)
        finally:
            self.reserved -= 1
        session_id = new_id()
        created = CreateSessionResponse(session_id=session_id, env_id=req.env_id, observation=observation, info=info)
        self.sessions[session_id] = Session(session_id, req.env_id, env, created,
                                            step_seconds=self.metrics.step_seconds.labels(env_id=req.env_id),
                                            client_config=_client_config(req))
        self.metrics.sessions_created.labels(env_id=req.env_id).inc()
        self.metrics.sessions_active.set(len(self.sessions))
        return created

    def _check_env_allowed(self, req: CreateSessionRequest) -> None:
        allowed = self.config.env_ids
        if allowed is not None and req.env_id not in allowed:
            raise ApiError(404, "unknown_env", f"env {req.env_id!r} is not served here; served envs: {', '.join(allowed)}")
        if req.env_kwargs and not self.config.client_env_kwargs_allowed:
            raise ApiError(403, "env_kwargs_forbidden", "this server does not accept env_kwargs from clients "
                                                        "(it is bound beyond loopback, or was started with --no-client-kwargs); drop them")

    async def _start_env(self, req: CreateSessionRequest) -> tuple[TextEnv, list, dict]:
        try:
            env = await self._with_deadline(asyncio.to_thread(make_env, req.env_id, **req.env_kwargs), "creating the env")
        except ApiError:
            raise
        except ValueError as e:
            code = 404 if str(e).startswith("unknown env id") else 422
            raise ApiError(code, "unknown_env" if code == 404 else "bad_env_kwargs", str(e)) from None
        except (OSError, *REJECTED_INPUT) as e:  # OSError: e.g. a task file that does not exist
            if isinstance(e, OSError) or req.env_kwargs:
                raise ApiError(422, "bad_env_kwargs", f"creating {req.env_id} failed: {type(e).__name__}: {e}; "
                               "fix env_kwargs") from None
            raise self._env_failed(e, f"creating {req.env_id} failed") from None
        except Exception as e:
            raise self._env_failed(e, f"creating {req.env_id} failed") from None
        options = {"task": req.task} if req.task is not None else None
        try:
            observation, info = await self._with_deadline(env.areset(seed=req.seed, options=options), "the env reset", on_abandon=lambda: self._close_env(env))
        except ApiError:
            raise
        except Exception as e:
            await self._close_env(env)
            config = _client_config(req)
            if isinstance(e, REJECTED_INPUT) and config:
                raise ApiError(422, _config_code(config), f"{req.env_id} rejected the reset with the {config} given: "
                               f"{type(e).__name__}: {e}; fix the {config} and create the session again") from None
            raise self._env_failed(e, f"{req.env_id} reset failed") from None
        return env, observation, info

    def _env_failed(self, e: Exception, what: str) -> ApiError:
        """The 502 for an env's own failure, logged with its traceback (a bug to fix in the env). A sandbox that went
        away under the env (the Docker daemon restarting) is a 503 instead: nobody's bug, and the client should play
        the episode again once it is back (RemoteEnv gives up with EnvServerUnavailable; the job replays the group)."""
        if isinstance(e, SandboxUnavailable):
            log.warning("%s: %s: %s", what, type(e).__name__, e)
            self.metrics.errors.labels(code="sandbox_unavailable").inc()
            return ApiError(503, "sandbox_unavailable", f"{what}: {type(e).__name__}: {e}", headers={"Retry-After": "2"})
        log.error("%s: %s: %s", what, type(e).__name__, e, exc_info=e)
        self.metrics.errors.labels(code="env_error").inc()
        return ApiError(502, "env_error", f"{what}: {type(e).__name__}: {e}")

    async def _with_deadline(self, call, what: str, on_abandon=None):
        """Await `call` for at most `step_timeout_s`; past it, abandon it (counted) and answer 504.

        `on_abandon` (a coroutine function) runs once the abandoned call finally returns."""
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=self.config.step_timeout_s)
        if task in done:
            return task.result()
        self.abandoned += 1
        self.metrics.errors.labels(code="env_timeout").inc()

        def finished(_: asyncio.Future) -> None:
            self.abandoned -= 1
            if on_abandon is not None:
                asyncio.ensure_future(on_abandon())

        task.add_done_callback(_retrieve)
        task.add_done_callback(finished)
        raise ApiError(504, "env_timeout", f"{what} took longer than {self.config.step_timeout_s:g} s; the session was closed")

    # ----- step -----
    def get(self, session_id: str, touch: bool = True) -> Session:
        session = self.sessions.get(session_id)
        if session is None and session_id in self.expired:
            raise ApiError(410, "session_expired", f"session {session_id!r} was closed after {self.config.idle_timeout_s:g} s "
                           "idle (the server's --idle-timeout); create a new session, and keep the time between steps "
                           "below the idle timeout (or raise it)")
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
        size = len(action.encode("utf-8", "surrogatepass"))  # never raises (app.py refuses lone surrogates anyway)
        if size > self.config.max_action_bytes:
            self.metrics.errors.labels(code="action_too_large").inc()
            raise ApiError(413, "action_too_large", f"the action is {size} bytes; this server accepts at most {self.config.max_action_bytes}")
        space = session.env.action_space
        if not space.contains(action):
            self.metrics.errors.labels(code="bad_action").inc()
            raise ApiError(422, "bad_action", f"the action ({len(action)} characters) is not in {session.env_id}'s action "
                           f"space {space!r}; nothing was stepped: send an action the space contains")
        future = session.results.get(request_id)
        if future is not None:  # a retry: the first attempt's answer, once it has one
            return await asyncio.shield(future)
        # The first attempt runs the step in this handler (no task of its own: this is the hot
        # path). It cannot be cut in half: a non-blocking env steps without awaiting, and a
        # blocking env's step runs in its own task (`_with_deadline`) that outlives a cancelled
        # handler (uvicorn cancels none but at shutdown).
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        session.results[request_id] = future
        while len(session.results) > REMEMBERED_REQUESTS:
            session.results.popitem(last=False)
        try:
            result = await self._step_once(session, action)
        except ApiError as e:
            future.set_exception(e)
            raise
        except BaseException:
            future.set_exception(ApiError(503, "step_interrupted", "the server stopped while this step ran; "
                                          "create a new session"))
            raise
        future.set_result(result)
        return result

    async def _step_once(self, session: Session, action: str) -> dict[str, Any]:
        async with session.lock:
            if session.closed:
                raise ApiError(404, "unknown_session", f"session {session.session_id!r} was closed while this step waited")
            if session.done:
                raise ApiError(409, "episode_over", "this episode has ended; create a new session (or reset) to play again")
            if time.monotonic() - session.created_at > self.config.episode_timeout_s:
                session.done = True
                return {"observation": [], "reward": 0.0, "terminated": False, "truncated": True,
                        "info": {"truncated_reason": "episode_deadline"}}
            started = time.perf_counter()
            try:
                if session.env.blocking:
                    result = await self._with_deadline(session.env.astep(action), "the env step",
                                                       on_abandon=lambda: self._close_env(session.env))
                else:  # runs on the event loop: no thread to abandon, and nothing to wait for
                    result = session.env.step(action)
                observation, reward, terminated, truncated, info = result
            except ApiError:
                self._remove(session)  # the env is closed when the abandoned step returns
                raise
            except Exception as e:
                self._remove(session)
                await self._close_env(session.env)
                config = session.client_config
                if isinstance(e, REJECTED_INPUT) and config:
                    # Logged all the same: an env should refuse a bad task or kwargs at reset, not mid-episode.
                    log.warning("session %s (%s): the env rejected its %s while stepping", session.session_id,
                                session.env_id, config, exc_info=e)
                    self.metrics.errors.labels(code=_config_code(config)).inc()
                    raise ApiError(422, _config_code(config), f"the env raised {type(e).__name__}: {e}; an env must accept "
                                   f"any text as an action, so the cause is the {config} this session was created with: "
                                   "fix it and create a new session (this one was closed)") from None
                raise self._env_failed(e, f"the env raised while stepping session {session.session_id} "
                                          "(the session was closed)") from None
            session.step_seconds.observe(time.perf_counter() - started)
            session.num_steps += 1
            session.done = bool(terminated or truncated)
            session.last_active = time.monotonic()
            if not math.isfinite(reward):
                log.error("session %s (%s): the env returned a non-finite reward %r", session.session_id, session.env_id, reward)
                self._remove(session)
                await self._close_env(session.env)
                raise ApiError(502, "env_error", f"the env returned a non-finite reward ({reward}); the session was closed")
            return {"observation": observation, "reward": reward, "terminated": terminated, "truncated": truncated, "info": info}

    # ----- state, delete, reap -----
    def state(self, session_id: str) -> dict[str, Any]:
        session = self.get(session_id, touch=False)
        now = time.monotonic()
        try:
            env_state = session.env.state()
        except Exception as e:
            raise self._env_failed(e, "the env's state() raised") from None
        return {
            "session_id": session.session_id,
            "env_id": session.env_id,
            "age_s": now - session.created_at,
            "idle_s": now - session.last_active,
            "num_steps": session.num_steps,
            "done": session.done,
            "state": env_state,
        }

    def _remove(self, session: Session) -> None:
        """Take a session off the server at once (synchronously: no step can start on it after)."""
        session.closed = True
        if self.sessions.pop(session.session_id, None) is not None:
            self.metrics.sessions_active.set(len(self.sessions))

    async def delete(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        self._remove(session)
        async with session.lock:  # wait for a running step: never close an env under it
            await self._close_env(session.env)
        return True

    async def _close_env(self, env: TextEnv) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(env.close), self.config.step_timeout_s)
        except Exception:  # a failing or hanging close must not keep the session (or crash the reaper)
            self.metrics.errors.labels(code="env_close_failed").inc()

    async def reap(self) -> int:
        """Close sessions idle past `idle_timeout_s` (never one that is stepping); returns how many."""
        now = time.monotonic()
        stale = [s for s in self.sessions.values() if now - s.last_active > self.config.idle_timeout_s and not s.lock.locked()]
        for session in stale:  # removed before the first await: no step can slip in between
            self._remove(session)
            self.expired[session.session_id] = None
        while len(self.expired) > 10_000:
            self.expired.popitem(last=False)
        for session in stale:
            async with session.lock:
                await self._close_env(session.env)
        self.metrics.sessions_reaped.inc(len(stale))
        return len(stale)

    async def close_all(self) -> None:
        for session_id in list(self.sessions):
            await self.delete(session_id)
