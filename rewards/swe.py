"""SWE grading, the pure parts: which files a patch touches, what is dropped from a submission,
each hidden test's outcome, the verdict and the optional similarity shaping.

The container work (apply the patch in a fresh container, run the tests) is `envs.swe.grading`.

Outcomes come from a pytest plugin (`REPORT_PLUGIN`) that reads a nonce from a file and deletes
it before any repository code is imported, and prints its report wrapped in that nonce after the
session: the code under test cannot forge the report by printing (unless it searches its own
process memory for the nonce). With a custom `test_cmd` the outcomes are read from pytest's
`-rA` summary instead, which printed output can imitate.

What a submission may not change: `conftest.py` files and the files the hidden test patch
touches. Those parts of the patch are dropped before grading (a conftest hook could mark every
test passed; editing the hidden tests' files would fight the test patch).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field

PASSING = {"PASSED", "XFAIL"}
_FILE_HEADER = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.M)
_SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) (.+?)(?: - .*)?$", re.M)

# Installed as cwm_rl_report.py on PYTHONPATH in the grading container and loaded with `-p cwm_rl_report`.
REPORT_PLUGIN = '''\
import json, os
_path = os.environ.pop("CWM_RL_NONCE_FILE")
with open(_path) as _f:
    _NONCE = _f.read().strip()
os.unlink(_path)
_OUT = os.fdopen(os.dup(1), "w")
_status = {}

def pytest_runtest_logreport(report):
    if report.failed:
        _status[report.nodeid] = "FAILED" if report.when == "call" else "ERROR"
    elif report.skipped:
        _status.setdefault(report.nodeid, "XFAIL" if hasattr(report, "wasxfail") else "SKIPPED")
    elif report.when == "call":
        _status.setdefault(report.nodeid, "XPASS" if hasattr(report, "wasxfail") else "PASSED")

def pytest_unconfigure(config):
    _OUT.write("\\n" + _NONCE + json.dumps(_status) + _NONCE + "\\n")
    _OUT.flush()
'''


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


def filter_patch(patch: str, protected: set[str]) -> tuple[str, list[str]]:
    """Drop the sections touching `protected` paths or any conftest.py: (kept patch, dropped paths)."""
    kept, dropped = [], []
    for (path, section), (old, new) in zip(split_patch(patch), _FILE_HEADER.findall(patch), strict=True):
        if {old, new} & protected or any(p.rsplit("/", 1)[-1] == "conftest.py" for p in (old, new)):
            dropped.append(path)
        else:
            kept.append(section)
    text = "".join(kept)
    return (text if not text or text.endswith("\n") else text + "\n"), dropped


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
