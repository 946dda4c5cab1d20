"""Tokenise a raw prompt: messages of role `raw`, given as text and special-token parts (no chat template).

A format such as CWM's execution traces is not a chat: its prompt is a token sequence with special
tokens between pieces of text (`envs/trace/cwm_format.py`). An env sends it as one message
`{"role": "raw", "content": ..., "parts": [{"token": "<|begin_of_text|>"}, {"text": "def f(x): ..."}, ...],
"stop": ["<|frame_sep|>"]}`. Each special token goes in as its id, looked up by name in the model's
vocabulary; text is tokenised with `split_special_tokens=True`, so a special token's name inside the
source (`s = "<|frame_sep|>"`) stays text and cannot forge a frame. `stop` names the tokens that end
the model's turn (added to the request's stop ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class RawPromptError(ValueError):
    """A raw prompt the model's tokenizer cannot encode (a special token it lacks), or mixed with chat messages."""


def is_raw(messages: Sequence[dict[str, Any]]) -> bool:
    """True when every message is raw, False when none is; mixing the two is an error."""
    raw = [m.get("role") == "raw" for m in messages]
    if any(raw) and not all(raw):
        raise RawPromptError("an observation mixes raw messages (token parts) with chat messages; an env sends one kind "
                             "at a time")
    return bool(raw) and all(raw)


def special_token_id(tokenizer: Any, name: str) -> int:
    """The id of special token `name` in the model's vocabulary, or a RawPromptError that says what to do."""
    token_id = tokenizer.convert_tokens_to_ids(name)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != name:
        raise RawPromptError(f"the prompt uses the special token {name} and the model's tokenizer has no such token: use a "
                             "model that speaks this format (a CWM checkpoint, or `cwm-rl model init --tokenizer cwm`), "
                             "or the env's text format (e.g. Trace-v0 format='text')")
    return token_id


def encode_raw(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(token ids of the raw messages' parts in order, ids of their stop tokens)."""
    ids: list[int] = []
    for message in messages:
        for part in message["parts"]:
            if "token" in part and part["token"] is not None:
                ids.append(special_token_id(tokenizer, part["token"]))
            elif part.get("text"):
                ids += tokenizer.encode(part["text"], add_special_tokens=False, split_special_tokens=True)
    return ids, stop_token_ids(tokenizer, messages)


def stop_token_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The ids of the special tokens the raw messages name in `stop` (their parts are not tokenised)."""
    return sorted({special_token_id(tokenizer, name) for message in messages for name in message.get("stop", []) if name})
