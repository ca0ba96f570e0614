"""Where a failed join may send the browser, decided without I/O.

bbb-web answers a failed join with a 302 to the request's ``errorRedirectUrl``
or ``logoutURL`` (``errors=`` appended; :func:`join_error_in` reads one back).
Behind a gateway that must not become an open redirect, nor a way to crash the
HTTP layer:

- only a request whose checksum verified may choose the target; for any other
  (wrong checksum, unknown customer, oversized query) the gateway's own
  ``join_error_url`` is used;
- only ``http``/``https`` URLs with a host are followed: ``javascript:``,
  ``data:``, relative and other URLs fall back to ``join_error_url``;
- a URL with a control character (NUL, CR, LF, ...) cannot go into a
  ``Location`` header at all: there is no target, and the caller answers BBB's
  XML envelope instead (:data:`NO_TARGET`);
- a non-ASCII host is IDNA-encoded (an invalid one falls back), and spaces
  and non-ASCII characters elsewhere are percent-encoded (UTF-8), so the
  header is plain ASCII whatever the customer sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl, quote, urlsplit

import orjson

from proxy.bbb.rewrite import first_values
from proxy.errors import ApiError

NO_TARGET = None
SCHEMES = ("http", "https")
CHOSEN_BY = ("errorRedirectUrl", "logoutURL")  # bbb-web's order
MAX_KEY, MAX_MESSAGE = 64, 1000  # characters kept of a backend's messageKey / message


def join_error_target(signed: Sequence[tuple[str, str]] | None, fallback: str) -> str | None:
    """The URL a join error redirects to, or :data:`NO_TARGET` (answer XML instead).

    ``signed`` are the request's parameters if its checksum verified, else None.
    """
    if signed is None:
        return fallback
    values = first_values(signed)
    chosen = next((values[name] for name in CHOSEN_BY if values.get(name)), "")
    if not chosen:
        return fallback
    if any(_control(c) for c in chosen):
        return NO_TARGET
    if not _followable(chosen):
        return fallback
    return _ascii(chosen) or fallback


def _control(char: str) -> bool:
    """C0 and C1 controls and DEL: never valid in a header value or a URL."""
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _followable(url: str) -> bool:
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # e.g. an unbalanced "[" in the host
        return False
    return parts.scheme.lower() in SCHEMES and bool(parts.netloc)


def _ascii(url: str) -> str:
    """``url`` in plain ASCII: an IDNA host, the rest's spaces and non-ASCII %-encoded.

    "" if the host is not a valid internationalised name.
    """
    url = url.strip()
    parts = urlsplit(url)
    head = f"{parts.scheme}://{parts.netloc}"
    if not url.lower().startswith(head.lower()):
        return ""
    try:
        netloc = parts.netloc if parts.netloc.isascii() else parts.netloc.encode("idna").decode()
    except UnicodeError:
        return ""
    rest = "".join(c if c.isascii() and c != " " else quote(c) for c in url[len(head) :])
    return f"{parts.scheme}://{netloc}{rest}"


def join_error_in(location: str) -> ApiError | None:
    """The first error of a bbb-web join-error redirect (``errors=[{key, message}]``).

    None if ``location`` carries no such list: then it is not BBB's join error.
    """
    try:
        query = urlsplit(location).query
        values = first_values(parse_qsl(query))
        errors = orjson.loads(values.get("errors", ""))
    except (ValueError, orjson.JSONDecodeError):
        return None
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return None
    key, message = first.get("key"), first.get("message")
    if not isinstance(key, str) or not key or not isinstance(message, str):
        return None
    return ApiError(_printable(message)[:MAX_MESSAGE], message_key=_printable(key)[:MAX_KEY])


def _printable(text: str) -> str:
    return "".join(c for c in text if not _control(c))
