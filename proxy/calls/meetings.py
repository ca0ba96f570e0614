"""The meeting calls forwarded to the meeting's backend, join, and getMeetings.

Each call finds the meeting's pin in the ledger.  A meeting the ledger does not
hold answers as BBB answers an unknown meeting (``notFound``, or
``running=false`` for isMeetingRunning).  When a backend says a pinned meeting
is gone, its connections are freed at once.
"""

from __future__ import annotations

import logging

import trio
from lxml import etree

from proxy.backends.client import Reply
from proxy.bbb import envelope, rewrite
from proxy.errors import BackendError, NotFound, ProxyError, ValidationError
from proxy.gateway import Gateway
from proxy.ledger.model import Reservation
from proxy.request import Answer, ApiRequest

log = logging.getLogger(__name__)
_XML_BODY = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
XML_TYPES = ("application/xml", "text/xml")


def pinned(gw: Gateway, req: ApiRequest) -> Reservation | None:
    return gw.ledger.get((req.customer.id, req.meeting_id()))


def backend_params(req: ApiRequest, reservation: Reservation) -> list[tuple[str, str]]:
    params = rewrite.without(req.params, [])
    return rewrite.replace_param(params, "meetingID", reservation.backend_meeting_id)


async def forward(gw: Gateway, req: ApiRequest, reservation: Reservation) -> Reply:
    client = gw.client(reservation.backend_id)
    params = backend_params(req, reservation)
    if req.body is not None:
        return await client.call(req.call, params, body=req.body, content_type=req.content_type)
    return await client.call(req.call, params)


async def released_if_gone(gw: Gateway, reply: Reply, reservation: Reservation) -> None:
    """A backend's notFound for a pinned meeting means it ended: free its connections."""
    if not reply.ok and reply.message_key == "notFound":
        await gw.ledger.release(reservation.key, "gone")


def restored(reply: Reply, reservation: Reservation) -> Answer:
    if reply.ok:
        rewrite.restore_meeting(reply.root, reservation.meeting_id, reservation.asked_duration)
    return Answer.xml(rewrite.serialise(reply.root))


# -- calls -------------------------------------------------------------------------------------


async def end(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = pinned(gw, req)
    if reservation is None:
        raise NotFound()
    reply = await forward(gw, req, reservation)
    if reply.ok:
        await gw.ledger.release(reservation.key, "end")
    await released_if_gone(gw, reply, reservation)
    return restored(reply, reservation)


async def get_meeting_info(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = pinned(gw, req)
    if reservation is None:
        raise NotFound()
    reply = await forward(gw, req, reservation)
    await released_if_gone(gw, reply, reservation)
    return restored(reply, reservation)


async def is_meeting_running(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = pinned(gw, req)
    if reservation is None:
        return Answer.xml(envelope.success([("running", False)]))
    return restored(await forward(gw, req, reservation), reservation)


async def send_chat_message(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = pinned(gw, req)
    if reservation is None:
        raise NotFound()
    return restored(await forward(gw, req, reservation), reservation)


async def insert_document(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = pinned(gw, req)
    if req.body is None or (req.content_type or "").split(";")[0].strip() not in XML_TYPES:
        raise ValidationError(
            "POST request Content-Type is missing or unsupported",
            message_key="unsupportedContentType",
        )
    _check_xml(req.body)
    if reservation is None:
        raise NotFound(f"Meeting with id [{req.meeting_id()}] not found.")
    return restored(await forward(gw, req, reservation), reservation)


def _check_xml(body: bytes) -> None:
    try:
        root = etree.fromstring(body, _XML_BODY)
    except etree.XMLSyntaxError:
        raise ValidationError("The XML body could not be parsed") from None
    if root.tag != "modules":
        raise ValidationError("The XML body must be a <modules> document")


def join(gw: Gateway, req: ApiRequest) -> Answer:
    """Answered locally: a 302 to the backend's own join URL, re-signed (SPEC §6)."""
    reservation = pinned(gw, req)
    full_name = req.first("fullName")
    if full_name is None or not full_name.strip():
        raise ValidationError(
            "You must specify a name for the attendee who will be joining the meeting.",
            message_key="missingParamFullName",
        )
    if reservation is None:
        raise NotFound()
    location = gw.client(reservation.backend_id).url("join", backend_params(req, reservation))
    return Answer.redirect(location)


def join_error(gw: Gateway, req_params: list[tuple[str, str]], error: ProxyError) -> Answer:
    """bbb-web renders join errors as a redirect to the logout URL with ``errors=``."""
    values = rewrite.first_values(req_params)
    target = (
        values.get("errorRedirectUrl") or values.get("logoutURL") or gw.config.proxy.join_error_url
    )
    return Answer.redirect(envelope.join_error_location(target, error.message_key, error.message))


async def get_meetings(gw: Gateway, req: ApiRequest) -> Answer:
    """This customer's meetings, from the backends that hold them, in parallel, with a deadline.

    The ledger says which meetings are the customer's and where they run, so only those
    backends are asked, and only meetings the ledger holds are listed: exactly the ones
    getMeetingInfo, join and end can reach.  A backend that fails or is too slow is left out.
    """
    held = gw.ledger.state.customer_meetings(req.customer.id)
    mine = {(r.backend_id, r.backend_meeting_id): r for r in held}
    holding = {backend_id for backend_id, _ in mine}
    replies: dict[str, Reply] = {}
    with trio.move_on_after(gw.config.proxy.timeouts.get_meetings):
        async with trio.open_nursery() as nursery:
            for backend_id in gw.in_service():
                if backend_id in holding:
                    nursery.start_soon(_collect, gw, backend_id, replies)
    meetings = [
        rewrite.serialise(m)
        for backend in gw.config.backends
        if backend.id in replies
        for m in _listed(backend.id, replies[backend.id], mine)
    ]
    if not meetings:
        return Answer.xml(
            "<response><returncode>SUCCESS</returncode><meetings/>"
            "<messageKey>noMeetings</messageKey>"
            "<message>no meetings were found on this server</message></response>"
        )
    body = "".join(meetings)
    return Answer.xml(
        f"<response><returncode>SUCCESS</returncode><meetings>{body}</meetings></response>"
    )


async def _collect(gw: Gateway, backend_id: str, replies: dict[str, Reply]) -> None:
    try:
        reply = await gw.client(backend_id).call("getMeetings", [])
    except BackendError as exc:
        log.warning("getMeetings: leaving out %s: %s", backend_id, exc)
        return
    if reply.ok:
        replies[backend_id] = reply


def _listed(
    backend_id: str, reply: Reply, mine: dict[tuple[str, str], Reservation]
) -> list[etree._Element]:
    """The meetings of ``reply`` that are the customer's, rewritten for its eyes."""
    found = []
    for meeting in reply.root.iterfind("meetings/meeting"):
        reservation = mine.get((backend_id, meeting.findtext("meetingID") or ""))
        if reservation is None:
            continue
        rewrite.restore_meeting(meeting, reservation.meeting_id, reservation.asked_duration)
        found.append(meeting)
    return found
