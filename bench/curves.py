"""``python -m bench curve fanout|ledger|memory|snapshot|fsync|gateway-ledger|all``.

Each curve prints a markdown table, writes ``bench/results/curve-<name>.png``
and ``bench/results/curve-<name>-<timestamp>.json``.  Every loop is bounded:
by the sizes given, and for loads by ``--seconds`` and a request budget.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from bench import ledger_curves as lc
from bench import report
from bench.gateway_curves import LoadSpec, fanout_curve, ledger_size_point
from bench.plot import markdown_table, save_plot

RESULTS = report.RESULTS_DIR
KB = 1024


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench curve", description=__doc__)
    parser.add_argument("name", choices=[*CURVES, "all"])
    parser.add_argument("--seconds", type=float, default=5.0, help="per load point")
    parser.add_argument("--warmup", type=float, default=1.0, help="per load point")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.02, help="fanout: backend latency (s)")
    parser.add_argument("--backends", default="1,5,10,25,50,100", help="fanout: counts")
    parser.add_argument("--sizes", default="100,1000,10000,100000", help="ledger sizes")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _spec(args: argparse.Namespace) -> LoadSpec:
    return LoadSpec(args.seconds, args.connections, args.warmup)


async def fanout(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rows = await fanout_curve(workdir, _ints(args.backends), args.latency, _spec(args))
    table = [
        (
            r["backends"],
            r["req_s"],
            r["p50_ms"],
            r["p99_ms"],
            r["errors"],
            r["gateway_cpu_ms_per_request"],
            r["simulators_cpu_ms_per_request"],
            r["direct_p50_ms"],
        )
        for r in rows
    ]
    xs = [r["backends"] for r in rows]
    series = {
        "gateway p50": [r["p50_ms"] for r in rows],
        "gateway p99": [r["p99_ms"] for r in rows],
    }
    headers = [
        "backends",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "gateway CPU ms/req",
        "simulator process CPU ms/req",
        "1 backend direct p50 ms",
    ]
    title = f"getMeetings through the gateway, backends answering in {args.latency * 1000:.0f} ms"
    return _done("fanout", rows, headers, table, (title, "backends", "ms", xs, series), 60.0)


async def ledger(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rows = [{"meetings": n, **lc.create_and_join_cost(n)} for n in _ints(args.sizes)]
    base = rows[0]
    table = [
        (
            r["meetings"],
            r["create_us"],
            r["create_us"] / base["create_us"],
            r["join_lookup_us"],
            r["join_lookup_us"] / base["join_lookup_us"],
        )
        for r in rows
    ]
    headers = ["meetings held", "create µs", "× first", "join look-up µs", "× first"]
    xs = [r["meetings"] for r in rows]
    series = {
        "create (admit+reserve+confirm)": [r["create_us"] for r in rows],
        "join look-up": [r["join_lookup_us"] for r in rows],
    }
    plot = ("LedgerState in-process: cost per operation", "meetings held", "µs", xs, series)
    return _done("ledger", rows, headers, table, plot, None, logx=True)


async def memory(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rows = [
        {"meetings": n, "bytes_per_meeting": lc.memory_per_meeting(n)} for n in _ints(args.sizes)
    ]
    table = [
        (r["meetings"], r["bytes_per_meeting"], r["bytes_per_meeting"] * 10_000 / 2**20)
        for r in rows
    ]
    headers = ["meetings", "bytes/meeting (tracemalloc)", "MB per 10,000"]
    xs = [r["meetings"] for r in rows]
    plot = (
        "LedgerState memory (tracemalloc)",
        "meetings held",
        "bytes per meeting",
        xs,
        {"bytes/meeting": [r["bytes_per_meeting"] for r in rows]},
    )
    return _done("memory", rows, headers, table, plot, 2 * KB, logx=True)


async def snapshot(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rows = []
    for n in _ints(args.sizes):
        if n >= 1000:
            rows.append({"meetings": n, **await lc.snapshot_and_recovery(workdir, n)})
            print(f"  snapshot {rows[-1]}", flush=True)
    table = [
        (
            r["meetings"],
            r["journal_recovery_s"],
            r["snapshot_write_s"],
            r["snapshot_recovery_s"],
            r["snapshot_bytes"] / 2**20,
        )
        for r in rows
    ]
    headers = [
        "meetings",
        "recovery, journal only (s)",
        "snapshot write (s)",
        "recovery, snapshot (s)",
        "snapshot MB",
    ]
    xs = [r["meetings"] for r in rows]
    series = {
        k.replace("_s", "").replace("_", " "): [r[k] for r in rows]
        for k in ("journal_recovery_s", "snapshot_write_s", "snapshot_recovery_s")
    }
    plot = ("Snapshot write and recovery time", "meetings in the ledger", "seconds", xs, series)
    return _done("snapshot", rows, headers, table, plot, None, logx=True)


async def fsync(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rows = []
    for concurrency in (1, 8, 32):
        creates = 1000 if concurrency == 1 else 4000
        on = await lc.journal_cost(workdir, True, creates, concurrency)
        off = await lc.journal_cost(workdir, False, creates, concurrency)
        rows.append({"concurrency": concurrency, "fsync_us": on, "no_fsync_us": off})
    table = [
        (
            r["concurrency"],
            r["fsync_us"],
            r["no_fsync_us"],
            r["fsync_us"] / r["no_fsync_us"],
            1e6 / r["fsync_us"],
        )
        for r in rows
    ]
    headers = [
        "creates at once",
        "µs/create fsync",
        "µs/create no fsync",
        "ratio",
        "creates/s fsync",
    ]
    xs = [r["concurrency"] for r in rows]
    series = {
        "fsync on": [r["fsync_us"] for r in rows],
        "fsync off": [r["no_fsync_us"] for r in rows],
    }
    plot = ("Ledger + FileJournal per create", "creates in flight", "µs per create", xs, series)
    return _done("fsync", rows, headers, table, plot, None, logx=True)


async def gateway_ledger(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rows = []
    for n in _ints(args.sizes):
        rows.append(await ledger_size_point(workdir, n, _spec(args)))
        print(f"  gateway ledger {rows[-1]}", flush=True)
    base = rows[0]
    table = [
        (
            r["meetings"],
            r["create"]["req_s"],
            r["create"]["req_s"] / base["create"]["req_s"],
            r["create"]["p50_ms"],
            r["join"]["req_s"],
            r["join"]["req_s"] / base["join"]["req_s"],
            r["join"]["p50_ms"],
            r["rss_mb"],
            (r["rss_mb"] - base["rss_mb"]) * 2**20 / max(r["meetings"] - base["meetings"], 1),
        )
        for r in rows
    ]
    headers = [
        "meetings held",
        "create req/s",
        "× first",
        "create p50 ms",
        "join req/s",
        "× first",
        "join p50 ms",
        "gateway RSS MB",
        "RSS bytes/meeting vs first",
    ]
    xs = [r["meetings"] for r in rows]
    series = {
        "create req/s": [r["create"]["req_s"] for r in rows],
        "join req/s": [r["join"]["req_s"] for r in rows],
    }
    plot = ("Through the gateway, ledger pre-filled", "meetings held", "req/s", xs, series)
    return _done("gateway-ledger", rows, headers, table, plot, None, logx=True)


type Curve = Callable[[argparse.Namespace, Path], Any]
CURVES: dict[str, Curve] = {
    "fanout": fanout,
    "ledger": ledger,
    "memory": memory,
    "snapshot": snapshot,
    "fsync": fsync,
    "gateway-ledger": gateway_ledger,
}


def _done(
    name: str,
    rows: list[dict[str, Any]],
    headers: list[str],
    table: list[Any],
    plot: tuple[str, str, str, list[Any], dict[str, list[float]]],
    target: float | None,
    *,
    logx: bool = False,
) -> dict[str, Any]:
    text = markdown_table(headers, table)
    print(f"\n{name}:\n{text}\n", flush=True)
    title, xlabel, ylabel, xs, series = plot
    png = save_plot(
        RESULTS / f"curve-{name}.png", title, xlabel, ylabel, xs, series, logx=logx, target=target
    )
    print(f"plot: {png}", flush=True)
    return {"curve": name, "rows": rows, "table": text}


async def run(args: argparse.Namespace) -> None:
    names = list(CURVES) if args.name == "all" else [args.name]
    info = report.machine()
    with tempfile.TemporaryDirectory(prefix="bbb-curves-") as workdir:
        for name in names:
            doc = await CURVES[name](args, Path(workdir))
            doc.update(machine=info, options=vars(args), command=f"python -m bench curve {name}")
            stamp = time.strftime("%Y%m%dT%H%M%S")
            path = RESULTS / f"curve-{name}-{stamp}.json"
            path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            print(f"written: {path}", flush=True)


def main(argv: Sequence[str]) -> int:
    trio.run(run, parse_args(argv))
    return 0
