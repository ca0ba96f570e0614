"""A min-heap of deadlines, so that time costs O(log n) per due item, not O(n) per tick.

No I/O and no clock: callers push ``(due, item)`` and pop what is due at a
time they give.  Entries are never removed early; an item whose state changed
after it was pushed comes back as a *stale* entry, and the caller re-checks it
against the item's current state (lazy deletion).  Ties pop in push order.
"""

from __future__ import annotations

import heapq
import itertools


class Deadlines[T]:
    """Items keyed by the time they fall due (any unit, as long as it is consistent)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._pushes = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._pushes), item))

    def pop_due(self, now: float) -> list[T]:
        """Every item whose deadline is at or before ``now``, earliest first."""
        due: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    def clear(self) -> None:
        self._heap.clear()
