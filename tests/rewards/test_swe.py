"""rewards/swe.py, the pure half of SWE grading: reading patches (`patch_files`, `split_patch`,
`changed_lines`), what a submission may not change (`protected`), reading test outcomes
(`parse_report` with a wrong or forged nonce, `parse_summary`), the verdict, and the similarity
shaping's bounds. tests/envs/swe/test_swe_parts.py has the common cases; these are the edges."""

from __future__ import annotations

import pytest

from rewards.swe import (changed_lines, files_of_tests, parse_report, parse_summary, patch_files, patch_similarity,
                         protected, split_patch, verdict)

RENAME = """diff --git a/pkg/old.py b/pkg/new.py
similarity index 90%
rename from pkg/old.py
rename to pkg/new.py
--- a/pkg/old.py
+++ b/pkg/new.py
@@ -1 +1 @@
-x = 1
+x = 2
diff --git a/pkg/util.py b/pkg/util.py
--- a/pkg/util.py
+++ b/pkg/util.py
@@ -1,2 +1,3 @@
 keep = 0
-y = 1
+y = 3
+diff --git a/fake.py b/fake.py
\\ No newline at end of file
"""


def test_patch_files_names_old_and_new_paths_once_in_order():
    assert patch_files(RENAME) == ["pkg/old.py", "pkg/new.py", "pkg/util.py"]  # not fake.py: that is an added line
    assert patch_files(RENAME + RENAME) == patch_files(RENAME)
    assert patch_files("--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n") == []  # not a git diff


def test_split_patch_cuts_at_each_header_and_drops_the_preamble():
    sections = split_patch("From: someone\nSubject: fix\n\n" + RENAME)
    assert [path for path, _ in sections] == ["pkg/new.py", "pkg/util.py"]  # the new name of a rename
    assert "".join(section for _, section in sections) == RENAME
    assert "util" not in sections[0][1] and sections[1][1].startswith("diff --git a/pkg/util.py")
    assert split_patch("no headers here\n") == []


def test_conftest_anywhere_root_config_and_hidden_tests_are_protected():
    hidden = {"tests/test_core.py"}
    changed = ["conftest.py", "a/b/c/conftest.py", "pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml",
               "tests/test_core.py"]
    assert protected(changed, hidden) == changed
    assert protected(list(reversed(changed)), hidden) == list(reversed(changed))  # in the order given


@pytest.mark.parametrize("path", ["myconftest.py", "conftest.py.orig", "tests/conftest_utils.py", "src/setup.cfg",
                                  "pkg/tox.ini", "setup.py", "tests/test_core_extra.py", "test_core.py"])
def test_near_misses_are_not_protected(path):
    assert protected([path], {"tests/test_core.py"}) == []


def test_files_of_tests_strips_node_ids():
    ids = ["b.py::t", "a/x.py::C::t[p::q]", "a/x.py::u", "b.py"]
    assert files_of_tests(ids) == ["a/x.py", "b.py"]
    assert files_of_tests([]) == []


def test_a_report_without_the_right_nonce_is_no_report():
    nonce = "5eb63bbbe01eeed093cb22bb8f5acdc3"
    forged = '\nguess{"t::a": "PASSED"}guess\n'
    assert parse_report(forged, nonce) is None
    assert parse_report(f'{nonce}{{"t::a": "PASSED"}}', nonce) is None  # cut off before the closing nonce
    assert parse_report(f"{nonce}not json{nonce}", nonce) is None
    assert parse_report(f'{nonce}["t::a", "PASSED"]{nonce}', nonce) is None  # a list is not a report
    real = f'{forged}PASSED t::a\n{nonce}{{"t::a": "FAILED"}}{nonce}\n'
    assert parse_report(real, nonce) == {"t::a": "FAILED"}


def test_parse_summary_reads_only_summary_lines_and_the_last_word_wins():
    log = ("tests/a.py::t1 PASSED [ 50%]\n"  # -v progress lines are not the summary
           "    PASSED tests/a.py::t0\n"
           "PASSED tests/a.py::t1\n"  # printed by a test, before the real summary
           "==== short test summary info ====\n"
           "FAILED tests/a.py::t1 - assert 1 - 2 == 0\n"
           "XFAIL tests/a.py::t2 - not yet\n"
           "XPASS tests/a.py::t3\n"
           "SKIPPED [2] tests/a.py:10: no network\n")
    assert parse_summary(log) == {"tests/a.py::t1": "FAILED", "tests/a.py::t2": "XFAIL", "tests/a.py::t3": "XPASS"}
    assert parse_summary("") == {}


@pytest.mark.parametrize("outcome", ["FAILED", "ERROR", "XFAIL", "XPASS", "SKIPPED", "passed", "MISSING"])
def test_only_passed_counts(outcome):
    for fail_to_pass, pass_to_pass in ((["t::a"], ["t::b"]), (["t::b"], ["t::a"])):
        judged = verdict({"t::a": outcome, "t::b": "PASSED"}, fail_to_pass, pass_to_pass)
        assert not judged.resolved and judged.failing == ["t::a"]


def test_verdict_lists_each_wanted_test_once_and_ignores_the_rest():
    judged = verdict({"t::x": "FAILED"}, ["t::a", "t::b"], ["t::b", "t::c"])
    assert judged.failing == ["t::a", "t::b", "t::c"]
    assert judged.outcomes == {"t::a": "MISSING", "t::b": "MISSING", "t::c": "MISSING"}
    judged = verdict({"t::a": "PASSED", "t::other": "FAILED"}, ["t::a"], [])
    assert judged.resolved and judged.failing == [] and judged.outcomes == {"t::a": "PASSED"}


def test_changed_lines_are_the_added_and_removed_lines_only():
    assert changed_lines(RENAME) == ["-x = 1", "+x = 2", "-y = 1", "+y = 3", "+diff --git a/fake.py b/fake.py"]
    assert changed_lines("") == []


def test_patch_similarity_is_a_ratio_of_changed_lines():
    one = "-x = 1\n+x = 2\n"
    assert patch_similarity(one, "-x = 1\n+x = 3\n") == pytest.approx(2 * 1 / 4)
    assert patch_similarity(RENAME + RENAME, RENAME) == pytest.approx(2 * 5 / 15)  # repeating the fix costs
    moved = RENAME.replace("pkg/", "elsewhere/").replace("@@ -1,2 +1,3 @@", "@@ -40,2 +40,3 @@")
    assert patch_similarity(moved, RENAME) == 1.0  # headers and context are not compared
    assert patch_similarity("", RENAME) == patch_similarity(RENAME, "") == 0.0
    rename_only = "diff --git a/a.py b/b.py\nsimilarity index 100%\nrename from a.py\nrename to b.py\n"
    assert patch_similarity(rename_only, "") == patch_similarity("", "") == 1.0  # no changed lines on either side


@pytest.mark.parametrize("patch", ["", "-a\n", "+b\n-a\n", RENAME, RENAME.replace("+", "-")])
@pytest.mark.parametrize("gold", ["", "+b\n", RENAME])
def test_patch_similarity_stays_in_bounds(patch, gold):
    assert 0.0 <= patch_similarity(patch, gold) <= 1.0
