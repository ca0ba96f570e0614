"""What the admin API shows: JSON documents built from the gateway's state, no secrets.

Every document here is safe to log or print: it holds how many secrets a customer has
and when the rotated-out ones expire, never a secret, except :func:`credentials`, the
one view that exists to show them.
"""

from __future__ import annotations

from typing import Any

from proxy.calls import meetings as meeting_calls
from proxy.calls import result_of
from proxy.errors import NotFound, ProxyError, StorageUnavailable
from proxy.gateway import Gateway
from proxy.ledger.model import MeetingKey, Reservation
from proxy.request import ApiRequest


def customer(gw: Gateway, customer_id: str) -> dict[str, Any]:
    """A customer's settings, where each came from, and what it holds now."""
    c = gw.config.customer(customer_id)
    valid = gw.customer(customer_id)
    assert c is not None and valid is not None and gw.directory is not None
    expiries = gw.directory.expiries.get(customer_id, {})
    return {
        "id": c.id,
        "enabled": c.enabled,
        "max_connections": c.max_connections,
        "default_max_participants": c.default_max_participants,
        "default_duration": c.default_duration,
        "hosts": list(c.hosts),
        "default_tags": list(c.default_tags),
        "required_tags": list(c.required_tags),
        "secrets": len(valid.secrets),  # how many are valid, never which
        "secrets_expire_at": sorted(expiries[s] for s in valid.secrets if s in expiries),
        "meetings": len(gw.ledger.state.customer_meetings(customer_id)),
        "reserved_connections": gw.ledger.state.customer_used(customer_id),
        "source": dict(gw.directory.source("customer", customer_id)),
    }


def credentials(gw: Gateway, customer_id: str) -> dict[str, Any]:
    """The API URLs and the secrets valid now: what the customer configures its front-end with."""
    valid = gw.customer(customer_id)
    assert valid is not None and gw.directory is not None
    expiries = gw.directory.expiries.get(customer_id, {})
    public = gw.config.proxy.public_url
    scheme = public.split("://", 1)[0]
    return {
        "id": customer_id,
        "api_url": f"{public}/{customer_id}/bigbluebutton/api",
        "host_api_urls": [f"{scheme}://{h}/bigbluebutton/api" for h in valid.hosts],
        "secrets": [{"secret": s, "expires_at": expiries.get(s)} for s in valid.secrets],
    }


def backend(gw: Gateway, backend_id: str) -> dict[str, Any]:
    """A backend's settings (not its secret), where each came from, health and load."""
    b = gw.backend(backend_id)
    assert b is not None and gw.directory is not None
    return {
        "id": b.id,
        "url": b.url,
        "capacity": b.capacity,
        "checksum_algorithm": b.checksum_algorithm,
        "mode": gw.modes[b.id],
        "tags": list(b.tags),
        "removing": b.id in gw.directory.retiring,
        "health": gw.health[b.id].state.value,
        "accepts_meetings": gw.accepts_meetings(b.id),
        "meetings": len(gw.ledger.state.backend_meetings(b.id)),
        "reserved_connections": gw.ledger.state.backend_used(b.id),
        "source": dict(gw.directory.source("backend", b.id)),
    }


def meetings(gw: Gateway, customer_id: str | None, backend_id: str | None) -> list[dict[str, Any]]:
    state = gw.ledger.state
    held = state.customer_meetings(customer_id) if customer_id else list(state)
    now = gw.ledger.clock()
    return [meeting_view(r, now) for r in held if backend_id in (None, r.backend_id)]


def meeting(gw: Gateway, key: MeetingKey) -> dict[str, Any]:
    r = gw.ledger.get(key)
    assert r is not None
    return meeting_view(r, gw.ledger.clock())


def meeting_view(r: Reservation, now: float) -> dict[str, Any]:
    return {
        "customer": r.customer,
        "meeting_id": r.meeting_id,
        "backend": r.backend_id,
        "connections": r.connections,
        "duration_minutes": r.duration,
        "created_at": r.created_at,
        "reserved_until": r.reserved_until,
        "overtime": r.overtime(now),
        "overtime_seconds": max(0.0, now - r.reserved_until),
        "confirmed": r.confirmed,
    }


def timeline(gw: Gateway, customer_id: str) -> dict[str, Any]:
    """The customer's reservations: each one's window and overtime, and its connections
    over time as steps (``held``: by the meetings running now, as long as they run;
    ``in_window``: only within their reserved windows)."""
    c = gw.config.customer(customer_id)
    assert c is not None
    now = gw.ledger.clock()
    held = sorted(gw.ledger.state.customer_meetings(customer_id), key=lambda r: r.created_at)
    steps = sorted({now} | {r.created_at for r in held} | {r.reserved_until for r in held})
    return {
        "customer": customer_id,
        "now": now,
        "max_connections": c.max_connections,
        "reserved_connections": gw.ledger.state.customer_used(customer_id),
        "meetings": [meeting_view(r, now) for r in held],
        "connections": [
            {
                "at": t,
                "held": sum(r.connections for r in held if r.created_at <= t),
                "in_window": sum(
                    r.connections for r in held if r.created_at <= t < r.reserved_until
                ),
            }
            for t in steps
        ],
    }


def status(gw: Gateway) -> dict[str, Any]:
    """Every backend (health, mode, meetings, reserved, capacity) and the totals."""
    rows = [backend(gw, b.id) for b in gw.backends()]
    for row in rows:
        del row["source"]
    return {
        "backends": rows,
        "totals": {
            "backends": len(rows),
            "accepting": sum(1 for r in rows if r["accepts_meetings"]),
            "down": sum(1 for r in rows if r["health"] == "down"),
            "meetings": len(gw.ledger.state),
            "reserved_connections": sum(r["reserved_connections"] for r in rows),
            "capacity": sum(r["capacity"] for r in rows),
            "customers": len(gw.customers()),
        },
        "journal_failed": gw.ledger.journal.failed,
        "runtime_store_failed": gw.runtime.log.failed if gw.runtime is not None else False,
    }


async def end_meeting(gw: Gateway, key: MeetingKey) -> tuple[bool, str]:
    """End a meeting on its backend and free its connections, as the customer's ``end``
    does (:func:`proxy.calls.meetings.end`); (ended, why not)."""
    owner = gw.config.customer(key[0])
    if owner is None:  # its customer was removed: the backend's end is still ours to send
        return False, f"no customer {key[0]}"
    request = ApiRequest(owner, "end", [("meetingID", key[1])])
    try:
        answer = await meeting_calls.end(gw, request)
    except NotFound:
        return True, ""  # ended meanwhile
    except StorageUnavailable:
        raise
    except ProxyError as error:
        return False, f"{error.message_key}: {error.message}"
    result = result_of(answer)
    return result in ("success", "notFound"), result
