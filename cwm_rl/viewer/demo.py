"""A made-up but realistic run directory to try the viewer on, without a training job.

    .venv/bin/python -m cwm_rl.viewer.demo /tmp/demo-run && cwm-rl view /tmp/demo-run

It writes what a job writes: `rollouts.sqlite` (arithmetic and code episodes in GRPO groups of
`group_size`, one to three turns, over `num_steps` trainer steps: trained with training records,
dropped as stale, still buffered, and eval episodes), `metrics.jsonl`, `config.yaml`, and with
`analysis=True` an `analysis.sqlite` holding a replay, a rescore set and a branch set. With
`tokenizer=True` (needs transformers) it trains cwm-rl's small tokenizer into `model/init`, so the
token ids are real and the viewer shows their text; otherwise the ids are the text's bytes.
The viewer's tests and its screenshots (docs/img/viewer-*.png) are made from this run.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import yaml

from cwm_rl.replay.results import AnalysisStore, BranchSet, FieldDiff, ReplayReport, RescoreResult, RescoreSet, TurnDiff
from cwm_rl.store import RolloutStore
from cwm_rl.types import NO_VERSION, Message, Span, TrainingRecord, Trajectory, Turn, new_id

ENVS = ("cwm_rl/Math-v0", "cwm_rl/Code-v0")
SYSTEM = "Think step by step inside <think> </think>, then give the final answer in \\boxed{}."


class Tokens:
    """Text to token ids: the trained tokenizer's, or the UTF-8 bytes when there is none."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if self.tokenizer else list(text.encode())


def _task(rng: random.Random, env_id: str, index: int) -> tuple[str, str, str]:
    """(task id, prompt, correct answer)."""
    if env_id.endswith("Math-v0"):
        a, b = rng.randrange(12, 99), rng.randrange(3, 40)
        return f"arith-{index}", f"What is {a} * {b}?", str(a * b)
    n = rng.randrange(3, 9)
    return f"code-{index}", f"Write a Python function f(n) that returns the sum of the squares of 1..n. What is f({n})?", \
        str(sum(k * k for k in range(1, n + 1)))


def _action(rng: random.Random, env_id: str, answer: str, correct: bool) -> tuple[str, str]:
    """(the model's text, the answer it gave)."""
    given = answer if correct else str(int(answer) + rng.choice((-10, -1, 1, 2, 7)))
    if env_id.endswith("Math-v0"):
        return f"<think>Multiply step by step; the product is {given}.</think> The answer is \\boxed{{{given}}}.", given
    code = "def f(n):\n    return sum(k * k for k in range(1, n + 1))" if correct else "def f(n):\n    return sum(k * k for k in range(n))"
    return f"<think>Loop and add squares.</think>\n```python\n{code}\n```\nSo \\boxed{{{given}}}.", given


def make_group(rng: random.Random, tokens: Tokens, *, env_id: str, index: int, version: int, group_size: int,
               skill: float) -> list[Trajectory]:
    """One GRPO group: `group_size` episodes of one task, each correct with probability `skill` per turn."""
    task_id, prompt, answer = _task(rng, env_id, index)
    group_id = new_id()
    out = []
    for sample in range(group_size):
        ids, mask, logprobs, versions, turns = [], [], [], [], []

        def add(text: str, generated: bool, v: int = NO_VERSION) -> Span:
            start = len(ids)
            for token in tokens(text):
                ids.append(token)
                mask.append(int(generated))
                # Mostly confident tokens, now and then a surprising one (what the logprob colours should show).
                lp = -(rng.uniform(2.0, 7.0) if rng.random() < 0.07 else rng.expovariate(4.0)) if generated else 0.0
                logprobs.append(round(lp, 6))
                versions.append(v if generated else NO_VERSION)
            return Span(start=start, end=len(ids))

        messages = [Message(role="system", content=SYSTEM), Message(role="user", content=prompt)]
        add(f"<|begin_of_text|><|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n", False)
        num_turns, finish = rng.choice((1, 1, 2, 3)), "max_turns"
        for k in range(num_turns):
            correct = rng.random() < skill
            text, given = _action(rng, env_id, answer, correct)
            span = add(text + "<|im_end|>", True, max(version - rng.choice((0, 0, 0, 1)), 0))
            last = correct or k == num_turns - 1
            feedback = "Correct." if correct else f"Not quite: {given} is wrong." + ("" if last else " Try again.")
            observation = [Message(role="user", content=feedback)]
            obs_span = None if last else add(f"\n<|im_start|>user\n{feedback}<|im_end|>\n<|im_start|>assistant\n", False)
            turns.append(Turn(index=k, action=text, observation=observation, reward=float(correct), action_span=span,
                              observation_span=obs_span, info={"answer": given, "expected": answer, "correct": correct},
                              generate_s=round(rng.uniform(0.2, 2.0), 3), env_s=round(rng.uniform(0.001, 0.05), 4)))
            messages += [Message(role="assistant", content=text)] + ([] if last else observation)
            if correct:
                finish = "terminated"
                break
        out.append(Trajectory(
            run_id="demo", env_id=env_id, task_id=task_id, group_id=group_id, sample_index=sample, token_ids=ids,
            loss_mask=mask, logprobs=logprobs, policy_versions=versions, turns=turns, messages=messages,
            finish_reason=finish, terminated=finish == "terminated", reward_details={"expected": answer},
            seed=index, created_at=1_760_000_000.0 + index * 7.0 + sample, **{"return": sum(t.reward for t in turns)}))
    return out


def training_records(rng: random.Random, group: list[Trajectory], step: int) -> list[TrainingRecord]:
    """What a GRPO step with truncated importance sampling (C = 2) would have kept for each sample."""
    returns = [t.return_ for t in group]
    mean = sum(returns) / len(returns)
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / len(returns))
    records = []
    for t in group:
        behaviour = [lp for lp, m in zip(t.logprobs, t.loss_mask) if m]
        trainer = [min(0.0, lp + rng.gauss(0, 0.04) + (rng.uniform(-1.5, 1.5) if rng.random() < 0.03 else 0.0)) for lp in behaviour]
        weights = [min(math.exp(tr - b), 2.0) for tr, b in zip(trainer, behaviour)]
        advantage = (t.return_ - mean) / (std + 1e-6)
        # As trainer/loss.py's clip_flags with the ratio against vLLM's logprobs: only where clipping stops the gradient.
        ratios = [math.exp(tr - b) for tr, b in zip(trainer, behaviour)]
        clipped = [1 if r > 1.25 and advantage > 0 else -1 if r < 0.8 and advantage < 0 else 0 for r in ratios]
        records.append(TrainingRecord(trajectory_id=t.trajectory_id, step=step, advantage=advantage,
                                      trainer_logprobs=trainer, is_weights=weights, clipped=clipped))
    return records


def build_demo(run_dir: str | Path, *, num_steps: int = 12, group_size: int = 4, groups_per_step: int = 3,
               tokenizer: bool = False, analysis: bool = True, seed: int = 0) -> Path:
    """Write the demo run into `run_dir` (created; must not hold a store yet). Returns the directory."""
    run_dir = Path(run_dir)
    if (run_dir / "rollouts.sqlite").exists():
        raise ValueError(f"{run_dir} already holds a rollout store; pick an empty directory for the demo run")
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tokens = Tokens(_tokenizer(run_dir) if tokenizer else None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"mode": "async", "steps": num_steps, "model": {"path": None},
                                                         "envs": [{"id": e} for e in ENVS]}, sort_keys=False))
    index = 0
    with RolloutStore(run_dir) as store, (run_dir / "metrics.jsonl").open("w") as metrics:
        for step in range(num_steps):
            skill = 0.25 + 0.6 * step / max(num_steps - 1, 1)
            groups = []
            for _ in range(groups_per_step):
                groups.append(make_group(rng, tokens, env_id=ENVS[index % 2], index=index, version=step, group_size=group_size,
                                         skill=skill))
                index += 1
            for g in groups:
                store.add(g)
            if step == num_steps - 1:
                break  # the newest groups stay buffered: the trainer has not taken them yet
            stale, trained = groups[:1] if step % 4 == 3 else [], groups[1:] if step % 4 == 3 else groups
            records = [r for g in trained for r in training_records(rng, g, step)]
            store.mark_step(step, [t.trajectory_id for g in trained for t in g],
                            {"stale": [t.trajectory_id for g in stale for t in g]} if stale else {}, records)
            batch = [t for g in trained for t in g]
            metrics.write(json.dumps({"step": step, "reward_mean": sum(t.return_ for t in batch) / len(batch),
                                      "loss": round(0.4 * math.exp(-step / 6) + rng.uniform(0, 0.05), 4),
                                      "tokens_per_s": round(rng.uniform(550, 700), 1)}) + "\n")
            if step % 4 == 3:
                evals = make_group(rng, tokens, env_id=ENVS[0], index=index, version=step, group_size=group_size, skill=skill)
                index += 1
                store.add(evals, status="eval")
                metrics.write(json.dumps({"step": step, "eval_accuracy": sum(t.return_ > 0 for t in evals) / len(evals)}) + "\n")
        if analysis:
            _analysis(rng, run_dir, store, tokens)
    return run_dir


def _tokenizer(run_dir: Path) -> Any:
    from cwm_rl.models.tokenizer import train_tokenizer

    tok = train_tokenizer(seed=0)
    tok.save_pretrained(str(run_dir / "model" / "init"))
    return tok


def _analysis(rng: random.Random, run_dir: Path, store: RolloutStore, tokens: Tokens) -> None:
    """A replay (one identical, one diverged), a rescore set with flips, and a branch set."""
    rows = store.query(status="trained", order="-stored", limit=40)
    multi = next(r for r in rows if r.num_turns > 1)
    with AnalysisStore(run_dir) as results:
        first = store.get(rows[0].trajectory_id)
        results.add_replay(ReplayReport(trajectory_id=first.trajectory_id, env_id=first.env_id, task_id=first.task_id,
                                        target="in-process", recorded_return=first.return_, replayed_return=first.return_,
                                        turns=[TurnDiff(turn=-1), *[TurnDiff(turn=t.index) for t in first.turns]],
                                        replayed_rewards=[t.reward for t in first.turns]))
        t = store.get(multi.trajectory_id)
        diffs = [TurnDiff(turn=-1, diffs=[FieldDiff(field="reset.info.seed_source", recorded="task", replayed="task-file",
                                                    expected="the env records where the seed came from")])]
        for turn in t.turns:
            changed = turn.index == len(t.turns) - 1
            diffs.append(TurnDiff(turn=turn.index, diffs=[FieldDiff(field="reward", recorded=turn.reward, replayed=1.0 - turn.reward),
                                                          FieldDiff(field="info.correct", recorded=turn.info.get("correct"),
                                                                    replayed=not turn.info.get("correct"))] if changed else []))
        new_rewards = [t2.reward if i < len(t.turns) - 1 else 1.0 - t2.reward for i, t2 in enumerate(t.turns)]
        results.add_replay(ReplayReport(trajectory_id=t.trajectory_id, env_id=t.env_id, task_id=t.task_id, target="in-process",
                                        recorded_return=t.return_, replayed_return=sum(new_rewards), turns=diffs,
                                        replayed_rewards=new_rewards))
        rescore = RescoreSet(label="verifier: accept answers within 2 (--kwarg tolerance=2)", env_kwargs={"tolerance": 2},
                             filters={"status": "trained"})
        results_list = []
        failed = store.query(status="trained", max_return=0.0, limit=10)
        for row in [*failed, *(r for r in rows if r.return_ > 0)][:16]:
            old = store.get(row.trajectory_id)
            near = abs(int(old.turns[-1].info["answer"]) - int(old.turns[-1].info["expected"])) <= 2
            new = [turn.reward for turn in old.turns[:-1]] + [1.0 if near else old.turns[-1].reward]
            results_list.append(RescoreResult(rescore_id=rescore.rescore_id, trajectory_id=old.trajectory_id, env_id=old.env_id,
                                              task_id=old.task_id, old_return=old.return_, new_return=sum(new),
                                              old_rewards=[turn.reward for turn in old.turns], new_rewards=new))
        rescore.num_trajectories = len(results_list)
        rescore.num_changed = sum(r.old_rewards != r.new_rewards for r in results_list)
        rescore.num_flipped = sum(r.flipped for r in results_list)
        rescore.mean_return_before = sum(r.old_return for r in results_list) / len(results_list)
        rescore.mean_return_after = sum(r.new_return or 0.0 for r in results_list) / len(results_list)
        results.add_rescore(rescore, results_list)
        # Branch: four continuations of the multi-turn episode from its last turn, by a newer policy.
        k = len(t.turns) - 1
        continuations = [_continuation(rng, tokens, t, k, sample, correct=rng.random() < 0.6) for sample in range(4)]
        branch = BranchSet(trajectory_id=t.trajectory_id, env_id=t.env_id, task_id=t.task_id, turn=k,
                           model="runs/demo/checkpoints/step-11", policy_version=11,
                           prefix_tokens=t.turns[-1].action_span.start, temperature=1.0, original_return=t.return_,
                           returns=[c.return_ for c in continuations], finish_reasons=[c.finish_reason for c in continuations])
        results.add_branch(branch, continuations)


def _continuation(rng: random.Random, tokens: Tokens, t: Trajectory, k: int, sample: int, correct: bool) -> Trajectory:
    """`t` up to its turn k's action (the exact token prefix), then a new action for turn k."""
    start = t.turns[k].action_span.start
    ids, mask, logprobs, versions = (list(a[:start]) for a in (t.token_ids, t.loss_mask, t.logprobs, t.policy_versions))
    text, given = _action(rng, t.env_id, str(t.reward_details["expected"]), correct)
    new = tokens(text + "<|im_end|>")
    ids += new
    mask += [1] * len(new)
    logprobs += [round(-rng.expovariate(4.0), 6) for _ in new]
    versions += [11] * len(new)
    turn = Turn(index=k, action=text, reward=float(correct), action_span=Span(start=start, end=len(ids)),
                observation=[Message(role="user", content="Correct." if correct else f"Not quite: {given} is wrong.")],
                info={"answer": given, "expected": t.reward_details["expected"], "correct": correct})
    turns = [*t.turns[:k], turn]
    return Trajectory(run_id=t.run_id, env_id=t.env_id, task_id=t.task_id, group_id=t.group_id, sample_index=sample,
                      token_ids=ids, loss_mask=mask, logprobs=logprobs, policy_versions=versions, turns=turns,
                      messages=[*t.messages[:2 + 2 * k], Message(role="assistant", content=text)],
                      finish_reason="terminated" if correct else "max_turns", terminated=correct,
                      reward_details=t.reward_details, **{"return": sum(x.reward for x in turns)})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cwm_rl.viewer.demo OUT_DIR")
    print(build_demo(sys.argv[1], tokenizer=True))
