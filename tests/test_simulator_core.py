"""The simulator's decisions as plain functions: no sockets, no trio, a hand-driven clock."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
from lxml import etree

from proxy.bbb.checksum import compute, signed_query
from proxy.simulator import Simulator
from proxy.simulator.model import ApiRequest, Reply, java_date

SECRET = "core-secret"


class Clock:
    def __init__(self) -> None:
        self.now = 1_715_261_728.123

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sim(clock: Clock) -> Simulator:
    return Simulator(SECRET, clock=clock)


def call(
    sim: Simulator, name: str, params: list[tuple[str, str]], origin: str = "http://127.0.0.1"
) -> Reply:
    query = signed_query(name, params, SECRET)
    return sim.handle(ApiRequest(name, raw_query=query, origin=origin))


def xml(reply: Reply) -> etree._Element:
    assert reply.status == 200
    return etree.fromstring(reply.body.encode())


def key(reply: Reply) -> str | None:
    return xml(reply).findtext("messageKey")


def create(sim: Simulator, meeting_id: str = "m-1", *extra: tuple[str, str]) -> etree._Element:
    return xml(call(sim, "create", [("meetingID", meeting_id), ("name", "Room"), *extra]))


def test_java_date_format() -> None:
    assert java_date(1715261728123) == "Thu May 09 13:35:28 UTC 2024"
    assert java_date(1531155809613) == "Mon Jul 09 17:03:29 UTC 2018"


def test_create_uses_the_clock_and_records_the_request(sim: Simulator) -> None:
    root = create(sim, "m-1", ("meta_bbb-Origin", "LMS"), ("meta_x_y", "dropped"), ("meta_", "no"))
    assert root.findtext("createTime") == "1715261728123"
    assert root.findtext("createDate") == "Thu May 09 13:35:28 UTC 2024"
    assert sim.meetings["m-1"].metadata == {"bbb-origin": "LMS"}
    assert sim.requests == [
        (
            "create",
            [
                ("meetingID", "m-1"),
                ("name", "Room"),
                ("meta_bbb-Origin", "LMS"),
                ("meta_x_y", "dropped"),
                ("meta_", "no"),
            ],
        )
    ]


def test_voice_bridges_are_unique(sim: Simulator) -> None:
    create(sim, "m-1", ("voiceBridge", "70757"))
    root = create(sim, "m-2", ("voiceBridge", "70757"))
    assert root.findtext("messageKey") == "nonUniqueVoiceBridge"
    bridges = {create(sim, f"r-{i}").findtext("voiceBridge") for i in range(50)}
    assert len(bridges) == 50
    assert all(re.fullmatch(r"[1-9]\d{4}", b or "") for b in bridges)


def test_ended_meeting_lingers_then_goes(sim: Simulator, clock: Clock) -> None:
    create(sim, "m-1", ("meetingEndedURL", "http://lb/x"))
    assert key(call(sim, "end", [("meetingID", "m-1")])) == "sentEndMeetingRequest"
    assert sim.take_notifications() == ["http://lb/x"]
    assert sim.take_notifications() == []
    assert xml(call(sim, "getMeetingInfo", [("meetingID", "m-1")])).findtext("endTime") != "0"
    assert key(call(sim, "end", [("meetingID", "m-1")])) == "sentEndMeetingRequest"
    assert sim.take_notifications() == []  # ended once, notified once
    clock.now += 1.0
    assert key(call(sim, "getMeetingInfo", [("meetingID", "m-1")])) == "notFound"
    assert sim.notified == ["http://lb/x"]


def test_without_linger_an_ended_meeting_is_gone_at_once(clock: Clock) -> None:
    sim = Simulator(SECRET, clock=clock, ended_linger_seconds=0)
    create(sim)
    call(sim, "end", [("meetingID", "m-1")])
    assert sim.meetings == {}


def test_create_after_end_makes_a_new_meeting(sim: Simulator, clock: Clock) -> None:
    first = create(sim)
    call(sim, "end", [("meetingID", "m-1")])
    clock.now += 0.5
    second = create(sim)
    assert second.findtext("messageKey") == ""
    assert second.findtext("internalMeetingID") != first.findtext("internalMeetingID")


def test_join_session_and_user_data(sim: Simulator) -> None:
    create(sim)
    reply = call(
        sim,
        "join",
        [
            ("meetingID", "m-1"),
            ("fullName", "Ann"),
            ("role", "Moderator"),
            ("userdata-bbb_default_layout", "CUSTOM"),
            ("userdata-a-b", "dropped"),
        ],
        origin="http://bbb.test:8080",
    )
    assert reply.status == 302 and reply.location is not None
    assert reply.location.startswith("http://bbb.test:8080/html5client/join?sessionToken=")
    token = parse_qs(urlsplit(reply.location).query)["sessionToken"][0]
    found = sim.session(token)
    assert found is not None
    meeting, attendee = found
    assert attendee.role == "MODERATOR"
    assert attendee.customdata == [("bbb_default_layout", "CUSTOM")]
    assert re.fullmatch(r"w_[a-z0-9]{12}", attendee.internal_id)
    assert meeting.running and meeting.has_user_joined
    call(sim, "end", [("meetingID", "m-1")])
    assert sim.session(token) is None


def test_missing_role_and_password_is_xml(sim: Simulator) -> None:
    create(sim)
    reply = call(sim, "join", [("meetingID", "m-1"), ("fullName", "Ann"), ("role", "ADMIN")])
    assert key(reply) == "Params required"


def test_redirect_parses_like_java_boolean(sim: Simulator) -> None:
    create(sim)
    base = [("meetingID", "m-1"), ("fullName", "Ann"), ("role", "VIEWER")]
    assert call(sim, "join", [*base, ("redirect", "FALSE")]).status == 200
    assert call(sim, "join", [*base, ("redirect", "0")]).status == 200
    assert call(sim, "join", [*base, ("redirect", "True")]).status == 302
    assert call(sim, "join", [*base, ("redirect", "")]).status == 302


def test_join_error_url_prefers_error_redirect_url(sim: Simulator) -> None:
    reply = call(
        sim,
        "join",
        [
            ("meetingID", "nope"),
            ("fullName", "Ann"),
            ("role", "VIEWER"),
            ("logoutURL", "https://a/"),
            ("errorRedirectUrl", "https://b/err?x=1"),
        ],
    )
    assert reply.location is not None and reply.location.startswith("https://b/err?x=1&errors=")


def test_parameter_in_url_and_body_is_a_checksum_error(sim: Simulator) -> None:
    query = "meetingID=m-1"
    request = ApiRequest(
        "getMeetingInfo",
        method="POST",
        raw_query=f"{query}&checksum={compute('getMeetingInfo', query, SECRET)}",
        form_params=(("meetingID", "m-2"),),
        content_type="application/x-www-form-urlencoded",
    )
    assert key(sim.handle(request)) == "checksumError"
    assert sim.requests == []


def test_post_rules(sim: Simulator) -> None:
    join = signed_query("join", [("meetingID", "m-1")], SECRET)
    assert key(sim.handle(ApiRequest("join", method="POST", raw_query=join))) == (
        "unsupportedRequest"
    )
    query = signed_query("create", [("meetingID", "m-1"), ("name", "Room")], SECRET)
    odd = ApiRequest("create", "POST", query, content_type="text/plain", body=b"hello")
    assert key(sim.handle(odd)) == "unsupportedContentType"
    bad_xml = ApiRequest("create", "POST", query, content_type="application/xml", body=b"<a>")
    assert xml(sim.handle(bad_xml)).findtext("returncode") == "FAILED"
    modules = b'<modules><module name="presentation"><document url="http://x/a.pdf"/></module>'
    modules += b"</modules>"
    good = ApiRequest("create", "POST", query, content_type="text/xml", body=modules)
    assert xml(sim.handle(good)).findtext("returncode") == "SUCCESS"


def test_statistics(sim: Simulator) -> None:
    create(sim, "m-1")
    create(sim, "m-2")
    call(sim, "join", [("meetingID", "m-2"), ("fullName", "Ann"), ("role", "VIEWER")])
    stats = sim.statistics()
    assert (stats.meetings, stats.running_meetings, stats.attendees, stats.requests) == (2, 1, 1, 3)
