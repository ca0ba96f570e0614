"""A verified customer request and the answer to it, independent of the web framework."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from proxy.bbb import envelope
from proxy.bbb.numbers import parse_int
from proxy.config import Customer
from proxy.errors import ValidationError
from proxy.uploads import Upload

MEETING_ID_MIN, MEETING_ID_MAX = 2, 256


@dataclass(frozen=True, slots=True)
class ApiRequest:
    customer: Customer
    call: str
    params: list[tuple[str, str]]  # what the checksum covers (checksum.signed_params), decoded
    body: bytes | None = None  # a checked XML <modules> body, re-serialised (bodies.checked_xml)
    content_type: str | None = None  # the XML body's media type, e.g. "text/xml"
    upload: Upload | None = None  # putRecordingTextTrack's body, its file not yet read
    algorithm: str = "sha1"  # of the checksum the request was signed with (hooks/create keeps it)

    def first(self, name: str) -> str | None:
        """The first value of ``name``, as bbb-web reads it."""
        return next((v for k, v in self.params if k == name), None)

    def meeting_id(self) -> str:
        """The request's meetingID, checked as bbb-web checks it."""
        value = self.first("meetingID")
        if value is None or not value.strip():
            raise ValidationError(
                "You must provide a meeting ID", message_key="missingParamMeetingID"
            )
        value = value.strip()
        if not MEETING_ID_MIN <= len(value) <= MEETING_ID_MAX:
            raise ValidationError("Meeting ID must be between 2 and 256 characters")
        if "," in value:
            raise ValidationError("Meeting ID cannot contain ','")
        return value

    def integer(self, name: str) -> int | None:
        """An integer parameter (absent or empty: None).

        Negative values are allowed through: clients send ``maxParticipants=-1`` for
        "unlimited", and callers treat anything below 1 as not given.
        """
        value = self.first(name)
        if value is None or not value.strip():
            return None
        number = parse_int(value, max_digits=9, signed=True)
        if number is None:
            raise ValidationError(f"Parameter {name} must be an integer")
        return number


@dataclass(frozen=True, slots=True)
class Answer:
    body: str | bytes | AsyncIterator[bytes]  # an iterator is streamed (getRecordings)
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=lambda: envelope.HEADERS)

    @classmethod
    def xml(cls, body: str) -> Answer:
        return cls(body)

    @classmethod
    def redirect(cls, location: str) -> Answer:
        return cls("", 302, {"Location": location, "Cache-Control": "no-cache"})

    @classmethod
    def stream(cls, chunks: AsyncIterator[bytes]) -> Answer:
        """BBB XML written as it is produced; ``chunks`` must not raise."""
        return cls(chunks)

    async def buffered(self) -> Answer:
        """This answer with a streamed body read whole (for tests)."""
        if isinstance(self.body, str | bytes):
            return self
        return Answer(b"".join([chunk async for chunk in self.body]), self.status, self.headers)

    @classmethod
    def json(cls, body: bytes) -> Answer:
        return cls(body, 200, {"Content-Type": "application/json", "Cache-Control": "no-cache"})
