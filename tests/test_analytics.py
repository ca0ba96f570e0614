"""The analytics callback (issue 12 §4): the customer's ``meta_analytics-callback-url``
replaced by the gateway's signed one, the backend's POST (bearer JWT with its secret)
verified, mapped to the customer's meetingID, re-signed with the customer's secret and
delivered durably; forged POSTs refused."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import pytest
import trio
from jwt.warnings import InsecureKeyLengthWarning

from proxy.bbb import analytics, rewrite
from proxy.bbb.recording_ready import Target
from proxy.config import Backend
from proxy.store.local import log_path
from tests.harness import BACKEND_SECRET, SECRETS, Stack, serve_endpoint, wait_until


@dataclass
class Receiver:
    """A customer's analytics endpoint: records each POST's headers and body."""

    url: str = ""
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


async def start_receiver(nursery: trio.Nursery) -> Receiver:
    receiver = Receiver()

    def respond(scope: dict[str, Any], body: bytes) -> int:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        receiver.posts.append((headers, body))
        return receiver.statuses.pop(0) if receiver.statuses else 200

    receiver.url = f"{await serve_endpoint(nursery, respond)}/lms/analytics?course=7"
    return receiver


def claims(token: str, secret: str) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return dict(jwt.decode(token, secret, algorithms=["HS512"]))


def backend_token(secret: str = BACKEND_SECRET) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode({"exp": 2_000_000_000}, secret, algorithm="HS512")


async def test_the_customer_gets_the_document_signed_with_its_own_secret(
    stack: Stack, nursery: trio.Nursery
) -> None:
    receiver = await start_receiver(nursery)
    created = await stack.create("lesson", **{"meta_analytics-callback-url": receiver.url})
    assert created.findtext("returncode") == "SUCCESS"
    sim, backend_meeting = stack.backend_meeting("acme", "lesson")
    own = sim.meetings[backend_meeting].metadata["analytics-callback-url"]
    assert own.startswith(stack.url + analytics.PATH + "?")  # the gateway's, not theirs
    info = await stack.call("getMeetingInfo", [("meetingID", "lesson")])
    assert info.findtext("metadata/analytics-callback-url") == receiver.url  # theirs, shown
    assert info.find("metadata/bbb-proxy-analytics-callback-url") is None
    await stack.call("end", [("meetingID", "lesson")])
    await wait_until(lambda: len(receiver.posts) == 1)
    headers, body = receiver.posts[0]
    assert headers["content-type"] == "application/json"
    scheme, token = headers["authorization"].split(" ")
    assert scheme == "Bearer"
    assert claims(token, SECRETS["acme"])["meeting_id"] == "lesson"
    with pytest.raises(jwt.InvalidSignatureError):
        claims(token, BACKEND_SECRET)
    document = orjson.loads(body)
    assert document["meeting_id"] == "lesson"  # the customer's, not the namespaced one
    assert document["internal_meeting_id"] == created.findtext("internalMeetingID")
    metadata = document["data"]["metadata"]
    assert metadata["analytics-callback-url"] == receiver.url
    assert not [k for k in metadata if k.startswith(rewrite.TAG_PREFIX)]
    assert backend_meeting not in body.decode()
    # Done: the "analytics" log holds nothing more to deliver.
    await wait_until(lambda: stack.gateway.tallies.get(("analytics_deliveries", "done")) == 1)


async def test_forged_callbacks_are_refused(stack: Stack, nursery: trio.Nursery) -> None:
    receiver = await start_receiver(nursery)
    await stack.create("forged", **{"meta_analytics-callback-url": receiver.url})
    sim, backend_meeting = stack.backend_meeting("acme", "forged")
    own = sim.meetings[backend_meeting].metadata["analytics-callback-url"]
    body = orjson.dumps({"version": "1.0", "meeting_id": backend_meeting, "data": {}})

    async def post(url: str, token: str | None, content: bytes = body) -> int:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = await stack.http.post(url, content=content, headers=headers)
        return response.status_code

    assert await post(own, backend_token("not-the-backend-secret")) == 401
    assert await post(own, None) == 401
    assert await post(own, "garbage") == 401
    other = orjson.dumps({"meeting_id": rewrite.backend_meeting_id("globex", "forged")})
    assert await post(own, backend_token(), other) == 401  # another customer's meeting
    assert await post(own, backend_token(), b"[1, 2") == 401
    deep = b"[" * 100 + b"]" * 100
    assert await post(own, backend_token(), b'{"meeting_id": 1, "x": ' + deep + b"}") == 401
    tampered = own.replace("forged", "other")
    assert await post(tampered, backend_token()) == 403
    assert await post(own.replace("&sig=", "&sig=0"), backend_token()) == 403
    assert await post(f"{stack.url}{analytics.PATH}", backend_token()) == 403
    await trio.sleep(0.2)
    assert receiver.posts == []
    # The genuine one is accepted, journaled and delivered.
    assert await post(own, backend_token()) == 200
    await wait_until(lambda: len(receiver.posts) == 1)
    assert orjson.loads(receiver.posts[0][1])["meeting_id"] == "forged"


async def test_a_failing_receiver_is_retried_from_the_log(
    stack: Stack, nursery: trio.Nursery
) -> None:
    receiver = await start_receiver(nursery)
    receiver.statuses = [503]
    await stack.create("retried", **{"meta_analytics-callback-url": receiver.url})
    await stack.call("end", [("meetingID", "retried")])
    await wait_until(lambda: len(receiver.posts) == 1)
    # Journaled before the backend got its 200: the record is in the "analytics" log.
    journal = log_path(stack.gateway.config.proxy.state_dir, "analytics").read_bytes()
    assert b'"op":"queue"' in journal and b'"meeting_id":"retried"' in journal
    assert "analytics" in stack.gateway.stores  # /readyz watches it
    with trio.fail_after(10):  # backoff(1): 2 s
        while len(receiver.posts) < 2:  # noqa: ASYNC110 - the gateway's task retries
            await trio.sleep(0.05)
    assert receiver.posts[0][1] == receiver.posts[1][1]


def _target() -> Target:
    return Target("bbb-1", "acme", "m-1", "https://lms.example/cb")


def test_split_drops_a_url_the_gateway_may_not_call() -> None:
    params = [("name", "x"), ("META_analytics-callback-url", "ftp://lms.example/cb")]
    assert analytics.split(params) == ([("name", "x")], None)
    kept, url = analytics.split([("meta_analytics-callback-url", "https://lms.example/cb")])
    assert (kept, url) == ([], "https://lms.example/cb")
    backend = Backend("bbb-1", "http://b", BACKEND_SECRET, 10)
    own = analytics.backend_params("https://gw", backend, "acme", "m-1", url)
    assert own[0][0] == analytics.PARAM and own[0][1].startswith("https://gw/callbacks/")
    assert own[1] == ("meta_bbb-proxy-analytics-callback-url", "https://lms.example/cb")
    assert analytics.backend_params("https://gw", backend, "acme", "m-1", None) == []


def test_customer_document_maps_ids_and_urls() -> None:
    target = _target()
    backend_id = rewrite.backend_meeting_id("acme", "m-1")
    document: dict[str, object] = {
        "meeting_id": backend_id,
        "internal_meeting_id": "abc-123",
        "data": {
            "metadata": {
                "analytics-callback-url": "https://gw/own",
                "bbb-proxy-customer": "acme",
                "course": backend_id,
            },
            "list": [backend_id, 3, None],
        },
    }
    mapped = orjson.loads(analytics.customer_document(document, target, "https://gw/own"))
    assert mapped == {
        "meeting_id": "m-1",
        "internal_meeting_id": "abc-123",
        "data": {
            "metadata": {"analytics-callback-url": "https://lms.example/cb", "course": "m-1"},
            "list": ["m-1", 3, None],
        },
    }


def test_bearer() -> None:
    assert analytics.bearer("Bearer abc") == "abc"
    assert analytics.bearer("bearer  abc ") == "abc"
    assert analytics.bearer("Basic abc") is None
    assert analytics.bearer("Bearer") is None
    assert analytics.bearer(None) is None
