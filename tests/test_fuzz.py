"""Fuzzing what peers send (issue 7 §1): BBB XML or a clean 4xx, never a 5xx or an exception.

Driven with Hypothesis:

- the request pipeline, :func:`proxy.calls.handle`, with arbitrary calls, raw queries,
  bodies and content types, many of them correctly signed so that they get past the
  checksum into the handlers and on to the simulated backends;
- :func:`proxy.bbb.checksum.verify` / ``signed_params`` with arbitrary text;
- the reader of backend answers, :func:`proxy.backends.client.parse_reply`, with bytes, and
  every forwarded call with the backends answering anything (status, XML, bytes) through a
  canned transport: the customer still gets BBB's envelope (a backend's own FAILED answer may
  be relayed; garbage is ``internalError``), never an exception;
- the meeting-ended endpoint, :func:`proxy.calls.ended.meeting_ended` directly with any
  text and ``/callbacks/v1/ended`` over HTTP with any query bytes;
- the API over HTTP with any query bytes, body and content type.

One gateway with two simulated BBBs runs for the whole module in a thread of its own
(its own ``trio.run``); the examples reach into it with ``trio.from_thread.run`` or over
loopback sockets, so each example costs a few milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus, urlencode
from xml.sax.saxutils import escape

import httpx
import pytest
import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from lxml import etree

from proxy.backends import http
from proxy.backends.client import Reply, parse_reply
from proxy.bbb import checksum
from proxy.calls import CALLS, Incoming, handle
from proxy.calls.ended import meeting_ended
from proxy.errors import BackendBadResponse
from proxy.gateway import Gateway
from proxy.request import Answer
from tests.harness import Stack, start_stack

SECRET = "acme-secret"
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Running:
    """The module's gateway, running in its own thread."""

    stack: Stack
    token: trio.lowlevel.TrioToken
    http: httpx.Client  # for the examples over loopback (keep-alive)

    def run[T](self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self.token)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, tmp_path_factory.mktemp("fuzz"))
            token = trio.lowlevel.current_trio_token()
            box["running"] = Running(stack, token, httpx.Client(timeout=10))
            box["stop"] = stop
            ready.set()
            await stop.wait()
            await stack.http.aclose()
            nursery.cancel_scope.cancel()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=thread_main, name="fuzz-gateway", daemon=True)
    thread.start()
    assert ready.wait(30), "the fuzz gateway did not start"
    assert "error" not in box, box.get("error")
    yield box["running"]
    box["running"].http.close()
    trio.from_thread.run_sync(box["stop"].set, trio_token=box["running"].token)
    thread.join(10)
    assert "error" not in box, box.get("error")


# -- strategies --------------------------------------------------------------------------------

NAMES = [
    "meetingID", "name", "fullName", "role", "password", "attendeePW", "moderatorPW",
    "maxParticipants", "duration", "createTime", "redirect", "logoutURL", "errorRedirectUrl",
    "meetingEndedURL", "meta_endCallbackUrl", "meta_bbb-proxy-customer", "meta_x", "welcome",
    "record", "voiceBridge", "userID", "checksum", "message",
]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(["room-1", "room-2", "MODERATOR", "VIEWER", "-1", "0", "²", "١٢", "9" * 40]),
    st.sampled_from(["http://127.0.0.1:1/x", "javascript:alert(1)", "http://a..b/", "false"]),
    st.text(max_size=40),
)
PARAMS = st.lists(st.tuples(st.sampled_from(NAMES) | st.text(max_size=12), VALUES), max_size=8)
CALL_NAMES = st.sampled_from([*CALLS, "getRecordings", "hooks/create", "", "api"]) | st.text(
    max_size=16
)
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=XyZ",
            "multipart/form-data",
            "application/xml",
            "text/xml; charset=utf-8",
            "text/plain",
            "",
        ]
    ),
    st.text(max_size=40),
)
XML_BODIES = st.one_of(
    st.sampled_from(
        [
            b"<modules/>",
            b'<modules><module name="presentation"><document url="http://x/a.pdf"/></module>'
            b"</modules>",
            b'<!DOCTYPE modules [<!ENTITY a "aaaaaaaaaa">]><modules>&a;&a;</modules>',
            b'<?xml version="1.0" encoding="bogus"?><modules/>',
            b"<modules>" * 300,
        ]
    ),
    st.builds(lambda t: f"<modules>{t}</modules>".encode(), st.text(max_size=60)),
)


def sign(call: str, query: str) -> str:
    return hashlib.sha1((call + query + SECRET).encode()).hexdigest()


ODD_SIZE = "meetingID=odd&name=Odd+room&maxParticipants=%C2%B2"


def _signed(call: str, query: str) -> str:
    return f"{query}&checksum={sign(call, query)}" if query else f"checksum={sign(call, '')}"


def multipart(fields: list[tuple[str, str]], tail: bytes) -> bytes:
    out = b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="'
        + k.encode("utf-8", "replace")
        + b'"\r\n\r\n'
        + v.encode("utf-8", "replace")
        + b"\r\n"
        for k, v in fields
    )
    return out + b"--XyZ--\r\n" + tail


@st.composite
def requests(draw: st.DrawFn) -> Incoming:
    """A request as the web layer hands it over: often signed, sometimes anything at all."""
    call = draw(st.sampled_from(list(CALLS)) if draw(st.integers(0, 4)) else CALL_NAMES)
    base = [
        ("meetingID", f"room-{draw(st.integers(0, 4))}"),
        ("name", "Fuzz room"),
        ("fullName", "Fuzzy"),
        ("role", "VIEWER"),
        ("maxParticipants", "2"),
    ]
    params = draw(st.lists(st.sampled_from(base), unique=True)) + draw(PARAMS)
    params = draw(st.permutations(params))
    how = draw(st.sampled_from(["url", "url", "url", "empty", "canonical", "raw"]))
    content_type = draw(CONTENT_TYPES)
    body = b""
    if draw(st.integers(0, 2)) == 0:
        body = draw(st.one_of(st.binary(max_size=200), XML_BODIES))
    query = urlencode(params, quote_via=quote_plus)
    if how == "url":
        query = f"{query}&checksum={sign(call, query)}" if query else f"checksum={sign(call, '')}"
    elif how in ("empty", "canonical"):
        form = urlencode(params, quote_via=quote_plus).encode()
        body = draw(st.sampled_from([form, multipart(params, draw(st.binary(max_size=20)))]))
        content_type = draw(
            st.sampled_from(
                ["application/x-www-form-urlencoded", "multipart/form-data; boundary=XyZ"]
            )
        )
        signed = "" if how == "empty" else checksum.canonical_query(params)
        query = f"checksum={sign(call, signed)}"
    else:
        query = draw(st.text(max_size=120))
    return Incoming(
        customer_id=draw(st.sampled_from(["acme"] * 8 + ["globex", "off", "nobody", None])),
        host=draw(st.sampled_from(["", "bbb.globex.test", "x"])),
        call=call,
        raw_query=query,
        body=body,
        content_type=content_type,
    )


# -- assertions --------------------------------------------------------------------------------


async def handled(gw: Gateway, incoming: Incoming) -> tuple[str, Answer]:
    """:func:`handle`, with a streamed answer (getRecordings) read whole."""
    result, answer = await handle(gw, incoming)
    return result, await answer.buffered()


def assert_bbb_json(body: bytes) -> None:
    """BBB's JSON envelope: the text-track calls answer JSON, their errors too."""
    response = json.loads(body)["response"]
    assert response["returncode"] in ("SUCCESS", "FAILED"), body
    assert response.get("messageKey") != "internalError", body


def assert_bbb_answer(answer: Answer, *, backend_fault: bool = False) -> None:
    """BBB's XML envelope (HTTP 200) or, for join, a redirect; nothing else.

    ``internalError`` is the gateway's own failure, so it is refused unless the backend
    answered garbage (``backend_fault``), which BBB clients see as ``internalError``.
    """
    if answer.status == 302:
        assert answer.headers.get("Location"), answer
        return
    assert answer.status == 200, answer
    if answer.headers.get("Content-Type", "").startswith("application/json"):
        assert isinstance(answer.body, bytes)
        assert_bbb_json(answer.body)
        return
    assert answer.headers.get("Content-Type", "").startswith("text/xml"), answer.headers
    body = answer.body if isinstance(answer.body, bytes) else str(answer.body).encode()
    root = etree.fromstring(body)
    assert root.tag == "response"
    if backend_fault:  # a backend's own answer may be relayed as it came
        assert root.find("returncode") is not None, body
        return
    assert root.findtext("returncode") in ("SUCCESS", "FAILED")
    assert root.findtext("messageKey") != "internalError", body


def assert_http_bbb_answer(response: httpx.Response) -> None:
    assert response.status_code in (200, 302), (response.status_code, response.text)
    if response.status_code == 302:
        assert response.headers.get("location")
        return
    if response.headers["content-type"].startswith("application/json"):
        assert_bbb_json(response.content)
        return
    assert response.headers["content-type"].startswith("text/xml"), response.text
    root = etree.fromstring(response.content)
    assert root.findtext("returncode") in ("SUCCESS", "FAILED")
    assert root.findtext("messageKey") != "internalError", response.text


# -- the request pipeline ----------------------------------------------------------------------


@FUZZ
@given(incoming=requests())
@example(incoming=Incoming("acme", "", "create", _signed("create", ODD_SIZE)))
@example(  # a multipart part whose name werkzeug reads as None (found by this test)
    incoming=Incoming(
        "acme",
        "",
        "create",
        _signed("create", ""),
        b'--XyZ\r\nContent-Disposition: form-data; name="\r"\r\n\r\nroom-1\r\n--XyZ--\r\n',
        "multipart/form-data; boundary=XyZ",
    )
)
@example(incoming=Incoming("acme", "", "join", "a=1&checksum=x&checksum=y", b"role=MODERATOR"))
def test_handle_answers_bbb_xml_whatever_the_request(running: Running, incoming: Incoming) -> None:
    result, answer = running.run(handled, running.stack.gateway, incoming)
    answer = running.run(answer.buffered)  # getRecordings streams its answer
    event(result)
    assert isinstance(result, str) and result
    assert_bbb_answer(answer)


@settings(max_examples=300, deadline=None)
@given(
    call=st.text(max_size=10),
    raw_query=st.text(max_size=200),
    body=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=5),
    secrets=st.lists(st.text(max_size=10), max_size=3),
)
@example(call="end", raw_query="checksum=é" * 20, body=[], secrets=["s"])
@example(call="end", raw_query="checks%75m=1&checksum=2", body=[("checksum", "3")], secrets=[""])
def test_checksum_verification_is_total(
    call: str, raw_query: str, body: list[tuple[str, str]], secrets: list[str]
) -> None:
    assert checksum.verify(call, raw_query, secrets, body) in (True, False)
    params = checksum.signed_params(call, raw_query, secrets, body)
    assert params is None or all(k != "checksum" for k, _ in params)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.text(max_size=12).filter(lambda p: "checksum=" not in p), max_size=6),
    at=st.integers(min_value=0, max_value=6),
    cs=st.text(alphabet="0123456789abcdef", min_size=1, max_size=8),
)
def test_one_checksum_component_signs_what_bbb_web_checks(
    parts: list[str], at: int, cs: str
) -> None:
    """Wherever one whole checksum component sits, the signed string is bbb-web's."""
    parts = [p.replace("&", "") for p in parts]
    at = min(at, len(parts))
    query = "&".join([*parts[:at], f"checksum={cs}", *parts[at:]])
    split = checksum.split_checksum(query)
    if any(unquote_plus(p.partition("=")[0]) == "checksum" for p in parts):  # checks%75m
        assert split is None
        return
    assert split is not None and split.checksum == cs
    assert split.signed == checksum.strip_checksum(query, cs)


# -- the reader of backend answers -------------------------------------------------------------


class Canned:
    """A backend transport that answers every request with one canned answer."""

    def __init__(self, answer: http.Answer) -> None:
        self.answer = answer

    async def request(
        self, method: str, target: str, body: bytes | None = None, content_type: str | None = None
    ) -> http.Answer:
        return self.answer

    async def aclose(self) -> None:
        pass


FIELDS = st.sampled_from(
    [
        "returncode", "messageKey", "message", "meetingID", "internalMeetingID", "createTime",
        "maxUsers", "duration", "running", "url", "session_token", "attendeePW", "metadata",
        "meetings", "meeting", "voiceBridge", "participantCount",
    ]
)  # fmt: skip
ANSWER_TEXT = st.one_of(
    st.sampled_from(["SUCCESS", "FAILED", "notFound", "²", "9" * 5000, "-1", "javascript:x"]),
    st.text(max_size=30),
)


@st.composite
def backend_answers(draw: st.DrawFn) -> http.Answer:
    """What a misbehaving BBB server might send back."""
    if draw(st.integers(0, 3)) == 0:
        body = draw(st.binary(max_size=300))
    else:
        fields = draw(st.lists(st.tuples(FIELDS, ANSWER_TEXT), max_size=10))
        inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields)
        code = draw(st.sampled_from(["SUCCESS", "FAILED", "", "x"]))
        body = f"<response><returncode>{code}</returncode>{inner}</response>".encode()
    status = draw(st.sampled_from([200, 200, 200, 302, 404, 500]))
    location = draw(st.sampled_from(["", "http://bbb.test/?errors=x", "javascript:alert(1)"]))
    return http.Answer(status, body, location)


FORWARDED = [
    ("create", [("meetingID", "answers-new"), ("name", "Answers room")]),
    ("create", [("meetingID", "answers-room"), ("name", "Answers room")]),
    ("getMeetingInfo", [("meetingID", "answers-room")]),
    ("isMeetingRunning", [("meetingID", "answers-room")]),
    ("end", [("meetingID", "answers-room")]),
    ("sendChatMessage", [("meetingID", "answers-room"), ("message", "hi")]),
    ("getMeetings", []),
    ("join", [("meetingID", "answers-room"), ("fullName", "Ann"), ("role", "VIEWER")]),
    ("join", [("meetingID", "answers-room"), ("fullName", "Ann"), ("redirect", "false")]),
    ("getRecordings", []),
]


@settings(max_examples=200, deadline=None)
@given(answer=backend_answers(), which=st.sampled_from(FORWARDED))
def test_whatever_a_backend_answers_the_customer_gets_bbb_xml(
    running: Running, answer: http.Answer, which: tuple[str, list[tuple[str, str]]]
) -> None:
    gw = running.stack.gateway
    if gw.ledger.get(("acme", "answers-room")) is None:  # a real create, on a real simulator
        query = _signed("create", "meetingID=answers-room&name=Answers+room&maxParticipants=2")
        running.run(handle, gw, Incoming("acme", "", "create", query))
    call, params = which
    query = urlencode(params, quote_via=quote_plus)
    saved = {bid: client._transport for bid, client in gw.clients.items()}
    try:
        for client in gw.clients.values():
            client._transport = Canned(answer)
        _, reply = running.run(handled, gw, Incoming("acme", "", call, _signed(call, query)))
    finally:
        for bid, client in gw.clients.items():
            client._transport = saved[bid]
    assert_bbb_answer(reply, backend_fault=True)


@settings(max_examples=250, deadline=None)
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda inner: f"<response>{inner}</response>".encode("utf-8", "replace"),
            st.text(max_size=200),
        ),
        st.sampled_from(
            [
                b"<response><returncode>SUCCESS</returncode><maxUsers>\xc2\xb2</maxUsers></response>",
                b'<!DOCTYPE r [<!ENTITY a "b">]><response><returncode>&a;</returncode></response>',
                b"<response>" * 400,
                b"\xff\xfe<\x00r\x00/\x00>\x00",
            ]
        ),
    )
)
def test_backend_answers_parse_or_are_bad_responses(content: bytes) -> None:
    try:
        reply = parse_reply("bbb-1", content)
    except BackendBadResponse:
        return
    assert isinstance(reply, Reply)
    assert reply.ok in (True, False)
    assert isinstance(reply.message_key, str)


# -- the meeting-ended endpoint ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    query=st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda params, sig: urlencode([*params, ("sig", sig)]),
            st.lists(
                st.tuples(st.sampled_from(["k", "b", "m", "i", "c", "cb", "ecb"]), VALUES),
                max_size=8,
            ),
            st.text(max_size=70),
        ),
    )
)
@example(query="k=ended&b=bbb-1&m=acme~x&sig=é")
@example(query="k=callback&b=bbb-1&m=acme~x&cb=http://[::1&ecb=http://a..b/&sig=" + "0" * 64)
def test_meeting_ended_never_raises(running: Running, query: str) -> None:
    assert running.run(meeting_ended, running.stack.gateway, query) in (True, False)


# -- over HTTP -----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
@example(raw="k=ended&b=bbb-1&m=x&sig=é".encode())
def test_the_callback_endpoint_answers_a_clean_4xx(running: Running, raw: bytes) -> None:
    query = quote(raw, safe="&=")
    response = running.http.get(f"{running.stack.url}/callbacks/v1/ended?{query}")
    assert response.status_code in (200, 403), response.text


@settings(max_examples=100, deadline=None)
@given(
    call=CALL_NAMES.map(lambda c: quote(c, safe="")).filter(bool),
    raw=st.binary(max_size=200),
    body=st.one_of(st.just(b""), st.binary(max_size=200), XML_BODIES),
    content_type=CONTENT_TYPES.filter(
        lambda c: c is None or (c.isascii() and c.isprintable() and c == c.strip())
    ),
    post=st.booleans(),
)
@example(call="%2F", raw=b"", body=b"", content_type=None, post=False)  # once an HTML 308
def test_the_api_answers_bbb_xml_over_http(
    running: Running, call: str, raw: bytes, body: bytes, content_type: str | None, post: bool
) -> None:
    url = f"{running.stack.api()}/{call}?{quote(raw, safe='&=')}"
    headers = {} if content_type is None else {"Content-Type": content_type}
    if post:
        response = running.http.post(url, content=body, headers=headers)
    else:
        response = running.http.get(url, headers=headers)
    assert_http_bbb_answer(response)
