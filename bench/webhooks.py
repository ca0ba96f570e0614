"""``./run bench webhooks``: webhook events through the gateway beside the backend's own.

Two simulated BBB servers and the customer's receiver run in this process; the gateway
runs as ``python -m proxy.cli serve`` (durable ledger, hooks and webhook queue, fsync,
in a temporary ``state_dir``).  Events are public chat messages: ``sendChatMessage``
sent straight to a simulated server makes its webhooks service (bbb-webhooks' behaviour,
``proxy/simulator/webhooks.py``) emit a ``chat-group-message-sent`` event whose text
carries a sequence number.

- **gateway**: the meeting is created through the gateway and the customer's hook is
  registered there (``hooks/create`` for that meeting); the server posts each event to
  the gateway's intake hook, the gateway verifies, maps, scrubs, journals (fsync) and
  answers, then POSTs it to the receiver;
- **direct** (the baseline): the same events from the other server, whose own hook
  (``hooks/create`` on the server) points at the receiver.

Measured, per path: throughput (``--events`` sent ``--concurrency`` at a time, from the
first send to the last arrival at the receiver) and latency (``--paced`` events at
``--rate`` per second, each from just before its ``sendChatMessage`` to its arrival at
the receiver: p50, p99).  Then a receiver that takes 5 s per POST beside a fast one:
two meetings through the gateway, events to each at half ``--rate``; the fast hook's latency
with the other meeting's receiver fast, then with it slow.  Ratios close the report;
``bench/results/webhooks-*.json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from bench import report
from bench.processes import ServerFailed, open_server, wait_ready
from bench.stack import (
    BACKEND_SECRET,
    CUSTOMER,
    CUSTOMER_SECRET,
    HOST,
    _gateway_argv,
    free_port,
    gateway_toml,
)
from bench.stats import percentile
from proxy.bbb.checksum import signed_query
from proxy.simulator import Simulator, serve_simulator

SLOW_SECONDS = 5.0  # the slow receiver's time per POST


@dataclass
class Receiver:
    """The customer's endpoint: when each numbered event arrived, by path."""

    url: str = ""
    slow: set[str] = field(default_factory=set)  # paths that take SLOW_SECONDS per POST
    arrived: dict[str, dict[int, float]] = field(default_factory=dict)

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if scope["path"] in self.slow:
            await trio.sleep(SLOW_SECONDS)
        self.arrived.setdefault(scope["path"], {}).setdefault(number(body), time.perf_counter())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def count(self, path: str) -> int:
        return len(self.arrived.get(path, {}))


def number(body: bytes) -> int:
    """The sequence number in a callback's chat message (``bench-<n>``); -1 if none."""
    try:
        [event] = orjson.loads(dict(parse_qsl(body.decode()))["event"])
        text = event["data"]["attributes"]["chat-message"]["message"]
        return int(text.removeprefix("bench-"))
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError):
        return -1


@dataclass(frozen=True, slots=True)
class Source:
    """Where one path's events come from: a server and its meeting, and where they land."""

    name: str
    sim_url: str
    meeting_id: str  # the server's meetingID
    path: str  # at the receiver


async def serve_receiver(nursery: trio.Nursery, receiver: Receiver) -> None:
    config = HypercornConfig()
    config.bind = [f"{HOST}:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, receiver.app, config, mode="asgi"))
    receiver.url = str(binds[0])


async def api(
    http: httpx.AsyncClient, base: str, call: str, params: list[tuple[str, str]], secret: str
) -> str:
    response = await http.get(f"{base}/{call}?{signed_query(call, params, secret)}")
    response.raise_for_status()
    if "<returncode>SUCCESS</returncode>" not in response.text:
        raise RuntimeError(f"{call}: {response.text[:300]}")
    return response.text


async def send_events(
    http: httpx.AsyncClient, source: Source, numbers: Sequence[int], sent: dict[int, float]
) -> None:
    for n in numbers:
        sent[n] = time.perf_counter()
        params = [("meetingID", source.meeting_id), ("message", f"bench-{n}")]
        await api(http, source.sim_url, "sendChatMessage", params, BACKEND_SECRET)


async def wait_for(receiver: Receiver, path: str, numbers: list[int], seconds: float) -> None:
    """Until every one of ``numbers`` has arrived at ``path`` (at most ``seconds``)."""
    wanted = set(numbers)
    with trio.fail_after(seconds):
        while not wanted <= receiver.arrived.get(path, {}).keys():  # noqa: ASYNC110
            await trio.sleep(0.005)


async def throughput(
    http: httpx.AsyncClient,
    receiver: Receiver,
    source: Source,
    first: int,
    events: int,
    concurrency: int,
) -> float:
    """Events per second from the first send to the last arrival."""
    sent: dict[int, float] = {}
    numbers = list(range(first, first + events))
    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(send_events, http, source, numbers[k::concurrency], sent)
    await wait_for(receiver, source.path, numbers, 120)
    arrived = receiver.arrived[source.path]
    last = max(arrived[n] for n in numbers)
    return events / (last - min(sent.values()))


async def paced(
    http: httpx.AsyncClient,
    source: Source,
    numbers: list[int],
    rate: float,
    sent: dict[int, float],
) -> None:
    """Send ``numbers`` at ``rate`` per second (each on its own: a slow send delays none)."""
    async with trio.open_nursery() as nursery:
        for n in numbers:
            nursery.start_soon(send_events, http, source, [n], sent)
            await trio.sleep(1 / rate)


async def latencies(
    http: httpx.AsyncClient,
    receiver: Receiver,
    source: Source,
    first: int,
    events: int,
    rate: float,
) -> list[float]:
    """Seconds from each paced send to its arrival."""
    sent: dict[int, float] = {}
    numbers = list(range(first, first + events))
    await paced(http, source, numbers, rate, sent)
    await wait_for(receiver, source.path, numbers, 60)
    arrived = receiver.arrived[source.path]
    return sorted(arrived[n] - sent[n] for n in numbers)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * percentile(values, 0.50),
        "p99_ms": 1000 * percentile(values, 0.99),
        "mean_ms": 1000 * statistics.fmean(values),
    }


async def setup(
    http: httpx.AsyncClient,
    stack: AsyncExitStack,
    nursery: trio.Nursery,
    workdir: Path,
    receiver: Receiver,
) -> dict[str, Source]:
    """Both servers, the gateway process, meetings and hooks; the event sources by name."""
    behind, direct = Simulator(BACKEND_SECRET), Simulator(BACKEND_SECRET)
    behind_url = await nursery.start(serve_simulator, behind)
    direct_url = await nursery.start(serve_simulator, direct)
    port = free_port()
    config = workdir / "gateway.toml"
    toml = gateway_toml(port, [behind_url], workdir / "state")
    toml = toml.replace("[proxy]\n", "[proxy]\nallow_private_callbacks = true\n", 1)
    config.write_text(toml + "\n[webhooks]\ndelivery_timeout = 10.0\n")
    gateway = await stack.enter_async_context(
        open_server("gateway", _gateway_argv(config), workdir)
    )
    await wait_ready(gateway, HOST, port, "/readyz")
    gw_api = f"http://{HOST}:{port}/{CUSTOMER}/bigbluebutton/api"
    with trio.fail_after(20):  # the gateway registers its intake hook on its backend
        while not behind.webhooks.hooks:  # noqa: ASYNC110 - another server's state
            await trio.sleep(0.05)
    sources: dict[str, Source] = {}
    for name in ("gateway", "fast", "other"):
        await api(http, gw_api, "create", [("meetingID", name), ("name", name)], CUSTOMER_SECRET)
        [backend_id] = set(behind.meetings) - {s.meeting_id for s in sources.values()}
        hook = [("callbackURL", f"{receiver.url}/{name}"), ("meetingID", name)]
        await api(http, gw_api, "hooks/create", hook, CUSTOMER_SECRET)
        sources[name] = Source(name, behind_url, backend_id, f"/{name}")
    await api(
        http, direct_url, "create", [("meetingID", "direct"), ("name", "direct")], BACKEND_SECRET
    )
    hook = [("callbackURL", f"{receiver.url}/direct"), ("meetingID", "direct")]
    await api(http, direct_url, "hooks/create", hook, BACKEND_SECRET)
    sources["direct"] = Source("direct", direct_url, "direct", "/direct")
    return sources


async def run(args: argparse.Namespace) -> dict[str, Any]:
    receiver = Receiver()
    results: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=64)
    with tempfile.TemporaryDirectory(prefix="bbb-bench-webhooks-") as workdir:
        async with (
            AsyncExitStack() as stack,
            httpx.AsyncClient(timeout=30, limits=limits) as http,
            trio.open_nursery() as nursery,
        ):
            await serve_receiver(nursery, receiver)
            sources = await setup(http, stack, nursery, Path(workdir), receiver)
            for name in ("direct", "gateway"):
                results[name] = await measure(http, receiver, sources[name], args)
            results["slow"] = await beside_slow(http, receiver, sources, args)
            nursery.cancel_scope.cancel()
    return results


async def measure(
    http: httpx.AsyncClient, receiver: Receiver, source: Source, args: argparse.Namespace
) -> dict[str, Any]:
    rate = await throughput(http, receiver, source, 0, args.events, args.concurrency)
    paced = await latencies(http, receiver, source, args.events, args.paced, args.rate)
    row = {"events_per_s": rate, **summary(paced)}
    print(
        f"  {source.name:8} {rate:8.0f} events/s   latency p50 {row['p50_ms']:6.1f} ms"
        f"   p99 {row['p99_ms']:6.1f} ms"
    )
    return row


async def beside_slow(
    http: httpx.AsyncClient,
    receiver: Receiver,
    sources: dict[str, Source],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The fast hook's latency beside another meeting's hook, at the same pace: first with
    a fast receiver there, then with one that takes 5 s per POST."""
    rows: dict[str, Any] = {}
    for label, first in (("beside_fast", 0), ("beside_slow", args.paced)):
        if label == "beside_slow":
            receiver.slow.add("/other")
        async with trio.open_nursery() as nursery:
            numbers = list(range(first, first + args.paced))
            rate = args.rate / 2  # the two meetings together: the intake's pace of before
            nursery.start_soon(paced, http, sources["other"], numbers, rate, {})
            fast = await latencies(http, receiver, sources["fast"], first, args.paced, rate)
        rows[label] = summary(fast)
        print(
            f"  fast {label.replace('_', ' '):12} latency p50 {rows[label]['p50_ms']:6.1f} ms"
            f"   p99 {rows[label]['p99_ms']:6.1f} ms"
        )
    rows["slow_delivered"] = receiver.count("/other") - args.paced
    print(f"  (the slow receiver answered {rows['slow_delivered']} meanwhile)")
    return rows


def ratios(results: dict[str, Any]) -> dict[str, float]:
    gw, direct, slow = results["gateway"], results["direct"], results["slow"]
    return {
        "throughput_gateway_over_direct": gw["events_per_s"] / direct["events_per_s"],
        "latency_p50_gateway_over_direct": gw["p50_ms"] / direct["p50_ms"],
        "latency_p99_gateway_over_direct": gw["p99_ms"] / direct["p99_ms"],
        "added_latency_p50_ms": gw["p50_ms"] - direct["p50_ms"],
        "added_latency_p99_ms": gw["p99_ms"] - direct["p99_ms"],
        "fast_p50_beside_slow_over_beside_fast": (
            slow["beside_slow"]["p50_ms"] / slow["beside_fast"]["p50_ms"]
        ),
        "fast_p99_beside_slow_over_beside_fast": (
            slow["beside_slow"]["p99_ms"] / slow["beside_fast"]["p99_ms"]
        ),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./run bench webhooks", description=__doc__)
    parser.add_argument("--events", type=int, default=1000, help="throughput: events per path")
    parser.add_argument("--concurrency", type=int, default=8, help="throughput: sends at once")
    parser.add_argument("--paced", type=int, default=200, help="latency: events per path")
    parser.add_argument("--rate", type=float, default=10.0, help="latency: events per second")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info, stamp = report.machine(), time.strftime("%Y%m%dT%H%M%S")
    print(f"webhooks: {vars(args)}; {info['usable_cpus']} CPUs, load {info['loadavg_1m_at_start']}")
    try:
        results = trio.run(run, args)
    except ServerFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    closing = ratios(results)
    for key, value in closing.items():
        print(f"  {key:34} {value:8.2f}")
    if not args.no_save:
        doc = {
            "scenario": "webhooks",
            "machine": info,
            "options": vars(args) | {"at": stamp},
            "results": results,
            "ratios": closing,
        }
        print(f"\nwritten: {report.write_json('webhooks', stamp, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
