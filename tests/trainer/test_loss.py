"""The objective (trainer/loss.py) against the formulas written out by hand.

Every reference below is a plain loop over rows and tokens on torch scalars (so autograd gives its
gradient too); none calls the module's helpers. Loss AND gradient with respect to a leaf `logprobs`
are compared, in float64 wherever the module keeps the inputs' dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import AdvantageConfig, LossConfig
from trainer.loss import LossInputs, group_advantages, policy_loss, token_weights

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)  # float64 end to end
F32 = dict(rtol=2e-6, atol=1e-7)  # where the module rounds to float32 (advantages, token_weights)

# ---- hand-made micro-batch: B=3 rows, T=6 tokens ----------------------------------------------
# Row 2 has a mask-0 hole in the middle (an env observation between two turns); row 1 ends in padding.
MASK = [
    [0, 0, 1, 1, 1, 1],
    [0, 1, 1, 1, 1, 0],
    [0, 1, 0, 1, 1, 1],
]
# Behaviour (vLLM) logprobs: 0.0 where the mask is 0, as in a Trajectory.
BEH = [
    [0.0, 0.0, -1.2, -0.7, -2.1, -0.4],
    [0.0, -1.5, -0.9, -2.4, -0.6, 0.0],
    [0.0, -0.8, 0.0, -1.9, -1.1, -2.6],
]
# The trainer's logprobs at mask-0 positions (arbitrary: the model scores every position).
LOGP_OFF_MASK = {(0, 0): -2.2, (0, 1): -0.3, (1, 0): -1.0, (1, 5): -4.0, (2, 0): -0.6, (2, 2): -1.7}
ROW_ADV = [1.5, -0.7, 0.4]
# log(pi / pi_behaviour) on mask-1 tokens. With eps 0.2/0.25 the ratio is inside [0.8, 1.25] for
# |d| <= 0.15 (log 0.8 = -0.223, log 1.25 = 0.223), above for 0.3, 0.4, 0.9, below for -0.3..-0.5.
TOKEN_DIFFS = [
    [None, None, 0.1, 0.4, -0.5, -0.05],  # A > 0: inside, clipped high, below (not clipped), inside
    [None, -0.5, 0.4, 0.15, -0.3, None],  # A < 0: clipped low, above (not clipped), inside, clipped low
    [None, 0.3, None, -0.1, 0.9, -0.4],  # A > 0: clipped high, inside, clipped high (and TIS-capped at 2), below
]
# For the sequence-level ratio: row means 0.35 (exp = 1.42, above), -0.4 (0.67, below), 0.05 (inside).
SEQ_DIFFS = [
    [None, None, 0.5, 0.2, 0.6, 0.1],
    [None, -0.6, -0.2, -0.5, -0.3, None],
    [None, 0.2, None, -0.1, 0.15, -0.05],
]
# The frozen reference model's logprobs relative to the trainer's (ref - logp) on every position.
REF_OFFSETS = [
    [0.3, -0.2, 0.25, -0.4, 0.1, 0.6],
    [-0.1, 0.35, -0.5, 0.05, 0.2, -0.3],
    [0.15, -0.25, 0.4, 0.3, -0.15, 0.45],
]
# Arbitrary positive per-token weights (policy_loss takes any weights; 0 where the mask is 0).
WEIGHTS = [[MASK[i][t] * (1.0 + 0.1 * t + 0.3 * i) / 10 for t in range(6)] for i in range(3)]


def make_case(diffs, flip: bool = False):
    """Python lists for one micro-batch: logprobs, behaviour, per-token advantages, mask, ref."""
    sign = -1.0 if flip else 1.0
    logp, adv, ref = [], [], []
    for i in range(len(MASK)):
        row_lp, row_adv, row_ref = [], [], []
        for t in range(len(MASK[i])):
            lp = BEH[i][t] + diffs[i][t] if MASK[i][t] else LOGP_OFF_MASK[(i, t)]
            row_lp.append(lp)
            row_adv.append(sign * ROW_ADV[i])
            row_ref.append(lp + REF_OFFSETS[i][t])
        logp.append(row_lp)
        adv.append(row_adv)
        ref.append(row_ref)
    return {"logp": logp, "beh": [list(r) for r in BEH], "adv": adv, "mask": [list(r) for r in MASK], "ref": ref}


def module_loss(case, config: LossConfig, weights=None, with_ref: bool = True):
    """(loss, d loss / d logprobs, metrics) from trainer.loss.policy_loss."""
    logp = torch.tensor(case["logp"], dtype=F64, requires_grad=True)
    inputs = LossInputs(
        logprobs=logp,
        behaviour_logprobs=torch.tensor(case["beh"], dtype=F64),
        advantages=torch.tensor(case["adv"], dtype=F64),
        loss_mask=torch.tensor(case["mask"], dtype=F64),
        weights=torch.tensor(WEIGHTS if weights is None else weights, dtype=F64),
        ref_logprobs=torch.tensor(case["ref"], dtype=F64) if with_ref else None,
    )
    loss, metrics = policy_loss(inputs, config)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


# ---- the reference: the spec's per-token formula, one token at a time ---------------------------

def reference_token_losses(logp: torch.Tensor, case, config: LossConfig):
    """Per-token losses {(i, t): torch scalar} on mask-1 tokens, and the hand counts of clipped tokens.

    -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) [* w] [+ kl_coef * KL] with
      r = exp(logp - behaviour)                           (ratio_against='behaviour')
      r = exp(logp - sg(logp)), w = min(exp(sg(logp) - behaviour), tis_cap)   (ratio_against='trainer')
      sequence level: r_t = sg(s) * exp(logp_t - sg(logp_t)), s = exp(mean over mask-1 tokens of (logp - old)).
    """
    lo, hi = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
    mask, beh, adv, ref = case["mask"], case["beh"], case["adv"], case["ref"]
    losses = {}
    counts = {"low": 0, "high": 0, "tokens": 0, "ratio_sum": 0.0, "is_weight_sum": 0.0, "capped": 0, "kl_sum": 0.0}

    def old(i, t):
        return torch.tensor(beh[i][t], dtype=F64) if config.ratio_against == "behaviour" else logp[i, t].detach()

    for i in range(len(mask)):
        seq_ratio = None
        if config.ratio_level == "sequence":
            total, n = torch.zeros((), dtype=F64), 0
            for t in range(len(mask[i])):
                if mask[i][t] == 1:
                    total = total + (logp[i, t] - old(i, t))
                    n += 1
            seq_ratio = torch.exp(total / n).detach()
        for t in range(len(mask[i])):
            if mask[i][t] != 1:
                continue
            if seq_ratio is None:
                r = torch.exp(logp[i, t] - old(i, t))
            else:
                r = seq_ratio * torch.exp(logp[i, t] - logp[i, t].detach())
            a = adv[i][t]
            value = r.item()
            if value < lo:
                clipped = torch.tensor(lo, dtype=F64)  # a constant: no gradient through a clipped ratio
            elif value > hi:
                clipped = torch.tensor(hi, dtype=F64)
            else:
                clipped = r
            unclipped_term, clipped_term = r * a, clipped * a
            term = -(unclipped_term if unclipped_term.item() <= clipped_term.item() else clipped_term)
            if a < 0 and value < lo:
                counts["low"] += 1
            if a > 0 and value > hi:
                counts["high"] += 1
            w = 1.0
            if config.ratio_against == "trainer" and config.tis_cap is not None:
                raw = math.exp(logp[i, t].item() - beh[i][t])
                w = min(raw, config.tis_cap)
                counts["capped"] += raw >= config.tis_cap
                term = term * w
            counts["is_weight_sum"] += w
            if config.kl_coef > 0:
                d = ref[i][t] - logp[i, t]  # log(pi_ref / pi)
                kl = -d if config.kl_estimator == "k1" else torch.exp(d) - d - 1
                counts["kl_sum"] += kl.item()
                term = term + config.kl_coef * kl
            losses[(i, t)] = term
            counts["tokens"] += 1
            counts["ratio_sum"] += value
    return losses, counts


def reference_loss(case, config: LossConfig, weights=None):
    """sum over mask-1 tokens of weight * per-token loss; returns (loss, grad, counts)."""
    weights = WEIGHTS if weights is None else weights
    logp = torch.tensor(case["logp"], dtype=F64, requires_grad=True)
    losses, counts = reference_token_losses(logp, case, config)
    loss = torch.zeros((), dtype=F64)
    for (i, t), term in losses.items():
        loss = loss + weights[i][t] * term
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, counts


CONFIGS = {
    "behaviour-token": LossConfig(ratio_against="behaviour", tis_cap=None),
    "behaviour-token-eps": LossConfig(ratio_against="behaviour", tis_cap=None, clip_eps_low=0.15, clip_eps_high=0.3),
    "trainer-token-tis2": LossConfig(ratio_against="trainer", tis_cap=2.0),
    "trainer-token-tis1.2": LossConfig(ratio_against="trainer", tis_cap=1.2),
    "trainer-token-notis": LossConfig(ratio_against="trainer", tis_cap=None),
    "behaviour-sequence": LossConfig(ratio_against="behaviour", tis_cap=None, ratio_level="sequence"),
    "trainer-sequence-tis1.2": LossConfig(ratio_against="trainer", tis_cap=1.2, ratio_level="sequence"),
    "behaviour-token-k1": LossConfig(ratio_against="behaviour", tis_cap=None, kl_coef=0.1, kl_estimator="k1"),
    "behaviour-token-k3": LossConfig(ratio_against="behaviour", tis_cap=None, kl_coef=0.1, kl_estimator="k3"),
    "trainer-token-k3": LossConfig(ratio_against="trainer", tis_cap=2.0, kl_coef=0.05, kl_estimator="k3"),
    "behaviour-sequence-k1": LossConfig(ratio_against="behaviour", tis_cap=None, ratio_level="sequence", kl_coef=0.2, kl_estimator="k1"),
}
CASES = {"token-diffs": TOKEN_DIFFS, "seq-diffs": SEQ_DIFFS}


def test_config_defaults_are_cwms():
    config = LossConfig()
    assert (config.clip_eps_low, config.clip_eps_high) == (0.2, 0.25)
    assert config.kl_coef == 0.0
    assert AdvantageConfig().length_weighted_baseline and not AdvantageConfig().divide_by_std


@pytest.mark.parametrize("flip", [False, True], ids=["adv", "flipped-adv"])
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_policy_loss_and_gradient_match_the_formula(config_name, case_name, flip):
    config, case = CONFIGS[config_name], make_case(CASES[case_name], flip)
    loss, grad, metrics = module_loss(case, config)
    ref_loss, ref_grad, counts = reference_loss(case, config)
    torch.testing.assert_close(loss, ref_loss, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)
    # mask-0 positions get no gradient at all
    for i, row in enumerate(MASK):
        for t, m in enumerate(row):
            if m == 0:
                assert grad[i, t].item() == 0.0
    # metrics are sums and counts over mask-1 tokens
    assert metrics["tokens"].item() == counts["tokens"] == 12
    assert metrics["clipped_low"].item() == counts["low"]
    assert metrics["clipped_high"].item() == counts["high"]
    assert metrics["ratio_sum"].item() == pytest.approx(counts["ratio_sum"], rel=1e-12)
    assert metrics["is_weight_sum"].item() == pytest.approx(counts["is_weight_sum"], rel=1e-12)
    if config.ratio_against == "trainer" and config.tis_cap is not None:
        assert metrics["is_weight_capped"].item() == counts["capped"]
    if config.kl_coef > 0:
        assert metrics["kl_sum"].item() == pytest.approx(counts["kl_sum"], rel=1e-12)
    else:
        assert metrics["kl_sum"].item() == 0.0


def test_the_hand_made_data_covers_every_clip_case():
    """The fixtures exercise both clip sides, clipped and not, and TIS capping (checked by hand here)."""
    behaviour = LossConfig(ratio_against="behaviour", tis_cap=None)
    _, _, counts = reference_loss(make_case(TOKEN_DIFFS), behaviour)
    assert (counts["low"], counts["high"]) == (2, 3)
    _, _, counts = reference_loss(make_case(TOKEN_DIFFS, flip=True), behaviour)
    assert (counts["low"], counts["high"]) == (2, 1)  # row 0: 1 low; row 1: 1 high; row 2: 1 low
    _, _, counts = reference_loss(make_case(TOKEN_DIFFS), LossConfig(ratio_against="trainer", tis_cap=2.0))
    assert counts["capped"] == 1 and (counts["low"], counts["high"]) == (0, 0)  # r == 1 against the trainer
    sequence = LossConfig(ratio_against="behaviour", tis_cap=None, ratio_level="sequence")
    _, _, counts = reference_loss(make_case(SEQ_DIFFS), sequence)
    assert (counts["low"], counts["high"]) == (4, 4)  # row 1 (4 tokens) below, row 0 (4 tokens) above


def test_clipped_tokens_carry_no_gradient_and_unclipped_ones_do():
    """Spot values of the behaviour-ratio gradient, worked out on paper: d/dlogp of -r*A*w is -r*A*w."""
    config = LossConfig(ratio_against="behaviour", tis_cap=None)
    _, grad, _ = module_loss(make_case(TOKEN_DIFFS), config)
    assert grad[0, 3].item() == 0.0  # A > 0, r = e^0.4 > 1.25: clipped
    assert grad[1, 1].item() == 0.0  # A < 0, r = e^-0.5 < 0.8: clipped
    assert grad[0, 4].item() == pytest.approx(-math.exp(-0.5) * 1.5 * WEIGHTS[0][4], rel=1e-12)  # below, A > 0: kept
    assert grad[1, 2].item() == pytest.approx(math.exp(0.4) * 0.7 * WEIGHTS[1][2], rel=1e-12)  # above, A < 0: kept


def test_trainer_ratio_is_one_and_the_importance_weight_is_not_differentiated():
    """Against the trainer's own logprobs: loss = -sum w_t * A_t * weight_t, gradient -w_t * A_t * weight_t."""
    config = LossConfig(ratio_against="trainer", tis_cap=2.0)
    case = make_case(TOKEN_DIFFS)
    loss, grad, metrics = module_loss(case, config)
    expected_loss, expected_grad = 0.0, torch.zeros(3, 6, dtype=F64)
    for i in range(3):
        for t in range(6):
            if MASK[i][t]:
                w = min(math.exp(TOKEN_DIFFS[i][t]), 2.0)
                expected_loss += -w * ROW_ADV[i] * WEIGHTS[i][t]
                expected_grad[i, t] = -w * ROW_ADV[i] * WEIGHTS[i][t]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, **TIGHT)
    assert metrics["ratio_sum"].item() == 12.0


def test_sequence_ratio_value_is_the_geometric_mean_and_gradient_is_per_token():
    """GSPO: every token of row i has ratio s_i = exp(mean(logp - old)); d loss / d logp_t = -s_i * A * weight_t
    when not clipped, 0 when clipped (rows 0 and 1 of SEQ_DIFFS are clipped with these advantages)."""
    config = LossConfig(ratio_against="behaviour", tis_cap=None, ratio_level="sequence")
    case = make_case(SEQ_DIFFS)
    loss, grad, metrics = module_loss(case, config)
    s = [math.exp(sum(d for d in row if d is not None) / sum(m for m in MASK[i])) for i, row in enumerate(SEQ_DIFFS)]
    assert s[0] > 1.25 and s[1] < 0.8 and 0.8 < s[2] < 1.25
    expected_loss = 0.0
    expected_grad = torch.zeros(3, 6, dtype=F64)
    for i in range(3):
        for t in range(6):
            if MASK[i][t]:
                clipped_value = min(max(s[i], 0.8), 1.25)
                expected_loss += -min(s[i] * ROW_ADV[i], clipped_value * ROW_ADV[i]) * WEIGHTS[i][t]
                if i == 2:
                    expected_grad[i, t] = -s[i] * ROW_ADV[i] * WEIGHTS[i][t]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, **TIGHT)
    assert metrics["ratio_sum"].item() == pytest.approx(4 * s[0] + 4 * s[1] + 4 * s[2], rel=1e-12)
    # flipped advantages: rows 0 and 1 are now on the unclipped side, so they get gradient -s_i * A
    _, grad, _ = module_loss(make_case(SEQ_DIFFS, flip=True), config)
    for i in range(3):
        for t in range(6):
            if MASK[i][t]:
                assert grad[i, t].item() == pytest.approx(s[i] * ROW_ADV[i] * WEIGHTS[i][t], rel=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_term_alone(estimator):
    """With zero advantages only the KL is left: k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1."""
    config = LossConfig(ratio_against="behaviour", tis_cap=None, kl_coef=0.3, kl_estimator=estimator)
    case = make_case(TOKEN_DIFFS)
    case["adv"] = [[0.0] * 6 for _ in range(3)]
    loss, grad, _ = module_loss(case, config)
    expected_loss, expected_grad = 0.0, torch.zeros(3, 6, dtype=F64)
    for i in range(3):
        for t in range(6):
            if MASK[i][t]:
                d = REF_OFFSETS[i][t]  # ref - logp
                kl = -d if estimator == "k1" else math.exp(d) - d - 1
                dkl = 1.0 if estimator == "k1" else -math.exp(d) + 1  # d kl / d logp
                expected_loss += 0.3 * kl * WEIGHTS[i][t]
                expected_grad[i, t] = 0.3 * dkl * WEIGHTS[i][t]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, **TIGHT)


def test_kl_without_reference_logprobs_is_an_error():
    config = LossConfig(ratio_against="behaviour", tis_cap=None, kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        module_loss(make_case(TOKEN_DIFFS), config, with_ref=False)


def test_no_kl_needs_no_reference():
    loss, _, _ = module_loss(make_case(TOKEN_DIFFS), LossConfig(), with_ref=False)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_mask_zero_positions_change_nothing(config_name):
    """Garbage logprobs, advantages, behaviour and reference at mask-0 positions: same loss, same gradient."""
    config = CONFIGS[config_name]
    for diffs in (TOKEN_DIFFS, SEQ_DIFFS):
        mask = torch.tensor(MASK, dtype=F64)
        clean = make_case(diffs)
        weights = token_weights(mask, "token_mean", num_sequences=3, num_tokens=12, constant_tokens=1, max_completion_tokens=1)
        dirty = make_case(diffs)
        for i, row in enumerate(MASK):
            for t, m in enumerate(row):
                if m == 0:
                    dirty["logp"][i][t] = -35.0 + 3 * t
                    dirty["adv"][i][t] = 100.0 * (-1) ** t
                    dirty["beh"][i][t] = -0.001 if t % 2 else -50.0
                    dirty["ref"][i][t] = 7.0
        loss, grad, metrics = module_loss(clean, config, weights=weights.tolist())
        dirty_loss, dirty_grad, dirty_metrics = module_loss(dirty, config, weights=weights.tolist())
        torch.testing.assert_close(dirty_loss, loss, **TIGHT)
        torch.testing.assert_close(dirty_grad, grad, **TIGHT)
        for key in ("tokens", "clipped_low", "clipped_high", "ratio_sum", "is_weight_sum", "kl_sum"):
            torch.testing.assert_close(dirty_metrics[key].double(), metrics[key].double(), **TIGHT)


# ---- aggregation: token_weights -----------------------------------------------------------------

STEP = dict(num_sequences=5, num_tokens=19, constant_tokens=64, max_completion_tokens=8)


@pytest.mark.parametrize("mode", ["constant", "token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_token_weights_by_hand(mode):
    mask = torch.tensor(MASK, dtype=torch.float32)
    weights = token_weights(mask, mode, **STEP)
    for i, row in enumerate(MASK):
        row_tokens = sum(row)
        for t, m in enumerate(row):
            if not m:
                expected = 0.0
            elif mode == "constant":
                expected = 1 / 64
            elif mode == "token_mean":
                expected = 1 / 19
            elif mode == "seq_mean_token_mean":
                expected = 1 / row_tokens / 5
            else:
                expected = 1 / (5 * 8)
            assert weights[i, t].item() == pytest.approx(expected, rel=1e-6, abs=0)


def test_token_weights_unknown_mode():
    with pytest.raises(ValueError, match="aggregation mode"):
        token_weights(torch.ones(1, 2), "sum", **STEP)


def reference_aggregate(per_token: dict, mask, mode: str, *, constant_tokens: int, max_completion_tokens: int):
    """The four modes as the spec words them, from per-token losses of the whole step."""
    rows = range(len(mask))
    if mode == "constant":
        return sum(per_token.values()) / constant_tokens
    if mode == "token_mean":
        return sum(per_token.values()) / len(per_token)
    if mode == "seq_mean_token_mean":
        means = []
        for i in rows:
            row = [per_token[(i, t)] for t in range(len(mask[i])) if mask[i][t]]
            means.append(sum(row) / len(row))
        return sum(means) / len(means)
    if mode == "dr_grpo":
        return sum(per_token.values()) / (len(mask) * max_completion_tokens)
    raise AssertionError(mode)


@pytest.mark.parametrize("config_name", ["behaviour-token", "trainer-token-tis2", "behaviour-sequence", "behaviour-token-k3"])
@pytest.mark.parametrize("mode", ["constant", "token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_aggregation_modes_and_micro_batch_split(mode, config_name):
    """One batch of 3 rows == the formula; micro-batches (rows 0+2 and row 1, or one row each, each cut to its own
    length, weights from the whole step's counts) give the same summed loss and the same gradient."""
    config = CONFIGS[config_name]
    case = make_case(TOKEN_DIFFS if config.ratio_level == "token" else SEQ_DIFFS, flip=False)
    counts = dict(num_sequences=3, num_tokens=12, constant_tokens=16, max_completion_tokens=5)

    # the reference, token by token
    logp_ref = torch.tensor(case["logp"], dtype=F64, requires_grad=True)
    per_token, _ = reference_token_losses(logp_ref, case, config)
    ref_loss = reference_aggregate(per_token, MASK, mode, constant_tokens=16, max_completion_tokens=5)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp_ref)

    def run(row_slices):
        logp = torch.tensor(case["logp"], dtype=F64, requires_grad=True)
        total = torch.zeros((), dtype=F64)
        for rows in row_slices:
            mask_rows = [MASK[i] for i in rows]
            length = max(t for row in mask_rows for t, m in enumerate(row) if m) + 1
            mask = torch.tensor([row[:length] for row in mask_rows], dtype=F64)
            inputs = LossInputs(
                logprobs=logp[rows, :length],
                behaviour_logprobs=torch.tensor([case["beh"][i][:length] for i in rows], dtype=F64),
                advantages=torch.tensor([case["adv"][i][:length] for i in rows], dtype=F64),
                loss_mask=mask,
                weights=token_weights(mask, mode, **counts),
                ref_logprobs=torch.tensor([case["ref"][i][:length] for i in rows], dtype=F64),
            )
            loss, _ = policy_loss(inputs, config)
            total = total + loss
        (grad,) = torch.autograd.grad(total, logp)
        return total.detach(), grad

    whole_loss, whole_grad = run([[0, 1, 2]])
    # token_weights rounds to float32: relative 1e-6 against the float64 reference
    torch.testing.assert_close(whole_loss, ref_loss.detach(), **F32)
    torch.testing.assert_close(whole_grad, ref_grad, **F32)
    for split in ([[0, 2], [1]], [[1], [0], [2]]):  # row 1 alone is cut to 5 columns
        split_loss, split_grad = run(split)
        torch.testing.assert_close(split_loss, whole_loss, **F32)
        torch.testing.assert_close(split_grad, whole_grad, **F32)


# ---- advantages ---------------------------------------------------------------------------------

RETURNS = [1.0, 0.0, 0.5, 0.0, 1.0]
LENGTHS = [10, 40, 25, 5, 20]


def hand_advantages(returns, lengths, *, length_weighted: bool, divide_by_std: bool, eps: float = 1e-6):
    g = len(returns)
    if length_weighted:
        baseline = sum(n * r for n, r in zip(lengths, returns)) / sum(lengths)
    else:
        baseline = sum(returns) / g
    advantages = [r - baseline for r in returns]
    if divide_by_std and g > 1:
        mean = sum(returns) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / (g - 1))  # unbiased, about the plain mean
        advantages = [a / (std + eps) for a in advantages]
    return advantages


@pytest.mark.parametrize("divide_by_std", [False, True])
@pytest.mark.parametrize("length_weighted", [False, True])
def test_group_advantages_by_hand(length_weighted, divide_by_std):
    config = AdvantageConfig(length_weighted_baseline=length_weighted, divide_by_std=divide_by_std)
    got = group_advantages(torch.tensor(RETURNS), torch.tensor(LENGTHS), config)
    expected = hand_advantages(RETURNS, LENGTHS, length_weighted=length_weighted, divide_by_std=divide_by_std)
    assert got.shape == (5,)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=F64), **F32)


def test_length_weighted_baseline_has_no_length_push():
    """CWM's baseline: sum_i len_i * A_i = 0, and it differs from the plain mean when lengths differ."""
    got = group_advantages(torch.tensor(RETURNS), torch.tensor(LENGTHS), AdvantageConfig(length_weighted_baseline=True))
    assert abs(sum(n * a for n, a in zip(LENGTHS, got.tolist()))) < 1e-5
    plain = group_advantages(torch.tensor(RETURNS), torch.tensor(LENGTHS), AdvantageConfig(length_weighted_baseline=False))
    assert abs(sum(plain.tolist())) < 1e-6
    assert not torch.allclose(got, plain)


def test_group_advantages_degenerate_groups_are_zero_not_nan():
    std = AdvantageConfig(divide_by_std=True)
    one = group_advantages(torch.tensor([3.0]), torch.tensor([7]), std)
    assert one.tolist() == [0.0]
    same = group_advantages(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1, 9, 4]), std)
    assert torch.all(same.abs() < 1e-6) and torch.isfinite(same).all()
