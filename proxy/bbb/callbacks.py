"""The gateway's own meeting-end URL, signed, and the customer URLs it carries.

On create the gateway removes the customer's ``meetingEndedURL`` and
``meta_endCallbackUrl`` and gives the backend its own ``meetingEndedURL``::

    {public_url}/callbacks/v1/ended?b=<backend>&m=<backend meetingID>&cb=<customer URL>...&sig=<hex>

``sig`` is HMAC-SHA256 over everything before it, keyed from the backend's
secret, so only the gateway and that backend can make a URL that releases a
reservation.  The customer's URLs travel inside it, so they survive a restart
of the gateway without being stored anywhere else.  BBB appends
``recordingmarks=true|false``; it is passed on to each customer URL, as BBB
would call it.

The customer's ``endCallbackUrl`` metadata is kept on the backend under the
gateway's own tag, so getMeetingInfo still shows it to the customer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from proxy.bbb.rewrite import KEPT_END_CALLBACK
from proxy.config import Backend

PATH = "/callbacks/v1/ended"
CUSTOMER_PARAMS = ("meetingendedurl", "meta_endcallbackurl")


@dataclass(frozen=True, slots=True)
class EndNotice:
    backend_id: str
    backend_meeting_id: str
    customer_urls: tuple[str, ...]
    recordingmarks: str


def _key(backend: Backend) -> bytes:
    return hashlib.sha256(b"bbb-proxy meeting-ended:" + backend.secret.encode()).digest()


def _sign(backend: Backend, query: str) -> str:
    return hmac.new(_key(backend), query.encode(), hashlib.sha256).hexdigest()


def ended_url(
    public_url: str, backend: Backend, backend_meeting_id: str, customer_urls: Sequence[str]
) -> str:
    query = urlencode(
        [("b", backend.id), ("m", backend_meeting_id)] + [("cb", u) for u in customer_urls]
    )
    return f"{public_url}{PATH}?{query}&sig={_sign(backend, query)}"


def split_customer_urls(
    params: Sequence[tuple[str, str]],
) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]:
    """(params without the customer's end URLs, those URLs, metadata to keep them visible)."""
    kept, urls, tags = [], [], []
    for name, value in params:
        lowered = name.lower()
        if lowered not in CUSTOMER_PARAMS:
            kept.append((name, value))
            continue
        if value:
            urls.append(value)
        if lowered == "meta_endcallbackurl":
            tags.append((f"meta_{KEPT_END_CALLBACK}", value))
    return kept, urls, tags


def verify(raw_query: str, backends: dict[str, Backend]) -> EndNotice | None:
    """The notice a signed meeting-ended URL carries, or None if it is not ours."""
    before, sep, rest = raw_query.partition("&sig=")
    signature, _, extra = rest.partition("&")
    params = parse_qsl(before, keep_blank_values=True)
    if not sep or len(params) < 2 or params[0][0] != "b" or params[1][0] != "m":
        return None
    backend = backends.get(params[0][1])
    if backend is None or not hmac.compare_digest(_sign(backend, before), signature):
        return None
    marks = dict(parse_qsl(extra)).get("recordingmarks", "false")
    urls = tuple(v for k, v in params[2:] if k == "cb")
    return EndNotice(backend.id, params[1][1], urls, "true" if marks == "true" else "false")


def with_recordingmarks(url: str, marks: str) -> str:
    """The customer's URL as BBB would call it: ``recordingmarks`` appended."""
    scheme, netloc, path, query, fragment = urlsplit(url)
    extra = f"recordingmarks={quote(marks)}"
    return urlunsplit((scheme, netloc, path, f"{query}&{extra}" if query else extra, fragment))
