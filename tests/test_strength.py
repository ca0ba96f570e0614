"""Tests written to kill mutants that survived ``./run mutate`` (docs/mutation.md).

Each checks a documented rule against an independent statement of it, so that a
changed comparison, constant or operator in the decision modules is noticed.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from proxy.placement import BackendLoad, Ring

# -- placement: the bound of "consistent hashing with bounded loads" ---------------------------


def oracle(
    ring: Ring, key: str, size: int, loads: dict[str, BackendLoad], epsilon: Fraction
) -> str | None:
    """The module docstring's rule, in exact arithmetic: the first backend in ring order
    that fits and meets ``u + size <= ceil((1 + eps) * (U + size) * c / C)``, else the first
    that fits, else None."""
    live = [load for load in loads.values() if load.available]
    total_used = sum(x.used for x in live)
    total_capacity = sum(x.capacity for x in live)
    fitting = [
        b
        for b in ring.candidates(key)
        if b in loads and loads[b].available and loads[b].free >= size
    ]
    for backend_id in fitting:
        load = loads[backend_id]
        limit = (1 + epsilon) * (total_used + size) * Fraction(load.capacity, total_capacity)
        if load.used + size <= math.ceil(limit):
            return backend_id
    return fitting[0] if fitting else None


def test_choose_follows_the_bound_exactly_in_random_pools() -> None:
    rng = random.Random(20261201)
    ring = Ring(["a", "b", "c", "d"], vnodes=20)
    for case in range(3000):
        loads = {}
        for backend_id in ring.backend_ids:
            capacity = rng.choice([1, 2, 5, 10, 40, 100, 1000])
            used = rng.randint(0, capacity)
            loads[backend_id] = BackendLoad(backend_id, capacity, used, rng.random() > 0.15)
        size = rng.choice([1, 1, 2, 3, 10, 25])
        epsilon = rng.choice([Fraction(0), Fraction(1, 4), Fraction(1, 2), Fraction(1)])
        key = f"acme~room-{case}"
        expected = oracle(ring, key, size, loads, epsilon)
        assert ring.choose(key, size, loads, epsilon=float(epsilon)) == expected, (loads, size)


def first_key(ring: Ring, order: list[str]) -> str:
    """A meeting key whose ring walk starts with ``order``."""
    return next(
        k for i in range(10_000) if list(ring.candidates(k := f"k{i}"))[: len(order)] == order
    )


def test_the_bound_at_an_exact_integer_is_not_rounded_up() -> None:
    """Equal capacities, epsilon 1/4: (1.25 * 8 * 1/2) is exactly 5, so 6 is over it."""
    ring = Ring(["a", "b"], vnodes=10)
    key = first_key(ring, ["a", "b"])
    loads = {"a": BackendLoad("a", 100, 5, True), "b": BackendLoad("b", 100, 2, True)}
    assert ring.choose(key, 1, loads, epsilon=0.25) == "b"


def test_the_bound_counts_the_new_meeting_in_the_total() -> None:
    """A small server just within its share keeps the meeting that hashes to it."""
    ring = Ring(["a", "b"], vnodes=10)
    key = first_key(ring, ["a", "b"])
    loads = {"a": BackendLoad("a", 100, 47, True), "b": BackendLoad("b", 1000, 443, True)}
    # (47 + 10) <= ceil(1.25 * (490 + 10) * 100 / 1100) = 57
    assert ring.choose(key, 10, loads, epsilon=0.25) == "a"
    loads["a"] = BackendLoad("a", 100, 48, True)  # one more: over its share, goes to b
    assert ring.choose(key, 10, loads, epsilon=0.25) == "b"


@pytest.mark.parametrize("size", [0, -1])
def test_a_meeting_needs_a_size(size: int) -> None:
    with pytest.raises(ValueError, match="size"):
        Ring(["a"]).choose("k", size, {"a": BackendLoad("a", 10, 0, True)})
