"""The env servers of a job: the ones it starts here, the ones named by URL, and which are up.

    servers = EnvServers(spec, log_dir=run_dir / "env_servers")   # starts spec.servers processes
    url = servers.pick()             # round-robin over the servers that are up
    servers.mark_down(url, reason)   # an episode there ended "env_unavailable"
    servers.check()                  # restart dead local servers; bring back servers whose /health answers
    servers.close()

Why: an env server that dies must not take the job down or lose work. Its episodes end with
finish reason "env_unavailable" (the client gave up reaching it); the job stores them as dropped
with that reason, marks the server down and plays the same tasks again on another server. A
server this job started is restarted when its process is gone; a remote one is probed on its
/health every `probe_every_s`, in a thread of its own (a server that does not answer must not
stall the job's loop), and used again at the first `check()` after it answered.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from cwm_rl.config import EnvSpec
from envs.server.client import health
from envs.sandbox.process import die_with_parent
from envs.server.local import free_port

log = logging.getLogger(__name__)


class LocalEnvServer:
    """One `cwm-rl env serve` process on 127.0.0.1, started and restarted by the job; output in `log_path`."""

    def __init__(self, env_id: str, log_path: Path, env_modules: list[str] = (), token: str | None = None):
        self.env_id, self.log_path, self.env_modules, self.token = env_id, log_path, list(env_modules), token
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = -1  # the first start is not a restart

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> None:
        """(Re)start the server and wait for its /health; a port taken meanwhile gets a new one."""
        for attempt in range(3):
            cmd = [sys.executable, "-m", "cwm_rl.cli", "env", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--env", self.env_id, *(a for m in self.env_modules for a in ("--import", m))]
            if self.token:
                cmd += ["--token", self.token]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class EnvServers:
    """The env servers one env of the mix is played on, and which of them are up."""

    def __init__(self, spec: EnvSpec, log_dir: Path, env_modules: list[str] = (), probe_every_s: float = 5.0):
        self.probe_every_s = probe_every_s
        self.local = [LocalEnvServer(spec.id, log_dir / f"{spec.id.replace('/', '_')}-{i}.log", env_modules, spec.token)
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
