"""Framed lines: the on-disk record format the ledger's journal and every store log share.

One record per line, framed by the CRC32 of its JSON::

    <crc32 of json, 8 lowercase hex digits> <json>\\n

What counts as torn: a write cut short by a crash can only damage the end of the last
thing written.  So a line that fails its framing (no newline, bad CRC) is *torn* when no
intact line follows it; everything from it on is dropped.  A damaged line with an intact
one after it is *corruption*: :func:`scan_frames` raises ``StateError`` naming the
source and the byte offset.  What a well-framed body means is the caller's ``decode``.

No trio, no file I/O.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proxy.errors import StateError

FRAME_OVERHEAD = 10  # 8 hex digits, a space, a newline


def frame(body: bytes) -> bytes:
    """One framed line holding ``body`` (which must not contain a newline: JSON does not)."""
    return b"%08x %s\n" % (zlib.crc32(body), body)


def unframe(line: bytes) -> bytes | None:
    """The body of one complete line (without its newline), or None if the frame is broken."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    return body if zlib.crc32(body) == crc else None


@dataclass(frozen=True, slots=True)
class Frames[T]:
    """What one file holds: its decoded intact lines and where the intact part ends."""

    items: tuple[T, ...]
    good_length: int  # bytes; anything past this is a torn tail to truncate
    torn: bool


def scan_frames[T](data: bytes, source: str, decode: Callable[[bytes, int], T]) -> Frames[T]:
    """Parse a file's framed lines, ``decode(body, offset)`` each; a torn tail is reported.

    Error handling: ``StateError`` for a damaged line followed by an intact one; whatever
    ``decode`` raises (it should be a ``StateError`` naming ``source`` and the offset).
    """
    items: list[T] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        body = None if end < 0 else unframe(data[offset:end])
        if body is None:
            _check_tail(data, offset, source)
            return Frames(tuple(items), offset, torn=True)
        items.append(decode(body, offset))
        offset = end + 1
    return Frames(tuple(items), offset, torn=False)


def _check_tail(data: bytes, offset: int, source: str) -> None:
    """Raise unless nothing intact follows the damaged line at ``offset``."""
    for line_start, line in _lines_after(data, offset):
        if unframe(line) is not None:
            raise StateError(
                f"{source}: corrupt record at byte {offset}, "
                f"followed by an intact record at byte {line_start}"
            )


def _lines_after(data: bytes, offset: int) -> Iterable[tuple[int, bytes]]:
    start = data.find(b"\n", offset) + 1
    while 0 < start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            return
        yield start, data[start:end]
        start = end + 1
