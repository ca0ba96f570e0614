"""A local log's file: its name, its replay at start-up, and its blocking writes.

Everything here blocks: start-up calls it directly, :class:`~proxy.store.local.LocalLog`
in worker threads.  Every ``OSError`` becomes ``StateError`` naming the file
(:func:`~proxy.store.files.os_errors`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from proxy.errors import StateError
from proxy.store import MAX_RECORD_BYTES, Json, Record, encode
from proxy.store.files import fsync_dir, os_errors, replace_file, truncate, write_all
from proxy.store.framing import Frames, frame, scan_frames

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 256 << 20  # one file, as written and as replayed
SUFFIX = ".log"
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def log_path(state_dir: Path, name: str) -> Path:
    """The file of log ``name``; ``ValueError`` for a name that is not a short slug."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"a log name is lowercase letters, digits and '-', not {name!r}")
    return state_dir / f"{name}{SUFFIX}"


def tmp_path(path: Path) -> Path:
    """Where a compaction writes the log's next content."""
    return path.with_name(path.name + ".tmp")


def line(record: Mapping[str, Json]) -> bytes:
    """One record's framed line; ``ValueError`` if it is not a bounded JSON record."""
    return frame(encode(record))


# -- start-up ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Loaded:
    records: list[Record]
    size: int  # bytes of intact records
    exists: bool


def load(path: Path, max_bytes: int) -> Loaded:
    """Replay ``path`` for the log that continues it: a leftover compaction file is
    removed, a torn tail cut off (with a warning); ``StateError`` for corruption."""
    with os_errors("create state directory", path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    with os_errors("remove", tmp_path(path)):
        tmp_path(path).unlink(missing_ok=True)
    data = _read_bounded(path, max_bytes)
    frames = _scan(path, data or b"")
    if frames.torn:
        log.warning(
            "%s: dropping a torn last record (bytes %d to %d)",
            path,
            frames.good_length,
            len(data or b""),
        )
        with os_errors("truncate", path):
            truncate(path, frames.good_length)
    return Loaded(list(frames.items), frames.good_length, data is not None)


def read_records(state_dir: Path, name: str, *, max_bytes: int = MAX_LOG_BYTES) -> list[Record]:
    """The records of log ``name`` as start-up would replay them, changing nothing (a torn
    tail is left in place): for inspecting a log another process writes, as tests do."""
    path = log_path(state_dir, name)
    return list(_scan(path, _read_bounded(path, max_bytes) or b"").items)


def create_log(state_dir: Path, name: str, records: Iterable[Mapping[str, Json]]) -> None:
    """Write log ``name`` holding ``records``, atomically: for converting the file of an
    earlier format before the log is opened.  ``StateError`` naming the file."""
    path = log_path(state_dir, name)
    content = b"".join(line(r) for r in records)
    with os_errors("write", path):
        state_dir.mkdir(parents=True, exist_ok=True)
        replace_file(path, content)


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


def _scan(path: Path, data: bytes) -> Frames[Record]:
    return scan_frames(data, str(path), _decoder(str(path)))


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


# -- writes (in worker threads) ----------------------------------------------------------------


def write_batch(path: Path, data: bytes, cut: int | None, create: bool) -> None:
    """Append ``data`` (at ``cut``, truncating what follows, if given) and fsync; fsync the
    directory too when ``create`` (the new file's entry must survive as well)."""
    with os_errors("write", path):
        flags = os.O_WRONLY | os.O_CREAT | (0 if cut is not None else os.O_APPEND)
        fd = os.open(path, flags, 0o600)
        try:
            if cut is not None:
                os.ftruncate(fd, cut)
                os.lseek(fd, cut, os.SEEK_SET)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if create:
            fsync_dir(path.parent)


def write_synced(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` (``mode``: ``os.O_TRUNC`` or ``os.O_APPEND``) and fsync."""
    with os_errors("write", path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def finish_compaction(tmp: Path, tail: bytes, path: Path) -> None:
    """Add the records appended meanwhile, fsync, rename over ``path``, fsync the directory."""
    if tail:
        write_synced(tmp, tail, os.O_APPEND)
    with os_errors("rename to", path):
        os.replace(tmp, path)
        fsync_dir(path.parent)


def settle_rename(tmp: Path, path: Path) -> bool:
    """Whether a compaction's rename happened (then fsync the directory); if it did not,
    remove the temporary file."""
    with os_errors("settle the compaction of", path):
        if tmp.exists():
            tmp.unlink()
            return False
        fsync_dir(path.parent)
        return True


def remove(path: Path) -> None:
    """Remove ``path`` if it is there; a failure is only logged."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror or e)
