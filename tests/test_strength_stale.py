"""Tests for mutants that survived the 21:15 UTC re-measure of checksum, placement, rewrite,
outbound and calls.ended (docs/mutation.md), on the functions directly: no request
reaches these differences in the focused selection."""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
from lxml import etree

from proxy.backends import outbound
from proxy.bbb import callbacks, checksum, rewrite
from proxy.calls import ended
from proxy.config import Backend
from proxy.errors import StateError
from proxy.placement import NO_TAG, BackendLoad, Ring, TagRule, _Bound, _has
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
    async with httpx.AsyncClient(transport=httpx.MockTransport(seen)) as client:
        assert await outbound.post_json(client, "https://localhost/a", body, "t", True) == 201
    assert seen.requests[-1].extensions["sni_hostname"] == "localhost"


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


def _restored(children: str) -> list[tuple[str, str]]:
    metadata = etree.fromstring(f"<metadata>{children}</metadata>")
    rewrite.restore_metadata(metadata)
    return [(str(child.tag), child.text or "") for child in metadata]


def test_the_gateways_own_ready_url_is_removed_and_the_customers_renamed() -> None:
    own = f"https://gw.test{rewrite.READY_PATH}?t=1"
    kept = rewrite.TAG_PREFIX + "bbb-recording-ready-url"
    children = (
        f"<bbb-recording-ready-url>{own}</bbb-recording-ready-url>"
        f"<{kept}>https://lms.test/ready</{kept}>"
        "<bbb-recording-ready-url></bbb-recording-ready-url>"
        "<course>7</course>"
    )
    assert _restored(children) == [
        ("bbb-recording-ready-url", "https://lms.test/ready"),
        ("bbb-recording-ready-url", ""),
        ("course", "7"),
    ]


class _Ledger:
    """A shared ledger whose reservation appears only once it is refreshed."""

    shared = True

    def __init__(self, held: object) -> None:
        self._held, self.refreshed = held, False
        self.released: list[tuple[tuple[str, str], str]] = []
        self.state = self

    def by_backend_meeting(self, backend_id: str, backend_meeting_id: str) -> object:
        found = (backend_id, backend_meeting_id) == ("b1", "acme~r")
        return self._held if self.refreshed and found else None

    async def refresh(self) -> None:
        self.refreshed = True

    async def release(self, key: tuple[str, str], reason: str) -> None:
        self.released.append((key, reason))


def _end_notice(created: float) -> callbacks.EndNotice:
    """A verified "end" notice from b1 for acme's meeting r, of the instance ``created``."""
    return callbacks.EndNotice(
        "end",
        "b1",
        "acme~r",
        "r",
        callbacks.instance_of(created),
        callbacks.CustomerUrls((), ()),  # never read by _release
        "",
    )


async def test_a_notice_of_a_meeting_made_on_another_instance_refreshes_and_releases() -> None:
    created = 1700000000.5
    held = SimpleNamespace(key=("acme", "r"), backend_id="b1", created_at=created)
    ledger = _Ledger(held)
    expired: list[tuple[str, str]] = []

    async def meeting_ended(customer: str, meeting_id: str) -> None:
        expired.append((customer, meeting_id))

    gw = SimpleNamespace(ledger=ledger, hooks=SimpleNamespace(meeting_ended=meeting_ended))
    notice = _end_notice(created)
    await ended._release(gw, notice)  # type: ignore[arg-type]
    assert ledger.released == [(("acme", "r"), "ended")]
    assert expired == [("acme", "r")]


async def test_a_notice_of_a_held_meeting_does_not_refresh_the_shared_ledger() -> None:
    held = SimpleNamespace(key=("acme", "r"), backend_id="b1", created_at=1700000000.5)
    ledger = _Ledger(held)
    ledger.refreshed = True  # already holds it
    calls: list[str] = []

    async def refresh() -> None:
        calls.append("refresh")

    ledger.refresh = refresh  # type: ignore[method-assign]

    async def meeting_ended(customer: str, meeting_id: str) -> None:
        pass

    gw = SimpleNamespace(ledger=ledger, hooks=SimpleNamespace(meeting_ended=meeting_ended))
    notice = _end_notice(1700000000.5)
    await ended._release(gw, notice)  # type: ignore[arg-type]
    assert calls == []
    assert ledger.released == [(("acme", "r"), "ended")]


async def test_a_notice_of_another_instance_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = SimpleNamespace(key=("acme", "r"), backend_id="b1", created_at=1700000000.5)
    ledger = _Ledger(held)
    ledger.refreshed = True
    gw = SimpleNamespace(ledger=ledger, hooks=None)
    notice = _end_notice(1600000000.0)
    with caplog.at_level(logging.INFO, logger=ended.__name__):
        await ended._release(gw, notice)  # type: ignore[arg-type]
    assert ledger.released == []
    assert [r.getMessage() for r in caplog.records] == [
        "end notice of another instance of ('acme', 'r') on b1: ignored"
    ]


async def test_a_release_that_is_not_durable_is_logged_and_the_notice_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Backend("b1", "http://b1.test/bigbluebutton/", "s" * 32, 10)
    urls = callbacks.CustomerUrls((), ())
    url, _ = callbacks.ended_urls("http://gw", backend, "acme~r", "r", urls, 1700000000.5)

    async def refresh() -> None:
        raise StateError("disk full")

    ledger = SimpleNamespace(state=_Ledger(None), shared=True, refresh=refresh)
    gw = SimpleNamespace(
        backends=lambda: [backend],
        ledger=ledger,
        config=SimpleNamespace(proxy=SimpleNamespace(allow_private_callbacks=False)),
    )
    with caplog.at_level(logging.ERROR, logger=ended.__name__):
        assert await ended.meeting_ended(gw, urlsplit(url).query) is True  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "meeting-ended notice for r: release not durable: disk full"
    ]


def test_the_algorithm_of_a_request_is_named_by_its_checksums_length() -> None:
    assert checksum.algorithm_of("meetingID=x&checksum=" + "a" * 64) == "sha256"
    assert checksum.algorithm_of("meetingID=x", [("checksum", "b" * 128)]) == "sha512"
    assert checksum.algorithm_of("meetingID=x") == "sha1"


# -- the 22:35 UTC re-measure (checksum, rewrite, placement; unit-level selection) -----------


def test_a_query_is_split_at_its_one_whole_checksum_component() -> None:
    split = checksum.split_checksum
    assert split("x=1&checksum=a=b") == checksum.Split("a=b", "x=1")
    assert split("checksum=abc&x=checksum=y") is None
    assert split("x=checksum=y") is None
    assert split("checksum=a&checksum=b") is None
    assert checksum.algorithm_of("checksum=a&checksum=b") == "sha1"
    assert checksum.algorithm_of("checksum=" + "a" * 64, [("checksum", "b" * 128)]) == "sha1"


def test_a_lone_checksum_is_stripped_as_bbb_web_strips_it() -> None:
    assert checksum.strip_checksum("checksum=abc", "abc") == ""


def test_the_canonical_form_sorts_by_name_only_and_keeps_the_order_of_values() -> None:
    params = [("b", "1"), ("a", "2 x"), ("a", "1")]
    assert checksum.canonical_query(params) == "a=2+x&a=1&b=1"


def test_a_blank_signed_parameter_is_kept() -> None:
    query = checksum.signed_query("create", [("name", ""), ("meetingID", "m")], "s" * 32)
    assert checksum.signed_params("create", query, ["s" * 32]) == [("name", ""), ("meetingID", "m")]


def test_a_long_or_marked_meeting_id_is_hashed_and_one_of_256_is_not() -> None:
    fits = "m" * (rewrite.MAX_MEETING_ID - len("acme~"))
    assert rewrite.backend_meeting_id("acme", fits) == "acme~" + fits
    longer = fits + "é"
    digest = hashlib.sha256(longer.encode()).hexdigest()
    assert rewrite.backend_meeting_id("acme", longer) == "acme~sha256-" + digest


def test_the_gateways_own_analytics_url_is_told_from_the_customers() -> None:
    own = f"https://gw.test{rewrite.ANALYTICS_PATH}?t=1"
    assert rewrite.own_url(rewrite.ANALYTICS_KEY, own) is True
    assert rewrite.own_url(rewrite.ANALYTICS_KEY, "https://lms.test/analytics") is False
    bare = f"https://gw.test{rewrite.ANALYTICS_PATH}"
    assert rewrite.own_url(rewrite.ANALYTICS_KEY, bare) is False


def test_a_backend_missing_from_the_tags_is_untagged() -> None:
    ring = Ring(["a", "b"])
    loads = {b: BackendLoad(b, 10, 0, True) for b in ("a", "b")}
    tags = {"a": frozenset({"x"})}
    rule = TagRule(wanted=frozenset({"y"}))
    assert ring.choose("k", 1, loads, rule=rule, backend_tags=tags) == "b"
    required = TagRule(wanted=frozenset({"y"}), required=frozenset({"x"}))
    assert ring.choose("k", 1, loads, rule=required, backend_tags=tags) == "a"


def test_the_bound_of_an_empty_or_one_connection_pool() -> None:
    assert _Bound(0.25, 1, 0, 0).admits(BackendLoad("a", 0, -1, True)) is False
    assert _Bound(0.25, 1, 0, 1).admits(BackendLoad("a", 1, 0, True)) is True


def test_a_ring_with_a_repeated_id_is_refused_with_its_exact_message() -> None:
    with pytest.raises(ValueError, match=r"^backend ids must be unique$"):
        Ring(["a", "b", "a"])
