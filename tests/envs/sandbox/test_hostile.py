"""Hostile programs under both backends: the host is untouched, the result names the limit that
stopped the program, and the next run works. Real bubblewrap, real Docker, the real Debian root."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from envs.sandbox import Limits

pytestmark = pytest.mark.slow


def _next_run_works(sandbox) -> None:
    result = sandbox.run(["python3", "-c", "print(6 * 7)"])
    assert result.ok and result.stdout == "42\n", result


def _processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (sandboxed processes are host processes too)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def _wait_gone(marker: str, within_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_network_connect_and_dns_fail(sandbox, host_server):
    port, hits = host_server
    program = (
        "import socket, urllib.request\n"
        "for target in [('1.1.1.1', 80), ('127.0.0.1', %d)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=3); print('CONNECTED', target)\n"
        "    except OSError as e: print('refused', target, e)\n"
        "try:\n"
        "    urllib.request.urlopen('http://127.0.0.1:%d/', timeout=3); print('FETCHED')\n"
        "except Exception as e: print('no fetch', e)\n"
        "socket.getaddrinfo('example.com', 80)\n" % (port, port)
    )
    result = sandbox.run(["python3", "-c", program])
    assert "CONNECTED" not in result.stdout and "FETCHED" not in result.stdout, result
    assert sum(line.startswith("refused (") for line in result.stdout.splitlines()) == 2, result
    assert result.exit_code != 0 and "network" in result.limits_hit, result  # the DNS lookup raised
    assert hits == [], "a sandboxed program reached a server on the host"
    _next_run_works(sandbox)


def test_host_files_are_out_of_reach(sandbox, tmp_path):
    secret = uuid.uuid4().hex
    host_file = tmp_path / "secret.txt"
    host_file.write_text(secret)
    project_file = Path(__file__).resolve()
    shadow = Path("/etc/shadow").read_bytes()
    targets = [str(host_file), str(project_file), "/etc/shadow", "/root/.bash_history", str(Path.home() / ".ssh")]
    result = sandbox.run(["sh", "-c", "; ".join(f"cat {t}" for t in targets) + "; ls /home /root; true"])
    assert secret not in result.stdout + result.stderr
    assert "Hostile programs under both backends" not in result.stdout  # this very file's docstring
    assert hashlib.sha256(result.stdout.encode()).digest() != hashlib.sha256(shadow).digest()
    for line in shadow.decode(errors="replace").splitlines():
        if ":$" in line:  # a real password hash on the host must never show up
            assert line not in result.stdout
    # The root is the Debian tree, not the host's: this repository is not in it.
    result = sandbox.run(["test", "-e", str(project_file)])
    assert result.exit_code == 1, result
    _next_run_works(sandbox)


def test_writes_outside_the_work_dir_fail(sandbox, tmp_path):
    host_target = tmp_path / "planted"
    targets = [str(host_target), "/etc/planted", "/usr/bin/planted", "/planted"]
    script = "".join(f"(echo x > {t}) 2>/dev/null && echo wrote {t}; " for t in targets)
    result = sandbox.run(["sh", "-c", script + "echo ok > /work/mine && cat /work/mine"])
    assert "wrote" not in result.stdout, result
    assert not any(Path(t).exists() for t in targets)
    assert result.stdout == "ok\n", result  # the work dir is writable
    _next_run_works(sandbox)


def test_fork_bomb_meets_the_process_limit(sandbox):
    marker = f"forkbomb-{uuid.uuid4().hex[:8]}"
    program = f"# {marker}\nimport os\nwhile True:\n    os.fork()\n"
    result = sandbox.run(["python3", "-c", program], limits=Limits(timeout_s=10, processes=32))
    assert "processes" in result.limits_hit or "timeout" in result.limits_hit, result
    assert _wait_gone(marker) == [], "fork bomb processes outlived the run"
    _next_run_works(sandbox)


def test_memory_bomb_meets_the_memory_limit(sandbox):
    result = sandbox.run(["python3", "-c", "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))"],
                         limits=Limits(memory_mb=256, timeout_s=20))
    assert result.exit_code != 0 and "memory" in result.limits_hit, result
    _next_run_works(sandbox)


def test_cpu_spin_meets_the_cpu_limit(sandbox):
    result = sandbox.run(["python3", "-c", "while True: pass"], limits=Limits(cpu_s=1, timeout_s=15))
    assert "cpu" in result.limits_hit and "timeout" not in result.limits_hit, result  # the CPU limit, before the deadline
    _next_run_works(sandbox)


def test_sleeping_forever_is_killed_at_the_deadline(sandbox):
    marker = f"sleeper-{uuid.uuid4().hex[:8]}"
    result = sandbox.run(["sh", "-c", f"sleep 1000 # {marker}"], limits=Limits(timeout_s=1.5))
    assert result.exit_code is None and result.limits_hit == ["timeout"], result
    assert 1.4 <= result.wall_s < 15, result.wall_s  # docker: wall_s may include starting a cold container
    assert _wait_gone(marker) == [], "the sleeping process outlived its deadline"
    _next_run_works(sandbox)


def test_gigabytes_of_output_are_cut_off(sandbox):
    started = time.monotonic()
    result = sandbox.run(["python3", "-c", "import sys\nwhile True: sys.stdout.write('y' * 65536)"],
                         limits=Limits(output_bytes=1 << 20, timeout_s=30))
    assert result.limits_hit == ["output"] and result.stdout_truncated, result.limits_hit
    assert len(result.stdout) == 1 << 20
    assert time.monotonic() - started < 15  # killed at the cap, not at the deadline
    _next_run_works(sandbox)


def test_a_full_disk_is_the_sandboxs_own(sandbox):
    result = sandbox.run(["python3", "-c", "for i in range(1000):\n    open(f'f{i}', 'wb').write(b'z' * (1 << 20))"],
                         limits=Limits(disk_mb=32, file_size_mb=16))
    assert result.exit_code != 0 and "disk" in result.limits_hit, result
    result = sandbox.run(["python3", "-c", "open('big', 'wb').write(b'z' * (40 << 20))"],
                         limits=Limits(disk_mb=128, file_size_mb=16))
    assert "file_size" in result.limits_hit, result
    _next_run_works(sandbox)


def test_killing_the_parent_and_everything_leaves_the_host_alone(sandbox):
    result = sandbox.run(["sh", "-c", "kill -9 $PPID; kill -9 -1; kill -9 1; echo survived-its-own-attack"])
    assert result.exit_code is not None  # it ended by itself, the runner saw it end
    os.kill(os.getpid(), 0)  # we are alive (the test process would not be here otherwise)
    _next_run_works(sandbox)


def test_processes_left_running_die_with_the_run(sandbox):
    marker = f"orphan-{uuid.uuid4().hex[:8]}"
    sleeper = f"python3 -c 'import time; time.sleep(1000)' {marker}"
    result = sandbox.run(["sh", "-c", f"(setsid {sleeper} &); nohup {sleeper} >/dev/null 2>&1 & {sleeper} & echo started"],
                         limits=Limits(timeout_s=5))
    assert result.exit_code == 0 and result.stdout == "started\n", result
    assert _wait_gone(marker) == [], "processes the program started are still running on the host"
    _next_run_works(sandbox)


def test_files_stdin_and_exit_codes(sandbox):
    files = {"main.py": "import sys, helper\nprint(helper.double(sys.stdin.read().strip()))\nsys.exit(3)\n",
             "helper.py": "def double(s):\n    return s * 2\n", "data/input.txt": "kept"}
    result = sandbox.run(["python3", "main.py"], files=files, stdin="ab\n")
    assert (result.exit_code, result.stdout, result.limits_hit) == (3, "abab\n", []), result
    result = sandbox.run("cat data/input.txt; echo; id -u; pwd; env | sort | cut -d= -f1 | tr '\\n' ' '", files=files)
    lines = result.stdout.splitlines()
    assert lines[0] == "kept" and lines[1] != "0" and lines[2] == "/work", result
    assert "SECRET" not in result.stdout and "CWM" not in result.stdout  # nothing of the host's environment
    result = sandbox.run(["sh", "-c", "kill -TERM $$"])
    assert result.exit_code == 128 + 15, result


def test_runs_do_not_see_each_other(sandbox):
    first = sandbox.run(["sh", "-c", "echo one > /work/shared; echo one > /tmp/shared; echo written"])
    assert first.stdout == "written\n"
    second = sandbox.run(["sh", "-c", "cat /work/shared /tmp/shared 2>&1; ps -eo comm"])
    assert "one" not in second.stdout, second
    seen = second.stdout.split("COMMAND")[-1].split()
    assert len(seen) <= 6 and not {"pytest", "python", "dockerd", "systemd"} & set(seen), seen  # its own few only


def test_bad_file_names_are_refused(sandbox):
    for name in ("/etc/passwd", "../escape.py", ""):
        with pytest.raises(ValueError, match="relative paths inside the work dir"):
            sandbox.run(["true"], files={name: "x"})


def test_concurrent_runs(sandbox):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: sandbox.run(["python3", "-c", f"print({i} * 2)"]), range(8)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(8)]


def test_bwrap_runs_die_with_the_process_that_started_them(bwrap_sandbox):
    import signal
    import subprocess
    import sys

    marker = f"owner-killed-{uuid.uuid4().hex[:8]}"
    owner = subprocess.Popen([sys.executable, "-c", (
        "from envs.sandbox import make_sandbox\n"
        f"print(make_sandbox('bwrap').run(['sh', '-c', 'sleep 1000 # {marker}'], "
        "limits=__import__('envs.sandbox').sandbox.Limits(timeout_s=600)))\n")])
    deadline = time.monotonic() + 30
    while not _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker), "the sandboxed sleep never started"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert _wait_gone(marker) == [], "a sandboxed process outlived the process that started it (kill -9)"
