"""Runs locust-style users (:mod:`bench.users`) for a bounded time and request count.

``users`` simulated people are spread over the user classes by their ``weight``
(largest remainder, every class at least one), started together, and stopped
at the deadline or once ``max_requests`` calls were started, whichever comes
first.  Each user picks its next task by weight after its think time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from bench.users import CallStats, User


@dataclass(frozen=True, slots=True)
class Swarm:
    classes: Sequence[Callable[[CallStats], User]]  # user factories (class + shared context)
    weights: Sequence[int]
    users: int
    seconds: float
    max_requests: int


def spread(users: int, weights: Sequence[int]) -> list[int]:
    """How many users of each class: proportional to ``weights``, each at least one."""
    total = sum(weights)
    counts = [max(1, users * w // total) for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: -(users * weights[i] % total))
    for i in by_remainder[: max(0, users - sum(counts))]:
        counts[i] += 1
    return counts


async def run_swarm(swarm: Swarm) -> tuple[CallStats, float]:
    """Run ``swarm``; every call's tally and the elapsed wall-clock seconds."""
    stats = CallStats()
    started = time.perf_counter()
    with trio.move_on_after(swarm.seconds):
        async with trio.open_nursery() as nursery:
            for make, count in zip(swarm.classes, spread(swarm.users, swarm.weights), strict=True):
                for _ in range(count):
                    nursery.start_soon(_live, make(stats), swarm.max_requests, stats)
    return stats, time.perf_counter() - started


def _started(stats: CallStats) -> int:
    return sum(t.started for t in stats.tallies.values())


async def _live(user: User, max_requests: int, stats: CallStats) -> None:
    tasks = user.tasks()
    methods, weights = [m for m, _ in tasks], [w for _, w in tasks]
    try:
        await user.on_start()
        while _started(stats) < max_requests:
            await trio.sleep(user.wait_time())
            await random.choices(methods, weights)[0](user)
    finally:
        user.close()
