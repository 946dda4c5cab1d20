"""Benchmark the env server: what does serving an env over HTTP cost?

Runs, in one process and one run:
1. step latency of the trivial `cwm_rl/Echo-v0` in-process (env.step) vs over HTTP through our
   env server (p50/p99; the overhead is HTTP p50 - in-process p50);
2. steps/s with 64 concurrent sessions against our server, and against a bare FastAPI endpoint
   that returns a constant step result (the ceiling), both served by uvicorn in a subprocess with
   the same settings and driven by the same httpx client code.

    .venv/bin/python bench/env_server.py [--seconds 8] [--rounds 2]

Goals (issue 2): p50 overhead <= 2 ms; throughput >= 0.8x the bare endpoint.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
NUM_SESSIONS = 64
ROUNDS_PER_EPISODE = 5_000  # Echo episodes long enough that no session ends mid-measurement


# ----- the two servers (run as subprocesses of this script) -----
def serve_bare(port: int) -> None:
    """The ceiling: FastAPI + uvicorn returning a constant step result, no env, no sessions."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    created = {"session_id": "s", "env_id": "bare", "observation": [{"role": "user", "content": "Repeat exactly: apple"}], "info": {}}
    result = {"observation": [{"role": "user", "content": "Repeat exactly: apple"}], "reward": 1.0,
              "terminated": False, "truncated": False, "info": {"expected": "apple", "correct": True}}

    @app.post("/v1/sessions")
    async def create(body: dict) -> dict:
        return created

    @app.get("/v1/envs")
    async def envs() -> list:
        return []

    @app.delete("/v1/sessions/{session_id}")
    async def delete(session_id: str) -> dict:
        return {"deleted": session_id}

    @app.post("/v1/sessions/{session_id}/step")
    async def step(session_id: str, body: dict) -> dict:
        return result

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_ours(port: int) -> None:
    from envs.server.app import serve
    from envs.server.config import EnvServerConfig

    serve(EnvServerConfig(host="127.0.0.1", port=port, max_sessions=NUM_SESSIONS + 8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/v1/envs", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


# ----- measurements -----
def percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50_ms": 1e3 * statistics.median(samples), "p99_ms": 1e3 * samples[int(0.99 * (len(samples) - 1))]}


def in_process_latency(num_steps: int) -> list[float]:
    from envs import make_env

    env = make_env("cwm_rl/Echo-v0", num_rounds=ROUNDS_PER_EPISODE)
    env.reset(seed=0)
    samples = []
    for _ in range(num_steps):
        t = time.perf_counter()
        env.step("apple")
        samples.append(time.perf_counter() - t)
    return samples


def http_latency(url: str, num_steps: int) -> list[float]:
    with httpx.Client(base_url=url, timeout=30) as c:
        sid = c.post("/v1/sessions", json={"env_id": "cwm_rl/Echo-v0", "seed": 0,
                                           "env_kwargs": {"num_rounds": ROUNDS_PER_EPISODE}}).json()["session_id"]
        samples = []
        for i in range(num_steps):
            t = time.perf_counter()
            r = c.post(f"/v1/sessions/{sid}/step", json={"action": "apple", "request_id": str(i)})
            samples.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        c.delete(f"/v1/sessions/{sid}")
        return samples


async def concurrent_throughput(url: str, seconds: float) -> float:
    limits = httpx.Limits(max_connections=NUM_SESSIONS, max_keepalive_connections=NUM_SESSIONS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
        body = {"env_id": "cwm_rl/Echo-v0", "env_kwargs": {"num_rounds": ROUNDS_PER_EPISODE}}
        sids = [(await c.post("/v1/sessions", json={**body, "seed": i})).json()["session_id"] for i in range(NUM_SESSIONS)]
        count = 0
        stop_at = time.perf_counter() + seconds

        async def player(sid: str) -> None:
            nonlocal count
            i = 0
            while time.perf_counter() < stop_at:
                r = await c.post(f"/v1/sessions/{sid}/step", json={"action": "apple", "request_id": f"{sid}-{i}"})
                assert r.status_code == 200, r.text
                count += 1
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(player(s) for s in sids))
        elapsed = time.perf_counter() - started
        await asyncio.gather(*(c.delete(f"/v1/sessions/{s}") for s in sids))
        return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Duration of each throughput measurement.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating bare/ours rounds; the best of each is kept.")
    parser.add_argument("--latency-steps", type=int, default=2000)
    parser.add_argument("--serve", choices=["bare", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        (serve_bare if args.serve == "bare" else serve_ours)(args.port)
        return

    local = percentiles(in_process_latency(args.latency_steps))
    bare_proc, bare_url = start("bare")
    ours_proc, ours_url = start("ours")
    try:
        http_latency(ours_url, 200)  # warm-up
        ours_lat = percentiles(http_latency(ours_url, args.latency_steps))
        bare_lat = percentiles(http_latency(bare_url, args.latency_steps))
        bare_tps, ours_tps = [], []
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
            bare_tps.append(asyncio.run(concurrent_throughput(bare_url, args.seconds)))
            ours_tps.append(asyncio.run(concurrent_throughput(ours_url, args.seconds)))
            print(f"round: bare {bare_tps[-1]:.0f} steps/s, ours {ours_tps[-1]:.0f} steps/s", file=sys.stderr)
    finally:
        for proc in (bare_proc, ours_proc):
            proc.terminate()
            proc.wait(timeout=15)

    figures = {
        "bench": "env_server",
        "in_process_p50_ms": round(local["p50_ms"], 4),
        "in_process_p99_ms": round(local["p99_ms"], 4),
        "http_p50_ms": round(ours_lat["p50_ms"], 3),
        "http_p99_ms": round(ours_lat["p99_ms"], 3),
        "bare_http_p50_ms": round(bare_lat["p50_ms"], 3),
        "p50_overhead_ms": round(ours_lat["p50_ms"] - local["p50_ms"], 3),
        "steps_per_s_64_sessions": round(max(ours_tps), 1),
        "bare_steps_per_s_64_sessions": round(max(bare_tps), 1),
        "throughput_ratio_vs_bare": round(max(ours_tps) / max(bare_tps), 3),
        "goal_p50_overhead_ms": 2.0,
        "goal_throughput_ratio": 0.8,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
