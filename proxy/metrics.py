"""Prometheus metrics: API requests, backend calls, and gauges read at scrape time.

Counters and histograms are updated on the request path (a dict lookup and an
add).  Everything else (the ledger, backend health and modes, limits, the
journal) is read from the components' ``statistics()`` or state when
Prometheus scrapes, so the request path pays nothing for it.  One process
only for now: several hypercorn workers would need prometheus-client's
multiprocess mode.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, gw: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bbb_proxy_requests",
            "API requests answered, by call and result (success or the messageKey)",
            ["call", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bbb_proxy_request_seconds",
            "Time to answer an API request, by call",
            ["call"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.backend_requests = Counter(
            "bbb_proxy_backend_requests",
            "Calls to BBB servers, by backend, call and outcome",
            ["backend", "call", "outcome"],
            registry=self.registry,
        )
        self.backend_latency = Histogram(
            "bbb_proxy_backend_request_seconds",
            "Time a BBB server took to answer, by backend",
            ["backend"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(gw))

    def observe(self, call: str, result: str, seconds: float) -> None:
        label = call if call in KNOWN_CALLS else "other"
        self.requests.labels(label, result if result in KNOWN_RESULTS else "otherFailure").inc()
        self.latency.labels(label).observe(seconds)

    def observe_backend(self, backend: str, call: str, outcome: str, seconds: float) -> None:
        self.backend_requests.labels(backend, call, outcome).inc()
        self.backend_latency.labels(backend).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _gauge(
    name: str, doc: str, labels: list[str], rows: dict[tuple[str, ...], float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in sorted(rows.items()):
        family.add_metric(list(values), value)
    return family


class _StateCollector(Collector):
    def __init__(self, gw: Gateway) -> None:
        self._gw = gw

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._gw.ledger.statistics()  # one walk of the ledger per scrape
        yield from self._ledger(stats)
        yield from self._backends(stats)
        yield from self._journal()
        yield from self._background()

    def _ledger(self, stats: LedgerStatistics) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("bbb_proxy_meetings", "Meetings held in the ledger", stats.meetings)
        yield GaugeMetricFamily(
            "bbb_proxy_meetings_pending", "Creates awaiting their backend", stats.pending
        )
        customers = self._gw.config.customers
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
        gw, backends = self._gw, self._gw.config.backends
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
