"""`cwm-rl env ...`: list, check, serve and play environments (docs/environments.md).

    cwm-rl env list [--import MODULE]
    cwm-rl env check ENV_ID [--kwarg KEY=VALUE] [--seeds 0,1,2] [--served] [--import MODULE]
    cwm-rl env serve [--host 127.0.0.1] [--port 8765] [--token T] [--env ENV_ID] [--import MODULE]
    cwm-rl env play ENV_ID [--seed N] [--kwarg KEY=VALUE] [--url URL] [--import MODULE]   # you are the model
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cwm_rl.cli.common import ImportOpt, KwargOpt, console, load_user_envs, parse_kwargs

env_app = typer.Typer(help="Define, check, serve and play environments.", no_args_is_help=True)


@env_app.command("list")
def env_list(imports: ImportOpt = []) -> None:
    """List the registered text environments."""
    from envs.registry import describe_env, list_text_envs

    load_user_envs(imports)
    table = Table("env id", "description")
    for env_id in list_text_envs():
        table.add_row(env_id, escape(describe_env(env_id)))
    console.print(table)


@env_app.command("check")
def env_check(
    env_id: str,
    kwarg: KwargOpt = [],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds to check.")] = "0,1,2",
    served: Annotated[bool, typer.Option("--served", help="Also serve the env on a loopback port and check it over HTTP.")] = False,
    imports: ImportOpt = [],
) -> None:
    """Check an env: Gymnasium's check_env, seed determinism, reference episodes, reward-hack probes."""
    from cwm_rl.env_check import run_env_checks

    load_user_envs(imports)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    with console.status(f"checking {env_id} ..."):
        results = run_env_checks(env_id, parse_kwargs(kwarg), seed_list, served=served)
    table = Table("check", "result", "detail", title=f"cwm-rl env check {env_id}")
    for r in results:
        table.add_row(escape(r.name), "[green]ok[/]" if r.ok else "[red]FAIL[/]", escape(r.detail))
    console.print(table)
    failed = [r for r in results if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/]: fix the env before training on it.")
        raise typer.Exit(1)
    console.print(f"[green]{env_id}: all {len(results)} checks passed[/]")


@env_app.command("serve")
def env_serve(
    host: Annotated[str, typer.Option(help="Bind address; beyond loopback a token is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    token: Annotated[str | None, typer.Option(envvar="CWM_RL_ENV_TOKEN", help="Bearer token clients must send.")] = None,
    env: Annotated[list[str], typer.Option("--env", help="Serve only these env ids (repeatable; default: all).")] = [],
    max_sessions: Annotated[int, typer.Option(help="Live sessions at most (429 past it).")] = 256,
    max_action_bytes: Annotated[int, typer.Option(help="Largest action in bytes (413 past it).")] = 1_000_000,
    step_timeout: Annotated[float, typer.Option(help="Seconds one reset/step may take (504 past it).")] = 60.0,
    episode_timeout: Annotated[float, typer.Option(help="Seconds an episode may take (then truncated).")] = 3600.0,
    idle_timeout: Annotated[float, typer.Option(help="Seconds before an untouched session is reaped.")] = 600.0,
    client_kwargs: Annotated[bool | None, typer.Option("--client-kwargs/--no-client-kwargs",
                                                       help="Accept env constructor kwargs from clients (default: only on loopback).")] = None,
    imports: ImportOpt = [],
) -> None:
    """Serve environments over HTTP (FastAPI) until Ctrl-C."""
    from envs.server.app import serve
    from envs.server.config import EnvServerConfig

    load_user_envs(imports)
    config = EnvServerConfig(
        host=host, port=port, token=token, env_ids=env or None, max_sessions=max_sessions,
        max_action_bytes=max_action_bytes, step_timeout_s=step_timeout, episode_timeout_s=episode_timeout,
        idle_timeout_s=idle_timeout, allow_client_env_kwargs=client_kwargs,
    )
    auth = "bearer token required" if token else "no auth (loopback only)"
    console.print(f"cwm-rl env server on http://{host}:{port} ({auth}); Ctrl-C stops it", highlight=False)
    serve(config)


@env_app.command("play")
def env_play(
    env_id: str,
    seed: Annotated[int | None, typer.Option(help="Seed for reset.")] = None,
    kwarg: KwargOpt = [],
    url: Annotated[str | None, typer.Option(help="Play against an env server at this URL instead of in-process.")] = None,
    token: Annotated[str | None, typer.Option(envvar="CWM_RL_ENV_TOKEN", help="Bearer token for --url.")] = None,
    imports: ImportOpt = [],
) -> None:
    """Play an env yourself: type the model's turns, see observations and rewards.

    End each turn with a line holding only '.'; a line '/quit' (or end of input) stops.
    """
    from envs import make_env
    from envs.server.client import RemoteEnv

    load_user_envs(imports)
    env = RemoteEnv(url, env_id, token=token, env_kwargs=parse_kwargs(kwarg)) if url else make_env(env_id, **parse_kwargs(kwarg))
    try:
        observation, info = env.reset(seed=seed)
        console.print(f"[bold]{env_id}[/] task {info.get('task_id', '?')}  (end a turn with a line '.', '/quit' to stop)")
        total, done = 0.0, False
        while not done:
            _show(observation)
            action = _read_turn()
            if action is None:
                console.print("stopped.")
                return
            observation, reward, terminated, truncated, info = env.step(action)
            total += reward
            done = terminated or truncated
            console.print(f"[cyan]reward {reward:g}[/]  terminated={terminated} truncated={truncated}  info={json.dumps(info)}",
                          highlight=False)
        _show(observation)
        console.print(f"[bold]episode over: return {total:g}[/]")
    finally:
        env.close()


def _show(messages: list[dict[str, str]]) -> None:
    for m in messages:
        console.print(f"[bold magenta]{m['role']}>[/] {m['content']}", highlight=False, markup=True)


def _read_turn() -> str | None:
    console.print("[bold green]assistant>[/] ", end="")
    lines = []
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line == "/quit":
            return None
        if line == ".":
            return "\n".join(lines)
        lines.append(line)
    return "\n".join(lines) if lines else None
