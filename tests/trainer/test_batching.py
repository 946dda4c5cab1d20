"""From Trajectories to micro-batches (trainer/batching.py) and the filters it applies (trainer/filters.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from cwm_rl.types import Span, Trajectory, Turn
from trainer.batching import Sample, collate, effective_tokens, pack, prepare_samples, shard_by_group
from trainer.config import AdvantageConfig, FilterConfig

VOCAB = 100  # rare tokens (default fraction 0.9) are ids >= 90
PLAIN = AdvantageConfig(length_weighted_baseline=False, divide_by_std=False)
LENGTH_WEIGHTED = AdvantageConfig(length_weighted_baseline=True, divide_by_std=False)


def traj(group: str, generated: list[tuple[int, float, int]], ret: float, *, prompt: tuple[int, ...] = (1, 2, 3),
         trajectory_id: str | None = None) -> Trajectory:
    """A valid single-turn Trajectory: prompt tokens (mask 0, logprob 0.0, version -1), then the
    generated (token id, behaviour logprob, policy version) triples (mask 1)."""
    token_ids = list(prompt) + [tok for tok, _, _ in generated]
    extra = {"trajectory_id": trajectory_id} if trajectory_id else {}
    return Trajectory(
        task_id="task", env_id="test/Env-v0", group_id=group,
        token_ids=token_ids,
        loss_mask=[0] * len(prompt) + [1] * len(generated),
        logprobs=[0.0] * len(prompt) + [lp for _, lp, _ in generated],
        policy_versions=[-1] * len(prompt) + [v for _, _, v in generated],
        return_=ret, finish_reason="terminated", terminated=True, **extra,
    )


def gen(n: int, version: int = 5, logprob: float = -0.5, token: int = 10) -> list[tuple[int, float, int]]:
    return [(token + k, logprob, version) for k in range(n)]


def by_id(prepared) -> dict[str, Sample]:
    return {s.trajectory_id: s for s in prepared.samples}


# ---- prepare_samples: advantages ------------------------------------------------------------------

def test_trajectory_helper_builds_valid_trajectories():
    t = traj("g", gen(4), 1.0)
    assert t.num_generated_tokens == 4 and t.newest_version == 5


@pytest.mark.parametrize("advantage", [PLAIN, LENGTH_WEIGHTED], ids=["mean", "length-weighted"])
def test_prepare_samples_group_advantages(advantage):
    lengths, returns = [2, 6, 4], [1.0, 0.0, 0.25]
    group = [traj("g", gen(n), r, trajectory_id=f"t{i}") for i, (n, r) in enumerate(zip(lengths, returns))]
    prepared = prepare_samples(group, policy_version=5, filters=FilterConfig(), advantage=advantage, vocab_size=VOCAB)
    if advantage.length_weighted_baseline:
        baseline = sum(n * r for n, r in zip(lengths, returns)) / sum(lengths)
    else:
        baseline = sum(returns) / len(returns)
    samples = by_id(prepared)
    assert set(samples) == {"t0", "t1", "t2"}
    for i, r in enumerate(returns):
        s = samples[f"t{i}"]
        assert s.advantage == pytest.approx(r - baseline, abs=1e-6)
        assert s.group_id == "g"
        assert s.token_ids == group[i].token_ids and s.loss_mask == group[i].loss_mask
        assert s.behaviour_logprobs == group[i].logprobs
    assert prepared.dropped == {"stale": 0, "gibberish": 0, "zero_advantage": 0, "empty": 0}


def test_prepare_samples_multi_turn_return_is_the_sum_of_turn_rewards():
    """Prompt, action 0 (mask 1), observation (mask 0), action 1 (mask 1): return 0.5 + 1.0, 5 generated tokens."""
    multi = Trajectory(
        trajectory_id="multi", task_id="task", env_id="test/Env-v0", group_id="g",
        token_ids=[1, 2, 3, 20, 21, 22, 4, 5, 23, 24],
        loss_mask=[0, 0, 0, 1, 1, 1, 0, 0, 1, 1],
        logprobs=[0.0, 0.0, 0.0, -0.1, -0.2, -0.3, 0.0, 0.0, -0.4, -0.5],
        policy_versions=[-1, -1, -1, 3, 3, 3, -1, -1, 4, 4],
        turns=[Turn(index=0, action="a", reward=0.5, action_span=Span(start=3, end=6), observation_span=Span(start=6, end=8)),
               Turn(index=1, action="b", reward=1.0, action_span=Span(start=8, end=10))],
        return_=1.5, finish_reason="terminated", terminated=True,
    )
    single = traj("g", gen(3, version=4), 0.0, trajectory_id="single")
    prepared = prepare_samples([multi, single], policy_version=4, filters=FilterConfig(), advantage=LENGTH_WEIGHTED,
                               vocab_size=VOCAB)
    baseline = (5 * 1.5 + 3 * 0.0) / (5 + 3)
    samples = by_id(prepared)
    assert samples["multi"].advantage == pytest.approx(1.5 - baseline, abs=1e-6)
    assert samples["single"].advantage == pytest.approx(0.0 - baseline, abs=1e-6)
    assert samples["multi"].num_loss_tokens == 5
    assert samples["multi"].loss_mask == multi.loss_mask


def test_prepare_samples_divide_by_std():
    returns = [1.0, 0.0, 0.0, 1.0, 1.0]
    group = [traj("g", gen(3), r, trajectory_id=f"t{i}") for i, r in enumerate(returns)]
    config = AdvantageConfig(length_weighted_baseline=False, divide_by_std=True)
    prepared = prepare_samples(group, policy_version=5, filters=FilterConfig(), advantage=config, vocab_size=VOCAB)
    mean = sum(returns) / 5
    std = (sum((r - mean) ** 2 for r in returns) / 4) ** 0.5
    for i, r in enumerate(returns):
        assert by_id(prepared)[f"t{i}"].advantage == pytest.approx((r - mean) / (std + 1e-6), abs=1e-6)


def test_groups_are_scored_separately_and_ungrouped_is_a_group_of_one():
    trajectories = [
        traj("a", gen(2), 1.0, trajectory_id="a0"), traj("a", gen(2), 0.0, trajectory_id="a1"),
        traj("b", gen(2), 5.0, trajectory_id="b0"), traj("b", gen(2), 3.0, trajectory_id="b1"),
        traj("", gen(2), 1.0, trajectory_id="lone"),
    ]
    filters = FilterConfig(drop_zero_advantage_groups=False)
    samples = by_id(prepare_samples(trajectories, policy_version=5, filters=filters, advantage=PLAIN, vocab_size=VOCAB))
    assert [samples[k].advantage for k in ("a0", "a1", "b0", "b1")] == pytest.approx([0.5, -0.5, 1.0, -1.0])
    assert samples["lone"].advantage == 0.0 and samples["lone"].group_id == "lone"


# ---- filters --------------------------------------------------------------------------------------

def test_stale_trajectories_are_dropped_and_counted():
    """Policy version 10, max staleness 2: newest token at 8 is kept (2 behind), at 7 dropped (3 behind).
    Staleness counts from the NEWEST generated token: versions 5..9 is 1 behind."""
    filters = FilterConfig(max_staleness=2, drop_zero_advantage_groups=False)
    trajectories = [
        traj("g", gen(3, version=8), 1.0, trajectory_id="fresh-enough"),
        traj("g", gen(3, version=7), 0.0, trajectory_id="stale"),
        traj("g", [(10, -0.5, 5), (11, -0.5, 7), (12, -0.5, 9)], 0.0, trajectory_id="mixed"),
        traj("g", gen(3, version=10), 0.5, trajectory_id="current"),
        traj("g", gen(3, version=2), 0.5, trajectory_id="very-stale"),
    ]
    prepared = prepare_samples(trajectories, policy_version=10, filters=filters, advantage=PLAIN, vocab_size=VOCAB)
    samples = by_id(prepared)
    assert set(samples) == {"fresh-enough", "mixed", "current"}
    assert prepared.dropped["stale"] == 2
    assert [samples[k].staleness for k in ("fresh-enough", "mixed", "current")] == [2, 1, 0]
    # the dropped ones are not in the baseline: mean of 1.0, 0.0, 0.5
    assert samples["fresh-enough"].advantage == pytest.approx(0.5)


def test_max_staleness_zero_keeps_only_the_current_version():
    filters = FilterConfig(max_staleness=0, drop_zero_advantage_groups=False)
    trajectories = [traj("g", gen(2, version=4), 1.0), traj("g", gen(2, version=3), 0.0)]
    prepared = prepare_samples(trajectories, policy_version=4, filters=filters, advantage=PLAIN, vocab_size=VOCAB)
    assert len(prepared.samples) == 1 and prepared.dropped["stale"] == 1


@pytest.mark.parametrize("advantage", [PLAIN, LENGTH_WEIGHTED, AdvantageConfig(divide_by_std=True)],
                         ids=["mean", "length-weighted", "std"])
def test_zero_advantage_groups_are_dropped_and_counted(advantage):
    trajectories = [
        traj("same", gen(2), 1.0), traj("same", gen(7), 1.0), traj("same", gen(4), 1.0),  # no signal
        traj("zeros", gen(3), 0.0), traj("zeros", gen(5), 0.0),  # no signal
        traj("lone", gen(3), 1.0),  # a group of one: advantage 0
        traj("mixed", gen(2), 1.0, trajectory_id="m0"), traj("mixed", gen(9), 0.0, trajectory_id="m1"),
    ]
    prepared = prepare_samples(trajectories, policy_version=5, filters=FilterConfig(), advantage=advantage, vocab_size=VOCAB)
    assert set(by_id(prepared)) == {"m0", "m1"}
    assert prepared.dropped["zero_advantage"] == 6
    kept = prepare_samples(trajectories, policy_version=5, filters=FilterConfig(drop_zero_advantage_groups=False),
                           advantage=advantage, vocab_size=VOCAB)
    assert len(kept.samples) == 8 and kept.dropped["zero_advantage"] == 0
    assert effective_tokens(kept.samples) == 2 + 9


def test_gibberish_is_dropped_and_a_rare_token_at_a_normal_logprob_is_kept():
    """Vocabulary 100, rare from id 90, gibberish below logprob -12."""
    filters = FilterConfig(drop_zero_advantage_groups=False)
    trajectories = [
        traj("g", [(10, -0.3, 5), (95, -15.0, 5), (11, -0.2, 5)], 1.0, trajectory_id="gibberish"),
        traj("g", [(10, -0.3, 5), (95, -2.0, 5), (11, -0.2, 5)], 0.0, trajectory_id="rare-but-likely"),
        traj("g", [(10, -0.3, 5), (50, -15.0, 5)], 0.0, trajectory_id="unlikely-but-common"),
        traj("g", [(10, -0.3, 5), (90, -12.5, 5)], 0.0, trajectory_id="at-the-threshold-id"),
        traj("g", [(10, -0.3, 5), (89, -30.0, 5)], 1.0, trajectory_id="just-below-the-threshold-id"),
        traj("g", [(10, -0.3, 5), (99, -11.9, 5)], 1.0, trajectory_id="just-above-the-logprob"),
    ]
    prepared = prepare_samples(trajectories, policy_version=5, filters=filters, advantage=PLAIN, vocab_size=VOCAB)
    assert set(by_id(prepared)) == {"rare-but-likely", "unlikely-but-common", "just-below-the-threshold-id",
                                    "just-above-the-logprob"}
    assert prepared.dropped["gibberish"] == 2
    off = prepare_samples(trajectories, policy_version=5, filters=FilterConfig(gibberish=False, drop_zero_advantage_groups=False),
                          advantage=PLAIN, vocab_size=VOCAB)
    assert len(off.samples) == 6 and off.dropped["gibberish"] == 0


def test_gibberish_rare_threshold_as_a_token_id():
    """A threshold >= 1 is a token id, not a fraction of the vocabulary."""
    filters = FilterConfig(gibberish_rare_token_id=40, drop_zero_advantage_groups=False)
    trajectories = [traj("g", [(45, -20.0, 5)], 1.0, trajectory_id="rare"), traj("g", [(39, -20.0, 5)], 0.0, trajectory_id="common")]
    prepared = prepare_samples(trajectories, policy_version=5, filters=filters, advantage=PLAIN, vocab_size=VOCAB)
    assert set(by_id(prepared)) == {"common"} and prepared.dropped["gibberish"] == 1


def test_rare_tokens_in_the_prompt_are_not_gibberish():
    """Mask-0 tokens (logprob 0.0) are not sampled by the policy; only generated tokens count."""
    filters = FilterConfig(drop_zero_advantage_groups=False)
    t = traj("g", gen(2), 1.0, prompt=(99, 98, 97))
    prepared = prepare_samples([t], policy_version=5, filters=filters, advantage=PLAIN, vocab_size=VOCAB)
    assert len(prepared.samples) == 1 and prepared.dropped["gibberish"] == 0


def test_all_drop_reasons_counted_together():
    trajectories = [
        traj("g", gen(3, version=0), 1.0),  # stale at version 20 with max_staleness 8
        traj("g", [(96, -13.0, 20)], 1.0),  # gibberish
        traj("g", [], 1.0),  # nothing generated
        traj("g", gen(3, version=20), 1.0), traj("g", gen(4, version=19), 1.0),  # equal returns: no signal
        traj("h", gen(3, version=20), 1.0, trajectory_id="h0"), traj("h", gen(3, version=20), 0.0, trajectory_id="h1"),
    ]
    prepared = prepare_samples(trajectories, policy_version=20, filters=FilterConfig(), advantage=LENGTH_WEIGHTED, vocab_size=VOCAB)
    assert set(by_id(prepared)) == {"h0", "h1"}
    assert prepared.dropped == {"stale": 1, "gibberish": 1, "zero_advantage": 2, "empty": 1}


# ---- pack -----------------------------------------------------------------------------------------

def sample(n: int, name: str, group: str = "g", advantage: float = 1.0) -> Sample:
    return Sample(token_ids=list(range(1, n + 1)), loss_mask=[0] + [1] * (n - 1), behaviour_logprobs=[0.0] + [-0.5] * (n - 1),
                  advantage=advantage, group_id=group, trajectory_id=name)


def check_packing(samples: list[Sample], budget: int) -> list[list[Sample]]:
    batches = pack(samples, budget)
    seen = [id(s) for batch in batches for s in batch]
    assert sorted(seen) == sorted(id(s) for s in samples), "every sample exactly once"
    for batch in batches:
        assert batch, "no empty micro-batch"
        longest = max(s.num_tokens for s in batch)
        if longest > budget:
            assert len(batch) == 1, "an over-long sequence goes alone"
        else:
            assert len(batch) * longest <= budget
    return batches


def test_pack_respects_the_budget_and_keeps_everything():
    lengths = [7, 3, 12, 5, 5, 9, 2, 4, 8, 6]
    samples = [sample(n, f"s{i}") for i, n in enumerate(lengths)]
    for budget in (12, 16, 20, 30, 100):
        check_packing(samples, budget)


def test_pack_random_lengths_and_budgets():
    rng = random.Random(0)
    for trial in range(200):
        samples = [sample(rng.randint(1, 40), f"t{trial}-{k}") for k in range(rng.randint(0, 25))]
        check_packing(samples, rng.randint(1, 120))


def test_pack_over_long_sequence_alone():
    samples = [sample(50, "long"), sample(4, "a"), sample(4, "b"), sample(60, "longer")]
    batches = check_packing(samples, 16)
    alone = [batch[0].trajectory_id for batch in batches if len(batch) == 1 and batch[0].num_tokens > 16]
    assert sorted(alone) == ["long", "longer"]
    assert sorted(s.trajectory_id for batch in batches for s in batch if s.num_tokens <= 16) == ["a", "b"]
    assert [len(b) for b in batches if b[0].num_tokens <= 16] == [2]


def test_pack_fills_to_the_budget():
    batches = check_packing([sample(4, f"s{k}") for k in range(10)], 16)
    assert [len(b) for b in batches] == [4, 4, 2]


def test_pack_empty_and_bad_budget():
    assert pack([], 64) == []
    with pytest.raises(ValueError):
        pack([sample(3, "x")], 0)


# ---- collate --------------------------------------------------------------------------------------

def test_collate_pads_right():
    short = Sample(token_ids=[5, 6, 7], loss_mask=[1, 1, 0], behaviour_logprobs=[-0.1, -0.2, 0.0], advantage=0.75)
    long = Sample(token_ids=[8, 9, 10, 11, 12], loss_mask=[0, 0, 1, 0, 1], behaviour_logprobs=[0.0, 0.0, -1.5, 0.0, -2.5],
                  advantage=-0.25)
    batch = collate([short, long], pad_token_id=3)
    assert batch.input_ids.dtype == torch.long and batch.input_ids.tolist() == [[5, 6, 7, 3, 3], [8, 9, 10, 11, 12]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # position 0 never carries loss, even where the sample's mask says 1
    assert batch.loss_mask.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 1]]
    torch.testing.assert_close(batch.behaviour_logprobs, torch.tensor([[-0.1, -0.2, 0.0, 0.0, 0.0], [0.0, 0.0, -1.5, 0.0, -2.5]]))
    assert batch.advantages[0, :3].tolist() == [0.75] * 3
    assert batch.advantages[1].tolist() == [-0.25] * 5
    assert (batch.loss_mask * (1 - batch.attention_mask)).sum() == 0  # no loss on padding


def test_collate_of_packed_trajectories():
    """End to end: prepare -> pack -> collate keeps every loss token except a leading one, and each row's advantage."""
    trajectories = [traj("g", gen(n), r, trajectory_id=f"t{n}") for n, r in ((3, 1.0), (8, 0.0), (5, 0.5))]
    prepared = prepare_samples(trajectories, policy_version=5, filters=FilterConfig(), advantage=PLAIN, vocab_size=VOCAB)
    total_loss_tokens = 0
    for rows in pack(prepared.samples, micro_batch_tokens=16):
        batch = collate(rows, pad_token_id=0)
        assert batch.input_ids.shape[0] * batch.input_ids.shape[1] <= 16 or len(rows) == 1
        assert batch.loss_mask[:, 0].sum() == 0
        for i, s in enumerate(rows):
            assert batch.loss_mask[i, :s.num_tokens].tolist() == [float(m) for m in s.loss_mask]  # prompt first
            assert batch.advantages[i, s.num_tokens - 1].item() == pytest.approx(s.advantage)
        total_loss_tokens += int(batch.loss_mask.sum())
    assert total_loss_tokens == 3 + 8 + 5


# ---- shard_by_group -------------------------------------------------------------------------------

def grouped_samples() -> list[Sample]:
    sizes = {"a": [9, 3], "b": [4, 4, 4], "c": [20], "d": [2, 2], "e": [7, 1, 6], "f": [5], "g": [3, 3, 3, 3]}
    return [sample(n, f"{g}{k}", group=g) for g, ns in sizes.items() for k, n in enumerate(ns)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_shard_by_group_partitions_whole_groups(world_size):
    samples = grouped_samples()
    shards = [shard_by_group(samples, rank, world_size) for rank in range(world_size)]
    everything = [s.trajectory_id for shard in shards for s in shard]
    assert sorted(everything) == sorted(s.trajectory_id for s in samples), "union over ranks is everything, once"
    for shard in shards:
        for g in {s.group_id for s in shard}:
            assert {s.trajectory_id for s in shard if s.group_id == g} == {s.trajectory_id for s in samples if s.group_id == g}
    # deterministic: the same call gives the same answer, and the input order does not matter
    shuffled = list(samples)
    random.Random(1).shuffle(shuffled)
    for rank in range(world_size):
        again = shard_by_group(samples, rank, world_size)
        assert [s.trajectory_id for s in again] == [s.trajectory_id for s in shards[rank]]
        assert {s.trajectory_id for s in shard_by_group(shuffled, rank, world_size)} == {s.trajectory_id for s in shards[rank]}


def test_shard_by_group_balances_tokens():
    samples = [sample(10, f"{g}{k}", group=g) for g in "abcdefgh" for k in range(2)]  # 8 groups of 20 tokens
    loads = [sum(s.num_tokens for s in shard_by_group(samples, rank, 4)) for rank in range(4)]
    assert loads == [40, 40, 40, 40]


def test_shard_by_group_bad_rank():
    for rank, world in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError):
            shard_by_group(grouped_samples(), rank, world)


def test_shard_more_ranks_than_groups():
    samples = [sample(4, "x0", group="x"), sample(4, "x1", group="x")]
    shards = [shard_by_group(samples, rank, 3) for rank in range(3)]
    assert sorted(len(s) for s in shards) == [0, 0, 2]
    assert [s.trajectory_id for s in itertools.chain(*shards)] == ["x0", "x1"]


def test_samples_sharing_a_prompt_share_a_row_laid_out_prompt_then_each_answer():
    from trainer.batching import collate_shared, pack_shared, shared_prompt_sets

    a = Sample(token_ids=[5, 6, 7, 10, 11], loss_mask=[0, 0, 0, 1, 1], behaviour_logprobs=[0.0] * 5, group_id="g")
    b = Sample(token_ids=[5, 6, 7, 20], loss_mask=[0, 0, 0, 1], behaviour_logprobs=[0.0] * 4, group_id="g")
    other = Sample(token_ids=[5, 6, 8, 30], loss_mask=[0, 0, 0, 1], behaviour_logprobs=[0.0] * 4, group_id="h")
    sets = shared_prompt_sets([a, other, b], max_row_tokens=100)
    assert sets == [[a, b], [other]]
    assert shared_prompt_sets([a, b], max_row_tokens=5) == [[a], [b]]  # a row stays within the budget
    (batch_sets,) = pack_shared([a, other, b], micro_batch_tokens=100)
    batch, rows = collate_shared(batch_sets, pad_token_id=0)
    assert rows == [a, b, other] and batch.input_ids.shape == (3, 5)
    shared = batch.shared
    assert shared.input_ids.tolist() == [[5, 6, 7, 10, 11, 20], [5, 6, 8, 30, 0, 0]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    assert shared.segment.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 1, -1, -1]]
    assert shared.row_of.tolist() == [0, 0, 1]
    # b's answer token (20, its position 3) is predicted by the prompt's last position (2), not a's answer
    assert shared.predicting[1, 3] == 2 and shared.predicting[0, 4] == 3 and shared.predicting[0, 3] == 2
    mask = shared.attention_mask()[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]  # b's token sees the prompt and itself
    assert mask[4].tolist() == [True, True, True, True, True, False]
    assert shared.attention_mask()[1, 0, 4].tolist() == [False, False, False, False, True, False]  # padding: itself only
    assert shared.attention_mask(sliding_window=2)[0, 0, 5].tolist() == [False, False, True, False, False, True]
