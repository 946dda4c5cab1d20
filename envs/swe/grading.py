"""Grade a submitted patch the way SWE-bench does, in a FRESH container of the task's image.

1. Drop what a submission may not change (`rewards.swe.filter_patch`).
2. Apply it: `git apply`, else `git apply --3way`, else `patch -p1 --fuzz=3` (the tree is reset
   between tries).
3. Apply the hidden test patch, then run the tests with TZ=UTC and PYTHONHASHSEED=0 under a
   deadline: pytest on the files holding the FAIL_TO_PASS / PASS_TO_PASS tests with the
   reporting plugin, or the instance's `test_cmd` (its `-rA` summary is read).
4. Resolved when every FAIL_TO_PASS and PASS_TO_PASS test passed (`rewards.swe.verdict`).

Everything runs as the agent's user in a container with the episode's limits: the patch is
model-written code too.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import time
import uuid
from dataclasses import dataclass, field

from envs.swe.containers import ContainerPool
from envs.swe.tasks import SWEInstance
from rewards.swe import REPORT_PLUGIN, filter_patch, parse_report, parse_summary, patch_files, files_of_tests, verdict

GRADER_DIR = "/tmp/cwm-rl-grader"
APPLY = r"""cd "$1"
G={grader}
if [ ! -s "$G/model.patch" ]; then echo "@@apply empty"
elif git apply --whitespace=nowarn "$G/model.patch" 2>"$G/apply.err"; then echo "@@apply git-apply"
elif git reset -q --hard && git clean -fdq && git apply --3way --whitespace=nowarn "$G/model.patch" 2>>"$G/apply.err"; then echo "@@apply git-apply-3way"
elif git reset -q --hard && git clean -fdq && patch -p1 --batch --fuzz=3 -i "$G/model.patch" >>"$G/apply.err" 2>&1; then echo "@@apply patch-fuzz"
else git reset -q --hard; git clean -fdq; echo "@@apply failed"; tail -c 1500 "$G/apply.err"; exit 0
fi
git apply --whitespace=nowarn "$G/test.patch" 2>"$G/test.err" || {{ echo "@@tests test-patch-failed"; tail -c 1500 "$G/test.err"; exit 0; }}
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


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def grade_patch(pool: ContainerPool, image: str, instance: SWEInstance, patch: str, timeout_s: float = 600.0) -> Grade:
    """Apply `patch` in a fresh container of `image`, run the hidden tests, and judge them."""
    started = time.perf_counter()
    patch, dropped = filter_patch(patch, set(patch_files(instance.test_patch)))
    tests = list(dict.fromkeys(instance.FAIL_TO_PASS + instance.PASS_TO_PASS))
    nonce = uuid.uuid4().hex
    if instance.test_cmd:
        command = instance.test_cmd
    else:
        command = "python3 -m pytest -p cwm_rl_report -p no:cacheprovider -q " + " ".join(map(shlex.quote, files_of_tests(tests)))
    container = pool.acquire(image, instance.workdir)
    try:
        files = {"model.patch": patch.encode(), "test.patch": instance.test_patch.encode(),
                 "cwm_rl_report.py": REPORT_PLUGIN.encode(), "nonce": nonce.encode()}
        copied = container.exec(["sh", "-c", f"mkdir -p {GRADER_DIR} && tar -x -C {GRADER_DIR}"], stdin=_tar(files), timeout_s=60)
        if copied.exit_code != 0:
            return Grade(False, "failed", error=f"could not copy the patch into the grading container: {copied.stderr.decode()[-300:]}")
        script = APPLY.format(grader=GRADER_DIR) + (
            f"env TZ=UTC PYTHONHASHSEED=0 PYTHONPATH={GRADER_DIR} CWM_RL_NONCE_FILE={GRADER_DIR}/nonce sh -c {shlex.quote(command)}\n"
            'echo "@@tests exit $?"\n')
        done = container.exec(["sh", "-c", script, "grade", instance.workdir], timeout_s=timeout_s, output_bytes=4 << 20)
    finally:
        container.release()
    log = (done.stdout + done.stderr).decode(errors="replace")
    applied = log.split("@@apply ", 1)[1].split("\n", 1)[0].strip() if "@@apply " in log else "failed"
    grade = Grade(False, applied, dropped_from_patch=dropped, log_tail=log[-2000:], wall_s=time.perf_counter() - started)
    if applied == "failed":
        grade.failing = tests
        grade.error = None if "@@apply failed" in log else f"the grading script ended early (exit {done.exit_code})"
        return grade
    if "@@tests test-patch-failed" in log:
        grade.error = "the hidden test patch did not apply on top of the submission"
        grade.failing = tests
        return grade
    tests_log = log.split("@@tests start", 1)[-1]
    outcomes = parse_summary(tests_log) if instance.test_cmd else parse_report(tests_log, nonce)
    if outcomes is None:
        grade.error = "the tests printed no report (they were killed, timed out, or pytest could not start)"
        outcomes = {}
    judged = verdict(outcomes, instance.FAIL_TO_PASS, instance.PASS_TO_PASS)
    grade.resolved, grade.failing, grade.outcomes = judged.resolved, judged.failing, judged.outcomes
    return grade
