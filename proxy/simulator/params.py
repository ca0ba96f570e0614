"""Reading and validating request parameters the way bbb-web's request models do.

Every failure is an :class:`~proxy.errors.ApiError` carrying BBB's
``messageKey``; only one is reported per request, as in bbb-web.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.errors import ApiError

MISSING_MEETING_ID = ("missingParamMeetingID", "You must provide a meeting ID")


class Params:
    """A request's decoded parameters (URL query, then form body), in order."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = list(pairs)

    def get(self, name: str) -> str | None:
        """The first value of ``name`` (bbb-web uses the first of repeated values)."""
        for key, value in self.pairs:
            if key == name:
                return value
        return None

    def given(self, name: str) -> str | None:
        """The first value of ``name`` unless it is absent or empty (``StringUtils.isEmpty``)."""
        return self.get(name) or None

    def required(self, name: str, key: str, text: str) -> str:
        value = self.given(name)
        if value is None:
            raise ApiError(text, message_key=key)
        return value

    def meeting_id(self) -> str:
        """``meetingID``: required, stripped, 2-256 characters, no comma."""
        meeting_id = self.required("meetingID", *MISSING_MEETING_ID).strip()
        if not 2 <= len(meeting_id) <= 256:
            raise ApiError(
                "Meeting ID must be between 2 and 256 characters", message_key="validationError"
            )
        if "," in meeting_id:
            raise ApiError("Meeting ID cannot contain ','", message_key="validationError")
        return meeting_id

    def integer(self, name: str, default: int = 0) -> int:
        value = self.given(name)
        if value is None:
            return default
        try:
            return int(value.strip())
        except ValueError:
            raise ApiError(f"{name} must be an integer", message_key="validationError") from None

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.given(name)
        if value is None:
            return default
        if value.lower() not in ("true", "false"):
            raise ApiError(f"{name} must be a boolean value", message_key="validationError")
        return value.lower() == "true"
