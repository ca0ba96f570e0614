"""Stores shared by several gateway instances on one real redis-server (issue 13).

Each "instance" here is its own Redis connection (:func:`open_redis_store`), as another
process would open it, in one test process.  First the generic piece
(:class:`proxy.store.shared.Replica`): following, a compaction by another instance,
compare-and-compact, claims, members; then each store on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from proxy.config import StoreSettings
from proxy.store import Json, Record, shared
from proxy.store.redis import RedisStore, open_redis_store
from proxy.store.shared import Replica
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name below

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
