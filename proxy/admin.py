"""The operator API, ``/admin/v1``: JSON, a bearer token, secrets shown only where asked.

``[proxy] admin_token`` turns it on.  A wrong or missing token is ``404`` for every path
and method, as is an unknown path; bad input is ``400`` with ``{"error", "field"}``
naming the field; an unknown id is ``404``; a change the current state forbids (a
customer with running meetings, the last backend) is ``409``; a change that cannot be
made durable is ``503``.  Changes take effect at once and survive restarts
(:mod:`proxy.runtime_service`).

    GET    /customers                     GET|PATCH|DELETE /customers/{id}
    POST   /customers                     POST /customers/{id}/secrets  (rotation)
    GET    /customers/{id}/credentials    GET  /customers/{id}/timeline
    POST   /customers/{id}/admins  (invite a customer administrator)   GET /customers/{id}/admins
    DELETE /customers/{id}/admins/{email}
    GET    /backends    POST /backends    GET|PATCH|DELETE /backends/{id}
    GET    /meetings?customer=&backend=   GET|DELETE /meetings/{customer}/{meetingID}
    GET    /status

Only two answers hold a secret: the POST that creates a customer (or rotates its secret),
which shows the new one once, and ``credentials``.  Log lines name what changed, never a
value.  This module knows nothing of the web framework: :func:`handle` takes the method,
path, query and body and returns the status and the JSON document.
"""

from __future__ import annotations

import hmac
import logging
import secrets as tokens
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import admin_views as views
from proxy.backends.monitor import supervised_poll
from proxy.errors import StorageUnavailable
from proxy.gateway import Gateway
from proxy.portal.service import PortalService, Refusal, check_email
from proxy.runtime import (
    DEFAULT_GRACE,
    FIELDS,
    check_field,
    check_id,
    customer_fields,
    rotated,
)
from proxy.runtime_service import RuntimeService

log = logging.getLogger(__name__)

type Result = tuple[int, object]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]  # the web layer routes these here


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    parts: tuple[str, ...]  # the path after /admin/v1/, split at "/"
    query: Mapping[str, str]
    body: bytes


class Refused(Exception):
    """An answer other than 200: status, message and the field at fault."""

    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field = status, error, field


def authorised(gw: Gateway, header: str | None) -> bool:
    """Whether ``header`` is ``Bearer <admin_token>``, compared in constant time."""
    token = gw.config.proxy.admin_token
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode())


async def handle(gw: Gateway, call: Call) -> Result:
    """The answer to one authorised admin request.  Error handling: raises nothing a
    request can cause; every refusal is its status with ``{"error", "field"}``."""
    try:
        return await _route(gw, call)
    except Refused as refused:
        return refused.status, {"error": refused.error, "field": refused.field}
    except StorageUnavailable:
        return 503, {"error": "the change could not be made durable (state_dir)", "field": None}


async def _route(gw: Gateway, call: Call) -> Result:
    handler = ROUTES.get((call.method, *_shape(call.parts)))
    if handler is None:
        raise Refused(404, "not found")
    return await handler(gw, call)


def _shape(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The route of a path: ids replaced by ``{}`` (a meetingID may hold "/")."""
    if parts[:1] == ("meetings",) and len(parts) >= 3:
        return ("meetings", "{}", "{}")
    if parts[:1] == ("customers",) and len(parts) == 4 and parts[2] == "admins":
        return ("customers", "{}", "admins", "{}")
    if parts[:1] in (("customers",), ("backends",)) and len(parts) >= 2 and parts[1]:
        return (parts[0], "{}", *parts[2:])
    return parts


# -- customers ---------------------------------------------------------------------------------


async def list_customers(gw: Gateway, call: Call) -> Result:
    return 200, [views.customer(gw, c.id) for c in gw.customers()]


async def show_customer(gw: Gateway, call: Call) -> Result:
    return 200, views.customer(gw, _known_customer(gw, call.parts[1]))


async def create_customer(gw: Gateway, call: Call) -> Result:
    body = _object(call.body)
    _only(body, {"id", "secret", *FIELDS["customer"]} - {"secrets"})
    customer_id = _id(body)
    if gw.customer(customer_id) is not None:
        raise Refused(409, f"customer {customer_id} exists", "id")
    secret = _secret(body.get("secret"))
    given = {k: v for k, v in body.items() if k not in ("id", "secret")}
    fields = _checked(gw, "customer", customer_id, given)
    fields["secrets"] = [{"secret": secret, "expires_at": None}]
    for name in ("max_connections", "default_max_participants", "default_duration"):
        if name not in fields:
            raise Refused(400, "required", name)
    await _change(
        gw,
        {"op": "create", "kind": "customer", "id": customer_id, "fields": fields},
        "customer_created",
    )
    log.info("admin: customer %s created", customer_id)
    return 201, {**views.customer(gw, customer_id), "secret": secret}


async def update_customer(gw: Gateway, call: Call) -> Result:
    customer_id = _known_customer(gw, call.parts[1])
    body = _object(call.body)
    if "secret" in body or "secrets" in body:
        raise Refused(400, "rotate secrets with POST .../secrets", "secret")
    return await _update(gw, "customer", customer_id, body)


async def delete_customer(gw: Gateway, call: Call) -> Result:
    customer_id = _known_customer(gw, call.parts[1])
    held = gw.ledger.state.customer_meetings(customer_id)
    if held:
        raise Refused(409, f"{len(held)} meetings are running: end them first", "id")
    await _change(gw, {"op": "delete", "kind": "customer", "id": customer_id}, "customer_deleted")
    log.info("admin: customer %s deleted", customer_id)
    if gw.portal is not None:  # its administrators go with it (proxy.portal)
        await gw.portal.forget_customer(customer_id)
    return 200, {"id": customer_id, "removed": True}


async def rotate_secret(gw: Gateway, call: Call) -> Result:
    customer_id = _known_customer(gw, call.parts[1])
    body = _object(call.body or b"{}")
    _only(body, {"secret", "grace_seconds"})
    secret = _secret(body.get("secret"))
    grace = body.get("grace_seconds", DEFAULT_GRACE)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 1e9:
        raise Refused(400, "must be a number of seconds >= 0", "grace_seconds")
    current = customer_fields(_runtime(gw).directory, customer_id)
    assert current is not None  # known (checked above, no await since)
    now = gw.ledger.clock()
    fields = {"secrets": rotated(current["secrets"], secret, now, float(grace))}
    await _change(gw, _update_record("customer", customer_id, fields, []), "secret_rotated")
    log.info("admin: customer %s secret rotated (grace %ss)", customer_id, grace)
    return 201, {**views.credentials(gw, customer_id), "secret": secret}


async def invite_admin(gw: Gateway, call: Call) -> Result:
    """A one-time invitation link for a customer administrator (proxy.portal); it is
    shown once, in this answer, and kept only as a digest."""
    customer_id = _known_customer(gw, call.parts[1])
    body = _object(call.body)
    _only(body, {"email"})
    if "email" not in body:
        raise Refused(400, "required", "email")
    try:
        email = check_email(body["email"])
    except ValueError as exc:
        raise Refused(400, str(exc), "email") from None
    try:
        invited = await _portal(gw).invite(customer_id, email)
    except Refusal:
        raise Refused(409, f"{email} administers another customer", "email") from None
    gw.tally("admin_changes", "admin_invited")
    url = f"{gw.config.proxy.public_url}/portal/invitation?token={invited.token}"
    return 201, {"customer": customer_id, "email": email, "invitation_url": url,
                 "expires_at": invited.invitation.expires_at}  # fmt: skip


async def list_admins(gw: Gateway, call: Call) -> Result:
    customer_id = _known_customer(gw, call.parts[1])
    portal = _portal(gw)
    now = portal.clock()
    pending = [
        {"email": i.email, "invited_until": i.expires_at}
        for i in portal.state.invitations.values()
        if i.customer == customer_id and i.expires_at > now
    ]
    admins = [{"email": a.email} for a in portal.state.admins_of(customer_id)]
    return 200, {"customer": customer_id, "admins": admins, "invitations": pending}


async def remove_admin(gw: Gateway, call: Call) -> Result:
    """A customer administrator removed: its sessions end at once."""
    customer_id = _known_customer(gw, call.parts[1])
    portal = _portal(gw)
    email = call.parts[3].lower()
    admin = portal.state.admins.get(email)
    if admin is None or admin.customer != customer_id:
        raise Refused(404, f"no administrator {email} of customer {customer_id}", "email")
    await portal.remove(email)
    gw.tally("admin_changes", "admin_removed")
    return 200, {"customer": customer_id, "email": email, "removed": True}


def _portal(gw: Gateway) -> PortalService:
    if gw.portal is None:
        raise Refused(404, "the portal is off ([portal] enabled = false)")
    return gw.portal


async def credentials(gw: Gateway, call: Call) -> Result:
    return 200, views.credentials(gw, _known_customer(gw, call.parts[1]))


async def timeline(gw: Gateway, call: Call) -> Result:
    return 200, views.timeline(gw, _known_customer(gw, call.parts[1]))


# -- backends ----------------------------------------------------------------------------------


async def list_backends(gw: Gateway, call: Call) -> Result:
    return 200, [views.backend(gw, b.id) for b in gw.backends()]


async def show_backend(gw: Gateway, call: Call) -> Result:
    return 200, views.backend(gw, _known_backend(gw, call.parts[1]))


async def create_backend(gw: Gateway, call: Call) -> Result:
    body = _object(call.body)
    _only(body, {"id", *FIELDS["backend"]})
    backend_id = _id(body)
    if gw.backend(backend_id) is not None:
        raise Refused(409, f"backend {backend_id} exists", "id")
    fields = _checked(gw, "backend", backend_id, {k: v for k, v in body.items() if k != "id"})
    for name in ("url", "secret", "capacity"):
        if name not in fields:
            raise Refused(400, "required", name)
    await _change(
        gw,
        {"op": "create", "kind": "backend", "id": backend_id, "fields": fields},
        "backend_created",
    )
    log.info("admin: backend %s created", backend_id)
    await supervised_poll(gw, backend_id)  # as at start-up: its health is known at once
    return 201, views.backend(gw, backend_id)


async def update_backend(gw: Gateway, call: Call) -> Result:
    backend_id = _known_backend(gw, call.parts[1])
    body = _object(call.body)
    if "mode" in body and backend_id in _runtime(gw).directory.retiring:
        raise Refused(409, "the backend is being removed", "mode")
    return await _update(gw, "backend", backend_id, body)


async def delete_backend(gw: Gateway, call: Call) -> Result:
    backend_id = _known_backend(gw, call.parts[1])
    runtime = _runtime(gw)
    if len(gw.backends()) == 1:
        raise Refused(409, "the last backend cannot be removed", "id")
    held = len(gw.ledger.state.backend_meetings(backend_id))
    if not held:
        await _change(gw, {"op": "delete", "kind": "backend", "id": backend_id}, "backend_deleted")
        log.info("admin: backend %s deleted", backend_id)
        return 200, {"id": backend_id, "removed": True, "meetings": 0}
    if backend_id not in runtime.directory.retiring:
        await _change(gw, {"op": "retire", "kind": "backend", "id": backend_id}, "backend_changed")
        gw.spawn("retire-backend", runtime.remove_when_empty, gw, backend_id)
        log.info("admin: backend %s draining, removed when its %d meetings end", backend_id, held)
    return 202, {"id": backend_id, "removed": False, "meetings": held, "mode": "drain"}


# -- meetings and status -----------------------------------------------------------------------


async def list_meetings(gw: Gateway, call: Call) -> Result:
    customer, backend = call.query.get("customer"), call.query.get("backend")
    if customer is not None and gw.customer(customer) is None:
        raise Refused(404, f"no customer {customer}", "customer")
    if backend is not None and gw.backend(backend) is None:
        raise Refused(404, f"no backend {backend}", "backend")
    return 200, views.meetings(gw, customer, backend)


async def show_meeting(gw: Gateway, call: Call) -> Result:
    return 200, views.meeting(gw, _known_meeting(gw, call.parts))


async def end_meeting(gw: Gateway, call: Call) -> Result:
    key = _known_meeting(gw, call.parts)
    ended, message = await views.end_meeting(gw, key)
    if not ended:
        raise Refused(502, message)
    gw.tally("admin_changes", "meeting_ended")
    log.info("admin: meeting %s ended", key)
    return 200, {"customer": key[0], "meeting_id": key[1], "ended": True}


async def status(gw: Gateway, call: Call) -> Result:
    return 200, views.status(gw)


ROUTES: Mapping[tuple[str, ...], Callable[[Gateway, Call], Awaitable[Result]]] = {
    ("GET", "customers"): list_customers,
    ("POST", "customers"): create_customer,
    ("GET", "customers", "{}"): show_customer,
    ("PATCH", "customers", "{}"): update_customer,
    ("DELETE", "customers", "{}"): delete_customer,
    ("POST", "customers", "{}", "secrets"): rotate_secret,
    ("GET", "customers", "{}", "credentials"): credentials,
    ("GET", "customers", "{}", "timeline"): timeline,
    ("POST", "customers", "{}", "admins"): invite_admin,
    ("GET", "customers", "{}", "admins"): list_admins,
    ("DELETE", "customers", "{}", "admins", "{}"): remove_admin,
    ("GET", "backends"): list_backends,
    ("POST", "backends"): create_backend,
    ("GET", "backends", "{}"): show_backend,
    ("PATCH", "backends", "{}"): update_backend,
    ("DELETE", "backends", "{}"): delete_backend,
    ("GET", "meetings"): list_meetings,
    ("GET", "meetings", "{}", "{}"): show_meeting,
    ("DELETE", "meetings", "{}", "{}"): end_meeting,
    ("GET", "status"): status,
}


# -- input -------------------------------------------------------------------------------------


def _object(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refused(400, "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise Refused(400, "the body must be a JSON object")
    return value


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise Refused(400, f"unknown field (allowed: {', '.join(sorted(allowed))})", name)


def _id(body: Mapping[str, Any]) -> str:
    if "id" not in body:
        raise Refused(400, "required", "id")
    try:
        return check_id(body["id"])
    except (TypeError, ValueError) as exc:
        raise Refused(400, str(exc), "id") from None


def _secret(value: Any) -> str:
    """The given secret, or a new random one (48 hex digits)."""
    if value is None:
        return tokens.token_hex(24)
    if not isinstance(value, str) or len(value) < 8 or not value.isprintable() or " " in value:
        raise Refused(400, "must be at least 8 printable characters without spaces", "secret")
    return value


def _checked(gw: Gateway, kind: str, entity_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = check_field(kind, name, value)
        except (TypeError, ValueError) as exc:
            raise Refused(400, str(exc), name) from None
    for host in checked.get("hosts", []) if kind == "customer" else []:
        owner = gw.config.customer_for_host(host)
        if owner is not None and owner.id != entity_id:
            raise Refused(400, f"host {host} belongs to customer {owner.id}", "hosts")
    return checked


async def _update(gw: Gateway, kind: str, entity_id: str, body: dict[str, Any]) -> Result:
    """PATCH: the fields given are set; a field given as null goes back to the file's value."""
    if "id" in body:
        raise Refused(400, "an id cannot be changed", "id")
    _only(body, set(FIELDS[kind]) - {"secrets"})
    if not body:
        raise Refused(400, "nothing to change")
    reset = [name for name, value in body.items() if value is None]
    entry = _runtime(gw).state.entry(kind, entity_id)
    if reset and (entity_id not in _file_ids(gw, kind) or (entry is not None and entry.created)):
        raise Refused(400, "no value in the configuration file to go back to", reset[0])
    fields = _checked(gw, kind, entity_id, {k: v for k, v in body.items() if v is not None})
    await _change(gw, _update_record(kind, entity_id, fields, reset), f"{kind}_changed")
    log.info("admin: %s %s changed (%s)", kind, entity_id, ", ".join(sorted(body)))
    show = views.customer if kind == "customer" else views.backend
    return 200, show(gw, entity_id)


def _file_ids(gw: Gateway, kind: str) -> set[str]:
    file = _runtime(gw).file
    return {c.id for c in file.customers} if kind == "customer" else {b.id for b in file.backends}


def _update_record(
    kind: str, entity_id: str, fields: Mapping[str, Any], reset: list[str]
) -> dict[str, Any]:
    return {"op": "update", "kind": kind, "id": entity_id, "fields": dict(fields), "reset": reset}


async def _change(gw: Gateway, record: Mapping[str, Any], label: str) -> None:
    try:
        await _runtime(gw).change(gw, record, label)
    except ValueError as exc:  # a host another customer has
        raise Refused(400, str(exc), "hosts") from None


def _runtime(gw: Gateway) -> RuntimeService:
    if gw.runtime is None:
        raise Refused(503, "runtime changes are not available in this process")
    return gw.runtime


def _known_customer(gw: Gateway, customer_id: str) -> str:
    if gw.config.customer(customer_id) is None:
        raise Refused(404, f"no customer {customer_id}", "id")
    return customer_id


def _known_backend(gw: Gateway, backend_id: str) -> str:
    if gw.backend(backend_id) is None:
        raise Refused(404, f"no backend {backend_id}", "id")
    return backend_id


def _known_meeting(gw: Gateway, parts: tuple[str, ...]) -> tuple[str, str]:
    key = (parts[1], "/".join(parts[2:]))
    if gw.ledger.get(key) is None:
        raise Refused(404, f"no meeting {key[1]} of customer {key[0]}", "meetingID")
    return key
