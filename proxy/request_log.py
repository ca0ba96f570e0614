"""One log line per request: who asked what, what it was answered, how long it took.

The line is written in one place, :func:`logged` (an ASGI wrapper round the whole
app), when the answer has been sent.  What it says is gathered while the request
runs into a :class:`RequestEntry` held in a context variable: trio copies the
context into every task a request starts, so the calls a getMeetings fan-out makes
to several backends in child tasks all add to the same entry, and every other log
line written meanwhile carries the request's id (:class:`proxy.logs.RequestIdFilter`).

Who fills in what:

- :func:`logged`: the request id (new for each request; sent back as ``X-Request-Id``),
  the method, path, client address, HTTP status and duration;
- :func:`proxy.calls.handle` (:func:`note_call`): the call, the customer and the
  meetingID, first as asked, then as verified;
- :func:`observing` (the backend clients' observer): each backend called, and a DEBUG
  line per backend call with its outcome and duration;
- the web layer (:func:`note_result`): success or the answer's messageKey.

The client address is the TCP peer's; ``X-Forwarded-For`` is believed only when the
peer is one of ``[proxy] trusted_proxies``, and then only up to the first address
(from the right) that is not a trusted proxy itself: anything left of that was
written by the client and proves nothing.  Query strings are never logged (they
carry checksums); customer and meeting ids are quoted through
:func:`proxy.logs.shown`.

Probes (``/healthz``, ``/readyz``, ``/metrics``) get an id header but no line: they
come every few seconds and say nothing about customers.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from proxy.backends.client import Observer
from proxy.logs import REQUEST_ID, shown

log = logging.getLogger("proxy.request")
backend_log = logging.getLogger("proxy.backend")

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
ID_BYTES = 8  # 16 hex digits: unique enough to find one request in a day of logs

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class RequestEntry:
    """What one request's line will say.  Mutable on purpose: it is filled in by
    the parts of the request as they learn things, child tasks included."""

    id: str
    method: str
    path: str
    client: str
    started: float  # time.perf_counter()
    call: str | None = None
    customer: str | None = None
    meeting_id: str | None = None
    result: str | None = None
    status: int | None = None
    backends: list[str] = field(default_factory=list)

    def fields(self, now: float) -> dict[str, object]:
        """The line's fields, as the JSON format writes them (see the README)."""
        return {
            "request_id": self.id,
            "method": self.method,
            "path": shown(self.path),
            "call": self.call,
            "customer": self.customer,
            "meetingID": self.meeting_id,
            "backend": ",".join(self.backends) or None,
            "result": self.result,
            "status": self.status,
            "duration_ms": round((now - self.started) * 1000, 1),
            "client": self.client,
        }


_CURRENT: ContextVar[RequestEntry | None] = ContextVar("bbb_proxy_request", default=None)


def current() -> RequestEntry | None:
    """The request being answered by this task, if any."""
    return _CURRENT.get()


def note_call(call: str, customer: str | None, meeting_id: str | None) -> None:
    """The API call, its customer and meetingID (each as known so far)."""
    entry = _CURRENT.get()
    if entry is None:
        return
    entry.call = shown(call)
    entry.customer = None if customer is None else shown(customer)
    entry.meeting_id = None if meeting_id is None else shown(meeting_id)


def note_result(result: str, *, unless_known: bool = False) -> None:
    """The request's result: ``success`` or the messageKey it was answered."""
    entry = _CURRENT.get()
    if entry is not None and not (unless_known and entry.result is not None):
        entry.result = result


def note_backend(backend_id: str) -> None:
    entry = _CURRENT.get()
    if entry is not None and backend_id not in entry.backends:
        entry.backends.append(backend_id)


def observing(observer: Observer) -> Observer:
    """A backend clients' observer that also notes the backend and logs the call (DEBUG)."""

    def observe(backend: str, call: str, outcome: str, seconds: float) -> None:
        note_backend(backend)
        if backend_log.isEnabledFor(logging.DEBUG):
            ms = round(seconds * 1000, 1)
            fields = {"backend": backend, "call": call, "outcome": outcome, "duration_ms": ms}
            backend_log.debug(
                "%s %s: %s in %s ms", backend, call, outcome, ms, extra={"fields": fields}
            )
        observer(backend, call, outcome, seconds)

    return observe


# -- the client's address -----------------------------------------------------------------------


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address: ``peer``, or what trusted proxies say they were called by.

    ``forwarded_for``: the X-Forwarded-For header values, in order.  Walking from the
    right, each address written by a trusted proxy is taken while that address is
    itself trusted; the first untrusted (or, if all are, the leftmost) is the client.
    A value that is not an IP address stops the walk at the last address believed.
    """
    if not trusted or not _trusted(peer, trusted):  # no proxies trusted: no address parsed
        return peer
    chain = [a.strip() for value in forwarded_for for a in value.split(",") if a.strip()]
    client = peer
    for address in reversed(chain):
        if _ip(address) is None:
            break
        client = address
        if not _trusted(address, trusted):
            break
    return client


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in network for network in trusted)


# -- the ASGI wrapper ---------------------------------------------------------------------------


def new_id() -> str:
    return secrets.token_hex(ID_BYTES)


def logged(app: Any, trusted: Sequence[Network]) -> Any:
    """The ASGI app, with an ``X-Request-Id`` on every answer and a line per request."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)  # type: ignore[no-any-return]
        entry = _entry(scope, trusted)
        token, id_token = _CURRENT.set(entry), REQUEST_ID.set(entry.id)
        quiet = scope.get("path") in QUIET_PATHS
        written = False

        async def sending(message: Any) -> None:
            nonlocal written
            if message["type"] == "http.response.start":
                entry.status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", entry.id.encode())]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Written before the last part leaves: whoever has the answer finds its line.
                written = written or quiet or write(entry)
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            _CURRENT.reset(token)
            REQUEST_ID.reset(id_token)
            if not (written or quiet):
                write(entry)  # no answer was sent (the client went away, or the app failed)
        return None

    return asgi


def _entry(scope: Any, trusted: Sequence[Network]) -> RequestEntry:
    peer = (scope.get("client") or ("-", 0))[0]
    forwarded = [
        value.decode("latin-1")
        for name, value in scope.get("headers", ())
        if name.lower() == b"x-forwarded-for"
    ]
    return RequestEntry(
        id=new_id(),
        method=scope.get("method", "-"),
        path=scope.get("path", ""),
        client=client_address(peer, forwarded, trusted),
        started=time.perf_counter(),
    )


def write(entry: RequestEntry) -> bool:
    """The request's line (INFO), its fields attached for the JSON format; True."""
    if not log.isEnabledFor(logging.INFO):
        return True  # nobody reads it: not even its fields are made
    fields = entry.fields(time.perf_counter())
    what = entry.call or fields["path"]
    who = f"{entry.customer or '-'}/{entry.meeting_id or '-'}"
    log.info(
        "%s %s %s -> %s: %s (HTTP %s) %s ms from %s",
        entry.method,
        what,
        who,
        fields["backend"] or "-",
        entry.result or "-",
        entry.status or "-",
        fields["duration_ms"],
        entry.client,
        extra={"fields": fields, "request_id": entry.id},
    )
    return True


def asked_meeting_id(raw_query: str) -> str | None:
    """The meetingID a query string asks for, before its checksum is verified."""
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        if name == "meetingID":
            return value
    return None
