"""An LMS-like mix, written as locust-style users: teachers run lectures, students attend.

Each teacher owns a classroom.  A lecture starts with ``create``; every student
of the classroom is waiting for it and joins at once (the burst of joins at the
start of a lecture), then polls ``isMeetingRunning`` and ``getMeetingInfo``
while the teacher polls ``getMeetingInfo`` and ``getMeetings``.  Now and then
the teacher ends the lecture (``end``) and starts the next one.

Before ending, the teacher marks the lecture closing and waits for the
students' calls in flight on it to come back, so that no poll races the end
(a ``notFound`` there would be the scenario's fault, not the server's).

The same users run against each :class:`Api` of a run: the gateway, the
simulated backends directly (baseline of the forwarded calls) and the bare
endpoint (baseline of join).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from bench.loadgen import Expect
from bench.users import CallStats, User, between, task
from proxy.bbb.checksum import signed_query

SUCCESS = Expect(200, b"<returncode>SUCCESS</returncode>")
CLOSE_TIMEOUT = 10.0  # seconds a teacher waits for students' calls on a closing lecture
SEATS_SPARE = 5  # maxParticipants above the classroom's students


@dataclass(frozen=True, slots=True)
class Api:
    """Where one run sends its calls and how it signs them."""

    name: str
    host: str
    ports: tuple[int, ...]  # a meeting lives on ports[crc32(meetingID) % len]
    prefix: str  # "/<customer>/bigbluebutton/api" or "/bigbluebutton/api"
    secret: str
    join: Expect  # a good join: the redirect this server gives

    def port_for(self, meeting_id: str) -> int:
        return self.ports[zlib.crc32(meeting_id.encode()) % len(self.ports)]

    def path(self, call: str, params: list[tuple[str, str]]) -> str:
        return f"{self.prefix}/{call}?{signed_query(call, params, self.secret, 'sha256')}"


@dataclass(slots=True)
class Lecture:
    meeting_id: str
    in_flight: int = 0  # students' calls on it not yet answered
    closing: bool = False
    drained: trio.Event = field(default_factory=trio.Event)  # closing, nothing in flight

    def begin(self) -> None:
        self.in_flight += 1

    def done(self) -> None:
        self.in_flight -= 1
        if self.closing and not self.in_flight:
            self.drained.set()


@dataclass(slots=True)
class Classroom:
    name: str
    students: int = 0
    lecture: Lecture | None = None
    opened: trio.Event = field(default_factory=trio.Event)
    numbers: itertools.count[int] = field(default_factory=itertools.count)

    def open(self, meeting_id: str) -> None:
        self.lecture = Lecture(meeting_id)
        self.opened.set()

    def close(self) -> Lecture:
        assert self.lecture is not None
        lecture, self.lecture = self.lecture, None
        lecture.closing = True
        if not lecture.in_flight:
            lecture.drained.set()
        self.opened = trio.Event()
        return lecture


@dataclass(slots=True)
class Course:
    """What the users of one run share: the API and the classrooms."""

    api: Api
    classrooms: list[Classroom] = field(default_factory=list)  # one per teacher
    assigned: itertools.count[int] = field(default_factory=itertools.count)

    def new_classroom(self) -> Classroom:
        self.classrooms.append(Classroom(f"c{len(self.classrooms)}"))
        return self.classrooms[-1]

    def next_classroom(self) -> Classroom:
        return self.classrooms[next(self.assigned) % len(self.classrooms)]


class Teacher(User):
    weight = 1
    wait_time = between(0.5, 1.5)

    def __init__(self, stats: CallStats, course: Course, room: Classroom) -> None:
        super().__init__(stats, course.api.host)
        self.api = course.api
        self.room = room

    async def on_start(self) -> None:
        await self.start_lecture()

    async def start_lecture(self) -> None:
        meeting_id = f"{self.api.name}-{self.room.name}-{next(self.room.numbers)}"
        seats = str(self.room.students + SEATS_SPARE)
        params = [("meetingID", meeting_id), ("name", f"Lecture {meeting_id}")]
        path = self.api.path("create", [*params, ("maxParticipants", seats)])
        if await self.call("create", self.api.port_for(meeting_id), path, SUCCESS):
            self.room.open(meeting_id)

    @task(4)
    async def poll_info(self) -> None:
        if self.room.lecture is not None:
            await self.info("getMeetingInfo", self.room.lecture.meeting_id)

    async def info(self, call: str, meeting_id: str) -> None:
        path = self.api.path(call, [("meetingID", meeting_id)])
        await self.call(call, self.api.port_for(meeting_id), path, SUCCESS)

    @task(1)
    async def list_meetings(self) -> None:
        port = self.api.ports[next(self.room.numbers) % len(self.api.ports)]
        await self.call("getMeetings", port, self.api.path("getMeetings", []), SUCCESS)

    @task(1)
    async def end_lecture(self) -> None:
        if self.room.lecture is None:
            return await self.start_lecture()
        lecture = self.room.close()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await lecture.drained.wait()
        path = self.api.path("end", [("meetingID", lecture.meeting_id)])
        await self.call("end", self.api.port_for(lecture.meeting_id), path, SUCCESS)
        await self.start_lecture()


class Student(User):
    weight = 12
    wait_time = between(0.2, 0.6)

    def __init__(self, stats: CallStats, course: Course, room: Classroom) -> None:
        super().__init__(stats, course.api.host)
        self.api = course.api
        self.room = room
        self.number = room.students
        room.students += 1
        self.attending: Lecture | None = None

    async def on_start(self) -> None:
        await self.attend()

    async def attend(self) -> None:
        """Wait for the classroom's next lecture and join it (with everyone else)."""
        while self.room.lecture is None:
            await self.room.opened.wait()
        self.attending = lecture = self.room.lecture
        params = [("meetingID", lecture.meeting_id), ("fullName", f"Student {self.number}")]
        await self.on(lecture, "join", [*params, ("role", "VIEWER")], self.api.join)

    async def on(
        self, lecture: Lecture, call: str, params: list[tuple[str, str]], expect: Expect
    ) -> None:
        lecture.begin()
        try:
            port = self.api.port_for(lecture.meeting_id)
            await self.call(call, port, self.api.path(call, params), expect)
        finally:
            lecture.done()

    async def poll(self, call: str) -> None:
        lecture = self.attending
        if lecture is None or lecture.closing:
            return await self.attend()
        await self.on(lecture, call, [("meetingID", lecture.meeting_id)], SUCCESS)

    @task(6)
    async def poll_running(self) -> None:
        await self.poll("isMeetingRunning")

    @task(2)
    async def poll_info(self) -> None:
        await self.poll("getMeetingInfo")


def user_factories(course: Course) -> tuple[list[Callable[[CallStats], User]], list[int]]:
    """The swarm's user classes bound to ``course``: each teacher opens a classroom.

    The swarm makes every teacher before the first student (class order), so
    students are spread over all the classrooms.
    """

    def teacher(stats: CallStats) -> User:
        return Teacher(stats, course, course.new_classroom())

    def student(stats: CallStats) -> User:
        return Student(stats, course, course.next_classroom())

    return [teacher, student], [Teacher.weight, Student.weight]
