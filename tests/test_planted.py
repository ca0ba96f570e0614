"""Tests that catch the one-line bugs issue 7 planted and the old suite let through.

Each test here names the bug it is for; each was checked by planting that bug and
seeing the test fail.  They drive the gateway through its public HTTP API over real
sockets, so they hold however the code behind it is arranged.
"""

from __future__ import annotations

import dataclasses
import hmac
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from proxy.bbb import callbacks
from proxy.bbb.checksum import signed_query
from tests.harness import (
    BACKEND_SECRET,
    Stack,
    StackFactory,
    query_of,
    start_receiver,
    text,
    wait_until,
)

LONG_ID = "course-" + "x" * 245  # 252 characters: namespaced, over 256, so hashed


def sent(stack: Stack, call: str) -> list[list[tuple[str, str]]]:
    """Parameters (as sent, repeats kept) of every ``call`` the simulated backends received."""
    return [params for sim in stack.sims for name, params in sim.requests if name == call]


async def first_choice(stack: Stack, meeting_id: str) -> int:
    """The index of the simulator a create of ``meeting_id`` lands on (created, then ended)."""
    await stack.create(meeting_id)
    sim, _ = stack.backend_meeting("acme", meeting_id)
    await stack.call("end", [("meetingID", meeting_id)])
    return stack.sims.index(sim)


# -- checksums ---------------------------------------------------------------------------------


def flipped(value: str, position: int) -> str:
    """``value`` with one hex digit changed (same length, still hex)."""
    digit = "0" if value[position] != "0" else "1"
    return value[:position] + digit + value[position + 1 :]


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
async def test_a_checksum_with_any_one_digit_changed_is_refused(
    stack: Stack, algorithm: str
) -> None:
    """Planted: the checksum compared on a prefix (or any part) only."""
    params = [("meetingID", "room-1")]
    query = signed_query("isMeetingRunning", params, stack.secrets["acme"], algorithm)
    good = query_of("?" + query)["checksum"]
    base = f"{stack.api()}/isMeetingRunning?meetingID=room-1&checksum="
    assert "<returncode>SUCCESS</returncode>" in (await stack.http.get(base + good)).text
    for position in range(len(good)):
        response = await stack.http.get(base + flipped(good, position))
        assert "<messageKey>checksumError</messageKey>" in response.text, position


@contextmanager
def compare_digest_spy() -> Iterator[list[tuple[Any, Any]]]:
    """Record every ``hmac.compare_digest`` call, however the gateway's modules imported it."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    patched = [
        (module, name)
        for module in list(sys.modules.values())
        if getattr(module, "__name__", "").startswith("proxy.")
        for name, value in vars(module).items()
        if value is real
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hmac, "compare_digest", spy)
        for module, name in patched:
            mp.setattr(module, name, spy)
        yield calls


def as_text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


async def test_checksums_are_compared_in_constant_time(stack: Stack) -> None:
    """Planted: ``hmac.compare_digest`` replaced by ``==`` in the checksum check."""
    url = stack.signed("getMeetings", [])
    given = query_of(url)["checksum"]
    with compare_digest_spy() as calls:
        ok = await stack.http.get(url)
        wrong = await stack.http.get(url.replace(given, flipped(given, 39)))
    assert "<returncode>SUCCESS</returncode>" in ok.text
    assert "<messageKey>checksumError</messageKey>" in wrong.text
    compared = {as_text(x).lower() for call in calls for x in call}
    assert given in compared
    assert flipped(given, 39) in compared


async def test_admin_token_is_compared_in_constant_time(make_stack: StackFactory) -> None:
    """Planted: ``hmac.compare_digest`` replaced by ``==`` for the admin token."""
    stack = await make_stack(proxy={"admin_token": "the-admin-token"})
    with compare_digest_spy() as calls:
        good = await stack.http.get(
            f"{stack.url}/admin/v1/backends", headers={"Authorization": "Bearer the-admin-token"}
        )
        bad = await stack.http.get(
            f"{stack.url}/admin/v1/backends", headers={"Authorization": "Bearer the-admin-tokem"}
        )
    assert (good.status_code, bad.status_code) == (200, 404)
    compared = [{as_text(x) for x in call} for call in calls]
    assert {"the-admin-token"} in compared
    assert {"the-admin-tokem", "the-admin-token"} in compared


# -- meeting ids -------------------------------------------------------------------------------


async def test_two_customers_with_one_long_meeting_id_get_two_backend_meetings(
    stack: Stack,
) -> None:
    """Planted: a hashed (long) meetingID without the customer part."""
    for customer in ("acme", "globex"):
        params = [("meetingID", LONG_ID), ("name", "Long room"), ("meta_owner", customer)]
        root = await stack.call("create", params, customer)
        assert text(root, "returncode") == "SUCCESS"
        assert text(root, "messageKey") == "", customer  # not a duplicateWarning
    ids = {stack.backend_meeting(c, LONG_ID)[1] for c in ("acme", "globex")}
    assert len(ids) == 2
    assert all(len(i) <= 256 for i in ids)
    for customer in ("acme", "globex"):
        info = await stack.call("getMeetingInfo", [("meetingID", LONG_ID)], customer)
        assert text(info, "meetingID") == LONG_ID
        assert text(info, "metadata/owner") == customer
    await stack.call("end", [("meetingID", LONG_ID)], "acme")
    still = await stack.call("isMeetingRunning", [("meetingID", LONG_ID)], "globex")
    assert text(still, "returncode") == "SUCCESS"
    info = await stack.call("getMeetingInfo", [("meetingID", LONG_ID)], "globex")
    assert text(info, "returncode") == "SUCCESS"


# -- join --------------------------------------------------------------------------------------


@pytest.mark.parametrize("full_name", [None, "", "   "])
async def test_join_without_a_full_name_is_refused_by_the_gateway(
    stack: Stack, full_name: str | None
) -> None:
    """Planted: join without ``fullName`` sent on to the backend."""
    await stack.create("room-1")
    params = [("meetingID", "room-1"), ("role", "VIEWER")]
    if full_name is not None:
        params.append(("fullName", full_name))
    response = await stack.http.get(stack.signed("join", params))
    assert response.status_code == 302
    location = response.headers["location"]
    assert not any(location.startswith(url) for url in stack.sim_urls)
    assert "missingParamFullName" in query_of(location)["errors"]


# -- forwarded calls and the ledger ------------------------------------------------------------


@pytest.mark.parametrize("call", ["getMeetingInfo", "end"])
async def test_a_backends_not_found_releases_the_meeting(stack: Stack, call: str) -> None:
    """Planted: a backend's ``notFound`` for a pinned meeting not releasing it."""
    await stack.create("room-1", maxParticipants="7")
    sim, backend_meeting = stack.backend_meeting("acme", "room-1")
    del sim.meetings[backend_meeting]  # lost without a notice (say the server restarted)
    root = await stack.call(call, [("meetingID", "room-1")])
    assert text(root, "messageKey") == "notFound"
    assert stack.gateway.ledger.get(("acme", "room-1")) is None
    assert stack.gateway.ledger.statistics().connections_by_customer == {}


async def test_end_that_the_backend_refuses_releases_nothing(stack: Stack) -> None:
    """Planted: ``end`` releasing on a FAILED answer."""
    await stack.create("room-1", maxParticipants="7")
    root = await stack.call("end", [("meetingID", "room-1"), ("password", "not-the-password")])
    assert text(root, "returncode") == "FAILED"
    assert text(root, "messageKey") == "invalidPassword"
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None
    assert stack.gateway.ledger.statistics().connections_by_customer == {"acme": 7}
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "returncode") == "SUCCESS"


@pytest.mark.parametrize("mode", ["garbage", "http500"])
async def test_get_meetings_leaves_out_a_backend_that_answers_an_error(
    make_stack: StackFactory, mode: str
) -> None:
    """Planted: getMeetings failing as a whole when one backend answers an error."""
    stack = await make_stack()
    for i in range(6):
        await stack.create(f"room-{i}", maxParticipants="1")
    stack.sims[0].behaviour.mode = mode
    expected = sorted(r.meeting_id for r in stack.gateway.ledger.state if r.backend_id == "bbb-2")
    assert expected and len(expected) < 6, "both backends should hold meetings"
    root = await stack.call("getMeetings", [])
    assert text(root, "returncode") == "SUCCESS"
    got = sorted(text(m, "meetingID") for m in root.findall("meetings/meeting"))
    assert got == expected


async def test_a_create_that_timed_out_is_not_retried_elsewhere(make_stack: StackFactory) -> None:
    """Planted: a create retried on another backend after a timeout (it may exist there)."""
    stack = await make_stack(proxy={"timeouts": {"read": 0.5}})
    chosen = await first_choice(stack, "room-1")
    stack.sims[chosen].behaviour.mode = "hang"
    before = len(sent(stack, "create"))
    with trio.fail_after(5):
        root = await stack.create("room-1")
    assert text(root, "returncode") == "FAILED"
    assert text(root, "messageKey") == "serverUnavailable"
    assert len(sent(stack, "create")) == before  # the other backend was never asked


async def test_a_concurrent_create_waits_for_the_first_to_settle(stack: Stack) -> None:
    """Planted: a second create of a meetingID not waiting for the first one's answer.

    The first create's backend refuses it, slowly; the first is placed elsewhere, and the
    second, which arrived meanwhile, must join that meeting, not get the refusal."""
    chosen = await first_choice(stack, "room-1")
    stack.sims[chosen].behaviour.mode = "refuse_create"
    stack.sims[chosen].behaviour.latency = 0.3
    answers: list[tuple[str, str]] = []

    async def create() -> None:
        root = await stack.create("room-1", maxParticipants="4")
        answers.append((text(root, "returncode"), root.findtext("internalMeetingID") or ""))

    async with trio.open_nursery() as both:
        both.start_soon(create)
        await trio.sleep(0.05)
        both.start_soon(create)
    assert [code for code, _ in answers] == ["SUCCESS", "SUCCESS"]
    assert len({internal for _, internal in answers}) == 1
    other = stack.sims[1 - chosen]
    assert [m for m in other.meetings.values() if not m.ended] != []
    assert stack.gateway.ledger.statistics().connections_by_customer == {"acme": 4}


async def test_a_pending_create_survives_polls_for_its_grace_period(
    make_stack: StackFactory,
) -> None:
    """Planted: no grace period for a pending create that the backend does not list yet."""
    from proxy.ledger.model import Reservation, Reserve

    stack = await make_stack(proxy={"health": {"interval": 0.05}})
    ledger = stack.gateway.ledger

    def pending(meeting_id: str, age: float) -> Reservation:
        return Reservation(
            customer="acme",
            meeting_id=meeting_id,
            backend_id="bbb-1",
            backend_meeting_id=f"acme~{meeting_id}",
            connections=2,
            duration=60,
            asked_duration=60,
            created_at=ledger.clock() - age,
        )

    # As a crash leaves them: reserved, never confirmed, not on the backend.
    await ledger.record(Reserve(pending("fresh", 1.0)))
    await ledger.record(Reserve(pending("stale", 3600.0)))
    polls = len([r for r in stack.sims[0].requests if r[0] == "getMeetings"])
    await wait_until(lambda: ledger.get(("acme", "stale")) is None)
    await wait_until(
        lambda: len([r for r in stack.sims[0].requests if r[0] == "getMeetings"]) >= polls + 3
    )
    assert ledger.get(("acme", "fresh")) is not None


# -- what reaches a backend --------------------------------------------------------------------


async def test_the_query_size_limit_holds_for_an_otherwise_valid_create(
    make_stack: StackFactory,
) -> None:
    """Planted: the query-size limit removed (a long meetingID is refused anyway)."""
    stack = await make_stack(proxy={"max_query_bytes": 2000})
    fits = await stack.create("room-1", meta_notes="n" * 1000)
    assert text(fits, "returncode") == "SUCCESS"
    too_long = await stack.create("room-2", meta_notes="n" * 2100)
    assert text(too_long, "returncode") == "FAILED"
    assert text(too_long, "messageKey") == "validationError"
    assert len(sent(stack, "create")) == 1
    assert stack.gateway.ledger.get(("acme", "room-2")) is None


# -- customer URLs: SSRF -----------------------------------------------------------------------


class Resolver(trio.abc.HostnameResolver):
    """Names of our choosing, in the order given; every other name as the system has it."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        self.asked.append(str(name))
        if name in self.names:
            return [
                (
                    socket.AF_INET6 if ":" in a else socket.AF_INET,
                    socket.SOCK_STREAM,
                    6,
                    "",
                    (a, port),
                )
                for a in self.names[name]
            ]
        return await trio.to_thread.run_sync(
            partial(socket.getaddrinfo, host, port, *args, **kwargs)
        )

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags)


async def end_on_backend(stack: Stack, meeting_id: str) -> None:
    """End a meeting on its backend directly, so the backend sends its end notices."""
    sim, backend_meeting = stack.backend_meeting("acme", meeting_id)
    sim_url = stack.sim_urls[stack.sims.index(sim)]
    query = signed_query("end", [("meetingID", backend_meeting)], BACKEND_SECRET)
    await stack.http.get(f"{sim_url}/end?{query}")
    await wait_until(lambda: stack.gateway.ledger.get(("acme", meeting_id)) is None)


async def test_a_host_with_one_private_address_is_not_called(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    """Planted: the SSRF check asking that *any* address be public instead of every one."""
    receiver = await start_receiver(nursery)
    port = receiver.url.rsplit(":", 1)[1]
    resolver = Resolver({"mixed.test": ["127.0.0.1", "8.8.8.8"]})
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        stack = await make_stack(proxy={"allow_private_callbacks": False})
        await stack.create(
            "room-1",
            meetingEndedURL=f"http://mixed.test:{port}/ended",
            meta_endCallbackUrl=f"http://mixed.test:{port}/callback",
        )
        await end_on_backend(stack, "room-1")
        await wait_until(lambda: resolver.asked.count("mixed.test") >= 2)
        await trio.sleep(0.3)  # room for a call that should not come
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert receiver.seen == []


async def start_redirector(nursery: trio.Nursery) -> tuple[str, list[str]]:
    """A customer endpoint whose /hop answers 302 to /landed; returns its URL and the paths."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen.append(scope["path"])
        hop = scope["path"].startswith("/hop")
        headers = [(b"location", b"/landed")] if hop else []
        await send(
            {"type": "http.response.start", "status": 302 if hop else 200, "headers": headers}
        )
        await send({"type": "http.response.body", "body": b""})

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, app, config, mode="asgi"))
    return binds[0], seen


async def test_a_customer_url_that_redirects_is_not_followed(
    stack: Stack, nursery: trio.Nursery
) -> None:
    """Planted: redirects followed (a public URL could bounce the call inside)."""
    url, seen = await start_redirector(nursery)
    await stack.create(
        "room-1", meetingEndedURL=f"{url}/hop-ended", meta_endCallbackUrl=f"{url}/hop-cb"
    )
    await end_on_backend(stack, "room-1")
    await wait_until(lambda: len(seen) >= 2)
    await trio.sleep(0.3)  # room for a redirect that should not be followed
    assert sorted(p.split("?")[0] for p in seen) == ["/hop-cb", "/hop-ended"]


async def test_an_end_notice_signed_without_the_backends_secret_is_refused(stack: Stack) -> None:
    """Planted: the meeting-ended URL signed with a key that ignores the backend's secret."""
    await stack.create("room-1")
    [params] = sent(stack, "create")
    genuine = dict(params)["meetingEndedURL"]
    reservation = stack.gateway.ledger.get(("acme", "room-1"))
    assert reservation is not None
    backend = stack.gateway.client(reservation.backend_id).backend
    guessed = dataclasses.replace(backend, secret="a-secret-nobody-was-given")
    # The gateway's own signer, for the right b=, keyed from a secret it was never given.
    forged, _ = callbacks.ended_urls(
        stack.url,
        guessed,
        reservation.backend_meeting_id,
        "room-1",
        callbacks.CustomerUrls(),
        reservation.created_at,
    )
    assert forged.split("&sig=")[0] == genuine.split("&sig=")[0]
    assert (await stack.http.get(forged)).status_code == 403
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None
    assert (await stack.http.get(genuine)).status_code == 200
    assert stack.gateway.ledger.get(("acme", "room-1")) is None
