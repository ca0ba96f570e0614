"""The benchmark's load generator: HTTP parsing, percentiles, and a real local server."""

from __future__ import annotations

import itertools
import math
from functools import partial
from urllib.parse import urlsplit

import pytest
import trio
from hypercorn.trio import serve

from bench import bare
from bench.client import Connection, ConnectionFailed
from bench.http import ProtocolError, ResponseHead, parse_head, request_bytes
from bench.loadgen import Expect, Load, run_load
from bench.stats import percentile, summarise
from proxy.server import hypercorn_config

HEAD = b"HTTP/1.1 302 FOUND\r\nlocation: /x\r\ncontent-length: 3\r\n\r\n"


def test_parse_head_waits_for_the_blank_line() -> None:
    assert parse_head(HEAD[:-2]) is None
    assert parse_head(HEAD + b"abc") == ResponseHead(302, 3, len(HEAD))


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 OK\r\ncontent-length: 0\r\n\r\n",
        b"SPDY 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
    ],
)
def test_parse_head_refuses_what_it_cannot_frame(head: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(head)


def test_request_bytes_are_a_keep_alive_get() -> None:
    assert request_bytes("/a?b=1", "h:1").startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: h:1\r\n")


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert [percentile(values, f) for f in (0.0, 0.5, 0.99, 1.0)] == [1.0, 50.0, 99.0, 100.0]
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_summarise_counts_per_second_and_milliseconds() -> None:
    s = summarise("t", [0.002, 0.001, 0.003, 0.004], 1, 2.0, 0.004, 0.5)
    assert (s.requests, s.errors, s.requests_per_second) == (4, 1, 2.0)
    assert (s.p50_ms, s.p99_ms, s.max_ms) == (2.0, 4.0, 4.0)
    assert s.server_cpu_us_per_request == pytest.approx(1000.0)
    assert s.loadgen_cpu_percent == 25.0


@pytest.fixture
async def bare_port(nursery: trio.Nursery) -> int:
    config = hypercorn_config("127.0.0.1:0", 64 * 1024)
    binds: list[str] = await nursery.start(partial(serve, bare.create_app(), config))
    port = urlsplit(binds[0]).port
    assert port is not None
    return port


async def test_one_connection_carries_several_answers(bare_port: int) -> None:
    async with Connection("127.0.0.1", bare_port) as conn:
        join = await conn.get("/c/bigbluebutton/api/join?x=1")
        create = await conn.get("/c/bigbluebutton/api/create?x=2")
    assert join.status == 302 and join.contains(b"/bigbluebutton/api/join?")
    assert create.status == 200 and create.body == bare.XML


async def test_refused_connection_is_a_connection_failure() -> None:
    with pytest.raises(ConnectionFailed):
        async with Connection("127.0.0.1", 1):
            pass


async def test_load_stops_at_its_request_budget(bare_port: int) -> None:
    paths = partial(next, itertools.cycle(["/c/bigbluebutton/api/create?n=1"]))
    load = Load("127.0.0.1", (bare_port,), paths, Expect(200, b"SUCCESS"), 4, 5.0, 40)
    tally, elapsed = await run_load(load)
    assert (len(tally.latencies), tally.errors) == (40, 0)
    assert all(0 < latency <= elapsed for latency in tally.latencies)


async def test_unexpected_answers_are_errors_not_latencies(bare_port: int) -> None:
    paths = partial(next, itertools.cycle(["/c/bigbluebutton/api/join?n=1"]))
    load = Load("127.0.0.1", (bare_port,), paths, Expect(200), 2, 5.0, 10)
    tally, _ = await run_load(load)
    assert (tally.latencies, tally.errors) == ([], 10)
    assert tally.first_error.startswith("HTTP 302")
