"""Locust-style simulated users on trio: ``class Teacher(User)`` with weighted ``@task``\\ s.

Locust itself runs on gevent, which cannot drive trio code, and its per-request
overhead would take a large share of this 2-core machine from the servers under
test; so this module keeps locust's *way of writing* a load (user classes,
``weight``, ``wait_time = between(a, b)``, ``@task(n)``, ``on_start``) on a lean
runner (:mod:`bench.swarm`) and the raw-socket client (:mod:`bench.client`).

A user calls ``await self.call(name, port, path, expect)``; the answer's latency
is recorded under ``name`` in the shared :class:`CallStats`, or an error if the
answer is not what ``expect`` says.  Time and count bounds are the runner's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from bench.client import Connection, ConnectionFailed, Response
from bench.loadgen import REQUEST_TIMEOUT, Expect, Tally

type TaskMethod = Callable[[Any], Awaitable[None]]
type WaitTime = Callable[[Any], float]  # called as a method, like locust's


def task[M: Callable[..., Awaitable[None]]](weight: int) -> Callable[[M], M]:
    """Mark a coroutine method as a task picked ``weight`` times as often as a weight-1 task."""

    def mark(method: M) -> M:
        method.task_weight = weight  # type: ignore[attr-defined]
        return method

    return mark


def between(low: float, high: float) -> WaitTime:
    """A think time drawn uniformly from ``[low, high]`` seconds (locust's ``between``)."""
    return lambda _user: random.uniform(low, high)


@dataclass(slots=True)
class CallStats:
    """Every user's answers, per call name (one trio thread: no locks)."""

    tallies: dict[str, Tally] = field(default_factory=dict)

    def tally(self, name: str) -> Tally:
        return self.tallies.setdefault(name, Tally())


class User:
    """One simulated person: ``on_start`` once, then weighted tasks with think times."""

    weight: ClassVar[int] = 1
    wait_time: ClassVar[WaitTime] = between(0.0, 0.0)

    def __init__(self, stats: CallStats, host: str) -> None:
        self.stats = stats
        self.host = host
        self._connections: dict[int, Connection] = {}

    async def on_start(self) -> None:
        """Called once before the first task."""

    @classmethod
    def tasks(cls) -> list[tuple[TaskMethod, int]]:
        found = (getattr(cls, name) for name in dir(cls))
        return [(m, m.task_weight) for m in found if hasattr(m, "task_weight")]

    async def call(self, name: str, port: int, path: str, expect: Expect) -> Response | None:
        """GET ``path`` on ``port``; the answer if it met ``expect``, else None (an error)."""
        tally = self.stats.tally(name)
        tally.started += 1
        sent = time.perf_counter()
        response = await self._get(port, path, tally)
        if response is None:
            return None
        if not expect.met_by(response):
            tally.error(f"{name} HTTP {response.status}: {response.body[:200]!r}")
            return None
        tally.latencies.append(time.perf_counter() - sent)
        return response

    async def _get(self, port: int, path: str, tally: Tally) -> Response | None:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                return await (await self._connection(port)).get(path)
            except ConnectionFailed as exc:
                tally.error(str(exc))
                self._drop(port)
                return None
        tally.error(f"timeout after {REQUEST_TIMEOUT} s")
        self._drop(port)
        return None

    async def _connection(self, port: int) -> Connection:
        conn = self._connections.get(port)
        if conn is None:
            conn = await Connection(self.host, port).__aenter__()
            self._connections[port] = conn
        return conn

    def _drop(self, port: int) -> None:
        conn = self._connections.pop(port, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for port in list(self._connections):
            self._drop(port)
