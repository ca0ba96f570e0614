"""Signed meeting-ended URLs and the SSRF check on customers' callback URLs."""

from __future__ import annotations

import pytest

from proxy.backends.outbound import checked_address, is_public
from proxy.bbb import callbacks
from proxy.bbb.callbacks import CustomerUrls
from proxy.config import Backend

B1 = Backend(id="b1", url="http://b1.test/bigbluebutton/api", secret="one", capacity=10)
B2 = Backend(id="b2", url="http://b2.test/bigbluebutton/api", secret="two", capacity=10)
BACKENDS = {"b1": B1, "b2": B2}
URLS = CustomerUrls(("https://lms.test/ended?a=1&b=2",), ("https://lms.test/cb",))
CREATED = 1764585763.1234567  # a reservation's created_at: names the meeting instance


def query_of(url: str) -> str:
    return url.split("?", 1)[1]


def test_callback_notice_round_trip_with_bbb_appending_parameters() -> None:
    ended, callback = callbacks.ended_urls("http://gw", B1, "acme~room 1", "room 1", URLS, CREATED)
    assert ended.startswith("http://gw/callbacks/v1/ended?k=ended&")
    appended = query_of(callback) + "&recordingmarks=true&meetingID=acme%7Eroom+1"
    notice = callbacks.verify(appended, BACKENDS)
    assert notice == callbacks.EndNotice(
        "callback", "b1", "acme~room 1", "room 1", repr(CREATED), URLS, "true"
    )
    assert callbacks.calls_for(notice) == [
        "https://lms.test/ended?a=1&b=2",
        "https://lms.test/cb?recordingmarks=true&meetingID=room+1",
    ]


def test_ended_notice_releases_but_calls_nobody() -> None:
    ended, _ = callbacks.ended_urls("http://gw", B1, "acme~r", "r", URLS, CREATED)
    notice = callbacks.verify(query_of(ended), BACKENDS)
    assert notice is not None and notice.kind == "ended"
    assert callbacks.calls_for(notice) == []


def test_reencoded_query_still_verifies() -> None:
    _, callback = callbacks.ended_urls("http://gw", B1, "acme~room 1", "room 1", URLS, CREATED)
    reencoded = query_of(callback).replace("+", "%20").replace("%7E", "~")
    assert callbacks.verify(reencoded, BACKENDS) is not None


def test_tampering_is_refused() -> None:
    _, callback = callbacks.ended_urls("http://gw", B1, "acme~room", "room", URLS, CREATED)
    query = query_of(callback)
    assert callbacks.verify(query, BACKENDS) is not None
    assert callbacks.verify(query.replace("acme~room", "acme~other"), BACKENDS) is None
    assert callbacks.verify(query.replace("b=b1", "b=b2"), BACKENDS) is None
    assert callbacks.verify(query.split("&sig=")[0], BACKENDS) is None
    added = query.replace("&sig=", "&cb=http%3A%2F%2Fevil.test&sig=")
    assert callbacks.verify(added, BACKENDS) is None
    assert callbacks.verify(query.replace("k=callback", "k=other"), BACKENDS) is None
    later = query.replace(f"c={CREATED!r}", f"c={CREATED + 1!r}")
    assert later != query and callbacks.verify(later, BACKENDS) is None
    without_instance = query.replace(f"&c={CREATED!r}", "")
    assert without_instance != query and callbacks.verify(without_instance, BACKENDS) is None


def test_url_signed_without_the_backends_secret_is_refused() -> None:
    """The key is the named backend's: signed with another secret (or none) fails."""
    for secret in ("two", ""):
        impostor = Backend(id="b1", url=B1.url, secret=secret, capacity=10)
        for url in callbacks.ended_urls("http://gw", impostor, "acme~room", "room", URLS, CREATED):
            assert callbacks.verify(query_of(url), BACKENDS) is None
    for url in callbacks.ended_urls("http://gw", B1, "acme~room", "room", URLS, CREATED):
        assert callbacks.verify(query_of(url), BACKENDS) is not None


@pytest.mark.parametrize(
    "sig", ["é" * 64, "\u0660" * 64, "ａ" * 64, "\x00", "%ff%fe", "0" * 63 + "é"]
)
def test_non_ascii_or_broken_signature_is_refused(sig: str) -> None:
    ended, _ = callbacks.ended_urls("http://gw", B1, "acme~room", "room", URLS, CREATED)
    query = query_of(ended)
    forged = query[: query.index("&sig=")] + "&sig=" + sig
    assert callbacks.verify(forged, BACKENDS) is None
    assert callbacks.verify(forged.encode().decode("latin-1"), BACKENDS) is None


def test_a_notice_releases_only_its_own_instance() -> None:
    ended, callback = callbacks.ended_urls("http://gw", B1, "acme~r", "r", URLS, CREATED)
    for url in (ended, callback):
        notice = callbacks.verify(query_of(url), BACKENDS)
        assert notice is not None and notice.instance == repr(CREATED)
        assert callbacks.releases(notice, CREATED)
        assert not callbacks.releases(notice, CREATED + 1e-6)  # the re-created meeting
        assert not callbacks.releases(notice, 0.0)


def test_a_notice_without_instance_releases_nothing() -> None:
    notice = callbacks.EndNotice("ended", "b1", "acme~r", "r", "", CustomerUrls(), "false")
    assert not callbacks.releases(notice, CREATED)


def test_split_customer_urls_keeps_end_callback_visible() -> None:
    params = [
        ("name", "x"),
        ("meetingEndedURL", "https://a.test/e"),
        ("meta_endCallbackUrl", "https://b.test/c"),
    ]
    kept, urls, tags = callbacks.split_customer_urls(params)
    assert kept == [("name", "x")]
    assert urls == CustomerUrls(("https://a.test/e",), ("https://b.test/c",))
    assert tags == [("meta_bbb-proxy-endcallbackurl", "https://b.test/c")]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(address) is public


async def test_loopback_host_refused_unless_allowed() -> None:
    assert await checked_address("localhost", 80, allow_private=False) is None
    assert await checked_address("127.0.0.1", 80, allow_private=True) == "127.0.0.1"
    assert await checked_address("no-such-host.invalid", 80, allow_private=True) is None


@pytest.mark.parametrize(
    "params",
    [
        [("k", "ended"), ("b", "b1")],
        [("k", "ended"), ("b", "b1"), ("m", "acme~r")],
        [("k", "ended"), ("b", "b1"), ("i", "r")],
        [("k", "other"), ("b", "b1"), ("m", "acme~r"), ("i", "r")],
        [("b", "b1"), ("m", "acme~r"), ("i", "r")],
    ],
)
def test_genuinely_signed_but_incomplete_urls_are_refused(params: list[tuple[str, str]]) -> None:
    """Signed with the right key, but not a URL the gateway makes: still refused."""
    url = callbacks._signed_url("http://gw", B1, params)
    assert callbacks.verify(query_of(url), BACKENDS) is None


def test_a_url_made_before_instances_verifies_without_one() -> None:
    params = [
        ("k", "callback"),
        ("b", "b1"),
        ("m", "acme~r"),
        ("i", "r"),
        ("cb", "https://x.test/"),
    ]
    notice = callbacks.verify(query_of(callbacks._signed_url("http://gw", B1, params)), BACKENDS)
    assert notice == callbacks.EndNotice(
        "callback", "b1", "acme~r", "r", "", CustomerUrls(("https://x.test/",)), "false"
    )
    assert not callbacks.releases(notice, CREATED)


@pytest.mark.parametrize(
    ("appended", "marks"),
    [
        ("", "false"),
        ("&recordingmarks=true", "true"),
        ("&recordingmarks=TRUE", "false"),
        ("&recordingmarks=false&recordingmarks=true", "false"),
    ],
)
def test_recordingmarks_as_bbb_appends_them(appended: str, marks: str) -> None:
    _, callback = callbacks.ended_urls("http://gw", B1, "acme~r", "r", URLS, CREATED)
    notice = callbacks.verify(query_of(callback) + appended, BACKENDS)
    assert notice is not None and notice.recordingmarks == marks


def test_a_signature_with_a_lone_surrogate_is_refused() -> None:
    ended, _ = callbacks.ended_urls("http://gw", B1, "acme~r", "r", URLS, CREATED)
    query = query_of(ended)
    assert callbacks.verify(query[: query.index("&sig=")] + "&sig=\udc80", BACKENDS) is None
