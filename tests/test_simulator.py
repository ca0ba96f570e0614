"""The simulated BBB server over real HTTP: started on port 0, spoken to with httpx.

Answers are compared with real BBB responses (``tests/fixtures/bbb``, sources in its SOURCES.md)
by their element structure, ignoring text.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
import trio
from lxml import etree

from proxy.bbb.checksum import compute, signed_query
from proxy.simulator import Behaviour, Simulator, serve_simulator

SECRET = "8cd8ef52e8e101574e400365b55e11a6"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bbb"
DOCS = FIXTURES / "bigbluebutton"
PHP = FIXTURES / "bigbluebutton-api-php" / "responses"

Tags = list[tuple[str, "Tags"]]


def tag_tree(element: etree._Element) -> Tags:
    """Element names of ``element``'s children, recursively, in order; text ignored."""
    return [(str(child.tag), tag_tree(child)) for child in element]


def fixture_tags(path: Path) -> Tags:
    return tag_tree(etree.fromstring(path.read_bytes()))


def parse(text: str) -> etree._Element:
    assert not text.startswith("<?xml"), "BBB writes no XML prolog"
    return etree.fromstring(text.encode())


def text_of(root: etree._Element, path: str) -> str:
    found = root.findtext(path)
    assert found is not None, f"no <{path}> in {etree.tostring(root)!r}"
    return found


@dataclass
class Server:
    sim: Simulator
    api: str
    client: httpx.AsyncClient

    def url(self, call: str, params: list[tuple[str, str]], algorithm: str = "sha1") -> str:
        return f"{self.api}/{call}?{signed_query(call, params, SECRET, algorithm)}"

    async def call(
        self, call: str, params: list[tuple[str, str]], algorithm: str = "sha1"
    ) -> etree._Element:
        response = await self.client.get(self.url(call, params, algorithm))
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/xml;charset=utf-8"
        return parse(response.text)

    async def create(self, meeting_id: str = "room-1", *extra: tuple[str, str]) -> etree._Element:
        return await self.call("create", [("meetingID", meeting_id), ("name", "Room"), *extra])

    async def join(self, params: list[tuple[str, str]]) -> httpx.Response:
        return await self.client.get(self.url("join", params))


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    sim = Simulator(SECRET, expire_unjoined_minutes=None)
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


def join_errors(response: httpx.Response) -> tuple[str, list[dict[str, str]]]:
    """Where a failed join sent the browser, and the decoded ``errors=`` list."""
    assert response.status_code == 302
    location = response.headers["location"]
    errors = json.loads(parse_qs(urlsplit(location).query)["errors"][0])
    return location.split("?")[0], errors


# --- transport and checksum --------------------------------------------------


@pytest.mark.parametrize("path", ["/bigbluebutton/api", "/bigbluebutton/api/"])
async def test_version_document_needs_no_checksum(server: Server, path: str) -> None:
    base = server.api.removesuffix("/bigbluebutton/api")
    response = await server.client.get(base + path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/xml;charset=utf-8"
    root = parse(response.text)
    assert [tag for tag, _ in tag_tree(root)] == [
        "returncode",
        "version",
        "apiVersion",
        "bbbVersion",
        "graphqlWebsocketUrl",
        "graphqlApiUrl",
    ]
    assert text_of(root, "version") == "2.0"
    assert server.sim.requests == []


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
async def test_every_checksum_algorithm_is_accepted(server: Server, algorithm: str) -> None:
    root = await server.call("getMeetings", [], algorithm)
    assert text_of(root, "returncode") == "SUCCESS"


async def test_wrong_checksum_is_the_bbb_error_envelope(server: Server) -> None:
    response = await server.client.get(f"{server.api}/getMeetings?checksum={'0' * 40}")
    assert response.status_code == 200
    root = parse(response.text)
    assert tag_tree(root) == fixture_tags(DOCS / "docs-checksumError.xml")
    assert text_of(root, "messageKey") == "checksumError"
    assert server.sim.requests == []


async def test_missing_checksum_and_odd_length_are_checksum_errors(server: Server) -> None:
    for query in ["meetingID=a1", "meetingID=a1&checksum=abc"]:
        response = await server.client.get(f"{server.api}/isMeetingRunning?{query}")
        assert text_of(parse(response.text), "messageKey") == "checksumError"


@pytest.mark.parametrize("space", ["+", "%20"])
async def test_checksum_covers_the_raw_query_as_sent(server: Server, space: str) -> None:
    query = f"name=My{space}Room{space}%28A%29&meetingID=raw-1"
    url = f"{server.api}/create?{query}&checksum={compute('create', query, SECRET, 'sha256')}"
    root = parse((await server.client.get(url)).text)
    assert text_of(root, "returncode") == "SUCCESS"
    assert server.sim.meetings["raw-1"].name == "My Room (A)"
    assert server.sim.requests == [("create", [("name", "My Room (A)"), ("meetingID", "raw-1")])]


async def test_leading_ampersand_before_checksum_is_accepted(server: Server) -> None:
    url = f"{server.api}/getMeetings?&checksum={compute('getMeetings', '', SECRET)}"
    assert text_of(parse((await server.client.get(url)).text), "returncode") == "SUCCESS"


async def test_post_form_parameters_are_verified_and_used(server: Server) -> None:
    form = {"meetingID": "posted", "name": "Posted room"}
    url = f"{server.api}/create?checksum={compute('create', '', SECRET)}"
    root = parse((await server.client.post(url, data=form)).text)
    assert text_of(root, "returncode") == "SUCCESS"
    assert server.sim.meetings["posted"].name == "Posted room"


async def test_post_with_canonical_checksum_over_body(server: Server) -> None:
    body = "name=Body+room&meetingID=canon"
    canonical = "meetingID=canon&name=Body+room"
    body += f"&checksum={compute('create', canonical, SECRET)}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = await server.client.post(f"{server.api}/create", content=body, headers=headers)
    assert text_of(parse(response.text), "returncode") == "SUCCESS"


async def test_unknown_call_is_unsupported_request(server: Server) -> None:
    root = await server.call("getDefaultConfigXML", [])
    assert text_of(root, "returncode") == "FAILED"
    assert text_of(root, "messageKey") == "unsupportedRequest"


# --- create -------------------------------------------------------------------


async def test_create_answers_in_create_meeting_order(server: Server) -> None:
    root = await server.create(
        "room-1", ("meta_endCallbackUrl", "https://lms/x"), ("meta_a_b", "1")
    )
    assert tag_tree(root) == fixture_tags(DOCS / "docs-create-duplicateWarning.xml")
    assert text_of(root, "messageKey") == ""
    assert text_of(root, "message") == ""
    create_time = text_of(root, "createTime")
    sha = hashlib.sha1(b"room-1").hexdigest()
    assert text_of(root, "internalMeetingID") == f"{sha}-{create_time}"
    assert text_of(root, "parentMeetingID") == "bbb-none"
    assert len(text_of(root, "attendeePW")) == 8 and text_of(root, "attendeePW").isalnum()
    assert len(text_of(root, "voiceBridge")) == 5
    meeting = server.sim.meetings["room-1"]
    assert meeting.metadata == {"endcallbackurl": "https://lms/x"}


async def test_duplicate_create_returns_the_existing_meeting(server: Server) -> None:
    first = await server.create("dup", ("attendeePW", "ap"), ("moderatorPW", "mp"))
    for extra in [[("attendeePW", "ap"), ("moderatorPW", "mp")], []]:
        again = await server.create("dup", *extra)
        assert text_of(again, "returncode") == "SUCCESS"
        assert text_of(again, "messageKey") == "duplicateWarning"
        for field in ("internalMeetingID", "createTime", "voiceBridge", "attendeePW"):
            assert text_of(again, field) == text_of(first, field)


async def test_create_with_other_passwords_is_id_not_unique(server: Server) -> None:
    await server.create("dup", ("attendeePW", "ap"), ("moderatorPW", "mp"))
    root = await server.create("dup", ("attendeePW", "other"), ("moderatorPW", "mp"))
    assert text_of(root, "returncode") == "FAILED"
    assert text_of(root, "messageKey") == "idNotUnique"


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ([("name", "Room")], "missingParamMeetingID"),
        ([("meetingID", "a,b"), ("name", "Room")], "validationError"),
        ([("meetingID", "a"), ("name", "Room")], "validationError"),
        ([("meetingID", "abc")], "validationError"),
        ([("meetingID", "abc"), ("name", "Room"), ("duration", "x")], "validationError"),
    ],
)
async def test_create_validation(server: Server, params: list[tuple[str, str]], key: str) -> None:
    root = await server.call("create", params)
    assert text_of(root, "returncode") == "FAILED"
    assert text_of(root, "messageKey") == key
    assert server.sim.meetings == {}


# --- join ---------------------------------------------------------------------


async def test_join_redirects_to_the_client_and_counts_the_user(server: Server) -> None:
    await server.create()
    response = await server.join([("meetingID", "room-1"), ("fullName", "Ann"), ("role", "viewer")])
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(server.api.removesuffix("/bigbluebutton/api") + "/html5client/join?")
    token = parse_qs(urlsplit(location).query)["sessionToken"][0]
    assert len(token) == 16
    page = await server.client.get(location)
    assert page.status_code == 200 and "joined Room" in page.text
    running = await server.call("isMeetingRunning", [("meetingID", "room-1")])
    assert text_of(running, "running") == "true"
    info = await server.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text_of(info, "participantCount") == "1"
    assert text_of(info, "attendees/attendee/role") == "VIEWER"
    assert text_of(info, "attendees/attendee/userID").startswith("w_")


async def test_html5client_rejects_unknown_tokens(server: Server) -> None:
    base = server.api.removesuffix("/bigbluebutton/api")
    response = await server.client.get(f"{base}/html5client/join?sessionToken=nope")
    assert response.status_code == 404


async def test_join_without_redirect_answers_join_meeting_xml(server: Server) -> None:
    created = await server.create()
    params = [("meetingID", "room-1"), ("fullName", "Bo"), ("role", "MODERATOR")]
    response = await server.join([*params, ("redirect", "false"), ("userID", "lms-7")])
    assert response.status_code == 200
    root = parse(response.text)
    # The 3.0 template adds <guestStatus> before <url>; the docs example omits it.
    docs = fixture_tags(DOCS / "docs-join-redirect-false.xml")
    assert tag_tree(root) == [*docs[:-1], ("guestStatus", []), docs[-1]]
    assert tag_tree(root) == fixture_tags(PHP / "join_meeting.xml")
    assert text_of(root, "meeting_id") == text_of(created, "internalMeetingID")
    assert text_of(root, "url").endswith("sessionToken=" + text_of(root, "session_token"))
    attendee = next(iter(server.sim.meetings["room-1"].attendees.values()))
    assert (attendee.user_id, attendee.role) == ("lms-7", "MODERATOR")


async def test_join_by_password(server: Server) -> None:
    await server.create("room-1", ("attendeePW", "ap"), ("moderatorPW", "mp"))
    base = [("meetingID", "room-1"), ("fullName", "Cy")]
    assert (await server.join([*base, ("password", "mp")])).status_code == 302
    wrong = await server.join([*base, ("password", "nope")])
    assert wrong.status_code == 200
    root = parse(wrong.text)
    assert text_of(root, "returncode") == "FAILED"
    assert text_of(root, "messageKey") == "Params required"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ([("meetingID", "nope")], "notFound"),
        ([("meetingID", "room-1"), ("createTime", "1")], "mismatchCreateTimeParam"),
        ([("meetingID", "room-1"), ("fullName", "")], "missingParamFullName"),
    ],
)
async def test_join_errors_redirect_to_logout_url(
    server: Server, extra: list[tuple[str, str]], key: str
) -> None:
    await server.create("room-1", ("logoutURL", "https://lms.example/bye"))
    params = dict([("fullName", "Di"), ("role", "VIEWER"), *extra])
    where, errors = join_errors(await server.join(list(params.items())))
    expected = (
        "https://lms.example/bye"
        if params["meetingID"] == "room-1"
        else "http://bbb.example/home.html"
    )
    assert where == expected
    assert [error["key"] for error in errors] == [key]


async def test_join_checksum_error_redirects_to_requested_logout_url(server: Server) -> None:
    await server.create()
    query = "meetingID=room-1&fullName=Ed&role=VIEWER&logoutURL=" + quote("https://x.example/")
    response = await server.client.get(f"{server.api}/join?{query}&checksum={'a' * 40}")
    where, errors = join_errors(response)
    assert where == "https://x.example/"
    assert errors[0]["key"] == "checksumError"


async def test_max_participants_counts_unique_user_ids(server: Server) -> None:
    await server.create("room-1", ("maxParticipants", "2"))
    base = [("meetingID", "room-1"), ("fullName", "F"), ("role", "VIEWER")]
    for user_id in ["u1", "u2", "u1"]:  # the second u1 is a rejoin
        response = await server.join([*base, ("userID", user_id)])
        assert urlsplit(response.headers["location"]).path == "/html5client/join"
    _, errors = join_errors(await server.join([*base, ("userID", "u3")]))
    assert errors[0]["key"] == "maxParticipantsReached"
    assert server.sim.meetings["room-1"].unique_user_ids() == {"u1", "u2"}


# --- end and notifications -----------------------------------------------------


async def test_end_answers_and_notifies(server: Server, nursery: trio.Nursery) -> None:
    hits: list[str] = []
    done = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        hits.append(data.split(b" ")[1].decode())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        if len(hits) == 2:
            done.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    base = f"http://127.0.0.1:{port}"
    await server.create(
        "room-1",
        ("meetingEndedURL", f"{base}/ended?id=7"),
        ("meta_endCallbackUrl", f"{base}/callback"),
    )
    root = await server.call("end", [("meetingID", "room-1")])
    assert tag_tree(root) == fixture_tags(DOCS / "docs-end.xml")
    assert text_of(root, "messageKey") == "sentEndMeetingRequest"
    with trio.fail_after(5):
        await done.wait()
    assert sorted(hits) == ["/callback?recordingmarks=false&meetingID=room-1", "/ended?id=7"]
    info = await server.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text_of(info, "hasBeenForciblyEnded") == "true"
    _, errors = join_errors(
        await server.join([("meetingID", "room-1"), ("fullName", "G"), ("role", "VIEWER")])
    )
    assert errors[0]["key"] == "meetingForciblyEnded"


async def test_end_errors(server: Server) -> None:
    unknown = await server.call("end", [("meetingID", "nope")])
    assert text_of(unknown, "messageKey") == "notFound"
    await server.create("room-1", ("moderatorPW", "mp"))
    wrong = await server.call("end", [("meetingID", "room-1"), ("password", "x")])
    assert text_of(wrong, "messageKey") == "invalidPassword"
    assert not server.sim.meetings["room-1"].ended


# --- information calls -----------------------------------------------------------


async def test_get_meeting_info_has_the_3_0_shape(server: Server) -> None:
    metadata = [
        ("meta_bbb-origin-version", "v"),
        ("meta_bbb-origin-server-name", "lms.example"),
        ("meta_bbb-recording-ready-url", "https://lms.example/ready"),
        ("meta_bbb-origin", "greenlight"),
        ("meta_endCallbackUrl", "https://lms.example/ended"),
    ]
    await server.create("room-1", *metadata)
    await server.join([("meetingID", "room-1"), ("fullName", "H & I"), ("role", "MODERATOR")])
    root = await server.call("getMeetingInfo", [("meetingID", "room-1")])
    assert tag_tree(root) == fixture_tags(DOCS / "docs-getMeetingInfo-3.0.xml")
    assert text_of(root, "attendees/attendee/fullName") == "H & I"
    assert text_of(root, "metadata/endcallbackurl") == "https://lms.example/ended"
    missing = await server.call("getMeetingInfo", [("meetingID", "nope")])
    assert text_of(missing, "messageKey") == "notFound"


async def test_get_meetings_shapes(server: Server) -> None:
    empty = await server.call("getMeetings", [])
    assert [tag for tag, _ in tag_tree(empty)] == [
        "returncode",
        "meetings",
        "messageKey",
        "message",
    ]
    assert text_of(empty, "messageKey") == "noMeetings"
    assert text_of(empty, "message") == "no meetings were found on this server"
    await server.create("Demo Meeting")
    listed = await server.call("getMeetings", [])
    assert tag_tree(listed) == fixture_tags(DOCS / "docs-getMeetings.xml")


async def test_is_meeting_running(server: Server) -> None:
    unknown = await server.call("isMeetingRunning", [("meetingID", "nope")])
    assert tag_tree(unknown) == fixture_tags(DOCS / "docs-isMeetingRunning.xml")
    assert text_of(unknown, "running") == "false"
    await server.create()
    empty = await server.call("isMeetingRunning", [("meetingID", "room-1")])
    assert text_of(empty, "running") == "false"


# --- insertDocument, sendChatMessage, recordings ----------------------------------


async def test_insert_document(server: Server) -> None:
    await server.create()
    body = (
        FIXTURES / "bigbluebutton-api-php/requests/insert_document_presentations.xml"
    ).read_bytes()
    url = server.url("insertDocument", [("meetingID", "room-1")])
    ok = await server.client.post(url, content=body, headers={"Content-Type": "application/xml"})
    assert tag_tree(parse(ok.text)) == fixture_tags(PHP / "insert_document.xml")
    assert server.sim.meetings["room-1"].documents_inserted == 1
    plain = await server.client.post(url, content=body, headers={"Content-Type": "text/plain"})
    assert text_of(parse(plain.text), "messageKey") == "unsupportedContentType"
    broken = await server.client.post(
        url, content=b"<modules>", headers={"Content-Type": "text/xml"}
    )
    assert text_of(parse(broken.text), "returncode") == "FAILED"
    other = server.url("insertDocument", [("meetingID", "nope")])
    missing = await server.client.post(other, content=body, headers={"Content-Type": "text/xml"})
    assert text_of(parse(missing.text), "message") == "Meeting with id [nope] not found."


async def test_send_chat_message(server: Server) -> None:
    await server.create()
    root = await server.call("sendChatMessage", [("meetingID", "room-1"), ("message", "hi")])
    assert tag_tree(root) == fixture_tags(PHP / "send_chat_message.xml")
    assert text_of(root, "returncode") == "SUCCESS"
    assert server.sim.meetings["room-1"].chat_messages == [("System", "hi")]
    missing = await server.call("sendChatMessage", [("meetingID", "nope"), ("message", "hi")])
    assert text_of(missing, "messageKey") == "notFound"


async def test_recordings_are_always_empty(server: Server) -> None:
    root = await server.call("getRecordings", [])
    assert text_of(root, "messageKey") == "noRecordings"
    publish = await server.call("publishRecordings", [("recordID", "x"), ("publish", "true")])
    assert text_of(publish, "messageKey") == "notFound"


# --- behaviour modes -----------------------------------------------------------------


async def test_latency_delays_every_answer(server: Server) -> None:
    server.sim.behaviour.latency = 0.2
    start = trio.current_time()
    await server.call("getMeetings", [])
    assert trio.current_time() - start >= 0.2


async def test_hang_never_answers(server: Server) -> None:
    server.sim.behaviour.mode = "hang"
    with pytest.raises(httpx.ReadTimeout):
        await server.client.get(server.url("getMeetings", []), timeout=0.3)
    server.sim.behaviour.mode = "ok"
    assert text_of(await server.call("getMeetings", []), "returncode") == "SUCCESS"


async def test_garbage_is_200_without_xml(server: Server) -> None:
    server.sim.behaviour.mode = "garbage"
    response = await server.client.get(server.url("getMeetings", []))
    assert response.status_code == 200
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(response.content)


async def test_http500_is_an_html_page(server: Server) -> None:
    server.sim.behaviour = Behaviour(mode="http500")
    response = await server.client.get(server.url("getMeetings", []))
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/html")


async def test_refuse_create_fails_only_create(server: Server) -> None:
    server.sim.behaviour.mode = "refuse_create"
    root = await server.create()
    assert text_of(root, "returncode") == "FAILED"
    assert text_of(root, "messageKey") != ""
    assert server.sim.meetings == {}
    assert text_of(await server.call("getMeetings", []), "returncode") == "SUCCESS"


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown simulator mode"):
        Behaviour(mode="flaky")


# --- python -m proxy.simulator ---------------------------------------------------


async def test_command_line_starts_count_servers() -> None:
    command = [sys.executable, "-m", "proxy.simulator", "--port", "0", "--count", "2"]
    process = await trio.lowlevel.open_process(
        [*command, "--secret", SECRET, "--latency", "0.0"], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(20):
            while output.count(b"\n") < 2:
                chunk = await process.stdout.receive_some()
                assert chunk, "the simulator exited early"
                output += chunk
        urls = output.decode().split()
        assert len(set(urls)) == 2
        async with httpx.AsyncClient(timeout=5) as client:
            for url in urls:
                assert url.startswith("http://127.0.0.1:") and url.endswith("/bigbluebutton/api")
                signed = f"{url}/getMeetings?{signed_query('getMeetings', [], SECRET)}"
                response = await client.get(signed)
                assert text_of(parse(response.text), "messageKey") == "noMeetings"
    finally:
        process.terminate()
        with trio.fail_after(10):
            await process.wait()
        await process.stdout.aclose()
