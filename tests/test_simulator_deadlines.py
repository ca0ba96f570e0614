"""The simulator's deadline heap decides exactly what a walk over every meeting decides.

:class:`WalkingSimulator` keeps the original O(meetings) tick as the reference;
both simulators get the same random calls and clock steps, and must agree on
every meeting's state and on the notifications, in order.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.bbb.checksum import signed_query
from proxy.simulator import Simulator
from proxy.simulator.core import MINUTE_MS
from proxy.simulator.deadlines import Deadlines
from proxy.simulator.model import ApiRequest, Meeting

SECRET = "deadline-secret"
EPOCH = 1_715_261_728.0


class Clock:
    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


class WalkingSimulator(Simulator):
    """The reference: every tick walks every meeting held."""

    def tick(self) -> None:
        now = self.now_ms()
        for meeting in list(self.meetings.values()):
            if meeting.ended:
                if now >= meeting.end_time + self.ended_linger_seconds * 1000:
                    self._forget(meeting)
            elif self._walk_expired(meeting, now):
                self.end_meeting(meeting, forcibly=False)

    def _walk_expired(self, meeting: Meeting, now: int) -> bool:
        if meeting.duration > 0 and now >= meeting.create_time + meeting.duration * MINUTE_MS:
            return True
        limit = self.expire_unjoined_minutes
        return (
            limit is not None
            and not meeting.has_user_joined
            and now >= meeting.create_time + limit * MINUTE_MS
        )


def call(sim: Simulator, name: str, params: list[tuple[str, str]]) -> None:
    sim.handle(ApiRequest(name, raw_query=signed_query(name, params, SECRET)))


def state(sim: Simulator) -> list[tuple[str, bool, bool, int, int]]:
    return [
        (m.meeting_id, m.ended, m.forcibly_ended, m.end_time, len(m.attendees))
        for m in sim.meetings.values()
    ]


ROOMS = [f"room-{n}" for n in range(3)]
OPERATIONS = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(ROOMS), st.sampled_from(["0", "1", "3"])),
    st.tuples(st.just("join"), st.sampled_from(ROOMS), st.just("")),
    st.tuples(st.just("end"), st.sampled_from(ROOMS), st.just("")),
    st.tuples(st.just("wait"), st.just(""), st.sampled_from(["0.4", "1", "59", "61", "200"])),
)


def apply(sim: Simulator, clock: Clock, op: tuple[str, str, str]) -> None:
    kind, room, value = op
    if kind == "wait":
        clock.now += float(value)
        sim.tick()
    elif kind == "create":
        ended_url = f"http://lb.test/ended/{room}"
        params = [("meetingID", room), ("name", room), ("duration", value)]
        call(sim, "create", [*params, ("meetingEndedURL", ended_url)])
    elif kind == "join":
        call(sim, "join", [("meetingID", room), ("fullName", "Ann"), ("role", "VIEWER")])
    else:
        call(sim, "end", [("meetingID", room)])


JOINED_BEFORE_EXPIRY = [
    ("create", "room-0", "3"),
    ("join", "room-0", ""),
    *[("wait", "", "61")] * 4,
]
DUE_TOGETHER = [("create", "room-0", "3"), ("create", "room-1", "1"), ("wait", "", "200")]


@settings(max_examples=300, deadline=None)
@example(ops=JOINED_BEFORE_EXPIRY, expire=2.0, linger=1.0)
@example(ops=DUE_TOGETHER, expire=None, linger=1.0)
@given(
    ops=st.lists(OPERATIONS, max_size=40),
    expire=st.sampled_from([None, 0.0, 2.0]),
    linger=st.sampled_from([0.0, 1.0, 90.0]),
)
def test_heap_tick_matches_a_full_walk(
    ops: list[tuple[str, str, str]], expire: float | None, linger: float
) -> None:
    clocks = Clock(), Clock()
    heap = Simulator(SECRET, clock=clocks[0], expire_unjoined_minutes=expire)
    walk = WalkingSimulator(SECRET, clock=clocks[1], expire_unjoined_minutes=expire)
    heap.ended_linger_seconds = walk.ended_linger_seconds = linger
    for op in ops:
        apply(heap, clocks[0], op)
        apply(walk, clocks[1], op)
        assert state(heap) == state(walk)
        assert heap.take_notifications() == walk.take_notifications()
        live = {m.voice_bridge for m in heap.meetings.values() if not m.ended}
        assert heap.voice_bridges == live


def test_deadlines_pop_what_is_due_in_order() -> None:
    deadlines: Deadlines[str] = Deadlines()
    for due, item in [(5.0, "c"), (1.0, "a"), (5.0, "d"), (3.0, "b"), (9.0, "e")]:
        deadlines.push(due, item)
    assert deadlines.pop_due(0.5) == []
    assert deadlines.pop_due(5.0) == ["a", "b", "c", "d"]
    assert len(deadlines) == 1
    deadlines.clear()
    assert deadlines.pop_due(100.0) == []
