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
    """Returns numpy values in its reset info, reward and info, a NaN reward for the action 'nan'
    and a NaN inside its info for 'nan-info'."""

    def sample_task(self, rng):
        return Task(id="np", prompt="go")

    def reset(self, *, seed=None, options=None):
        observation, info = super().reset(seed=seed, options=options)
        return observation, {**info, "level": np.int64(2)}

    def respond(self, action):
        reward = np.float32("nan") if action == "nan" else np.float32(0.5)
        score = float("nan") if action == "nan-info" else np.float64(0.25)
        return [], reward, False, False, {"score": score, "counts": np.arange(3), "obj": object}


class PickyEnv(TextEnv):
    """Raises ValueError on every step: the client's fault when it chose the task, the env's otherwise."""

    def sample_task(self, rng):
        return Task(id="picky", prompt="go")

    def respond(self, action):
        raise ValueError(f"task {self.task.id!r} is not one I can grade")


gym.register(id="test_server/Crash-v0", entry_point=CrashEnv)
gym.register(id="test_server/Numpy-v0", entry_point=NumpyEnv)
gym.register(id="test_server/Picky-v0", entry_point=PickyEnv)
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
                     422, "bad_env_kwargs", "num_rounds must be between 1 and 10000")
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


def test_env_failures_end_the_session_not_the_server(start_server, caplog):
    server = start_server(step_timeout_s=0.3)
    with httpx.Client(base_url=server.url) as c:
        sid = create(c, "test_server/Crash-v0")["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}),
                     502, "env_error", "ZeroDivisionError: boom")
        assert "crash" in CLOSED
        logged = [r for r in caplog.records if r.name == "envs.server" and r.exc_info]
        assert [r.exc_info[0] for r in logged] == [ZeroDivisionError]  # the env's traceback, for its author
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
        assert_error(c.get(f"/v1/sessions/{idle}"), 410, "session_expired", "closed after 1 s idle")
        assert CLOSED == ["slow"]
        assert "cwm_rl_env_sessions_reaped_total 1.0" in c.get("/metrics").text


def test_numpy_infos_are_served_and_nan_rewards_are_env_errors(server):
    with httpx.Client(base_url=server.url) as c:
        created = create(c, "test_server/Numpy-v0")
        assert created["info"] == {"task_id": "np", "level": 2}
        sid = created["session_id"]
        step = c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"})
        assert step.status_code == 200
        assert step.json()["reward"] == 0.5
        assert step.json()["info"] == {"score": 0.25, "counts": [0, 1, 2], "obj": "<class 'object'>"}
        # NaN is no JSON: never sent as the invalid token `NaN`, but reported as the env's bug.
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "nan-info", "request_id": "2"}),
                     502, "env_error", "not JSON-serialisable: Out of range float values")
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "nan", "request_id": "3"}),
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


def test_bodies_that_are_not_strict_json_are_422(server):
    """Whatever the bytes, a client's malformed body is a 422 that says what to fix, never a 5xx."""
    with httpx.Client(base_url=server.url) as c:
        sid = create(c, seed=0)["session_id"]
        step = f"/v1/sessions/{sid}/step"

        def post(path: str, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
            return c.post(path, content=body, headers={"content-type": content_type} if content_type else {})

        for body, words in [
            (b'{"action": "\\ud800", "request_id": "1"}', "lone UTF-16 surrogate"),  # cannot be UTF-8 (was a 500)
            (b'{"action": "\xff\xfe", "request_id": "1"}', "not UTF-8 (byte 12"),
            (b'{"action": NaN, "request_id": "1"}', "NaN is not a JSON number"),
            (b'{"action": "x", "request_id": "1", "n": -Infinity}', "-Infinity is not a JSON number"),
            (b'{"action": "x", "request_id": "1", "n": ' + b"9" * 5000 + b"}", "4300 digits"),
            (b'{"action": "x", "request_id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
            (b'{"action": "x", "request_id": "1",}', "Expecting property name"),
            (b"[1, 2]", "must be a JSON object"),
            (b"", "must be a JSON object and is missing"),
        ]:
            assert_error(post(step, body), 422, "malformed_request", words)
        assert_error(post(step, b'{"action": "x", "request_id": "1"}', "text/plain"), 422, "malformed_request",
                     "it was sent as 'text/plain': send it with 'Content-Type: application/json'")
        # Astral characters escaped as a surrogate pair are valid JSON, and a NUL is just a character.
        assert post(step, b'{"action": "\\ud83d\\ude00 \\u0000", "request_id": "1"}').status_code == 200
        assert c.get(f"/v1/sessions/{sid}").json()["state"]["transcript"][1]["content"] == "\U0001F600 \x00"
        # The same rules for a create: a task whose prompt no env could ever send back (was a 500).
        assert_error(post("/v1/sessions", b'{"env_id": "cwm_rl/Math-v0", "task": {"id": "t", "prompt": "\\udfff"}}'),
                     422, "malformed_request", "surrogate")
        assert_error(post("/v1/sessions", b'{"env_id": "cwm_rl/Math-v0", "env_kwargs": {"correct_reward": Infinity}}'),
                     422, "malformed_request", "Infinity is not a JSON number")


def test_what_the_client_chose_is_blamed_on_the_client(server):
    """An env's refusal of the client's seed, kwargs, task or action is a 4xx; the same exception
    from an env the client did not configure is the env's bug, a 502."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0", "seed": -1}),  # was a 502
                     422, "malformed_request", "body.seed: Input should be greater than or equal to 0")
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0", "env_kwargs": {"num_rounds": 1.5}}),  # was a 502
                     422, "bad_env_kwargs", "rejected the reset with the env_kwargs given: TypeError")
        assert c.get("/health").json()["sessions"] == 0  # the env that failed to reset was not kept

        # Kwargs and tasks the env accepts at creation but refuses at the first step (were 502s).
        assert_error(c.post("/v1/sessions", json={"env_id": "cwm_rl/Math-v0", "env_kwargs": {"verify_timeout_s": -1}}),
                     422, "bad_env_kwargs", "verify_timeout_s must be > 0")  # refused up front since; was a 502 at the first step
        sid = create(c, "test_server/Picky-v0", env_kwargs={"max_action_chars": 100})["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}),
                     422, "bad_env_kwargs", "the env_kwargs this session was created with")
        assert_error(c.get(f"/v1/sessions/{sid}"), 404, "unknown_session", sid)  # closed: its env may be half-stepped
        sid = create(c, "cwm_rl/Math-v0", task={"id": "t", "prompt": "1+1?", "answer": [2]})["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "\\boxed{2}", "request_id": "1"}),
                     422, "bad_task", "needs a scalar answer")
        sid = create(c, "test_server/Picky-v0", task={"id": "mine", "prompt": "go"})["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}),
                     422, "bad_task", "'mine' is not one I can grade")
        sid = create(c, "test_server/Picky-v0")["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "x", "request_id": "1"}),
                     502, "env_error", "'picky' is not one I can grade")

        # An action outside the env's action space never reaches the env, and the session goes on.
        sid = create(c, seed=0, env_kwargs={"max_action_chars": 3})["session_id"]
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={"action": "apple", "request_id": "1"}),
                     422, "bad_action", "TextSpace(max_length=3)")
        assert c.post(f"/v1/sessions/{sid}/step", json={"action": "abc", "request_id": "2"}).status_code == 200
        assert c.get(f"/v1/sessions/{sid}").json()["num_steps"] == 1
