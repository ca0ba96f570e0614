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

from proxy import request_log
from proxy.backends.client import Reply
from proxy.bbb import envelope, redirects, rewrite
from proxy.errors import (
    BackendError,
    BackendRedirect,
    BackendUnavailable,
    NotFound,
    ProxyError,
    ValidationError,
)
from proxy.gateway import Gateway
from proxy.ledger.model import Reservation
from proxy.request import Answer, ApiRequest

log = logging.getLogger(__name__)
_XML_BODY = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
XML_TYPES = ("application/xml", "text/xml")


async def pinned(gw: Gateway, req: ApiRequest) -> Reservation | None:
    """The request's meeting, as the ledger holds it (after catching up with other
    instances when it is not found: read-your-writes)."""
    return await gw.ledger.lookup((req.customer.id, req.meeting_id()))


def backend_params(req: ApiRequest, reservation: Reservation) -> list[tuple[str, str]]:
    params = rewrite.without(req.params, [])
    return rewrite.replace_param(params, "meetingID", reservation.backend_meeting_id)


async def forward(gw: Gateway, req: ApiRequest, reservation: Reservation) -> Reply:
    client = gw.client(reservation.backend_id)
    params = backend_params(req, reservation)
    who = req.customer.id  # its fair share of the backend's connections applies
    if req.body is not None:
        return await client.call(
            req.call, params, body=req.body, content_type=req.content_type, customer=who
        )
    return await client.call(req.call, params, customer=who)


async def released_if_gone(gw: Gateway, reply: Reply, reservation: Reservation) -> None:
    """A backend's notFound for a pinned meeting means it ended: free its connections."""
    if not reply.ok and reply.message_key == "notFound":
        await released_if_current(gw, reservation, "gone")


async def released_if_current(gw: Gateway, reservation: Reservation, reason: str) -> None:
    """Release ``reservation`` if the ledger still holds that very instance.

    The backend's answer came after an ``await``: meanwhile the meeting may have
    ended and been created again under the same meetingID, and the answer about
    the old one must not free the new one.
    """
    held = gw.ledger.get(reservation.key)
    if held is not None and held.created_at == reservation.created_at:
        await gw.ledger.release(reservation.key, reason)
        await gw.hooks.meeting_ended(*reservation.key)  # its hooks expire a grace later


def restored(reply: Reply, reservation: Reservation) -> Answer:
    if reply.ok:
        rewrite.restore_meeting(reply.root, reservation.meeting_id, reservation.asked_duration)
    return Answer.xml(rewrite.serialise(reply.root))


# -- calls -------------------------------------------------------------------------------------


async def end(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = await pinned(gw, req)
    if reservation is None:
        raise NotFound()
    gw.ledger.check_writable()  # a failed journal: serverUnavailable, the meeting goes on
    reply = await forward(gw, req, reservation)
    if reply.ok:
        await released_if_current(gw, reservation, "end")
    await released_if_gone(gw, reply, reservation)
    return restored(reply, reservation)


async def get_meeting_info(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = await pinned(gw, req)
    if reservation is None:
        raise NotFound()
    reply = await forward(gw, req, reservation)
    await released_if_gone(gw, reply, reservation)
    return restored(reply, reservation)


async def is_meeting_running(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = await pinned(gw, req)
    if reservation is None:
        return Answer.xml(envelope.success([("running", False)]))
    return restored(await forward(gw, req, reservation), reservation)


async def send_chat_message(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = await pinned(gw, req)
    if reservation is None:
        raise NotFound()
    return restored(await forward(gw, req, reservation), reservation)


async def insert_document(gw: Gateway, req: ApiRequest) -> Answer:
    reservation = await pinned(gw, req)
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


async def join(gw: Gateway, req: ApiRequest) -> Answer:
    """A 302 to the backend's own join URL, re-signed, answered locally (SPEC §6).

    With ``redirect=false`` the backend is asked instead, and its XML answered
    (:func:`_join_xml`).  A meeting pinned to a DOWN backend is ``serverUnavailable``
    rather than a redirect to a dead host.

    Error handling: raises ``ValidationError`` (no ``fullName``, checked before the
    meeting is looked up), ``NotFound``, ``BackendUnavailable`` (DOWN backend, plain
    join) and the backend's own join errors; :func:`join_error` renders them.
    """
    reservation = await pinned(gw, req)
    full_name = req.first("fullName")
    if full_name is None or not full_name.strip():
        raise ValidationError(
            "You must specify a name for the attendee who will be joining the meeting.",
            message_key="missingParamFullName",
        )
    if reservation is None:
        raise NotFound()
    if not wants_redirect(req.first("redirect")):
        return await _join_xml(gw, req, reservation)
    if gw.backend_down(reservation.backend_id):
        raise _down(reservation)
    params = backend_params(req, reservation)
    request_log.note_backend(reservation.backend_id)  # the user is sent there
    return Answer.redirect(gw.client(reservation.backend_id).url("join", params))


def _down(reservation: Reservation) -> BackendUnavailable:
    return BackendUnavailable(reservation.backend_id, "DOWN: the meeting must be created again")


def wants_redirect(value: str | None) -> bool:
    """bbb-web's ``Boolean.parseBoolean(redirect)`` when given: only "true" (any case)."""
    return value is None or value.strip().lower() == "true"


async def _join_xml(gw: Gateway, req: ApiRequest, reservation: Reservation) -> Answer:
    """join with ``redirect=false``: the backend's ``join-meeting`` XML, IDs restored.

    Error handling: a join error of the backend's own (its 302 with ``errors=``) is
    raised as that error, so it is rendered like the gateway's join errors; a backend
    that cannot be reached or answers garbage is BBB's XML envelope, since the client
    asked for XML and the join never reached BBB's own checks.  So is a DOWN backend.
    """
    if gw.backend_down(reservation.backend_id):
        return Answer.xml(envelope.from_error(_down(reservation)))
    try:
        reply = await forward(gw, req, reservation)
    except BackendRedirect as redirect:
        error = redirects.join_error_in(redirect.location)
        if error is None:  # a 302 without BBB's errors=: not an answer BBB gives
            log.warning("join (redirect=false) of %s: a 302 without errors=", reservation.key)
            return Answer.xml(envelope.from_error(redirect))
        if error.message_key == "notFound":
            await released_if_current(gw, reservation, "gone")
        raise error from None
    except BackendError as exc:
        log.warning("join (redirect=false) of %s failed: %s", reservation.key, exc)
        return Answer.xml(envelope.from_error(exc))
    return restored(reply, reservation)


def join_error(gw: Gateway, signed: list[tuple[str, str]] | None, error: ProxyError) -> Answer:
    """bbb-web renders join errors as a redirect to the logout URL with ``errors=``.

    ``signed`` are the request's parameters if its checksum verified, else None: only
    then may the request choose where the browser goes (:mod:`proxy.bbb.redirects`).
    A target that cannot be put in a ``Location`` header answers BBB's XML envelope.
    """
    target = redirects.join_error_target(signed, gw.config.proxy.join_error_url)
    if target is redirects.NO_TARGET:
        return Answer.xml(envelope.from_error(error))
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
                    nursery.start_soon(_collect, gw, backend_id, replies, req.customer.id)
    meetings = [
        rewrite.serialise(m)
        for backend in gw.backends()
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


async def _collect(gw: Gateway, backend_id: str, replies: dict[str, Reply], customer: str) -> None:
    try:
        reply = await gw.client(backend_id).call("getMeetings", [], customer=customer)
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
