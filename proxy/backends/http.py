"""A small HTTP/1.1 client for the gateway's calls to one BBB server.

Why not httpx: profiled under create load, httpx's request machinery (URL
model, auth and redirect layers, anyio, the connection pool's bookkeeping)
cost about a quarter of the gateway's CPU, for calls that are always the same
shape: one GET or POST to one known server, no redirects, no cookies.  This
client keeps a LIFO pool of keep-alive connections per server, parses answers
with h11, and applies each phase's timeout exactly where the I/O happens:

- ``pool``: waiting for a free connection slot;
- ``connect``: TCP connect and TLS handshake;
- ``write``: sending the request (a streamed body: each of its chunks);
- ``read``: from the request sent to the answer's last byte.

A request body is bytes (sent with its Content-Length) or an async iterable of chunks,
sent with chunked transfer encoding as the chunks come (putRecordingTextTrack's upload,
:mod:`proxy.uploads`): the connection holds one chunk at a time.  An exception the
iterable raises aborts the request: the connection is closed before the body's end, so
the server never sees a whole request, and the exception propagates unchanged.

Error handling: every failure is raised as one of :class:`ConnectFailed`
(nothing was sent: safe to try elsewhere), :class:`Timeout` (sent, no answer
in time) or :class:`ProtocolFailed` (the connection broke or the answer was
not HTTP).  An idle connection the server has closed is noticed before reuse
(it reads as ready) and dropped, so a request is never sent into a dead socket.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from proxy.bbb.numbers import parse_int
from proxy.config import Timeouts

# Default cap on one answer ([proxy] max_answer_bytes).  A getMeetings of 500 meetings with
# 100 attendees each is 15.1 MiB (docs/decisions.md, "Bounds on what a peer sends").
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# A streamed answer (Pool.stream) is not kept, so it is capped far higher: 1 GiB.
MAX_STREAMED_BYTES = 1024 * 1024 * 1024
STREAM_READ = 16 * 1024  # a streamed answer's reads: 20 listings at once hold 20 of them
IDLE_SECONDS = 30.0  # idle connections older than this are closed rather than reused
USER_AGENT = b"bbb-proxy"

type Body = bytes | AsyncIterable[bytes]  # an iterable is streamed (chunked)


class HttpError(Exception):
    pass


class ConnectFailed(HttpError):
    """The connection could not be made (or no slot was free in time); nothing was sent."""


class Timeout(HttpError):
    """The request was sent but the answer did not come in time."""


class ProtocolFailed(HttpError):
    """The connection broke mid-answer, or the answer was not valid HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    location: str = ""  # a redirect's Location header (join errors), else ""


@dataclass
class _Connection:
    stream: trio.abc.Stream
    h11: h11.Connection
    idle_since: float

    def reusable(self, now: float) -> bool:
        if now - self.idle_since > IDLE_SECONDS:
            return False
        socket_stream = self.stream
        if isinstance(socket_stream, trio.SSLStream):
            socket_stream = socket_stream.transport_stream
        if isinstance(socket_stream, trio.SocketStream):
            # Readable while idle means the server closed it (or sent junk): drop it.
            return not socket_stream.socket.is_readable()
        return True


class Pool:
    """Keep-alive connections to one server (``base_url``), at most ``size`` at once."""

    def __init__(
        self,
        base_url: str,
        timeouts: Timeouts,
        size: int,
        ssl_context: ssl.SSLContext | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        parts = urlsplit(base_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        self._host_header = (parts.netloc if not default_port else self._host).encode()
        self._timeouts = timeouts
        self._max_answer = max_answer_bytes
        self._slots = trio.CapacityLimiter(size)
        self._idle: list[_Connection] = []
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None

    async def request(
        self, method: str, target: str, body: Body | None = None, content_type: str | None = None
    ) -> Answer:
        """Send one request (``target`` is the path and query) and read the whole answer."""
        return await self._request(method, target, body, content_type, None)

    async def stream(self, method: str, target: str, sink: Callable[[bytes], None]) -> Answer:
        """As :meth:`request`, but a 200 answer's body goes to ``sink`` as it arrives and is
        not kept (``Answer.body`` is empty), capped at :data:`MAX_STREAMED_BYTES`.
        ``sink`` must not raise."""
        return await self._request(method, target, None, None, sink)

    async def _request(
        self,
        method: str,
        target: str,
        body: Body | None,
        content_type: str | None,
        sink: Callable[[bytes], None] | None,
    ) -> Answer:
        with trio.move_on_after(self._timeouts.pool) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise ConnectFailed("no free connection in time")
        try:
            connection = await self._connection()
            answer = await self._exchange(connection, method, target, body, content_type, sink)
        finally:
            self._slots.release()
        return answer

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable(now):
                return connection
            await trio.aclose_forcefully(connection.stream)
        with trio.move_on_after(self._timeouts.connect) as connecting:
            try:
                stream = await self._open()
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                cause = exc.__cause__ or exc  # trio wraps TLS failures (certificate, handshake)
                raise ConnectFailed(f"{type(cause).__name__}: {cause}") from None
        if connecting.cancelled_caught:
            raise ConnectFailed("connect timed out")
        return _Connection(stream, h11.Connection(h11.CLIENT), now)

    async def _open(self) -> trio.abc.Stream:
        tcp = await trio.open_tcp_stream(self._host, self._port)
        if self._ssl is None:
            return tcp
        stream = trio.SSLStream(tcp, self._ssl, server_hostname=self._host, https_compatible=True)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)  # a refused certificate must not leak the socket
            raise
        return stream

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        target: str,
        body: Body | None,
        content_type: str | None,
        sink: Callable[[bytes], None] | None = None,
    ) -> Answer:
        try:
            events = self._events(method, target, body, content_type)
            data = b"".join(connection.h11.send(e) or b"" for e in events)
            with _deadline(self._timeouts.write, "sending the request"):
                await _send(connection.stream, data)
            if body is not None and not isinstance(body, bytes):
                await self._stream_body(connection, body)
            with _deadline(self._timeouts.read, "waiting for the answer"):
                answer = await _read_answer(connection, self._max_answer, sink)
        except BaseException:
            await trio.aclose_forcefully(connection.stream)
            raise
        await self._keep_or_close(connection)
        return answer

    def _events(
        self, method: str, target: str, body: Body | None, content_type: str | None
    ) -> list[h11.Request | h11.Data | h11.EndOfMessage]:
        """The request's events; for a streamed body only its head (see _stream_body)."""
        headers = [(b"Host", self._host_header), (b"User-Agent", USER_AGENT)]
        if isinstance(body, bytes):
            headers.append((b"Content-Length", str(len(body)).encode()))
        elif body is not None:
            headers.append((b"Transfer-Encoding", b"chunked"))
        if body is not None and content_type:
            headers.append((b"Content-Type", content_type.encode("latin-1")))
        events: list[h11.Request | h11.Data | h11.EndOfMessage] = [
            h11.Request(method=method, target=target, headers=headers)
        ]
        if body is not None and not isinstance(body, bytes):
            return events
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        return events

    async def _stream_body(self, connection: _Connection, body: AsyncIterable[bytes]) -> None:
        """Send ``body``'s chunks as they come, each within the write timeout, then its end."""
        async for chunk in body:
            if chunk:
                with _deadline(self._timeouts.write, "sending the request"):
                    await _send(connection.stream, connection.h11.send(h11.Data(data=chunk)) or b"")
        with _deadline(self._timeouts.write, "sending the request"):
            await _send(connection.stream, connection.h11.send(h11.EndOfMessage()) or b"")

    async def _keep_or_close(self, connection: _Connection) -> None:
        if connection.h11.our_state is h11.DONE and connection.h11.their_state is h11.DONE:
            connection.h11.start_next_cycle()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            await trio.aclose_forcefully(connection.stream)


@contextmanager
def _deadline(seconds: float, phase: str) -> Iterator[None]:
    """A phase's time limit; running out of it is :class:`Timeout`, naming the phase."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise Timeout(f"timed out {phase}")


async def _read_answer(
    connection: _Connection, limit: int, sink: Callable[[bytes], None] | None = None
) -> Answer:
    """Read one whole answer, at most ``limit`` bytes of body (else :class:`ProtocolFailed`).

    With ``sink``, a 200 answer's body is handed to it as it comes, not kept, and capped at
    :data:`MAX_STREAMED_BYTES` instead."""
    conn = connection.h11
    status, location = 0, ""
    chunks: list[bytes] = []
    size = 0
    while True:
        event = _next_event(conn)
        if event is h11.NEED_DATA:
            data = await _receive(connection.stream, STREAM_READ if sink else 65536)
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = dict(event.headers)
            location = headers.get(b"location", b"").decode("latin-1")
            if sink is not None and status == 200:
                limit = MAX_STREAMED_BYTES
            else:
                sink = None
            _check_declared_size(headers.get(b"content-length", b""), limit)
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise ProtocolFailed(f"answer larger than {limit} bytes")
            if sink is not None:
                sink(bytes(event.data))
            else:
                chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return Answer(status, b"".join(chunks), location)
        elif isinstance(event, h11.ConnectionClosed):
            raise ProtocolFailed("connection closed before the answer was complete")


def _check_declared_size(content_length: bytes, limit: int) -> None:
    """Refuse at once an answer whose Content-Length says it is too large."""
    if not content_length:
        return  # chunked, or read until close: counted as it comes
    declared = parse_int(content_length.decode("latin-1"))
    if declared is None or declared > limit:  # None: more digits than any answer needs
        raise ProtocolFailed(f"answer larger than {limit} bytes")


def _next_event(conn: h11.Connection) -> object:
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise ProtocolFailed(f"not HTTP/1.1: {exc}") from None


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
        raise ProtocolFailed(f"connection broke: {type(exc).__name__}") from None


async def _receive(stream: trio.abc.Stream, size: int = 65536) -> bytes:
    try:
        return bytes(await stream.receive_some(size))
    except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
        raise ProtocolFailed(f"connection broke: {type(exc).__name__}") from None
