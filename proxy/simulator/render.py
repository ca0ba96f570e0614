"""BBB 3.0's XML answers, written the way bbb-web's FreeMarker templates write them.

Element names and their order follow ``create-meeting.ftlx``,
``get-meeting-info.ftlx``, ``get-meetings.ftlx``, ``join-meeting.ftlx`` and
``api-version.ftlx``; values are XML-escaped (``auto_esc=true``), booleans
lower-case, times epoch milliseconds, no prolog, whitespace compressed away.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.bbb.envelope import element

from .model import Attendee, Meeting

SUCCESS = "<returncode>SUCCESS</returncode>"
DUPLICATE_WARNING = (
    "duplicateWarning",
    "This conference was already in existence and may currently be in progress.",
)
END_SENT = (
    "sentEndMeetingRequest",
    "A request to end the meeting was sent.  Please wait a few seconds, and then use the "
    "getMeetingInfo or isMeetingRunning API calls to verify that it was ended.",
)
NO_MEETINGS = ("noMeetings", "no meetings were found on this server")
NO_RECORDINGS = ("noRecordings", "There are no recordings for the meeting(s).")
JOINED = ("successfullyJoined", "You have joined successfully.")


def response(*parts: str) -> str:
    """``<response><returncode>SUCCESS</returncode>...parts...</response>``."""
    return f"<response>{SUCCESS}{''.join(parts)}</response>"


def fields(pairs: Iterable[tuple[str, object]]) -> str:
    return "".join(element(name, value) for name, value in pairs)


def container(name: str, inner: str) -> str:
    return f"<{name}>{inner}</{name}>"


def message(key: str, text: str) -> str:
    return element("messageKey", key) + element("message", text)


def version_document(api_url: str) -> str:
    """``api-version.ftlx``; ``bbbVersion`` is empty unless allowRevealOfBBBVersion."""
    graphql = api_url.split("/bigbluebutton/api", 1)[0]
    ws = graphql.replace("http", "ws", 1)
    return response(
        fields(
            [
                ("version", "2.0"),
                ("apiVersion", "2.0"),
                ("bbbVersion", ""),
                ("graphqlWebsocketUrl", f"{ws}/graphql"),
                ("graphqlApiUrl", f"{graphql}/api/rest"),
            ]
        )
    )


def create_response(meeting: Meeting, message_key: str = "", text: str = "") -> str:
    """``create-meeting.ftlx``: messageKey/message present but empty on a fresh create."""
    return response(
        fields(
            [
                ("meetingID", meeting.meeting_id),
                ("internalMeetingID", meeting.internal_id),
                ("parentMeetingID", "bbb-none"),
                ("attendeePW", meeting.attendee_pw),
                ("moderatorPW", meeting.moderator_pw),
                ("createTime", meeting.create_time),
                ("voiceBridge", meeting.voice_bridge),
                ("dialNumber", meeting.dial_number),
                ("createDate", meeting.create_date),
                ("hasUserJoined", meeting.has_user_joined),
                ("duration", meeting.duration),
                ("hasBeenForciblyEnded", meeting.forcibly_ended),
            ]
        ),
        message(message_key, text),
    )


def _attendee(attendee: Attendee) -> str:
    leaves = fields(
        [
            ("userID", attendee.user_id),
            ("fullName", attendee.full_name),
            ("role", attendee.role),
            ("isPresenter", attendee.is_presenter),
            ("isListeningOnly", False),
            ("hasJoinedVoice", False),
            ("hasVideo", False),
            ("clientType", attendee.client_type),
        ]
    )
    return container("attendee", leaves + container("customdata", fields(attendee.customdata)))


def meeting_details(meeting: Meeting) -> str:
    """The body shared by getMeetingInfo and each getMeetings ``<meeting>``."""
    counts = fields(
        [
            ("meetingName", meeting.name),
            ("meetingID", meeting.meeting_id),
            ("internalMeetingID", meeting.internal_id),
            ("createTime", meeting.create_time),
            ("createDate", meeting.create_date),
            ("voiceBridge", meeting.voice_bridge),
            ("dialNumber", meeting.dial_number),
            ("attendeePW", meeting.attendee_pw),
            ("moderatorPW", meeting.moderator_pw),
            ("running", meeting.running),
            ("duration", meeting.duration),
            ("hasUserJoined", meeting.has_user_joined),
            ("recording", False),
            ("hasBeenForciblyEnded", meeting.forcibly_ended),
            ("startTime", meeting.start_time),
            ("endTime", meeting.end_time),
            ("participantCount", len(meeting.attendees)),
            ("listenerCount", 0),
            ("voiceParticipantCount", 0),
            ("videoCount", 0),
            ("maxUsers", meeting.max_participants),
            ("moderatorCount", meeting.moderator_count),
        ]
    )
    attendees = "".join(_attendee(a) for a in meeting.attendees.values())
    return (
        counts
        + container("attendees", attendees)
        + container("metadata", fields(meeting.metadata.items()))
        + element("isBreakout", False)
    )


def meeting_info(meeting: Meeting) -> str:
    return response(meeting_details(meeting))


def meetings_list(meetings: Iterable[Meeting]) -> str:
    inner = "".join(container("meeting", meeting_details(m)) for m in meetings)
    if not inner:
        return response("<meetings/>", message(*NO_MEETINGS))
    return response(container("meetings", inner))


def running(is_running: bool) -> str:
    return response(element("running", is_running))


def join_xml(meeting: Meeting, attendee: Attendee, url: str) -> str:
    """``join-meeting.ftlx`` (redirect=false)."""
    return response(
        message(*JOINED),
        fields(
            [
                ("meeting_id", meeting.internal_id),
                ("user_id", attendee.internal_id),
                ("auth_token", attendee.auth_token),
                ("session_token", attendee.session_token),
                ("guestStatus", "ALLOW"),
                ("url", url),
            ]
        ),
    )


def end_sent() -> str:
    return response(message(*END_SENT))


def document_uploading() -> str:
    """``insert-document.ftlx``: a message and no messageKey."""
    return response(element("message", "Presentation is being uploaded"))


def empty_message() -> str:
    """sendChatMessage: SUCCESS with empty messageKey/message."""
    return response(message("", ""))


def no_recordings() -> str:
    return response("<recordings></recordings>", message(*NO_RECORDINGS))
