"""putRecordingTextTrack's upload, streamed from the customer to the backend.

The web layer hands over the request body as an async iterator of chunks
(:attr:`proxy.calls.Incoming.stream`), which waits for the client (bounded by
``[proxy.timeouts] client_read`` in all) and applies backpressure: a chunk not taken
leaves the client's bytes in the socket.  :class:`Upload` reads it through
:class:`proxy.bbb.uploads.UploadReader` in three steps, each only as far as needed:

1. :meth:`Upload.head`: the text fields before the file part, when the checksum may
   cover them (not read at all when the query carried the signed parameters);
2. :meth:`Upload.has_data`: up to the file's first bytes (bbb-web answers an empty file
   ``empty_uploaded_text_track``, after its other checks);
3. :meth:`Upload.forwarded`: the body sent to the backend, produced as the customer's
   bytes come: a new multipart body whose only part is the file.  It ends only when the
   customer's body ended well formed; a bound passed or a malformed rest raises inside
   the backend request, which is then aborted (the backend never sees a whole upload).

At most a chunk or two of the customer's body is held at a time, whatever the file's size.

Error handling: every method raises :class:`~proxy.errors.ValidationError` or
:class:`~proxy.errors.ChecksumError` (see :mod:`proxy.bbb.uploads`); the iterator's
own errors (a body that did not come in time) pass through as it raises them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from proxy.bbb import uploads
from proxy.bbb.uploads import DONE, FILE_END, NEED_DATA, Event, Field, FileStart
from proxy.errors import ProxyError, ValidationError


class Upload:
    """One putRecordingTextTrack body being read (see the module docstring)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        boundary: bytes,
        limit: int,
        *,
        fields: bool,
    ) -> None:
        self._chunks = chunks
        self._reader = uploads.UploadReader(boundary, limit, fields=fields)
        self._fields: list[tuple[str, str]] = []
        self._file: FileStart | None = None
        self._first: bytes | None = None  # the file's first bytes, read by has_data
        self._head_read = False
        self._ended = False  # the file part ended (or the body ended without one)

    async def head(self) -> tuple[tuple[str, str], ...]:
        """The text fields before the file part (read once)."""
        while not self._head_read:
            event = await self._event()
            if isinstance(event, Field):
                self._fields.append((event.name, event.value))
            else:
                self._head_read = True
                if isinstance(event, FileStart):
                    self._file = event
                else:  # DONE: no file part
                    self._ended = True
        return tuple(self._fields)

    async def has_data(self) -> bool:
        """Whether the upload has a ``file`` part with at least one byte."""
        await self.head()
        while self._first is None and not self._ended:
            event = await self._event()
            if isinstance(event, bytes):
                self._first = event
            elif event is FILE_END:
                self._ended = True
        return self._first is not None

    def forwarded(self, boundary: str) -> AsyncIterator[bytes]:
        """The body for the backend: the file as its only part, as the customer's comes."""
        if self._file is None or self._first is None:
            raise RuntimeError("forwarded() before has_data() found the file")
        return _Forwarded(self, uploads.part_head(self._file, boundary) + self._first, boundary)

    async def file_chunk(self) -> bytes | None:
        """The file's next bytes; None once the file and the rest of the body were read."""
        while not self._ended:
            event = await self._event()
            if isinstance(event, bytes):
                return event
            if event is FILE_END:
                self._ended = True
        while await self._event() is not DONE:
            pass  # what follows the file: dropped, but it must be well formed
        return None

    async def _event(self) -> Event:
        """The next event, reading more of the body as needed."""
        event = self._reader.next_event()
        while event is NEED_DATA:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self._reader.close()
            else:
                self._reader.feed(chunk)
            event = self._reader.next_event()
        return event


class _Forwarded:
    """:meth:`Upload.forwarded`'s iterator (not a generator: the backend request may give
    it up half-way, and nothing is left to finalise then)."""

    def __init__(self, upload: Upload, first: bytes, boundary: str) -> None:
        self._upload = upload
        self._first: bytes | None = first
        self._boundary = boundary
        self._done = False

    def __aiter__(self) -> _Forwarded:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._done:
            raise StopAsyncIteration
        chunk = await self._upload.file_chunk()
        if chunk is None:
            self._done = True
            return uploads.part_tail(self._boundary)
        return chunk


class _Once:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if not self._data:
            raise StopAsyncIteration
        data, self._data = self._data, b""
        return data


def once(data: bytes) -> AsyncIterator[bytes]:
    """A body held whole, as the chunks of one (none when it is empty)."""
    return _Once(data)


async def discard(chunks: AsyncIterator[bytes], limit: int) -> None:
    """Read what is left of a body and drop it, at most ``limit`` bytes.

    bbb-web reads every body whole before answering; a client still sending when the
    gateway answers early would otherwise see its connection reset before the answer.

    Error handling: raises nothing a request causes: a body that does not come in time
    is left unread (the connection is then closed after the answer)."""
    left = limit
    try:
        async for chunk in chunks:
            left -= len(chunk)
            if left < 0:
                return
    except ProxyError:
        return


async def read_whole(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A body that holds no file, read whole: at most ``limit`` bytes.

    Error handling: a longer body is ``validationError``, as other calls' bodies are."""
    data = bytearray()
    async for chunk in chunks:
        data.extend(chunk)
        if len(data) > limit:
            raise ValidationError("The request body is too large")
    return bytes(data)
