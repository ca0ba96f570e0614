"""The meeting calls: create, end, getMeetingInfo, getMeetings, isMeetingRunning,
insertDocument and sendChatMessage (recordings: :mod:`.recordings`).

Each handler decides an answer from the simulator's state and the request;
none does I/O.  End notifications are queued on the simulator and sent by the
trio layer.  Quotes are from bbb-api.md §2.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from lxml import etree

from proxy.errors import ApiError, NotFound
from proxy.request import strip_control_chars

from . import render
from .model import (
    ApiRequest,
    Meeting,
    Reply,
    java_date,
    random_password,
    random_voice_bridge,
)
from .params import Params

if TYPE_CHECKING:
    from .core import Simulator

DEFAULT_DIAL_NUMBER = "613-555-1234"  # bbb-web's defaultDialAccessNumber
META_KEY = re.compile(r"meta_[a-zA-Z][a-zA-Z0-9-]*")
XML_TYPES = frozenset({"application/xml", "text/xml"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
REFUSED_CREATE = ("internalError", "The meeting could not be created on this server.")
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def find_meeting(sim: Simulator, params: Params) -> Meeting:
    """The meeting named by ``meetingID``; ``notFound`` when there is none."""
    meeting = sim.meetings.get(params.meeting_id())
    if meeting is None:
        raise NotFound()
    return meeting


def unsupported_content_type() -> ApiError:
    return ApiError(
        "POST request Content-Type is missing or unsupported",
        message_key="unsupportedContentType",
    )


def parse_xml_body(body: bytes) -> None:
    """Raise a FAILED answer unless ``body`` is well-formed XML (``<modules>``)."""
    try:
        etree.fromstring(body, _XML_PARSER)
    except etree.XMLSyntaxError:
        raise ApiError(
            "The XML body of the request could not be parsed", message_key="invalidXML"
        ) from None


# --- create -----------------------------------------------------------------


def create(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    if sim.behaviour.mode == "refuse_create":
        raise ApiError(REFUSED_CREATE[1], message_key=REFUSED_CREATE[0])
    meeting_id = params.meeting_id()
    name = _meeting_name(params)
    if req.body and req.content_type in XML_TYPES:
        parse_xml_body(req.body)
    existing = sim.meetings.get(meeting_id)
    if existing is not None and not existing.ended:
        return _duplicate_create(existing, params)
    meeting = _new_meeting(sim, meeting_id, name, params)
    sim.add_meeting(meeting)
    return Reply.xml(render.create_response(meeting))


def _meeting_name(params: Params) -> str:
    name = params.required("name", "validationError", "You must provide a meeting name")
    if not 2 <= len(name) <= 256:
        raise ApiError("Name must be between 2 and 256 characters", message_key="validationError")
    return strip_control_chars(name)


def _duplicate_create(existing: Meeting, params: Params) -> Reply:
    """ "same ID + same or no passwords = SUCCESS duplicateWarning", else idNotUnique."""
    attendee_pw, moderator_pw = params.given("attendeePW"), params.given("moderatorPW")
    if attendee_pw in (None, existing.attendee_pw) and moderator_pw in (
        None,
        existing.moderator_pw,
    ):
        return Reply.xml(render.create_response(existing, *render.DUPLICATE_WARNING))
    raise ApiError(
        "A meeting already exists with that meeting ID.  Please use a different meeting ID.",
        message_key="idNotUnique",
    )


def _new_meeting(sim: Simulator, meeting_id: str, name: str, params: Params) -> Meeting:
    create_time = sim.now_ms()
    return Meeting(
        meeting_id=meeting_id,
        name=name,
        internal_id=f"{hashlib.sha1(meeting_id.encode()).hexdigest()}-{create_time}",
        create_time=create_time,
        create_date=java_date(create_time),
        voice_bridge=_voice_bridge(sim, params),
        dial_number=params.given("dialNumber") or DEFAULT_DIAL_NUMBER,
        attendee_pw=params.given("attendeePW") or random_password(),
        moderator_pw=params.given("moderatorPW") or random_password(),
        duration=params.integer("duration"),
        max_participants=params.integer("maxParticipants"),
        record=params.boolean("record"),
        logout_url=params.given("logoutURL") or "",
        meeting_ended_url=params.given("meetingEndedURL") or "",
        welcome=params.get("welcome") or "",
        moderator_only_message=params.get("moderatorOnlyMessage") or "",
        metadata=_metadata(params),
        params=list(params.pairs),
        start_time=create_time,
    )


def _voice_bridge(sim: Simulator, params: Params) -> str:
    live = sim.voice_bridges
    if params.given("voiceBridge") is None:
        return random_voice_bridge(live)
    wanted = (params.given("voiceBridge") or "").strip()  # kept as written, as bbb-web does
    if not wanted.isascii() or not wanted.isdigit():
        raise ApiError("Voice bridge must be an integer.", message_key="validationError")
    if wanted in live:
        raise ApiError(
            "The selected voice bridge is already in use.", message_key="nonUniqueVoiceBridge"
        )
    return wanted


def _metadata(params: Params) -> dict[str, str]:
    """``meta_*`` keys matching BBB's regex, stored lower-cased without the prefix."""
    return {
        key[len("meta_") :].lower(): value for key, value in params.pairs if META_KEY.fullmatch(key)
    }


# --- end, info, lists -------------------------------------------------------


def end(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    meeting = find_meeting(sim, params)
    password = params.given("password")
    if password is not None and password != meeting.moderator_pw:
        raise ApiError(
            "The supplied moderator password is incorrect", message_key="invalidPassword"
        )
    if not meeting.ended:
        sim.end_meeting(meeting, forcibly=True)
    return Reply.xml(render.end_sent())


def get_meeting_info(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    return Reply.xml(render.meeting_info(find_meeting(sim, params)))


def get_meetings(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    return Reply.xml(render.meetings_list(sim.meetings.values()))


def is_meeting_running(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    """Unknown meeting is "not an error (running=false)"."""
    meeting = sim.meetings.get(params.meeting_id())
    return Reply.xml(render.running(meeting is not None and meeting.running))


# --- in-meeting calls -------------------------------------------------------


def insert_document(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    if req.content_type not in XML_TYPES:
        raise unsupported_content_type()
    meeting_id = params.meeting_id()
    meeting = sim.meetings.get(meeting_id)
    if meeting is None or meeting.ended:
        raise NotFound(f"Meeting with id [{meeting_id}] not found.")
    parse_xml_body(req.body)
    meeting.documents_inserted += 1
    return Reply.xml(render.document_uploading())


def send_chat_message(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    meeting = find_meeting(sim, params)
    text = params.required("message", "validationError", "You must provide a message")
    meeting.chat_messages.append((params.given("userName") or "System", text))
    sim.webhooks.chat_sent(meeting, *meeting.chat_messages[-1])
    return Reply.xml(render.empty_message())
