"""Model size presets for locally made models, and the transformers config each one builds.

| preset | layers (sliding + global) | hidden | heads x dim (kv heads) | MLP | context |
|--------|---------------------------|--------|------------------------|-----|---------|
| tiny   | 4 (3 + 1)                 | 128    | 2 x 64 (1)             | 256 | 2048    |
| small  | 6 (4 + 2)                 | 256    | 4 x 64 (2)             | 768 | 4096    |

Both use the same tokenizer (`cwm_rl.models.tokenizer`, about 1,010 ids; `--tokenizer cwm`: 1,024),
and exactly as many embedding rows: an untrained model samples any row, and every id must decode.

Head dim is 64 everywhere: vLLM's CPU attention rejects some sizes (16, for one). RoPE is
plain (no long-context scaling) so its limits fit `max_position_embeddings`, and every special
token id is inside the vocabulary, so transformers loads these models without warnings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Arch = Literal["cwm", "qwen2"]
ARCHS: tuple[str, ...] = ("cwm", "qwen2")
HEAD_DIM = 64


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of one preset; `num_sliding_per_global` sliding-window layers come before each global one (CWM only)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    sliding_window: int
    num_sliding_per_global: int = 3
    rope_theta: float = 10_000.0

    def layer_types(self) -> list[str]:
        period = self.num_sliding_per_global + 1
        return ["full_attention" if i % period == self.num_sliding_per_global else "sliding_attention"
                for i in range(self.num_layers)]


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset("tiny", num_layers=4, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256,
                        max_position_embeddings=2048, sliding_window=128),
    "small": ModelPreset("small", num_layers=6, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=768,
                         max_position_embeddings=4096, sliding_window=256, num_sliding_per_global=2),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_config(preset: ModelPreset, arch: str, vocab_size: int, special_ids: dict[str, int | list[int]]) -> PretrainedConfig:
    """The transformers config for `preset` in architecture `arch`.

    `vocab_size` is the tokenizer's length (not rounded up: no row without a token); `special_ids`
    maps "bos", "eos" (the end-of-turn token, or a list of every token generation stops on) and "pad" to token ids.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if preset.hidden_size != preset.num_heads * HEAD_DIM:
        raise ValueError(f"preset {preset.name!r}: hidden_size must be num_heads * {HEAD_DIM}")
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"],
        tie_word_embeddings=False,  # like CWM; a separate lm_head keeps weight publishing plain
        dtype="float32",
    )
    if arch == "cwm":
        from transformers import CwmConfig

        return CwmConfig(**common, head_dim=HEAD_DIM, sliding_window=preset.sliding_window,
                         layer_types=preset.layer_types())
    from transformers import Qwen2Config

    return Qwen2Config(**common, use_sliding_window=False)  # Qwen2's head dim is hidden / heads = 64
