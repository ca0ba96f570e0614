"""join over real sockets: redirect=false, DOWN backends, where errors go, fullName."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import orjson
import pytest
from lxml import etree

from proxy.backends.monitor import poll_once
from proxy.bbb import redirects
from proxy.bbb.checksum import signed_query
from tests.harness import Stack, StackFactory, query_of, text

FIXTURE = Path(__file__).parent / "fixtures" / "bbb" / "bigbluebutton"
JOIN = [("meetingID", "room-1"), ("fullName", "Ada"), ("role", "VIEWER")]
NO_REDIRECT = [*JOIN, ("redirect", "false")]


def tags(element: etree._Element) -> list[str]:
    return [str(child.tag) for child in element]


def joins_sent(stack: Stack) -> list[dict[str, str]]:
    return [dict(params) for sim in stack.sims for name, params in sim.requests if name == "join"]


def join_error(response: httpx.Response) -> tuple[str, str]:
    """(where the browser is sent, without errors=; the error's key) of a join error."""
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    [error] = orjson.loads(query_of(location)["errors"])
    return location[: location.index("errors=")].rstrip("?&"), error["key"]


def failed(response: httpx.Response) -> str:
    """The messageKey of a FAILED XML answer."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    root = etree.fromstring(response.content)
    assert text(root, "returncode") == "FAILED"
    return text(root, "messageKey")


# -- redirect=false ----------------------------------------------------------------------------


async def test_join_redirect_false_answers_bbbs_xml_from_the_backend(stack: Stack) -> None:
    created = await stack.create("room-1")
    response = await stack.http.get(stack.signed("join", [*NO_REDIRECT, ("userID", "lms-7")]))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    root = etree.fromstring(response.content)
    docs = tags(etree.fromstring((FIXTURE / "docs-join-redirect-false.xml").read_bytes()))
    assert tags(root) == [*docs[:-1], "guestStatus", docs[-1]]  # 3.0 adds guestStatus
    assert text(root, "returncode") == "SUCCESS"
    assert text(root, "messageKey") == "successfullyJoined"
    assert text(root, "meeting_id") == text(created, "internalMeetingID")  # as BBB: internal
    sim, backend_meeting = stack.backend_meeting("acme", "room-1")
    sim_url = stack.sim_urls[stack.sims.index(sim)]
    token = text(root, "session_token")
    assert text(root, "url") == f"{sim_url.removesuffix('/bigbluebutton/api')}" + (
        f"/html5client/join?sessionToken={token}"
    )
    assert backend_meeting not in response.text  # the namespaced ID never shows
    [sent] = joins_sent(stack)  # the backend was asked, with its own meetingID
    assert (sent["meetingID"], sent["redirect"]) == (backend_meeting, "false")
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "attendees/attendee/userID") == "lms-7"
    landed = await stack.http.get(text(root, "url"))
    assert landed.status_code == 200


@pytest.mark.parametrize("value", ["true", "TRUE", None])
async def test_plain_join_is_a_local_redirect(stack: Stack, value: str | None) -> None:
    await stack.create("room-1")
    params = JOIN if value is None else [*JOIN, ("redirect", value)]
    response = await stack.http.get(stack.signed("join", params))
    assert response.status_code == 302
    assert urlsplit(response.headers["location"]).path.endswith("/bigbluebutton/api/join")
    assert joins_sent(stack) == []  # BBB not contacted


async def test_join_redirect_false_backend_join_error_is_bbbs_redirect(stack: Stack) -> None:
    await stack.create("room-1", maxParticipants="1")
    first = await stack.http.get(stack.signed("join", [*NO_REDIRECT, ("userID", "u1")]))
    assert first.status_code == 200
    bye = [("logoutURL", "https://lms.test/bye?x=1"), ("userID", "u2")]
    full = await stack.http.get(stack.signed("join", [*NO_REDIRECT, *bye]))
    assert join_error(full) == ("https://lms.test/bye?x=1", "maxParticipantsReached")
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None


async def test_join_redirect_false_backend_not_found_releases(stack: Stack) -> None:
    await stack.create("room-1")
    sim, backend_meeting = stack.backend_meeting("acme", "room-1")
    del sim.meetings[backend_meeting]  # gone from the backend without a notice
    response = await stack.http.get(stack.signed("join", NO_REDIRECT))
    assert join_error(response)[1] == "notFound"
    assert stack.gateway.ledger.get(("acme", "room-1")) is None


async def test_join_redirect_false_wrong_password_is_bbbs_xml(stack: Stack) -> None:
    await stack.create("room-1", attendeePW="ap", moderatorPW="mp")
    params = [("meetingID", "room-1"), ("fullName", "A"), ("password", "x"), ("redirect", "false")]
    response = await stack.http.get(stack.signed("join", params))
    assert failed(response) == "Params required"


@pytest.mark.parametrize(
    ("mode", "key"), [("garbage", "internalError"), ("http500", "internalError")]
)
async def test_join_redirect_false_backend_failure_is_bbbs_envelope(
    stack: Stack, mode: str, key: str
) -> None:
    await stack.create("room-1")
    sim, _ = stack.backend_meeting("acme", "room-1")
    sim.behaviour.mode = mode
    response = await stack.http.get(stack.signed("join", NO_REDIRECT))
    assert failed(response) == key
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None


# -- a meeting on a DOWN backend ---------------------------------------------------------------


async def test_join_of_a_meeting_on_a_down_backend_is_an_error(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    reservation = stack.gateway.ledger.get(("acme", "room-1"))
    assert reservation is not None
    stack.sims[0].behaviour.mode = "http500"
    for _ in range(stack.config.proxy.health.down_after):  # the monitor's own polls
        await poll_once(stack.gateway, reservation.backend_id)
    assert stack.gateway.backend_down(reservation.backend_id)
    logout = ("logoutURL", "https://lms.test/bye")
    response = await stack.http.get(stack.signed("join", [*JOIN, logout]))
    assert join_error(response) == ("https://lms.test/bye", "serverUnavailable")
    response = await stack.http.get(stack.signed("join", [*NO_REDIRECT, logout]))
    assert failed(response) == "serverUnavailable"
    assert joins_sent(stack) == []


# -- where join errors go ----------------------------------------------------------------------


def unsigned(stack: Stack, params: list[tuple[str, str]], customer: str = "acme") -> str:
    query = signed_query("join", params, "not-the-secret")
    return f"{stack.api(customer)}/join?{query}"


@pytest.mark.parametrize("name", ["logoutURL", "errorRedirectUrl"])
async def test_unsigned_join_never_redirects_where_it_asks(stack: Stack, name: str) -> None:
    params = [*JOIN, (name, "https://evil.test/phish")]
    home = stack.url + "/"
    assert join_error(await stack.http.get(unsigned(stack, params))) == (home, "checksumError")
    unknown = unsigned(stack, params, customer="nobody")
    assert join_error(await stack.http.get(unknown)) == (home, "checksumError")
    signed = await stack.http.get(stack.signed("join", params))
    assert join_error(signed) == ("https://evil.test/phish", "notFound")  # signed: its choice


@pytest.mark.parametrize(
    "target",
    [
        "javascript:alert(1)",
        "JavaScript://lms.test/%0aalert(1)",
        "data:text/html,<script>alert(1)</script>",
        "ftp://lms.test/x",
        "//evil.test/x",
        "/relative/path",
        "http:///no-host",
        "http://[::1/broken",
    ],
)
async def test_join_error_never_redirects_to_other_schemes(stack: Stack, target: str) -> None:
    response = await stack.http.get(stack.signed("join", [*JOIN, ("errorRedirectUrl", target)]))
    assert join_error(response) == (stack.url + "/", "notFound")


@pytest.mark.parametrize("char", ["\x00", "\r\n", "\n", "\t", "\x1b", "\x7f", "\x85"])
@pytest.mark.parametrize("name", ["logoutURL", "errorRedirectUrl"])
async def test_control_character_in_error_target_answers_xml(
    stack: Stack, char: str, name: str
) -> None:
    target = f"https://lms.test/bye{char}Set-Cookie: a=b"
    response = await stack.http.get(stack.signed("join", [*JOIN, (name, target)]))
    assert failed(response) == "notFound"
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize(
    ("target", "where"),
    [
        (
            "https://lms.test/über uns?q=日本",
            f"https://lms.test/{quote('über')}%20uns?q=%E6%97%A5%E6%9C%AC",
        ),
        (" HTTPS://Bücher.test:8443/ü ", "https://xn--bcher-kva.test:8443/%C3%BC"),
        ("https://a..bücher.test/", None),
        (f"https://{'ü' * 70}.test/", None),
    ],
)
async def test_non_ascii_error_target_is_made_ascii(
    stack: Stack, target: str, where: str | None
) -> None:
    response = await stack.http.get(stack.signed("join", [*JOIN, ("logoutURL", target)]))
    assert join_error(response) == (where or stack.url + "/", "notFound")


# -- fullName ----------------------------------------------------------------------------------


@pytest.mark.parametrize("meeting", ["room-1", "unknown-room"])
@pytest.mark.parametrize("full_name", [None, "", "   "])
async def test_join_without_full_name_is_missing_param(
    stack: Stack, meeting: str, full_name: str | None
) -> None:
    await stack.create("room-1")
    params = [("meetingID", meeting), ("role", "VIEWER")]
    if full_name is not None:
        params.append(("fullName", full_name))
    for extra in ([], [("redirect", "false")]):
        response = await stack.http.get(stack.signed("join", params + extra))
        assert join_error(response) == (stack.url + "/", "missingParamFullName")
    assert joins_sent(stack) == []


# -- the decisions, as plain functions ---------------------------------------------------------

FALLBACK = "https://gw.test/"


@pytest.mark.parametrize(
    ("params", "target"),
    [
        (None, FALLBACK),
        ([], FALLBACK),
        ([("logoutURL", "https://a.test/")], "https://a.test/"),
        (
            [("logoutURL", "https://a.test/"), ("errorRedirectUrl", "https://b.test/")],
            "https://b.test/",
        ),
        ([("errorRedirectUrl", ""), ("logoutURL", "https://a.test/")], "https://a.test/"),
        (
            [("logoutURL", "https://a.test/1"), ("logoutURL", "https://a.test/2")],
            "https://a.test/1",
        ),
        ([("logoutURL", "HTTP://a.test")], "http://a.test"),
        ([("logoutURL", "https://a.test/~x!$&'()*+,;=:@[]")], "https://a.test/~x!$&'()*+,;=:@[]"),
        ([("logoutURL", "https://a.test/\x1f")], None),
        ([("logoutURL", "https://a.test/\x7f")], None),
        ([("logoutURL", "https://a.test/\x9f")], None),
        ([("logoutURL", "https://a.test/\xa0x")], "https://a.test/%C2%A0x"),
        ([("logoutURL", "https://a.test/ ~")], "https://a.test/%20~"),
        ([("logoutURL", "mailto:x@a.test")], FALLBACK),
        ([("logoutURL", "https:a.test")], FALLBACK),
        ([("logoutURL", "https://a..bücher.test/")], FALLBACK),
        ([("logoutURL", f"https://{'a' * 64}.test/")], f"https://{'a' * 64}.test/"),
        ([("logoutURL", "https://bücher.test/ü")], "https://xn--bcher-kva.test/%C3%BC"),
    ],
)
def test_join_error_target(params: list[tuple[str, str]] | None, target: str | None) -> None:
    assert redirects.join_error_target(params, FALLBACK) == target


def _location(errors: object) -> str:
    return "https://x.test/bye?a=1&errors=" + quote(orjson.dumps(errors).decode(), safe="")


@pytest.mark.parametrize(
    "location",
    [
        "https://x.test/bye",
        "https://x.test/bye?errors=",
        "https://x.test/bye?errors=%5B",
        "http://[::1/x?errors=[]",
        _location([]),
        _location({"key": "notFound", "message": "m"}),
        _location(["notFound"]),
        _location([{"message": "m"}]),
        _location([{"key": "", "message": "m"}]),
        _location([{"key": 7, "message": "m"}]),
        _location([{"key": "notFound", "message": None}]),
        _location([{"key": "notFound"}]),
    ],
)
def test_a_redirect_that_is_not_bbbs_join_error_reads_as_none(location: str) -> None:
    assert redirects.join_error_in(location) is None


def test_a_backends_join_error_is_read_back_bounded_and_printable() -> None:
    error = redirects.join_error_in(
        _location(
            [{"key": "maxParticipantsReached", "message": "Full."}, {"key": "x", "message": ""}]
        )
    )
    assert error is not None and (error.message_key, error.message) == (
        "maxParticipantsReached",
        "Full.",
    )
    error = redirects.join_error_in(
        _location([{"key": "k\x00\r\n" + "y" * 100, "message": "m\x1b" * 900}])
    )
    assert error is not None
    assert error.message_key == "k" + "y" * 63
    assert error.message == "m" * 900
    error = redirects.join_error_in(_location([{"key": "k", "message": "z" * 5000}]))
    assert error is not None and error.message == "z" * 1000
