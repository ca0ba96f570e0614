"""The ledger's on-disk formats: every malformed record, header and body is named, never applied.

A damaged line at the end of a segment is a torn write (dropped); anything else that is
not a record stops start-up with a ``StateError`` naming the file and the byte offset.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest

from proxy.errors import StateError
from proxy.ledger import codec
from proxy.ledger.codec import Snapshot
from proxy.ledger.model import Confirm, Record, Release, Reservation, Reserve

SOURCE = "journal.00000001"
ROOM = Reservation(
    customer="acme",
    meeting_id="room-1",
    backend_id="bbb-1",
    backend_meeting_id="acme~room-1",
    connections=5,
    duration=60,
    asked_duration=0,
    created_at=1_700_000_000.5,
)


def framed(payload: Any) -> bytes:
    """A line whose frame (CRC and newline) is right, whatever its content."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def reserve_fields(**changes: Any) -> dict[str, Any]:
    fields = {"seq": 2, "op": "reserve", **codec.reservation_fields(ROOM)}
    return {k: v for k, v in {**fields, **changes}.items() if v is not ...}


FIRST = codec.encode_record(1, Reserve(ROOM))


def test_every_record_round_trips_with_its_seq() -> None:
    records: list[Record] = [Reserve(ROOM), Confirm(ROOM.key), Release(ROOM.key, "end")]
    data = b"".join(codec.encode_record(i + 1, r) for i, r in enumerate(records))
    segment = codec.scan_segment(data, SOURCE)
    assert [(e.seq, e.record) for e in segment.entries] == [
        (1, records[0]),
        (2, records[1]),
        (3, records[2]),
    ]
    assert (segment.good_length, segment.torn) == (len(data), False)
    assert codec.scan_segment(b"", SOURCE) == codec.Segment((), 0, torn=False)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json at all", "invalid record"),
        ([1, 2, 3], "not a JSON object"),
        ("a string", "not a JSON object"),
        ({"seq": 2, "op": "confirm", "customer": "acme"}, "meeting_id"),
        ({"seq": "2", "op": "confirm", "customer": "acme", "meeting_id": "m"}, "seq"),
        ({"seq": True, "op": "confirm", "customer": "acme", "meeting_id": "m"}, "seq"),
        ({"seq": 2.0, "op": "confirm", "customer": "acme", "meeting_id": "m"}, "seq"),
        ({"seq": 2, "op": None, "customer": "acme", "meeting_id": "m"}, "op"),
        ({"seq": 2, "op": "confirm", "customer": 7, "meeting_id": "m"}, "customer"),
        ({"seq": 2, "op": "delete", "customer": "acme", "meeting_id": "m"}, "unknown op"),
        ({"seq": 2, "op": "release", "customer": "acme", "meeting_id": "m"}, "reason"),
        ({"seq": 2, "op": "release", "customer": "acme", "meeting_id": "m", "reason": 1}, "reason"),
        (reserve_fields(backend_id=...), "backend_id"),
        (reserve_fields(connections=5.0), "connections"),
        (reserve_fields(connections=True), "connections"),
        (reserve_fields(duration="60"), "duration"),
        (reserve_fields(asked_duration=None), "asked_duration"),
        (reserve_fields(created_at="yesterday"), "created_at"),
        (reserve_fields(confirmed=1), "confirmed"),
        (reserve_fields(backend_meeting_id=["acme~room-1"]), "backend_meeting_id"),
    ],
)
def test_a_well_framed_line_that_is_not_a_record_is_corruption(payload: Any, why: str) -> None:
    """Its CRC is right, so it is no torn write: start-up stops, naming file and offset."""
    data = FIRST + framed(payload)
    with pytest.raises(StateError, match=rf"^{SOURCE}: .*byte {len(FIRST)}\b") as caught:
        codec.scan_segment(data, SOURCE)
    assert why in str(caught.value)
    # The same line last in the file is still not torn: content is not a crash's doing.
    with pytest.raises(StateError):
        codec.scan_segment(framed(payload), SOURCE)


def test_an_integer_created_at_is_read_as_a_float() -> None:
    entry = codec.decode_record(reserve_fields(created_at=1_700_000_000))
    assert isinstance(entry.record, Reserve)
    assert entry.record.reservation.created_at == 1_700_000_000.0
    assert isinstance(entry.record.reservation.created_at, float)


@pytest.mark.parametrize(
    "tail",
    [
        codec.encode_record(2, Confirm(ROOM.key))[:-1],  # no newline: cut short
        codec.encode_record(2, Confirm(ROOM.key))[:20],
        b"0000000",  # shorter than a frame
        b"ffffffff " + orjson.dumps({"seq": 2}) + b"\n",  # wrong CRC
        b"zzzzzzzz " + orjson.dumps({"seq": 2}) + b"\n",  # CRC not hex
        b"%08xX" % zlib.crc32(b"{}") + b"{}\n",  # no space after the CRC
    ],
)
def test_a_damaged_last_line_is_a_torn_tail(tail: bytes) -> None:
    segment = codec.scan_segment(FIRST + tail, SOURCE)
    assert [e.record for e in segment.entries] == [Reserve(ROOM)]
    assert (segment.good_length, segment.torn) == (len(FIRST), True)


@pytest.mark.parametrize(
    "damaged",
    [b"ffffffff {}\n", b"garbage\n", b"\n", FIRST[:-12] + b"XXXXXXXXXXX\n"],
)
def test_a_damaged_line_followed_by_an_intact_one_is_corruption(damaged: bytes) -> None:
    later = codec.encode_record(2, Confirm(ROOM.key))
    data = FIRST + damaged + later
    expected = rf"^{SOURCE}: corrupt record at byte {len(FIRST)}, .*at byte {len(FIRST + damaged)}"
    with pytest.raises(StateError, match=expected):
        codec.scan_segment(data, SOURCE)


def test_damage_followed_only_by_more_damage_is_still_torn() -> None:
    segment = codec.scan_segment(FIRST + b"ffffffff {}\n" + b"also broken\n" + b"cut", SOURCE)
    assert (segment.good_length, segment.torn, len(segment.entries)) == (len(FIRST), True, 1)


# -- snapshots ---------------------------------------------------------------------------------


def snapshot_bytes(body: bytes, *, seq: int = 7, count: int = 1, version: int = 1) -> bytes:
    header = b"bbb-ledger-snapshot %d %d %d %08x\n" % (version, seq, count, zlib.crc32(body))
    return header + body


def test_snapshot_round_trip() -> None:
    snapshot = Snapshot(
        7, (ROOM, Reservation(**{**codec.reservation_fields(ROOM), "meeting_id": "r2"}))
    )
    assert codec.decode_snapshot(codec.encode_snapshot(snapshot), "snapshot") == snapshot
    empty = Snapshot(0, ())
    assert codec.decode_snapshot(codec.encode_snapshot(empty), "snapshot") == empty


GOOD_BODY = orjson.dumps([codec.reservation_fields(ROOM)])


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not a ledger snapshot"),
        (b"PK\x03\x04 zip file\n", "not a ledger snapshot"),
        (b"bbb-ledger-snapshot 1 7 1\n" + GOOD_BODY, "not a ledger snapshot"),
        (b"bbb-ledger-snapshot 1 7 1 00000000 extra\n" + GOOD_BODY, "not a ledger snapshot"),
        (snapshot_bytes(GOOD_BODY, version=2), "format"),
        (snapshot_bytes(GOOD_BODY).replace(b" 7 ", b" seven ", 1), "malformed snapshot header"),
        (
            b"bbb-ledger-snapshot 1 7 1 %s\n" % b"nothex!!" + GOOD_BODY,
            "malformed snapshot header",
        ),
        (snapshot_bytes(GOOD_BODY)[:-1], "CRC"),
        (snapshot_bytes(GOOD_BODY) + b" ", "CRC"),
        (snapshot_bytes(b"not json"), "invalid snapshot body"),
        (snapshot_bytes(b"[1]"), "invalid snapshot body"),
        (snapshot_bytes(b'{"a": 1}'), "invalid snapshot body"),
        (snapshot_bytes(b"7"), "invalid snapshot body"),
        (
            snapshot_bytes(orjson.dumps([{**codec.reservation_fields(ROOM), "connections": "5"}])),
            "invalid snapshot body",
        ),
        (snapshot_bytes(GOOD_BODY, count=2), "holds 1 of 2"),
        (snapshot_bytes(b"[]", count=1), "holds 0 of 1"),
    ],
)
def test_a_damaged_snapshot_is_refused_by_name(data: bytes, why: str) -> None:
    with pytest.raises(StateError, match=r"^state/snapshot: ") as caught:
        codec.decode_snapshot(data, "state/snapshot")
    assert why in str(caught.value)


# -- replay ------------------------------------------------------------------------------------


def segment(*records: tuple[int, Any]) -> codec.Segment:
    data = b"".join(codec.encode_record(seq, record) for seq, record in records)
    return codec.scan_segment(data, SOURCE)


def test_replay_applies_records_after_the_snapshot_and_skips_those_it_covers() -> None:
    other = Reservation(**{**codec.reservation_fields(ROOM), "meeting_id": "room-2"})
    snapshot = Snapshot(2, (ROOM,))
    covered = segment((1, Reserve(ROOM)), (2, Confirm(ROOM.key)))
    later = segment((3, Reserve(other)), (4, Release(ROOM.key, "end")))
    state, last = codec.replay(snapshot, [("journal.1", covered), ("journal.2", later)])
    assert last == 4
    assert [r.meeting_id for r in state] == ["room-2"]
    assert state.customer_used("acme") == 5


def test_replay_without_anything_is_empty() -> None:
    state, last = codec.replay(Snapshot(0, ()), [])
    assert (len(state), last) == (0, 0)


@pytest.mark.parametrize(("snapshot_seq", "first"), [(0, 2), (3, 5), (3, 3 + 10)])
def test_a_gap_in_the_records_is_corruption(snapshot_seq: int, first: int) -> None:
    gap = segment((first, Confirm(ROOM.key)))
    with pytest.raises(
        StateError, match=rf"^{SOURCE}: record {first} follows record {snapshot_seq}"
    ):
        codec.replay(Snapshot(snapshot_seq, ()), [(SOURCE, gap)])


def test_a_gap_between_segments_is_corruption() -> None:
    one = segment((1, Reserve(ROOM)))
    three = segment((3, Confirm(ROOM.key)))
    with pytest.raises(StateError, match=r"^journal.2: record 3 follows record 1"):
        codec.replay(Snapshot(0, ()), [("journal.1", one), ("journal.2", three)])
