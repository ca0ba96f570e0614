"""The ledger's on-disk formats and replay, as plain functions (no trio, no file I/O).

Journal segment: one record per line, each line framed by a CRC32 of its JSON (the framing,
and the torn-tail rule below, are :mod:`proxy.store.framing`'s, shared with every store log)::

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
not a crash), and a gap in ``seq`` (an acknowledged record went missing).  Content that is
not a record includes values no gateway writes and the ledger cannot count with: a
negative size or duration, a time that is not a finite number, an unknown ``op``.
Every such error is a ``StateError`` naming the file and the byte offset of the record.

Optional fields: a reservation's ``voice_bridge`` (its conference PIN) is written only
when it has one, and a record without it (every record written before voice bridges
existed) reads as having none; so old journals and snapshots load unchanged, and an
older gateway reading a newer record ignores the field.  A present one must be 1 to 9
ASCII digits.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import orjson

from proxy.errors import StateError
from proxy.ledger.model import Confirm, LedgerState, Record, Release, Reservation, Reserve
from proxy.store.framing import frame, scan_frames
from proxy.voice.bridges import is_bridge

SNAPSHOT_MAGIC = b"bbb-ledger-snapshot"
SNAPSHOT_VERSION = 1


class _Invalid(ValueError):
    """Well-framed but meaningless content; turned into a StateError with its place."""


class _Shape:
    """Named JSON fields of exact types: read with one lookup and one type check per record
    (start-up replays hundreds of thousands), explained field by field when wrong."""

    def __init__(self, fields: dict[str, tuple[type, ...]]) -> None:
        self.fields = fields
        self._get = operator.itemgetter(*fields)
        self._types = frozenset(itertools.product(*fields.values()))

    def read(self, payload: Any) -> tuple[Any, ...]:
        try:
            values: tuple[Any, ...] = self._get(payload)
        except (KeyError, TypeError):
            self._explain(payload)
        if tuple(map(type, values)) not in self._types:
            self._explain(payload)
        return values

    def _explain(self, payload: Any) -> NoReturn:
        if not isinstance(payload, dict):
            raise _Invalid("not a JSON object")
        for name, kinds in self.fields.items():
            value = payload.get(name)
            if type(value) not in kinds:  # exact: true/false is no count, 5.0 no int
                raise _Invalid(f"field {name!r} is {value!r}")
        raise AssertionError("unreachable")  # pragma: no cover


# In Reservation's field order: reservation_from_fields passes them positionally.
_RESERVATION = _Shape(
    {
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
)
_OPTIONAL = ("voice_bridge",)  # after the required ones, in Reservation's field order
assert tuple(_RESERVATION.fields) + _OPTIONAL == tuple(f.name for f in fields(Reservation))
_RECORD = _Shape({"seq": (int,), "op": (str,), "customer": (str,), "meeting_id": (str,)})
_RELEASE = _Shape({"seq": (int,), "reason": (str,)})


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    record: Record
    offset: int = 0  # of its line in the segment, for messages


def encode_record(seq: int, record: Record) -> bytes:
    """One framed journal line for ``record`` numbered ``seq``."""
    return frame(orjson.dumps({"seq": seq, **_record_fields(record)}))


def record_payload(seq: int, record: Record) -> dict[str, Any]:
    """The JSON object of ``record`` numbered ``seq`` (what a journal line frames)."""
    return {"seq": seq, **_record_fields(record)}


def decode_record(payload: Any) -> Entry:
    """The entry a decoded JSON object stands for; raises ``_Invalid``."""
    seq, op, customer, meeting_id = _RECORD.read(payload)
    match op:
        case "reserve":
            return Entry(seq, Reserve(reservation_from_fields(payload)))
        case "confirm":
            return Entry(seq, Confirm((customer, meeting_id)))
        case "release":
            return Entry(seq, Release((customer, meeting_id), _RELEASE.read(payload)[1]))
        case _:
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
    written = {name: getattr(r, name) for name in _RESERVATION.fields}
    if r.voice_bridge:
        written["voice_bridge"] = r.voice_bridge
    return written


def reservation_from_fields(payload: Any) -> Reservation:
    """The reservation a JSON object describes; raises ``_Invalid``."""
    customer, meeting, backend, backend_meeting, size, duration, asked, created_at, confirmed = (
        _RESERVATION.read(payload)
    )
    _check_counts(connections=size, duration=duration)
    if not math.isfinite(created_at):
        raise _Invalid(f"field 'created_at' is {created_at!r}")
    return Reservation(
        customer,
        meeting,
        backend,
        backend_meeting,
        size,
        duration,
        asked,
        float(created_at),
        confirmed,
        _voice_bridge(payload),
    )


def _voice_bridge(payload: dict[str, Any]) -> str:
    """The optional ``voice_bridge``: absent is none; present, it must be one."""
    bridge = payload.get("voice_bridge", "")
    if type(bridge) is not str or (bridge and not is_bridge(bridge)):
        raise _Invalid(f"field 'voice_bridge' is {bridge!r}")
    return bridge


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise _Invalid(f"field {name!r} is {value!r}")


# -- journal segments --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """What one journal file holds: its intact entries and where the intact part ends."""

    entries: tuple[Entry, ...]
    good_length: int  # bytes; anything past this is a torn tail to truncate
    torn: bool


def scan_segment(data: bytes, source: str) -> Segment:
    """Parse a journal file's bytes; a torn tail is reported, corruption raises StateError."""
    frames = scan_frames(data, source, functools.partial(_decode_body, source=source))
    return Segment(frames.items, frames.good_length, frames.torn)


def _decode_body(body: bytes, offset: int, source: str) -> Entry:
    try:
        entry = decode_record(orjson.loads(body))
    except (orjson.JSONDecodeError, _Invalid) as e:
        raise StateError(f"{source}: invalid record at byte {offset}: {e}") from None
    return Entry(entry.seq, entry.record, offset)


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
    for index, reservation in enumerate(snapshot.reservations):
        _apply(state, Reserve(reservation), f"snapshot reservation {index}")
    last = snapshot.seq
    for source, segment in segments:
        for entry in segment.entries:
            if entry.seq <= snapshot.seq:
                continue
            if entry.seq != last + 1:
                raise StateError(
                    f"{source}: record {entry.seq} follows record {last} (at byte {entry.offset})"
                )
            _apply(state, entry.record, f"{source}: record at byte {entry.offset}")
            last = entry.seq
    return state, last


def _apply(state: LedgerState, record: Record, where: str) -> None:
    """``state.apply``, which is total; should it ever raise, start-up stops with ``where``."""
    try:
        state.apply(record)
    except Exception as e:  # a bug in the model must not become a raw traceback at start-up
        raise StateError(f"{where} cannot be applied: {type(e).__name__}: {e}") from e
