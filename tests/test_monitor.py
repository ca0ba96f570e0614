"""Health hysteresis, grace periods and reconciliation, on trio's autojump clock.

Backends are scripted httpx transports, so every poll happens at an exact
virtual time: polls every 10 s, DOWN after 3 failures, UP after 2 successes,
reservations released 60 s after DOWN.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from lxml import etree

from proxy.backends import http
from proxy.backends.monitor import monitor_backends, reconcile_all
from proxy.bbb import rewrite
from proxy.config import from_mapping
from proxy.gateway import Gateway, open_gateway
from proxy.health import Health, State, Thresholds, after_poll, should_release
from proxy.ledger.model import Reservation, Reserve
from proxy.ledger.service import Ledger
from proxy.reconcile import listed_meetings

LIMITS = Thresholds(down_after=3, up_after=2, release_after=60)


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
    assert not should_release(h, 119.9, LIMITS)
    assert should_release(h, 120, LIMITS)
    h = after_poll(h, True, 70, LIMITS)
    assert h.state is State.DOWN and h.down_since == 60


@dataclass
class FakeBackend:
    """Answers getMeetings with the meetings it holds, or fails while ``alive`` is False."""

    alive: bool = True
    meetings: list[Reservation] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)

    async def request(
        self, method: str, target: str, body: bytes | None = None, content_type: str | None = None
    ) -> http.Answer:
        self.polls.append(trio.current_time())
        if not self.alive:
            raise http.ConnectFailed("refused")
        meetings = "".join(_meeting_xml(r) for r in self.meetings)
        xml = (
            f"<response><returncode>SUCCESS</returncode><meetings>{meetings}</meetings></response>"
        )
        return http.Answer(200, xml.encode())

    async def aclose(self) -> None:
        pass


def _meeting_xml(r: Reservation) -> str:
    tags = "".join(
        f"<{name[5:].lower()}>{value}</{name[5:].lower()}>"
        for name, value in rewrite.tags(r.customer, r.meeting_id, r.asked_duration)
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
        "proxy": {"health": {"interval": 10, "down_after": 3, "up_after": 2, "release_after": 60}},
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


async def test_long_outage_releases_after_grace_exactly(
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
    await trio.sleep_until(start + 29.5)
    assert state(gateway) is State.UNHEALTHY
    await trio.sleep_until(start + 30.5)
    assert state(gateway) is State.DOWN
    assert gateway.health["b1"].down_since == pytest.approx(start + 30)
    await trio.sleep_until(start + 89.5)
    assert gateway.ledger.get(("acme", "room-1")) is not None  # grace not over
    await trio.sleep_until(start + 90.5)
    assert gateway.ledger.get(("acme", "room-1")) is None
    assert gateway.ledger.statistics().connections_by_backend == {}
    assert backends["b1"].polls == pytest.approx([start + 10 * i for i in range(1, 10)])


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
    assert gateway.health["b1"] == Health(State.UP)
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


async def test_reconcile_keeps_meetings_created_after_the_poll_was_sent(
    autojump_clock: trio.testing.MockClock,
    gateway: Gateway,
    backends: dict[str, FakeBackend],
) -> None:
    await trio.sleep(100)
    future = reservation("racing", created_at=trio.current_time() + 1)
    await gateway.ledger.record(Reserve(future))
    await reconcile_all(gateway)
    assert gateway.ledger.get(("acme", "racing")) is not None


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
