"""The viewer's web app: a JSON API under /api and one static page (plain JS, no build step).

`make_app(run_dir)` returns the FastAPI app for any ASGI server; `cwm-rl view RUN_DIR` runs uvicorn
on it (tests/cwm_rl/viewer/test_app.py and test_browser.py serve it on 127.0.0.1).
Every endpoint reads; none writes. Bad input is a 4xx JSON `{"error": "..."}` saying what to fix:
400 a bad filter, cursor or id prefix, 404 an unknown run, trajectory, group or result, 409 a
store this cwm-rl cannot read (a newer schema), 503 a store SQLite could not read just now. Each
response carries `Server-Timing: app;dur=MS` (what bench/viewer.py reads). The routes:

    /api/runs                               runs, their size and newest trajectory
    /api/r/RUN/info | stats | head          config, summary.json; counts per status, env ids; newest seq
    /api/r/RUN/metrics?offset=BYTES         new complete lines of metrics.jsonl (the curves)
    /api/r/RUN/trajectories?FILTERS         a page of light rows (keyset `cursor`; `q` = bounded text search)
    /api/r/RUN/count?FILTERS                how many match (apart: it may read a whole index)
    /api/r/RUN/trajectories/ID[/analysis]   one trajectory (+ training record, token text); its replays etc.
    /api/r/RUN/groups/GROUP                 the samples of one group with their advantages
    /api/r/RUN/analysis | rescores/ID | branches/ID     replay, rescore and branch results
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from cwm_rl.store import RolloutStoreError
from cwm_rl.viewer import analysis, groups, queries
from cwm_rl.viewer.runs import Run, Runs, read_metrics, run_info

STATIC = Path(__file__).parent / "static"
STATS_TTL_S = 10.0  # counts per status and env ids read a whole index: at most this often per run


def _json(obj: Any) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})


class _ServerTiming:
    """ASGI middleware: `Server-Timing: app;dur=MS`, from the request's arrival to the response's start."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                duration = (time.perf_counter() - start) * 1000
                message["headers"] = [*message.get("headers", []), (b"server-timing", f"app;dur={duration:.3f}".encode())]
            await send(message)

        await self.app(scope, receive, timed_send)


_TYPES = {"env": str, "task": str, "group": str, "status": str, "finish_reason": str, "q": str, "order": str, "cursor": str,
          "min_return": float, "max_return": float, "step": int, "version": int, "limit": int, "after_seq": int}


def _list_params(request: Request) -> dict[str, Any]:
    """The list's query parameters, typed by hand: the hot path of the live poll skips FastAPI's per-parameter
    validation (a third of a list page's server time). Empty values mean "no filter"."""
    out: dict[str, Any] = {}
    for key, value in request.query_params.items():
        kind = _TYPES.get(key)
        if kind is None:
            raise ValueError(f"unknown parameter {key!r}; the list takes {', '.join(_TYPES)}")
        if value == "":
            continue
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"bad value {value!r} for {key}: expected {'a number' if kind is float else 'an integer'}") from None
    return out


def make_app(run_dir: str | Path) -> FastAPI:
    """The viewer of `run_dir` (a run directory, or a directory of them); raises at once if there is nothing to show."""
    runs = Runs(run_dir)
    app = FastAPI(title="cwm-rl viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_ServerTiming)
    stats_cache: dict[str, tuple[float, dict[str, Any]]] = {}
    stats_lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    def bad_parameter(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(400, f"bad value {first.get('input')!r} for {where}: {first.get('msg')}")

    for kind, status in ((LookupError, 404), (FileNotFoundError, 404), (ValueError, 400), (RolloutStoreError, 409),
                         (sqlite3.OperationalError, 503), (RuntimeError, 409)):
        app.add_exception_handler(kind, lambda _, e, status=status: _error(status, str(e)))

    def run_of(name: str) -> Run:
        return runs.get(name)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def list_runs() -> Response:
        out = []
        for run in runs.all():
            entry: dict[str, Any] = {"name": run.name, "has_metrics": (run.dir / "metrics.jsonl").exists()}
            try:
                entry.update(queries.head(run.store))
            except (RolloutStoreError, sqlite3.Error, FileNotFoundError) as e:
                entry["error"] = str(e)  # one unreadable run must not hide the others
            out.append(entry)
        return _json({"root": str(runs.root), "single": runs.single, "runs": out})

    @app.get("/api/r/{run}/info")
    def info(run: str) -> Response:
        return _json(run_info(run_of(run)))

    @app.get("/api/r/{run}/head")
    def head(run: str) -> Response:
        return _json(queries.head(run_of(run).store))

    @app.get("/api/r/{run}/stats")
    def stats(run: str) -> Response:
        r = run_of(run)
        with stats_lock:
            cached = stats_cache.get(r.name)
        if cached is None or time.monotonic() - cached[0] > STATS_TTL_S:
            cached = (time.monotonic(), queries.stats(r.store))
            with stats_lock:
                stats_cache[r.name] = cached
        return _json(cached[1])

    @app.get("/api/r/{run}/metrics")
    def metrics(run: str, offset: int = Query(0, ge=0)) -> Response:
        return _json(read_metrics(run_of(run), offset))

    # The two hot pages are plain async Starlette routes: their indexed reads take well under a millisecond,
    # less than FastAPI's parameter handling or a hop to the thread pool would add. The text search, which
    # may scan for 0.5 s, and the first tokenizer load do hop to the thread pool.
    async def trajectories(request: Request) -> Response:
        p = _list_params(request)
        flt = queries.make_filter(p)
        path = run_of(request.path_params["run"]).store
        order, limit = p.get("order") or "-stored", p.get("limit", 50)
        if p.get("q"):
            if order != "-stored":
                raise ValueError(f"text search lists newest first only; drop order={order!r} or the search")
            return _json(await run_in_threadpool(queries.search, path, flt, p["q"], min(max(limit, 1), queries.MAX_PAGE),
                                                 p.get("cursor")))
        return _json(queries.list_page(path, flt, order, limit, p.get("cursor"), p.get("after_seq")))

    app.add_route("/api/r/{run}/trajectories", trajectories, methods=["GET"])

    @app.get("/api/r/{run}/count")
    def count(run: str, request: Request) -> Response:
        return _json({"count": queries.count(run_of(run).store, queries.make_filter(_list_params(request)))})

    async def trajectory(request: Request) -> Response:
        r = run_of(request.path_params["run"])
        if not r.tokens.loaded:  # the first look for the tokenizer imports transformers: not on the event loop
            await run_in_threadpool(r.tokens.available)
        row, data, training = queries.trajectory(r.store, request.path_params["trajectory_id"])
        texts = r.tokens.texts(json.loads(data)["token_ids"]) if r.tokens.available() else None
        head = json.dumps({"row": row, "training": training, "token_text": texts}, separators=(",", ":")).encode()
        # The stored JSON goes out as stored (no parse and re-encode): the page reads it as `trajectory`.
        return Response(head[:-1] + b',"trajectory":' + data + b"}", media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    app.add_route("/api/r/{run}/trajectories/{trajectory_id}", trajectory, methods=["GET"])

    @app.get("/api/r/{run}/trajectories/{trajectory_id}/analysis")
    def trajectory_analysis(run: str, trajectory_id: str) -> Response:
        r = run_of(run)
        found = queries.find(r.store, trajectory_id, "trajectory_id")[0]
        return _json(analysis.for_trajectory(r, found))

    @app.get("/api/r/{run}/groups/{group_id:path}")
    def group(run: str, group_id: str) -> Response:
        return _json(groups.group_page(run_of(run), group_id))

    @app.get("/api/r/{run}/analysis")
    def analysis_overview(run: str) -> Response:
        return _json(analysis.overview(run_of(run)))

    @app.get("/api/r/{run}/rescores/{rescore_id}")
    def rescore(run: str, rescore_id: str, flipped: bool = False, limit: int = Query(200, ge=1, le=1000),
                offset: int = Query(0, ge=0)) -> Response:
        return _json(analysis.rescore(run_of(run), rescore_id, flipped, limit, offset))

    @app.get("/api/r/{run}/branches/{branch_id}")
    def branch(run: str, branch_id: str) -> Response:
        return _json(analysis.branch(run_of(run), branch_id))

    @app.get("/api/{rest:path}")
    def unknown(rest: str) -> JSONResponse:
        return _error(404, f"no API endpoint /api/{rest}; see cwm_rl/viewer/app.py for the routes")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
