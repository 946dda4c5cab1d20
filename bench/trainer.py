"""Benchmark the trainer: tokens/s of `Trainer.step` vs a bare PyTorch loop, publish vs a bare save.

In one run, on the same model and the same synthetic GRPO batches (groups of 8 trajectories,
64-256 tokens, half of each generated, random returns):
1. bare: for each micro-batch our packing produced (the same padded tensors), forward,
   log-softmax, gather, -(advantage x logprob x mask).sum() / constant, backward; then grad clip
   and AdamW step. Nothing else: no filters, metrics, entropy or mismatch KL;
2. ours: `Trainer.step(trajectories)` (filters, advantages, packing, loss, metrics, step);
3. publish: `WeightPublisher.publish` of the model's state dict vs `safetensors.torch.save_file`
   of the same tensors into the same directory.
Workloads alternate for --rounds rounds; medians are kept.

    .venv/bin/python bench/trainer.py [--preset small] [--steps 4] [--rounds 3] [--publish-root /dev/shm/...]

Goals (issue 4): ours >= 0.85 of bare tokens/s; publish <= 1.5x a bare save. The last line
printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would hide the
# `trainer` package: drop that folder (nothing is imported from it).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def synthetic_batches(num_steps: int, vocab_size: int, groups_per_step: int, group_size: int, seed: int):
    import random

    from cwm_rl.types import Trajectory, new_id

    rng = random.Random(seed)
    batches = []
    for _ in range(num_steps):
        batch = []
        for g in range(groups_per_step):
            group = new_id()
            for i in range(group_size):
                n = rng.randint(64, 256)
                n_prompt = n // 2
                ids = [rng.randrange(4, vocab_size // 2) for _ in range(n)]
                batch.append(Trajectory(
                    task_id=f"t{g}", env_id="bench/Synthetic-v0", group_id=group, sample_index=i, token_ids=ids,
                    loss_mask=[0] * n_prompt + [1] * (n - n_prompt), logprobs=[0.0] * n_prompt + [-6.0] * (n - n_prompt),
                    policy_versions=[-1] * n_prompt + [0] * (n - n_prompt), finish_reason="terminated", terminated=True,
                    **{"return": float(rng.random() < 0.5)}))
        batches.append(batch)
    return batches


def bare_step(model, optimizer, micro_batches, constant_tokens: int, max_grad_norm: float) -> None:
    import torch

    for b in micro_batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
        loss = -(b.advantages[:, 1:] * logprobs * b.loss_mask[:, 1:]).sum() / constant_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Model directory; default: a fresh model of --preset in a temp dir.")
    parser.add_argument("--preset", default="small", help="tiny or small (when --model is not given).")
    parser.add_argument("--steps", type=int, default=4, help="Optimiser steps per round and side.")
    parser.add_argument("--groups", type=int, default=4, help="Groups per step (8 trajectories each).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publish-root", help="Where to publish; default: /dev/shm if present, else a temp dir.")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from trainer.batching import collate, pack, prepare_samples
    from trainer.config import TrainerConfig
    from trainer.publish import WeightPublisher
    from trainer.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from cwm_rl.models import init_model

            model_dir = str(init_model(f"{tmp}/model", preset=args.preset, seed=0))
        config = TrainerConfig.model_validate({"optim": {"lr": 1e-4}, "filters": {"max_staleness": 10**6, "gibberish": False},
                                               "health": {"mismatch_check": False}})  # synthetic logprobs
        trainer = Trainer(config, model_dir, device="cpu")
        bare = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
        bare_optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-4, betas=(0.9, 0.95))
        vocab = trainer.vocab_size
        batches = synthetic_batches(args.steps, vocab, args.groups, 8, seed=0)
        # The bare loop gets the very micro-batches our packing makes (built before its clock starts).
        packed = []
        for batch in batches:
            prepared = prepare_samples(batch, policy_version=0, filters=config.filters, advantage=config.advantage, vocab_size=vocab)
            packed.append([collate(rows, trainer.pad_token_id) for rows in pack(prepared.samples, config.batch.micro_batch_tokens)])
        tokens_per_round = sum(t.num_tokens for b in batches for t in b)

        shm = Path("/dev/shm")
        publish_root = Path(args.publish_root) if args.publish_root else (shm if shm.is_dir() else Path(tmp)) / f"cwm-rl-bench-{time.time_ns()}"
        publisher = WeightPublisher(publish_root / "published", base_model_dir=model_dir, keep_last=2)
        bare_dir = publish_root / "bare"
        bare_dir.mkdir(parents=True, exist_ok=True)

        figures: dict[str, list[float]] = {"ours": [], "bare": [], "publish_s": [], "save_s": []}
        bare_step(bare, bare_optimizer, packed[0][:1], config.loss.constant_tokens, 1.0)  # warm-ups
        trainer.step(batches[0][:8])
        version = 0
        try:
            for _ in range(args.rounds):
                started = time.perf_counter()
                for micro_batches in packed:
                    bare_step(bare, bare_optimizer, micro_batches, config.loss.constant_tokens, 1.0)
                figures["bare"].append(tokens_per_round / (time.perf_counter() - started))

                started = time.perf_counter()
                for batch in batches:
                    result = trainer.step(batch)  # max_staleness 10**6: the version-0 batches are never dropped as stale
                    assert not result.skipped, result.metrics
                figures["ours"].append(tokens_per_round / (time.perf_counter() - started))

                for _ in range(3):
                    state = trainer.model.state_dict()
                    tensors = {k: v.detach().contiguous() for k, v in state.items() if k != "lm_head.weight" or not trainer.model.config.tie_word_embeddings}
                    started = time.perf_counter()
                    save_file(tensors, bare_dir / f"model-{version}.safetensors", metadata={"format": "pt"})
                    figures["save_s"].append(time.perf_counter() - started)
                    version += 1
                    started = time.perf_counter()
                    publisher.publish(version, state)
                    figures["publish_s"].append(time.perf_counter() - started)
                print("round:", {k: round(v[-1], 4) for k, v in figures.items()}, file=sys.stderr)
        finally:
            publisher.close()
            shutil.rmtree(publish_root, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in figures.items()}
        params = sum(p.numel() for p in trainer.model.parameters())

    print(json.dumps({
        "bench": "trainer",
        "model_parameters": params,
        "steps_per_round": args.steps,
        "trajectories_per_step": args.groups * 8,
        "tokens_per_round": tokens_per_round,
        "bare_tokens_per_s": round(med["bare"], 1),
        "ours_tokens_per_s": round(med["ours"], 1),
        "throughput_ratio_vs_bare": round(med["ours"] / med["bare"], 3),
        "bare_save_ms": round(med["save_s"] * 1000, 2),
        "publish_ms": round(med["publish_s"] * 1000, 2),
        "publish_ratio_vs_bare_save": round(med["publish_s"] / med["save_s"], 3),
        "rounds": args.rounds,
        "goal_throughput_ratio": 0.85,
        "goal_publish_ratio": 1.5,
    }))


if __name__ == "__main__":
    main()
