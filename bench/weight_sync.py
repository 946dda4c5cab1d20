"""Benchmark weight sync: publish-to-reloaded latency per backend vs a bare safetensors save + load.

The bench starts its own two-node Ray cluster on 127.0.0.1 (`ray start --head --block` and a second
`ray start --address ... --block` with a custom resource, random free ports, its own auth token and
temp dir) and stops exactly the processes it started at the end, also on error. A `Sender` actor on
the head node holds the weights (as the trainer's rank 0 does); a `Receiver` actor on the second node
does what a rollout worker does before vLLM's reload. For each state dict (the tiny and small
presets, and a ~100 M-parameter model of the same architecture), alternating rounds of:

1. bare: `safetensors.torch.save_file` into /dev/shm (Sender), then `load_file` of it (Receiver);
2. files: `WeightPublisher(root on /dev/shm).publish(v, state)` (Sender), then `load_file` of the
   version dir's weights (Receiver: what a same-host worker's reload reads);
3. object_store: `ObjectStorePublisher.publish(v, state)` (Sender), then `LocalWeights().materialise(
   shipped)` and `load_file` of the result (Receiver, on the other node: Ray's object transfer).

Each side's time is measured inside its actor and the latency is their sum (no actor-call overhead
in it). Break-downs: publish = checkpoint tensors + `ray.put` of their views; materialise = `ray.get`
(fetch from the head node) + the rest (write into /dev/shm, link, rename, prune). Medians over the rounds. vLLM's own `reload_weights` comes on top of every backend alike and is
not run here.

What was tried on the way (2026-12-06, the 100 M case): the publisher first put `safetensors.torch.save`'s
bytes (6.1x bare: serialising 3x slower than `save_file`, and `ray.get` unpickling a fresh 409 MB copy);
the same bytes as a numpy view 4.0x; the file built into one numpy buffer 3.4x; the tensors themselves as
numpy views with the worker writing the file 2.8x. The last is what `ObjectStorePublisher` and
`LocalWeights` now do (`trainer/publish.py: safetensors_parts`).

    .venv/bin/python bench/weight_sync.py [--rounds 5] [--big-layers 16]

Goal (issue 17): object store <= 2x bare for the 100 M case. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would hide packages: drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

BIN = Path(sys.executable).parent
HOST = "127.0.0.4"  # any loopback address but 127.0.0.1, which Ray swaps for the machine's outside address
BIG_PRESET = "bench-100m"
GOAL_OBJECT_STORE_RATIO = 2.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Cluster:
    """Two `ray start --block` nodes on 127.0.0.1 with their own token and temp dir. `stop` ends the processes this
    object started (each node's `ray start` process, which tears its node down on SIGTERM, then any of their
    descendants still alive), by pid: never `ray stop`, which would end every Ray on the machine."""

    def __init__(self, workdir: Path, object_store_bytes: int):
        token = workdir / "ray-token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.temp_dir = tempfile.mkdtemp(prefix="cwmws-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.object_store_bytes = object_store_bytes
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
        self.workdir = workdir
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self._known: dict[int, object] = {}  # pid -> psutil.Process of everything seen under our nodes

    def start(self) -> None:
        self._node("head", "--head", f"--port={self.port}", "--include-dashboard=false",
                   f"--ray-client-server-port={free_port()}", '--resources={"sender_node": 1}')
        self._node("worker", f"--address={self.address}", '--resources={"worker_node": 1}')

    def _node(self, name: str, *args: str) -> None:
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        log = self.workdir / f"ray-{name}.log"
        self.logs.append(log)
        cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={HOST}", "--num-cpus=1",
               f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
               *ports, *args]
        process = subprocess.Popen(cmd, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(process)
        deadline = time.monotonic() + 180
        while "block forever" not in log.read_text():
            if process.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) did not come up in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        self._remember()

    def _remember(self) -> None:
        import psutil

        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                for p in [root, *root.children(recursive=True)]:
                    self._known.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        import psutil

        self._remember()  # actors' worker processes started since
        for node in self.nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)  # `ray start --block` kills its node's processes on SIGTERM
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        leftovers = []
        for p in self._known.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running checks the pid was not reused
                    leftovers.append(p)
            except psutil.NoSuchProcess:
                pass
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        if leftovers:
            print(f"killed {len(leftovers)} leftover Ray processes of this bench", file=sys.stderr)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# -- the models ------------------------------------------------------------------------------------------------

def make_models(workdir: Path, big_layers: int) -> dict[str, Path]:
    """tiny and small presets, and a ~100 M-parameter model of the same (CWM) architecture: a real HF model dir."""
    from cwm_rl.models import init_model
    from cwm_rl.models.presets import PRESETS, ModelPreset

    models = {name: init_model(workdir / name, preset=name, seed=0) for name in ("tiny", "small")}
    # 16 layers x (attention 1.6 M + MLP 4.7 M) + embeddings and head 1.6 M: about 102 M parameters, 147 tensors.
    PRESETS[BIG_PRESET] = ModelPreset(BIG_PRESET, num_layers=big_layers, hidden_size=768, num_heads=12, num_kv_heads=4,
                                      intermediate_size=2048, max_position_embeddings=4096, sliding_window=256)
    try:
        models["100m"] = init_model(workdir / "100m", preset=BIG_PRESET, seed=0)
    finally:
        del PRESETS[BIG_PRESET]
    return models


# -- the actors ----------------------------------------------------------------------------------------------------

class _Timed:
    """Replace `obj.name` with a wrapper that appends each call's seconds to `self.calls`, for a `with` block."""

    def __init__(self, obj, name: str):
        self.obj, self.name, self.calls = obj, name, []

    def __enter__(self):
        self.original = getattr(self.obj, self.name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.calls.append(time.perf_counter() - started)

        setattr(self.obj, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.original)


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32",
                      "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class Sender:
    """On the head node: the weights, and the three ways to hand them on (the trainer's rank 0 side)."""

    def __init__(self, model_dir: str, shm_root: str):
        import torch
        from transformers import AutoModelForCausalLM

        from trainer.publish import ObjectStorePublisher, WeightPublisher

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.state = self.model.state_dict()
        self.shm_root = Path(shm_root)
        (self.shm_root / "bare").mkdir(parents=True, exist_ok=True)
        self.files = WeightPublisher(self.shm_root / "published", base_model_dir=model_dir, keep_last=2)
        self.object_store = ObjectStorePublisher(base_model_dir=model_dir, keep_last=2)
        # What the bare save writes: the publisher's checkpoint tensors (no tied aliases; nothing to convert here).
        self.bare_tensors = self.files._checkpoint_tensors(self.state)
        self.versions = 0

    def info(self) -> dict:
        import ray

        tensors = self.bare_tensors.values()
        return {"node_id": ray.get_runtime_context().get_node_id(), "params": sum(t.numel() for t in tensors),
                "tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors)}

    def bare_save(self) -> tuple[str, float]:
        from safetensors.torch import save_file

        self.versions += 1
        path = self.shm_root / "bare" / f"model-{self.versions}.safetensors"
        started = time.perf_counter()
        save_file(self.bare_tensors, path, metadata={"format": "pt"})
        return str(path), time.perf_counter() - started

    def remove(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)

    def files_publish(self) -> tuple[str, float]:
        self.versions += 1
        started = time.perf_counter()
        path = self.files.publish(self.versions, self.state)
        return str(path / "model.safetensors"), time.perf_counter() - started

    def object_store_publish(self) -> tuple[object, dict[str, float]]:
        import ray

        self.versions += 1
        with _Timed(ray, "put") as put:
            started = time.perf_counter()
            shipped = self.object_store.publish(self.versions, self.state)
            total = time.perf_counter() - started
        return shipped, {"publish_s": total, "put_s": sum(put.calls), "tensors_s": total - sum(put.calls)}

    def close(self) -> None:
        self.files.close()
        self.object_store.close()


class Receiver:
    """On the second node: what a rollout worker does with weights before vLLM's reload."""

    def __init__(self):
        import torch

        from rollout_workers.weights import LocalWeights

        torch.set_num_threads(1)
        self.params: dict = {}  # the "engine's" weights, that each load copies into
        self.local = LocalWeights(keep_last=2)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def load(self, path: str) -> float:
        """`load_file` (safetensors maps the file: no bytes read yet) and a copy of every tensor into this actor's
        resident parameters, as an engine's weight reload does (`param.copy_(loaded)`), so the file is read."""
        import torch
        from safetensors.torch import load_file

        started = time.perf_counter()
        tensors = load_file(path)
        with torch.no_grad():
            for name, tensor in tensors.items():
                param = self.params.get(name)
                if param is None or param.shape != tensor.shape or param.dtype != tensor.dtype:
                    param = self.params[name] = torch.empty_like(tensor)  # first load of these weights (warm-up round)
                param.copy_(tensor)
        elapsed = time.perf_counter() - started
        del tensors  # unmapping is not part of the load
        return elapsed

    def materialise_and_load(self, shipped) -> dict[str, float]:
        import ray

        with _Timed(ray, "get") as get:
            started = time.perf_counter()
            path = self.local.materialise(shipped)
            materialise = time.perf_counter() - started
        load = self.load(str(path / "model.safetensors"))
        return {"materialise_s": materialise, "fetch_s": sum(get.calls), "write_s": materialise - sum(get.calls), "load_s": load}

    def close(self) -> None:
        self.local.close()


# -- the bench -----------------------------------------------------------------------------------------------------

def run_model(ray, name: str, model_dir: Path, rounds: int, shm_root: Path) -> dict:
    sender = ray.remote(Sender).options(num_cpus=0, resources={"sender_node": 1}).remote(str(model_dir), str(shm_root / name))
    receiver = ray.remote(Receiver).options(num_cpus=0, resources={"worker_node": 1}).remote()
    try:
        info = ray.get(sender.info.remote())
        assert info["node_id"] != ray.get(receiver.node_id.remote()), "the sender and the receiver must run on different nodes"
        sides = ["bare", "files", "object_store"]
        figures: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for round_ in range(rounds + 1):  # round 0 warms up (imports, the static files' first fetch)
            for side in sides[round_ % len(sides):] + sides[:round_ % len(sides)]:  # a different order each round
                if side == "bare":
                    path, save_s = ray.get(sender.bare_save.remote())
                    load_s = ray.get(receiver.load.remote(path))
                    ray.get(sender.remove.remote(path))
                    row = {"total_s": save_s + load_s, "save_s": save_s, "load_s": load_s}
                elif side == "files":
                    path, publish_s = ray.get(sender.files_publish.remote())
                    load_s = ray.get(receiver.load.remote(path))
                    row = {"total_s": publish_s + load_s, "publish_s": publish_s, "load_s": load_s}
                else:
                    shipped, sent = ray.get(sender.object_store_publish.remote())
                    got = ray.get(receiver.materialise_and_load.remote(shipped))
                    del shipped
                    row = {"total_s": sent["publish_s"] + got["materialise_s"] + got["load_s"], **sent, **got}
                if round_ > 0:
                    figures[side].append(row)
            if round_ > 0:
                print(f"{name} round {round_}:", {s: round(v[-1]["total_s"], 4) for s, v in figures.items()}, file=sys.stderr)
        ray.get([sender.close.remote(), receiver.close.remote()])
    finally:
        for actor in (sender, receiver):
            ray.kill(actor)
    med = {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for side, rows in figures.items()}
    bare = med["bare"]["total_s"]
    out = {
        "params": info["params"], "tensors": info["tensors"], "mb": round(info["bytes"] / 1e6, 2),
        "bare_s": round(bare, 4), "files_s": round(med["files"]["total_s"], 4), "object_store_s": round(med["object_store"]["total_s"], 4),
        "files_over_bare": round(med["files"]["total_s"] / bare, 3),
        "object_store_over_bare": round(med["object_store"]["total_s"] / bare, 3),
        "breakdown": {side: {k: round(v, 4) for k, v in m.items() if k != "total_s"} for side, m in med.items()},
    }
    # The same ratios taken within each round (the sides of a round run seconds apart), then the median: steadier
    # than the ratio of medians when the machine's load moves between rounds.
    for side in sides[1:]:
        out[f"{side}_over_bare_per_round"] = round(statistics.median(
            row["total_s"] / base["total_s"] for row, base in zip(figures[side], figures["bare"])), 3)
    out["object_store_gb_per_s_fetch"] = round(info["bytes"] / med["object_store"]["fetch_s"] / 1e9, 3)
    out["goal_met"] = out["object_store_over_bare"] <= GOAL_OBJECT_STORE_RATIO
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="Measured rounds per state dict (after one warm-up round).")
    parser.add_argument("--big-layers", type=int, default=16, help="Layers of the ~100 M model (16: about 102 M parameters).")
    parser.add_argument("--models", default="tiny,small,100m")
    parser.add_argument("--object-store-gb", type=float, default=3.0, help="Object store memory of each node.")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]

    shm = Path("/dev/shm")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cwm-ws-") as tmp:
        workdir = Path(tmp)
        shm_root = (shm if shm.is_dir() else workdir) / f"cwm-rl-bench-ws-{os.getpid()}"
        cluster = Cluster(workdir, int(args.object_store_gb * 1e9))
        ray = None
        try:
            models = make_models(workdir, args.big_layers)
            cluster.start()
            os.environ.update({k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED")})
            import ray

            ray.init(address=cluster.address, _node_ip_address=HOST, log_to_driver=False, configure_logging=False)
            alive = [n for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2, f"expected 2 nodes, got {len(alive)}"
            for name in args.models.split(","):
                results[name] = run_model(ray, name, models[name], args.rounds, shm_root)
                r = results[name]
                print(f"{name}: {r['params']:,} params, {r['mb']} MB, bare {r['bare_s'] * 1000:.1f} ms, files "
                      f"{r['files_s'] * 1000:.1f} ms ({r['files_over_bare']}x), object store {r['object_store_s'] * 1000:.1f} ms "
                      f"({r['object_store_over_bare']}x; goal <= {GOAL_OBJECT_STORE_RATIO}: {'met' if r['goal_met'] else 'missed'})",
                      file=sys.stderr)
        finally:
            if ray is not None and ray.is_initialized():
                ray.shutdown()
            cluster.stop()
            shutil.rmtree(shm_root, ignore_errors=True)

    big = results.get("100m")
    print(json.dumps({
        "bench": "weight_sync",
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "load_avg_1min_start_end": [round(load_start, 1), round(os.getloadavg()[0], 1)],  # others' load: see the notes
        "models": results,
        "goal_object_store_ratio": GOAL_OBJECT_STORE_RATIO,
        "goal_met_100m": big["goal_met"] if big else None,
    }))


if __name__ == "__main__":
    main()
