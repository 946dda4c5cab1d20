"""Which trajectories the trainer refuses, and why: staleness, gibberish, no learning signal.

Each filter is a plain predicate; `trainer/batching.py:prepare_samples` applies them in order
and counts every drop by reason, so a run's metrics say what was thrown away.
"""

from __future__ import annotations

from cwm_rl.types import NO_VERSION, Trajectory
from trainer.config import FilterConfig


def staleness(trajectory: Trajectory, policy_version: int) -> int:
    """Versions between the trainer's policy and the trajectory's NEWEST generated token."""
    newest = trajectory.newest_version
    return policy_version - newest if newest != NO_VERSION else 0


def is_stale(trajectory: Trajectory, policy_version: int, config: FilterConfig) -> bool:
    """More than `max_staleness` versions behind (CWM bounds staleness the same way, by the newest token)."""
    return staleness(trajectory, policy_version) > config.max_staleness


def rare_token_threshold(config: FilterConfig, vocab_size: int) -> int:
    """First token id counted as rare: BPE vocabularies put their rarest merges last."""
    value = config.gibberish_rare_token_id
    return int(value * vocab_size) if value < 1 else int(value)


def is_gibberish(trajectory: Trajectory, config: FilterConfig, vocab_size: int) -> bool:
    """CWM's rule: a rare token sampled with a very low behaviour logprob marks degenerate text
    (high-temperature sampling falling off the distribution), which would teach the model noise."""
    if not config.gibberish:
        return False
    rare_from = rare_token_threshold(config, vocab_size)
    return any(m == 1 and t >= rare_from and lp < config.gibberish_max_logprob
               for t, m, lp in zip(trajectory.token_ids, trajectory.loss_mask, trajectory.logprobs))
