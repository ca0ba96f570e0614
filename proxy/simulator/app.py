"""The quart-trio face of a :class:`~.core.Simulator`: HTTP in, HTTP out.

This layer only reads requests, applies the :class:`~.model.Behaviour`
(latency first, then the failure mode), asks the simulator for a decision and
writes it.  It owns two kinds of background work, both in the app's nursery
(alive while the app serves): a ticker that lets meetings end by time even
when nobody asks, and the notifications (``GET meetingEndedURL`` /
``endcallbackurl``; the recording-ready POSTs), sent without delaying any answer.

Error handling: a notification that fails (refused, timeout, HTTP error) is
dropped, as bbb-web drops it; nothing else here catches errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from html import escape

import httpx
import trio
from quart import Response, request
from quart_trio import QuartTrio

from proxy.bbb.envelope import CONTENT_TYPE, HEADERS

from .core import Simulator
from .meetings import FORM_TYPES
from .model import ApiRequest, Reply
from .webhook_sender import Post, Poster, deliver_hook

Notify = Callable[[str], Awaitable[None]]
NotifyReady = Callable[[str, str], Awaitable[None]]  # (url, JWT)

SECONDS = 1.0
NOTIFY_TIMEOUT = 2 * SECONDS
TICK_INTERVAL = 1 * SECONDS
GARBAGE = "this is not XML <response><returncode>SUCC"
HTML_500 = (
    "<html><head><title>500 Internal Server Error</title></head><body>"
    "<center><h1>500 Internal Server Error</h1></center><hr><center>nginx</center>"
    "</body></html>"
)
HTML_TYPE = "text/html;charset=utf-8"


async def send_notification(url: str) -> None:
    """One GET to an end-notification URL; any failure is ignored, as bbb-web does."""
    try:
        async with httpx.AsyncClient(timeout=NOTIFY_TIMEOUT) as client:
            await client.get(url)
    except (httpx.HTTPError, OSError):
        pass


async def send_recording_ready(url: str, token: str) -> None:
    """One recording-ready POST (``signed_parameters=<JWT>``); a failure is dropped, as the
    post_publish script logs it and gives up."""
    try:
        async with httpx.AsyncClient(timeout=NOTIFY_TIMEOUT) as client:
            await client.post(url, data={"signed_parameters": token})
    except (httpx.HTTPError, OSError):
        pass


async def send_analytics(url: str, token: str, body: bytes) -> None:
    """One analytics callback POST (JSON, bearer JWT); a failure is dropped."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        async with httpx.AsyncClient(timeout=NOTIFY_TIMEOUT) as client:
            await client.post(url, content=body, headers=headers)
    except (httpx.HTTPError, OSError):
        pass


def create_app(
    sim: Simulator,
    *,
    notify: Notify = send_notification,
    notify_ready: NotifyReady = send_recording_ready,
    tick_interval: float = TICK_INTERVAL,
    post_hook: Post | None = None,
) -> QuartTrio:
    """A quart-trio app serving ``sim`` at ``/bigbluebutton/api`` and ``/html5client/join``.

    ``notify`` sends one end notification (tests pass a recorder); ``post_hook`` one
    webhook POST (default: over HTTP, :class:`~.webhook_sender.Poster`).
    """
    app = QuartTrio(__name__)
    tickers: list[trio.CancelScope] = []  # one per serving of the app
    poster = Poster()
    post = post_hook or poster

    def flush() -> None:
        for url in sim.take_notifications():
            app.nursery.start_soon(notify, url)
        for url, token in sim.recordings.take_ready():
            app.nursery.start_soon(notify_ready, url, token)
        for url, token, body in sim.take_analytics():
            app.nursery.start_soon(send_analytics, url, token, body)
        for hook_id in sim.webhooks.take_work():
            app.nursery.start_soon(deliver_hook, sim.webhooks, hook_id, post)

    async def tick_forever() -> None:
        with trio.CancelScope() as scope:
            tickers.append(scope)
            while True:
                await trio.sleep(tick_interval)
                sim.tick()
                flush()

    @app.before_serving
    async def start_ticker() -> None:
        app.nursery.start_soon(tick_forever)
        app.nursery.start_soon(poster.close_when_cancelled)

    @app.after_serving
    async def stop_ticker() -> None:
        while tickers:
            tickers.pop().cancel()
        await poster.aclose()  # a later serving opens it again on first use

    async def api(call: str = "") -> Response:
        await trio.sleep(sim.behaviour.latency)
        mode = sim.behaviour.mode
        if mode == "hang":
            await trio.sleep_forever()
        if mode == "garbage":
            return Response(GARBAGE, 200, content_type=CONTENT_TYPE)
        if mode == "http500":
            return Response(HTML_500, 500, content_type=HTML_TYPE)
        reply = sim.handle(await read_api_request(call))
        flush()
        return to_response(reply)

    for rule in ("/bigbluebutton/api", "/bigbluebutton/api/", "/bigbluebutton/api/<path:call>"):
        app.add_url_rule(rule, view_func=api, methods=["GET", "POST"], strict_slashes=False)

    @app.route("/html5client/join")
    async def html5_join() -> Response:
        found = sim.session(request.args.get("sessionToken", ""))
        if found is None:
            return Response(
                "<html><body>Invalid session</body></html>", 404, content_type=HTML_TYPE
            )
        page = f"<!DOCTYPE html><html><body><p>joined {escape(found[0].name)}</p></body></html>"
        return Response(page, 200, content_type=HTML_TYPE)

    @app.route("/html5client/leave")
    async def html5_leave() -> Response:
        """The user of a ``sessionToken`` leaves its meeting (the client's Leave button)."""
        left = sim.leave(request.args.get("sessionToken", ""))
        flush()
        return Response("left\n" if left else "no such session\n", 200 if left else 404)

    return app


async def _get_body() -> bytes:
    data = await request.get_data(as_text=False)
    return data if isinstance(data, bytes) else data.encode()


async def read_api_request(call: str) -> ApiRequest:
    """The parts of the current request the simulator decides on."""
    content_type = request.mimetype.lower()
    form: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, bytes], ...] = ()
    body = b""
    if content_type in FORM_TYPES:
        form = tuple((await request.form).items(multi=True))
        files = tuple((k, f.read()) for k, f in (await request.files).items(multi=True))
    else:
        body = await _get_body()
    return ApiRequest(
        call=call.strip("/"),
        method=request.method,
        raw_query=_decode(request.query_string),
        form_params=form,
        content_type=content_type,
        body=body,
        origin=f"{request.scheme}://{request.host}",
        files=files,
        remote_addr=request.remote_addr or "",
        user_agent=request.headers.get("User-Agent", ""),
        referer=request.headers.get("Referer", ""),
    )


def _decode(raw: bytes) -> str:
    """The query string as received: UTF-8, else byte-for-byte Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def to_response(reply: Reply) -> Response:
    if reply.location is not None:
        headers = {"Location": reply.location, "Cache-Control": "no-cache"}
        return Response("", reply.status, headers=headers)
    return Response(
        reply.body, reply.status, headers={**HEADERS, "Content-Type": reply.content_type}
    )
