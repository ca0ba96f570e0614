"""Backend polls done once across gateway instances on one Redis (issue 13).

The lease primitive (proxy.store.leases) against a real redis-server, the pure parts of
proxy.backends.cluster, and three gateways in this process on one redis-server sharing
three simulated backends (the shared ledger; the poll count also with a ledger in memory
per instance): one poll per backend per interval (not one per instance), a backend made
DOWN seen DOWN by every instance, a dead (or stopped) lease holder's backends polled by
another within the lease's length, a meeting gone from its backend released once, a lease
taken by another holder stopping the polls, and without Redis every instance polling for
health until it is back.  Each gateway's monitor runs in a scope of its own (as
serve_gateway runs it) so that it can be stopped alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from proxy.backends import cluster
from proxy.backends.cluster import LEASE_INTERVALS, SharedPolls, preferred, shared_polls
from proxy.backends.monitor import monitor_backends
from proxy.bbb.checksum import signed_query
from proxy.config import StoreSettings
from proxy.errors import StorageUnavailable
from proxy.gateway import Gateway
from proxy.health import Health, State, from_shared, shared_fields
from proxy.ledger.service import Ledger
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from proxy.store.leases import Lease, Members
from proxy.store.redis import RedisStore, open_redis_store
from tests.harness import BACKEND_SECRET, SECRETS, config_for, free_port
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name below

INTERVAL = 0.5  # seconds between two polls of a backend
HEALTH = {"interval": INTERVAL, "timeout": 0.4, "down_after": 2, "up_after": 1}
BACKENDS = ("bbb-1", "bbb-2", "bbb-3")
WAIT = 15.0  # seconds a background condition may take on a loaded machine


async def eventually(condition: Callable[[], bool], seconds: float = WAIT) -> None:
    """Wait until ``condition()`` (something other tasks do); fail after ``seconds``."""
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - the condition lives in other servers' state
            await trio.sleep(0.01)


@asynccontextmanager
async def store_on(server: RedisServer, bound: float = 2.0) -> AsyncIterator[RedisStore]:
    async with open_redis_store(StoreSettings(kind="redis", url=server.url), timeout=bound) as s:
        yield s


# -- the lease primitive --------------------------------------------------------------------


async def test_a_lease_is_held_by_one_holder_until_released(redis_server: RedisServer) -> None:
    async with store_on(redis_server) as store:
        a, b = Lease(store, "t:lease", 30.0), Lease(store, "t:lease", 30.0)
        assert await a.hold() and a.held
        assert not await b.hold() and not b.held
        assert await a.hold() and await a.renew()  # the holder renews
        assert not await b.renew() and not await b.release()  # only the holder
        assert await a.release() and not a.held
        assert await b.hold() and b.held
        assert not await a.renew() and not a.held  # released: renew does not take it back


async def test_a_lease_not_renewed_expires_and_another_takes_it(redis_server: RedisServer) -> None:
    async with store_on(redis_server) as store:
        a, b = Lease(store, "t:lease", 0.3), Lease(store, "t:lease", 0.3)
        assert await a.hold()
        await eventually(lambda: not a.held)  # its own view ends with its length
        with trio.fail_after(WAIT):
            while not await b.hold():  # noqa: ASYNC110 - each try asks Redis
                await trio.sleep(0.02)
        assert not await a.renew()  # held by another now: a renewal fails
        assert not await a.hold()


async def test_a_lease_is_handed_over_only_to_a_live_member(redis_server: RedisServer) -> None:
    async with store_on(redis_server) as store:
        a, b = Lease(store, "t:lease", 30.0), Lease(store, "t:lease", 30.0)
        members = Members(store, "t:members", a.holder, ttl=30.0)
        await members.refresh()
        assert await a.hold()
        assert not await a.hand_over(b.holder, members)  # not a member
        assert a.held and not await b.hold()
        assert sorted(await Members(store, "t:members", b.holder, 30.0).refresh()) == sorted(
            [a.holder, b.holder]
        )
        assert await a.hand_over(b.holder, members) and not a.held
        assert await b.hold() and b.held  # b has it (a renewal), a does not
        assert not await a.hold()


async def test_a_member_not_refreshed_leaves_the_members(redis_server: RedisServer) -> None:
    async with store_on(redis_server) as store:
        short = Members(store, "t:members", "short", ttl=0.2)
        long = Members(store, "t:members", "long", ttl=30.0)
        await short.refresh()
        assert await long.refresh() == ["long", "short"]
        with trio.fail_after(WAIT):
            while await long.refresh() != ["long"]:  # noqa: ASYNC110 - each asks Redis
                await trio.sleep(0.05)
        await long.leave()
        assert await short.refresh() == ["short"]


async def test_redis_down_is_storage_unavailable_and_the_held_time_runs_out(
    redis_server: RedisServer,
) -> None:
    async with store_on(redis_server, bound=0.5) as store:
        a = Lease(store, "t:lease", 1.0)
        assert await a.hold()
        redis_server.kill()
        with pytest.raises(StorageUnavailable):
            await a.hold()
        await eventually(lambda: not a.held)  # unconfirmed: it runs out by itself
        for step in (a.renew, a.release):
            with pytest.raises(StorageUnavailable):
                await step()
        redis_server.start()


async def test_keep_logs_a_lost_lease_once_and_holds_it_again(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "proxy.store.leases")
    async with store_on(redis_server) as store, trio.open_nursery() as nursery:
        kept, thief = Lease(store, "t:lease", 0.3), Lease(store, "t:lease", 0.3)
        nursery.start_soon(kept.keep)
        await eventually(lambda: kept.held)
        await store.run(lambda: store.client.set("t:lease", thief.holder, px=3000), "SET")
        await eventually(lambda: not kept.held)
        await trio.sleep(0.5)  # several more rounds of keep() while the thief holds it
        lost = [r for r in caplog.records if "lost" in r.getMessage()]
        assert len(lost) == 1, caplog.text
        await store.run(lambda: store.client.delete(["t:lease"]), "DEL")
        await eventually(lambda: kept.held)
        assert any("held again" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


# -- pure parts -----------------------------------------------------------------------------


def test_preferred_spreads_backends_and_moves_only_a_leaving_members_ones() -> None:
    backends = [f"bbb-{n}" for n in range(300)]
    members = ["a", "b", "c"]
    chosen = {b: preferred(b, members) for b in backends}
    shares = {m: sum(1 for c in chosen.values() if c == m) for m in members}
    assert all(share > 60 for share in shares.values()), shares
    without_c = {b: preferred(b, ["a", "b"]) for b in backends}
    assert all(without_c[b] == chosen[b] for b in backends if chosen[b] != "c")
    assert preferred("bbb-1", []) is None


def test_shared_health_round_trips_with_down_since_as_an_age() -> None:
    down = Health(State.DOWN, failures=4, successes=0, down_since=100.0, latency=0.25)
    fields = shared_fields(down, now=130.0)
    assert from_shared(fields, now=1000.0) == dataclasses.replace(down, down_since=970.0)
    assert from_shared(shared_fields(Health(), now=5.0), now=9.0) == Health()
    assert from_shared({**fields, "state": "sleepy"}, now=1.0) is None
    assert from_shared({}, now=1.0) is None


# -- three gateways on one Redis ------------------------------------------------------------


@dataclass
class Instance:
    gateway: Gateway
    url: str
    scope: trio.CancelScope  # the whole gateway
    monitor: trio.CancelScope  # its backend monitor (cancelled alone: a clean stop of it)
    monitor_done: trio.Event

    async def stop(self) -> None:
        """The monitor first (it gives its leases up while the Redis client is open),
        then the gateway."""
        self.monitor.cancel()
        await self.monitor_done.wait()
        self.scope.cancel()

    @property
    def polls(self) -> SharedPolls:
        shared = shared_polls(self.gateway)
        assert shared is not None
        return shared

    def sent(self, backend_id: str) -> int:
        return self.gateway.tallies.get(("backend_polls", backend_id), 0)


async def _instance(
    sim_urls: list[str],
    state_dir: Path,
    redis: RedisServer,
    ledger: str,
    *,
    task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A gateway on ``redis``: its ledger the shared one there, or (``ledger="own"``)
    one in memory of its own (the polls on Redis all the same)."""
    port = free_port()
    proxy = {
        "state_dir": str(state_dir),
        "bind": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "health": HEALTH,
    }
    config = dataclasses.replace(
        config_for(sim_urls, proxy=proxy), store=StoreSettings(kind="redis", url=redis.url)
    )
    own = Ledger() if ledger == "own" else None
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            serving = functools.partial(serve_gateway, config, ledger=own, monitor=False)
            gateway, binds = await nursery.start(serving)
            instance = Instance(gateway, binds[0], scope, trio.CancelScope(), trio.Event())
            nursery.start_soon(_monitor, instance)
            task_status.started(instance)


async def _monitor(instance: Instance) -> None:
    """The monitor serve_gateway runs (``monitor=True``), in a scope of its own."""
    try:
        with instance.monitor:
            await monitor_backends(instance.gateway)
    finally:
        instance.monitor_done.set()


@dataclass
class Cluster:
    sims: list[Simulator]
    instances: list[Instance]

    def polled(self, backend_id: str) -> int:
        """getMeetings calls the backend's simulator has answered so far."""
        sim = self.sims[BACKENDS.index(backend_id)]
        return sum(1 for call, _ in sim.requests if call == "getMeetings")

    def holders(self, backend_id: str) -> list[Instance]:
        return [i for i in self.instances if i.polls.holds(backend_id)]

    def settled(self) -> bool:
        """Every backend's lease with its preferred instance, and only there."""
        members = [i.polls.holder for i in self.instances]
        for backend_id in BACKENDS:
            holders = self.holders(backend_id)
            if [h.polls.holder for h in holders] != [preferred(backend_id, members)]:
                return False
        return True


@asynccontextmanager
async def open_three(
    nursery: trio.Nursery, tmp_path: Path, redis: RedisServer, ledger: str
) -> AsyncIterator[Cluster]:
    """Three simulated backends and three gateways on ``redis``, each backend's lease
    with its preferred instance; the gateways stopped after."""
    sims = [
        Simulator(BACKEND_SECRET, server_name=f"{b}.test", expire_unjoined_minutes=None)
        for b in BACKENDS
    ]
    urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    instances = []
    for n in range(3):
        starting = functools.partial(_instance, urls, tmp_path / f"gw-{n}", redis, ledger)
        instances.append(await nursery.start(starting))
    running = Cluster(sims, instances)
    try:
        await eventually(running.settled)
        yield running
    finally:
        for instance in instances:
            await instance.stop()


@pytest.fixture
async def three(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Cluster]:
    """:func:`open_three` on the shared ledger (or, parametrized ``"own"``, on ledgers in
    memory, one per instance: the polls alone on Redis)."""
    ledger = getattr(request, "param", "shared")
    async with open_three(nursery, tmp_path, redis_server, ledger) as running:
        yield running


@pytest.mark.parametrize("three", ["own", "shared"], indirect=True)
async def test_each_backend_is_polled_once_per_interval_not_once_per_instance(
    three: Cluster,
) -> None:
    intervals = 8
    before = {b: three.polled(b) for b in BACKENDS}
    sent_before = {(n, b): i.sent(b) for n, i in enumerate(three.instances) for b in BACKENDS}
    await trio.sleep(intervals * INTERVAL)  # the window polls are counted in
    polled = {b: three.polled(b) - before[b] for b in BACKENDS}
    assert all(intervals - 3 <= n <= intervals + 1 for n in polled.values()), polled
    for backend_id in BACKENDS:  # one instance sent them all, and the simulator saw them all
        sent = [
            i.sent(backend_id) - sent_before[n, backend_id] for n, i in enumerate(three.instances)
        ]
        assert sorted(sent)[:-1] == [0, 0], sent  # (one in flight at the window's edges)
        assert abs(sum(sent) - polled[backend_id]) <= 1, (sent, polled)
    assert three.settled()  # each backend with its preferred instance: spread, not moved


async def test_a_backend_down_is_down_and_suspended_on_every_instance(three: Cluster) -> None:
    three.sims[0].behaviour.mode = "http500"
    await eventually(
        lambda: all(i.gateway.health["bbb-1"].state is State.DOWN for i in three.instances)
    )
    assert all("bbb-1" in i.gateway.ledger.state.suspended for i in three.instances)
    assert all(i.gateway.health["bbb-2"].state is State.UP for i in three.instances)
    async with httpx.AsyncClient(timeout=10) as http:
        for instance in three.instances:  # the admin's view: /metrics reads gw.health
            scrape = (await http.get(f"{instance.url}/metrics")).text
            assert 'bbb_proxy_backend_health{backend="bbb-1",state="down"} 1.0' in scrape
    three.sims[0].behaviour.mode = "ok"
    await eventually(
        lambda: all(i.gateway.health["bbb-1"].state is State.UP for i in three.instances)
    )
    assert not any("bbb-1" in i.gateway.ledger.state.suspended for i in three.instances)


async def _takeover(
    three: Cluster, backend_id: str, stop: Callable[[Instance], trio.CancelScope]
) -> tuple[float, float]:
    """Stop (the ``stop`` scope of) the holder of ``backend_id``'s lease; (seconds from its
    last poll to the next poll by another instance, seconds from the stop to that poll)."""
    (holder,) = three.holders(backend_id)
    others = [i for i in three.instances if i is not holder]
    counts = [i.sent(backend_id) for i in others]
    polled = three.polled(backend_id)
    await eventually(lambda: three.polled(backend_id) > polled)  # a poll just happened
    last_poll = trio.current_time()
    stop(holder).cancel()
    killed = trio.current_time()
    await eventually(
        lambda: any(i.sent(backend_id) > c for i, c in zip(others, counts, strict=True))
    )
    now = trio.current_time()
    return now - last_poll, now - killed


async def test_a_dead_holders_polls_move_to_another_within_the_lease(
    three: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def dies(self: SharedPolls) -> None:  # as kill -9: nothing given up
        return None

    monkeypatch.setattr(cluster.SharedPolls, "leave", dies)
    lease = LEASE_INTERVALS * INTERVAL
    gap, since_kill = await _takeover(three, "bbb-1", lambda i: i.scope)
    assert gap >= lease - INTERVAL  # nobody polled while the dead one's lease lasted
    assert since_kill <= lease + 2 * INTERVAL + 1.0  # then another did, within it (+ slack)


async def test_a_stopped_monitor_gives_its_polls_up_at_once(three: Cluster) -> None:
    _, since_stop = await _takeover(three, "bbb-2", lambda i: i.monitor)
    assert since_stop <= 2 * INTERVAL + 1.0  # released: the next interval's turn takes it


async def test_a_meeting_gone_from_its_backend_is_released_once_for_every_instance(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    async with open_three(nursery, tmp_path, redis_server, "shared") as three:
        gateway = three.instances[0].gateway
        async with httpx.AsyncClient(timeout=10) as http:
            query = signed_query(
                "create", [("meetingID", "room-1"), ("name", "Room 1")], SECRETS["acme"]
            )
            url = f"{three.instances[0].url}/acme/bigbluebutton/api/create?{query}"
            assert "<returncode>SUCCESS</returncode>" in (await http.get(url)).text
        reservation = gateway.ledger.get(("acme", "room-1"))
        assert reservation is not None
        await eventually(
            lambda: all(i.gateway.ledger.get(reservation.key) for i in three.instances)
        )
        sim = three.sims[BACKENDS.index(reservation.backend_id)]
        sim.end_meeting(sim.meetings[reservation.backend_meeting_id], forcibly=True)
        sim.take_notifications()  # no end callback: the polls must find it ended
        await eventually(
            lambda: not any(i.gateway.ledger.get(reservation.key) for i in three.instances)
        )
        released = [i.gateway.failover.get("released", 0) for i in three.instances]
        assert sorted(released) == [0, 0, 1], released  # by the backend's poller alone


async def test_without_redis_every_instance_polls_for_health_and_shares_again_after(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    async with open_three(nursery, tmp_path, redis_server, "own") as three:
        redis_server.kill()
        sent = [i.sent("bbb-2") for i in three.instances]
        three.sims[0].behaviour.mode = "http500"  # dies while nobody can share its health
        await eventually(
            lambda: all(i.gateway.health["bbb-1"].state is State.DOWN for i in three.instances)
        )
        assert all(i.sent("bbb-2") > n for i, n in zip(three.instances, sent, strict=True))
        assert all(i.gateway.failover == {} for i in three.instances)  # nothing reconciled
        three.sims[0].behaviour.mode = "ok"
        redis_server.start()
        await eventually(three.settled)
        await eventually(
            lambda: all(i.gateway.health["bbb-1"].state is State.UP for i in three.instances)
        )
        # One instance polls it again: a window of three polls made by one instance alone.
        # Not necessarily the first window: an instance whose Redis call fails or overruns
        # the store's bound (a loaded machine) polls for itself that turn, by design.
        windows: list[list[int]] = []
        for _ in range(5):
            windows.append(await _polls_in_three(three, "bbb-2"))
            if sorted(windows[-1])[:-1] == [0, 0]:
                break
        assert sorted(windows[-1])[:-1] == [0, 0], windows


async def _polls_in_three(three: Cluster, backend_id: str) -> list[int]:
    """The polls of ``backend_id`` each instance sent while its server answered three."""
    sent = [i.sent(backend_id) for i in three.instances]
    before = three.polled(backend_id)
    await eventually(lambda: three.polled(backend_id) >= before + 3)
    return [i.sent(backend_id) - n for i, n in zip(three.instances, sent, strict=True)]


async def test_a_lease_taken_by_another_stops_the_polls_here_and_is_logged_once(
    three: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "proxy.backends.monitor")
    (holder,) = three.holders("bbb-3")
    store, taken_for = holder.polls.store, 4 * INTERVAL
    key = store.key("poll", "bbb-3")
    await store.run(lambda: store.client.set(key, "intruder", px=int(taken_for * 1000)), "SET")
    taken = trio.current_time()
    await eventually(lambda: not holder.polls.holds("bbb-3"))  # its next turn saw it
    sent = [i.sent("bbb-3") for i in three.instances]
    await eventually(
        lambda: any(i.sent("bbb-3") > n for i, n in zip(three.instances, sent, strict=True))
    )
    assert trio.current_time() - taken >= taken_for - INTERVAL  # none polled it meanwhile
    lost = [r for r in caplog.records if "went to another instance" in r.getMessage()]
    assert len(lost) == 1, caplog.text
