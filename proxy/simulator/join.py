"""The join call: admission decisions and where to send the browser.

bbb-api.md §2 join: success is a 302 to the HTML5 client with a 16-character
``sessionToken`` (or, with ``redirect=false``, ``join-meeting.ftlx`` XML).
"Errors on join are not XML": they are a 302 to the logout URL with
``errors=[{"key":…,"message":…}]`` appended -- except a wrong password or a
missing role, which answer HTTP 200 XML FAILED ``Params required``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.bbb.envelope import failure, join_error_location
from proxy.errors import ApiError, NotFound
from proxy.request import strip_control_chars

from . import render
from .model import ApiRequest, Attendee, Meeting, Reply, random_token
from .params import Params

if TYPE_CHECKING:
    from .core import Simulator

ROLES = ("MODERATOR", "VIEWER")
PARAMS_REQUIRED = ("Params required", "You must enter a valid password")
ENDED = (
    "meetingForciblyEnded",
    "You can not re-join a meeting that has already been forcibly ended.",
)
MISMATCH = (
    "mismatchCreateTimeParam",
    "The createTime parameter submitted mismatches with the current meeting.",
)
FULL = (
    "maxParticipantsReached",
    "The number of participants allowed for this meeting has been reached.",
)


class ParamsRequired(ApiError):
    """Wrong password or no role: the one join error answered as XML."""

    message_key, message = PARAMS_REQUIRED


def join(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    try:
        meeting, attendee = _admit(sim, params)
    except ParamsRequired as error:
        return Reply.xml(failure(error.message_key, error.message))
    except ApiError as error:
        return error_redirect(sim, params, error)
    sim.webhooks.user_joined(meeting, attendee, req)
    url = f"{req.origin}/html5client/join?sessionToken={attendee.session_token}"
    if _redirects(params):
        return Reply.redirect(url)
    return Reply.xml(render.join_xml(meeting, attendee, url))


def error_redirect(sim: Simulator, params: Params, error: ApiError) -> Reply:
    """The 302 bbb-web sends a browser whose join failed."""
    target = join_error_location(_error_url(sim, params), error.message_key, error.message)
    return Reply.redirect(target)


def _error_url(sim: Simulator, params: Params) -> str:
    """errorRedirectUrl, else the request's logoutURL, else the meeting's, else the default."""
    meeting = sim.meetings.get((params.get("meetingID") or "").strip())
    return (
        params.given("errorRedirectUrl")
        or params.given("logoutURL")
        or (meeting.logout_url if meeting is not None else "")
        or f"http://{sim.server_name}/home.html"
    )


def _redirects(params: Params) -> bool:
    """``Boolean.parseBoolean(redirect)`` when given: only "true" (any case) redirects."""
    value = params.given("redirect")
    return value is None or value.lower() == "true"


def _admit(sim: Simulator, params: Params) -> tuple[Meeting, Attendee]:
    meeting_id = params.meeting_id()
    full_name = strip_control_chars(
        params.required("fullName", "missingParamFullName", "You must provide your name")
    )
    meeting = sim.meetings.get(meeting_id)
    if meeting is None:
        raise NotFound()
    if meeting.ended:
        raise ApiError(ENDED[1], message_key=ENDED[0])
    _check_create_time(meeting, params)
    role = _role(meeting, params)
    user_id = params.given("userID")
    if user_id is not None and user_id in meeting.unique_user_ids():
        _forget_user(sim, meeting, user_id)  # a rejoin replaces the old session
    elif meeting.max_participants and len(meeting.unique_user_ids()) >= meeting.max_participants:
        raise ApiError(FULL[1], message_key=FULL[0])
    return meeting, sim.add_attendee(meeting, _attendee(full_name, role, user_id, params))


def _check_create_time(meeting: Meeting, params: Params) -> None:
    if params.given("createTime") is None:
        return
    if params.integer("createTime") != meeting.create_time:
        raise ApiError(MISMATCH[1], message_key=MISMATCH[0])


def _role(meeting: Meeting, params: Params) -> str:
    """``role`` (case-insensitive), else the deprecated ``password``."""
    role = (params.given("role") or "").upper()
    if role in ROLES:
        return role
    password = params.given("password")
    if password is not None and password == meeting.moderator_pw:
        return "MODERATOR"
    if password is not None and password == meeting.attendee_pw:
        return "VIEWER"
    raise ParamsRequired()


def _forget_user(sim: Simulator, meeting: Meeting, user_id: str) -> None:
    for attendee in [a for a in meeting.attendees.values() if a.user_id == user_id]:
        sim.remove_attendee(meeting, attendee)


def _attendee(full_name: str, role: str, user_id: str | None, params: Params) -> Attendee:
    internal_id = "w_" + random_token(12)
    return Attendee(
        internal_id=internal_id,
        user_id=user_id or internal_id,
        full_name=full_name,
        role=role,
        customdata=_customdata(params),
        session_token=random_token(16),
        auth_token=random_token(12),
    )


def _customdata(params: Params) -> list[tuple[str, str]]:
    """``userdata-<key>`` parameters; like bbb-web, keys with a further ``-`` are dropped."""
    found = []
    for key, value in params.pairs:
        parts = key.split("-")
        if len(parts) == 2 and parts[0] == "userdata" and _xml_name(parts[1]):
            found.append((parts[1], value))
    return found


def _xml_name(name: str) -> bool:
    return (
        bool(name)
        and (name[0].isalpha() or name[0] == "_")
        and all(c.isalnum() or c in "_." for c in name)
    )
