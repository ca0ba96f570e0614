"""Backend events, decided without I/O: the gateway's intake URL, the backend's checksum,
the POST's form, and which customer's meeting each event belongs to.

**The intake URL.**  The gateway registers one global hook on every backend's webhooks
service (:mod:`proxy.webhooks.intake`), with the callback URL ::

    {public_url}/callbacks/v1/webhook-events?b=<backend id>&t=<token>

``t`` is an HMAC-SHA256 of the backend id under a key derived from that backend's secret
(its own derivation, not the meeting-ended or recording-ready one's), so a URL names
exactly one backend and nobody without the secret can make one.  bbb-webhooks signs each
POST to it: ``checksum = <alg>(callbackURL + body + secret)`` appended to the URL as
``[?|&]checksum=<hex>``, the algorithm told by the checksum's length (bbb-webhooks'
``hookChecksumAlgorithm``, sha1 by default).  :func:`verify` recomputes the URL it
registered (never trusting the Host header) and checks both.

**The form.**  ``domain=…&event=[<json>]&timestamp=…`` (bbb-api.md §3): ``event`` is a JSON
array of mapped events (one in bbb-webhooks 3.x; older versions send the object alone,
accepted too).  :func:`parse_events` is bounded (at most :data:`MAX_FIELDS` form fields,
:data:`MAX_EVENTS` events, :data:`MAX_DEPTH` levels of nesting) and total: anything else
is None, never an exception.

**Whose event.**  :func:`owner_of` maps the event's backend meetingID
(``data.attributes.meeting["external-meeting-id"]``) to the customer and the customer's
meetingID, in this order: the ledger's reservation of that backend meeting; the owners
the intake saw lately (:class:`Recent`, by backend meetingID and by internal meetingID:
the meeting-ended and recording events that come after the ledger released the meeting);
the gateway's own tags in the event's metadata (``meeting-created``,
``rap-publish-ended``); the namespaced meetingID itself (``acme~room-1``, see
:func:`proxy.bbb.rewrite.backend_meeting_id`; a hashed one only through the ledger, the
tags or :class:`Recent`).  The customer must be configured, and a meeting the ledger has
placed on another backend is a stray copy: its events are not the customer's.  Anything
else was not placed by the gateway (None: dropped and counted).

**For the customer.**  :func:`for_customer` copies the event with the backend meetingID
replaced by the customer's wherever it appears as a whole value (the meeting's
``external-meeting-id``, a recording's ``metadata.meetingId``), every ``metadata``
object cleaned of the gateway's own keys as :func:`proxy.bbb.rewrite.restore_metadata`
cleans ``<metadata>`` (the customer's kept callback URLs get their names back), and
``meeting-created``'s ``duration`` the one the customer asked for.  Personal data is the
privacy filter's business (:mod:`proxy.webhooks.privacy`, applied by delivery).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import orjson

from proxy.bbb import bodies, rewrite
from proxy.bbb.checksum import ALGORITHMS_BY_LENGTH
from proxy.bbb.numbers import parse_count
from proxy.config import Backend
from proxy.store import Json

PATH = "/callbacks/v1/webhook-events"
MAX_FIELDS = 16  # form fields of one POST (bbb-webhooks sends 3)
MAX_EVENTS = 100  # events of one POST (bbb-webhooks sends 1)
MAX_DEPTH = 32  # nesting of one event (bbb-webhooks' deepest is 5)
RECENT = 10_000  # owners remembered for events that come after the ledger let go

type Event = dict[str, Json]


@dataclass(frozen=True, slots=True)
class Owner:
    customer: str
    meeting_id: str  # the customer's
    backend_meeting_id: str


# -- the URL and the checksum ------------------------------------------------------------------


def intake_url(public_url: str, backend: Backend) -> str:
    """The callback URL the gateway registers on ``backend``."""
    return f"{public_url}{PATH}?{urlencode([('b', backend.id), ('t', _token(backend))])}"


def _token(backend: Backend) -> str:
    key = hashlib.sha256(b"bbb-proxy webhook-intake:" + backend.secret.encode()).digest()
    return hmac.new(key, backend.id.encode(), hashlib.sha256).hexdigest()


def verify(
    raw_query: str,
    body: bytes,
    public_url: str,
    backends: Mapping[str, Backend],
    authorization: str | None = None,
) -> Backend | None:
    """The backend that signed this POST to its intake URL, or None.

    bbb-webhooks configured with ``auth2_0: true`` sends no checksum but the header
    ``Authorization: Bearer <secret>``: accepted too, on the registered URL exactly."""
    values = dict(reversed(parse_qsl(raw_query, keep_blank_values=True)))
    backend = backends.get(values.get("b", ""))
    if backend is None:
        return None
    registered = intake_url(public_url, backend)
    query = registered.partition("?")[2]
    if raw_query == query and authorization is not None:
        expected_header = f"Bearer {backend.secret}".encode()
        given_header = authorization.encode("utf-8", "replace")
        return backend if hmac.compare_digest(expected_header, given_header) else None
    given = raw_query.removeprefix(query + "&checksum=")
    if given == raw_query or not given.isascii():
        return None  # not our URL, or not the checksum alone after it
    algorithm = ALGORITHMS_BY_LENGTH.get(len(given))
    if algorithm is None:
        return None
    data = registered.encode() + body + backend.secret.encode()
    expected = hashlib.new(algorithm, data).hexdigest()
    return backend if hmac.compare_digest(expected, given.lower()) else None


# -- the form ---------------------------------------------------------------------------------


def parse_events(body: bytes) -> list[Event] | None:
    """The events of a bbb-webhooks POST body, or None if it is not one."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
        decoded = orjson.loads(dict(reversed(pairs))["event"])
    except (UnicodeDecodeError, ValueError, KeyError):  # orjson's errors are ValueErrors
        return None
    found = [decoded] if isinstance(decoded, dict) else decoded
    if not isinstance(found, list) or len(found) > MAX_EVENTS:
        return None
    if not all(isinstance(e, dict) and bodies.nests_within(e, MAX_DEPTH) for e in found):
        return None
    return found


def event_name(event: Event) -> str | None:
    data = event.get("data")
    name = data.get("id") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def _meeting(event: Event) -> dict[str, Json]:
    data = event.get("data")
    attributes = data.get("attributes") if isinstance(data, dict) else None
    meeting = attributes.get("meeting") if isinstance(attributes, dict) else None
    return meeting if isinstance(meeting, dict) else {}


def _text(mapping: Mapping[str, Json], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) and value else None


# -- whose event ------------------------------------------------------------------------------


class Recent:
    """The owners of the latest meetings events came for, by (backend, backend meetingID)
    and (backend, internal meetingID); the oldest forgotten beyond ``size``."""

    def __init__(self, size: int = RECENT) -> None:
        self.size = size
        self._owners: OrderedDict[tuple[str, str], Owner] = OrderedDict()

    def get(self, backend_id: str, meeting_id: str | None) -> Owner | None:
        if meeting_id is None:
            return None
        return self._owners.get((backend_id, meeting_id))

    def remember(self, backend_id: str, ids: list[str | None], owner: Owner) -> None:
        for meeting_id in ids:
            if meeting_id is not None:
                self._owners[(backend_id, meeting_id)] = owner
                self._owners.move_to_end((backend_id, meeting_id))
        while len(self._owners) > self.size:
            self._owners.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Ledger:
    """What :func:`owner_of` asks of the ledger (plain functions, so tests need none)."""

    placed: Callable[[str, str], Owner | None]  # (backend, backend meetingID) -> its owner
    backend_of: Callable[[str, str], str | None]  # (customer, meetingID) -> its backend


def owner_of(
    event: Event, backend_id: str, ledger: Ledger, recent: Recent, customers: Container[str]
) -> Owner | None:
    """The customer and meeting ``event`` belongs to (module docstring), or None."""
    meeting = _meeting(event)
    external, internal = (
        _text(meeting, "external-meeting-id"),
        _text(meeting, "internal-meeting-id"),
    )
    owner = ledger.placed(backend_id, external) if external is not None else None
    owner = owner or recent.get(backend_id, external) or recent.get(backend_id, internal)
    if owner is None and external is not None:
        owner = _tagged(event, external) or _namespaced(external)
        if owner is not None and ledger.backend_of(owner.customer, owner.meeting_id) not in (
            None,
            backend_id,
        ):
            return None  # a stray copy of a meeting the ledger placed elsewhere
    if owner is None or owner.customer not in customers:
        return None
    recent.remember(backend_id, [external, internal], owner)
    return owner


def _tagged(event: Event, external: str) -> Owner | None:
    """The owner the gateway's metadata tags name, when they agree with the meetingID."""
    for metadata in _metadata_objects(event):
        customer = _text(metadata, rewrite.CUSTOMER_TAG)
        meeting_id = metadata.get(rewrite.MEETING_TAG)
        if (
            customer is not None
            and isinstance(meeting_id, str)
            and rewrite.backend_meeting_id(customer, meeting_id) == external
        ):
            return Owner(customer, meeting_id, external)
    return None


def _namespaced(external: str) -> Owner | None:
    customer, separator, meeting_id = external.partition(rewrite.SEPARATOR)
    if not separator or not customer or not meeting_id:
        return None
    if rewrite.backend_meeting_id(customer, meeting_id) != external:
        return None  # hashed (or not the gateway's form): only the ledger or tags tell
    return Owner(customer, meeting_id, external)


def _metadata_objects(event: Event) -> list[dict[str, Json]]:
    """The ``metadata`` objects of the meeting (meeting-created) and the recording
    (rap-publish-ended)."""
    data = event.get("data")
    attributes = data.get("attributes") if isinstance(data, dict) else None
    if not isinstance(attributes, dict):
        return []
    found = []
    for holder in (attributes.get("meeting"), attributes.get("recording")):
        metadata = holder.get("metadata") if isinstance(holder, dict) else None
        if isinstance(metadata, dict):
            found.append(metadata)
    return found


# -- for the customer -------------------------------------------------------------------------


def for_customer(event: Event, owner: Owner) -> Event:
    """A copy of ``event`` as the customer's own BBB would have sent it (module docstring)."""
    copied = _rewritten(event, owner.backend_meeting_id, owner.meeting_id)
    assert isinstance(copied, dict)  # a dict copies to a dict
    if event_name(event) == "meeting-created":
        _restore_duration(_meeting(event), _meeting(copied))
    return copied


def _rewritten(value: Json, backend_id: str, customer_id: str) -> Json:
    if isinstance(value, str):
        return customer_id if value == backend_id else value
    if isinstance(value, list):
        return [_rewritten(v, backend_id, customer_id) for v in value]
    if isinstance(value, dict):
        copied = {k: _rewritten(v, backend_id, customer_id) for k, v in value.items()}
        metadata = copied.get("metadata")
        if isinstance(metadata, dict):
            copied["metadata"] = clean_metadata(metadata)
        return copied
    return value


def clean_metadata(metadata: Mapping[str, Json]) -> dict[str, Json]:
    """``metadata`` without the gateway's keys; the customer's kept end-callback,
    recording-ready and analytics URLs under their own names (as
    ``rewrite.restore_metadata``)."""
    cleaned: dict[str, Json] = {}
    for key, value in metadata.items():
        name = key.lower()
        ours = rewrite.own_url(name, str(value))
        if name == rewrite.KEPT_END_CALLBACK:
            cleaned["endcallbackurl"] = value
        elif name in rewrite.KEPT_READY:
            cleaned[rewrite.KEPT_READY[name]] = value
        elif not (ours or name == "endcallbackurl" or name.startswith(rewrite.TAG_PREFIX)):
            cleaned[key] = value
    return cleaned


def _restore_duration(original: Mapping[str, Json], copied: dict[str, Json]) -> None:
    metadata = original.get("metadata")
    asked = metadata.get(rewrite.DURATION_TAG) if isinstance(metadata, dict) else None
    if isinstance(asked, str) and "duration" in copied:
        copied["duration"] = parse_count(asked, max_digits=9)
