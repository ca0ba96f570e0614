"""``python -m bench lms``: the LMS mix against the gateway and against its baselines.

One round runs the same users (:mod:`bench.lms`) three times, each for the
same bounded time: against the bare endpoint, against simulated backends
directly, and through the gateway.  Per call, the gateway's figures are
compared with the baseline that does the same work without the gateway:
join (answered locally by the gateway) with the bare endpoint's join, every
forwarded call with the same call sent straight to a simulated backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from bench.lms import Api, Course, user_factories
from bench.loadgen import Expect
from bench.processes import cpu_seconds
from bench.stack import BACKEND_SECRET, CUSTOMER, CUSTOMER_SECRET, HOST, Endpoint, Stack
from bench.stats import Summary, summarise
from bench.swarm import Swarm, run_swarm
from bench.users import CallStats

CALLS = ("create", "join", "getMeetingInfo", "isMeetingRunning", "getMeetings", "end")
GATEWAY_JOIN = Expect(302, b"/bigbluebutton/api/join?")  # a failed join goes elsewhere
SIMULATOR_JOIN = Expect(302, b"/html5client/join?sessionToken=")


@dataclass(frozen=True, slots=True)
class MixOptions:
    users: int
    seconds: float
    warmup: float
    max_requests: int


@dataclass(frozen=True, slots=True)
class Run:
    api: Api
    endpoint: Endpoint


def runs(stack: Stack) -> tuple[Run, Run, Run]:
    """bare, direct, gateway: the baselines first."""
    customer_prefix = f"/{CUSTOMER}/bigbluebutton/api"
    bare = Api("bare", HOST, stack.bare.ports, customer_prefix, CUSTOMER_SECRET, GATEWAY_JOIN)
    direct = Api(
        "direct", HOST, stack.simulators.ports, stack.simulator_api, BACKEND_SECRET, SIMULATOR_JOIN
    )
    gateway = Api(
        "gateway", HOST, stack.gateway.ports, customer_prefix, CUSTOMER_SECRET, GATEWAY_JOIN
    )
    return Run(bare, stack.bare), Run(direct, stack.simulators), Run(gateway, stack.gateway)


async def run_mix(run: Run, options: MixOptions, rounds_done: int) -> dict[str, Any]:
    """One bounded run of the mix; per call summaries and the servers' CPU per request."""
    if options.warmup > 0:
        await _swarm(run, options, options.warmup, f"w{rounds_done}")
    before = sum(cpu_seconds(pid) for pid in run.endpoint.pids)
    stats, elapsed = await _swarm(run, options, options.seconds, f"r{rounds_done}")
    server_cpu = sum(cpu_seconds(pid) for pid in run.endpoint.pids) - before
    calls = {
        name: summarise(
            f"{run.api.name} {name}",
            stats.tally(name).latencies,
            stats.tally(name).errors,
            elapsed,
            math.nan,
            0.0,
            stats.tally(name).first_error,
        )
        for name in CALLS
    }
    answered = sum(c.requests for c in calls.values())
    return {"calls": calls, "server_cpu_us_per_request": server_cpu / max(answered, 1) * 1e6}


async def _swarm(
    run: Run, options: MixOptions, seconds: float, tag: str
) -> tuple[CallStats, float]:
    api = replace(run.api, name=f"{run.api.name}{tag}")  # meetingIDs unique per swarm
    factories, weights = user_factories(Course(api))
    return await run_swarm(Swarm(factories, weights, options.users, seconds, options.max_requests))


def baseline_for(call: str) -> str:
    return "bare" if call == "join" else "direct"


def compare(by_run: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per call: the gateway's figures over its baseline's (throughput, p50, p99)."""
    rows = []
    for call in CALLS:
        subject: Summary = by_run["gateway"]["calls"][call]
        base: Summary = by_run[baseline_for(call)]["calls"][call]
        rows.append(
            {
                "call": call,
                "baseline": baseline_for(call),
                "throughput": _ratio(subject.requests_per_second, base.requests_per_second),
                "p50": _ratio(subject.p50_ms, base.p50_ms),
                "p99": _ratio(subject.p99_ms, base.p99_ms),
            }
        )
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan
