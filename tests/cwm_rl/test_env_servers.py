"""The job's env servers: started as real `cwm-rl env serve` processes, restarted when they die,
left out while unreachable and taken back once their /health answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cwm_rl.config import EnvSpec
from cwm_rl.env_servers import EnvServers
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
        assert servers.check() == [] and gone in servers.down  # still refused
        servers.mark_down(up.url, "pretend it failed")
        assert servers.pick() is None  # every server down: the job waits rather than playing elsewhere
        assert servers.check() == [up.url]  # its /health answers: back in the rotation
        assert servers.pick() == up.url


def test_started_servers_die_with_a_killed_job(tmp_path):
    """The job's env servers are its children: a kill -9 of the job takes them down too (no orphans)."""
    code = ("import sys, time; from cwm_rl.config import EnvSpec; from cwm_rl.env_servers import EnvServers; "
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
