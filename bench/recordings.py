"""``python -m bench.recordings``: getRecordings over many simulated backends.

For each size (recordings per backend), a fresh stack: one ``python -m proxy.simulator``
process serving ``--backends`` servers, each seeded with that many published recordings of
one customer's meeting (tagged as the gateway tags them), and the gateway (``python -m
proxy.cli serve``) in front of them.  Measured, median of ``--rounds`` listings:

- through the gateway (unpaged, everything): time to the first byte, time to the first
  ``<recording>``, total time, recordings listed;
- the same backends asked directly and at once (what the gateway waits for): the slowest
  one's time to first byte and total;
- the gateway's memory: VmRSS before the first listing and VmHWM (peak) after the last.

The closing ratios: gateway first byte / slowest backend's first byte, and the peak RSS
growth from the smallest to the largest size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio

from bench.processes import open_server, read_lines, wait_ready
from bench.stack import (
    BACKEND_SECRET,
    CUSTOMER,
    CUSTOMER_SECRET,
    HOST,
    _gateway_argv,
    _module,
    free_port,
    gateway_toml,
)
from proxy.bbb import rewrite
from proxy.bbb.checksum import signed_query

MEETING = "course-room"


@dataclass(frozen=True, slots=True)
class Timed:
    first_byte: float
    first_recording: float
    total: float
    recordings: int


async def timed_get(client: httpx.AsyncClient, url: str) -> Timed:
    started = time.perf_counter()
    first_byte = first_recording = 0.0
    count = 0
    tail = b""
    async with client.stream("GET", url) as response:
        async for chunk in response.aiter_raw():
            now = time.perf_counter() - started
            first_byte = first_byte or now
            window = tail + chunk
            if not first_recording and b"<recording>" in window:
                first_recording = now
            count += window.count(b"<recording>") - tail.count(b"<recording>")
            tail = window[-16:]
    return Timed(first_byte, first_recording, time.perf_counter() - started, count)


def memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def simulator_argv(backends: int, per_backend: int) -> list[str]:
    meta = [f"{k[len('meta_') :]}={v}" for k, v in rewrite.tags(CUSTOMER, MEETING, 60, 1.0)]
    seeded = ["--seed-recordings", str(per_backend)]
    seeded += ["--seed-meeting-id", rewrite.backend_meeting_id(CUSTOMER, MEETING)]
    for item in meta:
        seeded += ["--seed-meta", item]
    return [
        *_module("proxy.simulator"),
        *("--port", "0", "--count", str(backends), "--secret", BACKEND_SECRET),
        *("--expire-unjoined-minutes", "-1"),
        *seeded,
    ]


def direct_url(api: str) -> str:
    params = [(f"meta_{rewrite.CUSTOMER_TAG}", CUSTOMER)]
    return f"{api}/getRecordings?{signed_query('getRecordings', params, BACKEND_SECRET)}"


async def slowest_direct(client: httpx.AsyncClient, urls: list[str]) -> Timed:
    """Every backend asked at once, as the gateway asks them; the slowest figures."""
    results: list[Timed] = []

    async def one(url: str) -> None:
        results.append(await timed_get(client, url))

    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(one, url)
    return Timed(
        max(r.first_byte for r in results),
        max(r.first_recording for r in results),
        max(r.total for r in results),
        sum(r.recordings for r in results),
    )


def median(rows: list[Timed]) -> Timed:
    return Timed(
        statistics.median(r.first_byte for r in rows),
        statistics.median(r.first_recording for r in rows),
        statistics.median(r.total for r in rows),
        rows[0].recordings,
    )


async def measure(backends: int, per_backend: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-recordings-") as tmp:
        workdir = Path(tmp)
        argv = simulator_argv(backends, per_backend)
        async with open_server("simulator", argv, workdir) as sim:
            sim_urls = await read_lines(sim, backends)
            port = free_port()
            config = workdir / "gateway.toml"
            config.write_text(gateway_toml(port, sim_urls, workdir / "state"))
            async with open_server("gateway", _gateway_argv(config), workdir) as gw:
                await wait_ready(gw, HOST, port, "/readyz")
                query = signed_query("getRecordings", [], CUSTOMER_SECRET)
                url = f"http://{HOST}:{port}/{CUSTOMER}/bigbluebutton/api/getRecordings?{query}"
                async with httpx.AsyncClient(timeout=60) as client:
                    before = memory_kib(gw.pid)
                    through = [await timed_get(client, url) for _ in range(rounds)]
                    after = memory_kib(gw.pid)
                    direct = [
                        await slowest_direct(client, [direct_url(u) for u in sim_urls])
                        for _ in range(rounds)
                    ]
                    one = [await timed_get(client, direct_url(sim_urls[0])) for _ in range(rounds)]
    return {
        "backends": backends,
        "per_backend": per_backend,
        "gateway": median(through),
        "slowest_backend": median(direct),
        "one_backend": median(one),
        "rss_before_kib": before["VmRSS"],
        "hwm_after_kib": after["VmHWM"],
        "api_path": urlsplit(sim_urls[0]).path,
    }


def print_row(row: dict[str, object]) -> None:
    gw, slow, one = row["gateway"], row["slowest_backend"], row["one_backend"]
    assert isinstance(gw, Timed) and isinstance(slow, Timed) and isinstance(one, Timed)
    total = int(str(row["backends"])) * int(str(row["per_backend"]))
    print(
        f"{row['backends']:>3} x {row['per_backend']:>4} = {total:>6} | listed {gw.recordings:>6}"
        f" | gateway ttfb {gw.first_byte * 1000:7.1f} ms, first rec {gw.first_recording:6.3f} s,"
        f" total {gw.total:6.3f} s | slowest backend ttfb {slow.first_byte:6.3f} s,"
        f" total {slow.total:6.3f} s | one backend total {one.total:6.3f} s"
        f" | gateway RSS {row['rss_before_kib']} KiB -> peak {row['hwm_after_kib']} KiB"
    )


async def run(args: argparse.Namespace) -> None:
    rows = [await measure(args.backends, n, args.rounds) for n in args.sizes]
    for row in rows:
        print_row(row)
    small, large = rows[0], rows[-1]
    growth = (int(str(large["hwm_after_kib"])) - int(str(small["hwm_after_kib"]))) / 1024
    gw, slow = large["gateway"], large["slowest_backend"]
    assert isinstance(gw, Timed) and isinstance(slow, Timed)
    print(f"first byte / slowest backend's first byte: {gw.first_byte / slow.first_byte:.2f}")
    print(f"first recording / slowest backend's total: {gw.first_recording / slow.total:.2f}")
    print(f"peak RSS growth, smallest to largest size: {growth:.1f} MiB")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.recordings", description=__doc__)
    parser.add_argument("--backends", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    trio.run(run, parse_args(argv))


if __name__ == "__main__":
    main()
