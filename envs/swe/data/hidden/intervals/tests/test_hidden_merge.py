from intervals import Interval, intersect, merge


def test_merge_touching_pair():
    assert merge([(1, 3), (3, 5)]) == [Interval(1, 5)]


def test_merge_touching_chain_unsorted():
    assert merge([(2, 3), (0, 1), (1, 2)]) == [Interval(0, 3)]


def test_merge_result_has_no_touching_neighbours():
    result = merge([(0, 2), (4, 6), (2, 4), (9, 10)])
    assert result == [Interval(0, 6), Interval(9, 10)]
    assert all(a.end < b.start for a, b in zip(result, result[1:]))


def test_intersect_returns_merged_pieces():
    assert intersect([(0, 3), (3, 6)], [(1, 5)]) == [Interval(1, 5)]


def test_merge_keeps_separated_intervals():
    assert merge([(1, 3), (4, 6)]) == [Interval(1, 3), Interval(4, 6)]


def test_merge_identical_and_nested():
    assert merge([(1, 4), (1, 4), (2, 3)]) == [Interval(1, 4)]


def test_intersect_disjoint_touching_is_empty():
    assert intersect([(0, 3)], [(3, 5)]) == []
