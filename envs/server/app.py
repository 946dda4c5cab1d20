"""The env server: FastAPI over `SessionManager`, with auth, size limits, metrics and the idle reaper.

Run it with `cwm-rl env serve` (or `serve(EnvServerConfig(...))`). Routes, all JSON:
    POST   /v1/sessions              create: {env_id, seed, task, env_kwargs, request_id} -> first observation
    POST   /v1/sessions/{id}/step    step: {action, request_id} -> observation, reward, terminated, truncated, info
    GET    /v1/sessions/{id}         state (debugging)
    DELETE /v1/sessions/{id}         close the env
    GET    /v1/envs                  the envs served
    GET    /health                   liveness (no auth)
    GET    /metrics                  Prometheus text
Every error is `{"error": {"code", "message"}}`: 400 a body that cannot be read, 401 bad token,
403 env_kwargs not accepted, 404 unknown session or env, 405 wrong method, 409 step after the
episode ended, 413 action or body too large, 422 malformed body (not strict JSON, wrong types or
ranges, wrong content type), an action outside the env's action space, or a task or env kwargs
the env rejects, 429 too many sessions. A client's mistake is never a 5xx: 5xx only when the env
itself failed (502, logged with its traceback), timed out (504), stuck calls hold the env
threads (503), or the server has a bug (500, logged with its traceback). The OpenAPI schema
(GET /openapi.json) documents these answers and links a created session to its step, state and
delete routes; tests/envs/server/test_fuzz.py fuzzes the live server from it.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from envs.registry import describe_env, list_text_envs
from envs.server.config import EnvServerConfig
from envs.server.schemas import (CreateSessionRequest, CreateSessionResponse, EnvDescription, ErrorResponse, SessionDeleted,
                                 SessionState, StepRequest, StepResponse)
from envs.server.sessions import ApiError, SessionManager, log

BODY_SLACK_BYTES = 64 * 1024  # JSON overhead allowed on top of max_action_bytes


@dataclass
class ServerMetrics:
    registry: CollectorRegistry
    sessions_active: Gauge
    sessions_created: Counter
    sessions_reaped: Counter
    step_seconds: Histogram
    errors: Counter

    @classmethod
    def create(cls) -> ServerMetrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            sessions_active=Gauge("cwm_rl_env_sessions_active", "Live sessions", registry=r),
            sessions_created=Counter("cwm_rl_env_sessions_created", "Sessions created", ["env_id"], registry=r),
            sessions_reaped=Counter("cwm_rl_env_sessions_reaped", "Sessions closed by the idle reaper", registry=r),
            step_seconds=Histogram("cwm_rl_env_step_seconds", "Env step time", ["env_id"], registry=r,
                                   buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120)),
            errors=Counter("cwm_rl_env_errors", "Error responses by code", ["code"], registry=r),
        )


class Guard:
    """Auth and body size, checked before routing: a bad token answers 401 and an oversized body
    (by Content-Length) 413 without reading it. A pure ASGI middleware, because FastAPI
    dependencies and Starlette's BaseHTTPMiddleware each cost a fraction of a millisecond per
    request, which is most of a trivial step."""

    OPEN_PATHS = ("/health", "/docs", "/openapi.json")

    def __init__(self, app, config: EnvServerConfig, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self.limit = config.max_action_bytes + BODY_SLACK_BYTES
        self.token = config.token.encode() if config.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in self.OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, self.token):
                self.metrics.errors.labels(code="unauthorized").inc()
                response = _error(401, "unauthorized", "missing or wrong bearer token; send 'Authorization: Bearer "
                                  "<token>' with the token the server was started with (--token / CWM_RL_ENV_TOKEN)")
                return await response(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._too_large(int(length), scope, receive, send)
        received = 0

        async def counted_receive():
            # A chunked body has no Content-Length: count it as it arrives.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(received)
            return message

        await self.app(scope, counted_receive, send)  # BodyTooLarge is answered by the app's handler

    async def _too_large(self, size: int, scope, receive, send) -> None:
        self.metrics.errors.labels(code="body_too_large").inc()
        response = _error(413, "body_too_large", f"the request body is {size} bytes; this server accepts at most {self.limit}")
        await response(scope, receive, send)


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit (an HTTPException, so FastAPI's body parsing lets it through)."""

    def __init__(self, size: int):
        super().__init__(413, f"request body over {size} bytes")


def _jsonable(value: Any) -> Any:
    """JSON fallback for env infos: numpy scalars and arrays as numbers and lists, anything else as its repr."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


class StepJSONResponse(JSONResponse):
    """The step result, serialised as it is (the hot path skips pydantic's response validation).
    Strict JSON: NaN or a lone surrogate in an env's data is an error, never an invalid answer."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_jsonable).encode("utf-8")


def _render(content: dict[str, Any]) -> Response:
    try:
        return StepJSONResponse(content)
    except (TypeError, ValueError, RecursionError) as e:  # e.g. an info dict with non-string keys, or NaN inside it
        log.error("the env returned data that is not JSON-serialisable: %s: %s", type(e).__name__, e, exc_info=e)
        raise ApiError(502, "env_error", f"the env returned data that is not JSON-serialisable: {e}") from None


# ----- strict JSON request bodies -----
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_json(message: str, pos: int = 0) -> json.JSONDecodeError:
    return json.JSONDecodeError(message, "", pos)


def _no_constant(name: str) -> None:
    raise _not_json(f"{name} is not a JSON number; send a finite number (or null)")


def _lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json_body(body: bytes) -> Any:
    """Parse a request body as strict JSON (RFC 8259): UTF-8, no NaN/Infinity, no lone surrogate
    escapes (not Unicode: no env could return them as UTF-8), nesting within Python's limit.
    Anything else raises JSONDecodeError, which FastAPI turns into our 422."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_json(f"the body is not UTF-8 (byte {e.start}: {e.reason}); send JSON encoded as UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _not_json("the body is nested too deeply to parse; flatten it") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise _not_json(f"{e}; send smaller numbers") from None
    if ("\\ud" in text or "\\uD" in text) and _lone_surrogate(value):  # only escapes can make lone surrogates
        raise _not_json("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not a Unicode "
                        "character; send valid Unicode (escape characters past U+FFFF as a surrogate pair)")
    return value


class StrictJSONRequest(Request):
    """A request whose `json()` is `parse_json_body`: FastAPI parses JSON bodies with it."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are parsed by `parse_json_body` (FastAPI's documented way to
    customise the request: a route class whose handler gets a Request subclass)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


# ----- the OpenAPI description of errors and links -----
def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route documents (all in the `ErrorResponse` shape)."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


ERROR_DESCRIPTIONS = {
    400: "The request body could not be read.",
    401: "Missing or wrong bearer token.",
    403: "This server does not accept env_kwargs from clients.",
    404: "Unknown session or env.",
    409: "The episode has ended.",
    410: "The session was closed after the server's idle timeout.",
    413: "The action or request body is too large.",
    422: "Malformed body, an action outside the env's action space, or a task or env kwargs the env rejects.",
    429: "Too many sessions; retry after Retry-After.",
    502: "The env failed or returned data JSON cannot hold (an env bug).",
    503: "Env calls past their deadline hold the env threads, the server is stopping, or the env's sandbox went away "
         "(the Docker daemon restarting): retry after Retry-After, or play the episode again.",
    504: "The env call ran past its deadline; the session was closed.",
}
# A created session's id feeds its step, state and delete routes (schemathesis follows these links).
SESSION_LINKS = {
    name: {"operationId": operation, "parameters": {"session_id": "$response.body#/session_id"}}
    for name, operation in (("Step", "step"), ("GetState", "get_session"), ("Delete", "delete_session"))
}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(config: EnvServerConfig, close_shared_on_exit: bool = False) -> FastAPI:
    """The env server's app. `close_shared_on_exit`: its shutdown also removes the containers the process keeps beside
    the sessions (`cwm-rl env serve`, whose process is the server's; not a server run in a thread of a process that
    goes on using them)."""
    metrics = ServerMetrics.create()
    sessions = SessionManager(config, metrics)

    async def reaper() -> None:
        while True:
            await asyncio.sleep(config.reap_interval_s)
            await sessions.reap()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(config.max_env_threads, "env"))
        task = asyncio.create_task(reaper())
        yield
        task.cancel()
        try:
            await sessions.close_all()
        finally:
            if close_shared_on_exit:
                await asyncio.to_thread(_close_shared_containers)

    app = FastAPI(title="cwm-rl env server", lifespan=lifespan)
    app.router.route_class = StrictJSONRoute
    auth = (401,) if config.token else ()
    app.state.sessions = sessions
    app.state.config = config

    app.add_middleware(Guard, config=config, metrics=metrics)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        metrics.errors.labels(code="malformed_request").inc()
        return _error(422, "malformed_request", _describe_invalid_body(request, e.errors()))

    @app.exception_handler(BodyTooLarge)
    async def on_body_too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        limit = config.max_action_bytes + BODY_SLACK_BYTES
        metrics.errors.labels(code="body_too_large").inc()
        return _error(413, "body_too_large", f"the request body is over {limit} bytes; this server accepts at most {limit}")

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises `e` after this answer, and uvicorn logs it with its traceback.
        return _error(500, "internal_error", f"the env server failed: {type(e).__name__}: {e}; please report this")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        hint = " (see GET /docs for the routes)" if e.status_code in (404, 405) else ""
        return _error(e.status_code, "http_error", f"{e.detail}{hint}")

    # The step route first: routes are matched in order and this one carries nearly all traffic.
    @app.post("/v1/sessions/{session_id}/step", response_model=StepResponse, operation_id="step",
              responses=_errors(400, *auth, 404, 409, 410, 413, 422, 502, 503, 504))
    async def step(session_id: str, req: StepRequest) -> Response:
        return _render(await sessions.step(session_id, req.action, req.request_id))

    @app.get("/health", operation_id="health")
    async def health() -> dict:
        # "degraded": env calls past their deadline still hold threads (see sessions.py).
        return {"status": "degraded" if sessions.abandoned else "ok", "sessions": len(sessions.sessions),
                "max_sessions": config.max_sessions, "abandoned_env_calls": sessions.abandoned}

    @app.get("/metrics", operation_id="metrics", response_class=Response, responses={
        200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(*auth)})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/envs", operation_id="list_envs", responses=_errors(*auth))
    async def envs() -> list[EnvDescription]:
        ids = config.env_ids if config.env_ids is not None else list_text_envs()
        return [EnvDescription(id=env_id, description=describe_env(env_id)) for env_id in ids]

    @app.post("/v1/sessions", response_model=CreateSessionResponse, operation_id="create_session",
              responses={200: {"description": "The new session and its first observation", "links": SESSION_LINKS},
                         **_errors(400, *auth, 403, 404, 413, 422, 429, 502, 503, 504)})
    async def create_session(req: CreateSessionRequest) -> Response:
        # Rendered like a step: the env's info may hold numpy values, and data JSON cannot hold is a 502.
        return _render((await sessions.create(req)).model_dump())

    @app.get("/v1/sessions/{session_id}", response_model=SessionState, operation_id="get_session",
             responses=_errors(*auth, 404, 410, 502))
    async def state(session_id: str) -> Response:
        return _render(sessions.state(session_id))

    @app.delete("/v1/sessions/{session_id}", operation_id="delete_session", responses=_errors(*auth, 404))
    async def delete(session_id: str) -> SessionDeleted:
        if not await sessions.delete(session_id):
            sessions.get(session_id)  # raises the 404 with its explanation
        return SessionDeleted(deleted=session_id)

    return app


def _describe_invalid_body(request: Request, errors: list[dict[str, Any]]) -> str:
    """One message for a body FastAPI refused: what was wrong where, and what to send instead."""
    problems = []
    for err in errors:
        loc = err["loc"]
        if err["type"] == "json_invalid":
            at = f" (at character {loc[-1]})" if isinstance(loc[-1], int) and loc[-1] > 0 else ""
            problems.append(f"not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}{at}")
        elif tuple(loc) == ("body",) and err["type"] in ("model_attributes_type", "dict_type", "missing"):
            sent = request.headers.get("content-type")
            problems.append("the body must be a JSON object" + (" and is missing" if err["type"] == "missing" else "")
                            + ("" if sent is None or "json" in sent else f"; it was sent as {sent!r}")
                            + ": send it with 'Content-Type: application/json'")
        else:
            problems.append(f"{'.'.join(str(p) for p in loc)}: {err['msg']}")
    return "the request body is not valid: " + "; ".join(problems)


def _close_shared_containers() -> None:
    """Remove the containers this process keeps beside the sessions (SWE's warm pool, shared Docker sandboxes). Their
    atexit hooks would, but a server stopped with SIGTERM (a service manager, `docker stop`) exits by the signal
    uvicorn raises again after its shutdown, and atexit never runs then."""
    from envs.sandbox import close_shared_sandboxes
    from envs.swe.containers import close_shared_pools

    close_shared_pools()
    close_shared_sandboxes()


def serve(config: EnvServerConfig) -> None:
    """Run the server in the foreground until Ctrl-C (the process is the server's: it tunes the GC)."""
    app = create_app(config, close_shared_on_exit=True)
    # A trivial step allocates a few hundred objects, so at CPython's default gen-0 threshold (700)
    # the collector runs every other request and keeps rescanning long-lived objects: ~15% of a
    # trivial step's cost. Freeze what exists now (modules, the app) and collect less often.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
