"""A backend's meeting-ended notice: free the connections, then tell the customer.

The notice comes to the signed URL of :mod:`proxy.bbb.callbacks`.  The
reservation is released before anything else; the customer's own
``meetingEndedURL`` / ``endCallbackUrl`` are then called in the background,
as BBB would have called them.
"""

from __future__ import annotations

import logging

from proxy.backends.outbound import call_customer_url
from proxy.bbb import callbacks
from proxy.gateway import Gateway

log = logging.getLogger(__name__)


async def meeting_ended(gw: Gateway, raw_query: str) -> bool:
    """Handle one notice; False if it is not signed by the gateway for a known backend."""
    backends = {b.id: b for b in gw.config.backends}
    notice = callbacks.verify(raw_query, backends)
    if notice is None:
        return False
    reservation = gw.ledger.state.by_backend_meeting(notice.backend_id, notice.backend_meeting_id)
    if reservation is not None:
        log.info("meeting %s ended on %s", reservation.key, notice.backend_id)
        await gw.ledger.release(reservation.key, "ended")
    allow = gw.config.proxy.allow_private_callbacks
    for url in callbacks.calls_for(notice):
        gw.spawn("customer-url", call_customer_url, gw.outbound, url, allow)
    return True
