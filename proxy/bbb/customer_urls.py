"""Which of a customer's end URLs the gateway will call: decided without I/O.

A customer's ``meetingEndedURL`` / ``meta_endCallbackUrl`` is checked twice:
when the create arrives (a URL that fails is dropped: the create still
succeeds, as BBB's would, and the URL is never called) and again just before
it is called (a notice signed by an older gateway may carry one that was never
checked).  :func:`problem` says why a URL cannot be called, or None.

What is refused, and why each would otherwise raise deep inside the HTTP
stack: longer than :data:`MAX_URL_CHARS`; a non-printable character anywhere
(httpx refuses control characters; a CR/LF would also split a log line); not
``http``/``https``; no host; a port that is not 1-65535 (``urlsplit`` raises
on ``.port``); a host name with an empty or over-long label, or one IDNA 2008
cannot encode (trio and httpx both encode it and raise ``UnicodeError``).
A non-ASCII host name is encoded here once (IDNA 2003, Python's codec), and
the gateway then resolves and names that ASCII form, so nothing downstream
encodes it again.

:data:`OUTCOMES` counts, for the whole process, what became of customer URLs
(``dropped`` at create; ``ok``, ``failed``, ``refused``, ``invalid`` when
called); metrics read it at scrape time.
"""

from __future__ import annotations

import re
from collections import Counter
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048  # far above any LMS's callback URL; bounds what rides in our signed URL
MAX_HOST_CHARS = 253  # RFC 1035, without the trailing dot
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")  # '_' occurs in real host names; resolvers accept it

OUTCOMES: Counter[str] = Counter()


def problem(url: str) -> str | None:
    """Why the gateway will not call ``url``, or None if it may (its host still to be checked)."""
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    if not url.isprintable():
        return "contains a non-printable character"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https"):
        return "not an http(s) URL"
    return _host_problem(parts) or _port_problem(parts)


def ascii_host(host: str) -> str:
    """``host`` as it goes on the wire: ASCII as given, else IDNA-encoded.

    Error handling: ``UnicodeError`` when it cannot be encoded (an empty or
    over-long label, a character IDNA refuses).
    """
    if host.isascii():
        return host
    return host.encode("idna").decode("ascii")


def port_of(parts: SplitResult) -> int:
    """The port a checked URL names, or its scheme's default."""
    return parts.port or (443 if parts.scheme == "https" else 80)


def _host_problem(parts: SplitResult) -> str | None:
    host = parts.hostname
    if not host:
        return "no host"
    if "[" in parts.netloc:
        return None  # urlsplit has already checked the bracketed IPv6 literal
    try:
        encoded = ascii_host(host).removesuffix(".")
    except UnicodeError:
        return "host name cannot be encoded (IDNA)"
    if len(encoded) > MAX_HOST_CHARS or not all(map(_LABEL.fullmatch, encoded.split("."))):
        return "host name has an empty, over-long or invalid label"
    return None


def _port_problem(parts: SplitResult) -> str | None:
    try:
        port = parts.port
    except ValueError:
        return "port is not a number from 1 to 65535"
    return "port is not a number from 1 to 65535" if port == 0 else None
