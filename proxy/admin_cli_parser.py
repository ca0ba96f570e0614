"""The argument parser of ``bbb-proxy customers|backends|meetings|status`` (see
:mod:`proxy.admin_cli`, which runs what it parses)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``customers``, ``backends``, ``meetings`` and ``status`` to ``sub``."""
    api = type(common)(add_help=False, parents=[common])
    api.add_argument("--url", help="the gateway's base URL (default: $BBB_PROXY_ADMIN_URL)")
    api.add_argument("--token", help="the admin token (default: $BBB_PROXY_ADMIN_TOKEN)")
    api.add_argument("--json", action="store_true", help="print the API's JSON")
    sub.add_parser("status", parents=[api], help="every backend's health and load, and totals")
    _customers(
        sub.add_parser("customers", help="customers: list, create, change, rotate secrets"), api
    )
    _backends(sub.add_parser("backends", help="BBB servers: list, add, drain, remove"), api)
    _meetings(sub.add_parser("meetings", help="meetings held: list, show, end"), api)


def _customers(parser: argparse.ArgumentParser, api: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[api])
    for name in ("show", "delete", "credentials", "timeline"):
        actions.add_parser(name, parents=[api]).add_argument("id")
    for name in ("create", "update"):
        p = actions.add_parser(name, parents=[api])
        p.add_argument("id")
        required = name == "create"
        p.add_argument("--max-connections", type=int, required=required)
        p.add_argument("--default-max-participants", type=int, required=required)
        p.add_argument("--default-duration", type=int, required=required, help="minutes")
        p.add_argument("--enabled", type=_yes_no, help="yes or no")
        p.add_argument("--host", dest="hosts", action="append", help="repeat for each host name")
        p.add_argument("--default-tags", type=_tag_list, help="placement tags, a,b ('' none)")
        p.add_argument("--required-tags", type=_tag_list, help="its meetings need one; a,b")
        if required:
            p.add_argument("--secret", help="default: a new random one, printed once")
        else:
            p.add_argument(
                "--reset", action="append", metavar="FIELD", help="back to the file's value"
            )
            p.set_defaults(secret=None)
    invite = actions.add_parser(
        "invite", parents=[api], help="invite a customer administrator (prints a one-time link)"
    )
    invite.add_argument("id")
    invite.add_argument("email")
    actions.add_parser("admins", parents=[api], help="its administrators").add_argument("id")
    remove = actions.add_parser("remove-admin", parents=[api], help="remove an administrator")
    remove.add_argument("id")
    remove.add_argument("email")
    rotate = actions.add_parser("rotate-secret", parents=[api])
    rotate.add_argument("id")
    rotate.add_argument("--secret", help="default: a new random one, printed once")
    rotate.add_argument(
        "--grace", type=float, help="seconds the old secrets stay valid (default: 7 days)"
    )


def _backends(parser: argparse.ArgumentParser, api: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[api])
    for name in ("show", "delete", "drain", "activate", "disable"):
        actions.add_parser(name, parents=[api]).add_argument("id")
    for name in ("create", "update"):
        p = actions.add_parser(name, parents=[api])
        p.add_argument("id")
        required = name == "create"
        p.add_argument(
            "--backend-url", required=required, help="its API URL, .../bigbluebutton/api"
        )
        p.add_argument("--secret", required=required, help="its shared secret (bbb-conf --secret)")
        p.add_argument("--capacity", type=int, required=required, help="connections it may host")
        p.add_argument("--mode", choices=("active", "drain", "disabled"))
        p.add_argument("--checksum-algorithm", choices=("sha1", "sha256", "sha384", "sha512"))
        p.add_argument("--tags", type=_tag_list, help="placement tags, a,b ('' for none)")
        if not required:
            p.add_argument(
                "--reset", action="append", metavar="FIELD", help="back to the file's value"
            )


def _meetings(parser: argparse.ArgumentParser, api: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[api])
    listing.add_argument("--customer")
    listing.add_argument("--backend")
    for name in ("show", "end"):
        p = actions.add_parser(name, parents=[api])
        p.add_argument("customer")
        p.add_argument("meeting_id")


def _yes_no(value: str) -> bool:
    if value.lower() in ("yes", "true", "1"):
        return True
    if value.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError("yes or no")


def _tag_list(text: str) -> list[str]:
    """``a,b`` as a list of tags; ``""`` is none (the gateway checks each tag)."""
    return [t.strip() for t in text.split(",") if t.strip()]
