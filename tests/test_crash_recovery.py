"""SIGKILL in the middle of a burst of creates and ends, restart, nothing acknowledged lost.

The gateway runs as a real process (``python -m proxy.cli serve``); the
simulated BBB servers run in the test process and, like real servers, keep
their meetings while the gateway is down.  Each round kills the gateway at a
different moment, restarts it on the same ``state_dir`` and checks that:

Each round kills after a different number of acknowledged creates (the
requests then in flight are the moment's uncertainty).

- every meeting whose create was acknowledged (and not ended) is still routed
  to the backend that holds it (join redirects there) and still counted;
- no meeting whose end was acknowledged is counted;
- no connection is counted twice (the customer's total is the sum of its meetings).
"""

from __future__ import annotations

import random
import signal
import sys
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import trio
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.simulator import Simulator, serve_simulator
from tests.harness import BACKEND_SECRET, free_port, query_of

TOKEN = "crash-test-token"
SECRET = "crash-secret"


def write_config(path: Path, port: int, sim_urls: list[str], state_dir: Path) -> None:
    backends = "".join(
        f'[[backends]]\nid = "bbb-{i}"\nurl = "{url}"\n'
        f'secret = "{BACKEND_SECRET}"\ncapacity = 1000\n'
        for i, url in enumerate(sim_urls, 1)
    )
    path.write_text(
        f'[proxy]\nbind = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'state_dir = "{state_dir}"\nadmin_token = "{TOKEN}"\nallow_private_callbacks = true\n'
        f"{backends}"
        f'[[customers]]\nid = "acme"\nsecret = "{SECRET}"\nmax_connections = 100000\n'
        "default_max_participants = 3\ndefault_duration = 60\n"
    )


class Gateway:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.process: trio.Process | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/acme/bigbluebutton/api"

    def url(self, call: str, params: list[tuple[str, str]]) -> str:
        return f"{self.api}/{call}?{signed_query(call, params, SECRET)}"

    async def start(self, nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
        command = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config)]
        with self.log.open("ab") as log:
            run = partial(trio.run_process, command, check=False, stdout=log, stderr=log)
            self.process = await nursery.start(run)
        with trio.fail_after(20):
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{self.port}/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def admin(self, http: httpx.AsyncClient, what: str) -> list[dict[str, object]]:
        response = await http.get(
            f"http://127.0.0.1:{self.port}/admin/v1/{what}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        result: list[dict[str, object]] = orjson.loads(response.content)
        return result


class Burst:
    """Creates and ends, remembering what the gateway acknowledged."""

    def __init__(self, gw: Gateway, http: httpx.AsyncClient, seed: int) -> None:
        self.gw, self.http = gw, http
        self.random = random.Random(seed)
        self.live: dict[str, int] = {}  # acknowledged created, not ended: size
        self.ended: set[str] = set()  # acknowledged ended
        self.uncertain: set[str] = set()  # request in flight when the gateway died
        self.counter = 0
        self.created = 0  # acknowledged creates
        self.kill_at = 0
        self.reached = trio.Event()

    def kill_after(self, more: int) -> None:
        """Arrange for ``reached`` to be set after ``more`` further acknowledged creates."""
        self.kill_at = self.created + more
        self.reached = trio.Event()

    async def worker(self, name: str) -> None:
        while True:
            if self.live and self.random.random() < 0.3:
                await self.end(self.random.choice(sorted(self.live)))
            else:
                self.counter += 1
                await self.create(f"{name}-{self.counter}", self.random.randint(1, 5))

    async def create(self, meeting_id: str, size: int) -> None:
        url = self.gw.url(
            "create",
            [("meetingID", meeting_id), ("name", meeting_id), ("maxParticipants", str(size))],
        )
        self.uncertain.add(meeting_id)
        root = await self._get(url)
        if root is not None and root.findtext("returncode") == "SUCCESS":
            self.live[meeting_id] = size
            self.created += 1
            if self.created >= self.kill_at:
                self.reached.set()
            self.uncertain.discard(meeting_id)

    async def end(self, meeting_id: str) -> None:
        self.live.pop(meeting_id, None)
        self.uncertain.add(meeting_id)
        root = await self._get(self.gw.url("end", [("meetingID", meeting_id)]))
        if root is not None and root.findtext("returncode") == "SUCCESS":
            self.ended.add(meeting_id)
            self.uncertain.discard(meeting_id)

    async def _get(self, url: str) -> etree._Element | None:
        try:
            response = await self.http.get(url)
        except httpx.TransportError:
            await trio.sleep_forever()  # the gateway died under this request: outcome unknown
        return etree.fromstring(response.content)


@pytest.mark.slow
async def test_sigkill_during_burst_loses_nothing_acknowledged(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    sims = [Simulator(BACKEND_SECRET, expire_unjoined_minutes=None) for _ in range(2)]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, port, sim_urls, tmp_path / "state")
    gw = Gateway(config, port, tmp_path / "gateway.log")
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=10, limits=limits) as http:
        burst = Burst(gw, http, seed=7)
        for round_no, creates in enumerate((15, 60, 35)):
            await gw.start(nursery, http)
            burst.kill_after(creates)
            async with trio.open_nursery() as load:
                for w in range(8):
                    load.start_soon(burst.worker, f"r{round_no}w{w}")
                with trio.fail_after(60):
                    await burst.reached.wait()
                await gw.kill()
                await trio.sleep(0.2)  # let the workers see their connections die
                load.cancel_scope.cancel()
            await gw.start(nursery, http)
            await check(gw, http, burst, sims, sim_urls)
            await gw.kill()
    assert len(burst.live) > 20, "the burst should have made meetings"
    assert burst.ended, "the burst should have ended meetings"


async def check(
    gw: Gateway,
    http: httpx.AsyncClient,
    burst: Burst,
    sims: list[Simulator],
    sim_urls: list[str],
) -> None:
    held = {str(m["meeting_id"]): m for m in await gw.admin(http, "meetings")}
    [acme] = await gw.admin(http, "customers")
    # No connection counted twice: the subscription's total is the sum of its meetings.
    assert acme["reserved_connections"] == sum(int(str(m["connections"])) for m in held.values())
    missing = set(burst.live) - set(held)
    assert not missing, f"acknowledged meetings lost: {sorted(missing)[:5]}"
    for meeting_id, size in burst.live.items():
        assert held[meeting_id]["connections"] == size
    resurrected = (burst.ended - burst.uncertain) & set(held)
    assert not resurrected, f"acknowledged ends undone: {sorted(resurrected)[:5]}"
    for meeting_id in random.Random(1).sample(sorted(burst.live), min(10, len(burst.live))):
        response = await http.get(
            gw.url("join", [("meetingID", meeting_id), ("fullName", "U"), ("role", "VIEWER")])
        )
        assert response.status_code == 302
        location = response.headers["location"]
        backend_meeting = query_of(location)["meetingID"]
        base = location.split("/join?")[0]
        sim = sims[sim_urls.index(base)]
        assert backend_meeting in sim.meetings, f"{meeting_id} routed to the wrong backend"
        assert urlsplit(location).path.endswith("/join")


async def test_sigterm_finishes_requests_snapshots_and_exits_zero(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    sim = Simulator(BACKEND_SECRET, expire_unjoined_minutes=None)
    sim_url = await nursery.start(serve_simulator, sim)
    sim.behaviour.latency = 0.5  # a create still in flight when SIGTERM arrives
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, port, [sim_url], tmp_path / "state")
    gw = Gateway(config, port, tmp_path / "gateway.log")
    async with httpx.AsyncClient(timeout=10) as http:
        await gw.start(nursery, http)
        answers: list[bytes] = []

        async def create() -> None:
            url = gw.url("create", [("meetingID", "in-flight"), ("name", "In flight")])
            answers.append((await http.get(url)).content)

        async with trio.open_nursery() as client:
            client.start_soon(create)
            await trio.sleep(0.2)
            assert gw.process is not None
            gw.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                code = await gw.process.wait()
        assert code == 0
        assert b"<returncode>SUCCESS</returncode>" in answers[0]
        snapshots = list((tmp_path / "state").glob("snapshot*"))
        assert snapshots, "a final snapshot should be written"
        sim.behaviour.latency = 0
        await gw.start(nursery, http)
        held = await gw.admin(http, "meetings")
        assert [m["meeting_id"] for m in held] == ["in-flight"]
        await gw.kill()
