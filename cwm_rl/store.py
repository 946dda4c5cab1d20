"""The rollout store: every finished Trajectory of a run, durable and queryable, in the run directory.

    >>> import tempfile
    >>> store = RolloutStore(tempfile.mkdtemp())   # opens (or creates) DIR/rollouts.sqlite
    >>> won, lost = (Trajectory(task_id="t1", env_id="cwm_rl/Math-v0", token_ids=[1, 2], loss_mask=[0, 1], logprobs=[0.0, -0.5],
    ...                         policy_versions=[-1, 3], finish_reason="max_turns", **{"return": r}) for r in (1.0, -1.0))
    >>> store.add([won, lost])                     # returns once committed: stored means stored
    2
    >>> store.mark_step(12, trained_ids=[won.trajectory_id], dropped_ids={"stale": [lost.trajectory_id]})
    >>> [(row.status, row.step) for row in store.query(env="cwm_rl/Math-v0", order="-return")]   # light rows
    [('trained', 12), ('dropped_stale', 12)]
    >>> store.get(won.trajectory_id[:8]).return_   # a full Trajectory, by id or unique id prefix
    1.0
    >>> store.close()

`buffered()` is what a resumed run reloads (oldest first); `export_parquet(path)` writes Parquet
(needs pyarrow); `tests/cwm_rl/test_store.py` covers each.

Storage: one SQLite file in WAL mode (stdlib `sqlite3`; no server, no ML stack). Table
`trajectories`: indexed columns to filter on (env, task, group, status, step, return, policy
versions) and the whole Trajectory as zlib-compressed JSON in the last column, so listing and
filtering never read or decode it. Table `training` (schema version 2): what the trainer did
with each trajectory it trained on (`TrainingRecord`: advantage, and per generated token the
trainer's logprob, IS weight and clip flag, packed). The schema version is SQLite's
`user_version`; a store written by a newer cwm-rl is refused with `RolloutStoreError` rather
than misread; a version 1 store opens as it is for `readonly=True` readers (no training
records), and a writer adds the table.

Durability: `add` returns only after its transaction committed, and with WAL plus
`synchronous=NORMAL` a commit has been written (`write(2)`) to the `-wal` file by then, so
it sits in the OS page cache: killing the process (kill -9, OOM killer, a crash) loses
nothing that `add` reported stored, and the file always opens consistent (a transaction is
all or nothing). Only an OS crash or power loss can lose the last few commits; `durable=True`
(`synchronous=FULL`, an fsync of the WAL per commit) closes that gap too, at the cost of one
fsync per `add`. WAL needs memory shared between the processes on one host: keep the run
directory on a local disk, not NFS.

Lifecycle (`status`): `buffered` when added (waiting for the trainer; a resumed run reloads
exactly these), then `trained` at a step, or `dropped_stale` / `dropped_other` with the
trainer's reason (`stale`, `gibberish`, `zero_advantage`, `empty`, ...); `eval` for episodes
never meant for training. `rewind(step)` puts what a crashed run trained or dropped after
its last checkpoint back into the buffer.

Concurrency: one connection behind a lock, so one writer thread and reader threads can share a
store; other processes (`cwm-rl rollouts ...`, a viewer) read while the job writes (WAL: readers
never block the writer and see only committed transactions).
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

from cwm_rl.types import FinishReason, TrainingRecord, Trajectory

STORE_FILE = "rollouts.sqlite"
SCHEMA_VERSION = 2  # 1: trajectories only; 2: + training (what the trainer did with each trajectory)
STATUSES = ("buffered", "trained", "dropped_stale", "dropped_other", "eval")
FINISH_REASONS = get_args(FinishReason)

_LIGHT_COLUMNS = (
    "seq", "trajectory_id", "run_id", "env_id", "task_id", "group_id", "sample_index", "return", "finish_reason",
    "error", "num_turns", "num_tokens", "num_generated_tokens", "oldest_version", "newest_version", "created_at",
    "stored_at", "status", "step", "drop_reason",
)


def _quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)  # "return" is quoted everywhere: it reads like a keyword


_SELECT_LIGHT = _quoted(_LIGHT_COLUMNS)
_INSERT_COLUMNS = (*_LIGHT_COLUMNS[1:], "data")  # seq is assigned by SQLite
_INSERT = f"INSERT INTO trajectories ({_quoted(_INSERT_COLUMNS)}) VALUES ({', '.join('?' * len(_INSERT_COLUMNS))})"

_SCHEMA = [
    f"""CREATE TABLE trajectories (
        seq INTEGER PRIMARY KEY,                 -- insertion order (never reused: rows are never deleted)
        trajectory_id TEXT NOT NULL UNIQUE,
        run_id TEXT NOT NULL,
        env_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        group_id TEXT NOT NULL,
        sample_index INTEGER NOT NULL,
        "return" REAL NOT NULL,
        finish_reason TEXT NOT NULL,
        error TEXT,
        num_turns INTEGER NOT NULL,
        num_tokens INTEGER NOT NULL,
        num_generated_tokens INTEGER NOT NULL,
        oldest_version INTEGER NOT NULL,         -- -1 when nothing was generated
        newest_version INTEGER NOT NULL,
        created_at REAL NOT NULL,                -- Unix s the episode finished (stored_at if the Trajectory has none)
        stored_at REAL NOT NULL,                 -- Unix s it was committed here
        status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
        step INTEGER,                            -- trainer step that trained or dropped it
        drop_reason TEXT,
        data BLOB NOT NULL                       -- zlib(Trajectory JSON); last, so light reads skip its overflow pages
    )""",
    'CREATE INDEX trajectories_env ON trajectories (env_id, "return")',
    "CREATE INDEX trajectories_task ON trajectories (task_id)",
    "CREATE INDEX trajectories_group ON trajectories (group_id)",
    "CREATE INDEX trajectories_status ON trajectories (status, seq)",
    "CREATE INDEX trajectories_step ON trajectories (step)",
    "CREATE INDEX trajectories_version ON trajectories (newest_version)",
    'CREATE INDEX trajectories_return ON trajectories ("return")',
]
# Version 2. Per-token arrays of the generated tokens, packed (see `_pack_training`): a few bytes a token.
_SCHEMA_V2 = [
    """CREATE TABLE training (
        trajectory_id TEXT PRIMARY KEY REFERENCES trajectories (trajectory_id),
        step INTEGER NOT NULL,
        advantage REAL NOT NULL,
        data BLOB NOT NULL                       -- zlib(float32 trainer logprobs, float32 IS weights, int8 clip flags)
    )""",
]

# `order=` keys: a leading "-" sorts descending; ties keep insertion order.
ORDER_KEYS = {"stored": "seq", "return": '"return"', "tokens": "num_tokens", "generated": "num_generated_tokens",
              "version": "newest_version", "step": "step", "turns": "num_turns"}
_CHUNK = 500  # ids per `IN (...)`: far below SQLite's bound-parameter limit
_INSERT_TRAINING = "INSERT OR REPLACE INTO training (trajectory_id, step, advantage, data) VALUES (?, ?, ?, ?)"


class RolloutStoreError(RuntimeError):
    """The file cannot serve as a rollout store: a newer schema, not a rollout store, or no WAL on its filesystem."""


class RolloutNotFoundError(LookupError, ValueError):
    """No trajectory has that id (or id prefix). A ValueError too: it is bad input to the CLI."""


@dataclass(frozen=True, slots=True)
class RolloutRow:
    """One trajectory's indexed columns: what listing and filtering need, without decoding its JSON."""

    seq: int
    trajectory_id: str
    run_id: str
    env_id: str
    task_id: str
    group_id: str
    sample_index: int
    return_: float
    finish_reason: str
    error: str | None
    num_turns: int
    num_tokens: int
    num_generated_tokens: int
    oldest_version: int
    newest_version: int
    created_at: float
    stored_at: float
    status: str
    step: int | None
    drop_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["return"] = d.pop("return_")
        return d


@dataclass(frozen=True)
class RolloutFilter:
    """Which trajectories `query`, `count`, `stats` and `export_parquet` see; every field is optional.

    `env`, `task`, `run` and `group` match exactly, or as a glob when they hold `*`, `?` or `[`
    (`env="cwm_rl/Math*"`). `version=v` keeps trajectories with tokens of version v (oldest <= v <=
    newest); `step` is the trainer step that trained or dropped them.
    """

    env: str | None = None
    task: str | None = None
    run: str | None = None
    group: str | None = None
    status: str | Sequence[str] | None = None
    finish_reason: str | None = None
    min_return: float | None = None
    max_return: float | None = None
    step: int | None = None
    version: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        """The SQL WHERE clause ('' when nothing is filtered) and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("env_id", self.env), ("task_id", self.task), ("run_id", self.run), ("group_id", self.group)):
            if value is not None:
                clauses.append(f"{column} {'GLOB' if any(c in value for c in '*?[') else '='} ?")
                params.append(value)
        if self.status is not None:
            statuses = [self.status] if isinstance(self.status, str) else list(self.status)
            for s in statuses:
                if s not in STATUSES:
                    raise ValueError(f"unknown status {s!r}; use one of {', '.join(STATUSES)}")
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        if self.finish_reason is not None:
            if self.finish_reason not in FINISH_REASONS:
                raise ValueError(f"unknown finish reason {self.finish_reason!r}; use one of {', '.join(FINISH_REASONS)}")
            clauses.append("finish_reason = ?")
            params.append(self.finish_reason)
        for sql, value in (('"return" >= ?', self.min_return), ('"return" <= ?', self.max_return), ("step = ?", self.step)):
            if value is not None:
                clauses.append(sql)
                params.append(value)
        if self.version is not None:
            clauses.append("newest_version >= ? AND oldest_version <= ?")
            params += [self.version, self.version]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class RolloutStore:
    """Trajectories of one run in `<run_dir>/rollouts.sqlite` (a path ending in `.sqlite` names the file itself).

    `create=False` opens only an existing store (what readers want: a typo is an error, not a new
    empty store). `durable=True` also survives power loss (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, durable: bool = False, timeout_s: float = 30.0,
                 readonly: bool = False):
        given = Path(path)
        create = create and not readonly
        self.path = given if given.suffix == ".sqlite" else given / STORE_FILE
        if not self.path.exists():
            if not create:
                if not self.path.parent.is_dir():
                    raise FileNotFoundError(f"run directory {self.path.parent} does not exist; pass the directory a training job writes to")
                raise FileNotFoundError(f"no rollout store in {self.path.parent} (no {self.path.name}); "
                                        "is it the run directory of a training job?")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        # isolation_level=None: no implicit transactions; every write is an explicit BEGIN IMMEDIATE ... COMMIT.
        # readonly: a reader that can never write (the viewer, replay tools); it also never upgrades an older schema.
        target = f"{self.path.resolve().as_uri()}?mode=ro" if readonly else self.path  # as_uri: a '?' or '#' in a path is quoted
        self._conn: sqlite3.Connection | None = sqlite3.connect(target, timeout=timeout_s, isolation_level=None,
                                                                check_same_thread=False, uri=readonly)
        self.readonly = readonly
        try:
            self._open(durable)
        except sqlite3.DatabaseError as e:
            self.close()
            raise RolloutStoreError(f"{self.path} is not a rollout store (SQLite: {e}); move it away or pick another run directory") from None
        except BaseException:
            self.close()
            raise

    def _open(self, durable: bool) -> None:
        conn = self._conn
        assert conn is not None
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RolloutStoreError(f"{self.path} has schema version {version}, but this cwm-rl reads versions up to "
                                   f"{SCHEMA_VERSION}; upgrade cwm-rl to read it")
        self.schema_version = version
        if self.readonly:
            if version == 0:
                raise RolloutStoreError(f"{self.path} is not a rollout store (no schema); is it the run directory of a training job?")
            return
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RolloutStoreError(f"{self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                                   "put the run directory on a local disk")
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        if version == 0:
            with self._write() as c:
                if c.execute("PRAGMA user_version").fetchone()[0] == 0:  # another process may have just created it
                    if c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                        raise RolloutStoreError(f"{self.path} is an SQLite file but not a rollout store; pick another path")
                    for statement in _SCHEMA + _SCHEMA_V2:
                        c.execute(statement)
                    c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version == 1:  # a store from before training records: add their table (old rows simply have none)
            with self._write() as c:
                if c.execute("PRAGMA user_version").fetchone()[0] == 1:
                    for statement in _SCHEMA_V2:
                        c.execute(statement)
                    c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.schema_version = SCHEMA_VERSION

    # --- writing ---

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, all or nothing; returns only after COMMIT succeeded."""
        with self._lock, write_transaction(self._connection()) as conn:
            yield conn

    def add(self, trajectories: Trajectory | Iterable[Trajectory], status: str = "buffered") -> int:
        """Store trajectories in one transaction; once this returns they survive the process being killed.

        `status` is `buffered` (waiting for the trainer) or `eval`. A trajectory id already stored
        is an error and nothing of the batch is stored. Returns how many were stored.
        """
        if status not in ("buffered", "eval"):
            raise ValueError(f"add() takes status 'buffered' or 'eval', not {status!r}; use mark_trained / mark_dropped after")
        batch = [trajectories] if isinstance(trajectories, Trajectory) else list(trajectories)
        now = time.time()
        rows = [_encode(t, status, now) for t in batch]  # serialise and compress outside the lock
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            raise ValueError("the batch holds the same trajectory id twice; every episode needs its own trajectory_id")
        if not rows:
            return 0
        with self._write() as conn:
            try:
                conn.executemany(_INSERT, rows)
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")  # first: the rows inserted before the clash must not count as taken
                taken = [i for chunk in _chunks(ids) for (i,) in conn.execute(
                    f"SELECT trajectory_id FROM trajectories WHERE trajectory_id IN ({_marks(chunk)})", chunk)]
                raise ValueError(f"trajectory {taken[0] if taken else '?'} is already stored in {self.path}; "
                                 "nothing of this batch was stored") from None
        return len(rows)

    def mark_trained(self, ids: Iterable[str], step: int) -> None:
        """The trainer used these (buffered) trajectories in optimiser step `step`."""
        self._mark(ids, "trained", step, None)

    def mark_dropped(self, ids: Iterable[str], reason: str, step: int | None = None) -> None:
        """The trainer refused these (buffered) trajectories: `reason` "stale" gives status `dropped_stale`,
        any other reason (`gibberish`, `zero_advantage`, ...) `dropped_other`; the reason is kept."""
        self._mark(ids, "dropped_stale" if reason == "stale" else "dropped_other", step, reason)

    def mark_step(self, step: int, trained_ids: Iterable[str], dropped_ids: dict[str, list[str]],
                  records: Iterable[TrainingRecord] = ()) -> None:
        """What trainer step `step` did with its batch: trained on some (with their training `records`:
        advantage, trainer logprobs, IS weights, clip flags), dropped the others by reason."""
        rows = [(r.trajectory_id, r.step, r.advantage, _pack_training(r)) for r in records]
        with self._write() as conn:  # one transaction: a kill never leaves trained rows without their records
            self._mark_in(conn, trained_ids, "trained", step, None)
            for reason, ids in dropped_ids.items():
                self._mark_in(conn, ids, "dropped_stale" if reason == "stale" else "dropped_other", step, reason)
            conn.executemany(_INSERT_TRAINING, rows)

    def add_training_records(self, records: Iterable[TrainingRecord]) -> int:
        """Keep what the trainer did with trajectories (one record per trajectory; a second one for the same
        trajectory replaces the first: a resumed run trains again what it trained after its checkpoint)."""
        rows = [(r.trajectory_id, r.step, r.advantage, _pack_training(r)) for r in records]
        if not rows:
            return 0
        with self._write() as conn:
            conn.executemany(_INSERT_TRAINING, rows)
        return len(rows)

    def _mark(self, ids: Iterable[str], status: str, step: int | None, reason: str | None) -> None:
        with self._write() as conn:
            self._mark_in(conn, ids, status, step, reason)

    def _mark_in(self, conn: sqlite3.Connection, ids: Iterable[str], status: str, step: int | None, reason: str | None) -> None:
        """Set the status of buffered trajectories, inside the caller's write transaction."""
        ids = list(dict.fromkeys(ids))
        current = {row[0]: row[1:] for chunk in _chunks(ids) for row in conn.execute(
            f"SELECT trajectory_id, status, step, drop_reason FROM trajectories WHERE trajectory_id IN ({_marks(chunk)})", chunk)}
        missing = [i for i in ids if i not in current]
        if missing:
            raise RolloutNotFoundError(f"{len(missing)} trajectory id(s) are not in {self.path} (first: {missing[0]}); "
                                       "add trajectories before marking them")
        for i, (old_status, old_step, old_reason) in current.items():
            # Marking again with the same outcome is a no-op (a retried call); anything else is a bug upstream.
            if old_status != "buffered" and (old_status, old_step, old_reason) != (status, step, reason):
                at = f" at step {old_step}" if old_step is not None else ""
                raise ValueError(f"trajectory {i} is already {old_status}{at}; only buffered trajectories can become {status}")
        conn.executemany("UPDATE trajectories SET status = ?, step = ?, drop_reason = ? WHERE trajectory_id = ?",
                         [(status, step, reason, i) for i in ids])

    def rewind(self, step: int) -> int:
        """Back to the buffer: trajectories trained or dropped after trainer step `step` (a resumed run's
        checkpoint), so it trains on them again. Returns how many went back."""
        with self._write() as conn:
            conn.execute("DELETE FROM training WHERE step > ?", (step,))
            return conn.execute("UPDATE trajectories SET status = 'buffered', step = NULL, drop_reason = NULL "
                                "WHERE status IN ('trained', 'dropped_stale', 'dropped_other') AND step > ?", (step,)).rowcount

    # --- reading ---

    def buffered(self, limit: int | None = None) -> list[Trajectory]:
        """Trajectories still waiting for the trainer, in the order they were added."""
        with self._lock:
            blobs = self._connection().execute("SELECT data FROM trajectories WHERE status = 'buffered' ORDER BY seq LIMIT ?",
                                               (-1 if limit is None else limit,)).fetchall()
        return [_decode(b) for (b,) in blobs]

    def training(self, trajectory_id: str) -> TrainingRecord | None:
        """What the trainer did with this trajectory (an exact id), or None: not trained (yet), or stored
        before cwm-rl kept training records (schema version 1)."""
        if self.schema_version < 2:
            return None
        with self._lock:
            row = self._connection().execute("SELECT trajectory_id, step, advantage, data FROM training WHERE trajectory_id = ?",
                                             (trajectory_id,)).fetchone()
        return None if row is None else _unpack_training(*row)

    def get(self, id_or_prefix: str) -> Trajectory:
        """The full Trajectory with this id, or with the one id that starts with this prefix (like git)."""
        return _decode(self._find(id_or_prefix, "data")[0])

    def row(self, id_or_prefix: str) -> RolloutRow:
        """The indexed columns (status, step, ...) of one trajectory, by id or unique id prefix."""
        return RolloutRow(*self._find(id_or_prefix, _SELECT_LIGHT))

    def _find(self, key: str, columns: str) -> tuple:
        if not key:
            raise ValueError("empty trajectory id; pass an id or the start of one (`cwm-rl rollouts list` shows them)")
        with self._lock:
            conn = self._connection()
            row = conn.execute(f"SELECT {columns} FROM trajectories WHERE trajectory_id = ?", (key,)).fetchone()
            if row is not None:
                return row
            # Ids with this prefix are the index range [key, key with its last character bumped).
            end = key[:-1] + chr(min(ord(key[-1]) + 1, 0x10FFFF))
            rows = conn.execute(f"SELECT {columns}, trajectory_id, env_id, task_id FROM trajectories "
                                "WHERE trajectory_id >= ? AND trajectory_id < ? ORDER BY trajectory_id LIMIT 6", (key, end)).fetchall()
        if not rows:
            raise RolloutNotFoundError(f"no trajectory with id or id prefix {key!r} in {self.path}; "
                                       "`cwm-rl rollouts list` shows the ids")
        if len(rows) > 1:
            shown = ", ".join(f"{r[-3]} ({r[-2]}, task {r[-1]})" for r in rows[:5])
            raise ValueError(f"id prefix {key!r} is ambiguous: it matches {shown}{', ...' if len(rows) > 5 else ''}; "
                             "give more characters")
        return rows[0][:-3]

    def query(self, *, order: str = "stored", limit: int | None = None, offset: int = 0, **filters: Any) -> list[RolloutRow]:
        """Light rows of the trajectories matching `filters` (the fields of `RolloutFilter`).

        `order` is a key of ORDER_KEYS (`stored`, `return`, `tokens`, `generated`, `version`, `step`,
        `turns`), descending with a leading "-": `order="-return"` lists the best first.
        """
        where, params = RolloutFilter(**filters).where()
        descending = order.startswith("-")
        if order.lstrip("-") not in ORDER_KEYS:
            raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDER_KEYS)} (with a leading '-' for descending)")
        direction = "DESC" if descending else "ASC"
        sql = (f"SELECT {_SELECT_LIGHT} FROM trajectories{where} ORDER BY {ORDER_KEYS[order.lstrip('-')]} {direction}, "
               "seq LIMIT ? OFFSET ?")
        with self._lock:
            rows = self._connection().execute(sql, [*params, -1 if limit is None else limit, offset]).fetchall()
        return [RolloutRow(*r) for r in rows]

    def count(self, **filters: Any) -> int:
        """How many trajectories match `filters` (the fields of `RolloutFilter`)."""
        where, params = RolloutFilter(**filters).where()
        with self._lock:
            return self._connection().execute(f"SELECT count(*) FROM trajectories{where}", params).fetchone()[0]

    def stats(self, **filters: Any) -> dict[str, dict[str, Any]]:
        """Per env id: `count`, `mean_return`, `mean_generated_tokens` and `statuses` (count per status)."""
        where, params = RolloutFilter(**filters).where()
        with self._lock:
            rows = self._connection().execute(
                f'SELECT env_id, status, count(*), sum("return"), sum(num_generated_tokens) FROM trajectories{where} '
                "GROUP BY env_id, status ORDER BY env_id, status", params).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for env_id, status, n, total_return, total_generated in rows:
            env = out.setdefault(env_id, {"count": 0, "sum_return": 0.0, "sum_generated": 0, "statuses": {}})
            env["count"] += n
            env["sum_return"] += total_return
            env["sum_generated"] += total_generated
            env["statuses"][status] = n
        for env in out.values():
            env["mean_return"] = env.pop("sum_return") / env["count"]
            env["mean_generated_tokens"] = env.pop("sum_generated") / env["count"]
        return out

    def export_parquet(self, out_path: str | os.PathLike[str], *, batch_size: int = 256, **filters: Any) -> int:
        """Write matching trajectories to a Parquet file, one row each: the indexed columns, the four token
        arrays as list columns, the turn rewards, and the full Trajectory JSON. Returns the row count."""
        where, params = RolloutFilter(**filters).where()
        self._connection()  # a closed store stays closed
        # Its own connection: a long export must not hold the lock the job's writer thread needs.
        conn = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None)
        try:
            cursor = conn.execute(f"SELECT {_SELECT_LIGHT}, data FROM trajectories{where} ORDER BY seq", params)
            rows = ((RolloutRow(*r[:-1]), r[-1]) for r in iter(cursor.fetchone, None))
            return _write_parquet(rows, Path(out_path), batch_size)
        finally:
            conn.close()

    # --- lifecycle ---

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the rollout store {self.path} is closed")
        return self._conn

    def pragma(self, name: str) -> Any:
        """An SQLite setting of this store's connection (`journal_mode`, `synchronous`, ...), for diagnostics."""
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not a PRAGMA name")
        with self._lock:
            return self._connection().execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        """Close the connection (idempotent). Everything `add` returned from is already on disk."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> RolloutStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RolloutStore({str(self.path)!r})"


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on a connection with isolation_level=None: all or nothing, rolled back on any
    error (also in the analysis store, cwm_rl/replay/results.py). The caller holds the connection's lock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _encode(t: Trajectory, status: str, stored_at: float) -> tuple:
    """One INSERT row, in _LIGHT_COLUMNS order (without seq) then the compressed JSON."""
    data = zlib.compress(t.model_dump_json().encode(), 1)  # level 1: ~4x smaller at a fraction of level 6's cost
    return (t.trajectory_id, t.run_id, t.env_id, t.task_id, t.group_id, t.sample_index, t.return_, t.finish_reason,
            t.error, len(t.turns), t.num_tokens, t.num_generated_tokens, t.oldest_version, t.newest_version,
            t.created_at or stored_at, stored_at, status, None, None, data)


def _decode(blob: bytes) -> Trajectory:
    return Trajectory.model_validate_json(zlib.decompress(blob))


decode_trajectory = _decode  # for readers with their own SQL over the `data` column (the viewer)


def _pack_training(r: TrainingRecord) -> bytes:
    """zlib of three arrays over the generated tokens: float32 trainer logprobs, float32 IS weights, int8 clip flags."""
    return zlib.compress(array("f", r.trainer_logprobs).tobytes() + array("f", r.is_weights).tobytes()
                         + array("b", r.clipped).tobytes(), 1)


def _unpack_training(trajectory_id: str, step: int, advantage: float, blob: bytes) -> TrainingRecord:
    raw = zlib.decompress(blob)
    n = len(raw) // 9  # 4 + 4 + 1 bytes a token
    logprobs, weights, clipped = array("f"), array("f"), array("b")
    logprobs.frombytes(raw[:4 * n])
    weights.frombytes(raw[4 * n:8 * n])
    clipped.frombytes(raw[8 * n:])
    return TrainingRecord(trajectory_id=trajectory_id, step=step, advantage=advantage, trainer_logprobs=logprobs.tolist(),
                          is_weights=weights.tolist(), clipped=clipped.tolist())


def _write_parquet(rows: Iterator[tuple[RolloutRow, bytes]], out: Path, batch_size: int) -> int:
    """Stream (row, compressed JSON) pairs into a Parquet file, `batch_size` rows at a time (bounded memory)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("exporting to Parquet needs pyarrow: pip install 'cwm-rl[parquet]'") from None
    light = {"seq": pa.int64(), "sample_index": pa.int32(), "return": pa.float64(), "num_turns": pa.int32(),
             "num_tokens": pa.int32(), "num_generated_tokens": pa.int32(), "oldest_version": pa.int32(),
             "newest_version": pa.int32(), "created_at": pa.float64(), "stored_at": pa.float64(), "step": pa.int64()}
    arrays = {"token_ids": pa.int32(), "loss_mask": pa.int8(), "logprobs": pa.float64(), "policy_versions": pa.int32()}
    schema = pa.schema([(c, light.get(c, pa.string())) for c in _LIGHT_COLUMNS]
                       + [("terminated", pa.bool_()), ("truncated", pa.bool_())]
                       + [(name, pa.list_(kind)) for name, kind in arrays.items()]
                       + [("turn_rewards", pa.list_(pa.float64())), ("trajectory_json", pa.string())])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # renamed into place when complete: never a half-written export
    num_rows = 0
    try:
        with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
            while batch := list(itertools.islice(rows, batch_size)):
                columns: dict[str, list[Any]] = {name: [] for name in schema.names}
                for row, blob in batch:
                    text = zlib.decompress(blob).decode()
                    data = json.loads(text)
                    for name, value in row.to_dict().items():
                        columns[name].append(value)
                    for name in ("terminated", "truncated", *arrays):
                        columns[name].append(data[name])
                    columns["turn_rewards"].append([turn["reward"] for turn in data["turns"]])
                    columns["trajectory_json"].append(text)
                writer.write_table(pa.table(columns, schema=schema))
                num_rows += len(batch)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return num_rows


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]


def _marks(chunk: list[str]) -> str:
    return ", ".join("?" * len(chunk))
