"""Comparing the ledger with what a backend says it runs, without I/O.

Given the meetings a backend listed (``getMeetings``, sent at ``polled_at``)
and the reservations the ledger pinned to it *when the poll was sent*:

- a listed meeting is the reservation's own instance only if its
  ``bbb-proxy-created`` tag is the reservation's ``created_at`` (a meeting
  without the tag, made before the gateway tagged instances, matches by ID).
  Another instance under the same ID (an old one still listed) neither keeps
  nor confirms the reservation;
- a reservation that was confirmed when the poll was sent and whose instance
  is not listed, or listed as ended (``hasBeenForciblyEnded``, a non-zero
  ``endTime``), has ended: release it.  A create confirmed while the poll was
  in flight was not in the snapshot, so a list produced before the backend had
  the meeting never releases it;
- a pending reservation (its create's answer never arrived, e.g. the gateway
  died) is confirmed if listed, released if not and older than ``pending_grace``;
- a tagged meeting the ledger does not know (placed, then lost) is adopted:
  reserved again with what its tags and ``maxUsers`` say, its ``created_at``
  from the created tag (else BBB's ``createTime``; never later than the poll,
  so a backend cannot protect a meeting into the future), and clamped
  (:func:`clamped`) to what the customer's subscription and the backend's
  capacity have room for;
- a tagged meeting whose key the ledger pins to *another* backend is a stray
  copy (the meeting was re-created elsewhere while this backend was down): it
  is ended on this backend.

The caller applies each step only if the ledger still holds what the plan
saw (:func:`unchanged`): reconciliation awaits the journal between steps, and a
create may move or re-create a meeting meanwhile.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from lxml import etree

from proxy.bbb import rewrite
from proxy.bbb.numbers import parse_count
from proxy.config import Customer
from proxy.ledger.model import MeetingKey, Reservation
from proxy.voice.bridges import is_bridge

PENDING_GRACE = 60.0  # seconds a create may take before an unlisted pending one is dropped
_FLOAT = re.compile(r"[0-9]{1,16}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")


@dataclass(frozen=True, slots=True)
class Listed:
    """One tagged meeting as a backend lists it."""

    customer: str
    meeting_id: str
    backend_meeting_id: str
    asked_duration: int
    max_users: int
    created_at: float  # epoch seconds, BBB's createTime
    created_tag: float | None = None  # the reservation's created_at, from the gateway's tag
    voice_bridge: str = ""  # its conference PIN as the backend lists it ("" if not one)

    @property
    def key(self) -> MeetingKey:
        return (self.customer, self.meeting_id)

    def is_instance(self, r: Reservation) -> bool:
        """Whether this is the meeting ``r`` reserved, not another one under its ID."""
        return self.created_tag is None or self.created_tag == r.created_at


@dataclass(frozen=True, slots=True)
class Plan:
    release: tuple[Reservation, ...] = ()  # as pinned when the poll was sent
    confirm: tuple[Reservation, ...] = ()
    adopt: tuple[Reservation, ...] = ()  # unclamped; see clamped()
    end: tuple[Listed, ...] = ()  # stray copies of meetings pinned to another backend


def listed_meetings(root: etree._Element) -> list[Listed]:
    """The gateway-tagged meetings in a getMeetings answer that have not ended."""
    found = []
    for meeting in root.iterfind("meetings/meeting"):
        owner = rewrite.meeting_owner(meeting)
        if owner is None:
            continue
        if _has_ended(meeting):  # BBB lists an ended meeting for a while: it holds nothing
            continue
        found.append(
            Listed(
                customer=owner[0],
                meeting_id=owner[1],
                backend_meeting_id=meeting.findtext("meetingID") or "",
                asked_duration=owner[2],
                max_users=parse_count(meeting.findtext("maxUsers")),  # clamped on adoption
                created_at=parse_count(meeting.findtext("createTime")) / 1000,
                created_tag=_created_tag(meeting),
                voice_bridge=_voice_bridge(meeting),
            )
        )
    return found


def plan(
    backend_id: str,
    pinned: Iterable[Reservation],
    listed: Iterable[Listed],
    current: Callable[[MeetingKey], Reservation | None],
    customers: Mapping[str, Customer],
    polled_at: float,
    pending_grace: float = PENDING_GRACE,
) -> Plan:
    """What to change so that the ledger agrees with ``backend_id``'s list.

    ``pinned`` is what the ledger pinned to ``backend_id`` when the poll was
    sent; ``current`` looks a key up in the ledger as it is now.
    """
    on_backend = {m.backend_meeting_id: m for m in listed}
    release, confirm = [], []
    for r in pinned:
        seen = on_backend.get(r.backend_meeting_id)
        if seen is not None and seen.is_instance(r):
            if not r.confirmed:
                confirm.append(r)
        elif r.confirmed or r.created_at < polled_at - pending_grace:
            release.append(r)
    adopt, end = [], []
    for m in sorted(on_backend.values(), key=lambda m: m.created_tag or m.created_at):
        known = current(m.key)
        if known is None:
            adopt.append(_adopted(backend_id, m, customers.get(m.customer), polled_at))
        elif known.backend_id != backend_id:
            end.append(m)
    return Plan(tuple(release), tuple(confirm), tuple(adopt), tuple(end))


def unchanged(now: Reservation | None, seen: Reservation) -> bool:
    """Whether the ledger still holds exactly the reservation a plan was made from."""
    return now == seen


def clamped(r: Reservation, customer_room: int, backend_room: int) -> Reservation | None:
    """An adopted reservation cut down to the room left; None if there is none.

    A backend's word (``maxUsers``, how many tagged meetings it lists) is not
    allowed to take more than the customer's subscription and the backend's
    capacity have free, so a misbehaving backend cannot lock a customer out.
    """
    size = min(r.connections, customer_room, backend_room)
    if size < 1:
        return None
    return r if size == r.connections else replace(r, connections=size)


def _adopted(backend_id: str, m: Listed, customer: Customer | None, now: float) -> Reservation:
    """A reservation for a listed meeting; its window starts no later than ``now``."""
    default_size = customer.default_max_participants if customer else 1
    default_duration = customer.default_duration if customer else 0
    return Reservation(
        customer=m.customer,
        meeting_id=m.meeting_id,
        backend_id=backend_id,
        backend_meeting_id=m.backend_meeting_id,
        connections=m.max_users or default_size,
        duration=m.asked_duration or default_duration,
        asked_duration=m.asked_duration,
        created_at=min(now, m.created_tag if m.created_tag is not None else m.created_at),
        confirmed=True,
        voice_bridge=m.voice_bridge,  # held again, so no new meeting is given it
    )


def _voice_bridge(meeting: etree._Element) -> str:
    bridge = (meeting.findtext("voiceBridge") or "").strip()
    return bridge if is_bridge(bridge) else ""


def _created_tag(meeting: etree._Element) -> float | None:
    """The gateway's created tag (``repr`` of a float), or None if absent or malformed."""
    metadata = meeting.find("metadata")
    text = (metadata.findtext(rewrite.CREATED_TAG) if metadata is not None else None) or ""
    text = text.strip()
    if not _FLOAT.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _has_ended(meeting: etree._Element) -> bool:
    forced = (meeting.findtext("hasBeenForciblyEnded") or "").strip() == "true"
    return forced or parse_count(meeting.findtext("endTime")) > 0
