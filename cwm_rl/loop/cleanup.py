"""The containers of a run: the label they carry, and removing them all (`cwm-rl sandbox reap --run`).

Every sandbox and SWE container a job's envs make (in the workers, on env servers the job starts)
carries `cwm-rl.run=<run_label(run_dir)>`. The job removes them all when it ends, whatever ended it,
and at its next start what a killed start left. Light on purpose: the CLI imports it without the loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

RUN_LABEL_VAR = "CWM_RL_RUN_ID"  # read by the sandbox and SWE pools when they label their containers


def run_label(run_dir: str | Path) -> str:
    """The label of the containers a run makes: its dir's name plus a hash of its path (two runs named `run` differ)."""
    run_dir = Path(run_dir)
    return f"{run_dir.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"


def reap_run_containers(label: str) -> int:
    """Remove every sandbox and SWE container labelled with the run `label`; 0 when there is no Docker daemon."""
    return reap_containers(run=label)


def reap_containers(*, run: str | None = None, owner: str | None = None, docker_env: Mapping[str, str] | None = None,
                    timeout_s: float = 10.0) -> int:
    """Remove the sandbox and SWE containers labelled with the run `run`, or made by `owner` (an `owner_label`), in the
    daemon the `DOCKER_*` variables of `docker_env` name (default: this process's); how many. 0 when no daemon answers
    there: nothing can be running in it."""
    if (run is None) == (owner is None):
        raise ValueError("pass run= or owner=, one of them")
    docker_env = os.environ if docker_env is None else docker_env
    if not (docker_env.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()) or shutil.which("docker") is None:
        return 0
    import docker

    from envs.sandbox.docker import reap

    try:
        client = docker.from_env(timeout=timeout_s, environment=dict(docker_env))
        client.ping()
    except Exception:
        return 0
    try:
        return reap(client, run_id=run, owner=owner)
    finally:
        client.close()
