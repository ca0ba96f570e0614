"""One state kept in step across gateway instances that write one log (issue 13).

With ``[store] kind = "redis"`` every instance opens the same log (one Redis stream per
name) and appends its own changes to it.  :class:`Replica` wraps the log an owner opened
and keeps the owner's in-memory state in step with the other instances' records::

    log, replayed = open_store_log(state_dir, "hooks", timeout=...)
    state = HookState(); [state.apply(r) for r in replayed]
    replica = Replica(log, apply=..., clear=..., records=state.records, changed=...)
    gw.spawn("hooks-store", replica.maintain)
    ...
    state.apply(record); replica.append(record); await replica.flush()   # as on any Log
    await replica.refresh()   # before answering "not found": read-your-writes

- **Following** (:meth:`Replica.maintain`, every ``every`` seconds, and
  :meth:`Replica.refresh` on demand): the records OTHER writers appended since the last
  read (:meth:`~proxy.store.redis.RedisLog.tail`) are handed to ``apply``, then
  ``changed()`` is called once.  This instance's own records are not read back: the owner
  applied each when it appended it.  A record ``apply`` refuses (``StateError``,
  ``ValueError``: e.g. a newer version's record, or two instances' changes that conflict)
  is logged and skipped, not fatal: the other instances decided it.
- **Another instance compacted** (the tail says ``reset``): ``clear()``, then every record
  of the new content, then this instance's records not yet in Redis
  (:meth:`~proxy.store.redis.RedisLog.reread_with_queued`), through ``apply``; ``changed()``.
- **Compaction** (:meth:`Replica.compact`; by :meth:`Replica.maintain` when the log is due)
  is compare-and-compact, no lease: flush this instance's records, catch up, and
  :meth:`~proxy.store.redis.RedisLog.try_compact` ``records()`` only if no writer appended
  since (the state is then exactly the stream's content); every writer's count is kept, so
  a flush retried later adds nothing twice.  Lost to a writer (or appended meanwhile), it is
  tried again, :data:`COMPACT_TRIES` times; every instance may try, the first to succeed
  resets the others, whose own size then no longer says "due".
- **Claims** (:meth:`Replica.claim`): a record appended only if, after catching up, a
  condition still holds on the state and nobody appended in between (compare-and-append):
  how one instance, and only one, takes over work (a queued event, a delivery).
  :meth:`Replica.commit` is the same for a change that must be applied in one order
  everywhere (checked on the caught-up state, applied once it is in the stream).
- **Members** (``members=True``): the replica says every :data:`HEARTBEAT_EVERY` seconds
  that its writer runs (a Redis key that expires after :data:`HEARTBEAT_TTL`), and removes
  the key when it stops; :meth:`Replica.alive` asks that of another writer.  Work owned by
  a writer that is not alive may be claimed.

On the local store (``kind = "local"``, or a :class:`~proxy.store.MemoryLog`) a Replica is
the log itself: nothing is followed, :meth:`Replica.maintain` is the local log's
``maintain`` (or ``recover_forever``), claims always win, every writer is alive.

Error handling: :meth:`refresh`, :meth:`claim`, :meth:`alive` and :meth:`compact` raise
``StorageUnavailable`` when Redis does not answer (``compact`` also when every try lost a
race); :meth:`maintain` never raises for storage (logged once per outage, retried).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import trio

from proxy.errors import StateError, StorageUnavailable
from proxy.store import Json, Log, Record

if TYPE_CHECKING:
    from proxy.store.redis import RedisLog

__all__ = ["FOLLOW_EVERY", "Replica"]

log = logging.getLogger(__name__)

FOLLOW_EVERY = 0.5  # seconds between two reads of what the other instances wrote
HEARTBEAT_EVERY = 2.0  # seconds between two "still running" of a member
HEARTBEAT_TTL = 10.0  # seconds after its last one that a member counts as gone
COMPACT_TRIES = 5
COMPACT_BACKOFF = 10.0  # seconds before a compaction that lost every try is tried again
CLAIM_TRIES = 8
RETRY_EVERY = 1.0  # seconds after an unexpected failure of following


class Replica:
    """An owner's log, shared with the other instances on Redis (see the module)."""

    def __init__(
        self,
        log: Log,
        name: str,
        *,
        apply: Callable[[Mapping[str, Json]], object],
        clear: Callable[[], object],
        records: Callable[[], Iterable[Mapping[str, Json]]],
        changed: Callable[[], object] | None = None,
        every: float | None = None,
        members: bool = False,
        compact_when_due: bool = True,
    ) -> None:
        self.log = log
        self.name = name
        self.every = FOLLOW_EVERY if every is None else every  # seconds between two reads
        self.members = members
        self.compact_when_due = compact_when_due  # False: the owner compacts by itself
        self._apply, self._clear, self._records = apply, clear, records
        self._changed = changed
        # On Redis (duck-typed: proxy.store.redis imports coredis, loaded only when asked for).
        self._shared = cast("RedisLog", log) if hasattr(log, "try_compact") else None
        self.node = self._shared.writer if self._shared is not None else ""
        self._lock = trio.Lock()
        # A claim or commit went unanswered: whether it is in the stream is unknown, and
        # the tail skips this writer's entries, so the next catch-up reads the whole log.
        self._stale = False
        self._started = self._finished = 0  # catch-ups begun, and the last one completed
        self.skipped = 0  # others' records apply refused

    @property
    def shared(self) -> bool:
        """True on Redis: other instances write this log too."""
        return self._shared is not None

    # -- the Log protocol, delegated ------------------------------------------------------------

    def append(self, record: Mapping[str, Json]) -> None:
        self.log.append(record)

    async def flush(self) -> None:
        await self.log.flush()

    @property
    def failed(self) -> bool:
        return self.log.failed

    async def compact(self, records: Iterable[Mapping[str, Json]] | None = None) -> None:
        """Replace the log's content with the state.  Local: with ``records`` (default
        ``records()``), as :meth:`Log.compact`.  Shared: ``records`` is ignored and
        ``records()`` read after catching up (compare-and-compact, see the module).

        Error handling: ``StorageUnavailable`` if Redis does not answer or every try lost.
        """
        shared = self._shared
        if shared is None:
            await self.log.compact(self._records() if records is None else records)
            return
        for _ in range(COMPACT_TRIES):
            await shared.flush()
            async with self._lock:
                await self._catch_up(shared)
                if shared.unflushed:  # appended meanwhile: in the state, not in the stream
                    continue
                if await shared.try_compact(self._records()):
                    log.info("the %s log compacted (shared)", self.name)
                    return
        raise StorageUnavailable() from StateError(
            f"the {self.name} log: {COMPACT_TRIES} compactions lost to other writers"
        )

    # -- several instances ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Apply what the other instances appended since the last read (one catch-up;
        concurrent calls share one that started after they were made).

        Error handling: ``StorageUnavailable`` when Redis does not answer.
        """
        shared = self._shared
        if shared is None:
            return
        ticket = self._started + 1  # any catch-up that starts from now on will do
        async with self._lock:
            if self._finished < ticket:  # none has run since the call: run one
                await self._catch_up(shared)

    async def claim(self, record: Mapping[str, Json], still: Callable[[], bool]) -> bool:
        """Append ``record`` only while ``still()`` holds on the caught-up state and no other
        writer appends in between; apply it then.  True if this instance's record went in.

        Error handling: ``StorageUnavailable`` when Redis does not answer (whether the
        record went in is then unknown: it is not applied here; claim again later).
        """
        shared = self._shared
        if shared is None:
            if not still():
                return False
            self._apply(record)
            self.log.append(record)
            await self.log.flush()
            return True
        for _ in range(CLAIM_TRIES):
            async with self._lock:
                await self._catch_up(shared)
                if not still():
                    return False
                if await self._try_append(shared, record):
                    self._apply(record)
                    self._notify()
                    return True
        return False

    async def commit(self, record: Mapping[str, Json], check: Callable[[], object]) -> None:
        """Shared only: append ``record`` in the stream's order (compare-and-append after
        catching up, ``check()`` run on the caught-up state first: it raises to refuse),
        then apply it; so every instance applies every such record in the same order
        (last writer wins the same way everywhere).  For changes that do not commute and
        are rare (runtime customers and backends, the portal).

        Error handling: what ``check`` raises; ``StorageUnavailable`` when Redis does not
        answer (nothing applied) or every try lost a race.
        """
        shared = self._shared
        if shared is None:
            raise RuntimeError("commit is for a shared log")
        for _ in range(CLAIM_TRIES):
            async with self._lock:
                await self._catch_up(shared)
                check()
                if await self._try_append(shared, record):
                    self._apply(record)
                    self._notify()
                    return
        raise StorageUnavailable() from StateError(
            f"the {self.name} log: {CLAIM_TRIES} tries lost to other writers"
        )

    async def alive(self, node: str) -> bool:
        """Whether the member ``node`` runs (its heartbeat has not run out); always True
        for this instance and on the local store.

        Error handling: ``StorageUnavailable`` when Redis does not answer.
        """
        shared = self._shared
        if shared is None or node == self.node:
            return True
        return await shared.store.alive(node)

    async def maintain(self) -> None:
        """Forever: recover a failed log, follow the others, compact when due (see the
        module); a member's heartbeat beside.  Local: the local log's own ``maintain``."""
        shared = self._shared
        if shared is None:
            durable: Any = self.log
            if hasattr(durable, "maintain"):
                await durable.maintain(self._records if self.compact_when_due else None)
            else:
                await trio.sleep_forever()
            return
        async with trio.open_nursery() as nursery:
            if self.members:
                nursery.start_soon(self._beat, shared)
            await self._follow(shared)

    # -- internals --------------------------------------------------------------------------------

    async def _follow(self, shared: RedisLog) -> None:
        down = False
        next_compaction = 0.0  # trio time: not before (after a compaction that lost)
        while True:
            await trio.sleep(self.every)
            try:
                if not await shared.recover():
                    continue
                await self.refresh()
                due = shared.compaction_due or shared.over_bound
                if self.compact_when_due and due and trio.current_time() >= next_compaction:
                    try:
                        await self.compact()
                    except StorageUnavailable as e:
                        next_compaction = trio.current_time() + COMPACT_BACKOFF
                        log.info("the %s log not compacted now: %s", self.name, e.__cause__)
            except StorageUnavailable as e:
                if not down:
                    log.warning("the %s log cannot follow the others: %s", self.name, e.__cause__)
                down = True
            except Exception:  # an entry that is not a record, a bug: logged, following goes on
                log.exception("the %s log: following the others failed", self.name)
                await trio.sleep(RETRY_EVERY)
            else:
                down = False

    async def _try_append(self, shared: RedisLog, record: Mapping[str, Json]) -> bool:
        # Lost, the log's position is put back where this replica's state is: the next
        # catch-up reads what was missed through the tail, which skips this writer's own
        # entries (a log read past them on a lost race would leave them unapplied here).
        gen, seen = shared._gen, shared._seen
        try:
            won = await shared.try_append([record])
        except StorageUnavailable:
            self._stale = True  # in or not: the next catch-up reads everything again
            raise
        if not won:
            shared._gen, shared._seen = gen, seen
        return won

    async def _catch_up(self, shared: RedisLog) -> None:
        """One tail, applied (the caller holds ``_lock``)."""
        self._started += 1
        number = self._started
        try:
            await self._read_and_apply(shared)
        except StorageUnavailable as e:  # the log is failed (/readyz) until Redis answers
            shared._fail(e.__cause__)
            raise
        self._finished = number

    async def _read_and_apply(self, shared: RedisLog) -> None:
        if self._stale:
            reset, records = True, []
        else:
            tail = await shared.tail()
            reset, records = tail.reset, tail.records
        if reset:
            records = await shared.reread_with_queued()
            self._stale = False
            self._clear()
            log.info("the %s log read again whole: state rebuilt", self.name)
        for record in records:
            self._take(record)
        if reset or records:
            self._notify()

    def _take(self, record: Record) -> None:
        try:
            self._apply(record)
        except (StateError, ValueError) as e:  # decided elsewhere: not this replica's to refuse
            self.skipped += 1
            log.error("the %s log: another instance's record skipped: %s", self.name, e)

    def _notify(self) -> None:
        if self._changed is not None:
            try:
                self._changed()
            except Exception:  # a bug in the owner must not stop following
                log.exception("the %s log: applying the others' changes failed", self.name)

    async def _beat(self, shared: RedisLog) -> None:
        try:
            while True:
                with contextlib.suppress(StorageUnavailable):  # the follower logs it
                    await shared.store.beat(self.node, HEARTBEAT_TTL)
                await trio.sleep(HEARTBEAT_EVERY)
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1.0),
                contextlib.suppress(StorageUnavailable),  # it runs out by itself
            ):
                await shared.store.leave(self.node)
