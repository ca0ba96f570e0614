"""The gateway's own meeting-end URLs, signed, and the customer URLs they carry.

bbb-web (``MeetingService.meetingEnded``) makes two calls when a meeting ends:
the ``endCallbackUrl`` metadata URL with ``recordingmarks`` and ``meetingID``
appended, and the ``meetingEndedURL`` as given.  On create the gateway takes
both slots for itself and removes the customer's::

    {public_url}/callbacks/v1/ended?k=<kind>&b=<backend>&m=<backend meetingID>
        &i=<customer's meetingID>&c=<instance>&cb=<customer's meetingEndedURL>
        &ecb=<customer's endCallbackUrl>&sig=<hex>

``k=ended`` goes into ``meetingEndedURL`` (it only releases the reservation);
``k=callback`` goes into ``meta_endCallbackUrl``, carries the customer's URLs
and learns ``recordingmarks``; it releases too and then calls the customer's
URLs as BBB would have.  Either notice alone frees the connections.

``c`` names the meeting *instance*: the ``repr`` of the reservation's
``created_at`` (the same value as the ``bbb-proxy-created`` tag), so it reads
back exactly.  A notice releases only the reservation of that instance; a late
or replayed notice of an earlier meeting with the same meetingID finds another
``created_at`` in the ledger and releases nothing (:func:`releases`).

``sig`` is HMAC-SHA256, keyed from the backend's secret, over the gateway's
own parameters re-encoded in a fixed order, so BBB re-encoding the query while
appending to it does not break it, and nobody without the key can make a URL
that releases a reservation, or move a URL to another instance.  The
customer's URLs travel inside the URL, so they survive a restart of the
gateway without being stored anywhere else.  The customer's ``endCallbackUrl``
is also kept on the backend under the gateway's own metadata tag, so
getMeetingInfo still shows it to the customer.

Error handling: nothing here raises on what a peer sends; :func:`verify`
answers None for any query that is not a URL the gateway signed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy.bbb import customer_urls
from proxy.bbb.rewrite import KEPT_END_CALLBACK, first_values
from proxy.config import Backend
from proxy.logs import shown

log = logging.getLogger(__name__)

PATH = "/callbacks/v1/ended"
SIGNED = ("k", "b", "m", "i", "c", "cb", "ecb")
KINDS = ("ended", "callback")


@dataclass(frozen=True, slots=True)
class CustomerUrls:
    meeting_ended: tuple[str, ...] = ()  # called as given
    end_callback: tuple[str, ...] = ()  # called with recordingmarks and meetingID


@dataclass(frozen=True, slots=True)
class EndNotice:
    kind: str
    backend_id: str
    backend_meeting_id: str
    meeting_id: str  # the customer's
    instance: str  # repr of the reservation's created_at; "" in URLs made before instances
    urls: CustomerUrls
    recordingmarks: str


def _sign(backend: Backend, params: Sequence[tuple[str, str]]) -> str:
    key = hashlib.sha256(b"bbb-proxy meeting-ended:" + backend.secret.encode()).digest()
    return hmac.new(key, urlencode(params).encode(), hashlib.sha256).hexdigest()


def instance_of(created_at: float) -> str:
    """How a meeting instance is written in a notice URL (and read back)."""
    return repr(created_at)


def ended_urls(
    public_url: str,
    backend: Backend,
    backend_meeting_id: str,
    meeting_id: str,
    urls: CustomerUrls,
    created_at: float,
) -> tuple[str, str]:
    """(our meetingEndedURL, our endCallbackUrl) for one meeting instance.

    ``created_at`` is the reservation's: only a notice carrying it releases it.
    """
    base = [
        ("b", backend.id),
        ("m", backend_meeting_id),
        ("i", meeting_id),
        ("c", instance_of(created_at)),
    ]
    ended = [("k", "ended"), *base]
    callback = [
        ("k", "callback"),
        *base,
        *(("cb", u) for u in urls.meeting_ended),
        *(("ecb", u) for u in urls.end_callback),
    ]
    return _signed_url(public_url, backend, ended), _signed_url(public_url, backend, callback)


def _signed_url(public_url: str, backend: Backend, params: Sequence[tuple[str, str]]) -> str:
    return f"{public_url}{PATH}?{urlencode(params)}&sig={_sign(backend, params)}"


_END_URL_PARAMS = ("meetingendedurl", "meta_endcallbackurl")


def split_customer_urls(
    params: Sequence[tuple[str, str]],
) -> tuple[list[tuple[str, str]], CustomerUrls, list[tuple[str, str]]]:
    """(params without the customer's end URLs, those URLs, metadata that keeps them visible).

    bbb-web keeps one value of each (``ParamsProcessorUtil`` reads
    ``params.get("meetingEndedURL")`` into one string, and metadata is one value
    per name), so only the first of each kind is kept; repeats are dropped.  A
    URL the gateway could not call (:func:`customer_urls.problem`) is dropped
    too, logged and counted: the create goes on without it, as BBB's would.
    """
    kept: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    for name, value in params:
        lowered = name.lower()
        if lowered in _END_URL_PARAMS:
            found.setdefault(lowered, value)
        else:
            kept.append((name, value))
    ended = _callable(found.get("meetingendedurl", ""), "meetingEndedURL")
    callback = _callable(found.get("meta_endcallbackurl", ""), "meta_endCallbackUrl")
    tags = [(f"meta_{KEPT_END_CALLBACK}", callback[0])] if callback else []
    return kept, CustomerUrls(ended, callback), tags


def _callable(url: str, name: str) -> tuple[str, ...]:
    if not url:
        return ()
    reason = customer_urls.problem(url)
    if reason is None:
        return (url,)
    log.warning("create: dropped %s %s: %s", name, shown(url), reason)
    customer_urls.OUTCOMES["dropped"] += 1
    return ()


def verify(raw_query: str, backends: dict[str, Backend]) -> EndNotice | None:
    """The notice a signed meeting-ended URL carries, or None if it is not ours."""
    params = parse_qsl(raw_query)  # the gateway never signs an empty value
    signed = [(k, v) for k, v in params if k in SIGNED]
    values, given = first_values(signed), first_values(params)
    backend = backends.get(values.get("b", ""))
    if backend is None or values.get("k") not in KINDS or not {"m", "i"} <= values.keys():
        return None
    # Bytes, not str: compare_digest raises TypeError on a str that is not ASCII.
    expected = _sign(backend, signed).encode()
    if not hmac.compare_digest(expected, given.get("sig", "").encode("utf-8", "replace")):
        return None
    urls = CustomerUrls(
        tuple(v for k, v in signed if k == "cb"), tuple(v for k, v in signed if k == "ecb")
    )
    return EndNotice(
        values["k"], backend.id, values["m"], values["i"], values.get("c", ""), urls,
        "true" if given.get("recordingmarks") == "true" else "false",
    )  # fmt: skip


def releases(notice: EndNotice, held_created_at: float) -> bool:
    """Whether ``notice`` may release the reservation the ledger holds for its meeting.

    Only when that reservation (``held_created_at`` is its ``created_at``) is the very
    instance the notice was made for.  A notice of an earlier instance (late, or
    replayed) and one without an instance (a URL made before instances existed)
    release nothing: the backend poll frees such meetings once they are gone.
    """
    return bool(notice.instance) and notice.instance == instance_of(held_created_at)


def calls_for(notice: EndNotice) -> list[str]:
    """The customer URLs to call for a notice, as BBB would have called them."""
    if notice.kind != "callback":
        return []
    extra = [("recordingmarks", notice.recordingmarks), ("meetingID", notice.meeting_id)]
    return [*notice.urls.meeting_ended, *(_appended(u, extra) for u in notice.urls.end_callback)]


def _appended(url: str, extra: Sequence[tuple[str, str]]) -> str:
    scheme, netloc, path, query, fragment = urlsplit(url)
    added = urlencode(extra)
    return urlunsplit((scheme, netloc, path, f"{query}&{added}" if query else added, fragment))
