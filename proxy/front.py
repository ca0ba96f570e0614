"""The gateway's own HTTP/1.1 connection loop for the API's GETs; hypercorn for the rest.

hypercorn's trio worker spends more CPU on a request than the gateway spends on a join:
per request it makes a task group, a stream object, timers restarted on every event,
a lock and shielded cancel scopes on every write, and h11's event machinery, and it
writes an answer's head and body in two system calls (``bench/README.md``, "One
process, leaner").  Nearly all of a gateway's traffic is body-less ``GET``\\ s of the
API (join, getMeetingInfo, isMeetingRunning, getMeetings, getRecordings), so
:func:`serve` reads each request's head on the connection itself, strictly and within
bounds, calls the ASGI app with the scope hypercorn would have built, and writes the
whole answer with one ``send_all``.

Every other request goes to hypercorn: at the first request this loop does not take,
the connection, with every byte read so far, is handed to hypercorn's own connection
handler (``hypercorn.trio.tcp_server.TCPServer``), which answers it exactly as it would
have from the connection's start, with ``connection: close``: the client's next
connection is this loop's again (a load balancer's long-lived connections would
otherwise all end up on hypercorn's slower path, one POST at a time).  Not taken here
(:func:`parse_head` answers None):

- another method than ``GET``, another version than ``HTTP/1.1``, a path that is not
  ``/<customer>/bigbluebutton/api/<call>`` or has a ``%`` in it;
- a body (``Content-Length`` other than 0, any ``Transfer-Encoding``), ``Expect``,
  ``Upgrade`` or ``Connection: upgrade``;
- a head that is not exactly what RFC 9112 says (CRLF line ends, no folding, header
  names that are tokens, values without control characters, exactly one ``Host``);
- a head longer than hypercorn's own bound (hypercorn then answers it as before).

TLS connections go to hypercorn at once (ALPN may choose HTTP/2).

The bounds are hypercorn's (:func:`proxy.server.hypercorn_config`): an idle connection
is closed after ``keep_alive_timeout``, which also bounds the time a request's head may
take to arrive; a connection silent for ``read_timeout`` in the middle of a head is
closed; after ``keep_alive_max_requests`` answers the connection is closed.  A client
that goes away while its answer is being made cancels the call (:class:`_Connection`
watches the socket meanwhile), as with hypercorn and quart-trio.  Writing an answer is
bounded by ``send_timeout`` (the app's ``RESPONSE_TIMEOUT``).

The answer's bytes are hypercorn's: the status line without a reason phrase (as h11
writes it), the app's headers, then hypercorn's ``date`` and ``server``; a streamed
body without ``Content-Length`` is sent chunked; ``connection: close`` when the
connection closes after it.

Error handling: a connection's failure (reset, broken pipe, timeout) ends that
connection only; an exception out of the app ends its connection after whatever was
written (the API's handlers answer every exception themselves, :mod:`proxy.fast_api`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from proxy.backends.http import send_whole

log = logging.getLogger(__name__)

MAX_RECV = 2**16
# The scope's extension saying this loop watches the client: the app need not (fast_api).
WATCHED = "bbb_proxy.watched"
# The API's paths, /<customer>/bigbluebutton/api/<call> (also proxy.fast_api's, on the str path)
API_PATH = r"/([^/]+)/bigbluebutton/api/([A-Za-z]+(?:/[A-Za-z]+)*)"
_API_PATH = re.compile(API_PATH.encode())
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_BODY = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT = {"type": "http.disconnect"}


@dataclass(frozen=True, slots=True)
class Head:
    """A request head this loop takes: the path, the query and the headers as hypercorn
    gives them in the scope (names lower-case, values stripped), and whether the client
    asked to close the connection after the answer."""

    path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    close: bool


def parse_head(head: bytes) -> Head | None:
    """``head`` (the request line and the header lines, without the blank line that ends
    them) if this loop takes it, else None (see the module docstring).  Total: any bytes."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"GET" or version != b"HTTP/1.1" or not _TARGET.fullmatch(target):
        return None
    path, _, query = target.partition(b"?")
    if b"%" in path or not _API_PATH.fullmatch(path):
        return None
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    close = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            return None
        name, value = name.lower(), value.strip(b" \t")
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if value != b"0":
                return None
        elif name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        elif name == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            close = close or b"close" in tokens
        headers.append((name, value))
    if hosts != 1:
        return None
    return Head(path=path, query=query, headers=headers, close=close)


def answer_head(status: int, headers: list[tuple[bytes, bytes]], close: bool) -> tuple[bytes, bool]:
    """An answer's status line and header lines, ended by the blank line, and whether its
    body must be sent chunked (no ``Content-Length``)."""
    names = {name.lower() for name, _ in headers}
    chunked = b"content-length" not in names and b"transfer-encoding" not in names
    parts = [b"HTTP/1.1 %d \r\n" % status]
    parts.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), chunked


class _Replayed(trio.abc.HalfCloseableStream):
    """A connection with the bytes already read from it put back in front."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self._stream = stream
        self._data = data
        self.socket = stream.socket  # hypercorn reads the addresses from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._data:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._data) if max_bytes is None else max_bytes
        data, self._data = self._data[:size], self._data[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(slots=True)
class _Server:
    app: Any  # the ASGI app, called here
    wrapped: Any  # the same, as hypercorn calls it
    closing: Any  # the same, each answer closing its connection (hypercorn calls it)
    config: HypercornConfig
    context: WorkerContext
    state: LifespanState
    send_timeout: float | None
    _second: int = -1
    _headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """hypercorn's own headers (``date``, ``server``), made once a second."""
        second = int(time.time())
        if second != self._second:
            self._second, self._headers = second, self.config.response_headers("h11")
        return self._headers

    def handed_over(self, stream: trio.abc.Stream, *, once: bool = False) -> TCPServer:
        """hypercorn's handler for ``stream``; ``once``: the connection closes after the
        answer (``connection: close``), so that the client's next one is this loop's."""
        state = ConnectionState(self.state.copy())
        app = self.closing if once else self.wrapped
        return TCPServer(app, self.config, self.context, state, stream)  # type: ignore[arg-type]


class _Connection:
    """One client connection: requests answered here until one is not (then hypercorn).

    Two tasks for the connection's life: this one parses and answers requests in turn;
    :meth:`_read` alone receives, appending to :attr:`buffer` and waking this one.  So
    the client's going away is seen while an answer is being made (it cancels that
    answer), and a pipelined request's bytes are kept for their turn, without a task
    or a cancellation per request."""

    def __init__(self, server: _Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock  # non-blocking; used directly (trio's stream layers cost more)
        self.buffer = bytearray()
        self.eof = False  # the client has closed its side (or the connection broke)
        self.request: trio.CancelScope | None = None  # the answer being made
        self._arrived = trio.Event()  # set by the reader when bytes or the end arrive
        self._room = trio.Event()  # set when the buffer was taken from (the reader waits)
        self.client: Any = None
        self.local: Any = None

    async def run(self) -> None:
        handed = False
        try:
            family = self.sock.family
            try:  # as hypercorn gives them in the scope
                self.client = parse_socket_addr(family, self.sock.getpeername())
                self.local = parse_socket_addr(family, self.sock.getsockname())
            except OSError:  # gone before it was served
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                with contextlib.suppress(trio.TooSlowError, OSError):  # not taken in time, reset
                    handed = await self._serve()
                nursery.cancel_scope.cancel()
            if handed:  # the reader has stopped: every byte read is in the buffer
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(self.sock))
                await self.server.handed_over(_Replayed(stream, bytes(self.buffer)), once=True)
        except Exception:  # a bug: this connection ends, the others go on
            log.exception("a client connection failed")
        finally:
            _close(self.sock)  # closed already, unless hypercorn's end was cancelled

    async def _serve(self) -> bool:
        """Answer requests until the connection ends (False) or is to be handed over (True)."""
        config = self.server.config
        for count in range(1, config.keep_alive_max_requests + 1):
            end = await self._head()
            if end is None:
                return False
            parsed = parse_head(bytes(self.buffer[: end - 4])) if end else None
            if parsed is None:
                return True
            del self.buffer[:end]
            self._room.set()
            close = parsed.close or count == config.keep_alive_max_requests
            if not await self._answer(parsed, close) or close:
                return False
        return False

    async def _head(self) -> int | None:
        """Where the next request's head ends in the buffer (after its blank line); 0 when
        it is hypercorn's to read (longer than its bound, bare LF line ends, a blank line
        first); None when the connection is to close (idle too long, a head too slow, the
        client gone)."""
        config = self.server.config
        read_timeout = config.read_timeout or math.inf
        searched = 0
        with trio.move_on_after(config.keep_alive_timeout):
            while True:
                end = self.buffer.find(b"\r\n\r\n", max(0, searched - 3))
                if end >= 0:
                    return end + 4
                searched = len(self.buffer)
                if (
                    searched > config.h11_max_incomplete_size
                    or b"\n\n" in self.buffer
                    or self.buffer.startswith(b"\r\n")
                ):
                    return 0
                if self.eof:
                    return None
                self._arrived = trio.Event()
                with trio.move_on_after(read_timeout if self.buffer else math.inf) as silent:
                    await self._arrived.wait()
                if silent.cancelled_caught:
                    return None
        return None

    async def _read(self) -> None:
        """Receive until the client's end, a break, or cancellation (the connection's end or
        its hand-over); hold off while the buffer is beyond a head's bound."""
        limit = self.server.config.h11_max_incomplete_size
        try:
            while True:
                while len(self.buffer) > limit:
                    self._room = trio.Event()
                    await self._room.wait()
                try:
                    data = self.sock.recv(MAX_RECV)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.sock)
                    continue
                if not data:
                    break
                self.buffer += data
                self._arrived.set()
        except OSError:  # reset by the client
            pass
        self.eof = True
        self._arrived.set()
        if self.request is not None:
            self.request.cancel()  # the client is gone: its answer is not wanted

    async def _answer(self, head: Head, close: bool) -> bool:
        """Call the app and send its answer; False when the connection cannot go on."""
        scope: dict[str, Any] = {
            "type": "http",
            "http_version": "1.1",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": "GET",
            "scheme": "http",
            "path": head.path.decode("ascii"),
            "raw_path": head.path,
            "query_string": head.query,
            "root_path": self.server.config.root_path,
            "headers": head.headers,
            "client": self.client,
            "server": self.local,
            "state": self.server.state.copy(),
            "extensions": {WATCHED: {}},
        }
        answer = _Answer(self.sock, self.server, close)
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return _BODY
            await trio.sleep_forever()  # cancelled with the answer
            return _DISCONNECT  # pragma: no cover

        with trio.CancelScope() as self.request:
            if self.eof:
                self.request.cancel()
            try:
                await self.server.app(scope, receive, answer.send)
            except (trio.TooSlowError, OSError):  # the answer not taken in time, a reset
                answer.failed = True
            except Exception:
                log.exception("unexpected error in the app answering %s", scope["path"])
                answer.failed = True
        self.request = None
        return answer.complete and not answer.failed and not self.eof


def _close(sock: socket.socket) -> None:
    """Close, after a FIN (a close with bytes unread would reset the connection, and the
    client could lose the answer still in flight)."""
    if sock.fileno() == -1:
        return
    trio.lowlevel.notify_closing(sock)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sock.close()


class _Answer:
    """The app's ``send``: the answer written as hypercorn would write it."""

    def __init__(self, sock: socket.socket, server: _Server, close: bool) -> None:
        self.sock = sock
        self.server = server
        self.close = close
        timeout = server.send_timeout
        self.send_timeout = math.inf if timeout is None else timeout
        self.deadline = math.inf  # from the answer's start
        self.head: bytes | None = None
        self.chunked = False
        self.started = False  # the head is written
        self.complete = False
        self.failed = False

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = [*message.get("headers", ()), *self.server.response_headers()]
            self.head, self.chunked = answer_head(message["status"], headers, self.close)
            self.deadline = trio.current_time() + self.send_timeout
            return
        if kind != "http.response.body" or self.head is None or self.complete:
            return
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        data = self._framed(body, more)
        if not self.started:
            self.started = True
            data = self.head + data
        self.complete = not more
        if data:
            with trio.fail_at(self.deadline):
                await send_whole(self.sock, data)

    def _framed(self, body: bytes, more: bool) -> bytes:
        if not self.chunked:
            return body
        chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        return chunk + (b"" if more else b"0\r\n\r\n")


async def serve(
    app: Any,
    config: HypercornConfig,
    *,
    send_timeout: float | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config``'s binds until cancelled: the ASGI lifespan as hypercorn
    runs it, then every connection through :class:`_Connection`; reports the bound URLs."""
    lifespan_state: LifespanState = {}
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    closing = wrap_app(_closing(app), config.wsgi_max_body_size, None)
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    server = _Server(app, wrapped, closing, config, context, lifespan_state, send_timeout)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        sockets = config.create_sockets()
        secure: list[trio.abc.Listener[Any]] = []
        binds = []
        for sock in sockets.secure_sockets:  # TLS: hypercorn's, whole
            sock.listen(config.backlog)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            ssl = config.create_ssl_context()
            assert ssl is not None  # a secure socket is made only with a certificate
            secure.append(trio.SSLListener(listener, ssl, https_compatible=True))
            binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
            binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
        try:
            async with trio.open_nursery() as connections:
                if secure:
                    handler: Callable[[Any], Any] = server.handed_over
                    connections.start_soon(
                        partial(trio.serve_listeners, handler, secure, handler_nursery=connections)
                    )
                for sock in sockets.insecure_sockets:
                    connections.start_soon(_accept, server, sock, connections)
                task_status.started(binds)
                await trio.sleep_forever()
        finally:
            for sock in sockets.insecure_sockets:
                sock.close()


def _closing(app: Any) -> Any:
    """The ASGI app, each HTTP answer with ``connection: close`` (h11 then closes)."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)  # type: ignore[no-any-return]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, sending)
        return None

    return asgi


# accept()'s errors that say the process or the system is out of something: wait, go on
_OUT_OF = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_OUT_OF_PAUSE = 0.1


async def _accept(server: _Server, listener: socket.socket, nursery: trio.Nursery) -> None:
    """Accept connections on ``listener`` until cancelled, each served by a
    :class:`_Connection` in ``nursery``.  Out of file descriptors or memory, it logs and
    waits a moment; a connection aborted before it was accepted is skipped."""
    listener.setblocking(False)
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno not in _OUT_OF:
                continue  # ECONNABORTED, EPROTO, ...: that connection only
            log.error("cannot accept a connection: %s", exc.strerror)
            await trio.sleep(_OUT_OF_PAUSE)
            continue
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not TCP (a Unix socket)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nursery.start_soon(_Connection(server, sock).run)
        await trio.lowlevel.checkpoint()
