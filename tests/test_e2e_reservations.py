"""End-to-end: reservations (SPEC §4), concurrency, failing backends, a real client library."""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

import bbbctl
import pytest
import trio
from lxml import etree

from proxy.backends.http import Pool
from proxy.bbb.checksum import compute
from proxy.ledger.model import MINUTE, Reservation, Reserve
from proxy.ledger.service import Ledger
from proxy.simulator import Behaviour
from tests.harness import BACKEND_SECRET, Stack, StackFactory, query_of, text, wait_until

HOUR = 60 * MINUTE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_spec_example_word_for_word(make_stack: StackFactory) -> None:
    """Subscription 20. A: 15 for 2 h. B asks 10 during A's two hours: refused, A untouched.
    B asks 10 after A's two hours: A is ended, B is created. B asks 5 at any time: created,
    A untouched."""
    clock = FakeClock()
    stack = await make_stack(ledger=Ledger(clock=clock))
    a = await stack.create("meeting-A", maxParticipants="15", duration="120")
    assert text(a, "returncode") == "SUCCESS", etree.tostring(a)
    sim_a, backend_a = stack.backend_meeting("acme", "meeting-A")

    clock.now += 2 * HOUR - 1
    refused = await stack.create("meeting-B", maxParticipants="10", duration="60")
    assert text(refused, "messageKey") == "subscriptionExhausted"
    assert stack.gateway.ledger.get(("acme", "meeting-A")) is not None
    assert not sim_a.meetings[backend_a].ended

    small = await stack.create("meeting-B5", maxParticipants="5", duration="60")
    assert text(small, "returncode") == "SUCCESS"
    assert stack.gateway.ledger.get(("acme", "meeting-A")) is not None
    await stack.call("end", [("meetingID", "meeting-B5")])

    clock.now += 1
    created = await stack.create("meeting-B", maxParticipants="10", duration="60")
    assert text(created, "returncode") == "SUCCESS"
    assert stack.gateway.ledger.get(("acme", "meeting-A")) is None
    await wait_until(lambda: backend_a not in sim_a.meetings or sim_a.meetings[backend_a].ended)
    info = await stack.call("getMeetingInfo", [("meetingID", "meeting-A")])
    assert text(info, "messageKey") == "notFound"


async def test_overtime_meeting_keeps_running(make_stack: StackFactory) -> None:
    clock = FakeClock()
    stack = await make_stack(ledger=Ledger(clock=clock))
    await stack.create("long", maxParticipants="5", duration="10")
    clock.now += 5 * HOUR
    info = await stack.call("getMeetingInfo", [("meetingID", "long")])
    assert text(info, "returncode") == "SUCCESS"
    assert text(info, "duration") == "10"


async def test_no_server_capacity(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2, capacity=8)
    root = await stack.create("big", maxParticipants="9")
    assert text(root, "messageKey") == "noServerCapacity"
    assert len(stack.gateway.ledger.state) == 0


async def test_concurrent_creates_never_overbook(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=3, capacity=7)
    results: list[str] = []

    async def one(i: int) -> None:
        root = await stack.create(f"m{i}", maxParticipants="2")
        results.append(text(root, "returncode") + ":" + (root.findtext("messageKey") or ""))

    async with trio.open_nursery() as burst:
        for i in range(40):
            burst.start_soon(one, i)
    counts = Counter(results)
    # acme may hold 20 connections = 10 meetings of 2; each backend fits 3 meetings of 2.
    assert counts["SUCCESS:"] == 9
    assert counts["FAILED:noServerCapacity"] + counts["FAILED:subscriptionExhausted"] == 31
    stats = stack.gateway.ledger.statistics()
    assert all(used <= 7 for used in stats.connections_by_backend.values())
    assert stats.connections_by_customer["acme"] == 18
    live = sum(len(sim.meetings) for sim in stack.sims)
    assert live == 9


async def test_concurrent_creates_of_one_meeting_make_one_backend_meeting(stack: Stack) -> None:
    for sim in stack.sims:
        sim.behaviour.latency = 0.05
    answers: list[tuple[str, str]] = []

    async def one() -> None:
        root = await stack.create("same-room", maxParticipants="4")
        answers.append((text(root, "returncode"), text(root, "internalMeetingID")))

    async with trio.open_nursery() as burst:
        for _ in range(25):
            burst.start_soon(one)
    assert {code for code, _ in answers} == {"SUCCESS"}
    assert len({internal for _, internal in answers}) == 1
    creates = [r for sim in stack.sims for r in sim.requests if r[0] == "create"]
    assert len(creates) == 25
    assert sum(len(sim.meetings) for sim in stack.sims) == 1
    assert stack.gateway.ledger.statistics().connections_by_customer == {"acme": 4}


@pytest.mark.parametrize(
    ("mode", "key"),
    [("hang", "serverUnavailable"), ("garbage", "internalError"), ("http500", "internalError")],
)
async def test_failing_backend_gives_bbb_error_quickly(
    make_stack: StackFactory, mode: str, key: str
) -> None:
    stack = await make_stack(proxy={"timeouts": {"read": 0.5, "get_meetings": 1.0}})
    await stack.create("room-1")
    sim, _ = stack.backend_meeting("acme", "room-1")
    sim.behaviour.mode = mode
    with trio.fail_after(3):
        root = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(root, "returncode") == "FAILED"
    assert root.findtext("messageKey") == key  # no answer: unavailable; a wrong one: an error
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None  # a failure ends nothing


async def test_get_meetings_leaves_out_a_dead_backend(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"timeouts": {"read": 5, "get_meetings": 0.5}})
    for i in range(6):
        await stack.create(f"room-{i}", maxParticipants="1")
    dead = stack.sims[0]
    dead.behaviour.mode = "hang"
    expected = sorted(r.meeting_id for r in stack.gateway.ledger.state if r.backend_id == "bbb-2")
    assert expected, "both backends should hold meetings"
    with trio.fail_after(2):
        root = await stack.call("getMeetings", [])
    got = sorted(text(m, "meetingID") for m in root.findall("meetings/meeting"))
    assert got == expected


async def test_refusing_backend_is_skipped_for_another(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.sims[0].behaviour.mode = "refuse_create"
    for i in range(6):
        root = await stack.create(f"room-{i}", maxParticipants="1")
        assert text(root, "returncode") == "SUCCESS"
    assert {r.backend_id for r in stack.gateway.ledger.state} == {"bbb-2"}


async def test_all_backends_refusing_is_server_unavailable(make_stack: StackFactory) -> None:
    stack = await make_stack()
    for sim in stack.sims:
        sim.behaviour.mode = "refuse_create"
    root = await stack.create("room-1")
    assert text(root, "messageKey") == "serverUnavailable"
    assert len(stack.gateway.ledger.state) == 0


async def test_unreachable_backend_is_skipped_for_another(make_stack: StackFactory) -> None:
    stack = await make_stack()
    # The gateway's start-up calls (its webhook registration) are done before the swap.
    await wait_until(lambda: all(sim.webhooks.hooks for sim in stack.sims))
    # Point bbb-1 at a closed port: connect fails before anything is sent.
    closed = Pool("http://127.0.0.1:9/bigbluebutton/api", stack.config.proxy.timeouts, 4)
    client = stack.gateway.client("bbb-1")
    # The old pool is closed only at the end: a poll may be in flight on it right now.
    old, client._transport = client._transport, closed
    try:
        for i in range(6):
            root = await stack.create(f"room-{i}", maxParticipants="1")
            assert text(root, "returncode") == "SUCCESS"
        assert {r.backend_id for r in stack.gateway.ledger.state} == {"bbb-2"}
    finally:
        await old.aclose()


async def test_behaviour_can_be_flipped_and_reset_at_run_time(stack: Stack) -> None:
    """Tests flip a live simulator's behaviour and set it back; the server follows at once."""
    await stack.create("room-1")
    sim, _ = stack.backend_meeting("acme", "room-1")
    assert sim.behaviour == Behaviour(latency=0.0, mode="ok")
    sim.behaviour.mode = "http500"
    broken = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(broken, "returncode") == "FAILED"
    sim.behaviour = Behaviour()
    healed = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(healed, "returncode") == "SUCCESS"
    with pytest.raises(ValueError, match="unknown simulator mode"):
        Behaviour(mode="sleepy")


async def test_bbbctl_library_drives_the_gateway(stack: Stack) -> None:
    client = bbbctl.BBBApiClient(stack.api(), stack.secrets["acme"])

    def prepare() -> tuple[str, list[str], str, str]:
        created = client.createMeeting("lib-room", "Library room", maxParticipants=3)
        listed = [m.findtext("meetingID") for m in client.getMeetings()]
        info = client.getMeetingInfo("lib-room")
        join_link = client.getJoinLink("lib-room", "Grace", role="VIEWER")
        return created.findtext("meetingID"), listed, info.findtext("maxUsers"), join_link

    meeting_id, listed, max_users, join_link = await trio.to_thread.run_sync(prepare)
    assert meeting_id == "lib-room"
    assert listed == ["lib-room"]
    assert max_users == "3"
    # bbbctl signs join URLs itself: the gateway must accept its URL and send the browser
    # to the meeting's backend, re-signed with that backend's secret.
    assert join_link.startswith(stack.api() + "/join?")
    response = await stack.http.get(join_link)
    assert response.status_code == 302
    location = response.headers["location"]
    sim, backend_meeting = stack.backend_meeting("acme", "lib-room")
    assert location.startswith(stack.sim_urls[stack.sims.index(sim)] + "/join?")
    q = query_of(location)
    assert (q["meetingID"], q["fullName"], q["role"]) == (backend_meeting, "Grace", "VIEWER")
    signed = urlsplit(location).query.rsplit("&checksum=", 1)[0]
    assert q["checksum"] == compute("join", signed, BACKEND_SECRET, "sha256")
    landed = await stack.http.get(location, follow_redirects=True)
    assert landed.status_code == 200
    assert len(sim.meetings[backend_meeting].attendees) == 1

    await trio.to_thread.run_sync(client.end, "lib-room")
    assert stack.gateway.ledger.get(("acme", "lib-room")) is None
    with pytest.raises(bbbctl.ApiError):
        await trio.to_thread.run_sync(client.getMeetingInfo, "lib-room")


async def test_create_of_a_meeting_left_pending_by_a_crash(stack: Stack) -> None:
    """A Reserve replayed without its Confirm: the next create asks the pinned backend."""
    ghost = Reservation(
        customer="acme",
        meeting_id="ghost",
        backend_id="bbb-2",
        backend_meeting_id="acme~ghost",
        connections=4,
        duration=60,
        asked_duration=60,
        created_at=stack.gateway.ledger.clock(),
    )
    await stack.gateway.ledger.record(Reserve(ghost))
    with trio.fail_after(5):
        root = await stack.create("ghost", maxParticipants="4")
    assert text(root, "returncode") == "SUCCESS"
    assert "acme~ghost" in stack.sims[1].meetings
    held = stack.gateway.ledger.get(("acme", "ghost"))
    assert held is not None and held.confirmed and held.backend_id == "bbb-2"
    assert stack.gateway.ledger.statistics().connections_by_customer == {"acme": 4}
