"""getRecordings across the pool: the fan-out, the deadline and the streamed answer.

The decisions (filters, order, pages, rewriting) are in :mod:`proxy.bbb.recordings`; this
module only asks the backends and writes.  The answer is streamed: the head of BBB's
SUCCESS envelope goes out at once, before any backend is asked; the recordings follow, in
the pool's order, once every backend answered or the deadline
(``[proxy.timeouts] get_recordings``) passed; a backend that fails, answers FAILED or is
too slow is left out (logged, and counted under ``bbb_proxy_backend_requests`` with
outcome ``deadline`` when the deadline cut it off; its own errors are counted by the
backend client).  A listing therefore never fails because of a backend.

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

from proxy.bbb import recordings
from proxy.errors import BackendError
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
