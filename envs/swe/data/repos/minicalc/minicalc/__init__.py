"""minicalc: a tiny arithmetic expression calculator."""

from .evaluator import calc, evaluate
from .parser import BinOp, Neg, Num, ParseError, parse
from .tokenizer import Token, TokenizeError, tokenize

__all__ = [
    "BinOp",
    "Neg",
    "Num",
    "ParseError",
    "Token",
    "TokenizeError",
    "calc",
    "evaluate",
    "parse",
    "tokenize",
]
