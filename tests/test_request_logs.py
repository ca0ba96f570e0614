"""Request logs over real sockets: a line per request with its fields, and no secret in any."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest

from proxy.bbb import rewrite
from proxy.health import Health, State
from proxy.logs import NOISY, redact, setup_logging
from proxy.request_log import client_address, networks
from proxy.simulator import Simulator
from tests.harness import BACKEND_SECRET, CUSTOMERS, Stack, StackFactory, wait_until

JOIN = [("meetingID", "m-1"), ("fullName", "Ada"), ("role", "MODERATOR")]
SIGNED = {"checksum", "sig", "password", "moderatorPW", "attendeePW", "token"}  # never logged


class Captured:
    """Every log line written while a test runs, as the gateway writes them (JSON)."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.text.splitlines()]

    def requests(self, **match: object) -> list[dict[str, Any]]:
        found = [line for line in self.lines() if line["logger"] == "proxy.request"]
        return [line for line in found if all(line.get(k) == v for k, v in match.items())]

    def one(self, request_id: str) -> dict[str, Any]:
        [line] = self.requests(request_id=request_id)
        return line


@pytest.fixture
def captured() -> Iterator[Captured]:
    """The gateway's own handler (redacting, JSON) on the root logger at DEBUG."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream)
    try:
        yield Captured(stream)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, was in noisy.items():
            logging.getLogger(name).setLevel(was)


def rid(response: httpx.Response) -> str:
    return response.headers["x-request-id"]


# -- the fields ---------------------------------------------------------------------------------


async def test_a_create_is_one_line_with_every_field(captured: Captured, stack: Stack) -> None:
    response = await stack.http.get(
        stack.signed("create", [("meetingID", "m-1"), ("name", "Room")])
    )
    assert response.status_code == 200
    line = captured.one(rid(response))
    held = stack.gateway.ledger.get(("acme", "m-1"))
    assert held is not None
    assert line["level"] == "INFO"
    assert {k: line[k] for k in ("method", "call", "customer", "meetingID", "result")} == {
        "method": "GET",
        "call": "create",
        "customer": "acme",
        "meetingID": "m-1",
        "result": "success",
    }
    assert (line["backend"], line["status"], line["client"]) == (held.backend_id, 200, "127.0.0.1")
    assert 0 < line["duration_ms"] < 10_000
    assert re.fullmatch(r"[0-9a-f]{16}", line["request_id"])
    # the backend call is logged (DEBUG) with the same request id
    backend_calls = [
        entry
        for entry in captured.lines()
        if entry["logger"] == "proxy.backend" and entry.get("request_id") == line["request_id"]
    ]
    assert [(c["backend"], c["call"], c["outcome"]) for c in backend_calls] == [
        (held.backend_id, "create", "ok")
    ]
    second = await stack.http.get(stack.signed("isMeetingRunning", [("meetingID", "m-1")]))
    assert rid(second) != rid(response)  # a new id per request


async def test_errors_say_their_message_key(captured: Captured, make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"max_body_bytes": 1000})
    unknown = await stack.http.get(stack.signed("getMeetingInfo", [("meetingID", "nope")]))
    assert captured.one(rid(unknown))["result"] == "notFound"
    url = stack.signed("getMeetingInfo", [("meetingID", "m-2")]).replace("checksum=", "checksum=0")
    bad = await stack.http.get(url)
    line = captured.one(rid(bad))
    assert (line["result"], line["customer"], line["meetingID"]) == ("checksumError", "acme", "m-2")
    assert line["backend"] is None
    stranger = await stack.http.get(f"{stack.url}/nobody/bigbluebutton/api/getMeetings?checksum=x")
    line = captured.one(rid(stranger))
    assert (line["customer"], line["result"]) == ("nobody", "checksumError")
    off = await stack.http.get(stack.signed("getMeetings", [], "off"))
    assert captured.one(rid(off))["result"] == "apiNotEnabled"
    big = await stack.http.post(
        stack.signed("create", [("meetingID", "m-3")]),
        content=b"<x/>" * 2000,
        headers={"Content-Type": "application/xml"},
    )
    line = captured.one(rid(big))
    assert (line["call"], line["result"]) == ("create", "validationError")


async def test_joins_redirect_and_say_where(captured: Captured, stack: Stack) -> None:
    await stack.create("m-1")
    joined = await stack.http.get(stack.signed("join", JOIN))
    assert joined.status_code == 302
    line = captured.one(rid(joined))
    held = stack.gateway.ledger.get(("acme", "m-1"))
    assert held is not None
    assert (line["call"], line["status"], line["result"], line["backend"]) == (
        "join",
        302,
        "success",
        held.backend_id,
    )
    lost = await stack.http.get(stack.signed("join", [("meetingID", "gone"), *JOIN[1:]]))
    assert lost.status_code == 302 and "errors=" in lost.headers["location"]
    line = captured.one(rid(lost))
    assert (line["meetingID"], line["status"], line["result"]) == ("gone", 302, "notFound")


async def test_host_bound_customer_is_named_once_verified(captured: Captured, stack: Stack) -> None:
    url = stack.signed("getMeetings", [], "globex").replace(f"{stack.url}/globex", stack.url)
    response = await stack.http.get(url, headers={"Host": "bbb.globex.test"})
    line = captured.one(rid(response))
    assert (line["customer"], line["result"]) == ("globex", "success")


async def test_probes_get_an_id_but_no_line(captured: Captured, stack: Stack) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = await stack.http.get(stack.url + path)
        assert rid(response)
        assert captured.requests(request_id=rid(response)) == []


async def test_text_format_on_a_terminal(stack: Stack) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = Terminal()
    setup_logging("INFO", "auto", stream)
    try:
        response = await stack.http.get(stack.signed("getMeetings", []))
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    [line] = [line for line in stream.getvalue().splitlines() if f"[{rid(response)}]" in line]
    assert " INFO proxy.request " in line
    assert re.search(
        r"GET getMeetings acme/- -> -: success \(HTTP 200\) [\d.]+ ms from 127\.0\.0\.1$", line
    )


def test_libraries_log_warnings_only_even_at_debug(captured: Captured) -> None:
    """coredis' INFO lines (a traceback for each connection Redis drops) stay out."""
    logging.getLogger("coredis.connection").info("Connection closed unexpectedly!")
    logging.getLogger("coredis.connection").warning("kept")
    logging.getLogger("proxy.store.redis").debug("ours")
    assert [(line["logger"], line["message"]) for line in captured.lines()] == [
        ("coredis.connection", "kept"),
        ("proxy.store.redis", "ours"),
    ]


# -- the client's address -----------------------------------------------------------------------


TRUSTED = networks(["127.0.0.1", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["198.51.100.1, 203.0.113.7, 10.1.2.3"], "203.0.113.7"),  # spoofed left
        ("127.0.0.1", ["198.51.100.1", "203.0.113.7"], "203.0.113.7"),  # two headers
        ("127.0.0.1", ["10.0.0.1, 10.0.0.2"], "10.0.0.1"),  # all trusted: the leftmost
        ("127.0.0.1", ["not-an-ip, 10.0.0.2"], "10.0.0.2"),  # the walk stops at garbage
        ("192.0.2.5", ["203.0.113.7"], "192.0.2.5"),  # an untrusted peer's header is ignored
        ("::1", ["203.0.113.7"], "::1"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], client: str) -> None:
    assert client_address(peer, forwarded, TRUSTED) == client


async def test_forwarded_for_only_from_trusted_proxies(
    captured: Captured, make_stack: StackFactory
) -> None:
    headers = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}
    trusting = await make_stack(proxy={"trusted_proxies": ["127.0.0.0/8"]})
    response = await trusting.http.get(trusting.signed("getMeetings", []), headers=headers)
    assert captured.one(rid(response))["client"] == "203.0.113.7"
    wary = await make_stack()
    response = await wary.http.get(wary.signed("getMeetings", []), headers=headers)
    assert captured.one(rid(response))["client"] == "127.0.0.1"


# -- no secret in any line ----------------------------------------------------------------------


class Secrets:
    """What must never be logged: configured secrets, and each signature seen on the wire."""

    def __init__(self, stack: Stack) -> None:
        self.values = {BACKEND_SECRET, "admin-token-0123", "metrics-token-4567"}
        for customer in CUSTOMERS:
            self.values |= set(customer.get("secrets", [customer.get("secret")]))
        self.stack = stack
        for sim in stack.sims:
            self.record_backend(sim)

    def record_backend(self, sim: Simulator) -> None:
        handle = sim.handle

        def recording(request: Any) -> Any:
            self.query(request.raw_query)
            return handle(request)

        sim.handle = recording  # type: ignore[method-assign]

    def query(self, query: str) -> None:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in SIGNED and value:
                self.values.add(value)
            if name.endswith(("URL", "Url", "_url")) and "?" in value:
                self.query(urlsplit(value).query)  # e.g. the gateway's signed meetingEndedURL

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        self.query(urlsplit(url).query)
        response = await self.stack.http.get(url, **kwargs)
        self.seen(response)
        return response

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        self.query(urlsplit(url).query)
        response = await self.stack.http.post(url, **kwargs)
        self.seen(response)
        return response

    def seen(self, response: httpx.Response) -> None:
        if "location" in response.headers:
            self.query(urlsplit(response.headers["location"]).query)
        for token in re.findall(r"sessionToken=([0-9a-z_]+)", response.text):
            self.values.add(token)


async def full_run(stack: Stack, s: Secrets) -> None:
    """Every call and every error path the gateway has, once or more."""
    sign = stack.signed
    pw = [("moderatorPW", "mod-pass-1"), ("attendeePW", "att-pass-1")]
    await s.get(sign("create", [("meetingID", "m-1"), ("name", "One"), *pw]))
    await s.get(sign("create", [("meetingID", "m-1"), ("name", "One"), *pw]))  # duplicate
    ended_url = "http://127.0.0.1:9/ended?token=lms-token-abc"
    await s.get(
        sign("create", [("meetingID", "m-2"), ("name", "Two"), ("meetingEndedURL", ended_url)])
    )
    await s.get(sign("create", [("meetingID", "m-3")]))  # no name: validationError
    await s.get(sign("create", [("meetingID", "big"), ("name", "B"), ("maxParticipants", "50")]))
    await s.get(sign("join", JOIN))
    await s.get(
        sign("join", [("meetingID", "m-1"), ("fullName", "Bob"), ("password", "att-pass-1")])
    )
    await s.get(
        sign("join", [("meetingID", "m-1"), ("fullName", "Eve"), ("password", "wrong-pw-9")])
    )
    await s.get(sign("join", [*JOIN, ("redirect", "false")]))
    await s.get(sign("join", [("meetingID", "nope"), ("fullName", "X"), ("role", "VIEWER")]))
    for call in ("isMeetingRunning", "getMeetingInfo"):
        await s.get(sign(call, [("meetingID", "m-1")]))
        await s.get(sign(call, [("meetingID", "nope")]))
    await s.get(sign("getMeetings", []))
    await s.get(
        sign("getMeetings", [], "globex").replace("/globex/", "/"),
        headers={"Host": "bbb.globex.test"},
    )
    await s.get(sign("sendChatMessage", [("meetingID", "m-1"), ("message", "hi")]))
    await s.post(
        sign("insertDocument", [("meetingID", "m-1")]),
        content=b"<modules><module name='presentation'><document url='http://x/a.pdf' "
        b"filename='a.pdf'/></module></modules>",
        headers={"Content-Type": "application/xml"},
    )
    await recordings(stack, s)
    hook = [("callbackURL", "http://127.0.0.1:9/hook?token=hook-token-42"), ("meetingID", "m-1")]
    created = await s.get(sign("hooks/create", hook))
    assert "<returncode>SUCCESS</returncode>" in created.text, created.text
    await s.get(sign("hooks/list", [("meetingID", "m-1")]))
    hook_id = created.text.split("<hookID>")[1].split("<")[0]
    await s.get(sign("hooks/destroy", [("hookID", hook_id)]))
    await s.get(sign("end", [("meetingID", "m-2")]))  # the backend calls the ended URL back
    await s.get(sign("end", [("meetingID", "nope")]))
    await s.get(sign("getMeetingInfo", [("meetingID", "m-1")]).replace("checksum=", "checksum=f"))
    await s.get(f"{stack.url}/nobody/bigbluebutton/api/getMeetings?checksum=deadbeef00")
    await s.get(sign("getMeetings", [], "off"))
    await s.get(sign("getMeetings", [], "globex").replace("globex-new", "x"))  # globex-old below
    stack.secrets["globex"] = "globex-old"
    await s.get(sign("getMeetings", [], "globex"))
    await s.get(sign("notACall", [("meetingID", "m-1")]))
    await s.post(
        sign("create", [("meetingID", "m-4")]),
        content=b"<x/>" * 2000,
        headers={"Content-Type": "application/xml"},
    )
    await backend_faults(stack, s)
    await operator_paths(stack, s)


async def recordings(stack: Stack, s: Secrets) -> None:
    tags = {k[len("meta_") :]: v for k, v in rewrite.tags("acme", "m-1", 60, 1.5)}
    [recording] = stack.sims[0].recordings.seed(
        1, meeting_id=rewrite.backend_meeting_id("acme", "m-1"), metadata=tags
    )
    record = [("recordID", recording.record_id)]
    sign = stack.signed
    await s.get(sign("getRecordings", []))
    await s.get(sign("getRecordings", [("meetingID", "m-1")]))
    await s.get(sign("publishRecordings", [*record, ("publish", "false")]))
    await s.get(sign("updateRecordings", [*record, ("meta_topic", "t")]))
    await s.get(sign("getRecordingTextTracks", record))
    await s.post(
        sign(
            "putRecordingTextTrack",
            [*record, ("kind", "subtitles"), ("lang", "de-DE"), ("label", "De")],
        ),
        files={"file": ("de.vtt", b"WEBVTT\n\n00:00.000 --> 00:01.000\nHallo\n", "text/vtt")},
    )
    await s.get(sign("deleteRecordings", record))
    await s.get(sign("deleteRecordings", [("recordID", "no-such-recording")]))


async def backend_faults(stack: Stack, s: Secrets) -> None:
    """A backend answering garbage and HTML errors, and one DOWN."""
    sign = stack.signed
    for mode in ("garbage", "http500"):
        for sim in stack.sims:
            sim.behaviour.mode = mode
        await s.get(sign("create", [("meetingID", f"f-{mode}"), ("name", "F")]))
        await s.get(sign("getMeetingInfo", [("meetingID", "m-1")]))
        await s.get(sign("getMeetings", []))
        await s.get(sign("join", JOIN))
    for sim in stack.sims:
        sim.behaviour.mode = "ok"
    held = stack.gateway.ledger.get(("acme", "m-1"))
    assert held is not None
    stack.gateway.set_health(held.backend_id, Health(State.DOWN, failures=3, down_since=0.0))
    await s.get(sign("join", JOIN))
    await s.get(sign("getMeetingInfo", [("meetingID", "m-1")]))
    for backend in stack.config.backends:
        stack.gateway.set_health(backend.id, Health(State.DOWN, failures=3, down_since=0.0))
    await s.get(sign("create", [("meetingID", "m-9"), ("name", "Nine")]))


async def operator_paths(stack: Stack, s: Secrets) -> None:
    """The admin API, the two answers that show secrets included; metrics; a forged notice."""
    admin = {"Authorization": "Bearer admin-token-0123"}
    new = {"id": "newco", "max_connections": 5, "default_max_participants": 5}
    created = await s.post(
        f"{stack.url}/admin/v1/customers", headers=admin, json={**new, "default_duration": 30}
    )
    assert created.status_code == 201, created.text
    rotated = await s.post(f"{stack.url}/admin/v1/customers/acme/secrets", headers=admin)
    assert rotated.status_code == 201, rotated.text
    shown = await s.get(f"{stack.url}/admin/v1/customers/acme/credentials", headers=admin)
    for answer in (created, rotated, shown):
        s.values |= set(secrets_in(answer.json()))
    assert len(set(secrets_in(shown.json()))) >= 2  # the new secret and the old one
    await s.get(f"{stack.url}/admin/v1/customers", headers=admin)
    await s.get(f"{stack.url}/admin/v1/backends", headers=admin)
    await s.get(f"{stack.url}/admin/v1/customers", headers={"Authorization": "Bearer wrong-tok"})
    await s.get(f"{stack.url}/metrics", headers={"Authorization": "Bearer metrics-token-4567"})
    await s.get(f"{stack.url}/callbacks/v1/ended?k=ended&b=bbb-1&m=x&sig=forged-sig-77")


def secrets_in(document: object) -> Iterator[str]:
    """Every string under a key that names a secret, anywhere in a JSON document."""
    if isinstance(document, dict):
        for key, value in document.items():
            if "secret" in key and isinstance(value, str):
                yield value
            yield from secrets_in(value)
    elif isinstance(document, list):
        for item in document:
            yield from secrets_in(item)


async def test_no_secret_in_any_log_line(captured: Captured, make_stack: StackFactory) -> None:
    stack = await make_stack(
        proxy={
            "admin_token": "admin-token-0123",
            "metrics_token": "metrics-token-4567",
            "max_body_bytes": 1000,
        }
    )
    s = Secrets(stack)
    await full_run(stack, s)
    # the backend's meeting-ended call back to the gateway
    await wait_until(lambda: bool(captured.requests(path="/callbacks/v1/ended", status=200)))
    calls = {line["call"] for line in captured.requests()}
    assert calls >= {
        "create", "join", "end", "isMeetingRunning", "getMeetingInfo", "getMeetings",
        "sendChatMessage", "insertDocument", "getRecordings", "publishRecordings",
        "updateRecordings", "deleteRecordings", "getRecordingTextTracks",
        "putRecordingTextTrack", "notACall", "hooks/create", "hooks/list", "hooks/destroy",
    }  # fmt: skip
    results = {line["result"] for line in captured.requests()}
    assert results >= {
        "success", "checksumError", "notFound", "apiNotEnabled", "validationError",
        "serverUnavailable", "internalError", "unsupportedRequest",
    }  # fmt: skip
    assert captured.requests(path="/callbacks/v1/ended", status=200)  # the notice, signed
    assert any(line["level"] == "WARNING" for line in captured.lines())  # failures logged
    assert len(s.values) > 40  # checksums and signatures of both sides were collected
    text = captured.text
    leaked = sorted(value for value in s.values if value in text)
    assert leaked == []


def test_a_leak_would_be_found(captured: Captured) -> None:
    """The capture sees what the gateway logs, and the redaction masks what a line quotes."""
    logging.getLogger("proxy.test").warning(
        "calling %s", "http://b/api/join?meetingID=x&password=pw-1&checksum=c0ffee"
    )
    try:
        raise ValueError("Authorization: Bearer tok-123 for /create?sig=sig-abc-9&secret=sec-s3-7")
    except ValueError:
        logging.getLogger("proxy.test").exception("failed")
    text = captured.text
    assert "calling http://b/api/join?meetingID=x&password=***&checksum=***" in text
    for value in ("pw-1", "c0ffee", "tok-123", "sig-abc-9", "sec-s3-7"):
        assert value not in text


@pytest.mark.parametrize(
    ("line", "masked"),
    [
        ("not calling http://lms/e?secret=***: host is not public", None),  # masked already
        ("a?secret=***abc&b=1", "a?secret=***&b=1"),  # "***" starting a secret is no mask
        ("Authorization: Bearer ***, then", None),
        (
            "join?signed_parameters=eyJ.x.y&sessionToken=s1",
            "join?signed_parameters=***&sessionToken=***",
        ),
    ],
)
def test_masking_twice_changes_nothing_more(line: str, masked: str | None) -> None:
    once = redact(line)
    assert once == (line if masked is None else masked)
    assert redact(once) == once
