"""The SWE env's pure parts: the tool syntax, edits, task loading, patch filtering and test verdicts.
(The same paths run against real containers in test_swe_docker.py.)"""

from __future__ import annotations

import json

import pytest

from envs.swe.tasks import SHIPPED_TASKS, SWEInstance, load_instances, load_tasks
from envs.swe.tools import apply_edit, parse_create, parse_edit, parse_tool_call
from envs.swe.grading import PATCHES_GIT_DIR
from rewards.swe import files_of_tests, parse_report, parse_summary, patch_files, patch_similarity, protected, split_patch, verdict


def test_tool_call_parsing():
    call, error = parse_tool_call("I will look.\n<tool: bash>\nls -la\n</tool>")
    assert error is None and (call.name, call.body) == ("bash", "ls -la\n")
    call, _ = parse_tool_call("<tool: create>\nf.txt\nholds </tool> inside\n</tool>")  # the body runs to the last </tool>
    assert call.body == "f.txt\nholds </tool> inside\n"
    assert parse_tool_call("no call here")[1].startswith("no tool call")
    assert "one tool call per turn" in parse_tool_call("<tool: bash>\nls\n</tool><tool: bash>\npwd\n</tool>")[1]
    assert "unknown tool 'python'" in parse_tool_call("<tool: python>\nprint(1)\n</tool>")[1]
    assert "not closed" in parse_tool_call("<tool: bash>\nls")[1]


def test_edit_parsing_and_applying():
    path, blocks = parse_edit("a/b.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n"
                              "<<<<<<< SEARCH\ny = 1\n=======\ny = 3\n>>>>>>> REPLACE\n")
    assert path == "a/b.py" and blocks == [("x = 1", "x = 2"), ("y = 1", "y = 3")]
    assert apply_edit("x = 1\ny = 1\n", blocks) == "x = 2\ny = 3\n"
    with pytest.raises(ValueError, match="appears 0 times"):
        apply_edit("z = 0\n", blocks)
    with pytest.raises(ValueError, match="appears 2 times.*surrounding lines"):
        apply_edit("x = 1\nx = 1\n", [("x = 1", "x = 2")])
    with pytest.raises(ValueError, match="path on its own line"):
        parse_edit("<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE")
    with pytest.raises(ValueError, match="needs a block"):
        parse_edit("f.py\nreplace a with b")
    with pytest.raises(ValueError, match="SEARCH part is empty"):
        parse_edit("f.py\n<<<<<<< SEARCH\n=======\nb\n>>>>>>> REPLACE")
    assert parse_create("new/f.py\nline 1\nline 2\n") == ("new/f.py", "line 1\nline 2\n")


def test_shipped_tasks_load_as_swe_bench_instances():
    instances = load_instances(SHIPPED_TASKS)
    assert len(instances) >= 3
    for instance in instances:
        assert instance.patch and instance.test_patch and instance.FAIL_TO_PASS and len(instance.PASS_TO_PASS) >= 3
        assert not set(patch_files(instance.patch)) & set(patch_files(instance.test_patch))  # the fix does not touch the tests
    task = load_tasks()[0]
    assert SWEInstance.from_task(task).source_dir().is_dir()  # repo_dir resolved against the tasks file


def test_task_file_errors_name_the_line_and_the_fix(tmp_path):
    row = json.loads(SHIPPED_TASKS.read_text().splitlines()[0])
    row["repo_dir"] = str(SHIPPED_TASKS.parent / row["repo_dir"])
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({**row, "FAIL_TO_PASS": json.dumps(row["FAIL_TO_PASS"])}) + "\n")  # SWE-bench's JSON strings
    assert load_instances(good)[0].FAIL_TO_PASS == row["FAIL_TO_PASS"]
    cases = {
        "no_source": ({k: v for k, v in row.items() if k != "repo_dir"}, "neither `image`"),
        "missing_field": ({k: v for k, v in row.items() if k != "test_patch"}, r":1: not a SWE instance \(test_patch"),
        "bad_dir": ({**row, "repo_dir": str(tmp_path / "nowhere")}, "is not a folder"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(data) + "\n")
        with pytest.raises(ValueError, match=message):
            load_instances(path)
    twice = tmp_path / "twice.jsonl"
    twice.write_text((json.dumps(row) + "\n") * 2)
    with pytest.raises(ValueError, match=":2: instance_id .* appears twice"):
        load_instances(twice)


PATCH = """diff --git a/pkg/core.py b/pkg/core.py
--- a/pkg/core.py
+++ b/pkg/core.py
@@ -1 +1 @@
-a = 1
+a = 2
diff --git a/conftest.py b/conftest.py
new file mode 100644
--- /dev/null
+++ b/conftest.py
@@ -0,0 +1 @@
+import pytest
diff --git a/tests/test_core.py b/tests/test_core.py
--- a/tests/test_core.py
+++ b/tests/test_core.py
@@ -1 +1 @@
-assert a == 2
+assert True
"""


def test_what_a_submission_may_not_change():
    changed = ["pkg/core.py", "conftest.py", "pkg/sub/conftest.py", "tests/test_core.py", "pyproject.toml", "setup.cfg",
               "docs/pyproject.toml", "tests/test_other.py"]
    assert protected(changed, {"tests/test_core.py"}) == ["conftest.py", "pkg/sub/conftest.py", "tests/test_core.py",
                                                         "pyproject.toml", "setup.cfg"]
    assert patch_files(PATCH) == ["pkg/core.py", "conftest.py", "tests/test_core.py"]
    assert [path for path, _ in split_patch(PATCH)] == patch_files(PATCH)
    assert files_of_tests(["tests/a.py::t1", "tests/a.py::C::t2", "tests/b.py"]) == ["tests/a.py", "tests/b.py"]
    # A patch that writes inside .git is refused before it is applied (a hook there could run code).
    assert PATCHES_GIT_DIR.search("diff --git a/.git/hooks/pre-commit b/.git/hooks/pre-commit\n")
    assert PATCHES_GIT_DIR.search("--- /dev/null\n+++ b/.git/config\n") and PATCHES_GIT_DIR.search("rename to .git/config\n")
    assert not PATCHES_GIT_DIR.search(PATCH + "+++ b/src/.gitignore\n+ .git/ in a line\n")


def test_test_outcomes_and_verdict():
    nonce = "n0nce"
    log = 'PASSED tests/a.py::t1\nnoise\nn0nce{"tests/a.py::t1": "FAILED", "tests/a.py::t2": "PASSED"}n0nce\nPASSED tests/a.py::t1\n'
    outcomes = parse_report(log, nonce)  # only the nonce-wrapped report counts, not printed lines
    assert outcomes == {"tests/a.py::t1": "FAILED", "tests/a.py::t2": "PASSED"}
    assert parse_report("PASSED tests/a.py::t1\n", nonce) is None
    judged = verdict(outcomes, ["tests/a.py::t1"], ["tests/a.py::t2", "tests/a.py::t3"])
    assert not judged.resolved and judged.failing == ["tests/a.py::t1", "tests/a.py::t3"]
    assert judged.outcomes["tests/a.py::t3"] == "MISSING"
    assert verdict({"x::a": "PASSED", "x::b": "PASSED"}, ["x::a"], ["x::b"]).resolved
    assert not verdict({"x::a": "PASSED", "x::b": "XFAIL"}, ["x::a"], ["x::b"]).resolved  # a patch can make tests xfail
    summary = ("==== short test summary info ====\nPASSED tests/a.py::t[1 2]\nFAILED tests/a.py::t2 - AssertionError: x\n"
               "SKIPPED [1] tests/a.py:9: no\nERROR tests/b.py::t - boom\n")
    assert parse_summary(summary) == {"tests/a.py::t[1 2]": "PASSED", "tests/a.py::t2": "FAILED", "tests/b.py::t": "ERROR"}


def test_patch_similarity_compares_changed_lines():
    assert patch_similarity(PATCH, PATCH) == 1.0
    assert patch_similarity("", "") == 1.0
    other = PATCH.replace("+a = 2", "+a = 3")
    assert 0.5 < patch_similarity(other, PATCH) < 1.0
    assert patch_similarity("diff --git a/x b/x\n+unrelated\n", PATCH) == 0.0
