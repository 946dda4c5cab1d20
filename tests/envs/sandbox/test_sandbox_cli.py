"""`cwm-rl sandbox exec|reap` as a user runs them, and Docker containers left by a killed owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "cwm_rl.cli"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_exec_prints_the_result_as_json(sandbox_root, tmp_path):
    (tmp_path / "main.py").write_text("import sys\nprint(sys.stdin.read().upper())\n")
    (tmp_path / "in.txt").write_text("hello")
    r = cli("sandbox", "exec", "--file", f"main.py={tmp_path / 'main.py'}", "--stdin", str(tmp_path / "in.txt"),
            "--", "python3", "main.py")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert (result["exit_code"], result["stdout"], result["limits_hit"], result["backend"]) == (0, "HELLO\n", [], "bwrap")

    r = cli("sandbox", "exec", "--timeout", "1", "--", "sh", "-c", "echo before; sleep 30")
    result = json.loads(r.stdout)
    assert result["exit_code"] is None and result["limits_hit"] == ["timeout"] and result["stdout"] == "before\n"
    assert result["wall_s"] < 15  # killed at --timeout 1, not after the 30 s sleep


def test_exec_refuses_bad_input_with_a_clear_message(sandbox_root, tmp_path):
    r = cli("sandbox", "exec", "--file", "main.py", "--", "true")
    assert r.returncode == 2 and "is not NAME=PATH" in r.stderr
    r = cli("sandbox", "exec", "--file", f"main.py={tmp_path / 'nope.py'}", "--", "true")
    assert r.returncode == 2 and "is not a file" in r.stderr
    r = cli("sandbox", "exec", "--backend", "vm", "--", "true")
    assert r.returncode == 2 and "unknown sandbox backend 'vm'" in r.stderr


def test_exec_under_docker(sandbox_root, docker_ready):
    r = cli("sandbox", "exec", "--backend", "docker", "--", "sh", "-c", "id -u; cat /etc/debian_version >/dev/null && echo debian")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["stdout"] == "1000\ndebian\n" and result["backend"] == "docker", result


def _sandbox_containers(owner_pid: int) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", "label=cwm-rl.sandbox",
                          "--filter", f"label=cwm-rl.owner={os.uname().nodename}:{owner_pid}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_containers_of_a_killed_owner_are_reaped(sandbox_root, docker_ready):
    owner = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom envs.sandbox import make_sandbox\n"
        "s = make_sandbox('docker', pool_size=2)\n"
        "while s.num_warm() < 2: time.sleep(0.05)\n"
        "print('ready', flush=True)\ntime.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        assert len(_sandbox_containers(owner.pid)) == 2
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    time.sleep(0.5)
    assert len(_sandbox_containers(owner.pid)) == 2, "kill -9 gives the owner no chance to clean up"
    r = cli("sandbox", "reap")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["removed"] >= 2
    assert _sandbox_containers(owner.pid) == []


def test_a_closed_docker_sandbox_leaves_no_container(sandbox_root, docker_ready):
    from envs.sandbox import make_sandbox

    with make_sandbox("docker", pool_size=2) as sandbox:
        assert sandbox.run(["true"]).ok
        deadline = time.monotonic() + 30
        # Two warm containers, and the used one's removal (a background thread) finished: it leaves `container_ids`
        # only after Docker removed it, so waiting on the warm count alone raced with it on a loaded machine.
        while (sandbox.num_warm() < 2 or len(sandbox.container_ids()) > 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        made = {c[:12] for c in sandbox.container_ids()}
        assert len(made) >= 2 and made <= set(_sandbox_containers(os.getpid()))
    # Other sandboxes of this test process may hold containers too: this one's must be gone.
    assert made.isdisjoint(_sandbox_containers(os.getpid()))


def test_missing_root_gives_a_clear_error(tmp_path, monkeypatch):
    from envs.sandbox import SandboxError, make_sandbox

    monkeypatch.setenv("CWM_RL_SANDBOX_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(SandboxError, match="is not a Debian root"):
        make_sandbox("bwrap")
