"""A small HTTP/1.1 client for the gateway's calls to one BBB server.

Why not httpx, nor h11: profiled under create load, httpx's request machinery
(URL model, auth and redirect layers, anyio, the connection pool's bookkeeping)
cost about a quarter of the gateway's CPU; later, under getMeetingInfo load,
h11's event objects and state machine were still most of what remained of a
backend call (``bench/README.md``, "One process, leaner").  The calls are
always the same shape: one GET or POST to one known server, no redirects, no
cookies, no pipelining.  This client keeps a LIFO pool of keep-alive
connections per server (a plain-TCP one is a non-blocking socket used
directly; TLS goes through trio's ``SSLStream``), writes each request in one
piece, reads answers with the small parser below, and applies each phase's
timeout exactly where the I/O happens:

- ``pool``: waiting for a free connection slot;
- ``connect``: TCP connect and TLS handshake;
- ``write``: sending the request (a streamed body: each of its chunks);
- ``read``: from the request sent to the answer's last byte.

What it reads (and refuses, as :class:`ProtocolFailed`): a status line
``HTTP/1.0`` or ``HTTP/1.1``, a three-digit status and an optional reason;
header lines ``name: value`` (a token, then no control characters but tab),
ended by CRLF, the whole head at most :data:`MAX_HEAD_BYTES` (no obsolete line
folding); interim ``1xx`` answers are skipped (``101`` is refused).  The body
is framed by ``Transfer-Encoding: chunked`` (the only coding accepted; not
together with ``Content-Length``), else by ``Content-Length`` (digits; repeated
values must agree), else it runs to the connection's end; ``204`` and ``304``
have none.  A connection is kept for the next request only if the answer was
HTTP/1.1, framed, without ``Connection: close``, read to its end and followed by
nothing.  A request is written only with a target and header values that cannot
change its meaning (no spaces, controls or line breaks in the target; no line
breaks or NULs in a value): anything else is refused before a connection is taken.

A request body is bytes (sent with its Content-Length) or an async iterable of chunks,
sent with chunked transfer encoding as the chunks come (putRecordingTextTrack's upload,
:mod:`proxy.uploads`): the connection holds one chunk at a time.  An exception the
iterable raises aborts the request: the connection is closed before the body's end, so
the server never sees a whole request, and the exception propagates unchanged.

Error handling: every failure is raised as one of :class:`ConnectFailed`
(nothing was sent: safe to try elsewhere), :class:`Timeout` (sent, no answer
in time) or :class:`ProtocolFailed` (the connection broke, the answer was
not HTTP, or the request could not be written).  An idle connection the server
has closed is noticed before reuse (it reads as ready) and dropped, so a
request is never sent into a dead socket.
"""

from __future__ import annotations

import math
import re
import select
import socket
import ssl
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from proxy.bbb.numbers import parse_int
from proxy.config import Timeouts

# Default cap on one answer ([proxy] max_answer_bytes).  A getMeetings of 500 meetings with
# 100 attendees each is 15.1 MiB (docs/decisions.md, "Bounds on what a peer sends").
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# A streamed answer (Pool.stream) is not kept, so it is capped far higher: 1 GiB.
MAX_STREAMED_BYTES = 1024 * 1024 * 1024
MAX_HEAD_BYTES = 16 * 1024  # an answer's status line and headers; a chunk's size line, trailers
STREAM_READ = 16 * 1024  # a streamed answer's reads: 20 listings at once hold 20 of them
READ = 64 * 1024  # every other read
IDLE_SECONDS = 30.0  # idle connections older than this are closed rather than reused
USER_AGENT = b"bbb-proxy"

type Body = bytes | AsyncIterable[bytes]  # an iterable is streamed (chunked)
type Sink = Callable[[bytes], None]

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_TARGET = re.compile(r"[\x21-\x7e]+")  # what may stand between the method and the version
_METHOD = re.compile(r"[A-Z]+")
_VALUE = re.compile(r"[^\x00\r\n]*")  # a header value we send: no line break, no NUL


class HttpError(Exception):
    pass


class ConnectFailed(HttpError):
    """The connection could not be made (or no slot was free in time); nothing was sent."""


class Timeout(HttpError):
    """The request was sent but the answer did not come in time."""


class ProtocolFailed(HttpError):
    """The connection broke mid-answer, the answer was not valid HTTP/1.1, or the request
    could not be written as asked."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    location: str = ""  # a redirect's Location header (join errors), else ""


@dataclass(slots=True)
class _Connection:
    """One connection: a plain TCP one is a non-blocking socket used directly (trio's
    stream layers cost more than the rest of a call's reading); TLS goes through trio."""

    stream: trio.SSLStream[trio.SocketStream] | None  # TLS
    sock: socket.socket | None  # plain TCP
    idle_since: float
    buffer: bytearray = field(default_factory=bytearray)  # received, not yet parsed

    def reusable(self, now: float) -> bool:
        if now - self.idle_since > IDLE_SECONDS:
            return False
        # Readable while idle means the server closed it (or sent junk): drop it.
        sock = self.sock if self.stream is None else self.stream.transport_stream.socket
        assert sock is not None
        probe = select.poll()
        probe.register(sock, select.POLLIN)
        return not probe.poll(0)

    async def close(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
        elif self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


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
        host = (parts.netloc if not default_port else self._host).encode()
        self._fixed_headers = b"Host: %b\r\nUser-Agent: %b\r\n" % (host, USER_AGENT)
        self._timeouts = timeouts
        self._max_answer = max_answer_bytes
        self._slots = trio.CapacityLimiter(size)
        self._idle: list[_Connection] = []
        self._closed = False  # after aclose, a request still under way closes its connection
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None

    async def request(
        self, method: str, target: str, body: Body | None = None, content_type: str | None = None
    ) -> Answer:
        """Send one request (``target`` is the path and query) and read the whole answer."""
        return await self._request(method, target, body, content_type, None)

    async def stream(self, method: str, target: str, sink: Sink) -> Answer:
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
        sink: Sink | None,
    ) -> Answer:
        head = self._head(method, target, body, content_type)
        try:
            self._slots.acquire_nowait()  # the usual case: no wait, no extra task switch
        except trio.WouldBlock:
            with trio.move_on_after(self._timeouts.pool) as waiting:
                await self._slots.acquire()
            if waiting.cancelled_caught:
                raise ConnectFailed("no free connection in time") from None
        try:
            connection = await self._connection()
            answer = await self._exchange(connection, head, body, sink)
        finally:
            self._slots.release()
        return answer

    async def aclose(self) -> None:
        """Close the idle connections; one still in use is closed when its request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()

    def _head(self, method: str, target: str, body: Body | None, content_type: str | None) -> bytes:
        """The request's head (with a whole body, the body too)."""
        if not _METHOD.fullmatch(method) or not _TARGET.fullmatch(target):
            raise ProtocolFailed(f"cannot send {method} {target!r}: not a request line")
        head = [b"%b %b HTTP/1.1\r\n%b" % (method.encode(), target.encode(), self._fixed_headers)]
        if isinstance(body, bytes):
            head.append(b"Content-Length: %d\r\n" % len(body))
        elif body is not None:
            head.append(b"Transfer-Encoding: chunked\r\n")
        if body is not None and content_type:
            if not _VALUE.fullmatch(content_type):
                raise ProtocolFailed("cannot send a Content-Type with a line break")
            try:
                head.append(b"Content-Type: %b\r\n" % content_type.encode("latin-1"))
            except UnicodeEncodeError:
                raise ProtocolFailed("cannot send a Content-Type outside latin-1") from None
        head.append(b"\r\n")
        if isinstance(body, bytes):
            head.append(body)
        return b"".join(head)

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable(now):
                return connection
            await connection.close()
        with trio.move_on_after(self._timeouts.connect) as connecting:
            try:
                connection = await self._open(now)
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                cause = exc.__cause__ or exc  # trio wraps TLS failures (certificate, handshake)
                raise ConnectFailed(f"{type(cause).__name__}: {cause}") from None
        if connecting.cancelled_caught:
            raise ConnectFailed("connect timed out")
        return connection

    async def _open(self, now: float) -> _Connection:
        tcp = await trio.open_tcp_stream(self._host, self._port)
        if self._ssl is None:
            sock = socket.socket(fileno=tcp.socket.detach())  # ours now; TCP_NODELAY kept
            sock.setblocking(False)
            return _Connection(None, sock, now)
        stream = trio.SSLStream(tcp, self._ssl, server_hostname=self._host, https_compatible=True)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)  # a refused certificate must not leak the socket
            raise
        return _Connection(stream, None, now)

    async def _exchange(
        self, connection: _Connection, head: bytes, body: Body | None, sink: Sink | None
    ) -> Answer:
        phase = "sending the request"
        try:
            # One scope for both phases of a whole request (its deadline moves on once
            # the request is sent); a streamed body's chunks each have their own.
            with trio.move_on_after(self._timeouts.write) as limit:
                await _send(connection, head)
                if body is not None and not isinstance(body, bytes):
                    limit.deadline = math.inf
                    await trio.lowlevel.checkpoint()
                    await self._stream_body(connection, body)
                phase = "waiting for the answer"
                limit.deadline = trio.current_time() + self._timeouts.read
                answer, keep = await _read_answer(connection, self._max_answer, sink)
            if limit.cancelled_caught:
                raise Timeout(f"timed out {phase}")
        except BaseException:
            await connection.close()
            raise
        if keep and not connection.buffer and not self._closed:  # after the answer: not ours
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            await connection.close()
        return answer

    async def _stream_body(self, connection: _Connection, body: AsyncIterable[bytes]) -> None:
        """Send ``body``'s chunks as they come, each within the write timeout, then its end;
        after each, other tasks run (the server among them, when it is in this process)."""
        async for chunk in body:
            if chunk:
                await self._send_in_time(connection, b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await trio.lowlevel.checkpoint()
        await self._send_in_time(connection, b"0\r\n\r\n")

    async def _send_in_time(self, connection: _Connection, data: bytes) -> None:
        with trio.move_on_after(self._timeouts.write) as sending:
            await _send(connection, data)
        if sending.cancelled_caught:
            raise Timeout("timed out sending the request")


# -- reading an answer ---------------------------------------------------------------------------


async def _read_answer(
    connection: _Connection, limit: int, sink: Sink | None = None
) -> tuple[Answer, bool]:
    """Read one whole answer, at most ``limit`` bytes of body (else :class:`ProtocolFailed`);
    and whether the connection may carry another request.

    With ``sink``, a 200 answer's body is handed to it as it comes, not kept, and capped at
    :data:`MAX_STREAMED_BYTES` instead."""
    size = STREAM_READ if sink is not None else READ
    while True:
        version, status, headers = await _read_head(connection, size)
        if status == 101:
            raise ProtocolFailed("not HTTP/1.1: the server switched protocols")
        if not 100 <= status < 200:
            break  # else an interim answer (100 Continue): the real one follows
    location = headers.get(b"location", b"").decode("latin-1")
    if sink is not None and status == 200:
        limit = MAX_STREAMED_BYTES
    else:
        sink = None
    chunks: list[bytes] = []
    into = sink if sink is not None else chunks.append
    keep = version == b"1" and b"close" not in _tokens(headers.get(b"connection", b""))
    coding, length = headers.get(b"transfer-encoding"), headers.get(b"content-length")
    if status in (204, 304):
        pass
    elif coding is not None:
        if coding.strip().lower() != b"chunked" or length is not None:
            raise ProtocolFailed("not HTTP/1.1: a Transfer-Encoding other than chunked alone")
        await _read_chunked(connection, limit, into, size)
    elif length is not None:
        await _read_sized(connection, _declared_size(length, limit), into, size)
    else:
        await _read_to_close(connection, limit, into, size)
        keep = False
    return Answer(status, b"".join(chunks), location), keep


async def _read_head(connection: _Connection, size: int) -> tuple[bytes, int, dict[bytes, bytes]]:
    """The next head's HTTP minor version, status and headers (names lower case)."""
    buffer = connection.buffer
    end = await _find(connection, size, b"\r\n\r\n", "a head larger")
    if end > MAX_HEAD_BYTES:
        raise ProtocolFailed(f"not HTTP/1.1: a head larger than {MAX_HEAD_BYTES} bytes")
    lines = bytes(buffer[:end]).split(b"\r\n")
    del buffer[: end + 4]
    found = _STATUS_LINE.fullmatch(lines[0])
    if found is None:
        raise ProtocolFailed(f"not HTTP/1.1: status line {lines[0][:40]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            raise ProtocolFailed(f"not HTTP/1.1: header line {line[:40]!r}")
        name, value = header.group(1).lower(), header.group(2).rstrip(b" \t")
        if name not in headers:
            headers[name] = value
        elif name == b"connection":
            headers[name] += b"," + value  # every token counts ("close")
        elif name == b"transfer-encoding" or (name == b"content-length" and headers[name] != value):
            raise ProtocolFailed(f"not HTTP/1.1: {name.decode()} given twice")
        else:
            headers[name] = value  # another repeated header: the last one (Location)
    return found.group(1), int(found.group(2)), headers


async def _read_sized(
    connection: _Connection, length: int, into: Callable[[bytes], None], size: int
) -> None:
    buffer = connection.buffer
    while length:
        if not buffer:
            await _more(connection, size)
        piece = bytes(buffer[:length])
        del buffer[: len(piece)]
        length -= len(piece)
        into(piece)


async def _read_chunked(
    connection: _Connection, limit: int, into: Callable[[bytes], None], size: int
) -> None:
    buffer = connection.buffer
    total = 0
    while True:
        line = await _read_line(connection, size)
        found = _CHUNK_SIZE.fullmatch(line)
        if found is None:
            raise ProtocolFailed(f"not HTTP/1.1: chunk size line {line[:40]!r}")
        length = int(found.group(1), 16)
        if length == 0:
            break
        total += length
        if total > limit:
            raise ProtocolFailed(f"answer larger than {limit} bytes")
        await _read_sized(connection, length, into, size)
        while len(buffer) < 2:
            await _more(connection, size)
        if buffer[:2] != b"\r\n":
            raise ProtocolFailed("not HTTP/1.1: a chunk not ended by CRLF")
        del buffer[:2]
    trailers = 0
    while line := await _read_line(connection, size):  # trailers, ignored, up to a blank line
        trailers += len(line) + 2
        if trailers > MAX_HEAD_BYTES:
            raise ProtocolFailed(f"not HTTP/1.1: trailers larger than {MAX_HEAD_BYTES} bytes")


async def _read_to_close(
    connection: _Connection, limit: int, into: Callable[[bytes], None], size: int
) -> None:
    buffer = connection.buffer
    total = 0
    while True:
        if buffer:
            total += len(buffer)
            if total > limit:
                raise ProtocolFailed(f"answer larger than {limit} bytes")
            into(bytes(buffer))
            buffer.clear()
        data = await _receive(connection, size)
        if not data:
            return
        buffer += data


async def _read_line(connection: _Connection, size: int) -> bytes:
    buffer = connection.buffer
    end = await _find(connection, size, b"\r\n", "a line longer")
    line = bytes(buffer[:end])
    del buffer[: end + 2]
    return line


async def _find(connection: _Connection, size: int, delimiter: bytes, what: str) -> int:
    """Where ``delimiter`` starts in the connection's buffer, reading more until it is
    there; a buffer past ``MAX_HEAD_BYTES`` without it is ``ProtocolFailed`` (``what``
    than the bound)."""
    buffer = connection.buffer
    searched = 0
    while (end := buffer.find(delimiter, searched)) < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise ProtocolFailed(f"not HTTP/1.1: {what} than {MAX_HEAD_BYTES} bytes")
        searched = max(0, len(buffer) - len(delimiter) + 1)
        await _more(connection, size)
    return end


async def _more(connection: _Connection, size: int) -> None:
    """More of the answer into the connection's buffer; its end here is a failure."""
    data = await _receive(connection, size)
    if not data:
        raise ProtocolFailed("connection closed before the answer was complete")
    connection.buffer += data


def _declared_size(content_length: bytes, limit: int) -> int:
    """The Content-Length; one that says the answer is too large is refused at once."""
    digits = content_length.decode("latin-1")
    if not digits.isdigit() or not digits.isascii():
        raise ProtocolFailed(f"not HTTP/1.1: Content-Length {content_length[:40]!r}")
    declared = parse_int(digits)
    if declared is None or declared > limit:  # None: more digits than any answer needs
        raise ProtocolFailed(f"answer larger than {limit} bytes")
    return declared


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",")]


async def _send(connection: _Connection, data: bytes) -> None:
    sock = connection.sock
    try:
        if sock is None:
            assert connection.stream is not None
            await connection.stream.send_all(data)
            return
        await send_whole(sock, data)
    except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
        raise ProtocolFailed(f"connection broke: {type(exc).__name__}") from None


async def send_whole(sock: socket.socket, data: bytes) -> None:
    """``data`` written whole on a non-blocking socket: straight to it while it takes it
    (one system call for a whole request or answer, without trio's stream layers), else
    as soon as it can (also :mod:`proxy.front`'s writes).

    Error handling: ``OSError`` as the socket raises it (reset, broken pipe)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _receive(connection: _Connection, size: int = READ) -> bytes:
    """The next bytes received (b"" at the connection's end).  A read that fills ``size``
    (more is likely waiting: a large answer) lets other tasks run before the next."""
    sock = connection.sock
    try:
        if sock is None:
            assert connection.stream is not None
            return bytes(await connection.stream.receive_some(size))
        while True:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if len(data) == size:
                await trio.lowlevel.checkpoint()
            return data
    except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
        raise ProtocolFailed(f"connection broke: {type(exc).__name__}") from None
