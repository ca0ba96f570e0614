"""The simulated BBB server's webhooks service, against bbb-webhooks' own examples.

Event shapes are compared with bbb-webhooks' example events
(``tests/fixtures/bbb/bbb-webhooks/mapped-events.json``), answers with the client
libraries' captured hooks answers and BBB's docs (sources in ``tests/fixtures/bbb/
SOURCES.md``).  Retries and dropping run on trio's autojump clock with a recording
receiver; the rest over real sockets.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import trio
import trio.testing
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.simulator import Simulator, serve_simulator
from proxy.simulator.model import ApiRequest
from proxy.simulator.webhook_sender import deliver_hook
from proxy.simulator.webhooks import RETRY_INTERVALS_MS, WebhookService, url_search_params
from tests.harness import serve_endpoint, wait_until

SECRET = "8cd8ef52e8e101574e400365b55e11a6"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bbb"
MAPPED = FIXTURES / "bbb-webhooks" / "mapped-events.json"
PHP = FIXTURES / "bigbluebutton-api-php" / "responses"
DOCS = FIXTURES / "bigbluebutton-webhooks-docs"


def fixture_events() -> dict[str, dict[str, Any]]:
    """The first example of each event id in bbb-webhooks' mapped events (JSON lines)."""
    found: dict[str, dict[str, Any]] = {}
    for line in MAPPED.read_text().splitlines():
        if line.strip():
            event = json.loads(line)
            found.setdefault(event["data"]["id"], event)
    return found


def key_paths(value: object, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (``data.attributes.user.name``); lists by element."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            paths.add(prefix + key)
            paths |= key_paths(inner, prefix + key + ".")
    elif isinstance(value, list):
        for inner in value:
            paths |= key_paths(inner, prefix + "[].")
    return paths


def tags(root: etree._Element) -> list[tuple[str, object]]:
    return [(str(child.tag), tags(child)) for child in root]


def api(sim: Simulator, call: str, params: list[tuple[str, str]], **request: Any) -> str:
    reply = sim.handle(ApiRequest(call, raw_query=signed_query(call, params, SECRET), **request))
    return reply.body


def xml(body: str) -> etree._Element:
    return etree.fromstring(body.encode())


def make_sim(clock: list[float] | None = None) -> Simulator:
    now = clock if clock is not None else [1_700_000_000.0]
    return Simulator(SECRET, server_name="bbb-1.test", clock=lambda: now[0])


# -- the hooks API -----------------------------------------------------------------------------


def test_create_list_destroy_answer_as_bbb_webhooks_writes_them() -> None:
    sim = make_sim()
    first = api(sim, "hooks/create", [("callbackURL", "http://rx.test/b"), ("meetingID", "m-1")])
    created = xml(api(sim, "hooks/create", [("callbackURL", "http://rx.test/a")]))
    assert tags(created) == tags(xml((PHP / "hooks_create.xml").read_text()))
    hook_id = created.findtext("hookID") or ""
    assert len(hook_id) == 36  # a UUID, as 3.x makes them
    listed = api(sim, "hooks/list", [])
    assert "<callbackURL><![CDATA[http://rx.test/a]]></callbackURL>" in listed
    assert "<meetingID><![CDATA[m-1]]></meetingID>" in listed
    assert tags(xml(listed)) == tags(xml((DOCS / "hooks-list.xml").read_text()))
    destroyed = xml(api(sim, "hooks/destroy", [("hookID", hook_id)]))
    assert tags(destroyed) == tags(xml((PHP / "hooks_destroy.xml").read_text()))
    assert destroyed.findtext("removed") == "true"
    again = xml(api(sim, "hooks/destroy", [("hookID", hook_id)]))
    assert (again.findtext("messageKey"), again.findtext("message")) == (
        "destroyMissingHook",
        "The hook informed was not found.",
    )
    assert (xml(first).findtext("hookID") or "?") in api(sim, "hooks/list", [])
    assert hook_id not in api(sim, "hooks/list", [])


def test_a_callback_url_already_registered_is_the_old_hook_with_a_warning() -> None:
    sim = make_sim()
    first = xml(
        api(sim, "hooks/create", [("callbackURL", "http://rx.test/a"), ("meetingID", "x1")])
    )
    again = xml(
        api(sim, "hooks/create", [("callbackURL", "http://rx.test/a"), ("meetingID", "y2")])
    )
    assert tags(again) == tags(xml((PHP / "hooks_create_existing.xml").read_text()))
    assert again.findtext("returncode") == "SUCCESS"
    assert again.findtext("hookID") == first.findtext("hookID")
    assert again.findtext("messageKey") == "duplicateWarning"
    assert [h.meeting_id for h in sim.webhooks.hooks.values()] == ["x1"]  # unchanged


def test_list_by_meeting_shows_its_hooks_and_the_global_ones() -> None:
    sim = make_sim()
    api(sim, "hooks/create", [("callbackURL", "http://rx.test/global")])
    api(sim, "hooks/create", [("callbackURL", "http://rx.test/m1"), ("meetingID", "m1")])
    api(sim, "hooks/create", [("callbackURL", "http://rx.test/m2"), ("meetingID", "m2")])
    listed = xml(api(sim, "hooks/list", [("meetingID", "m1")]))
    urls = [h.findtext("callbackURL") for h in listed.iter("hook")]
    assert urls == ["http://rx.test/global", "http://rx.test/m1"]


def test_missing_parameters_and_bad_checksums_fail_with_bbb_webhooks_keys() -> None:
    sim = make_sim()
    missing_url = xml(api(sim, "hooks/create", []))
    assert missing_url.findtext("messageKey") == "missingParamCallbackURL"
    missing_id = xml(api(sim, "hooks/destroy", []))
    assert tags(missing_id) == tags(xml((PHP / "hooks_destroy_failed_no_id.xml").read_text()))
    assert missing_id.findtext("messageKey") == "missingParamHookID"
    query = signed_query("hooks/create", [("callbackURL", "http://rx.test/a")], "wrong")
    for raw in [query, "callbackURL=http%3A%2F%2Frx.test%2Fa"]:
        reply = xml(sim.handle(ApiRequest("hooks/create", raw_query=raw)).body)
        assert reply.findtext("messageKey") == "checksumError"
        assert reply.findtext("message") == "You did not pass the checksum security check."
    # signed for another call name: refused too (the call name is part of the checksum)
    other = signed_query("create", [("callbackURL", "http://rx.test/a")], SECRET)
    assert "checksumError" in sim.handle(ApiRequest("hooks/create", raw_query=other)).body
    assert sim.webhooks.hooks == {}


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
def test_the_checksum_algorithm_follows_its_length(algorithm: str) -> None:
    sim = make_sim()
    query = signed_query("hooks/list", [], SECRET, algorithm)
    assert "SUCCESS" in sim.handle(ApiRequest("hooks/list", raw_query=query)).body


def test_only_get_is_served() -> None:
    sim = make_sim()
    query = signed_query("hooks/list", [], SECRET)
    reply = sim.handle(ApiRequest("hooks/list", method="POST", raw_query=query))
    assert reply.status == 404


# -- events ------------------------------------------------------------------------------------


def run_meeting(sim: Simulator) -> None:
    """Create, two joins, a chat message, one user leaves, end (record=true)."""
    api(
        sim,
        "create",
        [
            ("meetingID", "room-1"),
            ("name", "Room 1"),
            ("record", "true"),
            ("meta_course", "Maths 101"),
        ],
    )
    client = {
        "remote_addr": "203.0.113.7",
        "user_agent": "Firefox/128",
        "referer": "https://lms.test/c/1",
    }
    api(
        sim,
        "join",
        [
            ("meetingID", "room-1"),
            ("fullName", "John Doe"),
            ("role", "MODERATOR"),
            ("userID", "lms-42"),
            ("userdata-bbb_custom", "x"),
        ],
        **client,
    )
    api(sim, "join", [("meetingID", "room-1"), ("fullName", "Mary Sue"), ("role", "VIEWER")])
    api(
        sim,
        "sendChatMessage",
        [("meetingID", "room-1"), ("message", "Public chat test"), ("userName", "Teacher")],
    )
    meeting = sim.meetings["room-1"]
    mary = next(a for a in meeting.attendees.values() if a.full_name == "Mary Sue")
    assert sim.leave(mary.session_token)
    api(sim, "end", [("meetingID", "room-1")])


def test_events_have_the_shapes_of_bbb_webhooks_examples() -> None:
    sim = make_sim()
    run_meeting(sim)
    examples = fixture_events()
    emitted = list(sim.webhooks.emitted)
    ids = [e["data"]["id"] for e in emitted]
    assert ids[:7] == [
        "meeting-created",
        "user-joined",
        "user-joined",
        "chat-group-message-sent",
        "user-left",
        "user-left",
        "meeting-ended",
    ]
    for event in emitted[:7]:
        example = examples[event["data"]["id"]]
        missing = key_paths(example) - key_paths(event)
        assert not missing, (event["data"]["id"], missing)
        assert event["data"]["attributes"]["meeting"]["external-meeting-id"] == "room-1"


def test_events_carry_the_personal_data_real_servers_send() -> None:
    sim = make_sim()
    run_meeting(sim)
    created, john = sim.webhooks.emitted[0], sim.webhooks.emitted[1]
    meeting = created["data"]["attributes"]["meeting"]
    assert meeting["metadata"] == {"course": "Maths 101"}
    assert meeting["moderator-pass"] and meeting["viewer-pass"]
    user = john["data"]["attributes"]["user"]
    assert (user["name"], user["external-user-id"], user["role"]) == (
        "John Doe",
        "lms-42",
        "MODERATOR",
    )
    assert (user["ip-address"], user["user-agent"], user["referer"]) == (
        "203.0.113.7",
        "Firefox/128",
        "https://lms.test/c/1",
    )
    assert len(user["session-token"]) == 16
    assert user["userdata"] == {"userdata-bbb_custom": "x"}
    chat = sim.webhooks.emitted[3]["data"]["attributes"]["chat-message"]
    assert (chat["message"], chat["sender"]["name"]) == ("Public chat test", "Teacher")


def test_a_recorded_meeting_emits_the_recording_steps() -> None:
    clock = [1_700_000_000.0]
    sim = make_sim(clock)
    sim.recordings.processing_seconds = 30
    run_meeting(sim)
    after_end = [e["data"]["id"] for e in sim.webhooks.emitted][7:]
    assert after_end == [
        "rap-archive-started",
        "rap-archive-ended",
        "rap-sanity-started",
        "rap-sanity-ended",
    ]
    clock[0] += 31
    sim.tick()
    published = [e["data"] for e in sim.webhooks.emitted][11:]
    assert [e["id"] for e in published] == [
        "rap-process-started",
        "rap-process-ended",
        "rap-publish-started",
        "rap-publish-ended",
        "rap-post-publish-started",
        "rap-post-publish-ended",
    ]
    record_id = sim.webhooks.emitted[0]["data"]["attributes"]["meeting"]["internal-meeting-id"]
    ended = published[3]["attributes"]
    assert (ended["record-id"], ended["success"], ended["workflow"]) == (
        record_id,
        True,
        "presentation",
    )
    assert ended["recording"]["metadata"]["course"] == "Maths 101"
    assert [p["format"] for p in ended["recording"]["playback"]] == ["presentation", "video"]
    api(sim, "publishRecordings", [("recordID", record_id), ("publish", "false")])
    api(sim, "deleteRecordings", [("recordID", record_id)])
    assert [e["data"]["id"] for e in sim.webhooks.emitted][-2:] == [
        "rap-unpublished",
        "rap-deleted",
    ]


def test_hooks_get_only_their_meeting_and_their_event_ids() -> None:
    sim = make_sim()
    api(sim, "hooks/create", [("callbackURL", "http://rx.test/all")])
    api(
        sim,
        "hooks/create",
        [
            ("callbackURL", "http://rx.test/room"),
            ("meetingID", "room-1"),
            ("eventID", "USER-JOINED,meeting-ended"),
        ],
    )
    api(sim, "hooks/create", [("callbackURL", "http://rx.test/other"), ("meetingID", "other")])
    run_meeting(sim)
    queued: dict[str, list[str]] = {h.callback_url: [] for h in sim.webhooks.hooks.values()}
    for hook in sim.webhooks.hooks.values():
        while (d := sim.webhooks.next_delivery(hook.hook_id)) is not None:
            queued[hook.callback_url].append(d.event["data"]["id"])
            sim.webhooks.done(d)
    assert queued["http://rx.test/room"] == ["user-joined", "user-joined", "meeting-ended"]
    assert queued["http://rx.test/other"] == []
    assert len(queued["http://rx.test/all"]) == len(sim.webhooks.emitted)


def test_a_restart_forgets_every_hook() -> None:
    sim = make_sim()
    api(sim, "hooks/create", [("callbackURL", "http://rx.test/a")])
    api(sim, "create", [("meetingID", "room-1"), ("name", "Room 1")])
    sim.webhooks.restart()
    assert "<hooks></hooks>" in api(sim, "hooks/list", [])
    assert sim.webhooks.take_work() == []


def test_the_body_is_encoded_as_url_search_params() -> None:
    # new URLSearchParams({a: "x y~*'()!/é"}).toString() === "a=x+y%7E*%27%28%29%21%2F%C3%A9"
    assert url_search_params([("a", "x y~*'()!/é")]) == "a=x+y%7E*%27%28%29%21%2F%C3%A9"


# -- delivery: retries, order, dropping (autojump clock, a recording receiver) ------------------


class Receiver:
    """Answers with the statuses given, then 200; records (virtual time, URL, body)."""

    def __init__(self, *statuses: int | None) -> None:
        self.statuses = list(statuses)
        self.seen: list[tuple[float, str, str]] = []

    async def __call__(self, url: str, body: str) -> int | None:
        self.seen.append((trio.current_time(), url, body))
        return self.statuses.pop(0) if self.statuses else 200


def service_with_hook(url: str = "http://rx.test/hook?x=1") -> tuple[WebhookService, str]:
    service = WebhookService("bbb-1.test", SECRET, lambda: 1_700_000_000_000)
    sim = make_sim()
    sim.webhooks = service
    api(sim, "hooks/create", [("callbackURL", url)])
    return service, next(iter(service.hooks))


def event_named(name: str) -> dict[str, Any]:
    return {
        "data": {
            "type": "event",
            "id": name,
            "attributes": {"meeting": {"internal-meeting-id": "i", "external-meeting-id": "e"}},
            "event": {"ts": 1},
        }
    }


async def test_a_failing_post_is_retried_after_each_interval_then_the_hook_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, hook_id = service_with_hook()
    service.emit(event_named("meeting-created"))
    service.emit(event_named("meeting-ended"))
    receiver = Receiver(*([500] * 20))
    start = trio.current_time()
    await deliver_hook(service, service.take_work()[0], receiver)
    times = [round(t - start, 3) for t, _, _ in receiver.seen]
    expected, at = [0.0], 0.0
    for interval in RETRY_INTERVALS_MS:
        at += interval / 1000
        expected.append(round(at, 3))
    assert times == expected  # the first event only: the second waits behind it
    assert hook_id not in service.hooks and [h.hook_id for h in service.dropped] == [hook_id]
    assert service.next_delivery(hook_id) is None


async def test_a_receiver_that_recovers_gets_every_event_once_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, _ = service_with_hook()
    for name in ["meeting-created", "user-joined", "meeting-ended"]:
        service.emit(event_named(name))
    receiver = Receiver(None, 503, 401)  # no answer, an error, then 401 (counts as delivered)
    await deliver_hook(service, service.take_work()[0], receiver)
    bodies = [body for _, _, body in receiver.seen]
    names = [json.loads(dict(parse_qsl(b))["event"])[0]["data"]["id"] for b in bodies]
    assert names == [
        "meeting-created",
        "meeting-created",
        "meeting-created",
        "user-joined",
        "meeting-ended",
    ]
    assert bodies[0] == bodies[1] == bodies[2]  # the same timestamp on every retry
    assert [d.event["data"]["id"] for d in service.delivered] == [
        "meeting-created",
        "user-joined",
        "meeting-ended",
    ]
    assert service.dropped == []


async def test_a_post_that_hangs_times_out_and_is_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, _ = service_with_hook()
    service.emit(event_named("meeting-created"))
    calls: list[float] = []

    async def hang_once(url: str, body: str) -> int:
        calls.append(trio.current_time())
        if len(calls) == 1:
            await trio.sleep_forever()
        return 200

    start = trio.current_time()
    await deliver_hook(service, service.take_work()[0], hang_once)
    assert [round(t - start, 3) for t in calls] == [0.0, 5.1]  # 5 s timeout, then 100 ms
    assert len(service.delivered) == 1


# -- over real sockets -------------------------------------------------------------------------


async def test_signed_posts_reach_a_receiver_over_http(nursery: trio.Nursery) -> None:
    got: list[tuple[str, str, bytes, dict[str, str]]] = []

    def respond(scope: dict[str, Any], body: bytes) -> int:
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        got.append((scope["path"], scope["query_string"].decode(), body, headers))
        return 200

    receiver = await serve_endpoint(nursery, respond)
    sim = Simulator(SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)
    base: str = await nursery.start(serve_simulator, sim)
    callback = f"{receiver}/events?token=abc"
    async with httpx.AsyncClient(timeout=5) as http:

        def url(call: str, params: list[tuple[str, str]]) -> str:
            return f"{base}/{call}?{signed_query(call, params, SECRET)}"

        answer = await http.get(url("hooks/create", [("callbackURL", callback)]))
        assert "<returncode>SUCCESS</returncode>" in answer.text
        await http.get(url("create", [("meetingID", "room-1"), ("name", "Room 1")]))
        joined = await http.get(
            url("join", [("meetingID", "room-1"), ("fullName", "Ann"), ("role", "VIEWER")]),
            headers={"User-Agent": "TestBrowser/1.0"},
        )
        token = dict(parse_qsl(urlsplit(joined.headers["location"]).query))["sessionToken"]
        left = await http.get(
            base.removesuffix("/bigbluebutton/api") + "/html5client/leave",
            params={"sessionToken": token},
        )
        assert left.status_code == 200
        await wait_until(lambda: len(got) == 3)
    names = []
    for path, query, body, headers in got:
        assert path == "/events"
        assert headers["content-type"] == "application/x-www-form-urlencoded"
        params = dict(parse_qsl(query))
        expected = hashlib.sha1(callback.encode() + body + SECRET.encode()).hexdigest()
        assert (params["token"], params["checksum"]) == ("abc", expected)
        form = parse_qsl(body.decode())
        assert [k for k, _ in form] == ["domain", "event", "timestamp"]
        assert form[0][1] == "bbb-1.test"
        (event,) = json.loads(form[1][1])
        names.append(event["data"]["id"])
    assert names == ["meeting-created", "user-joined", "user-left"]
    user = json.loads(dict(parse_qsl(got[1][2].decode()))["event"])[0]["data"]["attributes"]["user"]
    assert (user["ip-address"], user["user-agent"]) == ("127.0.0.1", "TestBrowser/1.0")
