"""One measurement: warm up, then load a target while counting the CPU everyone uses."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.loadgen import Load, run_load
from bench.processes import cpu_seconds
from bench.scenarios import Target
from bench.stack import HOST
from bench.stats import Summary, summarise


@dataclass(frozen=True, slots=True)
class Options:
    seconds: float
    connections: int
    warmup: float
    max_requests: int


def _load(target: Target, options: Options, seconds: float) -> Load:
    return Load(
        host=HOST,
        ports=target.endpoint.ports,
        next_path=target.next_path,
        expect=target.expect,
        connections=options.connections,
        seconds=seconds,
        max_requests=options.max_requests,
    )


def _server_cpu(target: Target) -> float:
    return sum(cpu_seconds(pid) for pid in target.endpoint.pids)


async def measure(target: Target, options: Options) -> Summary:
    """Warm up for ``options.warmup`` seconds (discarded), then measure."""
    if options.warmup > 0:
        await run_load(_load(target, options, options.warmup))
    front = target.endpoint.pids[0]  # the gateway, where there is one
    server_before, own_before = _server_cpu(target), time.process_time()
    front_before = cpu_seconds(front)
    tally, elapsed = await run_load(_load(target, options, options.seconds))
    server_cpu = _server_cpu(target) - server_before
    front_cpu = cpu_seconds(front) - front_before
    own_cpu = time.process_time() - own_before
    return summarise(
        target.name,
        tally.latencies,
        tally.errors,
        elapsed,
        server_cpu,
        own_cpu,
        tally.first_error,
        front_cpu_seconds=front_cpu,
    )
