"""Stores shared by several gateway instances on one real redis-server (issue 13).

Each "instance" here is its own Redis connection (:func:`open_redis_store`), as another
process would open it, in one test process.  First the generic piece
(:class:`proxy.store.shared.Replica`): following, a compaction by another instance,
compare-and-compact, claims, members; then each store on it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson
import pytest
import trio
from lxml import etree

from proxy.backends.cluster import shared_polls
from proxy.bbb import recording_ready as ready_rules
from proxy.bbb.rewrite import backend_meeting_id
from proxy.calls import recording_ready as ready_calls
from proxy.config import Config, StoreSettings
from proxy.errors import StorageUnavailable, ValidationError
from proxy.gateway import Gateway
from proxy.ledger.service import Ledger
from proxy.portal.service import PortalService, Refusal
from proxy.portal.sessions import opened, sealed
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from proxy.store import Json, Record, shared
from proxy.store.redis import RedisStore, open_redis_store
from proxy.store.shared import Replica
from proxy.webhooks import delivery
from proxy.webhooks.intake import Intake
from proxy.webhooks.queue import QueueState
from tests.harness import (
    BACKEND_SECRET,
    SECRETS,
    Stack,
    config_for,
    free_port,
    serve_endpoint,
    text,
)
from tests.redis_server import RedisServer, redis_server
from tests.test_admin_api import NEW_CUSTOMER, TOKEN, Admin, created
from tests.test_analytics import start_receiver as start_analytics_receiver
from tests.test_hooks_api import create_hook, hooks_call
from tests.test_recordings_ready import claims

__all__ = ["redis_server"]  # the fixture, used by name below

FORM = "application/x-www-form-urlencoded"

type Opener = Callable[..., AbstractAsyncContextManager[RedisStore]]


@pytest.fixture
def store_at(redis_server: RedisServer) -> Opener:
    """``store_at()``: a new connection, as another gateway instance would open it."""

    def opener(timeout: float = 2.0) -> AbstractAsyncContextManager[RedisStore]:
        config = StoreSettings(kind="redis", url=redis_server.url)
        return open_redis_store(config, timeout=timeout)

    return opener


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - another instance changes it
            await trio.sleep(0.01)


class Keys:
    """A toy state: a set of keys, records ``{"add": k}`` / ``{"drop": k}``."""

    def __init__(self) -> None:
        self.keys: dict[str, None] = {}
        self.changes = 0

    def apply(self, record: Mapping[str, Json]) -> None:
        if "add" in record:
            self.keys[str(record["add"])] = None
        elif "drop" in record:
            self.keys.pop(str(record["drop"]), None)
        else:
            raise ValueError(f"not a Keys record: {record}")

    def clear(self) -> None:
        self.keys = {}

    def records(self) -> Iterator[Record]:
        return ({"add": k} for k in list(self.keys))

    def changed(self) -> None:
        self.changes += 1

    def change(self, replica: Replica, record: Record) -> None:
        self.apply(record)
        replica.append(record)


def replica_of(store: RedisStore, name: str = "keys", **options: object) -> tuple[Replica, Keys]:
    log, replayed = store.open(name)
    state = Keys()
    for record in replayed:
        state.apply(record)
    replica = Replica(
        log,
        name,
        apply=state.apply,
        clear=state.clear,
        records=state.records,
        changed=state.changed,
        **options,  # type: ignore[arg-type]
    )
    return replica, state


# -- the generic piece ---------------------------------------------------------------------------


async def test_a_replica_follows_what_another_instance_appends(store_at: Opener) -> None:
    async with store_at() as a_store, store_at() as b_store:
        a, a_keys = replica_of(a_store)
        b, b_keys = replica_of(b_store, every=0.01)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.maintain)
            a_keys.change(a, {"add": "x"})
            a_keys.change(a, {"add": "y"})
            await a.flush()
            await until(lambda: list(b_keys.keys) == ["x", "y"])
            assert b_keys.changes >= 1
            a_keys.change(a, {"drop": "x"})
            await a.flush()
            await until(lambda: list(b_keys.keys) == ["y"])
            nursery.cancel_scope.cancel()
        await a.refresh()
        assert list(a_keys.keys) == ["y"]  # its own records are not applied twice


async def test_refresh_is_read_your_writes(store_at: Opener) -> None:
    async with store_at() as a_store, store_at() as b_store:
        a, a_keys = replica_of(a_store)
        b, b_keys = replica_of(b_store)
        a_keys.change(a, {"add": "x"})
        await a.flush()
        assert "x" not in b_keys.keys  # nothing follows here
        await b.refresh()
        assert "x" in b_keys.keys


async def test_a_record_another_instance_wrote_that_apply_refuses_is_skipped(
    store_at: Opener,
) -> None:
    async with store_at() as a_store, store_at() as b_store:
        a, _ = replica_of(a_store)
        b, b_keys = replica_of(b_store)
        a.append({"unknown": 1})
        a.append({"add": "z"})
        await a.flush()
        await b.refresh()
        assert list(b_keys.keys) == ["z"] and b.skipped == 1


async def test_after_another_instances_compaction_the_state_is_rebuilt_with_own_unflushed(
    store_at: Opener,
) -> None:
    async with store_at() as a_store, store_at() as b_store:
        a, a_keys = replica_of(a_store)
        b, b_keys = replica_of(b_store)
        for key in ("1", "2", "3"):
            a_keys.change(a, {"add": key})
        await a.flush()
        await b.refresh()
        a_keys.change(a, {"drop": "1"})
        await a.flush()
        b_keys.change(b, {"add": "b-own"})  # appended, not flushed
        await a.compact()
        raw = await b_store.read("keys")
        assert [r for _, r in raw.entries] == [{"add": "2"}, {"add": "3"}]
        b_keys.keys["stale"] = None  # anything the replica had is forgotten on a reset
        await b.refresh()
        assert set(b_keys.keys) == {"2", "3", "b-own"}
        await b.flush()
        await a.refresh()
        assert set(a_keys.keys) == {"2", "3", "b-own"}


async def test_compare_and_compact_keeps_every_writers_count(store_at: Opener) -> None:
    """A flush sent again after another instance's compaction adds nothing twice."""
    async with store_at() as a_store, store_at() as b_store:
        a, _ = replica_of(a_store)
        b, b_keys = replica_of(b_store)
        b_keys.change(b, {"add": "b1"})
        await b.flush()
        await a.compact()  # catches up on b1 first
        log: Any = b.log
        log._durable -= 1  # as if b1's answer had been lost: b sends it again
        log._pending.insert(0, b'{"add":"b1"}')
        await b.flush()
        raw = await a_store.read("keys")
        assert [r for _, r in raw.entries] == [{"add": "b1"}]


async def test_a_compaction_waits_for_an_append_that_came_in_between(store_at: Opener) -> None:
    async with store_at() as a_store, store_at() as b_store:
        a, a_keys = replica_of(a_store)
        b, b_keys = replica_of(b_store)
        a_keys.change(a, {"add": "a1"})
        await a.flush()
        original = a.log.try_compact  # type: ignore[attr-defined]
        raced = 0

        async def racing(records: object) -> bool:
            nonlocal raced
            if raced < 2:  # b appends between a's catch-up and its compaction, twice
                raced += 1
                b_keys.change(b, {"add": f"b{raced}"})
                await b.flush()
            return bool(await original(records))

        a.log.try_compact = racing  # type: ignore[attr-defined]
        await a.compact()
        assert raced == 2
        raw = await b_store.read("keys")
        assert sorted(str(r["add"]) for _, r in raw.entries) == ["a1", "b1", "b2"]
        await b.refresh()
        assert set(b_keys.keys) == {"a1", "b1", "b2"}


async def test_compaction_when_due_from_maintain_on_every_instance(
    store_at: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.store import redis as redis_store

    monkeypatch.setattr(redis_store, "COMPACT_MIN_BYTES", 200)
    async with store_at() as a_store, store_at() as b_store:
        a, a_keys = replica_of(a_store, every=0.01)
        b, b_keys = replica_of(b_store, every=0.01)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.maintain)
            nursery.start_soon(b.maintain)
            for n in range(60):
                replica, keys = (a, a_keys) if n % 2 else (b, b_keys)
                keys.change(replica, {"add": f"k{n % 5}"})
                await replica.flush()
            await until(lambda: a.log._gen != "0")  # type: ignore[attr-defined]
            want = {f"k{n}" for n in range(5)}
            await until(lambda: set(a_keys.keys) == want == set(b_keys.keys))
            nursery.cancel_scope.cancel()
        raw = await a_store.read("keys")
        assert len(raw.entries) < 60


async def test_of_two_racing_claims_one_wins(store_at: Opener) -> None:
    async with store_at() as a_store, store_at() as b_store:
        a, a_keys = replica_of(a_store)
        b, b_keys = replica_of(b_store)
        results = {}

        async def claim(name: str, replica: Replica, keys: Keys) -> None:
            results[name] = await replica.claim({"add": "job"}, lambda: "job" not in keys.keys)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, "a", a, a_keys)
            nursery.start_soon(claim, "b", b, b_keys)
        assert sorted(results.values()) == [False, True]
        assert "job" in a_keys.keys and "job" in b_keys.keys
        raw = await a_store.read("keys")
        assert [r for _, r in raw.entries] == [{"add": "job"}]


async def test_a_commit_whose_answer_was_lost_is_applied_once_after_reading_all_again(
    store_at: Opener,
) -> None:
    async with store_at() as a_store, store_at() as b_store:
        log, _ = a_store.open("keys")
        applied: list[Record] = []
        a = Replica(
            log,
            "keys",
            apply=lambda r: applied.append(dict(r)),
            clear=applied.clear,
            records=lambda: list(applied),
        )
        b, b_keys = replica_of(b_store)
        original = log.try_append

        async def landed_unanswered(records: Any) -> bool:
            await original(records)
            raise StorageUnavailable()

        log.try_append = landed_unanswered  # type: ignore[method-assign]
        with pytest.raises(StorageUnavailable):
            await a.commit({"add": "x"}, lambda: None)
        assert applied == []  # not known to be in
        log.try_append = original  # type: ignore[method-assign]
        b_keys.change(b, {"add": "y"})
        await b.flush()
        await a.refresh()
        assert applied == [{"add": "x"}, {"add": "y"}]  # x once, from the log
        await a.commit({"add": "z"}, lambda: None)
        await a.refresh()
        assert applied == [{"add": "x"}, {"add": "y"}, {"add": "z"}]


async def test_concurrent_refreshes_share_a_catch_up(store_at: Opener) -> None:
    async with store_at() as a_store, store_at() as b_store:
        a, a_keys = replica_of(a_store)
        b, b_keys = replica_of(b_store)
        a_keys.change(a, {"add": "x"})
        await a.flush()
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(b.refresh)
        assert "x" in b_keys.keys
        assert b._started <= 2  # the first, and one for all that waited on it


async def test_a_member_is_alive_while_it_runs_and_not_once_stopped(
    store_at: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "HEARTBEAT_EVERY", 0.05)
    monkeypatch.setattr(shared, "HEARTBEAT_TTL", 0.5)
    async with store_at() as a_store, store_at() as b_store:
        a, _ = replica_of(a_store, members=True)
        b, _ = replica_of(b_store)
        assert not await b.alive(a.node)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.maintain)
            with trio.fail_after(5):
                while not await b.alive(a.node):  # noqa: ASYNC110 - asks Redis
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert not await b.alive(a.node)  # a stopped: it said so


async def test_on_the_local_store_a_replica_is_the_log() -> None:
    from proxy.store import MemoryLog

    log = MemoryLog()
    keys = Keys()
    replica = Replica(log, "keys", apply=keys.apply, clear=keys.clear, records=keys.records)
    assert not replica.shared and replica.node == ""
    keys.change(replica, {"add": "x"})
    await replica.flush()
    await replica.refresh()
    assert await replica.alive("anyone")
    assert await replica.claim({"add": "y"}, lambda: True)
    await replica.compact()
    assert log.durable == [{"add": "x"}, {"add": "y"}] and log.compactions == 1


# -- gateways: each with its own in-memory ledger, every other store on one Redis ------------------


def cluster_config(
    sim_urls: list[str], state_dir: Path, redis: RedisServer, **sections: Any
) -> Config:
    port = free_port()
    own = {
        "state_dir": str(state_dir),
        "bind": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "allow_private_callbacks": True,
    }
    proxy = own | sections.pop("proxy", {})
    config = config_for(sim_urls, proxy=proxy, **sections)
    return dataclasses.replace(config, store=StoreSettings(kind="redis", url=redis.url))


@dataclass
class Instance(Stack):
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def cancel(self) -> None:
        """Stop this instance (cancelled: no clean shutdown of what is in flight)."""
        self.scope.cancel()


async def _serve_one(
    config: Config,
    monitor: bool,
    *,
    task_status: trio.TaskStatus[tuple[Gateway, list[str], trio.CancelScope]],
) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            start = functools.partial(serve_gateway, config, ledger=Ledger(), monitor=monitor)
            gateway, binds = await inner.start(start)
            task_status.started((gateway, binds, scope))


async def gateways(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis: RedisServer,
    count: int = 2,
    *,
    backends: int = 2,
    monitor: bool = False,
    **sections: Any,
) -> list[Instance]:
    """``count`` gateways on ``redis`` (each its own state_dir and in-memory ledger: the
    ledger is not what these tests are about), over the same two simulated backends."""
    sims = [
        Simulator(BACKEND_SECRET, server_name=f"bbb-{i + 1}.test", expire_unjoined_minutes=None)
        for i in range(backends)
    ]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    stacks = []
    for n in range(count):
        config = cluster_config(sim_urls, tmp_path / f"gw-{n}", redis, **sections)
        gateway, binds, scope = await nursery.start(_serve_one, config, monitor)
        http = httpx.AsyncClient(timeout=10)
        await nursery.start(_closed_at_end, http)
        stacks.append(Instance(gateway, binds[0], sims, sim_urls, http, config, scope=scope))
    return stacks


async def _closed_at_end(
    http: httpx.AsyncClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await http.aclose()


@pytest.fixture(autouse=True)
def quick_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas follow every 50 ms, members beat every 50 ms and are gone after 0.5 s."""
    monkeypatch.setattr(shared, "FOLLOW_EVERY", 0.05)
    monkeypatch.setattr(shared, "HEARTBEAT_EVERY", 0.05)
    monkeypatch.setattr(shared, "HEARTBEAT_TTL", 0.5)


def hook_ids(root: etree._Element) -> list[str]:
    return [str(h.findtext("hookID")) for h in root.iter("hook")]


async def test_a_hook_created_on_one_instance_is_listed_and_destroyed_on_another(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = await gateways(nursery, tmp_path, redis_server)
    created = await create_hook(a, "room-1")
    assert text(created, "returncode") == "SUCCESS", etree.tostring(created)
    hook_id = text(created, "hookID")
    # read-your-writes: at once, not after the follow interval
    assert hook_ids(await hooks_call(b, "list", [])) == [hook_id]
    again = await create_hook(b, "room-1")  # the same URL and meeting: bbb-webhooks' duplicate
    assert text(again, "hookID") == hook_id
    destroyed = await hooks_call(b, "destroy", [("hookID", hook_id)])
    assert text(destroyed, "returncode") == "SUCCESS", etree.tostring(destroyed)
    assert hook_ids(await hooks_call(a, "list", [])) == []
    assert a.gateway.hooks.get(hook_id) is None


async def test_creates_at_once_on_several_instances_keep_one_hook_per_url_and_the_limit(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    stacks = await gateways(
        nursery, tmp_path, redis_server, count=3, webhooks={"max_hooks_per_customer": 3}
    )
    same: list[tuple[str, bool]] = []
    outcomes: list[str] = []

    async def create(stack: Stack, url: str, into: list[Any]) -> None:
        try:
            hook, duplicated = await stack.gateway.hooks.create("acme", "room-1", url, None, "sha1")
        except ValidationError as e:
            into.append(e.message_key)
        else:
            into.append((hook.id, duplicated) if into is same else "created")

    async with trio.open_nursery() as racing:
        for stack in stacks:
            racing.start_soon(create, stack, "http://127.0.0.1:9/same", same)
    assert len({hook_id for hook_id, _ in same}) == 1, same  # one hook, the same id for all three
    assert sorted(duplicated for _, duplicated in same) == [False, True, True]
    async with trio.open_nursery() as racing:
        for n in range(6):
            racing.start_soon(create, stacks[n % 3], f"http://127.0.0.1:9/other-{n}", outcomes)
    assert sorted(outcomes) == ["createHookError"] * 4 + ["created"] * 2  # 3 in all, with "same"
    await stacks[0].gateway.hooks.refresh()
    assert len(stacks[0].gateway.hooks.listed("acme")) == 3


async def test_a_hook_made_on_one_instance_reaches_the_others_within_the_follow_interval(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, c = await gateways(nursery, tmp_path, redis_server, count=3)
    hook_id = text(await create_hook(a, "room-2"), "hookID")
    await until(lambda: b.gateway.hooks.get(hook_id) is not None)
    await until(lambda: c.gateway.hooks.get(hook_id) is not None)
    assert [h.id for h in c.gateway.hooks.matching("acme", "room-2", "meeting-ended")] == [hook_id]
    await c.gateway.hooks.meeting_ended("acme", "room-2", at=1.0)  # long ago: expired
    await until(lambda: a.gateway.hooks.get(hook_id) is None)


# -- webhook delivery: each event once, across instances -----------------------------------------


@dataclass
class CountingReceiver:
    """Answers 503 while ``down``, else 200; counts the events it took (by their ``n``)."""

    down: bool = False
    took: list[int] = field(default_factory=list)
    refused: int = 0

    async def respond(self, scope: dict[str, Any], body: bytes) -> int:
        if self.down:
            self.refused += 1
            return 503
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        for event in orjson.loads(form["event"]):
            self.took.append(int(event["data"]["attributes"]["n"]))
        return 200


def events(numbers: range, meeting_id: str = "room-1") -> list[dict[str, Json]]:
    meeting = {"internal-meeting-id": "abc-1", "external-meeting-id": meeting_id}
    return [
        {
            "data": {
                "type": "event",
                "id": "poll-started",
                "attributes": {"meeting": meeting, "n": n},
            }
        }
        for n in numbers
    ]


def queued(stack: Stack) -> int:
    return stack.gateway.webhooks.queues.statistics().events


def delivered(stack: Stack) -> int:
    return stack.gateway.tallies.get(("webhook_events", "delivered"), 0)


async def hook_on_all(stacks: list[Stack], url: str) -> str:
    hook_id = text(await create_hook(stacks[0], "room-1", url), "hookID")
    for stack in stacks:
        assert await stack.gateway.hooks.lookup(hook_id) is not None
    return hook_id


@pytest.fixture(autouse=True)
def quick_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "CLAIM_EVERY", 0.05)


async def test_events_accepted_by_two_instances_are_each_delivered_once(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = await gateways(nursery, tmp_path, redis_server)
    receiver = CountingReceiver()
    url = await serve_endpoint(nursery, receiver.respond)
    hook_id = await hook_on_all([a, b], f"{url}/hook")

    async def post(stack: Stack, numbers: range) -> None:
        for n in numbers:  # one event a call, as a backend's webhooks would post them
            await stack.gateway.webhooks.accept("acme", "room-1", events(range(n, n + 1)))

    async with trio.open_nursery() as posting:
        posting.start_soon(post, a, range(0, 30))
        posting.start_soon(post, b, range(100, 130))
    await until(lambda: len(receiver.took) >= 60 and queued(a) == queued(b) == 0)
    assert sorted(receiver.took) == [*range(0, 30), *range(100, 130)]  # each once
    assert delivered(a) + delivered(b) == 60
    owners = {a.gateway.webhooks.queues.owners.get(hook_id)}
    assert owners == {b.gateway.webhooks.queues.owners.get(hook_id)}  # one owner, agreed
    [owner] = [s for s in (a, b) if s.gateway.webhooks.owns(hook_id)]
    assert delivered(owner) == 60  # ... and only it POSTed


async def test_an_event_for_a_hook_just_made_on_another_instance_is_queued(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shared, "FOLLOW_EVERY", 3600.0)  # nothing is followed by itself here
    a, b = await gateways(nursery, tmp_path, redis_server)
    receiver = CountingReceiver()
    url = await serve_endpoint(nursery, receiver.respond)
    text(await create_hook(a, "room-1", f"{url}/hook"), "hookID")
    await b.gateway.webhooks.accept("acme", "room-1", events(range(7, 8)))  # at once, on b
    await until(lambda: receiver.took == [7])


@pytest.mark.parametrize("clean", [True, False], ids=["stopped", "killed"])
async def test_events_queued_on_an_instance_that_stops_are_delivered_once_by_another(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    clean: bool,
) -> None:
    if not clean:  # as a kill -9: the heartbeat is not removed, it runs out (0.5 s here)

        async def stays(self: RedisStore, member: str) -> None:
            return None

        monkeypatch.setattr(RedisStore, "leave", stays)
    a, b, c = await gateways(nursery, tmp_path, redis_server, count=3)
    receiver = CountingReceiver(down=True)
    url = await serve_endpoint(nursery, receiver.respond)
    hook_id = await hook_on_all([a, b, c], f"{url}/hook")
    monkeypatch.setattr(delivery, "retry_delay", lambda failures: 3600.0)  # a tries once
    await a.gateway.webhooks.accept("acme", "room-1", events(range(0, 10)))
    retried = ("webhook_events", "retried")
    await until(lambda: a.gateway.webhooks.owns(hook_id) and retried in a.gateway.tallies)
    await b.gateway.webhooks.accept("acme", "room-1", events(range(10, 20)))
    await until(lambda: a.gateway.webhooks.queues.depth(hook_id) == 20)
    a.cancel()  # a stops with 20 events queued for the hook it delivers, none in flight
    receiver.down = False
    await until(lambda: len(receiver.took) >= 20 and queued(b) == queued(c) == 0)
    assert sorted(receiver.took) == list(range(20))  # each once, in spite of two candidates
    assert delivered(b) + delivered(c) == 20
    assert b.gateway.webhooks.queues.owners[hook_id] == c.gateway.webhooks.queues.owners[hook_id]


def test_the_queue_knows_events_by_instance_and_number_and_keeps_owners_in_compaction() -> None:
    queues = QueueState()
    a = queues.event_record("h", {"n": 1}, 5, "node-a")
    b = {**a, "event": {"n": 2}, "node": "node-b"}  # the same seq from another instance
    for record in (queues.owner_record("h", "node-a"), a, b, a):  # a read twice: queued once
        queues.apply(record)
    assert [p.event for p in queues.queues["h"]] == [{"n": 1}, {"n": 2}]
    queues.apply({"type": "done", "hook": "h", "seq": a["seq"], "node": "node-b"})
    assert [p.event for p in queues.queues["h"]] == [{"n": 1}]
    again = QueueState()
    for record in queues.records():
        again.apply(record)
    assert again.owners == {"h": "node-a"} and again.head("h") == queues.head("h")
    again.apply({"type": "dropped", "hook": "h"})
    assert again.owners == {} and again.hooks() == []
    assert "node" not in QueueState().event_record("h", {}, 1)  # the local store's records


# -- runtime customers and backends --------------------------------------------------------------


async def test_a_customer_added_on_one_instance_is_served_by_the_others(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, c = await gateways(nursery, tmp_path, redis_server, count=3, proxy={"admin_token": TOKEN})
    customer = {**NEW_CUSTOMER, "secret": "initech-secret-1"}
    answer = await Admin(a)("POST", "customers", customer, expect=201)
    assert answer["secret"] == "initech-secret-1"
    for stack in (a, b, c):
        stack.secrets["initech"] = "initech-secret-1"
    await until(lambda: b.gateway.customer("initech") is not None)
    await until(lambda: c.gateway.customer("initech") is not None)
    assert await created(b, "room-1", "initech") == "SUCCESS"
    # one order everywhere: two changes of one field at once on two instances end the same
    async with trio.open_nursery() as changing:
        for stack, n in ((b, 3), (c, 4)):
            change = {"max_connections": n}
            changing.start_soon(
                functools.partial(Admin(stack), "PATCH", "customers/initech", change)
            )

    def limits() -> set[object]:
        return {s.gateway.customer("initech").max_connections for s in (a, b, c)}  # type: ignore[union-attr]

    await until(lambda: len(limits()) == 1)
    assert limits() <= {3, 4}
    assert await Admin(c)("DELETE", "customers/initech")  # deleted on c: gone on a
    await until(lambda: a.gateway.customer("initech") is None)


async def test_a_customer_added_on_one_instance_is_served_by_another_at_once(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read-your-writes for runtime customers: b, not following (its interval an hour),
    catches up when a call names a customer it does not know."""
    monkeypatch.setattr(shared, "FOLLOW_EVERY", 3600.0)
    a, b = await gateways(nursery, tmp_path, redis_server, proxy={"admin_token": TOKEN})
    await Admin(a)("POST", "customers", {**NEW_CUSTOMER, "secret": "initech-secret-1"}, expect=201)
    b.secrets["initech"] = "initech-secret-1"
    assert b.gateway.customer("initech") is None  # not followed yet
    assert await created(b, "room-1", "initech") == "SUCCESS"
    assert b.gateway.customer("initech") is not None


# -- recording-ready callbacks: each once, across instances --------------------------------------


@dataclass
class ReadyReceiver:
    """A customer's recording-ready URL: 503 while ``down``, else 200; the recordIDs taken."""

    down: bool = False
    took: list[str] = field(default_factory=list)
    refused: int = 0

    async def respond(self, scope: dict[str, Any], body: bytes) -> int:
        if self.down:
            self.refused += 1
            return 503
        form = dict(parse_qsl(body.decode()))
        self.took.append(str(claims(form["signed_parameters"], SECRETS["acme"])["record_id"]))
        return 200


async def notice(stack: Stack, url: str, record_id: str, meeting_id: str = "room-1") -> int:
    """What a backend's post_publish script POSTs for ``record_id``; the HTTP status."""
    backend = stack.gateway.backends()[0]
    own = ready_rules.signed_url(
        stack.config.proxy.public_url,
        ready_rules.PATH,
        backend,
        ("acme", meeting_id, url),
        b"recording-ready",
    )
    payload = {"meeting_id": backend_meeting_id("acme", meeting_id), "record_id": record_id}
    token = ready_rules.signed_jwt(payload, backend.secret)
    response = await stack.http.post(
        own, content=urlencode({"signed_parameters": token}), headers={"Content-Type": FORM}
    )
    return response.status_code


def ready_tally(stacks: list[Instance], how: str = "done") -> int:
    return sum(s.gateway.tallies.get(("recording_ready_deliveries", how), 0) for s in stacks)


@pytest.fixture
def quick_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ready_rules, "backoff", lambda attempt: 0.05)
    monkeypatch.setattr(ready_calls, "CLAIM_EVERY", 0.05)


@pytest.mark.usefixtures("quick_ready")
async def test_recording_ready_notices_received_by_two_instances_are_each_delivered_once(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = await gateways(nursery, tmp_path, redis_server)
    receiver = ReadyReceiver()
    url = await serve_endpoint(nursery, receiver.respond)
    for n in range(10):
        assert await notice((a, b)[n % 2], f"{url}/ready", f"rec-{n}") == 200
    await until(lambda: ready_tally([a, b]) == 10)
    assert sorted(receiver.took) == sorted(f"rec-{n}" for n in range(10))


@pytest.mark.usefixtures("quick_ready")
async def test_recording_ready_deliveries_of_a_stopped_instance_are_made_once_by_another(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, c = await gateways(nursery, tmp_path, redis_server, count=3)
    receiver = ReadyReceiver(down=True)
    url = await serve_endpoint(nursery, receiver.respond)
    monkeypatch.setattr(ready_rules, "backoff", lambda attempt: 3600.0)  # a tries once each
    for n in range(6):
        assert await notice(a, f"{url}/ready", f"rec-{n}") == 200
    await until(lambda: receiver.refused >= 6 and ready_tally([a], "retry") >= 6)
    a.cancel()  # with nothing in flight (an in-process cancel mid-POST leaves httpx unclosed)
    receiver.down = False
    await until(lambda: ready_tally([b, c]) == 6)
    assert sorted(receiver.took) == [f"rec-{n}" for n in range(6)]  # once each


# -- the portal ------------------------------------------------------------------------------------


def portal_of(stack: Stack) -> PortalService:
    portal = stack.gateway.portal
    assert portal is not None
    return portal


async def test_portal_administrators_and_sessions_are_the_same_on_every_instance(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b, c = await gateways(nursery, tmp_path, redis_server, count=3)
    portals = [portal_of(s) for s in (a, b, c)]
    await until(lambda: len({p.key for p in portals}) == 1)  # one cookie key, from the log
    invited = await portals[0].invite("acme", "admin@acme.example")
    password = "a long enough password"
    await portals[1].accept(invited.token, password, password)  # at once on another instance
    with pytest.raises(Refusal):  # used up, everywhere
        await portals[2].accept(invited.token, password, password)
    session = await portals[2].login("admin@acme.example", password, "127.0.0.9")
    cookie = sealed(portals[2].key, session)
    for portal in portals:
        assert portal.current(opened(portal.key, cookie, portal.clock())) == session
    await portals[0].logout(session)
    await until(lambda: all(p.current(session) is None for p in portals))


async def test_failed_logins_are_counted_for_every_instance(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Behind a load balancer a guesser gets ``max_login_failures`` tries in all, not per
    instance; a success on one instance clears the count on all; Redis keeps no e-mail
    or address, only their digests."""
    a, b, c = await gateways(nursery, tmp_path, redis_server, count=3)
    portals = [portal_of(s) for s in (a, b, c)]
    email, password = "admin@acme.example", "a long enough password"
    invited = await portals[0].invite("acme", email)
    await portals[0].accept(invited.token, password, password)
    limit = portals[0].settings.max_login_failures

    async def refused(portal: PortalService, secret: str, address: str) -> str:
        with pytest.raises(Refusal) as refusal:
            await portal.login(email, secret, address)
        return refusal.value.key

    for n in range(limit - 1):  # spread over the instances and addresses
        assert await refused(portals[n % 3], "wrong", f"10.0.0.{n}") == "login"
    await portals[1].login(email, password, "10.0.1.1")  # clears the account's count, for all
    for n in range(limit):
        assert await refused(portals[n % 3], "wrong", f"10.0.2.{n}") == "login"
    for portal in portals:  # locked everywhere, even for the right password
        assert await refused(portal, password, "10.0.3.1") == "throttled"
    for n in range(limit):  # one address guessing many accounts, over the instances
        with pytest.raises(Refusal):
            await portals[n % 3].login(f"guess-{n}@acme.example", "wrong", "10.0.4.4")
    assert await refused(portals[2], password, "10.0.4.4") == "throttled"
    shared = portals[0].shared_failures
    assert shared is not None
    stored = " ".join(str(k) for k in await shared.store.client.keys("*"))
    assert "login-failures" in stored
    assert "acme.example" not in stored and "10.0." not in stored


async def test_without_redis_failed_logins_are_counted_on_the_instance(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis gone: the instance's own count still locks (a login is never let through for
    want of Redis), said once in the log; counted for all again once Redis answers."""
    (a,) = await gateways(nursery, tmp_path, redis_server, count=1)
    portal = portal_of(a)
    email, password = "admin@acme.example", "a long enough password"
    invited = await portal.invite("acme", email)
    await portal.accept(invited.token, password, password)
    redis_server.kill()
    caplog.set_level(logging.WARNING, "proxy.portal.failures")
    for _ in range(portal.settings.max_login_failures):
        with pytest.raises(Refusal) as refusal:
            await portal.login(email, "wrong", "10.0.0.1")
        assert refusal.value.key == "login"
    with pytest.raises(Refusal) as refusal:
        await portal.login(email, password, "10.0.0.1")
    assert refusal.value.key == "throttled"
    said = [r.getMessage() for r in caplog.records if r.name == "proxy.portal.failures"]
    assert len(said) == 1 and "counted on this instance alone" in said[0], said
    redis_server.start()
    shared = portal.shared_failures
    assert shared is not None
    for _ in range(100):  # the store's client reconnects by itself
        await shared.failed("other@acme.example", "10.0.9.9")
        if any("answers again" in r.getMessage() for r in caplog.records):
            break
        await trio.sleep(0.1)
    said = [r.getMessage() for r in caplog.records if r.name == "proxy.portal.failures"]
    assert len(said) == 2 and "counted for all" in said[1], said


async def test_analytics_callbacks_of_meetings_on_two_instances_are_each_delivered_once(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = await gateways(nursery, tmp_path, redis_server)
    receiver = await start_analytics_receiver(nursery)
    for n, stack in enumerate((a, b, a, b)):
        created = await stack.create(f"lesson-{n}", **{"meta_analytics-callback-url": receiver.url})
        assert created.findtext("returncode") == "SUCCESS", etree.tostring(created)
    for n, stack in enumerate((a, b, a, b)):
        await stack.call("end", [("meetingID", f"lesson-{n}")])

    def done() -> int:
        return sum(s.gateway.tallies.get(("analytics_deliveries", "done"), 0) for s in (a, b))

    await until(lambda: done() == 4)
    meetings = sorted(orjson.loads(body)["meeting_id"] for _, body in receiver.posts)
    assert meetings == [f"lesson-{n}" for n in range(4)]  # each once


async def test_the_gateways_hook_on_a_backend_is_checked_by_its_poller_only(
    nursery: trio.Nursery,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checks: list[tuple[int, bool]] = []  # (instance, held the backend's poll lease)
    ensure = Intake.ensure

    async def recorded(intake: Intake, backend_id: str) -> bool:
        polls = shared_polls(intake.gw)
        assert polls is not None
        checks.append((id(intake.gw), polls.holds(backend_id)))
        return await ensure(intake, backend_id)

    monkeypatch.setattr(Intake, "ensure", recorded)
    await gateways(
        nursery,
        tmp_path,
        redis_server,
        count=3,
        backends=1,
        monitor=True,
        webhooks={"backend_hook_check": 0.05},
    )

    def periodic() -> list[tuple[int, bool]]:
        first: set[int] = set()  # each instance's first look: at start-up, lease or not
        later = []
        for check in checks:
            if check[0] in first:
                later.append(check)
            first.add(check[0])
        return later

    await until(lambda: len(periodic()) >= 10)
    assert all(held for _, held in periodic()), checks
    assert len({instance for instance, _ in checks}) == 3
