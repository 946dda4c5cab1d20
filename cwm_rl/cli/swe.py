"""`cwm-rl swe ...`: images and datasets for `cwm_rl/SWE-v0` (docs/swe.md).

    cwm-rl swe build-base                      # the base image: mmdebstrap + docker import, no registry
    cwm-rl swe build [TASKS.jsonl]             # each task's image (FROM the base, the repo copied in)
    cwm-rl swe validate [TASKS.jsonl] [--jobs N] [--json]

`validate` checks a dataset the way SWE-bench validates instances: it builds (or finds) each
image, then grades the gold patch (it must resolve the task) and the empty patch (it must not),
each in a fresh container, and reports per instance. Exit status 1 when an instance fails.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import typer

from cwm_rl.cli.common import say

swe_app = typer.Typer(help="Images and datasets for the SWE env (cwm_rl/SWE-v0).", no_args_is_help=True)
TasksArg = Annotated[Path | None, typer.Argument(help="SWE-bench-style JSONL (default: the tasks shipped with cwm-rl).")]


def _instances(tasks: Path | None, only: list[str]):
    from envs.swe.tasks import SHIPPED_TASKS, SWEInstance, load_tasks

    instances = [SWEInstance.from_task(t) for t in load_tasks(tasks or SHIPPED_TASKS)]
    if only:
        unknown = set(only) - {i.instance_id for i in instances}
        if unknown:
            raise ValueError(f"--instance {sorted(unknown)} not in the tasks file")
        instances = [i for i in instances if i.instance_id in only]
    return instances


@swe_app.command("build-base")
def build_base() -> None:
    """Build the base image (Debian by mmdebstrap from this machine's apt sources, `docker import`ed)."""
    from envs.sandbox.rootfs import docker_base_image

    typer.echo(docker_base_image(log=say))


@swe_app.command("build")
def build(
    tasks: TasksArg = None,
    only: Annotated[list[str], typer.Option("--instance", help="Only this instance id (repeatable).")] = [],
) -> None:
    """Build (or find) each task's image and print `instance_id image` lines."""
    from envs.swe.images import task_image

    for instance in _instances(tasks, only):
        typer.echo(f"{instance.instance_id} {task_image(instance, log=say)}")


@swe_app.command("validate")
def validate(
    tasks: TasksArg = None,
    only: Annotated[list[str], typer.Option("--instance", help="Only this instance id (repeatable).")] = [],
    jobs: Annotated[int, typer.Option(help="Instances checked at once.")] = 2,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds for one test run.")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per instance instead of a table.")] = False,
) -> None:
    """Check that each instance's gold patch resolves it and the empty patch does not."""
    from envs.swe.containers import ContainerPool
    from envs.swe.grading import grade_patch
    from envs.swe.images import task_image

    instances = _instances(tasks, only)
    pool = ContainerPool(pool_size=0, max_containers=max(2 * jobs, 2))

    def check(instance) -> dict:
        row = {"instance_id": instance.instance_id, "ok": False}
        try:
            image = row["image"] = task_image(instance, pool.client, log=say)
            gold = grade_patch(pool, image, instance, instance.patch, timeout_s=timeout)
            empty = grade_patch(pool, image, instance, "", timeout_s=timeout)
        except Exception as e:  # one broken instance is reported, the others still run
            row["problem"] = f"{type(e).__name__}: {e}"
            return row
        problems = []
        if not instance.patch:
            problems.append("no gold patch")
        elif not gold.resolved:
            problems.append(f"gold patch does not resolve it (applied: {gold.applied}; failing: {gold.failing[:5]}"
                            + (f"; {gold.error}" if gold.error else "") + ")")
        if empty.resolved:
            problems.append("the empty patch resolves it (the FAIL_TO_PASS tests pass without a fix)")
        elif empty.error:
            problems.append(f"grading the empty patch failed: {empty.error}")
        else:
            passing = [t for t in instance.FAIL_TO_PASS if empty.outcomes.get(t) in ("PASSED", "XFAIL")]
            if passing:
                problems.append(f"FAIL_TO_PASS tests pass without a fix: {passing[:5]}")
        row.update(ok=not problems, gold_resolved=gold.resolved, empty_resolved=empty.resolved, problem="; ".join(problems) or None,
                   gold_s=round(gold.wall_s, 2), empty_s=round(empty.wall_s, 2))
        return row

    try:
        with ThreadPoolExecutor(max(jobs, 1)) as executor:
            rows = list(executor.map(check, instances))
    finally:
        pool.close()
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row))
        else:
            status = "ok  " if row["ok"] else "FAIL"
            typer.echo(f"{status} {row['instance_id']}" + (f"  {row['problem']}" if row.get("problem") else
                                                            f"  (gold {row['gold_s']} s, empty {row['empty_s']} s)"))
    bad = sum(not row["ok"] for row in rows)
    say(f"{len(rows) - bad}/{len(rows)} instances valid")
    raise typer.Exit(1 if bad else 0)
