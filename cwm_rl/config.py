"""The job config: one YAML file describes a whole RL run (model, envs, workers, trainer, eval).

    >>> config = load_config("configs/quickstart.yaml", overrides=["trainer.optim.lr=1e-4", "run_dir=runs/x"])
    >>> config.trainer.optim.lr, config.rollout.engine.max_model_len, config.run_dir
    (0.0001, 256, 'runs/x')

Pydantic models: every field has a default and a one-line description, unknown keys are errors
(a typo never silently does nothing; a key that moved says where to), `--set a.b=c` overrides
any field (the value is read as YAML, so `--set rollout.sampling.temperature=0.8` is a float and
`--set envs=[...]` a list). One config class per component, embedded as it is: the rollout
workers' `EngineConfig`, `SamplingConfig` and `EpisodeLimits` (`rollout_workers/config.py`), the
`TrainerConfig` and weight-sync `PublishConfig` (`trainer/config.py`), and the warm start's
`SFTConfig` (`cwm_rl/sft.py`). Importing this imports no torch, vLLM or Ray: `cwm-rl train`
answers a bad config in well under a second, before anything heavy starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cwm_rl.sft import SFTConfig
from rollout_workers.config import EngineConfig, EpisodeLimits, SamplingConfig
from trainer.config import PublishConfig, TrainerConfig


ENV_TOKEN_VAR = "CWM_RL_ENV_TOKEN"  # the env-server token `cwm-rl env serve` and the job read when none is configured


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvLimits(_Config):
    """An env's own episode limits: each field set overrides rollout.limits; None takes rollout.limits'."""

    max_turns: int | None = Field(default=None, ge=1, description="Model turns per episode at most; None = rollout.limits.max_turns.")
    max_total_tokens: int | None = Field(default=None, ge=16, description="Prompt + all turns, in tokens; None = rollout.limits.max_total_tokens.")
    env_timeout_s: float | None = Field(default=None, gt=0, description="Deadline of one reset or step (and of a step on an env server the job starts); None = rollout.limits.env_timeout_s.")


class EnvSpec(_Config):
    """One env of the task mix."""

    id: str = Field(description="Registered env id, e.g. 'cwm_rl/Math-v0'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Env constructor kwargs.")
    weight: float = Field(default=1.0, ge=0, description="Sampling weight in the task mix; 0 = evaluated only, never trained on (to measure transfer).")
    url: str | None = Field(default=None, description="Play it on this env server instead of in-process.")
    urls: list[str] = Field(default_factory=list, description="Or on these env servers: groups go round-robin, and one that stops answering is left out until its /health answers again.")
    servers: int = Field(default=0, ge=0, description="And/or on this many env servers the job starts here (`cwm-rl env serve` on 127.0.0.1); one that dies is restarted.")
    token: str | None = Field(default=None, description="Bearer token for the env servers; None = the CWM_RL_ENV_TOKEN environment variable, if set (keeps the secret out of config files and run_dir/config.yaml).")
    limits: EnvLimits | None = Field(default=None, description="This env's episode limits (turns, total tokens, step deadline): the fields set here override rollout.limits. A mix of one-turn and multi-turn envs sets them per env.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens per turn for this env (training and eval); None = rollout.sampling.max_tokens in training, eval.max_tokens in eval.")

    @property
    def bearer_token(self) -> str | None:
        """The token sent to (and given to) this env's servers: `token`, else $CWM_RL_ENV_TOKEN."""
        return self.token or os.environ.get(ENV_TOKEN_VAR) or None

    @property
    def endpoints(self) -> list[str]:
        """The remote env server URLs named in the config (`url` first, then `urls`)."""
        return ([self.url] if self.url else []) + [u for u in self.urls if u != self.url]


class SFTStageConfig(SFTConfig):
    """A supervised warm start before RL: `cwm-rl model sft`'s settings, with the job's defaults."""

    steps: int = Field(default=0, ge=0, description="SFT optimiser steps; 0 = no warm start.")
    env_id: str | None = Field(default=None, description="Env whose reference answers make the data; None = the first RL env of weight > 0 (or `mix`).")
    env_kwargs: dict[str, Any] | None = Field(default=None, description="Its kwargs; None = those of the job's env with that id.")
    seed: int | None = Field(default=None, ge=0, description="Seed of the data order and the trainer's RNGs; None = the job's seed.")
    eval_tasks: int = Field(default=100, ge=1, description="Held-out tasks measured during the warm start (at least eval.num_tasks: the RL eval draws from them).")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads of the warm start; None = one per core (nothing else runs yet: the workers start after it).")

    @model_validator(mode="after")
    def _check(self) -> SFTStageConfig:  # the rest is checked on the resolved SFTConfig (JobConfig does it up front)
        if self.env_id and self.mix:
            raise ValueError("name the warm start's data by env_id (one env) or mix (several), not both")
        if self.stop_at_accuracy is not None and not self.eval_every:
            raise ValueError("stop_at_accuracy needs eval_every: accuracy is only measured every eval_every steps")
        return self

    def resolve(self, envs: list[EnvSpec], job_seed: int) -> SFTConfig:
        """The `SFTConfig` this stage runs: what is unset taken from the job (`envs`: the job's envs)."""
        job = {spec.id: spec for spec in envs}
        mix = [{"id": e.id, "kwargs": (job[e.id].kwargs if e.id in job else {}) if e.kwargs is None else e.kwargs,
                "weight": (job[e.id].weight if e.id in job else 1.0) if e.weight is None else e.weight} for e in self.mix]
        job_kwargs = {spec.id: spec.kwargs for spec in envs}
        env_id = self.env_id or next(spec.id for spec in envs if spec.weight > 0)  # not an env only evaluated
        single = {} if mix else {"env_id": env_id, "env_kwargs": job_kwargs.get(env_id, {}) if self.env_kwargs is None else self.env_kwargs}
        return SFTConfig.model_validate({**self.model_dump(exclude={"env_id", "env_kwargs", "mix"}), **single, "mix": mix,
                                         "seed": job_seed if self.seed is None else self.seed,
                                         "num_threads": self.num_threads or os.cpu_count()})


class ModelConfig(_Config):
    """Where the policy comes from: a local HF directory, or a tiny model made here (then SFT)."""

    path: str | None = Field(default=None, description="A local Hugging Face model directory; None = make one with `init`.")
    init_preset: Literal["tiny", "small"] = Field(default="tiny", description="Preset of the model made here when `path` is None.")
    init_arch: Literal["cwm", "qwen2"] = Field(default="cwm", description="Architecture of the model made here.")
    init_seed: int = Field(default=0, description="Seed of the model made here.")
    init_tokenizer: Literal["default", "cwm"] = Field(default="default", description="Tokenizer and chat template of the model made here: cwm-rl's own, or CWM's (its special tokens and chat template: envs in CWM's formats need it).")
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig, description="Supervised warm start before RL.")


class RolloutConfig(_Config):
    """The rollout workers: how many, their engine, how they sample."""

    @model_validator(mode="before")
    @classmethod
    def _job_engine_defaults(cls, data: Any) -> Any:
        """A job's engines hold 1,024 tokens unless told otherwise (a bare EngineConfig holds 2,048)."""
        if isinstance(data, dict) and "max_model_len" not in (data.get("engine") or {}):
            engine = data.get("engine")
            if engine is None or isinstance(engine, dict):
                data = {**data, "engine": {**(engine or {}), "max_model_len": 1024}}
        return data

    num_workers: int = Field(default=1, ge=1, description="Rollout worker actors (one vLLM engine each).")
    num_gpus: float = Field(default=0, ge=0, description="GPUs Ray gives each rollout worker (1 for a GPU engine; 0 on the CPU).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each rollout worker needs, to place the workers on the nodes that offer them (e.g. {rollout: 1}).")
    group_size: int = Field(default=8, ge=1, description="Samples per task (GRPO group).")
    groups_per_request: int = Field(default=4, ge=1, description="Groups a worker plays per call (played concurrently).")
    requests_in_flight: int = Field(default=2, ge=1, description="Calls outstanding per worker: keeps the engine busy while results travel.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Each worker's vLLM engine (its model is the job's); max_model_len defaults to 1024 here.")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=64), description="How each turn is sampled.")
    limits: EpisodeLimits = Field(default_factory=lambda: EpisodeLimits(max_turns=1), description="When an episode is cut (an env of the mix may set its own: envs[i].limits).")


class EvalConfig(_Config):
    """Held-out greedy evaluation during the run."""

    every_steps: int = Field(default=10, ge=0, description="Evaluate every this many trainer steps (and at start and end); 0 = start and end only.")
    num_tasks: int = Field(default=100, ge=1, description="Held-out tasks per env (ids never trained on), at most model.sft.eval_share of the env's distinct tasks.")
    max_tokens: int = Field(default=64, ge=1, description="Greedy tokens per turn at most.")


class LoggingConfig(_Config):
    """Where metrics go besides the console."""

    tensorboard: bool = Field(default=True, description="Write TensorBoard event files under run_dir/tensorboard.")
    wandb_project: str | None = Field(default=None, description="Also log to this Weights & Biases project.")
    wandb_mode: Literal["online", "offline", "disabled"] = Field(default="offline", description="W&B mode (offline writes under run_dir/wandb).")
    progress: bool = Field(default=True, description="Show the live progress display (off in CI logs).")


# The dtypes vLLM's engine accepts (vllm.config.model.ModelDType); it lowercases them first.
VLLM_DTYPES = ("float32", "bfloat16", "float16", "half", "float", "auto")


class JobConfig(_Config):
    """A whole RL run."""

    run_dir: str = Field(default="runs/quickstart", description="Everything the run writes goes here (config, checkpoints, weights, store, logs).")
    mode: Literal["async", "sync"] = Field(default="async", description="async: workers keep generating while the trainer steps; sync: generate, train, repeat.")
    seed: int = Field(default=0, description="Seed of task sampling and the trainer.")
    steps: int = Field(default=100, ge=1, description="Trainer steps to run.")
    checkpoint_every: int = Field(default=50, ge=0, description="Save a resumable checkpoint (trainer state + task cursors) every this many steps; 0 = only at the end.")
    max_minutes: float | None = Field(default=None, gt=0, description="Stop (cleanly, with a checkpoint) after this many minutes of RL.")
    buffer_groups: int = Field(default=16, ge=1, description="Finished groups the buffer holds; workers get no new work while it is full (backpressure).")
    warn_without_signal_groups: int = Field(default=32, ge=0, description="Say on the console why (reward distribution per env, likely cause) after this many finished groups in a row without a learning signal (every return of each group equal: zero advantage), and again each time that streak doubles; 0 = never. 32 groups of a task mix solved 1 time in 20 all come out alike with odds near 1e-6.")
    stop_without_signal_groups: int = Field(default=512, ge=0, description="Stop (eval, checkpoint, summary, an error naming the likely cause) after this many groups in a row without a learning signal; 0 = never. With 8 samples per task, a mix solved even 1 time in 200 gives 512 in a row with odds near 1e-9, so a stop means nothing was learning.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy.")
    envs: list[EnvSpec] = Field(default_factory=lambda: [EnvSpec(id="cwm_rl/Math-v0")], description="The task mix.")
    env_modules: list[str] = Field(default_factory=list, description="Modules to import (here and in every worker) that register user envs, like `cwm-rl env --import`.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="The trainer (docs/trainer.md).")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="How each new policy version reaches the rollout workers.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics sinks.")
    ray_address: str | None = Field(default=None, description="Join this Ray cluster; None = start local Ray.")
    trainer_threads: int | None = Field(default=1, ge=1, description="torch CPU threads of the trainer: 1 leaves the other cores to vLLM; null = torch's default (the warm start uses model.sft.num_threads).")

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        if not self.envs:
            raise ValueError("envs is empty: name at least one env, e.g. envs: [{id: cwm_rl/Math-v0}]")
        if not any(spec.weight > 0 for spec in self.envs):
            raise ValueError("every env has weight 0 (evaluated only): give at least one env a weight > 0 to train on")
        if self.rollout.engine.model is not None:
            raise ValueError(f"rollout.engine.model ({self.rollout.engine.model}) is set by the job: name the policy with "
                             "model.path instead, and remove rollout.engine.model")
        sft = self.model.sft
        if self.model.path is None and sft.steps and sft.eval_tasks < self.eval.num_tasks:
            raise ValueError(f"model.sft.eval_tasks ({sft.eval_tasks}) < eval.num_tasks ({self.eval.num_tasks}): the warm start would "
                             "train on tasks the RL eval holds out; set model.sft.eval_tasks >= eval.num_tasks")
        if self.model.path is None and sft.steps:
            try:
                sft.resolve(self.envs, self.seed)
            except ValidationError as e:
                raise ValueError(f"model.sft: {'; '.join(err['msg'].removeprefix('Value error, ') for err in e.errors())}") from None
        if abs(self.rollout.sampling.temperature - self.trainer.loss.temperature) > 1e-9 and self.rollout.sampling.temperature > 0:
            raise ValueError(f"rollout.sampling.temperature ({self.rollout.sampling.temperature}) differs from "
                             f"trainer.loss.temperature ({self.trainer.loss.temperature}): the trainer must score tokens at the "
                             "temperature they were sampled at; set both to the same value")
        engine, limits = self.rollout.engine, self.rollout.limits
        if engine.dtype.lower() not in VLLM_DTYPES:
            raise ValueError(f"rollout.engine.dtype {engine.dtype!r} is not a dtype vLLM knows: set rollout.engine.dtype to one of "
                             f"{', '.join(VLLM_DTYPES)} (float32 on CPU, bfloat16 on GPU)")
        ids = [spec.id for spec in self.envs]
        for i, env_id in enumerate(ids):
            if env_id in ids[:i]:
                raise ValueError(f"envs[{i}]: {env_id} is already envs[{ids.index(env_id)}]; an env appears once in a mix (held-out "
                                 "sets, cursors and eval accuracy are per env id): register the variant under its own id, e.g. "
                                 "gym.register(id='my_envs/Math-tools-v0', entry_point='envs.math_env:MathEnv', kwargs={...})")
        for key, max_total in [("rollout.limits", limits.max_total_tokens)] + [
                (f"envs[{i}].limits", s.limits.max_total_tokens) for i, s in enumerate(self.envs) if s.limits is not None]:
            if max_total is not None and max_total > engine.max_model_len:
                raise ValueError(f"{key}.max_total_tokens ({max_total}) is more than rollout.engine.max_model_len "
                                 f"({engine.max_model_len}), the longest sequence the engine holds: set {key}.max_total_tokens "
                                 f"<= {engine.max_model_len}, or raise rollout.engine.max_model_len")
        return self

    def env_limits(self, index: int) -> EpisodeLimits:
        """The episode limits of env `index` of the mix: its own `limits` over rollout.limits."""
        own = self.envs[index].limits
        if own is None:
            return self.rollout.limits
        return self.rollout.limits.model_copy(update={k: v for k, v in own.model_dump().items() if v is not None})


# Keys that moved, with where they live now: a config written for an older cwm-rl gets the fix, not just "extra input".
MOVED_KEYS = {
    "trainer.checkpoint_every": "checkpoint_every",
    "trainer.publish": "publish",
    "rollout.max_model_len": "rollout.engine.max_model_len",
    "rollout.kv_cache_gib": "rollout.engine.kv_cache_gib",
    "rollout.max_num_seqs": "rollout.engine.max_num_seqs",
    "rollout.dtype": "rollout.engine.dtype",
    "model.sft.threads": "model.sft.num_threads",
}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a nested dict (values parsed as YAML). Returns the dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.optim.lr=1e-4")
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):  # envs.1.weight=0: an item of a list by its index
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"--set {item!r}: {'.'.join(parts[:depth])!r} is a list of {len(node)}" +
                                     (f"; index it with 0..{len(node) - 1}" if node else ": set the whole list instead"))
                part = int(part)
            elif not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {parts[depth - 1]!r} is not a section (it is {node!r})")
            if last:
                node[part] = yaml.safe_load(raw)
            elif isinstance(node, dict) and part not in node and parts[depth + 1].isdigit():
                raise ValueError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not set here, so it has no item "
                                 f"{parts[depth + 1]}: set the whole list, e.g. --set {'.'.join(parts[:depth + 1])}=[...]")
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config (or the defaults), apply overrides, validate. Errors name the bad field."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found; see configs/quickstart.yaml for an example")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a job config is a YAML mapping (key: value), not {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            moved = f" (it moved: use {MOVED_KEYS[key]})" if key in MOVED_KEYS and err["type"] == "extra_forbidden" else ""
            lines.append(f"{key or '(top level)'}: {err['msg']}{moved}")
        raise ValueError(f"invalid job config{f' {path}' if path else ''}:\n  " + "\n  ".join(lines)) from None
