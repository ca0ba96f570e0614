"""Several gateway processes on one Redis behind a real HAProxy, on loopback, for the tests.

:func:`open_cluster` starts, each on free loopback ports: a private ``redis-server``
(:mod:`tests.redis_server`: AOF, ``appendfsync always``), one ``python -m
proxy.simulator`` process serving the simulated BBB servers, ``instances`` gateway
processes (``python -m proxy.cli serve``, as production runs it; ``[store] kind =
"redis"``, one url and key_prefix, each its own ``state_dir`` and port) and ``haproxy``
with ``config/haproxy.cfg``, its addresses replaced (:func:`haproxy_config`).  A test
sends a call to one instance (``via=i``) or through HAProxy (``via=None``), kills an
instance with SIGKILL and starts it again, kills and restarts Redis, reads the ledger as
Redis holds it and the meetings as the simulators hold them.

Every process runs in its own session; at the end each session is sent SIGTERM, then
SIGKILL, and the harness checks that no process of any of them is left (a gateway's
worker processes included).

With ``fake_clock``, the gateways run under Debian's libfaketime, reading their wall
clock's offset from one file (:meth:`Cluster.advance_clock` moves all three at once);
their monotonic clock is left alone (trio's timeouts, Redis' leases).

Debian's ``haproxy`` and ``libfaketime`` are needed; ``./run test`` installs them when
missing and sets ``BBB_PROXY_NEED_HAPROXY``, so there a missing one fails the test
instead of skipping it.

Error handling: a process that exits or is not ready within ``START_TIMEOUT`` fails the
test with the tail of its log.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.config import StoreSettings
from proxy.ledger.model import LedgerState
from proxy.ledger.redis_journal import replay
from proxy.store.redis import open_redis_store
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "config" / "haproxy.cfg"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds for a process to listen (a gateway: to be ready)
STOP_TIMEOUT = 15.0  # seconds after SIGTERM before SIGKILL (the gateway's own deadline is 10)
CHECK_INTERVAL = "100ms"  # HAProxy's health checks, instead of the example's 2 s
BACKEND_SECRET = "cluster-backend-secret"
ADMIN_TOKEN = "cluster-admin-token"
KEY_PREFIX = "cluster:"
CUSTOMER = "acme"
SECRET = "acme-cluster-secret"


def tool(name: str) -> str:
    """The path of ``haproxy`` or of libfaketime; skips (under ``./run test``: fails)
    without it."""
    found = shutil.which(name) if name == "haproxy" else _libfaketime()
    if found is None:
        message = f"Debian's {name} package is not installed (./run test installs it)"
        if os.environ.get("BBB_PROXY_NEED_HAPROXY"):
            pytest.fail(message)
        pytest.skip(message)
    return found


_taken: set[int] = set()


def listen_port() -> int:
    """A free loopback port below the kernel's ephemeral range, not given out before.

    A port the kernel picks for ``bind(0)`` is an ephemeral one, which any outgoing
    connection (a gateway's to Redis, the test's to a gateway) may take before the server
    meant for it binds it, or while it is killed and started again; these are not.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise AssertionError("no free port below the ephemeral range")


def _libfaketime() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def haproxy_config(frontend: int, instances: list[int], check_interval: str) -> str:
    """``config/haproxy.cfg`` for loopback: the frontend on ``frontend``, one server per
    port of ``instances``, checks every ``check_interval``, no docker DNS.

    Error handling: ``AssertionError`` when the shipped file no longer has the lines
    replaced here (the test then says so rather than running another configuration).
    """
    text = HAPROXY_CFG.read_text()
    servers = list(dict.fromkeys(re.findall(r"^    server (\S+) \S+$", text, flags=re.M)))
    assert len(servers) == len(instances) == 3, servers
    for name, port in zip(servers, instances, strict=True):  # in each backend
        text = re.sub(
            rf"^    server {name} \S+$", f"    server {name} {HOST}:{port}", text, flags=re.M
        )
    replaced = [
        (r"^    bind :8000$", f"    bind {HOST}:{frontend}"),
        (r"^    maxconn \d+$", "    maxconn 400"),  # within a default limit of 1024 files
        (r" inter 2s ", f" inter {check_interval} "),
        (r" resolvers docker$", ""),
        (r"^resolvers docker\n(    .*\n)+", ""),
    ]
    for pattern, new in replaced:
        text, count = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert count == 1, f"config/haproxy.cfg: {pattern!r} not found once"
    return text


def gateway_toml(
    port: int,
    lb_port: int,
    state_dir: Path,
    redis_url: str,
    backend_urls: list[str],
    capacity: int,
    max_connections: int,
    health_interval: float,
) -> str:
    """One instance's configuration: all instances share everything but bind and state_dir."""
    backends = "".join(
        f'[[backends]]\nid = "bbb-{i + 1}"\nurl = "{url}"\nsecret = "{BACKEND_SECRET}"\n'
        f'checksum_algorithm = "sha1"\ncapacity = {capacity}\n\n'
        for i, url in enumerate(backend_urls)
    )
    return (
        f'[proxy]\nbind = "{HOST}:{port}"\npublic_url = "http://{HOST}:{lb_port}"\n'
        f'state_dir = "{state_dir}"\nadmin_token = "{ADMIN_TOKEN}"\n'
        f'allow_private_callbacks = true\ntrusted_proxies = ["{HOST}"]\nlog_format = "json"\n\n'
        f"[proxy.health]\ninterval = {health_interval}\ntimeout = {health_interval * 0.8}\n\n"
        f'[store]\nkind = "redis"\nurl = "{redis_url}"\nkey_prefix = "{KEY_PREFIX}"\n\n'
        f"{backends}"
        f'[[customers]]\nid = "{CUSTOMER}"\nsecret = "{SECRET}"\n'
        f"max_connections = {max_connections}\ndefault_max_participants = 10\n"
        f"default_duration = 60\n"
    )


@dataclass
class Proc:
    """One child process in its own session, its log in a file."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    pipe: bool = False  # stdout to a pipe (the simulators print their URLs), else to the log
    process: trio.Process | None = None
    sessions: list[int] = field(default_factory=list)  # every session it ever ran in

    async def start(self) -> None:
        assert self.process is None or self.process.returncode is not None, self.name
        with self.log.open("ab") as sink:
            self.process = await trio.lowlevel.open_process(
                self.argv,
                stdout=subprocess.PIPE if self.pipe else sink,
                stderr=sink,
                start_new_session=True,
                env=self.env,
            )
        self.sessions.append(self.process.pid)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def failed(self, what: str) -> None:
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        pytest.fail(f"{self.name}: {what}\n--- {self.log} (tail) ---\n{tail}")

    async def lines(self, count: int) -> list[str]:
        """The first ``count`` lines it prints on stdout."""
        assert self.process is not None and self.process.stdout is not None
        data = b""
        with trio.move_on_after(START_TIMEOUT):
            while data.count(b"\n") < count:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    self.failed("exited during start-up")
                data += chunk
            return data.decode().splitlines()[:count]
        self.failed(f"printed no {count} line(s) within {START_TIMEOUT} s")
        raise AssertionError  # not reached

    async def kill(self) -> None:
        """SIGKILL to the whole session, as a crash of the machine's process."""
        if self.process is not None and self.process.returncode is None:
            _signal_session(self.process.pid, signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            _signal_session(self.process.pid, signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await self.process.wait()
        for session in self.sessions:  # whatever it left behind, in any of its sessions
            _signal_session(session, signal.SIGKILL)
        await self.process.wait()
        if self.process.stdout is not None:
            await self.process.stdout.aclose()


def _signal_session(session: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(session, signum)


def session_alive(session: int) -> bool:
    """Whether any process is left in the session (process group) ``session``."""
    try:
        os.killpg(session, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - ours, so it is allowed
        return True
    # A zombie (already exited, not reaped) still answers; /proc says what it is.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == session and fields[0] != "Z":  # pgrp, state
            return True
    return False


@dataclass
class Instance:
    """One gateway process: index (0, 1, 2), port, its own state_dir."""

    index: int
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class Cluster:
    directory: Path
    redis: RedisServer
    simulators: Proc
    sim_urls: list[str]
    instances: list[Instance]
    haproxy: Proc
    lb_port: int
    http: httpx.AsyncClient
    clock_file: Path | None = None

    # -- addressing -----------------------------------------------------------------------

    def base(self, via: int | None) -> str:
        """An instance's URL, or HAProxy's (``via=None``)."""
        return f"http://{HOST}:{self.lb_port}" if via is None else self.instances[via].url

    def api(self, via: int | None) -> str:
        return f"{self.base(via)}/{CUSTOMER}/bigbluebutton/api"

    def signed(self, call: str, params: list[tuple[str, str]], via: int | None) -> str:
        return f"{self.api(via)}/{call}?{signed_query(call, params, SECRET)}"

    # -- calls ----------------------------------------------------------------------------

    async def get(
        self, call: str, params: list[tuple[str, str]], via: int | None
    ) -> httpx.Response:
        return await self.http.get(self.signed(call, params, via))

    async def call(
        self, call: str, params: list[tuple[str, str]], via: int | None
    ) -> etree._Element:
        """A signed GET; its XML answer (asserts HTTP 200 and XML, as a BBB client reads it)."""
        response = await self.get(call, params, via)
        assert response.status_code == 200, (via, response.status_code, response.text)
        assert response.headers["content-type"].startswith("text/xml"), response.text
        return etree.fromstring(response.content)

    async def create(self, meeting_id: str, via: int | None, **params: str) -> etree._Element:
        base = [("meetingID", meeting_id), ("name", f"Room {meeting_id}")]
        return await self.call("create", base + list(params.items()), via)

    async def ready(self, via: int | None) -> int:
        """The HTTP status of ``/readyz``; 0 when the instance does not answer."""
        try:
            return (await self.http.get(f"{self.base(via)}/readyz")).status_code
        except httpx.TransportError:
            return 0

    async def admin(self, via: int, path: str) -> Any:
        """``GET /admin/v1/<path>`` on one instance, its JSON."""
        response = await self.http.get(
            f"{self.base(via)}/admin/v1/{path}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert response.status_code == 200, (via, path, response.status_code, response.text)
        return response.json()

    # -- what the others hold -------------------------------------------------------------

    async def ledger(self) -> LedgerState:
        """The ledger as Redis holds it: the ``ledger`` stream replayed."""
        settings = StoreSettings(kind="redis", url=self.redis.url, key_prefix=KEY_PREFIX)
        async with open_redis_store(settings, timeout=5.0) as store:
            _, records = store.open("ledger")
            state, _ = replay(records)
            return state

    async def backend_meetings(self) -> dict[str, list[etree._Element]]:
        """Every meeting each simulated BBB server has made (ended ones too), by backend id."""
        found: dict[str, list[etree._Element]] = {}
        for i, url in enumerate(self.sim_urls):
            query = signed_query("getMeetings", [], BACKEND_SECRET)
            response = await self.http.get(f"{url}/getMeetings?{query}")
            assert response.status_code == 200, response.text
            root = etree.fromstring(response.content)
            found[f"bbb-{i + 1}"] = root.findall("meetings/meeting")
        return found

    # -- faults ---------------------------------------------------------------------------

    async def kill(self, index: int) -> None:
        """SIGKILL one gateway instance."""
        await self.instances[index].proc.kill()

    async def start(self, index: int) -> None:
        """Start one gateway instance (again, on its port and state_dir) and wait until ready."""
        instance = self.instances[index]
        await instance.proc.start()
        await self.wait_ready(instance)

    async def wait_ready(self, instance: Instance) -> None:
        with trio.move_on_after(START_TIMEOUT):
            while instance.proc.running:
                if await self.ready(instance.index) == 200:
                    return
                await trio.sleep(0.05)
            instance.proc.failed("exited during start-up")
        instance.proc.failed(f"/readyz not 200 within {START_TIMEOUT} s")

    async def kill_redis(self) -> None:
        await trio.to_thread.run_sync(self.redis.kill)

    async def start_redis(self) -> None:
        await trio.to_thread.run_sync(self.redis.start)

    def advance_clock(self, seconds: float) -> None:
        """Move every gateway's wall clock ``seconds`` on (``fake_clock`` only)."""
        assert self.clock_file is not None, "open_cluster(fake_clock=True)"
        offset = float(self.clock_file.read_text().strip()) + seconds
        scratch = self.clock_file.with_suffix(".new")
        scratch.write_text(f"{offset:+.3f}\n")
        scratch.replace(self.clock_file)  # atomic: a gateway never reads half a file

    def sessions(self) -> list[int]:
        procs = [self.simulators, self.haproxy, *(i.proc for i in self.instances)]
        return [s for p in procs for s in p.sessions]


async def wait_for(condition: Callable[[], Any], seconds: float = 10.0) -> None:
    """Poll an async ``condition`` (a coroutine function) until it is true."""
    with trio.fail_after(seconds):
        while not await condition():  # noqa: ASYNC110 - the state of other processes
            await trio.sleep(0.05)


@asynccontextmanager
async def open_cluster(
    directory: Path,
    *,
    instances: int = 3,
    backends: int = 3,
    capacity: int = 100,
    max_connections: int = 20,
    latency: float = 0.0,
    fake_clock: bool = False,
    health_interval: float = 1.0,
) -> AsyncIterator[Cluster]:
    """Start everything (see the module docstring); stop everything when the block exits."""
    haproxy_binary = tool("haproxy")
    env: dict[str, str] | None = None
    clock_file: Path | None = None
    if fake_clock:
        clock_file = directory / "faketime"
        clock_file.write_text("+0\n")
        env = os.environ | {
            "LD_PRELOAD": tool("libfaketime"),
            "FAKETIME_TIMESTAMP_FILE": str(clock_file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
    redis = RedisServer(directory / "redis", listen_port())
    redis.directory.mkdir()
    sim_argv = [
        sys.executable, "-m", "proxy.simulator", "--port", "0", "--count", str(backends),
        "--secret", BACKEND_SECRET, "--latency", str(latency), "--expire-unjoined-minutes", "-1",
    ]  # fmt: skip
    simulators = Proc("simulators", sim_argv, directory / "simulators.log", pipe=True)
    lb_port = listen_port()
    ports = [listen_port() for _ in range(instances)]
    gateways = []
    for index, port in enumerate(ports):
        config = directory / f"gateway{index + 1}.toml"
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
        proc = Proc(f"gateway{index + 1}", argv, directory / f"gateway{index + 1}.log", env)
        gateways.append(Instance(index, port, proc))
    lb_cfg = directory / "haproxy.cfg"
    lb_cfg.write_text(haproxy_config(lb_port, ports, CHECK_INTERVAL))
    haproxy = Proc("haproxy", [haproxy_binary, "-db", "-f", str(lb_cfg)], directory / "haproxy.log")
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    http = httpx.AsyncClient(timeout=30, limits=limits)
    cluster = Cluster(
        directory, redis, simulators, [], gateways, haproxy, lb_port, http, clock_file
    )
    try:
        await trio.to_thread.run_sync(redis.start)
        await simulators.start()
        cluster.sim_urls = await simulators.lines(backends)
        _write_gateway_configs(cluster, capacity, max_connections, health_interval)
        async with trio.open_nursery() as starting:
            for instance in gateways:
                starting.start_soon(cluster.start, instance.index)
        await haproxy.start()
        await wait_for(lambda: _all_up_behind(cluster), START_TIMEOUT)
        try:
            yield cluster
        except BaseException:
            _report(cluster)  # pytest shows it with the failure
            raise
    finally:
        with trio.CancelScope(shield=True):
            await http.aclose()
            for proc in [haproxy, *(i.proc for i in gateways), simulators]:
                await proc.stop()
            await trio.to_thread.run_sync(redis.stop)
            left = [s for s in cluster.sessions() if session_alive(s)]
            assert not left, f"processes left behind in sessions {left}"


def _report(cluster: Cluster) -> None:
    """What each process logged at WARNING and above (the last 40 lines each), on stdout."""
    for proc in [cluster.haproxy, *(i.proc for i in cluster.instances), cluster.simulators]:
        text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
        worse = [
            line
            for line in text.splitlines()
            if '"level":"INFO"' not in line
            and '"level":"DEBUG"' not in line
            and " 200 " not in line
        ]
        print(f"--- {proc.name} ({proc.log}): {len(worse)} lines not INFO ---")
        print("\n".join(worse[-40:]))


def _write_gateway_configs(
    cluster: Cluster, capacity: int, max_connections: int, health_interval: float
) -> None:
    for instance in cluster.instances:
        state_dir = cluster.directory / f"state{instance.index + 1}"
        config = Path(instance.proc.argv[-1])  # serve --config PATH
        config.write_text(
            gateway_toml(
                instance.port,
                cluster.lb_port,
                state_dir,
                cluster.redis.url,
                cluster.sim_urls,
                capacity,
                max_connections,
                health_interval,
            )
        )


async def _all_up_behind(cluster: Cluster) -> bool:
    """Whether HAProxy answers, and so has at least one instance up (all are, after start)."""
    if not cluster.haproxy.running:
        cluster.haproxy.failed("exited")
    return await cluster.ready(None) == 200
