"""The backend HTTP client against raw servers that misbehave in exact ways."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trustme

from proxy.backends.http import ConnectFailed, Pool, ProtocolFailed, Timeout
from proxy.config import Timeouts

FAST = Timeouts(connect=1, read=0.3, write=1, pool=0.2)

type Handler = Callable[[trio.SocketStream], Awaitable[None]]


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
