"""The shared ledger (proxy.ledger.shared): several replicas on one real redis-server.

Each "instance" here is a :class:`SharedLedger` on its own Redis connection, as a gateway
process would open it; they race in one trio run.  What they must keep, whatever the
interleaving: no customer or backend overbooked, one reservation per meetingID, a
release (and its side effects) once, read-your-writes, and every replica the same as
the log on Redis once caught up.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import pytest
import trio

from proxy.config import StoreSettings
from proxy.errors import StorageUnavailable, SubscriptionExhausted
from proxy.ledger import redis_journal, shared
from proxy.ledger.model import (
    Admit,
    BackendSpec,
    Confirm,
    CreateRequest,
    Decision,
    Duplicate,
    LedgerState,
    Refuse,
    Release,
    Reservation,
    Reserve,
)
from proxy.ledger.shared import SharedLedger, open_shared_ledger
from proxy.placement import BackendLoad
from proxy.store.redis import open_redis_store
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name below

BACKENDS = [BackendSpec("bbb-1", 30, True), BackendSpec("bbb-2", 30, True)]

type Instances = Callable[..., AbstractAsyncContextManager[list[SharedLedger]]]


@pytest.fixture
def instances(redis_server: RedisServer) -> Instances:
    """``instances(n)``: n shared ledgers, each on its own connection, follow loop off
    (catching up happens only where the ledger itself does it)."""

    @asynccontextmanager
    async def opened(n: int, follow_every: float = 3600.0) -> AsyncIterator[list[SharedLedger]]:
        settings = StoreSettings(kind="redis", url=redis_server.url)
        async with AsyncExitStack() as stack:
            ledgers = []
            for _ in range(n):
                store = await stack.enter_async_context(open_redis_store(settings, timeout=2))
                ledger = open_shared_ledger(store, follow_every=follow_every)
                ledgers.append(await stack.enter_async_context(ledger))
            yield ledgers

    return opened


def request(meeting: str, size: int = 5, customer: str = "acme") -> CreateRequest:
    return CreateRequest(customer, meeting, f"{customer}~{meeting}", size, 60, 60)


def least_used(size: int) -> Callable[[Mapping[str, BackendLoad]], str | None]:
    def choose(loads: Mapping[str, BackendLoad]) -> str | None:
        fits = [b for b, load in loads.items() if load.available and load.free >= size]
        return min(fits, key=lambda b: loads[b].used, default=None)

    return choose


async def decide(ledger: SharedLedger, req: CreateRequest, limit: int = 40) -> Decision:
    return await ledger.decide(req, limit, BACKENDS, least_used(req.connections))


def same_state(a: LedgerState, b: LedgerState) -> bool:
    return {r.key: r for r in a} == {r.key: r for r in b}


async def on_redis(redis_server: RedisServer) -> LedgerState:
    settings = StoreSettings(kind="redis", url=redis_server.url)
    async with open_redis_store(settings, timeout=2) as store:
        return redis_journal.replay(store.open("ledger")[1])[0]


def check_invariants(state: LedgerState, limit: int) -> None:
    by_customer: dict[str, int] = {}
    by_backend: dict[str, int] = {}
    for r in state:
        by_customer[r.customer] = by_customer.get(r.customer, 0) + r.connections
        by_backend[r.backend_id] = by_backend.get(r.backend_id, 0) + r.connections
    assert all(used <= limit for used in by_customer.values()), by_customer
    capacity = {b.id: b.capacity for b in BACKENDS}
    assert all(used <= capacity[b] for b, used in by_backend.items()), by_backend
    assert by_customer == {c: state.customer_used(c) for c in by_customer}
    assert by_backend == {b: state.backend_used(b) for b in by_backend}


async def test_racing_creates_on_three_instances_never_overbook(
    instances: Instances, redis_server: RedisServer
) -> None:
    admitted: list[Reservation] = []
    refused = 0

    async def creating(ledger: SharedLedger, names: list[str]) -> None:
        nonlocal refused
        for name in names:
            decision = await decide(ledger, request(name, size=3))
            if isinstance(decision, Admit):
                admitted.append(decision.reservation)
            else:
                assert isinstance(decision, Refuse), decision
                assert isinstance(decision.error, SubscriptionExhausted)
                refused += 1
            await trio.lowlevel.checkpoint()

    async with instances(3) as ledgers:
        async with trio.open_nursery() as nursery:
            for i, ledger in enumerate(ledgers):
                nursery.start_soon(creating, ledger, [f"m{i}-{n}" for n in range(12)])
        for ledger in ledgers:
            await ledger.refresh()
        assert len(admitted) == 13 and refused == 36 - 13  # 13 × 3 = 39 <= 40
        assert sum(ledger.races for ledger in ledgers) > 0  # they did race
        truth = await on_redis(redis_server)
        check_invariants(truth, 40)
        for ledger in ledgers:
            assert same_state(ledger.state, truth)
            check_invariants(ledger.state, 40)


async def test_one_meeting_id_created_on_every_instance_at_once_is_admitted_once(
    instances: Instances,
) -> None:
    async with instances(3) as ledgers:
        async with trio.open_nursery() as nursery:
            decisions: list[Decision] = []

            async def create(ledger: SharedLedger) -> None:
                decisions.append(await decide(ledger, request("room")))

            for ledger in ledgers * 4:
                nursery.start_soon(create, ledger)
        assert sum(isinstance(d, Admit) for d in decisions) == 1
        assert sum(isinstance(d, Duplicate) for d in decisions) == 11
        held = {d.reservation for d in decisions if not isinstance(d, Refuse)}
        assert len(held) == 1  # every duplicate is of the one admitted


async def test_a_release_on_two_instances_is_returned_to_one(instances: Instances) -> None:
    async with instances(2) as (a, b):
        decision = await decide(a, request("room"))
        assert isinstance(decision, Admit)
        await b.refresh()
        answers: list[Reservation | None] = []
        async with trio.open_nursery() as nursery:
            for ledger in (a, b, a, b):
                nursery.start_soon(_append_release, ledger, answers)
        assert [r for r in answers if r is not None] == [decision.reservation]
        assert len(answers) == 4
        for ledger in (a, b):
            await ledger.refresh()
            assert ledger.get(("acme", "room")) is None


async def _append_release(ledger: SharedLedger, answers: list[Reservation | None]) -> None:
    answers.append(await ledger.release(("acme", "room"), "end"))


async def test_a_release_of_an_older_instance_of_the_meeting_leaves_the_new_one(
    instances: Instances,
) -> None:
    async with instances(2) as (a, b):
        assert isinstance(await decide(a, request("room")), Admit)
        await b.refresh()
        old = b.get(("acme", "room"))
        assert await a.release(("acme", "room"), "end") is not None
        await trio.sleep(0.01)  # another created_at
        new = await decide(a, request("room"))
        assert isinstance(new, Admit)
        assert old is not None and b.get(("acme", "room")) == old  # b has not caught up
        assert await b.release(("acme", "room"), "gone") is None  # about the old one
        assert b.get(("acme", "room")) == new.reservation


async def test_read_your_writes_across_instances(instances: Instances) -> None:
    async with instances(2) as (a, b):
        admitted = await decide(a, request("room", size=30))
        assert isinstance(admitted, Admit)
        assert await b.lookup(("acme", "room")) == admitted.reservation  # at once
        refused = await decide(b, request("other", size=11))
        assert isinstance(refused, Refuse)  # b knows the subscription has 10 left
        assert await a.release(("acme", "room"), "end") is not None
        assert isinstance(await decide(b, request("other", size=11)), Admit)  # freed at once


async def test_preemption_on_one_instance_ends_each_victim_once(instances: Instances) -> None:
    now = [1000.0]
    async with instances(3) as ledgers:
        for ledger in ledgers:
            ledger.clock = lambda: now[0]
        old = await decide(ledgers[0], CreateRequest("acme", "old", "acme~old", 30, 1, 1))
        assert isinstance(old, Admit)
        await ledgers[0].confirm(("acme", "old"))  # only running meetings are ended
        now[0] += 120  # "old" is overtime
        decisions: list[Decision] = []

        async def create(ledger: SharedLedger, name: str) -> None:
            decisions.append(await decide(ledger, request(name, size=20)))

        async with trio.open_nursery() as nursery:
            for i, ledger in enumerate(ledgers):
                nursery.start_soon(create, ledger, f"new-{i}")
        victims = [v for d in decisions if isinstance(d, Admit) for v in d.victims]
        assert [v.key for v in victims] == [("acme", "old")]
        assert sum(isinstance(d, Admit) for d in decisions) == 2  # 20 + 20 <= 40


async def test_a_compaction_by_one_instance_is_loaded_by_the_others(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(2) as (a, b):
        for n in range(5):
            assert isinstance(await decide(a, request(f"m{n}", size=1)), Admit)
            await a.confirm(("acme", f"m{n}"))
        b.state.suspend("bbb-1")
        await b.refresh()
        assert await a.log.try_compact(a.snapshot_records())
        assert isinstance(await decide(a, request("after", size=1)), Admit)
        await b.refresh()
        assert b.reloads == 1 and same_state(b.state, a.state)
        assert b.state.suspended == {"bbb-1"}  # health is not in the log: kept
        assert b.seq == a.seq
        assert isinstance(await decide(b, request("from-b", size=1)), Admit)
        assert same_state(await on_redis(redis_server), b.state)


async def test_a_record_out_of_sequence_makes_a_replica_read_the_whole_log(
    instances: Instances,
) -> None:
    async with instances(2) as (a, b):
        assert isinstance(await decide(a, request("room")), Admit)
        await b.refresh()
        b.seq += 5  # as if it had missed records: the next one does not follow
        assert isinstance(await decide(a, request("next")), Admit)
        await b.refresh()
        assert b.reloads == 1 and same_state(a.state, b.state) and b.seq == a.seq


async def test_a_lost_answer_leaves_records_that_the_next_catch_up_applies(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(1) as (a,):
        assert isinstance(await decide(a, request("first")), Admit)  # the script is loaded
        a.log.store.timeout = 0.3
        assert redis_server.process is not None
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StorageUnavailable):
                await decide(a, request("room"))  # sent; its answer never comes
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)  # now Redis runs it
        assert a.journal.failed
        assert a.get(("acme", "room")) is None
        with trio.fail_after(5):
            while a.get(("acme", "room")) is None:
                await trio.sleep(0.05)
                await a.refresh()
        assert a.seq == 2 and same_state(a.state, await on_redis(redis_server))


async def test_while_redis_is_down_nothing_commits_and_reads_go_on(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(1, follow_every=0.05) as (a,):
        a.log.store.timeout = 0.5
        admitted = await decide(a, request("room"))
        assert isinstance(admitted, Admit)
        redis_server.kill()
        with pytest.raises(StorageUnavailable):
            await decide(a, request("other"))
        await a.confirm(("acme", "room"))  # never raises
        assert await a.release(("acme", "room"), "end") is None  # not committed: kept
        assert await a.lookup(("acme", "room")) == admitted.reservation
        assert a.journal.failed
        with pytest.raises(StorageUnavailable):
            await a.durable()
        redis_server.start()
        with trio.fail_after(10):
            while a.journal.failed:  # noqa: ASYNC110 - the follow loop's recovery
                await trio.sleep(0.05)
        assert isinstance(await decide(a, request("other")), Admit)


async def test_another_instances_pending_create_is_waited_for(
    instances: Instances, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with instances(2) as (a, b):
        assert isinstance(await decide(a, request("room")), Admit)
        await b.refresh()
        assert b.settling(("acme", "room"))  # pending on a, created just now
        async with trio.open_nursery() as nursery:
            waited = trio.Event()

            async def waiting() -> None:
                await b.wait_settled(("acme", "room"))
                waited.set()

            nursery.start_soon(waiting)
            await trio.sleep(0.1)
            assert not waited.is_set()
            await a.confirm(("acme", "room"))
            with trio.fail_after(5):
                await waited.wait()
        assert not b.settling(("acme", "room"))
        monkeypatch.setattr(shared, "REMOTE_SETTLE", 0.0)
        assert isinstance(await decide(a, request("stuck")), Admit)  # never confirmed
        await b.refresh()
        assert not b.settling(("acme", "stuck"))  # too old to wait for: asked of the backend


async def test_reconciliation_records_commit_only_while_still_true(instances: Instances) -> None:
    async with instances(2) as (a, b):
        assert isinstance(await decide(a, request("room")), Admit)
        adopted = Reservation("acme", "room", "bbb-2", "acme~room", 5, 60, 60, 5.0, True)
        await b.record(Reserve(adopted))  # b had not seen a's: it catches up, then drops it
        assert b.get(("acme", "room")) == a.get(("acme", "room"))
        assert b.get(("acme", "room")) != adopted
        await b.record(Confirm(("acme", "room")))
        await a.refresh()
        held = a.get(("acme", "room"))
        assert held is not None and held.confirmed


@pytest.mark.parametrize("seed", range(3))
async def test_random_interleavings_keep_replicas_equal_to_the_log(
    instances: Instances, redis_server: RedisServer, seed: int
) -> None:
    rng = random.Random(seed)
    async with instances(3) as ledgers:

        async def actor(ledger: SharedLedger, n: int) -> None:
            for step in range(15):
                meeting = f"m{rng.randrange(8)}"
                match rng.randrange(4):
                    case 0 | 1:
                        decision = await decide(ledger, request(meeting, rng.randrange(1, 12)))
                        if isinstance(decision, Admit) and rng.random() < 0.7:
                            await ledger.confirm(decision.reservation.key)
                    case 2:
                        await ledger.release(("acme", meeting), "end")
                    case _:
                        await ledger.refresh()
                if step % 3 == n:
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for n, ledger in enumerate(ledgers):
                nursery.start_soon(actor, ledger, n)
        truth = await on_redis(redis_server)
        check_invariants(truth, 40)
        for ledger in ledgers:
            await ledger.refresh()
            assert same_state(ledger.state, truth)


async def test_a_log_that_lost_records_is_reread_not_raced_forever(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(1) as (a,):
        for n in range(3):
            assert isinstance(await decide(a, request(f"m{n}", size=1)), Admit)
        settings = StoreSettings(kind="redis", url=redis_server.url)
        async with open_redis_store(settings, timeout=2) as store:
            key = store.key("log", "ledger")
            newest = await store.client.xrevrange(key, count=2)
            await store.client.xdel(key, [e.identifier for e in newest])  # lost the last two
        assert isinstance(await decide(a, request("after", size=1)), Admit)
        assert a.reloads == 1
        assert same_state(a.state, await on_redis(redis_server))


async def test_a_release_redis_did_not_take_still_ends_the_wait_for_the_create(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(1) as (a,):
        a.log.store.timeout = 0.5
        assert isinstance(await decide(a, request("room")), Admit)  # its create in flight
        assert a.settling(("acme", "room"))
        redis_server.kill()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.release, ("acme", "room"), "failed")  # the create failed
            with trio.fail_after(5):
                await a.wait_settled(("acme", "room"))  # a duplicate create goes on
        assert ("acme", "room") not in a._settled


async def test_a_release_redis_did_not_take_is_committed_once_it_is_back(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(2, follow_every=0.05) as (a, b):
        a.log.store.timeout = 0.5
        assert isinstance(await decide(a, request("room", size=30)), Admit)
        await b.refresh()
        redis_server.kill()
        assert await a.release(("acme", "room"), "end") is None  # the backend ended it
        assert a.owed == 1
        redis_server.start()
        with trio.fail_after(10):
            while a.owed:  # noqa: ASYNC110 - the follow task pays it
                await trio.sleep(0.05)
        await b.refresh()
        assert b.get(("acme", "room")) is None  # freed for every instance
        assert isinstance(await decide(b, request("next", size=30)), Admit)
        assert same_state(await on_redis(redis_server), b.state)


async def test_an_idle_instance_is_not_ready_within_moments_of_redis_going_away(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(1, follow_every=0.05) as (a,):
        a.log.store.timeout = 0.5
        assert not a.journal.failed
        redis_server.kill()  # nothing is written meanwhile: the follow task notices
        with trio.fail_after(5):
            while not a.journal.failed:  # noqa: ASYNC110
                await trio.sleep(0.05)
        redis_server.start()
        with trio.fail_after(10):
            while a.journal.failed:  # noqa: ASYNC110
                await trio.sleep(0.05)


async def test_concurrent_changes_on_one_instance_share_commits(
    instances: Instances, redis_server: RedisServer
) -> None:
    async with instances(2) as (a, b):
        decisions: list[Decision] = []

        async def create(ledger: SharedLedger, name: str) -> None:
            decisions.append(await decide(ledger, request(name, size=1)))

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(create, a if n % 4 else b, f"m{n}")
        assert all(isinstance(d, Admit) for d in decisions) and len(decisions) == 40
        assert a.commits + b.commits == 40
        assert a.batches + b.batches < 40  # several changes went in one compare-and-append
        truth = await on_redis(redis_server)
        for ledger in (a, b):
            await ledger.refresh()
            assert same_state(ledger.state, truth)


def test_changes_applied_tentatively_are_taken_back_exactly() -> None:
    state = LedgerState()
    old = Reservation("acme", "old", "bbb-1", "acme~old", 4, 60, 60, 1.0, True, "71234")
    held = Reservation("acme", "held", "bbb-2", "acme~held", 3, 60, 60, 2.0, False)
    for r in (old, held):
        state.apply(Reserve(r))
    state.suspend("bbb-2")
    before = ({r.key: r for r in state}, state.statistics(), state.bridge_taken("71234"))
    undo = shared._Undo(state)
    alias = Reservation("acme", "alias", "bbb-1", "acme~old", 5, 60, 60, 3.0, False, "75555")
    for record in (
        Confirm(("acme", "held")),
        Release(("acme", "old"), "end"),
        Reserve(alias),  # the same backend meeting as "old"
        Reserve(Reservation("acme", "new", "bbb-2", "acme~new", 2, 60, 60, 4.0, False)),
        Release(("acme", "held"), "preempted"),
    ):
        undo.apply(record)
    assert {r.meeting_id for r in state} == {"alias", "new"}
    undo.restore()
    after = ({r.key: r for r in state}, state.statistics(), state.bridge_taken("71234"))
    assert after == before
    assert not state.bridge_taken("75555")
    assert state.by_backend_meeting("bbb-1", "acme~old") == old
