"""Gymnasium spaces for text environments: the action is one string, an observation a list of messages.

Gymnasium's own `Text` space limits the alphabet, but a model may emit any Unicode, so these
spaces accept any string and sample printable ASCII (which is all `check_env` needs).
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
from gymnasium import spaces

ROLES = ("system", "user", "assistant", "tool", "raw")
_PRINTABLE = np.array(list(string.printable))


class TextSpace(spaces.Space[str]):
    """Any string of at most `max_length` characters: one model turn."""

    def __init__(self, max_length: int = 1_000_000, seed: int | np.random.Generator | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        length = int(self.np_random.integers(1, min(self.max_length, 64) + 1))
        return "".join(self.np_random.choice(_PRINTABLE, size=length))

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


def _plain(m: dict) -> bool:
    return set(m) == {"role", "content"} and m["role"] in ROLES and m["role"] != "raw" and isinstance(m["content"], str)


def _valid_message(m: dict) -> bool:
    """A message with a tool's name or a raw prompt's parts (`cwm_rl.types.Message` checks those)."""
    from pydantic import ValidationError

    from cwm_rl.types import Message

    try:
        Message.model_validate(m)
    except ValidationError:
        return False
    return True


class MessagesSpace(spaces.Space[list]):
    """A list of chat messages `{"role": ..., "content": ...}` (and `name`, `parts`, `stop` where a message has
    them: `cwm_rl.types.Message`): the new messages of one observation."""

    def __init__(self, max_messages: int = 1024, seed: int | np.random.Generator | None = None):
        self.max_messages = max_messages
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> list[dict[str, str]]:
        text = TextSpace(64, seed=int(self.np_random.integers(2**31))).sample()
        return [{"role": "user", "content": text}]

    def contains(self, x: Any) -> bool:
        return (
            isinstance(x, list)
            and len(x) <= self.max_messages
            and all(isinstance(m, dict) and (_plain(m) or _valid_message(m)) for m in x)
        )

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"MessagesSpace(max_messages={self.max_messages})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, MessagesSpace) and other.max_messages == self.max_messages
