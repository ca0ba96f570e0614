"""Reservation windows on trio's autojump clock: the ledger's clock is trio's, times exact."""

from __future__ import annotations

import trio
import trio.testing

from proxy.errors import SubscriptionExhausted
from proxy.ledger.model import MINUTE, Admit, BackendSpec, CreateRequest, Refuse
from proxy.ledger.service import Ledger
from proxy.placement import Ring

BACKENDS = [BackendSpec("b1", 100, True)]
RING = Ring(["b1"])


def request(meeting: str, size: int, minutes: int) -> CreateRequest:
    return CreateRequest("acme", meeting, f"acme~{meeting}", size, minutes, minutes)


async def admit(ledger: Ledger, req: CreateRequest) -> Admit | Refuse:
    decision = ledger.admit(
        req, 20, BACKENDS, lambda loads: RING.choose(req.backend_meeting_id, req.connections, loads)
    )
    assert isinstance(decision, Admit | Refuse)
    if isinstance(decision, Admit):
        await ledger.confirm(decision.reservation.key)
    return decision


async def test_window_closes_exactly_at_duration(autojump_clock: trio.testing.MockClock) -> None:
    ledger = Ledger(clock=trio.current_time)
    start = trio.current_time()
    assert isinstance(await admit(ledger, request("A-room", 15, 120)), Admit)

    await trio.sleep_until(start + 120 * MINUTE - 0.001)
    refused = await admit(ledger, request("B-room", 10, 60))
    assert isinstance(refused, Refuse) and isinstance(refused.error, SubscriptionExhausted)
    assert ledger.get(("acme", "A-room")) is not None

    await trio.sleep_until(start + 120 * MINUTE)
    admitted = await admit(ledger, request("B-room", 10, 60))
    assert isinstance(admitted, Admit)
    assert [v.meeting_id for v in admitted.victims] == ["A-room"]
    assert ledger.get(("acme", "A-room")) is None
    assert ledger.statistics().connections_by_customer == {"acme": 10}


async def test_pending_create_waits_and_then_sees_duplicate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger(clock=trio.current_time)
    start = trio.current_time()
    first = ledger.admit(
        request("room", 5, 60), 20, BACKENDS, lambda loads: RING.choose("acme~room", 5, loads)
    )
    assert isinstance(first, Admit)
    woke_at: list[float] = []

    async def second() -> None:
        await ledger.wait_settled(("acme", "room"))
        woke_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.sleep(7)
        await ledger.confirm(first.reservation.key)
    assert woke_at == [start + 7]
