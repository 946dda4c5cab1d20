"""The optimisation loop: one `step` = Trajectories in, one AdamW step, a new policy version out.

`Trainer(TrainerConfig(), model_dir="models/tiny", run_dir="runs/x")` loads the model;
`trainer.step(trajectories)` returns a `StepResult` (`metrics`, `trained_ids`, `dropped_ids` by
reason); `trainer.save_checkpoint(data_cursor=...)` saves a resumable checkpoint that
`Trainer(..., resume=path)` picks up (`tests/trainer/test_train.py` runs these). A step reads top to bottom: prepare samples (filters
+ group advantages) -> this rank's share -> token weights over the whole step -> per
micro-batch: forward, logprobs, loss, backward (gradients accumulate; DDP syncs only on the last)
-> clip -> AdamW -> schedule -> version += 1. Publishing the weights and checkpointing are the
caller's (the job's loop, `cwm_rl/loop/driver.py`), so a reader sees them where they happen.
Data parallel: start the processes with torch.distributed initialised (gloo on CPU, nccl on GPU)
and give every rank the SAME trajectories; each trains on its share of the groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cwm_rl.types import TrainingRecord, Trajectory
from trainer.batching import MicroBatch, Sample, SharedRows, collate, collate_shared, pack, pack_shared, prepare_samples, shard_by_group
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import LossConfig, TrainerConfig
from trainer.loss import LossInputs, clip_flags, policy_loss, ratios, sft_loss, token_weights

log = logging.getLogger(__name__)


def token_logprobs(model: torch.nn.Module, batch: MicroBatch, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of every token given the ones before it, [B, T], and optionally the entropy of each
    predicting distribution, [B, T] (no grad). Only tokens from the batch's first loss token on get
    them (the rest are 0): the prompt before it needs no [T, vocab] logits, and for a long prompt
    those are most of the step's time. Logits are divided by the sampling temperature so the numbers
    compare with vLLM's processed logprobs."""
    first = first_loss_position(batch.loss_mask)
    if batch.shared is not None:  # prompts read once per row; only loss tokens get logits
        return _shared_token_logprobs(model, batch, first, temperature, with_entropy)
    keep = batch.input_ids.shape[1] - first + 1  # positions first-1 .. T-1 predict tokens first .. T (T: none)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    logits = logits[:, :-1].float() / temperature  # [B, keep-1, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    taken = log_probs.gather(-1, batch.input_ids[:, first:, None]).squeeze(-1)  # [B, T-first]
    logprobs = torch.nn.functional.pad(taken, (first, 0))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.nn.functional.pad(-(log_probs.exp() * log_probs).sum(-1), (first, 0))
    return logprobs, entropy


def _shared_token_logprobs(model: torch.nn.Module, batch: MicroBatch, first: int, temperature: float,
                           with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` for a batch whose samples share prompts (`batch.shared`): [B, T] like the plain path,
    non-zero on loss tokens only. Each loss token occupies a row position, so the [N, vocab] logits stay
    within the micro-batch's token budget however many samples share a row."""
    shared = batch.shared
    keep = shared.input_ids.shape[1] - first + 1  # no row position before first-1 predicts a loss token
    row_logits = model(input_ids=shared.input_ids, position_ids=shared.position_ids,
                       attention_mask=shared_attention_mask(model, shared), logits_to_keep=keep).logits  # [R, keep, V]
    rows, positions = batch.loss_mask.nonzero(as_tuple=True)  # [N] each: the loss tokens
    where = shared.predicting[rows, positions] - (first - 1)
    logits = row_logits[shared.row_of[rows], where].float() / temperature  # [N, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    logprobs = torch.zeros(batch.loss_mask.shape, dtype=log_probs.dtype, device=log_probs.device)
    logprobs = logprobs.index_put((rows, positions), log_probs.gather(-1, batch.input_ids[rows, positions, None]).squeeze(-1))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.zeros_like(logprobs).index_put((rows, positions), -(log_probs.exp() * log_probs).sum(-1))
    return logprobs, entropy


def shared_attention_mask(model: torch.nn.Module, shared: SharedRows) -> Any:
    """The attention mask of `shared`'s rows in the form the model takes: one per layer type where its
    config names layer types (full and sliding-window layers differ), else one 4D mask."""
    config = getattr(model, "module", model).config  # under DDP, the wrapped model's
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {kind: shared.attention_mask(window if kind == "sliding_attention" else None) for kind in set(layer_types)}
    return shared.attention_mask()


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Rows of shared prompts need a 4D boolean mask: sdpa takes one; a sliding window needs the config to
    name its layers' types (the model then takes a mask per type)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # linear-attention, recurrent or chunked layers would read the other samples' segments
        return set(layer_types) <= {"full_attention", "sliding_attention"}
    return getattr(config, "sliding_window", None) is None


def shared_rows_match(model: torch.nn.Module, pad_token_id: int) -> bool:
    """Do rows of shared prompts give this model the logprobs of one row per sample? Checked once on a few
    tokens when the trainer starts: a model whose layers read the mask otherwise then reads samples whole."""
    vocab = model.config.vocab_size
    prompt, answers = [7 % vocab, 11 % vocab, 13 % vocab, 17 % vocab], [[19 % vocab, 23 % vocab], [29 % vocab, 31 % vocab, 37 % vocab]]
    samples = [Sample(token_ids=prompt + a, loss_mask=[0] * len(prompt) + [1] * len(a), behaviour_logprobs=[0.0] * (len(prompt) + len(a)))
               for a in answers]
    device = next(model.parameters()).device
    with torch.no_grad():
        shared, rows = collate_shared([samples], pad_token_id)
        plain = collate(rows, pad_token_id)
        a, _ = token_logprobs(model, shared.to(device), 1.0)
        b, _ = token_logprobs(model, plain.to(device), 1.0)
    mask = plain.loss_mask.bool().to(device)
    return bool(torch.allclose(a[mask].float(), b[mask].float(), atol=1e-3, rtol=1e-3))


def first_loss_position(loss_mask: torch.Tensor) -> int:
    """The first column of a [B, T] mask with a loss token in any row (at least 1: token 0 has no logprob)."""
    columns = loss_mask.any(dim=0).nonzero()
    return max(int(columns[0]), 1) if len(columns) else 1


def lr_multiplier(step: int, warmup_steps: int, schedule: str, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then constant or cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    """What one `Trainer.step` did: its metrics, and the fate of every trajectory it was given."""

    metrics: dict[str, Any]
    trained_ids: list[str] = field(default_factory=list)  # trajectories whose tokens were trained on
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)  # reason (stale, gibberish, ...) -> ids
    records: list[TrainingRecord] = field(default_factory=list)  # per trained trajectory (this rank's share): for the store
    warnings: list[str] = field(default_factory=list)  # what the trainer logged as warnings during the step (TrainerGroup fills it)

    @property
    def skipped(self) -> bool:
        """No trajectory had a learning signal: no optimiser step, no new policy version."""
        return bool(self.metrics.get("skipped"))


class Trainer:
    """A causal LM trained with the GRPO-style objective of `trainer/loss.py`."""

    def __init__(self, config: TrainerConfig, model_dir: str | Path, *, run_dir: str | Path | None = None,
                 device: str | None = None, resume: str | Path | None = None):
        from transformers import AutoModelForCausalLM

        self.config = config
        self.model_dir = Path(model_dir)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        _seed_everything(config.seed)

        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).to(self.device)
        self.model.train()
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.vocab_size = self.model.config.vocab_size
        self.pad_token_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        # A group's samples share their prompt: read it once per group (config.batch.share_prompts) where the model allows.
        self.share_prompts = (config.batch.share_prompts and can_share_prompts(self.model)
                              and shared_rows_match(self.model, self.pad_token_id))
        if config.batch.share_prompts and not self.share_prompts:
            log.info("trainer.batch.share_prompts: this model (attention %r, layer types %s) reads every sample whole",
                     getattr(self.model.config, "_attn_implementation", None), getattr(self.model.config, "layer_types", None))
        self.reference = None
        if config.loss.kl_coef > 0:  # a frozen copy of the starting weights
            self.reference = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).to(self.device).eval()
            self.reference.requires_grad_(False)
        self.wrapped = self.model
        if self.world_size > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        optim = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(
            s, optim.warmup_steps, optim.schedule, optim.total_steps, optim.min_lr_ratio))
        self.step_count = 0
        self.policy_version = 0
        self.data_cursor: Any = None
        if resume is not None:
            self.resume(resume)

    # -- the RL step ------------------------------------------------------------------------------

    def step(self, trajectories: Sequence[Trajectory]) -> StepResult:
        """One optimiser step on `trajectories` (every rank passes the same list)."""
        started = time.perf_counter()
        cfg = self.config
        prepared = prepare_samples(trajectories, policy_version=self.policy_version, filters=cfg.filters,
                                   advantage=cfg.advantage, vocab_size=self.vocab_size)
        result = StepResult(metrics={}, trained_ids=sorted({s.trajectory_id for s in prepared.samples}),
                            dropped_ids={reason: list(ids) for reason, ids in prepared.dropped_ids.items()})
        samples = shard_by_group(prepared.samples, self.rank, self.world_size)
        num_sequences = len(prepared.samples)
        num_tokens = sum(s.num_loss_tokens for s in prepared.samples)
        metrics = result.metrics
        metrics.update({"step": self.step_count, "policy_version": self.policy_version, "trajectories": len(trajectories),
                        "sequences": num_sequences, "loss_tokens": num_tokens, **{f"dropped_{k}": v for k, v in prepared.dropped.items()}})
        if num_sequences == 0:
            metrics.update(skipped=True, step_time_s=time.perf_counter() - started)
            return result

        def weights_for(mask: torch.Tensor) -> torch.Tensor:
            return token_weights(mask, cfg.loss.aggregation, num_sequences=num_sequences, num_tokens=num_tokens,
                                 constant_tokens=cfg.loss.constant_tokens, max_completion_tokens=cfg.loss.max_completion_tokens)

        totals: dict[str, float] = {}
        loss_total = 0.0
        for batch, rows, last in self._micro_batches(samples, share_prompts=self.share_prompts):
            with self._sync(last), self._autocast():
                logprobs, entropy = token_logprobs(self.wrapped, batch, cfg.loss.temperature, with_entropy=True)
                ref_logprobs = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref_logprobs, _ = token_logprobs(self.reference, batch, cfg.loss.temperature)
                inputs = LossInputs(logprobs=logprobs, behaviour_logprobs=batch.behaviour_logprobs, advantages=batch.advantages,
                                    loss_mask=batch.loss_mask, weights=weights_for(batch.loss_mask), ref_logprobs=ref_logprobs)
                loss, batch_metrics = policy_loss(inputs, cfg.loss)
                # DDP averages gradients over ranks; the weights already divide by the whole step's counts.
                (loss * self.world_size).backward()
            loss_total += loss.item()
            result.records += training_records(rows, inputs, cfg.loss, step=self.step_count)
            batch_metrics.update(_health_sums(logprobs.detach(), batch, entropy))
            for k, v in batch_metrics.items():
                totals[k] = max(totals.get(k, 0.0), float(v)) if k == "ratio_max" else totals.get(k, 0.0) + float(v)

        metrics.update(self._optimizer_step())
        totals = _all_reduce_sums({**totals, "loss": loss_total})  # one all-reduce for every sum
        metrics.update(_summarise(totals, prepared.samples))
        self._check_mismatch(metrics)
        metrics["new_policy_version"] = self._next_version()
        metrics["step_time_s"] = time.perf_counter() - started
        return result

    # -- supervised fine-tuning (warm starts) ------------------------------------------------------

    def sft_step(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """One optimiser step of token-mean cross-entropy on the samples' mask-1 tokens."""
        started = time.perf_counter()
        mine = samples[self.rank::self.world_size]
        num_tokens = sum(s.num_loss_tokens for s in samples)
        loss_total = 0.0
        for batch, _, last in self._micro_batches(mine):
            with self._sync(last), self._autocast():
                logprobs, _ = token_logprobs(self.wrapped, batch)
                weights = token_weights(batch.loss_mask, "token_mean", num_sequences=len(samples), num_tokens=num_tokens,
                                        constant_tokens=1, max_completion_tokens=1)
                loss = sft_loss(logprobs, weights)
                (loss * self.world_size).backward()
            loss_total += loss.item()
        metrics = {"step": self.step_count, "sft_loss": _all_reduce_sums({"loss": loss_total})["loss"], "loss_tokens": num_tokens}
        metrics.update(self._optimizer_step())
        metrics["new_policy_version"] = self._next_version()
        metrics["step_time_s"] = time.perf_counter() - started
        return metrics

    # -- pieces of a step ----------------------------------------------------------------------------

    def _micro_batches(self, samples: Sequence[Sample], share_prompts: bool = False):
        """(micro-batch, its samples, is_last). A rank with nothing to do runs one zero-weight batch so that
        every rank joins the gradient all-reduce. `share_prompts`: samples with the same prompt share a row."""
        budget = self.config.batch.micro_batch_tokens
        if share_prompts and samples:
            batches = pack_shared(samples, budget)
            for i, prompt_sets in enumerate(batches):
                if any(len(p) > 1 for p in prompt_sets):
                    batch, rows = collate_shared(prompt_sets, self.pad_token_id)
                else:  # nothing shared here: plain rows, no [L, L] masks
                    rows = [p[0] for p in prompt_sets]
                    batch = collate(rows, self.pad_token_id)
                yield batch.to(self.device), rows, i == len(batches) - 1
            return
        rows = pack(samples, budget)
        if not rows:
            dummy = Sample(token_ids=[self.pad_token_id, self.pad_token_id], loss_mask=[0, 0], behaviour_logprobs=[0.0, 0.0])
            rows = [[dummy]]
        for i, r in enumerate(rows):
            yield collate(r, self.pad_token_id).to(self.device), r, i == len(rows) - 1

    def _sync(self, last: bool):
        """DDP all-reduces gradients only on a rank's last micro-batch."""
        if self.world_size > 1 and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def _autocast(self):
        dtype = self.config.dtype
        if dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _optimizer_step(self) -> dict[str, float]:
        max_norm = self.config.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm is not None else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": lr}

    def _next_version(self) -> int:
        """Count the optimiser step: the weights are now policy version N + 1."""
        self.step_count += 1
        self.policy_version += 1
        return self.policy_version

    def skip_to_version(self, version: int) -> None:
        """Call the current weights `version` (> the current one). A run resumed from a checkpoint older
        than its last published weights does this: versions only grow (workers and staleness rely on it)."""
        if version <= self.policy_version:
            raise ValueError(f"policy versions only grow: {version} is not above the current {self.policy_version}")
        self.policy_version = version

    def _check_mismatch(self, metrics: dict[str, Any]) -> None:
        """At the first step, a large KL between vLLM's and our logprobs means we train on a policy
        other than the one that sampled: say which settings to compare."""
        health = self.config.health
        if not health.mismatch_check or self.step_count != 0 or metrics.get("mismatch_kl") is None:
            return
        if metrics["mismatch_kl"] > health.mismatch_warn_kl:
            log.warning(
                "train/inference mismatch at step 0: KL(vLLM || trainer) = %.4g > %.4g on the same tokens. Likely causes, most "
                "common first: the sampling temperature differs from trainer.loss.temperature (=%g); vLLM ran the model in "
                "another dtype (bfloat16 vs the trainer's float32) or with top-p/top-k (set them off, or expect this); the "
                "engine loaded other weights than %s; the tokens were re-tokenised instead of taken from vLLM.",
                metrics["mismatch_kl"], health.mismatch_warn_kl, self.config.loss.temperature, self.model_dir)

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, data_cursor: Any = None) -> Path | None:
        """Save everything a resume needs under `run_dir/checkpoints` (rank 0 writes)."""
        if self.run_dir is None:
            raise ValueError("the trainer has no run_dir to checkpoint into; pass run_dir= to Trainer")
        if data_cursor is not None:
            self.data_cursor = data_cursor
        if self.rank != 0:
            return None
        return save_checkpoint(self.run_dir / "checkpoints", model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               step=self.step_count, policy_version=self.policy_version, data_cursor=self.data_cursor,
                               keep_last=self.config.keep_checkpoints)

    def resume(self, path: str | Path) -> Any:
        """Restore from a checkpoint dir, or from the newest one under a run dir. Returns the data cursor."""
        path = Path(path)
        found = path if (path / "state.json").exists() else latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {path}: pass a checkpoint directory or a run directory that has checkpoints/")
        state = load_checkpoint(found, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step_count, self.policy_version = state["step"], state["policy_version"]
        self.data_cursor = state.get("data_cursor")
        return self.data_cursor


# -- metrics helpers --------------------------------------------------------------------------------

@torch.no_grad()
def training_records(rows: Sequence[Sample], inputs: LossInputs, config: LossConfig, *, step: int) -> list[TrainingRecord]:
    """What the step did with each row of a micro-batch, for the rollout store: the trainer's logprob, the IS
    weight and the clip flag of every generated token (the row's mask-1 positions), and the advantage."""
    detached = dataclasses.replace(inputs, logprobs=inputs.logprobs.detach())
    ratio, is_weight = ratios(detached, config)
    flags = clip_flags(ratio, inputs.advantages, inputs.loss_mask, config)
    # Three [B, T] tensors to Python once; each row's mask-1 positions are picked from the lists.
    logprobs, is_weights, clipped = detached.logprobs.float().cpu().tolist(), is_weight.float().cpu().tolist(), flags.cpu().tolist()
    records = []
    for i, sample in enumerate(rows):
        if not sample.trajectory_id:
            continue  # the zero-weight stand-in batch
        positions = [p for p, m in enumerate(sample.loss_mask) if m]
        records.append(TrainingRecord(trajectory_id=sample.trajectory_id, step=step, advantage=sample.advantage,
                                      trainer_logprobs=[logprobs[i][p] for p in positions],
                                      is_weights=[is_weights[i][p] for p in positions],
                                      clipped=[clipped[i][p] for p in positions]))
    return records


def _health_sums(logprobs: torch.Tensor, batch: MicroBatch, entropy: torch.Tensor | None) -> dict[str, float]:
    """Sums over loss tokens of the mismatch KL estimators and the entropy (no grad)."""
    mask = batch.loss_mask
    log_ratio = (logprobs - batch.behaviour_logprobs).clamp(-20, 20)  # log pi_trainer / pi_vllm
    # KL(vLLM || trainer) estimated on vLLM's samples: k3 = (r - 1) - log r with r = pi_trainer / pi_vllm.
    k3 = torch.exp(log_ratio) - 1 - log_ratio
    out = {"mismatch_kl_sum": float((k3 * mask).sum()), "mismatch_k1_sum": float((-log_ratio * mask).sum())}
    if entropy is not None:
        out["entropy_sum"] = float((entropy * mask).sum())
    return out


def _all_reduce_sums(totals: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return totals
    keys = sorted(totals)
    sums = torch.tensor([totals[k] for k in keys if k != "ratio_max"], dtype=torch.float64)
    dist.all_reduce(sums)
    out = dict(zip([k for k in keys if k != "ratio_max"], sums.tolist()))
    if "ratio_max" in totals:
        peak = torch.tensor([totals["ratio_max"]], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out["ratio_max"] = peak.item()
    return out


def _summarise(totals: dict[str, float], samples: Sequence[Sample]) -> dict[str, Any]:
    tokens = max(totals.get("tokens", 0.0), 1.0)
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float64)
    return {
        "loss": totals["loss"],
        "clip_low_frac": totals.get("clipped_low", 0.0) / tokens,
        "clip_high_frac": totals.get("clipped_high", 0.0) / tokens,
        "entropy": totals.get("entropy_sum", 0.0) / tokens,
        "kl": totals.get("kl_sum", 0.0) / tokens,
        "mismatch_kl": totals.get("mismatch_kl_sum", 0.0) / tokens,
        "mismatch_k1": totals.get("mismatch_k1_sum", 0.0) / tokens,
        "ratio_mean": totals.get("ratio_sum", 0.0) / tokens,
        "ratio_max": totals.get("ratio_max", 0.0),
        "is_weight_mean": totals.get("is_weight_sum", 0.0) / tokens,
        "is_weight_capped_frac": totals.get("is_weight_capped", 0.0) / tokens,
        "advantage_mean": advantages.mean().item(),
        "advantage_std": advantages.std().item() if len(samples) > 1 else 0.0,
        "advantage_min": advantages.min().item(),
        "advantage_max": advantages.max().item(),
        "staleness_mean": float(np.mean([s.staleness for s in samples])),
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
