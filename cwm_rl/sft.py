"""Supervised warm start: train a model on an env's reference answers, report held-out accuracy.

    cwm-rl model sft --model models/tiny --env cwm_rl/Math-v0 --kwarg difficulty=1 --steps 300 --out models/tiny-sft

From Python, `run_sft("models/tiny", "models/tiny-sft", SFTConfig(env_id="cwm_rl/Math-v0", steps=300))`
does the same and returns the summary (`tests/cwm_rl/test_sft.py` runs both). A mix of envs:
`SFTConfig(mix=[{"id": "cwm_rl/Math-v0"}, {"id": "cwm_rl/Trace-v0", "kwargs": {"format": "cwm"}, "weight": 2}], ...)`
draws each example's env by weight; every env keeps its own held-out set and accuracy (`by_env` in
the summary; `accuracy_*` is their mean).

Data: the env's own tasks (`cwm_rl.loop.tasks`: its generator, or its task list). A training
example is the task drawn for a seed of the training range (even seeds), reset in the env, and
`env.reference_action()` as the assistant's answer; the sample is the rendered prompt (loss
mask 0) + the answer's tokens + the end-of-turn token (mask 1), exactly the tokens a rollout
worker would score. Only the first turn is covered. SFT is the one stage that needs reference
answers: an RL job without a warm start needs none.

Held-out evaluation: the held-out tasks a job with the same seed holds out
(`cwm_rl.loop.tasks.held_out_tasks`: at most `eval_share` of the env's distinct tasks), and every
training draw whose task id, or split key (Trace-v0: its program), is among them is skipped, so no
evaluated task is ever trained on.
Accuracy is greedy decoding with transformers (batched, left-padded, stopping at the end-of-turn
token), the text decoded as the agent loop decodes it, stepped in a fresh reset of the env to the
same task: reward > 0 counts as correct. The same is measured on up to as many tasks the run trains on,
so the summary shows memorising (trained-on accuracy) next to generalising (held-out).

Training is `trainer.train.Trainer.sft_step` (token-mean cross-entropy, AdamW, the trainer's
batching); the result is a complete Hugging Face checkpoint plus `sft_summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cwm_rl.loop.tasks import draw_task, env_name, held_out_keys, held_out_tasks, split_key, train_seed
from cwm_rl.types import Task

# Files of a model directory that belong to the tokenizer and chat template (copied as they are).
TOKENIZER_FILES = ("tokenizer*", "chat_template*", "special_tokens*", "added_tokens*", "vocab*", "merges*")
MAX_SKIPS_IN_A_ROW = 1_000  # training draws that all hit held-out tasks before we give up
PREPARE_CHUNK = 256  # training tasks drawn ahead and handed to env.prepare_tasks at once (Trace-v0: one sandbox run)


class SFTEnv(BaseModel):
    """One env of a warm start's mix."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Env id, e.g. cwm_rl/Trace-v0.")
    kwargs: dict[str, Any] | None = Field(default=None, description="Its constructor kwargs; None = {} (in a job: the kwargs of the job's env with this id).")
    weight: float | None = Field(default=None, ge=0, description="Share of the training examples drawn from it, relative to the others; 0 = evaluated only; None = 1 (in a job: the weight of the job's env with this id).")


class SFTConfig(BaseModel):
    """What `run_sft` trains on and how (the CLI's `cwm-rl model sft` options)."""

    model_config = ConfigDict(extra="forbid")

    env_id: str | None = Field(default=None, description="Env whose task generator and reference answers make the data, e.g. cwm_rl/Math-v0 (or `mix`).")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="Env constructor arguments, e.g. {'difficulty': 1}.")
    mix: list[SFTEnv] = Field(default_factory=list, description="Or several envs, each example's env drawn by weight; each keeps its own held-out set and accuracy.")
    steps: int = Field(ge=0, description="Optimiser steps (0 = only evaluate).")
    batch_size: int = Field(default=64, ge=1, description="Sequences per optimiser step.")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate (2e-3 taught a 1 M-parameter model 2-digit addition).")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup from 0 to lr over this many steps; constant after.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Clip the global gradient norm to this.")
    micro_batch_tokens: int = Field(default=8192, ge=16, description="Token budget of one forward/backward (rows x padded length).")
    eval_tasks: int = Field(default=200, ge=1, description="Distinct held-out tasks to measure accuracy on (at most; see eval_share).")
    eval_share: float = Field(default=0.25, gt=0, lt=1, description="The held-out set takes at most this share of the distinct tasks a probe of the generator finds.")
    eval_max_new_tokens: int = Field(default=32, ge=1, description="Tokens generated per held-out prompt at most.")
    eval_batch_size: int = Field(default=128, ge=1, description="Prompts per generate() call during evaluation.")
    eval_every: int = Field(default=0, ge=0, description="Also evaluate every this many steps; 0 = only before and after.")
    stop_at_accuracy: float | dict[str, float] | None = Field(default=None, description="Stop once held-out accuracy reaches this (checked every eval_every steps): a warm start to a modest accuracy whatever the seed. With a mix, every env must reach it, or {env id: accuracy} for the envs named.")
    seed: int = Field(default=0, ge=0, description="Seed of the data order (training and held-out seed ranges) and the trainer's RNGs.")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads during the run; None = torch's default (one per core). 1 is far faster on a busy machine.")

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if (self.env_id is None) == (not self.mix):
            raise ValueError("name the data's env: env_id (one env) or mix (several), not both" if self.mix else
                             "name the data's env: env_id (e.g. cwm_rl/Math-v0) or mix (a list of {id, kwargs, weight})")
        if self.mix and not any(e.weight is None or e.weight > 0 for e in self.mix):
            raise ValueError("every env of mix has weight 0 (evaluated only): give one a weight > 0 to train on")
        ids = [e.id for e in self.envs()]
        if len(set(ids)) < len(ids):
            raise ValueError(f"mix names an env twice ({ids}); give each env once, with its weight")
        if self.stop_at_accuracy is not None:
            if not self.eval_every:
                raise ValueError("stop_at_accuracy needs eval_every: accuracy is only measured every eval_every steps")
            targets = self.stop_targets()
            if unknown := set(targets) - set(ids):
                raise ValueError(f"stop_at_accuracy names {sorted(unknown)}, not in the data's envs {ids}")
            if not all(0 < v <= 1 for v in targets.values()):
                raise ValueError(f"stop_at_accuracy must be in (0, 1], got {self.stop_at_accuracy}")
        return self

    def envs(self) -> list[SFTEnv]:
        """The envs the data comes from (`mix`, or `env_id` alone)."""
        return [e if e.weight is not None else e.model_copy(update={"weight": 1.0}) for e in self.mix] or \
            [SFTEnv(id=self.env_id, kwargs=self.env_kwargs, weight=1.0)]

    def stop_targets(self) -> dict[str, float]:
        """{env id: held-out accuracy it must reach} for stop_at_accuracy."""
        if isinstance(self.stop_at_accuracy, dict):
            return dict(self.stop_at_accuracy)
        return {} if self.stop_at_accuracy is None else {e.id: self.stop_at_accuracy for e in self.envs() if e.weight != 0}


@dataclass
class Example:
    """One task with its first messages and its reference answer."""

    task_id: str
    task: Task
    messages: list[dict[str, str]]
    answer: str


@dataclass
class EvalResult:
    """Accuracy on a set of tasks and a few completions to look at."""

    accuracy: float
    num_correct: int
    num_tasks: int
    examples: list[dict[str, Any]]  # the first few: task id, completion, reward

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "num_correct": self.num_correct, "num_tasks": self.num_tasks, "examples": self.examples}


# ---- data ----------------------------------------------------------------------------------------

def draw(env: Any, seed: int) -> Example:
    """The task `env.reset(seed=seed)` plays, with its first messages and reference answer."""
    return example_of(env, draw_task(env, seed), seed)


def example_of(env: Any, task: Task, seed: int | None = None) -> Example:
    """`task` reset in `env`, its first messages and the env's reference answer (SFT's one need for one)."""
    messages, _ = env.reset(seed=seed, options={"task": task})
    answer = env.reference_action()
    if answer is None:
        raise ValueError(f"{env_name(env)} has no reference_action(): the SFT warm start trains on reference answers. "
                         "Implement reference_action() in the env (a correct answer for the current task), or skip the "
                         "warm start (in a job: model.sft.steps=0, or model.path=an already trained model)")
    return Example(task_id=task.id, task=task, messages=messages, answer=answer)


def prepare(env: Any, tasks: list[Task]) -> None:
    """Let the env do its costly per-task setup for all of `tasks` at once (`TextEnv.prepare_tasks`)."""
    getattr(env, "prepare_tasks", lambda tasks: None)(tasks)


def held_out_examples(env: Any, config: SFTConfig) -> tuple[list[Example], dict[str, Any]]:
    """The held-out tasks a job with this seed holds out too (`cwm_rl.loop.tasks.held_out_tasks`), as examples."""
    tasks = [Task.model_validate(t) for t in held_out_tasks(env, config.seed, config.eval_tasks, config.eval_share)]
    prepare(env, tasks)
    examples = [example_of(env, t) for t in tasks]
    return examples, {"requested": config.eval_tasks, "held_out": len(examples)}


def training_examples(env: Any, config: SFTConfig, held_out: set[str]) -> Iterator[Example]:
    """Endless, deterministic training examples, none of whose tasks shares a split key with `held_out`
    (`cwm_rl.loop.tasks.split_key`: a task id, or Trace-v0's program)."""
    skipped_in_a_row = 0
    k = 0
    while True:
        drawn: list[tuple[int, Task]] = []
        while len(drawn) < PREPARE_CHUNK:
            seed = train_seed(config.seed, k)
            task = draw_task(env, seed)
            k += 1
            if split_key(task) in held_out:
                skipped_in_a_row += 1
                if skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    raise ValueError(f"{MAX_SKIPS_IN_A_ROW} training draws in a row were held-out tasks: the held-out set "
                                     f"covers the task generator; lower eval_tasks / eval_share (--eval-tasks)")
                continue
            skipped_in_a_row = 0
            drawn.append((seed, task))
        prepare(env, [task for _, task in drawn])
        for seed, task in drawn:
            yield example_of(env, task, seed)


def trained_examples(env: Any, config: SFTConfig, held_out: set[str], num: int, num_draws: int | None = None) -> list[Example]:
    """Up to `num` distinct tasks the run trains on (from its first `num_draws` draws, by default steps x
    batch_size), for the accuracy on seen tasks next to the held-out one: memorising vs generalising."""
    found: dict[str, Example] = {}
    if num_draws == 0:
        return []
    stream = training_examples(env, config, held_out)
    for _ in range(config.steps * config.batch_size if num_draws is None else num_draws):
        if len(found) >= num:
            break
        example = next(stream)
        found.setdefault(example.task_id, example)
    return list(found.values())


@dataclass
class EnvData:
    """One env of the warm start: its held-out and trained-on examples, its training stream, its weight."""

    id: str
    env: Any
    weight: float
    held_out: list[Example]
    held_out_info: dict[str, Any]
    held_out_keys: set[str]
    trained: list[Example]
    stream: Iterator[Example]

    @classmethod
    def make(cls, spec: SFTEnv, env: Any, config: SFTConfig, num_draws: int) -> EnvData:
        """`num_draws`: the training examples the run will take from this env (its share of steps x batch_size)."""
        held_out, info = held_out_examples(env, config)
        keys = held_out_keys([e.task.model_dump(mode="json") for e in held_out])
        return cls(id=spec.id, env=env, weight=spec.weight, held_out=held_out, held_out_info=info, held_out_keys=keys,
                   trained=trained_examples(env, config, keys, len(held_out), num_draws),
                   stream=training_examples(env, config, keys))


class SampleMaker:
    """Examples -> trainer Samples: prompt tokens (mask 0) + answer + end-of-turn tokens (mask 1).

    The tokens of a task are made once (task ids identify tasks) and reused."""

    def __init__(self, tokenizer: Any):
        from cwm_rl.models.chat_template import detect_end_of_turn

        self.tokenizer = tokenizer
        self.end_of_turn = detect_end_of_turn(tokenizer)
        self.end_of_turn_ids = tokenizer.encode(self.end_of_turn, add_special_tokens=False)
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def prompt_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """The prompt as a rollout worker tokenises it (chat template + generation prompt, or a raw prompt's parts)."""
        from cwm_rl.models.chat_template import render
        from cwm_rl.models.raw_prompt import encode_raw, is_raw

        if is_raw(messages):
            return encode_raw(self.tokenizer, messages)[0]
        return self.tokenizer.encode(render(self.tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)

    def stop_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """A raw prompt's stop tokens, which end the answer and are part of it (none for chat prompts)."""
        from cwm_rl.models.raw_prompt import is_raw, stop_token_ids

        return stop_token_ids(self.tokenizer, messages) if is_raw(messages) else []

    def __call__(self, example: Example) -> Any:
        from cwm_rl.models.raw_prompt import is_raw
        from trainer.batching import Sample

        key = example.task.model_dump_json()  # not the id alone: Trace-v0 next_frame asks for several frames of one program
        if key not in self._cache:
            # A raw prompt's answer ends with its own stop token (written in the answer); a chat answer with end-of-turn.
            # The answer is the model's output in text form, so special tokens are read by name in it.
            closing = [] if is_raw(example.messages) else self.end_of_turn_ids
            answer_ids = self.tokenizer.encode(example.answer, add_special_tokens=False) + closing
            self._cache[key] = (self.prompt_ids(example.messages), answer_ids)
        prompt, answer = self._cache[key]
        n = len(prompt) + len(answer)
        return Sample(token_ids=prompt + answer, loss_mask=[0] * len(prompt) + [1] * len(answer), behaviour_logprobs=[0.0] * n)


# ---- evaluation ----------------------------------------------------------------------------------

def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, end_of_turn_id: int,
                    max_new_tokens: int, batch_size: int, stop_ids: Sequence[int] = ()) -> list[str]:
    """Greedy completions of token-id prompts, decoded as the agent loop does (the closing end-of-turn
    token dropped, special tokens kept; a raw prompt's stop token, from `stop_ids`, kept). Prompts of
    equal length share a batch, so little is padded."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T], left-padded
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attention_mask[r, width - len(prompts[i]):] = 1
            device = next(model.parameters()).device
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                           do_sample=False, max_new_tokens=max_new_tokens,
                                           eos_token_id=[end_of_turn_id, *stop_ids],
                                           pad_token_id=pad_id)[:, width:].tolist()  # [B, <= max_new_tokens]
            for r, i in enumerate(rows):
                ids = generated[r]
                end = next((k for k, t in enumerate(ids) if t == end_of_turn_id or t in stop_ids), None)
                if end is not None:  # everything after the first end is padding
                    ids = ids[:end + 1] if ids[end] in stop_ids else ids[:end]
                out[i] = tokenizer.decode(ids)
    finally:
        model.train(was_training)
    return out


def score_completions(env: Any, examples: Sequence[Example], completions: Sequence[str], num_shown: int = 3) -> EvalResult:
    """Step `env`, reset to each example's task, with its completion; reward > 0 is correct."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    num_correct = 0
    shown = []
    for example, completion in zip(examples, completions):
        env.reset(options={"task": example.task})
        _, reward, *_ = env.step(completion)
        num_correct += reward > 0
        if len(shown) < num_shown:
            shown.append({"task_id": example.task_id, "completion": completion, "reward": reward})
    return EvalResult(accuracy=num_correct / max(len(examples), 1), num_correct=num_correct, num_tasks=len(examples), examples=shown)


def evaluate(model: Any, maker: SampleMaker, env: Any, examples: Sequence[Example], config: SFTConfig) -> EvalResult:
    """Greedy accuracy of `model` on `examples`."""
    (end_of_turn_id,) = maker.end_of_turn_ids
    prompts = [maker.prompt_ids(e.messages) for e in examples]
    stop_ids = sorted({t for e in examples for t in maker.stop_ids(e.messages)})
    completions = generate_greedy(model, maker.tokenizer, prompts, end_of_turn_id=end_of_turn_id, stop_ids=stop_ids,
                                  max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size)
    return score_completions(env, examples, completions)


# ---- the run -------------------------------------------------------------------------------------

def check_out_dir(out_dir: Path, model_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; pass a directory")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out_dir} is the --model directory; write the warm-started model to another directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"--out {out_dir} is not empty; pick another directory or pass --force to overwrite")


def run_sft(model_dir: str | Path, out_dir: str | Path, config: SFTConfig, *, force: bool = False,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate, train `config.steps` SFT steps, evaluate again, save the model; returns the summary.

    `progress` gets {"event": "eval", "step", "accuracy", "by_env", ...} and {"event": "step", "step", "loss",
    "tokens_per_s", ...} dicts as the run goes. The summary is also written to `out_dir/sft_summary.json`."""
    from envs import make_env

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    started = time.perf_counter()
    check_out_dir(out_dir, model_dir, force)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); make one with `cwm-rl model init --out DIR`")
    envs: list[Any] = []
    try:
        for spec in config.envs():
            envs.append(make_env(spec.id, **(spec.kwargs or {})))  # unknown ids: ValueError listing the registered ones
        report = progress or (lambda event: None)
        import torch  # after the cheap checks: a typo in the env id fails fast

        threads = torch.get_num_threads()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        try:
            return _run(model_dir, out_dir, config, envs, report, started)
        finally:
            torch.set_num_threads(threads)
    finally:
        for env in envs:
            env.close()


def _run(model_dir: Path, out_dir: Path, config: SFTConfig, envs: list[Any], report: Callable[[dict[str, Any]], None],
         started: float) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from trainer.config import TrainerConfig
    from trainer.train import Trainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    maker = SampleMaker(tokenizer)
    if len(maker.end_of_turn_ids) != 1:
        raise ValueError(f"the end-of-turn token {maker.end_of_turn!r} is {len(maker.end_of_turn_ids)} token ids; "
                         "evaluation stops on one id")
    specs = config.envs()
    pick = random.Random(config.seed)  # which env each training example comes from, drawn for the whole run up front
    plan = pick.choices(range(len(specs)), weights=[e.weight for e in specs], k=config.steps * config.batch_size)
    data = [EnvData.make(spec, env, config, plan.count(i)) for i, (spec, env) in enumerate(zip(specs, envs))]
    with _no_progress_bars():
        trainer = Trainer(TrainerConfig.model_validate({
            "optim": {"lr": config.lr, "warmup_steps": config.warmup_steps, "schedule": "constant",
                      "total_steps": max(config.steps, 1), "max_grad_norm": config.max_grad_norm},
            "batch": {"micro_batch_tokens": config.micro_batch_tokens},
            "seed": config.seed,
        }), model_dir)

    def run_eval(step: int) -> dict[str, tuple[EvalResult, EvalResult | None]]:
        t0 = time.perf_counter()
        results = {d.id: (evaluate(trainer.model, maker, d.env, d.held_out, config),
                          evaluate(trainer.model, maker, d.env, d.trained, config) if d.trained else None) for d in data}
        held_out, seen = _combined(results)
        report({"event": "eval", "step": step, "steps": config.steps, "seconds": time.perf_counter() - t0,
                "train_accuracy": seen, "by_env": {k: r.accuracy for k, (r, _) in results.items()}, **held_out.to_dict()})
        return results

    before = after = run_eval(0)
    curve = [_curve_point(0, before)]
    losses: list[float] = []
    trained_keys: dict[str, set[str]] = {d.id: set() for d in data}
    targets = config.stop_targets()
    stopped = False
    train_started = time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = []
        for d in (data[i] for i in plan[(step - 1) * config.batch_size:step * config.batch_size]):
            example = next(d.stream)
            trained_keys[d.id].add(split_key(example.task))
            batch.append(example)
        samples = [maker(e) for e in batch]
        metrics = trainer.sft_step(samples)
        losses.append(metrics["sft_loss"])
        num_tokens = sum(s.num_tokens for s in samples)
        report({"event": "step", "step": step, "steps": config.steps, "loss": metrics["sft_loss"],
                "grad_norm": metrics["grad_norm"], "lr": metrics["lr"], "tokens": num_tokens,
                "tokens_per_s": num_tokens / max(metrics["step_time_s"], 1e-9)})
        if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
            after = run_eval(step)
            curve.append(_curve_point(step, after))
            stopped = bool(targets) and all(after[k][0].accuracy >= t for k, t in targets.items())
            if stopped:
                break
    train_seconds = time.perf_counter() - train_started
    for d in data:
        assert not trained_keys[d.id] & d.held_out_keys, f"{d.id}: a held-out task was trained on"
        if not stopped:  # a run stopped early may not have reached every task counted as trained on
            assert {split_key(e.task) for e in d.trained} <= trained_keys[d.id], f"{d.id}: a task counted as trained on was not"

    save_model(trainer.model, model_dir, out_dir)
    (held_out_before, seen_before), (held_out_after, seen_after) = _combined(before), _combined(after)
    by_env = {d.id: {"accuracy_before": before[d.id][0].accuracy, "accuracy_after": after[d.id][0].accuracy,
                     "train_accuracy_before": _accuracy(before[d.id][1]), "train_accuracy_after": _accuracy(after[d.id][1]),
                     "num_eval_tasks": len(d.held_out), "held_out": d.held_out_info, "weight": d.weight,
                     "num_distinct_training_tasks": len(trained_keys[d.id]), "eval_after": after[d.id][0].to_dict()}
              for d in data}
    summary = {
        "model": str(model_dir), "out": str(out_dir), "env_id": config.env_id, "envs": [d.id for d in data],
        "steps": curve[-1]["step"], "stopped_at_accuracy": stopped,
        "accuracy_before": held_out_before.accuracy, "accuracy_after": held_out_after.accuracy,
        "num_eval_tasks": sum(len(d.held_out) for d in data),
        "train_accuracy_before": seen_before, "train_accuracy_after": seen_after,
        "eval_before": held_out_before.to_dict(), "eval_after": held_out_after.to_dict(), "accuracy_curve": curve,
        "by_env": by_env, "held_out": data[0].held_out_info if len(data) == 1 else {d.id: d.held_out_info for d in data},
        "held_out_ids": [e.task_id for d in data for e in d.held_out],
        "num_distinct_training_tasks": sum(len(keys) for keys in trained_keys.values()),
        "loss_first": losses[0] if losses else None, "loss_last": _mean(losses[-10:]) if losses else None,
        "loss_curve": _loss_curve(losses), "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2), "config": config.model_dump(mode="json"),
    }
    (out_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _combined(results: dict[str, tuple[EvalResult, EvalResult | None]]) -> tuple[EvalResult, float | None]:
    """The envs' held-out results as one (accuracy: the mean over envs, as a job's eval_accuracy), and the mean
    trained-on accuracy over the envs trained on (None if none was)."""
    held_out = [r for r, _ in results.values()]
    seen = [s.accuracy for _, s in results.values() if s is not None]
    combined = EvalResult(accuracy=_mean([r.accuracy for r in held_out]), num_correct=sum(r.num_correct for r in held_out),
                          num_tasks=sum(r.num_tasks for r in held_out), examples=[x for r in held_out for x in r.examples])
    return combined, _mean(seen) if seen else None


def _curve_point(step: int, results: dict[str, tuple[EvalResult, EvalResult | None]]) -> dict[str, Any]:
    held_out, seen = _combined(results)
    return {"step": step, "accuracy": held_out.accuracy, "train_accuracy": seen,
            "by_env": {k: r.accuracy for k, (r, _) in results.items()}}


def save_model(model: Any, model_dir: Path, out_dir: Path) -> None:
    """Weights + config from `model`, tokenizer and chat template files copied from `model_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(out_dir)
    for pattern in TOKENIZER_FILES:
        for f in model_dir.glob(pattern):
            if f.is_file():
                shutil.copy(f, out_dir / f.name)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' one-shard "Loading weights" / "Writing model shards" bars are noise in a command's output."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _accuracy(result: EvalResult | None) -> float | None:
    return result.accuracy if result is not None else None


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _loss_curve(losses: Sequence[float], num_points: int = 20) -> list[dict[str, float]]:
    """About `num_points` (last step of a window, mean loss over the window) pairs."""
    if not losses:
        return []
    width = max(1, math.ceil(len(losses) / num_points))
    return [{"step": min(i + width, len(losses)), "loss": round(_mean(losses[i:i + width]), 5)} for i in range(0, len(losses), width)]
