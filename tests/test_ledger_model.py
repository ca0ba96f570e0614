"""The admission decision of SPEC §4, as plain functions (no I/O, no trio)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from proxy.errors import NoServerCapacity, SubscriptionExhausted
from proxy.ledger.model import (
    MINUTE,
    Admit,
    BackendSpec,
    Confirm,
    CreateRequest,
    Duplicate,
    LedgerState,
    Refuse,
    Release,
    Reserve,
)
from proxy.placement import BackendLoad, Ring

HOUR = 60 * MINUTE
BACKENDS = [BackendSpec("b1", 100, True), BackendSpec("b2", 100, True)]


def request(meeting: str, size: int, minutes: int, customer: str = "acme") -> CreateRequest:
    return CreateRequest(customer, meeting, f"{customer}~{meeting}", size, minutes, minutes)


def admit_and_apply(
    state: LedgerState,
    req: CreateRequest,
    now: float,
    limit: int = 20,
    backends: list[BackendSpec] = BACKENDS,
) -> Admit | Duplicate | Refuse:
    ring = Ring([b.id for b in backends])

    def choose(loads: Mapping[str, BackendLoad]) -> str | None:
        return ring.choose(req.backend_meeting_id, req.connections, loads)

    decision = state.admit(req, limit, backends, choose, now)
    if isinstance(decision, Admit):
        for victim in decision.victims:
            state.apply(Release(victim.key, "preempted"))
        state.apply(Reserve(decision.reservation))
        state.apply(Confirm(decision.reservation.key))
    return decision


class TestSpecExample:
    """SPEC §4: subscription 20. A: 15 for 2 h. ..."""

    def setup_state(self) -> LedgerState:
        state = LedgerState()
        decision = admit_and_apply(state, request("A", 15, 120), now=0.0)
        assert isinstance(decision, Admit)
        return state

    def test_b_asks_10_during_a_two_hours_is_refused_and_a_untouched(self) -> None:
        state = self.setup_state()
        decision = admit_and_apply(state, request("B", 10, 60), now=2 * HOUR - 1)
        assert isinstance(decision, Refuse)
        assert isinstance(decision.error, SubscriptionExhausted)
        assert state.get(("acme", "A")) is not None
        assert state.customer_used("acme") == 15

    def test_b_asks_10_after_a_two_hours_ends_a_and_is_created(self) -> None:
        state = self.setup_state()
        decision = admit_and_apply(state, request("B", 10, 60), now=2 * HOUR)
        assert isinstance(decision, Admit)
        assert [v.meeting_id for v in decision.victims] == ["A"]
        assert state.get(("acme", "A")) is None
        assert state.customer_used("acme") == 10

    @pytest.mark.parametrize("now", [0.0, HOUR, 2 * HOUR, 10 * HOUR])
    def test_b_asks_5_at_any_time_is_created_and_a_untouched(self, now: float) -> None:
        state = self.setup_state()
        decision = admit_and_apply(state, request("B", 5, 60), now=now)
        assert isinstance(decision, Admit)
        assert decision.victims == ()
        assert state.get(("acme", "A")) is not None
        assert state.customer_used("acme") == 20


def test_oldest_overtime_first_and_only_as_many_as_needed() -> None:
    state = LedgerState()
    admit_and_apply(state, request("late", 5, 60), now=0.0)  # overtime from 1 h
    admit_and_apply(state, request("early", 5, 30), now=0.0)  # overtime from 30 min
    admit_and_apply(state, request("kept", 5, 30), now=10 * MINUTE)  # overtime from 40 min
    decision = admit_and_apply(state, request("new", 15, 60), now=2 * HOUR)
    assert isinstance(decision, Admit)
    assert [v.meeting_id for v in decision.victims] == ["early", "kept"]
    assert state.get(("acme", "late")) is not None


def test_nothing_ended_when_even_all_overtime_would_not_fit() -> None:
    state = LedgerState()
    admit_and_apply(state, request("over", 5, 10), now=0.0)
    admit_and_apply(state, request("reserved", 10, 600), now=0.0)
    decision = admit_and_apply(state, request("big", 16, 60), now=HOUR)
    assert isinstance(decision, Refuse)
    assert isinstance(decision.error, SubscriptionExhausted)
    assert state.customer_used("acme") == 15
    assert len(state) == 2


def test_other_customers_meetings_are_never_preempted() -> None:
    state = LedgerState()
    admit_and_apply(state, request("theirs", 15, 10, customer="other"), now=0.0)
    decision = admit_and_apply(state, request("mine", 20, 60), now=HOUR)
    assert isinstance(decision, Admit)
    assert decision.victims == ()
    assert state.get(("other", "theirs")) is not None


def test_no_server_capacity_when_no_backend_has_room() -> None:
    state = LedgerState()
    small = [BackendSpec("b1", 10, True), BackendSpec("b2", 10, True)]
    decision = admit_and_apply(state, request("big", 11, 60), now=0.0, backends=small)
    assert isinstance(decision, Refuse)
    assert isinstance(decision.error, NoServerCapacity)
    assert len(state) == 0


def test_ending_own_overtime_meeting_makes_server_room() -> None:
    state = LedgerState()
    one = [BackendSpec("b1", 10, True)]
    admit_and_apply(state, request("old", 8, 10), now=0.0, limit=100, backends=one)
    decision = admit_and_apply(state, request("new", 5, 60), now=HOUR, limit=100, backends=one)
    assert isinstance(decision, Admit)
    assert [v.meeting_id for v in decision.victims] == ["old"]
    assert state.backend_used("b1") == 5


def test_unavailable_backends_get_nothing() -> None:
    state = LedgerState()
    backends = [BackendSpec("b1", 100, False), BackendSpec("b2", 100, True)]
    for i in range(10):
        decision = admit_and_apply(state, request(f"m{i}", 1, 60), now=0.0, backends=backends)
        assert isinstance(decision, Admit)
        assert decision.reservation.backend_id == "b2"


def test_repeated_create_is_a_duplicate_and_reserves_nothing() -> None:
    state = LedgerState()
    first = admit_and_apply(state, request("A", 10, 60), now=0.0)
    again = admit_and_apply(state, request("A", 10, 60), now=1.0)
    assert isinstance(first, Admit)
    assert isinstance(again, Duplicate)
    assert again.reservation.backend_id == first.reservation.backend_id
    assert state.customer_used("acme") == 10


def test_release_frees_customer_and_backend_connections() -> None:
    state = LedgerState()
    decision = admit_and_apply(state, request("A", 7, 60), now=0.0)
    assert isinstance(decision, Admit)
    backend = decision.reservation.backend_id
    assert state.backend_used(backend) == 7
    released = state.apply(Release(("acme", "A"), "end"))
    assert released is not None and released.meeting_id == "A"
    assert state.customer_used("acme") == 0
    assert state.backend_used(backend) == 0
    assert state.by_backend_meeting(backend, "acme~A") is None
    assert state.apply(Release(("acme", "A"), "end")) is None


def test_pending_meetings_are_not_preempted() -> None:
    state = LedgerState()
    ring = Ring(["b1", "b2"])
    req = request("pending", 15, 1)
    decision = state.admit(
        req, 20, BACKENDS, lambda loads: ring.choose(req.backend_meeting_id, 15, loads), 0.0
    )
    assert isinstance(decision, Admit)
    state.apply(Reserve(decision.reservation))  # never confirmed
    later = admit_and_apply(state, request("B", 10, 60), now=HOUR)
    assert isinstance(later, Refuse)


def test_pending_count_follows_reserve_confirm_release() -> None:
    state = LedgerState()
    ring = Ring(["b1", "b2"])
    keys = []
    for i in range(4):
        req = request(f"m{i}", 1, 60)

        def choose(
            loads: Mapping[str, BackendLoad], key: str = req.backend_meeting_id
        ) -> str | None:
            return ring.choose(key, 1, loads)

        decision = state.admit(req, 20, BACKENDS, choose, 0.0)
        assert isinstance(decision, Admit)
        state.apply(Reserve(decision.reservation))
        keys.append(decision.reservation.key)
    assert state.statistics().pending == 4
    state.apply(Confirm(keys[0]))
    state.apply(Confirm(keys[0]))  # twice changes nothing
    state.apply(Release(keys[1], "failed"))  # a pending one
    state.apply(Release(keys[0], "end"))  # a confirmed one
    assert state.statistics().pending == 2
    assert state.statistics().pending == sum(not r.confirmed for r in state)
