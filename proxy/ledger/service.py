"""The ledger as the request handlers use it: atomic admission, settling, durability.

Admission is atomic because deciding and applying happen in one synchronous
step (trio switches tasks only at ``await``).  The records are then made
durable (:class:`Journal`) before the caller tells the customer anything.

A create that is admitted stays *pending* until its backend has answered.
A concurrent create of the same meetingID sees the pending reservation as a
duplicate and waits for it to settle (:meth:`Ledger.wait_settled`): if the
first create succeeded, the second is sent to the same backend and gets BBB's
``duplicateWarning``; if it failed, the second is admitted afresh.  So
concurrent creates of one meetingID make exactly one backend meeting.

Storage faults (docs/decisions.md).  The state in memory is authoritative; the journal
is its durable copy and may fail for a while (full, read-only or frozen ``state_dir``).
Changes are applied first, then made durable as soon as the journal can:
:meth:`Ledger.confirm`, :meth:`Ledger.release` and :meth:`Ledger.record` never raise
for a storage fault, so background work (reconciliation, end notices) goes on.  What
acknowledges a change to a customer asks for durability: :meth:`Ledger.admit` refuses a
new meeting while the journal cannot write, and :meth:`Ledger.durable` raises
:class:`~proxy.errors.StorageUnavailable` (``serverUnavailable``) when the change is not
on disk within the journal's timeout.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from proxy.errors import StorageUnavailable
from proxy.ledger.model import (
    Admit,
    BackendSpec,
    Bridges,
    Chooser,
    Confirm,
    CreateRequest,
    Decision,
    LedgerState,
    LedgerStatistics,
    MeetingKey,
    Record,
    Release,
    Reservation,
    Reserve,
)


class Journal(Protocol):
    """Where records go before an answer leaves (see :mod:`proxy.ledger.journal`)."""

    def append(self, record: Record) -> None: ...

    async def flush(self) -> None:
        """Make every appended record durable; raises ``StorageUnavailable`` if it cannot."""
        ...

    @property
    def failed(self) -> bool:
        """True while nothing can be made durable (a write failed, or is overdue)."""
        ...


class NullJournal:
    """No durability: for tests of the decision logic and for benchmarks' baselines."""

    failed = False

    def append(self, record: Record) -> None:
        pass

    async def flush(self) -> None:
        pass


class Ledger:
    """Reservations held by this gateway process.

    The shared ledger (:class:`proxy.ledger.shared.SharedLedger`, several instances on one
    Redis) has the same methods; what callers use to be right on both: :meth:`decide`
    (not :meth:`admit`), :meth:`lookup` for read-your-writes, and :meth:`release`'s
    answer (what THIS call released) for side effects that must happen once.
    """

    shared = False  # decisions are committed against other instances' (SharedLedger)

    def __init__(
        self,
        state: LedgerState | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state if state is not None else LedgerState()
        self.journal: Journal = journal if journal is not None else NullJournal()
        self.clock = clock
        # Draws voice bridges (proxy.voice.bridges); tests put a seeded random.Random here.
        self.rng: random.Random = random.SystemRandom()
        self._settled: dict[MeetingKey, trio.Event] = {}

    def get(self, key: MeetingKey) -> Reservation | None:
        return self.state.get(key)

    def statistics(self) -> LedgerStatistics:
        return self.state.statistics()

    def admit(
        self,
        request: CreateRequest,
        limit: int,
        backends: Sequence[BackendSpec],
        choose: Chooser,
        *,
        bridge_length: int | None = None,
    ) -> Decision:
        """Decide a create and, if admitted, reserve it (and release its victims) at once.

        With ``bridge_length``, a new meeting gets a voice bridge of that many digits
        (or the customer's own, :meth:`LedgerState.admit`) in the same step.

        Error handling: ``StorageUnavailable`` for a new meeting while the journal cannot
        write (nothing is changed); a repeated create of a held meeting is decided as usual.
        """
        decision, records = self.admission(request, limit, backends, choose, bridge_length)
        return self._reserved(decision, records)

    def admission(
        self,
        request: CreateRequest,
        limit: int,
        backends: Sequence[BackendSpec],
        choose: Chooser,
        bridge_length: int | None,
    ) -> tuple[Decision, list[Record]]:
        """A create decided on the state as it is now, and the records that carry it out
        (none for a duplicate or a refusal); changes nothing."""
        key = (request.customer, request.meeting_id)
        voice = None if bridge_length is None else Bridges(bridge_length, self.rng)
        decision = self.state.admit(
            request,
            limit,
            backends,
            choose,
            self.clock(),
            may_move=not self.settling(key),
            voice=voice,
        )
        if not isinstance(decision, Admit):
            return decision, []
        records: list[Record] = []
        if decision.replaces is not None:  # failover: its old pin goes in the same step
            records.append(Release(decision.replaces.key, "moved"))
        records.extend(Release(victim.key, "preempted") for victim in decision.victims)
        records.append(Reserve(decision.reservation))
        return decision, records

    def _reserved(self, decision: Decision, records: list[Record]) -> Decision:
        """Apply an admission's records at once (the journal writes them before the answer)."""
        if isinstance(decision, Admit):
            self.check_writable()
            for record in records:
                self._record(record)
            self._settled[decision.reservation.key] = trio.Event()
        return decision

    async def decide(
        self,
        request: CreateRequest,
        limit: int,
        backends: Sequence[BackendSpec],
        choose: Chooser,
        *,
        bridge_length: int | None = None,
    ) -> Decision:
        """:meth:`admit`, as create calls it on either ledger (the shared one commits it
        against the other instances' before answering).

        Error handling: as :meth:`admit`.
        """
        return await self._admitted(
            functools.partial(self.admission, request, limit, backends, choose, bridge_length)
        )

    async def _admitted(self, build: Callable[[], tuple[Decision, list[Record]]]) -> Decision:
        return self._reserved(*build())

    async def refresh(self) -> None:
        """Catch up with what other instances committed (nothing to do in one process)."""

    async def lookup(self, key: MeetingKey) -> Reservation | None:
        """:meth:`get`; the shared ledger catches up before calling a meeting unknown, so
        one another instance has just created is seen (read-your-writes)."""
        return self.state.get(key)

    def settling(self, key: MeetingKey) -> bool:
        """Whether a create of ``key`` is in flight in this process."""
        return key in self._settled

    async def wait_settled(self, key: MeetingKey) -> None:
        """Wait until a pending create of ``key`` has been confirmed or released."""
        event = self._settled.get(key)
        if event is not None:
            await event.wait()

    async def confirm(self, key: MeetingKey) -> None:
        """The backend has the meeting.  Never raises for storage (see the module docstring)."""
        self._record(Confirm(key))
        self._settle(key)
        await self._flush_if_possible()

    async def release(self, key: MeetingKey, reason: str) -> Reservation | None:
        """Free a meeting's connections; returns what was released, if it was held.

        Never raises for storage (see the module docstring).
        """
        if self.state.get(key) is None:
            self._settle(key)
            return None
        released = self._record(Release(key, reason))
        self._settle(key)
        await self._flush_if_possible()
        return released

    async def record(self, record: Record) -> None:
        """Apply one record (adoption by reconciliation).  Never raises for storage."""
        self._record(record)
        await self._flush_if_possible()

    async def durable(self) -> None:
        """Return once every record applied so far is on stable storage.

        Error handling: ``StorageUnavailable`` if the journal cannot write them (within
        its timeout); they stay applied in memory and reach the disk when it recovers.
        """
        await self.journal.flush()

    def check_writable(self) -> None:
        """Raise ``StorageUnavailable`` now if a change could not be made durable."""
        if self.journal.failed:
            raise StorageUnavailable()

    async def _flush_if_possible(self) -> None:
        # The journal has logged the fault; the change waits in memory for its recovery.
        with contextlib.suppress(StorageUnavailable):
            await self.journal.flush()

    def _record(self, record: Record) -> Reservation | None:
        self.journal.append(record)
        return self.state.apply(record)

    def _settle(self, key: MeetingKey) -> None:
        event = self._settled.pop(key, None)
        if event is not None:
            event.set()
