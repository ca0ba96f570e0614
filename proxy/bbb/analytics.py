"""The learning-analytics callback, decided without I/O: the gateway's own URL, the
backend's JWT, and the document the customer gets.

When a meeting created with ``meta_analytics-callback-url`` ends, BBB's post_events
script POSTs the meeting's learning-dashboard document to that URL: ``Content-Type:
application/json``, ``Authorization: Bearer <JWT>``, the JWT signed with the server's
secret (HS512; its payload an ``exp``), the document a JSON object whose ``meeting_id``
is the external meetingID (here the namespaced one).  Sent straight to the customer,
neither the JWT nor the ids would be the customer's, so on create the gateway drops the
customer's URL (:func:`split`) and puts its own in its place (:func:`backend_params`)::

    {public_url}/callbacks/v1/analytics?b=<backend>&c=<customer>&m=<customer's
        meetingID>&u=<customer's URL>&sig=<hex>

signed as the recording-ready URL is (:func:`proxy.bbb.recording_ready.signed_url`),
under a key of its own.  The receiver checks the URL (else 403), the backend's JWT
(else 401) and that the document names the meeting the URL names (else 401); then
:func:`customer_document` gives the customer's document: every string equal to the
namespaced meetingID becomes the customer's meetingID, the gateway's own URL the
customer's, and every ``metadata`` object is cleaned as the webhooks' events are
(:func:`proxy.webhooks.mapping.clean_metadata`: the gateway's keys removed, the
customer's kept callback URLs under their own names).  ``internal_meeting_id`` stays as it
is: it is the internalMeetingID the customer sees in create and getMeetingInfo.  The
customer gets it as BBB would send it, the JWT signed with the customer's secret
(:func:`customer_token`, with ``meeting_id`` among its claims).

Delivery (outcomes, retries, the durable queue) is the recording-ready callback's
(:mod:`proxy.bbb.recording_ready`, :class:`proxy.calls.recording_ready.ReadyQueue`) on
a log of its own named "analytics".

Error handling: nothing here raises on what a peer sends; :func:`backend_document`
answers None for anything not genuine.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning

from proxy.bbb import bodies, customer_urls, rewrite
from proxy.bbb.recording_ready import Target, signed_url
from proxy.config import Backend
from proxy.webhooks.mapping import clean_metadata

log = logging.getLogger(__name__)

KEY = rewrite.ANALYTICS_KEY
PARAM = f"meta_{KEY}"
KEPT = rewrite.TAG_PREFIX + KEY  # the customer's URL, kept aside in the meeting's metadata
PATH = rewrite.ANALYTICS_PATH
PURPOSE = b"analytics"
ALGORITHMS = ["HS512", "HS384", "HS256"]  # BBB signs HS512; the others are accepted
TOKEN_LIFETIME = 3600.0  # seconds: the customer's JWT's exp, from the attempt
MAX_DEPTH = 64  # nesting of the document the gateway walks; deeper is refused


def split(params: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], str | None]:
    """``params`` without ``meta_analytics-callback-url``, and the customer's URL (None
    when there is none or it is not one the gateway may call)."""
    kept = [(k, v) for k, v in params if k.lower() != PARAM]
    given = next((v for k, v in params if k.lower() == PARAM and v), None)
    if given is None:
        return kept, None
    if customer_urls.problem(given) is not None:
        log.warning("create: the analytics callback URL is not one the gateway may call; dropped")
        return kept, None
    return kept, given


def backend_params(
    public_url: str, backend: Backend, customer: str, meeting_id: str, url: str | None
) -> list[tuple[str, str]]:
    """The gateway's own analytics URL for the backend, and the customer's kept aside
    under the gateway's prefix (shown back under its own key); none without one."""
    if url is None:
        return []
    own = signed_url(public_url, PATH, backend, (customer, meeting_id, url), PURPOSE)
    return [(PARAM, own), (f"meta_{KEPT}", url)]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def backend_document(
    token: str | None, body: bytes, backend: Backend, target: Target
) -> dict[str, object] | None:
    """The document of a genuine callback: the backend's JWT verifies with its secret and
    the JSON object names the meeting the URL names; else None."""
    if token is None or not _verified(token, backend.secret):
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    expected = rewrite.backend_meeting_id(target.customer, target.meeting_id)
    if not isinstance(document, dict) or document.get("meeting_id") != expected:
        return None
    if not bodies.nests_within(document, MAX_DEPTH - 1):  # the top level is depth 1
        return None
    return document


def _verified(token: str, secret: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        try:
            jwt.decode(token, secret, algorithms=ALGORITHMS)
        except jwt.PyJWTError:
            return False
    return True


def customer_document(document: dict[str, object], target: Target, own_url: str) -> bytes:
    """The document as the customer gets it (rules: module docstring), as JSON."""
    backend_id = rewrite.backend_meeting_id(target.customer, target.meeting_id)
    swap = {backend_id: target.meeting_id, own_url: target.url}
    return orjson.dumps(_mapped(document, swap))


def _mapped(value: Any, swap: dict[str, str]) -> Any:
    if isinstance(value, str):
        return swap.get(value, value)
    if isinstance(value, list):
        return [_mapped(v, swap) for v in value]
    if isinstance(value, dict):
        mapped = {swap.get(k, k): _mapped(v, swap) for k, v in value.items()}
        metadata = value.get("metadata")
        if isinstance(metadata, dict):  # as the webhooks' events: the customer's keys only
            mapped["metadata"] = _mapped(clean_metadata(metadata), swap)
        return mapped
    return value


def customer_token(secret: str, meeting_id: str, now: float) -> str:
    """The customer's JWT: HS512 with its secret used raw, as BBB signs it."""
    payload = {"exp": int(now + TOKEN_LIFETIME), "meeting_id": meeting_id}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, secret, algorithm="HS512")
