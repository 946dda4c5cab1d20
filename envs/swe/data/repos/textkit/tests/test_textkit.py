import pytest

from textkit import slugify, top_words, word_counts, words, wrap


def test_slugify_simple():
    assert slugify("Hello World") == "hello-world"
    assert slugify("Python 3 11") == "python-3-11"


def test_slugify_drops_accents():
    assert slugify("Crème Brûlée") == "creme-brulee"


def test_slugify_custom_separator():
    assert slugify("Hello World", sep="_") == "hello_world"


def test_wrap_greedy():
    assert wrap("the quick brown fox", 9) == ["the quick", "brown fox"]
    assert wrap("the quick brown fox", 100) == ["the quick brown fox"]


def test_wrap_long_word_and_whitespace():
    assert wrap("a\n  supercalifragilistic  b", 5) == ["a", "supercalifragilistic", "b"]
    assert wrap("   ", 5) == []
    with pytest.raises(ValueError):
        wrap("x", 0)


def test_words_and_counts():
    assert words("Don't stop, 'til it's done!") == ["don't", "stop", "til", "it's", "done"]
    assert word_counts("a A b") == {"a": 2, "b": 1}


def test_top_words_tie_break():
    assert top_words("b a c a b", 2) == [("a", 2), ("b", 2)]
