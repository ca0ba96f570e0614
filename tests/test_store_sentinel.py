"""The Redis store behind Redis Sentinel, and replicated acknowledgements (``WAIT``).

Real processes only, on loopback and free ports: a master ``redis-server``, replicas
(``--replicaof``), three Sentinels (``redis-server --sentinel``, quorum 2, down after
500 ms).  A ``kill -9`` of the master is followed by the Sentinels' promotion of a
replica; the store follows it, and every record it acknowledged with ``wait_replicas =
1`` is on the new master.  Writes during the switch are ``StorageUnavailable`` (a
gateway answers BBB errors meanwhile).  With the replica stopped, ``wait_replicas = 1``
makes every write unacknowledged.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lxml import etree

from proxy.config import StoreSettings, from_mapping
from proxy.errors import ConfigError, StateError, StorageUnavailable
from proxy.ledger import redis_journal
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from proxy.store.redis import open_redis_store
from tests.harness import BACKEND_SECRET, Stack, config_for, text
from tests.redis_server import START_TIMEOUT, RedisServer, free_port, redis_binary

MASTER = "bbb-store"
SENTINEL_PASSWORD = "sentinel-secret"  # the Sentinels' requirepass ([store] sentinel_password)
SETTLE_TIMEOUT = 30.0  # seconds for replicas to sync and Sentinels to know each other
QUICK_SYNC = ("--repl-diskless-sync-delay", "0")  # a replica's full sync at once, not in 5 s


def cli(port: int, *args: str, password: str = "") -> str:
    """``redis-cli -p port args``' output ('' if it cannot connect)."""
    auth = ["--no-auth-warning", "-a", password] if password else []
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *auth, *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return done.stdout


def fields(port: int, *args: str) -> dict[str, str]:
    """A Sentinel's reply of alternating names and values (``SENTINEL master``) as a dict."""
    lines = cli(port, *args, password=SENTINEL_PASSWORD).splitlines()
    return dict(zip(lines[::2], lines[1::2], strict=False))


def wait_for(condition: Any, what: str, seconds: float = SETTLE_TIMEOUT) -> None:
    """Poll ``condition()`` (another process changes what it reads) until it holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.05)


class SentinelServer:
    """One ``redis-server --sentinel`` on 127.0.0.1, watching ``MASTER`` at ``master_port``."""

    def __init__(self, directory: Path, master_port: int) -> None:
        self.binary = redis_binary()
        self.directory = directory
        self.port = free_port()
        self.master_port = master_port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.directory / "sentinel.conf"  # Sentinel rewrites it: its own copy
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "daemonize no\n"
            f'dir "{self.directory}"\n'
            f'logfile "{self.directory / "sentinel.log"}"\n'
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 500\n"
            f"sentinel failover-timeout {MASTER} 1000\n"
            f"sentinel parallel-syncs {MASTER} 2\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: cli(self.port, "PING", password=SENTINEL_PASSWORD).strip() == "PONG",
            "Sentinel answers",
            START_TIMEOUT,
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@dataclass
class Group:
    """A master, its replicas and three Sentinels."""

    master: RedisServer
    replicas: list[RedisServer]
    sentinels: list[SentinelServer]

    def settings(self, **more: Any) -> StoreSettings:
        sentinels = tuple(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return StoreSettings(
            kind="redis",
            sentinels=sentinels,
            sentinel_master=MASTER,
            sentinel_password=SENTINEL_PASSWORD,
            **more,
        )

    def master_port(self) -> int:
        """The master's port as the first Sentinel names it now."""
        reply = cli(
            self.sentinels[0].port,
            "SENTINEL",
            "get-master-addr-by-name",
            MASTER,
            password=SENTINEL_PASSWORD,
        )
        return int(reply.split()[1])


def online_replicas(port: int) -> int:
    return cli(port, "INFO", "replication").count("state=online")


@pytest.fixture
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    """A master with two replicas and three Sentinels that know them all; stopped after."""
    master = RedisServer(tmp_path_factory.mktemp("master"), extra=QUICK_SYNC)
    master.start()
    replicas = [
        RedisServer(
            tmp_path_factory.mktemp("replica"),
            extra=(*QUICK_SYNC, "--replicaof", "127.0.0.1", str(master.port)),
        )
        for _ in range(2)
    ]
    sentinels = [SentinelServer(tmp_path_factory.mktemp("sentinel"), master.port) for _ in range(3)]
    try:
        for replica in replicas:
            replica.start()
        wait_for(lambda: online_replicas(master.port) == 2, "both replicas in sync")
        for sentinel in sentinels:
            sentinel.start()

        def settled() -> bool:
            for s in sentinels:
                seen = fields(s.port, "SENTINEL", "master", MASTER)
                if seen.get("num-slaves") != "2" or seen.get("num-other-sentinels") != "2":
                    return False
            return True

        wait_for(settled, "every Sentinel knows both replicas and the other Sentinels")
        yield Group(master, replicas, sentinels)
    finally:
        for sentinel in sentinels:
            sentinel.stop()
        for server in (*replicas, master):
            server.stop()


# -- the store -----------------------------------------------------------------------------------


async def test_the_store_follows_a_failover_and_keeps_every_acknowledged_record(
    group: Group,
) -> None:
    settings = group.settings(wait_replicas=1, wait_timeout=1.0)
    async with open_redis_store(settings, timeout=2.0) as store:
        log, replayed = store.open("hooks")
        assert replayed == []
        for n in range(20):
            log.append({"n": n})
            await log.flush()  # on the master and on a replica
        old = group.master.port
        group.master.kill()
        unavailable, n = 0, 20
        with trio.fail_after(SETTLE_TIMEOUT):
            while True:
                log.append({"n": n})
                n += 1
                try:
                    await log.flush()
                except StorageUnavailable:  # during the switch; never another exception
                    unavailable += 1
                    await trio.sleep(0.1)  # the next attempt, as the log's retry would
                    continue
                break  # the old master is dead: this went to the new one, queue and all
        assert unavailable >= 1
        for _ in range(10):
            log.append({"n": n})
            n += 1
            await log.flush()
    new = group.master_port()
    assert new != old and new in {r.port for r in group.replicas}
    async with open_redis_store(group.settings(), timeout=2.0) as again:
        _, records = again.open("hooks")
    assert records == [{"n": i} for i in range(n)]  # every acknowledged one, once, in order


async def test_the_store_opens_through_sentinel_and_names_them_when_none_answers(
    group: Group,
) -> None:
    async with open_redis_store(group.settings(), timeout=2.0) as store:
        log, _ = store.open("runtime")
        log.append({"op": "x"})
        await log.flush()
        ledger, _ = store.open("ledger")
        assert await ledger.try_append([{"op": "y"}])
    assert "bbb-proxy:log:runtime" in cli(group.master.port, "KEYS", "*")
    nobody = StoreSettings(
        kind="redis", sentinels=(f"127.0.0.1:{free_port()}",), sentinel_master=MASTER
    )
    with pytest.raises(StateError, match=f"sentinel master '{MASTER}'.*no master"):
        async with open_redis_store(nobody, timeout=1.0):
            pass
    unknown = dataclasses.replace(group.settings(), sentinel_master="other")
    with pytest.raises(StateError, match="sentinel master 'other'"):
        async with open_redis_store(unknown, timeout=1.0):
            pass
    no_password = dataclasses.replace(group.settings(), sentinel_password="")
    with pytest.raises(StateError, match="no master") as refused:
        async with open_redis_store(no_password, timeout=1.0):
            pass
    wrong = dataclasses.replace(group.settings(), sentinel_password="wrong-one")
    with pytest.raises(StateError, match="no master") as refused_too:
        async with open_redis_store(wrong, timeout=1.0):
            pass
    assert "wrong-one" not in str(refused_too.value) and SENTINEL_PASSWORD not in str(refused.value)


# -- WAIT without replicas -------------------------------------------------------------------------


async def test_with_wait_replicas_a_write_the_replica_does_not_take_is_not_acknowledged(
    tmp_path: Path,
) -> None:
    master = RedisServer(tmp_path / "master", extra=QUICK_SYNC)
    master.directory.mkdir()
    master.start()
    replica = RedisServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port))
    )
    replica.directory.mkdir()
    try:
        replica.start()
        wait_for(lambda: online_replicas(master.port) == 1, "the replica in sync")
        settings = StoreSettings(kind="redis", url=master.url, wait_replicas=1, wait_timeout=1.0)
        async with open_redis_store(settings, timeout=2.0) as store:
            log, _ = store.open("hooks")
            log.append({"n": 0})
            await log.flush()
            replica.stop()
            wait_for(lambda: online_replicas(master.port) == 0, "the master sees it gone")
            log.append({"n": 1})
            with pytest.raises(StorageUnavailable):
                await log.flush()
            assert log.failed and log.unflushed == 1
            shared, _ = store.open("ledger")
            with pytest.raises(StorageUnavailable):  # the shared ledger's commit
                await shared.try_append([{"op": "x"}])
            # not acknowledged, yet on the master: as a lost answer
            assert cli(master.port, "XLEN", "bbb-proxy:log:hooks").strip() == "2"
            replica.start()
            wait_for(lambda: online_replicas(master.port) == 1, "the replica back in sync")
            assert await log.recover()  # sent again: the master adds nothing twice
            assert not log.failed and log.unflushed == 0
        async with open_redis_store(
            dataclasses.replace(settings, wait_replicas=0), timeout=2.0
        ) as s:
            assert s.open("hooks")[1] == [{"n": 0}, {"n": 1}]
    finally:
        replica.stop()
        master.stop()


# -- a gateway on it -------------------------------------------------------------------------------


@asynccontextmanager
async def gateway_on(
    sim_urls: list[str], state_dir: Path, store: StoreSettings
) -> AsyncIterator[Stack]:
    """A gateway on ``store`` until the block ends (as tests/test_store_redis.py's)."""
    port = free_port()
    proxy = {
        "state_dir": str(state_dir),
        "bind": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
    }
    config = dataclasses.replace(config_for(sim_urls, proxy=proxy), store=store)
    async with trio.open_nursery() as nursery:
        gateway, binds = await nursery.start(
            functools.partial(serve_gateway, config, monitor=False)
        )
        async with httpx.AsyncClient(timeout=10) as http:
            yield Stack(gateway, binds[0], [], sim_urls, http, config)
        nursery.cancel_scope.cancel()


async def test_a_gateway_answers_bbb_errors_during_a_failover_and_loses_no_acknowledged_create(
    nursery: trio.Nursery, tmp_path: Path, group: Group
) -> None:
    sims = [Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    settings = group.settings(wait_replicas=1, wait_timeout=1.0)
    acknowledged: list[str] = []
    async with gateway_on(sim_urls, tmp_path, settings) as stack:

        async def create(n: int) -> etree._Element:  # asserts HTTP 200 and XML: never a 5xx
            return await stack.create(f"room-{n}", maxParticipants="1")

        for n in range(5):
            created = await create(n)
            assert text(created, "returncode") == "SUCCESS", etree.tostring(created)
            acknowledged.append(f"room-{n}")
        group.master.kill()
        join = await stack.http.get(
            stack.signed("join", [("meetingID", "room-0"), ("fullName", "A"), ("role", "VIEWER")])
        )
        assert join.status_code == 302  # a known meeting: from the instance's replica
        refused, n = 0, 5
        with trio.fail_after(SETTLE_TIMEOUT):
            while text(answer := await create(n), "returncode") != "SUCCESS":
                assert text(answer, "messageKey"), etree.tostring(answer)  # a BBB error
                if not refused:  # (the promotion is >= 500 ms away: down-after-milliseconds)
                    assert (await stack.http.get(f"{stack.url}/readyz")).status_code == 503
                refused += 1
                n += 1
                await trio.sleep(0.1)  # the client's next try
        acknowledged.append(f"room-{n}")  # on the new master
        assert refused >= 1
        for m in range(n + 1, n + 4):
            assert text(await create(m), "returncode") == "SUCCESS"
            acknowledged.append(f"room-{m}")
        with trio.fail_after(SETTLE_TIMEOUT):  # ready again by itself
            while (await stack.http.get(f"{stack.url}/readyz")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
    async with open_redis_store(group.settings(), timeout=2.0) as store:
        state, _ = redis_journal.replay(store.open("ledger")[1])
    assert set(acknowledged) <= {r.meeting_id for r in state}


# -- settings ------------------------------------------------------------------------------------


def test_the_sentinel_and_wait_settings_are_checked() -> None:
    table: dict[str, Any] = {
        "backends": [
            {"id": "b", "url": "http://127.0.0.1:9/bigbluebutton/", "secret": "s", "capacity": 1}
        ]
    }
    good = {
        "kind": "redis",
        "sentinels": ["127.0.0.1:26379", "[::1]:26380"],
        "sentinel_master": "m",
        "sentinel_password": "spw",
        "wait_replicas": 1,
        "wait_timeout": 0.25,
    }
    loaded = from_mapping(table | {"store": good}).store
    assert loaded.sentinels == ("127.0.0.1:26379", "[::1]:26380")
    assert (loaded.sentinel_master, loaded.wait_replicas, loaded.wait_timeout) == ("m", 1, 0.25)
    assert "spw" not in repr(loaded)
    assert from_mapping(table).store.wait_replicas == 0
    for bad, key in (
        ({"sentinels": ["127.0.0.1"], "sentinel_master": "m"}, "store.sentinels: '127.0.0.1'"),
        ({"sentinels": "127.0.0.1:1", "sentinel_master": "m"}, "store.sentinels"),
        ({"sentinels": ["h:1", "h:1"], "sentinel_master": "m"}, "store.sentinels"),
        ({"sentinels": ["h:0"], "sentinel_master": "m"}, "store.sentinels"),
        ({"sentinels": ["h:1"]}, "store.sentinel_master"),
        ({"sentinel_master": "m"}, "store.sentinels"),
        ({"sentinel_password": "p"}, "store.sentinel_password"),
        (
            {"sentinels": ["h:1"], "sentinel_master": "m", "url": "unix:///tmp/r.sock"},
            "store.url",
        ),
        ({"wait_replicas": -1}, "store.wait_replicas"),
        ({"wait_replicas": 1, "wait_timeout": 0}, "store.wait_timeout"),
        ({"wait_replicas": 1, "wait_timeout": 2}, "store.wait_timeout: must be below"),
    ):
        with pytest.raises(ConfigError, match=key):
            from_mapping(table | {"store": {"kind": "redis"} | bad})
