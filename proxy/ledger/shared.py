"""The shared ledger: several gateway instances on one Redis decide as one (issue 13).

Every instance keeps a replica of the ledger (a :class:`~proxy.ledger.model.LedgerState`)
and decides on it with the one admission code there is (:mod:`proxy.ledger.model`).
The ``ledger`` stream on Redis (:class:`~proxy.store.redis.RedisLog`) is the truth: a
change counts once its records are appended there, by a compare-and-append
(:meth:`~proxy.store.redis.RedisLog.try_append`) against the position the replica has
applied.  A change is therefore:

1. decided on the replica (admit, confirm, release, adopt), giving records;
2. appended only if nobody appended since the replica's position;
3. won: applied to the replica, answered; lost: the replica catches up (the records
   appended since, in order) and the change is decided again from 1.  A create whose
   meetingID another instance has just reserved becomes that meeting's duplicate; a
   customer or backend another instance has just filled refuses it.  No interleaving of
   instances can overbook, and one meetingID makes one reservation.

An instance's own changes are serialised by a lock, so races are only between instances;
the changes waiting for the lock meanwhile are committed together (group commit, see
:meth:`SharedLedger._commit`).
Records are numbered by ``seq`` across instances (the position makes the numbers agree);
a replica that meets a gap or a record it cannot apply reads the whole log again.

Reading.  A replica is caught up every ``follow_every`` seconds, before a decision that
refuses or finds a duplicate (one round trip: an end on another instance frees room at
once), and by :meth:`Ledger.lookup` before a meeting is called unknown (read-your-writes
for join, getMeetingInfo and end sent to another instance right after the create).

Once.  A release is committed only if the reservation it is about is still held after
catching up, so of several instances releasing one meeting (an end notice and a poll,
two end calls) exactly one gets it back from :meth:`SharedLedger.release`; callbacks
follow that answer.  Preemption releases its victims in the admitting commit: only the
instance whose create won ends them.

Pending creates of other instances.  A create pending on another instance is waited for
(the replica is caught up every ``SETTLE_POLL`` seconds) for at most ``REMOTE_SETTLE``
seconds after it was admitted; after that it is treated as one whose answer was never
seen (create sends it to its backend, which says whether it exists).

Compaction.  When the stream is large, an instance replaces it with the state it has
applied (:meth:`~proxy.store.redis.RedisLog.try_compact`: only if nobody appended
since); others see the ``reset`` and load that state.  Backends suspended (DOWN) stay
suspended across a reload: suspension is health, not a record.

Failures.  Redis unreachable: no change can commit: creates and ends answer BBB errors
(``serverUnavailable``), a confirm is dropped (the polls confirm a running meeting), a
release is owed: kept and committed by the follow task once Redis is back (an end that
the backend carried out while Redis was away frees the connections then), reads go on
from the replica, ``journal.failed`` makes ``/readyz`` 503, and the follow loop notices
Redis' return.  A compare-and-append whose answer was lost may have been applied: its
records carry the next ``seq`` numbers and are found, and applied, by the next catch-up
(which reads this instance's entries too); the create that sent them answered an error,
and its pending reservation is settled as any whose answer was never seen.

Error handling: start-up (:func:`open_shared_ledger`) raises ``StateError`` for a log
that cannot be replayed; once running, :meth:`SharedLedger.decide` and
:meth:`SharedLedger.durable` raise only ``StorageUnavailable`` (and ``decide`` the
decision's own errors, as :meth:`Ledger.admit`), and the background tasks never raise.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from proxy.errors import StateError, StorageUnavailable
from proxy.ledger.codec import decode_record, record_payload, reservation_fields
from proxy.ledger.model import (
    Admit,
    Confirm,
    Decision,
    LedgerState,
    MeetingKey,
    Record,
    Release,
    Reservation,
    Reserve,
)
from proxy.ledger.redis_journal import replay
from proxy.ledger.service import Ledger
from proxy.store import Json
from proxy.store import Record as LogRecord
from proxy.store.redis import RedisLog, RedisStore, Tail

__all__ = ["FOLLOW_EVERY", "SharedLedger", "open_shared_ledger"]

log = logging.getLogger(__name__)

LOG = "ledger"
FOLLOW_EVERY = 0.25  # seconds between catch-ups of an idle replica
MAX_RACES = 64  # lost compare-and-appends in a row before a change gives up
REMOTE_SETTLE = 15.0  # seconds another instance's pending create is waited for
SETTLE_POLL = 0.02  # seconds between catch-ups while waiting for it
COMPACT_EVERY = 5.0  # seconds between checks whether the stream should be compacted
MAX_OWED = 10_000  # releases kept for committing once Redis is back

type Build[T] = Callable[[], tuple[T, list[Record]]]


class SharedJournal:
    """What the gateway reads of the ledger's durability (``journal.failed``)."""

    def __init__(self, redis_log: RedisLog) -> None:
        self.log = redis_log

    @property
    def failed(self) -> bool:
        return self.log.failed

    def append(self, record: Record) -> None:
        raise StateError("the shared ledger commits records itself")

    async def flush(self) -> None:
        if self.log.failed:
            raise StorageUnavailable() from StateError("the ledger cannot reach Redis")


class SharedLedger(Ledger):
    """The ledger of one instance among several on one Redis (see the module)."""

    shared = True

    def __init__(
        self,
        state: LedgerState,
        redis_log: RedisLog,
        last_seq: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(state, SharedJournal(redis_log), clock)
        self.log = redis_log
        self.seq = last_seq  # the last record applied to the replica
        self._lock = trio.Lock()
        self.commits = 0  # records this instance committed
        self.races = 0  # compare-and-appends lost to another instance
        self.catch_ups = 0  # records of other instances applied
        self.reloads = 0  # times the whole log was read again
        self.batches = 0  # commits won (each may carry several changes)
        self._waiting: list[_Change[Any]] = []  # changes waiting for the lock
        self._owed: dict[MeetingKey, tuple[Reservation, str]] = {}  # releases not committed

    # -- deciding ------------------------------------------------------------------------------

    async def _admitted(self, build: Build[Decision]) -> Decision:
        """Admission (:meth:`Ledger.decide`), committed (see the module).

        Error handling: ``StorageUnavailable`` when Redis does not take the records
        (nothing is reserved then, unless a lost answer hides that it was: see the module).
        """
        decision = await self._commit(build, fresh_for_nothing=True)
        if isinstance(decision, Admit):
            self._settled[decision.reservation.key] = trio.Event()
        return decision

    async def confirm(self, key: MeetingKey) -> None:
        """The backend has the meeting.  Never raises for storage: a confirm Redis did not
        take is made again by the polls (a running meeting's pending reservation)."""
        expected = self.state.get(key)

        def build() -> tuple[None, list[Record]]:
            current = self.state.get(key)
            if current is None or current.confirmed or not _same(current, expected):
                return None, []
            return None, [Confirm(key)]

        with contextlib.suppress(StorageUnavailable):
            await self._commit(build)
        self._settle(key)

    async def release(self, key: MeetingKey, reason: str) -> Reservation | None:
        """Free the meeting's connections, if the reservation seen now is still held
        after catching up; returns it only to the ONE caller whose release committed.

        Never raises for storage: None then, and the release is owed: committed by the
        follow task as soon as Redis takes it (if still true then; at most ``MAX_OWED``
        are kept, the polls release what has ended beyond them).
        """
        expected = self.state.get(key)
        if expected is None:
            self._settle(key)
            return None
        released = None
        try:
            released = await self._commit(self._releasing(key, expected, reason))
        except StorageUnavailable:
            self._owe(key, expected, reason)
        finally:  # this process's create of it is over, committed or not
            self._settle(key)
        return released

    def _releasing(
        self, key: MeetingKey, expected: Reservation, reason: str
    ) -> Build[Reservation | None]:
        def build() -> tuple[Reservation | None, list[Record]]:
            current = self.state.get(key)
            if current is None or not _same(current, expected):
                return None, []
            return current, [Release(key, reason)]

        return build

    def _owe(self, key: MeetingKey, expected: Reservation, reason: str) -> None:
        self._owed.pop(key, None)
        self._owed[key] = (expected, reason)
        while len(self._owed) > MAX_OWED:
            del self._owed[next(iter(self._owed))]

    async def _pay_owed(self) -> None:
        """Commit the releases Redis did not take when they were made (oldest first).

        Error handling: ``StorageUnavailable`` (the rest stay owed)."""
        while self._owed:
            key, (expected, reason) = next(iter(self._owed.items()))
            if await self._commit(self._releasing(key, expected, reason)) is not None:
                log.info("ledger: %s released (%s) once Redis took it", key, reason)
            self._owed.pop(key, None)

    @property
    def owed(self) -> int:
        """Releases made while Redis did not take them, not committed yet."""
        return len(self._owed)

    async def record(self, record: Record) -> None:
        """Commit one record of reconciliation, if still true after catching up (an
        adoption of a meeting nobody holds, a confirm or release of one held).  Never
        raises for storage."""

        def build() -> tuple[None, list[Record]]:
            return None, [record] if _applies(self.state, record) else []

        with contextlib.suppress(StorageUnavailable):
            await self._commit(build)

    async def durable(self) -> None:
        """Committed is durable (Redis' AOF); raises while Redis is unreachable, as a
        confirm just made may not have reached it.

        Error handling: ``StorageUnavailable``.
        """
        await self.journal.flush()

    async def lookup(self, key: MeetingKey) -> Reservation | None:
        """:meth:`get`, caught up first when not found (read-your-writes); while Redis
        is known to be down, the replica's answer at once."""
        found = self.state.get(key)
        if found is None and not self.log.failed:
            with contextlib.suppress(StorageUnavailable):
                await self.refresh()
            found = self.state.get(key)
        return found

    # -- waiting for other instances -----------------------------------------------------------

    def settling(self, key: MeetingKey) -> bool:
        """A create of ``key`` in flight here, or pending on another instance since less
        than ``REMOTE_SETTLE`` seconds."""
        if key in self._settled:
            return True
        held = self.state.get(key)
        return (
            held is not None
            and not held.confirmed
            and self.clock() - held.created_at < REMOTE_SETTLE
        )

    async def wait_settled(self, key: MeetingKey) -> None:
        """Wait until the pending create of ``key`` is confirmed or released (here or on
        another instance), or is older than ``REMOTE_SETTLE``."""
        event = self._settled.get(key)
        if event is not None:
            await event.wait()
            return
        with trio.move_on_after(REMOTE_SETTLE):
            while self.settling(key):
                await trio.sleep(SETTLE_POLL)
                with contextlib.suppress(StorageUnavailable):
                    await self.refresh()

    # -- catching up ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Apply what other instances committed since the replica's position.

        Error handling: ``StorageUnavailable`` when Redis does not answer.
        """
        async with self._lock:
            await self._catch_up()

    async def follow(self, every: float = FOLLOW_EVERY) -> None:
        """Forever: keep the replica caught up, and notice Redis' return after a failure.
        Never raises."""
        down = False
        while True:
            await trio.sleep(every)
            try:
                await self.refresh()
                if self.log.failed:
                    await self.log.recover()
                await self._pay_owed()
            except StorageUnavailable as e:
                if not down:
                    log.warning("ledger: cannot follow Redis: %s", e.__cause__)
                down = True
            else:
                if down:
                    log.warning("ledger: following Redis again")
                down = False

    async def compact_when_due(self, every: float = COMPACT_EVERY) -> None:
        """Forever: replace the stream with the replica's state when it has grown (only
        over what the replica has applied).  Never raises."""
        while True:
            await trio.sleep(every)
            if not self.log.compaction_due:
                continue
            async with self._lock:
                try:
                    if await self.log.try_compact(self.snapshot_records()):
                        log.info("ledger: compacted on Redis at record %d", self.seq)
                except StorageUnavailable as e:
                    log.warning("ledger: not compacted: %s", e.__cause__)

    def snapshot_records(self) -> list[LogRecord]:
        """The stream's content that stands for the replica: a header, every reservation."""
        held: list[LogRecord] = [{"op": "held", **_json(reservation_fields(r))} for r in self.state]
        return [{"op": "snapshot", "seq": self.seq, "count": len(held)}, *held]

    async def _commit[T](self, build: Build[T], *, fresh_for_nothing: bool = False) -> T:
        """Decide with ``build`` and commit its records; decide again after a lost race.

        Group commit: changes that wait for the lock meanwhile are decided one after the
        other on the replica (each seeing the ones before) and committed together in one
        compare-and-append, so a busy instance pays one Redis write for many (with
        ``appendfsync always``, one fsync).  With ``fresh_for_nothing``, a decision that
        writes nothing (a refusal, a duplicate) is only answered once the replica has been
        caught up since it was made, or a commit after it won (nobody wrote in between).

        Error handling: ``StorageUnavailable`` (Redis, or ``MAX_RACES`` lost); what
        ``build`` raised, to its caller only.
        """
        change: _Change[T] = _Change(build, fresh_for_nothing)
        self._waiting.append(change)
        try:
            async with self._lock:
                if not change.done:
                    batch, self._waiting = self._waiting, []
                    with trio.CancelScope(shield=True):  # the others' changes are in it too
                        await self._commit_batch(batch)
        except BaseException:  # cancelled while waiting: not decided, not committed
            if change in self._waiting:
                self._waiting.remove(change)
            raise
        return change.outcome()

    async def _commit_batch(self, batch: list[_Change[Any]]) -> None:
        """Decide and commit ``batch`` (the lock is held); every change is done after."""
        caught_up = False
        for _ in range(MAX_RACES):
            undo = _Undo(self.state)
            records: list[Record] = []
            for change in batch:
                change.decide(undo, records)
            if not records:
                fresh = caught_up or not any(c.fresh_for_nothing for c in batch)
                if fresh or not await self._catch_up_or_fail(batch):
                    _finish(batch)
                    return
                caught_up = True
                continue
            first = self.seq + 1
            payloads = [record_payload(first + i, r) for i, r in enumerate(records)]
            try:
                missed = await self.log.try_append_or_read(payloads)
            except (StorageUnavailable, StateError) as e:
                undo.restore()  # in Redis or not: the next catch-up says (module docstring)
                _fail(batch, e if isinstance(e, StorageUnavailable) else _unavailable(e))
                return
            if missed is None:
                self.seq += len(records)
                self.commits += len(records)
                self.batches += 1
                _finish(batch)
                return
            undo.restore()
            self.races += 1
            try:
                if not await self._absorb(missed):  # lost, yet nothing new: Redis lost data
                    log.error("ledger: the log on Redis is behind this replica: rereading")
                    await self._reload(await self.log.reread())
            except StorageUnavailable as e:
                _fail(batch, e)
                return
            caught_up = True
        _fail(batch, _unavailable(StateError(f"ledger: {MAX_RACES} races lost in a row")))

    async def _catch_up_or_fail(self, batch: list[_Change[Any]]) -> bool:
        """:meth:`_catch_up`; Redis not answering fails the batch (False, all done)."""
        try:
            return await self._catch_up()
        except StorageUnavailable as e:
            _fail(batch, e)
            return False

    async def _catch_up(self) -> bool:
        """Apply the records appended since the replica's position (the lock is held);
        True if there were any.  A gap or a record that cannot be applied: read the whole
        log again."""
        return await self._absorb(await self.log.tail(own=True))

    async def _absorb(self, tail: Tail) -> bool:
        """Apply what a tail read (the lock is held); True if it held anything."""
        if not tail.records and not tail.reset:
            return False
        if tail.reset or not self._apply_all(tail.records):
            await self._reload(tail if tail.reset else await self.log.reread())
        return True

    def _apply_all(self, payloads: list[LogRecord]) -> bool:
        for payload in payloads:
            try:
                entry = decode_record(payload)
            except (ValueError, TypeError, KeyError) as e:
                log.error("ledger: record after %d cannot be read (%s): reloading", self.seq, e)
                return False
            if entry.seq != self.seq + 1:
                log.error("ledger: record %d follows %d: reloading", entry.seq, self.seq)
                return False
            self.state.apply(entry.record)
            self.seq = entry.seq
            self.catch_ups += 1
            self._settle_if_done(entry.record)
        return True

    async def _reload(self, tail: Tail) -> None:
        """Replace the replica with the log's whole content (after a compaction by
        another instance, or an inconsistency); suspended backends stay suspended."""
        try:
            state, last = replay(tail.records)
        except StateError as e:  # not to be fixed here: keep the replica, say so loudly
            log.error("ledger: the log on Redis cannot be replayed: %s", e)
            return
        for backend_id in self.state.suspended:
            state.suspend(backend_id)
        self.state, self.seq = state, last
        self.reloads += 1
        for key in list(self._settled):
            held = state.get(key)
            if held is None or held.confirmed:
                self._settle(key)

    def _settle_if_done(self, record: Record) -> None:
        if isinstance(record, Confirm | Release) and record.key in self._settled:
            self._settle(record.key)


@contextlib.asynccontextmanager
async def open_shared_ledger(
    store: RedisStore, *, clock: Callable[[], float] = time.time, follow_every: float = FOLLOW_EVERY
) -> AsyncIterator[SharedLedger]:
    """The shared ledger from the store's ``ledger`` log, kept caught up while the block
    runs.

    Error handling: ``StateError`` when the log cannot be replayed (start-up stops).
    """
    redis_log, records = store.open(LOG)
    state, last = replay(records)
    ledger = SharedLedger(state, redis_log, last, clock)
    log.info("ledger: %d reservations from Redis (record %d), shared", len(state), last)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ledger.follow, follow_every)
        nursery.start_soon(ledger.compact_when_due)
        try:
            yield ledger
        finally:
            nursery.cancel_scope.cancel()


class _Change[T]:
    """One change waiting to be committed: how to decide it, and how it ended."""

    def __init__(self, build: Build[T], fresh_for_nothing: bool) -> None:
        self.build = build
        self.fresh_for_nothing = fresh_for_nothing
        self.done = False
        self._value: T | None = None
        self._decided: tuple[T] | None = None
        self._error: BaseException | None = None

    def decide(self, undo: _Undo, records: list[Record]) -> None:
        """Decide on the replica as it is (the batch's earlier changes applied), apply
        the records tentatively (``undo`` can take them back), add them to ``records``."""
        self._decided, self._error = None, None
        try:
            value, mine = self.build()
        except Exception as e:  # a decision that cannot be made: its caller's error alone
            self._error = e
            return
        for record in mine:
            undo.apply(record)
        records.extend(mine)
        self._decided = (value,)

    def outcome(self) -> T:
        if self._error is not None:
            raise self._error
        assert self._decided is not None
        return self._decided[0]


def _finish(batch: list[_Change[Any]]) -> None:
    for change in batch:
        change.done = True


def _fail(batch: list[_Change[Any]], error: BaseException) -> None:
    for change in batch:
        change.done, change._error = True, error


def _unavailable(cause: BaseException) -> StorageUnavailable:
    error = StorageUnavailable()
    error.__cause__ = cause
    return error


class _Undo:
    """Records applied to a replica tentatively, and how to take them back: the
    reservations they touched, as they were before the first."""

    def __init__(self, state: LedgerState) -> None:
        self.state = state
        self._before: dict[MeetingKey, Reservation | None] = {}

    def apply(self, record: Record) -> None:
        match record:
            case Reserve(r):
                holder = self.state.by_backend_meeting(r.backend_id, r.backend_meeting_id)
                self._touch(r.key)
                if holder is not None:
                    self._touch(holder.key)
            case Confirm(key) | Release(key, _):
                self._touch(key)
        self.state.apply(record)

    def _touch(self, key: MeetingKey) -> None:
        if key not in self._before:
            self._before[key] = self.state.get(key)

    def restore(self) -> None:
        """The replica as it was before the first :meth:`apply`."""
        for key in self._before:
            if self.state.get(key) is not None:
                self.state.apply(Release(key, "undone"))
        for before in self._before.values():
            if before is not None:
                self.state.apply(Reserve(before))
        self._before.clear()


def _same(current: Reservation, expected: Reservation | None) -> bool:
    """Whether ``current`` is the meeting instance a caller saw as ``expected``."""
    return expected is None or (
        current.backend_id == expected.backend_id and current.created_at == expected.created_at
    )


def _applies(state: LedgerState, record: Record) -> bool:
    """Whether reconciliation's ``record`` still describes a change of ``state``."""
    match record:
        case Reserve(reservation):
            taken = state.by_backend_meeting(reservation.backend_id, reservation.backend_meeting_id)
            return state.get(reservation.key) is None and taken is None
        case Confirm(key):
            held = state.get(key)
            return held is not None and not held.confirmed
        case Release(key, _):
            return state.get(key) is not None


def _json(fields: dict[str, Any]) -> dict[str, Json]:
    return fields
