"""A backend's meeting-ended notice: free the connections, then tell the customer.

The notice comes to the signed URL of :mod:`proxy.bbb.callbacks`.  The
reservation is released before anything else, and only if the ledger still
holds the very meeting instance the notice was made for
(:func:`proxy.bbb.callbacks.releases`): Moodle ends a meeting and creates it
again at once, and the old meeting's notice, arriving after that, must not free
the new one.  The customer's own ``meetingEndedURL`` / ``endCallbackUrl`` are
then called in the background, as BBB would have called them, whether or not
anything was released (a customer's ``end`` call usually released it first).
"""

from __future__ import annotations

import logging

from proxy.backends.outbound import call_customer_url
from proxy.bbb import callbacks
from proxy.errors import ProxyError, StateError
from proxy.gateway import Gateway

log = logging.getLogger(__name__)


async def meeting_ended(gw: Gateway, raw_query: str) -> bool:
    """Handle one notice; False if it is not signed by the gateway for a known backend.

    Error handling: never raises for what the caller sent.  A release the journal
    cannot make durable is logged; the notice is still answered as handled.
    """
    backends = {b.id: b for b in gw.backends()}
    notice = callbacks.verify(raw_query, backends)
    if notice is None:
        return False
    try:
        await _release(gw, notice)
    except (StateError, ProxyError) as exc:
        log.error("meeting-ended notice for %s: release not durable: %s", notice.meeting_id, exc)
    allow = gw.config.proxy.allow_private_callbacks
    for url in callbacks.calls_for(notice):
        gw.spawn("customer-url", call_customer_url, gw.outbound, url, allow)
    return True


async def _release(gw: Gateway, notice: callbacks.EndNotice) -> None:
    held = gw.ledger.state.by_backend_meeting(notice.backend_id, notice.backend_meeting_id)
    if held is None and gw.ledger.shared:  # created on another instance a moment ago?
        await gw.ledger.refresh()
        held = gw.ledger.state.by_backend_meeting(notice.backend_id, notice.backend_meeting_id)
    if held is None:
        return  # not in the ledger: nothing to change
    if not callbacks.releases(notice, held.created_at):
        log.info("end notice of another instance of %s on %s: ignored", held.key, held.backend_id)
        return
    log.info("meeting %s ended on %s", held.key, notice.backend_id)
    await gw.ledger.release(held.key, "ended")
    await gw.hooks.meeting_ended(*held.key)  # its hooks expire a grace later
