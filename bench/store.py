"""How fast the rollout store takes and gives back trajectories of about 2 k tokens.

    .venv/bin/python bench/store.py            # about 20 s

What it runs: 4-turn trajectories of 1,900 tokens (1,400 generated, float32 logprobs as vLLM
gives them), stored with `RolloutStore.add` in batches of 1 and of 64, with the default
`synchronous=NORMAL` and with `durable=True` (an fsync per commit); the baseline appends the
same trajectories as JSON lines to a file (flush per batch, no fsync), the cheapest durable-to-
kill -9 record there is. Then reads: a filtered query, `get` by id prefix, `buffered()` (what a
resumed run reloads) and a Parquet export. The last line is one JSON object of the figures.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from cwm_rl.store import RolloutStore
from cwm_rl.types import NO_VERSION, Message, Span, Trajectory, Turn, new_id

NUM_TRAJECTORIES = 1024


def make(rng: random.Random, nprng: np.random.Generator, i: int) -> Trajectory:
    prompt, action, observation, num_turns = 200, 350, 100, 4
    ids, mask, logprobs, versions, turns = [], [], [], [], []

    def add(n: int, generated: bool) -> Span:
        start = len(ids)
        ids.extend(nprng.integers(0, 150_000, n).tolist())
        mask.extend([int(generated)] * n)
        logprobs.extend((-nprng.exponential(1.0, n).astype(np.float32)).astype(float).tolist() if generated else [0.0] * n)
        versions.extend([i // 64 if generated else NO_VERSION] * n)
        return Span(start=start, end=len(ids))

    add(prompt, False)
    messages = [Message(role="user", content="Solve: " + "x" * 800)]
    for k in range(num_turns):
        action_span = add(action, True)
        last = k == num_turns - 1
        obs = [Message(role="user", content="tests: 3 passed, 1 failed " * 10)]
        turns.append(Turn(index=k, action="def f(x): return x  # " * 60, observation=obs, reward=float(last and rng.random() < 0.5),
                          info={"passed": 3}, action_span=action_span, observation_span=None if last else add(observation, False)))
    return Trajectory(task_id=f"task-{i // 8}", env_id="cwm_rl/Code-v0", group_id=f"g{i // 8}", sample_index=i % 8,
                      token_ids=ids, loss_mask=mask, logprobs=logprobs, policy_versions=versions, turns=turns, messages=messages,
                      finish_reason="terminated", terminated=True, **{"return": sum(t.reward for t in turns)})


def fresh_ids(trajectories: list[Trajectory]) -> None:
    for t in trajectories:
        t.trajectory_id = new_id()


def main() -> None:
    rng, nprng = random.Random(0), np.random.default_rng(0)
    trajectories = [make(rng, nprng, i) for i in range(NUM_TRAJECTORIES)]
    figures: dict[str, float] = {"bench": "store", "tokens_per_trajectory": trajectories[0].num_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 64):
            out = Path(tmp, f"baseline-{batch}.jsonl")
            started = time.perf_counter()
            with out.open("w") as f:
                for i in range(0, NUM_TRAJECTORIES, batch):
                    f.write("".join(t.model_dump_json() + "\n" for t in trajectories[i:i + batch]))
                    f.flush()
            figures[f"jsonl_append_per_s_batch_{batch}"] = round(NUM_TRAJECTORIES / (time.perf_counter() - started))
            for durable in (False, True):
                fresh_ids(trajectories)
                with RolloutStore(Path(tmp, f"run-{batch}-{durable}"), durable=durable) as store:
                    started = time.perf_counter()
                    for i in range(0, NUM_TRAJECTORIES, batch):
                        store.add(trajectories[i:i + batch])
                    name = f"add_per_s_batch_{batch}" + ("_durable" if durable else "")
                    figures[name] = round(NUM_TRAJECTORIES / (time.perf_counter() - started))
        store = RolloutStore(Path(tmp, "run-64-False"), create=False)
        figures["bytes_per_trajectory"] = round(store.path.stat().st_size / NUM_TRAJECTORIES)
        started = time.perf_counter()
        for _ in range(20):
            rows = store.query(env="cwm_rl/Code-v0", min_return=1.0, order="-return", limit=20)
        figures["query_20_rows_ms"] = round((time.perf_counter() - started) / 20 * 1e3, 2)
        started = time.perf_counter()
        for row in rows:
            store.get(row.trajectory_id[:8])
        figures["get_by_prefix_ms"] = round((time.perf_counter() - started) / len(rows) * 1e3, 2)
        started = time.perf_counter()
        reloaded = store.buffered()
        figures["buffered_reload_per_s"] = round(len(reloaded) / (time.perf_counter() - started))
        started = time.perf_counter()
        store.export_parquet(Path(tmp, "all.parquet"))
        figures["export_parquet_per_s"] = round(NUM_TRAJECTORIES / (time.perf_counter() - started))
        store.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
