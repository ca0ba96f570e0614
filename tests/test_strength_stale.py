"""Tests for mutants that survived the 21:15 UTC re-measure of checksum, placement, rewrite,
outbound and calls.ended (docs/mutation.md), on the functions directly: no request
reaches these differences in the focused selection."""

from __future__ import annotations

import httpx
from lxml import etree

from proxy.backends import outbound
from proxy.bbb import rewrite
from proxy.placement import NO_TAG, _has
from tests.test_strength import Recorded


async def test_a_json_body_is_posted_with_its_type_and_bearer_token() -> None:
    seen = Recorded(201)
    body = '{"meeting_id":"m","ü":1}'.encode()
    async with httpx.AsyncClient(transport=httpx.MockTransport(seen)) as client:
        status = await outbound.post_json(client, "http://localhost:8080/a?x=1", body, "tok", True)
    assert status == 201
    (request,) = seen.requests
    assert request.method == "POST"
    assert request.content == body
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["host"] == "localhost:8080"


def test_a_public_address_is_allowed_without_networks() -> None:
    assert outbound._allowed("8.8.8.8", []) is True
    assert outbound._allowed("10.0.0.1", []) is False


def _meeting(duration: str) -> etree._Element:
    meeting = etree.fromstring(
        "<meeting><meetingID>acme~r</meetingID><metadata>"
        f"<{rewrite.CUSTOMER_TAG}>acme</{rewrite.CUSTOMER_TAG}>"
        f"<{rewrite.MEETING_TAG}>r</{rewrite.MEETING_TAG}>"
        f"<{rewrite.DURATION_TAG}>{duration}</{rewrite.DURATION_TAG}>"
        "</metadata></meeting>"
    )
    return meeting


def test_an_asked_duration_has_at_most_nine_digits() -> None:
    assert rewrite.meeting_owner(_meeting("999999999")) == ("acme", "r", 999999999)
    assert rewrite.meeting_owner(_meeting("1000000000")) == ("acme", "r", 0)


def test_a_backend_matches_a_meetings_tags() -> None:
    assert _has(frozenset({"a", "b"}), frozenset({"b"})) is True
    assert _has(frozenset({"a"}), frozenset({"b"})) is False
    assert _has(frozenset(), frozenset({NO_TAG})) is True
    assert _has(frozenset(), frozenset({"a"})) is False
    assert _has(frozenset({"a"}), frozenset({NO_TAG})) is False
