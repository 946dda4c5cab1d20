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

On the CPU (`EngineConfig` fields): `executor="inproc"` runs vLLM's engine core and the model in this
process (vLLM's `LLMEngine`, stepped by a thread that owns it: `_EngineThread`), so no engine step's outputs
are serialised between processes (`executor="auto"` is this on a CPU); `executor="uni"` keeps the model in
vLLM's engine-core process (an `AsyncLLM`, the path "mp" and a GPU's "auto" take too); `block_size` sets the KV-cache block prefix caching
reuses, and `cwm_as_llama` (on by default) runs a CwmForCausalLM checkpoint with vLLM's own Llama code
rather than its Transformers backend. Both paths keep the same reload protocol and version bookkeeping;
in-process, a reload runs between two engine steps, so it needs no pause.

Scripts that create an engine need an `if __name__ == "__main__":` guard: vLLM starts its
engine-core and worker processes with multiprocessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import queue
import threading
from collections.abc import Callable
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


def resolved_executor(executor: str) -> str:
    """The executor "auto" stands for: on a CPU, "inproc" (no engine step's outputs serialised between processes: 1.4x
    the tokens/s on 0.6x the CPU per token of an engine-core process, on 2 cores); on a GPU, vLLM's own choice (an
    engine-core process, whose frontend's Python overlaps the GPU's work)."""
    if executor != "auto":
        return executor
    from vllm.platforms import current_platform

    return "inproc" if current_platform.is_cpu() else "auto"


def _sampled_logprobs(completion: Any) -> list[float]:
    """The sampled token's logprob at each position, from vLLM's FlatLogprobs: with logprobs=0 each position holds
    only the sampled token, so the flat lists line up with the tokens; otherwise it is read position by position."""
    flat = completion.logprobs
    if list(flat.token_ids) == list(completion.token_ids):
        return list(flat.logprobs)
    return [position[token].logprob for token, position in zip(completion.token_ids, flat)]


class RolloutEngine:
    """A vLLM engine (an AsyncLLM, or an in-process LLMEngine with executor "inproc") plus the bookkeeping RL needs:
    versions per token and in-flight reloads."""

    def __init__(self, config: EngineConfig, version: int = 0):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if config.model is None:
            raise ValueError("EngineConfig.model is not set: name the Hugging Face model directory the engine should load")
        self.config = config
        self._thread: _EngineThread | None = None  # the thread stepping an in-process engine (executor "inproc")
        self._version = version
        self._ids = itertools.count()
        self.executor = resolved_executor(config.executor)
        chosen: dict[str, Any] = {}
        if self.executor != "auto":
            chosen["distributed_executor_backend"] = "uni" if self.executor == "inproc" else self.executor
        if config.block_size is not None:
            chosen["block_size"] = config.block_size
        if config.cwm_as_llama and not {"hf_overrides", "model_impl"} & config.extra_engine_args.keys():
            chosen.update(cwm_as_llama_args(config.model))
        engine_args = {
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
        }
        if self.executor == "inproc":  # vLLM's engine core in this process, stepped by a thread of ours
            # A reload between two steps must find no batch still running on the old weights (a GPU schedules ahead).
            engine_args = {"async_scheduling": False, **engine_args}
            self._thread = _EngineThread(lambda: vllm_adapter.start_in_process(engine_args), version)
            self.engine = self._thread.engine
            return
        args = AsyncEngineArgs(**engine_args)
        with vllm_adapter.executor_env(args.distributed_executor_backend):
            self.engine = AsyncLLM.from_engine_args(args)
        self._active: dict[str, list[tuple[int, int]]] = {}  # engine request id -> reloads seen while it ran
        self._reload_lock = asyncio.Lock()

    @property
    def version(self) -> int:
        """The policy version of the weights loaded now: tokens sampled from here on carry it."""
        return self._thread.version if self._thread is not None else self._version

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
        if self._thread is not None:
            return await self._thread.generate(request_id, prompt_token_ids, params)
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
        return _generation(output, start_version, reloads)

    async def update_weights(self, version: int, path: str) -> None:
        """Reload the published checkpoint at `path` in place; later tokens carry `version`."""
        if self._thread is not None:
            await self._thread.update_weights(version, path, clear_cache=not self.config.keep_kv_cache_on_reload)
            return
        async with self._reload_lock:
            await self.engine.pause_generation(mode="keep", clear_cache=not self.config.keep_kv_cache_on_reload)
            try:
                await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
                await vllm_adapter.drain_outputs(self.engine)  # the old-weight tokens are all counted
                for request_id, reloads in self._active.items():
                    num_tokens = vllm_adapter.num_output_tokens(self.engine, request_id)
                    if num_tokens is not None:  # None: it finished on the old weights
                        reloads.append((num_tokens, version))
                self._version = version
            finally:
                await self.engine.resume_generation()

    def in_flight(self) -> list[int]:
        """Tokens generated so far by each running request (e.g. to time a reload in a test)."""
        active = self._thread.running_ids() if self._thread is not None else list(self._active)
        counts = (vllm_adapter.num_output_tokens(self.engine, r) for r in active)
        return [n for n in counts if n is not None]

    def shutdown(self, process_exits: bool = False) -> None:
        """Stop the engine (its thread or its processes). Idempotent. `process_exits`: this process ends right after (a
        Ray actor's close), so an in-process engine only stops stepping and is kept as it is: its teardown would undo
        what its start did to the process, in 1-2 s of garbage collection a job's close waited for. A stopped engine
        cannot be released later."""
        if self._thread is not None:  # kept, stopped: later calls get its "the vLLM engine stopped" error
            self._thread.stop(release=not process_exits)
        elif self.engine is not None:
            self.engine.shutdown()
        self.engine = None  # the engine's __del__ runs now, not at interpreter exit (where AsyncLLM's raises)
        if not (process_exits and self._thread is not None):
            gc.collect()


def _generation(output: Any, start_version: int, reloads: list[tuple[int, int]]) -> Generation:
    """A finished request's Generation: its tokens carry `start_version`, then each reload's version from the token count
    the reload saw on."""
    completion = output.outputs[0]
    versions = [start_version] * len(completion.token_ids)
    for num_before, version in reloads:
        versions[num_before:] = [version] * (len(versions) - num_before)
    return Generation(token_ids=list(completion.token_ids), logprobs=_sampled_logprobs(completion), versions=versions,
                      finish_reason=completion.finish_reason or "abort")


@dataclass
class _Request:
    """A request the engine thread runs: where its Generation goes, the version it started under, its reloads."""

    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    internal_id: str  # vLLM's own id for it (the external one plus a random suffix)
    start_version: int
    reloads: list[tuple[int, int]] = field(default_factory=list)


_KEPT_UNTIL_EXIT: list[Any] = []  # in-process engines stopped without their teardown (`RolloutEngine.shutdown`)


class _EngineThread:
    """vLLM's `LLMEngine` in this process, owned by one thread that starts it, adds requests, steps it and reloads its
    weights (executor "inproc"). Nothing crosses a process boundary: with an engine-core process, every engine step's
    outputs (a token and a logprob array per running request) are serialised, sent and decoded, which on a CPU with few
    cores cost about a third of the rollout side's CPU per token. A reload runs between two steps, so the token counts it
    records per request are exact. Callers on an asyncio loop hand the thread commands and await their results."""

    def __init__(self, start: Callable[[], Any], version: int, stop: Callable[[Any], None] = vllm_adapter.shutdown_in_process):
        self.version = version
        self._stop_engine = stop  # shuts the engine down and frees what its start took from the process
        self.engine: Any = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, _Request] = {}  # our request id -> its state (only the thread touches it)
        self._stopping = False
        self._failure: BaseException | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, started), name="vllm-engine", daemon=True)
        self._thread.start()
        started.wait()
        if self.engine is None:
            raise self._failure or RuntimeError("the vLLM engine did not start")

    # -- called from the caller's event loop ------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: Any) -> Generation:
        from vllm.inputs import TokensPrompt

        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def add() -> None:
            # Salted with the version it starts under: a prefix cached under older weights is never reused.
            prompt = TokensPrompt(prompt_token_ids=prompt_token_ids, cache_salt=f"v{self.version}")
            internal_id = self.engine.add_request(request_id, prompt, params)
            self._active[request_id] = _Request(loop, done, internal_id, self.version)

        self._send(add, loop, done)
        try:
            return await done
        except asyncio.CancelledError:
            if self._failure is None:
                aborted = loop.create_future()
                aborted.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it
                with contextlib.suppress(RuntimeError):  # the engine stopped meanwhile: nothing to abort
                    self._send(lambda: self._abort(request_id), loop, aborted)
            raise

    async def update_weights(self, version: int, path: str, clear_cache: bool) -> None:
        """Reload between two engine steps. Once sent it happens: cancelling the caller does not undo it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def reload() -> None:
            if clear_cache:  # running requests recompute their prefixes with the new weights (a text model's caches)
                self.engine.reset_prefix_cache(reset_running_requests=True, reset_connector=True)
            self.engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
            for request in self._active.values():
                num_tokens = vllm_adapter.num_output_tokens(self.engine, request.internal_id)
                if num_tokens is not None:
                    request.reloads.append((num_tokens, version))
            self.version = version
            _resolve(loop, done)

        self._send(reload, loop, done)
        await done

    def running_ids(self) -> list[str]:
        """vLLM's ids of the requests running now (read from another thread: a snapshot)."""
        return [r.internal_id for r in list(self._active.values())]

    def stop(self, release: bool = True) -> None:
        """Stop the engine; requests still waiting get an error. Idempotent. Blocks for up to one engine step.
        `release`: also shut the engine down and free what its start took from the process (see `RolloutEngine.shutdown`)."""
        if not release:  # the process exits right after: keep the engine (freed, its finalizer would tear it down)
            self._stop_engine = _KEPT_UNTIL_EXIT.append
        self._stopping = True
        self._commands.put(None)  # wakes the thread if it waits for work
        self._thread.join()

    def _send(self, command: Callable[[], None], loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        """Run `command` on the engine thread. It settles `done` (a future of `loop`) itself when it succeeds; if it
        raises, or the engine stops first, the error goes to `done`."""
        if self._failure is not None:
            raise RuntimeError(f"the vLLM engine stopped: {self._failure}") from self._failure
        self._commands.put((command, loop, done))
        if self._failure is not None:  # it stopped meanwhile, maybe after its last look at the queue
            self._drain_failed()

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self, start: Callable[[], Any], started: threading.Event) -> None:
        try:
            self.engine = start()
        except BaseException as e:  # noqa: BLE001 (reported to the caller waiting in __init__)
            self._failure = e
            return
        finally:
            started.set()
        try:
            while not self._stopping:
                self._run_commands(block=not self.engine.has_unfinished_requests())
                if self._stopping or not self.engine.has_unfinished_requests():
                    continue
                finished: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Generation]]] = {}
                for output in self.engine.step():  # FINAL_ONLY: finished requests only
                    if not output.finished or output.request_id not in self._active:
                        continue
                    request = self._active.pop(output.request_id)
                    try:
                        generation = _generation(output, request.start_version, request.reloads)
                    except Exception as e:  # noqa: BLE001 (this request's error, not the engine's)
                        _resolve(request.loop, request.done, e)
                        continue
                    finished.setdefault(request.loop, []).append((request.done, generation))
                for loop, results in finished.items():  # one wake-up of the caller's loop per step
                    _settle_all(loop, results)
        except BaseException as e:  # noqa: BLE001 (every waiting request learns why)
            self._failure = e
        finally:
            self._failure = self._failure or RuntimeError("the vLLM engine was shut down")
            for request in self._active.values():
                _resolve(request.loop, request.done, self._failure)
            self._active.clear()
            self._drain_failed()
            engine, self.engine = self.engine, None
            self._stop_engine(engine)

    def _run_commands(self, block: bool) -> None:
        """Run every queued command; with `block`, wait for the first (the engine has nothing to step)."""
        try:
            item = self._commands.get(block=block)
            while True:
                if item is not None:
                    command, loop, done = item
                    try:
                        command()
                    except BaseException as e:  # noqa: BLE001 (the caller's error; the engine's too if not an Exception)
                        _resolve(loop, done, e)
                        if not isinstance(e, Exception):
                            raise
                item = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _abort(self, request_id: str) -> None:
        if self._active.pop(request_id, None) is not None:
            self.engine.abort_request([request_id])

    def _drain_failed(self) -> None:
        """Commands queued after the engine stopped: their callers get the reason instead of waiting forever."""
        error = RuntimeError(f"the vLLM engine stopped: {self._failure}")
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _resolve(item[1], item[2], error)


def _resolve(loop: asyncio.AbstractEventLoop, done: asyncio.Future, error: BaseException | None = None) -> None:
    """Settle one future of `loop` from another thread: with `error`, or with None."""
    _settle_all(loop, [(done, None)], error)


def _settle_all(loop: asyncio.AbstractEventLoop, results: list[tuple[asyncio.Future, Any]],
                error: BaseException | None = None) -> None:
    """Settle futures of `loop` from another thread, in one call: each with its value, or all with `error`."""
    def settle() -> None:
        for done, value in results:
            if done.done():
                continue  # cancelled meanwhile
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody waits
