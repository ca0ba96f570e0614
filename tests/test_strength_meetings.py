"""Tests written to kill mutants of ``proxy.calls.meetings`` that survived (docs/mutation.md).

Over real sockets where the rule is about what a client is answered (insertDocument's
refusals, join of a meeting on a DOWN backend, a backend's 302 without ``errors=``), and
on the module's own functions where no request reaches a branch (the body a request
brings is already checked and re-serialised by :func:`proxy.bbb.bodies.checked_xml`).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, cast

import httpx
import orjson
import pytest
from lxml import etree

from proxy.backends.monitor import poll_once
from proxy.calls import meetings
from proxy.errors import BackendRedirect, NotFound, ValidationError
from proxy.gateway import Gateway
from proxy.request import ApiRequest
from tests.harness import Stack, StackFactory, query_of, text

JOIN = [("meetingID", "room-1"), ("fullName", "Ada"), ("role", "VIEWER")]
NO_REDIRECT = [*JOIN, ("redirect", "false")]
MODULES = b'<modules><module name="presentation"><document url="https://x.test/a.pdf"/></module></modules>'


def failure(response: httpx.Response) -> tuple[str, str]:
    """(messageKey, message) of a FAILED XML answer."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    root = etree.fromstring(response.content)
    assert text(root, "returncode") == "FAILED"
    return text(root, "messageKey"), text(root, "message")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == meetings.log.name and r.levelno == logging.WARNING
    ]


def spy_releases(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, str]]:
    """The (key, reason) of every release the gateway's ledger is asked for."""
    seen: list[tuple[Any, str]] = []
    ledger = stack.gateway.ledger
    release = ledger.release

    async def spy(key: Any, reason: str) -> Any:
        seen.append((key, reason))
        return await release(key, reason)

    monkeypatch.setattr(ledger, "release", spy)
    return seen


# -- insertDocument ----------------------------------------------------------------------------


async def test_insert_document_without_a_body_is_unsupported_content_type(stack: Stack) -> None:
    await stack.create("room-1")
    response = await stack.http.get(stack.signed("insertDocument", [("meetingID", "room-1")]))
    assert failure(response) == (
        "unsupportedContentType",
        "POST request Content-Type is missing or unsupported",
    )


async def test_insert_document_of_an_unknown_meeting_names_it(stack: Stack) -> None:
    response = await stack.http.post(
        stack.signed("insertDocument", [("meetingID", "no-such-room")]),
        content=MODULES,
        headers={"Content-Type": "text/xml; charset=utf-8"},
    )
    assert failure(response) == ("notFound", "Meeting with id [no-such-room] not found.")


def unpinned() -> Gateway:
    """A gateway whose ledger holds no meeting (insert_document looks no further)."""

    async def lookup(key: Any) -> None:
        return None

    return cast(Gateway, SimpleNamespace(ledger=SimpleNamespace(lookup=lookup)))


def insert_request(body: bytes | None, content_type: str | None) -> ApiRequest:
    customer = cast(Any, SimpleNamespace(id="acme"))
    params = [("meetingID", "room-1")]
    return ApiRequest(customer, "insertDocument", params, body, content_type)


@pytest.mark.parametrize(
    "content_type", ["text/xml", "application/xml", "text/xml; charset=utf-8", " text/xml ;x=1"]
)
async def test_insert_document_takes_an_xml_media_type_with_parameters(content_type: str) -> None:
    """The media type is the part before ';', stripped: the meeting is looked for next."""
    with pytest.raises(NotFound):
        await meetings.insert_document(unpinned(), insert_request(MODULES, content_type))


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(None, "text/xml"), (None, None), (MODULES, None), (MODULES, "text/plain")],
)
async def test_insert_document_needs_a_body_and_an_xml_type(
    body: bytes | None, content_type: str | None
) -> None:
    with pytest.raises(ValidationError) as refused:
        await meetings.insert_document(unpinned(), insert_request(body, content_type))
    assert refused.value.message_key == "unsupportedContentType"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<modules>", "The XML body could not be parsed"),
        (b"<other/>", "The XML body must be a <modules> document"),
    ],
)
def test_check_xml_says_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        meetings._check_xml(body)
    assert refused.value.message_key == "validationError"
    assert str(refused.value) == message


# -- join: DOWN backends and the backend's own answers -----------------------------------------


async def test_join_of_a_meeting_on_a_down_backend_logs_why(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    stack.sims[0].behaviour.mode = "http500"
    for _ in range(stack.config.proxy.health.down_after):
        await poll_once(stack.gateway, "bbb-1")
    assert stack.gateway.backend_down("bbb-1")
    caplog.set_level(logging.WARNING)
    response = await stack.http.get(stack.signed("join", JOIN))
    assert response.status_code == 302
    assert any(
        r.getMessage()
        == "join failed: BackendUnavailable(bbb-1): DOWN: the meeting must be created again"
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


async def test_join_redirect_false_with_a_302_without_errors_is_bad_response(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.create("room-1")
    reservation = stack.gateway.ledger.get(("acme", "room-1"))
    assert reservation is not None
    client = stack.gateway.client(reservation.backend_id)

    async def redirected(*args: Any, **kwargs: Any) -> Any:
        raise BackendRedirect(reservation.backend_id, "https://bbb.test/html5client/join?x=1")

    monkeypatch.setattr(client, "call", redirected)
    caplog.set_level(logging.WARNING)
    response = await stack.http.get(stack.signed("join", NO_REDIRECT))
    assert failure(response) == (
        "internalError",
        "The server hosting this meeting gave an invalid answer",
    )
    assert warnings_of(caplog) == [
        "join (redirect=false) of ('acme', 'room-1'): a 302 without errors="
    ]
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None


async def test_join_redirect_false_failure_is_logged_with_the_meeting(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.create("room-1")
    sim, _ = stack.backend_meeting("acme", "room-1")
    sim.behaviour.mode = "http500"
    caplog.set_level(logging.WARNING)
    response = await stack.http.get(stack.signed("join", NO_REDIRECT))
    assert failure(response) == (
        "internalError",
        "The server hosting this meeting gave an invalid answer",
    )
    [warning] = warnings_of(caplog)
    assert warning.startswith("join (redirect=false) of ('acme', 'room-1') failed: Backend")
    assert "(bbb-" in warning


async def test_join_redirect_false_not_found_releases_as_gone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    await stack.create("room-1")
    sim, backend_meeting = stack.backend_meeting("acme", "room-1")
    del sim.meetings[backend_meeting]
    seen = spy_releases(stack, monkeypatch)
    response = await stack.http.get(stack.signed("join", NO_REDIRECT))
    assert response.status_code == 302
    assert seen == [(("acme", "room-1"), "gone")]


# -- getMeetings ---------------------------------------------------------------------------------


def spy_calls(stack: Stack, backend_id: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The (call, customer) of every call the gateway makes to ``backend_id``."""
    seen: list[Any] = []
    client = stack.gateway.client(backend_id)
    call = client.call

    async def spy(name: str, params: Any, **kwargs: Any) -> Any:
        seen.append((name, kwargs.get("customer")))
        return await call(name, params, **kwargs)

    monkeypatch.setattr(client, "call", spy)
    return seen


async def test_get_meetings_asks_each_backend_on_the_customers_account(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its fair share of the backend's connections applies to getMeetings too."""
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    seen = spy_calls(stack, "bbb-1", monkeypatch)
    listed = await stack.call("getMeetings", [])
    assert text(listed, "meetings/meeting/meetingID") == "room-1"
    assert seen == [("getMeetings", "acme")]


async def test_get_meetings_lists_the_customers_meetings_after_anothers(
    make_stack: StackFactory,
) -> None:
    """Meetings of other customers on the same backend are skipped, not the end of the list;
    each listed with the duration the customer asked for (0: none asked)."""
    stack = await make_stack(backends=1)
    await stack.create("theirs", customer="globex")
    await stack.create("room-1", duration="45")
    await stack.create("room-2")
    listed = await stack.call("getMeetings", [])
    found = {
        m.findtext("meetingID"): m.findtext("duration") for m in listed.iterfind("meetings/meeting")
    }
    assert found == {"room-1": "45", "room-2": "0"}
    container = listed.find("meetings")
    assert container is not None and not (container.text or "").strip()
    assert all(not (m.tail or "").strip() for m in container)  # nothing between them


async def test_get_meetings_without_meetings_is_bbbs_answer(stack: Stack) -> None:
    response = await stack.http.get(stack.signed("getMeetings", []))
    assert response.text == (
        "<response><returncode>SUCCESS</returncode><meetings/>"
        "<messageKey>noMeetings</messageKey>"
        "<message>no meetings were found on this server</message></response>"
    )


async def test_get_meetings_logs_a_backend_left_out(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    stack.sims[0].behaviour.mode = "garbage"
    caplog.set_level(logging.WARNING)
    listed = await stack.call("getMeetings", [])
    assert text(listed, "messageKey") == "noMeetings"
    [warning] = warnings_of(caplog)
    assert warning.startswith("getMeetings: leaving out bbb-1: BackendBadResponse(bbb-1): ")


# -- why a meeting is released -------------------------------------------------------------------


async def test_end_releases_as_end_and_a_vanished_meeting_as_gone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for meeting_id in ["room-1", "room-2", "room-3"]:
        await stack.create(meeting_id, maxParticipants="2")
    seen = spy_releases(stack, monkeypatch)
    ended = await stack.call("end", [("meetingID", "room-1")])
    assert text(ended, "returncode") == "SUCCESS"
    for meeting_id, call in [("room-2", "getMeetingInfo"), ("room-3", "end")]:
        sim, backend_meeting = stack.backend_meeting("acme", meeting_id)
        del sim.meetings[backend_meeting]  # gone from the backend without a notice
        answer = await stack.call(call, [("meetingID", meeting_id)])
        assert text(answer, "messageKey") == "notFound", seen
    assert seen == [
        (("acme", "room-1"), "end"),
        (("acme", "room-2"), "gone"),
        (("acme", "room-3"), "gone"),
    ]


async def test_a_late_not_found_leaves_the_meeting_created_again(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's answer about the old meeting comes after it was ended and created
    again under the same meetingID: the new one stays."""
    key = ("acme", "room-1")
    await stack.create("room-1")
    old = stack.gateway.ledger.get(key)
    assert old is not None
    sim, backend_meeting = stack.backend_meeting(*key)
    client = stack.gateway.client(old.backend_id)
    call = client.call

    async def racing(name: str, params: Any, **kwargs: Any) -> Any:
        reply = await call(name, params, **kwargs)
        monkeypatch.setattr(client, "call", call)
        await stack.gateway.ledger.release(key, "end")  # meanwhile ended...
        created = await stack.create("room-1")  # ...and created again
        assert text(created, "returncode") == "SUCCESS"
        return reply

    del sim.meetings[backend_meeting]
    monkeypatch.setattr(client, "call", racing)
    answer = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(answer, "messageKey") == "notFound"
    new = stack.gateway.ledger.get(key)
    assert new is not None and new.created_at != old.created_at


async def test_forwarded_calls_are_made_on_the_customers_account(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a body or without, the customer's fair share of the backend applies."""
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    seen = spy_calls(stack, "bbb-1", monkeypatch)
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "returncode") == "SUCCESS"
    inserted = await stack.http.post(
        stack.signed("insertDocument", [("meetingID", "room-1")]),
        content=MODULES,
        headers={"Content-Type": "application/xml"},
    )
    assert "<returncode>SUCCESS</returncode>" in inserted.text
    assert seen == [("getMeetingInfo", "acme"), ("insertDocument", "acme")]


@pytest.mark.parametrize("name", [None, "", "  "])
async def test_join_without_a_full_name_says_so(stack: Stack, name: str | None) -> None:
    await stack.create("room-1")
    params = [("meetingID", "room-1"), ("role", "VIEWER"), ("logoutURL", "https://lms.test/bye")]
    if name is not None:
        params.append(("fullName", name))
    response = await stack.http.get(stack.signed("join", params))
    assert response.status_code == 302
    errors = orjson.loads(query_of(response.headers["location"])["errors"])
    assert errors == [
        {
            "key": "missingParamFullName",
            "message": "You must specify a name for the attendee who will be joining the meeting.",
        }
    ]
