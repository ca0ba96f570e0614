"""A verified customer request and the answer to it, independent of the web framework."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.bbb import envelope
from proxy.config import Customer
from proxy.errors import ValidationError

MEETING_ID_MIN, MEETING_ID_MAX = 2, 256


@dataclass(frozen=True, slots=True)
class ApiRequest:
    customer: Customer
    call: str
    params: list[tuple[str, str]]  # URL query then form body, decoded, checksum removed
    body: bytes | None = None  # an XML body (create, insertDocument), as received
    content_type: str | None = None

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
        value = value.strip()
        digits = value.removeprefix("-")
        if not digits.isdigit() or len(digits) > 9:
            raise ValidationError(f"Parameter {name} must be an integer")
        return int(value)


@dataclass(frozen=True, slots=True)
class Answer:
    body: str | bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=lambda: envelope.HEADERS)

    @classmethod
    def xml(cls, body: str) -> Answer:
        return cls(body)

    @classmethod
    def redirect(cls, location: str) -> Answer:
        return cls("", 302, {"Location": location, "Cache-Control": "no-cache"})

    @classmethod
    def json(cls, body: bytes) -> Answer:
        return cls(body, 200, {"Content-Type": "application/json", "Cache-Control": "no-cache"})
