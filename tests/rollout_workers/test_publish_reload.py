"""A version published by the trainer's WeightPublisher reloads into the real vLLM engine as it is."""

import pytest
import torch

from rollout_workers.config import SamplingConfig
from trainer.publish import WeightPublisher

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides, as in test_engine.py


async def test_published_weights_reload_into_the_engine(engine, tiny_model, transformers_logprobs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    publisher = WeightPublisher(tmp_path / "weights", base_model_dir=tiny_model)
    start_version = engine.version
    path = publisher.publish(start_version + 1, model.state_dict())

    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)
    try:
        await engine.update_weights(start_version + 1, str(path))
        gen = await engine.generate(prompt, SamplingConfig(max_tokens=16, temperature=0.0, ignore_eos=True))
        assert len(gen.token_ids) == 16 and set(gen.versions) == {start_version + 1}

        published = transformers_logprobs(path, prompt + gen.token_ids)[len(prompt) - 1:]
        worst = max(abs(ours - ref) for ours, ref in zip(gen.logprobs, published))
        assert worst < LOGPROB_TOLERANCE, f"vLLM logprobs differ from transformers on the published weights by {worst}"
        original = transformers_logprobs(tiny_model, prompt + gen.token_ids)[len(prompt) - 1:]
        changed = max(abs(ours - ref) for ours, ref in zip(gen.logprobs, original))
        assert changed > 100 * LOGPROB_TOLERANCE, "the engine still generates with the original weights"
    finally:
        await engine.update_weights(start_version + 2, str(tiny_model))  # back to the original weights
        publisher.close()
