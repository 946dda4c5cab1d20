"""Shared fixtures: a real env server on a loopback port, started in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
