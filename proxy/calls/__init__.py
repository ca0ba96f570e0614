"""Every API call a customer can make, verified and dispatched.

:func:`handle` is the whole pipeline for one request, free of the web
framework: find the customer, read the body (:mod:`proxy.bbb.bodies`), verify
the checksum and keep only the parameters it covers
(:func:`proxy.bbb.checksum.signed_params`), refuse what is disabled, check an
XML body, dispatch, and turn every :class:`~proxy.errors.ProxyError` into BBB's
answer (an XML envelope; for join, a redirect).  Join takes its parameters from
the signed URL query only: a join with body parameters is a ``checksumError``.

Error handling: :func:`handle` raises nothing a request can cause; every
``ProxyError`` becomes BBB's answer.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from proxy import request_log
from proxy.bbb import bodies, checksum, envelope
from proxy.bbb import uploads as upload_rules
from proxy.calls import hooks, meetings, recordings
from proxy.calls.create import create
from proxy.config import Customer
from proxy.errors import (
    ApiNotEnabled,
    BackendError,
    ChecksumError,
    ProxyError,
    StorageUnavailable,
    UnsupportedRequest,
    ValidationError,
)
from proxy.gateway import Gateway
from proxy.request import Answer, ApiRequest
from proxy.uploads import Upload, discard, once, read_whole

log = logging.getLogger(__name__)

type Handler = Callable[[Gateway, ApiRequest], Awaitable[Answer]]


async def _join(gw: Gateway, req: ApiRequest) -> Answer:
    return await meetings.join(gw, req)


CALLS: dict[str, Handler] = {
    "create": create,
    "join": _join,
    "end": meetings.end,
    "isMeetingRunning": meetings.is_meeting_running,
    "getMeetingInfo": meetings.get_meeting_info,
    "getMeetings": meetings.get_meetings,
    "insertDocument": meetings.insert_document,
    "sendChatMessage": meetings.send_chat_message,
    "getRecordings": recordings.get_recordings,
    "publishRecordings": recordings.change_recordings,
    "deleteRecordings": recordings.change_recordings,
    "updateRecordings": recordings.change_recordings,
    "getRecordingTextTracks": recordings.get_recording_text_tracks,
    "putRecordingTextTrack": recordings.put_recording_text_track,
    "hooks/create": hooks.create,
    "hooks/list": hooks.list_hooks,
    "hooks/destroy": hooks.destroy,
}


@dataclass(frozen=True, slots=True)
class Incoming:
    """One request as the web layer received it."""

    customer_id: str | None  # from the path, or None when bound by host name
    host: str
    call: str
    raw_query: str
    body: bytes = b""  # the POST body as received; empty for GET
    content_type: str | None = None
    # A body read as it arrives instead (putRecordingTextTrack's upload); body is then b"".
    stream: AsyncIterator[bytes] | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks: the stream's as they come, or the whole body at once."""
        return self.stream if self.stream is not None else once(self.body)


def version_document() -> Answer:
    return Answer.xml(
        envelope.success([("version", "2.0"), ("apiVersion", "2.0"), ("bbbVersion", "")])
    )


async def handle(gw: Gateway, incoming: Incoming) -> tuple[str, Answer]:
    """Answer one API request; returns (result label for metrics, answer).

    What is left of a streamed body is read and dropped before the answer (within the
    upload's bound), as bbb-web reads a body whole: a client still sending would
    otherwise see its connection closed before it reads the answer."""
    answered = await _handled(gw, incoming)
    if incoming.stream is not None:
        await discard(incoming.stream, _upload_limit(gw))
    return answered


async def _handled(gw: Gateway, incoming: Incoming) -> tuple[str, Answer]:
    req: ApiRequest | None = None  # set once the checksum verified
    try:
        req = await _verified(gw, incoming)
        request_log.note_call(req.call, req.customer.id, req.first("meetingID"))
        handler = _handler(gw, req)
        answer = await handler(gw, req)
    except ProxyError as error:
        if isinstance(error, BackendError):
            log.warning("%s failed: %s", incoming.call, error)
        return error.message_key, _error_answer(gw, incoming, error, req)
    return result_of(answer), answer


_FAILED = re.compile(r"<returncode>FAILED</returncode>.*?<messageKey>([^<]*)</messageKey>", re.S)


def result_of(answer: Answer) -> str:
    """The metrics label of an answer: success, or the messageKey of a FAILED one."""
    body = answer.body
    if isinstance(body, str) and "<returncode>FAILED</returncode>" in body:
        found = _FAILED.search(body)
        return found.group(1) if found and found.group(1) else "failed"
    return "success"


async def _verified(gw: Gateway, incoming: Incoming) -> ApiRequest:
    customer = await _customer(gw, incoming)
    if len(incoming.raw_query) > gw.config.proxy.max_query_bytes:
        raise ValidationError("The request is too large")
    upload = None
    if incoming.call == "putRecordingTextTrack":  # the one call whose body carries a file
        body, upload = await _upload(gw, customer, incoming)
    else:
        body = bodies.parse(incoming.content_type, incoming.body)
    customer, params = _signed(customer, incoming, body)
    if not customer.enabled:
        raise ApiNotEnabled()
    xml = bodies.checked_xml(incoming.call, body)
    media = body.media_type if xml is not None else None
    algorithm = checksum.algorithm_of(incoming.raw_query, body.form)
    return ApiRequest(customer, incoming.call, params, xml, media, upload, algorithm)


def _upload_limit(gw: Gateway) -> int:
    return gw.config.proxy.max_text_track_bytes + upload_rules.UPLOAD_OVERHEAD


async def _upload(
    gw: Gateway, customer: Customer | None, incoming: Incoming
) -> tuple[bodies.Body, Upload | None]:
    """putRecordingTextTrack's body, its file not yet read (:mod:`proxy.uploads`).

    When the URL query verifies with the parameters in it (bbb-web's way), nothing of the
    body is read here, and a text field in it is a ``checksumError`` when it is read;
    otherwise the text fields before the file are read now, for the checksum.  A body
    that is not multipart holds no file: it is read whole, as other calls' bodies are.
    """
    boundary = upload_rules.boundary_of(incoming.content_type)
    if boundary is None:
        data = await read_whole(incoming.chunks(), gw.config.proxy.max_body_bytes)
        return bodies.parse(incoming.content_type, data), None
    by_query = customer is not None and bool(
        checksum.signed_params(incoming.call, incoming.raw_query, customer.secrets)
    )
    limit = gw.config.proxy.max_text_track_bytes
    upload = Upload(incoming.chunks(), boundary, limit, fields=not by_query)
    form = () if by_query else await upload.head()
    return bodies.Body(form=form, media_type=bodies.MULTIPART), upload


def _signed(
    customer: Customer | None, incoming: Incoming, body: bodies.Body
) -> tuple[Customer, list[tuple[str, str]]]:
    """The customer and the parameters its checksum covers; anything else is checksumError.

    join takes its parameters from the signed URL query only: a join with body
    parameters is refused whatever its checksum.
    """
    if customer is None or (incoming.call == "join" and body.form):
        raise ChecksumError()
    params = checksum.signed_params(incoming.call, incoming.raw_query, customer.secrets, body.form)
    if params is None:
        raise ChecksumError()
    return customer, params


async def _customer(gw: Gateway, incoming: Incoming) -> Customer | None:
    """The request's customer; with several instances (the runtime store on Redis), one
    not known here is looked for again after catching up with the runtime changes of
    the others (a customer just added through another instance's admin API)."""
    found = _known(gw, incoming)
    runtime = gw.runtime
    if found is None and runtime is not None and runtime.replica.shared:
        with contextlib.suppress(StorageUnavailable):  # Redis away: unknown, as before
            await runtime.replica.refresh()  # concurrent calls share one catch-up
        found = _known(gw, incoming)
    return found


def _known(gw: Gateway, incoming: Incoming) -> Customer | None:
    if incoming.customer_id is None:
        return gw.customer_for_host(incoming.host)
    return gw.customer(incoming.customer_id)


def _handler(gw: Gateway, req: ApiRequest) -> Handler:
    handler = CALLS.get(req.call)
    if handler is None or req.call in gw.config.proxy.disabled_calls:
        raise UnsupportedRequest()
    return handler


def _error_answer(
    gw: Gateway, incoming: Incoming, error: ProxyError, req: ApiRequest | None = None
) -> Answer:
    if incoming.call == "join":  # only a verified request may choose the error target
        return meetings.join_error(gw, None if req is None else req.params, error)
    if incoming.call in recordings.JSON_CALLS:  # BBB answers these in JSON, errors too
        return recordings.json_error(error)
    return Answer.xml(envelope.from_error(error))
