"""``bbb-proxy customers|backends|meetings|status``: the admin API from a shell.

Each subcommand is one or two admin API calls (:mod:`proxy.admin`); the URL and token
come from ``--url``/``--token`` or ``BBB_PROXY_ADMIN_URL``/``BBB_PROXY_ADMIN_TOKEN`` (the
environment keeps the token out of ``ps``).  Output is a table for people, or the API's
JSON with ``--json`` for scripts.

Exit codes: 0 done; 1 the API refused (bad input, unknown id, conflict, a wrong token,
which the API answers as "not found"); 2 a usage error or no connection to the gateway.
A secret is printed only by ``customers create``, ``customers rotate-secret`` and
``customers credentials``, the three commands that exist to show one.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import orjson

TIMEOUT = 15.0  # seconds for one admin call


class Failed(Exception):
    """The command failed: the message and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- talking to the API ------------------------------------------------------------------------


def request(args: argparse.Namespace, method: str, path: str, body: object = None) -> Any:
    """One admin call; the answer's JSON.

    Error handling: ``Failed`` with code 1 for an answer other than 2xx, code 2 for no
    URL or token, or no connection.
    """
    url = (args.url or os.environ.get("BBB_PROXY_ADMIN_URL") or "").rstrip("/")
    token = args.token or os.environ.get("BBB_PROXY_ADMIN_TOKEN") or ""
    if not url:
        raise Failed("no admin URL: pass --url or set BBB_PROXY_ADMIN_URL", 2)
    if not token:
        raise Failed("no admin token: pass --token or set BBB_PROXY_ADMIN_TOKEN", 2)
    content = None if body is None else orjson.dumps(body)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        response = httpx.request(
            method, f"{url}/admin/v1/{path}", headers=headers, content=content, timeout=TIMEOUT
        )
    except httpx.HTTPError as exc:
        raise Failed(f"cannot reach the gateway at {url}: {exc}", 2) from None
    return _answer(response)


def _answer(response: httpx.Response) -> Any:
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise Failed(f"the gateway answered HTTP {response.status_code}, not JSON", 1) from None
    if response.is_success:
        return document
    error = document.get("error", "refused") if isinstance(document, dict) else "refused"
    field = document.get("field") if isinstance(document, dict) else None
    if response.status_code == 404 and error == "not found":
        error = "not found (or a wrong token, or the admin API is off)"
    raise Failed(f"{field}: {error}" if field else str(error), 1)


# -- output ------------------------------------------------------------------------------------


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table under a header of ``columns``."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def fields(document: Mapping[str, Any]) -> str:
    """One ``name  value  (source)`` line per field of a shown customer or backend."""
    source = document.get("source", {})
    names = [k for k in document if k != "source"]
    width = max(len(n) for n in names)
    return "\n".join(
        f"{n.ljust(width)}  {_cell(document[n])}" + (f"  ({source[n]})" if n in source else "")
        for n in names
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:.3f}"
    return str(value)


def show(args: argparse.Namespace, document: Any, render: Callable[[Any], str]) -> None:
    print(
        orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
        if args.json
        else render(document)
    )


# -- the subcommands ---------------------------------------------------------------------------

CUSTOMER_COLUMNS = (
    "id",
    "enabled",
    "max_connections",
    "reserved_connections",
    "meetings",
    "secrets",
    "hosts",
)
BACKEND_COLUMNS = (
    "id", "mode", "health", "capacity", "reserved_connections", "meetings", "tags", "url"
)  # fmt: skip
MEETING_COLUMNS = ("customer", "meeting_id", "backend", "connections", "overtime", "confirmed")


def run(args: argparse.Namespace) -> None:
    """Run an admin subcommand.  Error handling: ``Failed`` (see :func:`request`)."""
    COMMANDS[(args.command, getattr(args, "action", None))](args)


def _customers_list(args: argparse.Namespace) -> None:
    show(args, request(args, "GET", "customers"), lambda d: table(d, CUSTOMER_COLUMNS))


def _customer_show(args: argparse.Namespace) -> None:
    show(args, request(args, "GET", f"customers/{_q(args.id)}"), fields)


def _customer_create(args: argparse.Namespace) -> None:
    body = {"id": args.id, **_given(args, _CUSTOMER_OPTIONS)}
    answer = request(args, "POST", "customers", body)
    show(
        args,
        answer,
        lambda d: f"customer {d['id']} created; its secret (shown once): {d['secret']}",
    )


def _customer_update(args: argparse.Namespace) -> None:
    body = _given(args, _CUSTOMER_OPTIONS) | dict.fromkeys(args.reset or [])
    show(args, request(args, "PATCH", f"customers/{_q(args.id)}", body), fields)


def _customer_delete(args: argparse.Namespace) -> None:
    show(
        args,
        request(args, "DELETE", f"customers/{_q(args.id)}"),
        lambda d: f"customer {d['id']} deleted",
    )


def _customer_rotate(args: argparse.Namespace) -> None:
    body = _given(args, {"secret": "secret", "grace": "grace_seconds"})
    answer = request(args, "POST", f"customers/{_q(args.id)}/secrets", body)
    show(args, answer, lambda d: f"new secret of {d['id']}: {d['secret']}\n" + _secrets(d))


def _customer_invite(args: argparse.Namespace) -> None:
    answer = request(args, "POST", f"customers/{_q(args.id)}/admins", {"email": args.email})
    show(args, answer, lambda d: f"invitation for {d['email']} (customer {d['customer']}), "
         f"valid until {_utc(d['expires_at'])}, usable once:\n{d['invitation_url']}")  # fmt: skip


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _customer_admins(args: argparse.Namespace) -> None:
    answer = request(args, "GET", f"customers/{_q(args.id)}/admins")
    rows = [{"email": a["email"], "state": "active"} for a in answer["admins"]] + [
        {"email": i["email"], "state": f"invited until {_utc(i['invited_until'])}"}
        for i in answer["invitations"]
    ]
    show(args, answer, lambda d: table(rows, ("email", "state")))


def _customer_remove_admin(args: argparse.Namespace) -> None:
    answer = request(args, "DELETE", f"customers/{_q(args.id)}/admins/{_q(args.email)}")
    show(args, answer, lambda d: f"administrator {d['email']} of {d['customer']} removed")


def _customer_credentials(args: argparse.Namespace) -> None:
    answer = request(args, "GET", f"customers/{_q(args.id)}/credentials")

    def render(d: Mapping[str, Any]) -> str:
        urls = [d["api_url"], *d["host_api_urls"]]
        return "\n".join(f"api_url  {u}" for u in urls) + "\n" + _secrets(d)

    show(args, answer, render)


def _secrets(d: Mapping[str, Any]) -> str:
    return "\n".join(
        f"secret   {s['secret']}"
        + (f"  (valid until {_cell(s['expires_at'])})" if s["expires_at"] else "")
        for s in d["secrets"]
    )


def _customer_timeline(args: argparse.Namespace) -> None:
    answer = request(args, "GET", f"customers/{_q(args.id)}/timeline")
    columns = (
        "meeting_id",
        "backend",
        "connections",
        "created_at",
        "reserved_until",
        "overtime_seconds",
    )
    steps = ("at", "held", "in_window")
    show(
        args,
        answer,
        lambda d: table(d["meetings"], columns) + "\n\n" + table(d["connections"], steps),
    )


def _backends_list(args: argparse.Namespace) -> None:
    show(args, request(args, "GET", "backends"), lambda d: table(d, BACKEND_COLUMNS))


def _backend_show(args: argparse.Namespace) -> None:
    show(args, request(args, "GET", f"backends/{_q(args.id)}"), fields)


def _backend_create(args: argparse.Namespace) -> None:
    body = {"id": args.id, **_given(args, _BACKEND_OPTIONS)}
    show(args, request(args, "POST", "backends", body), fields)


def _backend_update(args: argparse.Namespace) -> None:
    body = _given(args, _BACKEND_OPTIONS) | dict.fromkeys(args.reset or [])
    show(args, request(args, "PATCH", f"backends/{_q(args.id)}", body), fields)


def _backend_mode(mode: str) -> Callable[[argparse.Namespace], None]:
    def set_mode(args: argparse.Namespace) -> None:
        show(args, request(args, "PATCH", f"backends/{_q(args.id)}", {"mode": mode}), fields)

    return set_mode


def _backend_delete(args: argparse.Namespace) -> None:
    answer = request(args, "DELETE", f"backends/{_q(args.id)}")
    done = lambda d: (  # noqa: E731
        f"backend {d['id']} removed"
        if d["removed"]
        else f"backend {d['id']} draining: removed when its {d['meetings']} meetings have ended"
    )
    show(args, answer, done)


def _meetings_list(args: argparse.Namespace) -> None:
    query = urlencode(
        {k: v for k, v in (("customer", args.customer), ("backend", args.backend)) if v}
    )
    answer = request(args, "GET", "meetings" + (f"?{query}" if query else ""))
    show(args, answer, lambda d: table(d, MEETING_COLUMNS))


def _meeting_show(args: argparse.Namespace) -> None:
    show(args, request(args, "GET", f"meetings/{_q(args.customer)}/{_q(args.meeting_id)}"), fields)


def _meeting_end(args: argparse.Namespace) -> None:
    answer = request(args, "DELETE", f"meetings/{_q(args.customer)}/{_q(args.meeting_id)}")
    show(args, answer, lambda d: f"meeting {d['meeting_id']} of {d['customer']} ended")


def _status(args: argparse.Namespace) -> None:
    columns = (
        "id",
        "health",
        "mode",
        "meetings",
        "reserved_connections",
        "capacity",
        "accepts_meetings",
    )

    def render(d: Mapping[str, Any]) -> str:
        t = d["totals"]
        summary = (
            f"{t['backends']} backends ({t['accepting']} accepting meetings, {t['down']} down), "
            f"{t['meetings']} meetings, {t['reserved_connections']} of {t['capacity']} "
            f"connections reserved, {t['customers']} customers"
        )
        stores = [n for n in ("journal_failed", "runtime_store_failed") if d.get(n)]
        return "\n".join(
            [table(d["backends"], columns), "", summary, *(f"FAILED: {s}" for s in stores)]
        )

    show(args, request(args, "GET", "status"), render)


def _q(value: str) -> str:
    return quote(value, safe="")


def _given(args: argparse.Namespace, options: Mapping[str, str]) -> dict[str, Any]:
    """The API fields of the options given on the command line."""
    return {
        name: getattr(args, option)
        for option, name in options.items()
        if getattr(args, option) is not None
    }


_CUSTOMER_OPTIONS = {
    "max_connections": "max_connections",
    "default_max_participants": "default_max_participants",
    "default_duration": "default_duration",
    "enabled": "enabled",
    "hosts": "hosts",
    "default_tags": "default_tags",
    "required_tags": "required_tags",
    "secret": "secret",
}
_BACKEND_OPTIONS = {
    "backend_url": "url",
    "secret": "secret",
    "capacity": "capacity",
    "mode": "mode",
    "checksum_algorithm": "checksum_algorithm",
    "tags": "tags",
}

COMMANDS: Mapping[tuple[str, str | None], Callable[[argparse.Namespace], None]] = {
    ("customers", "list"): _customers_list,
    ("customers", "show"): _customer_show,
    ("customers", "create"): _customer_create,
    ("customers", "update"): _customer_update,
    ("customers", "delete"): _customer_delete,
    ("customers", "rotate-secret"): _customer_rotate,
    ("customers", "credentials"): _customer_credentials,
    ("customers", "invite"): _customer_invite,
    ("customers", "admins"): _customer_admins,
    ("customers", "remove-admin"): _customer_remove_admin,
    ("customers", "timeline"): _customer_timeline,
    ("backends", "list"): _backends_list,
    ("backends", "show"): _backend_show,
    ("backends", "create"): _backend_create,
    ("backends", "update"): _backend_update,
    ("backends", "drain"): _backend_mode("drain"),
    ("backends", "activate"): _backend_mode("active"),
    ("backends", "disable"): _backend_mode("disabled"),
    ("backends", "delete"): _backend_delete,
    ("meetings", "list"): _meetings_list,
    ("meetings", "show"): _meeting_show,
    ("meetings", "end"): _meeting_end,
    ("status", None): _status,
}
