"""Refuse, before Ray and vLLM start, a job the model or the engine cannot run: one line, naming the key.

`check_engine_config(config, model_dir)` reads the model's config.json as plain JSON (no
transformers, torch or vLLM) and raises a ValueError when `rollout.engine.max_model_len` is
longer than the model's context (vLLM would refuse it at engine start, and Ray would restart the
worker for minutes), or when, on vLLM's CPU backend, the model's head size is one the CPU
attention kernels lack (the engine starts, then fails on its first generation), or when it would
compile the model on the CPU (`enforce_eager: false`) without a C++ compiler or Python.h. `setup_run`
calls it once the model directory is known. The checks that need no model (an unknown dtype,
`rollout.limits.max_total_tokens` over `max_model_len`) are `JobConfig`'s own. What only the
engine finds out (a KV cache too small, say) fails at engine start, once: the job waits for every
engine before its loop starts (`RolloutWorkers.start_engines`) and does not retry one that never started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cwm_rl.config import JobConfig

# Head sizes of vLLM 0.32's CPU attention (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes); tests/cwm_rl/loop/test_preflight.py pins them to the installed vLLM.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# The config.json keys vLLM reads the context from, the smallest found winning (model_max_length overrides them).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose max_position_embeddings already counts the scaling (vLLM applies no factor to them).
PRESCALED_ROPE_TYPES = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def check_engine_config(config: JobConfig, model_dir: Path) -> None:
    """A ValueError naming the key to change if the engine could not serve `model_dir` as configured."""
    path = Path(model_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model.path {model_dir}: cannot read its config.json ({e}); point model.path at a Hugging Face "
                         "model directory") from None
    text = hf.get("text_config") or hf  # a multimodal model's language model has its own config
    max_model_len = config.rollout.engine.max_model_len
    context = model_context(text)
    if context is not None and max_model_len > context[0] and not _long_context_allowed():
        limit, key = context
        raise ValueError(f"rollout.engine.max_model_len ({max_model_len}) is longer than the model's context ({key} {limit} "
                         f"in {path}): set rollout.engine.max_model_len <= {limit}")
    if not config.rollout.engine.enforce_eager and on_cpu_backend():
        missing = [what for what, found in (("a C++ compiler ($CXX, else g++)", cpp_compiler()), ("Python.h", python_headers()))
                   if not found]
        if missing:
            raise ValueError(f"rollout.engine.enforce_eager is false: vLLM compiles the model into C++ kernels on the CPU, and "
                             f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing here: install g++ and the "
                             "Python headers (`bash scripts/setup.sh` does), or set rollout.engine.enforce_eager=true")
    size = head_size(text)
    if size is not None and size not in CPU_ATTENTION_HEAD_SIZES and on_cpu_backend():
        raise ValueError(f"model.path {model_dir}: head size {size} is not one vLLM's CPU attention supports "
                         f"({', '.join(map(str, CPU_ATTENTION_HEAD_SIZES))}), so every generation would fail: use a model "
                         "with one of those head sizes (models made by cwm-rl have 64), or a GPU")


def model_context(hf: dict[str, Any]) -> tuple[int, str] | None:
    """(longest sequence, the key it comes from) as vLLM derives it from config.json; None if it names none."""
    found = [(hf[k], k) for k in CONTEXT_KEYS if isinstance(hf.get(k), int)]
    if not found:
        return None
    limit, key = (hf["model_max_length"], "model_max_length") if isinstance(hf.get("model_max_length"), int) else min(found)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    per_layer_type = [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []
    factors = [r["factor"] for r in (per_layer_type or [rope]) if isinstance(r, dict) and isinstance(r.get("factor"), int | float)
               and r.get("rope_type", r.get("type")) not in PRESCALED_ROPE_TYPES]
    if factors:  # RoPE scaling stretches the context (vLLM assumes one factor for every layer type)
        limit, key = int(limit * factors[0]), f"{key} x rope factor {factors[0]} ="
    return limit, key


def head_size(hf: dict[str, Any]) -> int | None:
    """The attention head size: `head_dim`, else hidden_size / num_attention_heads; None if neither is there."""
    if isinstance(hf.get("head_dim"), int):
        return hf["head_dim"]
    if isinstance(hf.get("hidden_size"), int) and isinstance(hf.get("num_attention_heads"), int) and hf["num_attention_heads"]:
        return hf["hidden_size"] // hf["num_attention_heads"]
    return None


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU kernels use ($CXX, else g++) if it is on PATH, else None."""
    import shutil

    return shutil.which(os.environ.get("CXX") or "g++")


def python_headers() -> bool:
    """Whether Python.h is there: Inductor's CPU kernels include it."""
    import sysconfig

    return (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


def on_cpu_backend() -> bool:
    """Whether vLLM runs on the CPU here (told so, or no CUDA device). Imports torch: only asked when it matters."""
    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def _long_context_allowed() -> bool:
    """vLLM's own escape hatch for a max_model_len past the model's context."""
    return os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")
