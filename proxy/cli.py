"""``bbb-proxy serve --config PATH`` and ``bbb-proxy demo``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import trio

from proxy import demo
from proxy.config import load
from proxy.errors import ConfigError, StateError
from proxy.logs import setup_logging
from proxy.server import serve_gateway


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "serve":
            path = args.config or os.environ.get("BBB_PROXY_CONFIG")
            if not path:
                raise ConfigError("no configuration: pass --config PATH or set BBB_PROXY_CONFIG")
            config = load(path)
            trio.run(lambda: serve_gateway(config, handle_signals=True))
        else:
            trio.run(lambda: demo.run_demo(args.port, args.backends))
    except ConfigError as exc:
        print(f"bbb-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except StateError as exc:
        print(f"bbb-proxy: cannot load the saved state: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bbb-proxy", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML file (default: $BBB_PROXY_CONFIG)")
    run_demo = sub.add_parser("demo", help="run the gateway with simulated BBB servers")
    run_demo.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1")
    run_demo.add_argument("--backends", type=int, default=2, help="simulated BBB servers")
    return parser


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
