"""Soak the env server: 256 concurrent sessions playing full episodes for minutes, on one server.

What must hold (issue 18): no errors, flat memory, a bounded step latency. Runs, in one run:
- one env server, a uvicorn subprocess started as `cwm-rl env serve` runs it, taking at most
  `--sessions` sessions (so a session the server failed to free would show up as a 429 error);
- `--sessions` players, each with its own HTTP connection (as each `RemoteEnv` has), playing
  episodes back to back until `--seconds` have passed: create a session, read its state for the
  answer, step with the right answer until the episode ends, delete it. Odd players play
  `cwm_rl/Echo-v0` (3 turns, stepped on the event loop), even ones `cwm_rl/Math-v0` (1 turn,
  stepped on an env thread and graded in the verifier pool).
An error is any transport failure, any answer but the one expected (status, reward, episode end),
or a session left on the server at the end. Warm-up: until `--warmup-episodes` episodes (default
4 per session) are done and `--warmup` seconds have passed; the server's RSS climbs for about as
long (its allocator's high-water mark, the create-retry memo of 4 ids per session, the first full
garbage collections). Then the soak proper runs for `--seconds`: `rss_start_mb` is the server
process's RSS as it begins, `rss_end_mb` as it ends (every session still live), and the steps,
episodes and step latencies (p50/p99, from request to answer) are counted over it.

    .venv/bin/python bench/env_server_soak.py [--seconds 180] [--sessions 256]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from envs.server.local import free_port

ROOT = Path(__file__).resolve().parents[1]
ENVS = ("cwm_rl/Math-v0", "cwm_rl/Echo-v0")  # player i plays ENVS[i % 2]


def serve(port: int, sessions: int) -> None:
    from envs.server.app import serve as serve_app
    from envs.server.config import EnvServerConfig

    serve_app(EnvServerConfig(host="127.0.0.1", port=port, max_sessions=sessions))


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


WARMUP_TIMEOUT_S = 120  # 1,024 episodes take ~25 s on a busy 2-core machine


class Soak:
    def __init__(self, url: str):
        self.url = url
        self.started = time.monotonic()
        self.warm_at = self.stop_at = float("inf")  # set once warm
        self.steps = self.episodes = self.errors = 0
        self.latencies: list[float] = []  # seconds per step, after warm-up
        self.first_errors: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(what)

    async def player(self, index: int) -> None:
        env_id = ENVS[index % len(ENVS)]
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=httpx.Limits(max_connections=1)) as client:
            episode = 0
            while time.monotonic() < self.stop_at:
                try:
                    await self.episode(client, env_id, f"p{index}-e{episode}", seed=index * 100_000 + episode)
                except Exception as e:  # transport errors, bad JSON: counted, and the player plays on
                    self.error(f"{env_id}: {type(e).__name__}: {e}")
                episode += 1

    async def episode(self, client: httpx.AsyncClient, env_id: str, name: str, seed: int) -> None:
        def expect(r: httpx.Response, what: str) -> dict | None:
            if r.status_code != 200:
                self.error(f"{env_id} {what}: {r.status_code} {r.text[:300]}")
                return None
            return r.json()

        created = expect(await client.post("/v1/sessions", json={"env_id": env_id, "seed": seed, "request_id": name}), "create")
        if created is None:
            return
        sid = created["session_id"]
        try:
            state = expect(await client.get(f"/v1/sessions/{sid}"), "state")
            if state is None:
                return
            answer = state["state"]["task"]["answer"]
            actions = answer if isinstance(answer, list) else [f"\\boxed{{{answer}}}"]  # Echo: its words; Math: the number
            for turn, action in enumerate(actions):
                t = time.perf_counter()
                r = await client.post(f"/v1/sessions/{sid}/step", json={"action": action, "request_id": f"{name}-{turn}"})
                if time.monotonic() > self.warm_at:
                    self.latencies.append(time.perf_counter() - t)
                step = expect(r, "step")
                if step is None:
                    return
                self.steps += 1
                last = turn == len(actions) - 1
                if step["reward"] != 1.0 or step["terminated"] != last or step["truncated"]:
                    self.error(f"{env_id} step {turn} of {sid}: expected reward 1.0, terminated={last}; got {step}")
                    return
            self.episodes += 1
        finally:
            r = await client.delete(f"/v1/sessions/{sid}")
            if r.status_code != 200:
                self.error(f"{env_id} delete: {r.status_code} {r.text[:300]}")


async def soak(url: str, server_pid: int, sessions: int, seconds: float, warmup_s: float, warmup_episodes: int) -> dict:
    run = Soak(url)
    players = asyncio.gather(*(run.player(i) for i in range(sessions)))
    while run.episodes < warmup_episodes or time.monotonic() - run.started < warmup_s:
        if time.monotonic() - run.started > WARMUP_TIMEOUT_S:
            run.error(f"warm-up: only {run.episodes} of {warmup_episodes} episodes in {WARMUP_TIMEOUT_S} s")
            break
        await asyncio.sleep(0.1)
    run.warm_at = time.monotonic()
    run.stop_at = run.warm_at + seconds
    steps_warm, episodes_warm = run.steps, run.episodes
    rss_start = rss_mb(server_pid)
    samples = [rss_start]
    while time.monotonic() < run.stop_at - 0.2:  # an RSS sample every 5 s, the last one at the end
        await asyncio.sleep(min(5.0, run.stop_at - time.monotonic() - 0.1))
        samples.append(rss_mb(server_pid))
        print(f"{time.monotonic() - run.warm_at:5.0f} s after warm-up: {run.steps - steps_warm} steps, {run.errors} errors, "
              f"server RSS {samples[-1]:.1f} MB", file=sys.stderr, flush=True)
    rss_end = samples[-1]
    steps, episodes = run.steps - steps_warm, run.episodes - episodes_warm
    await players
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        left = (await client.get("/health")).json()["sessions"]
    if left:
        run.error(f"{left} sessions were left on the server after every player deleted its own")
    latencies = sorted(run.latencies) or [float("nan")]
    return {
        "bench": "env_server_soak",
        "sessions": sessions,
        "seconds": seconds,
        "episodes": episodes,
        "steps": steps,
        "steps_per_s": round(steps / seconds, 1),
        "errors": run.errors,
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_max_mb": round(max(samples), 1),
        "p50_ms": round(1e3 * statistics.median(latencies), 2),
        "p99_ms": round(1e3 * latencies[int(0.99 * (len(latencies) - 1))], 2),
        "warmup_s": round(run.warm_at - run.started, 1),
        "warmup_episodes": episodes_warm,
        "first_errors": run.first_errors,
    }


def start_server(sessions: int, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--sessions", str(sessions)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(url + "/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the env server did not start on {url}")


def run_soak(sessions: int, seconds: float, warmup_s: float, warmup_episodes: int) -> dict:
    """Start a server, soak it, stop it; the figures, with `server_log_errors` (tracebacks it logged)."""
    with tempfile.TemporaryFile("w+") as log:
        proc, url = start_server(sessions, log)
        try:
            figures = asyncio.run(soak(url, proc.pid, sessions, seconds, warmup_s, warmup_episodes))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        log.seek(0)
        text = log.read()
    figures["server_log_errors"] = text.count("Traceback")
    if figures["server_log_errors"]:
        figures["errors"] += figures["server_log_errors"]
        figures["first_errors"].append("server log: " + text[-2000:])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="How long the soak runs after warm-up.")
    parser.add_argument("--sessions", type=int, default=256, help="Concurrent sessions (players).")
    parser.add_argument("--warmup", type=float, default=10.0, help="Warm-up lasts at least this many seconds...")
    parser.add_argument("--warmup-episodes", type=int, help="...and this many episodes (default: 4 per session).")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.sessions)
        return
    warmup_episodes = 4 * args.sessions if args.warmup_episodes is None else args.warmup_episodes
    figures = run_soak(args.sessions, args.seconds, args.warmup, warmup_episodes)
    for line in figures.pop("first_errors"):
        print("error:", line, file=sys.stderr)
    print(", ".join(f"{k}={figures[k]}" for k in ("sessions", "steps", "errors", "rss_start_mb", "rss_end_mb", "p50_ms", "p99_ms")))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
