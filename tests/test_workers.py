"""``[proxy] workers = N``: N gateway processes on one socket, as ``bbb-proxy serve`` runs them.

Real processes on loopback: a private ``redis-server`` (:mod:`tests.redis_server`), one
``python -m proxy.simulator`` serving two simulated BBB servers, and ``python -m proxy.cli
serve`` with ``workers`` > 1 (the parent and its workers).  The parent's run directory is
made under the test's ``TMPDIR``, so the test can read each worker's metric files there.

What is checked: a scrape answered by any worker shows the sums over all workers (request
counters exactly; component tallies once the workers have copied them) and shared-state
gauges once; the requests were spread over several workers; a worker killed with SIGKILL is
started again and its counts stay in the sums; SIGTERM to the parent stops every worker
(none left) and removes the run directory; SIGKILL to the parent stops the workers too (the
lifeline pipe); a worker that cannot start stops the parent with its exit code; ``workers``
> 1 with the local store is a configuration error.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy import cli
from proxy.bbb.checksum import signed_query
from proxy.bbb.rewrite import READY_PATH
from proxy.errors import ConfigError
from proxy.workers import listen
from tests.redis_server import RedisServer, free_port, redis_server

__all__ = ["redis_server"]  # the fixture, used by name below

COMMAND = [sys.executable, "-m", "proxy.cli"]
HOST = "127.0.0.1"
BACKEND_SECRET = "workers-backend-secret"
CUSTOMER, SECRET = "acme", "acme-workers-secret"
START_TIMEOUT = 60.0  # seconds for every worker to listen (a loaded 2-core machine)
STOP_TIMEOUT = 30.0  # seconds for the parent to stop after SIGTERM (its own deadline is 20)


def config_text(port: int, backends: list[str], state_dir: Path, store: str, workers: int) -> str:
    listed = "".join(
        f'[[backends]]\nid = "sim-{i}"\nurl = "{url}"\nsecret = "{BACKEND_SECRET}"\n'
        "capacity = 1000\n"
        for i, url in enumerate(backends, 1)
    )
    return (
        f'[proxy]\nbind = "{HOST}:{port}"\npublic_url = "http://{HOST}:{port}"\n'
        f'state_dir = "{state_dir}"\nworkers = {workers}\n'
        f"[store]\n{store}\n{listed}"
        f'[[customers]]\nid = "{CUSTOMER}"\nsecret = "{SECRET}"\nmax_connections = 1000\n'
        "default_max_participants = 2\ndefault_duration = 60\n"
    )


@dataclass
class Workers:
    """A running ``bbb-proxy serve`` with workers: its parent process and where it writes."""

    process: trio.Process
    port: int
    count: int
    tmp: Path  # its TMPDIR: the run directory is made here
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def children(self) -> set[int]:
        found: set[int] = set()  # trio starts processes from a thread: every task's children
        for path in glob.glob(f"/proc/{self.process.pid}/task/*/children"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                found.update(int(p) for p in Path(path).read_text().split())
        return found

    def listening(self) -> int:
        """How many times a worker has said it listens (starts again included)."""
        return self.log.read_text(errors="replace").count(f" of {self.count} listening on ")

    def run_dirs(self) -> list[str]:
        return glob.glob(str(self.tmp / "bbb-proxy-workers-*"))

    def creates_by_worker(self) -> dict[str, float]:
        """create/success counted in each worker's own counter file (by its pid)."""
        found = {}
        for path in glob.glob(f"{self.run_dirs()[0]}/prometheus/counter_*.db"):
            metrics = MultiProcessCollector.merge([path], accumulate=False)  # type: ignore[no-untyped-call]
            found[path] = sum(
                s.value
                for m in metrics
                for s in m.samples
                if s.name == "bbb_proxy_requests_total"
                and s.labels == {"call": "create", "result": "success"}
            )
        return found


async def wait_for(
    what: str, condition: Callable[[], bool], seconds: float = START_TIMEOUT
) -> None:
    """Until ``condition()`` holds (checked every 50 ms); fails the test after ``seconds``."""
    with trio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 - other processes change it
            await trio.sleep(0.05)
        return
    pytest.fail(f"not within {seconds} s: {what}")


@asynccontextmanager
async def open_simulator(tmp: Path) -> AsyncIterator[list[str]]:
    """Two simulated BBB servers in one process; their API URLs."""
    argv = [sys.executable, "-m", "proxy.simulator", "--port", "0", "--count", "2"]
    with (tmp / "simulator.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            [*argv, "--secret", BACKEND_SECRET], stdout=subprocess.PIPE, stderr=log
        )
    try:
        assert process.stdout is not None
        data = b""
        with trio.fail_after(START_TIMEOUT):
            while data.count(b"\n") < 2:
                chunk = await process.stdout.receive_some()
                assert chunk, "the simulator exited"
                data += chunk
        yield data.decode().split()[:2]
    finally:
        process.terminate()
        with trio.CancelScope(shield=True):
            await process.wait()


@asynccontextmanager
async def open_workers(
    tmp: Path, backends: list[str], store: str, count: int, *, ready: bool = True
) -> AsyncIterator[Workers]:
    """``bbb-proxy serve`` with ``count`` workers; with ``ready``, once every one listens."""
    port = free_port()
    config = tmp / "gateway.toml"
    config.write_text(config_text(port, backends, tmp / "state", store, count))
    (tmp / "run").mkdir()
    log = tmp / "gateway.log"
    env = {k: v for k, v in os.environ.items() if k != "BBB_PROXY_CONFIG"}
    with log.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            [*COMMAND, "--log-format", "json", "serve", "--config", str(config)],
            stdout=sink,
            stderr=sink,
            env=env | {"TMPDIR": str(tmp / "run")},
            start_new_session=True,
        )
    workers = Workers(process, port, count, tmp / "run", log)
    try:
        if ready:
            await wait_for(
                f"{count} workers listening ({log.read_text(errors='replace')[-3000:]})",
                lambda: process.returncode is not None or "workers listening on" in log.read_text(),
            )
            assert process.returncode is None, log.read_text()
        yield workers
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)  # a test that failed half-way
                await process.wait()


def sample(text: str, name: str, **labels: str) -> float:
    """The one sample ``name{labels}`` in an exposition (fails if absent or repeated)."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels == labels
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def fresh_connections() -> httpx.AsyncClient:
    """A client opening a new connection per request: any worker may accept each."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)


async def create_all(workers: Workers, ids: list[str]) -> None:
    """Creates of ``ids``, 8 at a time (so that idle workers accept some); all SUCCESS."""
    limiter = trio.CapacityLimiter(8)
    async with fresh_connections() as http, trio.open_nursery() as nursery:
        for meeting_id in ids:
            nursery.start_soon(_create, http, workers, meeting_id, limiter)


async def _create(
    http: httpx.AsyncClient, workers: Workers, meeting_id: str, limiter: trio.CapacityLimiter
) -> None:
    query = signed_query("create", [("meetingID", meeting_id), ("name", "Room 1")], SECRET)
    async with limiter:
        answer = await http.get(f"{workers.url}/{CUSTOMER}/bigbluebutton/api/create?{query}")
    assert b"<returncode>SUCCESS</returncode>" in answer.content, answer.text


async def scrapes(workers: Workers, times: int) -> list[str]:
    async with fresh_connections() as http:
        return [(await http.get(f"{workers.url}/metrics")).text for _ in range(times)]


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by init counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


# -- several workers on one Redis --------------------------------------------------------------


async def test_metrics_are_the_sum_over_workers_and_sigterm_stops_them_all(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = f'kind = "redis"\nurl = "{redis_server.url}"'
    async with (
        open_simulator(tmp_path) as backends,
        open_workers(tmp_path, backends, store, 3) as workers,
    ):
        first = workers.children()
        assert len(first) == 3
        await create_all(workers, [f"m-{i}" for i in range(30)])
        async with fresh_connections() as http:
            for _ in range(6):  # unsigned recording-ready notices: a tally (403)
                refused = await http.post(f"{workers.url}{READY_PATH}?x=1", content=b"")
                assert refused.status_code == 403
        for text in await scrapes(workers, 6):  # each may come from another worker
            assert sample(text, "bbb_proxy_requests_total", call="create", result="success") == 30
            assert sample(text, "bbb_proxy_request_seconds_count", call="create") == 30
            assert 0 < sample(text, "bbb_proxy_meetings") <= 30  # shared state: one value
        by_worker = workers.creates_by_worker()
        assert sum(by_worker.values()) == 30
        assert len([n for n in by_worker.values() if n > 0]) >= 2, by_worker  # spread

        async def tallied() -> bool:
            text = (await scrapes(workers, 1))[0]
            return (
                sample(text, "bbb_proxy_recording_ready_notices_total", answer="unsigned_url") == 6
            )

        with trio.fail_after(10):  # each worker copies its tallies every second
            while not await tallied():  # noqa: ASYNC110 - the other workers' copies
                await trio.sleep(0.1)

        # A worker killed is started again; what it counted stays in the sums.
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for("the killed worker started again", lambda: workers.listening() == 4)
        assert len(workers.children()) == 3 and victim not in workers.children()
        assert "exited (signal SIGKILL); starting it again" in workers.log.read_text()
        await create_all(workers, [f"n-{i}" for i in range(9)])
        for text in await scrapes(workers, 4):
            assert sample(text, "bbb_proxy_requests_total", call="create", result="success") == 39

        every = first | workers.children()
        workers.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT):
            assert await workers.process.wait() == 0
        assert [pid for pid in every if not gone(pid)] == []
        assert workers.run_dirs() == []  # the metrics directory went with the run directory


async def test_the_workers_stop_when_the_parent_is_killed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = f'kind = "redis"\nurl = "{redis_server.url}"'
    async with (
        open_simulator(tmp_path) as backends,
        open_workers(tmp_path, backends, store, 2) as workers,
    ):
        children = workers.children()
        assert len(children) == 2
        workers.process.kill()  # SIGKILL: the parent cannot tell them anything
        await workers.process.wait()
        await wait_for("the workers stopped", lambda: all(gone(pid) for pid in children))


async def test_a_worker_that_cannot_start_stops_the_gateway_with_its_exit_code(
    tmp_path: Path,
) -> None:
    nowhere = f'kind = "redis"\nurl = "redis://{HOST}:{free_port()}/0"'  # nothing listens
    backends = [f"http://{HOST}:9/bigbluebutton/api"]
    async with open_workers(tmp_path, backends, nowhere, 2, ready=False) as workers:
        with trio.fail_after(START_TIMEOUT):
            code = await workers.process.wait()
    text = workers.log.read_text()
    assert code == 3, text
    assert "did not start (exit status 3)" in text and "Traceback" not in text
    assert workers.run_dirs() == []


# -- configuration ------------------------------------------------------------------------------


def test_several_workers_need_the_redis_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backends = [f"http://{HOST}:9/bigbluebutton/api"]
    local = tmp_path / "local.toml"
    local.write_text(config_text(8080, backends, tmp_path / "s", 'kind = "local"', 2))
    assert cli.main(["check-config", str(local)]) == 2
    assert 'proxy.workers > 1 needs [store] kind = "redis"' in capsys.readouterr().err
    assert cli.main(["serve", "--config", str(local)]) == 2
    redis = tmp_path / "redis.toml"
    redis.write_text(config_text(8080, backends, tmp_path / "s", 'kind = "redis"', 4))
    assert cli.main(["check-config", str(redis)]) == 0
    assert "4 workers" in capsys.readouterr().out
    none = tmp_path / "none.toml"
    none.write_text(config_text(8080, backends, tmp_path / "s", 'kind = "redis"', 0))
    assert cli.main(["check-config", str(none)]) == 2
    assert "proxy.workers: must be an integer >= 1" in capsys.readouterr().err


def test_a_busy_address_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backends = [f"http://{HOST}:9/bigbluebutton/api"]
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(config_text(port, backends, tmp_path / "s", 'kind = "redis"', 2))
        assert cli.main(["serve", "--config", str(config)]) == 2
    assert f"proxy.bind {HOST}:{port}: cannot listen" in capsys.readouterr().err


def test_a_second_gateways_workers_do_not_share_the_port() -> None:
    first = listen(f"{HOST}:0", 2)  # SO_REUSEPORT: another set could join them
    try:
        port = first[0].getsockname()[1]
        assert {s.getsockname()[1] for s in first} == {port}
        with pytest.raises(ConfigError, match="cannot listen"):
            listen(f"{HOST}:{port}", 2)
    finally:
        for sock in first:
            sock.close()
