"""Health hysteresis, grace periods and reconciliation, on trio's autojump clock.

Backends are scripted httpx transports, so every poll happens at an exact
virtual time: polls every 10 s (each bounded by 4 s), DOWN after 3 failures,
UP after 2 successes.  A DOWN backend is suspended, never released on time alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import pytest
import trio
import trio.testing
from lxml import etree

from proxy.backends import http
from proxy.backends.monitor import monitor_backends, poll_once, reconcile_all
from proxy.bbb import rewrite
from proxy.config import from_mapping
from proxy.errors import StateError
from proxy.gateway import Gateway, open_gateway
from proxy.health import Health, State, Thresholds, after_poll, responsive, with_latency
from proxy.ledger.model import Reservation, Reserve
from proxy.ledger.service import Ledger
from proxy.reconcile import listed_meetings

LIMITS = Thresholds(down_after=3, up_after=2, slow_after=1.0)


def test_state_table() -> None:
    h = Health()
    h = after_poll(h, False, 10, LIMITS)
    assert h.state is State.UNHEALTHY
    h = after_poll(h, True, 20, LIMITS)
    assert h.state is State.UNHEALTHY  # one good answer is not enough
    h = after_poll(h, True, 30, LIMITS)
    assert h == Health(State.UP)
    for t in (40, 50):
        h = after_poll(h, False, t, LIMITS)
    assert h.state is State.UNHEALTHY
    h = after_poll(h, False, 60, LIMITS)
    assert (h.state, h.down_since) == (State.DOWN, 60)
    h = after_poll(h, True, 70, LIMITS)
    assert h.state is State.DOWN and h.down_since == 60


def test_latency_average_decides_responsiveness_and_survives_transitions() -> None:
    h = Health()
    assert responsive(h, LIMITS)  # no sample yet
    h = with_latency(h, 3.0)
    assert h.latency == 3.0 and not responsive(h, LIMITS)  # the first sample sets it
    for _ in range(5):
        h = with_latency(h, 0.01)
    assert h.latency is not None and h.latency < 1.0 and responsive(h, LIMITS)
    spiked = with_latency(Health(latency=0.05), 3.0)  # one slow answer is not a slow server
    assert responsive(spiked, LIMITS)
    slow = with_latency(Health(latency=2.0), 2.0)
    for ok in (False, False, False, True, True):
        slow = after_poll(slow, ok, 0, LIMITS)
    assert slow.state is State.UP and slow.latency == 2.0


@dataclass
class FakeBackend:
    """Answers getMeetings with the meetings it holds, or fails while ``alive`` is False."""

    alive: bool = True
    meetings: list[Reservation] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)
    delay: float = 0.0  # the list is made when the request arrives, answered this much later
    raw: list[str] = field(default_factory=list)  # more <meeting> elements, as written
    ended: list[str] = field(default_factory=list)  # targets of end calls

    async def request(
        self, method: str, target: str, body: bytes | None = None, content_type: str | None = None
    ) -> http.Answer:
        if "/end?" in target:
            self.ended.append(target)
            return http.Answer(200, b"<response><returncode>SUCCESS</returncode></response>")
        self.polls.append(trio.current_time())
        if not self.alive:
            raise http.ConnectFailed("refused")
        meetings = "".join(_meeting_xml(r) for r in self.meetings) + "".join(self.raw)
        xml = (
            f"<response><returncode>SUCCESS</returncode><meetings>{meetings}</meetings></response>"
        )
        await trio.sleep(self.delay)
        return http.Answer(200, xml.encode())

    async def aclose(self) -> None:
        pass


def _meeting_xml(r: Reservation) -> str:
    tags = "".join(
        f"<{name[5:].lower()}>{value}</{name[5:].lower()}>"
        for name, value in rewrite.tags(r.customer, r.meeting_id, r.asked_duration, r.created_at)
    )
    return (
        f"<meeting><meetingID>{r.backend_meeting_id}</meetingID>"
        f"<createTime>{int(r.created_at * 1000)}</createTime><maxUsers>{r.connections}</maxUsers>"
        f"<metadata>{tags}</metadata></meeting>"
    )


def reservation(meeting_id: str, backend_id: str = "b1", created_at: float = 0.0) -> Reservation:
    return Reservation(
        customer="acme",
        meeting_id=meeting_id,
        backend_id=backend_id,
        backend_meeting_id=rewrite.backend_meeting_id("acme", meeting_id),
        connections=5,
        duration=60,
        asked_duration=60,
        created_at=created_at,
        confirmed=True,
    )


CONFIG = from_mapping(
    {
        "proxy": {"health": {"interval": 10, "timeout": 4, "down_after": 3, "up_after": 2}},
        "backends": [
            {"id": "b1", "url": "http://b1.test/bigbluebutton/api", "secret": "s", "capacity": 50},
            {"id": "b2", "url": "http://b2.test/bigbluebutton/api", "secret": "s", "capacity": 50},
        ],
        "customers": [
            {
                "id": "acme",
                "secret": "x",
                "max_connections": 100,
                "default_max_participants": 5,
                "default_duration": 60,
            }
        ],
    }
)


@pytest.fixture
async def backends() -> dict[str, FakeBackend]:
    return {"b1": FakeBackend(), "b2": FakeBackend()}


@pytest.fixture
async def gateway(backends: dict[str, FakeBackend]) -> AsyncIterator[Gateway]:
    ledger = Ledger(clock=trio.current_time)

    async with open_gateway(CONFIG, ledger, backends.get) as gw:
        yield gw


async def hold(gw: Gateway, backends: dict[str, FakeBackend], r: Reservation) -> None:
    await gw.ledger.record(Reserve(r))
    backends[r.backend_id].meetings.append(r)


def state(gw: Gateway) -> State:
    return gw.health["b1"].state


async def monitoring(
    gateway: Gateway, backends: dict[str, FakeBackend], nursery: trio.Nursery
) -> float:
    """Hold room-1 on b1, start the monitor; the start time (first poll 10 s later)."""
    start = trio.current_time()
    await hold(gateway, backends, reservation("room-1", created_at=start))
    nursery.start_soon(monitor_backends, gateway)
    return start


async def test_long_outage_suspends_at_down_and_releases_nothing(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
    nursery: trio.Nursery,
) -> None:
    start = await monitoring(gateway, backends, nursery)
    backends["b1"].alive = False
    await trio.sleep_until(start + 10.5)
    assert state(gateway) is State.UNHEALTHY
    assert not gateway.accepts_meetings("b1")
    assert gateway.accepts_meetings("b2")
    assert gateway.ledger.state.customer_used("acme") == 5  # UNHEALTHY: still counted
    await trio.sleep_until(start + 29.5)
    assert state(gateway) is State.UNHEALTHY and not gateway.backend_down("b1")
    await trio.sleep_until(start + 30.5)
    assert state(gateway) is State.DOWN and gateway.backend_down("b1")
    assert gateway.health["b1"].down_since == pytest.approx(start + 30)
    # DOWN: the pin stays (split-brain protection), the subscription is free at once.
    assert gateway.ledger.state.customer_used("acme") == 0
    assert gateway.ledger.state.suspended == {"b1"}
    await trio.sleep_until(start + 3600.5)  # an hour DOWN releases nothing: no evidence it ended
    kept = gateway.ledger.get(("acme", "room-1"))
    assert kept is not None and kept.backend_id == "b1"
    assert backends["b1"].polls == pytest.approx([start + 10 * i for i in range(1, 361)])
    backends["b1"].alive = True  # back, still running room-1: kept, counted again
    await trio.sleep_until(start + 3620.5)
    assert state(gateway) is State.UP and gateway.ledger.state.suspended == frozenset()
    assert gateway.ledger.state.customer_used("acme") == 5
    assert gateway.failover == {"kept": 1}


async def test_hung_backend_is_down_after_three_poll_timeouts(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
    nursery: trio.Nursery,
) -> None:
    start = await monitoring(gateway, backends, nursery)
    backends["b1"].delay = 1000.0  # accepts, never answers in time (read timeout is 10 s)
    await trio.sleep_until(start + 30 + 3.9)
    assert state(gateway) is State.UNHEALTHY
    await trio.sleep_until(start + 30 + 4.1)  # third poll sent at 30, given up at 34
    assert state(gateway) is State.DOWN
    assert gateway.ledger.state.customer_used("acme") == 0
    assert gateway.health["b1"].latency == pytest.approx(4.0)


async def test_brief_outage_splits_nothing(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
    nursery: trio.Nursery,
) -> None:
    start = await monitoring(gateway, backends, nursery)
    backends["b1"].alive = False
    await trio.sleep_until(start + 25)  # two failed polls: 10, 20
    assert state(gateway) is State.UNHEALTHY
    backends["b1"].alive = True
    await trio.sleep_until(start + 35)  # one good poll at 30
    assert state(gateway) is State.UNHEALTHY
    await trio.sleep_until(start + 45)  # second good poll at 40
    assert (state(gateway), gateway.health["b1"].failures) == (State.UP, 0)
    kept = gateway.ledger.get(("acme", "room-1"))
    assert kept is not None and kept.backend_id == "b1"


async def test_reconcile_releases_ended_and_adopts_lost(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
) -> None:
    await trio.sleep(100)
    ended = reservation("ended", created_at=10)
    await gateway.ledger.record(Reserve(ended))  # the backend no longer lists it
    lost = reservation("lost", backend_id="b2", created_at=20)
    backends["b2"].meetings.append(lost)  # listed, unknown to the ledger
    await reconcile_all(gateway)
    assert gateway.ledger.get(("acme", "ended")) is None
    adopted = gateway.ledger.get(("acme", "lost"))
    assert adopted is not None
    assert (adopted.backend_id, adopted.connections, adopted.created_at) == ("b2", 5, 20)
    assert gateway.ledger.statistics().connections_by_customer == {"acme": 5}


async def test_a_create_confirmed_while_the_poll_was_in_flight_is_kept(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
    nursery: trio.Nursery,
) -> None:
    """The race seen under load: a create admitted before the poll, confirmed after the
    backend made its list, was released by that list (join then answered unknown)."""
    await trio.sleep(100)
    admitted = replace(reservation("racing", created_at=trio.current_time() - 1), confirmed=False)
    await gateway.ledger.record(Reserve(admitted))
    fresh = reservation("fresh", created_at=trio.current_time() + 0.5)
    backends["b1"].delay = 1.0  # the list (empty) is made now, answered in 1 s
    nursery.start_soon(poll_once, gateway, "b1")
    await trio.sleep(0.5)
    await gateway.ledger.confirm(admitted.key)  # the create's SUCCESS arrives
    await gateway.ledger.record(Reserve(fresh))  # and another create, after the poll was sent
    await trio.sleep(1.0)
    assert gateway.health["b1"].latency == pytest.approx(1.0)  # the poll was answered
    held = gateway.ledger.get(admitted.key)
    assert held is not None and held.confirmed
    assert gateway.ledger.get(fresh.key) is not None
    await poll_once(gateway, "b1")  # the next poll's list lacks both: now that is evidence
    assert gateway.ledger.get(admitted.key) is None and gateway.ledger.get(fresh.key) is None


async def test_poll_results_are_matched_to_the_meeting_instance(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
) -> None:
    """An old instance still listed under the ID neither keeps nor confirms a reservation."""
    await trio.sleep(100)
    new = reservation("again", created_at=90.0)
    await gateway.ledger.record(Reserve(new))
    pending = replace(reservation("pending", created_at=20.0), confirmed=False)
    await gateway.ledger.record(Reserve(pending))
    backends["b1"].meetings += [
        replace(new, created_at=50.0),  # the previous meeting of the same ID
        replace(pending, created_at=10.0),
    ]
    await poll_once(gateway, "b1")
    assert gateway.ledger.get(new.key) is None  # its own instance is not listed
    assert gateway.ledger.get(pending.key) is None  # never confirmed, past the grace
    backends["b1"].meetings = [new]
    await poll_once(gateway, "b1")  # unknown now, listed: adopted with the tag's created_at
    adopted = gateway.ledger.get(new.key)
    assert adopted is not None and adopted.created_at == 90.0


async def test_drained_backend_gets_no_new_meetings(gateway: Gateway) -> None:
    gateway.modes["b1"] = "drain"
    assert not gateway.accepts_meetings("b1")
    assert [s.available for s in gateway.backend_specs()] == [False, True]
    gateway.modes["b2"] = "disabled"
    assert gateway.in_service() == ["b1"]


def test_ended_meetings_still_listed_are_not_held() -> None:
    r = reservation("gone")
    tags = _meeting_xml(r).replace("</meeting>", "")
    root = etree.fromstring(
        "<response><returncode>SUCCESS</returncode><meetings>"
        f"{tags}<hasBeenForciblyEnded>true</hasBeenForciblyEnded></meeting>"
        f"{tags.replace('acme~gone', 'acme~late')}<endTime>1700000000000</endTime></meeting>"
        f"{_meeting_xml(reservation('live'))}"
        "</meetings></response>"
    )
    assert [m.meeting_id for m in listed_meetings(root)] == ["live"]


def _listed_xml(meeting_id: str, max_users: str, created: str = "50.0") -> str:
    return (
        f"<meeting><meetingID>acme~{meeting_id}</meetingID><createTime>50000</createTime>"
        f"<maxUsers>{max_users}</maxUsers><metadata><bbb-proxy-customer>acme"
        f"</bbb-proxy-customer><bbb-proxy-meeting>{meeting_id}</bbb-proxy-meeting>"
        f"<bbb-proxy-duration>60</bbb-proxy-duration><bbb-proxy-created>{created}"
        "</bbb-proxy-created></metadata></meeting>"
    )


async def test_adoption_is_clamped_to_subscription_and_capacity(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
) -> None:
    """A misbehaving backend (maxUsers=10^9, 500 tagged meetings) cannot lock acme out."""
    await trio.sleep(100)
    backends["b1"].raw = [_listed_xml("huge", "1000000000")]
    backends["b1"].raw += [_listed_xml(f"m{n}", "5") for n in range(500)]
    backends["b2"].raw = [_listed_xml("odd", "²", created="1e300"), _listed_xml("x", "9" * 5000)]
    await reconcile_all(gateway)
    state = gateway.ledger.state
    assert gateway.task_failures == {}
    assert state.backend_used("b1") == 50  # b1's capacity, whatever it lists
    huge = gateway.ledger.get(("acme", "huge"))
    assert huge is not None and huge.connections == 50
    odd = gateway.ledger.get(("acme", "odd"))  # '²' is no number: the customer's default
    assert odd is not None and (odd.connections, odd.created_at) == (5, 100.0)  # not the future
    assert state.customer_used("acme") <= 100
    assert gateway.failover["adopt-clamped"] >= 500


async def test_a_poll_that_raises_is_counted_and_the_monitor_goes_on(
    autojump_clock: trio.testing.MockClock,
    backends: dict[str, FakeBackend],
    nursery: trio.Nursery,
) -> None:
    journal = FailingJournal()
    ledger = Ledger(journal=journal, clock=trio.current_time)
    async with open_gateway(CONFIG, ledger, backends.get) as gw:
        ledger.state.apply(Reserve(reservation("ended", created_at=0.0)))  # b1 no longer lists it
        start = trio.current_time()
        nursery.start_soon(monitor_backends, gw)
        await trio.sleep_until(start + 30.5)
        assert gw.task_failures == {"monitor": 3}  # three polls of b1, each failed to release
        assert len(backends["b1"].polls) == 3 and gw.health["b1"].state is State.UP
        journal.failing = False  # the disk is back: the next poll releases it
        await trio.sleep_until(start + 40.5)
        assert gw.ledger.get(("acme", "ended")) is None
        assert gw.task_failures == {"monitor": 3}


class FailingJournal:
    """A journal whose writes fail while ``failing`` (a full or read-only disk)."""

    def __init__(self) -> None:
        self.failing = True

    @property
    def failed(self) -> bool:
        return self.failing

    def append(self, record: object) -> None:
        if self.failing:
            raise StateError("journal: No space left on device")

    async def flush(self) -> None:
        pass


async def test_a_copy_of_a_meeting_pinned_elsewhere_is_ended_and_nothing_else(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
) -> None:
    await trio.sleep(100)
    moved = reservation("moved", backend_id="b2", created_at=90.0)
    here = reservation("here", created_at=80.0)
    for r in (moved, here):
        await gateway.ledger.record(Reserve(r))
    backends["b2"].meetings.append(moved)
    backends["b1"].meetings += [replace(moved, backend_id="b1", created_at=10.0), here]
    await reconcile_all(gateway)
    await trio.sleep(1)  # the end is sent in the background
    assert len(backends["b1"].ended) == 1 and "meetingID=acme~moved" in backends["b1"].ended[0]
    assert backends["b2"].ended == []
    assert gateway.ledger.get(moved.key) == moved and gateway.ledger.get(here.key) == here
    assert gateway.failover == {"stray-ended": 1}


async def test_meetings_of_a_backend_removed_from_the_config_are_released_at_start(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
) -> None:
    gone = reservation("gone", backend_id="b9")
    await gateway.ledger.record(Reserve(gone))
    assert gateway.backend_down("b9")  # a join must not redirect there
    await reconcile_all(gateway)
    assert gateway.ledger.get(gone.key) is None
    assert gateway.ledger.state.customer_used("acme") == 0
