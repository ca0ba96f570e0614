"""The ledger's on-disk formats and replay, as plain functions (no trio, no file I/O).

Journal segment: one record per line, each line framed by a CRC32 of its JSON::

    <crc32 of json, 8 lowercase hex digits> <json object>\\n

    6f1c02aa {"seq":7,"op":"reserve","customer":"acme","meeting_id":"m1",...}
    0b3e9d51 {"seq":8,"op":"confirm","customer":"acme","meeting_id":"m1"}
    91d0e2c4 {"seq":9,"op":"release","customer":"acme","meeting_id":"m1","reason":"end"}

``seq`` numbers every record the ledger ever applied, 1, 2, 3, ... across segments.

Snapshot: a header line, then the body (a JSON array of reservations)::

    bbb-ledger-snapshot 1 <seq covered> <count> <crc32 of body, 8 hex>\\n<body>

A snapshot holds the state after record ``seq``; replay skips records up to it, so a
journal segment the snapshot already covers may linger on disk without double counting.

What counts as torn: a write cut short by a crash can only damage the end of the last
thing written.  So a line that fails its framing (no newline, bad CRC, not JSON) is
*torn* when no intact line follows it; everything from it on is dropped.  A damaged
line with an intact one after it is *corruption* and stops start-up, as does a line
whose CRC is right but whose content is not a record (that is a bug or a foreign file,
not a crash), and a gap in ``seq`` (an acknowledged record went missing).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import StateError
from proxy.ledger.model import Confirm, LedgerState, Record, Release, Reservation, Reserve

SNAPSHOT_MAGIC = b"bbb-ledger-snapshot"
SNAPSHOT_VERSION = 1

_RESERVATION_FIELDS: dict[str, tuple[type, ...]] = {
    "customer": (str,),
    "meeting_id": (str,),
    "backend_id": (str,),
    "backend_meeting_id": (str,),
    "connections": (int,),
    "duration": (int,),
    "asked_duration": (int,),
    "created_at": (float, int),
    "confirmed": (bool,),
}


class _Invalid(ValueError):
    """Well-framed but meaningless content; turned into a StateError with its place."""


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    record: Record


def encode_record(seq: int, record: Record) -> bytes:
    """One framed journal line for ``record`` numbered ``seq``."""
    return _frame(orjson.dumps({"seq": seq, **_record_fields(record)}))


def decode_record(payload: Any) -> Entry:
    """The entry a decoded JSON object stands for; raises ``_Invalid``."""
    if not isinstance(payload, dict):
        raise _Invalid("not a JSON object")
    seq = _field(payload, "seq", (int,))
    key = (_field(payload, "customer", (str,)), _field(payload, "meeting_id", (str,)))
    match payload.get("op"):
        case "reserve":
            return Entry(seq, Reserve(reservation_from_fields(payload)))
        case "confirm":
            return Entry(seq, Confirm(key))
        case "release":
            return Entry(seq, Release(key, _field(payload, "reason", (str,))))
        case op:
            raise _Invalid(f"unknown op {op!r}")


def _record_fields(record: Record) -> dict[str, Any]:
    match record:
        case Reserve(reservation):
            return {"op": "reserve", **reservation_fields(reservation)}
        case Confirm((customer, meeting_id)):
            return {"op": "confirm", "customer": customer, "meeting_id": meeting_id}
        case Release((customer, meeting_id), reason):
            return {
                "op": "release",
                "customer": customer,
                "meeting_id": meeting_id,
                "reason": reason,
            }


def reservation_fields(r: Reservation) -> dict[str, Any]:
    return {name: getattr(r, name) for name in _RESERVATION_FIELDS}


def reservation_from_fields(payload: dict[str, Any]) -> Reservation:
    values = {name: _field(payload, name, kinds) for name, kinds in _RESERVATION_FIELDS.items()}
    values["created_at"] = float(values["created_at"])
    return Reservation(**values)


def _field(payload: dict[str, Any], name: str, kinds: tuple[type, ...]) -> Any:
    value = payload.get(name)
    # bool is an int in Python; a count that reads true/false is not a count.
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise _Invalid(f"field {name!r} is {value!r}")
    return value


def _frame(body: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _unframe(line: bytes) -> bytes | None:
    """The JSON of one complete line (without its newline), or None if the frame is broken."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    return body if zlib.crc32(body) == crc else None


# -- journal segments --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """What one journal file holds: its intact entries and where the intact part ends."""

    entries: tuple[Entry, ...]
    good_length: int  # bytes; anything past this is a torn tail to truncate
    torn: bool


def scan_segment(data: bytes, source: str) -> Segment:
    """Parse a journal file's bytes; a torn tail is reported, corruption raises StateError."""
    entries: list[Entry] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        body = None if end < 0 else _unframe(data[offset:end])
        if body is None:
            _check_tail(data, offset, source)
            return Segment(tuple(entries), offset, torn=True)
        entries.append(_decode_body(body, source, offset))
        offset = end + 1
    return Segment(tuple(entries), offset, torn=False)


def _decode_body(body: bytes, source: str, offset: int) -> Entry:
    try:
        return decode_record(orjson.loads(body))
    except (orjson.JSONDecodeError, _Invalid) as e:
        raise StateError(f"{source}: invalid record at byte {offset}: {e}") from None


def _check_tail(data: bytes, offset: int, source: str) -> None:
    """Raise unless nothing intact follows the damaged line at ``offset``."""
    for line_start, line in _lines_after(data, offset):
        if _unframe(line) is not None:
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


# -- snapshots ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int  # the last record whose effect it holds
    reservations: tuple[Reservation, ...]


def encode_snapshot(snapshot: Snapshot) -> bytes:
    body = orjson.dumps([reservation_fields(r) for r in snapshot.reservations])
    header = b"%s %d %d %d %08x\n" % (
        SNAPSHOT_MAGIC,
        SNAPSHOT_VERSION,
        snapshot.seq,
        len(snapshot.reservations),
        zlib.crc32(body),
    )
    return header + body


def decode_snapshot(data: bytes, source: str) -> Snapshot:
    """Parse a snapshot file; any damage raises StateError (snapshots are never torn)."""
    header, _, body = data.partition(b"\n")
    fields = header.split(b" ")
    if len(fields) != 5 or fields[0] != SNAPSHOT_MAGIC:
        raise StateError(f"{source}: not a ledger snapshot (header {header[:60]!r})")
    if fields[1] != b"%d" % SNAPSHOT_VERSION:
        raise StateError(f"{source}: snapshot format {fields[1]!r}, expected {SNAPSHOT_VERSION}")
    try:
        seq, count, crc = int(fields[2]), int(fields[3]), int(fields[4], 16)
    except ValueError:
        raise StateError(f"{source}: malformed snapshot header {header!r}") from None
    if zlib.crc32(body) != crc:
        raise StateError(f"{source}: snapshot body (from byte {len(header) + 1}) fails its CRC")
    try:
        reservations = tuple(reservation_from_fields(f) for f in orjson.loads(body))
    except (orjson.JSONDecodeError, _Invalid, TypeError, AttributeError) as e:
        raise StateError(f"{source}: invalid snapshot body: {e}") from None
    if len(reservations) != count:
        raise StateError(f"{source}: snapshot holds {len(reservations)} of {count} reservations")
    return Snapshot(seq, reservations)


# -- replay ------------------------------------------------------------------------------------


def replay(snapshot: Snapshot, segments: Sequence[tuple[str, Segment]]) -> tuple[LedgerState, int]:
    """The state after the snapshot and every later record; returns it and the last seq.

    Records the snapshot covers are skipped (a crash between writing a snapshot and
    removing the segments it covers leaves them behind).  Later records must follow
    one another without a gap.
    """
    state = LedgerState()
    for reservation in snapshot.reservations:
        state.apply(Reserve(reservation))
    last = snapshot.seq
    for source, segment in segments:
        for entry in segment.entries:
            if entry.seq <= snapshot.seq:
                continue
            if entry.seq != last + 1:
                raise StateError(f"{source}: record {entry.seq} follows record {last}")
            state.apply(entry.record)
            last = entry.seq
    return state, last
