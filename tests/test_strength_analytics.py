"""Tests written to kill mutants of ``proxy.bbb.analytics`` and ``proxy.calls.analytics``
that survived (docs/mutation.md).

On the rules' functions directly where the rule is a value (the URL put in the
customer's place, the backend's document accepted or not, the customer's document and
JWT), over real sockets where it is what a backend or a customer sees: the receiver's
answer and tallies, the delivery queued, the POST made to the customer.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from typing import Any

import jwt
import orjson
import pytest
import trio
from jwt.warnings import InsecureKeyLengthWarning

from proxy.bbb import analytics, recording_ready, rewrite
from proxy.bbb.recording_ready import Delivery, Target
from proxy.calls import analytics as receiving
from proxy.config import Backend
from tests.harness import BACKEND_SECRET, SECRETS, Stack, wait_until
from tests.test_analytics import start_receiver

BACKEND = Backend("bbb-1", "http://b", BACKEND_SECRET, 10)
TARGET = Target("bbb-1", "acme", "m-1", "https://lms.example/cb")
BACKEND_ID = rewrite.backend_meeting_id("acme", "m-1")
CUSTOMER_URL = "https://lms.example/cb"


def token_of(payload: dict[str, Any], secret: str, algorithm: str = "HS512") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, secret, algorithm=algorithm)


def decoded(token: str, secret: str) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return dict(jwt.decode(token, secret, algorithms=["HS512"]))


GENUINE = token_of({"exp": 2_000_000_000}, BACKEND_SECRET)


# -- split and backend_params -------------------------------------------------------------------


def test_split_takes_the_first_non_empty_analytics_url_only() -> None:
    params = [
        ("name", "Room"),
        ("meta_analytics-callback-url", ""),
        ("Meta_Analytics-Callback-URL", CUSTOMER_URL),
        ("meta_analytics-callback-url", "https://other.example/cb"),
        ("meta_course", "7"),
    ]
    assert analytics.split(params) == ([("name", "Room"), ("meta_course", "7")], CUSTOMER_URL)


def test_split_never_takes_another_parameters_value() -> None:
    params = [("name", "https://lms.example/name"), ("meetingID", "m-1")]
    assert analytics.split(params) == (params, None)


def test_split_logs_the_url_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=analytics.log.name)
    params = [("meta_analytics-callback-url", "ftp://lms.example/cb")]
    assert analytics.split(params) == ([], None)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            "proxy.bbb.analytics",
            logging.WARNING,
            "create: the analytics callback URL is not one the gateway may call; dropped",
        )
    ]
    caplog.clear()
    assert analytics.split([("meta_analytics-callback-url", CUSTOMER_URL)]) == ([], CUSTOMER_URL)
    assert caplog.records == []


def test_backend_params_are_the_signed_url_and_the_customers_kept_aside() -> None:
    params = analytics.backend_params("https://gw", BACKEND, "acme", "m-1", CUSTOMER_URL)
    own = recording_ready.signed_url(
        "https://gw", analytics.PATH, BACKEND, ("acme", "m-1", CUSTOMER_URL), b"analytics"
    )
    assert params == [
        ("meta_analytics-callback-url", own),
        ("meta_bbb-proxy-analytics-callback-url", CUSTOMER_URL),
    ]
    query = own.split("?", 1)[1]
    assert recording_ready.verify_url(query, {"bbb-1": BACKEND}, b"analytics") == TARGET
    assert recording_ready.verify_url(query, {"bbb-1": BACKEND}) is None  # its own key


# -- bearer and backend_document ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("  Bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer a b", "a b"),
        ("Bearer   ", None),
        ("", None),
        ("Bearerabc", None),
        ("Token abc", None),
    ],
)
def test_bearer_cases(header: str, token: str | None) -> None:
    assert analytics.bearer(header) == token


def document(**extra: object) -> bytes:
    return orjson.dumps({"meeting_id": BACKEND_ID, **extra})


def test_a_genuine_document_is_returned_whole() -> None:
    body = document(data={"duration": 5})
    assert analytics.backend_document(GENUINE, body, BACKEND, TARGET) == {
        "meeting_id": BACKEND_ID,
        "data": {"duration": 5},
    }


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_every_hs_algorithm_of_the_backends_secret_is_accepted(algorithm: str) -> None:
    token = token_of({"exp": 2_000_000_000}, BACKEND_SECRET, algorithm)
    assert analytics.backend_document(token, document(), BACKEND, TARGET) is not None


@pytest.mark.parametrize(
    ("token", "body"),
    [
        (None, document()),
        (token_of({"exp": 2_000_000_000}, "another-secret"), document()),
        (token_of({"exp": 1}, BACKEND_SECRET), document()),
        (GENUINE, b"[1, 2]"),
        (GENUINE, b'"a string"'),
        (GENUINE, b"{"),
        (GENUINE, orjson.dumps({"meeting_id": "m-1"})),
        (GENUINE, orjson.dumps({"meetingID": BACKEND_ID})),
    ],
)
def test_anything_not_genuine_is_none(token: str | None, body: bytes) -> None:
    assert analytics.backend_document(token, body, BACKEND, TARGET) is None


def nested(depth: int) -> bytes:
    """A document whose deepest value is ``depth`` levels below its top."""
    return document(x=orjson.loads(b"[" * depth + b"]" * depth))


def test_the_depth_limit_is_64_levels_with_the_top() -> None:
    assert analytics.backend_document(GENUINE, nested(63), BACKEND, TARGET) is not None
    assert analytics.backend_document(GENUINE, nested(64), BACKEND, TARGET) is None


# -- customer_document and customer_token ------------------------------------------------------


def test_customer_document_maps_keys_lists_and_nested_metadata() -> None:
    own = "https://gw/own?sig=1"
    given: dict[str, object] = {
        "meeting_id": BACKEND_ID,
        "by_id": {BACKEND_ID: own, "other": "kept"},
        "urls": [own, [BACKEND_ID], {"metadata": {"bbb-proxy-customer": "acme", "a": own}}],
        "metadata": "not an object",
        "n": 1.5,
        "flag": False,
        "none": None,
    }
    assert orjson.loads(analytics.customer_document(given, TARGET, own)) == {
        "meeting_id": "m-1",
        "by_id": {"m-1": CUSTOMER_URL, "other": "kept"},
        "urls": [CUSTOMER_URL, ["m-1"], {"metadata": {"a": CUSTOMER_URL}}],
        "metadata": "not an object",
        "n": 1.5,
        "flag": False,
        "none": None,
    }


def test_customer_document_is_compact_json_bytes() -> None:
    given: dict[str, object] = {"meeting_id": BACKEND_ID, "x": "ü"}
    assert analytics.customer_document(given, TARGET, "https://gw/own") == (
        b'{"meeting_id":"m-1","x":"\xc3\xbc"}'
    )


def test_customer_token_is_hs512_with_exp_an_hour_on() -> None:
    token = analytics.customer_token("acme-secret", "m-1", 1000.7)
    assert jwt.get_unverified_header(token) == {"alg": "HS512", "typ": "JWT"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        claims = jwt.decode(
            token, "acme-secret", algorithms=["HS512"], options={"verify_exp": False}
        )
    assert claims == {"exp": 4600, "meeting_id": "m-1"}


# -- the receiver, over real sockets ------------------------------------------------------------


async def own_url(stack: Stack, nursery: trio.Nursery, meeting_id: str) -> tuple[str, str, Any]:
    """(the gateway's URL on the backend, the backend meetingID, the customer's receiver)."""
    receiver = await start_receiver(nursery)
    created = await stack.create(meeting_id, **{"meta_analytics-callback-url": receiver.url})
    assert created.findtext("returncode") == "SUCCESS"
    sim, backend_meeting = stack.backend_meeting("acme", meeting_id)
    return (
        sim.meetings[backend_meeting].metadata["analytics-callback-url"],
        backend_meeting,
        receiver,
    )


async def post(
    stack: Stack, url: str, body: bytes, token: str | None = None, **headers: str
) -> tuple[int, str, str]:
    sent = {"Content-Type": "application/json", **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    response = await stack.http.post(url, content=body, headers=sent)
    return response.status_code, response.headers["content-type"], response.text


async def test_each_answer_is_its_status_in_plain_text_and_tallied(
    stack: Stack, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=receiving.log.name)
    own, backend_meeting, _ = await own_url(stack, nursery, "told")
    body = orjson.dumps({"meeting_id": backend_meeting})
    plain = "text/plain"
    assert await post(stack, own + "0", body, GENUINE) == (403, plain, "403\n")
    assert caplog.records == []
    assert await post(stack, own, body, "garbage") == (401, plain, "401\n")
    reservation = stack.gateway.ledger.get(("acme", "told"))
    assert reservation is not None
    refused = f"analytics callback from {reservation.backend_id}: JWT or document refused"
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("proxy.calls.analytics", refused)
    ]
    assert await post(stack, own, body, GENUINE) == (200, plain, "200\n")
    tallies = {k: v for k, v in stack.gateway.tallies.items() if k[0] == "analytics_callbacks"}
    assert tallies == {
        ("analytics_callbacks", "unsigned_url"): 1,
        ("analytics_callbacks", "bad_jwt"): 1,
        ("analytics_callbacks", "accepted"): 1,
    }


async def test_the_body_is_read_as_bytes_whatever_its_content_type(
    stack: Stack, nursery: trio.Nursery
) -> None:
    own, backend_meeting, _ = await own_url(stack, nursery, "typed")
    body = orjson.dumps({"meeting_id": backend_meeting, "a": "b"})
    form = "application/x-www-form-urlencoded"
    assert (await post(stack, own, body, GENUINE, **{"Content-Type": form}))[0] == 200
    # not UTF-8 inside a string: not JSON (read as text it would be, with U+FFFD)
    broken = body.replace(b'"b"', b'"\xff"')
    assert (await post(stack, own, broken, GENUINE))[0] == 401


async def test_the_delivery_queued_is_the_customers_document(
    stack: Stack, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    own, backend_meeting, receiver = await own_url(stack, nursery, "queued")
    queued: list[Delivery] = []

    async def keep(self: receiving.AnalyticsQueue, delivery: Delivery) -> int:
        queued.append(delivery)
        return 200

    monkeypatch.setattr(receiving.AnalyticsQueue, "_queued", keep)
    body = orjson.dumps({"meeting_id": backend_meeting, "data": {"see": own}})
    assert (await post(stack, own, body, GENUINE))[0] == 200
    (delivery,) = queued
    assert re.fullmatch(r"acme/analytics/[0-9]{19}", delivery.id), delivery.id
    assert (delivery.url, delivery.customer, delivery.meeting_id, delivery.record_id) == (
        receiver.url,
        "acme",
        "queued",
        "",
    )
    assert orjson.loads(delivery.body) == {"meeting_id": "queued", "data": {"see": receiver.url}}


async def test_the_post_to_the_customer(
    stack: Stack, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    own, backend_meeting, receiver = await own_url(stack, nursery, "posted")
    made: list[tuple[Any, ...]] = []

    async def fake_post(*args: Any) -> int:
        made.append(args)
        return 200

    monkeypatch.setattr(receiving, "post_json", fake_post)
    body = orjson.dumps({"meeting_id": backend_meeting, "ü": 1})
    assert (await post(stack, own, body, GENUINE))[0] == 200
    await wait_until(lambda: len(made) == 1)
    ((outbound, url, sent, token, allow),) = made
    assert outbound is stack.gateway.outbound
    assert (url, sent, allow) == (receiver.url, '{"meeting_id":"posted","ü":1}'.encode(), True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        claims = jwt.decode(
            token, SECRETS["acme"], algorithms=["HS512"], options={"verify_exp": False}
        )
    assert claims["meeting_id"] == "posted"
    assert abs(claims["exp"] - (time.time() + 3600)) < 60, claims  # from the attempt
    assert set(claims) == {"exp", "meeting_id"}
