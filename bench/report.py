"""The results: a table on stdout and a JSON file under bench/results/."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.stats import Summary

RESULTS_DIR = Path(__file__).parent / "results"
COLUMNS = "{:<26} {:>9} {:>8} {:>8} {:>8} {:>7} {:>12} {:>13} {:>9}"
HEADER = (
    "target",
    "req/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "errors",
    "srv CPU µs/r",
    "front CPU µs/r",
    "loadgen%",
)


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def ratios(
    results: list[Summary], comparisons: tuple[tuple[str, str], ...]
) -> list[dict[str, Any]]:
    by_name = {r.name: r for r in results}
    return [
        {
            "subject": subject,
            "baseline": baseline,
            "throughput": by_name[subject].requests_per_second
            / by_name[baseline].requests_per_second,
            "p50": by_name[subject].p50_ms / by_name[baseline].p50_ms,
            "p99": by_name[subject].p99_ms / by_name[baseline].p99_ms,
        }
        for subject, baseline in comparisons
    ]


def print_header(scenario: str, info: dict[str, Any], options: dict[str, Any]) -> None:
    print(
        f"bench {scenario}: {options}\n"
        f"machine: {info['usable_cpus']} usable CPU(s) of {info['nproc']}, "
        f"Python {info['python']}, load {info['loadavg_1m_at_start']:.2f}\n"
        "The load generator runs on the same cores as the servers it measures: with few "
        "cores, it takes CPU from them\n(see loadgen%), so compare ratios, not absolute "
        "figures.\n",
        flush=True,
    )
    print(COLUMNS.format(*HEADER), flush=True)


def print_row(r: Summary) -> None:
    print(
        COLUMNS.format(
            r.name,
            f"{r.requests_per_second:.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.max_ms:.1f}",
            r.errors,
            f"{r.server_cpu_us_per_request:.0f}",
            "-" if math.isnan(r.front_cpu_us_per_request) else f"{r.front_cpu_us_per_request:.0f}",
            f"{r.loadgen_cpu_percent:.0f}",
        ),
        flush=True,
    )
    if r.first_error:
        print(f"  first error: {r.first_error[:300]}", flush=True)


def median_ratios(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per comparison, the median of each ratio over the rounds."""
    return [
        {
            "subject": same[0]["subject"],
            "baseline": same[0]["baseline"],
            **{k: statistics.median(r[k] for r in same) for k in ("throughput", "p50", "p99")},
        }
        for same in zip(*rounds, strict=True)
    ]


def print_ratios(rows: list[dict[str, Any]], rounds: int) -> None:
    print(f"\nratios (median of {rounds} round(s)):" if rounds > 1 else "")
    for row in rows:
        print(
            f"{row['subject']} / {row['baseline']}: throughput x{row['throughput']:.3f}, "
            f"p50 x{row['p50']:.2f}, p99 x{row['p99']:.2f}"
        )


def write_json(scenario: str, stamp: str, document: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{scenario}-{stamp}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def document(
    scenario: str,
    info: dict[str, Any],
    options: dict[str, Any],
    rounds: list[list[Summary]],
    compared: list[list[dict[str, Any]]],
    medians: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": info,
        "options": options,
        "rounds": [
            {"results": [dataclasses.asdict(r) for r in results], "ratios": ratios}
            for results, ratios in zip(rounds, compared, strict=True)
        ],
        "median_ratios": medians,
    }


def print_call_ratios(rounds: list[list[dict[str, Any]]]) -> None:
    """Per call, the gateway over its baseline; the median over rounds."""
    print(f"\ngateway / baseline per call (median of {len(rounds)} round(s)):")
    for same in zip(*rounds, strict=True):
        medians = {k: statistics.median(r[k] for r in same) for k in ("throughput", "p50", "p99")}
        print(
            f"{same[0]['call']:<17} vs {same[0]['baseline']:<7} throughput "
            f"x{medians['throughput']:.3f}  p50 x{medians['p50']:.2f}  p99 x{medians['p99']:.2f}"
        )


def mix_document(
    info: dict[str, Any],
    options: dict[str, Any],
    rounds: list[dict[str, dict[str, Any]]],
    compared: list[list[dict[str, Any]]],
) -> dict[str, Any]:
    return {
        "scenario": "lms",
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": info,
        "options": options,
        "rounds": [
            {
                "runs": {
                    name: {
                        "server_cpu_us_per_request": run["server_cpu_us_per_request"],
                        "calls": [dataclasses.asdict(s) for s in run["calls"].values()],
                    }
                    for name, run in by_run.items()
                },
                "ratios": ratios,
            }
            for by_run, ratios in zip(rounds, compared, strict=True)
        ],
    }
