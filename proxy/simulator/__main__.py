"""``python -m proxy.simulator``: run simulated BBB servers on consecutive ports.

Prints one API URL per line once every server listens, then serves until
interrupted.  The benchmarks run simulators in their own process this way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import trio

from .core import Simulator
from .model import MODES, Behaviour
from .server import serve_simulator


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxy.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="first port (0: any free ports)")
    parser.add_argument("--count", type=int, default=1, help="number of servers")
    parser.add_argument("--secret", required=True, help="the servers' shared secret")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--mode", choices=sorted(MODES), default="ok")
    parser.add_argument(
        "--expire-unjoined-minutes", type=float, default=5.0, help="negative: never expire"
    )
    parser.add_argument(
        "--seed-recordings", type=int, default=0, help="published recordings on each server"
    )
    parser.add_argument("--seed-meeting-id", default="seeded", help="their meetingID")
    parser.add_argument(
        "--seed-meta", action="append", default=[], metavar="KEY=VALUE", help="their metadata"
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    expire = args.expire_unjoined_minutes if args.expire_unjoined_minutes >= 0 else None
    async with trio.open_nursery() as nursery:
        for index in range(args.count):
            port = args.port + index if args.port else 0
            sim = Simulator(
                args.secret,
                server_name=f"bbb{index + 1}.example",
                behaviour=Behaviour(latency=args.latency, mode=args.mode),
                expire_unjoined_minutes=expire,
            )
            if args.seed_recordings:
                sim.recordings.seed(
                    args.seed_recordings,
                    meeting_id=args.seed_meeting_id,
                    metadata=dict(m.partition("=")[::2] for m in args.seed_meta),
                    start_ms=1_700_000_000_000 + index,  # distinct recordIDs per server
                )
            url = await nursery.start(partial(serve_simulator, sim, args.host, port))
            print(url, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
