"""The recording decisions without I/O (proxy/bbb/recordings.py): paging as bbb-web reads
it, filter translation, the incremental reader of backend answers, windows, batches and
the early-body budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from proxy.bbb import recordings, rewrite
from proxy.bbb.recordings import Listed, Page

TAG = f"meta_{rewrite.CUSTOMER_TAG}"


@pytest.mark.parametrize(
    ("params", "page"),
    [
        ([], Page()),
        ([("offset", "5")], Page()),  # no limit: not paged, offset ignored
        ([("limit", "10")], Page(0, 10)),
        ([("limit", "0")], Page(0, 1)),
        ([("limit", "-7"), ("offset", "-2")], Page(0, 1)),
        ([("limit", "1000"), ("offset", "30")], Page(30, 100)),
        ([("limit", "x"), ("offset", "3")], Page()),
        ([("limit", "²"), ("offset", "3")], Page()),  # not ASCII digits
        ([("limit", "5"), ("offset", "y")], Page(0, 5)),
        ([("limit", "5"), ("limit", "50")], Page(0, 5)),  # the first value, as bbb-web
    ],
)
def test_page_of(params: list[tuple[str, str]], page: Page) -> None:
    assert recordings.page_of(params) == page


def test_backend_filters() -> None:
    long_id = "x" * 300
    got = recordings.backend_filters(
        "acme", [("meetingID", f"a, ,{long_id}"), ("state", "any"), ("meta_Gl-Listed", "true")]
    )
    namespaced = f"acme~a,{rewrite.backend_meeting_id('acme', long_id)}"
    assert got == [
        ("meetingID", namespaced),
        ("state", "any"),
        ("meta_Gl-Listed", "true"),
        (TAG, "acme"),
    ]
    by_record = recordings.backend_filters("acme", [("meetingID", "a"), ("recordID", "r1,r2")])
    assert by_record == [("recordID", "r1,r2"), (TAG, "acme")]
    assert recordings.backend_filters("acme", []) == [(TAG, "acme")]
    assert recordings.backend_filters("acme", [(TAG.upper(), "globex")]) is None


def answer(*recordings_xml: str, returncode: str = "SUCCESS") -> bytes:
    inner = "".join(recordings_xml)
    return (
        f"<response><returncode>{returncode}</returncode><recordings>{inner}</recordings>"
        "</response>"
    ).encode()


def recording(record_id: str, start: str, customer: str, meeting: str, backend_id: str) -> str:
    return (
        f"<recording><recordID>{record_id}</recordID><meetingID>{backend_id}</meetingID>"
        f"<startTime>{start}</startTime><metadata><{rewrite.CUSTOMER_TAG}>{customer}"
        f"</{rewrite.CUSTOMER_TAG}><{rewrite.MEETING_TAG}>{meeting}</{rewrite.MEETING_TAG}>"
        f"<meetingId>{backend_id}</meetingId><endcallbackurl>http://gw/x</endcallbackurl>"
        "</metadata></recording>"
    )


def read(data: bytes, chunk: int = 7, bodies: bool = True) -> tuple[list[str], object]:
    found: list[str] = []

    def keep(item: Listed, element: etree._Element | None) -> None:
        found.append(
            f"{item.start_time}/{item.record_id}"
            + ("" if element is None else "|" + etree.tostring(element).decode())
        )

    reader = recordings.AnswerReader("acme", 3, keep, lambda: bodies)
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
    reader.close()
    return found, (reader.ok, reader.broken, reader.returncode)


def test_reader_keeps_the_customers_recordings_rewritten() -> None:
    data = answer(
        recording("r1", "20", "acme", "room", "acme~room"),
        recording("r2", "10", "globex", "room", "globex~room"),  # another customer's
        recording("r3", "5", "acme", "room", "globex~room"),  # tags that do not agree
        recording("r4", "²", "acme", "other", "acme~other"),  # a junk start time: 0
    )
    found, state = read(data)
    assert state == (True, False, "SUCCESS")
    assert [f.split("|")[0] for f in found] == ["20/r1", "0/r4"]
    body = found[0].split("|")[1]
    assert "~" not in body and rewrite.TAG_PREFIX not in body and "endcallbackurl" not in body
    assert "<meetingID>room</meetingID>" in body and "<meetingId>room</meetingId>" in body
    keys_only, _ = read(data, bodies=False)
    assert keys_only == ["20/r1", "0/r4"]


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (b"<html>nope</html>", (False, True, "")),
        (b"not xml at all", (False, True, "")),
        (answer(returncode="FAILED"), (False, False, "FAILED")),
        (answer(recording("r1", "1", "acme", "r", "acme~r"))[:-20], (False, True, "SUCCESS")),
    ],
)
def test_reader_refuses_what_is_not_a_whole_success(data: bytes, state: object) -> None:
    assert read(data)[1] == state


def test_reader_resolves_no_entities() -> None:
    doctype = (
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e "acme">'
        b'<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    )
    data = doctype + answer(recording("r1", "1", "&e;", "&x;", "acme~r"))
    found, _ = read(data)
    assert found == []  # the customer tag is not "acme" unless an entity were expanded


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), chunk=st.integers(1, 64))
def test_reader_never_raises(data: bytes, chunk: int) -> None:
    read(data, chunk)


def test_window_and_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [Listed(t, f"r{t}-{rank}", rank) for t in (3, 1, 2) for rank in (1, 0)]
    ordered = recordings.window(keys, Page())
    assert [(k.start_time, k.backend_rank) for k in ordered] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
    ]
    assert recordings.window(keys, Page(4, 5)) == ordered[4:]
    monkeypatch.setattr(recordings, "BATCH", 2)
    assert recordings.batches(ordered) == [
        (0, ["r1-0", "r2-0"]),
        (0, ["r3-0"]),
        (1, ["r1-1", "r2-1"]),
        (1, ["r3-1"]),
    ]
    monkeypatch.setattr(recordings, "ROUND", 4)
    assert [len(r) for r in recordings.rounds(ordered)] == [4, 2]


def test_bodies_are_kept_within_the_budget_only() -> None:
    bodies = recordings.Bodies(budget=10)
    first, second = Listed(1, "a", 0), Listed(2, "b", 0)
    bodies.keep(first, "12345")
    assert bodies.has(first) and not bodies.full
    bodies.keep(second, "123456")  # 11 bytes in all: over, and nothing is kept any more
    assert bodies.full and not bodies.has(first) and not bodies.has(second)
    bodies.keep(first, "1")
    assert bodies.take(first) is None


def test_tail() -> None:
    assert recordings.tail(0, 0, Page()) == (
        b"</recordings><messageKey>noRecordings</messageKey>"
        b"<message>There are no recordings for the meeting(s).</message></response>"
    )
    assert recordings.tail(3, 9, Page(0, 3)) == (
        b"</recordings><totalElements>9</totalElements></response>"
    )


def test_change_rules() -> None:
    assert recordings.missing_param("deleteRecordings", [("recordID", " ,")]) == (
        recordings.MISSING_RECORD_ID
    )
    assert recordings.missing_param("publishRecordings", [("recordID", "a")]) == (
        recordings.MISSING_PUBLISH
    )
    assert recordings.missing_param("updateRecordings", [("recordID", "a")]) is None
    params = [("recordID", "a,b,c"), ("meta_x", "1"), (TAG, "globex"), ("publish", "true")]
    assert recordings.change_params(params, ["b"]) == [
        ("recordID", "b"),
        ("meta_x", "1"),
        ("publish", "true"),
    ]


def test_text_track_answers() -> None:
    good = b'{"response": {"returncode": "SUCCESS", "tracks": []}}'
    assert recordings.text_tracks_answer(good) is not None
    for bad in (b"<xml/>", b"[]", b'{"response": 1}', b'{"response": {"returncode": "x"}}'):
        assert recordings.text_tracks_answer(bad) is None
