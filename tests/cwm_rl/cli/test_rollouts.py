"""`cwm-rl rollouts list|show|stats|export` on a store populated here (typer's CliRunner; real subprocesses
for the exit codes and messages a user sees)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cwm_rl.cli import app
from cwm_rl.store import RolloutStore
from cwm_rl.types import Trajectory

CLI = [str(Path(sys.executable).with_name("cwm-rl"))]


@pytest.fixture
def run_dir(tmp_path, make_trajectory) -> Path:
    """A run with 4 Math episodes (returns 0..3; the first trained at step 2, the second dropped stale)
    and one Echo episode that ended in an env error, with unicode and markup-like text."""
    run = tmp_path / "run"
    ts = [make_trajectory(trajectory_id=f"{i}a{i}b" + "0" * 28, task_id=f"math-{i}", rewards=(0.0, float(i)), version=10 + i,
                          seed=i, run_id="run-1", group_id="g-math", sample_index=i) for i in range(4)]
    ts.append(make_trajectory(trajectory_id="e" * 32, env_id="cwm_rl/Echo-v0", task_id="écho", rewards=(0.5,), version=7,
                              prompt="Répète: [bold]pomme[/bold] ✓", finish_reason="env_error", error="env step raised KeyError: 'mot'"))
    with RolloutStore(run) as store:
        store.add(ts)
        store.mark_trained([ts[0].trajectory_id], step=2)
        store.mark_dropped([ts[1].trajectory_id], reason="stale", step=2)
    return run


def invoke(*args: str):
    result = CliRunner().invoke(app, ["rollouts", *map(str, args)], env={"COLUMNS": "200"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_list_shows_the_newest_first_and_filters(run_dir):
    out = invoke("list", run_dir)
    lines = [line for line in out.splitlines() if "cwm_rl/" in line]
    assert [line.split()[0] for line in lines] == ["eeeeeeeeee", "3a3b000000", "2a2b000000", "1a1b000000", "0a0b000000"]
    assert "env_error" in lines[0] and "écho" in lines[0] and "0.5" in lines[0]
    assert "10..11" in lines[-1] and "trained" in lines[-1] and "8/17" in lines[-1]  # versions, tokens gen/total
    assert "dropped (stale)" in lines[-2]
    assert "5 shown of 5 matching (5 stored)" in out

    out = invoke("list", run_dir, "--env", "cwm_rl/Math*", "--min-return", "1", "--order=-return", "--limit", "2")
    assert [line.split()[2] for line in out.splitlines() if "cwm_rl/" in line] == ["math-3", "math-2"]
    assert "2 shown of 3 matching (5 stored)" in out
    assert "1 shown of 1 matching" in invoke("list", run_dir, "--status", "trained", "--step", "2")
    assert "2 shown of 2 matching" in invoke("list", run_dir, "--version", "12")

    rows = json.loads(invoke("list", run_dir, "--json", "--finish-reason", "env_error"))
    assert len(rows) == 1 and rows[0]["trajectory_id"] == "e" * 32 and rows[0]["return"] == 0.5
    assert rows[0]["error"] == "env step raised KeyError: 'mot'" and rows[0]["status"] == "buffered"


def test_show_prints_a_readable_transcript(run_dir):
    out = invoke("show", run_dir, "3a3b")  # a unique id prefix is enough
    assert "trajectory 3a3b" + "0" * 28 in out
    assert "env cwm_rl/Math-v0  task math-3" in out and "status buffered" in out
    assert "return 3  finish reason terminated" in out
    assert "versions 13..14  tokens 17 (8 generated)  turns 2" in out
    # Turn by turn: what the model saw (first the prompt, then the env's reply), wrote, and got.
    turn0, turn1 = out.split("─ turn 0 ─")[1].split("─ turn 1 ─")
    assert "saw system> Answer in \\boxed{}." in turn0 and "saw user> What is 2 + 3?" in turn0
    assert "wrote (4 tokens [6, 10), versions 13" in turn0 and "turn 0: the answer is \\boxed{4}" in turn0
    assert 'reward 0  info {"verdict": "v0"}' in turn0
    assert "saw user> not yet (0), try again" in turn1 and "turn 1: the answer is \\boxed{5}" in turn1
    assert "versions 14" in turn1 and 'reward 3  info {"verdict": "v1"}' in turn1
    assert "env user> correct!" in out.split("after the last turn")[1]

    trained = invoke("show", run_dir, "0a0b")
    assert "status trained at step 2" in trained
    failed = invoke("show", run_dir, "eeee")
    assert "error env step raised KeyError: 'mot'" in failed and "finish reason env_error" in failed
    assert "saw user> Répète: [bold]pomme[/bold] ✓" in failed  # text as it was, not rich markup


def test_show_tokens_lists_every_token_by_span(run_dir):
    out = invoke("show", run_dir, "2a2b", "--tokens")
    tokens = out.split("─ tokens ─")[1]
    headings = [line for line in tokens.splitlines() if line.startswith("-- ")]
    assert headings == ["-- prompt [0, 6) --", "-- turn 0 action [6, 10) --", "-- turn 0 observation [10, 13) --",
                        "-- turn 1 action [13, 17) --"]
    t = Trajectory.model_validate_json(invoke("show", run_dir, "2a2b", "--json"))
    rows = [line.split() for line in tokens.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == t.num_tokens == 17
    for pos, token, mask, version, logprob in rows:
        i = int(pos)
        assert (int(token), int(mask), int(version)) == (t.token_ids[i], t.loss_mask[i], t.policy_versions[i])
        assert float(logprob) == pytest.approx(t.logprobs[i], abs=5e-5)


def test_show_json_is_the_stored_trajectory(run_dir):
    with RolloutStore(run_dir, create=False) as store:
        stored = store.get("e" * 32)
    assert Trajectory.model_validate_json(invoke("show", run_dir, "e", "--json")) == stored


def test_stats_and_export(run_dir, tmp_path):
    import pyarrow.parquet as pq

    out = invoke("stats", run_dir)
    math = next(line for line in out.splitlines() if "cwm_rl/Math-v0" in line)
    assert "1.5" in math and "buffered 2, dropped_stale 1, trained 1" in math

    out = invoke("export", run_dir, "--parquet")
    assert "exported 5 rollouts -> " in out and (run_dir / "rollouts.parquet").is_file()
    table = pq.read_table(run_dir / "rollouts.parquet")
    assert table.column("task_id").to_pylist() == ["math-0", "math-1", "math-2", "math-3", "écho"]
    assert "exported 2 rollouts" in invoke("export", run_dir, "--parquet", "--out", tmp_path / "x.parquet", "--status", "buffered",
                                           "--env", "cwm_rl/Math-v0")
    assert pq.read_table(tmp_path / "x.parquet").column("task_id").to_pylist() == ["math-2", "math-3"]


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["rollouts", *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("args, message", [
    (["list", "{tmp}/nope"], "run directory {tmp}/nope does not exist"),
    (["show", "{tmp}", "abc"], "no rollout store in {tmp} (no rollouts.sqlite)"),
    (["show", "{run}", "f00"], "no trajectory with id or id prefix 'f00'"),
    (["show", "{run}", "0a"], "id prefix '0a' is ambiguous"),
    (["list", "{run}", "--status", "done"], "unknown status 'done'"),
    (["export", "{run}"], "choose an export format: --parquet"),
])
def test_bad_input_gets_one_clear_line(run_dir, tmp_path, args, message):
    if "ambiguous" in message:  # a second id starting with 0a
        with RolloutStore(run_dir) as store:
            store.add(Trajectory(trajectory_id="0a" + "9" * 30, task_id="x", env_id="cwm_rl/Math-v0", finish_reason="aborted"))
    fill = {"tmp": tmp_path, "run": run_dir}
    r = run(*[a.format(**fill) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message.format(**fill) in r.stderr and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr
