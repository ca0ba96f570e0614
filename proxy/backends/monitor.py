"""Polling every backend: health (:mod:`proxy.health`) and reconciliation (:mod:`proxy.reconcile`).

One task per backend asks ``getMeetings`` every ``health.interval`` seconds.
The answer feeds the health state machine and, when it is a good one, the
reconciliation with the ledger: ended meetings are released, lost ones adopted.
A backend DOWN for ``release_after`` has its reservations released.

:func:`reconcile_all` is the same reconciliation run once, at start-up,
before the gateway accepts requests.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from proxy.backends.client import Reply
from proxy.errors import BackendError
from proxy.gateway import Gateway
from proxy.health import State, Thresholds, after_poll, should_release
from proxy.ledger.model import Reserve
from proxy.reconcile import listed_meetings, plan

log = logging.getLogger(__name__)


def thresholds(gw: Gateway) -> Thresholds:
    h = gw.config.proxy.health
    return Thresholds(down_after=h.down_after, up_after=h.up_after, release_after=h.release_after)


async def monitor_backends(gw: Gateway) -> None:
    """Poll every backend until cancelled."""
    async with trio.open_nursery() as nursery:
        for backend in gw.config.backends:
            nursery.start_soon(_monitor_one, gw, backend.id)


async def _monitor_one(gw: Gateway, backend_id: str) -> None:
    while True:
        await trio.sleep(gw.config.proxy.health.interval)
        if gw.modes[backend_id] != "disabled":
            await poll_once(gw, backend_id)


async def poll_once(gw: Gateway, backend_id: str) -> None:
    """One poll: update health, reconcile on success, release after a long outage."""
    polled_at = gw.ledger.clock()
    reply = await _poll(gw, backend_id)
    now = trio.current_time()
    limits = thresholds(gw)
    before = gw.health[backend_id]
    health = after_poll(before, reply is not None, now, limits)
    if reply is not None:
        await reconcile(gw, backend_id, reply, polled_at)
    if should_release(health, now, limits):
        await _release_backend(gw, backend_id)
        health = replace(health, released=True)
    if health.state is not before.state:
        log.warning("backend %s is now %s", backend_id, health.state.value)
    gw.health[backend_id] = health


async def _poll(gw: Gateway, backend_id: str) -> Reply | None:
    try:
        reply = await gw.client(backend_id).call("getMeetings", [])
    except BackendError as exc:
        log.info("poll of %s failed: %s", backend_id, exc)
        return None
    return reply if reply.ok else None


async def reconcile(gw: Gateway, backend_id: str, reply: Reply, polled_at: float) -> None:
    ledger = gw.ledger
    todo = plan(
        backend_id,
        ledger.state.backend_meetings(backend_id),
        listed_meetings(reply.root),
        ledger.state.get,
        {c.id: c for c in gw.config.customers},
        polled_at,
    )
    for key in todo.release:
        log.info("meeting %s ended on %s: releasing", key, backend_id)
        await ledger.release(key, "gone")
    for key in todo.confirm:
        await ledger.confirm(key)
    for reservation in todo.adopt:
        log.warning("adopting meeting %s found on %s", reservation.key, backend_id)
        await ledger.record(Reserve(reservation))


async def _release_backend(gw: Gateway, backend_id: str) -> None:
    held = gw.ledger.state.backend_meetings(backend_id)
    log.warning("backend %s down too long: releasing %d meetings", backend_id, len(held))
    for reservation in held:
        await gw.ledger.release(reservation.key, "backend-down")


async def reconcile_all(gw: Gateway) -> None:
    """Poll every backend in service once (start-up): the same poll the monitor makes."""
    async with trio.open_nursery() as nursery:
        for backend_id in gw.in_service():
            nursery.start_soon(poll_once, gw, backend_id)
    down = [b for b, h in gw.health.items() if h.state is not State.UP]
    if down:
        log.warning("start-up: backends not reachable: %s", ", ".join(down))
