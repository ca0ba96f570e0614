"""Bounded everything a peer controls: slow clients, big or nasty backend answers, floods."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from proxy.backends.client import PARSE_IN_THREAD_BYTES, BackendClient, parse_reply
from proxy.config import Backend, ProxySettings, Timeouts
from proxy.errors import BackendBadResponse
from proxy.simulator.model import Behaviour
from tests.harness import Stack, StackFactory, text
from tests.test_backend_http import read_request, serve

BOUND = 1.0  # client_read and client_idle in these tests, seconds
SLACK = 2.5  # a loaded 2-core machine: closed within BOUND + SLACK


async def _closed_after(stack: Stack, head: bytes, trickle: bytes) -> tuple[float, bytes]:
    """Open a connection, send ``head``, then one byte of ``trickle`` every 0.2 s.

    Returns the seconds until the gateway closed the connection, and what it sent.
    """
    received = b""
    port = int(urlsplit(stack.url).port or 0)
    started = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:

        async def send_slowly() -> None:
            try:
                await stream.send_all(head)
                for byte in trickle:
                    await trio.sleep(0.2)
                    await stream.send_all(bytes([byte]))
                await trio.sleep_forever()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.sleep_forever()

        nursery.start_soon(send_slowly)
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass  # reset by the gateway: closed too
        nursery.cancel_scope.cancel()
    return trio.current_time() - started, received


async def test_slow_clients_are_closed_within_the_bound_while_others_are_served(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        proxy={"timeouts": {"client_read": BOUND, "client_idle": BOUND}}, backends=1
    )
    target = urlsplit(stack.signed("create", [("meetingID", "slow"), ("name", "Slow")]))
    path = f"{target.path}?{target.query}"
    slow_body = (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    ).encode()
    slow_head = f"GET {path} HTTP/1.1\r\n".encode()
    kinds = [
        (slow_body, b"x" * 1000),  # a body that trickles in: the whole-body bound
        (slow_body, b""),  # a body that never comes: the silence bound
        (slow_head, b"X-Slow: " + b"y" * 1000),  # a head that trickles in: the idle bound
    ]
    times: list[float] = []
    answers: list[bytes] = []

    async def one(head: bytes, trickle: bytes) -> None:
        seconds, answer = await _closed_after(stack, head, trickle)
        times.append(seconds)
        answers.append(answer)

    with trio.fail_after(BOUND + SLACK + 5):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, *kinds[i % 3])
            await trio.sleep(0.3)
            for n in range(5):  # normal requests meanwhile, answered at once
                with trio.fail_after(BOUND):
                    root = await stack.create(f"ok-{n}", maxParticipants="1")
                    assert text(root, "returncode") == "SUCCESS", text(root, "messageKey")
    assert len(times) == 200
    assert max(times) < BOUND + SLACK, sorted(times)[-5:]
    assert min(times) >= BOUND * 0.9  # closed by the bound, not refused for another reason
    assert stack.gateway.ledger.get(("acme", "slow")) is None
    late = [a for a in answers if b"did not arrive in time" in a]
    assert len(late) >= len(range(0, 200, 3))  # each trickled body, told so in BBB's XML
    assert all(b"<messageKey>validationError</messageKey>" in a for a in late)


# -- what a backend sends ----------------------------------------------------------------------


def _client(url: str, **proxy: Any) -> BackendClient:
    backend = Backend(id="b1", url=url, secret="s", capacity=10)
    settings = ProxySettings(timeouts=Timeouts(connect=1, read=5, write=1, pool=0.5), **proxy)
    return BackendClient(backend, settings)


async def _answering(nursery: trio.Nursery, bodies: dict[str, bytes]) -> str:
    """A raw BBB server answering each call (the path's last part) with its body."""

    async def handler(stream: trio.SocketStream) -> None:
        while request := await read_request(stream):
            call = request.split(b" ")[1].split(b"?")[0].rsplit(b"/", 1)[-1].decode()
            body = bodies[call]
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            await stream.send_all(head + body)

    return await serve(nursery, handler)


def _meetings(count: int) -> bytes:
    """A getMeetings answer of ``count`` meetings of 50 attendees, in bbb-web's shape."""
    attendee = (
        b"<attendee><userID>w_abcdefghijkl</userID><fullName>Student Name</fullName>"
        b"<role>VIEWER</role><isPresenter>false</isPresenter><isListeningOnly>false"
        b"</isListeningOnly><hasJoinedVoice>false</hasJoinedVoice><hasVideo>false</hasVideo>"
        b"<clientType>HTML5</clientType></attendee>"
    )
    meeting = (
        b"<meeting><meetingName>Room</meetingName><meetingID>acme~room-%d</meetingID>"
        b"<attendees>" + attendee * 50 + b"</attendees><metadata></metadata></meeting>"
    )
    inner = b"".join(meeting.replace(b"%d", str(n).encode()) for n in range(count))
    ok = b"<response><returncode>SUCCESS</returncode>"
    return ok + b"<meetings>" + inner + b"</meetings></response>"


async def test_an_answer_above_the_cap_is_a_bad_response(nursery: trio.Nursery) -> None:
    small = _meetings(1)
    url = await _answering(nursery, {"small": small, "big": _meetings(200)})
    client = _client(url, max_answer_bytes=len(small) + 10)
    assert (await client.call("small", [])).ok
    with pytest.raises(BackendBadResponse, match="larger than"):
        await client.call("big", [])
    await client.aclose()


async def test_a_large_answer_is_parsed_without_stalling_the_event_loop(
    nursery: trio.Nursery,
) -> None:
    big = _meetings(1200)  # about 17 MB: lxml needs a good fraction of a second
    assert len(big) > PARSE_IN_THREAD_BYTES
    started = time.perf_counter()
    parse_reply("b1", big)
    in_loop = time.perf_counter() - started  # what the loop would stall for, on this machine
    url = await _answering(nursery, {"getMeetings": big})
    client = _client(url, max_answer_bytes=32 * 1024 * 1024)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    nursery.start_soon(ticker)
    reply = await client.call("getMeetings", [])
    await trio.sleep(0.01)  # the ticker records the gap the call left, if any
    assert reply.ok and len(reply.root.findall("meetings/meeting")) == 1200
    assert max(gaps) < in_loop / 2, (max(gaps), in_loop)
    await client.aclose()


HOSTILE = {
    "html": b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
    "empty": b"",
    "garbage": bytes(range(256)) * 4,
    "json": b'{"response": {"returncode": "SUCCESS"}}',
    "noreturncode": b"<response><meetings/></response>",
    "deep": b"<response><returncode>SUCCESS</returncode>"
    + b"<a>" * 100_000
    + b"</a>" * 100_000
    + b"</response>",
    "laughs": b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
    b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">'
    b'<!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;"><!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">'
    b'<!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;"><!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;">'
    b'<!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;"><!ENTITY i "&h;&h;&h;&h;&h;&h;&h;&h;&h;&h;">]>'
    b"<response><returncode>SUCCESS</returncode><message>&i;</message></response>",
    "external": b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b"<response><returncode>SUCCESS</returncode><message>&x;</message></response>",
    "hugetext": b"<response><returncode>SUCCESS</returncode><message>"
    + b"x" * 11_000_000
    + b"</message></response>",
}


async def test_nothing_a_backend_sends_crashes_or_blocks(nursery: trio.Nursery) -> None:
    url = await _answering(nursery, HOSTILE)
    client = _client(url)
    for call in HOSTILE:
        with trio.fail_after(5):
            try:
                reply = await client.call(call, [])
            except BackendBadResponse:
                continue
        # Parsed: then no entity was expanded and nothing was read from disk.
        assert call in ("laughs", "external"), call
        assert len(reply.message) < 100 and "root:" not in reply.message, call
    await client.aclose()


# -- fairness between customers ----------------------------------------------------------------


async def _slow_shared_backend(make_stack: StackFactory) -> Stack:
    """One backend answering in 1 s, 4 pooled connections (2 per customer); a meeting each."""
    stack = await make_stack(
        backends=1, proxy={"backend_connections": 4, "timeouts": {"pool": 0.5}}
    )
    assert stack.gateway.config.proxy.calls_per_customer == 2
    assert text(await stack.create("flood", maxParticipants="1"), "returncode") == "SUCCESS"
    calm = await stack.create("calm", "globex", maxParticipants="1")
    assert text(calm, "returncode") == "SUCCESS"
    stack.sims[0].behaviour = Behaviour(latency=1.0)
    return stack


async def test_a_customer_flooding_a_slow_backend_does_not_starve_another(
    make_stack: StackFactory,
) -> None:
    stack = await _slow_shared_backend(make_stack)
    flood: list[str] = []

    async def flooding() -> None:
        root = await stack.call("getMeetingInfo", [("meetingID", "flood")])
        flood.append(text(root, "messageKey") if text(root, "returncode") == "FAILED" else "ok")

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(flooding)
        await trio.sleep(0.1)
        with trio.fail_after(2.5):
            calm = await stack.call("getMeetingInfo", [("meetingID", "calm")], "globex")
    assert text(calm, "returncode") == "SUCCESS"
    assert sorted(flood) == ["ok", "ok"] + ["serverUnavailable"] * 10
    exposition = (await stack.http.get(stack.url + "/metrics")).text
    assert 'outcome="customer_limit"} 10.0' in exposition


async def test_a_flood_of_get_meetings_does_not_starve_another_customer(
    make_stack: StackFactory,
) -> None:
    stack = await _slow_shared_backend(make_stack)
    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(stack.call, "getMeetings", [])
        await trio.sleep(0.1)
        with trio.fail_after(2.5):
            calm = await stack.call("getMeetingInfo", [("meetingID", "calm")], "globex")
    assert text(calm, "returncode") == "SUCCESS"
