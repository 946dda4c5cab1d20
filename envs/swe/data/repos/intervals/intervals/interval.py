"""The Interval type."""

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Interval:
    """The integers ``start <= x < end``."""

    start: int
    end: int

    def __post_init__(self):
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")

    def __len__(self):
        return self.end - self.start

    def __contains__(self, x):
        return self.start <= x < self.end

    def is_empty(self):
        return self.start == self.end

    def overlaps(self, other):
        """True when the two intervals share at least one integer."""
        return self.start < other.end and other.start < self.end


def as_interval(value):
    """Accept an Interval or a ``(start, end)`` pair."""
    if isinstance(value, Interval):
        return value
    start, end = value
    return Interval(start, end)
