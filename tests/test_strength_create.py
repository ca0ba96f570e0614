"""Tests written to kill mutants of ``proxy.calls.create`` that survived (docs/mutation.md).

Over real sockets where the rule is about what a backend is sent or a client answered (the
create's exact parameters, a refusal kept as the customer's, the number of backends tried),
and on the module's own functions where the rule is a value no answer shows whole (the
create request as resolved, the tag rule, the refusal's kind, ending preempted meetings).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
from lxml import etree

from proxy.backends.client import Reply
from proxy.backends.monitor import poll_once
from proxy.bbb import analytics, callbacks, recording_ready, rewrite
from proxy.calls.create import (
    _create_request,
    _customers_fault,
    _end_one,
    _end_victims,
    _first_create,
    _on_down_backend,
    _send,
    _server_tag,
    _server_tag_param,
    _tagged,
    tag_rule,
)
from proxy.calls.create import log as create_log
from proxy.errors import (
    BackendTimeout,
    BackendUnavailable,
    NoServerCapacity,
    NoVoiceBridge,
    ServerTagUnavailable,
    SubscriptionExhausted,
    ValidationError,
)
from proxy.gateway import Gateway
from proxy.ledger.model import CreateRequest, Reservation, Reserve
from proxy.ledger.service import Ledger
from proxy.placement import TagRule
from proxy.request import ApiRequest
from proxy.texts import apply_default_texts
from tests.harness import Stack, StackFactory, text, wait_until
from tests.test_strength_meetings import spy_releases
from tests.voice_stack import VoiceFactory, voice_stacks

CALLBACK = "http://127.0.0.1:9"


@pytest.fixture
async def make_voice(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[VoiceFactory]:
    async with voice_stacks(nursery, tmp_path) as make:
        yield make


def spy_creates(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every create the gateway sends to any backend: its backend, params and options."""
    seen: list[dict[str, Any]] = []
    for backend in stack.config.backends:
        client = stack.gateway.client(backend.id)

        def spying(call: Any, backend_id: str) -> Any:
            async def spy(name: str, params: Any, **kwargs: Any) -> Any:
                if name == "create":
                    seen.append(
                        {"backend": backend_id, "call": name, "params": list(params), **kwargs}
                    )
                return await call(name, params, **kwargs)

            return spy

        monkeypatch.setattr(client, "call", spying(client.call, backend.id))
    return seen


def failure(root: etree._Element) -> tuple[str, str]:
    assert text(root, "returncode") == "FAILED", etree.tostring(root)
    return text(root, "messageKey"), text(root, "message")


# -- what the backend is sent ------------------------------------------------------------------


async def test_the_backend_is_sent_the_create_exactly(
    make_voice: VoiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Namespaced id first, the customer's own parameters, the resolved size, duration 0,
    the gateway's end URLs and tags, then the kept and the gateway's own callback URLs."""
    voice = await make_voice(backends=1, voice={"dial_number": "+1 555 0100"})
    stack = voice.stack
    assert stack is not None
    seen = spy_creates(stack, monkeypatch)
    given = [
        ("meetingID", "room-1"),
        ("name", "Room 1"),
        ("maxParticipants", "3"),
        ("duration", "45"),
        ("meta_server-tag", " eu "),
        ("voiceBridge", "70757"),
        ("meetingEndedURL", f"{CALLBACK}/ended"),
        ("meta_endCallbackUrl", f"{CALLBACK}/callback"),
        ("meta_bbb-recording-ready-url", f"{CALLBACK}/ready"),
        ("meta_analytics-callback-url", f"{CALLBACK}/analytics"),
        ("record", "true"),
    ]
    root = await stack.call("create", given)
    assert text(root, "returncode") == "SUCCESS"
    assert (text(root, "meetingID"), text(root, "voiceBridge")) == ("room-1", "70757")
    assert text(root, "duration") == "45"
    held = stack.gateway.ledger.get(("acme", "room-1"))
    assert held is not None and held.confirmed
    backend = stack.config.backends[0]
    public = stack.config.proxy.public_url
    _, urls, kept = callbacks.split_customer_urls(given)
    ended, end_callback = callbacks.ended_urls(
        public, backend, "acme~room-1", "room-1", urls, held.created_at
    )
    [sent] = seen
    assert {k: v for k, v in sent.items() if k != "params"} == {
        "backend": "bbb-1",
        "call": "create",
        "customer": "acme",
    }
    assert sent["params"] == [
        ("meetingID", "acme~room-1"),
        ("name", "Room 1"),
        ("record", "true"),
        ("meta_server-tag", "eu"),
        ("voiceBridge", "70757"),
        ("dialNumber", "+1 555 0100"),
        *apply_default_texts([], stack.config.texts),  # the platform's welcome texts
        ("maxParticipants", "3"),
        ("duration", "0"),
        ("meetingEndedURL", ended),
        ("meta_endCallbackUrl", end_callback),
        *rewrite.tags("acme", "room-1", 45, held.created_at),
        *kept,
        *recording_ready.backend_params(
            public, backend, "acme", "room-1", ("bbb-recording-ready-url", f"{CALLBACK}/ready")
        ),
        *analytics.backend_params(public, backend, "acme", "room-1", f"{CALLBACK}/analytics"),
    ]
    assert len(kept) == 1 and len(apply_default_texts([], stack.config.texts)) == 2


async def test_a_create_with_a_body_sends_it_and_its_type(
    make_voice: VoiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    voice = await make_voice(backends=1)
    stack = voice.stack
    assert stack is not None
    seen = spy_creates(stack, monkeypatch)
    modules = b'<modules><module name="presentation"><document url="https://x.test/a.pdf"/></module></modules>'
    response = await stack.http.post(
        stack.signed("create", [("meetingID", "room-1"), ("name", "Room 1")]),
        content=modules,
        headers={"Content-Type": "application/xml"},
    )
    assert "<returncode>SUCCESS</returncode>" in response.text
    [sent] = seen
    assert (sent["call"], sent["customer"]) == ("create", "acme")
    assert sent["content_type"] == "application/xml"
    assert etree.tostring(etree.fromstring(sent["body"])) == modules


async def test_the_dial_number_the_customer_gives_is_kept(
    make_voice: VoiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else the configured one: the customer's own under ``[voice.dial_numbers]``."""
    numbers = {"dial_number": "+1 555 0100", "dial_numbers": {"globex": "+44 20 1"}}
    voice = await make_voice(backends=1, voice=numbers)
    stack = voice.stack
    assert stack is not None
    seen = spy_creates(stack, monkeypatch)
    await stack.create("room-1", dialNumber="+49 30 1")
    await stack.create("room-2", dialNumber="  ")
    await stack.create("room-3", "globex")
    dial = [[v for k, v in s["params"] if k == "dialNumber"] for s in seen]
    assert dial == [["+49 30 1"], ["+1 555 0100"], ["+44 20 1"]]


# -- refusals: the customer's or the server's ---------------------------------------------------


async def test_a_backend_refusing_the_customers_own_bridge_is_the_customers_answer(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A meeting the gateway does not know holds the bridge on the backend: BBB's refusal
    is passed on, no other backend is tried, nothing stays reserved."""
    stack = await make_stack(backends=2)
    outside = [("meetingID", "outside"), ("name", "Outside"), ("voiceBridge", "70757")]
    for backend in stack.config.backends:
        assert (await stack.gateway.client(backend.id).call("create", outside)).ok
    seen = spy_creates(stack, monkeypatch)
    root = await stack.create("room-1", voiceBridge="70757")
    assert failure(root) == ("nonUniqueVoiceBridge", "The selected voice bridge is already in use.")
    assert len(seen) == 1
    assert stack.gateway.ledger.get(("acme", "room-1")) is None


async def test_no_more_than_three_backends_are_tried(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=4)
    for sim in stack.sims:
        sim.behaviour.mode = "refuse_create"
    seen = spy_creates(stack, monkeypatch)
    caplog.set_level(logging.WARNING, logger=create_log.name)
    root = await stack.create("room-1")
    assert text(root, "messageKey") == "serverUnavailable"
    tried = [s["backend"] for s in seen]
    assert len(tried) == 3 and len(set(tried)) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == create_log.name]
    assert warnings == [f"backend {b} refused a create: internalError" for b in tried]
    assert stack.gateway.ledger.get(("acme", "room-1")) is None


@pytest.mark.parametrize(
    ("key", "own_bridge", "customers"),
    [
        ("validationError", None, True),
        ("idNotUnique", None, True),
        ("missingParamName", None, True),
        ("missingParam", None, True),
        ("nonUniqueVoiceBridge", "70757", True),
        ("nonUniqueVoiceBridge", " ", False),
        ("nonUniqueVoiceBridge", None, False),
        ("sizeLimit", "70757", False),
        ("xmissingParam", None, False),
        ("", None, False),
    ],
)
def test_customers_fault(key: str, own_bridge: str | None, customers: bool) -> None:
    params = [("meetingID", "room-1")]
    if own_bridge is not None:
        params.append(("voiceBridge", own_bridge))
    req = ApiRequest(cast(Any, SimpleNamespace(id="acme")), "create", params)
    assert _customers_fault(key, req) is customers


# -- the create request as resolved -------------------------------------------------------------


def customer(**fields: Any) -> Any:
    base = {
        "id": "acme",
        "default_max_participants": 10,
        "default_duration": 60,
        "default_tags": (),
        "required_tags": (),
    }
    return SimpleNamespace(**(base | fields))


def create_req(*params: tuple[str, str], **fields: Any) -> ApiRequest:
    return ApiRequest(customer(**fields), "create", [("meetingID", " room-1 "), *params])


@pytest.mark.parametrize(
    ("given", "connections", "duration", "asked"),
    [
        ([], 10, 60, 0),
        ([("maxParticipants", "3"), ("duration", "45")], 3, 45, 45),
        ([("maxParticipants", "0"), ("duration", "0")], 10, 60, 0),
        ([("maxParticipants", "-1"), ("duration", "-5")], 10, 60, 0),
        ([("maxParticipants", "1"), ("duration", "1")], 1, 1, 1),
    ],
)
def test_the_create_request_resolves_size_and_duration(
    given: list[tuple[str, str]], connections: int, duration: int, asked: int
) -> None:
    req = create_req(("name", "Room"), *given)
    assert _create_request(req, allocate=True) == CreateRequest(
        customer="acme",
        meeting_id="room-1",
        backend_meeting_id="acme~room-1",
        connections=connections,
        duration=duration,
        asked_duration=asked,
        voice_bridge=None,
    )


@pytest.mark.parametrize("name", [None, "", "   "])
def test_a_create_without_a_name_is_refused(name: str | None) -> None:
    params = [] if name is None else [("name", name)]
    with pytest.raises(ValidationError) as refused:
        _create_request(create_req(*params), allocate=True)
    assert str(refused.value) == "You must provide a meeting name"
    assert refused.value.message_key == "validationError"


def test_the_customers_bridge_is_read_only_when_the_gateway_allocates() -> None:
    req = create_req(("name", "Room"), ("voiceBridge", " 70757 "))
    assert _create_request(req, allocate=True).voice_bridge == "70757"
    assert _create_request(req, allocate=False).voice_bridge is None
    blank = create_req(("name", "Room"), ("voiceBridge", "  "))
    assert _create_request(blank, allocate=True).voice_bridge is None
    bad = create_req(("name", "Room"), ("voiceBridge", "12ab"))
    with pytest.raises(ValidationError) as refused:
        _create_request(bad, allocate=True)
    assert str(refused.value) == "Voice bridge must be an integer."
    assert _create_request(bad, allocate=False).voice_bridge is None


# -- placement tags ------------------------------------------------------------------------------


def test_the_tag_rule_of_a_create() -> None:
    tagged = create_req(("META_Server-Tag", "eu;us!"), default_tags=("x",), required_tags=("r",))
    assert tag_rule(tagged) == TagRule(frozenset({"eu", "us"}), True, frozenset({"r"}))
    plain = create_req(default_tags=("x", "y"), required_tags=())
    assert tag_rule(plain) == TagRule(frozenset({"x", "y"}), False, frozenset())
    empty = create_req(("meta_server-tag", "!"), default_tags=("x",))
    assert tag_rule(empty) == TagRule(frozenset({"x"}), False, frozenset())


def test_the_first_server_tag_counts() -> None:
    params = [("a", "1"), ("Meta_Server-Tag", "eu"), ("meta_server-tag", "us")]
    assert _server_tag(params) == "eu"
    assert _server_tag([("a", "1")]) is None


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ([("a", "1")], [("a", "1")]),
        (
            [("META_server-TAG", " eu;us ! "), ("a", "1")],
            [("a", "1"), ("meta_server-tag", "eu;us")],
        ),
        ([("meta_server-tag", "!"), ("a", "1")], [("a", "1")]),
        ([("meta_server-tag", " "), ("a", "1")], [("a", "1")]),
        (
            [("meta_server-tag", "eu"), ("a", "1"), ("meta_server-tag", "us")],
            [("a", "1"), ("meta_server-tag", "eu")],
        ),
    ],
)
def test_the_server_tag_as_the_backend_is_told(
    given: list[tuple[str, str]], sent: list[tuple[str, str]]
) -> None:
    assert _server_tag_param(given) == sent


def test_no_room_where_the_tags_allow_is_server_tag_unavailable() -> None:
    capacity = NoServerCapacity()
    strict = TagRule(frozenset({"us", "eu"}), True, frozenset({"r"}))
    tagged = _tagged(capacity, strict)
    assert type(tagged) is ServerTagUnavailable
    assert str(tagged) == "There is no available server with the required tag=eu;us."
    required = TagRule(frozenset({"us"}), False, frozenset({"r2", "r1"}))
    assert str(_tagged(capacity, required)) == (
        "There is no available server with the required tag=r1;r2."
    )
    # Nothing ruled out by tags, no voice bridge free, or the subscription: unchanged.
    assert _tagged(capacity, TagRule(frozenset({"us"}))) is capacity
    no_bridge = NoVoiceBridge()
    assert _tagged(no_bridge, strict) is no_bridge
    exhausted = SubscriptionExhausted()
    assert _tagged(exhausted, strict) is exhausted


# -- the call to the backend and its latency ----------------------------------------------------


def reservation(**fields: Any) -> Reservation:
    base: dict[str, Any] = {
        "customer": "acme",
        "meeting_id": "room-1",
        "backend_id": "b1",
        "backend_meeting_id": "acme~room-1",
        "connections": 2,
        "duration": 60,
        "asked_duration": 0,
        "created_at": 1.0,
    }
    return Reservation(**(base | fields))


class FakeClient:
    """A backend client answering ``answer`` (or raising it) after ``delay`` seconds."""

    def __init__(self, answer: Any, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.calls: list[tuple[Any, ...]] = []

    async def call(self, name: str, params: Any, **kwargs: Any) -> Any:
        self.calls.append((name, list(params), kwargs))
        await trio.sleep(self.delay)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def reply(xml: bytes) -> Reply:
    return Reply(etree.fromstring(xml))


def fake_gateway(client: FakeClient) -> tuple[Gateway, SimpleNamespace]:
    state = SimpleNamespace(latencies=[], tallies=[], clients=[])

    def client_of(backend_id: str) -> FakeClient:
        state.clients.append(backend_id)
        return client

    gw = SimpleNamespace(
        client=client_of,
        observe_latency=lambda b, s: state.latencies.append((b, s)),
        tally=lambda family, label: state.tallies.append((family, label)),
    )
    return cast(Gateway, gw), state


async def test_the_create_answer_time_feeds_the_latency_average(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = reply(b"<response><returncode>SUCCESS</returncode></response>")
    client = FakeClient(ok, delay=2.5)
    gw, state = fake_gateway(client)
    params = [("meetingID", "acme~room-1")]
    monkeypatch.setattr(
        sys.modules["proxy.calls.create"], "backend_params", lambda gw, req, r: params
    )
    await trio.sleep(100)  # the clock is not at 0 when the create is sent
    assert await _send(gw, create_req(), reservation()) is ok
    assert state.latencies == [("b1", 2.5)]
    client.answer = BackendTimeout("b1", "timed out")
    with pytest.raises(BackendTimeout):
        await _send(gw, create_req(), reservation())
    assert state.latencies == [("b1", 2.5), ("b1", 2.5)]
    client.answer = BackendUnavailable("b1", "refused")
    with pytest.raises(BackendUnavailable):
        await _send(gw, create_req(), reservation())
    assert len(state.latencies) == 2  # a refused connection says nothing of latency
    assert client.calls[0] == ("create", params, {"customer": "acme"})


# -- ending preempted meetings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        (b"<response><returncode>SUCCESS</returncode></response>", "ended"),
        (b"<response><returncode>FAILED</returncode></response>", "end_failed"),
    ],
)
async def test_a_preempted_meeting_is_ended_on_its_backend(
    answer: bytes, label: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeClient(reply(answer))
    gw, state = fake_gateway(client)
    caplog.set_level(logging.INFO, logger=create_log.name)
    await _end_one(gw, reservation(backend_id="b2"))
    assert client.calls == [("end", [("meetingID", "acme~room-1")], {})]
    assert state.clients == ["b2"]
    assert state.tallies == [("preemptions", label)]
    ok = label == "ended"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"ended overtime meeting ('acme', 'room-1') on b2: {ok}")
    ]


async def test_a_preempted_meeting_that_cannot_be_ended_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeClient(BackendUnavailable("b2", "refused"))
    gw, state = fake_gateway(client)
    caplog.set_level(logging.INFO, logger=create_log.name)
    await _end_one(gw, reservation(backend_id="b2"))
    assert state.tallies == [("preemptions", "end_failed")]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "could not end preempted meeting on b2: BackendUnavailable(b2): refused",
        )
    ]


async def test_a_repeated_create_the_backend_refuses_is_its_answer(stack: Stack) -> None:
    """The meeting stays pinned and confirmed: BBB's FAILED answer is passed on whole."""
    await stack.create("room-1")
    sim, _ = stack.backend_meeting("acme", "room-1")
    sim.behaviour.mode = "refuse_create"
    response = await stack.http.get(
        stack.signed("create", [("meetingID", "room-1"), ("name", "Room room-1")])
    )
    assert response.status_code == 200
    assert response.text == (
        "<response><returncode>FAILED</returncode><messageKey>internalError</messageKey>"
        "<message>The meeting could not be created on this server.</message></response>"
    )
    held = stack.gateway.ledger.get(("acme", "room-1"))
    assert held is not None and held.confirmed


def test_a_refused_create_of_a_meeting_pinned_to_a_down_backend_blames_the_server() -> None:
    """Only a pin on a DOWN backend makes the refusal the server's (else: the ledger's)."""
    pins = {("acme", "room-1"): reservation(backend_id="b1"), ("acme", "room-2"): reservation()}
    down = {"b1"}
    gw = cast(
        Gateway,
        SimpleNamespace(
            ledger=SimpleNamespace(get=pins.get), backend_down=lambda b: b in down or b is None
        ),
    )
    request = _create_request(create_req(("name", "Room")), allocate=False)
    error = _on_down_backend(gw, request)
    assert type(error) is BackendUnavailable
    assert str(error) == "BackendUnavailable(b1): down, and no other server can take the meeting"
    down.clear()
    assert _on_down_backend(gw, request) is None
    unpinned = CreateRequest("acme", "room-9", "acme~room-9", 1, 1, 0)
    assert _on_down_backend(gw, unpinned) is None


@pytest.mark.parametrize("mode", ["refuse_create", "http500"])
async def test_a_create_the_backend_refuses_or_breaks_is_released_as_failed(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    stack = await make_stack(backends=1)
    stack.sims[0].behaviour.mode = mode
    seen = spy_releases(stack, monkeypatch)
    root = await stack.create("room-1")
    assert text(root, "returncode") == "FAILED"
    assert seen == [(("acme", "room-1"), "failed")]
    assert stack.gateway.ledger.get(("acme", "room-1")) is None


async def test_a_cancelled_create_still_releases_its_reservation(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release is shielded: a create cancelled while the backend is asked (the client
    went away) frees its connections all the same."""
    released: list[tuple[Any, str]] = []

    async def release(key: Any, reason: str) -> None:
        await trio.lowlevel.checkpoint()  # where an unshielded release is cancelled
        released.append((key, reason))

    gw, _ = fake_gateway(FakeClient(None, delay=60))
    cast(Any, gw).ledger = SimpleNamespace(release=release)
    monkeypatch.setattr(sys.modules["proxy.calls.create"], "backend_params", lambda *a: [])
    with trio.move_on_after(1) as cancelled:
        await _first_create(gw, create_req(), reservation())
    assert cancelled.cancelled_caught
    assert released == [(("acme", "room-1"), "failed")]


async def test_a_meeting_moved_off_a_down_backend_is_logged_and_counted(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.create("room-1")
    old = stack.gateway.ledger.get(("acme", "room-1"))
    assert old is not None
    stack.sim_for(old.backend_id).behaviour.mode = "http500"
    for _ in range(stack.config.proxy.health.down_after):
        await poll_once(stack.gateway, old.backend_id)
    assert stack.gateway.backend_down(old.backend_id)
    caplog.set_level(logging.WARNING, logger=create_log.name)
    root = await stack.create("room-1")
    assert text(root, "returncode") == "SUCCESS"
    new = stack.gateway.ledger.get(("acme", "room-1"))
    assert new is not None and new.backend_id != old.backend_id
    assert [r.getMessage() for r in caplog.records if r.name == create_log.name] == [
        f"meeting ('acme', 'room-1'): backend {old.backend_id} is down, "
        f"re-creating it on {new.backend_id}"
    ]
    assert stack.gateway.failover.get("moved") == 1


def test_each_preempted_meeting_is_ended_in_a_task_of_its_own() -> None:
    """Under the kind ``end-preempted`` (its failures are counted under that name)."""
    spawned: list[tuple[Any, ...]] = []
    gw = cast(Gateway, SimpleNamespace(spawn=lambda *args: spawned.append(args)))
    victims = (reservation(meeting_id="a"), reservation(meeting_id="b"))
    _end_victims(gw, victims)
    assert spawned == [("end-preempted", _end_one, gw, victim) for victim in victims]


async def test_a_create_of_a_meeting_whose_first_create_is_in_flight_waits_for_it(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second create is not forwarded while the first is pending: it waits until the
    first is settled (here: refused by the backend and released), then is admitted afresh
    and creates the meeting, which the ledger then holds confirmed."""
    stack = await make_stack(backends=1)
    sim = stack.sims[0]
    client = stack.gateway.client(stack.config.backends[0].id)
    ledger = stack.gateway.ledger
    call, decide = client.call, ledger.decide
    events: list[str] = []
    decisions: list[str] = []
    first_sent, second_decided, gate = trio.Event(), trio.Event(), trio.Event()

    async def spy_call(name: str, params: Any, **kwargs: Any) -> Any:
        if name != "create":
            return await call(name, params, **kwargs)
        number = sum(e.endswith("sent") for e in events) + 1
        events.append(f"create {number} sent")
        if number == 1:
            first_sent.set()
            await gate.wait()
            sim.behaviour.mode = "refuse_create"
        try:
            return await call(name, params, **kwargs)
        finally:
            sim.behaviour.mode = "ok"
            events.append(f"create {number} answered")

    async def spy_decide(*args: Any, **kwargs: Any) -> Any:
        decision = await decide(*args, **kwargs)
        decisions.append(type(decision).__name__)
        if len(decisions) == 2:
            second_decided.set()
        return decision

    monkeypatch.setattr(client, "call", spy_call)
    monkeypatch.setattr(ledger, "decide", spy_decide)
    answers: dict[str, tuple[str, str]] = {}

    async def create(which: str) -> None:
        root = await stack.create("room-1")
        answers[which] = (text(root, "returncode"), root.findtext("messageKey") or "")

    async with trio.open_nursery() as both:
        both.start_soon(create, "first")
        await first_sent.wait()
        both.start_soon(create, "second")
        await second_decided.wait()
        await trio.sleep(0.2)  # a second create forwarded at once has reached the backend
        assert (events, decisions) == (["create 1 sent"], ["Admit", "Duplicate"])
        gate.set()
    # Once the first is released, which of the two decides first is the scheduler's: the
    # first (its backend excluded) is refused, or finds the second's meeting and repeats its
    # create.
    if answers["first"] == ("FAILED", "serverUnavailable"):
        assert decisions == ["Admit", "Duplicate", "Refuse", "Admit"]
        creates = 2
    else:
        assert answers["first"] == ("SUCCESS", "duplicateWarning")
        # the first finds it pending (and waits) or already confirmed
        assert decisions[:4] == ["Admit", "Duplicate", "Admit", "Duplicate"]
        assert decisions[4:] in ([], ["Duplicate"])
        creates = 3
    assert answers["second"] == ("SUCCESS", "")
    assert events == [
        f"create {n} {e}" for n in range(1, creates + 1) for e in ("sent", "answered")
    ]
    held = ledger.get(("acme", "room-1"))
    assert held is not None and held.confirmed
    assert [m.meeting_id for m in sim.meetings.values()] == ["acme~room-1"]


def spy_confirms(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The key of every confirm the gateway's ledger is asked for."""
    seen: list[Any] = []
    ledger = stack.gateway.ledger
    confirm = ledger.confirm

    async def spy(key: Any) -> None:
        seen.append(key)
        await confirm(key)

    monkeypatch.setattr(ledger, "confirm", spy)
    return seen


async def test_a_repeated_create_answers_for_the_customers_meeting_and_confirms_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BBB's duplicateWarning, with the customer's meetingID and duration, not the backend's."""
    await stack.create("room-1", duration="45")
    confirms = spy_confirms(stack, monkeypatch)
    seen = spy_creates(stack, monkeypatch)
    root = await stack.create("room-1", duration="45")
    assert (text(root, "returncode"), text(root, "messageKey")) == ("SUCCESS", "duplicateWarning")
    assert (text(root, "meetingID"), text(root, "duration")) == ("room-1", "45")
    held = stack.gateway.ledger.get(("acme", "room-1"))
    assert held is not None and held.confirmed
    assert [s["backend"] for s in seen] == [held.backend_id]
    assert confirms == []


async def test_a_create_of_a_meeting_left_pending_is_forwarded_and_confirmed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Reserve without its Confirm (a crash between them), no create of it in flight:
    the create goes to the pinned backend, its answer confirms the reservation."""
    ghost = reservation(
        meeting_id="ghost",
        backend_id="bbb-2",
        backend_meeting_id="acme~ghost",
        connections=4,
        asked_duration=30,
        created_at=stack.gateway.ledger.clock(),
    )
    await stack.gateway.ledger.record(Reserve(ghost))
    assert not stack.gateway.ledger.settling(ghost.key)
    confirms = spy_confirms(stack, monkeypatch)
    seen = spy_creates(stack, monkeypatch)
    root = await stack.create("ghost", maxParticipants="4", duration="30")
    assert (text(root, "returncode"), root.findtext("messageKey")) == ("SUCCESS", "")
    assert (text(root, "meetingID"), text(root, "duration")) == ("ghost", "30")
    assert [s["backend"] for s in seen] == ["bbb-2"]
    assert confirms == [("acme", "ghost")]
    held = stack.gateway.ledger.get(("acme", "ghost"))
    assert held is not None and held.confirmed and held.backend_id == "bbb-2"


async def test_a_refused_create_with_no_other_backend_to_try_is_server_unavailable(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The refusal is the answer, not the ledger's noServerCapacity once its backend is
    excluded (the refusing backend is up: its pin was released); the gateway's log names
    the backend and what it answered."""
    stack = await make_stack(backends=1)
    stack.sims[0].behaviour.mode = "refuse_create"
    caplog.set_level(logging.WARNING, logger="proxy.calls")
    root = await stack.create("room-1")
    assert [r.getMessage() for r in caplog.records if r.name == "proxy.calls"] == [
        "create failed: BackendUnavailable(bbb-1): refused: internalError"
    ]
    assert failure(root) == (
        "serverUnavailable",
        "The server hosting this meeting cannot be reached",
    )
    assert not stack.gateway.backend_down("bbb-1")
    assert len(stack.gateway.ledger.state) == 0


async def test_an_overtime_meeting_preempted_by_a_create_is_ended_on_its_backend(
    make_stack: StackFactory,
) -> None:
    """The create that needs an overtime meeting's connections is created, and the
    overtime meeting is ended on its backend in a task of its own, and counted."""
    now = [1_700_000_000.0]
    stack = await make_stack(ledger=Ledger(clock=lambda: now[0]))
    await stack.create("old", maxParticipants="15", duration="1")
    sim, backend_old = stack.backend_meeting("acme", "old")
    now[0] += 120  # two minutes into a one-minute meeting
    root = await stack.create("new", maxParticipants="10")
    assert text(root, "returncode") == "SUCCESS"
    assert stack.gateway.ledger.get(("acme", "old")) is None
    await wait_until(lambda: stack.gateway.tallies.get(("preemptions", "ended")) == 1)
    assert backend_old not in sim.meetings or sim.meetings[backend_old].ended
