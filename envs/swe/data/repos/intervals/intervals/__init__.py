"""intervals: half-open integer intervals and set operations on them."""

from .interval import Interval, as_interval
from .ops import gaps, intersect, merge, total_length

__all__ = ["Interval", "as_interval", "gaps", "intersect", "merge", "total_length"]
