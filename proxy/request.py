"""A verified customer request and the answer to it, independent of the web framework."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from proxy.bbb import envelope
from proxy.bbb.numbers import parse_int
from proxy.config import Customer
from proxy.errors import ValidationError
from proxy.uploads import Upload

MEETING_ID_MIN, MEETING_ID_MAX = 2, 256
# bbb-web takes create's name and join's fullName without their control characters, and
# every other value as it came.
STRIPPED = {"create": "name", "join": "fullName"}
# Checked where they are used, never forwarded as they came (names lower-cased): create's end
# URLs (proxy.bbb.callbacks: one the gateway cannot call is dropped, and the create goes on as
# BBB's would) and join's error targets (proxy.bbb.redirects: one that cannot be put in a
# Location header answers BBB's XML).
UNCHECKED = {
    "create": frozenset({"meetingendedurl", "meta_endcallbackurl"}),
    "join": frozenset({"logouturl", "errorredirecturl"}),
}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Java's \p{Cc}


def strip_control_chars(text: str) -> str:
    """bbb-web's ``ParamsUtil.stripControlChars``."""
    return _CONTROL.sub("", text)


@dataclass(frozen=True, slots=True)
class ApiRequest:
    customer: Customer
    call: str
    params: list[tuple[str, str]]  # what the checksum covers (checksum.signed_params), decoded
    body: bytes | None = None  # a checked XML <modules> body, re-serialised (bodies.checked_xml)
    content_type: str | None = None  # the XML body's media type, e.g. "text/xml"
    upload: Upload | None = None  # putRecordingTextTrack's body, its file not yet read
    algorithm: str = "sha1"  # of the checksum the request was signed with (hooks/create keeps it)

    def __post_init__(self) -> None:
        """Parameters a backend can write back in its XML answers, or ``validationError``.

        The name and fullName lose their control characters as bbb-web's do. Any other value
        with a character XML cannot carry (a meetingID, a ``meta_`` value, a userID) is
        refused: bbb-web would take it and write it raw into getMeetings, getMeetingInfo
        and getRecordings, whose answers would then not parse for any meeting of that
        server, which the gateway's health polls would see as a broken server.
        """
        stripped, unchecked = STRIPPED.get(self.call), UNCHECKED.get(self.call, frozenset())
        params = [(k, strip_control_chars(v) if k == stripped else v) for k, v in self.params]
        for name, value in params:
            if envelope.NOT_XML.search(name) or (
                name.lower() not in unchecked and envelope.NOT_XML.search(value)
            ):
                raise ValidationError(f"Parameter {_shown(name)} cannot contain control characters")
        object.__setattr__(self, "params", params)

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


def _shown(name: str) -> str:
    """A parameter name for an error message: what XML cannot carry left out."""
    return envelope.NOT_XML.sub("", name)[:64] or "?"


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
