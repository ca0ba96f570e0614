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
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from proxy.backends.client import Reply
from proxy.bbb import recordings, rewrite
from proxy.errors import BackendError, BackendUnavailable, NotFound, ValidationError
from proxy.gateway import Gateway
from proxy.request import Answer, ApiRequest

log = logging.getLogger(__name__)
CHUNK = 50  # recordings per write


@dataclass
class Collected:
    """What the fan-out brought back: per backend, its page-relevant recordings and count."""

    lists: dict[str, list[recordings.Listed]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # answered, but with an error


async def get_recordings(gw: Gateway, req: ApiRequest) -> Answer:
    filters = recordings.backend_filters(req.customer.id, req.params)
    page = recordings.page_of(req.params)
    return Answer.stream(_listing(gw, req.customer.id, filters, page))


async def _listing(
    gw: Gateway, customer: str, filters: list[tuple[str, str]] | None, page: recordings.Page
) -> AsyncIterator[bytes]:
    yield recordings.HEAD
    collected = Collected()
    if filters is not None:
        await _collect_all(gw, customer, filters, page, collected)
    shown = 0
    chunk: list[str] = []
    for item in recordings.merged(collected.lists.values(), page):
        chunk.append(item.xml)
        shown += 1
        if len(chunk) == CHUNK:
            yield "".join(chunk).encode()
            chunk = []
    if chunk:
        yield "".join(chunk).encode()
    yield recordings.tail(shown, sum(collected.totals.values()), page)


async def _collect_all(
    gw: Gateway,
    customer: str,
    filters: list[tuple[str, str]],
    page: recordings.Page,
    collected: Collected,
) -> None:
    """Ask every backend in service at once; keep what came before the deadline."""
    started = time.perf_counter()
    asked = gw.in_service()
    ranks = {b.id: rank for rank, b in enumerate(gw.config.backends)}
    with trio.move_on_after(gw.config.proxy.timeouts.get_recordings):
        async with trio.open_nursery() as nursery:
            for backend_id in asked:
                nursery.start_soon(
                    _collect, gw, backend_id, ranks[backend_id], customer, filters, page, collected
                )
    for backend_id in asked:
        if backend_id not in collected.totals and backend_id not in collected.failed:
            log.warning("getRecordings: leaving out %s: no answer before the deadline", backend_id)
            client = gw.client(backend_id)
            client.observer(backend_id, "getRecordings", "deadline", time.perf_counter() - started)


async def _collect(
    gw: Gateway,
    backend_id: str,
    rank: int,
    customer: str,
    filters: list[tuple[str, str]],
    page: recordings.Page,
    collected: Collected,
) -> None:
    try:
        reply = await gw.client(backend_id).call("getRecordings", filters, customer=customer)
    except BackendError as exc:
        log.warning("getRecordings: leaving out %s: %s", backend_id, exc)
        collected.failed.add(backend_id)
        return
    if not reply.ok:
        log.warning("getRecordings: leaving out %s: it answered %s", backend_id, reply.message_key)
        collected.failed.add(backend_id)
        return
    found = recordings.listed(customer, rank, reply.root)
    collected.totals[backend_id] = len(found)
    collected.lists[backend_id] = recordings.kept(found, page)


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

    async def ask(backend_id: str) -> None:
        try:
            reply = await gw.client(backend_id).call("getRecordings", filters, customer=customer)
        except BackendError as exc:
            log.warning("recording lookup: could not ask %s: %s", backend_id, exc)
            return
        if reply.ok:
            answered.add(backend_id)
            held = recordings.held(customer, reply.root, record_ids)
            if held:
                where[backend_id] = held

    asked = gw.in_service()
    with trio.move_on_after(gw.config.proxy.timeouts.get_recordings):
        async with trio.open_nursery() as nursery:
            for backend_id in asked:
                nursery.start_soon(ask, backend_id)
    return where, [b for b in asked if b not in answered]


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
