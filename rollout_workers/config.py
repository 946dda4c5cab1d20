"""The rollout worker's configuration: its vLLM engine, how it samples, when it ends an episode.

Pydantic only (no vLLM, no torch): the job config embeds these, and `cwm-rl train` validates a
config before anything heavy is imported. `WorkerConfig` is what one worker actor receives; the
job builds it in one place (`cwm_rl.loop.workers.worker_config`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Config):
    """How to start the worker's vLLM engine."""

    model: str | None = Field(default=None, description="Path of a Hugging Face model directory (safetensors + config + tokenizer); in a job, set from model.path or the model the job makes.")
    dtype: str = Field(default="float32", description="Weights dtype: float32 on CPU, bfloat16 on GPU.")
    max_model_len: int = Field(default=2048, ge=16, description="Longest sequence (prompt + all turns) in tokens.")
    kv_cache_gib: float = Field(default=0.25, gt=0, description="KV-cache memory in GiB (CPU RAM on the CPU backend).")
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences batched per engine step.")
    seed: int | None = Field(default=None, description="Engine sampling seed; None = the job's seed (0 outside a job).")
    enforce_eager: bool = Field(default=True, description="Skip torch.compile and graph capture (fast start). false compiles the model at engine start (~15-35 s on the CPU, needs g++ and the Python headers): ~1.15x the quickstart's tokens/s.")
    keep_kv_cache_on_reload: bool = Field(default=False, description="On reload keep in-flight KV caches (faster, approximate) instead of recomputing prefixes.")
    executor: Literal["auto", "uni", "mp", "inproc"] = Field(default="auto", description="Where vLLM runs the model: 'inproc' in the rollout worker's own process, engine core included, stepped by a thread (on a CPU with few cores the best: no engine step's outputs serialised between processes; 0.6x the CPU per token of 'uni'), 'uni' in the engine-core process (no worker process spinning on a shared-memory queue; 1.2x tokens/s on 0.7x the CPU of 'mp' on 2 cores), 'mp' in a worker process of its own (vLLM's CPU default: OpenMP threads bound to cores), 'auto' is 'inproc' on a CPU and vLLM's choice on a GPU (an engine-core process: the frontend's Python overlaps the GPU's work). Under 'inproc' the model runs on the worker's CPU threads (one under Ray); on a CPU with many cores and a larger model, 'mp' binds vLLM's OpenMP threads to the cores.")
    block_size: int | None = Field(default=None, ge=1, description="KV-cache block in tokens; None = vLLM's (128 on the CPU). Prefix caching reuses whole blocks only, so many short prompts that share a system prompt need small blocks (16 in the quickstart: 1.4x the rollout side's tokens/s).")
    cwm_as_llama: bool = Field(default=True, description="Run a CwmForCausalLM model with vLLM's own Llama code (CWM is Llama with sliding-window layers: same weights, same logprobs) instead of vLLM's slower Transformers backend, which vLLM picks for CWM (1.2x tokens/s on a CPU).")
    extra_engine_args: dict[str, Any] = Field(default_factory=dict, description="More vllm.AsyncEngineArgs fields, passed as they are.")

    @model_validator(mode="after")
    def _extra_args_do_not_repeat_fields(self) -> EngineConfig:
        """An engine argument set by a field above may not come again in extra_engine_args (one would silently win)."""
        fields = {"model": "model", "dtype": "dtype", "max_model_len": "max_model_len", "kv_cache_memory_bytes": "kv_cache_gib",
                  "max_num_seqs": "max_num_seqs", "seed": "seed", "enforce_eager": "enforce_eager", "block_size": "block_size",
                  "distributed_executor_backend": "executor",
                  "logprobs_mode": None}  # processed logprobs: what importance ratios need, not a choice
        for key in self.extra_engine_args.keys() & fields.keys():
            field = fields[key]
            raise ValueError(f"extra_engine_args.{key} is set by cwm-rl: " +
                             (f"use the engine's `{field}` field instead" if field else "importance ratios need vLLM's processed logprobs"))
        return self


class SamplingConfig(_Config):
    """How to sample one turn."""

    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=-1, description="Top-k sampling; -1 disables it.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens generated in one turn.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra token ids that end a turn (the EOS token always does).")
    ignore_eos: bool = Field(default=False, description="Keep generating past EOS (benchmarks and tests only).")


class EpisodeLimits(_Config):
    """When the worker ends an episode that the env has not ended."""

    max_turns: int = Field(default=8, ge=1, description="Model turns per episode at most.")
    max_total_tokens: int | None = Field(default=None, ge=16, description="Prompt + all turns, in tokens; None = the engine's max_model_len (a job refuses more).")
    env_timeout_s: float = Field(default=120.0, gt=0, description="Deadline of one env reset or step.")


class WorkerConfig(_Config):
    """Everything one rollout worker needs: its engine, what it plays, and how."""

    engine: EngineConfig = Field(description="The worker's vLLM engine (engine.model must be set).")
    env_id: str = Field(description="Env to play, e.g. 'cwm_rl/Math-v0'.")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="Env constructor kwargs.")
    env_url: str | None = Field(default=None, description="Play the env on this env server instead of in-process.")
    env_token: str | None = Field(default=None, description="Bearer token for env_url.")
    env_modules: list[str] = Field(default_factory=list, description="Modules to import first: they register user envs.")
    sys_path: list[str] = Field(default_factory=list, description="Directories to put on sys.path first (where env_modules live).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="How each turn is sampled.")
    limits: EpisodeLimits = Field(default_factory=EpisodeLimits, description="When the worker ends an episode.")
