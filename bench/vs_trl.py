"""Benchmark cwm-rl against TRL's GRPOTrainer: the quickstart's RL in both, side by side, same budget.

For each seed, one after the other on this machine:
- cwm-rl: the quickstart, `cwm-rl train configs/quickstart.yaml --set seed=N` (a tiny model, SFT on
  2-digit addition until 50% held-out accuracy, then async GRPO with a vLLM rollout worker for
  `max_minutes` or its step cap), with its in-job evals off (`eval.every_steps=0`: TRL evaluates
  nothing inside its budget either; each eval stalls the quickstart's loop ~3 s);
- TRL: `trl.GRPOTrainer` from the same warm start (the job's `model/sft`), for the same RL seconds
  (a callback stops it), with HF `generate` in the training process (synchronous, all the CPU's
  threads), on the same training tasks in the same order, the same prompts (the same chat-template
  text and tokens), reward (our Math-v0 env: +1 / -1), lr, AdamW betas, clip range (0.2 / 0.25), no
  KL, no std scaling, token-level loss, group size, max completion tokens, temperature, and about
  the same generated tokens per step (`--trl-groups-per-step`: 48 groups of 8 x ~10.6 tokens, what
  the quickstart's 4,096-token steps hold).
Model loading, engine start-up and the job's initial eval are outside both budgets (`--set` overrides
reach both systems' settings). Both systems' policies at 5, 10, 15, 20, 30, 45 s, 1, 2, 3, 5 minutes
and at the end are scored afterwards by one evaluator (`cwm_rl.sft.evaluate`: greedy HF generate, our
env's reward) on the job's 200 held-out tasks, as is the warm start ("before"); with the steps each
had made by then (`steps_at`), so accuracy can be read per step as well as per minute.

    pip install -e '.[bench]'                   # TRL (with datasets, accelerate): only this bench needs it
    .venv/bin/python bench/vs_trl.py --seeds 0 1 2        # about 13 minutes a seed

Per system: steps, generated tokens/s, trained (loss) tokens/s, steps per minute, held-out accuracy
before / after and gain per minute (at the end and at each mark); then cwm-rl / TRL ratios, and
cwm-rl's per-step timeline (where a step's time went). The last line printed is one JSON object.
Goals (issue 21): generated tokens/s >= 2.0x, steps per minute >= 1.5x, held-out gain per minute
>= 1.5x, on every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# bench/trainer.py would shadow the `trainer` package when this runs as `python bench/vs_trl.py`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


# ---- shared: the warm start, the tasks, the evaluator -------------------------------------------

def job_data(seed: int, num_train: int, overrides: list[str]) -> tuple[Any, list[Any], list[dict[str, Any]]]:
    """The quickstart job's env, its held-out tasks (as SFT examples) and its first `num_train` training tasks."""
    from cwm_rl.config import load_config
    from cwm_rl.loop.tasks import job_tasks, make_task_env
    from cwm_rl.sft import example_of
    from cwm_rl.types import Task

    c = load_config(QUICKSTART, overrides=[f"seed={seed}", *overrides])  # the job's own tasks, as cwm-rl drew them
    tasks = job_tasks(c.envs, c.seed, c.eval.num_tasks, c.model.sft.eval_share, cursors={}, mix_seed=c.seed * 7919)
    try:
        env = make_task_env(c.envs[0])
        held_out = [example_of(env, Task.model_validate(t)) for t in tasks.held_out[c.envs[0].id]]
        train = [task for _, task in tasks.draw(num_train, 0)]
    finally:
        tasks.close()
    return env, held_out, train


def held_out_accuracy(model_dir: Path, env: Any, examples: list[Any]) -> float:
    """Greedy accuracy of `model_dir` on `examples`, scored by `env` (the same evaluator for both systems)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwm_rl.sft import SampleMaker, SFTConfig, evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    maker = SampleMaker(AutoTokenizer.from_pretrained(model_dir))
    config = SFTConfig(env_id="cwm_rl/Math-v0", steps=1, eval_max_new_tokens=32, eval_batch_size=200)
    return evaluate(model, maker, env, examples, config).accuracy


# ---- cwm-rl --------------------------------------------------------------------------------------

# Besides the end: when both policies are scored. Dense early: the quickstart's task gains most of its points in
# the first ~10 steps (both systems), so only the first marks see the rate before the ceiling bends it.
MARKS_S = (5, 10, 15, 20, 30, 45, 60, 120, 180, 300)


def run_cwm_rl(seed: int, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The quickstart job for `seed`, every published version kept (scored afterwards at the marks)."""
    # No evals inside the budget (TRL has none): the job's initial and final ones only; the policies at the marks
    # are scored afterwards by the same evaluator as TRL's.
    settings = [f"run_dir={run_dir}", f"seed={seed}", "eval.every_steps=0", "publish.keep_last=100000", "logging.progress=false",
                *overrides]
    cli = Path(sys.executable).with_name("cwm-rl")
    args = [str(cli), "train", str(QUICKSTART)] + [a for s in settings for a in ("--set", s)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the cwm-rl job failed:\n{(done.stdout + done.stderr)[-3000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    if not steps:
        raise RuntimeError(f"the cwm-rl job in {run_dir} made no RL step: a longer max_minutes?")
    last = steps[-1]

    import yaml

    warm_start = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"] or run_dir / "model" / "sft")

    def policy_at(seconds: float) -> tuple[Path, float, int]:  # the version published by the last step done by then, when, steps
        done = [m for m in steps if m["rl_s"] <= seconds]
        if not done:
            return warm_start, seconds, 0
        return run_dir / "weights" / f"v{int(done[-1]['new_policy_version']):08d}", done[-1]["rl_s"], len(done)

    timeline = {k.removeprefix("time/"): round(statistics.mean(m[k] for m in steps[len(steps) // 4:]), 3)
                for k in last if k.startswith("time/")}
    return {"steps": len(steps), "seconds": last["rl_s"], "generated_tokens": last["generated_tokens"],
            "trained_tokens": sum(m["loss_tokens"] for m in steps), "model_dir": policy_at(last["rl_s"])[0],
            "marks": {t: policy_at(t) for t in MARKS_S if t < last["rl_s"]}, "timeline": timeline,
            "warm_start": warm_start}


# ---- TRL -----------------------------------------------------------------------------------------

def run_trl(model_dir: Path, seed: int, seconds: float, train_tasks: list[dict[str, Any]], groups_per_step: int,
            out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same tasks, prompts, reward and settings (see the module docstring)."""
    try:
        import trl
        from datasets import Dataset
    except ImportError as e:
        raise SystemExit(f"bench/vs_trl.py needs TRL ({e}): pip install -e '.[bench]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from cwm_rl.config import load_config
    from cwm_rl.loop.tasks import make_task_env
    from cwm_rl.models.chat_template import detect_end_of_turn, render
    from cwm_rl.types import Task

    torch.set_num_threads(os.cpu_count() or 1)  # TRL has the machine to itself
    c = load_config(QUICKSTART, overrides=[f"seed={seed}", *overrides])  # the cwm-rl job's settings (lr, group size, ...)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_of_turn = detect_end_of_turn(tokenizer)
    tokenizer.eos_token = end_of_turn  # generation ends where a rollout worker's turn ends
    env = make_task_env(c.envs[0])

    def prompt_text(task: dict[str, Any]) -> str:
        messages, _ = env.reset(options={"task": Task.model_validate(task)})
        return render(tokenizer, messages, add_generation_prompt=True)

    dataset = Dataset.from_list([{"prompt": prompt_text(t), "task": json.dumps(t)} for t in train_tasks])

    def reward(prompts: list[str], completions: list[str], task: list[str], **_: Any) -> list[float]:
        out = []
        for completion, task_json in zip(completions, task):
            env.reset(options={"task": Task.model_validate_json(task_json)})
            _, r, *_ = env.step(completion)
            out.append(float(r))
        return out

    g = c.rollout.group_size
    args = trl.GRPOConfig(
        output_dir=str(out_dir), seed=seed, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, max_steps=100_000, per_device_train_batch_size=groups_per_step * g, gradient_accumulation_steps=1,
        num_generations=g, max_completion_length=c.rollout.sampling.max_tokens, temperature=c.rollout.sampling.temperature,
        learning_rate=c.trainer.optim.lr, adam_beta1=c.trainer.optim.betas[0], adam_beta2=c.trainer.optim.betas[1],
        weight_decay=c.trainer.optim.weight_decay, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=c.trainer.optim.max_grad_norm, beta=0.0, epsilon=c.trainer.loss.clip_eps_low,
        epsilon_high=c.trainer.loss.clip_eps_high, loss_type="dapo", scale_rewards="none", shuffle_dataset=False,
        dataloader_num_workers=0, bf16=False,
    )

    class Budget(TrainerCallback):
        """Stop once `seconds` of training have passed (checked after each step, as cwm-rl's max_minutes);
        save the policy at each mark (a tiny model: milliseconds, taken out of the clock)."""

        def __init__(self):
            self.started = self.last_step_end = 0.0
            self.saving = 0.0
            self.marks: dict[int, tuple[Path, float, int]] = {}  # mark -> (the policy of the last step done by then, its time, steps)
            self.previous: tuple[Path, float, int] | None = None

        def on_train_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **k):
            self.last_step_end = time.perf_counter()
            elapsed = self.last_step_end - self.started - self.saving
            saved = time.perf_counter()
            for mark in MARKS_S:  # this step ended past a mark: the step before is the policy at it
                if mark not in self.marks and mark < seconds and elapsed >= mark:
                    self.marks[mark] = self.previous or (model_dir, float(mark), 0)
            if self.previous and self.previous not in self.marks.values():
                shutil.rmtree(self.previous[0])  # no mark took it
            self.previous = None
            if any(elapsed < mark < seconds for mark in MARKS_S):  # keep this step's policy for the next mark
                path = out_dir / f"step{state.global_step}"
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)
                self.previous = (path, elapsed, state.global_step)
            self.saving += time.perf_counter() - saved
            if elapsed > seconds:
                control.should_training_stop = True

    budget = Budget()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[budget])
    trainer.train()
    spent = budget.last_step_end - budget.started - budget.saving
    logs = [h for h in trainer.state.log_history if "loss" in h]
    completion_tokens = sum(h.get("completions/mean_length", 0.0) * groups_per_step * g for h in logs)
    final = out_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    env.close()
    return {"steps": trainer.state.global_step, "seconds": spent, "generated_tokens": completion_tokens,
            "trained_tokens": completion_tokens, "model_dir": final, "marks": budget.marks, "trl_version": trl.__version__}


# ---- the comparison ------------------------------------------------------------------------------

def figures(run: dict[str, Any], before: float, after: float, at_marks: dict[int, tuple[float, float, int]]) -> dict[str, Any]:
    """`at_marks`: mark -> (accuracy of the policy at the mark, the seconds of RL it had had, its steps)."""
    minutes = run["seconds"] / 60
    return {"steps": run["steps"], "seconds": round(run["seconds"], 1), "steps_per_min": round(run["steps"] / minutes, 2),
            "generated_tokens_per_s": round(run["generated_tokens"] / run["seconds"], 1),
            "trained_tokens_per_s": round(run["trained_tokens"] / run["seconds"], 1),
            "accuracy_before": before, "accuracy_after": after, "gain_per_min": round((after - before) * 100 / minutes, 2),
            "accuracy_at": {str(t): acc for t, (acc, _, _) in at_marks.items()},
            "steps_at": {str(t): n for t, (_, _, n) in at_marks.items()},
            "gain_per_min_at": {str(t): round((acc - before) * 100 / (max(s, 1.0) / 60), 2) for t, (acc, s, _) in at_marks.items()}}


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    keys = ("generated_tokens_per_s", "steps_per_min", "trained_tokens_per_s", "gain_per_min")
    out: dict[str, Any] = {k: round(ours[k] / theirs[k], 3) if theirs[k] > 0 else None for k in keys}
    out["gain_per_min_at"] = {t: round(g / theirs["gain_per_min_at"][t], 3) if theirs["gain_per_min_at"].get(t, 0) > 0 else None
                              for t, g in ours["gain_per_min_at"].items() if t in theirs["gain_per_min_at"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trl-groups-per-step", type=int, default=48,
                        help="groups of 8 per TRL step: 48 x 8 x ~10.6 tokens ~ the quickstart's 4,096-token steps")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the cwm-rl job; TRL's settings, tasks and held-out set follow it "
                             "(a smoke test: --set max_minutes=0.5 --set model.path=DIR)")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401  (fail before minutes of cwm-rl)
    except ImportError as e:
        raise SystemExit(f"bench/vs_trl.py needs TRL ({e}): pip install -e '.[bench]'") from None

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)).resolve()
        for seed in args.seeds:
            seed_dir = out / f"seed{seed}"
            print(f"seed {seed}: the quickstart (cwm-rl)", file=sys.stderr)
            ours = run_cwm_rl(seed, seed_dir / "cwm_rl", args.overrides)
            env, held_out, train = job_data(seed, num_train=20_000, overrides=args.overrides)
            print(f"seed {seed}: TRL for {ours['seconds']:.0f} s", file=sys.stderr)
            theirs = run_trl(ours["warm_start"], seed, ours["seconds"], train, args.trl_groups_per_step, seed_dir / "trl",
                             args.overrides)
            before = held_out_accuracy(ours["warm_start"], env, held_out)
            result: dict[str, Any] = {"seed": seed}
            for system, run in (("cwm_rl", ours), ("trl", theirs)):
                scored: dict[Path, float] = {}  # a policy at several marks is scored once

                def accuracy(model: Path) -> float:
                    if model not in scored:
                        scored[model] = held_out_accuracy(model, env, held_out)
                    return scored[model]

                at_marks = {t: (accuracy(d), s, n) for t, (d, s, n) in run["marks"].items()}
                result[system] = figures(run, before, held_out_accuracy(run["model_dir"], env, held_out), at_marks)
            result["ratios"] = ratios(result["cwm_rl"], result["trl"])
            result["timeline_cwm_rl"] = ours["timeline"]
            result["trl_version"] = theirs["trl_version"]
            env.close()
            print(json.dumps(result), file=sys.stderr)
            results.append(result)
    goals = {"generated_tokens_per_s": 2.0, "steps_per_min": 1.5, "gain_per_min": 1.5}
    print(json.dumps({
        "bench": "vs_trl", "seeds": args.seeds, "trl_groups_per_step": args.trl_groups_per_step, "runs": results,
        "ratio_means": {k: round(statistics.mean(v), 3) if (v := [r["ratios"][k] for r in results if r["ratios"][k] is not None])
                        else None for k in goals},
        "goals": goals,
        "goals_met_every_seed": {k: all((r["ratios"][k] or 0) >= v for r in results) for k, v in goals.items()},
    }))


if __name__ == "__main__":
    main()
