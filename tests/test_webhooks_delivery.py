"""Webhook delivery over real sockets: bbb-webhooks' form and checksum, retries in order,
a ``kill -9`` between accepting and delivering, dropping a failing hook (autojump clock),
slow receivers beside a fast one, SSRF refusal at delivery time."""

from __future__ import annotations

import hashlib
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import pytest
import trio
import trio.testing

from proxy.bbb.checksum import signed_query
from proxy.config import from_mapping
from proxy.errors import StorageUnavailable
from proxy.gateway import Gateway, open_gateway
from proxy.metrics import Metrics
from proxy.simulator import Simulator, serve_simulator
from proxy.store import Json, MemoryLog, open_local_log
from proxy.webhooks.delivery import DeliverySettings, Webhooks
from proxy.webhooks.privacy import scrubbed
from tests.harness import (
    BACKEND_SECRET,
    CUSTOMERS,
    SECRETS,
    StackFactory,
    free_port,
    serve_endpoint,
    wait_until,
)

FIXTURE = Path(__file__).parent / "fixtures" / "bbb" / "bbb-webhooks" / "mapped-events.json"
FORM = "application/x-www-form-urlencoded"
SECRET = SECRETS["acme"]


def fixture_events(meeting_id: str) -> list[dict[str, Json]]:
    """bbb-webhooks' example events, as intake hands them over for ``meeting_id``."""
    events = []
    for line in FIXTURE.read_bytes().splitlines():
        event = orjson.loads(line)
        event["data"]["attributes"]["meeting"]["external-meeting-id"] = meeting_id
        events.append(event)
    return events


def numbered(n: int, meeting_id: str = "room") -> list[dict[str, Json]]:
    meeting = {"internal-meeting-id": "abc-1", "external-meeting-id": meeting_id}
    return [
        {
            "data": {
                "type": "event",
                "id": "poll-started",
                "attributes": {"meeting": meeting, "n": i},
            }
        }
        for i in range(n)
    ]


@dataclass
class Post:
    path: str
    query: str
    content_type: str
    body: str
    status: int

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body, keep_blank_values=True, strict_parsing=True))

    @property
    def event(self) -> Json:
        [event] = orjson.loads(self.form["event"])
        return event  # type: ignore[no-any-return]


@dataclass
class HookReceiver:
    """A customer's webhook receiver: answers each POST with the next scripted status
    (then 200), once ``gate`` is set (if given); records every POST."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    gate: trio.Event | None = None
    arrived: list[str] = field(default_factory=list)  # paths, when each POST came in
    posts: list[Post] = field(default_factory=list)  # when each was answered

    def delivered(self, path: str | None = None) -> list[Post]:
        return [p for p in self.posts if p.status == 200 and path in (None, p.path)]

    async def respond(self, scope: dict[str, Any], body: bytes) -> int:
        self.arrived.append(scope["path"])
        if self.gate is not None:
            await self.gate.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        headers = dict(scope["headers"])
        self.posts.append(
            Post(
                scope["path"],
                scope["query_string"].decode(),
                headers.get(b"content-type", b"").decode(),
                body.decode(),
                status,
            )
        )
        return status


def attribute(post: Post, *path: str) -> object:
    """``data.attributes.<path>`` of the event ``post`` carried."""
    value: Any = post.event
    for key in ("data", "attributes", *path):
        value = value[key]
    return value


async def start_receiver(nursery: trio.Nursery, **options: Any) -> HookReceiver:
    receiver = HookReceiver(**options)
    receiver.url = await serve_endpoint(nursery, receiver.respond)
    return receiver


async def settled(gw: Gateway, answered: int) -> None:
    """Wait until ``answered`` POSTs were answered 2xx or 401 and counted (the receiver
    records a POST before its answer leaves)."""

    def done() -> bool:
        stats = gw.webhooks.statistics()
        return stats.delivered + stats.rejected >= answered

    await wait_until(done)


def expected_checksum(callback_url: str, body: str, secret: str, algorithm: str) -> str:
    return hashlib.new(algorithm, (callback_url + body + secret).encode()).hexdigest()


# -- the form and its checksum ---------------------------------------------------------------------


async def test_form_and_checksum_verify_with_the_customers_secret(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    gw = stack.gateway
    receiver = await start_receiver(nursery)
    hooks = {
        ("acme", "sha1"): f"{receiver.url}/acme-1",
        ("acme", "sha256"): f"{receiver.url}/acme-256?course=7",
        ("globex", "sha1"): f"{receiver.url}/globex",
    }
    for (customer, algorithm), url in hooks.items():
        await gw.hooks.create(customer, "room", url, None, algorithm)
    events = fixture_events("room")
    await gw.webhooks.accept("acme", "room", events)
    await gw.webhooks.accept("globex", "room", events[:2])
    await gw.webhooks.accept("acme", "another-room", events)  # no hook: nothing sent
    total = 2 * len(events) + 2  # two acme hooks, and globex's
    await settled(gw, total)
    for (customer, algorithm), url in hooks.items():
        path = url.removeprefix(receiver.url).split("?")[0]
        posts = receiver.delivered(path)
        sent = events if customer == "acme" else events[:2]
        assert [p.event for p in posts] == [scrubbed(e) for e in sent]  # every one, in order
        for post in posts:
            assert post.content_type == FORM
            assert list(post.form) == ["domain", "event", "timestamp"]
            assert post.form["domain"] == (
                "bbb.globex.test" if customer == "globex" else "127.0.0.1"
            )
            checksum = expected_checksum(url, post.body, SECRETS[customer], algorithm)
            query = f"course=7&checksum={checksum}" if "?" in url else f"checksum={checksum}"
            assert post.query == query
        assert len({p.form["timestamp"] for p in posts}) == 1  # accepted at once
    stats = gw.webhooks.statistics()
    assert (stats.accepted, stats.queued) == (2 * len(events) + 2, total)
    assert stats.queue_events == 0


# -- retries, order, 401 ---------------------------------------------------------------------------


async def test_a_receiver_that_fails_then_recovers_gets_every_event_once_in_order(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    gw = stack.gateway
    receiver = await start_receiver(nursery, statuses=[500, 503, 404])
    await gw.hooks.create("acme", "room", f"{receiver.url}/hook", None, "sha1")
    events = numbered(4)
    await gw.webhooks.accept("acme", "room", events[:2])
    await gw.webhooks.accept("acme", "room", events[2:])
    await settled(gw, 4)
    assert [p.event for p in receiver.delivered()] == [scrubbed(e) for e in events]
    first = [p for p in receiver.posts if p.event == scrubbed(events[0])]
    assert [p.status for p in first] == [500, 503, 404, 200]  # the head retried, none overtook it
    assert len({p.body for p in first}) == 1  # timestamp (and body, checksum) fixed
    assert len({p.query for p in first}) == 1
    stats = gw.webhooks.statistics()
    assert (stats.delivered, stats.retried, stats.queue_events) == (4, 3, 0)


async def test_401_counts_as_delivered_as_bbb_webhooks_does(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    receiver = await start_receiver(nursery, statuses=[401])
    await stack.gateway.hooks.create("acme", "room", f"{receiver.url}/hook", None, "sha1")
    await stack.gateway.webhooks.accept("acme", "room", numbered(2))
    await settled(stack.gateway, 2)
    assert [p.status for p in receiver.posts] == [401, 200]
    assert [p.event for p in receiver.posts] == [scrubbed(e) for e in numbered(2)]
    stats = stack.gateway.webhooks.statistics()
    assert (stats.rejected, stats.delivered, stats.retried) == (1, 1, 0)


async def test_a_full_queue_drops_its_oldest_events_and_counts_them(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack(webhooks={"queue_per_hook": 3})
    receiver = await start_receiver(nursery)
    await stack.gateway.hooks.create("acme", "room", f"{receiver.url}/hook", None, "sha1")
    events = numbered(6)
    await stack.gateway.webhooks.accept("acme", "room", events)
    await settled(stack.gateway, 3)
    assert [p.event for p in receiver.posts] == [scrubbed(e) for e in events[3:]]
    assert stack.gateway.webhooks.statistics().dropped_events["overflow"] == 3


async def test_events_of_a_destroyed_hook_are_not_sent(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    gate = trio.Event()
    receiver = await start_receiver(nursery, gate=gate)
    hook, _ = await stack.gateway.hooks.create("acme", "room", f"{receiver.url}/h", None, "sha1")
    await stack.gateway.webhooks.accept("acme", "room", numbered(4))
    await wait_until(lambda: len(receiver.arrived) == 1)  # the first is in flight
    assert await stack.gateway.hooks.destroy("acme", hook.id)
    gate.set()
    await wait_until(lambda: stack.gateway.webhooks.statistics().queue_events == 0)
    assert len(receiver.posts) == 1
    assert stack.gateway.webhooks.statistics().dropped_events["hook-gone"] == 3


# -- durability ------------------------------------------------------------------------------------


async def test_accept_raises_storage_unavailable_when_the_queue_cannot_write() -> None:
    config = from_mapping(
        {
            "backends": [{"id": "b", "url": "http://127.0.0.1:1", "secret": "s", "capacity": 1}],
            "customers": CUSTOMERS,
        }
    )
    async with open_gateway(config) as gw:
        store = MemoryLog()
        gw.webhooks = Webhooks(gw, store)
        await gw.hooks.create("acme", "room", "http://127.0.0.1:9/hook", None, "sha1")
        store.failed = True
        with pytest.raises(StorageUnavailable):
            await gw.webhooks.accept("acme", "room", numbered(1))
        assert gw.webhooks.statistics().queue_events == 0 and not store.pending
        store.failed = False
        await gw.webhooks.accept("acme", "room", numbered(2))
        assert [r["type"] for r in store.durable] == ["event", "event"]  # flushed on return


async def test_an_event_too_large_for_the_log_is_dropped_not_half_queued(tmp_path: Path) -> None:
    store, _ = open_local_log(tmp_path, "webhook-queue", timeout=2)
    big = numbered(1)[0] | {"padding": "x" * (2 << 20)}  # over the log's 1 MiB record bound
    async with open_gateway(small_config()) as gw:
        gw.webhooks = Webhooks(gw, store)
        await gw.hooks.create("acme", "room", "http://127.0.0.1:9/hook", None, "sha1")
        await gw.webhooks.accept("acme", "room", [big, *numbered(2)])
        stats = gw.webhooks.statistics()
        assert (stats.queued, stats.queue_events, stats.dropped_events["invalid"]) == (2, 2, 1)
    _, replayed = open_local_log(tmp_path, "webhook-queue", timeout=2)
    assert [r["event"] for r in replayed] == [scrubbed(e) for e in numbered(2)]


def crash_config(path: Path, port: int, sim_url: str, state_dir: Path) -> None:
    path.write_text(
        f'[proxy]\nbind = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'state_dir = "{state_dir}"\nallow_private_callbacks = true\n'
        f'[[backends]]\nid = "bbb-1"\nurl = "{sim_url}"\nsecret = "{BACKEND_SECRET}"\n'
        "capacity = 100\n"
        f'[[customers]]\nid = "acme"\nsecret = "{SECRET}"\nmax_connections = 10\n'
        "default_max_participants = 3\ndefault_duration = 60\n"
    )


async def run_gateway(nursery: trio.Nursery, argv: list[str], log: Path) -> trio.Process:
    with log.open("ab") as out:
        run = partial(trio.run_process, argv, check=False, stdout=out, stderr=out)
        process: trio.Process = await nursery.start(run)
    return process


async def wait_healthy(http: httpx.AsyncClient, port: int) -> None:
    with trio.fail_after(20):
        while True:
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def signed_get(
    http: httpx.AsyncClient, base: str, call: str, params: list[tuple[str, str]], secret: str
) -> str:
    response = await http.get(f"{base}/{call}?{signed_query(call, params, secret)}")
    assert "<returncode>SUCCESS</returncode>" in response.text, response.text
    return response.text


@pytest.mark.slow
async def test_kill_9_between_intake_and_delivery_loses_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Events a backend posted to the gateway and saw answered 200, while the customer's
    receiver was down, reach it after a ``kill -9`` and a restart: each once, in order."""
    sim = Simulator(BACKEND_SECRET, expire_unjoined_minutes=None)
    sim_url = await nursery.start(serve_simulator, sim)
    receiver = await start_receiver(nursery, statuses=[500] * 1000)  # down until restarted
    port = free_port()
    config, log = tmp_path / "gw.toml", tmp_path / "gateway.log"
    crash_config(config, port, sim_url, tmp_path / "state")
    serve = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
    api = f"http://127.0.0.1:{port}/acme/bigbluebutton/api"
    hook_url = f"{receiver.url}/hook"
    async with httpx.AsyncClient(timeout=10) as http:
        process = await run_gateway(nursery, serve, log)
        await wait_healthy(http, port)
        await signed_get(http, api, "create", [("meetingID", "room"), ("name", "Room")], SECRET)
        # chat only: the backend's meeting-created may reach the gateway after this create
        hook = [
            ("callbackURL", hook_url),
            ("meetingID", "room"),
            ("eventID", "chat-group-message-sent"),
        ]
        await signed_get(http, api, "hooks/create", hook, SECRET)
        await wait_until(lambda: bool(sim.webhooks.hooks))  # the gateway's intake hook
        [backend_meeting] = sim.meetings
        for n in range(12):
            message = [("meetingID", backend_meeting), ("message", f"message {n}")]
            await signed_get(http, sim_url, "sendChatMessage", message, BACKEND_SECRET)
        chats = [e for e in sim.webhooks.emitted if e["data"]["id"] == "chat-group-message-sent"]
        assert len(chats) == 12
        # The backend's POSTs were answered 200 (the events are durable), none delivered yet.
        with trio.fail_after(20):  # one fsynced POST after the other, on a busy machine too
            while sum(d.event in chats for d in sim.webhooks.delivered) < 12:  # noqa: ASYNC110
                await trio.sleep(0.02)
        await wait_until(lambda: bool(receiver.posts))
        process.send_signal(signal.SIGKILL)
        await process.wait()
        assert not receiver.delivered(), "nothing was delivered before the kill"
        receiver.statuses.clear()  # the receiver is back
        process = await run_gateway(nursery, serve, log)
        await wait_healthy(http, port)
        with trio.fail_after(20):
            while len(receiver.delivered()) < 12:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        await process.wait()
    delivered = receiver.delivered()
    texts = [attribute(p, "chat-message", "message") for p in delivered]
    assert texts == [f"message {n}" for n in range(12)], log.read_text()[-2000:]
    for post in delivered:
        checksum = expected_checksum(hook_url, post.body, SECRET, "sha1")
        assert post.query == f"checksum={checksum}"
        assert attribute(post, "meeting", "external-meeting-id") == "room"


# -- dropping a hook that keeps failing (virtual time) ---------------------------------------------


@contextmanager
def scripted_receiver(
    gw: Gateway, answer: Any, settings: DeliverySettings
) -> Iterator[list[float]]:
    """Delivery of ``gw`` through an in-process transport: ``answer(now)`` is the status
    of a POST at virtual time ``now``; yields the times of every attempt."""
    attempts: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(trio.current_time())
        return httpx.Response(answer(trio.current_time()))

    gw.outbound = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    gw.webhooks = Webhooks(gw, MemoryLog(), settings)
    yield attempts


def small_config() -> Any:
    return from_mapping(
        {
            "backends": [{"id": "b", "url": "http://127.0.0.1:1", "secret": "s", "capacity": 1}],
            "customers": CUSTOMERS,
        }
    )


async def test_a_hook_failing_for_drop_after_is_dropped_and_counted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = DeliverySettings(drop_after=120, allow_private=True)
    async with open_gateway(small_config()) as gw:
        with scripted_receiver(gw, lambda now: 500, settings) as attempts:
            hook, _ = await gw.hooks.create("acme", "room", "http://127.0.0.1:9/h", None, "sha1")
            gw.spawn("webhooks", gw.webhooks.deliver_forever)
            await gw.webhooks.accept("acme", "room", numbered(3))
            while gw.hooks.get(hook.id) is not None:  # noqa: ASYNC110 - virtual time
                await trio.sleep(0.5)
            await gw.outbound.aclose()
    offsets = [round(t - attempts[0], 6) for t in attempts]
    # bbb-webhooks' retry intervals, then the last attempt exactly drop_after after the first
    assert offsets == [0, 0.1, 0.6, 1.6, 3.6, 7.6, 15.6, 25.6, 55.6, 115.6, 120]
    stats = gw.webhooks.statistics()
    assert (stats.dropped_hooks, stats.dropped_events["hook-dropped"]) == (1, 3)
    assert (stats.delivered, stats.retried, stats.queue_events) == (0, 10, 0)
    assert "dropped" in caplog.text and hook.id in caplog.text


async def test_a_success_restarts_the_drop_after_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = DeliverySettings(drop_after=120, allow_private=True)
    succeeded: list[float] = []

    def answer(now: float) -> int:
        if now - start >= 100 and not succeeded:
            succeeded.append(now)
            return 200
        return 500

    async with open_gateway(small_config()) as gw:
        with scripted_receiver(gw, answer, settings) as attempts:
            hook, _ = await gw.hooks.create("acme", "room", "http://127.0.0.1:9/h", None, "sha1")
            gw.spawn("webhooks", gw.webhooks.deliver_forever)
            start = trio.current_time()
            await gw.webhooks.accept("acme", "room", numbered(2))
            while gw.hooks.get(hook.id) is not None:  # noqa: ASYNC110 - virtual time
                await trio.sleep(0.5)
            await gw.outbound.aclose()
    [success] = succeeded
    assert success - start == pytest.approx(115.6)
    assert attempts[-1] - success == pytest.approx(120)  # the second event failed 120 s
    assert gw.webhooks.statistics().delivered == 1


# -- isolation -------------------------------------------------------------------------------------


async def test_slow_receivers_do_not_delay_a_fast_one_other_customers_or_the_api(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack(webhooks={"max_in_flight": 4, "delivery_timeout": 60})
    gw = stack.gateway
    gate = trio.Event()
    slow = await start_receiver(nursery, gate=gate)  # answers nothing until the gate opens
    fast = await start_receiver(nursery)
    for i in range(3):
        await gw.hooks.create("acme", "room", f"{slow.url}/slow-{i}", None, "sha1")
    await gw.hooks.create("acme", "other-room", f"{fast.url}/acme", None, "sha1")
    await gw.hooks.create("globex", "room", f"{fast.url}/globex", None, "sha1")
    await gw.webhooks.accept("acme", "room", numbered(5))
    await wait_until(lambda: len(slow.arrived) == 3)  # three POSTs stuck in flight
    started = trio.current_time()
    with trio.fail_after(2):
        await gw.webhooks.accept("acme", "other-room", numbered(5, "other-room"))
        await gw.webhooks.accept("globex", "room", numbered(5))
        root = await stack.call("getMeetings", [])
        assert root.findtext("returncode") == "SUCCESS"
        while len(fast.delivered()) < 10:  # noqa: ASYNC110 - another server's state
            await trio.sleep(0.01)
    assert trio.current_time() - started < 2
    assert [p.event for p in fast.delivered("/globex")] == [scrubbed(e) for e in numbered(5)]
    # The fast receiver records a POST before the gateway has read its answer: wait for that.
    await wait_until(lambda: gw.webhooks.statistics().in_flight == 3)
    assert len(slow.arrived) == 3
    gate.set()
    await wait_until(lambda: len(slow.delivered()) == 15)
    for i in range(3):
        assert [p.event for p in slow.delivered(f"/slow-{i}")] == [scrubbed(e) for e in numbered(5)]


# -- SSRF at delivery time -------------------------------------------------------------------------


class Resolver(trio.abc.HostnameResolver):
    """Names resolve to what the test says (here: a public name now pointing at loopback)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        number = int(port.decode() if isinstance(port, bytes) else port or 0)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.names[name], number))]

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_name_that_now_resolves_to_loopback_is_refused_at_delivery(
    make_stack: StackFactory, nursery: trio.Nursery, allow_private: bool
) -> None:
    receiver = await start_receiver(nursery)
    port = int(receiver.url.rsplit(":", 1)[1])
    trio.socket.set_custom_hostname_resolver(Resolver({"hooks.example.org": "127.0.0.1"}))
    try:
        stack = await make_stack(proxy={"allow_private_callbacks": allow_private})
        gw = stack.gateway
        # Registered while the name was public (hooks/create checks it then); now it is not.
        url = f"http://hooks.example.org:{port}/hook"
        await gw.hooks.create("acme", "room", url, None, "sha1")
        await gw.webhooks.accept("acme", "room", numbered(1))
        if allow_private:  # the control: with the allowlist on, it is delivered
            await wait_until(lambda: len(receiver.delivered()) == 1)
            assert receiver.delivered()[0].query.startswith("checksum=")
        else:
            await wait_until(lambda: gw.webhooks.statistics().refused >= 3)  # and retried
            assert receiver.arrived == []
            assert gw.webhooks.statistics().queue_events == 1
    finally:
        trio.socket.set_custom_hostname_resolver(None)


# -- metrics ---------------------------------------------------------------------------------------


async def test_metrics_show_delivery(make_stack: StackFactory, nursery: trio.Nursery) -> None:
    stack = await make_stack()
    receiver = await start_receiver(nursery, statuses=[500])
    await stack.gateway.hooks.create("acme", "room", f"{receiver.url}/h", None, "sha1")
    await stack.gateway.webhooks.accept("acme", "room", numbered(2))
    await settled(stack.gateway, 2)
    text = Metrics(stack.gateway).exposition().decode()
    assert 'bbb_proxy_webhook_events_total{outcome="delivered"} 2.0' in text
    assert 'bbb_proxy_webhook_events_total{outcome="retried"} 1.0' in text
    assert 'bbb_proxy_webhook_events_total{outcome="accepted"} 2.0' in text
    assert "bbb_proxy_webhook_queue_events 0.0" in text
    assert 'bbb_proxy_webhook_dropped_events_total{reason="overflow"} 0.0' in text
    assert 'bbb_proxy_webhook_dropped_hooks_total{reason="failing"} 0.0' in text
