"""textkit: small text helpers."""

from .counts import top_words, word_counts, words
from .slug import slugify
from .wrap import wrap

__all__ = ["slugify", "top_words", "word_counts", "words", "wrap"]
