from minicalc import BinOp, Num, calc, parse


def test_chained_subtraction():
    assert calc("8 - 3 - 2") == 3
    assert calc("10 - 1 - 1 - 1") == 7


def test_chained_division():
    assert calc("100 / 10 / 2") == 5
    assert calc("8 / 2 / 2 / 2") == 1


def test_mixed_addition_and_subtraction():
    assert calc("1 - 2 + 3") == 2
    assert calc("5 - 1 + 1") == 5


def test_mixed_multiplication_and_division():
    assert calc("8 / 4 * 2") == 4
    assert calc("12 / 3 * 2 / 4") == 2


def test_subtraction_tree_is_left_nested():
    assert parse("8 - 3 - 2") == BinOp(
        "-", BinOp("-", Num(8.0), Num(3.0)), Num(2.0)
    )


def test_chained_addition():
    assert calc("1 + 2 + 3 + 4") == 10


def test_chained_multiplication():
    assert calc("2 * 3 * 4") == 24


def test_negated_group():
    assert calc("-(2 + 3) * 2") == -10
    assert calc("2 - (3 - 1)") == 0
