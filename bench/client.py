"""A lean HTTP/1.1 keep-alive client on trio sockets: one request at a time per connection.

httpx costs more CPU per request than the servers under test, so the load
generator would measure itself.  This client does only what a benchmark needs:
send a GET, read a ``Content-Length``-framed answer, keep the connection.

Error handling: every failure on a connection (refused, reset, closed
mid-answer, malformed answer) is raised as :class:`ConnectionFailed`; the
connection is then unusable and must be closed.  Timeouts are the caller's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import trio

from bench.http import ProtocolError, ResponseHead, parse_head, request_bytes

RECEIVE_BYTES = 64 * 1024


class ConnectionFailed(Exception):
    """The connection broke or the server answered something unparseable."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    head: bytes
    body: bytes

    def contains(self, needle: bytes) -> bool:
        return needle in self.head or needle in self.body


class Connection:
    """One keep-alive connection to ``host:port``; use ``async with``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._host_header = f"{host}:{port}"
        self._sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        self._buffer = bytearray()

    async def __aenter__(self) -> Self:
        try:
            await self._sock.connect((self.host, self.port))
        except OSError as exc:
            self._sock.close()
            raise ConnectionFailed(f"connect to {self._host_header}: {exc}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    async def get(self, path: str) -> Response:
        """GET ``path``; the whole answer."""
        try:
            await self._send_all(request_bytes(path, self._host_header))
            return await self._read_response()
        except (OSError, ProtocolError) as exc:
            raise ConnectionFailed(f"GET {path[:60]}: {exc}") from None

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._sock.send(view)
            view = view[sent:]

    async def _read_response(self) -> Response:
        head = parse_head(self._buffer)
        while head is None:
            await self._receive()
            head = parse_head(self._buffer)
        end = head.head_length + head.content_length
        while len(self._buffer) < end:
            await self._receive()
        return self._take(head, end)

    async def _receive(self) -> None:
        data = await self._sock.recv(RECEIVE_BYTES)
        if not data:
            raise ProtocolError("connection closed by the server")
        self._buffer += data

    def _take(self, head: ResponseHead, end: int) -> Response:
        raw = bytes(self._buffer[:end])
        del self._buffer[:end]
        return Response(head.status, raw[: head.head_length], raw[head.head_length :])


async def fetch(host: str, port: int, path: str) -> Response:
    """One GET on a fresh connection (set-up calls, readiness probes)."""
    async with Connection(host, port) as conn:
        return await conn.get(path)
