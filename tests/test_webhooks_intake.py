"""Event intake: the gateway's hook on every backend, the backend's checksum, and events
mapped to the customer's meeting.

The mapping rules are tested as plain functions (:mod:`proxy.webhooks.mapping`); the
endpoint and the registration over real sockets, simulated backends sending their
events, with ``gw.webhooks.accept`` replaced by a recorder.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.bbb.checksum import signed_query
from proxy.bbb.rewrite import backend_meeting_id
from proxy.config import Backend
from proxy.errors import StorageUnavailable
from proxy.health import State
from proxy.simulator import Simulator, serve_simulator
from proxy.simulator.webhooks import url_search_params
from proxy.store import Json
from proxy.webhooks import mapping
from proxy.webhooks.mapping import Event, Owner, Recent
from tests.harness import BACKEND_SECRET, Stack, StackFactory, wait_until

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bbb" / "bbb-webhooks"
PUBLIC = "https://gw.example"
B1 = Backend("bbb-1", "http://b1/bigbluebutton/api", "secret-one", 10)
B2 = Backend("bbb-2", "http://b2/bigbluebutton/api", "secret-two", 10)
BACKENDS = {b.id: b for b in (B1, B2)}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dig(value: object, *path: str) -> Any:
    """``value[path[0]][path[1]]...`` of a JSON value (whose type says nothing of it)."""
    for key in path:
        assert isinstance(value, dict), (key, value)
        value = value[key]
    return value


def fixture_events() -> list[Event]:
    lines = (FIXTURES / "mapped-events.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def form(event: object, wrap: bool = True) -> bytes:
    text = json.dumps(event)
    return url_search_params(
        [("domain", "bbb-1.test"), ("event", f"[{text}]" if wrap else text), ("timestamp", "1")]
    ).encode()


def signed(backend: Backend, body: bytes, algorithm: str = "sha1") -> str:
    """The raw query bbb-webhooks POSTs to the registered URL with."""
    url = mapping.intake_url(PUBLIC, backend)
    checksum = hashlib.new(algorithm, url.encode() + body + backend.secret.encode()).hexdigest()
    return url.partition("?")[2] + "&checksum=" + checksum


# -- the URL and the checksum ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
def test_a_post_signed_by_the_backend_verifies(algorithm: str) -> None:
    body = form(fixture_events()[0])
    query = signed(B1, body, algorithm)
    assert mapping.verify(query, body, PUBLIC, BACKENDS) is B1
    head, _, checksum = query.rpartition("=")
    assert mapping.verify(f"{head}={checksum.upper()}", body, PUBLIC, BACKENDS) is B1


def test_anything_else_is_refused() -> None:
    body = form(fixture_events()[0])
    good = signed(B1, body)
    b2_url = mapping.intake_url(PUBLIC, B2)
    forged_for_b1 = good.replace("b=bbb-1", "b=bbb-2")  # b1's token and checksum, for b2
    checksum = hashlib.sha1(b2_url.encode() + body + b"secret-one").hexdigest()
    wrong_secret = b2_url.partition("?")[2] + "&checksum=" + checksum
    cases = [
        good[:-1] + ("0" if good[-1] != "0" else "1"),  # the checksum altered
        good[:-2],  # a length no algorithm has
        good.replace("&checksum=", "&x=1&checksum="),  # more than was registered
        forged_for_b1,
        wrong_secret,
        good.replace("b=bbb-1", "b=bbb-9"),  # no such backend
        "",
        "checksum=" + good.rpartition("=")[2],
    ]
    for query in cases:
        assert mapping.verify(query, body, PUBLIC, BACKENDS) is None, query
    assert mapping.verify(good, body + b"&x=1", PUBLIC, BACKENDS) is None  # the body altered
    assert mapping.verify(good, body, "https://other.example", BACKENDS) is None


def test_bearer_auth_instead_of_a_checksum_is_accepted_with_the_backends_secret() -> None:
    body = form(fixture_events()[0])
    query = mapping.intake_url(PUBLIC, B1).partition("?")[2]
    assert mapping.verify(query, body, PUBLIC, BACKENDS, "Bearer secret-one") is B1
    for header in ["Bearer secret-two", "secret-one", "Bearer ", "", "Bearer secret-one\u00e9"]:
        assert mapping.verify(query, body, PUBLIC, BACKENDS, header) is None, header
    assert mapping.verify(query, body, PUBLIC, BACKENDS) is None  # neither
    assert mapping.verify(query + "&x=1", body, PUBLIC, BACKENDS, "Bearer secret-one") is None


def test_the_intake_url_names_its_backend_under_a_token_of_its_secret() -> None:
    url = mapping.intake_url(PUBLIC, B1)
    assert url.startswith(PUBLIC + mapping.PATH + "?b=bbb-1&t=")
    other_secret = Backend("bbb-1", B1.url, "another", 10)
    assert mapping.intake_url(PUBLIC, other_secret) != url
    assert B1.secret not in url


# -- the form ----------------------------------------------------------------------------------


def test_every_fixture_event_is_read_from_bbb_webhooks_form() -> None:
    for event in fixture_events():
        assert mapping.parse_events(form(event)) == [event]
        assert mapping.parse_events(form(event, wrap=False)) == [event]  # older versions


def test_what_is_not_the_form_is_none() -> None:
    nested: object = {"data": "x"}
    for _ in range(mapping.MAX_DEPTH + 1):
        nested = {"a": nested}
    bodies = [
        b"",
        b"\xff\xfe",
        b"event=",
        b"event=not-json",
        b"event=%5B1%2C2%5D",  # [1,2]: not objects
        b"event=%22text%22",
        b"domain=x&timestamp=1",
        b"&".join([b"f=1"] * (mapping.MAX_FIELDS + 1)) + b"&event=%7B%7D",
        form([{"data": {}}] * (mapping.MAX_EVENTS + 1), wrap=False),
        form(nested),
        b"event=" + b"%5B" * 5000,
    ]
    for body in bodies:
        assert mapping.parse_events(body) is None, body[:40]


# -- whose event -------------------------------------------------------------------------------


class FakeLedger:
    def __init__(self, placed: dict[tuple[str, str], Owner] | None = None) -> None:
        self.held = placed or {}  # (backend, backend meetingID) -> owner

    def ledger(self) -> mapping.Ledger:
        def placed(backend: str, meeting: str) -> Owner | None:
            return self.held.get((backend, meeting))

        def backend_of(customer: str, meeting_id: str) -> str | None:
            for (backend, _), owner in self.held.items():
                if (owner.customer, owner.meeting_id) == (customer, meeting_id):
                    return backend
            return None

        return mapping.Ledger(placed, backend_of)


def event_for(external: str | None, name: str = "user-joined", internal: str = "int-1") -> Event:
    meeting: dict[str, Json] = {"internal-meeting-id": internal}
    if external is not None:
        meeting["external-meeting-id"] = external
    return {"data": {"type": "event", "id": name, "attributes": {"meeting": meeting}}}


def test_the_ledger_names_the_owner_first() -> None:
    hashed = "acme~sha256-" + "0" * 64
    held = FakeLedger({("bbb-1", hashed): Owner("acme", "a" * 300, hashed)})
    owner = mapping.owner_of(event_for(hashed), "bbb-1", held.ledger(), Recent(), {"acme"})
    assert owner == Owner("acme", "a" * 300, hashed)
    # the same meetingID on another backend is not that reservation (and hashed: unknown)
    assert mapping.owner_of(event_for(hashed), "bbb-2", held.ledger(), Recent(), {"acme"}) is None


def test_a_namespaced_meeting_id_names_its_customer_after_the_ledger_let_go() -> None:
    owner = mapping.owner_of(
        event_for("acme~room-1"), "bbb-1", FakeLedger().ledger(), Recent(), {"acme"}
    )
    assert owner == Owner("acme", "room-1", "acme~room-1")


def test_meetings_the_gateway_did_not_place_have_no_owner() -> None:
    ledger, customers = FakeLedger().ledger(), {"acme"}
    for external in ["room-1", "~room", "acme~", "other~room-1", "acme~sha256-abc"]:
        assert mapping.owner_of(event_for(external), "bbb-1", ledger, Recent(), customers) is None
    assert mapping.owner_of(event_for(None), "bbb-1", ledger, Recent(), customers) is None
    assert mapping.owner_of({"data": 5}, "bbb-1", ledger, Recent(), customers) is None


def test_a_stray_copy_on_another_backend_is_not_the_customers() -> None:
    held = FakeLedger({("bbb-2", "acme~room-1"): Owner("acme", "room-1", "acme~room-1")})
    stray = mapping.owner_of(event_for("acme~room-1"), "bbb-1", held.ledger(), Recent(), {"acme"})
    assert stray is None


def test_later_events_of_a_released_meeting_are_known_by_its_ids() -> None:
    hashed = "acme~sha256-" + "1" * 64
    held = FakeLedger({("bbb-1", hashed): Owner("acme", "long-id", hashed)})
    recent = Recent()
    assert mapping.owner_of(event_for(hashed), "bbb-1", held.ledger(), recent, {"acme"})
    held.held.clear()  # the meeting ended: the ledger released it
    ended = mapping.owner_of(
        event_for(hashed, "meeting-ended"), "bbb-1", held.ledger(), recent, {"acme"}
    )
    assert ended == Owner("acme", "long-id", hashed)
    # a recording event that names the internal meetingID only
    rap = mapping.owner_of(
        event_for(None, "rap-archive-started"), "bbb-1", held.ledger(), recent, {"acme"}
    )
    assert rap == Owner("acme", "long-id", hashed)


def test_recent_owners_are_bounded() -> None:
    recent = Recent(size=4)
    for i in range(10):
        recent.remember("b", [f"m{i}", None], Owner("c", f"m{i}", f"m{i}"))
    assert recent.get("b", "m0") is None and recent.get("b", "m9") is not None


def test_the_gateways_tags_name_a_hashed_meeting() -> None:
    long_id = "x" * 300
    external = backend_meeting_id("acme", long_id)
    event = event_for(external, "meeting-created")
    meeting = dig(event, "data", "attributes", "meeting")
    meeting["metadata"] = {"bbb-proxy-customer": "acme", "bbb-proxy-meeting": long_id}
    owner = mapping.owner_of(event, "bbb-1", FakeLedger().ledger(), Recent(), {"acme"})
    assert owner == Owner("acme", long_id, external)
    meeting["metadata"] = {"bbb-proxy-customer": "acme", "bbb-proxy-meeting": "other"}
    assert mapping.owner_of(event, "bbb-1", FakeLedger().ledger(), Recent(), {"acme"}) is None


# -- for the customer --------------------------------------------------------------------------


def test_the_customer_sees_its_meeting_id_and_none_of_the_gateways_metadata() -> None:
    created = fixture_events()[0]
    meeting = dig(created, "data", "attributes", "meeting")
    meeting["external-meeting-id"] = "acme~room-1"
    meeting["duration"] = 60
    meeting["metadata"] = {
        "course": "Maths",
        "bbb-proxy-customer": "acme",
        "bbb-proxy-meeting": "room-1",
        "bbb-proxy-duration": "0",
        "bbb-proxy-created": "1700000000.5",
        "endcallbackurl": "https://gw.example/callbacks/v1/meeting-ended?sig=x",
        "bbb-proxy-endcallbackurl": "https://lms.example/ended",
        "bbb-recording-ready-url": "https://gw.example/callbacks/v1/recording-ready?b=1&sig=2",
        "bbb-proxy-bbb-recording-ready-url": "https://lms.example/ready",
    }
    out = mapping.for_customer(created, Owner("acme", "room-1", "acme~room-1"))
    seen = dig(out, "data", "attributes", "meeting")
    assert seen["external-meeting-id"] == "room-1"
    assert seen["duration"] == 0  # what the customer asked for
    assert seen["metadata"] == {
        "course": "Maths",
        "endcallbackurl": "https://lms.example/ended",
        "bbb-recording-ready-url": "https://lms.example/ready",
    }
    assert meeting["external-meeting-id"] == "acme~room-1"  # the original is left alone


def test_a_recordings_metadata_gets_the_customers_meeting_id() -> None:
    event: Event = {
        "data": {
            "id": "rap-publish-ended",
            "attributes": {
                "meeting": {"internal-meeting-id": "i-1", "external-meeting-id": "acme~r"},
                "record-id": "i-1",
                "recording": {"metadata": {"meetingId": "acme~r", "bbb-proxy-customer": "acme"}},
            },
        }
    }
    out = mapping.for_customer(event, Owner("acme", "r", "acme~r"))
    attributes = dig(out, "data", "attributes")
    assert attributes["recording"]["metadata"] == {"meetingId": "r"}
    assert attributes["record-id"] == "i-1"


# -- nothing a backend sends raises (fuzz) ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "data",
                    "id",
                    "attributes",
                    "meeting",
                    "metadata",
                    "recording",
                    "external-meeting-id",
                    "internal-meeting-id",
                    "bbb-proxy-customer",
                    "bbb-proxy-meeting",
                    "duration",
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@FUZZ
@given(value=json_values, wrap=st.booleans())
def test_fuzz_any_json_maps_or_drops_without_raising(value: object, wrap: bool) -> None:
    events = mapping.parse_events(form(value, wrap))
    for event in events or []:
        owner = mapping.owner_of(event, "bbb-1", FakeLedger().ledger(), Recent(), {"acme"})
        if owner is not None:
            mapping.for_customer(event, owner)


@FUZZ
@given(body=st.binary(max_size=300), query=st.text(max_size=100))
def test_fuzz_any_bytes_verify_and_parse_without_raising(body: bytes, query: str) -> None:
    assert mapping.verify(query, body, PUBLIC, BACKENDS) is None
    mapping.parse_events(body)
    mapping.parse_events(b"event=" + body)


# -- over real sockets -------------------------------------------------------------------------

FAST = {"backend_hook_check": 0.2}
HEALTH = {"health": {"interval": 0.05, "timeout": 0.5, "down_after": 1, "up_after": 1}}


class Recorder:
    """Stands in for ``gw.webhooks.accept``: records, or raises what it is told to."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, str, list[dict[str, Json]]]] = []
        self.fail: Exception | None = None

    async def __call__(self, customer: str, meeting_id: str, events: list[dict[str, Json]]) -> None:
        if self.fail is not None:
            raise self.fail
        self.accepted.append((customer, meeting_id, events))

    def names(self) -> list[str]:
        return [str(dig(e, "data", "id")) for _, _, events in self.accepted for e in events]


def recording(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(stack.gateway.webhooks, "accept", recorder)
    return recorder


def gateway_hooks(stack: Stack) -> list[list[str]]:
    """The gateway's hook URLs registered on each simulated backend."""
    return [
        [h.callback_url for h in sim.webhooks.hooks.values() if mapping.PATH in h.callback_url]
        for sim in stack.sims
    ]


def intake_tally(stack: Stack, label: str) -> int:
    return stack.gateway.tallies.get(("webhook_events_in", label), 0)


async def test_the_gateway_registers_its_hook_on_every_backend_at_start_up(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    for backend, urls in zip(stack.config.backends, gateway_hooks(stack), strict=True):
        assert urls == [mapping.intake_url(stack.config.proxy.public_url, backend)]
    hook = next(iter(stack.sims[0].webhooks.hooks.values()))
    assert hook.meeting_id is None and hook.event_ids is None and not hook.raw


async def test_a_backend_restarted_without_its_hooks_gets_the_hook_again(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(webhooks=FAST)
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    before = list(stack.sims[0].webhooks.hooks)
    stack.sims[0].webhooks.restart()
    await wait_until(lambda: len(gateway_hooks(stack)[0]) == 1)
    assert list(stack.sims[0].webhooks.hooks) != before  # a new hook
    await trio.sleep(0.5)  # more checks: still one hook (present, not created again)
    assert [len(urls) for urls in gateway_hooks(stack)] == [1, 1]


async def test_a_backend_that_comes_back_gets_the_hook_again(make_stack: StackFactory) -> None:
    stack = await make_stack(webhooks={"backend_hook_check": 3600}, proxy=HEALTH)
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    sim = stack.sims[1]
    sim.behaviour.mode = "http500"
    await wait_until(lambda: stack.gateway.health["bbb-2"].state is State.DOWN)
    sim.webhooks.restart()  # it comes back restarted, without its hooks
    sim.behaviour.mode = "ok"
    await wait_until(lambda: len(gateway_hooks(stack)[1]) == 1)


async def test_events_reach_accept_as_the_customers_meeting(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    recorder = recording(stack, monkeypatch)
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    await stack.create("room-1", meta_course="Maths 101", duration="0")
    sim, backend_id = stack.backend_meeting("acme", "room-1")
    response = await stack.http.get(
        stack.signed("join", [("meetingID", "room-1"), ("fullName", "Ann"), ("role", "VIEWER")]),
        follow_redirects=True,
    )
    assert response.status_code == 200
    await stack.call("end", [("meetingID", "room-1")])
    await wait_until(lambda: "meeting-ended" in recorder.names())
    assert recorder.names() == ["meeting-created", "user-joined", "user-left", "meeting-ended"]
    assert {(c, m) for c, m, _ in recorder.accepted} == {("acme", "room-1")}
    created = dig(recorder.accepted[0][2][0], "data", "attributes", "meeting")
    assert created["external-meeting-id"] == "room-1"
    assert created["metadata"] == {"course": "Maths 101"}
    assert backend_id != "room-1" and backend_id in json.dumps(list(sim.webhooks.emitted)[-1])
    for _, _, events in recorder.accepted:
        assert backend_id not in json.dumps(events) and "bbb-proxy" not in json.dumps(events)
    assert intake_tally(stack, "accepted") == 4


async def test_events_of_meetings_the_gateway_did_not_place_are_dropped_and_counted(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    recorder = recording(stack, monkeypatch)
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    query = signed_query("create", [("meetingID", "direct"), ("name", "Direct")], "backend-secret")
    answer = await stack.http.get(f"{stack.sim_urls[0]}/create?{query}")
    assert "SUCCESS" in answer.text
    await wait_until(lambda: intake_tally(stack, "unknown_meeting") == 1)
    assert recorder.accepted == []
    assert stack.sims[0].webhooks.dropped == []  # answered 200: the backend keeps our hook


async def test_a_wrong_checksum_is_refused(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    recorder = recording(stack, monkeypatch)
    backend = stack.config.backends[0]
    url = mapping.intake_url(stack.config.proxy.public_url, backend)
    body = form(event_for("acme~room-1"))
    good = hashlib.sha1(url.encode() + body + backend.secret.encode()).hexdigest()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = await stack.http.post(url + "&checksum=" + "0" * 40, content=body, headers=headers)
    assert refused.status_code == 403
    forged = await stack.http.post(
        url.replace("b=bbb-1", "b=bbb-2") + "&checksum=" + good, content=body, headers=headers
    )
    assert forged.status_code == 403
    assert recorder.accepted == [] and intake_tally(stack, "bad_checksum") == 2
    accepted = await stack.http.post(url + "&checksum=" + good, content=body, headers=headers)
    assert accepted.status_code == 200
    assert [(c, m) for c, m, _ in recorder.accepted] == [("acme", "room-1")]
    bearer = {**headers, "Authorization": f"Bearer {backend.secret}"}  # bbb-webhooks' auth2_0
    assert (await stack.http.post(url, content=body, headers=bearer)).status_code == 200
    assert len(recorder.accepted) == 2
    garbage = b"event=%5B%7B%22data"
    cs = hashlib.sha1(url.encode() + garbage + backend.secret.encode()).hexdigest()
    unreadable = await stack.http.post(url + "&checksum=" + cs, content=garbage, headers=headers)
    assert unreadable.status_code == 200 and intake_tally(stack, "invalid") == 1


async def test_a_queue_that_cannot_write_is_503_and_the_backend_sends_again(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    recorder = recording(stack, monkeypatch)
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    recorder.fail = StorageUnavailable()
    await stack.create("room-2")
    await wait_until(lambda: intake_tally(stack, "not_durable") >= 2)  # tried, and again
    assert recorder.accepted == []
    recorder.fail = None
    await wait_until(lambda: recorder.names() == ["meeting-created"])
    assert recorder.accepted[0][:2] == ("acme", "room-2")


async def test_a_too_large_post_is_refused_before_reading(make_stack: StackFactory) -> None:
    stack = await make_stack()
    url = mapping.intake_url(stack.config.proxy.public_url, stack.config.backends[0])
    target = url.removeprefix(stack.config.proxy.public_url) + "&checksum=" + "0" * 40
    host, port = stack.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {2 * 1024 * 1024}\r\n\r\nevent="
        )
        await stream.send_all(head.encode())
        answer = await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 413")


def random_json(rng: random.Random, depth: int = 0) -> Json:
    """A random JSON value, biased towards the keys events have."""
    keys = [
        "data",
        "id",
        "attributes",
        "meeting",
        "metadata",
        "recording",
        "user",
        "external-meeting-id",
        "internal-meeting-id",
        "bbb-proxy-customer",
        "bbb-proxy-meeting",
        "duration",
        "ip-address",
        "acme~room-1",
        "\u0000",
        "é",
    ]
    kind = rng.randrange(8 if depth < 6 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 2**70, 1.5, 1e308])
    if kind in (1, 2, 3):
        return rng.choice(["", "acme~room-1", "acme", "room-1", "x" * 300, "10.0.0.1", "\ud7ff"])
    if kind in (4, 5):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_body(rng: random.Random) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if choice == 1:
        return form(random_json(rng), wrap=rng.random() < 0.5)
    event = json.loads(json.dumps(rng.choice(fixture_events())))
    event["data"]["attributes"]["meeting"]["external-meeting-id"] = rng.choice(
        ["acme~room-1", "globex~room-1", "acme~" + "y" * 300, "room-1"]
    )
    if choice == 2:
        event["data"]["attributes"]["extra"] = random_json(rng)
    return form(event)


async def test_fuzz_signed_posts_never_fail_the_gateway(make_stack: StackFactory) -> None:
    """Genuine (signed) POSTs of random bodies, through the real accept: always answered
    200, nothing raised, and the gateway still serves."""
    stack = await make_stack()
    # The gateway's own hook on each backend first: the create's event is counted too.
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    await stack.create("room-1")  # so that some events are the customer's
    await stack.call(
        "hooks/create", [("callbackURL", "http://127.0.0.1:9/h"), ("meetingID", "room-1")]
    )
    backend = stack.config.backends[0]
    url = mapping.intake_url(stack.config.proxy.public_url, backend)
    rng = random.Random(9)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    for _ in range(150):
        body = random_body(rng)
        cs = hashlib.sha1(url.encode() + body + backend.secret.encode()).hexdigest()
        answer = await stack.http.post(url + "&checksum=" + cs, content=body, headers=headers)
        assert answer.status_code == 200, (answer.status_code, body[:80])
    assert stack.gateway.task_failures == {}
    assert (await stack.http.get(stack.url + "/healthz")).status_code == 200
    counted = sum(intake_tally(stack, k) for k in ("accepted", "unknown_meeting", "invalid"))
    assert counted >= 150


async def test_a_backend_added_at_run_time_gets_the_hook(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack(proxy={"admin_token": "intake-admin"})
    await wait_until(lambda: all(len(urls) == 1 for urls in gateway_hooks(stack)))
    extra = Simulator(BACKEND_SECRET, server_name="bbb-3.test", expire_unjoined_minutes=None)
    url = await nursery.start(serve_simulator, extra)
    body = {"id": "bbb-3", "url": url, "secret": BACKEND_SECRET, "capacity": 10}
    added = await stack.http.post(
        f"{stack.url}/admin/v1/backends",
        headers={"Authorization": "Bearer intake-admin"},
        content=json.dumps(body),
    )
    assert added.status_code == 201, added.text
    await wait_until(lambda: len(extra.webhooks.hooks) == 1)
    (hook,) = extra.webhooks.hooks.values()
    backend = stack.gateway.backend("bbb-3")
    assert backend is not None
    assert hook.callback_url == mapping.intake_url(stack.config.proxy.public_url, backend)
