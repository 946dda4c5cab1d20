"""The `cwm-rl` command line: `env list|check|serve|play`, `doctor`, `train`, `rollout`, `trace`, and the groups
`model ...`, `rollouts ...` and `sandbox ...` (each in its own cli_*.py).

Every failure ends with one line saying what went wrong and what to do; exit code 2 for bad
input, 1 for a failed check. Heavy imports happen inside the commands that need them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="cwm-rl: RL for code models in executable environments.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
env_app = typer.Typer(help="Define, check, serve and play environments.", no_args_is_help=True)
app.add_typer(env_app, name="env")
from cwm_rl.cli_model import model_app  # noqa: E402  (a Typer app; heavy imports stay inside its commands)
from cwm_rl.cli_rollouts import rollouts_app  # noqa: E402  (the same; the store loads inside its commands)
from cwm_rl.cli_sandbox import sandbox_app  # noqa: E402  (the same)
from cwm_rl.cli_swe import swe_app  # noqa: E402  (the same)
from cwm_rl.cli_trace import trace as trace_command  # noqa: E402  (the same)

app.add_typer(model_app, name="model")
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(swe_app, name="swe")
app.command("trace")(trace_command)
console = Console()

ImportOpt = Annotated[list[str], typer.Option("--import", "-i", help="Module that registers user envs (repeatable).")]
KwargOpt = Annotated[list[str], typer.Option("--kwarg", "-k", help="Env constructor argument KEY=VALUE (YAML value; repeatable).")]


def _kwargs(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--kwarg {pair!r} is not KEY=VALUE (e.g. --kwarg difficulty=2)")
        out[key] = yaml.safe_load(value)
    return out


def _json_option(text: str, name: str, kind: type, example: str) -> dict | list:
    """A JSON command-line option of the given kind (dict or list), or a ValueError that shows an example."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} {text!r} is not JSON ({e.msg}); e.g. {name} '{example}'") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'list'}, got {text!r}; e.g. {name} '{example}'")
    return value


def _load(modules: list[str]) -> None:
    from envs import load_env_modules

    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--import my_envs` finds my_envs.py in the current directory
    load_env_modules(modules)


@env_app.command("list")
def env_list(imports: ImportOpt = []) -> None:
    """List the registered text environments."""
    from envs.registry import describe_env, list_text_envs

    _load(imports)
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

    _load(imports)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    with console.status(f"checking {env_id} ..."):
        results = run_env_checks(env_id, _kwargs(kwarg), seed_list, served=served)
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

    _load(imports)
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

    _load(imports)
    env = RemoteEnv(url, env_id, token=token, env_kwargs=_kwargs(kwarg)) if url else make_env(env_id, **_kwargs(kwarg))
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


@app.command()
def rollout(
    model: Annotated[str, typer.Option(help="Model directory (Hugging Face format), e.g. from `cwm-rl model init`.")],
    env: Annotated[str, typer.Option(help="Env id to play.")],
    num_episodes: Annotated[int, typer.Option("-n", "--num-episodes", help="Episodes to run.")],
    out: Annotated[Path, typer.Option(help="Where to write the Trajectories (JSONL).")],
    group_size: Annotated[int, typer.Option(help="Episodes per task (a GRPO group).")] = 1,
    workers: Annotated[int, typer.Option(help="Rollout worker actors (one vLLM engine each).")] = 1,
    kwarg: KwargOpt = [],
    url: Annotated[str | None, typer.Option(help="Play the env on this env server instead of in-process.")] = None,
    token: Annotated[str | None, typer.Option(envvar="CWM_RL_ENV_TOKEN", help="Bearer token for --url.")] = None,
    max_turns: Annotated[int, typer.Option(help="Model turns per episode at most.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per turn at most.")] = 256,
    max_model_len: Annotated[int, typer.Option(help="Longest sequence (prompt + all turns).")] = 2048,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the first task (group g uses seed + g).")] = 0,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of starting a local one.")] = None,
    imports: ImportOpt = [],
) -> None:
    """Run episodes of an env against a frozen model (on Ray) and write Trajectories to a JSONL file."""
    from cwm_rl.rollout_cmd import run_rollouts

    _load(imports)
    config = {
        "engine": {"model": model, "max_model_len": max_model_len},
        "env_id": env, "env_kwargs": _kwargs(kwarg), "env_url": url, "env_token": token,
        "env_modules": imports, "sys_path": [os.getcwd()] if imports else [],
        "sampling": {"temperature": temperature, "max_tokens": max_tokens},
        "limits": {"max_turns": max_turns, "max_total_tokens": max_model_len},
    }
    if not url:
        from envs import make_env

        make_env(env, **config["env_kwargs"]).close()  # a bad env id or kwargs fails here, before Ray starts
    if not Path(model, "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json); make one with `cwm-rl model init --out DIR`")
    with console.status(f"running {num_episodes} episode(s) of {env} on {workers} worker(s) ..."):
        summary = run_rollouts(config, num_episodes, group_size, workers, seed, out, ray_address)
    console.print(f"{summary['episodes']} episodes -> {summary['out']}: mean return {summary['mean_return']:.3f}, "
                  f"finish reasons {summary['finish_reasons']}, {summary['generated_tokens']} tokens generated "
                  f"in {summary['seconds']} s", highlight=False)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="Job config YAML, e.g. configs/quickstart.yaml (omit with --resume).")] = None,
    overrides: Annotated[list[str], typer.Option("--set", help="Override a config field: --set trainer.optim.lr=1e-4 (repeatable).")] = [],
    resume: Annotated[Path | None, typer.Option(help="Resume the run in this run directory (its config.yaml unless CONFIG is given).")] = None,
) -> None:
    """Run an async (or sync) GRPO job on Ray: rollout workers, trainer, store, eval, checkpoints."""
    from cwm_rl.config import load_config

    if config is None and resume is None:
        raise ValueError("give a job config (e.g. cwm-rl train configs/quickstart.yaml) or --resume RUN_DIR")
    if resume is not None:
        if not (resume / "config.yaml").is_file():
            raise FileNotFoundError(f"{resume} is not a run directory (no config.yaml); pass the run_dir of an earlier run")
        overrides = [*overrides, f"run_dir={resume}"]
    job_config = load_config(config if config is not None else resume / "config.yaml", overrides)
    from cwm_rl.job import run_job  # heavy imports after the config is known to be valid

    summary = run_job(job_config, resume=resume is not None)
    keys = ("stop_reason", "eval_accuracy_initial", "eval_accuracy_final", "steps", "policy_versions", "trajectories_stored",
            "trajectories_trained", "trajectories_dropped_stale", "wall_seconds")
    table = Table("summary", "value")
    for k in keys:
        v = summary.get(k)
        table.add_row(k, f"{v:.1%}" if k.startswith("eval_accuracy") and v is not None else str(v))
    console.print(table)
    console.print(f"run directory: {job_config.run_dir} (summary.json, progress.png, tensorboard/, rollouts.sqlite)")


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if anything is missing or broken.")] = False,
) -> None:
    """Show what is installed (vLLM, Docker daemon, bubblewrap, Ray, ...) and how to get what is missing."""
    from cwm_rl.doctor import diagnose

    findings = diagnose()
    if as_json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        table = Table("component", "status", "detail", "fix")
        colour = {"ok": "green", "missing": "yellow", "broken": "red"}
        for f in findings:
            table.add_row(f.name, f"[{colour[f.status]}]{f.status}[/]", escape(f.detail), escape(f.fix))
        console.print(table)
    if strict and any(f.status != "ok" for f in findings):
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: run the app, turning expected errors into one clear line."""
    try:
        app()
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
