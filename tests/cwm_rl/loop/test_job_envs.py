"""`cwm-rl train` on every kind of env (real Ray, vLLM, trainer, store; real Docker for SWE): a user env with
a verifier and no reference answers, Code + Trace + a multi-turn Echo in one mix (one of them on an env
server named by URL), and multi-turn SWE on an env server the job starts, which leaves no container
behind, also after kill -9 and a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("cwm-rl"))
QUICKSTART = str(Path(__file__).parents[3] / "configs" / "quickstart.yaml")
# A random tiny model rarely scores: keep zero-advantage groups so the loop steps and publishes anyway. Eager: the
# quickstart compiles its model at the engine's start (~20 s), for speed a 3-step job never recovers.
SMALL_JOB = ["rollout.engine.enforce_eager=true", "rollout.group_size=2", "rollout.groups_per_request=2", "buffer_groups=4", "rollout.sampling.max_tokens=8",
             "trainer.batch.step_tokens=16", "checkpoint_every=0", "trainer.filters.drop_zero_advantage_groups=false",
             "logging.tensorboard=false"]

VERIFIER_ONLY_ENV = '''
import gymnasium as gym
from cwm_rl.types import Task
from envs import SingleTurnEnv


class Parity(SingleTurnEnv):
    """Is n even? A verifier and a task generator, and no reference_action: the usual RL env."""

    def sample_task(self, rng):
        n = int(rng.integers(10_000))
        return Task(id=f"parity-{n}", prompt=f"Is {n} even? Answer yes or no.", answer="yes" if n % 2 == 0 else "no")

    def score(self, task, action):
        return (1.0 if action.strip().lower().startswith(task.answer) else -1.0), {}


gym.register(id="my_envs/Parity-v0", entry_point=Parity)
'''


def train(args: list[str], settings: list[str], cwd: Path | None = None, timeout: float = 600) -> tuple[int, str]:
    done = subprocess.run([CLI, "train", *args, *(a for s in settings for a in ("--set", s))], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def rollouts(args: list[str], cwd: Path | None = None, timeout: float = 300) -> tuple[int, str, str]:
    """`cwm-rl rollouts ARGS`: exit code, stdout, and both outputs together (for messages and failures)."""
    done = subprocess.run([CLI, "rollouts", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return done.returncode, done.stdout, done.stdout + done.stderr


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_user_env_with_a_verifier_and_no_reference_answers_trains(tiny_model, tmp_path):
    (tmp_path / "my_envs.py").write_text(VERIFIER_ONLY_ENV)
    run_dir = tmp_path / "run"
    settings = [f"run_dir={run_dir}", f"model.path={tiny_model}", "steps=3", "eval.num_tasks=6", "eval.every_steps=0",
                "envs=[{id: my_envs/Parity-v0}]", "env_modules=[my_envs]", *SMALL_JOB]
    code, out = train([QUICKSTART], settings, cwd=tmp_path)
    assert code == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "steps" and summary["steps"] == 3 and summary["trajectories_trained"] > 0
    assert [e["step"] for e in summary["eval_history"]] == [0, 3]
    assert "eval_accuracy/my_envs/Parity-v0" in summary["eval_history"][-1]

    from cwm_rl.store import RolloutStore

    with RolloutStore(run_dir, create=False) as store:
        evaluated = {r.task_id for r in store.query(status="eval", limit=None)}
        trained = {r.task_id for r in store.query(status="trained", limit=None)}
    assert len(evaluated) == 6 and trained and not evaluated & trained  # held-out tasks are never trained on

    # A user env replays like a built-in one once its module is imported; without it, the error says so.
    code, out, both = rollouts(["replay", str(run_dir), "--import", "my_envs", "--limit", "100", "--json"], cwd=tmp_path)
    assert code == 0 and all(r["identical"] for r in json.loads(out)), both[-3000:]
    code, out, both = rollouts(["replay", str(run_dir), "--limit", "1"], cwd=tmp_path / "run")
    assert code == 1 and "my_envs/Parity-v0 is not registered in this process; pass --import MODULE" in out, both[-2000:]

    # A warm start is the one stage that needs reference answers; the error says so and how to go without.
    code, out = train([QUICKSTART], [f"run_dir={tmp_path / 'sft'}", "model.path=null", "model.sft.steps=5",
                                     "envs=[{id: my_envs/Parity-v0}]", "env_modules=[my_envs]", *SMALL_JOB], cwd=tmp_path)
    assert code != 0
    assert "has no reference_action()" in out and "model.sft.steps=0" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_code_world_model_config_warm_starts_on_its_mix_and_trains_and_evaluates_each_env(tmp_path):
    """configs/cwm-cpu.yaml, shrunk: a tiny model with CWM's tokenizer, SFT on math + Trace-v0 (CWM format) with an
    accuracy per env, then RL on both with held-out accuracy per env everywhere; held-out trace programs are never
    trained on, with any input, in the warm start or in RL."""
    from cwm_rl.loop.tasks import split_key
    from cwm_rl.store import RolloutStore

    run_dir = tmp_path / "run"
    settings = [f"run_dir={run_dir}", "model.sft.steps=6", "model.sft.eval_every=3", "model.sft.eval_tasks=8",
                "eval.num_tasks=8", "eval.every_steps=0", "steps=3", "envs.0.max_tokens=8", "envs.1.max_tokens=8", *SMALL_JOB]
    code, out = train([str(Path(QUICKSTART).with_name("cwm-cpu.yaml"))], settings)
    assert code == 0, out[-4000:]
    assert "warm start: step 3/6: held-out accuracy" in out and "cwm_rl/Trace-v0" in out, out[-3000:]
    sft = json.loads((run_dir / "model" / "sft" / "sft_summary.json").read_text())
    assert sft["envs"] == ["cwm_rl/Math-v0", "cwm_rl/Trace-v0"] and sft["by_env"]["cwm_rl/Trace-v0"]["num_eval_tasks"] == 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["eval_accuracy_by_env"]) == set(sft["envs"])
    assert all(f"eval_accuracy/{env_id}" in summary["eval_history"][-1] for env_id in sft["envs"])
    with RolloutStore(run_dir, create=False) as store:
        rows = store.query(limit=None)
        evaluated = [store.get(r.trajectory_id) for r in rows if r.status == "eval" and r.env_id == "cwm_rl/Trace-v0"]
        trained = [store.get(r.trajectory_id) for r in rows if r.status != "eval" and r.env_id == "cwm_rl/Trace-v0"]
        assert {r.env_id for r in rows if r.status != "eval"} == set(sft["envs"])  # both envs were played for training
    assert evaluated and trained
    assert all(t.finish_reason != "env_error" for t in evaluated + trained), {t.error for t in evaluated + trained}
    held_out_programs = {split_key(t.task) for t in evaluated}
    assert len(held_out_programs) == 8 and {t.task_id for t in evaluated} <= set(sft["held_out_ids"])
    assert not held_out_programs & {split_key(t.task) for t in trained}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_mix_of_code_trace_and_multi_turn_echo_trains_with_per_env_limits(tiny_model, tmp_path, server):
    """Code in-process, Trace on an env server named by URL, Echo (3 turns, its own limits) in-process."""
    run_dir = tmp_path / "run"
    envs = ("[{id: cwm_rl/Code-v0}, "
            f"{{id: cwm_rl/Trace-v0, url: '{server.url}'}}, "
            "{id: cwm_rl/Echo-v0, kwargs: {num_rounds: 3}, limits: {max_turns: 3, max_total_tokens: 256}, max_tokens: 4}]")
    settings = [f"run_dir={run_dir}", f"model.path={tiny_model}", "rollout.engine.enforce_eager=true", "steps=6", "eval.num_tasks=4", "eval.every_steps=0",
                f"envs={envs}", *SMALL_JOB]
    code, out = train([QUICKSTART], settings)
    assert code == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["trajectories_trained"] > 0
    final = summary["eval_history"][-1]
    for env_id in ("cwm_rl/Code-v0", "cwm_rl/Trace-v0", "cwm_rl/Echo-v0"):
        assert f"eval_accuracy/{env_id}" in final, final

    from cwm_rl.store import RolloutStore

    with RolloutStore(run_dir, create=False) as store:
        rows = store.query(limit=None)
        by_env = {}
        for r in rows:
            by_env.setdefault(r.env_id, []).append(r)
        assert set(by_env) == {"cwm_rl/Code-v0", "cwm_rl/Trace-v0", "cwm_rl/Echo-v0"}, set(by_env)
        echo = [store.get(r.trajectory_id) for r in by_env["cwm_rl/Echo-v0"][:6]]
        code_episodes = [store.get(r.trajectory_id) for r in by_env["cwm_rl/Code-v0"][:6]]
    # Echo plays 3 turns of at most 4 tokens; Code plays one turn of at most 8 (rollout.sampling.max_tokens).
    assert all(len(t.turns) == 3 for t in echo if t.finish_reason != "length"), [(len(t.turns), t.finish_reason) for t in echo]
    assert max(t.turns[0].action_span.end - t.turns[0].action_span.start for t in echo) <= 4
    assert all(len(t.turns) == 1 for t in code_episodes)
    assert max(t.turns[0].action_span.end - t.turns[0].action_span.start for t in code_episodes) > 4

    # Every stored episode replays identically: Code and Echo in-process, Trace on the env server it was played on
    # and in-process too.
    code, out, both = rollouts(["replay", str(run_dir), "--limit", "400", "--json"])
    reports = json.loads(out)
    assert code == 0 and {r["env_id"] for r in reports} == set(by_env) and all(r["identical"] for r in reports), both[-3000:]
    code, out, both = rollouts(["replay", str(run_dir), "--env", "cwm_rl/Trace-v0", "--server", server.url, "--limit", "20"])
    assert code == 0 and "0 diverged" in out, both[-3000:]

    # Branch a 3-turn Echo episode from turn 1 with the model it started from: each continuation starts from the
    # exact recorded tokens, keeps turn 0 and plays on to the end; the set is stored beside the run.
    original = next(t for t in echo if len(t.turns) == 3)
    code, out, both = rollouts(["branch", str(run_dir), original.trajectory_id, "--turn", "1", "--model", "0", "-n", "3", "--json"])
    assert code == 0, both[-3000:]
    branched = json.loads(out.strip().splitlines()[-1])
    prefix = original.turns[1].action_span.start
    assert branched["prefix_tokens"] == prefix and len(branched["continuations"]) == 3
    for c in branched["continuations"]:
        assert c["token_ids"][:prefix] == original.token_ids[:prefix] and c["logprobs"][:prefix] == original.logprobs[:prefix]
        assert c["turns"][0] == original.turns[0].model_dump(mode="json") and c["turns"][1]["action_span"]["start"] == prefix
        assert c["group_id"] == branched["branch_id"] and c["finish_reason"] in ("terminated", "max_tokens")
    from cwm_rl.replay.results import open_results

    with open_results(run_dir) as results:
        (stored,) = results.branch_sets(original.trajectory_id)
        assert stored.returns == [c["return"] for c in branched["continuations"]]
    code, out, both = rollouts(["branch", str(run_dir), original.trajectory_id, "--turn", "1", "--model", "999", "-n", "1"])
    assert code == 2 and "policy version 999 is not on disk" in both and "kept: " in both, both[-2000:]
    code, out, both = rollouts(["branch", str(run_dir), original.trajectory_id, "--turn", "3", "--model", "0"])
    assert code == 2 and "turn 3 is not a turn of trajectory" in both, both[-2000:]


def _run_containers(run_dir: Path) -> list[str]:
    from cwm_rl.loop.cleanup import run_label

    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=cwm-rl.run={run_label(run_dir)}"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_multi_turn_swe_on_an_env_server_the_job_starts_leaves_no_container(tiny_model, tmp_path, docker_ready):
    """configs/swe.yaml as shipped (a tiny model instead of one made by the job): kill -9 after a step, resume."""
    run_dir = tmp_path / "run"
    settings = [f"run_dir={run_dir}", f"model.path={tiny_model}", "eval.every_steps=0", "checkpoint_every=1",
                "logging.tensorboard=false"]
    config = str(Path(QUICKSTART).with_name("swe.yaml"))
    process = subprocess.Popen([CLI, "train", config, "--set", "steps=20", *(a for s in settings for a in ("--set", s))],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, deadline, seen = [], time.time() + 900, []
    for line in process.stdout:
        output.append(line)
        if "step    2" in line:  # checkpoint_every=1: the step before this line is checkpointed; kill -9 mid-run
            seen = _run_containers(run_dir)
            process.kill()
            break
        assert time.time() < deadline, "".join(output[-40:])
    process.wait(timeout=60)
    text = "".join(output)
    assert "step    2" in text, text[-4000:]
    assert seen, "the job ran SWE episodes without any container labelled with its run"

    # Resumed, the job removes what the killed start left, makes more steps and ends with no container of the run.
    time.sleep(3)  # the killed driver's env server and workers die with it
    code, out = train(["--resume", str(run_dir)], ["steps=3"], timeout=900)
    assert code == 0, out[-4000:]
    assert "container(s) an earlier start of this run left behind" in out, out[-4000:]  # the killed start's, at once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "steps" and summary["steps"] == 3 and summary["trajectories_trained"] > 0
    assert _run_containers(run_dir) == [], "containers of the run outlived it"

    from cwm_rl.store import RolloutStore

    with RolloutStore(run_dir, create=False) as store:
        episodes = [store.get(r.trajectory_id) for r in store.query(status="trained", limit=20)]
    assert episodes and all(t.env_id == "cwm_rl/SWE-v0" for t in episodes)
    graded = [t for t in episodes if t.turns and "resolved" in t.turns[-1].info]
    assert graded, [t.turns[-1].info for t in episodes]  # out of turns, the diff was graded in a fresh container
    assert all(len(t.turns) <= 4 for t in episodes)  # the env's max_turns
    assert any(len(t.turns) > 1 for t in episodes), [(len(t.turns), t.finish_reason) for t in episodes]

    # Multi-turn SWE episodes replay identically in fresh containers (the session id and pytest's timing are
    # declared as fields that may differ), and the replays leave no container behind.
    containers_before = subprocess.run(["docker", "ps", "-aq"], capture_output=True, text=True).stdout.split()
    multi = [t.trajectory_id for t in graded if len(t.turns) > 1][:2] or [graded[0].trajectory_id]
    code, out, both = rollouts(["replay", str(run_dir), *multi, "--json"], timeout=600)
    assert code == 0, both[-4000:]
    reports = json.loads(out)
    assert reports and all(r["identical"] for r in reports), both[-4000:]
    assert any(d["field"] == "reset.info.session_id" and d["expected"] for d in reports[0]["turns"][0]["diffs"])
    assert subprocess.run(["docker", "ps", "-aq"], capture_output=True, text=True).stdout.split() == containers_before


@pytest.mark.docker
def test_sandbox_reap_removes_a_runs_containers(tmp_path, docker_ready):
    """`cwm-rl sandbox reap --run RUN_DIR` removes every container labelled with that run, and only those."""
    from cwm_rl.loop.cleanup import run_label
    from envs.sandbox.rootfs import docker_base_image

    image = docker_base_image(log=print)
    mine, other = run_label(tmp_path / "run"), run_label(tmp_path / "other" / "run")
    assert mine != other  # same dir name, different runs
    ids = [subprocess.run(["docker", "run", "-d", "--label", "cwm-rl.sandbox=1", "--label", f"cwm-rl.run={label}",
                           "--network", "none", image, "sleep", "300"], capture_output=True, text=True, check=True).stdout.strip()
           for label in (mine, mine, other)]
    try:
        done = subprocess.run([CLI, "sandbox", "reap", "--run", str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"removed": 2}
        left = subprocess.run(["docker", "ps", "-aq", "--no-trunc"], capture_output=True, text=True).stdout.split()
        assert ids[2] in left and ids[0] not in left and ids[1] not in left
    finally:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
