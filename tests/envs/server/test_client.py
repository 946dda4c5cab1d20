"""RemoteEnv against a real env server: the Gymnasium API over HTTP, async twins, retries after dropped connections."""

import asyncio
import socket
import threading
import time

import httpx
import pytest
from gymnasium.utils.env_checker import check_env

from envs import make_env
from envs.server.client import EnvServerError, EnvServerUnavailable, RemoteEnv, list_remote_envs


class DroppingProxy:
    """A TCP proxy for HTTP/1.1 that forwards each request but swallows the response of the first
    `drop` requests whose path contains `path_part`, closing the connection instead: the server did
    the work, the client never heard back."""

    def __init__(self, upstream_port: int, path_part: str, drop: int = 1):
        self.upstream_port, self.path_part, self.drop = upstream_port, path_part, drop
        self.forwarded: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _read_message(sock: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += sock.recv(65536)
        return head + b"\r\n\r\n" + body

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with client, upstream:
            while (request := self._read_message(client)) is not None:
                path = request.split(b" ", 2)[1].decode()
                self.forwarded.append(path)
                upstream.sendall(request)
                response = self._read_message(upstream)
                if self.path_part in path and self.drop > 0:
                    self.drop -= 1
                    return  # close the client connection without a response
                client.sendall(response)


def test_remote_env_passes_gymnasiums_checker(server):
    env = RemoteEnv(server.url, "cwm_rl/Echo-v0")
    check_env(env, skip_render_check=True)
    env.close()
    env.close()


def test_remote_episode_matches_local(server):
    remote, local = RemoteEnv(server.url, "cwm_rl/Math-v0", env_kwargs={"difficulty": 2}), make_env("cwm_rl/Math-v0", difficulty=2)
    assert remote.reset(seed=5) == local.reset(seed=5)
    answer = local.reference_action()
    assert remote.step(answer) == local.step(answer)
    with pytest.raises(EnvServerError) as e:
        remote.step(answer)
    assert (e.value.status, e.value.code) == (409, "episode_over")
    remote.close()
    assert any(env["id"] == "cwm_rl/Math-v0" for env in list_remote_envs(server.url))


def test_a_raw_prompt_crosses_http_with_its_parts_and_stop_tokens(server, sandbox_root):
    """Trace-v0 in CWM's format: the raw message's token parts arrive as the env made them."""
    kwargs = {"format": "cwm", "mode": "next_frame", "difficulty": 2}
    remote, local = RemoteEnv(server.url, "cwm_rl/Trace-v0", env_kwargs=kwargs), make_env("cwm_rl/Trace-v0", **kwargs)
    observation = remote.reset(seed=2)
    assert observation == local.reset(seed=2)
    (message,), _ = observation
    assert message["role"] == "raw" and message["parts"][0] == {"token": "<|begin_of_text|>"} and message["stop"] == ["<|frame_sep|>"]
    assert remote.step(local.reference_action())[1] == 1.0
    remote.close()


async def test_async_twins_play_an_episode(server):
    env = RemoteEnv(server.url, "cwm_rl/Echo-v0", env_kwargs={"num_rounds": 2})
    obs, info = await env.areset(seed=0, options={"task": {"id": "t", "prompt": "Repeat exactly: a", "answer": ["a", "b"]}})
    assert obs == [{"role": "user", "content": "Repeat exactly: a"}] and info == {"task_id": "t"}
    assert (await env.astep("a"))[:4] == ([{"role": "user", "content": "Repeat exactly: b"}], 1.0, False, False)
    assert (await env.astep("b"))[1:3] == (1.0, True)
    session = env.session_id
    await env.aclose()
    with httpx.Client(base_url=server.url) as c:
        assert c.get(f"/v1/sessions/{session}").status_code == 404  # closing deleted the remote session


def test_dropped_step_response_is_retried_without_stepping_twice(server):
    proxy = DroppingProxy(server.port, "/step", drop=1)
    env = RemoteEnv(f"http://127.0.0.1:{proxy.port}", "cwm_rl/Echo-v0", retry_backoff_s=0.01)
    env.reset(seed=0, options={"task": {"id": "t", "prompt": "Repeat exactly: a", "answer": ["a", "b", "c"]}})
    obs, reward, terminated, _, info = env.step("a")
    assert (obs[0]["content"], reward, terminated, info["expected"]) == ("Repeat exactly: b", 1.0, False, "a")
    steps = [p for p in proxy.forwarded if p.endswith("/step")]
    assert len(steps) == 2  # the lost attempt and its retry both reached the server ...
    state = env.state()
    assert state["num_steps"] == 1 and state["state"]["num_turns"] == 1  # ... but the env stepped once
    assert env.step("b")[2] is False and env.step("c")[2] is True
    env.close()


async def test_dropped_create_response_reuses_the_session(server):
    proxy = DroppingProxy(server.port, "/v1/sessions", drop=1)
    env = RemoteEnv(f"http://127.0.0.1:{proxy.port}", "cwm_rl/Echo-v0", retry_backoff_s=0.01)
    await env.areset(seed=1)
    assert [p for p in proxy.forwarded] == ["/v1/sessions", "/v1/sessions"]
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").json()["sessions"] == 1  # the retry did not open a second session
    await env.aclose()


def test_unreachable_server_raises_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    env = RemoteEnv(f"http://127.0.0.1:{port}", "cwm_rl/Echo-v0", max_retries=2, retry_backoff_s=0.01)
    with pytest.raises(EnvServerUnavailable, match="did not serve POST /v1/sessions after 3 tries") as e:
        env.reset()
    assert e.value.status == 0 and isinstance(e.value.__cause__, httpx.ConnectError)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("x")


def test_too_many_sessions_is_retried_after_retry_after(start_server):
    server = start_server(max_sessions=1)
    holder = RemoteEnv(server.url, "cwm_rl/Echo-v0")
    holder.reset(seed=0)
    waiter = RemoteEnv(server.url, "cwm_rl/Echo-v0", max_retries=5)
    threading.Timer(0.5, holder.close).start()  # frees the only slot while `waiter` retries
    started = time.monotonic()
    obs, _ = waiter.reset(seed=1)
    assert obs and 1.0 <= time.monotonic() - started < 8  # waited out Retry-After: 1 (plain backoff would be 0.6 s)
    impatient = RemoteEnv(server.url, "cwm_rl/Echo-v0", max_retries=0)
    with pytest.raises(EnvServerError) as e:
        impatient.reset()
    assert (e.value.status, e.value.retry_after) == (429, 1.0)
    waiter.close()


async def test_sync_close_after_async_use_releases_everything(server):
    env = RemoteEnv(server.url, "cwm_rl/Echo-v0")
    await env.areset(seed=0)
    env.close()  # the Gymnasium close, called from async code
    await asyncio.sleep(0.05)
    assert not env.connected and env.session_id is None
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.get("/health")).json()["sessions"] == 0


def test_a_session_the_server_lost_is_unavailable_not_an_env_error(server):
    """A server restarted on the same address answers 404 for a session this client opened: that is the
    server's doing, so the job must play the episode again. (One closed as idle is a 410: a visible error.)"""
    env = RemoteEnv(server.url, "cwm_rl/Echo-v0")
    env.reset(seed=0)
    assert httpx.delete(f"{server.url}/v1/sessions/{env.session_id}").status_code == 200  # what a restart does
    with pytest.raises(EnvServerUnavailable, match="no longer holds this session") as lost:
        env.step("hello")
    assert lost.value.status == 404
    env.reset(seed=1)  # a new session works
    assert env.step("hello")[0]
    env.close()
