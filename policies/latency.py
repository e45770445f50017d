"""A rolling window of observed latencies, for `hedge at pNN` and deadline-aware retries.

The window keeps the last `size` samples in a ring and, beside it, the same samples in
sorted order (maintained with `bisect`), so `record` is O(size) memmove at worst and a
percentile is an index lookup: no sorting on the hot path.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort


class LatencyWindow:
    """The last `size` latencies (seconds). Percentiles use the nearest-rank method."""

    __slots__ = ("size", "_ring", "_sorted", "_next", "total")

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise ValueError(f"latency window size must be at least 1, got {size}")
        self.size = size
        self._ring: list[float] = []
        self._sorted: list[float] = []
        self._next = 0  # ring slot to overwrite once full
        self.total = 0  # samples ever recorded (for warm-up rules)

    @property
    def count(self) -> int:
        """Samples currently in the window."""
        return len(self._ring)

    def record(self, seconds: float) -> None:
        """Add one latency. NaN is ignored; a negative value (clock skew) counts as 0."""
        if seconds != seconds:  # NaN would poison the sorted order
            return
        if seconds < 0.0:
            seconds = 0.0
        self.total += 1
        ring = self._ring
        if len(ring) < self.size:
            ring.append(seconds)
        else:
            i = self._next
            old = ring[i]
            ring[i] = seconds
            self._next = (i + 1) % self.size
            srt = self._sorted
            del srt[bisect_left(srt, old)]
        insort(self._sorted, seconds)

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile for `p` in 0..1 (0.95 = p95); None while empty."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"percentile must be within 0..1, got {p}")
        srt = self._sorted
        n = len(srt)
        if n == 0:
            return None
        rank = math.ceil(p * n - 1e-9)  # tolerate 0.95 * 20 = 18.999999...
        return srt[max(rank, 1) - 1]

    def median(self) -> float | None:
        """The median (mean of the two middle samples when the count is even)."""
        srt = self._sorted
        n = len(srt)
        if n == 0:
            return None
        mid = n // 2
        if n % 2:
            return srt[mid]
        return (srt[mid - 1] + srt[mid]) / 2.0

    def snapshot(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "total": self.total,
            "p50": self.median(),
            "p95": self.percentile(0.95),
            "p99": self.percentile(0.99),
        }
