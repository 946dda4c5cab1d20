"""The `cwm-rl` command as a user runs it: real subprocesses, a real served env, real stdin."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from envs.server.client import health
from envs.server.local import free_port

CLI = [str(Path(sys.executable).with_name("cwm-rl"))]


def run(*args: str, stdin: str | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # wide tables: no wrapped lines to match across
    return subprocess.run(CLI + list(args), input=stdin, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_env_list_shows_the_builtin_envs():
    r = run("env", "list")
    assert r.returncode == 0, r.stderr
    assert "cwm_rl/Math-v0" in r.stdout and "cwm_rl/Echo-v0" in r.stdout


def test_env_check_math_in_process_and_served():
    r = run("env", "check", "cwm_rl/Math-v0", "--served", "--seeds", "0,1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "served: reward-hack probes (seed 1)" in r.stdout
    assert "all 12 checks passed" in r.stdout


HACKABLE_ENV = '''
import gymnasium as gym
from cwm_rl.types import Task
from envs import SingleTurnEnv

class LenientEnv(SingleTurnEnv):
    """Gives credit whenever the answer appears anywhere: hackable."""
    def sample_task(self, rng):
        return Task(id="t", prompt="What is 2 + 2?", answer="4")
    def score(self, task, action):
        return (1.0 if task.answer in action else -1.0), {}
    def reference_action(self):
        return "4"

gym.register(id="lenient/Lenient-v0", entry_point=LenientEnv)
'''


def test_env_check_catches_a_hackable_env(tmp_path):
    (tmp_path / "lenient_envs.py").write_text(HACKABLE_ENV)
    r = run("env", "check", "lenient/Lenient-v0", "--import", "lenient_envs", "--seeds", "0", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout
    assert "'huge padding, then the reference' scored 1" in r.stdout
    assert "'reference repeated' scored 1" in r.stdout
    assert "check(s) failed" in r.stdout


def test_bad_input_gets_one_clear_line(tmp_path):
    r = run("env", "check", "cwm_rl/Math-v0", "--kwarg", "difficulty")
    assert r.returncode == 2 and "is not KEY=VALUE" in r.stderr
    r = run("env", "check", "cwm_rl/Nope-v0")
    assert r.returncode == 2 and "unknown env id 'cwm_rl/Nope-v0'" in r.stderr
    r = run("env", "list", "--import", "no_such_module_here", cwd=tmp_path)
    assert r.returncode == 2 and "cannot import env module 'no_such_module_here'" in r.stderr
    r = run("env", "serve", "--host", "0.0.0.0")
    assert r.returncode == 2 and "set a bearer token" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def served() -> tuple[str, str]:
    """`cwm-rl env serve` in a subprocess with a token; yields (url, token)."""
    port, token = free_port(), "test-token-123"
    proc = subprocess.Popen(CLI + ["env", "serve", "--port", str(port), "--token", token],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not health(url, timeout_s=1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"env serve did not come up: {proc.stdout.read()}")
        time.sleep(0.1)
    yield url, token
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=15) in (0, 130)
    assert "Traceback" not in proc.stdout.read()


def test_env_serve_subprocess_with_token(served):
    url, token = served
    assert httpx.get(url + "/v1/envs").status_code == 401
    r = httpx.post(url + "/v1/sessions", json={"env_id": "cwm_rl/Math-v0", "seed": 0},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["observation"][-1]["role"] == "user"


def test_env_play_in_process():
    answers = "apple\n.\nwrong\n.\nstone\n.\n"
    r = run("env", "play", "cwm_rl/Echo-v0", "--seed", "0", "--kwarg", "num_rounds=3", stdin=answers)
    assert r.returncode == 0, r.stderr
    assert "Repeat exactly:" in r.stdout
    assert r.stdout.count("reward ") == 3
    assert "episode over: return" in r.stdout


def test_env_play_against_a_server(served):
    url, token = served
    r = run("env", "play", "cwm_rl/Math-v0", "--seed", "0", "--url", url, "--token", token,
            stdin="I think it is \\boxed{12345}\n.\n")
    assert r.returncode == 0, r.stderr
    assert "reward -1" in r.stdout and '"verdict": "wrong"' in r.stdout
    assert "episode over: return -1" in r.stdout


def test_env_play_quit_stops_early():
    r = run("env", "play", "cwm_rl/Echo-v0", "--seed", "0", stdin="/quit\n")
    assert r.returncode == 0 and "stopped." in r.stdout


@pytest.mark.docker
def test_doctor_reports_what_is_installed():
    r = run("doctor", "--json")
    assert r.returncode == 0, r.stderr
    findings = {f["name"]: f for f in json.loads(r.stdout)}
    assert {"python", "torch", "vllm", "docker", "bubblewrap", "mmdebstrap", "ray"} <= set(findings)
    for f in findings.values():
        assert f["status"] in ("ok", "missing", "broken")
        assert f["status"] == "ok" or f["fix"], f"{f['name']} is {f['status']} but doctor gives no fix"
    assert findings["gymnasium"]["status"] == "ok"
    # scripts/test.sh installs bubblewrap and mmdebstrap and starts a Docker daemon.
    for name in ("docker", "bubblewrap", "mmdebstrap"):
        assert findings[name]["status"] == "ok", (
            f"{name}: {findings[name]['detail']}. Run the tests through `bash scripts/test.sh`, which installs "
            f"and starts it, or: {findings[name]['fix']}"
        )
    strict = run("doctor", "--strict")
    assert strict.returncode == (0 if all(f["status"] == "ok" for f in findings.values()) else 1)


def test_the_renamed_rollout_command_names_its_new_name():
    r = run("rollout", "--model", "m", "--env", "cwm_rl/Math-v0", "-n", "1", "--out", "x.jsonl")
    assert r.returncode == 2 and "`cwm-rl rollout` is now `cwm-rl model play`" in r.stderr, r.stdout + r.stderr
    listing = run("--help").stdout
    assert re.search(r"^\W*rollouts\s", listing, re.M) and not re.search(r"^\W*rollout\s", listing, re.M)  # hidden


def test_a_bad_job_config_is_refused_before_anything_heavy_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  max_model_len: 512\ntrainer:\n  optim: {lr: -1}\n")
    r = run("train", str(bad))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rollout.max_model_len: Extra inputs are not permitted (it moved: use rollout.engine.max_model_len)" in r.stderr
    assert "trainer.optim.lr: Input should be greater than 0" in r.stderr
    assert not (tmp_path / "runs").exists()
