"""Split an expression string into tokens."""

from dataclasses import dataclass

OPERATORS = "+-*/"


class TokenizeError(ValueError):
    """Raised when the input contains something that is not a token."""


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "op", "lparen" or "rparen"
    value: str
    pos: int


def tokenize(text):
    """Return the list of tokens in ``text``; whitespace is skipped."""
    tokens = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch.isdigit() or ch == ".":
            start = i
            while i < n and (text[i].isdigit() or text[i] == "."):
                i += 1
            literal = text[start:i]
            if literal == "." or literal.count(".") > 1:
                raise TokenizeError(f"bad number {literal!r} at {start}")
            tokens.append(Token("num", literal, start))
            continue
        if ch in OPERATORS:
            tokens.append(Token("op", ch, i))
        elif ch == "(":
            tokens.append(Token("lparen", ch, i))
        elif ch == ")":
            tokens.append(Token("rparen", ch, i))
        else:
            raise TokenizeError(f"unexpected character {ch!r} at {i}")
        i += 1
    return tokens
