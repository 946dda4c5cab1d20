"""The SQL behind the viewer: read-only, indexed, paged reads of a run's `rollouts.sqlite`.

Every connection is opened with `mode=ro` (SQLite refuses any write through it) and kept one per
thread and store; each statement runs in autocommit mode, so a read transaction lasts only as long
as one query and never holds back the job's writer or its WAL checkpoints.

List pages read the indexed columns only (never the zlib `data` blob) and page by keyset: the
cursor is the (sort value, seq) of the last row shown, so page 1,000 costs what page 1 costs.
Text search is the exception: the text is inside the blob, so `search` decodes rows newest
first, bounded per call (`SEARCH_MAX_ROWS` rows or `SEARCH_MAX_S` seconds), and hands back a
cursor to continue.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from cwm_rl.store import FINISH_REASONS, SCHEMA_VERSION, STATUSES, RolloutFilter, RolloutNotFoundError, RolloutStoreError

LIST_COLUMNS = ("seq", "trajectory_id", "run_id", "env_id", "task_id", "group_id", "sample_index", "return", "finish_reason",
                "error", "num_turns", "num_tokens", "num_generated_tokens", "oldest_version", "newest_version", "created_at",
                "stored_at", "status", "step", "drop_reason")
_SELECT = ", ".join(f'"{c}"' for c in LIST_COLUMNS)
# Sort keys the list offers: only indexed columns, so every page is an index range, even on 1 M rows.
ORDERS = {"stored": "seq", "return": '"return"', "version": "newest_version"}
MAX_PAGE = 500
SEARCH_MAX_ROWS = 2000
SEARCH_MAX_S = 0.5

_local = threading.local()


def connect(path: Path) -> sqlite3.Connection:
    """This thread's read-only connection to `path` (opened once per thread; the schema version checked then)."""
    cache: dict[str, sqlite3.Connection] = _local.__dict__.setdefault("connections", {})
    conn = cache.get(str(path))
    if conn is None:
        if not path.exists():
            raise FileNotFoundError(f"no rollout store at {path}")
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=10)
        check_version(conn, path)
        cache[str(path)] = conn
    return conn


def check_version(conn: sqlite3.Connection, path: Path) -> None:
    """RolloutStoreError for a store this cwm-rl cannot read (newer schema, or no schema at all)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RolloutStoreError(f"{path} has schema version {version}, but this cwm-rl reads versions up to "
                                f"{SCHEMA_VERSION}; upgrade cwm-rl to view it")
    if version == 0:
        raise RolloutStoreError(f"{path} is not a rollout store (no schema); is it the run directory of a training job?")


def make_filter(params: dict[str, Any]) -> RolloutFilter:
    """A RolloutFilter from the list page's query parameters (already typed); ValueError names a bad value."""
    status = params.get("status") or None
    if isinstance(status, str) and "," in status:
        status = [s for s in status.split(",") if s]
    return RolloutFilter(env=params.get("env") or None, task=params.get("task") or None, group=params.get("group") or None,
                         status=status, finish_reason=params.get("finish_reason") or None,
                         min_return=params.get("min_return"), max_return=params.get("max_return"),
                         step=params.get("step"), version=params.get("version"))


def list_page(path: Path, flt: RolloutFilter, order: str = "-stored", limit: int = 50, cursor: str | None = None,
              after_seq: int | None = None) -> dict[str, Any]:
    """One page of light rows: `{"columns", "rows", "next"}`; `next` is the cursor of the following page or None.

    `after_seq` keeps only rows stored after that seq (what the live poll asks for)."""
    sql, params = list_sql(flt, order, limit, cursor, after_seq)
    rows = connect(path).execute(sql, params).fetchall()
    return {"columns": LIST_COLUMNS, "rows": rows[:limit], "next": _cursor(rows[limit - 1], order) if len(rows) > limit else None}


def list_sql(flt: RolloutFilter, order: str, limit: int, cursor: str | None, after_seq: int | None) -> tuple[str, list[Any]]:
    """The page's SQL and parameters (also what bench/viewer.py times bare): limit + 1 rows, to know if more follow."""
    key = order.lstrip("-")
    if key not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)} (a leading '-' sorts descending)")
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit {limit} is out of range; ask for 1 to {MAX_PAGE} rows a page")
    where, params = flt.where()
    if key == "stored" and flt.task is None and flt.group is None:
        # Newest first, filtered by env or return: walking the primary key backwards finds a page after a few
        # hundred rows, where SQLite would otherwise take the env or return index and sort all its matches
        # (100 ms on 1 M rows). "+column" keeps it off those indexes; task and group stay indexed (selective).
        where = where.replace("env_id ", "+env_id ").replace('"return" ', '+"return" ')
    clauses = [where[len(" WHERE "):]] if where else []
    descending = order.startswith("-")
    column, op, direction = ORDERS[key], "<" if descending else ">", "DESC" if descending else "ASC"
    if cursor:
        value, seq = _parse_cursor(cursor, key)
        if key == "stored":
            clauses.append(f"seq {op} ?")
            params.append(seq)
        else:  # a row value: SQLite walks the (column, rowid) index from there
            clauses.append(f"({column}, seq) {op} (?, ?)")
            params += [value, seq]
    if after_seq is not None:
        clauses.append("seq > ?")
        params.append(after_seq)
    where_sql = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    tie = "" if key == "stored" else f", seq {direction}"
    return f"SELECT {_SELECT} FROM trajectories{where_sql} ORDER BY {column} {direction}{tie} LIMIT ?", [*params, limit + 1]


def _cursor(row: tuple, order: str) -> str:
    key = order.lstrip("-")
    seq = row[0]
    return str(seq) if key == "stored" else f"{row[LIST_COLUMNS.index('return' if key == 'return' else 'newest_version')]!r}:{seq}"


def _parse_cursor(cursor: str, key: str) -> tuple[float | None, int]:
    try:
        if key == "stored":
            return None, int(cursor)
        value, seq = cursor.rsplit(":", 1)
        return (float(value) if key == "return" else int(value)), int(seq)
    except ValueError:
        raise ValueError(f"cursor {cursor!r} is not one this list made for order {key!r}; start again from the first page") from None


def search(path: Path, flt: RolloutFilter, text: str, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
    """Rows whose transcript holds `text` (case-insensitive), newest first, decoding at most SEARCH_MAX_ROWS rows or
    SEARCH_MAX_S seconds per call. `next` is the seq to continue below (None: everything was searched)."""
    needle = text.lower()
    where, params = flt.where()
    clauses = [where[len(" WHERE "):]] if where else []
    if cursor:
        clauses.append("seq < ?")
        params.append(_parse_cursor(cursor, "stored")[1])
    where_sql = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = connect(path).execute(f"SELECT {_SELECT}, data FROM trajectories{where_sql} ORDER BY seq DESC", params)
    found, scanned, last_seq, deadline = [], 0, None, time.monotonic() + SEARCH_MAX_S
    exhausted = True
    for row in rows:
        scanned += 1
        last_seq = row[0]
        if needle in _transcript(row[-1]):
            found.append(row[:-1])
        if len(found) >= limit or scanned >= SEARCH_MAX_ROWS or time.monotonic() > deadline:
            exhausted = rows.fetchone() is None
            break
    rows.close()
    return {"columns": LIST_COLUMNS, "rows": found, "next": None if exhausted else str(last_seq), "searched": scanned}


def _transcript(blob: bytes) -> str:
    """The human-readable text of a stored trajectory, lowercased: messages, actions, observations, error."""
    t = json.loads(zlib.decompress(blob))
    parts = [m["content"] for m in t.get("messages", ())]
    for turn in t.get("turns", ()):
        parts.append(turn["action"])
        parts += [m["content"] for m in turn.get("observation", ())]
    parts.append(t.get("error") or "")
    return "\n".join(parts).lower()


def find(path: Path, key: str, columns: str = _SELECT) -> tuple:
    """The row of the trajectory with id `key`, or the one id starting with it; RolloutNotFoundError / ValueError."""
    if not key:
        raise ValueError("empty trajectory id; pass an id or the start of one")
    conn = connect(path)
    row = conn.execute(f"SELECT {columns} FROM trajectories WHERE trajectory_id = ?", (key,)).fetchone()
    if row is not None:
        return row
    end = key[:-1] + chr(min(ord(key[-1]) + 1, 0x10FFFF))  # ids with this prefix: the index range [key, end)
    rows = conn.execute(f"SELECT {columns}, trajectory_id FROM trajectories WHERE trajectory_id >= ? AND trajectory_id < ? "
                        "ORDER BY trajectory_id LIMIT 2", (key, end)).fetchall()
    if not rows:
        raise RolloutNotFoundError(f"no trajectory with id or id prefix {key!r} in this run")
    if len(rows) > 1:
        raise ValueError(f"id prefix {key!r} is ambiguous ({rows[0][-1]}, {rows[1][-1]}, ...); give more characters")
    return rows[0][:-1]


def trajectory(path: Path, key: str) -> tuple[dict[str, Any], bytes, dict[str, Any] | None]:
    """(light row as a dict, the Trajectory JSON as stored, its training record or None) of one trajectory.

    The training record's per-token arrays stay packed (`packed`: base64 of float32 trainer logprobs, float32
    IS weights, int8 clip flags over the generated tokens), exactly as stored: the page unpacks them."""
    row = find(path, key, f"{_SELECT}, data")
    light = dict(zip(LIST_COLUMNS, row[:-1]))
    record = connect(path).execute("SELECT step, advantage, data FROM training WHERE trajectory_id = ?",
                                   (light["trajectory_id"],)).fetchone() if has_training(path) else None
    training = None if record is None else {
        "step": record[0], "advantage": record[1], "packed": base64.b64encode(zlib.decompress(record[2])).decode()}
    return light, zlib.decompress(row[-1]), training


def group(path: Path, group_id: str, max_samples: int = 256) -> list[tuple[dict[str, Any], dict[str, Any], tuple | None]]:
    """(light row, decoded Trajectory JSON, (step, advantage) or None) of every sample of a group, by sample index."""
    if not group_id:
        raise ValueError("empty group id; trajectories stored without a group have no group page")
    conn = connect(path)
    rows = conn.execute(f"SELECT {_SELECT}, data FROM trajectories WHERE group_id = ? ORDER BY sample_index, seq LIMIT ?",
                        (group_id, max_samples)).fetchall()
    if not rows:
        raise RolloutNotFoundError(f"no trajectories with group id {group_id!r} in this run")
    ids = [r[1] for r in rows]
    training = dict((i, (s, a)) for i, s, a in conn.execute(
        f"SELECT trajectory_id, step, advantage FROM training WHERE trajectory_id IN ({', '.join('?' * len(ids))})", ids)) \
        if has_training(path) else {}
    return [(dict(zip(LIST_COLUMNS, r[:-1])), json.loads(zlib.decompress(r[-1])), training.get(r[1])) for r in rows]


def has_training(path: Path) -> bool:
    """Whether the store keeps training records (schema version 2 and later; a job upgrades an older store while
    the viewer is open, so this is asked each time: one cheap PRAGMA)."""
    return connect(path).execute("PRAGMA user_version").fetchone()[0] >= 2


def head(path: Path) -> dict[str, Any]:
    """The newest seq and its time: cheap (the primary key's last entry), polled every few seconds."""
    row = connect(path).execute("SELECT seq, stored_at FROM trajectories ORDER BY seq DESC LIMIT 1").fetchone()
    return {"max_seq": row[0] if row else 0, "last_stored_at": row[1] if row else None}


def stats(path: Path) -> dict[str, Any]:
    """Count per status (index ranges of (status, seq)) and the env ids (the env index): what the filters offer."""
    conn = connect(path)
    statuses = {s: n for s, n in conn.execute("SELECT status, count(*) FROM trajectories GROUP BY status")}
    envs = [e for (e,) in conn.execute("SELECT DISTINCT env_id FROM trajectories ORDER BY env_id")]
    return {"statuses": statuses, "total": sum(statuses.values()), "envs": envs, "finish_reasons": list(FINISH_REASONS),
            "all_statuses": list(STATUSES)}


def count(path: Path, flt: RolloutFilter) -> int:
    """How many rows match (may read a whole index on a large store: the page asks for it apart from the list)."""
    where, params = flt.where()
    return connect(path).execute(f"SELECT count(*) FROM trajectories{where}", params).fetchone()[0]
