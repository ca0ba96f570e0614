"""Event intake: the gateway's own hook on every backend, and the endpoint events come to.

**Registration.**  bbb-webhooks forgets its hooks when it restarts without its redis and
deletes a hook whose callbacks kept failing (bbb-api.md §3), so registering once is not
enough.  :meth:`Intake.keep_registered` (a supervised background task) watches every
backend in service: when it is first seen not DOWN (start-up, a backend added at run
time), when it comes back from DOWN (the monitor tells :meth:`Intake.backend_back`), and
every ``[webhooks] backend_hook_check`` seconds while it is not DOWN (with several
instances on one Redis: by the instance holding the backend's poll lease only,
:mod:`proxy.backends.cluster`), it asks the
backend's ``hooks/list`` and, when the gateway's hook
(:func:`~proxy.webhooks.mapping.intake_url`) is not among them, ``hooks/create``\\s it:
global (no meetingID), mapped events (``getRaw=false``).  A hook of this gateway with
an outdated URL (the backend's secret changed) is destroyed.  bbb-webhooks answers a
create of a URL it has with ``duplicateWarning`` and the old hook, so a create that
crosses another is harmless.

**The endpoint** ``POST /callbacks/v1/webhook-events`` (:meth:`Intake.receive`): the
backend's checksum and the URL's token are checked (else 403); the form and its JSON are
read boundedly (:func:`~proxy.webhooks.mapping.parse_events`; a genuine POST that cannot
be read is answered 200 and counted, as retrying it would not help); each event is mapped
to the customer's meeting (:func:`~proxy.webhooks.mapping.owner_of`,
:func:`~proxy.webhooks.mapping.for_customer`), events of meetings the gateway did not
place are dropped and counted; then the events of each meeting go to
``gw.webhooks.accept`` (privacy filter, matching hooks, durable queue).  200 only once
every accept has returned: the events are durable.  A queue that cannot write
(``StorageUnavailable``) is 503, and bbb-webhooks sends the event again.

Counted in ``gw.tally("webhook_events_in", <outcome>)`` (accepted, unknown_meeting,
invalid, bad_checksum, not_durable) and ``gw.tally("webhook_backend_hooks", <outcome>)``
(present, registered, failed).

Error handling: nothing a backend sends raises here; a backend that fails a list or a
create is logged and tried again at the next check.  The intake URL carries a token
derived from the backend's secret: it is never logged.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlsplit

import trio
from lxml import etree
from quart import Response, request
from quart_trio import QuartTrio

from proxy.config import Backend
from proxy.errors import BackendError, StorageUnavailable
from proxy.gateway import Gateway
from proxy.health import State
from proxy.webhooks import mapping
from proxy.webhooks.mapping import PATH, Event, Owner, Recent

log = logging.getLogger(__name__)

SECONDS = 1.0
WATCH_INTERVAL = 1 * SECONDS  # how often health is looked at for backends coming back
MAX_BODY = 1024 * 1024  # one POST (bbb-webhooks sends one event, a few KiB)
EVENTS_IN = "webhook_events_in"
BACKEND_HOOKS = "webhook_backend_hooks"


class Intake:
    """The gateway's side of every backend's webhooks service."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.recent = Recent()
        self._ensuring: set[str] = set()  # backends being checked right now
        self._ledger = mapping.Ledger(placed=self._placed, backend_of=self._backend_of)

    # -- receiving ----------------------------------------------------------------------------

    async def receive(self, raw_query: str, body: bytes, authorization: str | None = None) -> int:
        """Handle one POST from a backend; the HTTP status to answer (module docstring)."""
        backends = {b.id: b for b in self.gw.backends()}
        public_url = self.gw.config.proxy.public_url
        backend = mapping.verify(raw_query, body, public_url, backends, authorization)
        if backend is None:
            self.gw.tally(EVENTS_IN, "bad_checksum")
            return 403
        events = mapping.parse_events(body)
        if events is None:
            log.warning("webhook POST from %s that is not bbb-webhooks' form: dropped", backend.id)
            self.gw.tally(EVENTS_IN, "invalid")
            return 200
        return await self._accept_all(self.by_meeting(backend.id, events))

    def by_meeting(
        self, backend_id: str, events: list[Event]
    ) -> dict[tuple[str, str], list[Event]]:
        """The events the customers' meetings get, rewritten, by (customer, meetingID), in
        order; the others dropped and counted."""
        customers = {c.id for c in self.gw.customers()}
        groups: dict[tuple[str, str], list[Event]] = {}
        for event in events:
            owner = mapping.owner_of(event, backend_id, self._ledger, self.recent, customers)
            if owner is None:
                self.gw.tally(EVENTS_IN, "unknown_meeting")
                continue
            key = (owner.customer, owner.meeting_id)
            groups.setdefault(key, []).append(mapping.for_customer(event, owner))
        return groups

    async def _accept_all(self, groups: dict[tuple[str, str], list[Event]]) -> int:
        for (customer, meeting_id), events in groups.items():
            try:
                await self.gw.webhooks.accept(customer, meeting_id, events)
            except StorageUnavailable:
                self.gw.tally(EVENTS_IN, "not_durable")
                return 503
            except Exception:
                log.exception("webhook events of %s could not be accepted", customer)
                self.gw.tally(EVENTS_IN, "not_durable")
                return 503
            self.gw.tally(EVENTS_IN, "accepted", len(events))
        return 200

    def _placed(self, backend_id: str, backend_meeting_id: str) -> Owner | None:
        held = self.gw.ledger.state.by_backend_meeting(backend_id, backend_meeting_id)
        if held is None:
            return None
        return Owner(held.customer, held.meeting_id, backend_meeting_id)

    def _backend_of(self, customer: str, meeting_id: str) -> str | None:
        held = self.gw.ledger.state.get((customer, meeting_id))
        return None if held is None else held.backend_id

    # -- registering --------------------------------------------------------------------------

    async def keep_registered(self) -> None:
        """Register the gateway's hook where it is missing, until cancelled (module docstring)."""
        down: dict[str, bool] = {}  # by backend: DOWN at the last look (absent: never seen)
        due: dict[str, float] = {}  # by backend: when its next check is due
        interval = self.gw.config.webhooks.backend_hook_check
        while True:
            now = trio.current_time()
            for backend in self.gw.backends():
                if self._check_due(backend.id, now, down, due):
                    due[backend.id] = now + interval
                    self._ensuring.add(backend.id)
                    self.gw.spawn("webhook-intake", self._ensure_once, backend.id)
            await trio.sleep(min(WATCH_INTERVAL, interval))

    def backend_back(self, backend_id: str) -> None:
        """The monitor saw ``backend_id`` come back from DOWN: check its hook now."""
        if backend_id not in self._ensuring and backend_id in self.gw.clients:
            self._ensuring.add(backend_id)
            self.gw.spawn("webhook-intake", self._ensure_once, backend_id)

    def _check_due(
        self, backend_id: str, now: float, down: dict[str, bool], due: dict[str, float]
    ) -> bool:
        health = self.gw.health.get(backend_id)
        is_down = health is None or health.state is State.DOWN
        came_back = down.get(backend_id, True) and not is_down
        down[backend_id] = is_down
        if is_down or self.gw.modes.get(backend_id) == "disabled":
            return False
        if backend_id in self._ensuring:
            return False
        if came_back:
            return True
        if self.gw.webhooks.shared:  # several instances: the backend's poller checks it
            from proxy.backends.cluster import shared_polls  # coredis only on the Redis store

            polls = shared_polls(self.gw)
            if polls is not None and not polls.holds(backend_id):
                return False
        return now >= due.get(backend_id, now)

    async def _ensure_once(self, backend_id: str) -> None:
        try:
            await self.ensure(backend_id)
        finally:
            self._ensuring.discard(backend_id)

    async def ensure(self, backend_id: str) -> bool:
        """Make sure ``backend_id`` has the gateway's hook; whether it has it now.

        Error handling: a backend that fails (no webhooks service, down, FAILED) is
        logged and counted; False."""
        client = self.gw.client(backend_id)
        url = mapping.intake_url(self.gw.config.proxy.public_url, client.backend)
        try:
            listed = await client.call("hooks/list", [])
            if listed.ok and url in _listed_urls(listed.root):
                self.gw.tally(BACKEND_HOOKS, "present")
                return True
            await self._destroy_outdated(client.backend, listed.root, url)
            created = await client.call("hooks/create", [("callbackURL", url), ("getRaw", "false")])
        except BackendError as exc:
            log.warning("could not register the gateway's webhook on %s: %s", backend_id, exc)
            self.gw.tally(BACKEND_HOOKS, "failed")
            return False
        if not created.ok:
            log.warning(
                "%s refused the gateway's webhook: %s", backend_id, created.message_key or "?"
            )
            self.gw.tally(BACKEND_HOOKS, "failed")
            return False
        log.info("registered the gateway's webhook on %s", backend_id)
        self.gw.tally(BACKEND_HOOKS, "registered")
        return True

    async def _destroy_outdated(self, backend: Backend, root: etree._Element, url: str) -> None:
        """Destroy this gateway's hooks on ``backend`` whose URL is not ``url`` (an old token)."""
        prefix = self.gw.config.proxy.public_url + PATH + "?"
        for hook_id, listed_url in _listed_hooks(root):
            query = dict(parse_qsl(urlsplit(listed_url).query))
            if listed_url.startswith(prefix) and query.get("b") == backend.id and listed_url != url:
                await self.gw.client(backend.id).call("hooks/destroy", [("hookID", hook_id)])


def _listed_hooks(root: etree._Element) -> list[tuple[str, str]]:
    """(hookID, callbackURL) of a hooks/list answer."""
    return [
        ((hook.findtext("hookID") or "").strip(), (hook.findtext("callbackURL") or "").strip())
        for hook in root.iter("hook")
    ]


def _listed_urls(root: etree._Element) -> set[str]:
    return {url for _, url in _listed_hooks(root)}


def install(app: QuartTrio, gw: Gateway) -> Intake:
    """Serve the intake endpoint on ``app`` and keep the gateway's hook registered while
    it serves."""
    intake = Intake(gw)
    gw.on_backend_back.append(intake.backend_back)

    @app.before_serving
    async def register_everywhere() -> None:
        gw.spawn("webhook-intake", intake.keep_registered)

    @app.route(PATH, methods=["POST"])
    async def webhook_events() -> Response:
        if (request.content_length or 0) > MAX_BODY:
            return Response("too large\n", 413, content_type="text/plain")
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        if len(body) > MAX_BODY:
            return Response("too large\n", 413, content_type="text/plain")
        query = request.query_string.decode("utf-8", "replace")
        status = await intake.receive(query, body, request.headers.get("Authorization"))
        return Response(f"{status}\n", status, content_type="text/plain")

    return intake
