"""Meetings ending by time, under trio's autojump clock (no sockets, no wall clock).

The app runs in-process (quart's test app, so its background ticker runs
too); the simulator's epoch clock is tied to trio's virtual clock.  pytest-trio
installs the clock only when the *test* requests ``autojump_clock`` (a fixture
asking for it is not enough), so every test here takes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from lxml import etree
from quart import typing as quart_typing

from proxy.bbb.checksum import signed_query
from proxy.simulator import Simulator, create_app

SECRET = "time-secret"
EPOCH = 1_715_261_728.0
MINUTE = 60.0


@dataclass
class Harness:
    sim: Simulator
    client: quart_typing.TestClientProtocol
    notified: list[tuple[float, str]] = field(default_factory=list)

    async def call(self, call: str, params: list[tuple[str, str]]) -> etree._Element:
        path = f"/bigbluebutton/api/{call}?{signed_query(call, params, SECRET)}"
        response = await self.client.get(path)
        assert response.status_code in (200, 302)
        if response.status_code == 302:
            return etree.Element("redirect")
        return etree.fromstring(await response.get_data(as_text=True))


async def _harness(
    expire_unjoined_minutes: float | None, tick_interval: float
) -> AsyncIterator[Harness]:
    sim = Simulator(
        SECRET,
        clock=lambda: EPOCH + trio.current_time(),
        expire_unjoined_minutes=expire_unjoined_minutes,
    )
    notified: list[tuple[float, str]] = []

    async def notify(url: str) -> None:
        notified.append((trio.current_time(), url))

    app = create_app(sim, notify=notify, tick_interval=tick_interval)
    async with app.test_app() as test_app:
        yield Harness(sim, test_app.test_client(), notified)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async for item in _harness(expire_unjoined_minutes=None, tick_interval=1.0):
        yield item


@pytest.fixture
async def lazy() -> AsyncIterator[Harness]:
    """A ticker too slow to matter: only the lazy check on each request ends meetings."""
    async for item in _harness(expire_unjoined_minutes=5, tick_interval=24 * 60 * MINUTE):
        yield item


async def test_duration_ends_the_meeting_and_notifies(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    await harness.call(
        "create",
        [
            ("meetingID", "timed"),
            ("name", "Timed"),
            ("duration", "1"),
            ("meetingEndedURL", "http://lb.example/ended?m=timed"),
            ("meta_endCallbackUrl", "http://lms.example/cb"),
        ],
    )
    await trio.sleep(MINUTE - 1)
    assert not harness.sim.meetings["timed"].ended
    assert harness.notified == []
    await trio.sleep(2)
    assert sorted(url for _, url in harness.notified) == [
        "http://lb.example/ended?m=timed",
        "http://lms.example/cb?recordingmarks=false&meetingID=timed",
    ]
    for when, _ in harness.notified:
        assert start + MINUTE <= when <= start + MINUTE + 1
    meeting = harness.sim.meetings.get("timed")
    assert meeting is None or meeting.ended


async def test_duration_is_checked_lazily_on_requests(
    lazy: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await lazy.call("create", [("meetingID", "timed"), ("name", "Timed"), ("duration", "2")])
    await lazy.call("join", [("meetingID", "timed"), ("fullName", "A"), ("role", "VIEWER")])
    await trio.sleep(2 * MINUTE - 1)
    running = await lazy.call("isMeetingRunning", [("meetingID", "timed")])
    assert running.findtext("running") == "true"
    await trio.sleep(1)
    info = await lazy.call("getMeetingInfo", [("meetingID", "timed")])
    assert info.findtext("running") == "false"
    create_time = int(info.findtext("createTime") or 0)
    assert create_time + 2 * 60_000 <= int(info.findtext("endTime") or 0) <= lazy.sim.now_ms()
    assert info.findtext("hasBeenForciblyEnded") == "false"


async def test_unjoined_meeting_expires(
    lazy: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await lazy.call("create", [("meetingID", "idle"), ("name", "Idle")])
    await lazy.call("create", [("meetingID", "busy"), ("name", "Busy")])
    await lazy.call("join", [("meetingID", "busy"), ("fullName", "B"), ("role", "VIEWER")])
    await trio.sleep(5 * MINUTE - 1)
    assert "idle" in lazy.sim.meetings
    await trio.sleep(1)
    await lazy.call("getMeetings", [])
    assert lazy.sim.meetings["idle"].ended
    await trio.sleep(2)
    missing = await lazy.call("getMeetingInfo", [("meetingID", "idle")])
    assert missing.findtext("messageKey") == "notFound"
    busy = await lazy.call("isMeetingRunning", [("meetingID", "busy")])
    assert busy.findtext("running") == "true"


async def test_expiry_can_be_disabled(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await harness.call("create", [("meetingID", "idle"), ("name", "Idle")])
    await trio.sleep(60 * MINUTE)
    assert not harness.sim.meetings["idle"].ended
