import pytest

from intervals import Interval, gaps, intersect, merge, total_length


def test_interval_basics():
    iv = Interval(2, 5)
    assert len(iv) == 3
    assert 2 in iv and 4 in iv and 5 not in iv
    assert Interval(3, 3).is_empty()
    with pytest.raises(ValueError):
        Interval(5, 2)


def test_merge_overlapping():
    assert merge([(1, 5), (3, 8)]) == [Interval(1, 8)]
    assert merge([(1, 10), (2, 3)]) == [Interval(1, 10)]


def test_merge_sorts_input():
    assert merge([(5, 8), (1, 3), (2, 4)]) == [Interval(1, 4), Interval(5, 8)]


def test_merge_drops_empty():
    assert merge([(4, 4), (1, 2)]) == [Interval(1, 2)]
    assert merge([]) == []


def test_intersect():
    assert intersect([(0, 10)], [(2, 3), (8, 12)]) == [Interval(2, 3), Interval(8, 10)]
    assert intersect([(0, 2)], [(5, 6)]) == []


def test_gaps():
    assert gaps([(2, 4), (6, 7)], (0, 10)) == [Interval(0, 2), Interval(4, 6), Interval(7, 10)]
    assert gaps([], (0, 3)) == [Interval(0, 3)]


def test_total_length():
    assert total_length([(0, 4), (2, 6)]) == 6
    assert total_length([(0, 1), (10, 12)]) == 3
