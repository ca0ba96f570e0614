"""The backend HTTP client against raw servers that misbehave in exact ways."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
import trio
import trustme

from proxy.backends.http import ConnectFailed, Pool, ProtocolFailed, Timeout
from proxy.config import Timeouts

FAST = Timeouts(connect=1, read=0.3, write=1, pool=0.2)

type Handler = Callable[[trio.SocketStream], Awaitable[None]]
CLOSE = b"<close>"


async def serve(nursery: trio.Nursery, handler: Handler) -> str:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/bigbluebutton/api"


async def read_request(stream: trio.abc.Stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        data += chunk
    return data


async def test_keep_alive_reuses_one_connection(nursery: trio.Nursery) -> None:
    connections: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        connections.append(1)
        while request := await read_request(stream):
            assert request.startswith(b"GET /bigbluebutton/api/getMeetings?x=1 HTTP/1.1\r\n")
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    pool = Pool(await serve(nursery, handler), FAST, 4)
    for _ in range(5):
        answer = await pool.request("GET", "/bigbluebutton/api/getMeetings?x=1")
        assert (answer.status, answer.body) == (200, b"hello")
    assert len(connections) == 1
    await pool.aclose()


async def test_idle_connection_closed_by_server_is_not_reused(nursery: trio.Nursery) -> None:
    served: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        served.append(1)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await stream.aclose()  # no "Connection: close": the client finds out while idle

    pool = Pool(await serve(nursery, handler), FAST, 4)
    for _ in range(3):
        assert (await pool.request("GET", "/")).body == b"ok"
        await trio.sleep(0.05)
    assert len(served) == 3
    await pool.aclose()


async def test_a_request_ending_after_aclose_closes_its_connection(nursery: trio.Nursery) -> None:
    """A pool closed while a request is under way (a gateway stopping) does not keep that
    request's connection: nothing would ever close it."""
    answer_now = trio.Event()
    server_saw: list[bytes] = []
    seen = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await answer_now.wait()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        server_saw.append(await stream.receive_some(100))  # b"" once the client closes
        seen.set()

    pool = Pool(await serve(nursery, handler), FAST, 4)
    async with trio.open_nursery() as inner:
        inner.start_soon(pool.request, "GET", "/")
        await trio.sleep(0.05)
        await pool.aclose()
        answer_now.set()
    with trio.fail_after(2):
        await seen.wait()
    assert server_saw == [b""]


async def test_chunked_and_post(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        request = await read_request(stream)
        while len(request.split(b"\r\n\r\n", 1)[1]) < 7:
            request += await stream.receive_some(100)
        seen.append(request)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )

    pool = Pool(await serve(nursery, handler), FAST, 4)
    answer = await pool.request("POST", "/api/insertDocument", b"<x></x>", "application/xml")
    assert answer.body == b"abcde"
    assert b"Content-Type: application/xml" in seen[0]
    assert b"Content-Length: 7" in seen[0]
    assert seen[0].endswith(b"<x></x>")
    await pool.aclose()


async def test_read_timeout(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep_forever()

    pool = Pool(await serve(nursery, handler), FAST, 4)
    started = trio.current_time()
    with pytest.raises(Timeout, match="waiting for the answer"):
        await pool.request("GET", "/")
    assert 0.3 <= trio.current_time() - started < 2.0
    await pool.aclose()


async def test_garbage_and_broken_answers(nursery: trio.Nursery) -> None:
    answers = iter(
        [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]
    )

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(next(answers))
        await stream.aclose()

    pool = Pool(await serve(nursery, handler), FAST, 4)
    with pytest.raises(ProtocolFailed, match="not HTTP"):
        await pool.request("GET", "/")
    with pytest.raises(ProtocolFailed, match="closed"):
        await pool.request("GET", "/")
    await pool.aclose()


async def test_connect_refused_and_pool_exhausted(nursery: trio.Nursery) -> None:
    closed = Pool("http://127.0.0.1:9/bigbluebutton/api", FAST, 4)
    with pytest.raises(ConnectFailed):
        await closed.request("GET", "/")

    async def slow(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep(0.25)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    pool = Pool(await serve(nursery, slow), FAST, 1)
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await pool.request("GET", "/")
            outcomes.append("ok")
        except ConnectFailed:
            outcomes.append("no slot")

    async with trio.open_nursery() as both:
        both.start_soon(one)
        await trio.sleep(0.01)
        both.start_soon(one)
    assert sorted(outcomes) == ["no slot", "ok"]
    await pool.aclose()


async def test_https_verifies_the_server_certificate(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        try:
            await tls.do_handshake()
            while (await read_request(tls)).startswith(b"GET"):
                await tls.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except trio.BrokenResourceError:
            pass  # the untrusting client hangs up mid-handshake; the pool closes without notify

    plain = await serve(nursery, handler)
    url = plain.replace("http://127.0.0.1", "https://localhost")
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    pool = Pool(url, FAST, 2, ssl_context=trusting)
    for _ in range(3):
        assert (await pool.request("GET", "/bigbluebutton/api/getMeetings")).body == b"ok"
    await pool.aclose()
    untrusting = Pool(url, FAST, 2)  # the system's CAs do not know the test CA
    with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusting.request("GET", "/")
    await untrusting.aclose()


async def test_answers_above_the_cap_are_refused(nursery: trio.Nursery) -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 1000,  # exactly the cap
            b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n",  # says so: refused unread
            b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n" + b"b" * 512 + b"\r\n" + b"200\r\n" + b"c" * 512 + b"\r\n0\r\n\r\n",
        ]
    )  # fmt: skip

    async def handler(stream: trio.SocketStream) -> None:
        while await read_request(stream):
            await stream.send_all(next(answers))

    pool = Pool(await serve(nursery, handler), FAST, 4, max_answer_bytes=1000)
    assert len((await pool.request("GET", "/")).body) == 1000
    for _ in range(3):
        with pytest.raises(ProtocolFailed, match="larger than 1000 bytes"):
            await pool.request("GET", "/")
    await pool.aclose()


def canned(answers: list[bytes], connections: list[int]) -> Handler:
    """A server answering each request with the next of ``answers``, counting connections;
    an answer ending in ``CLOSE`` is sent without it, then the connection is closed."""
    queue = iter(answers)

    async def handler(stream: trio.SocketStream) -> None:
        connections.append(1)
        while await read_request(stream):
            answer = next(queue)
            await stream.send_all(answer.removesuffix(CLOSE))
            if answer.endswith(CLOSE):
                return

    return handler


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", True),
        (b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok", b"ok", True),  # hypercorn's, no reason
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", b"ok", False),
        (
            b"HTTP/1.1 200 OK\r\nConnection: x\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            False,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        (b"HTTP/1.1 200 OK\r\n\r\nto the end" + CLOSE, b"to the end", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", b"ok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK", b"ok", False),  # more
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"2;ext=1\r\nok\r\n1 \r\n!\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"ok!",
            True,
        ),
    ],
)
async def test_answers_are_framed_and_kept_as_http_1_1_says(
    nursery: trio.Nursery, answer: bytes, body: bytes, reused: bool
) -> None:
    connections: list[int] = []
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"
    pool = Pool(await serve(nursery, canned([answer, second], connections)), FAST, 4)
    first = await pool.request("GET", "/")
    assert (first.status, first.body) == (204 if b" 204 " in answer else 200, body)
    assert (await pool.request("GET", "/")).body == b"next"
    assert len(connections) == (1 if reused else 2)
    await pool.aclose()


@pytest.mark.parametrize(
    ("answer", "refusal"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "chunked alone"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", "alone"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "twice"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded\r\n\r\nok", "header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok", "header line"),
        (b"HTTP/1.1 200 OK\r\nX : a\r\nContent-Length: 2\r\n\r\nok", "header line"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok", "status line"),  # a bare LF
        (b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok", "status line"),
        (b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok", "status line"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "head larger"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000, "head larger"),  # and no end in sight
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n", "CRLF"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 20000, "line longer"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"X: t\r\n" * 3000
            + b"\r\n",
            "trailers larger",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no" + CLOSE, "closed before"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\no" + CLOSE, "closed before"),
        (b"HTTP/1.1 200 OK\r\n" + CLOSE, "closed before"),
    ],
)
async def test_answers_that_are_not_http_1_1_are_refused(
    nursery: trio.Nursery, answer: bytes, refusal: str
) -> None:
    pool = Pool(await serve(nursery, canned([answer], [])), FAST, 4)
    with pytest.raises(ProtocolFailed, match=refusal):
        await pool.request("GET", "/")
    await pool.aclose()


async def test_a_streamed_answer_is_handed_over_as_it_comes(nursery: trio.Nursery) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nxyz"
    failed = b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops"
    pool = Pool(await serve(nursery, canned([chunked, sized, failed], [])), FAST, 4)
    parts: list[bytes] = []
    for expected in (b"abcde", b"xyz"):
        answer = await pool.stream("GET", "/", parts.append)
        assert (answer.status, answer.body, b"".join(parts)) == (200, b"", expected)
        parts.clear()
    answer = await pool.stream("GET", "/", parts.append)  # not a 200: kept, not handed over
    assert (answer.status, answer.body, parts) == (500, b"oops", [])
    await pool.aclose()


@pytest.mark.parametrize(
    ("target", "content_type"),
    [
        ("/api/getMeetings?x=1 HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /", None),
        ("/api/getMeetings?x=\x00", None),
        ("/api/getMeetings?x=é", None),
        ("/api/insertDocument", "text/xml\r\nX-Injected: 1"),
        ("/api/insertDocument", "text/xml\x00"),
        ("/api/insertDocument", "text/xml; name=\u20ac"),
    ],
)
async def test_a_request_that_cannot_be_written_as_asked_is_not_sent(
    nursery: trio.Nursery, target: str, content_type: str | None
) -> None:
    connections: list[int] = []
    pool = Pool(await serve(nursery, canned([], connections)), FAST, 4)
    with pytest.raises(ProtocolFailed, match="cannot send"):
        await pool.request("POST", target, b"<x/>", content_type)
    assert connections == []
    await pool.aclose()


async def test_a_body_streamed_in_chunks(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        request = await read_request(stream)
        while not request.endswith(b"0\r\n\r\n"):
            request += await stream.receive_some(100)
        seen.append(request)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""  # nothing to send: no chunk (an empty one would end the body)
        yield b"defghijklmnopq"

    pool = Pool(await serve(nursery, handler), FAST, 4)
    assert (await pool.request("POST", "/api/x", body(), "text/plain")).body == b"ok"
    head, _, sent = seen[0].partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert sent == b"3\r\nabc\r\ne\r\ndefghijklmnopq\r\n0\r\n\r\n"
    await pool.aclose()


async def test_a_request_the_server_does_not_read_times_out_sending(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # reads nothing: the request fills the socket's buffers

    pool = Pool(await serve(nursery, handler), Timeouts(connect=1, read=5, write=0.2, pool=1), 1)
    with pytest.raises(Timeout, match="sending the request"):
        await pool.request("POST", "/api/insertDocument", b"x" * (32 * 1024 * 1024), "text/xml")
    await pool.aclose()


async def test_a_connection_reset_mid_answer_is_protocol_failed(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        # Closed with a reset (SO_LINGER 0), not a FIN.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    pool = Pool(await serve(nursery, handler), FAST, 1)
    with pytest.raises(ProtocolFailed, match="connection broke: ConnectionResetError"):
        await pool.request("GET", "/")
    await pool.aclose()
