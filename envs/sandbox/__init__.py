"""Sandboxes for model-written code: one interface (`Sandbox.run` -> `ExecResult`), two backends.

`make_sandbox("bwrap")` (or `"docker"`) gives a sandbox; `sandbox.run(["python3", "main.py"],
files={"main.py": code}, stdin="1 2")` runs one program and returns an `ExecResult` (`exit_code`,
`stdout`, `limits_hit`, ...); `tests/envs/sandbox/` runs both backends, hostile programs included.
`bwrap` (bubblewrap, the default on Linux) costs milliseconds per run; `docker` gives cgroup
limits and a container per run from a warm pool. Both run the same Debian root (built once per
machine by mmdebstrap, see `rootfs`), never the host's `/`.
"""

from __future__ import annotations

import threading

from envs.sandbox.base import WORK_DIR, ExecResult, Limits, Sandbox, SandboxError, SandboxUnavailable

BACKENDS = ("bwrap", "docker")
_shared: dict[str, Sandbox] = {}
_shared_lock = threading.Lock()


def make_sandbox(backend: str = "bwrap", limits: Limits | None = None, **kwargs) -> Sandbox:
    """A sandbox of the named backend (`docker` takes `pool_size`, `image`, `run_id`)."""
    if backend == "bwrap":
        from envs.sandbox.bwrap import BwrapSandbox

        return BwrapSandbox(limits=limits, **kwargs)
    if backend == "docker":
        from envs.sandbox.docker import DockerSandbox

        return DockerSandbox(limits=limits, **kwargs)
    raise ValueError(f"unknown sandbox backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def check_backend(backend: str) -> str:
    """`backend` if it names a sandbox backend, else a ValueError an env's bad kwarg gets."""
    if backend not in BACKENDS:
        raise ValueError(f"sandbox must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def shared_sandbox(backend: str = "bwrap") -> Sandbox:
    """This process's sandbox of a backend, made on first use: envs are made per episode, and a Docker
    pool (or the root check) should not be. Limits are passed per run. Docker containers are labelled
    with `$CWM_RL_RUN_ID` when it is set (`cwm-rl train` sets it to its run label: the run dir's name and a hash of its path)."""
    import os

    with _shared_lock:
        if backend not in _shared:
            run_id = os.environ.get("CWM_RL_RUN_ID")
            _shared[backend] = make_sandbox(backend, **({"run_id": run_id} if backend == "docker" else {}))
        return _shared[backend]


def close_shared_sandboxes() -> None:
    """Close this process's shared sandboxes (their Docker containers go with them); later use makes new ones."""
    with _shared_lock:
        sandboxes = list(_shared.values())
        _shared.clear()
    for sandbox in sandboxes:
        sandbox.close()


__all__ = ["BACKENDS", "WORK_DIR", "ExecResult", "Limits", "Sandbox", "SandboxError", "SandboxUnavailable", "check_backend", "close_shared_sandboxes", "make_sandbox", "shared_sandbox"]
