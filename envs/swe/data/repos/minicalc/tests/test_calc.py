import pytest

from minicalc import ParseError, Token, TokenizeError, calc, tokenize


def test_tokenize_basic():
    assert tokenize("12 + 3.5") == [
        Token("num", "12", 0),
        Token("op", "+", 3),
        Token("num", "3.5", 5),
    ]


def test_tokenize_rejects_unknown_character():
    with pytest.raises(TokenizeError):
        tokenize("2 $ 3")


def test_precedence():
    assert calc("2 + 3 * 4") == 14
    assert calc("2 * 3 + 4") == 10


def test_parentheses():
    assert calc("(1 + 2) * 3") == 9
    assert calc("(1 + 2) / 4") == 0.75


def test_unary_minus():
    assert calc("-3 + 5") == 2
    assert calc("2 * -4") == -8


def test_simple_subtraction_and_division():
    assert calc("10 - 4") == 6
    assert calc("7 / 2") == 3.5


def test_incomplete_expression():
    with pytest.raises(ParseError):
        calc("1 +")
    with pytest.raises(ParseError):
        calc("(1 + 2")


def test_division_by_zero():
    with pytest.raises(ZeroDivisionError):
        calc("1 / (2 - 2)")
