"""What the gateway changes between customer and backend, and how it is undone.

On the way to a backend each customer's meetingID is namespaced
(``acme~room-1``) and the meeting is tagged with metadata of the gateway's own
(``meta_bbb-proxy-customer``, ``-meeting``, ``-duration``).  On the way back,
every answer is rewritten so that the customer sees exactly what one BBB
server would have shown it: its own meetingID, the duration it asked for, and
none of the gateway's metadata or callback URLs.  Customers may not set the
gateway's metadata themselves (:func:`is_reserved_param`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from lxml import etree

from proxy.bbb.numbers import parse_count

SEPARATOR = "~"
HASH_MARKER = "sha256-"  # starts every hashed backend meetingID after the separator
MAX_MEETING_ID = 256
TAG_PREFIX = "bbb-proxy-"  # metadata keys of the gateway's own, as BBB stores them
CUSTOMER_TAG = TAG_PREFIX + "customer"
MEETING_TAG = TAG_PREFIX + "meeting"
DURATION_TAG = TAG_PREFIX + "duration"
CREATED_TAG = TAG_PREFIX + "created"  # the reservation's created_at: names the meeting instance
KEPT_END_CALLBACK = TAG_PREFIX + "endcallbackurl"
# Recording-ready URLs (recording_ready.py): the gateway's own under the customer's key, the
# customer's kept aside under the gateway's prefix, and given back its name on the way out.
READY_URL_KEYS = ("bbb-recording-ready-url", "bn-recording-ready-url", "canvas-recording-ready-url")
READY_PATH = "/callbacks/v1/recording-ready"
# The analytics callback's URL (analytics.py), kept aside and given back the same way.
ANALYTICS_KEY = "analytics-callback-url"
ANALYTICS_PATH = "/callbacks/v1/analytics"
KEPT_READY = {TAG_PREFIX + key: key for key in (*READY_URL_KEYS, ANALYTICS_KEY)}


def backend_meeting_id(customer: str, meeting_id: str) -> str:
    """The namespaced meetingID the backend sees; hashed when it would be too long.

    Injective (docs/decisions.md, "Meeting IDs on the backends"): the customer part ends at
    the first ``~`` (customer ids never hold one), and within a customer the plain form
    never starts with :data:`HASH_MARKER`, because an ID that does is hashed too.
    """
    namespaced = f"{customer}{SEPARATOR}{meeting_id}"
    if len(namespaced) <= MAX_MEETING_ID and not meeting_id.startswith(HASH_MARKER):
        return namespaced
    digest = hashlib.sha256(meeting_id.encode("utf-8")).hexdigest()
    return f"{customer}{SEPARATOR}{HASH_MARKER}{digest}"


def owned_by(customer: str, backend_id: str) -> bool:
    return backend_id.startswith(customer + SEPARATOR)


def tags(
    customer: str, meeting_id: str, asked_duration: int, created_at: float | None = None
) -> list[tuple[str, str]]:
    """The gateway's metadata for one meeting.

    ``created_at`` (the reservation's, ``repr`` of the float so it reads back exactly)
    tells one instance of a meetingID from the next one created under the same ID.
    """
    marks = [
        (f"meta_{CUSTOMER_TAG}", customer),
        (f"meta_{MEETING_TAG}", meeting_id),
        (f"meta_{DURATION_TAG}", str(asked_duration)),
    ]
    if created_at is not None:
        marks.append((f"meta_{CREATED_TAG}", repr(created_at)))
    return marks


def is_reserved_param(name: str) -> bool:
    """Parameters a customer may not pass through: the gateway's own metadata."""
    return name.lower().startswith("meta_" + TAG_PREFIX)


def without(params: Iterable[tuple[str, str]], names: Iterable[str]) -> list[tuple[str, str]]:
    drop = {n.lower() for n in names}
    return [(k, v) for k, v in params if k.lower() not in drop and not is_reserved_param(k)]


def first_values(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each parameter's first value, as bbb-web reads a repeated parameter."""
    return dict(reversed(list(params)))


def replace_param(
    params: Iterable[tuple[str, str]], name: str, value: str
) -> list[tuple[str, str]]:
    """``params`` with every ``name`` removed and one ``name=value`` in the first's place."""
    out: list[tuple[str, str]] = []
    placed = False
    for key, current in params:
        if key != name:
            out.append((key, current))
        elif not placed:
            out.append((key, value))
            placed = True
    if not placed:
        out.append((name, value))
    return out


# -- answers -----------------------------------------------------------------------------------


def meeting_owner(meeting: etree._Element) -> tuple[str, str, int] | None:
    """(customer, customer's meetingID, asked duration) of a meeting the gateway made.

    Both marks must agree: the customer tag and the namespaced meetingID.
    """
    metadata = meeting.find("metadata")
    if metadata is None:
        return None
    customer = metadata.findtext(CUSTOMER_TAG)
    meeting_id = metadata.findtext(MEETING_TAG)
    if not customer or meeting_id is None:
        return None
    if not owned_by(customer, meeting.findtext("meetingID") or ""):
        return None
    return customer, meeting_id, parse_count(metadata.findtext(DURATION_TAG), max_digits=9)


def restore_meeting(meeting: etree._Element, meeting_id: str, asked_duration: int) -> None:
    """Rewrite one ``<meeting>``/``<response>`` in place for the customer's eyes."""
    _set_text(meeting, "meetingID", meeting_id)
    _set_text(meeting, "duration", str(asked_duration))
    metadata = meeting.find("metadata")
    if metadata is not None:
        restore_metadata(metadata)


def restore_metadata(metadata: etree._Element) -> None:
    """Remove the gateway's own metadata from a ``<metadata>``; the customer's kept
    end-callback and recording-ready URLs get their names back (meetings and recordings)."""
    for child in list(metadata):
        tag = child.tag if isinstance(child.tag, str) else ""
        kept = tag == KEPT_END_CALLBACK or tag in KEPT_READY
        ours = own_url(tag, child.text or "")
        if ours or tag == "endcallbackurl" or (tag.startswith(TAG_PREFIX) and not kept):
            metadata.remove(child)  # the gateway's own (see callbacks.py, recording_ready.py)
        elif tag == KEPT_END_CALLBACK:
            child.tag = "endcallbackurl"  # the customer's own, kept aside
        elif tag in KEPT_READY:
            child.tag = KEPT_READY[tag]


def own_url(key: str, value: str) -> bool:
    """A callback URL of the gateway's own, put in the place of the customer's."""
    if key == ANALYTICS_KEY:
        return ANALYTICS_PATH + "?" in value
    return key in READY_URL_KEYS and READY_PATH + "?" in value


def _set_text(parent: etree._Element, tag: str, text: str) -> None:
    child = parent.find(tag)
    if child is not None:
        child.text = text


def serialise(root: etree._Element) -> str:
    return etree.tostring(root, encoding="unicode")
