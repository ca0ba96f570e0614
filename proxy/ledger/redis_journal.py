"""The ledger's journal on Redis (``[store] kind = "redis"``), for ONE gateway instance.

The ledger's records go to the Redis log ``ledger`` (:class:`~proxy.store.redis.RedisLog`,
one stream), numbered by ``seq`` as in the file journal.  A compaction replaces the
stream with a header ``{"op": "snapshot", "seq": N, "count": K}`` and the K
reservations, each ``{"op": "held", ...its fields}``; the records after it follow
with ``seq`` N+1, N+2, ...  Replay checks the numbering has no gap.

One instance only.  The admission decisions are made on this process's in-memory
ledger, so two gateways writing one ledger would overbook.  At start-up the gateway
takes the lease ``<prefix>ledger:owner`` (``SET NX PX``) and renews it every
``LEASE / 3`` seconds; a second gateway on the same Redis and prefix does not start
(``StateError``) while the lease is held.  A gateway killed with SIGKILL leaves the
lease to expire (``LEASE`` seconds) before another may take over.  Every write of the
ledger's log is fenced by the lease (the append script checks the owner key holds this
gateway's id, atomically with the write), so a gateway that lost its lease (cut off
from Redis for longer than it) writes nothing more: its journal is failed, creates
answer an error, /readyz is 503, until it holds the lease again.  The shared ledger
for several instances (compare-and-append on this log) is designed in
docs/decisions.md, "Store on Redis", and not built yet.

Error handling: start-up raises ``StateError`` (a record that is not the ledger's, a gap
in ``seq``, the lease held by another gateway, Redis unreachable); once running, only
``StorageUnavailable`` from ``flush``.
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
from proxy.ledger.model import LedgerState, Record, Reserve
from proxy.ledger.service import Ledger
from proxy.store import Json
from proxy.store import Record as LogRecord
from proxy.store.redis import RedisLog, RedisStore

__all__ = ["LEASE", "RedisJournal", "open_redis_ledger"]

log = logging.getLogger(__name__)

LOG = "ledger"
LEASE = 10.0  # seconds the ownership of the ledger lasts without a renewal

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


class RedisJournal:
    """The ledger's :class:`~proxy.ledger.service.Journal` on a :class:`RedisLog`."""

    def __init__(self, redis_log: RedisLog, last_seq: int) -> None:
        self.log = redis_log
        self._seq = last_seq
        self.lease_held = True

    def append(self, record: Record) -> None:
        self._seq += 1
        self.log.append(record_payload(self._seq, record))

    async def flush(self) -> None:
        """Error handling: ``StorageUnavailable`` when Redis does not take the records
        in time, or while this gateway does not hold the ledger's lease."""
        if not self.lease_held:
            raise StorageUnavailable() from StateError("the ledger's Redis lease is not held")
        await self.log.flush()

    @property
    def failed(self) -> bool:
        return self.log.failed or not self.lease_held

    def snapshot_records(self, state: LedgerState) -> list[LogRecord]:
        """What a compaction writes: the header and every reservation (read at once)."""
        held: list[LogRecord] = [{"op": "held", **_json(reservation_fields(r))} for r in state]
        header: LogRecord = {"op": "snapshot", "seq": self._seq, "count": len(held)}
        return [header, *held]


def replay(records: list[LogRecord]) -> tuple[LedgerState, int]:
    """The ledger state the log's records make, and the last ``seq``.

    Error handling: ``StateError`` naming the record's position for one that is not
    the ledger's, a gap in ``seq``, or a snapshot missing reservations.
    """
    state, last, expected_held = LedgerState(), 0, 0
    for index, payload in enumerate(records):
        where = f"redis ledger log, record {index + 1}"
        try:
            last, expected_held = _replay_one(state, payload, last, expected_held)
        except (ValueError, TypeError, KeyError) as e:
            raise StateError(f"{where}: {type(e).__name__}: {e}") from None
    if expected_held:
        raise StateError(f"redis ledger log: its snapshot misses {expected_held} reservations")
    return state, last


def _replay_one(
    state: LedgerState, payload: LogRecord, last: int, expected_held: int
) -> tuple[int, int]:
    op = payload.get("op")
    if op == "snapshot":
        seq, count = payload["seq"], payload["count"]
        if not isinstance(seq, int) or not isinstance(count, int) or last or expected_held:
            raise ValueError("a snapshot header only at the start, with int seq and count")
        return seq, count
    if op == "held":
        if not expected_held:
            raise ValueError("a snapshot reservation without its header")
        entry = decode_record({**payload, "op": "reserve", "seq": last})
        assert isinstance(entry.record, Reserve)
        state.apply(entry.record)
        return last, expected_held - 1
    if expected_held:
        raise ValueError(f"the snapshot misses {expected_held} reservations")
    entry = decode_record(payload)
    if entry.seq != last + 1:
        raise ValueError(f"record {entry.seq} follows record {last}")
    state.apply(entry.record)
    return entry.seq, 0


@contextlib.asynccontextmanager
async def open_redis_ledger(
    store: RedisStore, *, clock: Callable[[], float] = time.time, lease: float | None = None
) -> AsyncIterator[Ledger]:
    """The ledger from the store's ``ledger`` log, kept there while the block runs.

    Error handling: ``StateError`` when another gateway holds the ledger's lease, or
    the log cannot be replayed (start-up stops: it never goes on empty).
    """
    lease = LEASE if lease is None else lease
    redis_log, records = store.open(LOG)
    owner = store.key("ledger", "owner")
    try:
        taken = await store.script_source(_RENEW, [owner], [redis_log.writer, int(lease * 1000)])
    except StorageUnavailable as e:
        raise StateError(f"cannot take the ledger's lease: {e.__cause__}") from None
    if not taken:
        raise StateError(
            f"another gateway holds the ledger on this Redis ({owner}); one instance per "
            f"key_prefix until several are supported (a killed one's lease ends in {lease} s)"
        )
    redis_log.fence = (owner, redis_log.writer)  # no write once another holds the lease
    state, last = replay(records)
    journal = RedisJournal(redis_log, last)
    ledger = Ledger(state, journal, clock)
    log.info("ledger: %d reservations from Redis (record %d)", len(list(state)), last)
    try:
        async with _single_errors(), trio.open_nursery() as nursery:
            nursery.start_soon(_renew_forever, store, journal, owner, lease)
            nursery.start_soon(redis_log.maintain, lambda: journal.snapshot_records(ledger.state))
            try:
                yield ledger
            finally:
                nursery.cancel_scope.cancel()
    finally:  # on a clean stop; when cancelled, coredis' tasks are too: the lease expires
        with trio.CancelScope(shield=True), contextlib.suppress(StorageUnavailable):
            await _release(store, owner, redis_log.writer)


async def _renew_forever(
    store: RedisStore, journal: RedisJournal, owner: str, lease: float
) -> None:
    """Renew the lease every third of it; without it the journal is failed."""
    while True:
        await trio.sleep(lease / 3)
        try:
            held = await store.script_source(
                _RENEW, [owner], [journal.log.writer, int(lease * 1000)]
            )
        except StorageUnavailable:
            held = None  # Redis down: the log is failed anyway; the lease is checked again
        if held == 0 and journal.lease_held:
            log.error("the ledger's Redis lease is held by another gateway: not writing")
        if held is not None:
            journal.lease_held = held != 0


async def _release(store: RedisStore, owner: str, writer: str) -> None:
    release = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end"
    await store.script_source(release, [owner], [writer])


@contextlib.asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """The ``async with`` body's exception as itself, not as a group of one (the
    nursery's tasks log and never raise)."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _json(fields: dict[str, Any]) -> dict[str, Json]:
    return fields
