"""The local :class:`~proxy.store.Log`: one framed, fsynced file per log under ``state_dir``.

Files::

    state_dir/
      <name>.log        records, one framed line each (:mod:`proxy.store.framing`)
      <name>.log.tmp    a compaction being written; removed at start-up

The directory is the ledger's: the gateway process that holds its lock owns every log
in it (:func:`proxy.ledger.files.lock_state_dir`).

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
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson
import trio

from proxy.errors import StateError, StorageUnavailable
from proxy.store import MAX_RECORD_BYTES, Json, Record, encode
from proxy.store.files import fsync_dir, os_errors, replace_file, truncate, write_all
from proxy.store.framing import frame, scan_frames
from proxy.store.io import BoundedIo, Overran, commit_within

log = logging.getLogger(__name__)

SECONDS = 1.0
MAX_LOG_BYTES = 256 << 20  # one file, as written and as replayed
COMPACTION_TIMEOUTS = 30  # a compaction may take this many times the write timeout
COMPACT_MIN_BYTES = 1 << 20  # compaction_due: the file grew past twice its compacted size and this
RETRY_EVERY = 1 * SECONDS
SUFFIX = ".log"
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def log_path(state_dir: Path, name: str) -> Path:
    """The file of log ``name``; ``ValueError`` for a name that is not a short slug."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"a log name is lowercase letters, digits and '-', not {name!r}")
    return state_dir / f"{name}{SUFFIX}"


# -- start-up (blocking) -----------------------------------------------------------------------


def open_log(
    state_dir: Path, name: str, *, timeout: float, max_bytes: int = MAX_LOG_BYTES
) -> tuple[LocalLog, list[Record]]:
    """:func:`proxy.store.open_local_log`; ``max_bytes`` bounds the file."""
    path = log_path(state_dir, name)
    with os_errors("create state directory", state_dir):
        state_dir.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with os_errors("remove", tmp):
        tmp.unlink(missing_ok=True)
    data = _read_bounded(path, max_bytes)
    frames = scan_frames(data or b"", str(path), _decoder(str(path)))
    if frames.torn:
        log.warning(
            "%s: dropping a torn last record (bytes %d to %d)",
            path,
            frames.good_length,
            len(data or b""),
        )
        with os_errors("truncate", path):
            truncate(path, frames.good_length)
    local = LocalLog(
        path, frames.good_length, exists=data is not None, timeout=timeout, max_bytes=max_bytes
    )
    return local, list(frames.items)


def read_records(state_dir: Path, name: str, *, max_bytes: int = MAX_LOG_BYTES) -> list[Record]:
    """The records of log ``name`` as start-up would replay them, changing nothing (a torn
    tail is left in place): for inspecting a log another process writes, as tests do."""
    path = log_path(state_dir, name)
    data = _read_bounded(path, max_bytes) or b""
    return list(scan_frames(data, str(path), _decoder(str(path))).items)


def create_log(state_dir: Path, name: str, records: Iterable[Mapping[str, Json]]) -> None:
    """Write log ``name`` holding ``records``, atomically (blocking): for converting the
    file of an earlier format before :func:`open_log`.  ``StateError`` naming the file."""
    path = log_path(state_dir, name)
    content = b"".join(frame(encode(r)) for r in records)
    with os_errors("write", path):
        state_dir.mkdir(parents=True, exist_ok=True)
        replace_file(path, content)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _read_bounded(path: Path, max_bytes: int) -> bytes | None:
    """The file's bytes (None if there is none); ``StateError`` past ``max_bytes``."""
    with os_errors("read", path):
        try:
            with path.open("rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            return None
    if len(data) > max_bytes:
        raise StateError(f"{path}: over {max_bytes} bytes, more than a log may hold")
    return data


def _decoder(source: str) -> Callable[[bytes, int], Record]:
    def decode(body: bytes, offset: int) -> Record:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise StateError(f"{source}: invalid record at byte {offset}: {e}") from None
        if not isinstance(value, dict):
            raise StateError(f"{source}: invalid record at byte {offset}: not a JSON object")
        if len(body) > MAX_RECORD_BYTES:
            raise StateError(f"{source}: record at byte {offset} is over {MAX_RECORD_BYTES} B")
        return value

    return decode


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
        self._tmp_io = BoundedIo(_tmp(path))  # a compaction's writing of its new file
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
        return frame(encode(record))

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
            await self._io.run(deadline, self._write_file, data, cut, not self._exists)
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

    def _write_file(self, data: bytes, cut: int | None, create: bool) -> None:
        """Blocking: append ``data`` (at ``cut``, truncating what follows) and fsync."""
        with os_errors("write", self.path):
            flags = os.O_WRONLY | os.O_CREAT | (0 if cut is not None else os.O_APPEND)
            fd = os.open(self.path, flags, 0o600)
            try:
                if cut is not None:
                    os.ftruncate(fd, cut)
                    os.lseek(fd, cut, os.SEEK_SET)
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if create:
                fsync_dir(self.path.parent)  # the new file's entry must survive too

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
            if records is not None:
                try:
                    await self.compact(records())
                except StorageUnavailable as e:
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
        tmp = _tmp(self.path)
        if self._tmp_io.running:
            raise StorageUnavailable() from StateError(
                f"an earlier compaction of {self.path} is still running"
            )
        try:
            await self._tmp_io.run(deadline, _write_synced, tmp, content, os.O_TRUNC)
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
            await self._io.run(deadline, _finish_compaction, tmp, tail, self.path)
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
        renamed = await self._io.run(deadline, _settle_rename, _tmp(self.path), self.path)
        self._limbo = None
        if renamed:
            del self._pending[:count]
            self._durable += count
            self._size = self._compacted_size = size
            self._exists = True

    async def _remove_tmp(self, deadline: float) -> None:
        if not self._tmp_io.running:  # else an abandoned write still uses it
            with contextlib.suppress(Overran):
                await self._tmp_io.run(deadline, _remove, _tmp(self.path))

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


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    with os_errors("write", path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _finish_compaction(tmp: Path, tail: bytes, path: Path) -> None:
    """Blocking: add the records appended meanwhile, fsync, rename over ``path``, fsync dir."""
    if tail:
        _write_synced(tmp, tail, os.O_APPEND)
    with os_errors("rename to", path):
        os.replace(tmp, path)
        fsync_dir(path.parent)


def _settle_rename(tmp: Path, path: Path) -> bool:
    """Blocking: whether the compaction's rename happened (then fsync the directory);
    if not, remove the temporary file.  ``StateError`` naming the file."""
    with os_errors("settle the compaction of", path):
        if tmp.exists():
            tmp.unlink()
            return False
        fsync_dir(path.parent)
        return True


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror or e)
