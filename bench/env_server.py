"""Benchmark the env server: what does serving an env over HTTP cost?

Runs, in one process and one run:
1. step latency of the trivial `cwm_rl/Echo-v0` in-process (env.step) vs over HTTP through our
   env server and through the bare endpoint (p50/p99 of sequential steps; the overhead is HTTP
   p50 - in-process p50), over one keep-alive socket (headline) and with an httpx.Client;
2. steps/s with 64 concurrent sessions against our server, and against a bare FastAPI endpoint
   that returns a constant step result (the ceiling), both served by uvicorn in a subprocess with
   the same settings and driven by the same client code, twice: by a lean keep-alive socket
   driver (the headline figures: the server is the bottleneck) and by 64 `RemoteEnv` clients
   (httpx, what a rollout worker sees; there the client's own CPU is most of the cost).

    .venv/bin/python bench/env_server.py [--seconds 5] [--rounds 3]

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

from envs.server.local import free_port

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

    serve(EnvServerConfig(host="127.0.0.1", port=port, max_sessions=4 * NUM_SESSIONS))


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


def _open_session(url: str) -> str:
    r = httpx.post(url + "/v1/sessions", json={"env_id": "cwm_rl/Echo-v0", "seed": 0, "env_kwargs": {"num_rounds": ROUNDS_PER_EPISODE}})
    return r.json()["session_id"]


def httpx_latency(url: str, num_steps: int) -> list[float]:
    """Sequential step round trips with an httpx.Client (client CPU included)."""
    sid = _open_session(url)
    with httpx.Client(base_url=url, timeout=30) as c:
        samples = []
        for i in range(num_steps):
            t = time.perf_counter()
            r = c.post(f"/v1/sessions/{sid}/step", json={"action": "apple", "request_id": str(i)})
            samples.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        c.delete(f"/v1/sessions/{sid}")
    return samples


def raw_latency(url: str, num_steps: int) -> list[float]:
    """Sequential step round trips over one keep-alive socket with a pre-built request (server cost)."""
    sid = _open_session(url)
    host, port = url.removeprefix("http://").split(":")
    samples = []
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(num_steps):
            body = json.dumps({"action": "apple", "request_id": str(i)}).encode()
            request = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                       f"content-length: {len(body)}\r\n\r\n").encode() + body
            t = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            while len(rest) < length:
                rest += sock.recv(65536)
            samples.append(time.perf_counter() - t)
            assert head.startswith(b"HTTP/1.1 200"), head
    httpx.delete(f"{url}/v1/sessions/{sid}")
    return samples


async def _open_sessions(url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        body = {"env_id": "cwm_rl/Echo-v0", "env_kwargs": {"num_rounds": ROUNDS_PER_EPISODE}}
        return [(await c.post("/v1/sessions", json={**body, "seed": i})).json()["session_id"] for i in range(NUM_SESSIONS)]


async def _close_sessions(url: str, sids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        await asyncio.gather(*(c.delete(f"/v1/sessions/{s}") for s in sids))


async def client_throughput(url: str, seconds: float) -> float:
    """Steps/s of 64 sessions driven by 64 `RemoteEnv`s (our httpx client, as a rollout worker uses it)."""
    from envs.server.client import RemoteEnv

    remotes = [RemoteEnv(url, "cwm_rl/Echo-v0", env_kwargs={"num_rounds": ROUNDS_PER_EPISODE}) for _ in range(NUM_SESSIONS)]
    await asyncio.gather(*(env.areset(seed=i) for i, env in enumerate(remotes)))
    count, stop_at = 0, time.perf_counter() + seconds

    async def player(env) -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            await env.astep("apple")
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(player(env) for env in remotes))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(env.aclose() for env in remotes))
    return count / elapsed


async def raw_throughput(url: str, seconds: float) -> float:
    """Steps/s of 64 sessions driven over 64 keep-alive sockets with pre-built HTTP/1.1 requests.

    An httpx client costs more CPU per request than the server does, so with it the client is
    mostly what gets measured; this lean driver leaves the server as the bottleneck."""
    sids = await _open_sessions(url)
    host, port = url.removeprefix("http://").split(":")
    count, stop_at = 0, time.perf_counter() + seconds

    async def player(sid: str) -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection(host, int(port))
        i = 0
        while time.perf_counter() < stop_at:
            body = json.dumps({"action": "apple", "request_id": f"{sid}-{i}"}).encode()
            writer.write(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            count, i = count + 1, i + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(player(s) for s in sids))
    elapsed = time.perf_counter() - started
    await _close_sessions(url, sids)
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="Duration of each throughput measurement.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating bare/ours rounds; the median of each is kept.")
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
        raw_latency(ours_url, 200)  # warm-up
        lat = {}
        for kind, url in (("bare", bare_url), ("ours", ours_url)):
            lat[f"{kind}_raw"] = percentiles(raw_latency(url, args.latency_steps))
            lat[f"{kind}_httpx"] = percentiles(httpx_latency(url, args.latency_steps))
        tps: dict[str, list[float]] = {"bare_raw": [], "ours_raw": [], "bare_httpx": [], "ours_httpx": []}
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
            for kind, url in (("bare", bare_url), ("ours", ours_url)):
                tps[f"{kind}_raw"].append(asyncio.run(raw_throughput(url, args.seconds)))
                tps[f"{kind}_httpx"].append(asyncio.run(client_throughput(url, args.seconds)))
            print("round:", {k: round(v[-1]) for k, v in tps.items()}, file=sys.stderr)
    finally:
        for proc in (bare_proc, ours_proc):
            proc.terminate()
            proc.wait(timeout=15)

    med = {k: statistics.median(v) for k, v in tps.items()}
    figures = {
        "bench": "env_server",
        "in_process_p50_ms": round(local["p50_ms"], 4),
        "in_process_p99_ms": round(local["p99_ms"], 4),
        "http_p50_ms": round(lat["ours_raw"]["p50_ms"], 3),
        "http_p99_ms": round(lat["ours_raw"]["p99_ms"], 3),
        "bare_http_p50_ms": round(lat["bare_raw"]["p50_ms"], 3),
        "p50_overhead_ms": round(lat["ours_raw"]["p50_ms"] - local["p50_ms"], 3),
        "p50_overhead_vs_bare_ms": round(lat["ours_raw"]["p50_ms"] - lat["bare_raw"]["p50_ms"], 3),
        "httpx_client_http_p50_ms": round(lat["ours_httpx"]["p50_ms"], 3),
        "httpx_client_bare_http_p50_ms": round(lat["bare_httpx"]["p50_ms"], 3),
        "steps_per_s_64_sessions": round(med["ours_raw"], 1),
        "bare_steps_per_s_64_sessions": round(med["bare_raw"], 1),
        "throughput_ratio_vs_bare": round(med["ours_raw"] / med["bare_raw"], 3),
        "httpx_client_steps_per_s_64_sessions": round(med["ours_httpx"], 1),
        "httpx_client_bare_steps_per_s_64_sessions": round(med["bare_httpx"], 1),
        "httpx_client_ratio_vs_bare": round(med["ours_httpx"] / med["bare_httpx"], 3),
        "rounds": args.rounds,
        "goal_p50_overhead_ms": 2.0,
        "goal_throughput_ratio": 0.8,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
