"""The durable ledger store: an append-only journal under ``state_dir``, compacted by snapshots.

Files (formats in :mod:`proxy.ledger.codec`)::

    state_dir/
      lock              flock'ed by the one process that owns the directory
      snapshot          every reservation after record ``seq`` (replaced atomically)
      snapshot.tmp      a snapshot being written; ignored and removed at start-up
      journal.00000007  records, one per line, numbered by ``seq``; segments in order

Durability.  :meth:`FileJournal.append` only buffers.  :meth:`FileJournal.flush` writes
the buffer and fsyncs it in a worker thread; the ledger awaits it before an answer
leaves.  Flushes commit as a group: while one batch is being written and fsynced,
later callers wait on the lock, and the next holder writes everything buffered by
then, so a caller whose record is already in a written batch returns at once.

Compaction, and why a crash at any point leaves a loadable state.  A snapshot
(1) under the flush lock, with no await in between, takes the state and the ``seq`` of
the last record applied to it, and makes later writes go to a new segment; (2) writes
``snapshot.tmp``, fsyncs it, renames it over ``snapshot`` and fsyncs the directory;
(3) removes the old segments.  A crash before the rename leaves the old snapshot and
every segment; after it, the new snapshot and perhaps old segments, whose records it
already covers, so replay skips them by ``seq`` and nothing counts twice.  A segment
file is fsynced with the directory when created, so a record fsynced into it is
never lost to a missing directory entry.

Error handling: every ``OSError`` becomes :class:`~proxy.errors.StateError` naming the
file (in :mod:`proxy.ledger.files`, which does the blocking file work).  At start-up, a
torn last record is dropped (with a warning) and its file truncated; corruption anywhere
else stops start-up.  If a write or fsync fails, the journal is *failed*: the batch may
be partly on disk, so nothing more is appended after it and every later
``append``/``flush``/``snapshot`` raises ``StateError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.errors import StateError
from proxy.ledger.codec import Snapshot, encode_record
from proxy.ledger.files import (
    LOCK,
    SNAPSHOT,
    SNAPSHOT_TMP,
    JournalPosition,
    SegmentFile,
    load_state,
    lock_state_dir,
    segment_name,
    write_snapshot,
)
from proxy.ledger.model import LedgerState, Record
from proxy.ledger.service import Ledger

__all__ = [
    "LOCK",
    "SNAPSHOT",
    "SNAPSHOT_TMP",
    "FileJournal",
    "JournalPosition",
    "JournalStatistics",
    "load_state",
    "open_durable_ledger",
    "segment_name",
]

log = logging.getLogger(__name__)

SECONDS = 1.0


# -- the journal -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    records_appended: int
    records_written: int
    bytes_written: int
    flushes: int  # calls to flush()
    batches: int  # writes that flushes shared
    fsyncs: int  # of segment files and of the directory
    snapshots: int
    pending: int  # appended, not yet written


class FileJournal:
    """The ledger's :class:`~proxy.ledger.service.Journal`, kept in ``state_dir``.

    ``fsync=False`` still writes every batch before ``flush`` returns (a crash of the
    process loses nothing) but leaves it to the OS when it reaches the disk (a power
    loss may lose the latest records); snapshots are fsynced either way.
    """

    def __init__(
        self,
        state_dir: Path,
        position: JournalPosition,
        *,
        fsync: bool = True,
        snapshot_records: int = 100_000,
    ) -> None:
        self.state_dir = state_dir
        self.snapshot_records = snapshot_records
        self._file = SegmentFile(state_dir, fsync)
        self._appended = self._durable = position.last_seq
        self._pending: list[bytes] = []
        self._generations = list(position.generations)
        self._generation = max(self._generations, default=0) + 1
        self._generations.append(self._generation)
        self._since_snapshot = position.last_seq - position.snapshot_seq
        self._compaction_due = trio.Event()
        self._flush_lock = trio.Lock()
        self._snapshot_lock = trio.Lock()
        self._failed: StateError | None = None
        self._counts = dict.fromkeys(("written", "bytes", "flushes", "batches", "fsyncs"), 0)
        self._snapshots = 0

    def append(self, record: Record) -> None:
        """Buffer ``record``; it is durable once a later :meth:`flush` returns."""
        self._raise_if_failed()
        self._appended += 1
        self._pending.append(encode_record(self._appended, record))
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_records:
            self._compaction_due.set()

    async def flush(self) -> None:
        """Return once every record appended so far is written (and fsynced).

        Error handling: raises ``StateError`` if the journal cannot be written; from
        then on the journal is failed (see the module docstring).
        """
        self._counts["flushes"] += 1
        target = self._appended
        if self._durable >= target:
            self._raise_if_failed()
            return
        async with self._flush_lock:
            if self._durable < target:  # else a batch written meanwhile included ours
                await self._write_pending()

    async def _write_pending(self) -> None:
        self._raise_if_failed()
        batch, self._pending = self._pending, []
        upto = self._appended
        data = b"".join(batch)
        try:
            fsyncs = await trio.to_thread.run_sync(self._file.append, self._generation, data)
        except StateError as e:
            self._failed = e
            raise
        self._durable = upto
        self._count(written=len(batch), bytes=len(data), batches=1, fsyncs=fsyncs)

    async def snapshot(self, state: LedgerState) -> None:
        """Write ``state`` (which must hold every record appended) as the new snapshot.

        Error handling: raises ``StateError`` if it cannot be written; the journal
        keeps every record then, and stays usable.
        """
        async with self._snapshot_lock:
            async with self._flush_lock:
                self._raise_if_failed()
                covered = Snapshot(self._appended, tuple(state))
                retired = tuple(self._generations)
                self._rotate()
            try:
                fsyncs = await trio.to_thread.run_sync(
                    write_snapshot, self.state_dir, covered, retired
                )
            except StateError:
                self._generations[:0] = retired  # still on disk, for the next snapshot
                raise
            self._snapshots += 1
            self._count(fsyncs=fsyncs)

    def _rotate(self) -> None:
        self._generation += 1
        self._generations = [self._generation]
        self._since_snapshot = 0
        self._compaction_due = trio.Event()

    async def wait_compaction_due(self) -> None:
        """Return once ``snapshot_records`` records have been appended since the last snapshot."""
        await self._compaction_due.wait()

    @property
    def changed_since_snapshot(self) -> bool:
        return self._since_snapshot > 0

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def close(self) -> None:
        """Close the segment file (blocking, but only a ``close``)."""
        self._file.close()

    def statistics(self) -> JournalStatistics:
        return JournalStatistics(
            records_appended=self._appended,
            records_written=self._counts["written"],
            bytes_written=self._counts["bytes"],
            flushes=self._counts["flushes"],
            batches=self._counts["batches"],
            fsyncs=self._counts["fsyncs"],
            snapshots=self._snapshots,
            pending=len(self._pending),
        )

    def _count(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            self._counts[name] += amount

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise StateError(f"the journal in {self.state_dir} failed: {self._failed}")


# -- the ledger, durable -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_durable_ledger(
    state_dir: Path,
    *,
    snapshot_every: float = 60 * SECONDS,
    snapshot_records: int = 100_000,
    fsync: bool = True,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Ledger]:
    """Load the ledger from ``state_dir`` and keep it there while the block runs.

    A snapshot is written every ``snapshot_every`` seconds (if anything changed) or
    once ``snapshot_records`` records were appended, and a last one on exit.

    Error handling: ``StateError`` if the state is corrupt or unreadable (start-up
    stops; it never goes on empty) or if another process holds ``state_dir``.  A
    failing periodic snapshot is logged and retried; the journal still holds all.
    """
    lock = await trio.to_thread.run_sync(lock_state_dir, state_dir)
    try:
        state, position = await trio.to_thread.run_sync(load_state, state_dir)
        journal = FileJournal(state_dir, position, fsync=fsync, snapshot_records=snapshot_records)
        ledger = Ledger(state, journal, clock)
        try:
            async with _single_errors(), trio.open_nursery() as nursery:
                nursery.start_soon(_compact_periodically, journal, ledger, snapshot_every)
                yield ledger
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _final_snapshot(journal, ledger)
    finally:
        os.close(lock)


async def _compact_periodically(journal: FileJournal, ledger: Ledger, every: float) -> None:
    while True:
        with trio.move_on_after(every):
            await journal.wait_compaction_due()
        if journal.changed_since_snapshot:
            try:
                await journal.snapshot(ledger.state)
            except StateError:
                log.exception("ledger snapshot failed; the journal keeps every record")


async def _final_snapshot(journal: FileJournal, ledger: Ledger) -> None:
    try:
        if not journal.failed:
            await journal.flush()
            await journal.snapshot(ledger.state)
    except StateError:
        log.exception("final ledger snapshot failed; the journal keeps every record")
    finally:
        journal.close()


@contextlib.asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """Let an exception from the ``async with`` body out as itself, not as a group of one.

    The nursery's only task never raises (it logs), so a group of one is the body's.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
