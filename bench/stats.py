"""Percentiles and the summary of one measurement; no I/O here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SECONDS_TO_MS = 1000.0


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (``fraction`` in [0, 1]).

    The smallest value with at least ``fraction`` of the values at or below it;
    ``nan`` for an empty sequence.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} outside [0, 1]")
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    """One target's measurement: throughput, latency (ms), errors, CPU use."""

    name: str
    requests: int  # answered as expected
    errors: int  # wrong status or body, broken connection, timeout
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_us_per_request: float  # CPU of the processes serving this target
    loadgen_cpu_percent: float  # of one core, over the measurement
    first_error: str = ""
    # CPU of the first of those processes alone (the gateway, in front of its simulator)
    front_cpu_us_per_request: float = math.nan


def summarise(
    name: str,
    latencies: list[float],
    errors: int,
    seconds: float,
    server_cpu_seconds: float,
    loadgen_cpu_seconds: float,
    first_error: str = "",
    front_cpu_seconds: float = math.nan,
) -> Summary:
    """Summarise ``latencies`` (seconds, successful requests only)."""
    ordered = sorted(latencies)
    count = len(ordered)
    per_request = server_cpu_seconds / count * 1e6 if count else math.nan
    return Summary(
        name=name,
        requests=count,
        errors=errors,
        seconds=seconds,
        requests_per_second=count / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(ordered, 0.50) * SECONDS_TO_MS,
        p99_ms=percentile(ordered, 0.99) * SECONDS_TO_MS,
        max_ms=(ordered[-1] if ordered else math.nan) * SECONDS_TO_MS,
        server_cpu_us_per_request=per_request,
        loadgen_cpu_percent=100.0 * loadgen_cpu_seconds / seconds if seconds > 0 else math.nan,
        first_error=first_error,
        front_cpu_us_per_request=front_cpu_seconds / count * 1e6 if count else math.nan,
    )
