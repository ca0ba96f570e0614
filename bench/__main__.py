"""``python -m bench join|create|lean|lms [--seconds S] [--connections N] [--warmup S] ...``;
``python -m bench curve NAME ...`` for the scaling curves (see bench/curves.py);
``python -m bench webhooks ...`` for webhook delivery (see bench/webhooks.py);
``python -m bench cluster ...`` for several workers on Redis (see bench/cluster.py)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench import report
from bench.measure import Options, measure
from bench.mix import MixOptions, Run, compare, run_mix, runs
from bench.processes import ServerFailed
from bench.scenarios import Scenario, create_scenario, join_scenario, lean_scenario
from bench.stack import Stack, open_stack
from bench.stats import Summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=["join", "create", "lean", "lms"])
    parser.add_argument("--seconds", type=float, default=10.0, help="per target")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per target, discarded")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every target, alternating")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="per target")
    parser.add_argument("--backends", type=int, default=2, help="simulated BBB servers")
    parser.add_argument(
        "--latency",
        "--backend-latency",
        type=float,
        default=0.0,
        help="simulated backend latency (s)",
    )
    parser.add_argument("--users", type=int, default=130, help="lms: simulated people")
    parser.add_argument("--meetings", type=int, default=100, help="join, lean: meetings to join")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    return parser.parse_args(argv)


async def scenario_for(name: str, stack: Stack, args: argparse.Namespace) -> Scenario:
    if name == "join":
        return await join_scenario(stack, args.meetings)
    if name == "lean":
        return await lean_scenario(stack, args.meetings)
    return create_scenario(stack)


async def run(args: argparse.Namespace) -> None:
    options = Options(args.seconds, args.connections, args.warmup, args.max_requests)
    shown = {k: v for k, v in vars(args).items() if k not in ("scenario", "no_save")}
    info = report.machine()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bbb-bench-") as workdir:
        async with open_stack(Path(workdir), args.backends, args.latency) as stack:
            scenario = await scenario_for(args.scenario, stack, args)
            report.print_header(args.scenario, info, shown)
            rounds = [await _round(scenario, options) for _ in range(args.rounds)]
    compared = [report.ratios(results, scenario.comparisons) for results in rounds]
    medians = report.median_ratios(compared)
    report.print_ratios(medians, len(rounds))
    if not args.no_save:
        doc = report.document(args.scenario, info, shown, rounds, compared, medians)
        doc["options"]["timestamp"] = stamp
        print(f"\nwritten: {report.write_json(args.scenario, stamp, doc)}")


async def run_lms(args: argparse.Namespace) -> None:
    options = MixOptions(args.users, args.seconds, args.warmup, args.max_requests)
    shown = {k: v for k, v in vars(args).items() if k not in ("scenario", "no_save")}
    info = report.machine()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bbb-bench-") as workdir:
        async with open_stack(Path(workdir), args.backends, args.latency) as stack:
            report.print_header("lms", info, shown)
            rounds = []
            for number in range(args.rounds):
                rounds.append({r.api.name: await _mix(r, options, number) for r in runs(stack)})
    compared = [compare(by_run) for by_run in rounds]
    report.print_call_ratios(compared)
    if not args.no_save:
        doc = report.mix_document(info, shown, rounds, compared)
        print(f"\nwritten: {report.write_json('lms', stamp, doc)}")


async def _mix(run: Run, options: MixOptions, number: int) -> dict[str, Any]:
    result = await run_mix(run, options, number)
    for summary in result["calls"].values():
        report.print_row(summary)
    print(f"  ({run.api.name}: server CPU {result['server_cpu_us_per_request']:.0f} µs/request)")
    return result


async def _round(scenario: Scenario, options: Options) -> list[Summary]:
    results = []
    for target in scenario.targets:
        results.append(await measure(target, options))
        report.print_row(results[-1])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["curve"]:
        from bench.curves import main as curves_main

        return curves_main(argv[1:])
    if argv[:1] == ["cluster"]:
        from bench.cluster import main as cluster_main

        return cluster_main(argv[1:])
    if argv[:1] == ["webhooks"]:
        from bench.webhooks import main as webhooks_main

        return webhooks_main(argv[1:])
    args = parse_args(argv)
    try:
        trio.run(run_lms if args.scenario == "lms" else run, args)
    except ServerFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
