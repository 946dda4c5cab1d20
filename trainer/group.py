"""The trainer of a job as Ray actors: `trainer.num_workers` data-parallel ranks the driver only orchestrates.

`TrainerGroup(TrainerConfig(num_workers=2), model_dir, run_dir=..., publish=PublishConfig())` starts the
ranks (after `ray.init`); `group.step(trajectories)` is one optimiser step on every rank and returns one
`StepResult`; `group.publish(version)` has rank 0 publish its weights (a directory path, or a
`ShippedWeights` for the object-store backend) for the workers; `group.save_checkpoint(data_cursor)`,
`group.close()`. `tests/trainer/test_group.py` checks that 2 ranks reach the weights 1 rank does.

Why it is built this way:
- Each rank is a `TrainerRank` actor holding a `Trainer` (`trainer/train.py`), which already knows data
  parallelism: every rank gets the SAME trajectories (one object in Ray's store, fetched by each), trains
  on its share of the groups, and DDP all-reduces the gradients (gloo on CPU, nccl on GPU). Rank 0 tells
  the others where to meet (`tcp://its-node-ip:free-port`).
- Rank 0 owns the publisher and writes the checkpoints, so weights never travel through the driver; the
  trainer should run where the run dir is (the driver's node unless `trainer.resources` says otherwise).
- A step's result is rank 0's metrics and trajectory fates (every rank computes the same ones) plus the
  training records of every rank (each holds only its share).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwm_rl.types import ShippedWeights, Trajectory
from trainer.config import PublishConfig, TrainerConfig

if TYPE_CHECKING:  # torch comes with it: the driver imports this module (TrainerLost) and must stay light
    from trainer.train import StepResult

log = logging.getLogger(__name__)

Published = tuple[int, "str | ShippedWeights"]  # (version, where the workers get it)


class TrainerLost(RuntimeError):
    """A trainer rank died (kill -9, OOM killer, its node lost): the group cannot go on; the job stops and a
    resume continues from the last checkpoint."""


class TrainerRank:
    """One data-parallel rank: a Trainer, and on rank 0 the weights publisher. A plain class; `TrainerGroup`
    makes it a Ray actor."""

    def __init__(self, rank: int, world_size: int, config: dict[str, Any], model_dir: str, run_dir: str,
                 publish: dict[str, Any], num_threads: int | None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.rank, self.world_size = rank, world_size
        self.config = TrainerConfig.model_validate(config)
        self.model_dir, self.run_dir = model_dir, Path(run_dir)
        self.publish_config = PublishConfig.model_validate(publish)
        self.trainer = None
        self.publisher = None

    def meeting_point(self) -> str:
        """Where the ranks meet to set up torch.distributed: this node's address and a port free on it."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"tcp://{host}:{s.getsockname()[1]}"

    def setup(self, init_method: str | None, resume: bool) -> dict[str, Any]:
        """Join the process group (world > 1), load the model (from the run's checkpoint when resuming), and on
        rank 0 make the publisher. Every rank calls this at the same time."""
        import torch.distributed as dist

        from trainer.publish import make_publisher
        from trainer.train import Trainer

        if self.world_size > 1:
            import torch

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size)
        self.trainer = Trainer(self.config, self.model_dir, run_dir=self.run_dir, resume=self.run_dir if resume else None)
        if self.rank == 0:
            self.publisher = make_publisher(self.publish_config, base_model_dir=self.model_dir, root=self.run_dir / "weights")
        return self.state()

    def state(self) -> dict[str, Any]:
        t = self.trainer
        return {"step_count": t.step_count, "policy_version": t.policy_version, "data_cursor": t.data_cursor,
                "published_version": self.publisher.latest_version if self.publisher is not None else None}

    def step(self, trajectories: Sequence[Trajectory]) -> tuple[StepResult, dict[str, Any]]:
        """The step, and the warnings the trainer logged during it (this process's log is not the console's)."""
        caught = _Warnings()
        logging.getLogger("trainer").addHandler(caught)
        try:
            result = self.trainer.step(trajectories)
        finally:
            logging.getLogger("trainer").removeHandler(caught)
        result.warnings = caught.messages
        return result, self.state()

    def publish(self, version: int) -> str | ShippedWeights:
        published = self.publisher.publish(version, self.trainer.model.state_dict())
        return str(published) if isinstance(published, Path) else published

    def latest_published(self) -> tuple[int, str] | None:
        """The newest complete version under the files backend's root (None: nothing, or the object store)."""
        from trainer.publish import latest_published

        found = latest_published(self.publisher.root) if hasattr(self.publisher, "root") else None
        return (found[0], str(found[1])) if found else None

    def save_checkpoint(self, data_cursor: Any) -> str | None:
        path = self.trainer.save_checkpoint(data_cursor=data_cursor)
        return str(path) if path is not None else None

    def skip_to_version(self, version: int) -> None:
        self.trainer.skip_to_version(version)

    def state_dict(self) -> dict[str, Any]:
        """The model's weights (tests compare ranks and runs)."""
        return {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}

    def close(self) -> None:
        import torch.distributed as dist

        if self.publisher is not None:
            self.publisher.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class TrainerGroup:
    """The ranks of a job's trainer (see the module docstring); the attributes mirror rank 0's `Trainer`."""

    def __init__(self, config: TrainerConfig, model_dir: str | Path, *, run_dir: str | Path, publish: PublishConfig,
                 resume: bool = False, num_threads: int | None = None):
        import ray

        self.config, self.publish_config = config, publish
        self.lost = False  # a rank died (TrainerLost): nothing left to close gracefully
        actor = ray.remote(TrainerRank).options(num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                                                resources=config.resources or None, max_restarts=0)
        n = config.num_workers
        args = (config.model_dump(), str(Path(model_dir).resolve()), str(Path(run_dir).resolve()), publish.model_dump(), num_threads)
        self.ranks = [actor.remote(rank, n, *args) for rank in range(n)]
        try:
            init_method = ray.get(self.ranks[0].meeting_point.remote()) if n > 1 else None
            states = ray.get([r.setup.remote(init_method, resume) for r in self.ranks])
        except BaseException as e:
            self.close()
            cause = getattr(e, "cause", None)  # what a rank raised (a bad publish config, a missing checkpoint), not Ray's wrapper
            if isinstance(cause, Exception):
                raise cause from None
            raise
        self._take_state(states[0])

    def _take_state(self, state: dict[str, Any]) -> None:
        self.step_count: int = state["step_count"]
        self.policy_version: int = state["policy_version"]
        self.data_cursor: Any = state["data_cursor"]
        self.published_version: int | None = state["published_version"]

    def step(self, trajectories: Sequence[Trajectory]) -> StepResult:
        """One optimiser step on every rank (all get the same trajectories); rank 0's result with every rank's records."""
        import ray

        batch = ray.put(list(trajectories))
        results = self._get([r.step.remote(batch) for r in self.ranks], f"step {self.step_count + 1}")
        (result, state), others = results[0], results[1:]
        for other, _ in others:
            result.records += other.records
        self._take_state(state)
        return result

    def publish(self, version: int) -> str | ShippedWeights:
        """Rank 0 publishes its weights as `version`: a version dir (files) or a `ShippedWeights` (object store)."""
        where = self._get(self.ranks[0].publish.remote(version), f"publishing version {version}")
        self.published_version = version
        return where

    def initial_weights(self, resume: bool) -> Published | None:
        """The version the workers should load before their first episode; None: the base model (version 0).
        A run resumed from a checkpoint older than its newest published weights publishes its weights as a new
        version (versions only grow: workers and staleness rely on it)."""
        import ray

        newest = self.published_version
        if resume and newest is not None and newest > self.policy_version:
            log.warning("resumed from step %d, but weights up to version %d were published after that checkpoint; "
                        "publishing the resumed weights as version %d", self.step_count, newest, newest + 1)
            ray.get([r.skip_to_version.remote(newest + 1) for r in self.ranks])
            self.policy_version = newest + 1
            return self.policy_version, self.publish(self.policy_version)
        if self.publish_config.backend == "object_store":  # nothing of an earlier start survives in the object store
            return (self.policy_version, self.publish(self.policy_version)) if self.policy_version > 0 else None
        return ray.get(self.ranks[0].latest_published.remote())

    def save_checkpoint(self, data_cursor: Any = None) -> str | None:
        """Rank 0 saves model, optimiser, RNGs and `data_cursor` under run_dir/checkpoints."""
        self.data_cursor = data_cursor
        return self._get(self.ranks[0].save_checkpoint.remote(data_cursor), f"the checkpoint of step {self.step_count}")

    def _get(self, refs: Any, doing: str) -> Any:
        """`ray.get`, with a rank's death raised as `TrainerLost` naming the rank and what it was doing."""
        import ray
        from ray.exceptions import RayActorError

        try:
            pending = list(refs) if isinstance(refs, list) else [refs]
            while pending:  # one at a time: a dead rank raises now, while the others may wait for it in a collective
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            return ray.get(refs)
        except RayActorError as e:
            dead = [i for i, r in enumerate(self.ranks) if getattr(e, "actor_id", None) == r._actor_id.hex()]
            who = f"trainer rank {dead[0]}" if dead else "a trainer rank"
            detail = str(e).split("Worker exit detail:")[-1].split(". Some common causes")[0].strip()
            self.lost = True  # the other ranks may sit in a collective waiting for it: close kills them at once
            raise TrainerLost(f"{who} died during {doing} ({detail[:300]})") from e

    def state_dict(self, rank: int = 0) -> dict[str, Any]:
        import ray

        return ray.get(self.ranks[rank].state_dict.remote())

    def close(self) -> None:
        """Stop the ranks (the publisher finishes its deletions first)."""
        import ray

        for r in self.ranks:
            if not self.lost:
                try:
                    ray.get(r.close.remote(), timeout=60)
                except Exception:
                    pass
            ray.kill(r)
        self.ranks = []

