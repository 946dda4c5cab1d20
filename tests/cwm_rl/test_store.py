"""The rollout store on real SQLite files: round trips, queries, the status lifecycle, kill -9, readers
in another process while a job writes, schema versions, Parquet export."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from cwm_rl.store import RolloutNotFoundError, RolloutStore, RolloutStoreError
from cwm_rl.types import TrainingRecord, Trajectory


@pytest.fixture
def store(tmp_path):
    with RolloutStore(tmp_path / "run") as s:
        yield s


def test_round_trip_keeps_every_field(store, make_trajectory):
    multi = make_trajectory(rewards=(0.0, 0.5, 1.0), version=3, run_id="run-1", group_id="g1", sample_index=2)
    failed = make_trajectory(rewards=(0.25,), finish_reason="env_error", error="env step raised KeyError: 'x'")
    unicode = make_trajectory(prompt="Résous: 2 + 3 = ? ✓ 日本語 \\boxed{} [bold]not markup[/] \x00 nul", task_id="tâche-1")
    empty = Trajectory(task_id="t", env_id="cwm_rl/Math-v0", finish_reason="env_error", error="env reset raised")
    assert store.add([multi, failed, unicode]) == 3
    store.add(empty, status="eval")
    for t in (multi, failed, unicode, empty):
        again = store.get(t.trajectory_id)
        assert again == t and again.model_dump() == t.model_dump()
    row = store.row(multi.trajectory_id)
    assert (row.env_id, row.task_id, row.run_id, row.group_id, row.sample_index) == ("cwm_rl/Math-v0", "task-0", "run-1", "g1", 2)
    assert (row.return_, row.num_turns, row.finish_reason, row.error, row.status, row.step) == (1.5, 3, "terminated", None, "buffered", None)
    assert (row.num_tokens, row.num_generated_tokens) == (multi.num_tokens, multi.num_generated_tokens) == (6 + 3 * 4 + 2 * 3, 12)
    assert (row.oldest_version, row.newest_version) == (3, 5)
    assert store.row(failed.trajectory_id).error == "env step raised KeyError: 'x'"
    empty_row = store.row(empty.trajectory_id)
    assert (empty_row.status, empty_row.oldest_version, empty_row.newest_version, empty_row.num_tokens) == ("eval", -1, -1, 0)
    assert empty_row.created_at == empty_row.stored_at > 0  # no finish time given: the time it was stored


def test_query_filters_and_order(store, make_trajectory):
    ts = [make_trajectory(env_id=env, task_id=f"{env[-7:-3]}-{i}", rewards=(0.0, float(i)), version=i, seed=i)
          for env in ("cwm_rl/Math-v0", "cwm_rl/Echo-v0") for i in range(4)]
    ts.append(make_trajectory(task_id="cut", rewards=(2.5,), version=9, finish_reason="max_tokens"))
    store.add(ts)
    ids = lambda rows: [r.trajectory_id for r in rows]  # noqa: E731
    assert ids(store.query()) == [t.trajectory_id for t in ts]  # insertion order by default
    assert ids(store.query(order="-stored", limit=2)) == [ts[-1].trajectory_id, ts[-2].trajectory_id]
    assert [r.task_id for r in store.query(env="cwm_rl/Echo-v0")] == ["Echo-0", "Echo-1", "Echo-2", "Echo-3"]
    assert store.count(env="cwm_rl/Math*") == 5 and store.count(env="cwm_rl/Math") == 0
    assert [r.task_id for r in store.query(task="Echo-[12]")] == ["Echo-1", "Echo-2"]
    assert [r.return_ for r in store.query(order="-return", limit=3)] == [3.0, 3.0, 2.5]
    assert [r.task_id for r in store.query(order="-return", limit=2)] == ["Math-3", "Echo-3"]  # ties: insertion order
    assert [r.return_ for r in store.query(min_return=1.0, max_return=2.5, env="cwm_rl/Math-v0")] == [1.0, 2.0, 2.5]
    assert [r.task_id for r in store.query(finish_reason="max_tokens")] == ["cut"]
    # Trajectory i holds versions i and i + 1.
    assert sorted(r.task_id for r in store.query(version=2)) == ["Echo-1", "Echo-2", "Math-1", "Math-2"]
    assert [r.task_id for r in store.query(order="version", version=9)] == ["cut"]
    assert ids(store.query(limit=3, offset=6)) == [t.trajectory_id for t in ts[6:9]]
    assert store.count() == 9 and store.count(min_return=100) == 0 and store.query(min_return=100) == []
    with pytest.raises(ValueError, match="unknown order 'size'"):
        store.query(order="size")
    with pytest.raises(ValueError, match="unknown status 'done'; use one of buffered, trained"):
        store.count(status="done")
    with pytest.raises(ValueError, match="unknown finish reason 'ok'"):
        store.query(finish_reason="ok")
    with pytest.raises(TypeError):
        store.query(enviroment="x")


def test_status_lifecycle_and_rewind(store, make_trajectory):
    ts = [make_trajectory(task_id=f"t{i}", seed=i) for i in range(6)]
    store.add(ts[:5])
    store.add(ts[5], status="eval")
    a, b, c, d, e, ev = (t.trajectory_id for t in ts)
    store.mark_trained([a, b], step=1)
    store.mark_dropped([c], reason="stale", step=1)
    store.mark_dropped([d], reason="zero_advantage", step=2)
    store.mark_trained([a, b], step=1)  # the same outcome again (a retried call) is a no-op
    assert {r.task_id: (r.status, r.step, r.drop_reason) for r in store.query()} == {
        "t0": ("trained", 1, None), "t1": ("trained", 1, None), "t2": ("dropped_stale", 1, "stale"),
        "t3": ("dropped_other", 2, "zero_advantage"), "t4": ("buffered", None, None), "t5": ("eval", None, None)}
    assert [r.task_id for r in store.query(step=1, status=["trained", "dropped_stale"])] == ["t0", "t1", "t2"]
    with pytest.raises(ValueError, match=f"trajectory {a} is already trained at step 1; only buffered"):
        store.mark_trained([e, a], step=2)
    with pytest.raises(ValueError, match=f"trajectory {ev} is already eval"):
        store.mark_dropped([ev], reason="stale")
    with pytest.raises(RolloutNotFoundError, match="1 trajectory id.s. are not in .* .first: nope."):
        store.mark_trained([e, "nope"], step=2)
    assert store.row(e).status == "buffered"  # a refused call changes nothing, not even its valid ids
    with pytest.raises(ValueError, match="add.. takes status 'buffered' or 'eval'"):
        store.add(make_trajectory(), status="trained")
    # A run resumed from its step-1 checkpoint trains again on what it dropped at step 2.
    assert store.rewind(1) == 1
    assert [t.task_id for t in store.buffered()] == ["t3", "t4"]
    assert store.rewind(0) == 3 and store.count(status="buffered") == 5


def test_buffered_is_insertion_order_and_survives_reopening(tmp_path, make_trajectory):
    ts = [make_trajectory(task_id=f"t{i}", seed=i) for i in range(10)]
    with RolloutStore(tmp_path) as store:
        store.add(ts[:3])
        store.add(ts[3:4])
        store.add(ts[4:])
        store.mark_trained([ts[1].trajectory_id, ts[6].trajectory_id], step=0)
    with RolloutStore(tmp_path, create=False) as store:
        assert store.buffered() == [t for i, t in enumerate(ts) if i not in (1, 6)]
        assert [t.task_id for t in store.buffered(limit=2)] == ["t0", "t2"]


def test_id_prefix_lookup_like_git(store, make_trajectory):
    ids = ["abc1230000", "abc9990000", "abd0000000", "b" * 32]
    store.add([make_trajectory(trajectory_id=i, task_id=f"t{n}") for n, i in enumerate(ids)])
    assert store.get("abc1").trajectory_id == "abc1230000"
    assert store.get("abd").trajectory_id == "abd0000000"
    assert store.row("bbbb").trajectory_id == "b" * 32
    assert store.get("abc9990000").task_id == "t1"
    with pytest.raises(ValueError, match="id prefix 'abc' is ambiguous: it matches abc1230000 .cwm_rl/Math-v0, task t0., abc9990000"):
        store.get("abc")
    with pytest.raises(RolloutNotFoundError, match="no trajectory with id or id prefix 'abe'"):
        store.get("abe")
    with pytest.raises(ValueError, match="empty trajectory id"):
        store.get("")


def test_a_batch_with_a_stored_id_stores_nothing(store, make_trajectory):
    first = make_trajectory()
    store.add(first)
    fresh = make_trajectory(task_id="fresh")
    with pytest.raises(ValueError, match=f"trajectory {first.trajectory_id} is already stored"):
        store.add([fresh, first])
    with pytest.raises(ValueError, match="same trajectory id twice"):
        store.add([fresh, fresh])
    assert store.count() == 1 and store.count(task="fresh") == 0
    store.add(fresh)
    assert store.count() == 2


def test_stats_per_env(store, make_trajectory):
    store.add([make_trajectory(rewards=(1.0,)), make_trajectory(rewards=(0.0, 0.0)), make_trajectory(env_id="cwm_rl/Echo-v0", rewards=(0.5,))])
    store.mark_trained([store.query(limit=1)[0].trajectory_id], step=0)
    stats = store.stats()
    assert stats["cwm_rl/Math-v0"] == {"count": 2, "statuses": {"buffered": 1, "trained": 1}, "mean_return": 0.5,
                                       "mean_generated_tokens": 6.0}
    assert stats["cwm_rl/Echo-v0"]["count"] == 1 and stats["cwm_rl/Echo-v0"]["mean_return"] == 0.5
    assert list(store.stats(status="trained")) == ["cwm_rl/Math-v0"]


# A job that stores batches of `batch_size` trajectories (one group each) and prints their ids once `add` returned.
WRITER = """
import sys, time
from cwm_rl.store import RolloutStore
from cwm_rl.types import Span, Trajectory, Turn

store = RolloutStore(sys.argv[1])
batch_size, num_batches, pause_s = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for b in range(num_batches):
    batch = [Trajectory(task_id=f"task-{b}", env_id="test/Kill-v0", group_id=f"group-{b}", sample_index=i,
                        token_ids=list(range(512)), loss_mask=[0] * 64 + [1] * 448, logprobs=[0.0] * 64 + [-0.5] * 448,
                        policy_versions=[-1] * 64 + [b] * 448, finish_reason="terminated", terminated=True,
                        turns=[Turn(index=0, action="x" * 400, reward=1.0, action_span=Span(start=64, end=512))],
                        **{"return": 1.0})
             for i in range(batch_size)]
    store.add(batch)
    print(" ".join(t.trajectory_id for t in batch), flush=True)
    time.sleep(pause_s)
"""


def start_writer(tmp_path, *, batch_size: int, num_batches: int, pause_s: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), str(batch_size), str(num_batches), str(pause_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("batch_size", [1, 16])
def test_kill_9_loses_nothing_reported_stored(tmp_path, batch_size):
    writer = start_writer(tmp_path, batch_size=batch_size, num_batches=100_000)
    printed = [writer.stdout.readline() for _ in range(40)]  # 40 batches reported stored ...
    time.sleep(0.05)  # ... and more in flight
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL, writer.stderr.read()
    printed += writer.stdout.read().splitlines(keepends=True)  # lines still in the pipe
    reported = [i for line in printed if line.endswith("\n") for i in line.split()]
    assert (tmp_path / "run" / "rollouts.sqlite-wal").stat().st_size > 0  # killed before any clean close/checkpoint

    conn = sqlite3.connect(tmp_path / "run" / "rollouts.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    with RolloutStore(tmp_path / "run", create=False) as store:
        stored = {r.trajectory_id for r in store.query()}
        assert set(reported) <= stored, f"{len(set(reported) - stored)} reported trajectories were lost"
        assert len(stored) - len(reported) in (0, batch_size)  # at most the batch committed as the kill came
        groups = store.stats()["test/Kill-v0"]["count"] // batch_size
        assert all(store.count(group=f"group-{g}") == batch_size for g in range(groups))  # batches are all or nothing
        assert store.get(reported[-1]).num_tokens == 512
        store.add(Trajectory(task_id="after", env_id="test/Kill-v0", finish_reason="aborted"))  # and it is writable


def test_reader_in_another_process_sees_whole_batches_while_the_job_writes(tmp_path):
    batch_size, num_batches = 8, 150
    writer = start_writer(tmp_path, batch_size=batch_size, num_batches=num_batches, pause_s=0.002)
    first = writer.stdout.readline()  # the store exists once the first batch is reported
    seen, reads = [], 0
    with RolloutStore(tmp_path / "run", create=False) as store:
        assert store.get(first.split()[0]).env_id == "test/Kill-v0"
        while writer.poll() is None:
            count = store.count()
            assert count % batch_size == 0, "a reader saw half a transaction"
            seen.append(count)
            for row in store.query(order="-stored", limit=3):
                assert store.get(row.trajectory_id).trajectory_id == row.trajectory_id
            reads += 1
        assert writer.wait() == 0, writer.stderr.read()
        assert seen == sorted(seen) and len(set(seen)) > 5, f"{reads} reads saw counts {sorted(set(seen))}"
        assert store.count() == batch_size * num_batches


def test_one_writer_thread_and_reader_threads_share_a_store(store, make_trajectory):
    errors: list[BaseException] = []
    done = threading.Event()

    def write():
        try:
            for b in range(40):
                store.add([make_trajectory(task_id=f"b{b}", group_id=f"b{b}", seed=b * 4 + i) for i in range(4)])
        except BaseException as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)
        finally:
            done.set()

    def read():
        try:
            while not done.is_set():
                assert store.count() % 4 == 0
                rows = store.query(order="-stored", limit=2)
                if rows:
                    store.get(rows[0].trajectory_id[:12])
                store.stats()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert store.count() == 160 and len(store.buffered()) == 160


def test_opening_bad_stores_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .*nope does not exist"):
        RolloutStore(tmp_path / "nope", create=False)
    with pytest.raises(FileNotFoundError, match="no rollout store in .* .no rollouts.sqlite."):
        RolloutStore(tmp_path, create=False)
    assert not (tmp_path / "rollouts.sqlite").exists()  # a reader never creates a store
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "rollouts.sqlite").write_bytes(b"not a database, just bytes" * 100)
    with pytest.raises(RolloutStoreError, match="is not a rollout store"):
        RolloutStore(tmp_path / "junk")
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(RolloutStoreError, match="an SQLite file but not a rollout store"):
        RolloutStore(tmp_path / "other.sqlite")


def test_a_newer_schema_is_refused(tmp_path, make_trajectory):
    with RolloutStore(tmp_path / "rollouts.sqlite") as store:  # a path ending in .sqlite names the file
        store.add(make_trajectory())
    conn = sqlite3.connect(tmp_path / "rollouts.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RolloutStoreError, match="has schema version 99, but this cwm-rl reads versions up to 2; upgrade cwm-rl"):
        RolloutStore(tmp_path, create=False)


def test_durable_mode_and_closed_store(tmp_path):
    store = RolloutStore(tmp_path, durable=True)
    assert store.pragma("synchronous") == 2  # FULL: fsync per commit
    assert store.pragma("journal_mode") == "wal"
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="is closed"):
        store.count()
    with RolloutStore(tmp_path) as normal:
        assert normal.pragma("synchronous") == 1  # NORMAL


def test_export_parquet_reads_back(store, make_trajectory, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ts = [make_trajectory(task_id=f"t{i}", rewards=(0.0, float(i)), version=i, seed=i) for i in range(5)]
    ts.append(make_trajectory(env_id="cwm_rl/Echo-v0", prompt="ünïcode ✓", error="boom", finish_reason="env_error"))
    store.add(ts)
    store.mark_trained([ts[0].trajectory_id], step=7)
    out = tmp_path / "exports" / "all.parquet"
    assert store.export_parquet(out, batch_size=4) == 6  # two row groups
    table = pq.read_table(out)
    assert table.num_rows == 6 and not out.with_name("all.parquet.partial").exists()
    rows = table.to_pylist()
    for row, t in zip(rows, ts):
        assert row["trajectory_id"] == t.trajectory_id and row["return"] == t.return_
        assert row["token_ids"] == t.token_ids and row["loss_mask"] == t.loss_mask
        assert row["logprobs"] == t.logprobs and row["policy_versions"] == t.policy_versions
        assert row["turn_rewards"] == [turn.reward for turn in t.turns]
        assert Trajectory.model_validate_json(row["trajectory_json"]) == t
    assert (rows[0]["status"], rows[0]["step"], rows[1]["step"]) == ("trained", 7, None)
    assert (rows[5]["error"], rows[5]["env_id"], rows[5]["terminated"]) == ("boom", "cwm_rl/Echo-v0", False)
    assert table.schema.field("token_ids").type.value_type == pa.int32()
    assert store.export_parquet(tmp_path / "math.parquet", env="cwm_rl/Math-v0", min_return=2) == 3
    assert pq.read_table(tmp_path / "math.parquet", columns=["task_id"]).column(0).to_pylist() == ["t2", "t3", "t4"]


def _record(t: Trajectory, step: int, advantage: float = 0.5) -> TrainingRecord:
    n = t.num_generated_tokens
    return TrainingRecord(trajectory_id=t.trajectory_id, step=step, advantage=advantage,
                          trainer_logprobs=[-0.25 * (k + 1) for k in range(n)], is_weights=[1.0 - 0.125 * k for k in range(n)],
                          clipped=[(k % 3) - 1 for k in range(n)])


def test_training_records_are_kept_beside_their_trajectories(store, make_trajectory):
    trained, dropped = make_trajectory(task_id="a"), make_trajectory(task_id="b")
    store.add([trained, dropped])
    assert store.training(trained.trajectory_id) is None  # not trained yet
    record = _record(trained, step=3, advantage=-0.75)
    store.mark_step(3, [trained.trajectory_id], {"stale": [dropped.trajectory_id]}, [record])
    back = store.training(trained.trajectory_id)
    assert back == record  # float32 keeps these values exactly
    assert store.training(dropped.trajectory_id) is None
    spread = back.per_token(trained)  # over every token: None where the policy generated nothing
    generated = [i for i, m in enumerate(trained.loss_mask) if m]
    assert [spread["trainer_logprob"][i] for i in generated] == record.trainer_logprobs
    assert all(spread["is_weight"][i] is None for i, m in enumerate(trained.loss_mask) if not m)
    with pytest.raises(ValueError, match="record of .* has 8 tokens but the trajectory generated 4"):
        TrainingRecord(trajectory_id="x", step=0, advantage=0, trainer_logprobs=[0.0] * 8, is_weights=[1.0] * 8,
                       clipped=[0] * 8).per_token(make_trajectory(rewards=(1.0,)))
    # A resumed run rewinds past its checkpoint: the records of what it will train again go too.
    assert store.rewind(2) == 2
    assert store.training(trained.trajectory_id) is None


def test_a_version_1_store_is_upgraded_by_a_writer_and_read_as_it_is_by_readers(tmp_path, make_trajectory):
    """A store from before training records: readers open it untouched, the job's writer adds the table."""
    t = make_trajectory()
    with RolloutStore(tmp_path) as store:
        store.add(t)
    conn = sqlite3.connect(tmp_path / "rollouts.sqlite")  # make it what cwm-rl wrote before schema version 2
    conn.execute("DROP TABLE training")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with RolloutStore(tmp_path, readonly=True) as reader:
        assert reader.schema_version == 1 and reader.get(t.trajectory_id) == t and reader.training(t.trajectory_id) is None
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.add(make_trajectory(task_id="new"))
    conn = sqlite3.connect(tmp_path / "rollouts.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1  # the reader changed nothing
    conn.close()
    with RolloutStore(tmp_path) as writer:
        assert writer.schema_version == 2
        writer.mark_step(1, [t.trajectory_id], {}, [_record(t, step=1)])
        assert writer.training(t.trajectory_id).step == 1
