"""A job on a real two-node Ray cluster on this machine (on 127.0.0.3: Ray turns 127.0.0.1 into the machine's
outside address, any other loopback address it keeps): `ray start --head` for the
trainer, a second `ray start --address` with its own resources for the rollout workers, the env server as its
own process reached by URL, weights through Ray's object store. Mid-run the second node's raylet is killed
(-9) and started again: the job carries on, the worker comes back on the new node, nothing stored is lost."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from envs.server.local import free_port

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


IP = "127.0.0.3"
STEPS = 12  # the node is lost after step 2: steps take seconds, so the job must not be able to finish before that


class Cluster:
    """`ray start` nodes sharing one token and one temp dir; `stop` ends every process of them (and only those:
    `ray stop` would end every Ray on the machine)."""

    def __init__(self, tmp_path: Path):
        token = tmp_path / "ray-token"
        token.write_text(secrets.token_hex(32))
        self.temp_dir = tempfile.mkdtemp(prefix="cwmray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        self.address = f"{IP}:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}

    def start_head(self, *args: str) -> None:
        self.start("--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                   f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}", *args)

    def start(self, *args: str, retry_for: float = 0) -> None:
        """`ray start` a node; `retry_for` seconds of retries (a node coming back is refused until the head has
        noticed that its last raylet is gone)."""
        common = [f"--node-ip-address={IP}", "--num-cpus=1", "--disable-usage-stats"]
        deadline = time.monotonic() + retry_for
        while True:
            r = subprocess.run([str(BIN / "ray"), "start", *common, *args], env=self.env, capture_output=True, text=True, timeout=180)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    def raylets(self) -> list[psutil.Process]:
        """The raylet of every node of this cluster (another Ray on the machine has another GCS address)."""
        return [p for p in psutil.process_iter(["cmdline"])
                if "raylet/raylet" in " ".join(p.info["cmdline"] or []) and f"--gcs-address={self.address}" in (p.info["cmdline"] or [])]

    def raylet(self, node_manager_port: int) -> psutil.Process | None:
        return next((p for p in self.raylets() if f"--node_manager_port={node_manager_port}" in p.info["cmdline"]), None)

    def stop(self) -> None:
        processes = {p.pid: p for raylet in self.raylets() for p in [raylet, *raylet.children(recursive=True)]}
        for p in psutil.process_iter(["cmdline"]):
            if self.temp_dir in " ".join(p.info["cmdline"] or []):
                processes.setdefault(p.pid, p)
        for p in processes.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(processes.values()), timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def actors(raylet: psutil.Process | None, name: str) -> list[psutil.Process]:
    """The Ray worker processes of a node running actor class `name` (their title is "ray::Class.method")."""
    if raylet is None:
        return []
    try:
        return [p for p in raylet.children() if p.cmdline()[:1] and p.cmdline()[0].startswith(f"ray::{name}")]
    except psutil.NoSuchProcess:
        return []


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def trained_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def stored_ids(run_dir: Path) -> set[str]:
    with sqlite3.connect(f"file:{run_dir / 'rollouts.sqlite'}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT trajectory_id FROM trajectories")}


@pytest.mark.fault
def test_job_on_two_nodes_survives_losing_the_worker_node(tmp_path, fault_report):
    cluster = Cluster(tmp_path)
    worker_port = free_port()
    worker_node = ["--address", cluster.address, '--resources={"rollout": 1}', f"--node-manager-port={worker_port}"]
    env_port, env_token = free_port(), secrets.token_hex(16)
    env = {**cluster.env, "CWM_RL_ENV_TOKEN": env_token}
    run_dir = tmp_path / "run"
    server = job = None
    try:
        cluster.start_head('--resources={"head": 1}')
        cluster.start(*worker_node)
        server = subprocess.Popen([str(BIN / "cwm-rl"), "env", "serve", "--host", "127.0.0.1", "--port", str(env_port)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "env-server.log", "w"))
        job_log = open(tmp_path / "job.log", "w")
        job = subprocess.Popen(
            [str(BIN / "cwm-rl"), "train", str(ROOT / "configs/quickstart.yaml"), "--set", f"run_dir={run_dir}",
             "--set", f"steps={STEPS}", "--set", "rollout.engine.enforce_eager=true", "--set", "model.sft.steps=60", "--set", "model.sft.eval_tasks=50", "--set", "eval.num_tasks=20",
             "--set", "eval.every_steps=0", "--set", "logging.progress=false", "--set", "max_minutes=10",
             # Steps come fast (placement and recovery are tested here, not learning): 1-digit addition (a right answer in
             # a group is far likelier than on 2 digits), small steps, and a small buffer (a step is taken once it is full,
             # signal or not).
             "--set", "trainer.batch.step_tokens=256", "--set", "buffer_groups=16", "--set", "rollout.requests_in_flight=4",
             "--set", f"ray_address={cluster.address}", "--set", "publish.backend=object_store",
             "--set", "rollout.resources={rollout: 1}", "--set", "trainer.resources={head: 1}",
             "--set", f'envs=[{{id: cwm_rl/Math-v0, kwargs: {{difficulty: 1, operators: "+"}}, url: "http://127.0.0.1:{env_port}"}}]'],
            env=env, stdout=job_log, stderr=subprocess.STDOUT, cwd=tmp_path)

        def wait(condition, what: str, timeout: float = 400, state=lambda: "") -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                assert job.poll() is None, f"the job ended before {what}:\n" + (tmp_path / "job.log").read_text()[-4000:]
                assert time.monotonic() < deadline, f"timed out waiting for {what} {state()}:\n" + (tmp_path / "job.log").read_text()[-3000:]
                time.sleep(1)

        wait(lambda: trained_steps(run_dir) >= 2, "two trainer steps")
        # What runs where: the rollout worker on the second node, the trainer on the head.
        raylet = cluster.raylet(worker_port)
        head = next(p for p in cluster.raylets() if p.pid != raylet.pid)
        assert len(cluster.raylets()) == 2
        assert len(actors(raylet, "RolloutWorker")) == 1 and not actors(raylet, "TrainerRank")
        assert len(actors(head, "TrainerRank")) == 1 and not actors(head, "RolloutWorker")
        worker = actors(raylet, "RolloutWorker")[0]
        engine = worker.children(recursive=True)  # vLLM's processes, if any (the quickstart's engine runs in the worker's own)
        before = stored_ids(run_dir)
        assert not (run_dir / "weights").exists()  # the weights went through the object store, not the run dir

        os.kill(raylet.pid, signal.SIGKILL)  # the worker node is gone, with the worker and its engine
        killed_at = time.monotonic()
        wait(lambda: not any(alive(p) for p in [worker, *engine]), "the worker and its engine to exit", 60,
             state=lambda: [(p.pid, p.name(), p.status()) for p in [worker, *engine] if alive(p)])
        time.sleep(3)
        cluster.start(*worker_node, retry_for=120)  # the node comes back; Ray restarts the worker there
        wait(lambda: actors(cluster.raylet(worker_port), "RolloutWorker"), "the worker to come back on the new node", 300)
        recover_s = time.monotonic() - killed_at  # includes the 3 s the node stays down

        assert job.wait(timeout=700) == 0, (tmp_path / "job.log").read_text()[-4000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stop_reason"] == "steps" and summary["steps"] == STEPS, summary
        assert summary["rollout_worker_restarts"] >= 1, summary
        after = stored_ids(run_dir)
        # Evals: the initial one on version 0, the final one right after the last step's reload was sent, on that version
        # (not the old weights while the worker still wrote the shipped ones to its node).
        with sqlite3.connect(f"file:{run_dir / 'rollouts.sqlite'}?mode=ro", uri=True) as db:
            eval_versions = set(db.execute("SELECT DISTINCT oldest_version, newest_version FROM trajectories WHERE status = 'eval'"))
        assert eval_versions == {(0, 0), (summary["policy_versions"], summary["policy_versions"])}, eval_versions
        assert before <= after and len(after) > len(before)  # nothing stored before the loss went missing
        assert not list(Path("/dev/shm").glob("cwm-rl-weights-*"))  # the restarted worker removed what the dead one left
        resubmitted = re.findall(r"re-submitting its (\d+) call", (tmp_path / "job.log").read_text())
        fault_report("rollout_node_lost_raylet_kill_9", affected=sum(map(int, resubmitted)), retried=sum(map(int, resubmitted)),
                     lost=len(before - after), recover_s=round(recover_s, 1), worker_restarts=summary["rollout_worker_restarts"])
    finally:
        for process in (job, server):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        cluster.stop()
