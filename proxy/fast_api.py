"""The API's GET calls answered without quart's per-request machinery.

Most of a join's or a forwarded getMeetingInfo's CPU went to quart, not to the
gateway: a request object and an app and request context per request, two tasks
in a nursery, URL routing over every route, and signals (``bench/README.md``,
"One process, leaner").  A body-less ``GET /<customer>/bigbluebutton/api/<call>``
needs none of it: :func:`fast_api` answers it straight from the ASGI scope with the
very same code the quart route runs (:func:`proxy.app.api_answer`, the same
``Response`` object, the same bytes on the wire; a whole body goes in one message
with its end), and hands every other
request to quart unchanged.

Taken here, and only here (anything else goes to quart):

- method ``GET`` (``HEAD`` and ``OPTIONS`` are quart's: it answers them itself);
- a path of the exact shape ``/<customer>/bigbluebutton/api/<call>`` with a customer
  segment and a call made of letters and single slashes (``hooks/create``): quart
  routes exactly these to the same handler with the same arguments;
- no request body: neither ``Content-Length`` (other than 0) nor
  ``Transfer-Encoding``.

As quart-trio does, the (empty) body is read first (so the answer's last part is not
held back, :func:`proxy.server.closing_unread`), the answer is given up when the client goes away
(``http.disconnect`` cancels it), the answer's sending is bounded by the app's
``RESPONSE_TIMEOUT``, and an unexpected exception is answered BBB's
``internalError`` envelope and logged.  Once the answer is out, nothing is cancelled: the
task watching for the disconnect ends on the ``http.disconnect`` hypercorn reports as the
answer's end is written (or after :data:`DISCONNECT_GRACE`, should it not come).

Served by :mod:`proxy.front` (the scope's ``bbb_proxy.watched`` extension), the loop
there watches the client and bounds the send itself: the answer is just made and sent.

Error handling: nothing raised by the call escapes (see above); a failure to send
propagates to hypercorn as with quart.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import trio
from quart import Response
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from quart_trio import QuartTrio

from proxy.app import api_answer, internal_error
from proxy.calls import Incoming
from proxy.front import API_PATH, WATCHED
from proxy.gateway import Gateway
from proxy.metrics import Metrics

log = logging.getLogger("proxy.app")

# How long a request's task waits, after its answer is out, for hypercorn's word that the
# stream is closed (an ``http.disconnect``, sent as the answer's end is written) before it
# stops waiting (cancelled: a second Cancelled per request was most of the watcher's cost).
DISCONNECT_GRACE = 1.0
_API_PATH = re.compile(API_PATH)


def fast_api(gw: Gateway, metrics: Metrics, quart: QuartTrio) -> Any:
    """The ASGI app: the API's body-less GETs answered here, the rest by ``quart``."""
    timeout = response_timeout(quart)

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            return await quart(scope, receive, send)
        found = _API_PATH.fullmatch(scope["path"])
        incoming = _incoming(scope, found) if found else None
        if incoming is None:
            return await quart(scope, receive, send)
        if (await receive())["type"] == "http.disconnect":  # else the (empty) body: read whole
            return None
        if WATCHED in scope.get("extensions", ()):  # proxy.front cancels it and bounds the send
            return await _send(send, await _answer(gw, metrics, incoming, scope["path"]))
        answered: list[bool] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, answered)
            response = await _answer(gw, metrics, incoming, scope["path"])
            if timeout is not None:  # sending out of time cancels all, the watcher too
                nursery.cancel_scope.deadline = trio.current_time() + timeout
            await _send(send, response)
            # The watcher ends on the disconnect hypercorn reports after the answer.
            answered.append(True)
            nursery.cancel_scope.deadline = trio.current_time() + DISCONNECT_GRACE
        return None

    return asgi


def response_timeout(quart: QuartTrio) -> float | None:
    """The app's bound on sending an answer (``RESPONSE_TIMEOUT``), in seconds; None: none."""
    timeout = quart.config["RESPONSE_TIMEOUT"]
    return None if timeout is None else float(timeout)


def _incoming(scope: Any, found: re.Match[str]) -> Incoming | None:
    """The request as :func:`proxy.calls.handle` reads it; None if it has a body."""
    host = content_type = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = host if host is not None else value.decode("latin-1")
        elif name == b"content-type":
            content_type = content_type if content_type is not None else value.decode("latin-1")
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return None
    return Incoming(
        customer_id=found.group(1),
        host=host or "",
        call=found.group(2),
        raw_query=scope["query_string"].decode("utf-8", "replace"),
        content_type=content_type,
    )


async def _answer(gw: Gateway, metrics: Metrics, incoming: Incoming, path: str) -> Response:
    try:
        return await api_answer(gw, metrics, incoming)
    except Exception:
        log.exception("unexpected error answering %s", path)
        return internal_error()


async def _cancel_on_disconnect(
    receive: Any, scope: trio.CancelScope, answered: list[bool]
) -> None:
    """Cancel the call when the client goes away; once answered, just end."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not answered:
        scope.cancel()


async def _send(send: Any, response: Response) -> None:
    """The answer, as quart's ASGI layer sends it (a streamed body part by part)."""
    headers = encode_headers(response.headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    if isinstance(response.response, DataBody):  # one part and the end in one message:
        data = await response.get_data(as_text=False)  # the same bytes on the wire
        await send({"type": "http.response.body", "body": data, "more_body": False})
        return
    async with response.response as body:
        async for data in body:
            chunk = data.encode() if isinstance(data, str) else data
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
