"""A short soak of the env server: bench/env_server_soak.py itself, 256 concurrent sessions for
30 s after a warm-up of 1,024 episodes (about a minute in all).

256 players play full Echo and Math episodes back to back on one server subprocess that takes
exactly 256 sessions (a session it failed to free would turn into a 429). Every answer must be the
expected one, no session may be left, the server must log no traceback, and its RSS must stay
flat once warm. The figures are reported through `fault_report`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
# RSS growth allowed from the end of warm-up to the end: here it grew by 1.4-2.7 MB (then stays
# flat for minutes: bench/README.md), while a leak of 5 KB per episode (say, a session never freed)
# would add 8-19 MB over the 1,700-3,800 episodes the 30 s take on a busy or an idle 2-core machine.
MAX_RSS_GROWTH_MB = 8.0


@pytest.mark.slow
@pytest.mark.fault  # bench/reliability.py collects its figures
def test_256_sessions_soak_without_errors_or_memory_growth(fault_report):
    done = subprocess.run([sys.executable, "bench/env_server_soak.py", "--seconds", "30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=250)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    fault_report("env_server_soak_256", **{k: figures[k] for k in (
        "sessions", "steps", "errors", "rss_start_mb", "rss_end_mb", "p50_ms", "p99_ms", "episodes", "rss_max_mb")})
    assert figures["sessions"] == 256
    assert figures["errors"] == 0, done.stderr[-3000:]  # the bench prints its first errors on stderr
    assert figures["episodes"] > 0 and figures["steps"] >= figures["episodes"]
    assert figures["rss_end_mb"] <= figures["rss_start_mb"] + MAX_RSS_GROWTH_MB, figures
