"""`cwm-rl rollout`: run episodes of one env against a frozen model on Ray and write Trajectories.

The quickest way to dry-run a new env with a model: N episodes spread over W rollout worker
actors (local Ray unless --ray-address), written as JSONL (one Trajectory per line), with a
summary of returns, finish reasons and throughput.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

from cwm_rl.types import Trajectory


def run_rollouts(worker_config: dict, num_episodes: int, group_size: int, num_workers: int, seed: int, out: Path,
                 ray_address: str | None = None) -> dict:
    """Run `num_episodes` episodes (in groups of `group_size`) on `num_workers` actors; write them to `out`."""
    import ray

    if num_episodes < 1 or group_size < 1 or num_workers < 1:
        raise ValueError(f"-n ({num_episodes}), --group-size ({group_size}) and --workers ({num_workers}) must be >= 1")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False,
             **({} if ray_address else {"num_cpus": max(num_workers, os.cpu_count() or 1)}))
    try:
        from rollout_workers.actor import rollout_worker_actor

        Worker = rollout_worker_actor(num_cpus=1)
        workers = [Worker.remote(worker_config) for _ in range(num_workers)]
        num_groups = math.ceil(num_episodes / group_size)
        seeds = [seed + i for i in range(num_groups)]
        shares = [seeds[w::num_workers] for w in range(num_workers)]
        results = ray.get([w.run_groups.remote(s, group_size) for w, s in zip(workers, shares) if s])
        ray.get([w.shutdown.remote() for w in workers])
    finally:
        ray.shutdown()
    trajectories = [Trajectory.model_validate_json(t) for batch in results for t in batch][:num_episodes]
    with out.open("w") as f:
        for t in trajectories:
            f.write(t.model_dump_json() + "\n")
    seconds = time.perf_counter() - started
    generated = sum(t.num_generated_tokens for t in trajectories)
    return {
        "episodes": len(trajectories),
        "mean_return": sum(t.return_ for t in trajectories) / len(trajectories),
        "finish_reasons": dict(Counter(t.finish_reason for t in trajectories)),
        "generated_tokens": generated,
        "seconds": round(seconds, 1),
        "out": str(out),
    }


def summary_line(summary: dict) -> str:
    return json.dumps(summary)
