"""The Redis log (proxy.store.redis) against a real, private redis-server.

The behaviours of ``tests/test_store.py`` that apply (replay in order, compaction,
bounds, a storage that fails and comes back), plus what Redis adds: nothing
acknowledged lost when redis-server is killed with SIGKILL (AOF, ``appendfsync
always``), a lost answer sent again without duplicates, compare-and-append races
between two clients, and one client following another's appends.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.lowlevel
from lxml import etree

from proxy.config import Config, StoreSettings, from_mapping
from proxy.errors import ConfigError, StateError, StorageUnavailable
from proxy.ledger import redis_journal
from proxy.ledger.shared import SharedLedger
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from proxy.store import Log, Record
from proxy.store.redis import RedisLog, RedisStore, open_redis_store
from tests.harness import BACKEND_SECRET, Stack, config_for, text
from tests.redis_server import RedisServer, free_port, redis_server
from tests.test_hooks_api import URL, hooks_call
from tests.test_storage_faults import until

__all__ = ["redis_server"]  # the fixture, used by name below

RECORDS: list[Record] = [
    {"op": "create", "id": "h1", "events": ["user-joined", "meeting-ended"], "n": 3},
    {"op": "create", "id": "h2", "url": "https://lms.example/hook?ä=ß", "at": 17.25},
    {"op": "destroy", "id": "h1", "nested": {"a": [1, {"b": None}], "t": True}},
]


type Opener = Callable[..., AbstractAsyncContextManager[RedisStore]]


@pytest.fixture
def store_at(redis_server: RedisServer) -> Opener:
    """``store_at(timeout=...)``: a new connection, as another process would open it."""

    def opener(timeout: float = 2.0, **settings: Any) -> AbstractAsyncContextManager[RedisStore]:
        config = StoreSettings(kind="redis", url=redis_server.url, **settings)
        return open_redis_store(config, timeout=timeout)

    return opener


async def replayed(store_at: Opener, name: str = "hooks") -> list[Record]:
    async with store_at() as store:
        return store.open(name)[1]


async def written(store: RedisStore, records: list[Record], name: str = "hooks") -> RedisLog:
    log, _ = store.open(name)
    for record in records:
        log.append(record)
    await log.flush()
    return log


async def recovered(log: RedisLog, seconds: float = 5) -> None:
    """Retry the log (as ``maintain`` does every second) until it writes again."""
    with trio.fail_after(seconds):
        while not await log.recover():  # noqa: ASYNC110 - each try talks to Redis
            await trio.sleep(0.05)


# -- replay --------------------------------------------------------------------------------------


async def test_flushed_records_are_replayed_after_a_restart_in_order(store_at: Opener) -> None:
    async with store_at() as store:
        await written(store, RECORDS[:2])
    assert await replayed(store_at) == RECORDS[:2]
    async with store_at() as store:
        log, records = store.open("hooks")
        assert records == RECORDS[:2]
        log.append(RECORDS[2])
        await log.flush()
    assert await replayed(store_at) == RECORDS
    assert await replayed(store_at, "other") == []  # logs are separate


async def test_records_appended_but_never_flushed_are_not_in_redis(store_at: Opener) -> None:
    async with store_at() as store:
        log = await written(store, RECORDS[:1])
        log.append(RECORDS[1])
    assert await replayed(store_at) == RECORDS[:1]


async def test_concurrent_flushes_write_each_record_once(store_at: Opener) -> None:
    async with store_at() as store:
        log, _ = store.open("hooks")
        async with trio.open_nursery() as nursery:
            for n in range(20):
                log.append({"n": n})
                nursery.start_soon(log.flush)
    assert await replayed(store_at) == [{"n": n} for n in range(20)]


async def test_the_key_prefix_separates_gateways(store_at: Opener) -> None:
    async with store_at(key_prefix="a:") as store:
        await written(store, RECORDS[:1])
    async with store_at(key_prefix="b:") as store:
        assert store.open("hooks")[1] == []
    async with store_at(key_prefix="a:") as store:
        assert store.open("hooks")[1] == RECORDS[:1]


async def test_an_entry_that_is_not_a_record_stops_start_up_naming_it(store_at: Opener) -> None:
    async with store_at() as store:
        await written(store, RECORDS[:1])
        await store.client.xadd("bbb-proxy:log:hooks", {"r": b"[1, 2]", "w": b"x"})
    with pytest.raises(StateError, match=r"bbb-proxy:log:hooks: entry \d+-\d+ is not a JSON"):
        await replayed(store_at)


async def test_a_log_over_the_replay_bound_is_refused(store_at: Opener) -> None:
    async with store_at() as store:
        await written(store, [{"pad": "x" * 100} for _ in range(5)])
    async with store_at() as store:  # a generous bound reads it
        assert len(store.open("hooks")[1]) == 5
        with pytest.raises(StateError, match="over 300 bytes"):
            await store.load(max_bytes=300)


async def test_redis_unreachable_at_start_up_is_a_state_error_without_the_password() -> None:
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(StateError) as raised:
        async with open_redis_store(StoreSettings(kind="redis", url=url), timeout=1):
            pass
    assert "hunter2" not in str(raised.value)
    assert "127.0.0.1" in str(raised.value)


async def test_append_refuses_what_is_not_a_json_record(store_at: Opener) -> None:
    async with store_at() as store:
        log, _ = store.open("hooks")
        with pytest.raises(ValueError):
            log.append({"x": float("nan")})
        with pytest.raises(ValueError):
            log.append({"x": b"bytes"})  # type: ignore[dict-item, unused-ignore]


# -- compaction and bounds -----------------------------------------------------------------------


async def test_compaction_replaces_the_content_and_later_records_follow(store_at: Opener) -> None:
    async with store_at() as store:
        log = await written(store, RECORDS)
        log.append({"op": "pending", "n": 1})  # covered by the state passed below
        await log.compact([{"op": "state", "hooks": ["h2"]}])
        log.append({"op": "later"})
        await log.flush()
        assert not log.failed
    assert await replayed(store_at) == [{"op": "state", "hooks": ["h2"]}, {"op": "later"}]


async def test_a_log_at_its_bound_refuses_to_grow_until_compacted(store_at: Opener) -> None:
    async with store_at() as store:
        log, _ = store.open("hooks")
        log.max_bytes = 200
        log.append({"pad": "x" * 150})
        await log.flush()
        log.append({"pad": "y" * 150})
        with pytest.raises(StorageUnavailable):
            await log.flush()
        assert log.failed
        await log.compact([{"pad": "small"}])
        assert not log.failed
        log.append({"n": 2})
        await log.flush()
    assert await replayed(store_at) == [{"pad": "small"}, {"n": 2}]


async def test_maintain_heals_a_log_at_its_bound_by_compacting(store_at: Opener) -> None:
    async with store_at() as store:
        log, _ = store.open("hooks")
        log.max_bytes = 400
        state: list[Record] = [{"pad": "x" * 150}]
        log.append(state[0])
        log.append(state[0])  # 2 x 162 bytes: in
        await log.flush()
        log.append({"pad": "y" * 150})  # would pass 400; the owner's state drops it
        with pytest.raises(StorageUnavailable):
            await log.flush()
        assert log.failed and not log.compaction_due
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: log.maintain(lambda: state, every=0.01))
                await until(lambda: not log.failed)
                nursery.cancel_scope.cancel()
    assert await replayed(store_at) == state


async def test_maintain_compacts_when_due(store_at: Opener) -> None:
    async with store_at() as store:
        log, _ = store.open("hooks")
        state = [{"pad": "z" * 1000}]
        for _ in range(1100):  # past COMPACT_MIN_BYTES (1 MiB)
            log.append(state[0])
        await log.flush()
        assert log.compaction_due
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: log.maintain(lambda: state, every=0.01))
                await until(lambda: not log.compaction_due)
                nursery.cancel_scope.cancel()
    assert await replayed(store_at) == state


# -- Redis fails and comes back ------------------------------------------------------------------


async def test_redis_killed_fails_flush_in_time_and_the_log_recovers_when_it_returns(
    store_at: Opener, redis_server: RedisServer
) -> None:
    async with store_at(timeout=1.0) as store:
        log = await written(store, RECORDS[:1])
        redis_server.kill()
        log.append(RECORDS[1])
        with trio.fail_after(3):  # the timeout, not a hang
            with pytest.raises(StorageUnavailable):
                await log.flush()
        assert log.failed
        assert not await log.recover()
        redis_server.start()
        await recovered(log)
        assert not log.failed
        log.append(RECORDS[2])
        await log.flush()
    assert await replayed(store_at) == RECORDS


async def test_nothing_acknowledged_is_lost_when_redis_is_killed(
    store_at: Opener, redis_server: RedisServer
) -> None:
    acknowledged: list[Record] = []
    async with store_at(timeout=1.0) as store:
        log, _ = store.open("hooks")
        for n in range(200):
            record: Record = {"n": n}
            log.append(record)
            await log.flush()
            acknowledged.append(record)
        redis_server.kill()  # SIGKILL: only what reached the AOF survives
    redis_server.start()
    assert await replayed(store_at) == acknowledged


async def test_an_answer_lost_to_a_timeout_is_sent_again_without_duplicates(
    store_at: Opener, redis_server: RedisServer
) -> None:
    assert redis_server.process is not None
    pid = redis_server.process.pid
    async with store_at(timeout=0.5) as store:
        log = await written(store, RECORDS[:1])
        os.kill(pid, signal.SIGSTOP)  # the request waits in its socket; no answer
        try:
            log.append(RECORDS[1])
            with pytest.raises(StorageUnavailable):
                await log.flush()
        finally:
            os.kill(pid, signal.SIGCONT)  # Redis now runs the first attempt
        await recovered(log)  # the second attempt
    assert await replayed(store_at) == RECORDS[:2]


# -- several instances ---------------------------------------------------------------------------


async def test_follow_sees_another_clients_appends_and_not_its_own(store_at: Opener) -> None:
    async with store_at() as first, store_at() as second:
        mine, _ = first.open("ledger")
        theirs, _ = second.open("ledger")
        mine.append({"from": "A", "n": 1})
        await mine.flush()
        assert (await mine.tail()).records == []  # its own
        seen: list[Record] = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def following() -> None:
                    async for tail in theirs.follow(every=0.01):
                        seen.extend(tail.records)

                nursery.start_soon(following)
                mine.append({"from": "A", "n": 2})
                await mine.flush()
                await until(lambda: len(seen) >= 2)
                nursery.cancel_scope.cancel()
        assert seen == [{"from": "A", "n": 1}, {"from": "A", "n": 2}]


async def test_tail_after_another_writers_compaction_resets(store_at: Opener) -> None:
    async with store_at() as first, store_at() as second:
        a, _ = first.open("ledger")
        b, _ = second.open("ledger")
        a.append({"n": 1})
        await a.flush()
        assert (await b.tail()).records == [{"n": 1}]
        await a.compact([{"state": 1}])
        tail = await b.tail()
        assert tail.reset and tail.records == [{"state": 1}]
        assert await b.try_append([{"n": 2}])  # b is at the new content's end


async def test_compare_and_append_lets_one_of_two_racing_writers_in(store_at: Opener) -> None:
    async with store_at() as first, store_at() as second:
        a, _ = first.open("ledger")
        b, _ = second.open("ledger")
        assert await a.try_append([{"by": "a", "seq": 1}])
        assert not await b.try_append([{"by": "b", "seq": 1}])  # b had not seen a's
        assert (await b.tail()).records == [{"by": "a", "seq": 1}]
        assert await b.try_append([{"by": "b", "seq": 2}])
        assert not await a.try_append([{"by": "a", "seq": 2}])
    assert await replayed(store_at, "ledger") == [{"by": "a", "seq": 1}, {"by": "b", "seq": 2}]


async def test_compare_and_append_races_never_lose_an_update(store_at: Opener) -> None:
    """Two clients each add 1 to a shared counter 30 times, deciding on their replica:
    with compare-and-append every decision saw the one before it."""

    async def incrementer(log: RedisLog, replica: list[int], times: int) -> None:
        for _ in range(times):
            while True:
                if await log.try_append([{"count": replica[0] + 1}]):
                    replica[0] += 1
                    break
                for record in (await log.tail()).records:  # lost the race: catch up
                    count = record["count"]
                    assert isinstance(count, int)
                    replica[0] = count
                await trio.lowlevel.checkpoint()

    async with store_at() as first, store_at() as second:
        a, _ = first.open("counter")
        b, _ = second.open("counter")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(incrementer, a, [0], 30)
            nursery.start_soon(incrementer, b, [0], 30)
    counts = [r["count"] for r in await replayed(store_at, "counter")]
    assert counts == list(range(1, 61))


def test_a_redis_log_is_a_log(redis_server: RedisServer) -> None:
    def check(log: Log) -> None:
        assert not log.failed

    async def main() -> None:
        config = StoreSettings(kind="redis", url=redis_server.url)
        async with open_redis_store(config, timeout=2) as store:
            check(store.open("hooks")[0])

    trio.run(main)


# -- the gateway on Redis ------------------------------------------------------------------------


def redis_config(sim_urls: list[str], state_dir: Path, redis: RedisServer) -> Config:
    port = free_port()
    config = config_for(
        sim_urls,
        proxy={
            "state_dir": str(state_dir),
            "bind": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{port}",
            "allow_private_callbacks": True,
        },
    )
    return dataclasses.replace(config, store=StoreSettings(kind="redis", url=redis.url))


@asynccontextmanager
async def gateway_on_redis(
    sim_urls: list[str], state_dir: Path, redis: RedisServer
) -> AsyncIterator[Stack]:
    """A gateway whose stores are on ``redis`` (its ledger in ``state_dir``), until the
    block ends; then it is stopped as a process that exits would be."""
    config = redis_config(sim_urls, state_dir, redis)
    async with trio.open_nursery() as nursery:
        gateway, binds = await nursery.start(
            functools.partial(serve_gateway, config, monitor=False)
        )
        async with httpx.AsyncClient(timeout=10) as http:
            yield Stack(gateway, binds[0], [], sim_urls, http, config)
        nursery.cancel_scope.cancel()


async def test_a_gateway_on_redis_keeps_its_hooks_there_and_has_them_after_a_restart(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer, store_at: Opener
) -> None:
    sims = [Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    async with gateway_on_redis(sim_urls, tmp_path, redis_server) as stack:
        assert text(await stack.create("room-1"), "returncode") == "SUCCESS"
        created = await hooks_call(stack, "create", [("callbackURL", URL), ("meetingID", "room-1")])
        assert text(created, "returncode") == "SUCCESS", etree.tostring(created)
        hook_id = text(created, "hookID")
    assert not (tmp_path / "hooks.log").exists()  # not in state_dir: in Redis
    async with store_at() as store:
        records = store.open("hooks")[1]
    assert any(hook_id in orjson.dumps(r).decode() for r in records)
    assert not list(tmp_path.glob("journal.*"))  # noqa: ASYNC240 - the ledger is not either
    async with gateway_on_redis(sim_urls, tmp_path / "elsewhere", redis_server) as stack:
        listed = await hooks_call(stack, "list", [])
        assert [h.findtext("hookID") for h in listed.iter("hook")] == [hook_id]
        info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
        assert text(info, "returncode") == "SUCCESS", etree.tostring(info)  # the ledger's
        reservation = stack.gateway.ledger.get(("acme", "room-1"))
        assert reservation is not None and reservation.backend_id == "bbb-1"


async def test_meetings_acknowledged_before_redis_is_killed_are_there_after_it_restarts(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer, store_at: Opener
) -> None:
    sims = [Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    acknowledged: list[str] = []
    async with gateway_on_redis(sim_urls, tmp_path / "a", redis_server) as stack:
        for n in range(20):
            answer = await stack.create(f"room-{n}", maxParticipants="1")
            if text(answer, "returncode") == "SUCCESS":
                acknowledged.append(f"room-{n}")
        await stack.call("end", [("meetingID", "room-0")])
        redis_server.kill()
        refused = await stack.create("room-late")
        assert text(refused, "returncode") == "FAILED"  # not durable: not admitted
    redis_server.start()
    async with store_at() as store:
        state, _ = redis_journal.replay(store.open("ledger")[1])
    assert len(acknowledged) == 20
    assert {r.meeting_id for r in state} == set(acknowledged) - {"room-0"}
    async with gateway_on_redis(sim_urls, tmp_path / "b", redis_server) as stack:
        held = {r.meeting_id for r in stack.gateway.ledger.state}
    assert set(acknowledged) - {"room-0"} <= held  # (and room-late, adopted from bbb-1)


async def test_a_second_gateway_on_the_same_redis_shares_the_ledger(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    sims = [Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    async with (
        gateway_on_redis(sim_urls, tmp_path / "a", redis_server) as a,
        gateway_on_redis(sim_urls, tmp_path / "b", redis_server) as b,
    ):
        assert text(await a.create("room-1"), "returncode") == "SUCCESS"
        info = await b.call("getMeetingInfo", [("meetingID", "room-1")])  # at once
        assert text(info, "returncode") == "SUCCESS", etree.tostring(info)
        await b.gateway.ledger.refresh()  # b may have found the reserve, not yet the confirm
        assert b.gateway.ledger.get(("acme", "room-1")) == a.gateway.ledger.get(("acme", "room-1"))
        scraped = [(await s.http.get(f"{s.url}/metrics")).text for s in (a, b)]
        assert "bbb_proxy_ledger_commits_total 2.0" in scraped[0]  # reserve, confirm
        assert "bbb_proxy_ledger_catch_ups_total 2.0" in scraped[1]  # b applied both
        assert "bbb_proxy_ledger_commits_total 0.0" in scraped[1]


async def test_a_gateway_whose_redis_dies_answers_bbb_errors_and_recovers_by_itself(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    sims = [Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    async with gateway_on_redis(sim_urls, tmp_path, redis_server) as stack:
        assert text(await stack.create("room-1"), "returncode") == "SUCCESS"
        redis_server.kill()
        join = await stack.http.get(
            stack.signed("join", [("meetingID", "room-1"), ("fullName", "A"), ("role", "VIEWER")])
        )
        assert join.status_code == 302 and "/join?" in join.headers["location"]  # still works
        refused = await hooks_call(stack, "create", [("callbackURL", URL), ("meetingID", "room-2")])
        assert text(refused, "returncode") == "FAILED", etree.tostring(refused)  # no 5xx
        assert text(refused, "messageKey") == "serverUnavailable"
        response = await stack.http.get(f"{stack.url}/readyz")
        assert response.status_code == 503
        assert response.json()["stores"]["hooks"] == "failed"
        redis_server.start()
        with trio.fail_after(10):  # the hooks log retries every second
            while (await stack.http.get(f"{stack.url}/readyz")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
        again = await hooks_call(stack, "create", [("callbackURL", URL), ("meetingID", "room-2")])
        assert text(again, "returncode") == "SUCCESS", etree.tostring(again)


async def test_a_gateway_cannot_start_without_its_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.kill()
    config = redis_config(["http://127.0.0.1:9/bigbluebutton/"], tmp_path, redis_server)
    with pytest.raises(StateError, match="cannot connect"):  # the CLI exits 3 on it
        await serve_gateway(config, monitor=False)


async def test_the_ledger_compacted_on_redis_replays_the_same_meetings(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer, store_at: Opener
) -> None:
    sims = [Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    async with gateway_on_redis(sim_urls, tmp_path / "a", redis_server) as stack:
        for n in range(3):
            await stack.create(f"room-{n}", maxParticipants="1")
        ledger = stack.gateway.ledger
        assert isinstance(ledger, SharedLedger)
        assert await ledger.log.try_compact(ledger.snapshot_records())
        await stack.call("end", [("meetingID", "room-1")])
        await stack.create("room-3", maxParticipants="1")
        before = {r.key: r for r in stack.gateway.ledger.state}
    async with store_at() as store:
        records = store.open("ledger")[1]
    assert records[0] == {"op": "snapshot", "seq": 6, "count": 3}  # reserve+confirm each
    state, last = redis_journal.replay(records)
    assert {r.key: r for r in state} == before
    assert last == 6 + len(records) - 4  # then one seq per later record
    with pytest.raises(StateError, match="record 5: ValueError: record 9 follows record 6"):
        redis_journal.replay([*records[:4], {**records[4], "seq": 9}])


async def test_a_compaction_in_the_middle_of_a_read_is_read_again(store_at: Opener) -> None:
    async with store_at() as first, store_at() as second:
        a, _ = first.open("ledger")
        b, _ = second.open("ledger")
        a.append({"n": 1})
        await a.flush()
        original = second._read_entries
        compacted = False

        async def compacting_meanwhile(*args: Any) -> Any:
            nonlocal compacted
            loaded = await original(*args)
            if not compacted:  # after b read the entries, before it reads gen again
                compacted = True
                await a.compact([{"state": "new"}])
            return loaded

        second._read_entries = compacting_meanwhile  # type: ignore[method-assign, assignment]
        tail = await b.reread()  # a tail reads each chunk with its gen in one script
        assert compacted
        assert tail.reset and tail.records == [{"state": "new"}]


def test_the_store_settings_are_checked_and_local_is_the_default() -> None:
    base = config_for(["http://127.0.0.1:9/bigbluebutton/"])
    assert base.store.kind == "local"
    table = {
        "backends": [
            {"id": "b", "url": "http://127.0.0.1:9/bigbluebutton/", "secret": "s", "capacity": 1}
        ]
    }
    loaded = from_mapping(
        table | {"store": {"kind": "redis", "url": "rediss://r:6380/2", "password": "pw"}}
    )
    assert loaded.store.kind == "redis" and loaded.store.url == "rediss://r:6380/2"
    assert "pw" not in repr(loaded.store)
    for bad, key in (
        ({"kind": "sql"}, "store.kind"),
        ({"url": "http://r/"}, "store.url"),
        ({"key_prefix": "a*"}, "store.key_prefix"),
        ({"tls": True}, "store.tls"),
    ):
        with pytest.raises(ConfigError, match=key):
            from_mapping(table | {"store": bad})


async def test_tail_with_own_gives_this_writers_entries_too(store_at: Opener) -> None:
    async with store_at() as first:
        a, _ = first.open("ledger")
        assert await a.try_append([{"n": 1}])
        assert (await a.tail(own=True)).records == []  # it has seen its won append
        a.append({"n": 2})
        await a.flush()  # a plain append does not move what the log has seen
        assert (await a.tail(own=True)).records == [{"n": 2}]


async def test_compare_and_compact_only_over_what_was_seen(store_at: Opener) -> None:
    async with store_at() as first, store_at() as second:
        a, _ = first.open("ledger")
        b, _ = second.open("ledger")
        b.append({"n": 1})
        await b.flush()
        assert not await a.try_compact([{"state": 0}])  # a has not seen b's record
        assert (await a.tail()).records == [{"n": 1}]
        assert await a.try_compact([{"state": 1}])
        b.append({"n": 2})
        await b.flush()  # b's count survived: only its new record is added
        tail = await b.tail()
        assert tail.reset and tail.records == [{"state": 1}, {"n": 2}]
        assert await b.try_append([{"n": 3}])
    assert await replayed(store_at, "ledger") == [{"state": 1}, {"n": 2}, {"n": 3}]


async def test_a_lost_compare_and_append_reads_what_it_missed_in_the_same_call(
    store_at: Opener,
) -> None:
    async with store_at() as first, store_at() as second:
        a, _ = first.open("ledger")
        b, _ = second.open("ledger")
        assert await a.try_append_or_read([{"by": "a", "n": 1}]) is None
        assert await a.try_append_or_read([{"by": "a", "n": 2}]) is None
        missed = await b.try_append_or_read([{"by": "b", "n": 1}])
        assert missed is not None and not missed.reset
        assert missed.records == [{"by": "a", "n": 1}, {"by": "a", "n": 2}]
        assert await b.try_append_or_read([{"by": "b", "n": 3}]) is None  # b is at the end
        assert await a.try_compact([{"state": "a"}]) is False  # a has not seen b's
        assert (await a.tail()).records == [{"by": "b", "n": 3}]
        assert await a.try_compact([{"state": "a"}])
        after = await b.try_append_or_read([{"by": "b", "n": 4}])
        assert after is not None and after.reset and after.records == [{"state": "a"}]
    assert await replayed(store_at, "ledger") == [{"state": "a"}]
