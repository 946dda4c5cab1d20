"""`init_model`: make a model with random weights and its tokenizer, in Hugging Face format, locally.

    cwm-rl model init --out models/tiny                    # CWM architecture, tiny preset
    cwm-rl model init --out models/small --preset small --arch qwen2 --seed 1
    cwm-rl model init --out models/tiny-cwm --tokenizer cwm   # CWM's chat template and special tokens

Writes config.json, generation_config.json (stops on `<|im_end|>`; with `--tokenizer cwm`, on
`<|eot_id|>` and `<|end_of_text|>`), model.safetensors and the tokenizer files (with the chat template)
into one directory that transformers (`AutoModelForCausalLM` / `AutoTokenizer`) and vLLM load as they are. The same seed gives the
same tokenizer and the same weights, byte for byte.
"""

from __future__ import annotations

import math
from pathlib import Path

from cwm_rl.models.presets import ARCHS, get_preset
from cwm_rl.models.tokenizer import tokenizer_format, train_tokenizer


def init_model(out_dir: str | Path, preset: str = "tiny", arch: str = "cwm", seed: int = 0, force: bool = False,
               tokenizer: str = "default") -> Path:
    """Train the tokenizer (`default` or `cwm`), build a randomly initialised model and save both to `out_dir`; returns it."""
    out = Path(out_dir)
    spec = get_preset(preset)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    fmt = tokenizer_format(tokenizer)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; pick another directory or pass --force to overwrite")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    from cwm_rl.models.presets import build_config

    tok = train_tokenizer(seed=seed, model_max_length=spec.max_position_embeddings, kind=tokenizer)
    stop = [tok.convert_tokens_to_ids(t) for t in fmt.stop]
    ids = {"bos": tok.convert_tokens_to_ids(fmt.bos), "eos": stop[0] if len(stop) == 1 else stop,
           "pad": tok.convert_tokens_to_ids(fmt.pad)}
    config = build_config(spec, arch, len(tok), ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    out.mkdir(parents=True, exist_ok=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise in a one-line command
    try:
        model.save_pretrained(out)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(out)
    return out


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters in a saved model's safetensors files (read from their headers, no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, "np") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total
