"""`cwm-rl model ...`: make tiny models locally, check chat templates, warm-start by SFT, play a model.

    cwm-rl model init --out models/tiny [--preset tiny|small] [--arch cwm|qwen2] [--tokenizer default|cwm] [--seed 0] [--force]
    cwm-rl model check-template models/tiny     # exit 0 "template OK", 1 with the problems listed
    cwm-rl model sft --model models/tiny --env cwm_rl/Math-v0 --steps 300 --out models/tiny-sft \
        [--kwarg difficulty=1] [--batch-size 64] [--lr 2e-3] [--eval-tasks 200] [--seed 0] [--force]
    cwm-rl model play --model models/tiny --env cwm_rl/Math-v0 -n 16 --out episodes.jsonl \
        [--group-size 4] [--workers 1] [--kwarg difficulty=1] [--url URL] [--max-turns 8] [--temperature 1.0]

`model play` is a frozen model playing an env (`cwm-rl env play` is you playing it); the
episodes go to a JSONL file, one Trajectory per line. Heavy imports (torch, transformers, vLLM,
Ray) happen inside the commands, so `cwm-rl --help` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwm_rl.cli.common import ImportOpt, KwargOpt, console, load_user_envs, need_training_stack, parse_kwargs

model_app = typer.Typer(help="Create tiny models, check chat templates, warm-start by SFT, play a frozen model.", no_args_is_help=True)


@model_app.command("init")
def model_init(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the model and tokenizer into.")],
    preset: Annotated[str, typer.Option(help="Model size: tiny (0.85 M parameters) or small (5.2 M).")] = "tiny",
    arch: Annotated[str, typer.Option(help="Architecture: cwm (sliding-window + global attention) or qwen2.")] = "cwm",
    tokenizer: Annotated[str, typer.Option(help="default (ChatML), or cwm: CWM's chat template and chat and trace special "
                                                "tokens, for configs that later move to a CWM checkpoint.")] = "default",
    seed: Annotated[int, typer.Option(help="Seed for the tokenizer's training text and the weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out directory.")] = False,
) -> None:
    """Make a model with random weights and a byte-level BPE tokenizer trained on env task text."""
    import json

    from cwm_rl.models.create import count_parameters, init_model

    need_training_stack()

    path = init_model(out, preset=preset, arch=arch, seed=seed, force=force, tokenizer=tokenizer)
    config = json.loads((path / "config.json").read_text())
    num_params = count_parameters(path)
    speaks = " (CWM's chat template and special tokens)" if tokenizer == "cwm" else ""
    typer.echo(f"created {preset} {arch} model{speaks}: {num_params / 1e6:.2f} M parameters, vocab {config['vocab_size']}, "
               f"{config['num_hidden_layers']} layers, context {config['max_position_embeddings']} -> {path}")


@model_app.command("check-template")
def model_check_template(
    model_dir: Annotated[str, typer.Argument(help="Model or tokenizer directory (with a chat template).")],
) -> None:
    """Check the chat template is prefix-consistent for multi-turn token-in/token-out rollouts."""
    need_training_stack()
    from transformers import AutoTokenizer

    from cwm_rl.models.template_check import check_template

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory; pass a local model or tokenizer directory")
    problems = check_template(AutoTokenizer.from_pretrained(model_dir))
    if problems:
        typer.echo(f"{len(problems)} problem(s) with the chat template of {model_dir}:")
        for p in problems:
            typer.echo(f"- {p}")
        typer.echo("Fix the template (it must only append text as a conversation grows) before multi-turn rollouts.")
        raise typer.Exit(1)
    typer.echo("template OK")


@model_app.command("sft")
def model_sft(
    model: Annotated[Path, typer.Option("--model", help="Model directory to start from (Hugging Face format).")],
    env: Annotated[str, typer.Option("--env", help="Env id whose tasks and reference answers make the data.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the warm-started model into.")],
    kwarg: KwargOpt = [],
    env_kwargs: Annotated[str | None, typer.Option("--env-kwargs", hidden=True, help="Renamed: --kwarg KEY=VALUE.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 2e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 10,
    eval_tasks: Annotated[int, typer.Option(help="Held-out tasks at most (capped at a quarter of a small task space).")] = 200,
    eval_every: Annotated[int, typer.Option(help="Also evaluate every this many steps (0 = before and after only).")] = 0,
    stop_at_accuracy: Annotated[float | None, typer.Option(help="Stop once held-out accuracy reaches this (needs --eval-every).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the trainer.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: one per core; 1 is much faster on a busy machine).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out directory.")] = False,
    imports: ImportOpt = [],
) -> None:
    """Warm-start a model by SFT on an env's reference answers; report held-out accuracy before and after."""
    if env_kwargs is not None:
        raise ValueError("--env-kwargs JSON is now --kwarg KEY=VALUE (repeatable, values read as YAML), "
                         "e.g. --kwarg difficulty=1, as in every cwm-rl command")
    kwargs = parse_kwargs(kwarg)
    need_training_stack()
    from cwm_rl.sft import SFTConfig, run_sft

    load_user_envs(imports)

    config = SFTConfig(env_id=env, env_kwargs=kwargs, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                       eval_tasks=eval_tasks, eval_every=eval_every, stop_at_accuracy=stop_at_accuracy, seed=seed, num_threads=threads)
    every = max(1, steps // 10)

    def progress(e: dict) -> None:
        if e["event"] == "eval":
            seen = "" if e["train_accuracy"] is None else f", trained-on tasks {e['train_accuracy']:.1%}"
            typer.echo(f"step {e['step']:>{len(str(steps))}}/{steps}  held-out accuracy {e['accuracy']:.1%} "
                       f"({e['num_correct']}/{e['num_tasks']}){seen}  ({e['seconds']:.1f} s)")
        elif e["step"] % every == 0 or e["step"] == steps:
            typer.echo(f"step {e['step']:>{len(str(steps))}}/{steps}  loss {e['loss']:.4f}  {e['tokens_per_s']:,.0f} tokens/s")

    summary = run_sft(model, out, config, force=force, progress=progress)
    seen = "" if summary["train_accuracy_after"] is None else \
        f"; on trained-on tasks {summary['train_accuracy_before']:.1%} -> {summary['train_accuracy_after']:.1%}"
    typer.echo(f"held-out accuracy: {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%} "
               f"({summary['num_eval_tasks']} tasks){seen}; {summary['steps']} steps in {summary['seconds']:.0f} s -> {out}"
               + (" (stopped: --stop-at-accuracy reached)" if summary["stopped_at_accuracy"] else ""))


@model_app.command("play")
def model_play(
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
    """A frozen model plays episodes of an env (on Ray); the Trajectories go to a JSONL file."""
    from cwm_rl.config import EnvSpec, RolloutConfig
    from cwm_rl.loop.workers import worker_config
    from cwm_rl.play import play_model

    load_user_envs(imports)
    spec = EnvSpec(id=env, kwargs=parse_kwargs(kwarg), url=url, token=token)
    rollout = RolloutConfig.model_validate({"engine": {"max_model_len": max_model_len},
                                            "sampling": {"temperature": temperature, "max_tokens": max_tokens},
                                            "limits": {"max_turns": max_turns, "max_total_tokens": max_model_len}})
    if not url:
        from envs import make_env

        make_env(env, **spec.kwargs).close()  # a bad env id or kwargs fails here, before Ray starts
    if not Path(model, "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json); make one with `cwm-rl model init --out DIR`")
    config = worker_config(rollout, spec, model, seed=0, env_modules=imports)
    with console.status(f"running {num_episodes} episode(s) of {env} on {workers} worker(s) ..."):
        summary = play_model(config, num_episodes, group_size, workers, seed, out, ray_address)
    console.print(f"{summary['episodes']} episodes -> {summary['out']}: mean return {summary['mean_return']:.3f}, "
                  f"finish reasons {summary['finish_reasons']}, {summary['generated_tokens']} tokens generated "
                  f"in {summary['seconds']} s", highlight=False)
