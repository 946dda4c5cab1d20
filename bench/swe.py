"""Benchmark the SWE env's containers: what does an episode wait for?

Runs, in one process, on the shipped minicalc task's image:
1. acquiring an episode's container from the warm pool vs starting one cold (the same
   `docker run` settings plus copying the repository into its tmpfs: what `acquire` does when
   the pool is empty), alternating, median; the pool is refilled between runs, as in a steady job;
   and the same until the episode's bash session answers (what `reset` waits for);
2. the `bash` tool's round trip: one command (`true`) in the persistent shell, vs a fresh
   `docker exec` per command (what a shell-less design pays), and a whole env step
   (`<tool: bash>` parsed, run, observation with budget notice), medians.

    .venv/bin/python bench/swe.py [--runs 10] [--commands 50]

Goal (issue 7): pooled acquire <= 0.25x the cold start. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from envs.registry import make_env
from envs.swe.containers import ContainerPool
from envs.swe.images import task_image
from envs.swe.tasks import SWEInstance, load_tasks


def wait_ready(pool: ContainerPool, image: str, count: int = 1) -> None:
    deadline = time.monotonic() + 120
    while pool.ready(image) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm pool did not fill in 120 s")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--commands", type=int, default=50)
    args = parser.parse_args()

    instance = next(SWEInstance.from_task(t) for t in load_tasks() if t.id == "cwm-rl__minicalc-1")
    pool = ContainerPool(pool_size=1, max_containers=4)
    try:
        image = task_image(instance, pool.client)
        pool.acquire(image).release()  # image layers and daemon paths warm
        pooled_s, cold_s, pooled_ready_s, cold_ready_s = [], [], [], []
        for _ in range(args.runs):
            wait_ready(pool, image)
            started = time.perf_counter()
            container = pool.acquire(image)
            pooled_s.append(time.perf_counter() - started)
            container.shell().close()
            pooled_ready_s.append(time.perf_counter() - started)
            container.release()
            started = time.perf_counter()
            container = pool.acquire_cold(image, instance.workdir)  # what acquire does with an empty pool
            cold_s.append(time.perf_counter() - started)
            container.shell().close()
            cold_ready_s.append(time.perf_counter() - started)
            container.release()
        pooled_ms, cold_ms = 1000 * statistics.median(pooled_s), 1000 * statistics.median(cold_s)
        pooled_ready_ms, cold_ready_ms = 1000 * statistics.median(pooled_ready_s), 1000 * statistics.median(cold_ready_s)
        print(f"container for an episode: {pooled_ms:.2f} ms from the warm pool, {cold_ms:.0f} ms cold; with its bash "
              f"session started: {pooled_ready_ms:.0f} ms vs {cold_ready_ms:.0f} ms", flush=True)

        wait_ready(pool, image)
        container = pool.acquire(image)
        shell = container.shell()
        shell_s, exec_s = [], []
        for _ in range(args.commands):
            started = time.perf_counter()
            shell.run("true")
            shell_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run(["docker", "exec", "-u", "1000:1000", container.id, "true"], check=True)
            exec_s.append(time.perf_counter() - started)
        shell.close()
        container.release()
        shell_ms, exec_ms = 1000 * statistics.median(shell_s), 1000 * statistics.median(exec_s)
        print(f"bash round trip: {shell_ms:.1f} ms in the persistent shell, {exec_ms:.1f} ms as a fresh docker exec", flush=True)
    finally:
        pool.close()

    env = make_env("cwm_rl/SWE-v0", instance_ids=[instance.instance_id], pool_size=1)
    try:
        env.reset(seed=0)
        step_s = []
        for _ in range(args.commands):
            started = time.perf_counter()
            env.step("<tool: bash>\ntrue\n</tool>")
            step_s.append(time.perf_counter() - started)
            if env.done:
                env.reset(seed=0)
    finally:
        env.close()
    step_ms = 1000 * statistics.median(step_s)
    print(f"env step with a bash call: {step_ms:.1f} ms", flush=True)

    print(json.dumps({
        "bench": "swe", "runs": args.runs, "commands": args.commands,
        "acquire_pooled_ms": round(pooled_ms, 2), "acquire_cold_ms": round(cold_ms, 1),
        "acquire_pooled_over_cold": round(pooled_ms / cold_ms, 4),
        "ready_pooled_ms": round(pooled_ready_ms, 1), "ready_cold_ms": round(cold_ready_ms, 1),
        "ready_pooled_over_cold": round(pooled_ready_ms / cold_ready_ms, 3),
        "bash_roundtrip_ms": round(shell_ms, 2), "docker_exec_ms": round(exec_ms, 1), "env_bash_step_ms": round(step_ms, 2),
        "goal_acquire_pooled_over_cold": 0.25,
    }))


if __name__ == "__main__":
    main()
