"""`cwm-rl model play`: a frozen model plays episodes of one env on Ray; Trajectories go to a JSONL file.

The quickest way to dry-run a new env with a model: N episodes spread over W rollout worker
actors (local Ray unless `ray_address`), written one Trajectory per line, with a summary of
returns, finish reasons and throughput. (`cwm-rl env play` is the same with you as the model.)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

from cwm_rl.types import Trajectory
from rollout_workers.config import WorkerConfig


def play_model(worker_config: WorkerConfig, num_episodes: int, group_size: int, num_workers: int, seed: int, out: Path,
               ray_address: str | None = None) -> dict:
    """Run `num_episodes` episodes (in groups of `group_size`, group g seeded `seed + g`) on `num_workers` actors;
    write them to `out`. Returns the summary."""
    import ray

    from cwm_rl.loop.workers import start_ray

    if num_episodes < 1 or group_size < 1 or num_workers < 1:
        raise ValueError(f"-n ({num_episodes}), --group-size ({group_size}) and --workers ({num_workers}) must be >= 1")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    started_ray = start_ray(ray_address, num_workers)
    try:
        from rollout_workers.actor import rollout_worker_actor

        Worker = rollout_worker_actor(num_cpus=1)
        workers = [Worker.remote(worker_config.model_dump()) for _ in range(num_workers)]
        num_groups = math.ceil(num_episodes / group_size)
        seeds = [seed + i for i in range(num_groups)]
        shares = [seeds[w::num_workers] for w in range(num_workers)]
        results = ray.get([w.run_groups.remote(s, group_size) for w, s in zip(workers, shares) if s])
        ray.get([w.shutdown.remote() for w in workers])
        for w in workers:  # a shut-down worker's process must end (on a cluster this joined, too)
            ray.kill(w, no_restart=True)
    finally:
        if started_ray:
            ray.shutdown()
    trajectories = [Trajectory.model_validate_json(t) for batch in results for t in batch][:num_episodes]
    with out.open("w") as f:
        for t in trajectories:
            f.write(t.model_dump_json() + "\n")
    return {
        "episodes": len(trajectories),
        "mean_return": sum(t.return_ for t in trajectories) / len(trajectories),
        "finish_reasons": dict(Counter(t.finish_reason for t in trajectories)),
        "generated_tokens": sum(t.num_generated_tokens for t in trajectories),
        "seconds": round(time.perf_counter() - started, 1),
        "out": str(out),
    }
