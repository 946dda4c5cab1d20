"""What replay, rescore and branch found, kept in `RUN_DIR/analysis.sqlite`, beside the rollout store.

The rollout store (`rollouts.sqlite`) is the job's record and these tools never write to it; their
results go to a second SQLite file in the same run directory, so a job can keep writing while a
researcher replays, rescores and branches, and the viewer shows both.

    >>> import tempfile
    >>> results = AnalysisStore(tempfile.mkdtemp())
    >>> report = ReplayReport(trajectory_id="t1", env_id="cwm_rl/Math-v0", task_id="math-1", target="in-process",
    ...                       recorded_return=1.0, replayed_return=1.0)
    >>> results.add_replay(report)
    1
    >>> [r.identical for r in results.replays("t1")]
    [True]
    >>> results.close()

Tables: `replays` (one ReplayReport each), `rescore_sets` and `rescores` (one RescoreSet and a
RescoreResult per trajectory), `branch_sets` and `branches` (one BranchSet and its Trajectories).
Reports are zlib-compressed JSON; the columns beside them are what the viewer filters on.
`tests/cwm_rl/replay/test_results.py` covers each.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cwm_rl.store import write_transaction
from cwm_rl.types import Trajectory, new_id

ANALYSIS_FILE = "analysis.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = [
    """CREATE TABLE replays (
        seq INTEGER PRIMARY KEY,
        trajectory_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        identical INTEGER NOT NULL,
        first_divergence TEXT,
        data BLOB NOT NULL                       -- zlib(ReplayReport JSON)
    )""",
    "CREATE INDEX replays_trajectory ON replays (trajectory_id, seq)",
    """CREATE TABLE rescore_sets (
        rescore_id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        data BLOB NOT NULL                       -- zlib(RescoreSet JSON)
    )""",
    """CREATE TABLE rescores (
        rescore_id TEXT NOT NULL REFERENCES rescore_sets (rescore_id),
        trajectory_id TEXT NOT NULL,
        old_return REAL NOT NULL,
        new_return REAL,                         -- NULL when the rescore failed (error in data)
        flipped INTEGER NOT NULL,
        data BLOB NOT NULL,                      -- zlib(RescoreResult JSON)
        PRIMARY KEY (rescore_id, trajectory_id)
    )""",
    "CREATE INDEX rescores_trajectory ON rescores (trajectory_id)",
    """CREATE TABLE branch_sets (
        branch_id TEXT PRIMARY KEY,
        trajectory_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        data BLOB NOT NULL                       -- zlib(BranchSet JSON)
    )""",
    "CREATE INDEX branch_sets_trajectory ON branch_sets (trajectory_id)",
    """CREATE TABLE branches (
        branch_id TEXT NOT NULL REFERENCES branch_sets (branch_id),
        sample_index INTEGER NOT NULL,
        "return" REAL NOT NULL,
        data BLOB NOT NULL,                      -- zlib(Trajectory JSON)
        PRIMARY KEY (branch_id, sample_index)
    )""",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldDiff(_Model):
    """One field that differs between the record and the replay."""

    field: str = Field(description="observation, reward, terminated, truncated, info.KEY, or reset.observation / reset.info.KEY.")
    recorded: Any = Field(default=None, description="The value in the stored trajectory.")
    replayed: Any = Field(default=None, description="The value the fresh env gave.")
    expected: str | None = Field(default=None, description="Why the env says this field may differ (not a divergence), or None.")


class TurnDiff(_Model):
    """The differences of one turn (turn -1: the reset); empty `diffs` when the turn replayed identically."""

    turn: int = Field(ge=-1)
    diffs: list[FieldDiff] = Field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return any(d.expected is None for d in self.diffs)


class ReplayReport(_Model):
    """One trajectory re-stepped in a fresh env: per-turn differences against the record."""

    trajectory_id: str
    env_id: str
    task_id: str
    target: str = Field(description="Where it was replayed: 'in-process' or the env server's URL.")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="The env's constructor arguments in the replay.")
    recorded_return: float
    replayed_return: float | None = None
    turns: list[TurnDiff] = Field(default_factory=list, description="The reset (turn -1), then every replayed turn.")
    replayed_rewards: list[float] = Field(default_factory=list)
    replayed_info: list[dict[str, Any]] = Field(default_factory=list, description="The info of every replayed step.")
    error: str | None = Field(default=None, description="Why the replay could not run to the end, if it could not.")
    created_at: float = Field(default_factory=time.time)

    @property
    def identical(self) -> bool:
        """No divergence: every field equal, or different only where the env said it may be."""
        return self.error is None and not any(t.diverged for t in self.turns)

    @property
    def first_divergence(self) -> str | None:
        """'turn 0: reward 1 -> 0' for the first field that diverged (or the error); None when identical."""
        if self.error is not None:
            return f"error: {self.error}"
        for t in self.turns:
            for d in t.diffs:
                if d.expected is None:
                    where = "" if t.turn < 0 else f"turn {t.turn}: "  # reset fields are named reset.*
                    return f"{where}{d.field} {_short(d.recorded)} -> {_short(d.replayed)}"
        return None


class RescoreResult(_Model):
    """One trajectory's rewards again, from a replay with a changed env or verifier."""

    rescore_id: str
    trajectory_id: str
    env_id: str
    task_id: str
    old_return: float
    new_return: float | None = None
    old_rewards: list[float] = Field(default_factory=list)
    new_rewards: list[float] = Field(default_factory=list)
    new_info: list[dict[str, Any]] = Field(default_factory=list, description="The info of every replayed step.")
    error: str | None = None

    @property
    def flipped(self) -> bool:
        """The verdict changed: a success (return > 0) became a failure (return <= 0), or the other way."""
        return self.new_return is not None and (self.old_return > 0) != (self.new_return > 0)


class RescoreSet(_Model):
    """One `rollouts rescore` call: what changed, and how the returns moved."""

    rescore_id: str = Field(default_factory=new_id)
    created_at: float = Field(default_factory=time.time)
    label: str = Field(default="", description="What was changed: the imported modules and env kwargs, or a name given.")
    imports: list[str] = Field(default_factory=list)
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    filters: dict[str, Any] = Field(default_factory=dict)
    num_trajectories: int = 0
    num_changed: int = 0
    num_flipped: int = 0
    num_errors: int = 0
    mean_return_before: float | None = None
    mean_return_after: float | None = None


class BranchSet(_Model):
    """N continuations of a stored trajectory from its exact token prefix at turn K."""

    branch_id: str = Field(default_factory=new_id)
    created_at: float = Field(default_factory=time.time)
    trajectory_id: str
    env_id: str
    task_id: str
    turn: int = Field(ge=0, description="Turns before this one were replayed; this one and after were generated anew.")
    model: str = Field(description="The model directory the continuations were generated with.")
    policy_version: int | None = Field(default=None, description="Its policy version, when it is a published version of the run.")
    prefix_tokens: int = Field(ge=0, description="How many recorded tokens every continuation starts from.")
    temperature: float = 1.0
    original_return: float
    returns: list[float] = Field(default_factory=list)
    finish_reasons: list[str] = Field(default_factory=list)


class AnalysisStore:
    """`RUN_DIR/analysis.sqlite`: replay reports, rescore sets and branch sets of one run (WAL, like the rollout store).

    `create=False` opens only an existing file (readers: the viewer); `readonly=True` can never write.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, readonly: bool = False, timeout_s: float = 30.0):
        given = Path(path)
        self.path = given if given.suffix == ".sqlite" else given / ANALYSIS_FILE
        if not self.path.exists() and (readonly or not create):
            raise FileNotFoundError(f"no replay, rescore or branch results in {self.path.parent} yet (no {self.path.name})")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"run directory {self.path.parent} does not exist")
        self._lock = threading.Lock()
        target = f"{self.path.resolve().as_uri()}?mode=ro" if readonly else str(self.path)
        self._conn: sqlite3.Connection | None = sqlite3.connect(target, timeout=timeout_s, isolation_level=None,
                                                                check_same_thread=False, uri=readonly)
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}, newer than this cwm-rl reads ({SCHEMA_VERSION}); "
                                   "upgrade cwm-rl")
            if not readonly:
                self._conn.execute("PRAGMA journal_mode=WAL")
                if version == 0:
                    with self._write() as conn:
                        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                            for statement in _SCHEMA:
                                conn.execute(statement)
                            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self.close()
            raise RuntimeError(f"{self.path} is not a cwm-rl analysis file (SQLite: {e}); move it away") from None
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, write_transaction(self._connection()) as conn:
            yield conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the analysis store {self.path} is closed")
        return self._conn

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    # --- replays ---

    def add_replay(self, report: ReplayReport) -> int:
        """Keep a replay report; returns its number (a replay of the same trajectory later gets a higher one)."""
        with self._write() as conn:
            return conn.execute("INSERT INTO replays (trajectory_id, created_at, identical, first_divergence, data) VALUES (?, ?, ?, ?, ?)",
                                (report.trajectory_id, report.created_at, int(report.identical), report.first_divergence,
                                 _pack(report))).lastrowid

    def replays(self, trajectory_id: str | None = None, limit: int = 100) -> list[ReplayReport]:
        """Replay reports, newest first: of one trajectory, or of all."""
        where, params = ("WHERE trajectory_id = ?", (trajectory_id,)) if trajectory_id else ("", ())
        rows = self._read(f"SELECT data FROM replays {where} ORDER BY seq DESC LIMIT ?", (*params, limit))
        return [ReplayReport.model_validate_json(zlib.decompress(b)) for (b,) in rows]

    # --- rescores ---

    def add_rescore(self, rescore: RescoreSet, results: list[RescoreResult]) -> None:
        """Keep one rescore set and its per-trajectory results, in one transaction."""
        with self._write() as conn:
            conn.execute("INSERT INTO rescore_sets (rescore_id, created_at, data) VALUES (?, ?, ?)",
                         (rescore.rescore_id, rescore.created_at, _pack(rescore)))
            conn.executemany("INSERT INTO rescores (rescore_id, trajectory_id, old_return, new_return, flipped, data) VALUES (?, ?, ?, ?, ?, ?)",
                             [(r.rescore_id, r.trajectory_id, r.old_return, r.new_return, int(r.flipped), _pack(r)) for r in results])

    def rescore_sets(self, limit: int = 100) -> list[RescoreSet]:
        """Rescore sets, newest first."""
        rows = self._read("SELECT data FROM rescore_sets ORDER BY created_at DESC LIMIT ?", (limit,))
        return [RescoreSet.model_validate_json(zlib.decompress(b)) for (b,) in rows]

    def rescore_set(self, rescore_id: str) -> RescoreSet:
        rows = self._read("SELECT data FROM rescore_sets WHERE substr(rescore_id, 1, ?) = ? LIMIT 2", (len(rescore_id), rescore_id))
        if len(rows) != 1:
            raise LookupError(f"{'no' if not rows else 'more than one'} rescore set with id (prefix) {rescore_id!r} in {self.path}")
        return RescoreSet.model_validate_json(zlib.decompress(rows[0][0]))

    def rescores(self, rescore_id: str | None = None, *, trajectory_id: str | None = None, flipped_only: bool = False,
                 limit: int = 1000, offset: int = 0) -> list[RescoreResult]:
        """Per-trajectory results of one rescore set, or every rescore of one trajectory (newest set first)."""
        clauses, params = [], []
        if rescore_id is not None:
            clauses.append("r.rescore_id = ?")
            params.append(rescore_id)
        if trajectory_id is not None:
            clauses.append("r.trajectory_id = ?")
            params.append(trajectory_id)
        if flipped_only:
            clauses.append("r.flipped = 1")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(f"SELECT r.data FROM rescores r JOIN rescore_sets s USING (rescore_id) {where} "
                          "ORDER BY s.created_at DESC, r.flipped DESC, r.trajectory_id LIMIT ? OFFSET ?", (*params, limit, offset))
        return [RescoreResult.model_validate_json(zlib.decompress(b)) for (b,) in rows]

    # --- branches ---

    def add_branch(self, branch: BranchSet, trajectories: list[Trajectory]) -> None:
        """Keep a branch set and its continuations (their `sample_index` numbers them), in one transaction."""
        with self._write() as conn:
            conn.execute("INSERT INTO branch_sets (branch_id, trajectory_id, created_at, data) VALUES (?, ?, ?, ?)",
                         (branch.branch_id, branch.trajectory_id, branch.created_at, _pack(branch)))
            conn.executemany('INSERT INTO branches (branch_id, sample_index, "return", data) VALUES (?, ?, ?, ?)',
                             [(branch.branch_id, t.sample_index, t.return_, _pack(t)) for t in trajectories])

    def branch_sets(self, trajectory_id: str | None = None, limit: int = 100) -> list[BranchSet]:
        """Branch sets, newest first: from one trajectory, or all."""
        where, params = ("WHERE trajectory_id = ?", (trajectory_id,)) if trajectory_id else ("", ())
        rows = self._read(f"SELECT data FROM branch_sets {where} ORDER BY created_at DESC LIMIT ?", (*params, limit))
        return [BranchSet.model_validate_json(zlib.decompress(b)) for (b,) in rows]

    def branch(self, branch_id: str) -> tuple[BranchSet, list[Trajectory]]:
        """One branch set and its continuations, by id or unique id prefix."""
        rows = self._read("SELECT branch_id, data FROM branch_sets WHERE substr(branch_id, 1, ?) = ? LIMIT 2", (len(branch_id), branch_id))
        if len(rows) != 1:
            raise LookupError(f"{'no' if not rows else 'more than one'} branch set with id (prefix) {branch_id!r} in {self.path}")
        found, data = rows[0]
        continuations = self._read("SELECT data FROM branches WHERE branch_id = ? ORDER BY sample_index", (found,))
        return (BranchSet.model_validate_json(zlib.decompress(data)),
                [Trajectory.model_validate_json(zlib.decompress(b)) for (b,) in continuations])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> AnalysisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_results(run_dir: str | os.PathLike[str]) -> AnalysisStore | None:
    """The run's analysis store opened read-only, or None when nothing was replayed, rescored or branched yet."""
    path = Path(run_dir)
    path = path.parent if path.suffix == ".sqlite" else path
    if not (path / ANALYSIS_FILE).exists():
        return None
    return AnalysisStore(path, readonly=True)


def _pack(model: BaseModel) -> bytes:
    return zlib.compress(model.model_dump_json().encode(), 1)


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)  # strings quoted, newlines escaped
    return text if len(text) <= width else text[:width - 3] + "..."
