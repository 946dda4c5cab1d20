"""Sandboxes for model-written code: one interface (`Sandbox.run` -> `ExecResult`), two backends.

    from envs.sandbox import make_sandbox
    with make_sandbox("bwrap") as sandbox:          # or "docker"
        result = sandbox.run(["python3", "main.py"], files={"main.py": code}, stdin="1 2\\n")
        result.exit_code, result.stdout, result.limits_hit

`bwrap` (bubblewrap, the default on Linux) costs milliseconds per run; `docker` gives cgroup
limits and a container per run from a warm pool. Both run the same Debian root (built once per
machine by mmdebstrap, see `rootfs`), never the host's `/`.
"""

from __future__ import annotations

import threading

from envs.sandbox.base import WORK_DIR, ExecResult, Limits, Sandbox, SandboxError

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
    with `$CWM_RL_RUN_ID` when it is set (`cwm-rl train` sets it to the run directory's name)."""
    import os

    with _shared_lock:
        if backend not in _shared:
            run_id = os.environ.get("CWM_RL_RUN_ID")
            _shared[backend] = make_sandbox(backend, **({"run_id": run_id} if backend == "docker" else {}))
        return _shared[backend]


__all__ = ["BACKENDS", "WORK_DIR", "ExecResult", "Limits", "Sandbox", "SandboxError", "check_backend", "make_sandbox", "shared_sandbox"]
