"""Evaluate expression trees built by :mod:`minicalc.parser`."""

import operator

from .parser import BinOp, Neg, Num, parse

_OPS = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


def evaluate(node):
    """Return the value of an expression tree as a float."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Neg):
        return -evaluate(node.operand)
    if isinstance(node, BinOp):
        left = evaluate(node.left)
        right = evaluate(node.right)
        if node.op == "/" and right == 0:
            raise ZeroDivisionError("division by zero")
        return _OPS[node.op](left, right)
    raise TypeError(f"not an expression node: {node!r}")


def calc(text):
    """Evaluate ``text``; whole-number results are returned as ``int``."""
    result = evaluate(parse(text))
    if result.is_integer():
        return int(result)
    return result
