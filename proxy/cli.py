"""``bbb-proxy``: ``serve``, ``demo``, ``check-config`` and the admin subcommands.

``bbb-proxy serve --config PATH`` runs the gateway; ``bbb-proxy check-config FILE``
checks a configuration file and exits; ``customers``, ``backends``, ``meetings`` and
``status`` talk to a running gateway's admin API (:mod:`proxy.admin_cli`).
``--log-level`` (and ``--log-format``) may come before or after the subcommand.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import trio

from proxy import admin_cli, admin_cli_parser, demo
from proxy.config import Config, load
from proxy.errors import ConfigError, StateError
from proxy.logs import FORMATS, setup_logging
from proxy.server import check_listen, serve_gateway
from proxy.workers import Seat, StartFailed, serve_workers


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bbb-proxy``; the exit code.

    Error handling: 2 for a usage or configuration error (a ``bind`` that cannot be
    listened on: busy, unresolvable), 3 for a ledger state that cannot be loaded or a
    ``state_dir`` that cannot be written, each with one line on stderr and no traceback,
    also when the error comes out of a task group; 130 on Ctrl-C.  With ``[proxy]
    workers > 1``, a worker that cannot start: its exit code (it said why).  The admin
    subcommands: 1 when the API refused, 2 when the gateway cannot be reached.
    """
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        _say(f"usage error: {exc} (see bbb-proxy --help)")
        return 2
    setup_logging(args.log_level, args.log_format or "auto")
    try:
        _run(args)
    except admin_cli.Failed as failed:
        _say(str(failed))
        return failed.code
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
        _serve(args, path, config)
    elif args.command == "demo":
        check_listen(f"127.0.0.1:{args.port}")
        trio.run(lambda: demo.run_demo(args.port, args.backends))
    elif args.command == "check-config":
        config = load(args.file)
        check_listen(config.proxy.bind, try_bind=False)
        print(_summary(args.file, config))
    else:
        admin_cli.run(args)


def _serve(args: argparse.Namespace, path: str, config: Config) -> None:
    """One gateway process; or, with ``[proxy] workers > 1``, their parent; or one of
    them (started by the parent, :mod:`proxy.workers`)."""
    seat = Seat.from_environ()
    if seat is not None:
        trio.run(lambda: serve_gateway(config, handle_signals=True, worker=seat))
    elif config.proxy.workers > 1:
        options = ["--log-level", args.log_level]
        options += ["--log-format", args.log_format] if args.log_format else []
        trio.run(lambda: serve_workers(config, path, options))
    else:
        check_listen(config.proxy.bind)
        trio.run(lambda: serve_gateway(config, handle_signals=True))


def _summary(path: str, config: Config) -> str:
    admin = "on" if config.proxy.admin_token else "off (no admin_token)"
    workers = f", {config.proxy.workers} workers" if config.proxy.workers > 1 else ""
    return (
        f"{path}: ok: {len(config.backends)} backends, {len(config.customers)} customers, "
        f"listening on {config.proxy.bind}{workers}, admin API {admin}"
    )


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
        case StartFailed():
            _say(str(exc))
            return exc.code
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
    (StartFailed, 1),  # its own code: see _exit_code
    (KeyboardInterrupt, 130),
)


def _code(exc: BaseException) -> int | None:
    return next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), None)


def _say(message: str) -> None:
    print("bbb-proxy: " + " ".join(message.split()), file=sys.stderr)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line and exit code 2 (see :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bbb-proxy", description=__doc__)
    # Given before or after the subcommand: the subcommands' copies do not override the
    # main parser's value unless they are given (default SUPPRESS).
    parser.add_argument("--log-level", default="INFO", choices=LEVELS)
    parser.add_argument(
        "--log-format", choices=FORMATS, help="default: [proxy] log_format, else auto"
    )
    common = _Parser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LEVELS)
    common.add_argument("--log-format", default=argparse.SUPPRESS, choices=FORMATS)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--config", help="TOML file (default: $BBB_PROXY_CONFIG)")
    run_demo = sub.add_parser(
        "demo", parents=[common], help="run the gateway with simulated BBB servers"
    )
    run_demo.add_argument("--port", type=_port, default=8080, help="gateway port on 127.0.0.1")
    run_demo.add_argument(
        "--backends", type=_count(1, 20), default=2, help="simulated BBB servers (1-20)"
    )
    check = sub.add_parser("check-config", parents=[common], help="check a configuration file")
    check.add_argument("file")
    admin_cli_parser.add_parsers(sub, common)
    return parser


LEVELS = ["DEBUG", "INFO", "WARNING"]


def _port(text: str) -> int:
    return _count(1, 65535)(text)


def _count(low: int, high: int) -> Callable[[str], int]:
    def number(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {low}-{high}")
        return int(text)

    return number


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
