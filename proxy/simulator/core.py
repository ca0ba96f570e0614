"""One simulated BBB server's state and its request dispatch, without I/O.

:meth:`Simulator.handle` takes an :class:`~.model.ApiRequest` and decides a
:class:`~.model.Reply`: version document, checksum check (over the raw query
string, as bbb-web does), the call's handler, BBB's error envelope.  Time
comes from the injected ``clock`` (epoch seconds) and is checked lazily on
every request and on :meth:`Simulator.tick`, so meetings end by ``duration``
or expire unjoined without any timer here.  A heap of each meeting's next
deadline (:mod:`.deadlines`) makes a tick cost O(log n) per meeting due, not
O(meetings held); the voice bridges of live meetings are kept in a set.  End notifications (GETs to
``meetingEndedURL`` and ``meta_endCallbackUrl``) are queued; the trio layer
sends what :meth:`Simulator.take_notifications` hands it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Set
from urllib.parse import parse_qsl, urlencode

from proxy.bbb import checksum
from proxy.bbb.envelope import failure, from_error
from proxy.errors import ApiError, ChecksumError, UnsupportedRequest

from . import analytics, join, meetings, recordings, render, webhooks
from .deadlines import Deadlines
from .model import (
    ApiRequest,
    Attendee,
    Behaviour,
    Meeting,
    Reply,
    SimulatorStatistics,
    append_query,
)
from .params import Params

MINUTE_MS = 60_000
Handler = Callable[["Simulator", ApiRequest, Params], Reply]

HANDLERS: dict[str, Handler] = {
    "create": meetings.create,
    "join": join.join,
    "end": meetings.end,
    "isMeetingRunning": meetings.is_meeting_running,
    "getMeetingInfo": meetings.get_meeting_info,
    "getMeetings": meetings.get_meetings,
    "insertDocument": meetings.insert_document,
    "sendChatMessage": meetings.send_chat_message,
    "getRecordings": recordings.get_recordings,
    "publishRecordings": recordings.publish_recordings,
    "deleteRecordings": recordings.delete_recordings,
    "updateRecordings": recordings.update_recordings,
    "getRecordingTextTracks": recordings.get_recording_text_tracks,
    "putRecordingTextTrack": recordings.put_recording_text_track,
}
# bbb-api.md §1: "POST is allowed for create, end, getMeetingInfo, getMeetings,
# isMeetingRunning, getRecordings, updateRecordings, ..., insertDocument".
POST_CALLS = frozenset(
    {
        "create",
        "end",
        "getMeetingInfo",
        "getMeetings",
        "isMeetingRunning",
        "getRecordings",
        "updateRecordings",
        "insertDocument",
        "putRecordingTextTrack",
    }
)


class Simulator:
    """The state of one simulated BBB 3.0 server.

    ``requests`` lists every call whose checksum verified, as
    ``(call name, decoded parameters in order)`` with the checksum left out.
    ``meetings`` holds meetings by external meetingID; an ended meeting stays
    (``hasBeenForciblyEnded``/``endTime`` set) for ``ended_linger_seconds``.
    """

    def __init__(
        self,
        secret: str,
        *,
        server_name: str = "bbb.example",
        behaviour: Behaviour | None = None,
        clock: Callable[[], float] = time.time,
        expire_unjoined_minutes: float | None = 5,
        ended_linger_seconds: float = 1.0,
        processing_seconds: float = 0.0,
    ) -> None:
        self.secret = secret
        self.server_name = server_name
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.clock = clock
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []
        self.meetings: dict[str, Meeting] = {}
        self.notified: list[str] = []  # every notification URL handed out, in order
        self._outbox: list[str] = []
        self._analytics: list[tuple[str, str, bytes]] = []  # (URL, JWT, body) to POST
        self._sessions: dict[str, tuple[str, str]] = {}  # token -> (meetingID, internal user id)
        self._deadlines: Deadlines[Meeting] = Deadlines()
        self._bridges: set[str] = set()  # voice bridges of live (not ended) meetings
        # Each meetingID's position in ``meetings`` (dict order): a tick handles the
        # meetings due in this order, so notifications queue as a full walk would.
        self._positions: dict[str, int] = {}
        self._arrivals = itertools.count()
        self._expire_unjoined_minutes = expire_unjoined_minutes
        self._ended_linger_seconds = ended_linger_seconds
        # Recordings of record=true meetings (recordings.py); processing for processing_seconds.
        self.recordings = recordings.RecordingStore(server_name, processing_seconds, secret)
        # bbb-webhooks beside bbb-web: hooks/* calls and the events it posts.
        self.webhooks = webhooks.WebhookService(server_name, secret, self.now_ms)

    @property
    def expire_unjoined_minutes(self) -> float | None:
        return self._expire_unjoined_minutes

    @expire_unjoined_minutes.setter
    def expire_unjoined_minutes(self, minutes: float | None) -> None:
        self._expire_unjoined_minutes = minutes
        self._reschedule_all()

    @property
    def ended_linger_seconds(self) -> float:
        return self._ended_linger_seconds

    @ended_linger_seconds.setter
    def ended_linger_seconds(self, seconds: float) -> None:
        self._ended_linger_seconds = seconds
        self._reschedule_all()

    def now_ms(self) -> int:
        return round(self.clock() * 1000)

    # --- requests ------------------------------------------------------------

    def handle(self, request: ApiRequest) -> Reply:
        """Decide the answer to one API request."""
        self.tick()
        if request.call == "":
            return Reply.xml(render.version_document(request.origin + "/bigbluebutton/api"))
        if request.call.startswith("hooks/"):
            return self.webhooks.handle(request)
        query = parse_qsl(request.raw_query, keep_blank_values=True)
        params = Params([*query, *request.form_params])
        try:
            self._verify(request, query)
        except ChecksumError as error:
            if request.call == "join":
                return join.error_redirect(self, params, error)
            return Reply.xml(from_error(error))
        params = Params((k, v) for k, v in params.pairs if k != "checksum")
        self.requests.append((request.call, list(params.pairs)))
        try:
            return self._dispatch(request, params)
        except ApiError as error:
            return Reply.xml(failure(error.message_key, error.message))

    def _verify(self, request: ApiRequest, query: list[tuple[str, str]]) -> None:
        form = request.form_params
        if checksum.find_checksum(request.raw_query) is None and not any(
            key == "checksum" for key, _ in form
        ):
            raise ChecksumError("You must provide the checksum")
        # "A parameter present in both URL and body becomes multi-valued and
        # the docs state this yields checksumError."
        if {key for key, _ in query} & {key for key, _ in form}:
            raise ChecksumError()
        if not checksum.verify(request.call, request.raw_query, [self.secret], form):
            raise ChecksumError()

    def _dispatch(self, request: ApiRequest, params: Params) -> Reply:
        handler = HANDLERS.get(request.call)
        if handler is None:
            raise UnsupportedRequest()
        if request.method == "POST":
            if request.call not in POST_CALLS:
                raise UnsupportedRequest("This request method is not supported.")
            _check_content_type(request)
        return handler(self, request, params)

    # --- sessions and attendees ------------------------------------------------

    def add_attendee(self, meeting: Meeting, attendee: Attendee) -> Attendee:
        meeting.attendees[attendee.internal_id] = attendee
        meeting.has_user_joined = True
        self._sessions[attendee.session_token] = (meeting.meeting_id, attendee.internal_id)
        return attendee

    def remove_attendee(self, meeting: Meeting, attendee: Attendee) -> None:
        if meeting.attendees.pop(attendee.internal_id, None) is not None:
            self.webhooks.user_left(meeting, attendee)
        self._sessions.pop(attendee.session_token, None)

    def leave(self, token: str) -> bool:
        """The user of session ``token`` leaves its meeting; False if there is no such user."""
        found = self.session(token)
        if found is not None:
            self.remove_attendee(*found)
        return found is not None

    def session(self, token: str) -> tuple[Meeting, Attendee] | None:
        """The meeting and user a ``sessionToken`` from a join belongs to, if still valid."""
        self.tick()
        found = self._sessions.get(token)
        if found is None:
            return None
        meeting = self.meetings.get(found[0])
        if meeting is None or found[1] not in meeting.attendees:
            return None
        return meeting, meeting.attendees[found[1]]

    # --- time ----------------------------------------------------------------

    def add_meeting(self, meeting: Meeting) -> None:
        """Hold ``meeting`` (replacing an ended one of the same meetingID) and schedule it."""
        if meeting.meeting_id not in self.meetings:
            self._positions[meeting.meeting_id] = next(self._arrivals)
        self.meetings[meeting.meeting_id] = meeting
        if not meeting.ended:
            self._bridges.add(meeting.voice_bridge)
            self.webhooks.meeting_created(meeting)
        self._schedule(meeting)

    @property
    def voice_bridges(self) -> Set[str]:
        """The voice bridges of the live (not ended) meetings."""
        return self._bridges

    def tick(self) -> None:
        """End meetings whose time is up; forget ended ones that lingered long enough."""
        now = self.now_ms()
        for recording in self.recordings.tick(now):
            self.webhooks.recording_published(recording)
        for meeting in self._due(now):
            if meeting.ended:
                if now >= meeting.end_time + self.ended_linger_seconds * 1000:
                    self._forget(meeting)
            elif self._expired(meeting, now):
                self.end_meeting(meeting, forcibly=False)
            else:
                self._schedule(meeting)  # a stale deadline: someone joined since

    def _due(self, now: int) -> list[Meeting]:
        """The held meetings with a deadline at or before ``now``, in ``meetings`` order."""
        held = {
            id(m): m for m in self._deadlines.pop_due(now) if self.meetings.get(m.meeting_id) is m
        }
        return sorted(held.values(), key=lambda m: self._positions[m.meeting_id])

    def _schedule(self, meeting: Meeting) -> None:
        due = self._next_deadline(meeting)
        if due is not None:
            self._deadlines.push(due, meeting)

    def _next_deadline(self, meeting: Meeting) -> float | None:
        """When ``meeting`` may next change by time (ms): the earliest of :meth:`_expired`'s
        limits while live, the end of its linger once ended."""
        if meeting.ended:
            return meeting.end_time + self.ended_linger_seconds * 1000
        limits: list[float] = []
        if meeting.duration > 0:
            limits.append(meeting.create_time + meeting.duration * MINUTE_MS)
        limit = self.expire_unjoined_minutes
        if limit is not None and not meeting.has_user_joined:
            limits.append(meeting.create_time + limit * MINUTE_MS)
        return min(limits, default=None)

    def _reschedule_all(self) -> None:
        self._deadlines.clear()
        for meeting in self.meetings.values():
            self._schedule(meeting)

    def _expired(self, meeting: Meeting, now: int) -> bool:
        if meeting.duration > 0 and now >= meeting.create_time + meeting.duration * MINUTE_MS:
            return True
        limit = self.expire_unjoined_minutes
        return (
            limit is not None
            and not meeting.has_user_joined
            and now >= meeting.create_time + limit * MINUTE_MS
        )

    def end_meeting(self, meeting: Meeting, *, forcibly: bool) -> None:
        """End ``meeting`` now: users leave, notifications are queued."""
        if not meeting.ended:
            self._bridges.discard(meeting.voice_bridge)
        meeting.ended = True
        meeting.end_time = self.now_ms()
        meeting.forcibly_ended = forcibly
        if meeting.record:
            self.recordings.from_meeting(meeting, meeting.end_time)
        posted = analytics.callback(meeting, self.secret, meeting.end_time)
        if posted is not None:
            self._analytics.append(posted)
        for attendee in list(meeting.attendees.values()):
            self.remove_attendee(meeting, attendee)
        self.webhooks.meeting_ended(meeting)
        if meeting.record:
            self.webhooks.recording_archived(meeting.internal_id, meeting.meeting_id)
        # As bbb-web's MeetingService: the endCallbackUrl metadata gets recordingmarks
        # and the meetingID appended; meetingEndedURL is called as given.
        callback = meeting.metadata.get("endcallbackurl", "")
        if callback:
            extra = urlencode([("recordingmarks", "false"), ("meetingID", meeting.meeting_id)])
            self._outbox.append(append_query(callback, extra))
        if meeting.meeting_ended_url:
            self._outbox.append(meeting.meeting_ended_url)
        if self.ended_linger_seconds <= 0:
            self._forget(meeting)
        else:
            self._schedule(meeting)

    def _forget(self, meeting: Meeting) -> None:
        if self.meetings.get(meeting.meeting_id) is meeting:
            del self.meetings[meeting.meeting_id]
            del self._positions[meeting.meeting_id]

    # --- for the trio layer and metrics ----------------------------------------

    def take_notifications(self) -> list[str]:
        """The end-notification URLs to GET now (each handed out once)."""
        urls, self._outbox = self._outbox, []
        self.notified.extend(urls)
        return urls

    def take_analytics(self) -> list[tuple[str, str, bytes]]:
        """The analytics callbacks to POST now, (URL, JWT, JSON body), each handed out once."""
        posts, self._analytics = self._analytics, []
        return posts

    def statistics(self) -> SimulatorStatistics:
        live = [m for m in self.meetings.values() if not m.ended]
        return SimulatorStatistics(
            meetings=len(live),
            running_meetings=sum(1 for m in live if m.running),
            attendees=sum(len(m.attendees) for m in live),
            requests=len(self.requests),
            notifications_sent=len(self.notified),
        )


def _check_content_type(request: ApiRequest) -> None:
    """bbb-web's ContentTypeValidator: checked only when a body is present."""
    if request.call == "insertDocument":
        return  # insertDocument checks its own (XML only), body or not
    has_body = bool(request.body) or bool(request.form_params)
    allowed = meetings.FORM_TYPES
    if request.call == "create":
        allowed = allowed | meetings.XML_TYPES
    if has_body and request.content_type not in allowed:
        raise meetings.unsupported_content_type()
