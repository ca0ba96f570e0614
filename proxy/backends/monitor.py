"""Polling every backend: health (:mod:`proxy.health`) and reconciliation (:mod:`proxy.reconcile`).

One task per backend asks ``getMeetings`` every ``health.interval`` seconds,
on a fixed schedule, each poll bounded by ``health.timeout``.  The answer (or
its absence) feeds the health state machine and the latency average; a good
answer also reconciles the ledger with the backend: ended meetings are
released, lost ones adopted (clamped), stray copies of meetings re-created
elsewhere ended.  A backend that becomes DOWN is suspended at once (its
reservations stop counting against subscriptions, see :meth:`Gateway.set_health`);
when it is UP again the meetings it still runs and the ledger still pins to it
count again.  Nothing is released for a backend being DOWN, however long.

A poll that raises (a journal that cannot write, a bug) is logged and counted
in ``Gateway.task_failures["monitor"]``; the monitor goes on.

:func:`reconcile_all` is the same poll run once per backend at start-up,
before the gateway accepts requests.

On the Redis store (``[store] kind = "redis"``, several gateway instances) each backend
is polled, and reconciled, by the one instance holding its poll lease; the others apply
the health it publishes (:mod:`proxy.backends.cluster`).  On the local store one process
polls every backend, as described above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from proxy.backends.client import Reply
from proxy.errors import BackendError, BackendTimeout, StorageUnavailable
from proxy.gateway import Gateway
from proxy.health import State, after_poll, suspended
from proxy.ledger.model import Reservation, Reserve
from proxy.reconcile import Listed, clamped, listed_meetings, plan, unchanged

if TYPE_CHECKING:
    from proxy.backends.cluster import SharedPolls

log = logging.getLogger(__name__)


async def monitor_backends(gw: Gateway) -> None:
    """Poll every backend until cancelled; a backend added at run time too."""
    shared = _shared(gw)
    watched: set[str] = set()
    try:
        async with trio.open_nursery() as nursery:
            if shared is not None:
                nursery.start_soon(shared.keep_members)
            while True:
                for backend in gw.backends():
                    if backend.id not in watched:
                        watched.add(backend.id)
                        nursery.start_soon(_monitor_one, gw, backend.id, watched, shared)
                await gw.backends_changed()
    finally:
        if shared is not None:  # a clean stop: others take its backends over at once
            with trio.CancelScope(shield=True):
                await shared.leave()


async def _monitor_one(
    gw: Gateway, backend_id: str, watched: set[str], shared: SharedPolls | None
) -> None:
    """Poll one backend until it is removed (at run time)."""
    interval = gw.config.proxy.health.interval
    due = trio.current_time()
    while backend_id in gw.clients:
        due += interval
        await trio.sleep_until(due)
        if gw.modes.get(backend_id, "disabled") != "disabled":
            if shared is None:
                await supervised_poll(gw, backend_id)
            else:
                due += await _shared_turn(gw, shared, backend_id)
        due = max(due, trio.current_time() - interval)  # a poll that overran: no burst after
    watched.discard(backend_id)


def _shared(gw: Gateway) -> SharedPolls | None:
    if gw.config.store.kind != "redis":
        return None
    from proxy.backends.cluster import shared_polls  # coredis only on the Redis store

    return shared_polls(gw)


async def _shared_turn(gw: Gateway, shared: SharedPolls, backend_id: str) -> float:
    """One interval's turn on the Redis store: poll (and reconcile) if this instance holds
    the backend's lease, else apply the health its holder published.  Returns the seconds
    the poll was put off (a lease just taken: the previous holder's poll plus an interval)."""
    lease = shared.lease(backend_id)
    was_held = lease.held
    try:
        held = await lease.hold()
    except StorageUnavailable as e:
        shared.unreachable(e)
        await supervised_poll(gw, backend_id, reconcile=False)  # health only, here
        return 0.0
    shared.reachable()
    if not held:
        if was_held:
            log.warning("the poll lease of %s went to another instance", backend_id)
        await _apply_shared(gw, shared, backend_id)
        return 0.0
    delay = 0.0 if was_held else await shared.due_in(backend_id)
    await trio.sleep(delay)
    await _poll_and_publish(gw, shared, backend_id)
    await shared.hand_over_if_due(backend_id)
    return delay


async def _poll_and_publish(gw: Gateway, shared: SharedPolls, backend_id: str) -> None:
    await supervised_poll(gw, backend_id)
    health = gw.health.get(backend_id)
    if health is not None:
        await shared.publish(backend_id, health)


async def _apply_shared(gw: Gateway, shared: SharedPolls, backend_id: str) -> None:
    """The holder's last published health, if not expired (else: as last seen)."""
    published = await shared.read(backend_id)
    if published is not None:
        gw.set_health(backend_id, published[0])


async def supervised_poll(gw: Gateway, backend_id: str, *, reconcile: bool = True) -> None:
    """:func:`poll_once`, whose failure is logged and counted and goes no further."""
    try:
        await poll_once(gw, backend_id, reconcile=reconcile)
    except Exception:
        gw.task_failures["monitor"] = gw.task_failures.get("monitor", 0) + 1
        log.exception("poll of %s failed; the monitor goes on", backend_id)


async def poll_once(gw: Gateway, backend_id: str, *, reconcile: bool = True) -> None:
    """One poll: latency and health (suspension follows at once), reconcile on success
    (unless not ``reconcile``: health only)."""
    pinned = gw.ledger.state.backend_meetings(backend_id)  # as the poll is sent
    polled_at = gw.ledger.clock()
    started = trio.current_time()
    reply, timed = await _poll(gw, backend_id)
    if backend_id not in gw.health:
        return  # removed at run time while the poll was in flight
    now = trio.current_time()
    if timed:
        gw.observe_latency(backend_id, now - started)
    was_suspended = suspended(gw.health[backend_id])
    health = after_poll(gw.health[backend_id], reply is not None, now, gw.thresholds())
    gw.set_health(backend_id, health)
    if was_suspended and not suspended(gw.health[backend_id]):
        kept = len(gw.ledger.state.backend_meetings(backend_id))
        gw.count("kept", kept)
        log.warning("backend %s is back: its %d meetings count again", backend_id, kept)
        for listener in gw.on_backend_back:  # e.g. webhook intake: register its hook again
            listener(backend_id)
    if reply is not None and reconcile:
        try:
            await gw.ledger.refresh()  # the shared ledger: what other instances committed
        except StorageUnavailable:
            log.info("poll of %s: the ledger cannot catch up: not reconciled", backend_id)
            return
        await reconcile_with(gw, backend_id, reply, pinned, polled_at)


async def _poll(gw: Gateway, backend_id: str) -> tuple[Reply | None, bool]:
    """The poll's good answer (or None), and whether its time says something of latency."""
    gw.tally("backend_polls", backend_id)
    with trio.move_on_after(gw.config.proxy.health.timeout) as deadline:
        try:
            reply = await gw.client(backend_id).call("getMeetings", [])
        except BackendError as exc:
            log.info("poll of %s failed: %s", backend_id, exc)
            return None, isinstance(exc, BackendTimeout)
    if deadline.cancelled_caught:
        log.info("poll of %s failed: no answer within the poll timeout", backend_id)
        return None, True
    return (reply if reply.ok else None), True


async def reconcile_with(
    gw: Gateway, backend_id: str, reply: Reply, pinned: Sequence[Reservation], polled_at: float
) -> None:
    """Apply :func:`proxy.reconcile.plan`, each step only if the ledger still holds what it saw."""
    state = gw.ledger.state
    todo = plan(
        backend_id,
        pinned,
        listed_meetings(reply.root),
        state.get,
        {c.id: c for c in gw.customers()},
        polled_at,
    )
    for r in todo.release:
        if unchanged(state.get(r.key), r):  # no await between this check and the release
            log.info("meeting %s ended on %s: releasing", r.key, backend_id)
            if await gw.ledger.release(r.key, "gone") is None:
                continue  # released meanwhile (on the shared ledger: by another instance)
            await gw.hooks.meeting_ended(*r.key)  # its hooks expire a grace later
            gw.count("released")
    for r in todo.confirm:
        if unchanged(state.get(r.key), r):
            await gw.ledger.confirm(r.key)
    await _adopt(gw, backend_id, todo.adopt)
    for m in todo.end:
        current = state.get(m.key)
        if current is not None and current.backend_id != backend_id:
            log.warning(
                "meeting %s runs on %s but was re-created on %s: ending the stray copy",
                m.key,
                backend_id,
                current.backend_id,
            )
            gw.spawn("end-stray", _end_stray, gw, backend_id, m)


async def _adopt(gw: Gateway, backend_id: str, adopted: Sequence[Reservation]) -> None:
    """Reserve meetings the ledger lost, each clamped to the room left for it."""
    state = gw.ledger.state
    limits = {c.id: c.max_connections for c in gw.customers()}
    capacity = gw.client(backend_id).backend.capacity
    cut, left_out = 0, 0
    for r in adopted:
        if state.get(r.key) is not None:
            continue  # created meanwhile
        used = state.customer_used(r.customer)
        if backend_id in state.suspended:  # adopted here would count once it is back
            used += state.suspended_used(backend_id).get(r.customer, 0)
        room = limits.get(r.customer, capacity) - used
        fitted = clamped(r, room, capacity - state.backend_used(backend_id))
        if fitted is None:
            left_out += 1
            continue
        if fitted is not r:
            cut += 1
            log.warning(
                "adopting %s from %s: clamped from %d connections to %d (subscription/capacity)",
                r.key,
                backend_id,
                r.connections,
                fitted.connections,
            )
        log.warning("adopting meeting %s found on %s", r.key, backend_id)
        await gw.ledger.record(Reserve(fitted))
        gw.count("adopted")
    if left_out:
        log.warning(
            "%s lists %d more meetings than the subscriptions or its capacity have room for: "
            "not adopted",
            backend_id,
            left_out,
        )
    gw.count("adopt-clamped", cut + left_out)


async def _end_stray(gw: Gateway, backend_id: str, m: Listed) -> None:
    try:
        reply = await gw.client(backend_id).call("end", [("meetingID", m.backend_meeting_id)])
    except BackendError as exc:
        log.warning("could not end stray meeting %s on %s: %s", m.key, backend_id, exc)
        return
    if reply.ok:
        gw.count("stray-ended")
    log.info("ended stray meeting %s on %s: %s", m.key, backend_id, reply.ok)


async def reconcile_all(gw: Gateway) -> None:
    """Poll every backend in service once (start-up): the same poll the monitor makes.

    Reservations pinned to a backend no longer in the configuration are released
    first: the operator removed it, and nothing could reach its meetings.
    """
    configured = {b.id for b in gw.backends()}
    for backend_id in set(gw.ledger.state.backends()) - configured:
        held = gw.ledger.state.backend_meetings(backend_id)
        log.warning(
            "backend %s is not configured: releasing its %d meetings", backend_id, len(held)
        )
        for r in held:
            await gw.ledger.release(r.key, "backend-removed")
    shared = _shared(gw)
    if shared is not None:
        await shared.refresh_members()
    async with trio.open_nursery() as nursery:
        for backend_id in gw.in_service():
            if shared is None:
                nursery.start_soon(supervised_poll, gw, backend_id)
            else:
                nursery.start_soon(_start_up_turn, gw, shared, backend_id)
    down = [b for b, h in gw.health.items() if h.state is not State.UP]
    if down:
        log.warning("start-up: backends not reachable: %s", ", ".join(down))


async def _start_up_turn(gw: Gateway, shared: SharedPolls, backend_id: str) -> None:
    """At start-up on the Redis store: poll now if the lease is free (or ours), else
    take the health its holder published."""
    try:
        held = await shared.lease(backend_id).hold()
    except StorageUnavailable as e:
        shared.unreachable(e)
        await supervised_poll(gw, backend_id, reconcile=False)
        return
    if held:
        await _poll_and_publish(gw, shared, backend_id)
    else:
        await _apply_shared(gw, shared, backend_id)
