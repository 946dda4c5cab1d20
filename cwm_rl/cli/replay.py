"""`cwm-rl rollouts replay|rescore|branch`: debug stored rollouts against a live env (docs/rollouts.md).

    cwm-rl rollouts replay RUN_DIR [ID ...] [--env E] [--status S] [--limit 50] [--server URL] [--json]
    cwm-rl rollouts rescore RUN_DIR [ID ...] [--import MODULE] [--kwarg KEY=VALUE] [--label TEXT] [--json]
    cwm-rl rollouts branch RUN_DIR ID --turn K --model VERSION|DIR -n N [--temperature T]

Replay exits 0 when every replay is identical to its record, 1 when one diverged or could not be
replayed (the first divergence or the reason is named), 2 on bad input. Results go to RUN_DIR/analysis.sqlite (the viewer shows
them); the rollout store is only read. Without IDs the filters pick the trajectories (newest first,
`--limit` of them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from cwm_rl.cli.common import ImportOpt, KwargOpt, load_user_envs, parse_kwargs, say
from cwm_rl.cli.rollouts import (EnvOpt, FinishOpt, MaxReturnOpt, MinReturnOpt, RunDir, StatusOpt, StepOpt, TaskOpt, VersionOpt,
                                 filters_of, make_console, open_store)

if TYPE_CHECKING:
    from cwm_rl.replay.results import ReplayReport
    from cwm_rl.types import Trajectory

IdsArg = Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Trajectory ids or unique prefixes; none = pick by the filters.")]
LimitOpt = Annotated[int, typer.Option(help="Without IDs: at most this many trajectories (newest first).")]
ServerOpt = Annotated[str | None, typer.Option("--server", help="Replay on this env server (URL) instead of in-process.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="CWM_RL_ENV_TOKEN", help="Bearer token of the env server.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="Episodes replayed at once.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]


def _pick(run_dir: Path, ids: list[str] | None, filters: dict[str, Any], limit: int) -> list[Trajectory]:
    with open_store(run_dir) as store:
        if ids:
            return [store.get(i) for i in ids]
        rows = store.query(order="-stored", limit=limit, **filters)
        if not rows:
            raise ValueError(f"no stored trajectory matches {({k: v for k, v in filters.items() if v})}; "
                             f"`cwm-rl rollouts list {run_dir}` shows what is there")
        return [store.get(r.trajectory_id) for r in rows]


def _results(run_dir: Path):
    from cwm_rl.replay.results import AnalysisStore
    from cwm_rl.run_files import run_root

    return AnalysisStore(run_root(run_dir))


def replay(
    run_dir: RunDir, ids: IdsArg = None, env: EnvOpt = None, task: TaskOpt = None, status: StatusOpt = [],
    min_return: MinReturnOpt = None, max_return: MaxReturnOpt = None, step: StepOpt = None, version: VersionOpt = None,
    finish_reason: FinishOpt = None, limit: LimitOpt = 50, server: ServerOpt = None, token: TokenOpt = None,
    modules: ImportOpt = [], threads: ThreadsOpt = 4, as_json: JsonOpt = False,
    save: Annotated[bool, typer.Option(help="Keep the reports in RUN_DIR/analysis.sqlite (the viewer shows them).")] = True,
) -> None:
    """Re-step recorded actions in a fresh env and diff observations, rewards, termination and info per turn."""
    from concurrent.futures import ThreadPoolExecutor

    from cwm_rl.replay.replay import replay as replay_one

    load_user_envs(modules)
    trajectories = _pick(run_dir, ids, filters_of(env, task, status, min_return, max_return, step, version, finish_reason), limit)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="replay") as pool:
        reports = list(pool.map(lambda t: replay_one(t, server=server, token=token), trajectories))
    if as_json:
        print(json.dumps([{**r.model_dump(mode="json"), "identical": r.identical, "first_divergence": r.first_divergence}
                          for r in reports], indent=2))
    else:
        console = make_console()
        if len(reports) == 1:
            _print_turn_diffs(console, reports[0])
        else:
            _print_summary(console, reports)
    if save:
        _save(run_dir, lambda results: [results.add_replay(r) for r in reports])
    if not all(r.identical for r in reports):
        raise typer.Exit(1)


def _save(run_dir: Path, write: Any) -> None:
    """Keep results in RUN_DIR/analysis.sqlite, after they were printed: a run directory we may not write to
    costs the copy the viewer shows, not the results."""
    import sqlite3

    try:
        with _results(run_dir) as results:
            write(results)
    except (sqlite3.Error, OSError, RuntimeError) as e:
        say(f"not kept in {Path(run_dir) / 'analysis.sqlite'}: {e}")


def _print_turn_diffs(console, report: ReplayReport) -> None:
    console.print(f"[bold]replay of {report.trajectory_id}[/]  env {escape(report.env_id)}  task {escape(report.task_id)}  "
                  f"on {escape(report.target)}")
    for turn in report.turns:
        where = "reset" if turn.turn < 0 else f"turn {turn.turn}"
        if not turn.diffs:
            console.print(f"  {where}: identical")
        for d in turn.diffs:
            mark = f"[yellow]may differ[/] ({escape(d.expected)})" if d.expected else "[red]DIVERGED[/]"
            console.print(f"  {where}: {escape(d.field)} {mark}")
            console.print(f"      recorded: {escape(json.dumps(d.recorded, ensure_ascii=False))[:2000]}")
            console.print(f"      replayed: {escape(json.dumps(d.replayed, ensure_ascii=False))[:2000]}")
    if report.error:
        console.print(f"[red]could not replay:[/] {escape(report.error)}")
    verdict = "[green]identical[/]" if report.identical else f"[red]diverged[/]: {escape(report.first_divergence or '')}"
    console.print(f"return recorded {report.recorded_return:g}, replayed "
                  f"{'-' if report.replayed_return is None else f'{report.replayed_return:g}'}: {verdict}")


def _print_summary(console, reports: list[ReplayReport]) -> None:
    table = Table(box=box.SIMPLE_HEAD, title=f"{len(reports)} replays")
    for name in ("id", "env", "task", "turns", "return", "replayed", "result"):
        table.add_column(name, overflow="fold")
    for r in reports:
        result = "identical" if r.identical else f"[red]{escape(r.first_divergence or '')}[/]"
        table.add_row(r.trajectory_id[:10], escape(r.env_id), escape(r.task_id), str(max(len(r.turns) - 1, 0)),
                      f"{r.recorded_return:g}", "-" if r.replayed_return is None else f"{r.replayed_return:g}", result)
    console.print(table)
    same = sum(r.identical for r in reports)
    console.print(f"{same} of {len(reports)} identical; {len(reports) - same} diverged")


def rescore(
    run_dir: RunDir, ids: IdsArg = None, env: EnvOpt = None, task: TaskOpt = None, status: StatusOpt = [],
    min_return: MinReturnOpt = None, max_return: MaxReturnOpt = None, step: StepOpt = None, version: VersionOpt = None,
    finish_reason: FinishOpt = None, limit: LimitOpt = 200, modules: ImportOpt = [], kwarg: KwargOpt = [],
    label: Annotated[str, typer.Option(help="A name for this rescore (default: what was changed).")] = "",
    server: ServerOpt = None, token: TokenOpt = None, threads: ThreadsOpt = 4, as_json: JsonOpt = False,
) -> None:
    """Recompute rewards with a changed env or verifier (by replaying) and show what flipped; originals stay as they are."""
    from cwm_rl.replay.rescore import rescore as rescore_all
    from cwm_rl.replay.rescore import return_histogram

    load_user_envs(modules)
    filters = filters_of(env, task, status, min_return, max_return, step, version, finish_reason)
    trajectories = _pick(run_dir, ids, filters, limit)
    rescore_set, results = rescore_all(trajectories, env_kwargs=parse_kwargs(kwarg), server=server, token=token, label=label,
                                       imports=modules, filters=filters, num_threads=threads)
    if as_json:
        print(json.dumps({**rescore_set.model_dump(mode="json"),
                          "flipped": [r.trajectory_id for r in results if r.flipped],
                          "results": [{**r.model_dump(mode="json", exclude={"new_info"}), "flipped": r.flipped} for r in results]}, indent=2))
        _save(run_dir, lambda store: store.add_rescore(rescore_set, results))
        _none_replayed(results)
        return
    console = make_console()
    console.print(f"[bold]rescore {rescore_set.rescore_id[:10]}[/] ({escape(rescore_set.label)}): {rescore_set.num_trajectories} "
                  f"trajectories, {rescore_set.num_changed} changed return, {rescore_set.num_flipped} flipped, "
                  f"{rescore_set.num_errors} could not be replayed")
    if rescore_set.mean_return_before is not None:
        console.print(f"mean return {rescore_set.mean_return_before:.4g} -> {rescore_set.mean_return_after:.4g}")
    scored = [r for r in results if r.new_return is not None]
    histogram = Table("return", "before", "after", box=box.SIMPLE_HEAD, title="how the returns moved")
    for bucket, before, after in return_histogram([r.old_return for r in scored], [r.new_return for r in scored]):
        histogram.add_row(bucket, str(before), str(after))
    console.print(histogram)
    flipped = [r for r in results if r.flipped or r.error]
    if flipped:
        table = Table("id", "env", "task", "old", "new", "", box=box.SIMPLE_HEAD, title="flipped (and failed)")
        for r in flipped[:30]:
            table.add_row(r.trajectory_id[:10], escape(r.env_id), escape(r.task_id), f"{r.old_return:g}",
                          "-" if r.new_return is None else f"{r.new_return:g}", escape(r.error or "flipped"))
        console.print(table)
    _save(run_dir, lambda store: store.add_rescore(rescore_set, results))
    console.print(f"kept in {escape(str(Path(run_dir) / 'analysis.sqlite'))}; the originals are unchanged")
    _none_replayed(results)


def _none_replayed(results: list) -> None:
    """A rescore in which nothing could be replayed is bad input (a kwarg the env does not take, a missing --import)."""
    if results and all(r.error for r in results):
        raise ValueError(f"none of the {len(results)} trajectories could be replayed; the first: {results[0].error}")


def branch(
    run_dir: RunDir,
    trajectory_id: Annotated[str, typer.Argument(metavar="ID", help="A trajectory id, or a unique prefix of one.")],
    turn: Annotated[int, typer.Option("--turn", min=0, help="Regenerate from this turn (0-based); turns before it are replayed.")],
    model: Annotated[str, typer.Option("--model", help="A policy version of the run (0 = its starting model) or a model directory.")],
    n: Annotated[int, typer.Option("-n", min=1, help="Continuations to generate.")] = 4,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: the run's).")] = None,
    server: ServerOpt = None, token: TokenOpt = None, modules: ImportOpt = [], as_json: JsonOpt = False,
) -> None:
    """Regenerate N continuations from the exact recorded tokens at turn K, play them out, and compare with the original."""
    import asyncio

    from cwm_rl.cli.common import need_training_stack
    from cwm_rl.replay.branch import branch as branch_from
    from cwm_rl.run_files import read_run_config, resolve_model

    need_training_stack()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's start-up lines would bury the comparison
    load_user_envs(modules)
    with open_store(run_dir) as store:
        t = store.get(trajectory_id)
    model_dir, policy_version = resolve_model(run_dir, model)
    branch_set, continuations = asyncio.run(branch_from(t, turn=turn, model_dir=model_dir, n=n, run_config=read_run_config(run_dir),
                                                        policy_version=policy_version, temperature=temperature, server=server,
                                                        token=token))
    if as_json:
        print(json.dumps({**branch_set.model_dump(mode="json"), "continuations": [c.model_dump(mode="json") for c in continuations]}))
        _save(run_dir, lambda results: results.add_branch(branch_set, continuations))
        return
    console = make_console()
    console.print(f"[bold]branch {branch_set.branch_id[:10]}[/] of {t.trajectory_id[:10]} ({escape(t.env_id)}, task "
                  f"{escape(t.task_id)}) from turn {turn}: {branch_set.prefix_tokens} recorded tokens, then {n} continuations "
                  f"by {escape(str(model_dir))}")
    table = Table("", "return", "finish", "turns", f"turn {turn} action", box=box.SIMPLE_HEAD)
    table.add_row("original", f"{t.return_:g}", t.finish_reason, str(len(t.turns)), escape(_first_line(t.turns[turn].action)))
    for c in continuations:
        action = c.turns[turn].action if len(c.turns) > turn else "(none)"
        table.add_row(f"branch {c.sample_index}", f"{c.return_:g}", c.finish_reason, str(len(c.turns)), escape(_first_line(action)))
    console.print(table)
    better = sum(c.return_ > t.return_ for c in continuations)
    worse = sum(c.return_ < t.return_ for c in continuations)
    console.print(f"{better} did better than the original, {worse} worse, {n - better - worse} the same")
    _save(run_dir, lambda results: results.add_branch(branch_set, continuations))


def _first_line(text: str, width: int = 70) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[:width - 3] + "..."
