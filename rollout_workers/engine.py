"""One vLLM engine per worker: token-in/token-out generation with behaviour logprobs and a policy
version on every token, and in-place weight reloads while requests are in flight.

`RolloutEngine(EngineConfig(model=DIR))` starts the engine; `await engine.generate(prompt_ids,
SamplingConfig(max_tokens=64))` returns a `Generation` (`token_ids`, `logprobs`, `versions`,
`finish_reason`); `await engine.update_weights(version, path)` reloads a published version in
place (`tests/rollout_workers/test_engine.py` runs these on a real engine).

The reload protocol (`update_weights`): pause the scheduler keeping every request ("keep"),
reload the weights in place (vLLM's `reload_weights`, no engine restart), let the frontend
process every output the engine sent before the pause, record for each running request how
many tokens it has (those belong to the old version), drop the KV and prefix caches so
in-flight requests recompute their prefixes with the new weights (set `keep_kv_cache_on_reload`
to skip that: faster, but tokens after the reload then attend to old-weight keys and values),
bump the version, resume. Requests are never dropped; every token generated after the reload
carries the new version. Prefix-cache entries are salted with the version a request started
under, so a request added after a reload never reuses a prefix computed with older weights (with
`keep_kv_cache_on_reload`, one added before it but still waiting may, as running ones keep their
KV). Requests return one final output (no per-step streaming to Python), and the recorded counts
split their tokens by version; the counts come from vLLM internals, read only in
`rollout_workers/vllm_adapter.py` (its test pins them to the installed vLLM).

Behaviour logprobs are vLLM's "processed" logprobs: the log-probability of the sampled token
under the distribution actually sampled from (after temperature and top-p/top-k), which is
what importance ratios need. At temperature 1 without top-p/top-k they equal the raw model's.

On the CPU (`EngineConfig` fields): `executor="uni"` keeps the model in vLLM's engine-core process,
`block_size` sets the KV-cache block prefix caching reuses, and `cwm_as_llama` (on by default) runs a
CwmForCausalLM checkpoint with vLLM's own Llama code rather than its Transformers backend.

Scripts that create an engine need an `if __name__ == "__main__":` guard: vLLM starts its
engine-core and worker processes with multiprocessing.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout_workers import vllm_adapter
from rollout_workers.config import EngineConfig, SamplingConfig


@dataclass
class Generation:
    """One turn's generated tokens, aligned: token i has logprobs[i] under policy versions[i]."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop token), "length", or "abort"


def cwm_as_llama_args(model: str) -> dict[str, Any]:
    """vLLM engine arguments that run a CwmForCausalLM checkpoint (a local directory) with vLLM's own Llama code, which
    honours CWM's sliding-window `layer_types`; {} for any other model. vLLM's default for CWM is its slower
    Transformers backend."""
    try:
        architectures = json.loads((Path(model) / "config.json").read_text()).get("architectures")
    except (OSError, ValueError):
        return {}
    return {"hf_overrides": {"architectures": ["LlamaForCausalLM"]}} if architectures == ["CwmForCausalLM"] else {}


def _sampled_logprobs(completion: Any) -> list[float]:
    """The sampled token's logprob at each position, from vLLM's FlatLogprobs: with logprobs=0 each position holds
    only the sampled token, so the flat lists line up with the tokens; otherwise it is read position by position."""
    flat = completion.logprobs
    if list(flat.token_ids) == list(completion.token_ids):
        return list(flat.logprobs)
    return [position[token].logprob for token, position in zip(completion.token_ids, flat)]


class RolloutEngine:
    """A vLLM AsyncLLM plus the bookkeeping RL needs: versions per token and in-flight reloads."""

    def __init__(self, config: EngineConfig, version: int = 0):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if config.model is None:
            raise ValueError("EngineConfig.model is not set: name the Hugging Face model directory the engine should load")
        self.config = config
        self.version = version
        chosen: dict[str, Any] = {} if config.executor == "auto" else {"distributed_executor_backend": config.executor}
        if config.block_size is not None:
            chosen["block_size"] = config.block_size
        if config.cwm_as_llama and not {"hf_overrides", "model_impl"} & config.extra_engine_args.keys():
            chosen.update(cwm_as_llama_args(config.model))
        args = AsyncEngineArgs(**{
            "model": config.model,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "kv_cache_memory_bytes": int(config.kv_cache_gib * 2**30),
            "max_num_seqs": config.max_num_seqs,
            "seed": config.seed or 0,
            "enforce_eager": config.enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "disable_log_stats": True,  # vLLM's per-step Prometheus stats: a tenth of the frontend's CPU, read by nobody here
            **chosen,
            **config.extra_engine_args,
        })
        with vllm_adapter.executor_env(args.distributed_executor_backend):
            self.engine = AsyncLLM.from_engine_args(args)
        self._ids = itertools.count()
        self._active: dict[str, list[tuple[int, int]]] = {}  # engine request id -> reloads seen while it ran
        self._reload_lock = asyncio.Lock()

    @property
    def tokenizer(self):
        """The engine's tokenizer (a Hugging Face tokenizer)."""
        return self.engine.tokenizer

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        """Sample one turn after `prompt_token_ids` (token in, token out: no re-tokenising)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_tokens, stop_token_ids=sampling.stop_token_ids or None, ignore_eos=sampling.ignore_eos,
            logprobs=0,  # the sampled token's own logprob
            flat_logprobs=True,  # one list of floats, not a dict and a Logprob object per token
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request: no per-step Python work
            detokenize=False,
            skip_clone=True,  # made for this request alone: vLLM need not deep-copy it
        )
        request_id = f"gen-{next(self._ids)}"
        async with self._reload_lock:  # a request starts under a known version
            # The salt keeps prefix-cache hits within one policy version: a request never reuses a prefix's keys and
            # values computed with older weights (kept across reloads with keep_kv_cache_on_reload).
            prompt = TokensPrompt(prompt_token_ids=prompt_token_ids, cache_salt=f"v{self.version}")
            collector = await self.engine.add_request(request_id, prompt, params)
            start_version = self.version
        reloads: list[tuple[int, int]] = []  # (tokens generated before a reload, the version after it)
        self._active[collector.request_id] = reloads
        try:
            output = await collector.get()
        except BaseException:
            await self.engine.abort(request_id)
            raise
        finally:
            self._active.pop(collector.request_id, None)
        completion = output.outputs[0]
        versions = [start_version] * len(completion.token_ids)
        for num_before, version in reloads:
            versions[num_before:] = [version] * (len(versions) - num_before)
        return Generation(
            token_ids=list(completion.token_ids),
            logprobs=_sampled_logprobs(completion),
            versions=versions,
            finish_reason=completion.finish_reason or "abort",
        )

    async def update_weights(self, version: int, path: str) -> None:
        """Reload the published checkpoint at `path` in place; later tokens carry `version`."""
        async with self._reload_lock:
            await self.engine.pause_generation(mode="keep", clear_cache=not self.config.keep_kv_cache_on_reload)
            try:
                await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
                await vllm_adapter.drain_outputs(self.engine)  # the old-weight tokens are all counted
                for request_id, reloads in self._active.items():
                    num_tokens = vllm_adapter.num_output_tokens(self.engine, request_id)
                    if num_tokens is not None:  # None: it finished on the old weights
                        reloads.append((num_tokens, version))
                self.version = version
            finally:
                await self.engine.resume_generation()

    def in_flight(self) -> list[int]:
        """Tokens generated so far by each running request (e.g. to time a reload in a test)."""
        counts = (vllm_adapter.num_output_tokens(self.engine, r) for r in self._active)
        return [n for n in counts if n is not None]

    def shutdown(self) -> None:
        """Stop the engine's processes. Idempotent."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None  # AsyncLLM.__del__ runs now, not at interpreter exit (where it raises)
            gc.collect()
