"""putRecordingTextTrack's multipart upload, read as it arrives: decisions only, no I/O.

bbb-web takes ``recordID``, ``kind``, ``lang`` and ``label`` in the signed query and the
track in the body's ``file`` part, which no checksum covers (bbb-api.md §2).  The gateway
never holds the file: :class:`UploadReader` is fed the body chunk by chunk
(:mod:`proxy.uploads` does the reading) and hands out, in order,

- :class:`Field` for each text field before the file (bbb-web 2.5–2.7 also accepts the
  parameters in the body, signed with them: the checksum is verified over these fields,
  before any byte of the file is read),
- :class:`FileStart` when the ``file`` part begins (its filename and type),
- the file's bytes, each chunk as soon as it is safe to hand on (a possible boundary is
  held back: a few dozen bytes),
- :data:`FILE_END`, then :data:`DONE` once the body ended.

Other parts named like files are read and dropped, as bbb-web reads only ``file``; a
second ``file`` part too.  Bounds, each checked as the bytes come: the file at most
``limit`` bytes, the text fields together at most :data:`UPLOAD_OVERHEAD`, the whole body
at most ``limit + UPLOAD_OVERHEAD`` (all ``upload_text_track_failed``, the answer the web
layer gives a Content-Length above that).

A text field after the file part is a ``checksumError``: it could not be verified before
the file went on, and parameters a checksum does not cover never count.  So is any text
field when the query carried the signed parameters (``fields=False``): issue 7's rule for
every call, a body parameter is refused rather than merged.

Error handling: :meth:`UploadReader.feed`, :meth:`UploadReader.close` and
:meth:`UploadReader.next_event` raise :class:`~proxy.errors.ValidationError`
(``validationError`` for a malformed body, ``upload_text_track_failed`` for a bound) or
:class:`~proxy.errors.ChecksumError`; nothing else.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio import multipart as wz

from proxy.bbb import bodies
from proxy.errors import ChecksumError, ValidationError

UPLOAD_OVERHEAD = 64 * 1024  # a multipart upload's parts besides the file: fields, headers
_HEADER_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\]')


@dataclass(frozen=True, slots=True)
class Field:
    """A text field that came before the file."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class FileStart:
    """The ``file`` part begins; its data follows as ``bytes`` events."""

    filename: str = "track.vtt"
    content_type: str = "text/vtt"


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Marker("NEED_DATA")  # feed more of the body (or close it)
FILE_END = _Marker("FILE_END")  # the file part ended
DONE = _Marker("DONE")  # the body ended, well formed

type Event = Field | FileStart | bytes | _Marker


def too_large_track(limit: int) -> tuple[str, str]:
    return "upload_text_track_failed", f"Text track upload failed: larger than {limit} bytes."


def too_large(limit: int) -> ValidationError:
    key, message = too_large_track(limit)
    return ValidationError(message, message_key=key)


def boundary_of(content_type: str | None) -> bytes | None:
    """A multipart body's boundary; None when the body is not multipart.

    Error handling: a multipart type without a usable boundary is
    ``unsupportedContentType``, as :func:`proxy.bbb.bodies.multipart_params` answers."""
    if bodies.media_type(content_type) != bodies.MULTIPART:
        return None
    _, options = parse_options_header(content_type or "")
    boundary = options.get("boundary")
    if not boundary or not boundary.isascii():
        raise bodies.unsupported()
    return boundary.encode()


def _malformed() -> ValidationError:
    return ValidationError("The multipart body could not be parsed")


class UploadReader:
    """One upload body, fed as it arrives; its events in order (see the module docstring)."""

    def __init__(self, boundary: bytes, limit: int, *, fields: bool = True) -> None:
        self._decoder = wz.MultipartDecoder(boundary, max_parts=bodies.MAX_FIELDS)
        self._limit = limit
        self._fields_allowed = fields
        self._received = 0  # bytes of body fed
        self._field_bytes = 0
        self._file_bytes = 0
        self._part = ""  # "field", "file", "skip" (another file part) or "" (between parts)
        self._field: tuple[str, bytearray] | None = None
        self._file_seen = False
        self._ready: deque[Event] = deque()
        self._held = b""  # the end of what came, not yet fed (see feed)
        # A delimiter (CR LF "--" boundary) and what may end it ("--" CR LF).
        self._tail = len(b"\r\n--" + boundary) + 4

    def feed(self, data: bytes) -> None:
        """More of the body; above ``limit + UPLOAD_OVERHEAD`` in all, the upload is refused.

        A tail that could be the start of a delimiter is held back until more comes:
        werkzeug's decoder, fed a part that ends inside ``CR LF CR``, hands the first CR LF
        on as data and keeps the wrong CR (an extra byte in the file).  Fed only up to a
        point where no delimiter can begin in the last :attr:`_tail` bytes, it decides
        only on delimiters it has whole."""
        self._received += len(data)
        if self._received > self._limit + UPLOAD_OVERHEAD:
            raise too_large(self._limit)
        data = self._held + data
        cut = _safe_end(data, self._tail)
        self._held = data[cut:]
        self._decoder.receive_data(data[:cut])

    def close(self) -> None:
        """The body ended: what is left is parsed to :data:`DONE` or refused."""
        self._decoder.receive_data(self._held)
        self._held = b""
        self._decoder.receive_data(None)

    @property
    def empty(self) -> bool:
        """Whether nothing at all was fed (an empty body: no file, as bbb-web sees it)."""
        return self._received == 0

    def next_event(self) -> Event:
        """The next event, or :data:`NEED_DATA` when the body fed so far holds none."""
        while not self._ready:
            if self._decoder.complete and self.empty:
                return DONE
            try:
                event = self._decoder.next_event()
            except (ValueError, LookupError, TypeError, AttributeError, RequestEntityTooLarge):
                # werkzeug's decoder raises these on malformed input (see bodies.py)
                raise _malformed() from None
            if event is wz.NEED_DATA:
                return NEED_DATA
            self._take(event)
        return self._ready.popleft()

    def _take(self, event: wz.Event) -> None:
        if isinstance(event, wz.File):
            self._start_file(event)
        elif isinstance(event, wz.Field):
            self._start_field(event)
        elif isinstance(event, wz.Data):
            self._data(event.data, event.more_data)
        elif isinstance(event, wz.Epilogue):
            self._ready.append(DONE)

    def _start_file(self, event: wz.File) -> None:
        if event.name != "file" or self._file_seen:
            self._part = "skip"  # bbb-web reads only the first "file" part
            return
        self._file_seen = True
        self._part = "file"
        filename = _HEADER_UNSAFE.sub("", event.filename or "") or "track.vtt"
        kind = _HEADER_UNSAFE.sub("", event.headers.get("Content-Type", "")).strip()
        self._ready.append(FileStart(filename, kind or "text/vtt"))

    def _start_field(self, event: wz.Field) -> None:
        if not isinstance(event.name, str):  # werkzeug gives None for a part without a name
            raise ValidationError("A multipart field has no name")
        if self._file_seen or not self._fields_allowed:
            raise ChecksumError()  # a parameter no verified checksum covers
        self._part = "field"
        self._field = (event.name, bytearray())

    def _data(self, data: bytes, more: bool) -> None:
        if self._part == "file":
            self._file_bytes += len(data)
            if self._file_bytes > self._limit:
                raise too_large(self._limit)
            if data:
                self._ready.append(data)
            if not more:
                self._ready.append(FILE_END)
        elif self._part == "field" and self._field is not None:
            self._field_bytes += len(data)
            if self._field_bytes > UPLOAD_OVERHEAD:
                raise too_large(self._limit)
            self._field[1].extend(data)
            if not more:
                name, value = self._field
                self._ready.append(Field(name, value.decode(errors="replace")))
        if not more:
            self._part, self._field = "", None


def _safe_end(data: bytes, tail: int) -> int:
    """Where to cut ``data`` so that no CR or LF is in the last ``tail`` bytes fed."""
    start = max(0, len(data) - tail)
    breaks = [i for i in (data.find(b"\r", start), data.find(b"\n", start)) if i >= 0]
    return min(breaks, default=len(data))


def part_head(file: FileStart, boundary: str) -> bytes:
    """The start of the multipart body sent to the backend: its only part, ``file``."""
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{file.filename}"\r\n'
        f"Content-Type: {file.content_type}\r\n\r\n"
    ).encode()


def part_tail(boundary: str) -> bytes:
    """The end of the multipart body sent to the backend."""
    return f"\r\n--{boundary}--\r\n".encode()


def content_type(boundary: str) -> str:
    return f"multipart/form-data; boundary={boundary}"
