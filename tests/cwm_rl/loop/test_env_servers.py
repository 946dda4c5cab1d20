"""The job's env servers: started as real `cwm-rl env serve` processes, restarted when they die,
left out while unreachable and taken back once their /health answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from cwm_rl.config import EnvSpec
from cwm_rl.loop.env_servers import EnvServers
from envs.server.client import RemoteEnv, health
from envs.server.config import EnvServerConfig
from envs.server.local import ServerThread, free_port


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens on a port that is free


def test_started_server_serves_the_env_and_is_restarted_after_kill_9(tmp_path):
    servers = EnvServers(EnvSpec(id="cwm_rl/Math-v0", servers=1), log_dir=tmp_path)
    try:
        (url,) = servers.urls
        env = RemoteEnv(url, "cwm_rl/Math-v0", env_kwargs={"difficulty": 1})
        obs, info = env.reset(seed=3)
        assert info["task_id"].startswith("arith-L1-")
        env.close()

        os.kill(servers.local[0].proc.pid, signal.SIGKILL)
        servers.local[0].proc.wait()
        assert not health(url)
        back = servers.check()
        assert back == servers.urls and health(servers.urls[0]) and servers.restarts() == 1
        assert servers.pick() == servers.urls[0]
        assert list(tmp_path.glob("*.log")), "the server's output goes to a log file in the run dir"
    finally:
        servers.close()
    assert servers.local[0].proc.poll() is not None  # close() stops the process


def test_unreachable_server_is_left_out_until_its_health_answers(tmp_path):
    with ServerThread(EnvServerConfig(port=0)) as up:
        gone = dead_url()
        servers = EnvServers(EnvSpec(id="cwm_rl/Math-v0", urls=[up.url, gone]), log_dir=tmp_path, probe_every_s=0.0)
        assert [servers.pick() for _ in range(4)] == [up.url, gone, up.url, gone]
        servers.mark_down(gone, "connection refused")
        assert [servers.pick() for _ in range(3)] == [up.url] * 3
        assert _checks_until_back(servers, within_s=1.0) == [] and gone in servers.down  # still refused
        servers.mark_down(up.url, "pretend it failed")
        assert servers.pick() is None  # every server down: the job waits rather than playing elsewhere
        assert _checks_until_back(servers) == [up.url]  # its /health answers: back in the rotation
        assert servers.pick() == up.url


def _checks_until_back(servers: EnvServers, within_s: float = 10.0) -> list[str]:
    """Call check() (as the job's loop does) until a server comes back or time is up; each call must be quick."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        back = servers.check()
        assert time.monotonic() - started < 1.0  # probes run in threads of their own (a probe waits up to 2 s)
        if back:
            return back
        time.sleep(0.05)
    return []


def test_a_server_that_never_answers_does_not_stall_check(tmp_path):
    """A socket that accepts connections and never replies: its probe waits out its timeout in a thread."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        servers = EnvServers(EnvSpec(id="cwm_rl/Math-v0", urls=[url]), log_dir=tmp_path, probe_every_s=0.0)
        servers.mark_down(url, "timed out")
        assert _checks_until_back(servers, within_s=3.0) == [] and url in servers.down
    finally:
        silent.close()


def test_started_servers_die_with_a_killed_job(tmp_path):
    """The job's env servers are its children: a kill -9 of the job takes them down too (no orphans)."""
    code = ("import sys, time; from cwm_rl.config import EnvSpec; from cwm_rl.loop.env_servers import EnvServers; "
            f"s = EnvServers(EnvSpec(id='cwm_rl/Echo-v0', servers=1), log_dir=__import__('pathlib').Path({str(tmp_path)!r})); "
            "print(s.local[0].proc.pid, flush=True); time.sleep(600)")
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server_pid = int(job.stdout.readline())
    job.kill()
    job.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(server_pid):
        time.sleep(0.1)
    assert not _alive(server_pid), f"env server {server_pid} outlived its killed job"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False
