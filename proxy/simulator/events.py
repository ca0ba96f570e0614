"""The mapped events a BBB server's webhooks service (bbb-webhooks 3.x) sends, built from
the simulator's state, without I/O.

Shapes follow bbb-webhooks' own example events (``tests/fixtures/bbb/bbb-webhooks/
mapped-events.json``, sources in its SOURCES.md) key for key: every event is ``{"data":
{"type": "event", "id": <event id>, "attributes": {"meeting": {"internal-meeting-id",
"external-meeting-id"}, ...}, "event": {"ts": <epoch ms>}}}``.

Personal data is carried as real servers send it, so that what the gateway must remove
is there to remove: ``meeting-created`` has the passwords and the whole metadata (the
gateway's own tags and callback URLs among it); ``user-joined`` the user's name, external
user id and role, and -- bbb-api.md §3 "when present" -- the joining request's
``ip-address``, ``user-agent`` and ``referer``, the ``session-token`` and the join's
``userdata-*`` parameters; ``chat-group-message-sent`` the text and the sender's name.

Recording events (bbb-api.md §3; no fixture holds one): ``rap-*`` carry ``record-id`` and
``workflow``; the ``-ended`` steps add ``success`` and ``step-time``; ``rap-publish-ended``
adds ``recording`` (name, times, sizes, metadata, playback).
"""

from __future__ import annotations

from typing import Any

from .model import Attendee, Meeting

type Event = dict[str, Any]

PUBLIC_CHAT = "MAIN-PUBLIC-GROUP-CHAT"  # bbb-webhooks maps public chat only
SYSTEM_SENDER = "not-used"  # sendChatMessage's sender id, as the raw events show it
# A recording's steps (bbb-webhooks' rap-* ids): when the meeting ends, and when published.
ARCHIVE_STEPS = ("archive", "sanity")
PUBLISH_STEPS = ("process", "publish", "post-publish")
STEP_MS = 1000  # step-time the simulator reports for every step


def event(event_id: str, meeting: dict[str, Any], ts: int, **attributes: Any) -> Event:
    """One mapped event: ``meeting`` holds at least the two meeting ids."""
    return {
        "data": {
            "type": "event",
            "id": event_id,
            "attributes": {"meeting": meeting, **attributes},
            "event": {"ts": ts},
        }
    }


def meeting_ids(internal_id: str, external_id: str) -> dict[str, Any]:
    return {"internal-meeting-id": internal_id, "external-meeting-id": external_id}


def _ids(meeting: Meeting) -> dict[str, Any]:
    return meeting_ids(meeting.internal_id, meeting.meeting_id)


def meeting_created(meeting: Meeting, ts: int) -> Event:
    details = {
        **_ids(meeting),
        "name": meeting.name,
        "is-breakout": False,
        "parent-id": "bbb-none",
        "duration": meeting.duration,
        "create-time": meeting.create_time,
        "create-date": meeting.create_date,
        "moderator-pass": meeting.moderator_pw,
        "viewer-pass": meeting.attendee_pw,
        "record": meeting.record,
        "voice-conf": meeting.voice_bridge,
        "dial-number": meeting.dial_number,
        "max-users": meeting.max_participants,
        "metadata": dict(meeting.metadata),
    }
    return event("meeting-created", details, ts)


def meeting_ended(meeting: Meeting, ts: int) -> Event:
    return event("meeting-ended", _ids(meeting), ts)


def user_joined(meeting: Meeting, attendee: Attendee, client: dict[str, str], ts: int) -> Event:
    """``client``: ``ip-address``, ``user-agent``, ``referer`` of the join (empty ones left out)."""
    user: dict[str, Any] = {
        "internal-user-id": attendee.internal_id,
        "external-user-id": attendee.user_id,
        "name": attendee.full_name,
        "role": attendee.role,
        "presenter": attendee.is_presenter,
        "guest": False,
        **{key: value for key, value in client.items() if value},
        "session-token": attendee.session_token,
    }
    if attendee.customdata:
        user["userdata"] = {f"userdata-{k}": v for k, v in attendee.customdata}
    return event("user-joined", _ids(meeting), ts, user=user)


def user_left(meeting: Meeting, attendee: Attendee, ts: int) -> Event:
    user = {
        "internal-user-id": attendee.internal_id,
        "external-user-id": attendee.user_id,
        "guest": False,
    }
    return event("user-left", _ids(meeting), ts, user=user)


def chat_sent(meeting: Meeting, sender: str, text: str, ts: int, sequence: int) -> Event:
    """A public chat message (sendChatMessage: sent by the system in ``sender``'s name)."""
    message = {
        "id": f"{ts}-{sequence:08d}",
        "message": text,
        "sender": {"internal-user-id": SYSTEM_SENDER, "name": sender, "time": ts},
    }
    built = event("chat-group-message-sent", _ids(meeting), ts, **{"chat-message": message})
    built["data"]["attributes"]["chat-id"] = PUBLIC_CHAT
    return built


def rap_step(
    step: str,
    phase: str,
    record_id: str,
    meeting_id: str,
    ts: int,
    recording: dict[str, Any] | None = None,
) -> Event:
    """``rap-<step>-<phase>`` (phase ``started`` or ``ended``) of recording ``record_id``;
    ``recording``: :func:`recording_details`, for ``rap-publish-ended``."""
    attributes: dict[str, Any] = {"record-id": record_id}
    if phase == "ended":
        attributes |= {"success": True, "step-time": STEP_MS}
    attributes["workflow"] = "presentation"
    if recording is not None:
        attributes["recording"] = recording
    return event(f"rap-{step}-{phase}", meeting_ids(record_id, meeting_id), ts, **attributes)


def rap_state(event_id: str, record_id: str, meeting_id: str, ts: int) -> Event:
    """``rap-published``, ``rap-unpublished`` or ``rap-deleted`` (publish/deleteRecordings)."""
    return event(event_id, meeting_ids(record_id, meeting_id), ts, **{"record-id": record_id})


def recording_details(
    name: str, start: int, end: int, metadata: dict[str, str], playback: list[dict[str, Any]]
) -> dict[str, Any]:
    """``rap-publish-ended``'s ``recording`` attribute."""
    return {
        "name": name,
        "is-breakout": metadata.get("isBreakout", "false"),
        "start-time": start,
        "end-time": end,
        "size": 250_000 * len(playback),
        "raw-size": 1_000_000,
        "metadata": dict(metadata),
        "playback": playback,
        "download": {},
    }
