"""SWE grading, the pure parts: which paths a submission may not change, each hidden test's
outcome, the verdict and the optional similarity shaping.

The container work (apply the patch in a fresh container, run the tests) is `envs.swe.grading`.

Outcomes come from a pytest plugin (`REPORT_PLUGIN`), installed under a random module name, that
reads a nonce from a file and deletes it before any repository code is imported, keeps its state
in closures, and prints its report wrapped in that nonce after the session: the code under test
cannot forge the report by printing, nor shadow the plugin with a file of its own (unless it
searches its own process for the nonce). pytest itself is imported before the repository's
folder goes on sys.path, so a `pytest.py` in the repository cannot stand in for it. With a
custom `test_cmd` the outcomes are read from pytest's `-rA` summary instead, which printed
output can imitate. Only PASSED counts as passing (a patched library could call `pytest.xfail`).

What a submission may not change (`protected`): `conftest.py` files anywhere, the repository's
pytest configuration files at its root, and the files the hidden test patch touches; changes
to them are undone after the patch is applied, whatever form the patch took.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field

PASSING = {"PASSED"}
CONFIG_FILES = {"pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml"}  # at the repository root
_FILE_HEADER = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.M)
_SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) (.+?)(?: - .*)?$", re.M)

# Installed as cwm_rl_report_<random>.py on PYTHONPATH in the grading container, loaded with `-p`.
REPORT_PLUGIN = '''\
def _install():
    import json, os
    path = os.environ.pop("CWM_RL_NONCE_FILE")
    with open(path) as f:
        nonce = f.read().strip()
    os.unlink(path)
    out = os.fdopen(os.dup(1), "w")
    status = {}

    def logreport(report):
        if report.failed:
            status[report.nodeid] = "FAILED" if report.when == "call" else "ERROR"
        elif report.skipped:
            status.setdefault(report.nodeid, "XFAIL" if hasattr(report, "wasxfail") else "SKIPPED")
        elif report.when == "call":
            status.setdefault(report.nodeid, "XPASS" if hasattr(report, "wasxfail") else "PASSED")

    def unconfigure(config):
        out.write("\\n" + nonce + json.dumps(status) + nonce + "\\n")
        out.flush()

    return logreport, unconfigure


pytest_runtest_logreport, pytest_unconfigure = _install()
del _install
'''
# Runs pytest with the repository's folder put on sys.path only after pytest itself is imported.
PYTEST = "import sys; cwd = sys.path.pop(0); import pytest; sys.path.insert(0, cwd); sys.exit(pytest.main(sys.argv[1:]))"


def patch_files(patch: str) -> list[str]:
    """Paths a unified git diff touches (old and new names), in order."""
    files: list[str] = []
    for old, new in _FILE_HEADER.findall(patch):
        for path in (old, new):
            if path not in files:
                files.append(path)
    return files


def split_patch(patch: str) -> list[tuple[str, str]]:
    """The patch cut into (path, section) per `diff --git` header; text before the first header is dropped."""
    starts = [m for m in _FILE_HEADER.finditer(patch)]
    return [(m.group(2), patch[m.start(): starts[i + 1].start() if i + 1 < len(starts) else len(patch)])
            for i, m in enumerate(starts)]


def protected(paths: list[str], test_patch_files: set[str]) -> list[str]:
    """Which of the changed `paths` a submission may not change (see the module docstring)."""
    return [p for p in paths if p in test_patch_files or p.rsplit("/", 1)[-1] == "conftest.py" or p in CONFIG_FILES]


def files_of_tests(test_ids: list[str]) -> list[str]:
    """The files holding the given pytest node ids, sorted."""
    return sorted({test_id.split("::", 1)[0] for test_id in test_ids})


def parse_report(output: str, nonce: str) -> dict[str, str] | None:
    """The plugin's {node id: outcome}, or None when no report carrying the nonce was printed."""
    parts = output.split(nonce)
    if len(parts) < 3:
        return None
    try:
        report = json.loads(parts[1])
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None


def parse_summary(log: str) -> dict[str, str]:
    """{node id: outcome} from pytest's `-rA` short summary (for a custom test command)."""
    return {test_id.strip(): outcome for outcome, test_id in _SUMMARY.findall(log) if not test_id.startswith("[")}


@dataclass
class Verdict:
    resolved: bool
    failing: list[str] = field(default_factory=list)  # FAIL_TO_PASS / PASS_TO_PASS tests that did not pass
    outcomes: dict[str, str] = field(default_factory=dict)


def verdict(outcomes: dict[str, str], fail_to_pass: list[str], pass_to_pass: list[str]) -> Verdict:
    """Resolved when every FAIL_TO_PASS and PASS_TO_PASS test passed; a test with no outcome failed."""
    wanted = list(dict.fromkeys(fail_to_pass + pass_to_pass))
    failing = [t for t in wanted if outcomes.get(t) not in PASSING]
    return Verdict(resolved=not failing, failing=failing, outcomes={t: outcomes.get(t, "MISSING") for t in wanted})


def changed_lines(patch: str) -> list[str]:
    return [line for line in patch.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def patch_similarity(patch: str, gold: str) -> float:
    """difflib ratio of the changed lines of two patches (0..1): optional reward shaping."""
    a, b = changed_lines(patch), changed_lines(gold)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio()
