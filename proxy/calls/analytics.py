"""Analytics callbacks: received from a backend, delivered to the customer, durably.

The rules (the gateway's URL, the JWTs, the customer's document) are in
:mod:`proxy.bbb.analytics`; the queue is the recording-ready callback's
(:class:`proxy.calls.recording_ready.ReadyQueue`) on its own log, "analytics", with the
same durability (journaled before the backend gets its 200), outcomes, retries with
backoff and SSRF checks; only the POST differs (JSON with a bearer JWT, as BBB sends it).

Error handling: :meth:`AnalyticsQueue.accept` never raises for what a backend sends
(403 for a URL the gateway did not sign, 401 for a JWT or document that is not genuine,
503 when the log cannot write); a delivery that fails is retried, as recording-ready's.
"""

from __future__ import annotations

import logging
import time

from quart import Response, request
from quart_trio import QuartTrio

from proxy.backends.outbound import post_json
from proxy.bbb import analytics as rules
from proxy.bbb import recording_ready
from proxy.calls.recording_ready import ReadyQueue
from proxy.gateway import Gateway

log = logging.getLogger(__name__)
LOG = "analytics"


class AnalyticsQueue(ReadyQueue):
    """The analytics deliveries still to make (a :class:`ReadyQueue` on "analytics")."""

    LOG_NAME = LOG
    LEGACY_FILE = None
    TALLY = "analytics_deliveries"

    async def accept(self, raw_query: str, authorization: str | None, body: bytes) -> int:
        """One backend callback; the HTTP status to answer (200, 401, 403 or 503)."""
        backends = {b.id: b for b in self._gw.backends()}
        target = recording_ready.verify_url(raw_query, backends, rules.PURPOSE)
        if target is None:
            return 403
        backend = backends[target.backend_id]
        document = rules.backend_document(rules.bearer(authorization), body, backend, target)
        if document is None:
            log.warning("analytics callback from %s: JWT or document refused", backend.id)
            return 401
        own = recording_ready.signed_url(
            self._gw.config.proxy.public_url,
            rules.PATH,
            backend,
            (target.customer, target.meeting_id, target.url),
            rules.PURPOSE,
        )
        delivery = recording_ready.Delivery(
            f"{target.customer}/analytics/{time.time_ns()}",
            target.url,
            target.customer,
            target.meeting_id,
            record_id="",
            body=rules.customer_document(document, target, own).decode("utf-8"),
        )
        return await self._queued(delivery)

    async def _post(self, delivery: recording_ready.Delivery, secret: str) -> int | None:
        token = rules.customer_token(secret, delivery.meeting_id, time.time())
        allow = self._gw.config.proxy.allow_private_callbacks
        body = delivery.body.encode("utf-8")
        return await post_json(self._gw.outbound, delivery.url, body, token, allow)


def install(app: QuartTrio, gw: Gateway) -> AnalyticsQueue:
    """The receiving route and the delivery task (resumed from the log at start-up)."""
    queue = AnalyticsQueue.open(gw)

    @app.before_serving
    async def deliver_analytics() -> None:
        gw.spawn("analytics", queue.deliver_forever)

    @app.route(rules.PATH, methods=["POST"])
    async def analytics_callback() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        query = request.query_string.decode("utf-8", "replace")
        status = await queue.accept(query, request.headers.get("Authorization"), body)
        gw.tally("analytics_callbacks", _ANSWERS.get(status, "other"))
        return Response(f"{status}\n", status, content_type="text/plain")

    return queue


_ANSWERS = {200: "accepted", 401: "bad_jwt", 403: "unsigned_url", 503: "not_durable"}
