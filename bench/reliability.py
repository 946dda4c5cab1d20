"""The fault battery's figures in one place: what each fault cost, and a soak of one env server.

Runs the tests marked `fault` (`pytest -m fault`: real processes, real Docker, real vLLM jobs) with
`CWM_RL_FAULT_REPORT` pointing at a scratch file; each test appends one line per fault it caused
(the `fault_report` fixture in tests/conftest.py): episodes `affected`, `retried`, `lost` (goal 0),
`containers_left` (goal 0), `recover_s` (from the fault until the job or pool works again), plus
what else that fault has to say. Then `bench/env_server_soak.py` (256 concurrent sessions on one env
server for `--soak-seconds`): sessions, steps, errors, RSS at start and end, p50/p99 step latency.

    .venv/bin/python bench/reliability.py                      # about 12 minutes on a 2-core machine
    .venv/bin/python bench/reliability.py --soak-seconds 60 -k verifier   # a subset of the faults

It needs what the test suite needs (bash scripts/test.sh sets it up: a Docker daemon, root for the
disk-full test's tmpfs). Counts, not ratios: a fault either loses work or it does not. The last line
printed is one JSON object: `faults` by name, the totals, `tests_passed`, and `soak`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_faults(pytest_args: list[str]) -> tuple[list[dict], bool]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "faults.jsonl"
        env = {**os.environ, "CWM_RL_FAULT_REPORT": str(report)}
        result = subprocess.run([sys.executable, "-m", "pytest", "-m", "fault", "-q", "-p", "no:cacheprovider", *pytest_args],
                                cwd=REPO, env=env)
        lines = report.read_text().splitlines() if report.exists() else []
    return [json.loads(line) for line in lines], result.returncode == 0


def run_soak(seconds: float) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "env_server_soak.py"), "--seconds", str(seconds)],
                            cwd=REPO, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr[-4000:])
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"error": f"the soak exited with code {result.returncode}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-seconds", type=float, default=180.0, help="how long the 256-session soak runs (0: skip it)")
    parser.add_argument("-k", default=None, help="only the fault tests whose names match (pytest -k)")
    args = parser.parse_args()

    faults, passed = run_faults(["-k", args.k] if args.k else [])
    soak = run_soak(args.soak_seconds) if args.soak_seconds > 0 else None

    print(f"\n{'fault':34} {'affected':>8} {'retried':>8} {'lost':>5} {'left':>5} {'recover_s':>9}")
    for f in faults:
        print(f"{f['fault']:34} {f.get('affected', '-')!s:>8} {f.get('retried', '-')!s:>8} {f.get('lost', '-')!s:>5} "
              f"{f.get('containers_left', '-')!s:>5} {f.get('recover_s', '-')!s:>9}")
    figures = {
        "bench": "reliability",
        "tests_passed": passed,
        "faults": {f["fault"]: {k: v for k, v in f.items() if k not in ("fault", "test")} for f in faults},
        "lost_total": sum(f.get("lost", 0) or 0 for f in faults),
        "containers_left_total": sum(f.get("containers_left", 0) or 0 for f in faults),
        "soak": soak,
        "goal_lost": 0,
        "goal_containers_left": 0,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
