"""Backend health as a state machine with hysteresis, and latency, without I/O.

Each poll of a backend either succeeds or fails.  The transitions::

    state      poll   condition                               next
    UP         fail   failures + 1 < down_after               UNHEALTHY
    UP         fail   failures + 1 >= down_after              DOWN
    UNHEALTHY  fail   failures + 1 >= down_after              DOWN
    UNHEALTHY  ok     successes + 1 >= up_after               UP
    DOWN       ok     successes + 1 >= up_after               UP
    any        other                                          same state, counters moved

An UNHEALTHY or DOWN backend gets no new meetings.  An UNHEALTHY one keeps its
meetings: one slow answer moves nothing.  A DOWN one is *suspended* (see
:mod:`proxy.backends.monitor`): its meetings stay pinned to it, but their
connections no longer count against the customers' subscriptions, and a create
of one of them places it afresh on a live backend.  Nothing is released for
being DOWN, however long: a meeting is released only on evidence that it
ended (its backend answers without it, or says it ended).

Latency is part of health: :func:`with_latency` keeps a moving average
(exponentially weighted) of the backend's answer times, and a backend whose
average is above ``slow_after`` is not :func:`responsive`; placement gives
it new meetings only when no responsive backend can take them.

On the Redis store one gateway instance polls a backend and the others take its health
from it (:mod:`proxy.backends.cluster`): :func:`shared_fields` and :func:`from_shared`
turn a :class:`Health` into text fields and back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace

LATENCY_WEIGHT = 0.25  # weight of the newest sample in the latency average


class State(enum.Enum):
    UP = "up"
    UNHEALTHY = "unhealthy"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Thresholds:
    down_after: int = 3  # consecutive failed polls
    up_after: int = 2  # consecutive good polls
    slow_after: float = 1.0  # seconds: a latency average above this is not responsive


@dataclass(frozen=True, slots=True)
class Health:
    state: State = State.UP
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    down_since: float | None = None  # when the state became DOWN
    latency: float | None = None  # moving average of answer times, seconds; None: no sample


def after_poll(health: Health, ok: bool, now: float, limits: Thresholds) -> Health:
    """The health after one poll at time ``now`` (the latency average is kept)."""
    if ok:
        successes = health.successes + 1
        if health.state is not State.UP and successes >= limits.up_after:
            return Health(State.UP, latency=health.latency)
        return replace(health, successes=successes, failures=0)
    failures = health.failures + 1
    if health.state is not State.DOWN and failures >= limits.down_after:
        return Health(State.DOWN, failures=failures, down_since=now, latency=health.latency)
    if health.state is State.UP:
        return Health(State.UNHEALTHY, failures=failures, latency=health.latency)
    return replace(health, failures=failures, successes=0)


def with_latency(health: Health, seconds: float) -> Health:
    """``health`` with one more answer time in its average (the first sample sets it)."""
    seconds = max(0.0, seconds)
    if health.latency is None:
        return replace(health, latency=seconds)
    average = health.latency + LATENCY_WEIGHT * (seconds - health.latency)
    return replace(health, latency=average)


def responsive(health: Health, limits: Thresholds) -> bool:
    """Whether the backend answers within the latency bound (no sample yet: yes)."""
    return health.latency is None or health.latency <= limits.slow_after


def suspended(health: Health) -> bool:
    """Whether the backend's reservations stop counting against subscriptions."""
    return health.state is State.DOWN


def shared_fields(health: Health, now: float) -> dict[str, str]:
    """``health`` as text fields for another gateway instance (the Redis store's health
    hash, :mod:`proxy.backends.cluster`); ``down_since`` as an age, each instance's
    clock being its own."""
    down_for = "" if health.down_since is None else repr(max(0.0, now - health.down_since))
    return {
        "state": health.state.value,
        "failures": str(health.failures),
        "successes": str(health.successes),
        "latency": "" if health.latency is None else repr(health.latency),
        "down_for": down_for,
    }


def from_shared(fields: Mapping[str, str], now: float) -> Health | None:
    """The :class:`Health` :func:`shared_fields` made (at this instance's ``now``);
    None for fields that are not such (another version's, or damaged)."""
    try:
        state = State(fields["state"])
        latency = float(fields["latency"]) if fields["latency"] else None
        down_since = now - float(fields["down_for"]) if fields["down_for"] else None
        return Health(state, int(fields["failures"]), int(fields["successes"]), down_since, latency)
    except (KeyError, ValueError):
        return None
