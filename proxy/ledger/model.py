"""The reservation ledger's state and its admission decision (SPEC §4), without I/O.

A meeting created with ``maxParticipants=N`` and ``duration=D`` holds N of its
customer's ``max_connections`` and N of its backend's ``capacity`` from create
until it ends.  For D minutes it is *reserved*; after that it is *overtime*:
still running and still counted, but a new meeting of the same customer that
does not fit may end it.  Overtime meetings are ended oldest-overtime-first
(the one whose reserved window closed earliest), and only as many as make the
new meeting fit; when even all of them would not, nothing is ended.

State changes only through :meth:`LedgerState.apply` with a :data:`Record`, so
that a journal of records replays to the same state.  :meth:`LedgerState.admit`
decides and changes nothing; the caller applies the decision in the same step
(no ``await`` in between), which is what makes admission atomic under trio.

Voice bridges (:mod:`proxy.voice.bridges`) are part of the reservation: admission gives
a new meeting the customer's own ``voiceBridge`` when no held reservation has it (else
``nonUniqueVoiceBridge``), or a free one drawn at random, in the same step, so no two
held reservations admitted here share one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from proxy.errors import (
    ApiError,
    NonUniqueVoiceBridge,
    NoServerCapacity,
    NoVoiceBridge,
    SubscriptionExhausted,
)
from proxy.placement import BackendLoad
from proxy.voice import bridges

MINUTE = 60.0

type MeetingKey = tuple[str, str]  # (customer id, customer's meetingID)
type Chooser = Callable[[Mapping[str, BackendLoad]], str | None]


@dataclass(frozen=True, slots=True)
class Reservation:
    customer: str
    meeting_id: str  # as the customer sent it
    backend_id: str
    backend_meeting_id: str  # the namespaced id the backend knows
    connections: int  # maxParticipants as resolved (customer's, else the default)
    duration: int  # minutes reserved (customer's, else the default)
    asked_duration: int  # what the customer sent, shown back to it
    created_at: float  # epoch seconds
    confirmed: bool = False  # the backend has answered the create
    voice_bridge: str = ""  # its conference PIN, unique among held ones; "" none given

    @property
    def key(self) -> MeetingKey:
        return (self.customer, self.meeting_id)

    @property
    def reserved_until(self) -> float:
        return self.created_at + self.duration * MINUTE

    def overtime(self, now: float) -> bool:
        return now >= self.reserved_until


@dataclass(frozen=True, slots=True)
class BackendSpec:
    id: str
    capacity: int
    available: bool
    responsive: bool = True  # answers within the latency bound (see proxy.health)


@dataclass(frozen=True, slots=True)
class CreateRequest:
    customer: str
    meeting_id: str
    backend_meeting_id: str
    connections: int
    duration: int
    asked_duration: int
    voice_bridge: str | None = None  # the customer's own voiceBridge (checked digits)


@dataclass(frozen=True, slots=True)
class Bridges:
    """How admission gives voice bridges: ``length`` digits, drawn with ``rng``."""

    length: int
    rng: random.Random


# -- records: the only way state changes -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reserve:
    reservation: Reservation


@dataclass(frozen=True, slots=True)
class Confirm:
    key: MeetingKey


@dataclass(frozen=True, slots=True)
class Release:
    key: MeetingKey
    reason: str  # "end", "ended", "preempted", "failed", "gone", "backend-down"


type Record = Reserve | Confirm | Release


# -- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admit:
    reservation: Reservation
    victims: tuple[Reservation, ...]  # overtime meetings to end first
    replaces: Reservation | None = None  # the same meeting's pin on a suspended backend


@dataclass(frozen=True, slots=True)
class Duplicate:
    reservation: Reservation  # the running (or still pending) meeting


@dataclass(frozen=True, slots=True)
class Refuse:
    error: ApiError


type Decision = Admit | Duplicate | Refuse


@dataclass(frozen=True, slots=True)
class LedgerStatistics:
    meetings: int
    pending: int
    connections_by_customer: Mapping[str, int]
    connections_by_backend: Mapping[str, int]


class LedgerState:
    """Every reservation, indexed for admission and for mapping backend answers back."""

    def __init__(self) -> None:
        self._meetings: dict[MeetingKey, Reservation] = {}
        self._by_backend_meeting: dict[tuple[str, str], MeetingKey] = {}
        self._by_customer: dict[str, dict[str, Reservation]] = {}
        self._by_backend: dict[str, dict[MeetingKey, Reservation]] = {}
        self._customer_used: dict[str, int] = {}
        self._backend_used: dict[str, int] = {}
        self._pending = 0  # reservations not yet confirmed
        # Failover: every reservation's connections per backend and customer, and the
        # backends whose reservations do not count against subscriptions (DOWN; set from
        # health, not journaled).  _customer_used counts only the other backends'.
        self._backend_customers: dict[str, dict[str, int]] = {}
        self._suspended: set[str] = set()
        self._bridges: bridges.BridgeIndex[MeetingKey] = bridges.BridgeIndex()

    # -- reading --

    def get(self, key: MeetingKey) -> Reservation | None:
        return self._meetings.get(key)

    def by_backend_meeting(self, backend_id: str, backend_meeting_id: str) -> Reservation | None:
        key = self._by_backend_meeting.get((backend_id, backend_meeting_id))
        return None if key is None else self._meetings[key]

    def by_voice_bridge(self, bridge: str) -> Reservation | None:
        """The confirmed meeting holding ``bridge`` (the latest created, should several)."""
        confirmed = [self._meetings[k] for k in self._bridges.holders(bridge)]
        return max((r for r in confirmed if r.confirmed), key=_created, default=None)

    def bridge_taken(self, bridge: str) -> bool:
        """Whether a held reservation has ``bridge``."""
        return bridge in self._bridges

    def customer_meetings(self, customer: str) -> Sequence[Reservation]:
        return list(self._by_customer.get(customer, {}).values())

    def backend_meetings(self, backend_id: str) -> list[Reservation]:
        return list(self._by_backend.get(backend_id, {}).values())

    def backends(self) -> list[str]:
        """The backends holding at least one reservation."""
        return list(self._by_backend)

    def customer_used(self, customer: str) -> int:
        """Connections counted against the customer's subscription (suspended backends' not)."""
        return self._customer_used.get(customer, 0)

    def suspended_used(self, backend_id: str) -> Mapping[str, int]:
        """Each customer's connections on ``backend_id`` (counted or not)."""
        return dict(self._backend_customers.get(backend_id, {}))

    @property
    def suspended(self) -> frozenset[str]:
        return frozenset(self._suspended)

    def suspend(self, backend_id: str) -> None:
        """Stop counting ``backend_id``'s reservations against subscriptions (its pins stay).

        Not a record: the gateway sets it from health after every poll (and start-up).
        Costs one step per customer holding meetings there.
        """
        if backend_id not in self._suspended:
            self._suspended.add(backend_id)
            for customer, used in self._backend_customers.get(backend_id, {}).items():
                _add_count(self._customer_used, customer, -used)

    def resume(self, backend_id: str) -> None:
        """Count ``backend_id``'s reservations again (it is back)."""
        if backend_id in self._suspended:
            self._suspended.discard(backend_id)
            for customer, used in self._backend_customers.get(backend_id, {}).items():
                _add_count(self._customer_used, customer, used)

    def backend_used(self, backend_id: str) -> int:
        return self._backend_used.get(backend_id, 0)

    def __iter__(self) -> Iterator[Reservation]:
        return iter(list(self._meetings.values()))

    def __len__(self) -> int:
        return len(self._meetings)

    def statistics(self) -> LedgerStatistics:
        return LedgerStatistics(
            meetings=len(self._meetings),
            pending=self._pending,
            connections_by_customer=dict(self._customer_used),
            connections_by_backend=dict(self._backend_used),
        )

    # -- deciding --

    def admit(
        self,
        request: CreateRequest,
        limit: int,
        backends: Sequence[BackendSpec],
        choose: Chooser,
        now: float,
        *,
        may_move: bool = True,
        voice: Bridges | None = None,
    ) -> Decision:
        """Decide a create (SPEC §4); changes nothing.

        A meeting pinned to a suspended backend is admitted again elsewhere
        (``Admit.replaces`` is its old pin) unless ``may_move`` is False (its create
        is still in flight): then it is a ``Duplicate`` as any other.  With ``voice``,
        an admitted meeting gets its voice bridge (:meth:`_voice_bridge`).
        """
        existing = self._meetings.get((request.customer, request.meeting_id))
        if existing is not None and not (may_move and existing.backend_id in self._suspended):
            return Duplicate(existing)
        bridge = "" if voice is None else self._voice_bridge(request, existing, voice)
        if not isinstance(bridge, str):
            return bridge
        # New, or pinned to a suspended (DOWN) backend: placed afresh, its old pin replaced.
        # The old pin's connections are not counted (suspended), so nothing counts twice.
        admitted = self._admit_new(request, limit, backends, choose, now)
        if isinstance(admitted, Admit) and bridge:
            admitted = replace(
                admitted, reservation=replace(admitted.reservation, voice_bridge=bridge)
            )
        if isinstance(admitted, Admit) and existing is not None:
            return replace(admitted, replaces=existing)
        return admitted

    def _voice_bridge(
        self, request: CreateRequest, existing: Reservation | None, voice: Bridges
    ) -> str | Refuse:
        """The bridge a new (or moved) meeting gets: the customer's own if no other held
        meeting has it, else the one it held before moving, else a free one at random.

        Bridges of meetings about to be preempted still count as held: their backends
        may not have ended them yet when the new meeting arrives.
        """
        key = (request.customer, request.meeting_id)
        if request.voice_bridge is not None:
            if self._bridges.taken(request.voice_bridge, by_other_than=key):
                return Refuse(NonUniqueVoiceBridge())
            return request.voice_bridge
        if existing is not None and existing.voice_bridge:
            return existing.voice_bridge
        chosen = bridges.choose(self._bridges, voice.length, voice.rng)
        return Refuse(NoVoiceBridge()) if chosen is None else chosen

    def _admit_new(
        self,
        request: CreateRequest,
        limit: int,
        backends: Sequence[BackendSpec],
        choose: Chooser,
        now: float,
    ) -> Decision:
        if request.connections <= limit - self.customer_used(request.customer):
            # The common case, decided without looking at the customer's other meetings.
            backend_id = choose(self._loads(backends, ()))
            if backend_id is not None:
                return Admit(_reservation(request, backend_id, now), ())
        overtime = self._overtime(request.customer, now)
        needed = _victims_needed(
            request.connections, limit - self.customer_used(request.customer), overtime
        )
        if needed is None:
            return Refuse(SubscriptionExhausted())
        for extra in range(needed, len(overtime) + 1):
            backend_id = choose(self._loads(backends, overtime[:extra]))
            if backend_id is not None:
                victims = overtime[:needed] + tuple(
                    v for v in overtime[needed:extra] if v.backend_id == backend_id
                )
                return Admit(_reservation(request, backend_id, now), victims)
        return Refuse(NoServerCapacity())

    def _overtime(self, customer: str, now: float) -> tuple[Reservation, ...]:
        mine = self._by_customer.get(customer, {}).values()
        late = [
            r
            for r in mine
            if r.confirmed and r.overtime(now) and r.backend_id not in self._suspended
        ]
        return tuple(sorted(late, key=lambda r: (r.reserved_until, r.created_at)))

    def _loads(
        self, backends: Sequence[BackendSpec], victims: Sequence[Reservation]
    ) -> dict[str, BackendLoad]:
        freed: dict[str, int] = {}
        for victim in victims:
            freed[victim.backend_id] = freed.get(victim.backend_id, 0) + victim.connections
        return {
            b.id: BackendLoad(
                id=b.id,
                capacity=b.capacity,
                used=self.backend_used(b.id) - freed.get(b.id, 0),
                available=b.available,
                responsive=b.responsive,
            )
            for b in backends
        }

    # -- changing --

    def apply(self, record: Record) -> Reservation | None:
        """Apply one record; returns the reservation it concerned (None if unknown)."""
        match record:
            case Reserve(reservation):
                self._add(reservation)
                return reservation
            case Confirm(key):
                current = self._meetings.get(key)
                if current is not None and not current.confirmed:
                    current = replace(current, confirmed=True)
                    self._store(current)
                    self._pending -= 1
                return current
            case Release(key, _reason):
                return self._remove(key)

    def _add(self, r: Reservation) -> None:
        """Store ``r``; the newer pin wins over the same key's and the same backend meeting's.

        One backend meeting belongs to one reservation: a Reserve of a backend meeting
        held under another key (an old journal's aliased meetingIDs) removes that
        reservation, counts and all, so ``apply`` stays total (docs/decisions.md).
        """
        self._remove(r.key)
        holder = self._by_backend_meeting.get((r.backend_id, r.backend_meeting_id))
        if holder is not None:
            self._remove(holder)
        self._store(r)
        self._pending += not r.confirmed
        self._count(r, r.connections)
        self._backend_used[r.backend_id] = self.backend_used(r.backend_id) + r.connections

    def _store(self, r: Reservation) -> None:
        self._meetings[r.key] = r
        self._by_backend_meeting[(r.backend_id, r.backend_meeting_id)] = r.key
        self._bridges.add(r.voice_bridge, r.key)
        self._by_customer.setdefault(r.customer, {})[r.meeting_id] = r
        self._by_backend.setdefault(r.backend_id, {})[r.key] = r

    def _remove(self, key: MeetingKey) -> Reservation | None:
        r = self._meetings.pop(key, None)
        if r is None:
            return None
        if self._by_backend_meeting.get((r.backend_id, r.backend_meeting_id)) == key:
            del self._by_backend_meeting[(r.backend_id, r.backend_meeting_id)]
        _drop(self._by_customer, r.customer, r.meeting_id)
        _drop(self._by_backend, r.backend_id, r.key)
        self._bridges.discard(r.voice_bridge, key)
        self._count(r, -r.connections)
        _subtract(self._backend_used, r.backend_id, r.connections)
        self._pending -= not r.confirmed
        return r

    def _count(self, r: Reservation, amount: int) -> None:
        """Move ``r``'s customer's counters by ``amount`` connections."""
        by_customer = self._backend_customers.setdefault(r.backend_id, {})
        _add_count(by_customer, r.customer, amount)
        if not by_customer:
            del self._backend_customers[r.backend_id]
        if r.backend_id not in self._suspended:
            _add_count(self._customer_used, r.customer, amount)


def _add_count(counts: dict[str, int], key: str, amount: int) -> None:
    left = counts.get(key, 0) + amount
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)


def _victims_needed(size: int, free: int, overtime: Sequence[Reservation]) -> int | None:
    """How many of ``overtime`` (in order) must end for ``size`` to fit; None if never."""
    count = 0
    while free < size:
        if count == len(overtime):
            return None
        free += overtime[count].connections
        count += 1
    return count


def _reservation(request: CreateRequest, backend_id: str, now: float) -> Reservation:
    return Reservation(
        customer=request.customer,
        meeting_id=request.meeting_id,
        backend_id=backend_id,
        backend_meeting_id=request.backend_meeting_id,
        connections=request.connections,
        duration=request.duration,
        asked_duration=request.asked_duration,
        created_at=now,
    )


def _created(r: Reservation) -> float:
    return r.created_at


def _drop[K, V](index: dict[str, dict[K, V]], outer: str, inner: K) -> None:
    group = index[outer]
    del group[inner]
    if not group:
        del index[outer]


def _subtract(counts: dict[str, int], key: str, amount: int) -> None:
    left = counts.get(key, 0) - amount
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)
