"""A viewer served by uvicorn in a background thread: for tests, screenshots and benchmarks.

    with ViewerServer("runs/demo") as url:     # http://127.0.0.1:PORT (a free port)
        ...

`cwm-rl view` runs uvicorn in the foreground instead (`cwm_rl/cli/view.py`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from cwm_rl.viewer.app import make_app


class ViewerServer:
    """Starts on enter (port 0: the OS picks a free one), stops on exit."""

    def __init__(self, run_dir: str | Path, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(make_app(run_dir), host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="viewer", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the viewer server did not start (see the log above)")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
