"""Tests written to kill mutants of ``proxy.ledger.model`` that survived (docs/mutation.md).

On the model's own functions (no I/O): the readings of an empty ledger, admission without
voice bridges, a refusal with a bridge or of a moved meeting, a moved meeting keeping its
own bridge, the victims' backend preferred by the chooser, the loads the chooser is shown.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from proxy.errors import NoServerCapacity
from proxy.ledger.model import (
    MINUTE,
    Admit,
    BackendSpec,
    Bridges,
    Chooser,
    Confirm,
    CreateRequest,
    LedgerState,
    Refuse,
    Release,
    Reservation,
    Reserve,
)
from proxy.placement import BackendLoad

HOUR = 60 * MINUTE


def request(
    meeting: str, size: int, minutes: int = 60, bridge: str | None = None, asked: int = 7
) -> CreateRequest:
    return CreateRequest("acme", meeting, f"acme~{meeting}", size, minutes, asked, bridge)


def held(
    meeting: str, backend: str, size: int, created_at: float, minutes: int = 60
) -> Reservation:
    return Reservation(
        "acme", meeting, backend, f"acme~{meeting}", size, minutes, minutes, created_at, True
    )


def state_of(*reservations: Reservation) -> LedgerState:
    state = LedgerState()
    for r in reservations:
        state.apply(Reserve(r))
    return state


def chooser(order: list[str], size: int) -> tuple[Chooser, list[dict[str, BackendLoad]]]:
    """A chooser taking the first backend in ``order`` with ``size`` free; the loads it saw."""
    seen: list[dict[str, BackendLoad]] = []

    def choose(loads: Mapping[str, BackendLoad]) -> str | None:
        seen.append(dict(loads))
        return next((b for b in order if b in loads and loads[b].free >= size), None)

    return choose, seen


# -- reading --------------------------------------------------------------------------------------


def test_an_empty_ledger_reads_as_empty() -> None:
    state = LedgerState()
    assert state.customer_meetings("acme") == []
    assert state.backend_meetings("b1") == []
    assert state.backends() == []


def test_the_backends_holding_reservations() -> None:
    state = state_of(held("A", "b1", 2, 0.0), held("B", "b2", 2, 0.0), held("C", "b1", 1, 0.0))
    assert state.backends() == ["b1", "b2"]
    state.apply(Release(("acme", "B"), "end"))
    assert state.backends() == ["b1"]
    assert [r.meeting_id for r in state.customer_meetings("acme")] == ["A", "C"]
    assert state.customer_meetings("globex") == []


# -- admitting ------------------------------------------------------------------------------------


def test_a_meeting_admitted_without_voice_bridges_has_none() -> None:
    state = LedgerState()
    choose, _ = chooser(["b1"], 3)
    decision = state.admit(request("A", 3), 20, [BackendSpec("b1", 10, True)], choose, 5.0)
    assert decision == Admit(Reservation("acme", "A", "b1", "acme~A", 3, 60, 7, 5.0, False, ""), ())


def test_a_refusal_with_a_voice_bridge_is_a_refusal() -> None:
    state = LedgerState()
    choose, _ = chooser(["b1"], 30)
    voice = Bridges(5, random.Random(1))
    decision = state.admit(
        request("A", 30, bridge="70757"),
        100,
        [BackendSpec("b1", 10, True)],
        choose,
        0.0,
        voice=voice,
    )
    assert isinstance(decision, Refuse) and type(decision.error) is NoServerCapacity


def test_a_moved_meeting_with_no_room_elsewhere_is_refused() -> None:
    state = state_of(held("A", "b1", 5, 0.0))
    state.suspend("b1")
    choose, _ = chooser(["b2"], 5)
    decision = state.admit(request("A", 5), 20, [BackendSpec("b2", 4, True)], choose, 1.0)
    assert isinstance(decision, Refuse) and type(decision.error) is NoServerCapacity


def test_a_moved_meeting_keeps_the_bridge_its_customer_gave() -> None:
    """Its own old pin holds the bridge: that is not another meeting holding it."""
    old = Reservation("acme", "A", "b1", "acme~A", 5, 60, 60, 0.0, True, "70757")
    state = state_of(old)
    state.suspend("b1")
    choose, _ = chooser(["b2"], 5)
    voice = Bridges(5, random.Random(1))
    decision = state.admit(
        request("A", 5, bridge="70757"), 20, [BackendSpec("b2", 10, True)], choose, 1.0, voice=voice
    )
    assert isinstance(decision, Admit)
    assert (decision.reservation.backend_id, decision.reservation.voice_bridge) == ("b2", "70757")
    assert decision.replaces == old


def test_preemption_prefers_what_the_chooser_picks_with_the_victims_gone() -> None:
    """b1 (the chooser's first) is full with an overtime meeting of the customer's; b2 has
    room. The subscription needs that meeting to end: with it gone b1 fits, so b1."""
    late = held("old", "b1", 10, 0.0, minutes=1)
    state = state_of(late)
    backends = [BackendSpec("b1", 10, True), BackendSpec("b2", 10, True)]
    choose, seen = chooser(["b1", "b2"], 10)
    decision = state.admit(request("new", 10, asked=0), 10, backends, choose, HOUR)
    assert decision == Admit(
        Reservation("acme", "new", "b1", "acme~new", 10, 60, 0, HOUR, False, ""), (late,)
    )
    assert [{b: load.used for b, load in loads.items()} for loads in seen] == [{"b1": 0, "b2": 0}]


def test_the_chooser_is_shown_each_backend_with_the_victims_connections_freed() -> None:
    first = held("one", "b1", 3, 0.0, minutes=1)
    second = held("two", "b1", 4, 10.0, minutes=1)
    other = held("three", "b2", 2, 0.0)
    state = state_of(first, second, other)
    backends = [BackendSpec("b1", 10, True), BackendSpec("b2", 10, False, responsive=False)]
    assert state._loads(backends, [first, second]) == {
        "b1": BackendLoad("b1", 10, 0, True, True),
        "b2": BackendLoad("b2", 10, 2, False, False),
    }
    assert state._loads(backends, [second]) == {
        "b1": BackendLoad("b1", 10, 3, True, True),
        "b2": BackendLoad("b2", 10, 2, False, False),
    }


def test_a_confirmed_reservation_admitted_after_preemption_is_counted_once() -> None:
    late = held("old", "b1", 10, 0.0, minutes=1)
    state = state_of(late)
    choose, _ = chooser(["b1"], 10)
    decision = state.admit(request("new", 10), 10, [BackendSpec("b1", 10, True)], choose, HOUR)
    assert isinstance(decision, Admit)
    state.apply(Release(late.key, "preempted"))
    state.apply(Reserve(decision.reservation))
    state.apply(Confirm(decision.reservation.key))
    assert (state.customer_used("acme"), state.backend_used("b1")) == (10, 10)
