"""The durable ledger store's file operations: blocking, so trio runs them in worker threads.

The layout, the write order and why it survives a crash are described in
:mod:`proxy.ledger.journal`; the formats in :mod:`proxy.ledger.codec`.  Every ``OSError``
becomes :class:`~proxy.errors.StateError` (:func:`proxy.store.files.os_errors`), naming the
file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import StateError
from proxy.ledger.codec import (
    Segment,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
    replay,
    scan_segment,
)
from proxy.ledger.model import LedgerState
from proxy.store.files import fsync_dir, os_errors, replace_file, truncate, write_all

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot"
SNAPSHOT_TMP = "snapshot.tmp"
LOCK = "lock"
PROBE = "write-probe"
PROBE_BYTES = 4096  # one page: a full file system refuses it
SEGMENT_PREFIX = "journal."


def segment_name(generation: int) -> str:
    return f"{SEGMENT_PREFIX}{generation:08d}"


# -- start-up (blocking; run it in a thread from trio) -----------------------------------------


@dataclass(frozen=True, slots=True)
class JournalPosition:
    """Where a loaded state stands, for the journal that continues it."""

    last_seq: int  # the last record applied
    snapshot_seq: int  # the last record the snapshot covers
    generations: tuple[int, ...]  # journal segments on disk, oldest first


def load_state(state_dir: Path) -> tuple[LedgerState, JournalPosition]:
    """Load the snapshot and replay the journal; a missing ``state_dir`` is a fresh start.

    Error handling: a torn last record is dropped and its file truncated (a warning
    is logged); anything else damaged or unreadable raises ``StateError`` naming the
    file and, where it applies, the byte offset.
    """
    _ensure_dir(state_dir)
    with os_errors("remove", state_dir / SNAPSHOT_TMP):
        (state_dir / SNAPSHOT_TMP).unlink(missing_ok=True)
    snapshot = _read_snapshot(state_dir / SNAPSHOT)
    generations = _generations(state_dir)
    segments = [_read_segment(state_dir / segment_name(g)) for g in generations]
    state, last = replay(snapshot, segments)
    return state, JournalPosition(last, snapshot.seq, tuple(generations))


def _ensure_dir(state_dir: Path) -> None:
    with os_errors("create state directory", state_dir):
        state_dir.mkdir(parents=True, exist_ok=True)


def _read_snapshot(path: Path) -> Snapshot:
    with os_errors("read", path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Snapshot(0, ())
    return decode_snapshot(data, str(path))


def _generations(state_dir: Path) -> list[int]:
    with os_errors("list", state_dir):
        names = [p.name for p in state_dir.iterdir()]
    suffixes = (n.removeprefix(SEGMENT_PREFIX) for n in names if n.startswith(SEGMENT_PREFIX))
    return sorted(int(s) for s in suffixes if s.isdigit())


def _read_segment(path: Path) -> tuple[str, Segment]:
    with os_errors("read", path):
        data = path.read_bytes()
    segment = scan_segment(data, str(path))
    if segment.torn:
        log.warning(
            "%s: dropping a torn last record (bytes %d to %d)",
            path,
            segment.good_length,
            len(data),
        )
        with os_errors("truncate", path):
            truncate(path, segment.good_length)
    return str(path), segment


def probe_writable(state_dir: Path) -> None:
    """Write, fsync and remove a small file: start-up's proof that ``state_dir`` takes writes.

    Error handling: ``StateError`` naming the file (full, read-only, no permission).
    """
    path = state_dir / PROBE
    with os_errors("write", path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, b"\0" * PROBE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()


def lock_state_dir(state_dir: Path) -> int:
    """Take the directory's lock (a file descriptor to close on exit), or raise StateError."""
    _ensure_dir(state_dir)
    path = state_dir / LOCK
    with os_errors("open", path):
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise StateError(f"{state_dir} is in use by another process") from e
        raise StateError(f"cannot lock {path}: {e.strerror or e}") from e
    return fd


# -- file operations for the journal (blocking; called from worker threads) --------------------


class SegmentFile:
    """Appends to the current segment; writes are serialized by the journal's flush lock.

    The file is opened for each batch and closed after it: between batches nothing
    under ``state_dir`` is open for writing (the lock is held on a read-only
    descriptor), so the file system can be remounted read-only, by an operator or by
    the kernel after an error, and a write after that fails cleanly with ``EROFS``.
    """

    def __init__(self, state_dir: Path, fsync: bool) -> None:
        self.state_dir = state_dir
        self.fsync = fsync
        self._created = 0  # the last generation whose file (and directory entry) exists

    def append(self, generation: int, data: bytes) -> int:
        """Write ``data`` at the end of segment ``generation``; returns the fsyncs done."""
        path = self.state_dir / segment_name(generation)
        with os_errors("write", path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fsyncs = self._created_now(generation)
                write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
                    fsyncs += 1
            finally:
                os.close(fd)
        return fsyncs

    def _created_now(self, generation: int) -> int:
        if self._created == generation:
            return 0
        self._created = generation
        if not self.fsync:
            return 0
        fsync_dir(self.state_dir)  # the new file's directory entry must survive too
        return 1

    def close(self) -> None:
        """Nothing stays open between batches; kept for the journal's close."""


def write_snapshot(state_dir: Path, snapshot: Snapshot, retired: tuple[int, ...]) -> int:
    """Replace the snapshot atomically, then remove the segments it covers; returns fsyncs.

    Error handling: ``StateError`` if the snapshot is not in place; a covered segment that
    cannot be removed is only logged.
    """
    final = state_dir / SNAPSHOT  # via SNAPSHOT_TMP, fsynced, renamed, directory fsynced
    with os_errors("replace", final):
        replace_file(final, encode_snapshot(snapshot))
    for generation in retired:
        _remove_covered(state_dir / segment_name(generation))
    return 2


def _remove_covered(path: Path) -> None:
    """Remove a segment the new snapshot covers; one left behind is skipped at load."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s, which the snapshot covers: %s", path, e.strerror or e)
