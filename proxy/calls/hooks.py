"""hooks/create, hooks/list and hooks/destroy: a customer's hooks, answered by the gateway.

The backends' own webhooks services never see these calls: the gateway keeps
the customers' hooks itself (:mod:`proxy.webhooks.registry`) and has one hook
of its own on each backend.  The parameters and answers are bbb-webhooks'
(:mod:`proxy.bbb.hooks`); a customer sees and destroys only its own hooks.

A callback URL must reach a public address: its host is resolved at create,
and a URL whose host does not resolve, or resolves to any loopback, private,
link-local, multicast or otherwise non-public address, is refused at once
(``createHookError``), unless ``[proxy] allow_private_callbacks`` or
``[webhooks] allowed_callback_networks`` allows it.  Delivery checks the
address it connects to again (a name may resolve differently later).

Error handling: the handlers raise ``ValidationError`` (with bbb-webhooks'
``messageKey``) and ``StorageUnavailable``; :func:`proxy.calls.handle` turns
them into BBB's envelope.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import trio

from proxy.backends.outbound import checked_address
from proxy.bbb import hooks
from proxy.bbb.customer_urls import ascii_host, port_of
from proxy.gateway import Gateway
from proxy.request import Answer, ApiRequest

RESOLVE_TIMEOUT = 5.0  # seconds a callback host may take to resolve at hooks/create


async def create(gw: Gateway, req: ApiRequest) -> Answer:
    params = hooks.create_params(req.params)
    meeting_id = _meeting_id(req)
    await _check_reachable(gw, params.callback_url)
    hook, duplicated = await gw.hooks.create(
        req.customer.id, meeting_id, params.callback_url, params.event_ids, req.algorithm
    )
    return Answer.xml(hooks.duplicated(hook.id) if duplicated else hooks.created(hook.id))


async def list_hooks(gw: Gateway, req: ApiRequest) -> Answer:
    meeting_id = (req.first("meetingID") or "").strip() or None
    await gw.hooks.refresh()  # hooks other gateway instances made (on Redis), as of now
    return Answer.xml(hooks.listed(gw.hooks.listed(req.customer.id, meeting_id)))


async def destroy(gw: Gateway, req: ApiRequest) -> Answer:
    if not await gw.hooks.destroy(req.customer.id, hooks.hook_id(req.params)):
        raise hooks.missing_hook()
    return Answer.xml(hooks.destroyed())


def _meeting_id(req: ApiRequest) -> str:
    """Required here (BBB's message would not say why); then checked as bbb-web checks it."""
    if not (req.first("meetingID") or "").strip():
        raise hooks.missing_meeting_id()
    return hooks.checked_meeting_id(req.meeting_id())


async def _check_reachable(gw: Gateway, url: str) -> None:
    """Resolve the callback host now: a non-public address is refused at create."""
    parts = urlsplit(url)
    host, port = ascii_host(parts.hostname or ""), port_of(parts)
    allow = gw.config.proxy.allow_private_callbacks
    networks = gw.config.webhooks.allowed_callback_networks
    address = None
    with trio.move_on_after(RESOLVE_TIMEOUT):
        address = await checked_address(host, port, allow, networks)
    if address is None:
        raise hooks.unreachable("its host does not resolve to public addresses only")
