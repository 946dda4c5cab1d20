"""The trainer's configuration: objective, filters, batching, optimiser, health checks.

Every field has a default (CWM's where CWM chose one) and a one-line description; unknown keys
are errors. The job config nests `TrainerConfig` under `trainer:` and `PublishConfig` (weight
sync, which the job drives) under `publish:`. Pydantic only: importing this never imports torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PublishConfig(_Config):
    """How each new policy version reaches the rollout workers (`trainer/publish.py`; the job publishes every `every_steps` steps)."""

    backend: Literal["files", "object_store", "nccl"] = Field(
        default="files",
        description="files: HF checkpoint dirs on a shared or RAM filesystem (one machine); object_store: each version travels "
                    "through Ray's object store to workers on any node, no shared path (a Ray cluster); nccl: not built yet.")
    root: str | None = Field(default=None, description="Directory versions are published into (files backend); None means <run_dir>/weights (use /dev/shm/... for same-host workers).")
    every_steps: int = Field(default=1, ge=1, description="Publish after every this many optimiser steps.")
    keep_last: int = Field(default=3, ge=1, description="Published versions kept on disk; older ones are deleted.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="Dtype of published weights; auto keeps the trainer's (bfloat16 suits a GPU engine).")
    fsync: bool = Field(default=False, description="fsync each version before announcing it (survives power loss; slower, needless on /dev/shm).")


AggregationMode = Literal["constant", "token_mean", "seq_mean_token_mean", "dr_grpo"]


class LossConfig(_Config):
    """The policy objective (see `trainer/loss.py`, where each option is implemented)."""

    clip_eps_low: float = Field(default=0.2, ge=0, description="PPO ratio clip below 1 - eps (CWM: 0.2).")
    clip_eps_high: float = Field(default=0.25, ge=0, description="PPO ratio clip above 1 + eps (CWM: 0.25).")
    ratio_level: Literal["token", "sequence"] = Field(default="token", description="'sequence' = GSPO: one length-normalised ratio per sequence.")
    ratio_against: Literal["trainer", "behaviour"] = Field(
        default="trainer",
        description="Denominator of the PPO ratio: the trainer's own logprobs before this step (decoupled PPO; "
                    "off-policyness corrected by `tis_cap`) or vLLM's behaviour logprobs (clipping does both jobs).")
    tis_cap: float | None = Field(default=2.0, gt=0, description="Truncated importance sampling cap on pi_trainer/pi_behaviour; null = off. Used when ratio_against='trainer'.")
    aggregation: AggregationMode = Field(default="constant", description="How per-token losses become one number (constant = CWM, token_mean = DAPO, seq_mean_token_mean = GRPO, dr_grpo).")
    constant_tokens: int = Field(default=8192, ge=1, description="The fixed token count the 'constant' mode divides by (about the tokens of one step).")
    max_completion_tokens: int = Field(default=1024, ge=1, description="The per-sequence token budget 'dr_grpo' divides by (the generation limit).")
    kl_coef: float = Field(default=0.0, ge=0, description="Weight of the KL penalty to the frozen reference model; 0 = off (CWM).")
    kl_estimator: Literal["k1", "k3"] = Field(default="k3", description="Per-token KL estimator (Schulman's k1 = log ratio, k3 = unbiased and non-negative).")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the rollouts: the trainer divides logits by it so its logprobs match vLLM's.")
    log_ratio_clamp: float = Field(default=20.0, gt=0, description="Clamp on log-ratios before exp, so one bad token cannot overflow.")


class AdvantageConfig(_Config):
    """How a group's returns become advantages (see `trainer/loss.py:group_advantages`)."""

    length_weighted_baseline: bool = Field(default=True, description="Baseline = the group's mean return weighted by generated tokens (CWM), else the plain mean.")
    divide_by_std: bool = Field(default=False, description="Divide by the group's return std (classic GRPO; off in CWM and Dr.GRPO).")


class FilterConfig(_Config):
    """Trajectories the trainer refuses, each counted in the step metrics."""

    max_staleness: int = Field(default=8, ge=0, description="Drop a trajectory whose newest token is more than this many versions behind.")
    drop_zero_advantage_groups: bool = Field(default=True, description="Skip groups whose advantages are all zero (no learning signal).")
    gibberish: bool = Field(default=True, description="Drop trajectories with a rare token sampled at very low probability (CWM's gibberish rule).")
    gibberish_rare_token_id: float = Field(default=0.9, gt=0, description="Token ids at or above this are 'rare' (a value below 1 is a fraction of the vocabulary).")
    gibberish_max_logprob: float = Field(default=-12.0, lt=0, description="A rare token sampled with a behaviour logprob below this marks gibberish.")


class BatchConfig(_Config):
    """How trajectories become micro-batches and optimiser steps."""

    micro_batch_tokens: int = Field(default=4096, ge=16, description="Token budget of one forward/backward (rows x padded length).")
    step_tokens: int = Field(default=2048, ge=1, description="A step waits for this many generated tokens with non-zero advantage (used by the job's buffer).")
    share_prompts: bool = Field(default=True, description="RL steps read the prompt a group's samples share once, in one row with each sample's own tokens (same logprobs, far fewer tokens; sdpa attention). False: one padded row per sample.")


class OptimConfig(_Config):
    """AdamW with warmup and a constant or cosine schedule."""

    lr: float = Field(default=1e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup from 0 to lr over this many steps.")
    schedule: Literal["constant", "cosine"] = Field(default="constant", description="After warmup: constant, or cosine decay to min_lr_ratio x lr over total_steps.")
    total_steps: int = Field(default=1000, ge=1, description="Length of the cosine schedule in optimiser steps.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the global gradient norm to this; null = no clipping.")


class HealthConfig(_Config):
    """The train/inference mismatch check."""

    mismatch_check: bool = Field(default=True, description="Log the KL between vLLM's behaviour logprobs and the trainer's on the same tokens.")
    mismatch_warn_kl: float = Field(default=0.01, gt=0, description="Warn (with the likely cause) when the mismatch KL exceeds this at the first step.")


class TrainerConfig(_Config):
    """Everything the trainer needs besides the model and the data."""

    loss: LossConfig = Field(default_factory=LossConfig, description="The policy objective.")
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig, description="Advantages from group returns.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Trajectories the trainer refuses.")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Micro-batches and steps.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Mismatch check.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(default="auto", description="Autocast dtype: auto = bfloat16 on GPU, float32 on CPU.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward (less memory, ~30% slower).")
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept on disk (the newest).")
    seed: int = Field(default=0, description="Seed of the trainer's RNGs.")
    num_workers: int = Field(default=1, ge=1, description="Trainer ranks in a job: Ray actors taking data-parallel steps (gloo on CPU, nccl on GPU); the driver only orchestrates.")
    num_cpus: float = Field(default=1, ge=0, description="CPUs Ray reserves for each trainer actor (its torch threads are the job's trainer_threads).")
    num_gpus: float = Field(default=0, ge=0, description="GPUs Ray gives each trainer actor (1 on a GPU cluster; 0 trains on the CPU).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each trainer actor needs, to place it on the nodes that offer them (e.g. {trainer: 1}); the driver's node by default.")

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.loss.ratio_against == "behaviour" and self.loss.tis_cap is not None and "tis_cap" in self.loss.model_fields_set:
            raise ValueError("loss.tis_cap applies only with loss.ratio_against='trainer' (against the behaviour "
                             "logprobs the clipped ratio already is the importance weight); remove one of them")
        return self
