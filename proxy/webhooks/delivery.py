"""Webhook delivery: events accepted durably, then POSTed to each hook as bbb-webhooks does.

Two halves, one service (:class:`Webhooks`, the gateway's ``webhooks``):

- :meth:`Webhooks.accept` (intake, for the events of one of a customer's meetings):
  each event is scrubbed of personal data (:func:`proxy.webhooks.privacy.scrubbed`),
  matched to the customer's hooks of that meeting
  (:meth:`~proxy.webhooks.registry.HookRegistry.matching`), queued per hook in the
  ``webhook-queue`` log (:mod:`proxy.webhooks.queue`), and the log is flushed before
  ``accept`` returns: intake answers the backend 200 only then, so an accepted event
  survives a restart or a ``kill -9``.  A log that cannot write raises
  ``StorageUnavailable``; intake answers 503 and the backend sends the events again.
- :meth:`Webhooks.deliver_forever` (a supervised background task): one worker per hook
  with something queued sends the head of its queue, and only that (one POST in flight
  per hook, so the order is kept), as :mod:`proxy.webhooks.callback` describes the form
  and checksum; each POST SSRF-checked on the address actually connected to, redirects
  not followed (:func:`proxy.backends.outbound.post_form_body`).

Isolation: a receiver that is slow (each POST bounded by ``timeout``) or dead delays only
its own hook.  Workers share a bound of ``max_in_flight`` POSTs in flight, each hook
holding at most one; a hook's queue is bounded (``queue_per_hook``, the oldest pushed
out beyond); a hook whose receiver has failed for ``drop_after`` seconds in a row is
dropped (removed from the registry, as bbb-webhooks removes a hook whose retries ran
out), logged and counted, with what was queued for it.  ``accept`` never waits for a
delivery.

Delivered at least once: a delivered event's ``done`` record is flushed in the
background within :data:`FLUSH_EVERY` (one fsync for many deliveries), so a crash right
after a delivery may send that event again after the restart; and an ``accept`` whose
flush failed may be repeated by the backend.  An accepted event is never lost while its
hook lives.

Several gateway instances on one Redis (``[store] kind = "redis"``): the queue's log is a
:class:`~proxy.store.shared.Replica` that every instance follows, so each holds every
instance's queued events; each hook's queue is delivered by ONE instance, its *owner*
(an ``owner`` record, :mod:`proxy.webhooks.queue`), so an event is POSTed once and the
order and the one-POST-per-hook bound hold across instances.  The first instance that
queues an event for a hook with no owner claims it (:meth:`~proxy.store.shared.Replica.claim`:
a compare-and-append after catching up, so of two racing instances one wins); events
queued on other instances reach the owner within the follow interval.  An owner that stops
(its member heartbeat runs out: :data:`~proxy.store.shared.HEARTBEAT_TTL`, at once on a
clean stop) loses its hooks: every :data:`CLAIM_EVERY` seconds each instance claims the
queued hooks whose owner is not alive, and one wins.  A ``done`` not yet flushed when an
owner dies makes that event come again from the new owner (at least once, as above).  An
instance that sees another's ``owner`` record for a hook it delivers stops after the POST
in flight (it was cut off longer than the heartbeat).

Error handling: :meth:`Webhooks.accept` raises only ``StorageUnavailable``; nothing a
backend or a receiver does makes delivery raise (a failed attempt is a retry, a bug in
one attempt is logged and counted as a failed attempt).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from proxy.backends.outbound import post_form_body
from proxy.config import Config, Network, WebhookSettings
from proxy.errors import StorageUnavailable
from proxy.logs import shown
from proxy.store import Json, Log, open_store_log
from proxy.store import shared as shared_store
from proxy.store.shared import Replica
from proxy.webhooks.callback import form_body, outcome, retry_delay, signed_url
from proxy.webhooks.privacy import scrubbed
from proxy.webhooks.queue import Pending, QueueState
from proxy.webhooks.registry import Hook, HookRegistry

if TYPE_CHECKING:
    from proxy.gateway import Gateway

log = logging.getLogger(__name__)

SECONDS = 1.0
FLUSH_EVERY = 0.2 * SECONDS  # delivered events' records reach the disk this soon
COMPACT_AFTER = 4096  # records appended beyond twice what is queued before compacting
CLAIM_EVERY = 1.0 * SECONDS  # several instances: a look for hooks whose owner is gone
QUEUE_FOLLOW_EVERY = 0.2 * SECONDS  # at most: events queued on another instance reach the owner
DROP_REASONS = ("overflow", "hook-dropped", "hook-gone", "invalid")
QUEUE_LOG = "webhook-queue"
# Gateway.tally families (proxy.metrics.TALLIES): the counters of WebhookStatistics.
EVENTS, DROPPED, HOOKS_DROPPED = "webhook_events", "webhook_dropped_events", "webhook_hooks_dropped"
_DEFAULTS = WebhookSettings()


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How hard delivery tries (``[webhooks]`` in the config; docs/decisions.md)."""

    drop_after: float = _DEFAULTS.drop_after  # failing this long in a row: hook dropped
    queue_per_hook: int = _DEFAULTS.queue_per_hook  # events; beyond, the oldest go
    max_in_flight: int = _DEFAULTS.max_in_flight  # POSTs at once, all hooks (one per hook)
    timeout: float = _DEFAULTS.delivery_timeout  # one POST, whole (bbb-webhooks: 5 s)
    allow_private: bool = False  # [proxy] allow_private_callbacks
    allowed: tuple[Network, ...] = ()  # [webhooks] allowed_callback_networks

    @classmethod
    def of(cls, config: Config) -> DeliverySettings:
        w = config.webhooks
        return cls(
            drop_after=w.drop_after,
            queue_per_hook=w.queue_per_hook,
            max_in_flight=w.max_in_flight,
            timeout=w.delivery_timeout,
            allow_private=config.proxy.allow_private_callbacks,
            allowed=w.allowed_callback_networks,
        )


@dataclass(frozen=True, slots=True)
class WebhookStatistics:
    """Counters since start-up, and the queues now (read by :mod:`proxy.metrics`)."""

    accepted: int  # events intake handed over
    queued: int  # copies queued: an event for two hooks counts twice
    delivered: int  # answered 2xx
    rejected: int  # answered 401: counted as delivered, as bbb-webhooks does
    retried: int  # attempts that failed and will be made again
    refused: int  # attempts not made: the URL's host is not public, or does not resolve
    dropped_events: Mapping[str, int]  # by reason, see DROP_REASONS
    dropped_hooks: int  # hooks removed because their receiver kept failing
    queue_events: int  # queued now, all hooks
    queue_hooks: int  # hooks with something queued now
    deepest: int  # the longest queue now
    in_flight: int  # POSTs in flight now


class Webhooks:
    """The delivery queues, their log, and the workers that empty them."""

    def __init__(self, gw: Gateway, log: Log, settings: DeliverySettings | None = None) -> None:
        self._gw = gw  # its hooks, customers and outbound HTTP client, as they are now
        self.log = log
        self.settings = settings if settings is not None else DeliverySettings.of(gw.config)
        self.queues = QueueState(self.settings.queue_per_hook)
        self._slots = trio.CapacityLimiter(self.settings.max_in_flight)
        self._workers: set[str] = set()
        self._overflowing: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._dirty = trio.Event()
        self._since_compaction = 0
        self._claiming: set[str] = set()

    @property
    def node(self) -> str:
        """This instance's name in the queue's records ("" on the local store)."""
        return self.log.node if isinstance(self.log, Replica) else ""

    @property
    def shared(self) -> bool:
        return isinstance(self.log, Replica) and self.log.shared

    def owns(self, hook_id: str) -> bool:
        """Whether this instance delivers ``hook_id``'s queue (always, on the local store)."""
        return not self.shared or self.queues.owners.get(hook_id) == self.node

    def apply_other(self, record: Mapping[str, Json]) -> None:
        """Another instance's record (the replica's ``apply``)."""
        self.queues.apply(record)
        self._since_compaction += 1

    def clear(self) -> None:
        """Forget every queue (the replica rebuilds after another instance's compaction)."""
        self.queues = QueueState(self.settings.queue_per_hook)
        self._since_compaction = 0  # another instance compacted

    def others_changed(self) -> None:
        """After the other instances' records: deliver what this instance owns.  A hook
        without an owner is left to the instance that queued its event (it claims at once)
        for :data:`CLAIM_EVERY`; then any instance may claim it."""
        for hook_id in self.queues.hooks():
            if self.owns(hook_id):
                self._start_worker(hook_id)

    @property
    def hooks(self) -> HookRegistry:
        return self._gw.hooks

    def replay(self, records: Iterable[Mapping[str, Json]]) -> None:
        """Apply what the log gave at start-up (``StateError`` if it is not queue records)."""
        for record in records:
            self.queues.apply(record)
            self._since_compaction += 1

    # -- accepting ------------------------------------------------------------------------------

    async def accept(self, customer: str, meeting_id: str, events: list[dict[str, Json]]) -> None:
        """Queue ``events`` of ``customer``'s meeting ``meeting_id`` for its hooks, durably.

        Error handling: ``StorageUnavailable`` if the queue's log cannot make them
        durable (at once if it has failed already: nothing is queued then).
        """
        if self.log.failed:
            raise StorageUnavailable()
        if self.shared:  # a hook made on another instance just before its meeting's events
            await self.hooks.refresh()
        timestamp = int(time.time() * 1000)
        touched: list[str] = []
        for event in events:
            self._count("accepted")
            clean = scrubbed(event)
            if not isinstance(clean, Mapping):
                self._count_dropped("invalid")
                continue
            for hook in self.hooks.matching(customer, meeting_id, event_id(clean)):
                self._enqueue(hook, clean, timestamp)
                touched.append(hook.id)
        if touched:
            await self.log.flush()
        for hook_id in touched:
            if self.owns(hook_id):
                self._start_worker(hook_id)
            elif hook_id not in self.queues.owners:
                self._claim_soon(hook_id, None)

    def _enqueue(self, hook: Hook, event: Mapping[str, Json], timestamp: int) -> None:
        record = self.queues.event_record(hook.id, event, timestamp, self.node)
        try:
            self._append(record)
        except ValueError:  # over the log's record bound (intake bounds a POST at 1 MiB)
            log.warning(
                "hook %s of %s: an event too large to queue, dropped", hook.id, hook.customer
            )
            self._count_dropped("invalid")
            return
        pushed = self.queues.push(record)
        self._count("queued")
        if pushed is None:
            return
        self._count_dropped("overflow")
        if hook.id not in self._overflowing:
            self._overflowing.add(hook.id)
            log.warning(
                "hook %s of %s: %d events queued, the oldest are dropped",
                hook.id,
                hook.customer,
                self.settings.queue_per_hook,
            )

    # -- delivering -----------------------------------------------------------------------------

    async def deliver_forever(self) -> None:
        """Deliver what is queued, and what is accepted later, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                nursery.start_soon(self._flush_forever)
                if self.shared:
                    nursery.start_soon(self._claim_forever)
                for hook_id in self.queues.hooks():
                    if self.owns(hook_id):
                        self._start_worker(hook_id)
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- owners (several instances) ---------------------------------------------------------------

    def _claim_soon(self, hook_id: str, gone: str | None) -> None:
        """Try to become ``hook_id``'s owner in the background (its owner now: ``gone``)."""
        if self._nursery is not None and hook_id not in self._claiming:
            self._claiming.add(hook_id)
            self._nursery.start_soon(self._claim, hook_id, gone)

    async def _claim(self, hook_id: str, gone: str | None) -> None:
        replica = self.log
        assert isinstance(replica, Replica)
        record = self.queues.owner_record(hook_id, self.node)
        try:
            won = await replica.claim(
                record,
                lambda: self.queues.depth(hook_id) > 0 and self.queues.owners.get(hook_id) == gone,
            )
        except StorageUnavailable:
            return  # claimed again at the next look
        finally:
            self._claiming.discard(hook_id)
        if won:
            log.info("webhooks: this instance delivers hook %s now (was %s)", hook_id, gone)
            self._start_worker(hook_id)

    async def _claim_forever(self) -> None:
        """Every :data:`CLAIM_EVERY`: claim the queued hooks whose owner is gone."""
        replica = self.log
        assert isinstance(replica, Replica)
        while True:
            await trio.sleep(CLAIM_EVERY)
            alive: dict[str, bool] = {}
            for hook_id in self.queues.hooks():
                owner = self.queues.owners.get(hook_id)
                if owner == self.node:
                    continue
                if owner is not None and owner not in alive:
                    try:
                        alive[owner] = await replica.alive(owner)
                    except StorageUnavailable:
                        break  # Redis away: nobody can claim; look again later
                if owner is None or not alive[owner]:
                    self._claim_soon(hook_id, owner)

    def _start_worker(self, hook_id: str) -> None:
        if self._nursery is not None and hook_id not in self._workers:
            self._workers.add(hook_id)
            self._nursery.start_soon(self._worker, hook_id)

    async def _worker(self, hook_id: str) -> None:
        """Empty ``hook_id``'s queue; a bug is logged and the worker goes on a second later."""
        try:
            while True:
                try:
                    return await self._drain(hook_id)
                except Exception:
                    log.exception("webhooks: the worker of hook %s failed; restarting it", hook_id)
                    failures = self._gw.task_failures
                    failures["webhook-worker"] = failures.get("webhook-worker", 0) + 1
                    await trio.sleep(1 * SECONDS)
        finally:  # no await between an empty queue and this: accept() starts a new worker
            self._workers.discard(hook_id)
            self._overflowing.discard(hook_id)

    async def _drain(self, hook_id: str) -> None:
        """Send the queue head by head; return once it is empty or the hook is gone."""
        failing_since: float | None = None
        failures = 0
        while (pending := self.queues.head(hook_id)) is not None:
            if not self.owns(hook_id):
                return  # another instance took it over
            hook = await self.hooks.lookup(hook_id)  # made on another instance: caught up
            secret = None if hook is None else self._secret(hook.customer)
            if hook is None or secret is None:
                self._forget(hook_id, "hook-gone")
                return
            started = trio.current_time()
            result = await self._attempt(hook, pending, secret)
            if result in ("delivered", "rejected"):
                self._done(hook, pending, result)
                failing_since, failures = None, 0
                continue
            failing_since = started if failing_since is None else failing_since
            failures += 1
            left = failing_since + self.settings.drop_after - trio.current_time()
            if left <= 0:
                return await self._drop(hook, failures)
            self._count("retried")
            await trio.sleep(min(retry_delay(failures), left))

    async def _attempt(self, hook: Hook, pending: Pending, secret: str) -> str:
        """One POST of ``pending`` to ``hook``: its :func:`~proxy.webhooks.callback.outcome`."""
        try:
            body = form_body(self._domain(hook.customer), pending.event, pending.timestamp)
            url = signed_url(hook.callback_url, body, secret, hook.algorithm)
            status: int | None = 0  # no answer within the timeout
            s = self.settings
            async with self._slots:
                with trio.move_on_after(s.timeout):
                    status = await post_form_body(
                        self._gw.outbound, url, body, s.allow_private, s.allowed
                    )
        except Exception:  # a bug must not stop the hook's worker: a failed attempt
            log.exception("hook %s: delivery attempt failed", hook.id)
            return "failed"
        result = outcome(status)
        if result == "refused":
            self._count("refused")
        return result

    def _done(self, hook: Hook, pending: Pending, result: str) -> None:
        self._append(self.queues.delivered(pending))
        self._count(result)
        if result == "rejected":
            log.warning(
                "hook %s of %s: the receiver answered 401 (counted as delivered, "
                "as bbb-webhooks does)",
                hook.id,
                hook.customer,
            )

    async def _drop(self, hook: Hook, failures: int) -> None:
        """The receiver failed for ``drop_after`` seconds in a row: drop the hook."""
        await self.hooks.drop(hook.id)
        events = self._forget(hook.id, "hook-dropped")
        self._gw.tally(HOOKS_DROPPED, "failing")
        log.warning(
            "hook %s of %s (%s) dropped: %d attempts failed over %.0f s; %d events dropped",
            hook.id,
            hook.customer,
            shown(hook.callback_url),
            failures,
            self.settings.drop_after,
            events,
        )

    def _forget(self, hook_id: str, reason: str) -> int:
        record, count = self.queues.drop(hook_id)
        self._append(record)
        self._count_dropped(reason, count)
        return count

    def _secret(self, customer_id: str) -> str | None:
        """The customer's current secret (the first while rotating); None: customer gone."""
        customer = self._gw.customer(customer_id)
        return customer.secrets[0] if customer is not None and customer.secrets else None

    def _domain(self, customer_id: str) -> str:
        """The form's ``domain``: the customer's own host name, else the gateway's."""
        customer = self._gw.customer(customer_id)
        if customer is not None and customer.hosts:
            return customer.hosts[0]
        return urlsplit(self._gw.config.proxy.public_url).hostname or ""

    # -- the log ----------------------------------------------------------------------------------

    def _append(self, record: dict[str, Json]) -> None:
        self.log.append(record)
        self._since_compaction += 1
        self._dirty.set()

    async def _flush_forever(self) -> None:
        """Flush what delivery appended (``done``, ``dropped``) soon after; compact when due."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await trio.sleep(FLUSH_EVERY)
            try:
                await self.log.flush()
                await self._compact_if_due()
            except StorageUnavailable:
                log.warning("webhook queue: delivery progress not durable yet; retrying")
                await trio.sleep(1 * SECONDS)
                self._dirty.set()

    async def _compact_if_due(self) -> None:
        if self._since_compaction > COMPACT_AFTER + 2 * self.queues.statistics().events:
            try:
                await self.log.compact(list(self.queues.records()))
            except StorageUnavailable:
                if not self.shared:
                    raise
                # lost to the other instances' appends (or Redis away): not again at once
                log.info("webhook queue: not compacted now; after %d more records", COMPACT_AFTER)
            self._since_compaction = 0

    # -- statistics -------------------------------------------------------------------------------

    def statistics(self) -> WebhookStatistics:
        tallies = self._gw.tallies
        owned = [h for h in self.queues.hooks() if self.owns(h)] if self.shared else None
        queues = self.queues.statistics(owned)  # several instances: what this one delivers

        def count(family: str, label: str) -> int:
            return tallies.get((family, label), 0)

        return WebhookStatistics(
            accepted=count(EVENTS, "accepted"),
            queued=count(EVENTS, "queued"),
            delivered=count(EVENTS, "delivered"),
            rejected=count(EVENTS, "rejected"),
            retried=count(EVENTS, "retried"),
            refused=count(EVENTS, "refused"),
            dropped_events={reason: count(DROPPED, reason) for reason in DROP_REASONS},
            dropped_hooks=count(HOOKS_DROPPED, "failing"),
            queue_events=queues.events,
            queue_hooks=queues.hooks,
            deepest=queues.deepest,
            in_flight=int(self._slots.borrowed_tokens),
        )

    def _count(self, outcome: str) -> None:
        self._gw.tally(EVENTS, outcome)

    def _count_dropped(self, reason: str, n: int = 1) -> None:
        self._gw.tally(DROPPED, reason, n)


def event_id(event: Mapping[str, Json]) -> str:
    """A mapped event's id (``data.id``, lower-cased as bbb-webhooks compares it); ``""``."""
    data = event.get("data")
    value = data.get("id") if isinstance(data, Mapping) else None
    return value.lower() if isinstance(value, str) else ""


def open_webhooks(gw: Gateway) -> Webhooks:
    """Put durable delivery (the ``webhook-queue`` log under ``state_dir``, replayed) in
    force as ``gw.webhooks``, and start delivering.

    Blocking: at start-up, before serving, after :func:`~proxy.webhooks.registry.open_hooks`.
    Supervised tasks deliver, and recover a failed log / compact a grown one.

    Error handling: ``StateError`` for a log that cannot be read or holds a record
    that is not the queue's (the CLI exits 3).
    """
    proxy = gw.config.proxy
    store, records = open_store_log(proxy.state_dir, QUEUE_LOG, timeout=proxy.journal_timeout)
    webhooks = Webhooks(gw, store)
    webhooks.replay(records)
    webhooks.log = Replica(
        store,
        QUEUE_LOG,
        apply=webhooks.apply_other,
        clear=webhooks.clear,
        records=lambda: webhooks.queues.records(),
        changed=webhooks.others_changed,
        every=min(shared_store.FOLLOW_EVERY, QUEUE_FOLLOW_EVERY),
        members=True,  # owners of hooks: taken over when their heartbeat runs out
    )
    if webhooks.queues.hooks():
        stats = webhooks.queues.statistics()
        log.info("webhooks: %d events to deliver to %d hooks", stats.events, stats.hooks)
    gw.webhooks = webhooks
    gw.stores[QUEUE_LOG] = store
    gw.spawn("webhook-queue-store", webhooks.log.maintain)
    gw.spawn("webhooks", webhooks.deliver_forever)
    return webhooks
