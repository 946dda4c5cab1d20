"""Recursive-descent parser producing a small expression tree.

Grammar::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := "-" factor | NUMBER | "(" expr ")"
"""

from dataclasses import dataclass

from .tokenizer import tokenize


class ParseError(ValueError):
    """Raised when the tokens do not form a valid expression."""


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Neg:
    operand: object


@dataclass(frozen=True)
class BinOp:
    op: str
    left: object
    right: object


class _Parser:
    def __init__(self, tokens):
        self.tokens = tokens
        self.pos = 0

    def peek(self):
        if self.pos < len(self.tokens):
            return self.tokens[self.pos]
        return None

    def advance(self):
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end of input")
        self.pos += 1
        return tok

    def at_op(self, ops):
        tok = self.peek()
        return tok is not None and tok.kind == "op" and tok.value in ops

    def expr(self):
        node = self.term()
        while self.at_op("+-"):
            op = self.advance().value
            node = BinOp(op, node, self.term())
        return node

    def term(self):
        node = self.factor()
        while self.at_op("*/"):
            op = self.advance().value
            node = BinOp(op, node, self.factor())
        return node

    def factor(self):
        tok = self.advance()
        if tok.kind == "op" and tok.value == "-":
            return Neg(self.factor())
        if tok.kind == "num":
            return Num(float(tok.value))
        if tok.kind == "lparen":
            node = self.expr()
            closing = self.advance()
            if closing.kind != "rparen":
                raise ParseError(f"expected ')' at {closing.pos}")
            return node
        raise ParseError(f"unexpected {tok.value!r} at {tok.pos}")


def parse(text):
    """Parse ``text`` (a string or a list of tokens) into a tree."""
    tokens = tokenize(text) if isinstance(text, str) else list(text)
    if not tokens:
        raise ParseError("empty expression")
    parser = _Parser(tokens)
    node = parser.expr()
    extra = parser.peek()
    if extra is not None:
        raise ParseError(f"unexpected {extra.value!r} at {extra.pos}")
    return node
