"""Operations on lists of intervals."""

from .interval import Interval, as_interval


def merge(intervals):
    """Merge overlapping or adjacent intervals.

    Returns a sorted list of non-empty intervals in which no two intervals
    overlap or touch, covering exactly the same integers as the input.
    """
    merged = []
    for iv in sorted(as_interval(v) for v in intervals):
        if iv.is_empty():
            continue
        if merged and merged[-1].overlaps(iv):
            last = merged[-1]
            merged[-1] = Interval(last.start, max(last.end, iv.end))
        else:
            merged.append(iv)
    return merged


def intersect(a, b):
    """Return the integers in both ``a`` and ``b`` as a merged list."""
    left, right = merge(a), merge(b)
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        start = max(left[i].start, right[j].start)
        end = min(left[i].end, right[j].end)
        if start < end:
            result.append(Interval(start, end))
        if left[i].end < right[j].end:
            i += 1
        else:
            j += 1
    return result


def gaps(intervals, within):
    """Return the parts of ``within`` not covered by ``intervals``."""
    bounds = as_interval(within)
    result = []
    cursor = bounds.start
    for iv in merge(intervals):
        if iv.start > cursor:
            result.append(Interval(cursor, min(iv.start, bounds.end)))
        cursor = max(cursor, iv.end)
        if cursor >= bounds.end:
            break
    if cursor < bounds.end:
        result.append(Interval(cursor, bounds.end))
    return result


def total_length(intervals):
    """Return how many integers the intervals cover together."""
    return sum(len(iv) for iv in merge(intervals))
