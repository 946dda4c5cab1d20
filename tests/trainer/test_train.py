"""The optimisation loop on the tiny model: it learns, accumulates exactly, resumes bit for bit,
trains data-parallel on 2 gloo processes, publishes, filters and checks the mismatch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envs.server.local import free_port
from trainer.config import TrainerConfig
from trainer.train import Trainer, lr_multiplier

HERE = Path(__file__).parent


def config(**overrides) -> TrainerConfig:
    base = {"optim": {"lr": 1e-2}, "filters": {"max_staleness": 100}}
    for key, value in overrides.items():
        base.setdefault(key, {})
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return TrainerConfig.model_validate(base)


def low_token_mass(model, prompt: list[int]) -> float:
    """Probability the model gives to token ids < 200 (what the synthetic reward pays for)."""
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    return float(probs[:200].sum())


def test_rl_steps_raise_the_rewarded_behaviour(tiny_model, sample_groups, tmp_path):
    from trainer.publish import WeightPublisher, latest_published

    trainer = Trainer(config(), tiny_model, run_dir=tmp_path)
    publisher = WeightPublisher(tmp_path / "weights", base_model_dir=tiny_model)
    prompt = [0, 5, 9, 11]
    before = low_token_mass(trainer.model, prompt)
    rewards = []
    for step in range(6):
        batch = sample_groups(trainer.model, num_groups=4, group_size=6, max_new_tokens=8, seed=step, version=trainer.policy_version)
        rewards.append(sum(t.return_ for t in batch) / len(batch))
        result = trainer.step(batch)
        metrics = result.metrics
        assert not result.skipped and metrics["new_policy_version"] == step + 1
        assert metrics["sequences"] + metrics["dropped_zero_advantage"] == len(batch)
        # Every trajectory is accounted for once: trained on, or dropped with its reason.
        dropped = [i for ids in result.dropped_ids.values() for i in ids]
        assert sorted(result.trained_ids + dropped) == sorted(t.trajectory_id for t in batch)
        assert len(result.dropped_ids.get("zero_advantage", [])) == metrics["dropped_zero_advantage"]
        assert metrics["mismatch_kl"] < 1e-4  # same weights sampled and scored these tokens
        assert metrics["grad_norm"] > 0
        publisher.publish(trainer.policy_version, trainer.model.state_dict())
    publisher.close()
    after = low_token_mass(trainer.model, prompt)
    assert after > before + 0.05, (before, after, rewards)
    assert trainer.policy_version == 6
    assert latest_published(tmp_path / "weights")[0] == 6
    assert not (tmp_path / "checkpoints").exists()  # checkpoints are the caller's too


def test_skip_to_version_only_moves_forward(tiny_model):
    trainer = Trainer(config(), tiny_model)
    trainer.skip_to_version(5)
    assert trainer.policy_version == 5 and trainer.step_count == 0
    with pytest.raises(ValueError, match="only grow"):
        trainer.skip_to_version(5)


# Adam divides by sqrt(v) + eps: with eps = 1 an update is ~lr x gradient, so float noise in tiny
# gradients (summed in another order) stays tiny instead of being scaled up to a full step.
LINEAR_ADAM = {"lr": 1e-2, "eps": 1.0}


def test_micro_batches_accumulate_to_the_same_step(tiny_model, sample_groups):
    one = Trainer(config(batch={"micro_batch_tokens": 100_000}, loss={"aggregation": "token_mean"}, optim=LINEAR_ADAM), tiny_model)
    many = Trainer(config(batch={"micro_batch_tokens": 16}, loss={"aggregation": "token_mean"}, optim=LINEAR_ADAM), tiny_model)
    batch = sample_groups(one.model, num_groups=3, group_size=4, max_new_tokens=6)
    m1, m2 = one.step(batch).metrics, many.step(batch).metrics
    assert m1["sequences"] == m2["sequences"] > 0
    torch.testing.assert_close(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(one.model.state_dict().items(), many.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_logprobs_from_the_first_loss_token_match_the_full_forward(tiny_model):
    """Logits are only computed from the batch's first loss token on; on every loss token the
    logprob and entropy equal those of a forward over the whole sequence."""
    from transformers import AutoModelForCausalLM

    from trainer.batching import Sample, collate
    from trainer.train import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt, completion in [(9, 5), (14, 3), (6, 8)]:  # different prompt lengths in one batch, right-padded
        ids = torch.randint(3, 200, (prompt + completion,), generator=g).tolist()
        rows.append(Sample(token_ids=ids, loss_mask=[0] * prompt + [1] * completion, behaviour_logprobs=[0.0] * len(ids)))
    batch = collate(rows, pad_token_id=0)
    with torch.no_grad():
        logprobs, entropy = token_logprobs(model, batch, temperature=0.7, with_entropy=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float() / 0.7
    full = torch.log_softmax(logits, -1)
    expected = torch.nn.functional.pad(full.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1), (1, 0))
    expected_entropy = torch.nn.functional.pad(-(full.exp() * full).sum(-1), (1, 0))
    mask = batch.loss_mask.bool()
    assert logprobs.shape == expected.shape and mask.sum() == 16
    torch.testing.assert_close(logprobs[mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[mask], expected_entropy[mask], rtol=1e-5, atol=1e-5)
    assert (logprobs[:, :6] == 0).all()  # before the first loss token (column 6): not computed


def test_resume_reproduces_training_exactly(tiny_model, sample_groups, tmp_path):
    cfg = config(optim={"warmup_steps": 2, "schedule": "cosine", "total_steps": 4})
    seed_model = Trainer(cfg, tiny_model).model
    batches = [sample_groups(seed_model, num_groups=2, group_size=4, max_new_tokens=5, seed=s) for s in range(4)]

    straight = Trainer(cfg, tiny_model)
    for b in batches:
        straight.step(b)

    first = Trainer(cfg, tiny_model, run_dir=tmp_path / "run")
    for b in batches[:2]:
        first.step(b)
    first.save_checkpoint(data_cursor={"next_batch": 2})
    del first
    resumed = Trainer(cfg, tiny_model, run_dir=tmp_path / "run", resume=tmp_path / "run")
    assert resumed.data_cursor == {"next_batch": 2}
    assert (resumed.step_count, resumed.policy_version) == (2, 2)
    for b in batches[resumed.data_cursor["next_batch"]:]:
        resumed.step(b)

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_resume_without_a_checkpoint_says_what_to_pass(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        Trainer(config(), tiny_model, resume=tmp_path)


def test_stale_trajectories_are_dropped_and_the_step_skipped(tiny_model, sample_groups):
    trainer = Trainer(config(filters={"max_staleness": 2}), tiny_model)
    batch = sample_groups(trainer.model, num_groups=2, group_size=3, max_new_tokens=4, version=0)
    trainer.skip_to_version(3)
    result = trainer.step(batch)
    assert result.metrics["dropped_stale"] == len(batch)
    assert sorted(result.dropped_ids["stale"]) == sorted(t.trajectory_id for t in batch) and not result.trained_ids
    assert result.skipped and trainer.policy_version == 3 and trainer.step_count == 0


def test_mismatch_is_measured_and_named_at_the_first_step(tiny_model, sample_groups, caplog):
    trainer = Trainer(config(), tiny_model)  # trainer assumes temperature 1
    hot = sample_groups(trainer.model, num_groups=3, group_size=4, max_new_tokens=6, temperature=3.0)
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        metrics = trainer.step(hot).metrics
    assert metrics["mismatch_kl"] > 0.01
    assert "temperature" in caplog.text and "mismatch" in caplog.text

    matched = Trainer(config(loss={"temperature": 3.0}), tiny_model)
    metrics = matched.step(hot).metrics
    assert metrics["mismatch_kl"] < 1e-4


def test_kl_to_the_reference_grows_as_the_policy_moves(tiny_model, sample_groups):
    trainer = Trainer(config(loss={"kl_coef": 0.1}), tiny_model)
    kls = [trainer.step(sample_groups(trainer.model, num_groups=3, group_size=4, max_new_tokens=6, seed=s, version=trainer.policy_version)).metrics["kl"]
           for s in range(3)]
    assert abs(kls[0]) < 1e-6 and kls[2] > 1e-5, kls


@pytest.mark.parametrize(("step", "expected"), [(0, 0.5), (1, 1.0), (2, 1.0), (6, 0.55), (10, 0.1)])
def test_lr_schedule_warmup_then_cosine(step, expected):
    assert lr_multiplier(step, warmup_steps=2, schedule="cosine", total_steps=10, min_lr_ratio=0.1) == pytest.approx(expected)


def test_behaviour_ratio_with_tis_cap_is_refused():
    with pytest.raises(ValueError, match="tis_cap applies only"):
        TrainerConfig.model_validate({"loss": {"ratio_against": "behaviour", "tis_cap": 2.0}})


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tiny_model, sample_groups, tmp_path):
    """DDP over 2 CPU processes, each on its share of the groups, lands on the weights one process
    reaches on all of them."""
    single = Trainer(config(optim=LINEAR_ADAM), tiny_model)
    batches = [sample_groups(single.model, num_groups=4, group_size=3, max_new_tokens=5, seed=s) for s in range(2)]
    data = tmp_path / "batches.json"
    data.write_text(json.dumps([[t.model_dump(mode="json", by_alias=True) for t in b] for b in batches]))
    for b in batches:
        single.step(b)

    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", str(HERE / "ddp_worker.py"), str(tiny_model), str(data), str(out)],
        env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rank 1 trained" in run.stdout and "rank 0 trained" in run.stdout

    from safetensors.torch import load_file

    ddp = load_file(out)
    for name, a in single.model.state_dict().items():
        torch.testing.assert_close(ddp[name], a, rtol=1e-4, atol=1e-6, msg=name)


def test_a_step_records_what_it_did_with_each_trajectory(tiny_model, sample_groups):
    """Per trained trajectory: its advantage, and per generated token the trainer's logprob (the same numbers a
    plain forward gives), the IS weight and the clip flag; clipping shows up where the ratio leaves the band."""
    from cwm_rl.types import NO_VERSION
    from trainer.batching import prepare_samples

    cfg = config(loss={"ratio_against": "behaviour"}, filters={"max_staleness": 100})
    trainer = Trainer(cfg, tiny_model)
    batch = sample_groups(trainer.model, num_groups=3, group_size=4, max_new_tokens=6, seed=1, version=0)
    # Make vLLM's "behaviour" logprobs far from the trainer's on some tokens, so the ratio is clipped there.
    batch = [t.model_copy(update={"logprobs": [lp - 1.0 if m and k % 2 else lp for k, (lp, m) in enumerate(zip(t.logprobs, t.loss_mask))]})
             for t in batch]
    expected = {s.trajectory_id: s.advantage for s in prepare_samples(batch, policy_version=0, filters=cfg.filters,
                                                                      advantage=cfg.advantage, vocab_size=trainer.vocab_size).samples}
    with torch.no_grad():
        forward = {t.trajectory_id: torch.log_softmax(trainer.model(input_ids=torch.tensor([t.token_ids])).logits[0].float(), -1)
                   for t in batch}
    result = trainer.step(batch)
    assert sorted(r.trajectory_id for r in result.records) == sorted(result.trained_ids) == sorted(expected)
    by_id = {t.trajectory_id: t for t in batch}
    clipped = 0
    for record in result.records:
        t = by_id[record.trajectory_id]
        assert record.step == 0 and record.advantage == pytest.approx(expected[t.trajectory_id])
        generated = [i for i, m in enumerate(t.loss_mask) if m]
        want = [forward[t.trajectory_id][i - 1, t.token_ids[i]].item() for i in generated]
        assert record.trainer_logprobs == pytest.approx(want, abs=1e-4)
        ratios = [torch.exp(torch.tensor(lp - t.logprobs[i])).item() for lp, i in zip(record.trainer_logprobs, generated)]
        for ratio, flag in zip(ratios, record.clipped):
            assert flag == (1 if ratio > 1.25 and record.advantage > 0 else -1 if ratio < 0.8 and record.advantage < 0 else 0)
        clipped += sum(1 for f in record.clipped if f)
        assert record.is_weights == [1.0] * len(generated)  # TIS applies only against the trainer's own logprobs
        assert all(v != NO_VERSION for v in (t.policy_versions[i] for i in generated))
    assert clipped > 0
    assert result.metrics["clip_high_frac"] + result.metrics["clip_low_frac"] > 0


def _shared_prompt_samples() -> list:
    """Two groups sharing their prompts (answers of different lengths, one with an observation between two
    answers, as a multi-turn episode has), and a lone sample with a longer prompt."""
    from trainer.batching import Sample

    g = torch.Generator().manual_seed(1)
    samples = []
    for group, (prompt_len, answers) in enumerate([(7, [3, 5, 2, 4]), (9, [6, 1, 3])]):
        prompt = torch.randint(3, 200, (prompt_len,), generator=g).tolist()
        for k, n in enumerate(answers):
            own = torch.randint(3, 200, (n,), generator=g).tolist()
            mask = [1] * n
            if k == 1:  # answer, observation (mask 0), answer
                own += torch.randint(3, 200, (3,), generator=g).tolist() + torch.randint(3, 200, (2,), generator=g).tolist()
                mask += [0, 0, 0, 1, 1]
            samples.append(Sample(token_ids=prompt + own, loss_mask=[0] * prompt_len + mask,
                                  behaviour_logprobs=[0.0] * (prompt_len + len(own)), group_id=f"g{group}", trajectory_id=f"t{group}{k}"))
    lone = torch.randint(3, 200, (15,), generator=g).tolist()
    samples.append(Sample(token_ids=lone, loss_mask=[0] * 12 + [1] * 3, behaviour_logprobs=[0.0] * 15, group_id="g2", trajectory_id="t20"))
    return samples


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_shared_prompt_rows_give_every_sample_the_logprobs_and_gradients_of_its_own_row(tiny_model, sliding_window):
    """A group's prompt read once, each sample's own tokens after it (attending to the prompt and themselves):
    the logprobs, entropies and gradients of every loss token are those of one padded row per sample,
    also where sliding-window layers see only the last few positions (window 4: much shorter than the rows)."""
    from transformers import AutoModelForCausalLM

    from trainer.batching import collate, collate_shared, pack_shared
    from trainer.train import can_share_prompts, token_logprobs

    extra = {} if sliding_window is None else {"sliding_window": sliding_window}
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, **extra)
    assert can_share_prompts(model) and "sliding_attention" in model.config.layer_types
    samples = _shared_prompt_samples()
    (prompt_sets,) = pack_shared(samples, micro_batch_tokens=10_000)
    shared, rows = collate_shared(prompt_sets, pad_token_id=0)
    assert shared.shared.input_ids.shape[0] == 3 and shared.shared.input_ids.numel() < sum(s.num_tokens for s in samples)
    plain = collate(rows, pad_token_id=0)
    assert torch.equal(shared.input_ids, plain.input_ids) and torch.equal(shared.loss_mask, plain.loss_mask)
    mask = plain.loss_mask.bool()

    def run(batch):
        model.zero_grad()
        logprobs, entropy = token_logprobs(model, batch, temperature=0.7, with_entropy=True)
        (logprobs * batch.loss_mask).sum().backward()
        return logprobs.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}

    lp_shared, ent_shared, grads_shared = run(shared)
    lp_plain, ent_plain, grads_plain = run(plain)
    assert mask.sum() == 31
    torch.testing.assert_close(lp_shared[mask], lp_plain[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_shared[mask], ent_plain[mask], rtol=1e-5, atol=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_shared[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if sliding_window:  # the window mattered: without it the long rows' logprobs differ
        unwindowed = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        with torch.no_grad():
            lp_full, _ = token_logprobs(unwindowed, plain, temperature=0.7)
        assert not torch.allclose(lp_full[mask], lp_plain[mask], atol=1e-3)


def test_a_step_on_shared_prompt_rows_trains_like_one_row_per_sample(tiny_model, sample_groups):
    shared = Trainer(config(batch={"share_prompts": True}, optim=LINEAR_ADAM), tiny_model)
    plain = Trainer(config(batch={"share_prompts": False}, optim=LINEAR_ADAM), tiny_model)
    assert shared.share_prompts and not plain.share_prompts
    batch = sample_groups(shared.model, num_groups=3, group_size=4, max_new_tokens=6)
    m1, m2 = shared.step(batch).metrics, plain.step(batch).metrics
    assert m1["sequences"] == m2["sequences"] == 12
    for key in ("loss", "grad_norm", "entropy", "mismatch_kl"):
        torch.testing.assert_close(m1[key], m2[key], rtol=1e-4, atol=1e-6, msg=key)
    for (name, a), b in zip(shared.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_models_without_sdpa_read_every_sample_whole(tiny_model):
    from transformers import AutoModelForCausalLM

    from trainer.train import can_share_prompts

    assert not can_share_prompts(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager"))


def test_models_whose_layers_are_not_all_attention_read_every_sample_whole(tiny_model):
    """Linear-attention or recurrent layers ignore the mask (a segment would read the one before it): the
    trainer checks the layer types, and a probe at start-up compares shared and plain rows on a few tokens."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from trainer.train import can_share_prompts, shared_rows_match

    hybrid = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", layer_types=["linear_attention", "full_attention"],
                                                    sliding_window=None))
    assert not can_share_prompts(hybrid)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert shared_rows_match(model, pad_token_id=0)

    class Leaky(torch.nn.Module):  # a model that lets every position see the whole row, whatever the mask says
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, **kwargs):
            kwargs.pop("position_ids", None)
            return self.inner(input_ids=input_ids, **kwargs)

    assert not shared_rows_match(Leaky(model), pad_token_id=0)
