"""The local :class:`~proxy.store.Log`: one framed, fsynced file per log under ``state_dir``.

Files::

    state_dir/
      <name>.log        records, one framed line each (:mod:`proxy.store.framing`)
      <name>.log.tmp    a compaction being written; removed at start-up

The directory is the ledger's: the gateway process that holds its lock owns every log
in it (:func:`proxy.ledger.files.lock_state_dir`).  Reading and writing the file (blocking)
is :mod:`proxy.store.logfile`; here is the log's state and its trio side.

Durability.  :meth:`LocalLog.append` only queues the record's line.  :meth:`LocalLog.flush`
writes everything queued and fsyncs it in a worker thread (the file's directory entry
too, when the write created it), as one batch that concurrent flushes share.

Compaction.  :meth:`LocalLog.compact` takes the owner's records (the whole state, read at
once) and, while appends and flushes go on into the old file, writes them to
``<name>.log.tmp`` and fsyncs it; then, under the flush lock, adds every record appended
since the call, fsyncs again, renames the file over ``<name>.log`` and fsyncs the
directory.  A crash before the rename leaves the old file, after it the new one: the same
state either way.  If that last step fails or overruns, which file is in place is unknown
until its thread has returned: the log is failed, and recovery then looks (the temporary
file still there: the old file is) before it writes again.

Storage faults.  A write or fsync that fails (full or read-only ``state_dir``) or overruns
``timeout`` (a frozen disk) makes the log *failed*: ``flush`` raises
:class:`~proxy.errors.StorageUnavailable`, the records stay queued in memory.  Recovery
(at the next flush, and every second in :meth:`LocalLog.maintain`) cuts the file back to
the bytes known durable, which removes a partly written batch, and writes the queue
again; never while an abandoned write is still running in its thread.  A compaction also
recovers, as it replaces the file.

Bounds.  A record's JSON is at most ``MAX_RECORD_BYTES``; a log file at most
``max_bytes``: a flush that would pass it fails (the owner must compact), and start-up
refuses a larger file, so what is on disk can always be replayed.

Error handling: start-up raises ``StateError`` naming the file and byte offset (corruption,
an unreadable or oversized file); once running, only ``StorageUnavailable`` (from ``flush``
and ``compact``) and ``ValueError`` from ``append`` for a record that is not JSON or too
large (the owner's bug).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.errors import StateError, StorageUnavailable
from proxy.store import Json, Record
from proxy.store import logfile as files
from proxy.store.io import BoundedIo, Overran, commit_within
from proxy.store.logfile import MAX_LOG_BYTES, SUFFIX, create_log, log_path, read_records

__all__ = [
    "MAX_LOG_BYTES",
    "LocalLog",
    "LogStatistics",
    "create_log",
    "log_path",
    "open_log",
    "read_records",
]

log = logging.getLogger(__name__)

SECONDS = 1.0
COMPACTION_TIMEOUTS = 30  # a compaction may take this many times the write timeout
COMPACT_MIN_BYTES = 1 << 20  # compaction_due: the file grew past twice its compacted size and this
RETRY_EVERY = 1 * SECONDS


def open_log(
    state_dir: Path, name: str, *, timeout: float, max_bytes: int = MAX_LOG_BYTES
) -> tuple[LocalLog, list[Record]]:
    """:func:`proxy.store.open_local_log` (blocking); ``max_bytes`` bounds the file."""
    path = log_path(state_dir, name)
    loaded = files.load(path, max_bytes)
    local = LocalLog(path, loaded.size, exists=loaded.exists, timeout=timeout, max_bytes=max_bytes)
    return local, loaded.records


# -- the log -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogStatistics:
    name: str
    records_appended: int
    records_written: int
    bytes_written: int
    flushes: int  # calls to flush()
    batches: int  # writes that flushes shared
    compactions: int
    pending: int  # appended, not yet durable
    size: int  # bytes durable on disk
    failures: int  # writes that failed or overran the timeout
    recoveries: int  # times the log wrote again after a failure
    failed: bool


class LocalLog:
    """A :class:`~proxy.store.Log` in one file; built by :func:`open_log`."""

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        exists: bool,
        timeout: float = math.inf,
        max_bytes: int = MAX_LOG_BYTES,
    ) -> None:
        self.path = path
        self.name = path.name.removesuffix(SUFFIX)
        self.timeout = timeout
        self.compaction_timeout = COMPACTION_TIMEOUTS * timeout
        self.max_bytes = max_bytes
        self._size = self._compacted_size = size  # bytes known durable
        self._exists = exists  # the file and its directory entry are durable
        self._pending: list[bytes] = []  # lines of records _durable+1 .. _appended
        self._appended = self._durable = 0
        self._watches: list[list[bytes]] = []  # per running compaction: lines appended since
        self._lock = trio.Lock()  # one file operation at a time
        self._compacting = trio.Lock()
        self._io = BoundedIo(path)  # work on the log itself
        self._tmp_io = BoundedIo(files.tmp_path(path))  # a compaction's writing of its new file
        self._limbo: tuple[int, int] | None = None  # a failed rename: the new file's size, lines
        self._failed: StateError | None = None
        self._failed_event = trio.Event()
        self._counts = dict.fromkeys(
            ("written", "bytes", "flushes", "batches", "compactions", "failures", "recoveries"), 0
        )

    # -- appending and flushing ----------------------------------------------------------------

    def append(self, record: Mapping[str, Json]) -> None:
        """Queue ``record``; durable once a later :meth:`flush` returns.

        Error handling: never raises for a storage fault; ``ValueError`` for a record
        that is not JSON or over ``MAX_RECORD_BYTES``.
        """
        line = self._line(record)
        self._pending.append(line)
        for watch in self._watches:
            watch.append(line)
        self._appended += 1

    @staticmethod
    def _line(record: Mapping[str, Json]) -> bytes:
        return files.line(record)

    async def flush(self) -> None:
        """Return once every record appended so far is written and fsynced.

        Error handling: ``StorageUnavailable`` if the log is failed and cannot recover
        now, fails now, or the records are not durable within ``timeout``.
        """
        self._counts["flushes"] += 1
        target = self._appended
        if self._durable >= target:
            return
        await commit_within(
            self.timeout,
            self._lock,
            lambda: self._durable >= target,
            self._write_pending,
            str(self.path),
        )

    async def _write_pending(self, deadline: float) -> None:
        """Write the queue (after cutting a failed batch off, if failed); under the lock."""
        recovering = self._failed is not None
        if recovering:
            await self._ready_to_recover(deadline)
        count = len(self._pending)
        data = b"".join(self._pending)
        if self._size + len(data) > self.max_bytes:
            self._fail(StateError(f"{self.path} would pass {self.max_bytes} bytes: compact it"))
            raise StorageUnavailable() from self._failed
        cut = self._size if recovering else None
        try:
            await self._io.run(deadline, files.write_batch, self.path, data, cut, not self._exists)
        except (StateError, Overran) as e:
            self._fail(e)
            raise StorageUnavailable() from self._failed
        del self._pending[:count]
        self._durable += count
        self._size += len(data)
        self._exists = True
        self._count(written=count, bytes=len(data), batches=1)
        if recovering:
            self._recovered()

    async def _ready_to_recover(self, deadline: float) -> None:
        """Raise ``StorageUnavailable`` unless a failed log may be written again now."""
        if self._io.running:  # an abandoned write: never two threads on one file
            raise StorageUnavailable() from self._failed
        if self._limbo is not None:
            try:
                await self._settle(deadline)
            except (StateError, Overran) as e:
                self._fail(e)
                raise StorageUnavailable() from self._failed

    # -- failure and recovery ------------------------------------------------------------------

    def _fail(self, error: StateError | Overran) -> None:
        if self._failed is None:
            self._failed = error if isinstance(error, StateError) else StateError(str(error))
            self._failed_event.set()
            log.error("the %s log cannot write (%s); its records wait in memory", self.name, error)
        self._counts["failures"] += 1

    def _recovered(self) -> None:
        self._failed, self._failed_event = None, trio.Event()
        self._count(recoveries=1)
        log.warning("the %s log writes again", self.name)

    async def recover(self) -> bool:
        """If failed, try once to write the queue again; True if the log is not failed.

        Error handling: never raises for a storage fault (False).
        """
        if self._failed is None:
            return True
        with trio.move_on_after(self.timeout) as waiting:
            async with self._lock:
                if self._failed is not None:
                    try:
                        await self._write_pending(waiting.deadline)
                    except StorageUnavailable:
                        return False
        return self._failed is None

    async def maintain(
        self,
        records: Callable[[], Iterable[Mapping[str, Json]]] | None = None,
        *,
        every: float = RETRY_EVERY,
    ) -> None:
        """Forever: every ``every`` seconds, recover a failed log, and compact from
        ``records()`` (the owner's state) when due or when recovery alone cannot help.

        A supervised background task (``gw.spawn("store", log.maintain, state.records)``).
        Error handling: a failed compaction is logged and retried.
        """
        while True:
            await trio.sleep(every)
            if await self.recover() and not self.compaction_due:
                continue
            if records is None or self._io.running:  # a frozen write: nothing to try yet
                continue
            try:
                await self.compact(records())
            except StorageUnavailable as e:
                if not self.failed:  # else its failure was logged once already
                    log.warning("the %s log was not compacted: %s", self.name, e.__cause__)

    async def recover_forever(self, every: float = RETRY_EVERY) -> None:
        """:meth:`maintain` without compaction: for an owner that compacts by itself."""
        await self.maintain(None, every=every)

    @property
    def failed(self) -> bool:
        """Cannot make records durable now: a write failed, or one runs past its bound."""
        return self._failed is not None or self._io.overrunning()

    @property
    def compaction_due(self) -> bool:
        """The file has grown well past what its last compaction (or start-up) left."""
        return self._size > max(2 * self._compacted_size, COMPACT_MIN_BYTES)

    # -- compaction ----------------------------------------------------------------------------

    async def compact(self, records: Iterable[Mapping[str, Json]]) -> None:
        """Replace the file with ``records`` and every record appended after this call.

        Error handling: ``StorageUnavailable`` if it is not done within
        ``compaction_timeout`` or cannot be written; the old file then holds all, as
        before.  ``ValueError`` for a record that is not JSON or too large.
        """
        content = b"".join(self._line(r) for r in records)
        watch: list[bytes] = []
        self._watches.append(watch)  # before any await: everything appended after is in it
        try:
            with trio.move_on_after(self.compaction_timeout) as scope:
                async with self._compacting:
                    await self._compact(content, watch, scope.deadline)
                    return
            raise StorageUnavailable() from StateError(
                f"{self.path} was not compacted within {self.compaction_timeout} s"
            )
        finally:
            self._watches.remove(watch)

    async def _compact(self, content: bytes, watch: list[bytes], deadline: float) -> None:
        tmp = files.tmp_path(self.path)
        if self._tmp_io.running:
            raise StorageUnavailable() from StateError(
                f"an earlier compaction of {self.path} is still running"
            )
        try:
            await self._tmp_io.run(deadline, files.write_synced, tmp, content, os.O_TRUNC)
        except (StateError, Overran) as e:
            await self._remove_tmp(deadline)
            raise StorageUnavailable() from e
        async with self._lock:  # nothing is appended to the old file from here on
            await self._replace(tmp, content, watch, deadline)

    async def _replace(
        self, tmp: Path, content: bytes, watch: list[bytes], deadline: float
    ) -> None:
        """Under the lock: add the records appended since the call, rename over the log.

        Once the rename has been attempted, a failure leaves either file in place: the
        log is failed, and recovery (:meth:`_settle`) finds out which.
        """
        tail = b"".join(watch)
        size, count = len(content) + len(tail), len(self._pending)  # pending: all in the new file
        if self._io.running or self._limbo is not None or size > self.max_bytes:
            await self._remove_tmp(deadline)
            raise StorageUnavailable() from StateError(
                f"{self.path} not compacted: an earlier write is unsettled, "
                f"or {size} bytes would pass {self.max_bytes}"
            )
        try:
            await self._io.run(deadline, files.finish_compaction, tmp, tail, self.path)
        except (StateError, Overran) as e:
            self._limbo = (size, count)
            self._fail(e)
            raise StorageUnavailable() from e
        self._compacted(size, count)

    def _compacted(self, size: int, count: int) -> None:
        """The new file is in place, holding the first ``count`` pending records."""
        del self._pending[:count]
        self._durable += count
        self._count(written=count, compactions=1)
        self._size = self._compacted_size = size
        self._exists = True
        if self._failed is not None:
            self._recovered()

    async def _settle(self, deadline: float) -> None:
        """After a failed rename (no thread still running): adopt whichever file is there."""
        assert self._limbo is not None
        size, count = self._limbo
        renamed = await self._io.run(
            deadline, files.settle_rename, files.tmp_path(self.path), self.path
        )
        self._limbo = None
        if renamed:
            del self._pending[:count]
            self._durable += count
            self._size = self._compacted_size = size
            self._exists = True

    async def _remove_tmp(self, deadline: float) -> None:
        if not self._tmp_io.running:  # else an abandoned write still uses it
            with contextlib.suppress(Overran):
                await self._tmp_io.run(deadline, files.remove, files.tmp_path(self.path))

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> LogStatistics:
        c = self._counts
        return LogStatistics(
            name=self.name,
            records_appended=self._appended,
            records_written=c["written"],
            bytes_written=c["bytes"],
            flushes=c["flushes"],
            batches=c["batches"],
            compactions=c["compactions"],
            pending=len(self._pending),
            size=self._size,
            failures=c["failures"],
            recoveries=c["recoveries"],
            failed=self.failed,
        )

    def _count(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            self._counts[name] += amount
