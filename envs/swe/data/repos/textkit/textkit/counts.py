"""Word statistics."""

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text):
    """Return the lowercase words of ``text``, apostrophes kept inside words."""
    result = []
    for match in _WORD.findall(text):
        word = match.strip("'").lower()
        if word:
            result.append(word)
    return result


def word_counts(text):
    """Return a Counter of the words in ``text``."""
    return Counter(words(text))


def top_words(text, n=3):
    """Return the ``n`` most frequent words as (word, count) pairs.

    Ties are broken alphabetically so the result does not depend on the order
    in which words first appear.
    """
    counts = word_counts(text)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:n]
