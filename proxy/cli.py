"""``bbb-proxy serve --config PATH`` and ``bbb-proxy demo``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import trio

from proxy import demo
from proxy.config import load
from proxy.errors import ConfigError, StateError
from proxy.logs import FORMATS, setup_logging
from proxy.server import serve_gateway


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bbb-proxy``; the exit code.

    Error handling: 2 for a configuration error, 3 for a ledger state that cannot be
    loaded or a ``state_dir`` that cannot be written, each with one line on stderr and
    no traceback, also when the error comes out of a task group; 130 on Ctrl-C.
    """
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format or "auto")
    try:
        _run(args)
    except BaseException as exc:
        return _exit_code(_single(exc))
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command == "serve":
        path = args.config or os.environ.get("BBB_PROXY_CONFIG")
        if not path:
            raise ConfigError("no configuration: pass --config PATH or set BBB_PROXY_CONFIG")
        config = load(path)
        if args.log_format is None:  # the flag wins over [proxy] log_format
            setup_logging(args.log_level, config.proxy.log_format)
        trio.run(lambda: serve_gateway(config, handle_signals=True))
    else:
        trio.run(lambda: demo.run_demo(args.port, args.backends))


def _single(exc: BaseException) -> BaseException:
    """The one kind of error a task group holds (its first), else the group itself."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    kinds = {_code(leaf) for leaf in leaves}
    return leaves[0] if len(kinds) == 1 and None not in kinds else exc


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _exit_code(exc: BaseException) -> int:
    match exc:
        case ConfigError():
            _say(f"configuration error: {exc}")
        case StateError():
            _say(f"ledger state in state_dir: {exc}")
        case KeyboardInterrupt():
            pass
        case _:
            raise exc
    code = _code(exc)
    assert code is not None
    return code


_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),
    (StateError, 3),
    (KeyboardInterrupt, 130),
)


def _code(exc: BaseException) -> int | None:
    return next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), None)


def _say(message: str) -> None:
    print("bbb-proxy: " + " ".join(message.split()), file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bbb-proxy", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument(
        "--log-format", choices=FORMATS, help="default: [proxy] log_format, else auto"
    )
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
