"""The compose stack (docker-compose.yml, docs/deploy.md) end to end: the images built offline by
docker/build_images.sh, a short quickstart job run distributed over the Ray head, env server, rollout
worker and driver containers by Debian's docker-compose, its summary read from the run volume, and
`down -v` leaving no container, network, volume or Ray process behind."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
PORTS = {"CWM_RL_RAY_PORT": 26379, "CWM_RL_RAY_CLIENT_PORT": 26380, "CWM_RL_ENV_PORT": 28000}  # compose's defaults
STEPS = 2
# Short but real: two RL steps (each publishes a version that the worker reloads through Ray's object
# store), small evals, and 1-digit addition after a short warm start: on 2-digit addition nearly every
# group is all wrong (no learning signal). Small steps and a small buffer (a step is taken once it is
# full, signal or not) make each step come in seconds. max_minutes only guards.
# The driver's shell reads these (compose puts them in its command line), hence the quotes.
SHORT_JOB = (f"--set steps={STEPS} --set max_minutes=8 --set eval.num_tasks=20 --set model.sft.steps=50 "
             "--set model.sft.batch_size=16 --set model.sft.eval_tasks=20 "
             "--set trainer.batch.step_tokens=256 --set buffer_groups=16 --set rollout.requests_in_flight=4 "
             "--set 'envs=[{id: cwm_rl/Math-v0, kwargs: {difficulty: 1, operators: \"+\"}, "
             f"url: \"http://127.0.0.1:{PORTS['CWM_RL_ENV_PORT']}\"}}]'")
# What the run volume holds after the job: the summary, and the newest policy version a stored trajectory
# was generated with (the worker's, so > 0 means a published version reached it).
READ_RUN = """
import json, sqlite3
summary = json.load(open("/runs/compose/summary.json"))
store = sqlite3.connect("/runs/compose/rollouts.sqlite")
summary["newest_version_generated"] = store.execute("select max(newest_version) from trajectories").fetchone()[0]
print(json.dumps(summary))
"""


def _run(*args: str, env=None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _left_behind(project: str) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={project}"
    left = {kind: _run("docker", *cmd, "--filter", label).stdout.split()
            for kind, cmd in [("containers", ["ps", "-aq"]), ("networks", ["network", "ls", "-q"]), ("volumes", ["volume", "ls", "-q"])]}
    # The stack's Ray processes ran in its containers on the host's network: none may outlive them.
    ps = _run("ps", "-eo", "pid,args").stdout.splitlines()
    left["ray processes"] = [line for line in ps if "127.0.0.2" in line and ("raylet" in line or "gcs_server" in line or "ray start" in line)]
    return {kind: items for kind, items in left.items() if items}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_compose_runs_a_short_job_across_the_services_and_down_leaves_nothing(docker_ready, tmp_path):
    for tool, hint in [("docker-compose", "apt-get install docker-compose (Debian's, 1.29)"), ("mmdebstrap", "apt-get install mmdebstrap")]:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (the compose stack needs it): {hint}")
    busy = {name: port for name, port in PORTS.items() if not _port_free(port)}
    assert not busy, f"ports the compose stack uses are taken (another stack up? `docker-compose down`): {busy}"

    build = _run("bash", "docker/build_images.sh", timeout=1200)
    tag = build.stdout.split()[-1]
    project = f"cwmrltest{os.getpid()}"
    env = {**os.environ, "CWM_RL_IMAGE_TAG": tag, "CWM_RL_ENV_TOKEN": secrets.token_hex(16),
           "CWM_RL_RAY_TOKEN": secrets.token_hex(32), "CWM_RL_TRAIN_ARGS": SHORT_JOB}
    compose = ["docker-compose", "-p", project]
    try:
        up = _run(*compose, "up", "--exit-code-from", "driver", env=env, timeout=900, check=False)
        (tmp_path / "compose-up.log").write_text(up.stdout + up.stderr)
        assert up.returncode == 0, f"the job failed (exit {up.returncode}); the stack's output ends:\n{(up.stdout + up.stderr)[-5000:]}"
        # The worker has no run dir: the base model and the versions reached it through Ray's object store.
        worker = _run(*compose, "ps", "-q", "rollout-worker", env=env).stdout.split()
        assert worker and json.loads(_run("docker", "inspect", "-f", "{{json .Mounts}}", worker[0]).stdout) == []
        run = json.loads(_run("docker", "run", "--rm", "-v", f"{project}_runs:/runs", f"cwm-rl/env-server:{tag}",
                              "python", "-c", READ_RUN).stdout)
    finally:
        _run(*compose, "down", "-v", "--remove-orphans", env=env, check=False)
    assert _left_behind(project) == {}

    assert run["stop_reason"] == "steps" and run["steps"] >= STEPS, run
    assert run["policy_versions"] >= 1 and run["trajectories_trained"] > 0, run
    assert run["newest_version_generated"] >= 1, "no trajectory was generated with a published version"
    assert [e["step"] for e in run["eval_history"]] == [0, run["steps"]], run["eval_history"]
    assert 0 <= run["eval_accuracy_initial"] <= 1 and 0 <= run["eval_accuracy_final"] <= 1
