"""Prometheus metrics: API requests, backend calls, and gauges read at scrape time.

Counters and histograms are updated on the request path (a dict lookup and an
add).  Everything else (the ledger, backend health and modes, limits, the
journal) is read from the components' ``statistics()`` or state when
Prometheus scrapes, so the request path pays nothing for it.

Several workers (``[proxy] workers``, :mod:`proxy.workers`): any worker may answer a
scrape, so the answer must be the machine's, not one worker's.  With
``PROMETHEUS_MULTIPROC_DIR`` set (the parent sets it) prometheus-client's multiprocess
mode is on, and each family is shown as follows:

- the request path's counters and histograms: the sum over every worker, those dead
  included (their values are in the directory's files, written as they change; a worker
  started again starts a new file), so the sums never go down;
- the counters read from components (:class:`_ProcessCounts`: tallies, task failures,
  failover events, customer URLs, the journal's counts): each worker copies its own
  into the same files (:class:`_Mirror`) every ``MIRROR_INTERVAL`` and when it answers a
  scrape, so a sum may lag another worker's newest events by that much;
- gauges of one process's own doing: ``bbb_proxy_webhook_in_flight`` the sum over live
  workers, ``bbb_proxy_store_failed`` the most over live workers (1 if any has failed);
- gauges of shared state (the ledger, whose replica every worker holds; customers,
  backends, their health; the webhook queues): the answering worker's reading, once,
  not N times it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.bbb.customer_urls import OUTCOMES as CUSTOMER_URL_OUTCOMES
from proxy.calls import CALLS
from proxy.gateway import Gateway
from proxy.health import State
from proxy.ledger.model import LedgerStatistics

KNOWN_CALLS = frozenset(CALLS)  # anything else is labelled "other"
# Results worth a label; anything else a server answers counts as "otherFailure", so a
# misbehaving server cannot blow up the label set.
KNOWN_RESULTS = frozenset(
    {
        "success", "failed", "checksumError", "apiNotEnabled", "unsupportedRequest",
        "validationError", "missingParamMeetingID", "missingParamFullName", "notFound",
        "subscriptionExhausted", "noServerCapacity", "serverUnavailable", "internalError",
        "idNotUnique", "nonUniqueVoiceBridge", "invalidPassword", "unsupportedContentType",
        "meetingForciblyEnded", "maxParticipantsReached", "mismatchCreateTimeParam",
    }
)  # fmt: skip
# Kinds of Gateway.spawn shown with 0 before their first failure (others appear when they fail).
TASK_KINDS = ("customer-url", "end-preempted", "end-stray", "monitor")
# Failover and reconciliation events (Gateway.failover), see proxy/backends/monitor.py
FAILOVER_EVENTS = ("moved", "kept", "released", "adopted", "adopt-clamped", "stray-ended")
CUSTOMER_URL_KINDS = ("dropped", "ok", "failed", "refused", "invalid")
# Answers that refuse a request for the platform's reasons (not a malformed request):
# messageKey -> the ``reason`` label of bbb_proxy_refusals_total.
REFUSALS = {
    "subscriptionExhausted": "subscription",  # the customer's max_connections are taken
    "noServerCapacity": "capacity",  # no backend has room for the meeting
    "serverUnavailable": "server_unavailable",  # the backend is down, or the customer's share
    "apiNotEnabled": "customer_disabled",  # the customer is disabled
    "checksumError": "checksum",  # unknown customer or wrong checksum
    "unsupportedRequest": "unsupported_call",  # an unknown or disabled call
    "maxParticipantsReached": "participants",  # the meeting is full (join)
}
REFUSAL_CALLS = ("create", "join")  # shown with 0 before their first refusal


@dataclass(frozen=True, slots=True)
class Tally:
    """A counter fed by ``Gateway.tally(family, label)``; ``labels`` are shown from 0."""

    name: str
    doc: str
    label: str
    labels: tuple[str, ...]


# Every family Gateway.tally may count.  Owners count with e.g.
# ``gw.tally("admin_changes", "customer_created")``; a label not listed here still
# counts (it appears once it happens), but list it so dashboards see it from 0.
TALLIES = {
    "preemptions": Tally(
        "bbb_proxy_preemptions",
        "Overtime meetings preempted to admit a create: ended on their backend, or not",
        "outcome",
        ("ended", "end_failed"),
    ),
    "admin_changes": Tally(
        "bbb_proxy_admin_changes",
        "Changes made through the admin API, by kind",
        "change",
        (
            "customer_created", "customer_changed", "customer_deleted", "secret_rotated",
            "backend_created", "backend_changed", "backend_deleted", "meeting_ended",
        ),
    ),
    "recording_ready_notices": Tally(
        "bbb_proxy_recording_ready_notices",
        "Recording-ready notices from backends, by what the gateway answered",
        "answer",
        ("accepted", "unsigned_url", "bad_jwt", "not_durable"),
    ),
    "recording_ready_deliveries": Tally(
        "bbb_proxy_recording_ready_deliveries",
        "Recording-ready deliveries to customers that ended, by outcome; retries",
        "outcome",
        ("done", "final", "gave-up", "retry"),
    ),
    "analytics_callbacks": Tally(
        "bbb_proxy_analytics_callbacks",
        "Analytics callbacks from backends, by what the gateway answered",
        "answer",
        ("accepted", "unsigned_url", "bad_jwt", "not_durable"),
    ),
    "analytics_deliveries": Tally(
        "bbb_proxy_analytics_deliveries",
        "Analytics callback deliveries to customers that ended, by outcome; retries",
        "outcome",
        ("done", "final", "gave-up", "retry"),
    ),
    "recordings_left_out": Tally(
        "bbb_proxy_recordings_backends_left_out",
        "Backends left out of a recordings call's answer, by reason",
        "reason",
        ("deadline", "down", "failed"),
    ),
    # Webhooks (proxy/webhooks/delivery.py; the queue gauges are in _webhook_queues below).
    "webhook_events": Tally(
        "bbb_proxy_webhook_events",
        "Webhook events: accepted from intake, queued per hook, delivered (2xx), rejected "
        "(401, counted delivered), attempts retried, attempts refused (host not public now)",
        "outcome",
        ("accepted", "queued", "delivered", "rejected", "retried", "refused"),
    ),
    "webhook_dropped_events": Tally(
        "bbb_proxy_webhook_dropped_events",
        "Webhook events not delivered, by reason: a full queue (overflow), the hook dropped "
        "for failing, the hook destroyed or expired (hook-gone), not an event (invalid)",
        "reason",
        ("overflow", "hook-dropped", "hook-gone", "invalid"),
    ),
    "webhook_hooks_dropped": Tally(
        "bbb_proxy_webhook_dropped_hooks",
        "Hooks removed because their receiver failed for [webhooks] drop_after seconds",
        "reason",
        ("failing",),
    ),
    # Webhook intake (proxy/webhooks/intake.py): backends' POSTs and the gateway's own hooks.
    "webhook_events_in": Tally(
        "bbb_proxy_webhook_events_in",
        "Events from backends' webhooks: accepted for a customer's meeting, of a meeting the "
        "gateway did not place, unreadable, badly signed POSTs, not made durable (503)",
        "outcome",
        ("accepted", "unknown_meeting", "invalid", "bad_checksum", "not_durable"),
    ),
    "webhook_backend_hooks": Tally(
        "bbb_proxy_webhook_backend_hooks",
        "Checks of the gateway's hook on backends: present, registered (again), failed",
        "outcome",
        ("present", "registered", "failed"),
    ),
}  # fmt: skip
# Recording-ready notices: the HTTP status the gateway answered -> the ``answer`` label.
READY_ANSWERS = {200: "accepted", 401: "bad_jwt", 403: "unsigned_url", 503: "not_durable"}
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by proxy.workers for its children
MIRROR_INTERVAL = 1.0  # seconds between copies of a worker's component counts
# Gauges of one process's doing, and how several workers' are combined (prometheus-client's
# multiprocess_mode); any other gauge is shared state, shown as the answering worker reads it.
PROCESS_GAUGES = {"bbb_proxy_webhook_in_flight": "livesum", "bbb_proxy_store_failed": "livemax"}
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The gateway's metrics; ``multiprocess_dir``: prometheus-client's multiprocess
    directory (default ``$PROMETHEUS_MULTIPROC_DIR``; unset: this process alone)."""

    def __init__(self, gw: Gateway, multiprocess_dir: str | None = None) -> None:
        multiprocess_dir = multiprocess_dir or os.environ.get(MULTIPROCESS_ENV)
        self.registry = CollectorRegistry()
        # Multiprocess mode: the values live in the directory's files, which one collector
        # reads for every worker; registered here, a metric would show this worker's only.
        own = None if multiprocess_dir else self.registry
        self.requests = Counter(
            "bbb_proxy_requests",
            "API requests answered, by call and result (success or the messageKey)",
            ["call", "result"],
            registry=own,
        )
        self.latency = Histogram(
            "bbb_proxy_request_seconds",
            "Time to answer an API request, by call",
            ["call"],
            buckets=BUCKETS,
            registry=own,
        )
        self.backend_requests = Counter(
            "bbb_proxy_backend_requests",
            "Calls to BBB servers, by backend, call and outcome",
            ["backend", "call", "outcome"],
            registry=own,
        )
        self.backend_latency = Histogram(
            "bbb_proxy_backend_request_seconds",
            "Time a BBB server took to answer, by backend",
            ["backend"],
            buckets=BUCKETS,
            registry=own,
        )
        self.refusals = Counter(
            "bbb_proxy_refusals",
            "Requests refused for the platform's reasons, by call and reason",
            ["call", "reason"],
            registry=own,
        )
        for call in REFUSAL_CALLS:
            for reason in REFUSALS.values():
                self.refusals.labels(call, reason)
        self._gw = gw
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}  # see observe()
        self._backend_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._state = _SharedState(gw)
        self.registry.register(self._state)
        counts = _ProcessCounts(gw)
        self._mirror = _Mirror(counts) if multiprocess_dir else None
        if multiprocess_dir:
            MultiProcessCollector(self.registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        else:
            self.registry.register(counts)

    def recording_ready_notice(self, status: int) -> None:
        """Count one recording-ready notice by the HTTP status it was answered."""
        self._gw.tally("recording_ready_notices", READY_ANSWERS.get(status, "other"))

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Export ``read()`` as gauge ``name``, read at each scrape (e.g. a queue's length)."""
        self._state.gauges.append((name, doc, read))

    def observe(self, call: str, result: str, seconds: float) -> None:
        # The label children are looked up once per label set (labels() takes a lock and
        # builds tuples each time); the labels are bounded: known calls and results.
        label = call if call in KNOWN_CALLS else "other"
        outcome = result if result in KNOWN_RESULTS else "otherFailure"
        children = self._children.get((label, outcome))
        if children is None:
            children = (self.requests.labels(label, outcome), self.latency.labels(label))
            self._children[(label, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)
        reason = REFUSALS.get(result)
        if reason is not None:
            self.refusals.labels(label, reason).inc()

    def observe_backend(self, backend: str, call: str, outcome: str, seconds: float) -> None:
        key = (backend, call, outcome)
        children = self._backend_children.get(key)
        if children is None:
            children = (
                self.backend_requests.labels(backend, call, outcome),
                self.backend_latency.labels(backend),
            )
            self._backend_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> bytes:
        if self._mirror is not None:
            self._mirror.update()  # this worker's own counts as of now
        return generate_latest(self.registry)

    async def mirror_forever(self) -> None:
        """Multiprocess mode: copy this worker's component counts into the shared files
        every ``MIRROR_INTERVAL`` (returns at once otherwise)."""
        if self._mirror is None:
            return
        while True:
            await trio.sleep(MIRROR_INTERVAL)
            self._mirror.update()


def _polls(gw: Gateway) -> CounterMetricFamily:
    """Polls this instance sent (proxy/backends/monitor.py counts them as the tally
    ``backend_polls``); on the Redis store only a backend's lease holder polls it."""
    polls = CounterMetricFamily(
        "bbb_proxy_backend_polls",
        "getMeetings polls this instance sent, by backend (on the Redis store, only the "
        "instance holding the backend's poll lease polls it)",
        labels=["backend"],
    )
    for b in gw.backends():
        polls.add_metric([b.id], gw.tallies.get(("backend_polls", b.id), 0))
    return polls


def _gauge(
    name: str, doc: str, labels: list[str], rows: dict[tuple[str, ...], float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in sorted(rows.items()):
        family.add_metric(list(values), value)
    return family


class _SharedState(Collector):
    """Gauges of state every worker reads alike (the ledger replica, customers, backends)."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._gw.ledger.statistics()  # one walk of the ledger per scrape
        yield from self._ledger(stats)
        yield from self._backends(stats)
        for name, doc, read in self.gauges:
            yield GaugeMetricFamily(name, doc, read())
        yield from _webhook_queues(self._gw)

    def _ledger(self, stats: LedgerStatistics) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("bbb_proxy_meetings", "Meetings held in the ledger", stats.meetings)
        yield GaugeMetricFamily(
            "bbb_proxy_meetings_pending", "Creates awaiting their backend", stats.pending
        )
        customers = self._gw.customers()
        yield _gauge(
            "bbb_proxy_customer_connections",
            "Reserved connections by customer",
            ["customer"],
            {(c.id,): stats.connections_by_customer.get(c.id, 0) for c in customers},
        )
        yield _gauge(
            "bbb_proxy_customer_max_connections",
            "The customer's subscription (concurrent connections)",
            ["customer"],
            {(c.id,): c.max_connections for c in customers},
        )

    def _backends(self, stats: LedgerStatistics) -> Iterator[GaugeMetricFamily]:
        gw, backends = self._gw, self._gw.backends()
        used = stats.connections_by_backend
        yield _gauge(
            "bbb_proxy_backend_connections",
            "Reserved connections by backend",
            ["backend"],
            {(b.id,): used.get(b.id, 0) for b in backends},
        )
        yield _gauge(
            "bbb_proxy_backend_capacity",
            "Connections the backend may host",
            ["backend"],
            {(b.id,): b.capacity for b in backends},
        )
        yield _gauge(
            "bbb_proxy_backend_health",
            "1 for the backend's current health state (up, unhealthy, down)",
            ["backend", "state"],
            {(b.id, s.value): float(gw.health[b.id].state is s) for b in backends for s in State},
        )
        yield _gauge(
            "bbb_proxy_backend_accepting",
            "1 if the backend may be given new meetings (up and active)",
            ["backend"],
            {(b.id,): float(gw.accepts_meetings(b.id)) for b in backends},
        )
        yield _gauge(
            "bbb_proxy_backend_latency_seconds",
            "Moving average of the backend's answer times (polls, creates); 0: no sample yet",
            ["backend"],
            {(b.id,): gw.health[b.id].latency or 0.0 for b in backends},
        )


class _ProcessCounts(Collector):
    """What this process counted (and its own gauges, :data:`PROCESS_GAUGES`)."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._journal()
        yield from self._shared_ledger()
        yield from self._background()
        yield from self._tallies()
        yield _gauge(
            "bbb_proxy_store_failed",
            "1 while a durable store cannot write (the ledger journal is 'ledger')",
            ["store"],
            {(name,): float(failed) for name, failed in _failed_stores(self._gw).items()},
        )
        yield GaugeMetricFamily(
            "bbb_proxy_webhook_in_flight",
            "Webhook POSTs in flight now",
            self._gw.webhooks.statistics().in_flight,
        )

    def _tallies(self) -> Iterator[CounterMetricFamily]:
        counted: dict[str, dict[str, int]] = {}
        for (family, label), n in self._gw.tallies.items():
            counted.setdefault(family, {})[label] = n
        for family, tally in TALLIES.items():
            metric = CounterMetricFamily(tally.name, tally.doc, labels=[tally.label])
            counts = dict.fromkeys(tally.labels, 0) | counted.get(family, {})
            for label, n in sorted(counts.items()):
                metric.add_metric([label], n)
            yield metric

    def _journal(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        statistics = getattr(self._gw.ledger.journal, "statistics", None)
        if statistics is None:
            return
        stats = statistics()
        for field, doc in (
            ("records_written", "Ledger records written to the journal"),
            ("fsyncs", "fsync calls made by the journal"),
            ("snapshots", "Ledger snapshots written"),
            ("failures", "Journal writes that failed or overran journal_timeout"),
            ("recoveries", "Times the journal wrote again after failing"),
        ):
            yield CounterMetricFamily(f"bbb_proxy_journal_{field}", doc, getattr(stats, field))

    def _shared_ledger(self) -> Iterator[CounterMetricFamily]:
        ledger = self._gw.ledger
        if not ledger.shared:
            return
        for field, doc in (
            ("commits", "Ledger records this instance committed to Redis"),
            ("races", "Ledger commits lost to another instance (decided again)"),
            ("catch_ups", "Ledger records of other instances applied to this replica"),
            ("reloads", "Times this replica reloaded the whole ledger from Redis"),
        ):
            yield CounterMetricFamily(f"bbb_proxy_ledger_{field}", doc, getattr(ledger, field))

    def _background(self) -> Iterator[CounterMetricFamily]:
        failures = CounterMetricFamily(
            "bbb_proxy_task_failures",
            "Background tasks (supervised by Gateway.spawn) that failed, by kind",
            labels=["kind"],
        )
        counts = dict.fromkeys(TASK_KINDS, 0) | self._gw.task_failures
        for kind, count in sorted(counts.items()):
            failures.add_metric([kind], count)
        yield failures
        events = CounterMetricFamily(
            "bbb_proxy_failover_events",
            "Failover and reconciliation: meetings moved off a DOWN backend, kept when it "
            "returned, released, adopted, clamped on adoption, stray copies ended",
            labels=["event"],
        )
        for event in FAILOVER_EVENTS:
            events.add_metric([event], self._gw.failover.get(event, 0))
        yield events
        urls = CounterMetricFamily(
            "bbb_proxy_customer_urls",
            "Customers' end URLs: dropped at create, or called (ok, failed, refused, invalid)",
            labels=["outcome"],
        )
        for outcome in CUSTOMER_URL_KINDS:
            urls.add_metric([outcome], CUSTOMER_URL_OUTCOMES[outcome])
        yield urls
        yield _polls(self._gw)


def _webhook_queues(gw: Gateway) -> Iterator[GaugeMetricFamily]:
    """Webhook delivery now (proxy/webhooks/delivery.py; its counters are TALLIES)."""
    stats = gw.webhooks.statistics()
    for name, doc, value in (
        ("queue_events", "Webhook events queued for delivery, all hooks", stats.queue_events),
        ("queue_hooks", "Hooks with webhook events queued", stats.queue_hooks),
        ("queue_deepest", "Events queued for the hook with the most", stats.deepest),
    ):
        yield GaugeMetricFamily(f"bbb_proxy_webhook_{name}", doc, value)


def _failed_stores(gw: Gateway) -> dict[str, bool]:
    return {"ledger": gw.ledger.journal.failed} | {n: s.failed for n, s in gw.stores.items()}


class _Mirror:
    """Copies a collector's families into multiprocess-mode metrics of the same names:
    counters by their increase since the last copy, gauges (:data:`PROCESS_GAUGES`) set."""

    def __init__(self, source: Collector) -> None:
        self._source = source
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._copied: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def update(self) -> None:
        for family in self._source.collect():
            for sample in family.samples:
                if family.type == "counter" and sample.name.endswith("_total"):
                    self._count(family.name, family.documentation, sample.labels, sample.value)
                elif family.type == "gauge":
                    self._set(family.name, family.documentation, sample.labels, sample.value)

    def _count(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = Counter(name, doc, sorted(labels), registry=None)
            self._counters[name] = counter
        child = counter.labels(**labels) if labels else counter  # shown from 0
        key = (name, tuple(sorted(labels.items())))
        copied = self._copied.get(key, 0.0)
        if value > copied:
            child.inc(value - copied)
            self._copied[key] = value

    def _set(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        gauge = self._gauges.get(name)
        if gauge is None:
            mode = cast(Any, PROCESS_GAUGES[name])  # one of prometheus-client's modes
            gauge = Gauge(name, doc, sorted(labels), registry=None, multiprocess_mode=mode)
            self._gauges[name] = gauge
        (gauge.labels(**labels) if labels else gauge).set(value)
