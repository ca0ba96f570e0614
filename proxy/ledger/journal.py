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

Storage faults.  The in-memory ledger is authoritative; the journal is its durable copy.
If a write or fsync fails (a full or read-only ``state_dir``), or takes longer than
``timeout`` (a frozen disk), the journal is *failed*: the batch may be partly on disk,
so nothing more is appended to that segment, later records are kept only in memory, and
``flush`` raises :class:`~proxy.errors.StorageUnavailable` at once.  :meth:`recover`
(retried every ``retry_every`` seconds by :func:`open_durable_ledger`) writes a snapshot
of the whole state, which covers every record applied, into a new generation: a torn or
partial old segment no longer matters, and once the snapshot is renamed into place the
journal writes again.  A write abandoned for its timeout may still be running in its
thread; recovery waits until it has returned, so two threads never share a file.

Error handling: every ``OSError`` becomes :class:`~proxy.errors.StateError` naming the
file (in :mod:`proxy.ledger.files`, which does the blocking file work).  At start-up, a
torn last record is dropped (with a warning) and its file truncated; corruption anywhere
else, or a ``state_dir`` that cannot be written, stops start-up with ``StateError``.
Once running, the journal raises only ``StorageUnavailable`` (from ``flush``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.errors import StateError, StorageUnavailable
from proxy.ledger.codec import Snapshot, encode_record
from proxy.ledger.files import (
    LOCK,
    SNAPSHOT,
    SNAPSHOT_TMP,
    JournalPosition,
    SegmentFile,
    load_state,
    lock_state_dir,
    probe_writable,
    segment_name,
    write_snapshot,
)
from proxy.ledger.model import LedgerState, Record
from proxy.ledger.service import Ledger
from proxy.store.io import BoundedIo, Overran, commit_within

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
# A snapshot holds the whole ledger, a batch a few records: it may take this many times
# journal_timeout before it counts as overdue.
SNAPSHOT_TIMEOUTS = 30


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
    failures: int = 0  # writes that failed or overran the timeout
    recoveries: int = 0  # times the journal wrote again after a failure
    failed: bool = False  # cannot make changes durable now


class FileJournal:
    """The ledger's :class:`~proxy.ledger.service.Journal`, kept in ``state_dir``.

    ``fsync=False`` still writes every batch before ``flush`` returns (a crash of the
    process loses nothing) but leaves it to the OS when it reaches the disk (a power
    loss may lose the latest records); snapshots are fsynced either way.  ``timeout``
    bounds each batch's write (``[proxy] journal_timeout``; unbounded by default, for
    tests under a mock clock that jumps while a worker thread works), and
    ``snapshot_timeout`` (default ``SNAPSHOT_TIMEOUTS`` times ``timeout``) each snapshot.
    """

    def __init__(
        self,
        state_dir: Path,
        position: JournalPosition,
        *,
        fsync: bool = True,
        snapshot_records: int = 100_000,
        timeout: float = math.inf,
        snapshot_timeout: float | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.snapshot_records = snapshot_records
        self.timeout = timeout
        self.snapshot_timeout = (
            SNAPSHOT_TIMEOUTS * timeout if snapshot_timeout is None else snapshot_timeout
        )
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
        self._failed_event = trio.Event()
        self._buffering = True  # False while failed: the recovery snapshot will cover it all
        self._io = BoundedIo(state_dir)  # file operations in worker threads
        self._counts = dict.fromkeys(
            ("written", "bytes", "flushes", "batches", "fsyncs", "failures", "recoveries"), 0
        )
        self._snapshots = 0

    def append(self, record: Record) -> None:
        """Buffer ``record``; it is durable once a later :meth:`flush` returns.  Never raises."""
        self._appended += 1
        if self._buffering:
            self._pending.append(encode_record(self._appended, record))
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_records:
            self._compaction_due.set()

    async def flush(self) -> None:
        """Return once every record appended so far is written (and fsynced).

        Error handling: raises ``StorageUnavailable`` if the journal is failed, fails
        now, or the records are not written within ``timeout``; the records stay
        applied in memory, for :meth:`recover` to write.
        """
        self._counts["flushes"] += 1
        target = self._appended
        if self._durable >= target:
            return
        self._raise_if_failed()
        await commit_within(
            self.timeout,
            self._flush_lock,
            lambda: self._durable >= target,
            self._write_pending,
            f"the journal in {self.state_dir}",
        )

    async def _write_pending(self, deadline: float) -> None:
        self._raise_if_failed()
        batch, self._pending = self._pending, []
        upto = self._appended
        data = b"".join(batch)
        try:
            fsyncs = await self._io.run(deadline, self._file.append, self._generation, data)
        except (StateError, Overran) as e:
            self._fail(e)
            self._raise_if_failed()
        self._durable = upto
        self._count(written=len(batch), bytes=len(data), batches=1, fsyncs=fsyncs)

    def _fail(self, error: StateError | Overran) -> None:
        """Stop writing segments; keep the state in memory until :meth:`recover` writes it."""
        if self._failed is None:
            self._failed = error if isinstance(error, StateError) else StateError(str(error))
            self._failed_event.set()
            log.error(
                "the ledger journal cannot write (%s); creates and ends answer "
                "serverUnavailable, the state is kept in memory and retried",
                error,
            )
        self._counts["failures"] += 1
        self._buffering = False
        self._pending = []

    async def snapshot(self, state: LedgerState) -> None:
        """Write ``state`` (which must hold every record appended) as the new snapshot.

        Error handling: raises ``StateError`` if it cannot be written (in time, or while
        the journal is failed); the journal keeps every record then, and stays usable.
        """
        async with self._snapshot_lock:
            async with self._flush_lock:
                if self._failed is not None:
                    raise StateError(f"the journal in {self.state_dir} failed: {self._failed}")
                covered = Snapshot(self._appended, tuple(state))
                retired = tuple(self._generations)
                self._rotate()
            try:
                await self._write_snapshot(covered, retired)
            except StateError:
                self._generations[:0] = retired  # still on disk, for the next snapshot
                raise

    async def recover(self, state: LedgerState) -> bool:
        """After a failure, write all of ``state`` as a snapshot and write again; True if so.

        Not while an abandoned file operation is still running.  Error handling: a
        snapshot that cannot be written leaves the journal failed (False).
        """
        if self._failed is None:
            return True
        if self._io.running:
            return False
        async with self._snapshot_lock:
            async with self._flush_lock:
                covered = Snapshot(self._appended, tuple(state))
                retired = tuple(self._generations)
                self._rotate()
                self._pending, self._buffering = [], True  # later records follow the snapshot
            try:
                await self._write_snapshot(covered, retired)
            except StateError as e:
                self._generations[:0] = retired
                self._fail(e)
                return False
            self._durable = max(self._durable, covered.seq)
            self._failed, self._failed_event = None, trio.Event()
            self._count(recoveries=1)
            log.warning(
                "the ledger journal in %s writes again (snapshot at record %d)",
                self.state_dir,
                covered.seq,
            )
            return True

    async def _write_snapshot(self, covered: Snapshot, retired: tuple[int, ...]) -> None:
        deadline = trio.current_time() + self.snapshot_timeout
        try:
            fsyncs = await self._io.run(deadline, write_snapshot, self.state_dir, covered, retired)
        except Overran as e:
            raise StateError(str(e)) from e
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

    async def wait_failed(self) -> None:
        """Return once the journal is failed (at once if it is)."""
        await self._failed_event.wait()

    @property
    def changed_since_snapshot(self) -> bool:
        return self._since_snapshot > 0

    @property
    def failed(self) -> bool:
        """Cannot make changes durable now: a write failed, or one has run past its bound."""
        return self._failed is not None or self._io.overrunning()

    def close(self) -> None:
        """Close the segment file (blocking, but only a ``close``)."""
        if not self._io.running:  # else a thread abandoned for its timeout may still use it
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
            failures=self._counts["failures"],
            recoveries=self._counts["recoveries"],
            failed=self._failed is not None,
        )

    def _count(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            self._counts[name] += amount

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise StorageUnavailable() from self._failed


# -- the ledger, durable -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_durable_ledger(
    state_dir: Path,
    *,
    snapshot_every: float = 60 * SECONDS,
    snapshot_records: int = 100_000,
    fsync: bool = True,
    write_timeout: float = math.inf,
    retry_every: float = 1 * SECONDS,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Ledger]:
    """Load the ledger from ``state_dir`` and keep it there while the block runs.

    A snapshot is written every ``snapshot_every`` seconds (if anything changed) or
    once ``snapshot_records`` records were appended, and a last one on exit.  Each file
    operation is bounded by ``write_timeout``; a failed journal is recovered every
    ``retry_every`` seconds (see the module docstring).

    Error handling: ``StateError`` if the state is corrupt or unreadable (start-up
    stops; it never goes on empty), if ``state_dir`` cannot be written (a probe file
    is written and fsynced first), or if another process holds ``state_dir``.  A
    failing periodic snapshot is logged and retried; the journal still holds all.
    """
    lock = await trio.to_thread.run_sync(lock_state_dir, state_dir)
    try:
        state, position = await trio.to_thread.run_sync(load_state, state_dir)
        await _probe(state_dir, write_timeout)
        journal = FileJournal(
            state_dir,
            position,
            fsync=fsync,
            snapshot_records=snapshot_records,
            timeout=write_timeout,
        )
        ledger = Ledger(state, journal, clock)
        try:
            async with _single_errors(), trio.open_nursery() as nursery:
                nursery.start_soon(_compact_periodically, journal, ledger, snapshot_every)
                nursery.start_soon(_recover_periodically, journal, ledger, retry_every)
                yield ledger
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _final_snapshot(journal, ledger)
    finally:
        os.close(lock)


async def _probe(state_dir: Path, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await trio.to_thread.run_sync(probe_writable, state_dir, abandon_on_cancel=True)
        return
    raise StateError(f"cannot write {state_dir}: a test write took over {seconds} s")


async def _compact_periodically(journal: FileJournal, ledger: Ledger, every: float) -> None:
    while True:
        with trio.move_on_after(every):
            await journal.wait_compaction_due()
        if journal.changed_since_snapshot and not journal.failed:
            try:
                await journal.snapshot(ledger.state)
            except Exception:  # a background task: logged, never the end of the gateway
                log.exception("ledger snapshot failed; the journal keeps every record")


async def _recover_periodically(journal: FileJournal, ledger: Ledger, every: float) -> None:
    while True:
        await journal.wait_failed()
        await trio.sleep(every)
        try:
            await journal.recover(ledger.state)
        except Exception:  # a background task: logged, never the end of the gateway
            log.exception("ledger journal recovery failed; retrying")


async def _final_snapshot(journal: FileJournal, ledger: Ledger) -> None:
    try:
        if journal.statistics().failed:
            if not await journal.recover(ledger.state):
                log.error("the ledger journal cannot write: changes since it failed are lost")
        else:
            await journal.flush()
            await journal.snapshot(ledger.state)
    except (StateError, StorageUnavailable):
        log.exception("final ledger snapshot failed; the journal keeps every record")
    finally:
        journal.close()


@contextlib.asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """Let an exception from the ``async with`` body out as itself, not as a group of one.

    The nursery's tasks never raise (they log), so a group of one is the body's.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
