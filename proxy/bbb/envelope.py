"""BBB's response envelope, as bbb-web's FreeMarker templates write it.

Every API answer is HTTP 200 with ``Content-Type: text/xml;charset=utf-8``,
no XML prolog, ``<response><returncode>SUCCESS|FAILED</returncode>...``.
Values are XML-escaped (``auto_esc=true``), never wrapped in CDATA.
Errors carry one ``messageKey`` and ``message`` (``api-error.ftlx``).

Join is the exception: its errors are a 302 to the logout URL with
``errors=[{"key": ..., "message": ...}]`` appended (see :func:`join_error_location`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, urlsplit, urlunsplit
from xml.sax.saxutils import escape

import orjson

from proxy.errors import ProxyError

CONTENT_TYPE = "text/xml;charset=utf-8"
HEADERS = {"Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache"}
# The characters XML 1.0 cannot carry, escaped or not: bbb-web writes a value holding one as
# it is, and its answer no longer parses.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def element(name: str, value: object) -> str:
    """``<name>value</name>`` with the value escaped; booleans lower-case."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = escape(str(value))
    return f"<{name}>{text}</{name}>"


def success(fields: Iterable[tuple[str, object]] = ()) -> str:
    """A SUCCESS response with ``fields`` in order; values already XML are not allowed."""
    body = "".join(element(name, value) for name, value in fields)
    return f"<response><returncode>SUCCESS</returncode>{body}</response>"


def failure(message_key: str, message: str) -> str:
    """BBB's error envelope."""
    return (
        "<response><returncode>FAILED</returncode>"
        f"{element('messageKey', message_key)}{element('message', message)}</response>"
    )


def from_error(error: ProxyError) -> str:
    return failure(error.message_key, error.message)


def join_error_location(logout_url: str, message_key: str, message: str) -> str:
    """Where bbb-web sends a browser whose join failed: the logout URL plus ``errors=``."""
    errors = orjson.dumps([{"key": message_key, "message": message}]).decode()
    scheme, netloc, path, query, fragment = urlsplit(logout_url)
    extra = "errors=" + quote(errors, safe="")
    query = f"{query}&{extra}" if query else extra
    return urlunsplit((scheme, netloc, path, query, fragment))
