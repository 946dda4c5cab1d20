"""Shared fixtures: a real env server on a loopback port (started in this process), tiny models made here."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import envs  # noqa: F401  (registers the built-in envs)
from envs.server.config import EnvServerConfig
from envs.server.local import ServerThread


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """Start env servers with custom settings; all are stopped after the test."""
    servers: list[ServerThread] = []

    def start(**settings) -> ServerThread:
        server = ServerThread(EnvServerConfig(**{"host": "127.0.0.1", "port": 0, **settings})).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server) -> ServerThread:
    """An env server with default settings."""
    return start_server()


@pytest.fixture
def host_server():
    """A real HTTP server on the host's loopback that counts the requests it gets: sandboxes must not reach it."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"host secret")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hits
    server.shutdown()


# The sandbox's Debian root is built by mmdebstrap on first use (about a minute, then cached);
# Docker tests need a running daemon (scripts/test.sh starts one and stops it at the end).
@pytest.fixture(scope="session")
def sandbox_root():
    from envs.sandbox.rootfs import sandbox_root as build

    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is missing: apt-get install mmdebstrap (bash scripts/setup.sh installs it)")
    return build(log=print)


@pytest.fixture
def fresh_trace_cache(monkeypatch, sandbox_root):
    """Trace-v0's process-wide reference cache, empty for this test (earlier tests traced some of the same calls)."""
    from collections import OrderedDict

    import envs.trace_env

    monkeypatch.setattr(envs.trace_env, "_references", OrderedDict())


@pytest.fixture(scope="session")
def docker_ready():
    if shutil.which("docker") is None:
        pytest.fail("the docker CLI is missing: apt-get install docker.io (bash scripts/setup.sh installs it)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("the Docker daemon is not running: start it (dockerd >/tmp/dockerd.log 2>&1 &), or run the suite "
                    "with `bash scripts/test.sh`, which starts and stops one")


@pytest.fixture(scope="session", autouse=True)
def no_sandbox_container_left_behind():
    """After the suite: the process-wide sandboxes are closed and no container this process made remains."""
    yield
    import os
    import socket

    from envs import sandbox

    sandbox.close_shared_sandboxes()
    if "envs.swe.containers" in sys.modules:  # the SWE env's per-process container pools
        sys.modules["envs.swe.containers"].close_shared_pools()
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        left = subprocess.run(["docker", "ps", "-aq", "--filter", "label=cwm-rl.sandbox", "--filter",
                               f"label=cwm-rl.owner={socket.gethostname()}:{os.getpid()}"],
                              capture_output=True, text=True).stdout.split()
        assert not left, f"sandbox containers left behind by the test suite: {left}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from cwm_rl.models import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_cwm_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer and chat template are CWM's (`model init --tokenizer cwm`)."""
    from cwm_rl.models import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny-cwm", preset="tiny", seed=0, tokenizer="cwm")


@pytest.fixture(scope="session")
def perturbed_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with noise added to every weight: a "version 1" to reload."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("models") / "tiny-v1"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    for f in tiny_model.iterdir():  # tokenizer files: a published version is a complete checkpoint
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@contextmanager
def _no_warnings_allowed() -> Iterator[None]:
    """Fail if Python warnings or transformers log records at warning level or above are emitted inside."""
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.add_handler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        hf_logging.remove_handler(handler)
        hf_logging.set_verbosity(verbosity)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records] == []


@pytest.fixture(scope="session")
def no_warnings_allowed() -> Callable[[], AbstractContextManager[None]]:
    """`with no_warnings_allowed(): ...` fails on any warning (e.g. a model that loads with complaints)."""
    return _no_warnings_allowed


@pytest.fixture
def fault_report(request) -> Callable[..., dict]:
    """Report what a fault cost: printed as one `FAULT {json}` line, and appended to the JSON-lines
    file `$CWM_RL_FAULT_REPORT` names (bench/reliability.py sets it and collects the lines).

    Keys, by the issue's figures: episodes `affected`, `retried`, `lost` (goal 0), `containers_left`
    (goal 0), `recover_s` (time from the fault until the job or pool works again); add others freely.
    """
    import json
    import os

    def report(fault: str, **figures) -> dict:
        line = {"fault": fault, "test": request.node.nodeid, **figures}
        print("FAULT " + json.dumps(line), flush=True)
        path = os.environ.get("CWM_RL_FAULT_REPORT")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps(line) + "\n")
        return line

    return report
