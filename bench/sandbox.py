"""Benchmark the sandboxes: what does isolation cost per run?

Runs, in one process:
1. a trivial Python program (`python3 -c pass`) under bubblewrap vs bare (the same runner, no
   bwrap, the host's python3), alternating, median per run: the overhead is the difference;
2. the same program by `docker exec` in a pooled (already started) container vs a cold
   `docker run --rm` with the same limits, alternating, median per run (the pool is refilled
   between runs, so each pooled run finds a ready container, as a steady job would);
3. tests/s for a batch of function tasks (HumanEval-style `check(candidate)` with 5 asserts
   each), one sandboxed run per task, 2 at a time: bare, bwrap and pooled Docker.

    .venv/bin/python bench/sandbox.py [--runs 40] [--docker-runs 10] [--tasks 40]

Goals (issue 6): bwrap adds <= 10 ms per run; pooled Docker exec <= 0.3x the time of docker run.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from envs.sandbox import Limits
from envs.sandbox.bwrap import BwrapSandbox
from envs.sandbox.docker import DockerSandbox
from envs.sandbox.process import run_limited

TRIVIAL = ["python3", "-c", "pass"]
# The bare side runs the host's Debian python3 (the same 3.11 build as in the sandbox root), not a
# shim on PATH (pyenv's shims are shell scripts that add 100+ ms).
HOST_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def bare_run(command: list[str], files: dict[str, str] | None = None) -> float:
    """The baseline: the same runner, the host's /usr/bin/python3, no isolation; files in a temp dir."""
    import tempfile
    from pathlib import Path

    command = [HOST_PYTHON, *command[1:]] if command[0] == "python3" else command
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (files or {}).items():
            (Path(tmp) / name).write_text(text)
        done = run_limited(command, stdin=None, timeout_s=10, output_bytes=1 << 20, cwd=tmp)
    assert done.exit_code == 0, done.stderr
    return time.perf_counter() - started


def timed(sandbox, command: list[str], files: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = sandbox.run(command, files=files)
    assert result.ok, result
    return time.perf_counter() - started


def docker_run_cold(image: str, limits: Limits) -> float:
    """`docker run --rm` with the limits DockerSandbox applies: what a run costs without a pool."""
    started = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", f"/work:size={limits.disk_mb}m",
                    "--tmpfs", f"/tmp:size={limits.disk_mb}m", "--user", "1000:1000", "--workdir", "/work",
                    "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--init", "--memory", f"{limits.memory_mb}m",
                    "--pids-limit", str(limits.processes + 2), "--label", "cwm-rl.sandbox=1", image, *TRIVIAL], check=True,
                   capture_output=True)
    return time.perf_counter() - started


def function_tasks(n: int) -> list[dict[str, str]]:
    """n small function tasks with a correct solution and a 5-assert `check(candidate)`."""
    tasks = []
    for i in range(n):
        k = i % 7 + 2
        solution = f"def scale(xs):\n    return [x * {k} for x in xs]\n"
        tests = "def check(candidate):\n" + "".join(
            f"    assert candidate({list(range(j))}) == {[x * k for x in range(j)]}\n" for j in range(5))
        tasks.append({"main.py": solution + "\n" + tests + "\ncheck(scale)\nprint('passed')\n"})
    return tasks


def tests_per_s(run_one, tasks: list[dict[str, str]]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run_one, tasks))
    return 5 * len(tasks) / (time.perf_counter() - started)


def wait_for_pool(sandbox: DockerSandbox, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while sandbox.num_warm() < sandbox.pool_size and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--docker-runs", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=40)
    args = parser.parse_args()
    if HOST_PYTHON is None:
        raise SystemExit("the bare baseline needs the system python3 (/usr/bin/python3): apt-get install python3")

    bwrap = BwrapSandbox()
    for _ in range(3):  # warm the page cache for both sides
        timed(bwrap, TRIVIAL)
        bare_run(TRIVIAL)
    bare_s, bwrap_s = [], []
    for _ in range(args.runs):
        bare_s.append(bare_run(TRIVIAL))
        bwrap_s.append(timed(bwrap, TRIVIAL))
    bare_ms, bwrap_ms = 1000 * statistics.median(bare_s), 1000 * statistics.median(bwrap_s)
    print(f"trivial python: bare {bare_ms:.1f} ms, bwrap {bwrap_ms:.1f} ms per run", flush=True)

    limits = Limits()
    with DockerSandbox(pool_size=2, run_id="bench") as docker:
        wait_for_pool(docker)
        timed(docker, TRIVIAL)
        docker_run_cold(docker.image, limits)
        pooled_s, cold_s = [], []
        for _ in range(args.docker_runs):
            wait_for_pool(docker)
            pooled_s.append(timed(docker, TRIVIAL))
            cold_s.append(docker_run_cold(docker.image, limits))
        pooled_ms, cold_ms = 1000 * statistics.median(pooled_s), 1000 * statistics.median(cold_s)
        print(f"trivial python: docker exec (pooled) {pooled_ms:.0f} ms, docker run {cold_ms:.0f} ms per run", flush=True)

        tasks = function_tasks(args.tasks)
        bare_tps = tests_per_s(lambda files: bare_run(["python3", "main.py"], files), tasks)
        bwrap_tps = tests_per_s(lambda files: timed(bwrap, ["python3", "main.py"], files), tasks)
        wait_for_pool(docker)
        docker_tps = tests_per_s(lambda files: timed(docker, ["python3", "main.py"], files), tasks)
        print(f"function tasks: {bare_tps:.0f} (bare), {bwrap_tps:.0f} (bwrap), {docker_tps:.0f} (docker) tests/s", flush=True)

    print(json.dumps({
        "bench": "sandbox", "runs": args.runs, "docker_runs": args.docker_runs, "tasks": args.tasks,
        "bare_ms": round(bare_ms, 2), "bwrap_ms": round(bwrap_ms, 2), "bwrap_overhead_ms": round(bwrap_ms - bare_ms, 2),
        "docker_exec_pooled_ms": round(pooled_ms, 1), "docker_run_ms": round(cold_ms, 1),
        "docker_pooled_over_run": round(pooled_ms / cold_ms, 3),
        "bare_tests_per_s": round(bare_tps, 1), "bwrap_tests_per_s": round(bwrap_tps, 1), "docker_tests_per_s": round(docker_tps, 1),
        "bwrap_tests_ratio_vs_bare": round(bwrap_tps / bare_tps, 3),
        "goal_bwrap_overhead_ms": 10.0, "goal_docker_pooled_over_run": 0.3,
    }))


if __name__ == "__main__":
    main()
