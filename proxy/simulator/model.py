"""The simulated BBB server's data: meetings, attendees, requests and replies.

Nothing here does I/O.  Times are epoch **milliseconds** (as BBB reports
them) unless a name says seconds.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Container
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from proxy.bbb.envelope import CONTENT_TYPE

MODES = frozenset({"ok", "hang", "garbage", "http500", "refuse_create"})

_ALPHANUMERIC = string.ascii_letters + string.digits
_LOWER_ALPHANUMERIC = string.ascii_lowercase + string.digits


@dataclass
class Behaviour:
    """How the simulated server misbehaves; mutable so tests can flip it at run time.

    ``latency`` seconds are slept before every API answer, then ``mode`` applies:
    ``ok`` answers normally, ``hang`` never answers, ``garbage`` is HTTP 200 with
    a body that is not XML, ``http500`` an HTML error page, ``refuse_create``
    answers every create with FAILED.
    """

    latency: float = 0.0
    mode: str = "ok"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown simulator mode {self.mode!r}; one of {sorted(MODES)}")


@dataclass
class Attendee:
    """One joined user (bbb-web's ``User``)."""

    internal_id: str  # w_ + 12 random characters
    user_id: str  # the external userID, or the internal id when none was given
    full_name: str
    role: str  # MODERATOR | VIEWER
    customdata: list[tuple[str, str]]
    session_token: str
    auth_token: str
    client_type: str = "HTML5"
    is_presenter: bool = False


@dataclass
class Meeting:
    """One meeting as bbb-web keeps it; field names follow the API's XML."""

    meeting_id: str
    name: str
    internal_id: str
    create_time: int
    create_date: str
    voice_bridge: str
    dial_number: str
    attendee_pw: str
    moderator_pw: str
    duration: int = 0
    max_participants: int = 0
    record: bool = False
    logout_url: str = ""
    meeting_ended_url: str = ""
    welcome: str = ""
    moderator_only_message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    params: list[tuple[str, str]] = field(default_factory=list)
    attendees: dict[str, Attendee] = field(default_factory=dict)  # by internal id
    start_time: int = 0
    end_time: int = 0
    has_user_joined: bool = False
    ended: bool = False
    forcibly_ended: bool = False
    documents_inserted: int = 0
    chat_messages: list[tuple[str, str]] = field(default_factory=list)  # (userName, message)

    @property
    def running(self) -> bool:
        """``Meeting.isRunning()``: true only while someone is in it."""
        return not self.ended and bool(self.attendees)

    @property
    def moderator_count(self) -> int:
        return sum(1 for a in self.attendees.values() if a.role == "MODERATOR")

    def unique_user_ids(self) -> set[str]:
        return {a.user_id for a in self.attendees.values()}


@dataclass(frozen=True)
class ApiRequest:
    """One call to ``/bigbluebutton/api/<call>`` as the I/O layer received it."""

    call: str
    method: str = "GET"
    raw_query: str = ""
    form_params: tuple[tuple[str, str], ...] = ()
    content_type: str = ""  # media type only, lower-case, no parameters
    body: bytes = b""
    origin: str = "http://127.0.0.1"  # scheme://host[:port] the client used
    files: tuple[tuple[str, bytes], ...] = ()  # multipart file parts: (name, content)
    remote_addr: str = ""  # the client's address and headers (webhook events carry them)
    user_agent: str = ""
    referer: str = ""


@dataclass(frozen=True)
class Reply:
    """What to answer: XML (HTTP 200) or a redirect (HTTP 302)."""

    status: int
    body: str = ""
    content_type: str = CONTENT_TYPE
    location: str | None = None

    @classmethod
    def xml(cls, body: str) -> Reply:
        return cls(200, body)

    @classmethod
    def json(cls, body: str) -> Reply:
        """A JSON answer (the text-track calls)."""
        return cls(200, body, "application/json")

    @classmethod
    def redirect(cls, location: str) -> Reply:
        return cls(302, "", "text/plain;charset=utf-8", location)


@dataclass(frozen=True)
class SimulatorStatistics:
    """A snapshot for metrics and tests."""

    meetings: int
    running_meetings: int
    attendees: int
    requests: int
    notifications_sent: int


def random_token(length: int, alphabet: str = _LOWER_ALPHANUMERIC) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def random_password() -> str:
    """bbb-web's generated attendee/moderator password: 8 alphanumerics."""
    return random_token(8, _ALPHANUMERIC)


def random_voice_bridge(taken: Container[str]) -> str:
    """A 5-digit conference number no live meeting uses."""
    while True:
        candidate = str(10000 + secrets.randbelow(90000))
        if candidate not in taken:
            return candidate


def java_date(epoch_ms: int) -> str:
    """``java.util.Date.toString()`` in UTC, e.g. ``Thu May 09 13:35:28 UTC 2024``."""
    return time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(epoch_ms / 1000))


def append_query(url: str, extra: str) -> str:
    """``url`` with ``extra`` (already encoded) added to its query string."""
    scheme, netloc, path, query, fragment = urlsplit(url)
    query = f"{query}&{extra}" if query else extra
    return urlunsplit((scheme, netloc, path, query, fragment))
