"""Recordings across the pool: getRecordings' fan-out, deadline and streamed answer, and
publish/delete/updateRecordings routed to the backends holding each recordID.

The decisions (filters, order, pages, rewriting) are in :mod:`proxy.bbb.recordings`; this
module only asks the backends and writes.  The answer is streamed: the head of BBB's
SUCCESS envelope goes out at once, before any backend is asked; the recordings follow, in
the pool's order, once every backend answered or the deadline
(``[proxy.timeouts] get_recordings``) passed; a backend that fails, answers FAILED or is
too slow is left out (logged, and counted under ``bbb_proxy_backend_requests`` with
outcome ``deadline`` when the deadline cut it off; its own errors are counted by the
backend client).  A listing therefore never fails because of a backend.

publish/delete/updateRecordings first ask every backend in service (in parallel, within the
same deadline) which of the recordIDs it holds for this customer (exact IDs; another
customer's recording is not held), then send the change to those backends only, each with its
share of the list, and answer as one server answers a list: SUCCESS when any recording was
changed, ``notFound`` when none of them exists (or belongs to the customer).  A backend that
answered neither the lookup nor the change makes the answer ``serverUnavailable`` when
nothing else could be changed; the changes are idempotent, so the client may retry.

Error handling: the streamed body raises nothing (a backend's failure leaves its
recordings out); errors of the request itself (checksum, disabled call) are answered
before anything is streamed, by :func:`proxy.calls.handle`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio
from lxml import etree

from proxy.backends.client import Reply
from proxy.bbb import recordings, rewrite, uploads
from proxy.errors import (
    BackendBadResponse,
    BackendError,
    BackendUnavailable,
    NotFound,
    ProxyError,
    ValidationError,
)
from proxy.gateway import Gateway
from proxy.request import Answer, ApiRequest

log = logging.getLogger(__name__)
CHUNK = 50  # recordings per write


@dataclass
class Collected:
    """The first pass: per backend that answered whole, its keys; the bodies that fit."""

    keys: dict[str, list[bytes]] = field(default_factory=dict)  # recordings.packed
    bodies: recordings.Bodies = field(default_factory=recordings.Bodies)
    failed: set[str] = field(default_factory=set)  # answered, but not a whole SUCCESS


async def get_recordings(gw: Gateway, req: ApiRequest) -> Answer:
    filters = recordings.backend_filters(req.customer.id, req.params)
    page = recordings.page_of(req.params)
    return Answer.stream(_listing(gw, req.customer.id, filters, page))


async def _listing(
    gw: Gateway, customer: str, filters: list[tuple[str, str]] | None, page: recordings.Page
) -> AsyncIterator[bytes]:
    """The answer, in two passes: every backend's keys (and the bodies that fit), then
    the page's bodies a round at a time, fetched by recordID from the backends holding them."""
    yield recordings.HEAD
    collected = Collected()
    if filters is not None:
        await _first_pass(gw, customer, filters, collected)
    every = [key for keys in collected.keys.values() for key in keys]
    shown = recordings.window(every, page)
    written = 0
    for packed in recordings.rounds(shown):
        round_ = [recordings.unpacked(key) for key in packed]
        fetched = await _bodies(gw, customer, [k for k in round_ if not collected.bodies.has(k)])
        chunk: list[str] = []
        for item in round_:
            xml = collected.bodies.take(item) or fetched.get((item.backend_rank, item.record_id))
            if xml is not None:
                chunk.append(xml)
            if len(chunk) == CHUNK:
                written += len(chunk)
                yield "".join(chunk).encode()
                chunk = []
        written += len(chunk)
        if chunk:
            yield "".join(chunk).encode()
    yield recordings.tail(written, len(every), page)


async def _first_pass(
    gw: Gateway, customer: str, filters: list[tuple[str, str]], collected: Collected
) -> None:
    """Ask every backend in service at once; keep what came whole before the deadline."""
    started = time.perf_counter()
    asked = askable(gw, "getRecordings")
    ranks = {b.id: rank for rank, b in enumerate(gw.backends())}
    with trio.move_on_after(gw.config.proxy.timeouts.get_recordings):
        async with trio.open_nursery() as nursery:
            for backend_id in asked:
                nursery.start_soon(
                    _keys_of, gw, backend_id, ranks[backend_id], customer, filters, collected
                )
    for backend_id in asked:
        if backend_id not in collected.keys and backend_id not in collected.failed:
            log.warning("getRecordings: leaving out %s: no answer before the deadline", backend_id)
            gw.tally("recordings_left_out", "deadline")
            client = gw.client(backend_id)
            client.observer(backend_id, "getRecordings", "deadline", time.perf_counter() - started)


def askable(gw: Gateway, call: str) -> list[str]:
    """The backends in service that are not DOWN by health: a dead server's recordings are
    left out at once rather than after the deadline (logged)."""
    asked = []
    for backend_id in gw.in_service():
        if gw.backend_down(backend_id):
            log.warning("%s: leaving out %s: it is DOWN", call, backend_id)
            gw.tally("recordings_left_out", "down")
        else:
            asked.append(backend_id)
    return asked


async def _keys_of(
    gw: Gateway,
    backend_id: str,
    rank: int,
    customer: str,
    filters: list[tuple[str, str]],
    collected: Collected,
) -> None:
    keys: list[bytes] = []

    def found(item: recordings.Listed, recording: etree._Element | None) -> None:
        keys.append(recordings.packed(item))
        if recording is not None:
            collected.bodies.keep(item, rewrite.serialise(recording))

    def wanted() -> bool:
        return not collected.bodies.full

    if await _read(gw, backend_id, rank, customer, filters, found, wanted):
        collected.keys[backend_id] = keys
    else:
        collected.failed.add(backend_id)


async def _read(
    gw: Gateway,
    backend_id: str,
    rank: int,
    customer: str,
    params: list[tuple[str, str]],
    found: recordings.Found,
    bodies: Callable[[], bool],
) -> bool:
    """One getRecordings read as it arrives; whether it was a whole SUCCESS answer."""
    reader = recordings.AnswerReader(customer, rank, found, bodies)
    try:
        await gw.client(backend_id).fetch(
            "getRecordings", params, customer=customer, sink=reader.feed
        )
    except BackendError as exc:
        log.warning("getRecordings of %s failed, leaving it out: %s", backend_id, exc)
        gw.tally("recordings_left_out", "failed")
        return False
    reader.close()
    if not reader.ok:
        what = "not BBB's XML" if reader.broken else f"returncode {reader.returncode!r}"
        log.warning("getRecordings of %s answered %s, leaving it out", backend_id, what)
        gw.tally("recordings_left_out", "failed")
    return reader.ok


# -- text tracks -------------------------------------------------------------------------------


async def get_recording_text_tracks(gw: Gateway, req: ApiRequest) -> Answer:
    """The recording's text tracks, from the backend holding it; BBB's JSON, errors too.

    Error handling: a missing recordID is ``paramError``, another customer's or a missing
    recording ``noRecordings`` (the same answer), a backend that cannot be asked
    ``serverUnavailable``, all as BBB's JSON error.
    """
    found = await _holder(gw, req)
    if isinstance(found, Answer):
        return found
    backend_id, record_id = found
    return await _json_from(gw, req, backend_id, [("recordID", record_id)])


async def put_recording_text_track(gw: Gateway, req: ApiRequest) -> Answer:
    """The customer's upload, streamed only to the backend holding the recording; BBB's JSON.

    The file is not read before the recording's holder is found and the parameters are
    checked; it then goes on as it comes (:mod:`proxy.uploads`), as the only part of a new
    multipart body sent with chunked transfer encoding, with recordID, kind, lang and label
    in the signed query, as bbb-web takes them.

    Error handling: bbb-web's JSON errors in its order (``paramError`` for recordID,
    ``noRecordings``, also for another customer's recording, ``paramError`` /
    ``invalidKind`` / ``invalidLang``, ``empty_uploaded_text_track``), then
    ``serverUnavailable`` / ``internalError`` for a holder that could not be asked or
    answered something else than BBB's JSON; the holder's own JSON answer as it came.  A
    file above ``[proxy] max_text_track_bytes``, a malformed rest of the body or a client
    too slow raise from inside the backend request, which is aborted (the holder never
    sees a whole upload), and are answered by :func:`proxy.calls.handle` as JSON errors.
    """
    found = await _holder(gw, req)
    if isinstance(found, Answer):
        return found
    backend_id, record_id = found
    upload = recordings.track_upload(record_id, req.params)
    if isinstance(upload, tuple):
        return Answer.json(recordings.json_failure(*upload))
    if req.upload is None or not await req.upload.has_data():
        return Answer.json(recordings.json_failure(*recordings.EMPTY_UPLOAD))
    boundary = secrets.token_hex(16)
    body = req.upload.forwarded(boundary)
    params = recordings.track_params(upload)
    return await _json_from(gw, req, backend_id, params, body, uploads.content_type(boundary))


async def _holder(gw: Gateway, req: ApiRequest) -> tuple[str, str] | Answer:
    """(the backend holding the request's recordID, that recordID), or BBB's JSON error."""
    record_id = (req.first("recordID") or "").strip()
    if not record_id:
        return Answer.json(recordings.json_failure(*recordings.MISSING_RECORD_ID_JSON))
    where, unanswered = await _locate(gw, req.customer.id, [record_id])
    if where:
        return next(iter(where)), record_id
    if unanswered:
        return json_error(BackendUnavailable(unanswered[0], "could not be asked"))
    return Answer.json(recordings.json_failure(*recordings.no_recording(record_id)))


async def _json_from(
    gw: Gateway,
    req: ApiRequest,
    backend_id: str,
    params: list[tuple[str, str]],
    body: AsyncIterator[bytes] | None = None,
    content_type: str | None = None,
) -> Answer:
    """The holder's JSON answer to the text-track call, checked for BBB's shape."""
    try:
        content = await gw.client(backend_id).fetch(
            req.call, params, body, content_type, customer=req.customer.id
        )
    except BackendError as exc:
        log.warning("%s of %s failed: %s", req.call, backend_id, exc)
        return json_error(exc)
    answer = CHECKS[req.call](content)
    if answer is None:
        log.warning("%s: %s answered something else than BBB's JSON", req.call, backend_id)
        return json_error(BackendBadResponse(backend_id, "not BBB's JSON"))
    return Answer.json(answer)


JSON_CALLS = recordings.JSON_CALLS
CHECKS = {  # each text-track call's check of the holder's JSON answer
    "getRecordingTextTracks": recordings.text_tracks_answer,
    "putRecordingTextTrack": recordings.upload_answer,
}


def json_error(error: ProxyError) -> Answer:
    """BBB's JSON error envelope (the text-track calls answer JSON)."""
    return Answer.json(recordings.json_failure(error.message_key, error.message))


def _always() -> bool:
    return True


def _never() -> bool:
    return False


async def _bodies(
    gw: Gateway, customer: str, missing: list[recordings.Listed]
) -> dict[tuple[int, str], str]:
    """The bodies of ``missing``, asked by recordID (exact) from the backends holding them,
    all at once, within the deadline; a backend that fails leaves its recordings out."""
    fetched: dict[tuple[int, str], str] = {}
    backends = gw.backends()

    async def fetch(rank: int, record_ids: list[str]) -> None:
        wanted = set(record_ids)

        def found(item: recordings.Listed, recording: etree._Element | None) -> None:
            if recording is not None and item.record_id in wanted:
                fetched[(rank, item.record_id)] = rewrite.serialise(recording)

        params = recordings.lookup_filters(customer, record_ids)
        if not await _read(gw, backends[rank].id, rank, customer, params, found, _always):
            log.warning(
                "getRecordings: %d recordings of %s left out", len(record_ids), backends[rank].id
            )

    with trio.move_on_after(gw.config.proxy.timeouts.get_recordings):
        async with trio.open_nursery() as nursery:
            for rank, record_ids in recordings.batches(missing):
                nursery.start_soon(fetch, rank, record_ids)
    return fetched


# -- publish / delete / update ----------------------------------------------------------------


async def change_recordings(gw: Gateway, req: ApiRequest) -> Answer:
    """publishRecordings, deleteRecordings, updateRecordings: only where each recording is.

    Error handling: ``ValidationError`` for a missing parameter, ``NotFound`` when no
    recordID is the customer's anywhere, ``BackendError`` when the backends that could hold
    them did not answer; a backend's own FAILED answer is answered as it came.
    """
    missing = recordings.missing_param(req.call, req.params)
    if missing is not None:
        raise ValidationError(missing[1], message_key=missing[0])
    record_ids = recordings.split_ids(req.first("recordID"))
    where, unanswered = await _locate(gw, req.customer.id, record_ids)
    if not where:
        if unanswered:
            raise BackendUnavailable(unanswered[0], "could not be asked for its recordings")
        raise NotFound(recordings.NOT_FOUND)
    outcomes: dict[str, Reply | BackendError] = {}
    async with trio.open_nursery() as nursery:
        for backend_id, held in where.items():
            nursery.start_soon(_change, gw, req, backend_id, held, outcomes)
    return _combined(outcomes)


async def _locate(
    gw: Gateway, customer: str, record_ids: list[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """Which backend holds which of ``record_ids`` for ``customer``; and who did not say."""
    where: dict[str, list[str]] = {}
    answered: set[str] = set()
    filters = recordings.lookup_filters(customer, record_ids)
    wanted = set(record_ids)

    async def ask(backend_id: str) -> None:
        held: list[str] = []

        def found(item: recordings.Listed, recording: etree._Element | None) -> None:
            if item.record_id in wanted and item.record_id not in held:
                held.append(item.record_id)  # exactly: a prefix match is not this recording

        if await _read(gw, backend_id, 0, customer, filters, found, _never):
            answered.add(backend_id)
            if held:
                where[backend_id] = held

    asked = askable(gw, "recording lookup")
    with trio.move_on_after(gw.config.proxy.timeouts.get_recordings):
        async with trio.open_nursery() as nursery:
            for backend_id in asked:
                nursery.start_soon(ask, backend_id)
    return where, [b for b in gw.in_service() if b not in answered]


async def _change(
    gw: Gateway,
    req: ApiRequest,
    backend_id: str,
    held: list[str],
    outcomes: dict[str, Reply | BackendError],
) -> None:
    params = recordings.change_params(req.params, held)
    try:
        outcomes[backend_id] = await gw.client(backend_id).call(
            req.call, params, customer=req.customer.id
        )
    except BackendError as exc:
        outcomes[backend_id] = exc


def _combined(outcomes: dict[str, Reply | BackendError]) -> Answer:
    """One answer for a list split over backends, as one BBB server answers the list."""
    replies = [o for o in outcomes.values() if isinstance(o, Reply)]
    errors = [o for o in outcomes.values() if isinstance(o, BackendError)]
    failed = [r for r in replies if not r.ok and r.message_key != "notFound"]
    if errors:
        raise errors[0]
    if failed:
        return Answer.xml(rewrite.serialise(failed[0].root))
    done = [r for r in replies if r.ok]
    if not done:
        raise NotFound(recordings.NOT_FOUND)
    return Answer.xml(rewrite.serialise(done[0].root))
