"""A request body read as it arrives, with backpressure (the web layer's side of uploads).

quart-trio queues every chunk hypercorn hands it in an unbounded channel, whether the app
reads them or not: an upload forwarded to a slower backend would pile up in the
gateway's memory.  For the routes that stream their body (:func:`streams_body`),
:class:`GatewayRequest` gives the request a :class:`StreamedBody` whose queue holds at
most :data:`QUEUED` chunks; when it is full, quart's reader waits, hypercorn's queue to
the app (10 chunks of at most 64 KiB) fills, hypercorn stops reading the socket, and the
client waits in TCP.  Every other route keeps quart's body (read whole, within
``max_body_bytes``).

:func:`chunks` reads such a body for :mod:`proxy.uploads`: waiting for the client is
bounded by ``[proxy.timeouts] client_read`` in all (the time the backend takes is not
counted), as quart's ``BODY_TIMEOUT`` bounds a body read whole.

Error handling: :func:`chunks` raises :class:`~proxy.errors.ValidationError` when the
client's bytes do not come in time or the client went away mid-body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio
from quart.wrappers import Body
from quart.wrappers.base import ClientDisconnectedError
from quart_trio.datastructures import TrioQueue
from quart_trio.wrappers.request import TrioBody, TrioRequest

from proxy.errors import ValidationError

QUEUED = 2  # chunks (at most 64 KiB each) a streamed body holds before the client waits
STREAMED_CALLS = frozenset({"putRecordingTextTrack"})


def streams_body(method: str, path: str) -> bool:
    """Whether a request's body is streamed to the call rather than read whole."""
    return method == "POST" and path.rstrip("/").rpartition("/")[2] in STREAMED_CALLS


class _BoundedQueue(TrioQueue[bytes]):
    def __init__(self, size: int) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](size)


class StreamedBody(TrioBody):
    """quart-trio's body with a bounded queue: only for iterating (awaiting it whole
    would wait for a queue that cannot take the whole body)."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        super().__init__(expected_content_length, max_content_length)
        self._queue = _BoundedQueue(QUEUED)  # type: ignore[assignment]  # as quart-trio does


class GatewayRequest(TrioRequest):
    """The gateway's request class: a :class:`StreamedBody` where :func:`streams_body`."""

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(method, scheme, path, *args, **kwargs)
        if streams_body(method, path):
            self.body = StreamedBody(self.content_length, kwargs.get("max_content_length"))


class Chunks:
    """A body's chunks as they come (an async iterator, not a generator: an upload given
    up half-way leaves nothing to finalise); waiting for them takes at most ``budget``
    seconds in all."""

    def __init__(self, body: Body, budget: float) -> None:
        self._body = body
        self._left = budget

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = b""
        while not chunk:
            chunk = await self._next()
        return chunk

    async def _next(self) -> bytes:
        started = trio.current_time()
        with trio.move_on_after(self._left) as waiting:
            try:
                chunk = await anext(self._body, None)
            except ClientDisconnectedError:
                raise ValidationError("The request body ended early") from None
        if waiting.cancelled_caught:
            raise ValidationError("The request body did not arrive in time")
        if chunk is None:
            raise StopAsyncIteration
        self._left -= trio.current_time() - started
        return chunk


def chunks(body: Body, budget: float) -> AsyncIterator[bytes]:
    """``body``'s chunks as they come, waiting for them at most ``budget`` seconds in all."""
    return Chunks(body, budget)
