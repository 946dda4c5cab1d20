"""Where each env of a job is played: in-process, or on env servers (started here, or named by URL).

    >>> specs = [EnvSpec(id="cwm_rl/Math-v0"), EnvSpec(id="cwm_rl/Echo-v0", url="http://127.0.0.1:9")]
    >>> endpoints = EnvEndpoints(specs, log_dir=Path("env_servers"), env_modules=[], say=print)
    >>> endpoints.payload(0)   # in-process: the worker makes the env itself
    ({'id': 'cwm_rl/Math-v0', 'kwargs': {}, 'url': None, 'token': None, 'limits': None, 'max_tokens': None}, None)
    >>> env, url = endpoints.payload(1)
    >>> url
    'http://127.0.0.1:9'
    >>> endpoints.mark_down(1, url, "connection refused")   # an episode there ended "env_unavailable"
    >>> endpoints.payload(1) is None   # every server of that env is down, until its /health answers (`check()`)
    True
    >>> endpoints.close()

`EnvServers` is the same for one env; `spec.servers: N` starts N `cwm-rl env serve` processes
(`tests/cwm_rl/loop/test_env_servers.py` kills and restarts them).

Why: an env server that dies must not take the job down or lose work. Its episodes end with
finish reason "env_unavailable" (the client gave up reaching it); the job stores them as dropped
with that reason, marks the server down and plays the same tasks again on another server. A
server this job started is restarted when its process is gone; a remote one is probed on its
/health every `probe_every_s`, in a thread of its own (a server that does not answer must not
stall the job's loop), and used again at the first `check()` after it answered.

What a server held goes with it: its sandboxes (bubblewrap, started with a parent-death signal)
die with its process; its Docker containers (SWE episodes, warm pools, Docker sandboxes: labelled
with its pid) are removed by `reap_containers_of` once it is gone: in a thread when the job restarts
a dead one, at once when the job stops one (a server stopped with SIGTERM removes its warm ones
itself, `envs/server/app.py`: this is the backstop, and what a server killed with -9 left). Otherwise
they would stay until the next pool on the machine (it reaps dead owners' containers) or the job's end.
`tests/faults/test_env_faults.py` kills servers mid-episode and counts what is left.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cwm_rl.config import EnvSpec
from cwm_rl.loop.cleanup import reap_containers
from envs.server.client import health
from envs.sandbox.process import die_with_parent
from envs.server.local import free_port

log = logging.getLogger(__name__)


def reap_containers_of(pid: int, docker_env: dict[str, str] | None = None) -> int:
    """Remove the sandbox and SWE containers that process `pid` of this host (a dead env server) made, in the daemon
    its `DOCKER_*` environment named; how many. 0 without a daemon; a failure is logged, never raised."""
    from envs.sandbox.docker import owner_label

    try:
        return reap_containers(owner=owner_label(pid), docker_env=docker_env, timeout_s=30)
    except Exception as e:
        log.warning("could not remove the containers of dead env server %d: %s: %s "
                    "(`cwm-rl sandbox reap` removes them, the job's end does too)", pid, type(e).__name__, e)
        return 0


class LocalEnvServer:
    """One `cwm-rl env serve` process on 127.0.0.1, started and restarted by the job; output in `log_path`."""

    def __init__(self, env_id: str, log_path: Path, env_modules: list[str] = (), token: str | None = None,
                 episodes_in_flight: int | None = None, step_timeout_s: float | None = None):
        self.env_id, self.log_path, self.env_modules, self.token = env_id, log_path, list(env_modules), token
        self.episodes_in_flight = episodes_in_flight  # what its SWE container pool is sized for
        self.step_timeout_s = step_timeout_s  # the worker's env deadline: the server's must not be shorter
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = -1  # the first start is not a restart
        self.reaped: set[int] = set()  # pids of its dead processes whose containers were removed
        self.docker_env: dict[str, str] = {}  # the DOCKER_* variables its process got: the daemon its containers are in

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> None:
        """(Re)start the server and wait for its /health; a port taken meanwhile gets a new one. The containers
        a dead predecessor left are removed meanwhile, in a thread."""
        if self.proc is not None and self.proc.poll() is not None and self.proc.pid not in self.reaped:
            self.reaped.add(self.proc.pid)
            threading.Thread(target=reap_containers_of, args=(self.proc.pid, self.docker_env), name="env-server-reap",
                             daemon=True).start()
        for attempt in range(3):
            cmd = [sys.executable, "-m", "cwm_rl.cli", "env", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--env", self.env_id, *(a for m in self.env_modules for a in ("--import", m))]
            if self.token:
                cmd += ["--token", self.token]
            if self.step_timeout_s:
                cmd += ["--step-timeout", str(self.step_timeout_s)]
            if self.episodes_in_flight:  # the server's default of 256 live sessions must not turn the job's episodes away
                cmd += ["--max-sessions", str(max(256, 2 * self.episodes_in_flight))]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **({"CWM_RL_EPISODES_IN_FLIGHT": str(self.episodes_in_flight)} if self.episodes_in_flight else {})}
            self.docker_env = {k: v for k, v in env.items() if k.startswith("DOCKER_")}
            with self.log_path.open("a") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                             preexec_fn=die_with_parent if sys.platform == "linux" else None)
            self.restarts += 1
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.alive():
                if health(self.url, timeout_s=1.0):
                    return
                time.sleep(0.2)
            self.stop()
            self.port = free_port()  # the old port may have been taken by another process
        raise RuntimeError(f"env server for {self.env_id} did not start (3 tries); its output is in {self.log_path}")

    def stop(self) -> None:
        """Stop the process (SIGTERM; SIGKILL 10 s later) and remove the containers it leaves."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.pid not in self.reaped:
            self.reaped.add(self.proc.pid)
            reap_containers_of(self.proc.pid, self.docker_env)


class EnvServers:
    """The env servers one env of the mix is played on, and which of them are up."""

    def __init__(self, spec: EnvSpec, log_dir: Path, env_modules: list[str] = (), probe_every_s: float = 5.0,
                 episodes_in_flight: int | None = None, step_timeout_s: float | None = None):
        self.probe_every_s = probe_every_s
        share = -(-episodes_in_flight // spec.servers) if episodes_in_flight and spec.servers else None  # per server
        self.local = [LocalEnvServer(spec.id, log_dir / f"{spec.id.replace('/', '_')}-{i}.log", env_modules, spec.bearer_token, share,
                                     step_timeout_s)
                      for i in range(spec.servers)]
        for server in self.local:
            server.start()
        self.urls = [s.url for s in self.local] + spec.endpoints
        self.down: dict[str, tuple[float, str]] = {}  # url -> (when marked down or last probed, why)
        self._next = 0
        self._probing: set[str] = set()  # down URLs whose /health probe is under way
        self._answered: set[str] = set()  # down URLs whose last probe got an answer
        self._lock = threading.Lock()

    def pick(self) -> str | None:
        """The next server that is up (round-robin), or None while every one is down."""
        for _ in range(len(self.urls)):
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            if url not in self.down:
                return url
        return None

    def mark_down(self, url: str, reason: str) -> None:
        if url in self.urls and url not in self.down:
            log.warning("env server %s is down: %s", url, reason)
            self.down[url] = (time.monotonic(), reason)
            with self._lock:
                self._answered.discard(url)  # an answer from before it failed again does not count

    def check(self) -> list[str]:
        """Restart dead local servers and probe the servers marked down; returns the URLs back up."""
        back = []
        for i, server in enumerate(self.local):
            if not server.alive():
                old = server.url
                server.port = free_port()  # a new URL: late failures reported against the old one cannot mark this one down
                server.start()
                self.urls[i] = server.url
                self.down.pop(old, None)
                back.append(server.url)
        now = time.monotonic()
        for url, (since, why) in list(self.down.items()):
            with self._lock:
                answered, probing = url in self._answered, url in self._probing
                self._answered.discard(url)
            if answered:
                del self.down[url]
                back.append(url)
            elif not probing and now - since >= self.probe_every_s:
                self.down[url] = (now, why)
                with self._lock:
                    self._probing.add(url)
                threading.Thread(target=self._probe, args=(url,), name="env-server-probe", daemon=True).start()
        return back

    def _probe(self, url: str) -> None:
        answered = health(url)
        with self._lock:
            self._probing.discard(url)
            if answered:
                self._answered.add(url)

    def restarts(self) -> int:
        return sum(s.restarts for s in self.local)

    def close(self) -> None:
        for server in self.local:
            server.stop()


class EnvEndpoints:
    """Every env of the mix and where it is played; envs with no servers play in the worker's process."""

    def __init__(self, specs: list[EnvSpec], log_dir: Path, env_modules: list[str], say: Callable[[str], None],
                 episodes_in_flight: int | None = None, limits: list[Any] | None = None):
        self.specs = specs
        self.limits = limits or [None] * len(specs)  # each env's EpisodeLimits (None: the workers' own)
        self.say = say
        self.servers: dict[int, EnvServers] = {}
        try:
            for i, spec in enumerate(specs):
                if spec.servers or spec.endpoints:
                    timeout = self.limits[i].env_timeout_s if self.limits[i] is not None else None
                    self.servers[i] = EnvServers(spec, log_dir, env_modules, episodes_in_flight=episodes_in_flight,
                                                 step_timeout_s=timeout)
                    if spec.servers:
                        say(f"{spec.id}: {spec.servers} env server(s) started: {', '.join(self.servers[i].urls)}")
        except BaseException:
            self.close()
            raise
        self.last_check = time.monotonic()

    def payload(self, env_index: int) -> tuple[dict[str, Any], str | None] | None:
        """What a worker needs to make and play the env ({id, kwargs, url, token, limits, max_tokens}) and the server's URL (None: in-process),
        or None while every env server of that env is down."""
        spec = self.specs[env_index]
        url = None
        if env_index in self.servers:
            url = self.servers[env_index].pick()
            if url is None:
                return None
        limits = self.limits[env_index].model_dump() if self.limits[env_index] is not None else None
        return {"id": spec.id, "kwargs": spec.kwargs, "url": url, "token": spec.bearer_token, "limits": limits, "max_tokens": spec.max_tokens}, url

    def mark_down(self, env_index: int, url: str | None, reason: str) -> None:
        if url is not None and env_index in self.servers:
            self.servers[env_index].mark_down(url, reason)

    def check(self) -> None:
        """About once a second: restart env servers the job started that died, take back the ones answering again."""
        if not self.servers or time.monotonic() - self.last_check < 1.0:
            return
        self.last_check = time.monotonic()
        for i, servers in self.servers.items():
            for url in servers.check():
                self.say(f"{self.specs[i].id}: env server {url} is up again")

    def restarts(self) -> int:
        return sum(servers.restarts() for servers in self.servers.values())

    def close(self) -> None:
        for servers in self.servers.values():
            servers.close()
