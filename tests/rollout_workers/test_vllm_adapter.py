"""The vLLM internals cwm-rl reads (`rollout_workers/vllm_adapter.py`), each run on the installed vLLM:
an upgrade that moves them fails here, by name, and the message says which release they were read from."""

import asyncio

import pytest

from rollout_workers import vllm_adapter
from rollout_workers.config import SamplingConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


def installed() -> str:
    import vllm

    return f"vLLM {vllm.__version__} installed; the adapter was written against {vllm_adapter.TESTED_VLLM}"


async def test_token_counts_of_running_requests_are_readable(process_engine):
    # drain_outputs is the engine-core-process path's; the in-process engine's reloads read the counts between steps
    # (its reload test, in test_engine.py, checks them through `in_flight` and the versions).
    engine = process_engine
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Count."}], tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    running = [asyncio.create_task(engine.generate(prompt, SamplingConfig(max_tokens=200, ignore_eos=True))) for _ in range(2)]
    try:
        for _ in range(2000):  # until both requests stream tokens
            ids = vllm_adapter.running_request_ids(engine.engine)
            counts = [vllm_adapter.num_output_tokens(engine.engine, r) for r in ids]
            if len(ids) == 2 and all(c and c > 3 for c in counts):
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError(f"running requests and their token counts never showed ({installed()}): {ids} {counts}")
        await vllm_adapter.drain_outputs(engine.engine)  # returns once the frontend has caught up
        later = [vllm_adapter.num_output_tokens(engine.engine, r) for r in ids]
        assert all(b >= a for a, b in zip(counts, later)), installed()
    finally:
        gens = await asyncio.gather(*running)
    assert all(len(g.token_ids) == 200 for g in gens)
    assert vllm_adapter.num_output_tokens(engine.engine, ids[0]) is None, f"a finished request still has state ({installed()})"
