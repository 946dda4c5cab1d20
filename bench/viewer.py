"""How fast `cwm-rl view` answers on a 1 M-trajectory store, and what an open viewer costs a running job.

    .venv/bin/python bench/viewer.py              # about 4 min the first time (builds the store), 2 min after
    .venv/bin/python bench/viewer.py --rows 100000 --seconds 10    # a quicker look

1. Page vs bare query. A store of `--rows` trajectories is synthesised straight into SQLite with
   the real schema (RolloutStore creates it; rows are bulk-INSERTed with realistic columns and
   small valid blobs; training records for the trained ones) and cached under /tmp between runs.
   A real viewer server (uvicorn on 127.0.0.1) answers list pages (several filters and orders, a
   deep keyset page) and the trajectory page; "server" is its `Server-Timing` (request arrival to
   response start: routing, the query, JSON), "bare" the same SQL on a plain read-only sqlite3
   connection (for the trajectory page: its two SELECTs plus the zlib decompress of the blobs).
   Median of `--repeat` alternating calls each; the goal is server <= 2x bare.
2. Job throughput. A writer does what the job does (RolloutStore.add batches of 64 trajectories of
   ~1,900 tokens, then mark_step with their training records, a metrics.jsonl line per step) for
   `--seconds`, three times each, alternately with the viewer closed and open: open = a viewer server process plus a
   process polling it the way the open page does (every 2 s: new metrics lines and new rows; every
   10 s: counts per status and a trajectory page with its analysis and group). Goal: open/closed >= 0.97.

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx

from cwm_rl.store import RolloutFilter, RolloutStore
from cwm_rl.types import NO_VERSION, Message, Span, TrainingRecord, Trajectory, Turn, new_id
from cwm_rl.viewer import queries
from cwm_rl.viewer.server import ViewerServer

ENVS = ("cwm_rl/Math-v0", "cwm_rl/Code-v0", "cwm_rl/SWE-v0", "cwm_rl/Echo-v0")
CACHE = Path(tempfile.gettempdir()) / "cwm-rl-bench-viewer"


def trajectory(rng: random.Random, *, env_id: str, task_id: str, group_id: str, sample: int, version: int,
               prompt: int, action: int, observation: int, turns: int) -> Trajectory:
    ids, mask, logprobs, versions, out = [], [], [], [], []

    def add(n: int, generated: bool) -> Span:
        start = len(ids)
        ids.extend(rng.randrange(150_000) for _ in range(n))
        mask.extend([int(generated)] * n)
        logprobs.extend(-rng.expovariate(3.0) if generated else 0.0 for _ in range(n))
        versions.extend([version if generated else NO_VERSION] * n)
        return Span(start=start, end=len(ids))

    add(prompt, False)
    for k in range(turns):
        span = add(action, True)
        last = k == turns - 1
        out.append(Turn(index=k, action="def f(x): return x  # " * (action // 8), reward=float(last and rng.random() < 0.5),
                        observation=[Message(role="user", content="tests: 3 passed, 1 failed")], action_span=span,
                        observation_span=None if last else add(observation, False)))
    return Trajectory(env_id=env_id, task_id=task_id, group_id=group_id, sample_index=sample, token_ids=ids, loss_mask=mask,
                      logprobs=logprobs, policy_versions=versions, turns=out, finish_reason="terminated", terminated=True,
                      messages=[Message(role="user", content="Solve the task.")], **{"return": sum(t.reward for t in out)})


def record(rng: random.Random, t: Trajectory, step: int) -> TrainingRecord:
    gen = [lp for lp, m in zip(t.logprobs, t.loss_mask) if m]
    return TrainingRecord(trajectory_id=t.trajectory_id, step=step, advantage=rng.gauss(0, 1),
                          trainer_logprobs=[min(0.0, lp + rng.gauss(0, 0.03)) for lp in gen], is_weights=[1.0] * len(gen),
                          clipped=[0] * len(gen))


def synthesise(path: Path, num_rows: int) -> None:
    """`num_rows` rows with the real schema, straight into SQLite (a job would take days to write them)."""
    from cwm_rl.store import _encode, _pack_training  # the store's own row and record encoding

    rng = random.Random(0)
    path.mkdir(parents=True, exist_ok=True)
    RolloutStore(path).close()  # the real schema and indexes
    templates = [trajectory(rng, env_id=ENVS[i % 4], task_id="t", group_id="g", sample=0, version=0, prompt=20, action=12,
                            observation=6, turns=1 + i % 3) for i in range(64)]
    blobs = [(_encode(t, "trained", 0.0)[-1], _pack_training(record(rng, t, 0)), t) for t in templates]
    conn = sqlite3.connect(path / "rollouts.sqlite", isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")
    start, batch = time.time(), 20_000
    for first in range(0, num_rows, batch):
        rows, training = [], []
        for seq in range(first + 1, min(first + batch, num_rows) + 1):
            data, packed, t = blobs[seq % len(blobs)]
            step = seq // 1024
            status = ("buffered" if seq > num_rows - 512 else "eval" if seq % 33 == 0 else "dropped_stale" if seq % 20 == 0
                      else "dropped_other" if seq % 51 == 0 else "trained")
            ret = float(rng.random() < 0.2 + 0.6 * seq / num_rows)
            tid = new_id()
            rows.append((tid, "bench", ENVS[rng.choices(range(4), (50, 30, 15, 5))[0]], f"task-{(seq // 8) % 60_000}",
                         f"g{seq // 8}", seq % 8, ret, "terminated" if rng.random() < 0.9 else "max_turns", None, len(t.turns),
                         t.num_tokens, t.num_generated_tokens, max(step - (seq % 3 == 0), 0), step, start + seq * 0.01,
                         start + seq * 0.01, status, None if status in ("buffered", "eval") else step,
                         {"dropped_stale": "stale", "dropped_other": "zero_advantage"}.get(status), data))
            if status == "trained":
                training.append((tid, step, rng.gauss(0, 1), packed))
        conn.execute("BEGIN")
        conn.executemany('INSERT INTO trajectories (trajectory_id, run_id, env_id, task_id, group_id, sample_index, "return", '
                         "finish_reason, error, num_turns, num_tokens, num_generated_tokens, oldest_version, newest_version, "
                         "created_at, stored_at, status, step, drop_reason, data) VALUES "
                         f"({', '.join('?' * 20)})", rows)
        conn.executemany("INSERT INTO training (trajectory_id, step, advantage, data) VALUES (?, ?, ?, ?)", training)
        conn.execute("COMMIT")
        print(f"\r  {min(first + batch, num_rows):,} rows ({time.time() - start:.0f} s)", end="", file=sys.stderr, flush=True)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(file=sys.stderr)


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def page_vs_bare(run: Path, repeat: int) -> dict:
    """Server time of each page (Server-Timing) vs the bare SQL behind it, alternating, median of `repeat`."""
    db = run / "rollouts.sqlite"
    bare = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    some = bare.execute("SELECT trajectory_id, task_id FROM trajectories WHERE status = 'trained' AND seq > (SELECT max(seq) / 2 FROM trajectories) LIMIT 1").fetchone()
    mid = bare.execute("SELECT max(seq) / 2 FROM trajectories").fetchone()[0]
    lists = {
        "newest": ({}, "-stored", None),
        "env": ({"env": "cwm_rl/SWE-v0"}, "-stored", None),
        "status+min_return": ({"status": "dropped_stale", "min_return": 1.0}, "-stored", None),
        "task": ({"task": some[1]}, "-stored", None),
        "best_return": ({}, "-return", None),
        "deep_page": ({}, "-stored", str(mid)),
    }
    out: dict = {}
    with ViewerServer(run) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name, (filters, order, cursor) in lists.items():
            sql, params = queries.list_sql(RolloutFilter(**filters), order, 50, cursor, None)
            api_params = {**filters, "order": order, "limit": 50, **({"cursor": cursor} if cursor else {})}
            out[f"list_{name}"] = _compare(client, f"/api/r/{run.name}/trajectories", api_params,
                                           lambda: bare.execute(sql, params).fetchall(), repeat)
        tid = some[0]

        def bare_trajectory():
            row = bare.execute(f"SELECT {queries._SELECT}, data FROM trajectories WHERE trajectory_id = ?", (tid,)).fetchone()
            rec = bare.execute("SELECT step, advantage, data FROM training WHERE trajectory_id = ?", (tid,)).fetchone()
            return zlib.decompress(row[-1]), zlib.decompress(rec[-1])

        out["trajectory"] = _compare(client, f"/api/r/{run.name}/trajectories/{tid}", {}, bare_trajectory, repeat)
    bare.close()
    return out


def _compare(client: httpx.Client, path: str, params: dict, bare, repeat: int) -> dict:
    server, direct = [], []
    for _ in range(3):  # warm both: the page cache, the server's connection
        client.get(path, params=params).raise_for_status()
        bare()
    for _ in range(repeat):
        r = client.get(path, params=params)
        r.raise_for_status()
        server.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
        t0 = time.perf_counter()
        bare()
        direct.append(time.perf_counter() - t0)
    s, b = median_ms(server), median_ms(direct)
    print(f"  {path.rsplit('/', 1)[-1] if 'trajectories/' in path else 'list'} {json.dumps(params)}: server {s} ms, "
          f"bare {b} ms, ratio {s / b:.2f}", file=sys.stderr)
    return {"server_ms": s, "bare_ms": b, "overhead_ms": round(s - b, 3), "ratio": round(s / b, 2)}


POLLER = r"""
import sys, time, httpx
url, run = sys.argv[1], sys.argv[2]
c = httpx.Client(base_url=url, timeout=30)
offset, top, tick = 0, 0, 0
while True:
    t0 = time.monotonic()
    m = c.get(f"/api/r/{run}/metrics", params={"offset": offset}).json(); offset = m["offset"]
    rows = c.get(f"/api/r/{run}/trajectories", params={"after_seq": top, "limit": 50}).json()["rows"]
    if rows: top = rows[0][0]
    if tick % 5 == 0:
        c.get(f"/api/r/{run}/stats")
        if rows:
            tid, gid = rows[0][1], rows[0][5]
            c.get(f"/api/r/{run}/trajectories/{tid}"); c.get(f"/api/r/{run}/trajectories/{tid}/analysis"); c.get(f"/api/r/{run}/groups/{gid}")
    tick += 1
    time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
"""

SERVER = "import sys, uvicorn; from cwm_rl.viewer.app import make_app; uvicorn.run(make_app(sys.argv[1]), port=int(sys.argv[2]), log_level='warning')"


def job(run: Path, seconds: float, pool: list[Trajectory], step: int) -> tuple[float, int]:
    """A writer like the job's for `seconds`: add 64, mark them trained with records, a metrics line. Returns (traj/s, step)."""
    rng = random.Random(step)
    done, t0 = 0, time.monotonic()
    with RolloutStore(run) as store, (run / "metrics.jsonl").open("a") as metrics:
        while time.monotonic() - t0 < seconds:
            batch = [t.model_copy(update={"trajectory_id": new_id()}) for t in rng.sample(pool, 64)]
            store.add(batch)
            store.mark_step(step, [t.trajectory_id for t in batch], {}, [record(rng, t, step) for t in batch])
            metrics.write(json.dumps({"step": step, "reward_mean": sum(t.return_ for t in batch) / 64}) + "\n")
            metrics.flush()
            done += len(batch)
            step += 1
    return done / (time.monotonic() - t0), step


def throughput(seconds: float) -> dict:
    rng = random.Random(1)
    pool = [trajectory(rng, env_id=ENVS[i % 4], task_id=f"task-{i // 8}", group_id=f"g{i // 8}", sample=i % 8, version=0,
                       prompt=200, action=350, observation=100, turns=4) for i in range(256)]
    run = Path(tempfile.mkdtemp(prefix="cwm-rl-viewer-job-")) / "job"
    run.mkdir()
    RolloutStore(run).close()
    port = free_port()
    rates: dict[str, list[float]] = {"closed": [], "open": []}
    step = 0
    for phase in ("closed", "open") * 3:
        procs = []
        if phase == "open":
            procs.append(subprocess.Popen([sys.executable, "-c", SERVER, str(run), str(port)]))
            _wait(f"http://127.0.0.1:{port}/api/runs")
            procs.append(subprocess.Popen([sys.executable, "-c", POLLER, f"http://127.0.0.1:{port}", run.name]))
        try:
            rate, step = job(run, seconds, pool, step)
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=10)
        rates[phase].append(rate)
        print(f"  job with the viewer {phase}: {rate:.0f} trajectories/s", file=sys.stderr)
    closed, opened = statistics.fmean(rates["closed"]), statistics.fmean(rates["open"])
    return {"closed_traj_per_s": round(closed, 1), "open_traj_per_s": round(opened, 1), "ratio": round(opened / closed, 3),
            "tokens_per_trajectory": pool[0].num_tokens}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (closed again before the server binds it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the viewer server at {url} did not start") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=15.0, help="per throughput phase (6 phases)")
    args = parser.parse_args()
    run = CACHE / f"store-{args.rows}"
    if not (run / "rollouts.sqlite").exists() or (run / ".partial").exists():
        print(f"synthesising a {args.rows:,}-row store in {run} (cached for the next run)", file=sys.stderr)
        if run.exists():
            import shutil

            shutil.rmtree(run)
        run.mkdir(parents=True)
        (run / ".partial").touch()
        synthesise(run, args.rows)
        (run / ".partial").unlink()
    size_mb = sum(p.stat().st_size for p in run.iterdir()) / 1e6
    print(f"store: {args.rows:,} rows, {size_mb:.0f} MB", file=sys.stderr)
    pages = page_vs_bare(run, args.repeat)
    job_figures = throughput(args.seconds)
    worst = max(v["ratio"] for v in pages.values())
    print(json.dumps({"rows": args.rows, "store_mb": round(size_mb), "pages": pages, "worst_page_ratio": worst,
                      "worst_page_server_ms": max(v["server_ms"] for v in pages.values()),
                      "page_goal_met": worst <= 2.0, "job": job_figures, "job_goal_met": job_figures["ratio"] >= 0.97}))


if __name__ == "__main__":
    main()
