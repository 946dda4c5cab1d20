"""A seeded generator of small Python functions to trace, at four levels:

1. straight-line arithmetic (+ and -)      2. branches      3. loops      4. string and list operations

Each program is one function `f` with its arguments; level 1 is easy enough for a tiny model to
learn on a CPU. The reference (return value, printed output, trace) comes from running the
program under the tracer in the sandbox, not from this module.
"""

from __future__ import annotations

import numpy as np

LEVELS = (1, 2, 3, 4)


def _n(rng: np.random.Generator, lo: int = 1, hi: int = 10) -> int:
    return int(rng.integers(lo, hi))


def straight_line(rng: np.random.Generator) -> tuple[str, list]:
    a, b, c = _n(rng), _n(rng), _n(rng)
    op1, op2 = rng.choice(["+", "-"], size=2)  # additive only: small numbers a tiny model can learn
    source = f"def f(x):\n    y = x {op1} {a}\n    z = y {op2} {b}\n    return z + {c}\n"
    return source, [_n(rng, 0, 20)]


def branches(rng: np.random.Generator) -> tuple[str, list]:
    t, a, b = _n(rng, 3, 15), _n(rng), _n(rng)
    cmp = rng.choice(["<", ">", "=="])
    source = (f"def f(x):\n    if x {cmp} {t}:\n        y = x + {a}\n    else:\n        y = x - {b}\n"
              f"    if y % 2 == 0:\n        y = y // 2\n    return y\n")
    return source, [_n(rng, 0, 20)]


def loops(rng: np.random.Generator) -> tuple[str, list]:
    k = _n(rng, 1, 4)
    op = rng.choice(["+", "*"])
    init = 0 if op == "+" else 1
    source = (f"def f(n):\n    acc = {init}\n    for i in range(1, n + 1):\n        acc = acc {op} i\n"
              f"        if acc > 50:\n            acc = acc - {k * 10}\n    return acc\n")
    return source, [_n(rng, 1, 6)]


def strings_and_lists(rng: np.random.Generator) -> tuple[str, list]:
    words = ["cat", "dog", "sun", "tree", "code", "loop", "byte", "moon"]
    picked = [str(w) for w in rng.choice(words, size=_n(rng, 2, 4), replace=False)]
    variant = int(rng.integers(3))
    if variant == 0:
        source = ("def f(words):\n    out = []\n    for w in words:\n        out.append(w[::-1])\n"
                  "    return '-'.join(out)\n")
    elif variant == 1:
        source = ("def f(words):\n    lengths = [len(w) for w in words]\n    total = sum(lengths)\n"
                  "    longest = max(words, key=len)\n    return longest.upper() + str(total)\n")
    else:
        source = ("def f(words):\n    counts = {}\n    for w in words:\n        first = w[0]\n"
                  "        counts[first] = counts.get(first, 0) + 1\n    print(len(counts))\n    return sorted(counts)\n")
    return source, [picked]


GENERATORS = {1: straight_line, 2: branches, 3: loops, 4: strings_and_lists}


def generate_program(rng: np.random.Generator, level: int) -> tuple[str, str, list]:
    """(source, function name, args) of one program at `level`."""
    if level not in GENERATORS:
        raise ValueError(f"difficulty must be one of {list(LEVELS)}, got {level!r}")
    source, args = GENERATORS[level](rng)
    return source, "f", args
