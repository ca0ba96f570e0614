"""The gateway's own connection loop (proxy/front.py): what it takes, what it hands on.

Over real sockets against a gateway with simulated backends: requests kept alive,
pipelined, trickled; a connection handed to hypercorn in its middle; the bounds in
time; a client going away cancelling its call.  ``parse_head`` is checked against h11
(hypercorn's parser) on arbitrary heads: what the loop takes, h11 reads the same way.
"""

from __future__ import annotations

import re
from typing import Any

import h11
import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from proxy import front
from proxy.front import Head, answer_head, parse_head
from tests.harness import Stack

GOOD = b"GET /acme/bigbluebutton/api/getMeetings?checksum=x HTTP/1.1\r\nHost: gw\r\nAccept: */*"


# -- parse_head: what is taken ------------------------------------------------------------------


def test_a_plain_api_get_is_taken_as_hypercorn_reads_it() -> None:
    head = parse_head(GOOD + b"\r\nX-Forwarded-For:  10.0.0.1 \r\nContent-Length: 0")
    assert head == Head(
        path=b"/acme/bigbluebutton/api/getMeetings",
        query=b"checksum=x",
        headers=[
            (b"host", b"gw"),
            (b"accept", b"*/*"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"content-length", b"0"),
        ],
        close=False,
    )


def test_connection_close_is_noted() -> None:
    head = parse_head(GOOD + b"\r\nConnection: keep-alive, Close")
    assert head is not None and head.close
    head = parse_head(GOOD + b"\r\nConnection: keep-alive")
    assert head is not None and not head.close


def test_calls_with_slashes_are_taken() -> None:
    head = parse_head(b"GET /acme/bigbluebutton/api/hooks/list HTTP/1.1\r\nHost: gw")
    assert head is not None and head.path == b"/acme/bigbluebutton/api/hooks/list"
    assert head.query == b""


@pytest.mark.parametrize(
    "head",
    [
        b"POST /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw",
        b"HEAD /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw",
        b"get /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/create HTTP/1.0\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/create HTTP/2.0\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/create  HTTP/1.1\r\nHost: gw",
        b"GET http://gw/acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/cre%61te HTTP/1.1\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/ HTTP/1.1\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/create/ HTTP/1.1\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/create2 HTTP/1.1\r\nHost: gw",
        b"GET //bigbluebutton/api/create HTTP/1.1\r\nHost: gw",
        b"GET /admin/api/customers HTTP/1.1\r\nHost: gw",
        b"GET /healthz HTTP/1.1\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/create?\xff HTTP/1.1\r\nHost: gw",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1",  # no Host
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: a\r\nHost: b",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nContent-Length: 1",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nContent-Length: 00",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nUpgrade: h2c",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\n folded",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nX-A : b",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nX(A): b",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nnocolon",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nX-A: b\x00c",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nX-A: b\nc",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\nX-A: b\rc",
        b"GET /acme/bigbluebutton/api/create HTTP/1.1\r\nHost: gw\r\n",
        b"",
    ],
)
def test_anything_else_is_left_to_hypercorn(head: bytes) -> None:
    assert parse_head(head) is None


_NAMES = st.sampled_from(
    [b"Host", b"host", b"Accept", b"X-Forwarded-For", b"Connection", b"Content-Length",
     b"Transfer-Encoding", b"Expect", b"Upgrade", b"X(y)", b"X y", b""]
)  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from([b"gw", b" 0 ", b"close", b"keep-alive", b"upgrade", b"chunked", b"1"]),
    st.binary(max_size=12),
)
_LINES = st.one_of(
    st.tuples(_NAMES, st.sampled_from([b":", b": ", b" : ", b""]), _VALUES).map(b"".join),
    st.binary(max_size=20),
)
_REQUEST_LINES = st.one_of(
    st.sampled_from(
        [
            b"GET /acme/bigbluebutton/api/join?meetingID=a&checksum=b HTTP/1.1",
            b"GET /acme/bigbluebutton/api/hooks/create HTTP/1.1",
            b"GET /acme/bigbluebutton/api/join HTTP/1.0",
            b"POST /acme/bigbluebutton/api/create HTTP/1.1",
        ]
    ),
    st.tuples(
        st.sampled_from([b"GET", b"POST", b"get", b""]),
        st.sampled_from([b" ", b"  ", b"\t"]),
        st.one_of(st.just(b"/acme/bigbluebutton/api/join"), st.binary(max_size=30)),
        st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b"HTTP/1.1", b" http/1.1", b""]),
    ).map(b"".join),
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_REQUEST_LINES, st.lists(_LINES, max_size=5))
def test_what_is_taken_h11_reads_the_same_way(request_line: bytes, lines: list[bytes]) -> None:
    """Total on any bytes; a head taken is one h11 accepts, with the same target and headers."""
    head = b"\r\n".join([request_line, *lines])
    taken = parse_head(head)
    if taken is None:
        return
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(head + b"\r\n\r\n")
    event = connection.next_event()
    assert isinstance(event, h11.Request), event
    assert event.method == b"GET" and event.http_version == b"1.1"
    assert event.target == taken.path + (b"?" + taken.query if b"?" in event.target else b"")
    assert list(event.headers) == taken.headers
    assert connection.next_event() in (h11.NEED_DATA, h11.EndOfMessage())


def test_answer_heads_are_written_as_h11_writes_them() -> None:
    headers = [(b"content-type", b"text/xml"), (b"content-length", b"2")]
    head, chunked = answer_head(200, headers, close=False)
    assert head == b"HTTP/1.1 200 \r\ncontent-type: text/xml\r\ncontent-length: 2\r\n\r\n"
    assert not chunked
    head, chunked = answer_head(302, [(b"location", b"http://x/")], close=True)
    assert head == (
        b"HTTP/1.1 302 \r\nlocation: http://x/\r\ntransfer-encoding: chunked\r\n"
        b"connection: close\r\n\r\n"
    )
    assert chunked


# -- over real sockets --------------------------------------------------------------------------


def _path(stack: Stack, call: str, params: list[tuple[str, str]]) -> bytes:
    return stack.signed(call, params).removeprefix(stack.url).encode()


def _get(path: bytes, *extra: bytes) -> bytes:
    return b"\r\n".join([b"GET " + path + b" HTTP/1.1", b"Host: gw", *extra, b"", b""])


async def _connect(stack: Stack) -> trio.SocketStream:
    host, port = stack.url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


class _Reader:
    """Answers read off one connection, with h11 as the client side."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def answer(self, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
        self.h11.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"gw")]))
        self.h11.send(h11.EndOfMessage())  # the client side's state, nothing is sent from it
        response: h11.Response | None = None
        body = b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(10):
                    self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                return response, body
            else:
                raise AssertionError(event)


def _returncode(body: bytes) -> str:
    return str(etree.fromstring(body).findtext("returncode"))


@pytest.fixture
def answered_here(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The paths the loop answered itself (not hypercorn)."""
    paths: list[bytes] = []
    original = front._Connection._answer

    async def spy(self: Any, head: Head, close: bool) -> bool:
        paths.append(head.path)
        return await original(self, head, close)

    monkeypatch.setattr(front._Connection, "_answer", spy)
    return paths


async def test_keep_alive_and_pipelined_requests(stack: Stack, answered_here: list[bytes]) -> None:
    await stack.create("front-1")
    answered_here.clear()
    info = _path(stack, "getMeetingInfo", [("meetingID", "front-1")])
    running = _path(stack, "isMeetingRunning", [("meetingID", "front-1")])
    stream = await _connect(stack)
    reader = _Reader(stream)
    await stream.send_all(_get(info))
    response, body = await reader.answer()
    assert response.status_code == 200 and _returncode(body) == "SUCCESS"
    assert etree.fromstring(body).findtext("meetingID") == "front-1"
    await stream.send_all(_get(running) + _get(info) + _get(running))  # pipelined: one write
    for expected in ("running", "meetingID", "running"):
        response, body = await reader.answer()
        assert _returncode(body) == "SUCCESS"
        assert etree.fromstring(body).find(expected) is not None
    assert len(answered_here) == 4
    assert dict(response.headers)[b"content-type"].startswith(b"text/xml")
    assert b"date" in dict(response.headers) and b"x-request-id" in dict(response.headers)
    await stream.aclose()


async def test_a_head_trickled_byte_by_byte_is_answered(
    stack: Stack, answered_here: list[bytes]
) -> None:
    stream = await _connect(stack)
    request = _get(_path(stack, "getMeetings", []))
    for n in range(len(request)):
        await stream.send_all(request[n : n + 1])
        await trio.lowlevel.checkpoint()
    response, body = await _Reader(stream).answer()
    assert response.status_code == 200 and _returncode(body) == "SUCCESS"
    assert answered_here == [b"/acme/bigbluebutton/api/getMeetings"]
    await stream.aclose()


async def test_a_connection_is_handed_to_hypercorn_for_its_first_other_request(
    stack: Stack, answered_here: list[bytes]
) -> None:
    """hypercorn answers it and closes the connection (``connection: close``): the client's
    next connection is the loop's again, so that a load balancer's long-lived connections
    do not all end up on hypercorn's slower path one POST at a time."""
    await stack.create("front-2")
    answered_here.clear()
    info = _path(stack, "getMeetingInfo", [("meetingID", "front-2")])
    stream = await _connect(stack)
    reader = _Reader(stream)
    await stream.send_all(_get(info))
    assert _returncode((await reader.answer())[1]) == "SUCCESS"
    # A GET with a body (quart's route), pipelined with a plain GET.
    await stream.send_all(
        b"GET " + info + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\nx" + _get(info)
    )
    response, body = await reader.answer()
    assert response.status_code == 200 and _returncode(body) == "SUCCESS"
    assert (b"connection", b"close") in list(response.headers)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # the pipelined GET is not answered
    await stream.aclose()
    assert len(answered_here) == 1
    stream = await _connect(stack)  # the next connection: the loop's
    await stream.send_all(_get(info) + _get(b"/healthz"))
    reader = _Reader(stream)
    response, body = await reader.answer()
    assert _returncode(body) == "SUCCESS" and len(answered_here) == 2
    response, body = await reader.answer()
    assert response.status_code == 200 and body.startswith(b"ok")
    await stream.aclose()


async def test_connection_close_is_honoured(stack: Stack) -> None:
    stream = await _connect(stack)
    await stream.send_all(_get(_path(stack, "getMeetings", []), b"Connection: close"))
    response, body = await _Reader(stream).answer()
    assert (b"connection", b"close") in list(response.headers)
    assert _returncode(body) == "SUCCESS"
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # closed by the gateway
    await stream.aclose()


async def test_max_requests_per_connection(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, answered_here: list[bytes]
) -> None:
    stream = await _connect(stack)
    reader = _Reader(stream)
    from hypercorn.config import Config as HypercornConfig

    monkeypatch.setattr(HypercornConfig, "keep_alive_max_requests", 3)
    path = _path(stack, "getMeetings", [])
    await stream.send_all(_get(path) * 4)
    for n in range(3):
        response, _ = await reader.answer()
        assert ((b"connection", b"close") in list(response.headers)) == (n == 2)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    assert len(answered_here) == 3
    await stream.aclose()


@pytest.fixture
async def quick(make_stack: Any) -> Stack:
    """A gateway whose client bounds are short: idle 0.5 s, a silent head 0.3 s."""
    return await make_stack(proxy={"timeouts": {"client_idle": 0.5, "client_read": 0.3}})  # type: ignore[no-any-return]


async def test_an_idle_connection_is_closed(quick: Stack) -> None:
    stream = await _connect(quick)
    started = trio.current_time()
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    assert 0.4 < trio.current_time() - started < 3
    await stream.aclose()


async def test_a_head_that_stops_halfway_is_closed(quick: Stack) -> None:
    stream = await _connect(quick)
    await stream.send_all(b"GET /acme/bigbluebutton/api/getMeetings HTTP/1.1\r\nHo")
    started = trio.current_time()
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    assert 0.2 < trio.current_time() - started < 3
    await stream.aclose()


async def test_a_head_trickled_beyond_the_idle_bound_is_closed(quick: Stack) -> None:
    stream = await _connect(quick)
    started = trio.current_time()
    closed = False
    with trio.fail_after(5):
        for byte in b"GET /acme/bigbluebutton/api/getMeetings HTTP/1.1\r\nHost: gw\r\n":
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                closed = True
                break
            await trio.sleep(0.1)  # each byte within client_read, the whole beyond client_idle
        if not closed:
            assert await stream.receive_some(100) == b""
    assert trio.current_time() - started < 4.5
    await stream.aclose()


async def test_a_client_gone_cancels_its_call(stack: Stack) -> None:
    await stack.create("front-3")
    sim, _ = stack.backend_meeting("acme", "front-3")
    sim.behaviour.latency = 30.0  # the backend answers in 30 s
    stream = await _connect(stack)
    await stream.send_all(_get(_path(stack, "getMeetingInfo", [("meetingID", "front-3")])))
    with trio.fail_after(5):
        while stack.gateway._in_flight == 0:  # noqa: ASYNC110  # no event to wait for
            await trio.sleep(0.01)
    await stream.aclose()
    with trio.fail_after(5):  # not 30 s
        await stack.gateway.wait_idle()
    sim.behaviour.latency = 0.0


async def test_a_streamed_answer_is_sent_chunked(stack: Stack, answered_here: list[bytes]) -> None:
    stream = await _connect(stack)
    await stream.send_all(_get(_path(stack, "getRecordings", [])))
    response, body = await _Reader(stream).answer()
    headers = dict(response.headers)
    assert _returncode(body) == "SUCCESS"
    if b"content-length" not in headers:
        assert headers[b"transfer-encoding"] == b"chunked"
    assert answered_here == [b"/acme/bigbluebutton/api/getRecordings"]
    assert re.search(rb"<recordings\s*/>|<recordings>", body) or b"noRecordings" in body
    await stream.aclose()


# -- no input ends the process ------------------------------------------------------------------

_JUNK = st.one_of(
    st.binary(max_size=300),
    st.tuples(_REQUEST_LINES, st.lists(_LINES, max_size=4), st.binary(max_size=40)).map(
        lambda parts: b"\r\n".join([parts[0], *parts[1]]) + b"\r\n\r\n" + parts[2]
    ),
)


async def _still_serving(stack: Stack) -> None:
    root = await stack.call("getMeetings", [])
    assert root.findtext("returncode") == "SUCCESS"


async def test_arbitrary_bytes_never_end_the_gateway(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a client sends, each connection is answered or closed, and the next client
    is served; nothing is logged as a failure of the loop."""
    examples: list[bytes] = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(_JUNK)
    def collect(data: bytes) -> None:
        examples.append(data)

    collect()
    for data in examples:
        stream = await _connect(stack)
        with trio.move_on_after(0.5):  # answered, closed, or waiting for more: all fine
            try:
                await stream.send_all(data)
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
    await _still_serving(stack)
    assert "a client connection failed" not in caplog.text
    assert "unexpected error" not in caplog.text


async def test_a_bug_in_the_loop_ends_one_connection_only(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(head: bytes) -> Head | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(front, "parse_head", broken)
    stream = await _connect(stack)
    await stream.send_all(_get(_path(stack, "getMeetings", [])))
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # closed, not hung
    await stream.aclose()
    assert "a client connection failed" in caplog.text
    monkeypatch.undo()
    await _still_serving(stack)
