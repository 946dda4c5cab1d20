"""Checkpoints: a save/load round trip restores weights, optimizer, scheduler and RNG states exactly."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def make_run(seed: int, hidden: int = 16):
    """A small model with dropout, AdamW and a warmup schedule: every piece of state a resume must restore."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Dropout(0.2), nn.ReLU(), nn.Linear(hidden, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, num_steps: int) -> list[float]:
    """Steps whose data and noise come from all three RNGs (torch, numpy, python), so each must be restored."""
    losses = []
    for _ in range(num_steps):
        x = torch.randn(32, 8)  # [B, 8]
        target = x.sum(dim=1, keepdim=True) + torch.from_numpy(np.random.normal(size=(32, 1))).float() * random.random()
        loss = ((model(x) - target) ** 2).mean()  # dropout draws from torch's RNG too
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def assert_optimizer_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, state in sa["state"].items():
        assert state.keys() == sb["state"][index].keys()
        for key, value in state.items():
            other = sb["state"][index][key]
            assert torch.is_tensor(value) and torch.equal(value, other) and value.dtype == other.dtype, (index, key)


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = make_run(seed=0)
    train(model, optimizer, scheduler, 3)
    cursor = {"epoch": 1, "index": 96}
    path = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler, step=3,
                           policy_version=3, data_cursor=cursor, extra={"run": "test"})
    expected_draws = draws()

    fresh_model, fresh_optimizer, fresh_scheduler = make_run(seed=1)
    train(fresh_model, fresh_optimizer, fresh_scheduler, 1)  # different state everywhere, RNGs moved on
    assert not torch.equal(fresh_model[0].weight, model[0].weight)
    state = load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)

    assert path == tmp_path / "ckpt" / "step_00000003"
    assert (state["step"], state["policy_version"], state["data_cursor"], state["extra"]) == (3, 3, cursor, {"run": "test"})
    assert isinstance(state["created_at"], float)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor), name
    assert_optimizer_states_equal(optimizer, fresh_optimizer)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == torch.tensor(3.0)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert draws() == expected_draws


def test_resume_reproduces_training_bit_for_bit(tmp_path):
    straight = make_run(seed=0)
    random.seed(0), np.random.seed(0), torch.manual_seed(123)
    straight_losses = train(*straight, 4)

    first_half = make_run(seed=0)
    random.seed(0), np.random.seed(0), torch.manual_seed(123)
    losses = train(*first_half, 2)
    path = save_checkpoint(tmp_path, model=first_half[0], optimizer=first_half[1], scheduler=first_half[2],
                           step=2, policy_version=2, data_cursor=2)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    resumed = make_run(seed=5)
    assert load_checkpoint(path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])["data_cursor"] == 2
    losses += train(*resumed, 2)

    assert losses == straight_losses
    for (name, a), b in zip(straight[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert_optimizer_states_equal(straight[1], resumed[1])


def test_keep_last_prunes_and_latest_finds_the_newest_complete_checkpoint(tmp_path):
    model, optimizer, scheduler = make_run(seed=0)
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                        policy_version=step, data_cursor=None, keep_last=2, fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030", "step_00000040"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000040"

    (tmp_path / "step_00000050").mkdir()  # no state.json: not a checkpoint
    crashed = tmp_path / ".tmp-step_00000060-999"
    crashed.mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000040"
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=40, policy_version=41,
                    data_cursor=None, keep_last=3)  # a re-save of a step replaces it
    assert not crashed.exists()
    assert json.loads((tmp_path / "step_00000040" / "state.json").read_text())["policy_version"] == 41
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=1, policy_version=1,
                        data_cursor=None, keep_last=0)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=1, policy_version=1,
                        data_cursor={"iterator": object()})


def test_loading_into_a_different_model_names_the_mismatch_and_the_checkpoint(tmp_path):
    model, optimizer, scheduler = make_run(seed=0)
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=1, policy_version=1,
                           data_cursor=None)
    wider, wider_optimizer, wider_scheduler = make_run(seed=0, hidden=32)
    before = wider[0].weight.clone()
    with pytest.raises(ValueError, match=r"step_00000001 does not fit .* shape mismatch \(3\): 0\.bias: checkpoint \(16,\), model \(32,\)"):
        load_checkpoint(path, model=wider, optimizer=wider_optimizer, scheduler=wider_scheduler)
    assert torch.equal(wider[0].weight, before)  # nothing was changed

    renamed = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))  # no dropout: the last layer is "2."
    with pytest.raises(ValueError, match=r"not in the checkpoint \(2\): 2\.bias, 2\.weight; not in the model \(2\): 3\.bias, 3\.weight"):
        load_checkpoint(path, model=renamed, optimizer=None, scheduler=None)
    with pytest.raises(ValueError, match="not a checkpoint.*latest_checkpoint"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)


def test_a_ddp_wrapped_model_saves_plain_names_and_loads_back(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model, optimizer, scheduler = make_run(seed=0)
        wrapped = nn.parallel.DistributedDataParallel(model)
        train(wrapped, optimizer, scheduler, 1)
        path = save_checkpoint(tmp_path / "ckpt", model=wrapped, optimizer=optimizer, scheduler=scheduler, step=1,
                               policy_version=1, data_cursor=None)
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            assert set(f.keys()) == set(model.state_dict())  # no "module." prefix
        other, other_optimizer, other_scheduler = make_run(seed=3)
        other_wrapped = nn.parallel.DistributedDataParallel(other)
        load_checkpoint(path, model=other_wrapped, optimizer=other_optimizer, scheduler=other_scheduler)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    finally:
        dist.destroy_process_group()


def test_tiny_hf_model_round_trip(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    def setup():
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)

    model, optimizer, scheduler = setup()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))  # [B, T]
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=1, policy_version=1,
                           data_cursor={"index": 2})

    restored, restored_optimizer, restored_scheduler = setup()
    load_checkpoint(path, model=restored, optimizer=restored_optimizer, scheduler=restored_scheduler)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert_optimizer_states_equal(optimizer, restored_optimizer)
    assert restored_scheduler.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"])
def test_a_damaged_file_is_named_with_the_checkpoint_to_fall_back_on_and_nothing_is_restored(tmp_path, file):
    """A checkpoint file cut short (a disk error, a copy cut short) is a ValueError naming it and the next newest
    checkpoint (the CLI prints it as one line), raised before the model or optimizer is touched."""
    model, optimizer, scheduler = make_run(seed=0)
    for step in (10, 20):
        train(model, optimizer, scheduler, 1)
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=step, policy_version=step,
                        data_cursor=None, fsync=False)
    damaged = tmp_path / "step_00000020" / file
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    fresh, fresh_optimizer, fresh_scheduler = make_run(seed=1)
    weights_before = fresh[0].weight.clone()
    with pytest.raises(ValueError, match=rf"(?s)step_00000020 cannot be restored: {re.escape(file)} cannot be read \(\w+: .*"
                                         r"move it aside .*damaged-step_00000020\) and resume again: the one before it, "
                                         r"step_00000010, is used"):
        load_checkpoint(tmp_path / "step_00000020", model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert torch.equal(fresh[0].weight, weights_before) and not fresh_optimizer.state_dict()["state"]  # nothing restored

    (tmp_path / "step_00000020").rename(tmp_path / "damaged-step_00000020")  # what the message says to do
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000010"
    assert load_checkpoint(latest_checkpoint(tmp_path), model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)["step"] == 10
    (tmp_path / "step_00000010" / file).write_bytes(b"")
    with pytest.raises(ValueError, match="there is no other checkpoint to fall back on") as raised:
        load_checkpoint(tmp_path / "step_00000010", model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert "\n" not in str(raised.value)  # one line for the CLI


def test_a_checkpoint_saved_without_an_optimizer_says_how_to_load_it(tmp_path):
    model, _, _ = make_run(seed=0)
    path = save_checkpoint(tmp_path, model=model, optimizer=None, scheduler=None, step=1, policy_version=1, data_cursor=None)
    fresh, fresh_optimizer, _ = make_run(seed=1)
    with pytest.raises(ValueError, match=r"step_00000001 has no optimizer state \(optimizer.pt\); pass optimizer=None to skip it"):
        load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=None)
    assert load_checkpoint(path, model=fresh, optimizer=None, scheduler=None)["step"] == 1
