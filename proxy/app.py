"""The web layer: routes only, each a few lines; everything else is in :mod:`proxy.calls`.

Request sizes are bounded here: a query longer than ``max_query_bytes`` and a
body longer than ``max_body_bytes`` are refused with BBB's envelope before
anything is parsed.  Any error escaping a route still answers BBB's envelope
(HTTP 200), never a stack trace or an HTML page.
"""

from __future__ import annotations

import hmac
import logging
import math
import time

import orjson
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from proxy import admin, portal, request_log
from proxy.bbb import callbacks, envelope, recording_ready
from proxy.bbb import recordings as rules
from proxy.calls import Incoming, analytics, handle, result_of, version_document
from proxy.calls.ended import meeting_ended
from proxy.calls.recording_ready import ReadyQueue
from proxy.errors import ValidationError
from proxy.gateway import Gateway
from proxy.metrics import Metrics
from proxy.readiness import readiness
from proxy.request import Answer
from proxy.request_body import GatewayRequest, chunks, streams_body
from proxy.voice import fsapi
from proxy.webhooks import intake as webhook_intake

log = logging.getLogger(__name__)
HOME = "This is a BigBlueButton API gateway; the API is at /<customer>/bigbluebutton/api.\n"


def create_app(gw: Gateway) -> QuartTrio:
    app = QuartTrio(__name__)
    app.request_class = GatewayRequest  # upload bodies read as they arrive (request_body.py)
    # A path with "//" is not redirected (an HTML 308 BBB never sends): it matches no route,
    # and under /bigbluebutton/ that is BBB's unsupportedRequest.
    app.url_map.merge_slashes = False
    # The largest body any call may have; each call's own bound is checked in _incoming.
    app.config["MAX_CONTENT_LENGTH"] = max(gw.config.proxy.max_body_bytes, _upload_limit(gw))
    metrics = Metrics(gw)
    gw.observe_backends(request_log.observing(metrics.observe_backend))  # added ones too
    ready = ReadyQueue.open(gw)  # recording-ready deliveries, resumed from state_dir
    analytics.install(app, gw)  # analytics callbacks: backends' in, customers' out (issue 12)
    webhook_intake.install(app, gw)  # backends' webhook events in; the gateway's hook on each
    portal.install(app, gw)  # the customer administrators' pages under /portal/ (issue 11)
    fsapi.install(app, gw)  # POST /fsapi: FreeSWITCH's dial-in router (issue 12)

    @app.before_serving
    async def deliver_recording_ready() -> None:
        gw.spawn("recording-ready", ready.deliver_forever)

    @app.route(recording_ready.PATH, methods=["POST"])
    async def recording_ready_notice() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        status = await ready.receive(request.query_string.decode("utf-8", "replace"), body)
        metrics.recording_ready_notice(status)
        return Response(f"{status}\n", status, content_type="text/plain")

    @app.route("/<customer>/bigbluebutton/api", methods=["GET", "POST"])
    @app.route("/<customer>/bigbluebutton/api/", methods=["GET", "POST"])
    async def version(customer: str) -> Response:
        return _response(version_document())

    @app.route("/bigbluebutton/api", methods=["GET", "POST"])
    @app.route("/bigbluebutton/api/", methods=["GET", "POST"])
    async def host_version() -> Response:
        return _response(version_document())

    @app.route("/<customer>/bigbluebutton/api/<path:call>", methods=["GET", "POST"])
    async def api(customer: str, call: str) -> Response:
        return await _api(gw, metrics, customer, call)

    @app.route("/bigbluebutton/api/<path:call>", methods=["GET", "POST"])
    async def host_api(call: str) -> Response:
        return await _api(gw, metrics, None, call)

    @app.route(callbacks.PATH, methods=["GET", "POST"])
    async def ended() -> Response:
        known = await meeting_ended(gw, request.query_string.decode("utf-8", "replace"))
        return Response("ok\n" if known else "unknown\n", 200 if known else 403)

    @app.route("/admin/v1/<path:what>", methods=admin.METHODS)
    async def admin_api(what: str) -> Response:
        return await _admin(gw, what)

    @app.route("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", content_type="text/plain")

    @app.route("/readyz")
    async def readyz() -> Response:
        state = readiness(gw)  # why not ready, in the body (proxy/readiness.py)
        return _json(state.document(), 200 if state.ready else 503)

    @app.route("/")
    async def home() -> Response:
        # Failed joins land here unless proxy.logout_url says otherwise.
        return Response(HOME, content_type="text/plain")

    @app.route("/metrics")
    async def prometheus() -> Response:
        token = gw.config.proxy.metrics_token
        if token and not bearer_matches(token, request.headers.get("Authorization")):
            return Response(
                "unauthorised\n", 401, {"WWW-Authenticate": "Bearer"}, content_type="text/plain"
            )
        return Response(metrics.exposition(), content_type="text/plain; version=0.0.4")

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        if error.code == 413 and request.path.rstrip("/").endswith("/putRecordingTextTrack"):
            key, message = rules.too_large_track(gw.config.proxy.max_text_track_bytes)
            return _response(Answer.json(rules.json_failure(key, message)))
        if error.code == 413:
            return _response(Answer.xml(envelope.from_error(_too_large())))
        if error.code == 408:  # the body did not come within [proxy.timeouts] client_read
            late = ValidationError("The request body did not arrive in time")
            return _response(Answer.xml(envelope.from_error(late)))
        if request.path.startswith("/admin/") and error.code in (404, 405):
            return _json({"error": "not found"}, 404)  # no route, no method: the same 404
        if "/bigbluebutton/" in request.path:
            return _response(Answer.xml(envelope.failure("unsupportedRequest", "Not found")))
        return Response(f"{error.code} {error.name}\n", error.code or 500)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unexpected error answering %s", request.path)
        return internal_error()

    app.extensions["bbb_proxy_metrics"] = metrics  # for proxy.fast_api (proxy/server.py)
    return app


async def _api(gw: Gateway, metrics: Metrics, customer: str | None, call: str) -> Response:
    started = time.perf_counter()
    asked = request_log.asked_meeting_id(request.query_string.decode("utf-8", "replace"))
    request_log.note_call(call, customer, asked)  # as asked; handle() notes it verified
    incoming = await _incoming(customer, call, _body_limit(gw, call))
    return await _answered(gw, metrics, incoming, started)


async def api_answer(gw: Gateway, metrics: Metrics, incoming: Incoming) -> Response:
    """A body-less API call's answer, as the ``api`` route gives it (:mod:`proxy.fast_api`
    calls this without quart's request machinery)."""
    started = time.perf_counter()
    asked = request_log.asked_meeting_id(incoming.raw_query)
    request_log.note_call(incoming.call, incoming.customer_id, asked)
    return await _answered(gw, metrics, incoming, started)


async def _answered(gw: Gateway, metrics: Metrics, incoming: Incoming, started: float) -> Response:
    result, answer = await handle(gw, incoming)
    metrics.observe(incoming.call, result, time.perf_counter() - started)
    request_log.note_result(result)
    return _response(answer)


def internal_error() -> Response:
    """What an unexpected exception is answered (it is logged by the caller)."""
    return _response(Answer.xml(envelope.failure("internalError", "An internal error occurred")))


def _upload_limit(gw: Gateway) -> int:
    return gw.config.proxy.max_text_track_bytes + rules.UPLOAD_OVERHEAD


def _body_limit(gw: Gateway, call: str) -> int:
    """A call's body bound: putRecordingTextTrack's file has its own."""
    if call.strip("/") == "putRecordingTextTrack":
        return _upload_limit(gw)
    return gw.config.proxy.max_body_bytes


async def _incoming(customer: str | None, call: str, limit: int) -> Incoming:
    """The request as :func:`proxy.calls.handle` reads it; the body is parsed there.

    An upload's body (:func:`proxy.request_body.streams_body`) is not read here: the call
    reads it as it arrives, within the same ``limit`` and the body's time bound.

    Error handling: a body above ``limit`` raises werkzeug's 413 (answered by the
    error handler), refused by its Content-Length before it is read when it has one."""
    body = b""
    stream = None
    if request.method == "POST":
        if (request.content_length or 0) > limit:
            raise RequestEntityTooLarge()
        if streams_body(request.method, request.path):
            stream = chunks(request.body, request.body_timeout or math.inf)
        else:
            body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
            if len(body) > limit:
                raise RequestEntityTooLarge()
    return Incoming(
        customer_id=customer,
        host=request.headers.get("Host", ""),
        call=call,
        raw_query=request.query_string.decode("utf-8", "replace"),
        body=body,
        content_type=request.headers.get("Content-Type"),
        stream=stream,
    )


async def _admin(gw: Gateway, what: str) -> Response:
    """The admin API (:mod:`proxy.admin`): the token first, then one call."""
    if not admin.authorised(gw, request.headers.get("Authorization")):
        return _json({"error": "not found"}, 404)
    body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    call = admin.Call(request.method, tuple(what.split("/")), request.args.to_dict(), body)
    status, document = await admin.handle(gw, call)
    return _json(document, status)


def bearer_matches(token: str, header: str | None) -> bool:
    """Whether ``header`` is ``Bearer <token>``, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode())


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, content_type="application/json")


def _too_large() -> ValidationError:
    return ValidationError("The request body is too large")


def _response(answer: Answer) -> Response:
    request_log.note_result(result_of(answer), unless_known=True)  # e.g. a 413's envelope
    return Response(answer.body, answer.status, headers=dict(answer.headers))
