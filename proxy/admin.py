"""The operator API (``/admin/v1``): JSON, bearer token, secrets never shown.

``[proxy] admin_token`` turns it on; with no token every admin path is 404.

    GET  /admin/v1/backends            every backend: mode, health, reserved connections
    POST /admin/v1/backends/{id}       {"mode": "active" | "drain" | "disabled"}
    GET  /admin/v1/customers           every customer: limits and reserved connections
    GET  /admin/v1/meetings[?customer=ID]   reservations held in the ledger

A mode set here lasts until restart; the config file's ``mode`` is the lasting one.
"""

from __future__ import annotations

import hmac
from typing import Any

from proxy.config import BACKEND_MODES
from proxy.gateway import Gateway
from proxy.ledger.model import Reservation


def authorised(gw: Gateway, header: str | None) -> bool:
    token = gw.config.proxy.admin_token
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode())


def backends(gw: Gateway) -> list[dict[str, Any]]:
    return [
        {
            "id": b.id,
            "url": b.url,
            "capacity": b.capacity,
            "mode": gw.modes[b.id],
            "health": gw.health[b.id].state.value,
            "accepts_meetings": gw.accepts_meetings(b.id),
            "reserved_connections": gw.ledger.state.backend_used(b.id),
        }
        for b in gw.config.backends
    ]


def set_mode(gw: Gateway, backend_id: str, mode: object) -> str | None:
    """Change a backend's mode; an error message, or None when done."""
    if backend_id not in gw.modes:
        return "unknown backend"
    if mode not in BACKEND_MODES:
        return f"mode must be one of {', '.join(BACKEND_MODES)}"
    gw.modes[backend_id] = str(mode)
    return None


def customers(gw: Gateway) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "enabled": c.enabled,
            "max_connections": c.max_connections,
            "default_max_participants": c.default_max_participants,
            "default_duration": c.default_duration,
            "hosts": list(c.hosts),
            "secrets": len(c.secrets),  # how many are valid, never which
            "reserved_connections": gw.ledger.state.customer_used(c.id),
        }
        for c in gw.config.customers
    ]


def meetings(gw: Gateway, customer: str | None) -> list[dict[str, Any]]:
    held = gw.ledger.state.customer_meetings(customer) if customer else list(gw.ledger.state)
    now = gw.ledger.clock()
    return [_meeting(r, now) for r in held]


def _meeting(r: Reservation, now: float) -> dict[str, Any]:
    return {
        "customer": r.customer,
        "meeting_id": r.meeting_id,
        "backend": r.backend_id,
        "connections": r.connections,
        "duration_minutes": r.duration,
        "created_at": r.created_at,
        "reserved_until": r.reserved_until,
        "overtime": r.overtime(now),
        "confirmed": r.confirmed,
    }
