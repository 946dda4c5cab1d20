"""From Trajectories to micro-batches: filter, score groups, pack to a token budget, pad.

`prepare_samples(trajectories, policy_version=..., filters=..., advantage=..., vocab_size=...)` drops
what the filters refuse (with reasons) and scores the groups; `pack(samples, micro_batch_tokens)`
makes the rows of each micro-batch and `collate(rows, pad_token_id)` their tensors, [B, T]
(`tests/trainer/test_batching.py` covers each).

Micro-batches hold whole sequences, right-padded; their cost is rows x longest row, packed
longest-first so similar lengths share a batch. With `share_prompts` (the RL step's default) the
samples that share a prompt (a GRPO group's) go in one row as the prompt once and then each
sample's own tokens, attending only to the prompt and themselves (`pack_shared`): the model reads
a group's prompt once instead of once per sample (the quickstart's 39-token prompt and ~11-token
answers: 127 tokens a group instead of 400). The loss still sees the plain [B, T] layout.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cwm_rl.types import Trajectory
from trainer.config import AdvantageConfig, FilterConfig
from trainer.filters import is_gibberish, is_stale, staleness
from trainer.loss import group_advantages


@dataclass
class Sample:
    """One training sequence: tokens aligned with their mask, behaviour logprobs and advantage."""

    token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    advantage: float = 0.0
    group_id: str = ""
    trajectory_id: str = ""
    staleness: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class Prepared:
    """What `prepare_samples` kept, and how many it dropped for each reason."""

    samples: list[Sample] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: {"stale": 0, "gibberish": 0, "zero_advantage": 0, "empty": 0})
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)  # reason -> trajectory ids

    def drop(self, reason: str, trajectories: list[Trajectory]) -> None:
        self.dropped[reason] += len(trajectories)
        self.dropped_ids.setdefault(reason, []).extend(t.trajectory_id for t in trajectories)


def prepare_samples(trajectories: Iterable[Trajectory], *, policy_version: int, filters: FilterConfig,
                    advantage: AdvantageConfig, vocab_size: int) -> Prepared:
    """Drop stale and gibberish trajectories, compute group advantages over what is left, then drop
    groups whose advantages are all zero. A trajectory with no group id is a group of one."""
    out = Prepared()
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        if t.num_generated_tokens == 0:
            out.drop("empty", [t])
        elif is_stale(t, policy_version, filters):
            out.drop("stale", [t])
        elif is_gibberish(t, filters, vocab_size):
            out.drop("gibberish", [t])
        else:
            groups[t.group_id or t.trajectory_id].append(t)
    for group_id, members in groups.items():
        returns = torch.tensor([t.return_ for t in members])
        lengths = torch.tensor([t.num_generated_tokens for t in members])
        advantages = group_advantages(returns, lengths, advantage)
        if filters.drop_zero_advantage_groups and bool((advantages.abs() < 1e-8).all()):
            out.drop("zero_advantage", members)
            continue
        for t, a in zip(members, advantages.tolist()):
            out.samples.append(Sample(token_ids=list(t.token_ids), loss_mask=list(t.loss_mask), behaviour_logprobs=list(t.logprobs),
                                      advantage=a, group_id=group_id, trajectory_id=t.trajectory_id,
                                      staleness=staleness(t, policy_version)))
    return out


def effective_tokens(samples: Iterable[Sample]) -> int:
    """Generated tokens that carry a learning signal (non-zero advantage): what a step's size counts."""
    return sum(s.num_loss_tokens for s in samples if abs(s.advantage) > 1e-8)


def pack(samples: Sequence[Sample], micro_batch_tokens: int) -> list[list[Sample]]:
    """Split samples into micro-batches whose padded size (rows x longest row) fits the budget.

    Longest first, filled in order; a sequence longer than the budget gets a batch of its own."""
    return _pack_rows(samples, micro_batch_tokens, length=lambda s: s.num_tokens)


def _pack_rows(rows: Sequence[Any], micro_batch_tokens: int, length: Callable[[Any], int]) -> list[list[Any]]:
    """Rows into micro-batches of at most `micro_batch_tokens` (rows x longest row), longest first."""
    if micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    batches: list[list[Any]] = []
    current: list[Any] = []
    for row in sorted(rows, key=length, reverse=True):
        longest = length(current[0]) if current else length(row)
        if current and longest * (len(current) + 1) > micro_batch_tokens:
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


@dataclass
class MicroBatch:
    """Padded tensors of one forward/backward, all [B, T]."""

    input_ids: torch.Tensor  # long
    attention_mask: torch.Tensor  # long, 1 = real token
    loss_mask: torch.Tensor  # float, 1 = a generated token to learn from
    behaviour_logprobs: torch.Tensor  # float
    advantages: torch.Tensor  # float, the row's advantage on every position
    shared: SharedRows | None = None  # where the model reads these samples when they share prompts (`pack_shared`)

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask,
                                                   self.behaviour_logprobs, self.advantages)),
                          shared=self.shared.to(device) if self.shared is not None else None)


@dataclass
class SharedRows:
    """The model's input when samples share their prompt: each row is a prompt once, then the own tokens
    of every sample that has that prompt, one segment each. `predicting[b, t]` is the index, in row
    `row_of[b]`, of the position whose output predicts token t of sample b (of the plain [B, T] layout)."""

    input_ids: torch.Tensor  # [R, L] long, right-padded
    position_ids: torch.Tensor  # [R, L] long: a segment continues the prompt's positions
    segment: torch.Tensor  # [R, L] long: 0 the prompt, k >= 1 the k-th sample's own tokens, -1 padding
    row_of: torch.Tensor  # [B] long
    predicting: torch.Tensor  # [B, T] long

    def to(self, device: torch.device | str) -> SharedRows:
        return SharedRows(*(t.to(device) for t in (self.input_ids, self.position_ids, self.segment, self.row_of, self.predicting)))

    def attention_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """[R, 1, L, L] bool, True = may attend: causal, a segment sees the prompt and itself only, and
        (for sliding-window layers) only keys less than `sliding_window` positions back, as in the
        unpacked sequence. A padding position sees itself (a query with no key gives NaN)."""
        seg_q, seg_k = self.segment[:, :, None], self.segment[:, None, :]
        length = self.segment.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.segment.device).tril()
        mask = causal & (seg_q >= 0) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
        if sliding_window is not None:
            mask &= (self.position_ids[:, :, None] - self.position_ids[:, None, :]) < sliding_window
        mask |= torch.eye(length, dtype=torch.bool, device=mask.device) & (seg_q < 0)
        return mask[:, None]


def prompt_length(sample: Sample) -> int:
    """Tokens before the sample's first loss token: what the samples of a group share."""
    try:
        return sample.loss_mask.index(1)
    except ValueError:
        return sample.num_tokens


def shared_prompt_sets(samples: Sequence[Sample], max_row_tokens: int) -> list[list[Sample]]:
    """The samples that share a prompt, in sets whose row (the prompt once + each sample's own tokens)
    stays within `max_row_tokens` (a set holds at least one sample)."""
    by_prompt: dict[tuple[int, ...], list[Sample]] = defaultdict(list)
    for s in samples:
        by_prompt[tuple(s.token_ids[:prompt_length(s)])].append(s)
    sets: list[list[Sample]] = []
    for prompt, members in by_prompt.items():
        current: list[Sample] = []
        length = len(prompt)
        for s in members:
            own = s.num_tokens - len(prompt)
            if current and length + own > max_row_tokens:
                sets.append(current)
                current, length = [], len(prompt)
            current.append(s)
            length += own
        sets.append(current)
    return sets


def row_length(prompt_set: Sequence[Sample]) -> int:
    prompt = prompt_length(prompt_set[0])
    return prompt + sum(s.num_tokens - prompt for s in prompt_set)


def pack_shared(samples: Sequence[Sample], micro_batch_tokens: int) -> list[list[list[Sample]]]:
    """Micro-batches of prompt sets (`shared_prompt_sets`) whose padded size (rows x longest row) fits the
    budget, longest first; a set longer than the budget gets a batch of its own."""
    if micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    return _pack_rows(shared_prompt_sets(samples, micro_batch_tokens), micro_batch_tokens, length=row_length)


def collate_shared(prompt_sets: Sequence[Sequence[Sample]], pad_token_id: int) -> tuple[MicroBatch, list[Sample]]:
    """The plain [B, T] batch of every sample of `prompt_sets` (what the loss reads) with the rows the
    model reads (`SharedRows`), and the samples in the batch's order. Built as Python lists, then one
    tensor each: a step's hundreds of samples would otherwise cost thousands of small tensor writes."""
    rows = [s for prompt_set in prompt_sets for s in prompt_set]
    batch = collate(rows, pad_token_id)
    length = max(row_length(p) for p in prompt_sets)
    width = batch.input_ids.shape[1]
    input_ids, position_ids, segment, row_of, predicting = [], [], [], [], []
    for r, prompt_set in enumerate(prompt_sets):
        prompt = prompt_length(prompt_set[0])
        ids, positions, segments = prompt_set[0].token_ids[:prompt], list(range(prompt)), [0] * prompt
        for k, s in enumerate(prompt_set, 1):
            start, n = len(ids), s.num_tokens
            ids += s.token_ids[prompt:]
            positions += range(prompt, n)
            segments += [k] * (n - prompt)
            # Token t is predicted by the position holding token t - 1: in the prompt, or in the sample's own segment.
            predicting.append([0] + list(range(min(prompt, n - 1))) + list(range(start, start + n - 1 - prompt)) + [0] * (width - n))
            row_of.append(r)
        pad = length - len(ids)
        input_ids.append(ids + [pad_token_id] * pad)
        position_ids.append(positions + [0] * pad)
        segment.append(segments + [-1] * pad)
    batch.shared = SharedRows(*(torch.tensor(t, dtype=torch.long) for t in (input_ids, position_ids, segment, row_of, predicting)))
    return batch, rows


def collate(rows: Sequence[Sample], pad_token_id: int) -> MicroBatch:
    """Right-pad `rows` to the longest. Position 0 never carries loss (nothing predicts it)."""
    length = max(s.num_tokens for s in rows)
    pads = [length - s.num_tokens for s in rows]
    input_ids = torch.tensor([s.token_ids + [pad_token_id] * p for s, p in zip(rows, pads)], dtype=torch.long)
    attention_mask = torch.tensor([[1] * s.num_tokens + [0] * p for s, p in zip(rows, pads)], dtype=torch.long)
    loss_mask = torch.tensor([[0] * min(s.num_tokens, 1) + s.loss_mask[1:] + [0] * p for s, p in zip(rows, pads)], dtype=torch.float)
    behaviour = torch.tensor([s.behaviour_logprobs + [0.0] * p for s, p in zip(rows, pads)], dtype=torch.float)
    advantages = torch.tensor([[s.advantage] * s.num_tokens + [0.0] * p for s, p in zip(rows, pads)], dtype=torch.float)
    return MicroBatch(input_ids, attention_mask, loss_mask, behaviour, advantages)


def shard_by_group(samples: Sequence[Sample], rank: int, world_size: int) -> list[Sample]:
    """This data-parallel rank's share: whole groups, balanced by tokens, the same split on every rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_id].append(s)
    loads = [0] * world_size
    mine: list[Sample] = []
    for group_id in sorted(groups, key=lambda g: (-sum(s.num_tokens for s in groups[g]), g)):
        target = loads.index(min(loads))
        loads[target] += sum(s.num_tokens for s in groups[group_id])
        if target == rank:
            mine += groups[group_id]
    return mine
