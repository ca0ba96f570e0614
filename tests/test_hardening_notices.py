"""Meeting-ended notices are bound to one meeting instance (issue 7), over real sockets.

Moodle ends a meeting and creates it again at once; the old meeting's notice
then arrives.  It must not free the new meeting, and neither may the same
notice replayed later, nor one for a meeting the ledger does not hold.
"""

from __future__ import annotations

import logging
import random
from urllib.parse import quote, urlencode

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from proxy.backends.monitor import poll_once
from proxy.bbb import callbacks
from proxy.bbb.callbacks import SIGNED
from proxy.bbb.checksum import signed_query
from proxy.calls import ended
from proxy.config import Backend
from proxy.errors import StateError
from proxy.ledger.journal import FileJournal
from proxy.ledger.model import Record, Release, Reservation
from proxy.simulator.model import append_query
from tests.harness import (
    BACKEND_SECRET,
    Receiver,
    Stack,
    StackFactory,
    start_receiver,
    text,
    wait_until,
)

KEY = ("acme", "room-1")


async def no_more_polls(stack: Stack) -> None:
    """From now on no poll answers, so none adopts a released meeting back.

    The meeting still runs on the backend; a poll answered after its release would
    adopt it.  A poll already past the simulator's mode check gets its answer at once.
    """
    for sim in stack.sims:
        sim.behaviour.mode = "hang"
    await trio.sleep(0.05)


def held(stack: Stack) -> Reservation | None:
    return stack.gateway.ledger.get(KEY)


def notices_of(stack: Stack) -> list[str]:
    """The two URLs the backend will call when room-1 ends, as it will call them."""
    sim, backend_meeting = stack.backend_meeting(*KEY)
    meeting = sim.meetings[backend_meeting]
    marks = urlencode([("recordingmarks", "false"), ("meetingID", backend_meeting)])
    return [meeting.meeting_ended_url, append_query(meeting.metadata["endcallbackurl"], marks)]


async def end_on_backend(stack: Stack) -> None:
    """The meeting ends on its server by itself (not through the gateway)."""
    sim, backend_meeting = stack.backend_meeting(*KEY)
    sim_url = stack.sim_urls[stack.sims.index(sim)]
    query = signed_query("end", [("meetingID", backend_meeting)], BACKEND_SECRET)
    assert (await stack.http.get(f"{sim_url}/end?{query}")).status_code == 200


def records(stack: Stack) -> int:
    journal = stack.gateway.ledger.journal
    assert isinstance(journal, FileJournal)
    return journal.statistics().records_appended


async def recreated(stack: Stack, receiver: Receiver) -> Reservation:
    created = await stack.create("room-1", meta_endCallbackUrl=f"{receiver.url}/cb")
    assert text(created, "returncode") == "SUCCESS"
    reservation = held(stack)
    assert reservation is not None and reservation.confirmed
    return reservation


@pytest.mark.parametrize("ended_by", ["customer-end", "backend"])
async def test_late_notice_never_releases_the_next_meeting_of_the_same_id(
    make_stack: StackFactory,
    nursery: trio.Nursery,
    ended_by: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.calls.ended")
    stack = await make_stack(backends=1)
    receiver = await start_receiver(nursery)
    first = await recreated(stack, receiver)
    old_notices = notices_of(stack)
    if ended_by == "customer-end":
        assert text(await stack.call("end", [("meetingID", "room-1")]), "returncode") == "SUCCESS"
    else:
        await end_on_backend(stack)
    await wait_until(lambda: held(stack) is None)
    # The backend's own notices went out (the customer's callback was called once).
    await wait_until(lambda: len(receiver.seen) == 1)
    second = await recreated(stack, receiver)
    assert second.created_at != first.created_at
    before = records(stack)
    for url in old_notices:  # arriving late, or replayed: genuine and signed, but old
        assert (await stack.http.get(url)).status_code == 200
    assert held(stack) == second
    assert stack.gateway.ledger.statistics().connections_by_customer == {"acme": 10}
    assert records(stack) == before  # nothing journalled for an old instance
    ignored = "end notice of another instance of ('acme', 'room-1') on bbb-1: ignored"
    # At least the two replays (the backend's own ended notice may also have come late).
    assert [r.getMessage() for r in caplog.records].count(ignored) >= len(old_notices)
    # The new meeting's own notice still releases it, as "ended".
    await no_more_polls(stack)
    journalled: list[Record] = []
    journal = stack.gateway.ledger.journal
    append = journal.append

    def spy(record: Record) -> None:
        journalled.append(record)
        append(record)

    monkeypatch.setattr(journal, "append", spy)
    new_notices = notices_of(stack)
    assert new_notices != old_notices
    assert (await stack.http.get(new_notices[0])).status_code == 200
    assert held(stack) is None
    assert journalled == [Release(KEY, "ended")]
    assert "meeting ('acme', 'room-1') ended on bbb-1" in [r.getMessage() for r in caplog.records]
    assert (await stack.http.get(new_notices[1])).status_code == 200  # nothing left to release
    assert journalled == [Release(KEY, "ended")]


async def test_a_failing_customer_call_is_supervised_and_counted(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> bool:
        raise RuntimeError("planted")

    monkeypatch.setattr(ended, "call_customer_url", broken)
    await stack.create("room-1", meetingEndedURL="https://lms.test/ended")
    _, callback = notices_of(stack)
    assert (await stack.http.get(callback)).status_code == 200
    await wait_until(lambda: stack.gateway.task_failures == {"customer-url": 1})
    assert held(stack) is None
    assert (await stack.http.get(f"{stack.url}/healthz")).status_code == 200


async def test_notice_for_a_meeting_not_in_the_ledger_changes_nothing(stack: Stack) -> None:
    await stack.create("room-1")
    await stack.create("room-2")
    old_notices = notices_of(stack)
    assert text(await stack.call("end", [("meetingID", "room-1")]), "returncode") == "SUCCESS"
    assert held(stack) is None
    before = (records(stack), stack.gateway.ledger.statistics())
    for url in old_notices:
        assert (await stack.http.get(url)).status_code == 200
    assert (records(stack), stack.gateway.ledger.statistics()) == before
    assert stack.gateway.ledger.get(("acme", "room-2")) is not None


async def test_notice_moved_to_another_instance_is_refused(stack: Stack) -> None:
    await stack.create("room-1")
    reservation = held(stack)
    assert reservation is not None
    ended, _ = notices_of(stack)
    instance = f"c={quote(repr(reservation.created_at))}"
    assert instance in ended
    moved = ended.replace(instance, f"c={quote(repr(reservation.created_at + 1))}")
    assert (await stack.http.get(moved)).status_code == 403
    assert (await stack.http.get(ended.replace("&" + instance, ""))).status_code == 403
    assert held(stack) == reservation
    assert (await stack.http.get(ended)).status_code == 200
    assert held(stack) is None


@pytest.mark.parametrize(
    "sig", ["%C3%A9" * 64, "é" * 64, "%D9%A0" * 64, "%00", "%FF%FE", "0" * 63 + "%C3%A9"]
)
async def test_non_ascii_signature_is_403(stack: Stack, sig: str) -> None:
    await stack.create("room-1")
    ended, _ = notices_of(stack)
    forged = ended[: ended.index("&sig=")] + "&sig=" + sig
    response = await stack.http.get(forged)
    assert (response.status_code, response.text) == (403, "unknown\n")
    assert held(stack) is not None


def _encoded(data: bytes) -> str:
    """``data`` as a request target may carry it: visible ASCII as is, the rest %-escaped."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x23 else f"%{b:02X}" for b in data)


def _nasty_queries(count: int) -> list[str]:
    """Seeded random bytes (hypothesis cannot drive a trio fixture across examples)."""
    rng = random.Random(7)
    prefixes = ["", "k=ended&b=bbb-1&m=acme~room-1&", "k=callback&b=bbb-1&m=x&sig=%C3%A9&"]
    return [
        rng.choice(prefixes) + _encoded(rng.randbytes(rng.randrange(300))) for _ in range(count)
    ]


async def test_any_unsigned_query_to_the_notice_endpoint_is_403(stack: Stack) -> None:
    await stack.create("room-1")
    for query in _nasty_queries(200):
        for method in ("GET", "POST"):
            response = await stack.http.request(method, f"{stack.url}/callbacks/v1/ended?{query}")
            assert (response.status_code, response.text) == (403, "unknown\n"), query
    assert held(stack) is not None


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary().map(lambda b: b.decode("utf-8", "replace")),
        st.binary().map(lambda b: b.decode("latin-1")),
        st.lists(st.tuples(st.sampled_from((*SIGNED, "sig", "x")), st.text())).map(urlencode),
    )
)
def test_verify_never_raises(query: str) -> None:
    backend = Backend(id="bbb-1", url="http://b.test/bigbluebutton/api", secret="s", capacity=1)
    notice = callbacks.verify(query, {"bbb-1": backend})
    assert notice is None  # nothing but a URL the gateway signed verifies


async def test_mutated_genuine_notices_are_403(stack: Stack) -> None:
    await stack.create("room-1")
    ended, callback = notices_of(stack)
    for url in (ended, callback):
        signed_end = url.index("&sig=") + len("&sig=") + 64  # every cut before breaks it
        for cut in range(url.index("?") + 1, signed_end, 7):
            for tail in ("", "%", "%zz", "&sig=%C3", "&c=nan", "&c=", "\u0660"):
                response = await stack.http.get(url[:cut] + tail)
                assert (response.status_code, response.text) == (403, "unknown\n"), url[:cut] + tail


async def test_the_instance_tag_is_on_the_backend_and_never_shown(stack: Stack) -> None:
    await stack.create("room-1")
    reservation = held(stack)
    assert reservation is not None
    sim, backend_meeting = stack.backend_meeting(*KEY)
    assert sim.meetings[backend_meeting].metadata["bbb-proxy-created"] == repr(
        reservation.created_at
    )
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    listing = await stack.call("getMeetings", [])
    for root in (info, listing):
        assert b"bbb-proxy-" not in etree.tostring(root)
        assert repr(reservation.created_at).encode() not in etree.tostring(root)


async def test_a_late_not_found_answer_never_releases_the_next_meeting(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    """The request path too: an answer about the old instance leaves the new one alone."""
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    sim, backend_meeting = stack.backend_meeting(*KEY)
    del sim.meetings[backend_meeting]  # gone on the backend; the ledger does not know yet
    sim.behaviour.latency = 0.5
    answers: dict[str, etree._Element] = {}

    async def ask(call: str, params: list[tuple[str, str]]) -> None:
        answers[call] = await stack.call(call, params)

    nursery.start_soon(ask, "getMeetingInfo", [("meetingID", "room-1")])
    await trio.sleep(0.1)  # the question is on its way to the backend
    await stack.gateway.ledger.release(KEY, "gone")  # as the poll would
    nursery.start_soon(ask, "create", [("meetingID", "room-1"), ("name", "again")])
    await wait_until(lambda: len(answers) == 2)
    assert text(answers["getMeetingInfo"], "messageKey") == "notFound"
    assert text(answers["create"], "returncode") == "SUCCESS"
    again = held(stack)
    assert again is not None and again.confirmed


async def test_a_notice_made_before_instances_calls_the_customer_but_releases_nothing(
    stack: Stack, nursery: trio.Nursery
) -> None:
    receiver = await start_receiver(nursery)
    await stack.create("room-1")
    reservation = held(stack)
    assert reservation is not None
    backend = stack.gateway.client(reservation.backend_id).backend
    # What an older gateway signed: no c= (built with the signer itself, without it).
    params = [
        ("k", "callback"),
        ("b", backend.id),
        ("m", reservation.backend_meeting_id),
        ("i", "room-1"),
        ("cb", f"{receiver.url}/ended"),
    ]
    legacy = callbacks._signed_url(stack.url, backend, params)
    assert "&c=" not in legacy
    assert (await stack.http.get(legacy)).status_code == 200
    await wait_until(lambda: receiver.seen == ["/ended?"])
    assert held(stack) == reservation


async def test_a_release_that_cannot_be_journalled_still_calls_the_customer(
    stack: Stack, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = await start_receiver(nursery)
    await stack.create("room-1", meetingEndedURL=f"{receiver.url}/ended")

    async def full_disk(*args: object) -> None:
        raise StateError("the journal in /state failed: [Errno 28] No space left on device")

    monkeypatch.setattr(stack.gateway.ledger, "release", full_disk)
    _, callback = notices_of(stack)
    response = await stack.http.get(callback)
    assert (response.status_code, response.text) == (200, "ok\n")
    await wait_until(lambda: receiver.seen == ["/ended?"])


async def test_an_adopted_meeting_is_still_released_by_its_own_notice(
    make_stack: StackFactory,
) -> None:
    """The ledger lost a meeting and the poll adopted it back: the same instance, by its tag."""
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    original = held(stack)
    assert original is not None
    notices = notices_of(stack)
    stack.gateway.ledger.state.apply(Release(KEY, "lost"))  # as if state_dir had been lost
    await poll_once(stack.gateway, "bbb-1")  # the monitor's own poll
    adopted = held(stack)
    assert adopted is not None and adopted.created_at == original.created_at
    await no_more_polls(stack)
    assert (await stack.http.get(notices[0])).status_code == 200
    assert held(stack) is None
