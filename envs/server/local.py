"""Run an env server in a background thread of this process, on a free loopback port.

For `cwm-rl env check --served`, tests and benchmarks: a real uvicorn server on a real socket,
without a second process to manage.

`with ServerThread(EnvServerConfig(port=0)) as server:` serves on `server.url` until the block
ends; `envs/server/client.py`'s docstring plays an episode against one.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from envs.server.app import create_app
from envs.server.config import EnvServerConfig


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a server started in another process; ServerThread binds port 0 itself)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, config: EnvServerConfig):
        self.config = config
        self.sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((config.host, config.port))  # port 0: the kernel picks a free one, no race
        self.port = self.sock.getsockname()[1]
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the env server did not start on {self.url} within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
