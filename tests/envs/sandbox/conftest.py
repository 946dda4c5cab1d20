"""The sandboxes under test: bubblewrap and Docker, on the real root (`sandbox_root`, tests/conftest.py)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module")
def bwrap_sandbox(sandbox_root):
    from envs.sandbox import make_sandbox

    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is missing: apt-get install bubblewrap (bash scripts/setup.sh installs it)")
    with make_sandbox("bwrap") as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def docker_sandbox(sandbox_root, docker_ready):
    from envs.sandbox import make_sandbox

    with make_sandbox("docker", pool_size=2, run_id="pytest") as sandbox:
        yield sandbox


@pytest.fixture(params=["bwrap", "docker"])
def sandbox(request):
    """Each backend in turn."""
    return request.getfixturevalue(f"{request.param}_sandbox")
