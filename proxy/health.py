"""Backend health as a state machine with hysteresis, without I/O.

Each poll of a backend either succeeds or fails.  The transitions::

    state      poll   condition                               next
    UP         fail   failures + 1 < down_after               UNHEALTHY
    UP         fail   failures + 1 >= down_after              DOWN
    UNHEALTHY  fail   failures + 1 >= down_after              DOWN
    UNHEALTHY  ok     successes + 1 >= up_after               UP
    DOWN       ok     successes + 1 >= up_after               UP
    any        other                                          same state, counters moved

An UNHEALTHY or DOWN backend gets no new meetings, but its meetings stay
pinned: one slow answer moves nothing, and a network blip never splits a
meeting over two servers.  Only a backend DOWN for longer than
``release_after`` has its reservations released (:func:`should_release`).
A backend coming back is reconciled by the same successful poll that counts
towards UP, so it has been reconciled before it gets new meetings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class State(enum.Enum):
    UP = "up"
    UNHEALTHY = "unhealthy"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Thresholds:
    down_after: int = 3  # consecutive failed polls
    up_after: int = 2  # consecutive good polls
    release_after: float = 300.0  # seconds DOWN before its meetings are released


@dataclass(frozen=True, slots=True)
class Health:
    state: State = State.UP
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    down_since: float | None = None  # when the state became DOWN
    released: bool = False  # its meetings were released while DOWN


def after_poll(health: Health, ok: bool, now: float, limits: Thresholds) -> Health:
    """The health after one poll at time ``now``."""
    if ok:
        successes = health.successes + 1
        if health.state is not State.UP and successes >= limits.up_after:
            return Health(State.UP)
        return replace(health, successes=successes, failures=0)
    failures = health.failures + 1
    if health.state is not State.DOWN and failures >= limits.down_after:
        return Health(State.DOWN, failures=failures, down_since=now)
    if health.state is State.UP:
        return Health(State.UNHEALTHY, failures=failures)
    return replace(health, failures=failures, successes=0)


def should_release(health: Health, now: float, limits: Thresholds) -> bool:
    """Whether a DOWN backend has been down long enough to release its meetings."""
    return (
        health.state is State.DOWN
        and not health.released
        and health.down_since is not None
        and now - health.down_since >= limits.release_after
    )
