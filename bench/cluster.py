"""``./run bench cluster``: creates/s and joins/s with 1, 2 and 4 worker processes on one
Redis, beside the single-process gateway on its local journal, in one run.

Targets, each its own stack (its own ``python -m proxy.simulator`` process serving
``--backends`` simulated BBB servers, its own ``redis-server`` with AOF and ``appendfsync
always`` as the README requires, its own ``python -m proxy.cli serve``), all started first:

- ``local``: ``[store] kind = "local"``, one process (journal and fsync in ``state_dir``);
- ``redis xN`` for each N of ``--workers`` (default 1,2,4): ``[store] kind = "redis"``,
  ``[proxy] workers = N`` (N = 1: one process, no parent), every worker an instance on
  the shared ledger.

Then:

1. per target, ``--meetings`` meetings created (to be joined), and **idle** (``--idle``
   s): Redis commands per second with no request at all (replicas following the ledger,
   leases, heartbeats, backend polls): the background;
2. per Redis target, **counted**: ``--counted`` creates, then as many joins, sent one at a
   time with ``MONITOR`` on (slow: never while measuring throughput): each request's
   top-level Redis requests (a bound on its round trips, :mod:`bench.redis_stats`) and
   the commands its scripts ran, an idle window of the same length subtracted;
3. ``--rounds`` rounds; in each, every target in turn: **create** (warm-up, then
   ``--seconds``; closed loop over ``--connections`` keep-alive connections, every
   request a new meetingID, as ``bench create``), then every target in turn: **join**
   (the meetings round-robin, as ``bench join``).  Redis commands per request: the
   ``INFO commandstats`` delta, the background subtracted.  Alternating spreads the busy
   machine's swings over all targets alike.

Ratios: each target's creates/s and joins/s over ``local``'s in the same round, the
median over the rounds.  ``bench/results/cluster-*.json`` keeps every figure.  On a
2-core machine shared with the load generator, N workers cannot use N cores: compare
ratios, and read the CPU per request.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench import redis_stats, report
from bench.client import ConnectionFailed, fetch
from bench.loadgen import Expect, Load, run_load
from bench.processes import Server, ServerFailed, cpu_seconds, open_server, read_lines
from bench.scenarios import (
    JOIN_POOL,
    JOIN_REDIRECT,
    SUCCESS,
    create_params,
    gateway_path,
    unique_creates,
)
from bench.stack import HOST, _gateway_argv, _simulator_argv, free_port, gateway_toml
from bench.stats import summarise

START_TIMEOUT = 90.0  # seconds for every worker to listen (a busy 2-core machine)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    store: str  # "local" | "redis"
    workers: int


@dataclass(frozen=True, slots=True)
class Running:
    """One target's processes: the gateway (and its workers), the simulator, redis-server."""

    port: int
    redis_port: int | None
    servers: tuple[Server, ...]
    gateway: Server

    def pids(self) -> list[int]:
        return [s.pid for s in self.servers] + _children(self.gateway.pid)

    def cpu(self) -> float:
        return sum(self.cpu_by_role().values())

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far: the gateway's processes (parent and workers), the others."""
        gateway = [self.gateway.pid, *_children(self.gateway.pid)]
        found = {"gateway": sum(_cpu(pid) for pid in gateway)}
        for server in self.servers:
            if server is not self.gateway:
                found[server.name] = _cpu(server.pid)
        return found


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__)
    parser.add_argument("--workers", default="1,2,4", help="worker counts on Redis")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds, discarded")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--backends", type=int, default=2, help="simulated BBB servers")
    parser.add_argument("--meetings", type=int, default=100, help="meetings to join")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of background")
    parser.add_argument("--counted", type=int, default=100, help="requests under MONITOR")
    parser.add_argument("--rounds", type=int, default=3, help="every target, alternating")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return parser.parse_args(argv)


def variants(workers: str) -> list[Variant]:
    counts = [int(n) for n in workers.split(",")]
    return [Variant("local", "local", 1), *(Variant(f"redis x{n}", "redis", n) for n in counts)]


async def run(args: argparse.Namespace) -> None:
    shown = {k: v for k, v in vars(args).items() if k != "no_save"}
    info = report.machine()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bbb-bench-cluster-") as workdir:
        async with AsyncExitStack() as stack:
            targets = []
            for number, variant in enumerate(variants(args.workers)):
                directory = Path(workdir) / f"{number}"
                directory.mkdir()
                opened = open_target(directory, variant, args.backends)
                targets.append((variant, await stack.enter_async_context(opened)))
            report.print_header("cluster", info, shown)
            results = await measure_all(targets, args)
    ratios = compare(results)
    print_summary(results, ratios)
    if not args.no_save:
        doc = {
            "scenario": "cluster",
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "machine": info,
            "options": shown | {"timestamp": stamp},
            "targets": results,
            "ratios": ratios,
        }
        print(f"\nwritten: {report.write_json('cluster', stamp, doc)}")


# -- the processes ----------------------------------------------------------------------------


@asynccontextmanager
async def open_target(workdir: Path, variant: Variant, backends: int) -> AsyncIterator[Running]:
    async with AsyncExitStack() as stack:
        start = stack.enter_async_context
        sim = await start(open_server("simulator", _simulator_argv(backends, 0.0), workdir))
        urls = await read_lines(sim, backends)
        servers = [sim]
        redis_port = None
        if variant.store == "redis":
            redis_port = free_port()
            servers.append(await start(open_redis(workdir, redis_port)))
        port = free_port()
        config = workdir / "gateway.toml"
        config.write_text(_config(variant, port, urls, workdir / "state", redis_port))
        gateway = await start(open_server("gateway", _gateway_argv(config), workdir))
        await _ready(gateway, port, variant.workers)
        yield Running(port, redis_port, (gateway, *servers), gateway)


def _config(variant: Variant, port: int, urls: list[str], state: Path, redis: int | None) -> str:
    text = gateway_toml(port, urls, state)
    text = text.replace("[proxy]\n", f"[proxy]\nworkers = {variant.workers}\n", 1)
    if redis is not None:
        text += f'\n[store]\nkind = "redis"\nurl = "redis://{HOST}:{redis}/0"\n'
    return text


@asynccontextmanager
async def open_redis(workdir: Path, port: int) -> AsyncIterator[Server]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerFailed("redis-server not found (Debian's redis-server package)")
    data = workdir / "redis"
    data.mkdir()
    argv = [
        binary, "--bind", HOST, "--port", str(port), "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        "--logfile", str(data / "redis.log"), "--daemonize", "no",
    ]  # fmt: skip
    async with open_server("redis", argv, workdir) as server:
        with trio.move_on_after(START_TIMEOUT):
            while server.process.returncode is None:
                try:
                    if await redis_stats.command(port, "PING") == b"PONG":
                        break
                except (OSError, RuntimeError):
                    pass
                await trio.sleep(0.05)
        if server.process.returncode is not None:
            raise server.failed("redis-server exited")
        yield server


async def _ready(gateway: Server, port: int, workers: int) -> None:
    """/readyz answers 200 and, with several workers, every one listens."""
    with trio.move_on_after(START_TIMEOUT):
        while gateway.process.returncode is None:
            listening = workers == 1 or "workers listening on" in gateway.log.read_text()
            with contextlib.suppress(ConnectionFailed):
                if listening and (await fetch(HOST, port, "/readyz")).status == 200:
                    return
            await trio.sleep(0.1)
        raise gateway.failed(f"exited with status {gateway.process.returncode}")
    raise gateway.failed(f"not ready within {START_TIMEOUT} s")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            found += [int(p) for p in Path(path).read_text().split()]
    return found


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


# -- the measurements -------------------------------------------------------------------------


async def measure_all(
    targets: list[tuple[Variant, Running]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every target up at once; each round measures them in turn (creates, then joins),
    so that the machine's swings fall on all of them alike."""
    results: list[dict[str, Any]] = []
    joins = []
    for variant, running in targets:
        ids = [f"join-room-{n}" for n in range(args.meetings)]
        for meeting_id in ids:
            await _setup_create(running.port, meeting_id)
        joins.append(_joins(ids))
        results.append(
            {
                "name": variant.name,
                "store": variant.store,
                "workers": variant.workers,
                "background_redis_commands_per_second": await _idle_rate(running, args.idle),
                "create": [],
                "join": [],
            }
        )
    for (variant, running), source, result in zip(targets, joins, results, strict=True):
        result["monitor"] = None  # first: before the simulators hold many meetings
        if running.redis_port is not None:
            print(f"{variant.name}:", flush=True)
            result["monitor"] = await _count(running, args.counted, source, variant)
    creates = [unique_creates(f"c{n}", gateway_path) for n in range(len(targets))]
    for number in range(args.rounds):
        print(f"\nround {number + 1} of {args.rounds}", flush=True)
        for call, paths, expect in (("create", creates, SUCCESS), ("join", joins, JOIN_REDIRECT)):
            for (variant, running), source, result in zip(targets, paths, results, strict=True):
                background = result["background_redis_commands_per_second"]
                name = f"{variant.name} {call}"
                row = await _measure(name, running, source, expect, args, background)
                result[call].append(row)
    return results


async def _idle_rate(running: Running, seconds: float) -> float | None:
    if running.redis_port is None:
        return None
    before = await redis_stats.command_calls(running.redis_port)
    started = time.perf_counter()
    await trio.sleep(seconds)
    after = await redis_stats.command_calls(running.redis_port)
    return redis_stats.total_without_info(before, after) / (time.perf_counter() - started)


async def _measure(
    name: str,
    running: Running,
    paths: Callable[[], str],
    expect: Expect,
    args: argparse.Namespace,
    background: float | None,
) -> dict[str, Any]:
    load = partial(Load, HOST, (running.port,), paths, expect, args.connections)
    await run_load(load(args.warmup, 1_000_000))
    stats_before = await _calls(running)
    roles_before, own_before = running.cpu_by_role(), time.process_time()
    tally, elapsed = await run_load(load(args.seconds, 1_000_000))
    roles = {k: v - roles_before.get(k, 0.0) for k, v in running.cpu_by_role().items()}
    cpu, own = sum(roles.values()), time.process_time() - own_before
    stats_after = await _calls(running)
    summary = summarise(name, tally.latencies, tally.errors, elapsed, cpu, own, tally.first_error)
    report.print_row(summary)
    result: dict[str, Any] = asdict(summary)
    if summary.requests:
        result["cpu_us_per_request_by_process"] = {
            role: seconds / summary.requests * 1e6 for role, seconds in roles.items()
        }
        print(
            "  CPU µs per request: "
            + ", ".join(f"{k} {v:.0f}" for k, v in result["cpu_us_per_request_by_process"].items()),
            flush=True,
        )
    if stats_before is not None and stats_after is not None and summary.requests:
        commands = redis_stats.total_without_info(stats_before, stats_after)
        net = commands - (background or 0.0) * elapsed
        result["redis_commands_per_request"] = net / summary.requests
        result["redis_calls_per_request"] = {  # the background not subtracted here
            command: (n - stats_before.get(command, 0)) / summary.requests
            for command, n in stats_after.items()
            if command != "info" and n > stats_before.get(command, 0)
        }
        print(f"  redis: {net / summary.requests:.1f} commands per request", flush=True)
    return result


async def _calls(running: Running) -> dict[str, int] | None:
    if running.redis_port is None:
        return None
    return await redis_stats.command_calls(running.redis_port)


def _joins(ids: list[str]) -> Callable[[], str]:
    pool = [
        gateway_path(
            "join",
            [("meetingID", ids[n % len(ids)]), ("fullName", f"User {n}"), ("role", "VIEWER")],
        )
        for n in range(JOIN_POOL)
    ]
    return partial(next, itertools.cycle(pool))


async def _setup_create(port: int, meeting_id: str) -> None:
    response = await fetch(HOST, port, gateway_path("create", create_params(meeting_id)))
    if not SUCCESS.met_by(response):
        raise RuntimeError(f"set-up create {meeting_id} failed: {response.body[:300]!r}")


async def _count(
    running: Running, count: int, joins: Callable[[], str], variant: Variant
) -> dict[str, Any]:
    """Top-level Redis requests and script commands per create and per join (MONITOR)."""
    assert running.redis_port is not None
    creates = unique_creates(f"m{variant.workers}", gateway_path)
    found: dict[str, Any] = {}
    for call, paths, expect in (("create", creates, SUCCESS), ("join", joins, JOIN_REDIRECT)):
        busy, seconds, good, failure = await _monitored(running, count, paths, expect)
        idle, *_ = await _monitored(running, 0, paths, expect, seconds)
        names = set(busy.by_command) | set(idle.by_command)
        per = max(good, 1)  # per request answered as expected
        found[call] = {
            "requests": count,
            "answered_as_expected": good,
            "first_failure": failure,
            "round_trips_per_request": (busy.client_requests - idle.client_requests) / per,
            "script_commands_per_request": (busy.script_commands - idle.script_commands) / per,
            "per_request_by_command": {  # top-level commands, the idle window's subtracted
                name: (busy.by_command.get(name, 0) - idle.by_command.get(name, 0)) / per
                for name in sorted(names)
            },
            "commands_seen": busy.by_command,
            "idle_commands_seen": idle.by_command,
            "seconds": seconds,
        }
        print(
            f"  MONITOR, one {call} at a time: "
            f"{found[call]['round_trips_per_request']:.1f} round trips (at most), "
            f"{found[call]['script_commands_per_request']:.1f} commands in scripts; "
            + ", ".join(f"{k} {v:+.2f}" for k, v in found[call]["per_request_by_command"].items())
            + (f"; {count - good} failed: {failure}" if failure else ""),
            flush=True,
        )
    return found


async def _monitored(
    running: Running, count: int, paths: Callable[[], str], expect: Expect, idle: float = 0.0
) -> tuple[redis_stats.Tally, float, int, str]:
    """``count`` requests one at a time under MONITOR (then ``idle`` seconds): the tally,
    the seconds, the requests answered as expected, the first other answer."""
    assert running.redis_port is not None
    monitor = redis_stats.Monitor(running.redis_port)
    good, failure = 0, ""
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        started = time.perf_counter()
        for _ in range(count):
            response = await fetch(HOST, running.port, paths())
            if expect.met_by(response):
                good += 1
            else:
                failure = failure or repr(response.body[:300])
        await trio.sleep(idle)
        seconds = time.perf_counter() - started
        await trio.sleep(0.2)  # the last lines' way to the monitor
        monitor.stop()
    return monitor.tally, seconds, good, failure


# -- the report -------------------------------------------------------------------------------


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target's req/s over the local journal's in the same round; medians."""
    base = next(r for r in results if r["store"] == "local")
    rows = []
    for r in results:
        if r is base:
            continue
        row: dict[str, Any] = {"subject": r["name"], "baseline": base["name"]}
        for call in ("create", "join"):
            per_round = [
                mine["requests_per_second"] / theirs["requests_per_second"]
                for mine, theirs in zip(r[call], base[call], strict=True)
            ]
            row[f"{call}_throughput_rounds"] = per_round
            row[f"{call}_throughput"] = statistics.median(per_round)
        rows.append(row)
    return rows


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows if key in row]
    return statistics.median(values) if values else math.nan


def print_summary(results: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    print("\nmedians over the rounds: creates/s, joins/s; server CPU µs per create, per join;")
    print("Redis commands per create, per join (under load, background subtracted)")
    for r in results:
        c, j = r["create"], r["join"]
        print(
            f"  {r['name']:<9} {_median(c, 'requests_per_second'):7.0f}"
            f" {_median(j, 'requests_per_second'):7.0f}"
            f"   {_median(c, 'server_cpu_us_per_request'):7.0f}"
            f" {_median(j, 'server_cpu_us_per_request'):7.0f}"
            f"   {_median(c, 'redis_commands_per_request'):6.1f}"
            f" {_median(j, 'redis_commands_per_request'):6.1f}"
        )
    print("\nratios over the local journal, one process (median over the rounds):")
    for row in ratios:
        print(
            f"  {row['subject']} / {row['baseline']}: creates x{row['create_throughput']:.2f}, "
            f"joins x{row['join_throughput']:.2f}"
        )


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        trio.run(run, args)
    except ServerFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
