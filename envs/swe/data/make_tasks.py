"""Regenerate tasks.jsonl from repos/, gold/, hidden/ and tasks/, then verify it.

Usage (from the repository root)::

    python envs/swe/data/make_tasks.py            # write tasks.jsonl and verify
    python envs/swe/data/make_tasks.py --check    # verify only; fail if tasks.jsonl is stale

Needs only the standard library, the host ``git`` and pytest for the running
interpreter. See README.md in this folder.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "tasks.jsonl"
CREATED_AT = "2025-01-01T00:00:00Z"
GIT_DATE = "2025-01-01T00:00:00+00:00"
IGNORED = shutil.ignore_patterns("__pycache__", ".pytest_cache")


def git_env(home):
    """An environment in which git output depends on nothing but the tree."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GIT_") and key not in ("XDG_CONFIG_HOME", "HOME")
    }
    env.update(
        GIT_AUTHOR_NAME="cwm-rl",
        GIT_AUTHOR_EMAIL="swe@cwm-rl.invalid",
        GIT_COMMITTER_NAME="cwm-rl",
        GIT_COMMITTER_EMAIL="swe@cwm-rl.invalid",
        GIT_AUTHOR_DATE=GIT_DATE,
        GIT_COMMITTER_DATE=GIT_DATE,
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(home),
        XDG_CONFIG_HOME=str(Path(home) / ".config"),
        LC_ALL="C",
    )
    return env


def git(repo, *args, stdin=None):
    result = subprocess.run(
        ["git", *args],
        cwd=repo,
        env=git_env(repo),
        input=stdin,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}:\n{result.stderr}")
    return result.stdout


def copy_over(src, dst):
    """Copy the tree ``src`` onto ``dst`` and make every file mode 0644."""
    shutil.copytree(src, dst, ignore=IGNORED, dirs_exist_ok=True)
    for root, _dirs, files in os.walk(dst):
        if ".git" in Path(root).relative_to(dst).parts:
            continue
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def make_base(name, dest):
    """Build the base repository for ``name`` in ``dest``; return the commit sha."""
    copy_over(HERE / "repos" / name, dest)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "--no-gpg-sign", "-m", "base")
    return git(dest, "rev-parse", "HEAD").strip()


def diff_for(repo, overlay):
    """The patch that turns HEAD into HEAD + ``overlay``; the tree is reset after."""
    copy_over(overlay, repo)
    git(repo, "add", "-A")
    patch = git(repo, "diff", "--cached", "--no-color", "HEAD")
    git(repo, "reset", "-q", "--hard", "HEAD")
    return patch


def changed_paths(patch):
    return [line.split(" b/", 1)[1] for line in patch.splitlines() if line.startswith("diff --git ")]


def build_task(name, workdir):
    spec = json.loads((HERE / "tasks" / f"{name}.json").read_text(encoding="utf-8"))
    repo = Path(workdir) / name
    repo.mkdir()
    base_commit = make_base(name, repo)
    patch = diff_for(repo, HERE / "gold" / name)
    test_patch = diff_for(repo, HERE / "hidden" / name)
    return {
        "instance_id": f"cwm-rl__{name}-1",
        "repo": f"cwm-rl/{name}",
        "base_commit": base_commit,
        "problem_statement": spec["problem_statement"],
        "patch": patch,
        "test_patch": test_patch,
        "FAIL_TO_PASS": list(spec["FAIL_TO_PASS"]),
        "PASS_TO_PASS": list(spec["PASS_TO_PASS"]),
        "repo_dir": f"repos/{name}",
        "created_at": CREATED_AT,
    }


# --- verification -----------------------------------------------------------


def run_pytest(repo, args):
    """Run pytest in ``repo``; return (returncode, {nodeid: outcome}, output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env.update(PYTHONHASHSEED="0", TZ="UTC", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outcomes = {}
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS") and "::" in rest:
            outcomes[rest.split(" - ", 1)[0].strip()] = word
    return result.returncode, outcomes, result.stdout + result.stderr


def checkout(task, workdir, label, patches):
    name = task["repo"].split("/", 1)[1]
    repo = Path(workdir) / f"{name}-{label}"
    repo.mkdir()
    sha = make_base(name, repo)
    if sha != task["base_commit"]:
        raise RuntimeError(f"{name}: base commit not reproducible ({sha} != {task['base_commit']})")
    for patch in patches:
        git(repo, "apply", "-", stdin=patch)
    return repo


def verify(task, workdir):
    """Return a list of problems with ``task`` (empty when it is sound)."""
    problems = []
    f2p, p2p = task["FAIL_TO_PASS"], task["PASS_TO_PASS"]
    if len(f2p) < 2 or len(p2p) < 3:
        problems.append("needs at least 2 FAIL_TO_PASS and 3 PASS_TO_PASS tests")
    if set(f2p) & set(p2p):
        problems.append("a test is in both FAIL_TO_PASS and PASS_TO_PASS")
    if not task["patch"] or not task["test_patch"]:
        problems.append("empty patch or test_patch")
    if any(p.startswith("tests/") for p in changed_paths(task["patch"])):
        problems.append("patch touches tests/")
    if any(not p.startswith("tests/") for p in changed_paths(task["test_patch"])):
        problems.append("test_patch touches files outside tests/")
    ids = f2p + p2p

    # (a) base + test_patch: FAIL_TO_PASS fail, PASS_TO_PASS pass
    repo = checkout(task, workdir, "before", [task["test_patch"]])
    _rc, outcomes, output = run_pytest(repo, ids)
    before = len(problems)
    for test in f2p:
        if outcomes.get(test) not in ("FAILED", "ERROR"):
            problems.append(f"base+tests: {test} should fail, got {outcomes.get(test)}")
    for test in p2p:
        if outcomes.get(test) != "PASSED":
            problems.append(f"base+tests: {test} should pass, got {outcomes.get(test)}")
    if len(problems) > before:
        problems.append(output)

    # (b) base + patch + test_patch: everything passes
    repo = checkout(task, workdir, "after", [task["patch"], task["test_patch"]])
    rc, outcomes, output = run_pytest(repo, ids)
    bad = [t for t in ids if outcomes.get(t) != "PASSED"]
    for test in bad:
        problems.append(f"gold+tests: {test} should pass, got {outcomes.get(test)}")
    if bad or rc != 0:
        problems.append(f"gold+tests: pytest exited {rc}\n{output}")
    rc, outcomes, output = run_pytest(repo, [])
    if rc != 0 or set(outcomes.values()) != {"PASSED"}:
        problems.append(f"gold+tests: the whole suite does not pass (rc {rc})\n{output}")

    # (c) base alone: the visible tests pass
    repo = checkout(task, workdir, "base", [])
    rc, outcomes, output = run_pytest(repo, [])
    if rc != 0 or not outcomes or set(outcomes.values()) != {"PASSED"}:
        problems.append(f"base: visible tests do not all pass (rc {rc})\n{output}")
    missing = sorted(set(outcomes) - set(p2p))
    if missing:
        problems.append(f"base: visible tests missing from PASS_TO_PASS: {missing}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; fail if tasks.jsonl differs")
    args = parser.parse_args(argv)

    names = sorted(p.name for p in (HERE / "repos").iterdir() if p.is_dir())
    failed = False
    with tempfile.TemporaryDirectory(prefix="cwm-rl-swe-") as workdir:
        tasks = [build_task(name, workdir) for name in names]
        text = "".join(json.dumps(task) + "\n" for task in tasks)
        if args.check:
            current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
            if current != text:
                print(f"{OUTPUT.name} is out of date; run without --check")
                failed = True
        else:
            OUTPUT.write_text(text, encoding="utf-8")
        for task in tasks:
            problems = verify(task, workdir)
            status = "FAIL" if problems else "ok"
            print(
                f"{status:4} {task['instance_id']:22} base={task['base_commit'][:12]} "
                f"F2P={len(task['FAIL_TO_PASS'])} P2P={len(task['PASS_TO_PASS'])}"
            )
            for problem in problems:
                print("     " + problem.replace("\n", "\n     "))
            failed = failed or bool(problems)
    if not args.check:
        print(f"wrote {len(tasks)} tasks to {OUTPUT}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
