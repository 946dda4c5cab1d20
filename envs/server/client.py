"""httpx client of the env server: `RemoteEnv`, a `gymnasium.Env` that proxies one remote session.

`reset`/`step` are synchronous (httpx.Client); `areset`/`astep` are the async twins a rollout
worker awaits (httpx.AsyncClient), the same names a local `TextEnv` has, so a worker treats
local and remote envs alike. A dropped connection or a read timeout is retried with the SAME
request id, so the server answers a retried step from its first attempt: an action is never
applied twice. Server errors become `EnvServerError` with the HTTP status, code and message; a
server that still cannot be reached (or still answers 503) after the retries raises
`EnvServerUnavailable`, which the agent loop records as finish reason "env_unavailable" (not
the policy's doing: a job plays such an episode again on another server).

Each RemoteEnv owns its own httpx clients (one connection per session). Do not share one
httpx.AsyncClient across many concurrent sessions: httpcore's pool scans every connection on
every event, and 64 sessions on one pool ran ~8x slower than 64 own clients (bench/README.md).

    >>> from envs.server.config import EnvServerConfig
    >>> from envs.server.local import ServerThread
    >>> with ServerThread(EnvServerConfig(port=0)) as server:   # a real server on a free loopback port
    ...     env = RemoteEnv(server.url, "cwm_rl/Echo-v0", token=None, env_kwargs={"num_rounds": 1})
    ...     obs, info = env.reset(seed=0)
    ...     obs, reward, terminated, truncated, info = env.step(obs[-1]["content"].split(":", 1)[-1].strip())
    ...     env.close()
    >>> terminated, reward > 0
    (True, True)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import gymnasium as gym
import httpx

from cwm_rl.types import Task, new_id
from envs.spaces import MessagesSpace, TextSpace

Messages = list[dict[str, str]]
RETRYABLE = (httpx.TransportError,)  # connect/read/write errors, timeouts, dropped connections


class EnvServerError(RuntimeError):
    """The env server answered with an error status."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"env server error {status} ({code}): {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class EnvServerUnavailable(EnvServerError):
    """The env server could not be reached, kept answering 503 through every retry, or lost a session this
    client opened (404 after a restart): not the episode's doing, so the job plays it again elsewhere.

    `status` is 0 when no HTTP answer came at all; the last transport error is the `__cause__`, and the
    message names the first one too (a server killed mid-request: "Server disconnected", then "Connection refused")."""

    def __init__(self, base_url: str, what: str, cause: Exception, tries: int, first: Exception | None = None):
        status = cause.status if isinstance(cause, EnvServerError) else 0
        seen = f"{type(cause).__name__}: {cause}"
        if first is not None and str(first) != str(cause):
            seen = f"first {type(first).__name__}: {first}; last {seen}"
        if status == 0:
            why = ("the server is down or restarting, and the sessions it held are gone with it: create a new session "
                   "(on another server while this one is down)")
        elif status == 404:
            why = "the server no longer holds this session (it restarted): create a new session"
        elif getattr(cause, "code", None) == "sandbox_unavailable":
            why = "the env's sandbox went away under the episode (nothing it did): play it again"
        else:
            why = "the server is overloaded or degraded (see its /health)"
        super().__init__(status, "unavailable", f"{base_url} did not serve {what} after {tries} tries ({seen}): {why}")


def _raise_for_error(response: httpx.Response) -> dict[str, Any]:
    if response.status_code < 400:
        return response.json()
    try:
        err = response.json()["error"]
        code, message = err["code"], err["message"]
    except Exception:
        code, message = "http_error", response.text[:500]
    retry_after = response.headers.get("retry-after", "")
    raise EnvServerError(response.status_code, code, message, float(retry_after) if retry_after.isdigit() else None)


class RemoteEnv(gym.Env[Messages, str]):
    """One env session on an env server. A new `reset` closes the previous session and opens another."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        base_url: str,
        env_id: str,
        token: str | None = None,
        env_kwargs: dict[str, Any] | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.2,
    ):
        self.base_url = base_url.rstrip("/")
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.session_id: str | None = None
        self.observation_space = MessagesSpace()
        self.action_space = TextSpace()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None

    # ----- requests (one place builds them, sync and async transports send them) -----
    def _create_body(self, seed: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
        options = dict(options or {})
        task = options.pop("task", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; the only option is 'task'")
        if isinstance(task, Task):
            task = task.model_dump(mode="json")
        return {"env_id": self.env_id, "seed": seed, "task": task, "env_kwargs": self.env_kwargs, "request_id": new_id()}

    def _step_path(self) -> str:
        if self.session_id is None:
            raise RuntimeError("call reset() before step()")
        return f"/v1/sessions/{self.session_id}/step"

    def _sync(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
        return self._client

    def _async(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
        return self._aclient

    def _retry_delay(self, attempt: int, error: Exception, path: str) -> float | None:
        """Seconds to wait before retrying after `error`, or None to give up and raise it.

        Dropped connections and timeouts are retried (the request id makes that safe), and so
        are 429 and 503 answers, after the server's Retry-After; not a step's 503 for a sandbox
        that went away (the server closed that session: the episode must start again)."""
        if attempt >= self.max_retries:
            return None
        if isinstance(error, EnvServerError):
            if error.status not in (429, 503) or (error.code == "sandbox_unavailable" and path.endswith("/step")):
                return None
            return min(error.retry_after or self.retry_backoff_s, 30.0)
        return self.retry_backoff_s * 2**attempt

    def _give_up(self, method: str, path: str, error: Exception, attempt: int, first: Exception | None = None) -> None:
        """Raise `error`, as `EnvServerUnavailable` when the server never answered or stayed at 503."""
        lost_session = (isinstance(error, EnvServerError) and error.code == "unknown_session" and self.session_id is not None
                        and f"/sessions/{self.session_id}" in path)
        if isinstance(error, httpx.TransportError) or (isinstance(error, EnvServerError) and error.status == 503) or lost_session:
            raise EnvServerUnavailable(self.base_url, f"{method} {path}", error, attempt + 1, first) from error
        raise error

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        first = None
        for attempt in range(self.max_retries + 1):
            try:
                return _raise_for_error(self._sync().request(method, path, json=body))
            except (*RETRYABLE, EnvServerError) as e:
                first = first or e
                delay = self._retry_delay(attempt, e, path)
                if delay is None:
                    self._give_up(method, path, e, attempt, first)
                time.sleep(delay)
        raise AssertionError("unreachable")

    async def _arequest(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        first = None
        for attempt in range(self.max_retries + 1):
            try:
                return _raise_for_error(await self._async().request(method, path, json=body))
            except (*RETRYABLE, EnvServerError) as e:
                first = first or e
                delay = self._retry_delay(attempt, e, path)
                if delay is None:
                    self._give_up(method, path, e, attempt, first)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _step_result(r: dict[str, Any]) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        return r["observation"], float(r["reward"]), bool(r["terminated"]), bool(r["truncated"]), r["info"]

    # ----- the Gymnasium API, sync -----
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Messages, dict[str, Any]]:
        super().reset(seed=seed)
        body = self._create_body(seed, options)
        self._delete_session()
        r = self._request("POST", "/v1/sessions", body)
        self.session_id = r["session_id"]
        return r["observation"], r["info"]

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        path = self._step_path()
        return self._step_result(self._request("POST", path, {"action": action, "request_id": new_id()}))

    def state(self) -> dict[str, Any]:
        if self.session_id is None:
            raise RuntimeError("call reset() before state()")
        return self._request("GET", f"/v1/sessions/{self.session_id}")

    @property
    def connected(self) -> bool:
        """Whether an HTTP client (sync or async) is open; False after close()."""
        return self._client is not None or self._aclient is not None

    def close(self) -> None:
        """Delete the remote session and close the HTTP clients; safe to call twice.

        Blocking: in async code call `await env.aclose()` instead."""
        self._delete_session()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._aclient is not None:  # used by areset/astep: close it on its loop if one runs
            aclient, self._aclient = self._aclient, None
            try:
                asyncio.get_running_loop().create_task(aclient.aclose())
            except RuntimeError:  # no loop runs here: its connections die with their (gone) loop
                pass

    def _delete_session(self) -> None:
        session_id, self.session_id = self.session_id, None
        if session_id is not None:
            try:
                self._request("DELETE", f"/v1/sessions/{session_id}")
            except (EnvServerError, httpx.TransportError):
                pass  # already gone (reaped, or the server restarted): nothing left to free

    # ----- async twins -----
    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Messages, dict[str, Any]]:
        super().reset(seed=seed)
        body = self._create_body(seed, options)
        await self._adelete_session()
        r = await self._arequest("POST", "/v1/sessions", body)
        self.session_id = r["session_id"]
        return r["observation"], r["info"]

    async def astep(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        path = self._step_path()
        return self._step_result(await self._arequest("POST", path, {"action": action, "request_id": new_id()}))

    async def aclose(self) -> None:
        """Delete the remote session and close the HTTP clients, without blocking the loop."""
        await self._adelete_session()
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _adelete_session(self) -> None:
        session_id, self.session_id = self.session_id, None
        if session_id is not None:
            try:
                await self._arequest("DELETE", f"/v1/sessions/{session_id}")
            except (EnvServerError, httpx.TransportError):
                pass


def health(base_url: str, timeout_s: float = 2.0) -> bool:
    """True when the env server at `base_url` answers its /health (no auth needed)."""
    try:
        return httpx.get(base_url.rstrip("/") + "/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def list_remote_envs(base_url: str, token: str | None = None) -> list[dict[str, str]]:
    """The envs an env server offers: [{"id", "description"}]."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _raise_for_error(httpx.get(base_url.rstrip("/") + "/v1/envs", headers=headers, timeout=30))
