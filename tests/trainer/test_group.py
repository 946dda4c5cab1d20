"""The trainer as Ray actors (`trainer/group.py`) on a real local Ray: 2 data-parallel ranks reach the weights
1 rank does, a checkpoint taken with 2 ranks resumes, and the object-store backend ships weights that a
worker-side `LocalWeights` writes into a loadable model dir."""

from __future__ import annotations

import time

import pytest
import torch

from trainer.config import PublishConfig, TrainerConfig
from trainer.train import Trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LINEAR_ADAM = {"lr": 1e-2, "eps": 1.0}  # eps 1: updates linear in the gradient, so summation order barely matters


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def config(**overrides) -> TrainerConfig:
    return TrainerConfig.model_validate({"optim": LINEAR_ADAM, "filters": {"max_staleness": 100}, **overrides})


def make_batches(tiny_model, sample_groups):
    model = Trainer(config(), tiny_model).model
    return [sample_groups(model, num_groups=4, group_size=3, max_new_tokens=5, seed=s) for s in range(2)]


def test_two_ranks_train_like_one_and_resume(local_ray, tiny_model, sample_groups, tmp_path):
    from trainer.group import TrainerGroup

    data = make_batches(tiny_model, sample_groups)
    weights, records = {}, {}
    for n in (1, 2):
        group = TrainerGroup(config(num_workers=n), tiny_model, run_dir=tmp_path / f"n{n}", publish=PublishConfig())
        try:
            for batch in data:
                result = group.step(batch)
                assert not result.skipped, result.metrics
            weights[n] = group.state_dict()
            records[n] = sorted(r.trajectory_id for r in result.records)
            assert group.step_count == group.policy_version == 2
            if n == 2:
                for name, tensor in group.state_dict(rank=1).items():  # DDP keeps the ranks identical
                    torch.testing.assert_close(tensor, weights[2][name], msg=name)
                assert group.save_checkpoint(data_cursor={"cursor": 7}) is not None
        finally:
            group.close()
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[2][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    # Each rank holds the records of its share of the groups; the group hands back all of them.
    assert records[2] == records[1] == sorted(result.trained_ids) and len(records[2]) > 0

    resumed = TrainerGroup(config(num_workers=2), tiny_model, run_dir=tmp_path / "n2", publish=PublishConfig(), resume=True)
    try:
        assert (resumed.step_count, resumed.policy_version, resumed.data_cursor) == (2, 2, {"cursor": 7})
        for name, tensor in resumed.state_dict(rank=1).items():
            torch.testing.assert_close(tensor, weights[2][name], msg=name)
        assert not resumed.step(data[0]).skipped and resumed.step_count == 3
        # A rank that dies: the step raises TrainerLost at once (rank 0 would wait for it in the all-reduce), and
        # close does not wait on the survivors.
        import ray

        from trainer.group import TrainerLost

        ray.kill(resumed.ranks[1])
        started = time.monotonic()
        with pytest.raises(TrainerLost, match="trainer rank 1 died during step 4"):
            resumed.step(data[1])
    finally:
        resumed.close()
    assert time.monotonic() - started < 60


def test_object_store_weights_become_a_model_dir_on_the_worker_side(local_ray, tiny_model, sample_groups, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cwm_rl.types import ShippedWeights
    from rollout_workers.weights import LocalWeights
    from trainer.group import TrainerGroup
    from trainer.publish import ship_model_dir

    group = TrainerGroup(config(), tiny_model, run_dir=tmp_path / "run", publish=PublishConfig(backend="object_store", keep_last=1))
    local = LocalWeights(parent=tmp_path)
    try:
        assert group.initial_weights(resume=False) is None  # nothing published yet: the workers hold the base model
        base = local.materialise(ship_model_dir(tiny_model))
        assert {p.name for p in base.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
        group.step(make_batches(tiny_model, sample_groups)[0])
        shipped = group.publish(1)
        assert isinstance(shipped, ShippedWeights) and shipped.version == 1 and shipped.nbytes > 0
        path = local.materialise(shipped)
        trained = group.state_dict()
        on_disk = load_file(path / "model.safetensors")
        for name, tensor in on_disk.items():
            torch.testing.assert_close(tensor, trained[name], msg=name)
        assert not torch.equal(on_disk["model.embed_tokens.weight"], load_file(base / "model.safetensors")["model.embed_tokens.weight"])
        AutoModelForCausalLM.from_pretrained(path)  # a complete HF dir: config and tokenizer beside the weights
        assert not (tmp_path / "run" / "weights").exists()  # nothing went through the run dir
        group.step(make_batches(tiny_model, sample_groups)[1])
        newer = local.materialise(group.publish(2))
        assert sorted(p.name for p in local.root.iterdir() if p.name.startswith("v")) == ["v00000001", "v00000002"]
        assert newer.name == "v00000002" and not base.exists()  # only the newest keep_last (2) stay on the worker
    finally:
        group.close()
        local.close()
    assert not local.root.exists()


def test_a_rank_that_cannot_start_raises_its_own_error(local_ray, tiny_model, tmp_path):
    """The job's CLI prints what a rank raised in one line (here a backend not built yet), not Ray's wrapper and traceback."""
    from trainer.group import TrainerGroup

    with pytest.raises(NotImplementedError, match="publish.backend 'nccl' is not built yet"):
        TrainerGroup(config(), tiny_model, run_dir=tmp_path / "run", publish=PublishConfig(backend="nccl"))
