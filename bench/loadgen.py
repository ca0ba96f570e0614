"""Closed-loop load: N keep-alive connections, each sending its next request
as soon as the previous answer is in, until a deadline or a request budget.

Latency is measured per request, from just before the request is sent to the
last byte of the answer.  A request whose answer is not what the target
expects (status, or a marker in the bytes, since BBB answers failures with
HTTP 200) counts as an error, not as a latency.

Error handling: a broken connection counts one error and is reopened; a
request that takes longer than ``request_timeout`` counts one error and its
connection is dropped.  Nothing here raises for the server's failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from bench.client import Connection, ConnectionFailed, Response

REQUEST_TIMEOUT = 10.0  # seconds


@dataclass(frozen=True, slots=True)
class Expect:
    """What a good answer looks like."""

    status: int
    marker: bytes = b""  # must occur in the head or body

    def met_by(self, response: Response) -> bool:
        return response.status == self.status and (
            not self.marker or response.contains(self.marker)
        )


@dataclass(slots=True)
class Tally:
    """What the workers found, shared by all of them (one trio thread: no locks)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    started: int = 0

    def error(self, detail: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or detail


@dataclass(frozen=True, slots=True)
class Load:
    host: str
    ports: tuple[int, ...]  # connection i goes to ports[i % len(ports)]
    next_path: Callable[[], str]
    expect: Expect
    connections: int
    seconds: float
    max_requests: int


async def run_load(load: Load) -> tuple[Tally, float]:
    """Apply ``load``; the tally and the elapsed wall-clock seconds."""
    tally = Tally()
    started = time.perf_counter()
    deadline = started + load.seconds
    async with trio.open_nursery() as nursery:
        for index in range(load.connections):
            port = load.ports[index % len(load.ports)]
            nursery.start_soon(_worker, load, port, tally, deadline)
    return tally, time.perf_counter() - started


def _more(load: Load, tally: Tally, deadline: float) -> bool:
    return tally.started < load.max_requests and time.perf_counter() < deadline


async def _worker(load: Load, port: int, tally: Tally, deadline: float) -> None:
    while _more(load, tally, deadline):
        try:
            async with Connection(load.host, port) as conn:
                await _requests(conn, load, tally, deadline)
        except ConnectionFailed as exc:
            tally.error(str(exc))
            await trio.sleep(0.01)  # a refused connection must not spin


async def _requests(conn: Connection, load: Load, tally: Tally, deadline: float) -> None:
    while _more(load, tally, deadline):
        tally.started += 1
        path = load.next_path()
        sent = time.perf_counter()
        with trio.move_on_after(REQUEST_TIMEOUT):
            response = await conn.get(path)
            _record(load.expect, response, time.perf_counter() - sent, tally)
            continue
        tally.error(f"timeout after {REQUEST_TIMEOUT} s")
        return


def _record(expect: Expect, response: Response, latency: float, tally: Tally) -> None:
    if expect.met_by(response):
        tally.latencies.append(latency)
    else:
        tally.error(f"HTTP {response.status}: {(response.head + response.body)[:300]!r}")
