"""Recordings on the simulated BBB server over real HTTP, checked against real BBB answers
(``tests/fixtures/bbb``) by element structure, and every getRecordings filter."""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
import trio
from jwt.warnings import InsecureKeyLengthWarning
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.simulator import Simulator, serve_simulator
from tests.harness import serve_endpoint

SECRET = "sim-recordings-secret"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bbb"
PHP = FIXTURES / "bigbluebutton-api-php" / "responses"


class Server:
    def __init__(self, sim: Simulator, api: str, client: httpx.AsyncClient) -> None:
        self.sim, self.api, self.client = sim, api, client

    async def call(self, call: str, params: list[tuple[str, str]]) -> etree._Element:
        url = f"{self.api}/{call}?{signed_query(call, params, SECRET)}"
        response = await self.client.get(url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/xml;charset=utf-8"
        assert not response.text.startswith("<?xml")
        return etree.fromstring(response.content)

    async def record_ids(self, params: list[tuple[str, str]]) -> list[str]:
        root = await self.call("getRecordings", params)
        assert root.findtext("returncode") == "SUCCESS"
        return [r.findtext("recordID") or "" for r in root.iterfind("recordings/recording")]


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    sim = Simulator(SECRET, server_name="bbb-r.test", expire_unjoined_minutes=None)
    api: str = await nursery.start(serve_simulator, sim)
    client = httpx.AsyncClient(timeout=5)
    nursery.start_soon(_close_at_exit, client)
    return Server(sim, api, client)


async def _close_at_exit(client: httpx.AsyncClient) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


def names(element: etree._Element) -> list[str]:
    return [str(child.tag) for child in element]


def is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


async def recorded_meeting(server: Server, meeting_id: str, *extra: tuple[str, str]) -> str:
    created = await server.call(
        "create", [("meetingID", meeting_id), ("name", "Physics"), ("record", "true"), *extra]
    )
    await server.call("end", [("meetingID", meeting_id)])
    return created.findtext("internalMeetingID") or ""


async def test_a_recorded_meeting_leaves_a_recording_shaped_as_bbb_lists_it(
    server: Server,
) -> None:
    record_id = await recorded_meeting(server, "room-1", ("meta_Bbb-Origin", "Moodle"))
    await server.call("create", [("meetingID", "not-recorded"), ("name", "Chemistry")])
    await server.call("end", [("meetingID", "not-recorded")])
    root = await server.call("getRecordings", [])
    recordings = root.findall("recordings/recording")
    assert [r.findtext("recordID") for r in recordings] == [record_id]
    ours = recordings[0]
    # The fixture's richest recording (internalMeetingID, participants, rawSize) in its order.
    real = etree.fromstring((PHP / "get_recordings.xml").read_bytes())
    richest = max(real.iterfind("recordings/recording"), key=len)
    assert is_subsequence(names(richest), names(ours)), (names(richest), names(ours))
    real_format = richest.find("playback/format")
    assert real_format is not None
    for fmt in ours.iterfind("playback/format"):
        assert is_subsequence(names(real_format), names(fmt))
    assert ours.findtext("meetingID") == "room-1"
    assert ours.findtext("state") == "published" and ours.findtext("published") == "true"
    metadata = ours.find("metadata")
    assert metadata is not None
    assert metadata.findtext("bbb-origin") == "Moodle"  # lower-cased as at create
    assert metadata.findtext("meetingId") == "room-1"
    urls = {f.findtext("type"): f.findtext("url") for f in ours.iterfind("playback/format")}
    assert urls == {
        "presentation": f"https://bbb-r.test/playback/presentation/2.3/{record_id}",
        "video": f"https://bbb-r.test/playback/video/{record_id}/",
    }


async def test_no_recordings_is_success_shaped_as_bbb(server: Server) -> None:
    root = await server.call("getRecordings", [("meetingID", "nothing")])
    assert root.findtext("returncode") == "SUCCESS"
    assert root.findtext("messageKey") == "noRecordings"
    recordings = root.find("recordings")
    assert recordings is not None and len(recordings) == 0


async def test_processing_then_published(server: Server) -> None:
    server.sim.recordings.processing_seconds = 60
    record_id = await recorded_meeting(server, "room-p")
    assert await server.record_ids([]) == []  # default states: published, unpublished
    root = await server.call("getRecordings", [("state", "processing")])
    assert root.findtext("recordings/recording/state") == "processing"
    assert root.find("recordings/recording/playback/format") is None
    server.sim.clock = lambda: 10**10  # far later
    assert await server.record_ids([]) == [record_id]


async def test_breakout_recordings_name_their_parent(server: Server) -> None:
    parent = await server.call(
        "create", [("meetingID", "parent"), ("name", "Parent"), ("record", "true")]
    )
    parent_id = parent.findtext("internalMeetingID") or ""
    child_id = await recorded_meeting(
        server, "child", ("isBreakout", "true"), ("parentMeetingID", parent_id), ("sequence", "2")
    )
    await server.call("end", [("meetingID", "parent")])
    root = await server.call("getRecordings", [("state", "any")])
    by_id = {r.findtext("recordID"): r for r in root.iterfind("recordings/recording")}
    child, mother = by_id[child_id], by_id[parent_id]
    assert child.findtext("isBreakout") == "true"
    assert child.findtext("breakout/parentId") == parent_id
    assert child.findtext("breakout/sequence") == "2"
    assert [e.text for e in mother.iterfind("breakoutRooms/breakoutRoom")] == [child_id]


async def test_filters_record_id_prefix_meeting_id_state_and_meta(server: Server) -> None:
    store = server.sim.recordings
    a = store.seed(3, meeting_id="course-a", metadata={"bbb-context": "A"})
    b = store.seed(2, meeting_id="course-b", metadata={"bbb-context": "B"}, start_ms=1)
    ids_a, ids_b = [r.record_id for r in a], [r.record_id for r in b]
    assert await server.record_ids([]) == ids_b + ids_a  # (startTime, recordID) order
    assert await server.record_ids([("meetingID", "course-a")]) == ids_a
    assert await server.record_ids([("meetingID", "course-a,course-b")]) == ids_b + ids_a
    prefix = hashlib.sha1(b"course-b").hexdigest()[:10]
    assert await server.record_ids([("recordID", prefix)]) == ids_b
    # recordID given: meetingID is ignored
    assert await server.record_ids([("recordID", ids_a[0]), ("meetingID", "course-b")]) == [
        ids_a[0]
    ]
    assert await server.record_ids([("meta_BBB-Context", "B")]) == ids_b
    assert await server.record_ids([("meta_bbb-context", "C")]) == []
    await server.call("publishRecordings", [("recordID", ids_a[1]), ("publish", "false")])
    await server.call("deleteRecordings", [("recordID", ids_a[2])])
    assert await server.record_ids([("meetingID", "course-a")]) == ids_a[:2]
    assert await server.record_ids([("meetingID", "course-a"), ("state", "unpublished")]) == [
        ids_a[1]
    ]
    assert await server.record_ids([("meetingID", "course-a"), ("state", "deleted")]) == [ids_a[2]]
    assert await server.record_ids([("meetingID", "course-a"), ("state", "any")]) == ids_a


@pytest.mark.parametrize(
    ("offset", "limit", "window", "total"),
    [
        ("0", "2", slice(0, 2), "5"),
        ("4", "2", slice(4, 5), "5"),
        ("-3", "1", slice(0, 1), "5"),
        ("x", "0", slice(0, 1), "5"),  # limit below 1 is 1
        ("1", "1000", slice(1, 5), "5"),  # above 100 is 100
        ("2", None, slice(0, 5), None),  # no limit: no paging, offset ignored
        ("9", "3", slice(9, 9), "5"),
    ],
)
async def test_offset_and_limit_as_bbb_web(
    server: Server, offset: str, limit: str | None, window: slice, total: str | None
) -> None:
    ids = [r.record_id for r in server.sim.recordings.seed(5)]
    params = [("offset", offset)] + ([("limit", limit)] if limit is not None else [])
    root = await server.call("getRecordings", params)
    listed = [r.findtext("recordID") for r in root.iterfind("recordings/recording")]
    assert listed == ids[window]
    assert root.findtext("totalElements") == total


async def test_publish_delete_update_answers(server: Server) -> None:
    ids = [r.record_id for r in server.sim.recordings.seed(2, metadata={"gl-listed": "true"})]
    both = ",".join(ids)
    published = await server.call("publishRecordings", [("recordID", both), ("publish", "false")])
    assert names(published) == ["returncode", "published"]
    assert published.findtext("published") == "false"
    updated = await server.call(
        "updateRecordings", [("recordID", ids[0]), ("meta_Gl-Listed", ""), ("meta_Note", "x")]
    )
    assert names(updated) == ["returncode", "updated"] and updated.findtext("updated") == "true"
    metadata = server.sim.recordings.by_id[ids[0]].metadata
    assert "gl-listed" not in metadata and metadata["note"] == "x"
    deleted = await server.call("deleteRecordings", [("recordID", ids[1])])
    assert names(deleted) == ["returncode", "deleted"] and deleted.findtext("deleted") == "true"
    assert server.sim.recordings.by_id[ids[1]].state == "deleted"


@pytest.mark.parametrize(
    ("call", "params", "key"),
    [
        ("publishRecordings", [("publish", "true")], "missingParamRecordID"),
        ("publishRecordings", [("recordID", "nope")], "missingParamPublish"),
        ("publishRecordings", [("recordID", "nope"), ("publish", "true")], "notFound"),
        ("deleteRecordings", [], "missingParamRecordID"),
        ("deleteRecordings", [("recordID", "nope")], "notFound"),
        ("updateRecordings", [("recordID", "nope"), ("meta_a", "b")], "notFound"),
    ],
)
async def test_change_errors(
    server: Server, call: str, params: list[tuple[str, str]], key: str
) -> None:
    server.sim.recordings.seed(1)
    root = await server.call(call, params)
    assert root.findtext("returncode") == "FAILED"
    assert root.findtext("messageKey") == key


async def test_missing_publish_when_the_recording_exists(server: Server) -> None:
    (recording,) = server.sim.recordings.seed(1)
    root = await server.call("publishRecordings", [("recordID", recording.record_id)])
    assert root.findtext("messageKey") == "missingParamPublish"


async def test_seeding_ten_thousand_is_quick(server: Server) -> None:
    started = time.perf_counter()
    server.sim.recordings.seed(10_000, meeting_id="bulk")
    assert time.perf_counter() - started < 2
    root = await server.call("getRecordings", [("limit", "100"), ("offset", "9950")])
    assert len(root.findall("recordings/recording")) == 50
    assert root.findtext("totalElements") == "10000"


async def start_form_receiver(nursery: trio.Nursery, seen: list[tuple[str, str, bytes]]) -> str:
    """An HTTP endpoint recording (method, content type, body) of every request."""

    def respond(scope: dict[str, Any], body: bytes) -> int:
        headers = dict(scope["headers"])
        seen.append((scope["method"], headers.get(b"content-type", b"").decode(), body))
        return 200

    return await serve_endpoint(nursery, respond)


def decoded(token: str, secret: str) -> dict[str, Any]:
    """The JWT's claims, verified with ``secret`` (short test secrets: no length warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return dict(jwt.decode(token, secret, algorithms=["HS256"]))


async def test_recording_ready_is_posted_with_bbbs_jwt(
    server: Server, nursery: trio.Nursery
) -> None:
    seen: list[tuple[str, str, bytes]] = []
    receiver = await start_form_receiver(nursery, seen)
    record_id = await recorded_meeting(
        server, "room-r", ("meta_bbb-recording-ready-url", f"{receiver}/ready?x=1")
    )
    await recorded_meeting(server, "room-quiet")  # no URL: no POST
    await server.call("getRecordings", [])  # a request: processing is done by now
    with trio.fail_after(5):
        while len(seen) < 2:  # noqa: ASYNC110 - the receiver is another server
            await trio.sleep(0.01)
    await trio.sleep(0.1)
    assert len(seen) == 2  # once per published format (presentation, video)
    for method, content_type, body in seen:
        assert (method, content_type) == ("POST", "application/x-www-form-urlencoded")
        (token,) = parse_qs(body.decode())["signed_parameters"]
        assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
        claims = decoded(token, SECRET)
        assert claims == {"meeting_id": "room-r", "record_id": record_id}
        with pytest.raises(jwt.InvalidSignatureError):
            decoded(token, "another secret")


async def test_recording_ready_falls_back_to_the_bn_and_canvas_keys(server: Server) -> None:
    for key in ("bn-recording-ready-url", "canvas-recording-ready-url"):
        await recorded_meeting(server, f"room-{key}", (f"meta_{key}", f"http://127.0.0.1:9/{key}"))
    await server.call("getRecordings", [])
    urls = [url for url, _ in server.sim.recordings.ready_sent]
    assert sorted(set(urls)) == [
        "http://127.0.0.1:9/bn-recording-ready-url",
        "http://127.0.0.1:9/canvas-recording-ready-url",
    ]
