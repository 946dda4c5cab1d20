"""The containers of a run: the label they carry, and removing them all (`cwm-rl sandbox reap --run`).

Every sandbox and SWE container a job's envs make (in the workers, on env servers the job starts)
carries `cwm-rl.run=<run_label(run_dir)>`. The job removes them all when it ends, whatever ended it,
and at its next start what a killed start left. Light on purpose: the CLI imports it without the loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

RUN_LABEL_VAR = "CWM_RL_RUN_ID"  # read by the sandbox and SWE pools when they label their containers


def run_label(run_dir: str | Path) -> str:
    """The label of the containers a run makes: its dir's name plus a hash of its path (two runs named `run` differ)."""
    run_dir = Path(run_dir)
    return f"{run_dir.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"


def reap_run_containers(label: str) -> int:
    """Remove every sandbox and SWE container labelled with the run `label`; 0 when there is no Docker daemon."""
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()) or shutil.which("docker") is None:
        return 0
    from envs.sandbox.docker import connect, reap

    try:
        _, client = connect("", timeout_s=10)
    except Exception:  # no daemon: nothing of this run can be running in it
        return 0
    return reap(client, run_id=label)
