"""Fault battery, env side: real env server processes (started as `cwm_rl/loop/env_servers.py` starts them),
real sandboxes, real Docker. Each test breaks something mid-episode, checks what the clients get and what is
left behind, and reports what the fault cost (`fault_report`: one `FAULT {json}` line each).

- kill -9 of an env server (Math, Code, SWE) with one step in flight in its sandbox or container and one
  episode waiting between steps: both clients fail fast naming the server; the job's restart brings up a
  server that serves a fresh episode; no process the dead server started and none of its containers remains
  (the job reaps its containers in the background as it restarts the server; the test checks none is left
  within 30 s, before it plays a new episode).
- the Docker daemon restarts under a SWE env server: the episodes in flight end with an error that says so
  (not a hang, not a score), the server stays up and serves new episodes once the daemon is back, and no
  container of its pool is left. The daemon is a private one (own data root and socket, the task image
  loaded into it), so restarting it disturbs no other test or user of the machine's daemon.

Replaying the lost episodes elsewhere is the job's part: tests/cwm_rl/loop/test_driver.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cwm_rl.config import EnvSpec
from cwm_rl.loop.env_servers import EnvServers
from envs.server.client import EnvServerError, EnvServerUnavailable, RemoteEnv, health

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SWE = "cwm_rl/SWE-v0"
SWE_KWARGS = {"instance_ids": ["cwm-rl__minicalc-1"], "command_timeout_s": 60, "memory_mb": 512, "pool_size": 1, "max_turns": 6}
PYTHON_QUICK, PYTHON_SLOW = "<tool: python>\nprint(6 * 7)\n</tool>", "<tool: python>\nimport time\ntime.sleep(60)\n</tool>"
BASH_QUICK, BASH_SLOW = "<tool: bash>\necho quick\n</tool>", "<tool: bash>\nsleep 60\n</tool>"


@dataclass
class Case:
    env_id: str
    kwargs: dict[str, Any]
    quick: str  # a step that answers at once
    slow: str  # a step that runs for a minute in the env's sandbox (or container)


CASES = {
    "math": Case("cwm_rl/Math-v0", {"difficulty": 1, "tool_calls": 2}, PYTHON_QUICK, PYTHON_SLOW),
    "code": Case("cwm_rl/Code-v0", {"tool_calls": 2, "test_timeout_s": 60}, PYTHON_QUICK, PYTHON_SLOW),
    "swe": Case(SWE, SWE_KWARGS, BASH_QUICK, BASH_SLOW),
}


# -- processes and containers ----------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_under(root: int) -> dict[int, int]:
    """Every live process descending from `root`: pid -> start time (a reused pid is not the same process)."""
    stats = {int(p.name): s for p in Path("/proc").glob("[0-9]*") if (s := _stat(int(p.name))) is not None}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state, started) in stats.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = started
                frontier.append(pid)
    return found


def still_running(processes: dict[int, int]) -> list[str]:
    """Those of `processes` still alive (zombies count as gone), with their command lines."""
    alive = []
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[1] != "Z":
            alive.append(f"{pid} {_cmdline(pid)[:120]}")
    return alive


def containers(*filters: str, docker: list[str] = ("docker",), status: str | None = None) -> list[str]:
    """Ids of the containers (any state, or `status`) matching every label filter."""
    argv = [*docker, "ps", "-aq", *(a for f in filters for a in ("--filter", f"label={f}"))]
    if status:
        argv += ["--filter", f"status={status}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def described(ids: list[str], docker: list[str] = ("docker",)) -> list[str]:
    """For an assertion's message: each container's state, exit code, creation time and session."""
    if not ids:
        return []
    done = subprocess.run([*docker, "inspect", "-f", '{{.Id}} {{.State.Status}} exit {{.State.ExitCode}} created {{.Created}} '
                           'started {{.State.StartedAt}} session {{index .Config.Labels "cwm-rl.session"}}', *ids],
                          capture_output=True, text=True)
    return done.stdout.splitlines() or ids


def owner(pid: int) -> str:
    return f"cwm-rl.owner={socket.gethostname()}:{pid}"


def wait_for(condition: Callable[[], Any], within_s: float, every_s: float = 0.1) -> Any:
    """Poll `condition` until it returns something true, or `within_s` passes; its last value."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every_s)


@dataclass
class InFlight:
    """A blocking call run in a thread: when it ended, and what it returned or raised."""

    call: Callable[[], Any]
    ended: float | None = None
    value: Any = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self.call()
        except BaseException as e:  # noqa: BLE001  (the test looks at it)
            self.error = e
        self.ended = time.monotonic()

    def wait(self, timeout_s: float) -> InFlight:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the call still runs after {timeout_s:g} s: a hang"
        return self


def remote(url: str, case: Case) -> RemoteEnv:
    return RemoteEnv(url, case.env_id, env_kwargs=case.kwargs)  # the client's defaults, as a rollout worker has them


def sandbox_running(server_pid: int, case: Case, session: str) -> bool:
    """Whether the slow step runs now: its python in a bubblewrap sandbox under the server (Math, Code), or its
    sleep in the episode's container (SWE)."""
    if case.env_id == SWE:
        (cid,) = containers(f"cwm-rl.session={session}")
        return "sleep 60" in subprocess.run(["docker", "top", cid, "-o", "pid,args"], capture_output=True, text=True).stdout
    return any("tool.py" in _cmdline(pid) for pid in processes_under(server_pid))


# -- kill -9 of an env server -------------------------------------------------------------------
@pytest.fixture
def prepared(request, sandbox_root):
    """What the env needs on this machine: the sandbox root (bubblewrap), and for SWE its images in Docker."""
    if request.node.callspec.params["name"] == "swe":
        request.getfixturevalue("minicalc_images")


@pytest.mark.parametrize("name", ["math", "code", pytest.param("swe", marks=pytest.mark.docker)])
def test_env_server_kill_9_mid_episode(name, prepared, tmp_path, fault_report):
    case = CASES[name]
    servers = EnvServers(EnvSpec(id=case.env_id, servers=1), log_dir=tmp_path)
    clients: list[RemoteEnv] = []
    try:
        (url,) = servers.urls
        server_pid = servers.local[0].proc.pid
        waiting = remote(url, case)  # an episode between two steps
        clients.append(waiting)
        waiting.reset(seed=0)
        assert waiting.step(case.quick)[2:4] == (False, False)
        busy = remote(url, case)  # an episode with a step in flight
        clients.append(busy)
        _, info = busy.reset(seed=1)
        step = InFlight(lambda: busy.step(case.slow))
        assert wait_for(lambda: sandbox_running(server_pid, case, info.get("session_id", "")), 30), "the slow step never started"
        held = processes_under(server_pid)
        held_containers = containers(owner(server_pid))
        assert bool(held_containers) == (name == "swe"), held_containers  # SWE: the two episodes' containers and a warm one

        killed = time.monotonic()
        os.kill(server_pid, signal.SIGKILL)
        servers.local[0].proc.wait()
        # The step in flight and the next step of the waiting episode fail fast, naming the server and what happened.
        failed = [step.wait(30).error]
        try:
            waiting.step(case.quick)
        except EnvServerError as e:
            failed.append(e)
        client_error_s = time.monotonic() - killed
        for error in failed:
            assert isinstance(error, EnvServerUnavailable), error
            assert url in str(error) and "down or restarting" in str(error), error
        assert "first " in str(failed[0]) and "Connection refused" in str(failed[0]), failed[0]  # dropped mid-request, then refused
        assert client_error_s < 10, client_error_s

        # What the job does with an episode that ended "env_unavailable": mark the server down, restart it at its next check.
        servers.mark_down(url, str(failed[0]))
        assert servers.pick() is None
        back = wait_for(servers.check, 60)
        assert back == servers.urls and servers.urls[0] != url and servers.restarts() == 1
        restarted_s = time.monotonic() - killed
        # Within seconds of the restart (the reap runs beside it) and before a new episode: nothing of the dead server remains.
        def leftovers() -> tuple[list[str], list[str]]:
            return still_running(held), containers(owner(server_pid))

        wait_for(lambda: leftovers() == ([], []), 30)
        clean_s = time.monotonic() - killed
        processes_left, containers_left = leftovers()
        assert processes_left == [], f"processes the killed server started still run: {processes_left}"
        assert containers_left == [], f"containers of the killed server remain: {described(containers_left)}"

        fresh = remote(servers.pick(), case)
        clients.append(fresh)
        fresh.reset(seed=2)
        observation, reward, terminated, truncated, _ = fresh.step(case.quick)
        assert observation and not (terminated or truncated)
        recover_s = time.monotonic() - killed
        # At this level an episode of a dead server ends "unavailable" (the session dies with it); playing it again
        # is the job's part (tests/cwm_rl/loop/test_driver.py reports what a job loses: nothing stored).
        fault_report(f"env_server_kill_9_{name}", affected=len(failed),
                     ended_unavailable=sum(isinstance(e, EnvServerUnavailable) for e in failed),
                     containers_left=len(containers_left), sandbox_processes_left=len(processes_left),
                     containers_held=len(held_containers), processes_held=len(held), client_error_s=round(client_error_s, 2),
                     restart_s=round(restarted_s, 2), clean_s=round(clean_s, 2), recover_s=round(recover_s, 2))
    finally:
        for client in clients:
            client.close()
        servers.close()


@pytest.mark.docker
def test_a_swe_env_server_stopped_with_sigterm_removes_its_warm_containers(minicalc_images, tmp_path):
    """SIGTERM, as a service manager or `docker stop` sends it: the server ends its sessions and removes the containers
    it kept warm for the next episodes (atexit alone would not: uvicorn raises the signal again after its shutdown)."""
    servers = EnvServers(EnvSpec(id=SWE, servers=1), log_dir=tmp_path)
    client = None
    try:
        (url,) = servers.urls
        server = servers.local[0].proc
        client = RemoteEnv(url, SWE, env_kwargs={**SWE_KWARGS, "pool_size": 2})
        client.reset(seed=0)
        held = wait_for(lambda: len(containers(owner(server.pid))) >= 3, 60)
        assert held, f"the episode's container and two warm ones: {described(containers(owner(server.pid)))}"
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        left = containers(owner(server.pid))
        assert left == [], f"containers of the stopped server remain: {described(left)}"
    finally:
        if client is not None:
            client.close()
        servers.close()


# -- the Docker daemon restarts under a SWE env server -------------------------------------------------
class PrivateDockerd:
    """A Docker daemon of this test's own: its data root, exec root, pid file and socket under `root`, no
    bridge and no iptables rules (SWE containers have no network), in a network namespace of its own: a
    daemon started with --bridge=none deletes the host's docker0, which the machine's daemon needs for
    `docker run` on its default network. Stopping it stops its containers, as stopping the machine's daemon
    would; nothing else uses it."""

    def __init__(self, root: Path):
        self.root = root
        self.host = f"unix://{root}/docker.sock"
        self.cli = ["docker", "-H", self.host]
        self.argv = ["unshare", "--net", "dockerd", "--data-root", f"{root}/data", "--exec-root", f"{root}/exec", "--pidfile", f"{root}/docker.pid",
                     "-H", self.host, "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip6tables=false"]
        self.proc: subprocess.Popen | None = None

    def answers(self) -> bool:
        return subprocess.run([*self.cli, "version"], capture_output=True, timeout=30).returncode == 0

    def start(self, within_s: float = 60) -> None:
        from envs.sandbox.process import die_with_parent

        with open(self.root / "dockerd.log", "a") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        if not wait_for(lambda: self.proc.poll() is not None or self.answers(), within_s, every_s=0.2) or self.proc.poll() is not None:
            raise RuntimeError(f"the private dockerd did not start; its log:\n{(self.root / 'dockerd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it: it stops its containers, then exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def load(self, *images: str) -> None:
        save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE)
        loaded = subprocess.run([*self.cli, "load", "-q"], stdin=save.stdout, capture_output=True, text=True, timeout=300)
        save.stdout.close()
        assert save.wait() == 0 and loaded.returncode == 0, loaded.stderr


@pytest.fixture
def private_dockerd(tmp_path_factory, docker_ready):
    root = tmp_path_factory.mktemp("dockerd")  # short: the socket's path must fit in 108 bytes
    dockerd = PrivateDockerd(root)
    dockerd.start()
    yield dockerd
    try:
        if dockerd.proc.poll() is None:
            subprocess.run([*dockerd.cli, "rm", "-f", *containers(docker=dockerd.cli)], capture_output=True)
    finally:
        dockerd.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def minicalc_images(sandbox_root, docker_ready) -> tuple[str, str]:
    """The sandbox base image and minicalc's task image, on the machine's daemon (built once, cached there)."""
    import docker

    from envs.sandbox.rootfs import docker_base_image
    from envs.swe.images import task_image
    from envs.swe.tasks import SWEInstance, load_tasks

    client = docker.from_env(timeout=300)
    instance = next(SWEInstance.from_task(t) for t in load_tasks() if t.id == "cwm-rl__minicalc-1")
    return docker_base_image(client), task_image(instance, client)


@pytest.mark.docker
def test_docker_daemon_restart_under_a_swe_env_server(private_dockerd, minicalc_images, tmp_path, monkeypatch, fault_report):
    dockerd, case = private_dockerd, CASES["swe"]
    dockerd.load(*minicalc_images)
    with monkeypatch.context() as env:  # the env server (not this process) talks to the private daemon
        env.setenv("DOCKER_HOST", dockerd.host)
        servers = EnvServers(EnvSpec(id=SWE, servers=1), log_dir=tmp_path)
    clients: list[RemoteEnv] = []
    try:
        (url,) = servers.urls
        server_pid = servers.local[0].proc.pid
        pool = (owner(server_pid), "cwm-rl.swe")
        waiting = remote(url, case)
        clients.append(waiting)
        waiting.reset(seed=0)
        assert waiting.step(case.quick)[0][0]["content"].startswith("quick")
        busy = remote(url, case)
        clients.append(busy)
        _, info = busy.reset(seed=1)
        (busy_container,) = containers(f"cwm-rl.session={info['session_id']}", docker=dockerd.cli)
        step = InFlight(lambda: busy.step(case.slow))
        assert wait_for(lambda: "sleep 60" in subprocess.run([*dockerd.cli, "top", busy_container, "-o", "pid,args"],
                                                               capture_output=True, text=True).stdout, 30)

        stopped = time.monotonic()
        dockerd.stop()
        down_s = time.monotonic() - stopped
        # The step in flight ends with an error that says what happened (not a hang, not a score for the agent).
        error = step.wait(60).error
        in_flight_error_s = step.ended - stopped
        # Unavailable, not an env error: the job plays such an episode again instead of training on it.
        assert isinstance(error, EnvServerUnavailable), error or step.value
        assert "SandboxUnavailable" in error.message and "Docker daemon" in error.message and "play it again" in error.message, error
        # A new episode while the daemon is away is refused with the reason too (503s, retried, then given up on).
        clients.append(remote(url, case))
        with pytest.raises(EnvServerUnavailable, match="Docker daemon does not answer") as refused:
            clients[-1].reset(seed=3)
        assert refused.value.status == 503

        dockerd.start()
        restarted = time.monotonic()
        # The episode that waited between steps: its container was stopped with the daemon; its next step says so.
        with pytest.raises(EnvServerUnavailable, match=r"container \w+ stopped .*the Docker daemon restarted") as stale:
            waiting.step(case.quick)
        assert "SandboxUnavailable" in stale.value.message and stale.value.status == 503  # not retried: it would get a 404
        unavailable = [error, stale.value]  # the two episodes under way
        # The same server process serves new episodes: the pool dropped its dead warm container and starts new ones.
        fresh = remote(url, case)
        clients.append(fresh)
        fresh.reset(seed=2)
        assert fresh.step(case.quick)[0][0]["content"].startswith("quick")
        recover_s = time.monotonic() - restarted
        restarts = servers.restarts()
        assert servers.local[0].proc.pid == server_pid and servers.local[0].alive() and health(url) and restarts == 0
        fresh.close()
        # What the daemon could not remove while it was away is removed now: only running (warm) containers remain.
        def stopped_containers() -> list[str]:
            return [c for status in ("exited", "created", "dead") for c in containers(*pool, docker=dockerd.cli, status=status)]

        wait_for(lambda: stopped_containers() == [], 20)
        clean_s = time.monotonic() - restarted
        leaked = stopped_containers()
        assert leaked == [], f"stopped containers of the pool were not removed: {described(leaked, dockerd.cli)}"
    finally:
        for client in clients:
            client.close()
        servers.close()
    left = containers("cwm-rl.swe", docker=dockerd.cli)
    assert left == [], f"containers of the pool remain after its server stopped: {described(left, dockerd.cli)}"
    fault_report("docker_daemon_restart_swe", affected=len(unavailable), ended_unavailable=len(unavailable),
                 containers_left=len(leaked) + len(left),
                 in_flight_error_s=round(in_flight_error_s, 2), daemon_stop_s=round(down_s, 2), recover_s=round(recover_s, 2),
                 clean_s=round(clean_s, 2), server_restarts=restarts)
