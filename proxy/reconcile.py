"""Comparing the ledger with what a backend says it runs, without I/O.

Given the meetings a backend listed (``getMeetings``, fetched starting at
``polled_at``) and the reservations the ledger pins to it:

- a confirmed reservation the backend no longer lists, or lists as ended
  (``hasBeenForciblyEnded``, a non-zero ``endTime``), has ended: release it.
  Only reservations made before the poll was sent count, so a create that
  raced the poll is never mistaken for an ended meeting;
- a pending reservation (its create's answer never arrived, e.g. the gateway
  died) is confirmed if listed, released if not and older than ``pending_grace``;
- a meeting the gateway tagged but the ledger does not know (placed, then
  lost) is adopted: reserved again with what its tags and ``maxUsers`` say.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from lxml import etree

from proxy.bbb import rewrite
from proxy.config import Customer
from proxy.ledger.model import MeetingKey, Reservation

PENDING_GRACE = 60.0  # seconds a create may take before an unlisted pending one is dropped


@dataclass(frozen=True, slots=True)
class Listed:
    """One tagged meeting as a backend lists it."""

    customer: str
    meeting_id: str
    backend_meeting_id: str
    asked_duration: int
    max_users: int
    created_at: float  # epoch seconds


@dataclass(frozen=True, slots=True)
class Plan:
    release: tuple[MeetingKey, ...] = ()
    confirm: tuple[MeetingKey, ...] = ()
    adopt: tuple[Reservation, ...] = ()


def listed_meetings(root: etree._Element) -> list[Listed]:
    """The gateway-tagged meetings in a getMeetings answer."""
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
                max_users=_int(meeting.findtext("maxUsers")),
                created_at=_int(meeting.findtext("createTime")) / 1000,
            )
        )
    return found


def plan(
    backend_id: str,
    pinned: Iterable[Reservation],
    listed: Iterable[Listed],
    known: Callable[[MeetingKey], Reservation | None],
    customers: Mapping[str, Customer],
    polled_at: float,
    pending_grace: float = PENDING_GRACE,
) -> Plan:
    """What to change so that the ledger agrees with ``backend_id``'s list."""
    on_backend = {m.backend_meeting_id: m for m in listed}
    release, confirm = [], []
    for r in pinned:
        if r.backend_meeting_id in on_backend:
            if not r.confirmed:
                confirm.append(r.key)
        elif r.created_at < polled_at - (0 if r.confirmed else pending_grace):
            release.append(r.key)
    adopt = [
        _adopted(backend_id, m, customers.get(m.customer))
        for m in on_backend.values()
        if known((m.customer, m.meeting_id)) is None
    ]
    return Plan(tuple(release), tuple(confirm), tuple(adopt))


def _adopted(backend_id: str, m: Listed, customer: Customer | None) -> Reservation:
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
        created_at=m.created_at,
        confirmed=True,
    )


def _has_ended(meeting: etree._Element) -> bool:
    forced = (meeting.findtext("hasBeenForciblyEnded") or "").strip() == "true"
    return forced or _int(meeting.findtext("endTime")) > 0


def _int(text: str | None) -> int:
    text = (text or "").strip()
    return int(text) if text.isdigit() else 0
