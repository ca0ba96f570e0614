"""Scaling curves measured through real gateway processes.

fan-out
    One simulator process serves 100 simulated backends answering after
    ``latency`` seconds; for each backend count a gateway is started with that
    many backends, and ``getMeetings`` (which the gateway sends to every
    backend in parallel and merges) is loaded with a few connections.
    Baseline: ``getMeetings`` sent straight to one simulated backend.

ledger size
    The gateway's ``state_dir`` is pre-filled with a snapshot of N confirmed
    reservations of the bench customer (written with the ledger's own
    ``write_snapshot``).  They are pinned to a backend id that is NOT in the
    gateway's configuration ("parked"): start-up reconciliation and the
    monitor only poll configured backends, so they neither release these
    (which they would do for reservations on a live backend that does not list
    them) nor make every poll parse a getMeetings of N meetings.  The ledger
    therefore really holds N meetings in every index (by key, by customer, by
    backend meeting id, usage counters) while creates and joins go to two
    live simulated backends.  Per N, a fresh simulator process and gateway.
    Memory: the gateway's RSS once ready, per N; the slope is bytes/meeting.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import fetch
from bench.ledger_curves import request
from bench.loadgen import Load, run_load
from bench.processes import Server, cpu_seconds, open_server, read_lines, wait_ready
from bench.scenarios import JOIN_REDIRECT, SUCCESS, gateway_path, simulator_path
from bench.stack import HOST, _gateway_argv, _port, _simulator_argv, free_port, gateway_toml
from bench.stats import summarise
from proxy.ledger.codec import Snapshot
from proxy.ledger.files import write_snapshot
from proxy.ledger.model import Reservation

PARKED = "parked"  # a backend id the gateway is not configured with
SETUP_MEETINGS = 100  # created through the gateway before joins are measured


@dataclass(frozen=True, slots=True)
class LoadSpec:
    seconds: float
    connections: int
    warmup: float
    max_requests: int = 200_000


@asynccontextmanager
async def open_gateway(workdir: Path, backend_urls: list[str]) -> AsyncIterator[tuple[Server, int]]:
    port = free_port()
    config = workdir / f"gateway-{port}.toml"
    config.write_text(gateway_toml(port, backend_urls, workdir / f"state-{port}"))
    async with open_server(f"gateway-{port}", _gateway_argv(config), workdir) as gw:
        await wait_ready(gw, HOST, port, "/readyz")
        yield gw, port


async def measure_paths(
    port: int,
    paths: Any,
    expect: Any,
    spec: LoadSpec,
    name: str,
    cpu_of: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Load ``port``; latency, throughput and, per process in ``cpu_of``, CPU µs/request."""

    def load(seconds: float) -> Load:
        return Load(HOST, (port,), paths, expect, spec.connections, seconds, spec.max_requests)

    await run_load(load(spec.warmup))
    pids = cpu_of or {}
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    tally, elapsed = await run_load(load(spec.seconds))
    used = {who: cpu_seconds(pid) - before[who] for who, pid in pids.items()}
    s = summarise(name, tally.latencies, tally.errors, elapsed, 0.0, 0.0, tally.first_error)
    answered = max(s.requests, 1)
    return {
        "req_s": s.requests_per_second,
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "errors": s.errors,
        "first_error": s.first_error,
        **{f"{who}_cpu_ms_per_request": t / answered * 1e3 for who, t in used.items()},
    }


async def fanout_curve(
    workdir: Path, counts: list[int], latency: float, spec: LoadSpec
) -> list[dict[str, Any]]:
    rows = []
    argv = _simulator_argv(max(counts), latency)
    async with open_server("simulators", argv, workdir) as sim:
        urls = await read_lines(sim, max(counts))
        api = urls[0].split(str(_port(urls[0])), 1)[1]
        direct = await measure_paths(
            _port(urls[0]), lambda: simulator_path(api, "getMeetings", []), SUCCESS, spec, "direct"
        )
        for count in counts:
            async with open_gateway(workdir, urls[:count]) as (gw, port):
                await spread_meetings(port, count)
                path = gateway_path("getMeetings", [])
                cpu_of = {"gateway": gw.pid, "simulators": sim.pid}
                row = await measure_paths(port, lambda p=path: p, SUCCESS, spec, "gateway", cpu_of)
            rows.append({"backends": count, **row, "direct_p50_ms": direct["p50_ms"]})
            print(f"  fan-out {count:>3} backends: {row}", flush=True)
    return rows


async def spread_meetings(port: int, backends: int) -> None:
    """Create meetings until every backend holds one of the customer's (the gateway asks
    only the backends that hold the customer's meetings, so this is the worst case)."""
    for n in range(50 * backends):
        created = await fetch(HOST, port, gateway_path("create", _create(n)))
        assert created.contains(b"<returncode>SUCCESS</returncode>"), created.body[:200]
        metrics = (await fetch(HOST, port, "/metrics")).body.decode()
        holding = [
            line for line in metrics.splitlines()
            if line.startswith("bbb_proxy_backend_connections{") and not line.endswith(" 0.0")
        ]  # fmt: skip
        if len(holding) == backends:
            return
    raise RuntimeError(f"could not place a meeting on each of {backends} backends")


def prefill(state_dir: Path, size: int) -> None:
    """A snapshot of ``size`` confirmed reservations on the parked backend."""
    now = time.time()
    reservations = tuple(
        Reservation("bench", r.meeting_id, PARKED, r.backend_meeting_id, 1, 600, 0, now, True)
        for r in (request(n) for n in range(size))
    )
    state_dir.mkdir(parents=True)
    write_snapshot(state_dir, Snapshot(0, reservations), ())


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def ledger_size_point(workdir: Path, size: int, spec: LoadSpec) -> dict[str, Any]:
    """Create and join through a gateway whose ledger already holds ``size`` meetings."""
    point = workdir / f"n{size}"
    point.mkdir()
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            open_server(f"sim-{size}", _simulator_argv(2, 0.0), point)
        )
        urls = await read_lines(sim, 2)
        port = free_port()
        state_dir = point / "state"
        prefill(state_dir, size)
        config = point / "gateway.toml"
        config.write_text(gateway_toml(port, urls, state_dir))
        gw = await stack.enter_async_context(open_server("gateway", _gateway_argv(config), point))
        await wait_ready(gw, HOST, port, "/readyz")
        rss = rss_bytes(gw.pid)
        joins = await _join_paths(port)
        join = await measure_paths(port, joins, JOIN_REDIRECT, spec, "join")
        numbers = iter(range(10**9))
        create = await measure_paths(
            port, lambda: gateway_path("create", _create(next(numbers))), SUCCESS, spec, "create"
        )
    return {"meetings": size, "rss_mb": rss / 2**20, "create": create, "join": join}


def _create(n: int) -> list[tuple[str, str]]:
    mid = f"fresh-{n}"
    return [("meetingID", mid), ("name", f"Room {mid}"), ("maxParticipants", "1")]


async def _join_paths(port: int) -> Any:
    for n in range(SETUP_MEETINGS):
        created = await fetch(HOST, port, gateway_path("create", _create(-1 - n)))
        assert SUCCESS.met_by(created), created.body[:300]
    pool = [
        gateway_path(
            "join",
            [
                ("meetingID", f"fresh-{-1 - n % SETUP_MEETINGS}"),
                ("fullName", "U"),
                ("role", "VIEWER"),
            ],
        )
        for n in range(1000)
    ]
    joins = iter(range(10**9))
    return lambda: pool[next(joins) % len(pool)]
