"""The API's body-less GETs answered without quart (proxy/fast_api.py): the same answers.

Each call is sent twice over real sockets: as a plain GET (the fast path) and as a GET
carrying a one-byte body (quart's route, which ignores a GET's body).  Status, headers,
body and the request's log line must be the same; which path answered is checked on
the ASGI level with a stand-in for quart.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import httpx
import pytest
import trio

from proxy import app as web
from proxy import fast_api as fast_api_module
from proxy.fast_api import fast_api
from tests.harness import Stack, wait_until
from tests.test_request_logs import JOIN, Captured, captured, rid  # noqa: F401

VARYING = {"date", "x-request-id"}  # differ between any two answers
# quart's route is hypercorn's, which closes that connection after it (proxy/front.py)
TRANSPORT = {"connection"}
LOG_VARYING = {"time", "request_id", "duration_ms"}


async def _both(stack: Stack, url: str) -> tuple[httpx.Response, httpx.Response]:
    fast = await stack.http.get(url)
    routed = await stack.http.request("GET", url, content=b"x")  # a body: quart's route
    return fast, routed


def _same(fast: httpx.Response, routed: httpx.Response) -> None:
    assert fast.status_code == routed.status_code
    assert [(k, v) for k, v in fast.headers.multi_items() if k not in VARYING] == [
        (k, v) for k, v in routed.headers.multi_items() if k not in VARYING | TRANSPORT
    ]
    assert routed.headers.get("connection") == "close"


async def _line(captured: Captured, response: httpx.Response) -> dict[str, Any]:  # noqa: F811
    # quart's route may write the line just after a 302's head is out (the body it did not
    # need is read late); the fast path writes it before the answer's last part.
    await wait_until(lambda: bool(captured.requests(request_id=rid(response))))
    line = captured.one(rid(response))
    line["message"] = re.sub(r"\) [0-9.]+ ms from", ") - ms from", line["message"])
    return {k: v for k, v in line.items() if k not in LOG_VARYING}


async def test_join_is_answered_the_same_with_and_without_quart(
    captured: Captured,  # noqa: F811
    stack: Stack,
) -> None:
    await stack.create("m-1")
    fast, routed = await _both(stack, stack.signed("join", JOIN))
    assert fast.status_code == 302 and fast.content == routed.content == b""
    # Location differs only if the backend's join URL did; both are re-signed alike.
    assert fast.headers["location"] == routed.headers["location"]
    _same(fast, routed)
    assert await _line(captured, fast) == await _line(captured, routed)
    assert (await _line(captured, fast))["result"] == "success"


@pytest.mark.parametrize(
    ("call", "params", "customer"),
    [
        ("getMeetingInfo", [("meetingID", "m-1")], "acme"),  # forwarded to the backend
        ("getMeetingInfo", [("meetingID", "nope")], "acme"),  # notFound, locally
        ("isMeetingRunning", [("meetingID", "m-1")], "acme"),
        ("getMeetings", [], "acme"),
        ("getMeetingInfo", [("meetingID", "m-1")], "nobody"),  # unknown customer
        ("noSuchCall", [], "acme"),
        ("hooks/list", [], "acme"),
    ],
)
async def test_forwarded_and_local_answers_are_the_same_with_and_without_quart(
    captured: Captured,  # noqa: F811
    stack: Stack,
    call: str,
    params: list[tuple[str, str]],
    customer: str,
) -> None:
    await stack.create("m-1")
    url = stack.signed(call, params, customer if customer in stack.secrets else "acme")
    url = url.replace("/acme/", f"/{customer}/")
    fast, routed = await _both(stack, url)
    assert fast.content == routed.content
    _same(fast, routed)
    assert await _line(captured, fast) == await _line(captured, routed)


async def test_a_bad_checksum_is_answered_the_same_with_and_without_quart(
    captured: Captured,  # noqa: F811
    stack: Stack,
) -> None:
    url = stack.signed("getMeetings", []).replace("checksum=", "checksum=0")
    fast, routed = await _both(stack, url)
    assert b"checksumError" in fast.content and fast.content == routed.content
    _same(fast, routed)
    assert await _line(captured, fast) == await _line(captured, routed)


async def test_an_unexpected_error_is_bbbs_envelope_and_logged_on_the_fast_path(
    captured: Captured,  # noqa: F811
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(*_args: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(web, "handle", broken)
    fast, routed = await _both(stack, stack.signed("getMeetings", []))
    assert fast.status_code == 200 and b"internalError" in fast.content
    assert fast.content == routed.content
    _same(fast, routed)
    errors = [line for line in captured.lines() if line["logger"] == "proxy.app"]
    assert [line["message"] for line in errors] == [
        "unexpected error answering /acme/bigbluebutton/api/getMeetings"
    ] * 2
    assert all("RuntimeError: boom" in line["exception"] for line in errors)


# -- which path answers: the ASGI level, with a stand-in for quart -----------------------------


class _Quart:
    config: ClassVar[dict[str, Any]] = {"RESPONSE_TIMEOUT": 60}

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": headers or [(b"host", b"gw")],
    }


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/acme/bigbluebutton/api/create", None),
        ("HEAD", "/acme/bigbluebutton/api/join", None),
        ("OPTIONS", "/acme/bigbluebutton/api/join", None),
        ("GET", "/acme/bigbluebutton/api/join", [(b"content-length", b"3")]),
        ("GET", "/acme/bigbluebutton/api/join", [(b"transfer-encoding", b"chunked")]),
        ("GET", "/acme/bigbluebutton/api/", None),
        ("GET", "/acme/bigbluebutton/api", None),
        ("GET", "/bigbluebutton/api/join", None),  # bound by host name: quart's route
        ("GET", "/acme/bigbluebutton/api//join", None),
        ("GET", "/acme/bigbluebutton/api/join/", None),
        ("GET", "//bigbluebutton/api/join", None),
        ("GET", "/acme/bigbluebutton/api/join2", None),
        ("GET", "/a/b/bigbluebutton/api/join", None),
        ("GET", "/healthz", None),
        ("GET", "/admin/v1/customers", None),
    ],
)
async def test_anything_but_a_bodyless_api_get_goes_to_quart(
    method: str, path: str, headers: list[tuple[bytes, bytes]] | None
) -> None:
    quart = _Quart()
    app = fast_api(None, None, quart)  # type: ignore[arg-type]  # never reached

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await app(_scope(method, path, headers), receive, send)
    assert quart.paths == [path] and sent[0]["status"] == 204


async def test_a_bodyless_api_get_does_not_reach_quart(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str | None, str, str]] = []

    async def answer(_gw: object, _metrics: object, incoming: Any) -> Any:
        asked.append((incoming.customer_id, incoming.call, incoming.host))
        return web.internal_error()

    monkeypatch.setattr("proxy.fast_api.api_answer", answer)
    quart = _Quart()
    app = fast_api(None, None, quart)  # type: ignore[arg-type]
    inbox = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Any] = []
    receive, send = _hypercorn_like(inbox, sent)
    for path in ("/acme/bigbluebutton/api/join", "/x/bigbluebutton/api/hooks/create"):
        inbox[:] = [{"type": "http.request", "body": b"", "more_body": False}]
        headers = [(b"host", b"gw.example"), (b"content-length", b"0")]
        await app(_scope("GET", path, headers), receive, send)
    assert quart.paths == []
    assert asked == [("acme", "join", "gw.example"), ("x", "hooks/create", "gw.example")]
    # A whole body goes in one message with its end (quart sends the end apart): the same
    # bytes on the wire, one pass less through hypercorn.
    assert [(m["type"], m.get("more_body")) for m in sent[:2]] == [
        ("http.response.start", None),
        ("http.response.body", False),
    ]
    assert sent[0]["status"] == 200 and b"internalError" in sent[1]["body"]
    assert len(sent) == 4


async def test_a_client_gone_before_the_answer_cancels_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """As quart-trio: ``http.disconnect`` while the call runs cancels it; nothing is sent."""
    started, cancelled = trio.Event(), trio.Event()

    async def slow(_gw: object, _metrics: object, _incoming: object) -> Any:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    monkeypatch.setattr("proxy.fast_api.api_answer", slow)
    app = fast_api(None, None, _Quart())  # type: ignore[arg-type]
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Any:
        if messages:
            return messages.pop()
        await started.wait()
        return {"type": "http.disconnect"}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    with trio.fail_after(5):
        await app(_scope("GET", "/acme/bigbluebutton/api/getMeetings"), receive, send)
    assert cancelled.is_set() and sent == []


def _hypercorn_like(inbox: list[Any], sent: list[Any]) -> tuple[Any, Any]:
    """ASGI receive and send as hypercorn's: the request's messages from ``inbox``, then,
    once the answer's end is sent, ``http.disconnect`` (the stream is closed)."""
    closed = trio.Event()

    async def receive() -> Any:
        if inbox:
            return inbox.pop()
        await closed.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            closed.set()

    return receive, send


async def _answered(_gw: object, _metrics: object, _incoming: object) -> Any:
    return web.internal_error()


async def test_an_answered_call_ends_on_the_disconnect_after_its_answer(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """The watcher ends on hypercorn's ``http.disconnect`` after the answer: no waiting for
    the grace, and nothing cancelled (a Cancelled per request cost more than the rest)."""
    monkeypatch.setattr("proxy.fast_api.api_answer", _answered)
    cancels: list[str] = []
    real_cancel = trio.CancelScope.cancel

    def cancel(scope: trio.CancelScope, *args: Any) -> None:
        cancels.append("cancel")
        real_cancel(scope, *args)

    monkeypatch.setattr(trio.CancelScope, "cancel", cancel)
    app = fast_api(None, None, _Quart())  # type: ignore[arg-type]
    sent: list[Any] = []
    receive, send = _hypercorn_like([{"type": "http.request", "body": b""}], sent)
    started = trio.current_time()
    await app(_scope("GET", "/acme/bigbluebutton/api/getMeetings"), receive, send)
    assert trio.current_time() - started < fast_api_module.DISCONNECT_GRACE
    assert sent[0]["status"] == 200 and cancels == []


async def test_without_the_disconnect_after_the_answer_the_call_ends_after_the_grace(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr("proxy.fast_api.api_answer", _answered)
    app = fast_api(None, None, _Quart())  # type: ignore[arg-type]
    inbox = [{"type": "http.request", "body": b""}]
    sent: list[Any] = []

    async def receive() -> Any:
        if inbox:
            return inbox.pop()
        await trio.sleep_forever()  # a server that never says the stream is closed

    async def send(message: Any) -> None:
        sent.append(message)

    started = trio.current_time()
    with trio.fail_after(10 * fast_api_module.DISCONNECT_GRACE):  # never: a hung request
        await app(_scope("GET", "/acme/bigbluebutton/api/getMeetings"), receive, send)
    assert trio.current_time() - started == pytest.approx(fast_api_module.DISCONNECT_GRACE)
    assert sent[0]["status"] == 200 and not sent[-1].get("more_body")


class _ShortQuart(_Quart):
    config: ClassVar[dict[str, Any]] = {"RESPONSE_TIMEOUT": 3}


async def test_an_answer_not_sent_in_time_is_given_up(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """As quart-trio: sending is bounded by RESPONSE_TIMEOUT (a client that never reads)."""
    monkeypatch.setattr("proxy.fast_api.api_answer", _answered)
    app = fast_api(None, None, _ShortQuart())  # type: ignore[arg-type]
    inbox = [{"type": "http.request", "body": b""}]
    sent: list[Any] = []

    async def receive() -> Any:
        if inbox:
            return inbox.pop()
        await trio.sleep_forever()

    async def send(message: Any) -> None:
        sent.append(message)
        await trio.sleep_forever()

    started = trio.current_time()
    with trio.fail_after(100):
        await app(_scope("GET", "/acme/bigbluebutton/api/getMeetings"), receive, send)
    assert trio.current_time() - started == pytest.approx(3)
    assert [m["type"] for m in sent] == ["http.response.start"]
