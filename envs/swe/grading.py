"""Grade a submitted patch the way SWE-bench does, in a FRESH container of the task's image.

1. Apply it: `git apply`, else `git apply --3way`, else `patch -p1 --fuzz=3` (the tree is reset
   between tries).
2. Undo what a submission may not change (`rewards.swe.protected`: conftest.py files, pytest
   configuration, the hidden tests' files), judged by what the tree holds, not by the patch text.
3. Apply the hidden test patch, then run the tests with TZ=UTC and PYTHONHASHSEED=0 under a
   deadline: pytest on the files holding the FAIL_TO_PASS / PASS_TO_PASS tests with the
   reporting plugin, or the instance's `test_cmd` (its `-rA` summary is read).
4. Resolved when every FAIL_TO_PASS and PASS_TO_PASS test passed (`rewards.swe.verdict`).

Everything runs as the agent's user in a container with the episode's limits: the patch is
model-written code too.
"""

from __future__ import annotations

import re
import shlex
import time
import uuid
from dataclasses import dataclass, field

from envs.sandbox.docker import tar_files
from envs.swe.containers import ContainerPool
from envs.swe.tasks import SWEInstance
from rewards.swe import PYTEST, REPORT_PLUGIN, files_of_tests, parse_report, parse_summary, patch_files, protected, verdict

GRADER_DIR = "/tmp/cwm-rl-grader"
PATCHES_GIT_DIR = re.compile(r"^(?:diff --git |--- |\+\+\+ |rename to |copy to |rename from |copy from )(?:.*[ /])?\.git(?:/|$)", re.M)
APPLY = r"""cd "$1"
G={grader}
if [ ! -s "$G/model.patch" ]; then echo "@@apply empty"
elif git apply --whitespace=nowarn "$G/model.patch" 2>"$G/apply.err"; then echo "@@apply git-apply"
elif git reset -q --hard && git clean -fdq && git apply --3way --whitespace=nowarn "$G/model.patch" 2>>"$G/apply.err"; then echo "@@apply git-apply-3way"
elif git reset -q --hard && git clean -fdq && patch -p1 --batch --fuzz=3 -i "$G/model.patch" >>"$G/apply.err" 2>&1; then echo "@@apply patch-fuzz"
else git reset -q --hard; git clean -fdq; echo "@@apply failed"; tail -c 1500 "$G/apply.err"; exit 0
fi
echo "@@changed"
git diff --name-only --no-renames -z HEAD; git ls-files --others -z
"""
# Undo the changes to protected paths (the arguments), then apply the hidden tests and run them.
RESTORE = r"""for p; do
  git reset -q HEAD -- "$p" 2>/dev/null
  if git cat-file -e "HEAD:$p" 2>/dev/null; then git checkout -q HEAD -- "$p"; else rm -rf -- "$p"; fi
done
"""
TESTS = r"""G={grader}
git apply --whitespace=nowarn "$G/test.patch" 2>"$G/test.err" || {{ echo "@@tests test-patch-failed"; tail -c 1500 "$G/test.err"; exit 0; }}
cat > "$G/nonce"
echo "@@tests start"
"""


@dataclass
class Grade:
    resolved: bool
    applied: str  # "empty", "git-apply", "git-apply-3way", "patch-fuzz" or "failed"
    failing: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    dropped_from_patch: list[str] = field(default_factory=list)
    error: str | None = None  # the grading itself went wrong (the test patch did not apply, no report)
    log_tail: str = ""
    wall_s: float = 0.0

    def as_info(self) -> dict:
        return {"resolved": self.resolved, "patch_applied": self.applied, "failing_tests": self.failing,
                "test_outcomes": self.outcomes, "dropped_from_patch": self.dropped_from_patch, "grading_error": self.error,
                "test_log_tail": self.log_tail}


def grade_patch(pool: ContainerPool, image: str, instance: SWEInstance, patch: str, timeout_s: float = 600.0) -> Grade:
    """Apply `patch` in a fresh container of `image`, run the hidden tests, and judge them."""
    started = time.perf_counter()
    tests = list(dict.fromkeys(instance.FAIL_TO_PASS + instance.PASS_TO_PASS))
    nonce = uuid.uuid4().hex
    plugin = f"cwm_rl_report_{uuid.uuid4().hex[:12]}"  # a name the repository cannot shadow in advance
    if instance.test_cmd:
        command = instance.test_cmd
    else:
        command = (f"python3 -c {shlex.quote(PYTEST)} -p {plugin} -p no:cacheprovider -q "
                   + " ".join(map(shlex.quote, files_of_tests(tests))))
    if PATCHES_GIT_DIR.search(patch):
        return Grade(False, "failed", failing=tests, error="the patch writes inside .git")
    container = pool.acquire(image, instance.workdir)
    try:
        files = {"model.patch": patch.encode(), "test.patch": instance.test_patch.encode(),
                 f"{plugin}.py": REPORT_PLUGIN.encode()}
        copied = container.exec(["tar", "-x", "--no-same-owner", "-C", "/"], stdin=tar_files(files, work_dir=GRADER_DIR), timeout_s=60)
        if copied.exit_code != 0:
            return Grade(False, "failed", error=f"could not copy the patch into the grading container: {copied.stderr.decode()[-300:]}")
        applying = container.exec(["sh", "-c", APPLY.format(grader=GRADER_DIR), "grade", instance.workdir], timeout_s=120)
        log = (applying.stdout + applying.stderr).decode(errors="replace")
        applied = log.split("@@apply ", 1)[1].split("\n", 1)[0].strip() if "@@apply " in log else "failed"
        grade = Grade(False, applied, failing=tests, log_tail=log[-2000:])
        if applied == "failed":
            grade.error = None if "@@apply failed" in log else f"the apply step ended early (exit {applying.exit_code})"
            return grade
        # After the marker, stdout holds the paths the patch changed or added, NUL-separated.
        _, marker, listed = applying.stdout.partition(b"@@changed\n")
        changed = listed.decode(errors="replace").split("\0") if marker else []
        grade.dropped_from_patch = protected([p for p in changed if p], set(patch_files(instance.test_patch)))
        if grade.dropped_from_patch:
            container.exec(["sh", "-c", RESTORE, "restore", *grade.dropped_from_patch], timeout_s=60)
        script = TESTS.format(grader=GRADER_DIR) + (
            f"env TZ=UTC PYTHONHASHSEED=0 PYTHONPATH={GRADER_DIR} CWM_RL_NONCE_FILE={GRADER_DIR}/nonce sh -c {shlex.quote(command)} </dev/null\n"
            'echo "@@tests exit $?"\n')
        # The nonce is written only now, after the last git command (a patched .git could run code).
        done = container.exec(["sh", "-c", script], stdin=nonce.encode(), timeout_s=timeout_s, output_bytes=4 << 20)
    finally:
        container.release()
    log = (done.stdout + done.stderr).decode(errors="replace")
    grade.log_tail, grade.wall_s = log[-2000:], time.perf_counter() - started
    if "@@tests test-patch-failed" in log:
        grade.error = "the hidden test patch did not apply on top of the submission"
        return grade
    tests_log = log.split("@@tests start", 1)[-1]
    outcomes = parse_summary(tests_log) if instance.test_cmd else parse_report(tests_log, nonce)
    if outcomes is None:
        grade.error = "the tests printed no report (they were killed, timed out, or pytest could not start)"
        outcomes = {}
    judged = verdict(outcomes, instance.FAIL_TO_PASS, instance.PASS_TO_PASS)
    grade.resolved, grade.failing, grade.outcomes = judged.resolved, judged.failing, judged.outcomes
    return grade
