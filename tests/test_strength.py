"""Tests written to kill mutants that survived ``./run mutate`` (docs/mutation.md).

Each checks a documented rule against an independent statement of it, so that a
changed comparison, constant or operator in the decision modules is noticed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import random
from fractions import Fraction

import httpx
import pytest
from lxml import etree

from proxy.backends import outbound
from proxy.bbb import callbacks, customer_urls, rewrite, uploads
from proxy.bbb.numbers import parse_count, parse_int
from proxy.config import Backend
from proxy.errors import ChecksumError, ValidationError
from proxy.logs import shown
from proxy.placement import BackendLoad, Ring, RingStatistics

# -- placement: the bound of "consistent hashing with bounded loads" ---------------------------


def oracle(
    ring: Ring, key: str, size: int, loads: dict[str, BackendLoad], epsilon: Fraction
) -> str | None:
    """The module docstring's rule, in exact arithmetic: the first backend in ring order
    that fits and meets ``u + size <= ceil((1 + eps) * (U + size) * c / C)``, else the first
    that fits, else None."""
    live = [load for load in loads.values() if load.available]
    total_used = sum(x.used for x in live)
    total_capacity = sum(x.capacity for x in live)
    fitting = [
        b
        for b in ring.candidates(key)
        if b in loads and loads[b].available and loads[b].free >= size
    ]
    for backend_id in fitting:
        load = loads[backend_id]
        limit = (1 + epsilon) * (total_used + size) * Fraction(load.capacity, total_capacity)
        if load.used + size <= math.ceil(limit):
            return backend_id
    return fitting[0] if fitting else None


def test_choose_follows_the_bound_exactly_in_random_pools() -> None:
    rng = random.Random(20261201)
    ring = Ring(["a", "b", "c", "d"], vnodes=20)
    for case in range(3000):
        loads = {}
        for backend_id in ring.backend_ids:
            capacity = rng.choice([1, 2, 5, 10, 40, 100, 1000])
            used = rng.randint(0, capacity)
            loads[backend_id] = BackendLoad(backend_id, capacity, used, rng.random() > 0.15)
        size = rng.choice([1, 1, 2, 3, 10, 25])
        epsilon = rng.choice([Fraction(0), Fraction(1, 4), Fraction(1, 2), Fraction(1)])
        key = f"acme~room-{case}"
        expected = oracle(ring, key, size, loads, epsilon)
        assert ring.choose(key, size, loads, epsilon=float(epsilon)) == expected, (loads, size)


def first_key(ring: Ring, order: list[str]) -> str:
    """A meeting key whose ring walk starts with ``order``."""
    return next(
        k for i in range(10_000) if list(ring.candidates(k := f"k{i}"))[: len(order)] == order
    )


def test_the_bound_at_an_exact_integer_is_not_rounded_up() -> None:
    """Equal capacities, epsilon 1/4: (1.25 * 8 * 1/2) is exactly 5, so 6 is over it."""
    ring = Ring(["a", "b"], vnodes=10)
    key = first_key(ring, ["a", "b"])
    loads = {"a": BackendLoad("a", 100, 5, True), "b": BackendLoad("b", 100, 2, True)}
    assert ring.choose(key, 1, loads, epsilon=0.25) == "b"


def test_the_bound_counts_the_new_meeting_in_the_total() -> None:
    """A small server just within its share keeps the meeting that hashes to it."""
    ring = Ring(["a", "b"], vnodes=10)
    key = first_key(ring, ["a", "b"])
    loads = {"a": BackendLoad("a", 100, 47, True), "b": BackendLoad("b", 1000, 443, True)}
    # (47 + 10) <= ceil(1.25 * (490 + 10) * 100 / 1100) = 57
    assert ring.choose(key, 10, loads, epsilon=0.25) == "a"
    loads["a"] = BackendLoad("a", 100, 48, True)  # one more: over its share, goes to b
    assert ring.choose(key, 10, loads, epsilon=0.25) == "b"


@pytest.mark.parametrize("size", [0, -1])
def test_a_meeting_needs_a_size(size: int) -> None:
    with pytest.raises(ValueError, match=r"^size must be >= 1$"):
        Ring(["a"]).choose("k", size, {"a": BackendLoad("a", 10, 0, True)})
    with pytest.raises(ValueError, match=r"^epsilon must be >= 0$"):
        Ring(["a"]).choose("k", 1, {"a": BackendLoad("a", 10, 0, True)}, epsilon=-0.1)


def test_one_point_per_backend_is_a_ring() -> None:
    ring = Ring(["a", "b"], vnodes=1)
    assert ring.statistics() == RingStatistics(backends=2, vnodes=1)
    assert sorted(ring.candidates("k")) == ["a", "b"]
    with pytest.raises(ValueError, match=r"^vnodes must be >= 1$"):
        Ring(["a"], vnodes=0)


# -- numbers from peers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "signed", "expected"),
    [
        ("7", False, 7),
        (" 42 ", False, 42),
        ("9" * 18, False, 10**18 - 1),  # exactly MAX_DIGITS
        ("1" * 19, False, None),
        ("-5", False, None),  # unsigned unless asked
        ("-5", True, -5),
        ("-12", True, -12),
        ("-a5", True, None),
        ("--5", True, None),
        ("-", True, None),
        ("", False, None),
        ("   ", False, None),
        (None, False, None),
        ("abc", False, None),
        ("12a", False, None),
        ("+5", True, None),
        ("1_000", False, None),
        ("²", False, None),
        ("١٢", False, None),
    ],
)
def test_parse_int(text: str | None, signed: bool, expected: int | None) -> None:
    assert parse_int(text, signed=signed) == expected


def test_parse_int_and_parse_count_limits() -> None:
    assert parse_int("12345", max_digits=5) == 12345
    assert parse_int("123456", max_digits=5) is None
    assert parse_int("-12345", max_digits=5, signed=True) == -12345
    assert parse_count("17") == 17
    assert parse_count(None) == 0
    assert parse_count("-3") == 0
    assert parse_count("²") == 0
    assert parse_count("1234", max_digits=3) == 0
    assert parse_count("123", max_digits=3) == 123


# -- rewriting between customer and backend ----------------------------------------------------


def test_tags_are_the_gateways_marks_in_order() -> None:
    assert rewrite.tags("acme", "room 1", 45) == [
        ("meta_bbb-proxy-customer", "acme"),
        ("meta_bbb-proxy-meeting", "room 1"),
        ("meta_bbb-proxy-duration", "45"),
    ]
    assert rewrite.tags("acme", "r", 0, 1700000000.25)[-1] == (
        "meta_bbb-proxy-created",
        "1700000000.25",
    )
    assert len(rewrite.tags("acme", "r", 0, 0.0)) == 4  # 0.0 is an instance too


@pytest.mark.parametrize(
    ("name", "reserved"),
    [
        ("meta_bbb-proxy-customer", True),
        ("META_BBB-PROXY-MEETING", True),
        ("Meta_Bbb-Proxy-anything", True),
        ("meta_bbb-proxyx", False),
        ("bbb-proxy-customer", False),
        ("meta_course", False),
        ("xmeta_bbb-proxy-customer", False),
    ],
)
def test_is_reserved_param(name: str, reserved: bool) -> None:
    assert rewrite.is_reserved_param(name) is reserved


def test_without_drops_names_in_any_case_and_the_gateways_tags() -> None:
    params = [
        ("MeetingID", "x"),
        ("name", "y"),
        ("meta_bbb-proxy-customer", "z"),
        ("meta_other", "w"),
        ("DURATION", "5"),
    ]
    assert rewrite.without(params, ["meetingID", "Duration"]) == [
        ("name", "y"),
        ("meta_other", "w"),
    ]
    assert rewrite.without(params, []) == [
        ("MeetingID", "x"),
        ("name", "y"),
        ("meta_other", "w"),
        ("DURATION", "5"),
    ]


def test_replace_param() -> None:
    params = [("a", "1"), ("meetingID", "x"), ("b", "2"), ("meetingID", "y")]
    assert rewrite.replace_param(params, "meetingID", "acme~x") == [
        ("a", "1"),
        ("meetingID", "acme~x"),
        ("b", "2"),
    ]
    assert rewrite.replace_param([("a", "1")], "meetingID", "m") == [("a", "1"), ("meetingID", "m")]
    assert rewrite.replace_param([], "meetingID", "m") == [("meetingID", "m")]


def meeting_xml(
    metadata: str, meeting_id: str = "acme~room-1", duration: str = "0"
) -> etree._Element:
    return etree.fromstring(
        f"<meeting><meetingID>{meeting_id}</meetingID><duration>{duration}</duration>"
        f"<metadata>{metadata}</metadata></meeting>"
    )


def test_restore_meeting_shows_the_customer_its_own() -> None:
    meeting = meeting_xml(
        "<course>Maths</course><bbb-proxy-customer>acme</bbb-proxy-customer>"
        "<bbb-proxy-meeting>room-1</bbb-proxy-meeting><bbb-proxy-duration>45</bbb-proxy-duration>"
        "<endcallbackurl>http://gw/callbacks/v1/ended?k=callback</endcallbackurl>"
        "<bbb-proxy-endcallbackurl>https://lms.test/cb</bbb-proxy-endcallbackurl>"
        "<!-- a comment --><bbb-origin>Moodle</bbb-origin>"
    )
    rewrite.restore_meeting(meeting, "room-1", 45)
    assert meeting.findtext("meetingID") == "room-1"
    assert meeting.findtext("duration") == "45"
    metadata = meeting.find("metadata")
    assert metadata is not None
    tags = [c.tag if isinstance(c.tag, str) else "comment" for c in metadata]
    assert tags == ["course", "endcallbackurl", "comment", "bbb-origin"]
    assert metadata.findtext("endcallbackurl") == "https://lms.test/cb"
    assert isinstance(rewrite.serialise(meeting), str)
    assert rewrite.serialise(meeting).startswith("<meeting><meetingID>room-1</meetingID>")


def test_restore_meeting_without_metadata_or_duration() -> None:
    meeting = etree.fromstring("<response><meetingID>acme~r</meetingID></response>")
    rewrite.restore_meeting(meeting, "r", 30)
    assert rewrite.serialise(meeting) == "<response><meetingID>r</meetingID></response>"


def test_meeting_owner_needs_both_marks_to_agree() -> None:
    tags = (
        "<bbb-proxy-customer>acme</bbb-proxy-customer>"
        "<bbb-proxy-meeting>room-1</bbb-proxy-meeting><bbb-proxy-duration>45</bbb-proxy-duration>"
    )
    assert rewrite.meeting_owner(meeting_xml(tags)) == ("acme", "room-1", 45)
    assert rewrite.meeting_owner(meeting_xml(tags, meeting_id="globex~room-1")) is None
    assert rewrite.meeting_owner(meeting_xml(tags, meeting_id="acmex~room-1")) is None
    no_duration = tags.replace("<bbb-proxy-duration>45</bbb-proxy-duration>", "")
    assert rewrite.meeting_owner(meeting_xml(no_duration)) == ("acme", "room-1", 0)
    bad_duration = tags.replace(">45<", ">²<")
    assert rewrite.meeting_owner(meeting_xml(bad_duration)) == ("acme", "room-1", 0)
    no_meeting = tags.replace("<bbb-proxy-meeting>room-1</bbb-proxy-meeting>", "")
    assert rewrite.meeting_owner(meeting_xml(no_meeting)) is None
    empty_customer = tags.replace(">acme<", "><")
    assert rewrite.meeting_owner(meeting_xml(empty_customer, meeting_id="~room-1")) is None
    bare = etree.fromstring("<meeting><meetingID>acme~room-1</meetingID></meeting>")
    assert rewrite.meeting_owner(bare) is None
    assert rewrite.owned_by("acme", "acme~x")
    assert not rewrite.owned_by("acme", "acme")
    assert not rewrite.owned_by("acme", "acmex~x")


# -- outbound: what counts as answered, what is logged, which IPv6 forms embed an IPv4 ----------


@pytest.mark.parametrize(
    ("status", "answered"), [(199, False), (200, True), (299, True), (300, False), (301, False)]
)
async def test_only_a_2xx_answer_counts_as_called(status: int, answered: bool) -> None:
    """BBB's end callbacks count 2xx as delivered; a 3xx is not followed and not success."""

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(status))
    ) as client:
        called = await outbound.call_customer_url(client, "http://localhost/e", True)
    assert called is answered


def test_a_refused_url_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    url = "http://lms.test/ended?m=1"
    with caplog.at_level(logging.WARNING, logger=outbound.__name__):
        outbound._refused(url, "host is not public", "refused")
    assert caplog.records[-1].getMessage() == f"not calling {shown(url)}: host is not public"


@pytest.mark.parametrize(
    ("address", "compatible"),
    [
        ("::", False),  # the unspecified address
        ("::1", False),  # loopback
        ("::2", True),  # ::0.0.0.2, the smallest IPv4-compatible form
        ("::8.8.8.8", True),
        ("::ffff:ffff", True),  # ::255.255.255.255
        ("::1:0:0", False),  # bits above the low 32 set: not ::a.b.c.d (RFC 4291 2.5.5.1)
        ("::ffff:8.8.8.8", False),  # mapped, not compatible
    ],
)
def test_ipv4_compatible_is_exactly_the_low_32_bits(address: str, compatible: bool) -> None:
    assert outbound._compatible(ipaddress.IPv6Address(address)) is compatible


# -- customer URLs: each refusal names its reason (it is logged and counted) ------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://lms.test/" + "x" * 2048, "longer than 2048 characters"),
        ("http://lms.test/\x00", "contains a non-printable character"),
        ("http://[::1/x", "not a URL"),
        ("ftp://lms.test/x", "not an http(s) URL"),
        ("http:///x", "no host"),
        ("http://bü..test/x", "host name cannot be encoded (IDNA)"),
        ("http://a..b.test/x", "host name has an empty, over-long or invalid label"),
        ("http://a_b!.test/x", "host name has an empty, over-long or invalid label"),
        ("http://lms.test:0/x", "port is not a number from 1 to 65535"),
        ("http://lms.test:65536/x", "port is not a number from 1 to 65535"),
        ("http://lms.test:http/x", "port is not a number from 1 to 65535"),
        ("http://[::1]:81/x", None),
        ("https://bücher.test/x", None),
    ],
)
def test_each_customer_url_refusal_names_its_reason(url: str, reason: str | None) -> None:
    assert customer_urls.problem(url) == reason


def test_a_host_name_may_have_253_characters_not_254() -> None:
    host = ("a" * 62 + ".") * 4  # 252 characters, the last a dot
    assert customer_urls.problem(f"http://{host}b/") is None  # 253: RFC 1035's longest
    assert customer_urls.problem(f"http://{host}b./") is None  # its fully qualified form
    assert customer_urls.problem(f"http://{host}bc/") == (
        "host name has an empty, over-long or invalid label"
    )


# -- putRecordingTextTrack's upload reader (proxy/bbb/uploads.py) -------------------------------

B = b"XyZ"


def upload_body(fields: list[tuple[str, str]], file: bytes | None, after: bytes = b"") -> bytes:
    out = b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (k.encode(), v.encode())
        for k, v in fields
    )
    if file is not None:
        out += (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="de.vtt"\r\n'
            b"Content-Type: text/vtt\r\n\r\n" + file + b"\r\n"
        )
    return out + after + b"--XyZ--\r\n"


def read_upload(
    body: bytes, *, limit: int = 1000, step: int = 7, fields: bool = True
) -> list[object]:
    """Every event of ``body`` fed ``step`` bytes at a time, file bytes joined."""
    reader = uploads.UploadReader(B, limit, fields=fields)
    events: list[object] = []
    offset = 0
    while True:
        event = reader.next_event()
        if event is uploads.NEED_DATA:
            if offset >= len(body):
                reader.close()
            else:
                reader.feed(body[offset : offset + step])
                offset += step
        elif isinstance(event, bytes) and events and isinstance(events[-1], bytes):
            events[-1] += event
        else:
            events.append(event)
            if event is uploads.DONE:
                return events


@pytest.mark.parametrize("step", [1, 2, 7, 64, 10_000])
def test_the_upload_reader_gives_fields_then_the_file_whatever_the_chunks(step: int) -> None:
    track = b"WEBVTT\r\n\r\n00:00.000 --> 00:01.000\r\n--XyZ is not a boundary here\r\n"
    events = read_upload(upload_body([("kind", "subtitles"), ("lang", "de")], track), step=step)
    assert events == [
        uploads.Field("kind", "subtitles"),
        uploads.Field("lang", "de"),
        uploads.FileStart("de.vtt", "text/vtt"),
        track,
        uploads.FILE_END,
        uploads.DONE,
    ]


def test_the_upload_reader_bounds() -> None:
    assert read_upload(upload_body([], b"x" * 1000))[1] == b"x" * 1000  # exactly the limit
    with pytest.raises(ValidationError) as over:
        read_upload(upload_body([], b"x" * 1001))
    assert (over.value.message_key, over.value.message) == (
        "upload_text_track_failed",
        "Text track upload failed: larger than 1000 bytes.",
    )
    big_field = [("label", "l" * (uploads.UPLOAD_OVERHEAD + 1))]  # the fields' bound
    with pytest.raises(ValidationError, match="larger than 1000"):
        read_upload(upload_body(big_field, b"x"), step=100_000)
    reader = uploads.UploadReader(B, 10)
    reader.feed(b"-" * (10 + uploads.UPLOAD_OVERHEAD))  # the whole body's bound, exactly
    with pytest.raises(ValidationError, match="larger than 10 bytes"):
        reader.feed(b"-")


def test_the_upload_reader_refuses_unsigned_fields() -> None:
    with pytest.raises(ChecksumError):  # a field after the file: never verified
        read_upload(upload_body([], b"x", after=upload_body([("kind", "captions")], None)[:-9]))
    with pytest.raises(ChecksumError):  # the query carried the signed parameters
        read_upload(upload_body([("kind", "captions")], b"x"), fields=False)
    assert read_upload(upload_body([], b"x"), fields=False)[0] == uploads.FileStart("de.vtt")


def test_the_upload_reader_reads_only_the_first_file_part() -> None:
    other = (
        b'--XyZ\r\nContent-Disposition: form-data; name="other"; filename="o.txt"\r\n\r\n'
        b"ignored\r\n"
    )
    second = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="2.vtt"\r\n\r\nsecond\r\n'
    )
    events = read_upload(other + upload_body([], b"first", after=second))
    assert events == [
        uploads.FileStart("de.vtt", "text/vtt"),
        b"first",
        uploads.FILE_END,
        uploads.DONE,
    ]


def test_the_upload_reader_on_odd_bodies() -> None:
    assert read_upload(b"") == [uploads.DONE]  # no body: no file
    assert read_upload(upload_body([], b"")) == [
        uploads.FileStart("de.vtt", "text/vtt"),
        uploads.FILE_END,
        uploads.DONE,
    ]
    with pytest.raises(ValidationError) as broken:
        read_upload(b"--XyZ\r\nno headers here")
    assert (broken.value.message_key, broken.value.message) == (
        "validationError",
        "The multipart body could not be parsed",
    )
    nameless = b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nv\r\n--XyZ--\r\n"
    with pytest.raises(ValidationError) as no_name:
        read_upload(nameless)
    assert no_name.value.message == "A multipart field has no name"
    odd = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a\\"b\x01.vtt"\r\n'
        b"Content-Type: text/vtt\x07\r\n\r\nx\r\n--XyZ--\r\n"
    )
    assert read_upload(odd)[0] == uploads.FileStart("ab.vtt", "text/vtt")
    unnamed = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename=""\r\n\r\nx\r\n--XyZ--\r\n'
    )
    assert read_upload(unnamed)[0] == uploads.FileStart("track.vtt", "text/vtt")


def test_upload_boundaries_and_the_forwarded_part() -> None:
    assert uploads.boundary_of(None) is None
    assert uploads.boundary_of("application/x-www-form-urlencoded") is None
    assert uploads.boundary_of("Multipart/Form-Data; boundary=abc") == b"abc"
    for bad in ("multipart/form-data", "multipart/form-data; boundary=ä"):
        with pytest.raises(ValidationError) as refused:
            uploads.boundary_of(bad)
        assert refused.value.message_key == "unsupportedContentType"
    head = uploads.part_head(uploads.FileStart("de.vtt", "text/plain"), "b0")
    assert head == (
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="de.vtt"\r\n'
        b"Content-Type: text/plain\r\n\r\n"
    )
    assert uploads.part_tail("b0") == b"\r\n--b0--\r\n"
    assert uploads.content_type("b0") == "multipart/form-data; boundary=b0"
    assert repr(uploads.DONE) == "DONE"


# -- meeting-ended URLs: the signature's construction, both URLs, customer URLs dropped ---------

CB_BACKEND = Backend(id="b1", url="http://b1.test/bigbluebutton/api", secret="one", capacity=10)


def test_the_notice_signature_is_hmac_sha256_under_a_key_derived_from_the_secret() -> None:
    """The construction is fixed: URLs already handed to BBB servers by a running gateway
    must still verify after it restarts or is upgraded."""
    ended, callback = callbacks.ended_urls(
        "https://gw.test", CB_BACKEND, "acme~r", "r", callbacks.CustomerUrls(), 1.5
    )
    for url in (ended, callback):
        assert url.startswith("https://gw.test/callbacks/v1/ended?")
        query, _, sig = url.partition("?")[2].rpartition("&sig=")
        key = hashlib.sha256(b"bbb-proxy meeting-ended:one").digest()
        assert sig == hmac.new(key, query.encode(), hashlib.sha256).hexdigest()


def test_a_customer_end_url_that_cannot_be_called_is_dropped_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = customer_urls.OUTCOMES["dropped"]
    with caplog.at_level(logging.WARNING, logger=callbacks.__name__):
        kept, urls, tags = callbacks.split_customer_urls(
            [("meetingEndedURL", "ftp://lms.test/e"), ("meta_endCallbackUrl", "http://:0/x")]
        )
    assert (kept, urls, tags) == ([], callbacks.CustomerUrls(), [])
    assert customer_urls.OUTCOMES["dropped"] == before + 2
    assert [r.getMessage() for r in caplog.records] == [
        f"create: dropped meetingEndedURL {shown('ftp://lms.test/e')}: not an http(s) URL",
        f"create: dropped meta_endCallbackUrl {shown('http://:0/x')}: no host",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=callbacks.__name__):
        assert callbacks.split_customer_urls([("name", "x")])[1] == callbacks.CustomerUrls()
    assert caplog.records == []  # nothing given: nothing dropped
    assert customer_urls.OUTCOMES["dropped"] == before + 2


def test_the_end_callback_keeps_the_customers_own_query() -> None:
    notice = callbacks.EndNotice(
        "callback",
        "b1",
        "acme~r",
        "r",
        "1.5",
        callbacks.CustomerUrls((), ("https://lms.test/cb?course=7#top",)),
        "false",
    )
    assert callbacks.calls_for(notice) == [
        "https://lms.test/cb?course=7&recordingmarks=false&meetingID=r#top"
    ]


# -- outbound POSTs (recording-ready, webhooks) and their failures, as the customer sees them ---


class Recorded:
    """An httpx transport that records each request and answers ``status`` (or raises)."""

    def __init__(self, status: int = 200, error: Exception | None = None) -> None:
        self.status, self.error = status, error
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return httpx.Response(self.status)


async def test_a_form_is_posted_urlencoded_to_the_checked_address() -> None:
    seen = Recorded(202)
    async with httpx.AsyncClient(transport=httpx.MockTransport(seen)) as client:
        status = await outbound.post_customer_url(
            client, "http://localhost:8080/ready?x=1", {"signed_parameters": "a b"}, True
        )
    assert status == 202
    (request,) = seen.requests
    assert request.method == "POST"
    assert request.url.host in ("127.0.0.1", "::1") and request.url.port == 8080
    assert (request.url.path, request.url.query) == ("/ready", b"x=1")
    assert request.headers["host"] == "localhost:8080"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.content == b"signed_parameters=a+b"


async def test_a_webhook_body_is_posted_byte_for_byte() -> None:
    seen = Recorded(200)
    body = "event=%5B%5D&domain=b%C3%BC.test&note=ä"
    async with httpx.AsyncClient(transport=httpx.MockTransport(seen)) as client:
        status = await outbound.post_form_body(client, "https://localhost/hook", body, True)
    assert status == 200
    (request,) = seen.requests
    assert request.content == body.encode("utf-8")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["host"] == "localhost"
    assert request.extensions["sni_hostname"] == "localhost"


async def test_allowed_networks_admit_private_addresses_and_only_those() -> None:
    seen = Recorded(204)
    loopback = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    elsewhere = [ipaddress.ip_network("10.0.0.0/8")]
    url = "http://localhost/hook"
    async with httpx.AsyncClient(transport=httpx.MockTransport(seen)) as client:
        assert await outbound.post_form_body(client, url, "a=1", False, loopback) == 204
        assert await outbound.post_form_body(client, url, "a=1", False, elsewhere) is None
        assert await outbound.post_form_body(client, url, "a=1", False) is None
    assert len(seen.requests) == 1


async def test_failures_and_refusals_are_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "http://localhost/e?course=1"
    broken = Recorded(error=httpx.ConnectError("refused"))
    failed, refused = customer_urls.OUTCOMES["failed"], customer_urls.OUTCOMES["refused"]
    with caplog.at_level(logging.WARNING, logger=outbound.__name__):
        async with httpx.AsyncClient(transport=httpx.MockTransport(broken)) as client:
            assert await outbound.post_customer_url(client, url, {"a": "1"}, True) == 0
            assert await outbound.call_customer_url(client, url, allow_private=False) is False
            assert await outbound.call_customer_url(client, url, allow_private=True) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"callback {shown(url)} failed: ConnectError",
        f"not calling {shown(url)}: host is not public or does not resolve",
        f"callback {shown(url)} failed: ConnectError",
    ]
    assert customer_urls.OUTCOMES["failed"] == failed + 2
    assert customer_urls.OUTCOMES["refused"] == refused + 1
    assert len(broken.requests) == 2


async def test_a_non_2xx_answer_is_logged_with_its_status(caplog: pytest.LogCaptureFixture) -> None:
    url = "http://localhost/e"
    async with httpx.AsyncClient(transport=httpx.MockTransport(Recorded(503))) as client:
        with caplog.at_level(logging.WARNING, logger=outbound.__name__):
            assert await outbound.post_customer_url(client, url, {}, True) == 503
    assert caplog.records[-1].getMessage() == f"callback {shown(url)} answered HTTP 503"


def test_the_upload_readers_field_bound_is_over_all_fields() -> None:
    exactly = [("label", "l" * uploads.UPLOAD_OVERHEAD)]
    assert read_upload(upload_body(exactly, b"x"), step=100_000)[0] == uploads.Field(*exactly[0])
    several = [(f"f{i}", "v" * 30_000) for i in range(3)]  # each small, together too many
    with pytest.raises(ValidationError, match="larger than 100000 bytes"):
        read_upload(upload_body(several, b"x"), limit=100_000, step=100_000)


def test_the_upload_reader_takes_fields_by_default_and_bounds_the_parts() -> None:
    reader = uploads.UploadReader(B, 10)
    reader.feed(upload_body([("kind", "captions")], None))
    reader.close()
    assert reader.next_event() == uploads.Field("kind", "captions")
    many = [(f"f{i}", "") for i in range(1001)]  # werkzeug's max_parts: bodies.MAX_FIELDS
    with pytest.raises(ValidationError, match="could not be parsed"):
        read_upload(upload_body(many, None), step=100_000)
    assert len(read_upload(upload_body(many[:999], b"x"), step=100_000)) == 999 + 4


def test_the_file_parts_own_type_is_kept() -> None:
    typed = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.srt"\r\n'
        b"Content-Type:  application/x-subrip \r\n\r\n1\r\n--XyZ--\r\n"
    )
    assert read_upload(typed)[0] == uploads.FileStart("a.srt", "application/x-subrip")


def test_the_upload_reader_is_exact_at_every_split_and_streams() -> None:
    """Cut anywhere, in two or three pieces, line breaks next to the delimiter included,
    the file comes out byte for byte; and bytes come out before the body ended."""
    track = b"\r\n\r\r\n\n\rWEBVTT\r\n\r\n--Xy\r\n\r"
    body = upload_body([("kind", "x")], track)
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1, 5):
            reader = uploads.UploadReader(B, 1000)
            got, pieces = b"", [body[:i], body[i:j], body[j:]]
            for piece in [*pieces, None]:
                if piece is None:
                    reader.close()
                else:
                    reader.feed(piece)
                while (event := reader.next_event()) not in (uploads.NEED_DATA, uploads.DONE):
                    got += event if isinstance(event, bytes) else b""
                if event is uploads.DONE:
                    break
            assert got == track, (i, j)
    reader = uploads.UploadReader(B, 10**6)
    reader.feed(upload_body([], b"line\n" * 20_000)[:50_000])  # more to come
    out = []
    while (event := reader.next_event()) is not uploads.NEED_DATA:
        out.append(event)
    assert sum(len(e) for e in out if isinstance(e, bytes)) > 49_000


def test_a_field_that_is_not_utf8_is_read_with_replacement() -> None:
    body = b'--XyZ\r\nContent-Disposition: form-data; name="label"\r\n\r\n\xffx\r\n--XyZ--\r\n'
    assert read_upload(body)[0] == uploads.Field("label", "\ufffdx")


async def test_a_3xx_answer_counts_as_failed_and_a_tls_form_post_names_its_host() -> None:
    seen = Recorded(300)
    ok, failed = customer_urls.OUTCOMES["ok"], customer_urls.OUTCOMES["failed"]
    async with httpx.AsyncClient(transport=httpx.MockTransport(seen)) as client:
        assert await outbound.post_customer_url(client, "https://localhost/r", {"a": "1"}, True)
    assert (customer_urls.OUTCOMES["ok"], customer_urls.OUTCOMES["failed"]) == (ok, failed + 1)
    assert seen.requests[0].extensions["sni_hostname"] == "localhost"


async def test_anything_a_call_raises_is_a_logged_failure(caplog: pytest.LogCaptureFixture) -> None:
    odd = Recorded(error=RuntimeError("not httpx's"))
    failed = customer_urls.OUTCOMES["failed"]
    with caplog.at_level(logging.WARNING, logger=outbound.__name__):
        async with httpx.AsyncClient(transport=httpx.MockTransport(odd)) as client:
            assert await outbound.post_customer_url(client, "http://localhost/r", {}, True) == 0
            assert await outbound.post_customer_url(client, "ftp://lms.test/r", {}, True) is None
    assert customer_urls.OUTCOMES["failed"] == failed + 1
    assert [r.getMessage() for r in caplog.records] == [
        "callback http://localhost/r failed: RuntimeError",
        "not calling ftp://lms.test/r: not an http(s) URL",
    ]
