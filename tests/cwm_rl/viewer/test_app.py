"""The viewer's JSON API against a real uvicorn server on 127.0.0.1 (ViewerServer) over a demo run's real SQLite
files: filters and paging agree with RolloutStore.query, bad input is a 4xx with a message, nothing is written."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from cwm_rl.replay.results import AnalysisStore
from cwm_rl.store import RolloutStore, RolloutStoreError
from cwm_rl.viewer import queries
from cwm_rl.viewer.app import make_app
from cwm_rl.viewer.demo import build_demo
from cwm_rl.viewer.server import ViewerServer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("runs") / "demo", num_steps=8, tokenizer=False)


@pytest.fixture(scope="module")
def client(run_dir):
    with ViewerServer(run_dir) as url, httpx.Client(base_url=url, timeout=10) as c:
        yield c


def _ids(page: dict) -> list[str]:
    return [dict(zip(page["columns"], r))["trajectory_id"] for r in page["rows"]]


def test_filters_match_the_store(client, run_dir):
    with RolloutStore(run_dir, readonly=True) as store:
        for params, filters in [({"env": "cwm_rl/Math-v0", "status": "trained"}, {"env": "cwm_rl/Math-v0", "status": "trained"}),
                                ({"min_return": 1, "finish_reason": "terminated"}, {"min_return": 1.0, "finish_reason": "terminated"}),
                                ({"status": "dropped_stale,eval"}, {"status": ["dropped_stale", "eval"]}),
                                ({"task": "code-*", "version": 3}, {"task": "code-*", "version": 3}),
                                ({"step": 2}, {"step": 2})]:
            page = client.get("/api/r/demo/trajectories", params={**params, "limit": 500}).json()
            expected = [r.trajectory_id for r in store.query(order="-stored", **filters)]
            assert expected, params  # the demo run has rows for every filter here
            assert _ids(page) == expected, params
            assert client.get("/api/r/demo/count", params=params).json()["count"] == len(expected)


@pytest.mark.parametrize("order", ["-return", "return", "-stored", "stored", "-version"])
def test_keyset_pages_cover_every_row_once_in_order(client, run_dir, order):
    seen, cursor = [], None
    while True:
        page = client.get("/api/r/demo/trajectories", params={"order": order, "limit": 7, **({"cursor": cursor} if cursor else {})}).json()
        seen += page["rows"]
        cursor = page["next"]
        if cursor is None:
            break
    with RolloutStore(run_dir, readonly=True) as store:
        assert len(seen) == store.count() == len({r[1] for r in seen})
    key = {"return": 7, "stored": 0, "version": 14}[order.lstrip("-")]
    values = [r[key] for r in seen]
    assert values == sorted(values, reverse=order.startswith("-"))


def test_live_poll_returns_only_newer_rows(client, run_dir):
    top = client.get("/api/r/demo/head").json()["max_seq"]
    page = client.get("/api/r/demo/trajectories", params={"after_seq": top - 3}).json()
    assert [r[0] for r in page["rows"]] == [top, top - 1, top - 2]


def test_text_search_is_bounded_and_continues(client, run_dir, monkeypatch):
    monkeypatch.setattr(queries, "SEARCH_MAX_ROWS", 10)  # the server runs in this process: the bound applies to it
    with RolloutStore(run_dir, readonly=True) as store:
        expected = [r.trajectory_id for r in store.query(order="-stored")
                    if "try again" in " ".join(t.action + " ".join(m.content for m in t.observation)
                                               for t in store.get(r.trajectory_id).turns).lower()]
    found, cursor, calls = [], None, 0
    while True:
        page = client.get("/api/r/demo/trajectories", params={"q": "Try AGAIN", **({"cursor": cursor} if cursor else {})}).json()
        assert page["searched"] <= 10
        found += _ids(page)
        calls += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert expected and found == expected
    assert calls > 1


def test_trajectory_is_the_stored_one_with_its_training_record(client, run_dir):
    with RolloutStore(run_dir, readonly=True) as store:
        row = store.query(status="trained", limit=1)[0]
        stored = store.get(row.trajectory_id)
        record = store.training(row.trajectory_id)
    got = client.get(f"/api/r/demo/trajectories/{row.trajectory_id[:8]}").json()  # a unique prefix works
    assert json.loads(stored.model_dump_json()) == got["trajectory"]
    assert got["row"]["status"] == "trained" and got["training"]["advantage"] == record.advantage
    assert got["token_text"] is None  # this run has no tokenizer: the page shows ids


def test_group_advantages_come_from_the_trainer_or_are_labelled(client, run_dir):
    with RolloutStore(run_dir, readonly=True) as store:
        trained = store.query(status="trained", limit=1)[0]
        buffered = store.query(status="buffered", limit=1)[0]
        records = {r.trajectory_id: store.training(r.trajectory_id) for r in store.query(group=trained.group_id)}
        others = store.query(group=buffered.group_id)
    g = client.get(f"/api/r/demo/groups/{trained.group_id}").json()
    assert [(s["advantage"], s["advantage_source"]) for s in g["samples"]] == \
        [(records[s["row"]["trajectory_id"]].advantage, "trainer") for s in g["samples"]]
    g = client.get(f"/api/r/demo/groups/{buffered.group_id}").json()
    mean = sum(r.return_ for r in others) / len(others)
    assert sorted(s["advantage"] for s in g["samples"]) == pytest.approx(sorted(r.return_ - mean for r in others))
    assert {s["advantage_source"] for s in g["samples"]} == {"return - group mean"}


def test_analysis_results(client, run_dir):
    with AnalysisStore(run_dir, readonly=True) as results:
        replays, sets, branches = results.replays(), results.rescore_sets(), results.branch_sets()
    overview = client.get("/api/r/demo/analysis").json()
    assert [r["identical"] for r in overview["replays"]] == [r.identical for r in replays]
    diverged = next(r for r in replays if not r.identical)
    mine = client.get(f"/api/r/demo/trajectories/{diverged.trajectory_id}/analysis").json()
    assert mine["replays"][0]["first_divergence"] == diverged.first_divergence
    assert [b["branch_id"] for b in mine["branches"]] == [b.branch_id for b in branches]
    rescore = client.get(f"/api/r/demo/rescores/{sets[0].rescore_id[:6]}", params={"flipped": True}).json()
    assert len(rescore["results"]) == sets[0].num_flipped > 0 and all(r["flipped"] for r in rescore["results"])
    branch = client.get(f"/api/r/demo/branches/{branches[0].branch_id}").json()
    assert [c["return"] for c in branch["continuations"]] == branches[0].returns
    assert branch["original"]["trajectory_id"] == branches[0].trajectory_id


@pytest.mark.parametrize("path, status, words", [
    ("/api/r/demo/trajectories/ffffffffff", 404, "no trajectory with id"),
    ("/api/r/demo/trajectories?min_return=lots", 400, "min_return"),
    ("/api/r/demo/trajectories?status=done", 400, "unknown status 'done'"),
    ("/api/r/demo/trajectories?order=-tokens", 400, "unknown order"),
    ("/api/r/demo/trajectories?order=-return&cursor=nope", 400, "cursor"),
    ("/api/r/demo/trajectories?q=x&order=return", 400, "newest first"),
    ("/api/r/demo/trajectories?limit=100000", 400, "limit"),
    ("/api/r/demo/groups/nogroup", 404, "no trajectories with group id"),
    ("/api/r/demo/rescores/zzz", 404, "no rescore set"),
    ("/api/r/demo/branches/zzz", 404, "no branch set"),
    ("/api/r/other/head", 404, "no run named 'other'"),
    ("/api/nothing", 404, "no API endpoint"),
])
def test_bad_input_is_a_clear_4xx(client, path, status, words):
    r = client.get(path)
    assert r.status_code == status and words in r.json()["error"]


def test_ambiguous_prefix_is_a_400(client, run_dir):
    with RolloutStore(run_dir, readonly=True) as store:
        ids = [r.trajectory_id for r in store.query()]
    prefix = next(a[:1] for a in ids if sum(b.startswith(a[:1]) for b in ids) > 1)
    r = client.get(f"/api/r/demo/trajectories/{prefix}")
    assert r.status_code == 400 and "ambiguous" in r.json()["error"]


def test_nothing_is_written(tmp_path):
    """Every page answers, and no file of the run changes; SQLite's own -wal/-shm files are all a reader adds."""
    run = build_demo(tmp_path / "run", num_steps=3, tokenizer=False)
    with RolloutStore(run):  # a clean close checkpoints the WAL: the main file then holds everything
        pass
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    with ViewerServer(run) as url, httpx.Client(base_url=url) as c:
        rows = c.get("/api/r/run/trajectories").json()["rows"]
        paths = [f"/api/r/run/trajectories/{r[1]}" for r in rows[:5]] + [f"/api/r/run/groups/{r[5]}" for r in rows[:5]]
        paths += ["/api/r/run/analysis", "/api/r/run/stats", "/api/r/run/trajectories?q=correct"]
        for path in paths:
            assert c.get(path).status_code == 200, path
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    assert {name: digest for name, digest in after.items() if name in files} == files
    assert {name for name in after if name not in files} <= {f"{db}.sqlite-{ext}" for db in ("rollouts", "analysis") for ext in ("wal", "shm")}
    conn = queries.connect(run / "rollouts.sqlite")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM trajectories")


def test_a_store_from_before_training_records_is_shown_as_it_is(tmp_path):
    """Schema version 1 (no training table): every page answers; advantages are the group's, computed."""
    run = build_demo(tmp_path / "run", num_steps=2, tokenizer=False, analysis=False)
    with sqlite3.connect(run / "rollouts.sqlite") as conn:
        conn.execute("DROP TABLE training")
        conn.execute("PRAGMA user_version = 1")
    with ViewerServer(run) as url, httpx.Client(base_url=url) as c:
        rows = c.get("/api/r/run/trajectories", params={"status": "trained"}).json()["rows"]
        assert rows
        page = c.get(f"/api/r/run/trajectories/{rows[0][1]}")
        assert page.status_code == 200 and page.json()["training"] is None
        assert c.get(f"/api/r/run/groups/{rows[0][5]}").status_code == 200


def test_a_store_from_a_newer_cwm_rl_is_refused_at_start(tmp_path):
    run = build_demo(tmp_path / "run", num_steps=2, tokenizer=False, analysis=False)
    with sqlite3.connect(run / "rollouts.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RolloutStoreError, match="schema version 99.*upgrade cwm-rl"):
        make_app(run)


def test_a_directory_of_runs(tmp_path):
    build_demo(tmp_path / "a", num_steps=2, tokenizer=False, analysis=False)
    build_demo(tmp_path / "b", num_steps=3, tokenizer=False, analysis=False)
    (tmp_path / "not-a-run").mkdir()
    with ViewerServer(tmp_path) as url, httpx.Client(base_url=url) as c:
        runs = c.get("/api/runs").json()
        assert not runs["single"] and sorted(r["name"] for r in runs["runs"]) == ["a", "b"]
        build_demo(tmp_path / "c", num_steps=2, tokenizer=False, analysis=False)  # a run started later appears
        assert c.get("/api/r/c/head").json()["max_seq"] > 0
    with pytest.raises(FileNotFoundError, match="no rollouts.sqlite"):
        make_app(tmp_path / "not-a-run")


def test_metrics_arrive_in_complete_lines(tmp_path):
    run = build_demo(tmp_path / "run", num_steps=3, tokenizer=False, analysis=False)
    with ViewerServer(run) as url, httpx.Client(base_url=url) as c:
        first = c.get("/api/r/run/metrics").json()
        assert [r["step"] for r in first["rows"] if "reward_mean" in r] == [0, 1]
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"step": 5, "reward_mean": 0.75}\n{"step": 6, "rew')  # the second line is still being written
        more = c.get("/api/r/run/metrics", params={"offset": first["offset"]}).json()
        assert more["rows"] == [{"step": 5, "reward_mean": 0.75}]
        with (run / "metrics.jsonl").open("a") as f:
            f.write('ard_mean": 1.0}\n')
        assert c.get("/api/r/run/metrics", params={"offset": more["offset"]}).json()["rows"] == [{"step": 6, "reward_mean": 1.0}]
