"""The env server over real HTTP on 127.0.0.1: sessions, concurrency, auth, every error status, retries, reaper."""

import asyncio
import time

import gymnasium as gym
import httpx
import numpy as np
import pytest

from cwm_rl.types import Task
from envs.base import TextEnv
from envs.server.config import EnvServerConfig

CLOSED: list[str] = []  # task ids of test envs that were closed
EVENTS: list[str] = []  # what SlowEnvs did, in order


class CrashEnv(TextEnv):
    """Raises on its first step."""

    def sample_task(self, rng):
        return Task(id="crash", prompt="go")

    def respond(self, action):
        raise ZeroDivisionError("boom")

    def close(self):
        CLOSED.append(self.task.id if self.task else "?")
        super().close()


class SlowEnv(TextEnv):
    """Sleeps `delay_s` per step; counts its steps."""

    def __init__(self, delay_s: float = 0.5, **kw):
        super().__init__(**kw)
        self.delay_s = delay_s

    def sample_task(self, rng):
        return Task(id="slow", prompt="wait")

    def respond(self, action):
        EVENTS.append("step-start")
        time.sleep(self.delay_s)
        EVENTS.append("step-end")
        return [{"role": "user", "content": f"step {self.num_turns}"}], 1.0, False, False, {"turn": self.num_turns}

    def close(self):
        EVENTS.append("close")
        CLOSED.append("slow")
        super().close()


class NumpyEnv(TextEnv):
    """Returns numpy values in its reward and info, and a NaN reward for the action 'nan'."""

    def sample_task(self, rng):
        return Task(id="np", prompt="go")

    def respond(self, action):
        reward = np.float32("nan") if action == "nan" else np.float32(0.5)
        return [], reward, False, False, {"score": np.float64(0.25), "counts": np.arange(3), "obj": object}


gym.register(id="test_server/Crash-v0", entry_point=CrashEnv)
gym.register(id="test_server/Numpy-v0", entry_point=NumpyEnv)
gym.register(id="test_server/Slow-v0", entry_point=SlowEnv)


def create(client: httpx.Client, env_id="cwm_rl/Echo-v0", **body) -> dict:
    r = client.post("/v1/sessions", json={"env_id": env_id, **body})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str, words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert words in err["message"], err["message"]


async def test_64_concurrent_sessions_play_full_episodes(start_server):
    """32 Echo sessions (stepped on the event loop) and 32 Math sessions (stepped on env threads,
    graded in the verifier pool) at once, each played to the end with its reference answer."""
    server = start_server(max_sessions=64)

    async def episode(client: httpx.AsyncClient, seed: int) -> float:
        env_id = "cwm_rl/Echo-v0" if seed % 2 else "cwm_rl/Math-v0"
        r = (await client.post("/v1/sessions", json={"env_id": env_id, "seed": seed})).json()
        sid, total, done = r["session_id"], 0.0, False
        state = (await client.get(f"/v1/sessions/{sid}")).json()
        answer = state["state"]["task"]["answer"]
        actions = answer if isinstance(answer, list) else [f"\\boxed{{{answer}}}"]
        for i, action in enumerate(actions):
            step = (await client.post(f"/v1/sessions/{sid}/step", json={"action": action, "request_id": f"{seed}-{i}"})).json()
            total += step["reward"]
            done = step["terminated"]
        assert done
        assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 200
        return total

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
        returns = await asyncio.gather(*(episode(client, seed) for seed in range(64)))
        assert returns == [1.0 if seed % 2 == 0 else 3.0 for seed in range(64)]
        assert (await client.get("/health")).json()["sessions"] == 0


def test_auth(start_server):
    server = start_server(token="s3cret-token")
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").status_code == 200  # liveness needs no token
        assert_error(c.get("/v1/envs"), 401, "unauthorized", "Bearer")
        assert_error(c.get("/v1/envs", headers={"Authorization": "Bearer wrong-token"}), 401, "unauthorized", "token")
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0"}), 401, "unauthorized", "token")
        assert_error(c.get("/metrics"), 401, "unauthorized", "token")
        ok = c.get("/v1/envs", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and {"cwm_rl/Echo-v0", "cwm_rl/Math-v0"} <= {e["id"] for e in ok.json()}


def test_a_token_is_required_beyond_loopback():
    with pytest.raises(ValueError, match="bearer token"):
        EnvServerConfig(host="0.0.0.0")
    assert EnvServerConfig(host="0.0.0.0", token="long-enough").token == "long-enough"
    assert EnvServerConfig(host="::1").token is None


def test_error_statuses(start_server):
    server = start_server(max_sessions=2, max_action_bytes=1000)
    with httpx.Client(base_url=server.url) as c:
        assert_error(c.post("/v1/sessions/nope/step", json={"action": "x", "request_id": "1"}), 404, "unknown_session", "never created")
        assert_error(c.get("/v1/sessions/nope"), 404, "unknown_session", "create a new session")
        assert_error(c.delete("/v1/sessions/nope"), 404, "unknown_session", "nope")
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Nope-v0"}), 404, "unknown_env", "cwm_rl/Echo-v0")
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0", "env_kwargs": {"num_rounds": 0}}),
                     422, "bad_env_kwargs", "num_rounds must be >= 1")
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0", "task": {"id": "t", "prompt": "p", "answer": 3}}),
                     422, "bad_task", "non-empty list")
        # Malformed bodies: missing field, wrong type, unknown field, not JSON at all.
        assert_error(c.post("/v1/sessions", json={}), 422, "malformed_request", "body.env_id: Field required")
        assert_error(c.post("/v1/sessions", json={"env_id": 5}), 422, "malformed_request", "body.env_id")
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0", "sede": 1}), 422, "malformed_request", "sede")
        assert_error(c.post("/v1/sessions", content=b"{not json", headers={"content-type": "application/json"}),
                     422, "malformed_request", "JSON")

        sid = create(c, seed=0, env_kwargs={"num_rounds": 1})["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"request_id": "1"}), 422, "malformed_request", "body.action")
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "é" * 600, "request_id": "1"}),
                     413, "action_too_large", "1200 bytes")
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x" * 100_000, "request_id": "1"}),
                     413, "body_too_large", "at most")
        assert c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}).status_code == 200
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "2"}), 409, "episode_over", "ended")

        create(c)  # the second of two allowed sessions
        r = c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0"})
        assert_error(r, 429, "too_many_sessions", "maximum of 2")
        assert r.headers["retry-after"] == "1"
        assert_error(c.get("/v2/whatever"), 404, "http_error", "/docs")


def test_env_failures_end_the_session_not_the_server(start_server):
    server = start_server(step_timeout_s=0.3)
    with httpx.Client(base_url=server.url) as c:
        sid = create(c, "test_server/Crash-v0")["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}),
                     502, "env_error", "ZeroDivisionError: boom")
        assert "crash" in CLOSED
        assert_error(c.get(f"/v1/sessions/{sid}"), 404, "unknown_session", sid)

        sid = create(c, "test_server/Slow-v0", env_kwargs={"delay_s": 10.0})["session_id"]
        started = time.monotonic()
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}),
                     504, "env_timeout", "0.3 s")
        assert time.monotonic() - started < 5.0  # answered at the 0.3 s deadline, not after the 10 s step
        # The abandoned step still holds a thread: reported, and its env is closed once it returns.
        assert c.get("/health").json() == {"status": "degraded", "sessions": 0, "max_sessions": 256, "abandoned_env_calls": 1}
        assert "slow" not in CLOSED
        deadline = time.monotonic() + 15  # the abandoned 10 s step returns, then its env is closed
        while c.get("/health").json()["status"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/health").json()["abandoned_env_calls"] == 0
        time.sleep(0.2)
        assert "slow" in CLOSED
        metrics = c.get("/metrics").text
        assert 'cwm_rl_env_errors_total{code="env_error"} 1.0' in metrics
        assert 'cwm_rl_env_errors_total{code="env_timeout"} 1.0' in metrics


def test_episode_deadline_truncates(start_server):
    server = start_server(episode_timeout_s=0.2)
    with httpx.Client(base_url=server.url) as c:
        sid = create(c, seed=0)["session_id"]
        time.sleep(0.3)
        step = c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}).json()
        assert step["truncated"] is True and step["info"] == {"truncated_reason": "episode_deadline"}
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "2"}), 409, "episode_over", "ended")


async def test_retried_steps_are_answered_once(start_server):
    server = start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={"env_id": "test_server/Slow-v0", "env_kwargs": {"delay_s": 0.3}})).json()["session_id"]
        body = {"action": "x", "request_id": "same"}
        # Two concurrent copies (a retry racing the original), then a late third copy.
        first, second = await asyncio.gather(c.post(f"/v1/sessions/{sid}/step", json=body),
                                             c.post(f"/v1/sessions/{sid}/step", json=body))
        third = await c.post(f"/v1/sessions/{sid}/step", json=body)
        assert first.json() == second.json() == third.json()
        assert first.json()["info"] == {"turn": 0}
        state = (await c.get(f"/v1/sessions/{sid}")).json()
        assert state["num_steps"] == 1 and state["state"]["num_turns"] == 1
        # A new request id steps again.
        fourth = await c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "next"})
        assert fourth.json()["info"] == {"turn": 1}


def test_create_retries_reuse_the_session(server):
    with httpx.Client(base_url=server.url) as c:
        a = create(c, seed=3, request_id="create-1")
        b = create(c, seed=3, request_id="create-1")
        assert a == b
        assert c.get("/health").json()["sessions"] == 1


def test_reaper_closes_idle_sessions(start_server):
    server = start_server(idle_timeout_s=1.0, reap_interval_s=0.05)
    CLOSED.clear()
    with httpx.Client(base_url=server.url) as c:
        idle = create(c, "test_server/Slow-v0", env_kwargs={"delay_s": 0.0})["session_id"]
        busy = create(c, seed=1)["session_id"]
        for i in range(15):  # keep `busy` active (a step every 0.1 s, far within its 1 s) while `idle` sits
            time.sleep(0.1)
            assert c.post(f"/v1/sessions/{busy}/step", json={"action": "x", "request_id": str(i)}).status_code in (200, 409)
        assert_error(c.get(f"/v1/sessions/{idle}"), 404, "unknown_session", "reaped after 1 s idle")
        assert CLOSED == ["slow"]
        assert "cwm_rl_env_sessions_reaped_total 1.0" in c.get("/metrics").text


def test_numpy_infos_are_served_and_nan_rewards_are_env_errors(server):
    with httpx.Client(base_url=server.url) as c:
        sid = create(c, "test_server/Numpy-v0")["session_id"]
        step = c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"})
        assert step.status_code == 200
        assert step.json()["reward"] == 0.5
        assert step.json()["info"] == {"score": 0.25, "counts": [0, 1, 2], "obj": "<class 'object'>"}
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "nan", "request_id": "2"}),
                     502, "env_error", "non-finite reward")


def test_chunked_bodies_are_held_to_the_size_limit(start_server):
    server = start_server(max_action_bytes=1000)
    with httpx.Client(base_url=server.url) as c:
        sid = create(c, seed=0)["session_id"]

        def chunks():  # no Content-Length: httpx sends Transfer-Encoding: chunked
            yield b'{"request_id": "1", "action": "'
            for _ in range(100):
                yield b"x" * 10_000
            yield b'"}'

        r = c.post(f"/v1/sessions/{sid}/step", content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413, "body_too_large", "at most")
        assert c.get(f"/v1/sessions/{sid}").json()["num_steps"] == 0


async def test_concurrent_create_retries_open_one_session(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        body = {"env_id": "test_server/Slow-v0", "request_id": "create-once"}
        a, b = await asyncio.gather(c.post("/v1/sessions", json=body), c.post("/v1/sessions", json=body))
        assert a.json() == b.json()
        assert (await c.get("/health")).json()["sessions"] == 1


async def test_delete_waits_for_a_running_step(server):
    EVENTS.clear()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={"env_id": "test_server/Slow-v0", "env_kwargs": {"delay_s": 0.4}})).json()["session_id"]
        step = asyncio.create_task(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}))
        while "step-start" not in EVENTS:
            await asyncio.sleep(0.01)
        assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 200
        assert (await step).status_code == 200
        assert EVENTS == ["step-start", "step-end", "close"]  # never closed under the running step
        assert_error(await c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "2"}), 404, "unknown_session", sid)


def test_client_env_kwargs_policy(start_server):
    assert EnvServerConfig().client_env_kwargs_allowed is True
    assert EnvServerConfig(host="0.0.0.0", token="long-enough").client_env_kwargs_allowed is False
    server = start_server(allow_client_env_kwargs=False)
    with httpx.Client(base_url=server.url) as c:
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Math-v0", "env_kwargs": {"tasks_path": "/etc/passwd"}}),
                     403, "env_kwargs_forbidden", "drop them")
        assert create(c, "cwm_rl/Math-v0")["observation"]
    server = start_server()
    with httpx.Client(base_url=server.url) as c:
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Math-v0", "env_kwargs": {"tasks_path": "/no/such.jsonl"}}),
                     422, "bad_env_kwargs", "does not exist")


class BadDataEnv(TextEnv):
    """Returns an info dict JSON cannot encode, and a state() that raises."""

    def sample_task(self, rng):
        return Task(id="bad", prompt="go")

    def respond(self, action):
        return [], 0.0, False, False, {(1, 2): "tuple key"}

    def state(self):
        raise RuntimeError("state is broken")


gym.register(id="test_server/BadData-v0", entry_point=BadDataEnv)


def test_unserialisable_env_data_is_a_clear_502(server):
    with httpx.Client(base_url=server.url) as c:
        sid = create(c, "test_server/BadData-v0")["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}), 502, "env_error", "JSON")
        assert_error(c.get(f"/v1/sessions/{sid}"), 502, "env_error", "state is broken")
