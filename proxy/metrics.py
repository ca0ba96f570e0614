"""Prometheus metrics: requests by call and result, latency, and the ledger's gauges.

Ledger gauges are read from :meth:`LedgerState.statistics` at scrape time, so
the request path pays nothing for them.  One process only for now: several
hypercorn workers would need prometheus-client's multiprocess mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.ledger.model import LedgerStatistics

KNOWN_CALLS = frozenset(
    {
        "create", "join", "end", "isMeetingRunning", "getMeetingInfo", "getMeetings",
        "insertDocument", "sendChatMessage",
    }
)  # fmt: skip


class Metrics:
    def __init__(self, ledger_stats: Callable[[], LedgerStatistics]) -> None:
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
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.registry.register(_LedgerCollector(ledger_stats))

    def observe(self, call: str, result: str, seconds: float) -> None:
        label = call if call in KNOWN_CALLS else "other"
        self.requests.labels(label, result).inc()
        self.latency.labels(label).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LedgerCollector(Collector):
    def __init__(self, stats: Callable[[], LedgerStatistics]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        yield GaugeMetricFamily("bbb_proxy_meetings", "Meetings held in the ledger", stats.meetings)
        yield GaugeMetricFamily(
            "bbb_proxy_meetings_pending",
            "Creates awaiting their backend",
            stats.pending,
        )
        by_customer = GaugeMetricFamily(
            "bbb_proxy_customer_connections",
            "Reserved connections by customer",
            labels=["customer"],
        )
        for customer, used in sorted(stats.connections_by_customer.items()):
            by_customer.add_metric([customer], used)
        yield by_customer
        by_backend = GaugeMetricFamily(
            "bbb_proxy_backend_connections", "Connections reserved, by backend", labels=["backend"]
        )
        for backend, used in sorted(stats.connections_by_backend.items()):
            by_backend.add_metric([backend], used)
        yield by_backend
