"""THE ONE PLACE cwm-rl reads vLLM internals. Everything else uses vLLM's public API.

In-flight reloads must know how many tokens each running request has when the weights change
(those tokens belong to the old version), and vLLM exposes no public call for that. These
helpers read it from vLLM's output processor and engine-core client, attributes that are not
part of vLLM's API and may move in any release. They were written against vLLM 0.32.0
(`TESTED_VLLM`); `tests/rollout_workers/test_vllm_adapter.py` runs each one on the installed
vLLM (`executor_env` and `executor_backend`: `test_engine.py`, on its shared engine), so an
upgrade that moves them fails there, by name, not somewhere deep in a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

TESTED_VLLM = "0.32.0"  # the vLLM release these internals were read from


def num_output_tokens(async_llm: Any, request_id: str) -> int | None:
    """Tokens the frontend has received so far for `request_id` (vLLM's internal id, of an AsyncLLM's or an
    in-process LLMEngine's request), or None once the request is finished (its state is gone)."""
    state = async_llm.output_processor.request_states.get(request_id)
    return None if state is None else state.detokenizer.num_output_tokens()


def running_request_ids(async_llm: Any) -> list[str]:
    """Ids of the requests the frontend still tracks (running or waiting)."""
    return list(async_llm.output_processor.request_states)


async def drain_outputs(async_llm: Any, max_wait_s: float = 1.0) -> None:
    """Let the frontend process every output a paused engine already sent, so the token counts
    read next are final (the engine core pushes outputs into a queue the frontend reads)."""
    queue = async_llm.engine_core.outputs_queue
    for _ in range(int(max_wait_s / 0.001)):
        if queue.empty():
            break
        await asyncio.sleep(0.001)
    for _ in range(3):  # the output handler task may hold one batch it took before the queue emptied
        await asyncio.sleep(0)


@contextlib.contextmanager
def executor_env(backend: str | None):
    """The environment for starting an engine with `backend`: vLLM's CPU platform turns the "uni" executor (the model
    in the engine-core process) into "mp" (a worker process of its own) unless VLLM_ENABLE_V1_MULTIPROCESSING is 0.
    That variable also makes an offline `vllm.LLM` run its engine core in-process, so it is set only while an AsyncLLM
    (whose engine core is always a process of its own) starts, and its engine-core process inherits it."""
    if backend != "uni":
        yield
        return
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before


def start_in_process(engine_args: dict[str, Any]) -> Any:
    """vLLM's `LLMEngine` with its engine core and the model in this process (the uni executor, no engine-core process).
    vLLM's engine core caches its environment variables for the whole process when it starts (`enable_envs_cache`),
    VLLM_ENABLE_V1_MULTIPROCESSING=0 included; the cache is dropped after the start, so a later engine in the process
    reads the environment again."""
    import vllm.envs
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    with executor_env("uni"):
        try:
            return LLMEngine.from_engine_args(EngineArgs(**engine_args), enable_multiprocessing=False)
        finally:
            vllm.envs.disable_envs_cache()


def shutdown_in_process(llm_engine: Any) -> None:
    """Stop an in-process `LLMEngine` (its engine core and model executor) now, and undo what its start did to the
    process: the model executor initialised torch.distributed's default process group (world size 1, gloo), which would
    refuse a trainer's or another engine's `init_process_group` later in the same process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


def executor_backend(async_llm: Any) -> str:
    """The executor an AsyncLLM ended up with ("uni" or "mp")."""
    return async_llm.vllm_config.parallel_config.distributed_executor_backend


def shutdown_offline_llm(llm: Any) -> None:
    """Stop the engine-core processes of an offline `vllm.LLM` now (its own teardown runs at
    interpreter exit, too late for a test or a benchmark that starts another engine)."""
    llm.llm_engine.engine_core.shutdown()
