"""BBB's response envelope and the join-error redirect."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from lxml import etree

from proxy import errors
from proxy.bbb import envelope
from tests.harness import StackFactory

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bbb" / "bigbluebutton"  # see SOURCES.md


def shape(xml: str | bytes) -> list[tuple[str, str]]:
    """Tags and stripped texts of every element, in document order."""
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    return [(str(e.tag), (e.text or "").strip()) for e in root.iter()]


def test_failure_matches_bbb_checksum_error() -> None:
    fixture = (FIXTURES / "docs-checksumError.xml").read_bytes()
    ours = envelope.failure("checksumError", "Checksums do not match")
    assert shape(ours) == shape(fixture)
    assert shape(ours) == [
        ("response", ""),
        ("returncode", "FAILED"),
        ("messageKey", "checksumError"),
        ("message", "Checksums do not match"),
    ]


def test_failure_has_no_prolog_and_no_whitespace() -> None:
    ours = envelope.failure("notFound", "A meeting with that ID does not exist")
    assert ours.startswith("<response><returncode>FAILED</returncode>")
    assert "<?xml" not in ours
    assert ">\n" not in ours and "> <" not in ours


def test_from_error_uses_message_key_and_message() -> None:
    xml = envelope.from_error(errors.NoServerCapacity())
    assert shape(xml)[2:] == [
        ("messageKey", "noServerCapacity"),
        ("message", "No server has room for a meeting of this size"),
    ]
    xml = envelope.from_error(
        errors.ValidationError("Bad <id>", message_key="missingParamMeetingID")
    )
    assert shape(xml)[2:] == [("messageKey", "missingParamMeetingID"), ("message", "Bad <id>")]


def test_escaping() -> None:
    xml = envelope.failure("validationError", "a < b && c > d \"q\" 'q'")
    assert "<message>a &lt; b &amp;&amp; c &gt; d" in xml
    assert "<![CDATA[" not in xml
    assert shape(xml)[3] == ("message", "a < b && c > d \"q\" 'q'")


def test_element_escapes_and_lowercases_booleans() -> None:
    assert envelope.element("running", True) == "<running>true</running>"
    assert envelope.element("running", False) == "<running>false</running>"
    assert envelope.element("name", "R&D <1>") == "<name>R&amp;D &lt;1&gt;</name>"
    assert envelope.element("createTime", 1715261728000) == "<createTime>1715261728000</createTime>"


def test_success_keeps_field_order() -> None:
    xml = envelope.success([("running", False), ("meetingID", "a&b"), ("count", 3)])
    assert shape(xml) == [
        ("response", ""),
        ("returncode", "SUCCESS"),
        ("running", "false"),
        ("meetingID", "a&b"),
        ("count", "3"),
    ]
    assert envelope.success() == "<response><returncode>SUCCESS</returncode></response>"
    assert envelope.success([("a", 1), ("b", "x")]) == (
        "<response><returncode>SUCCESS</returncode><a>1</a><b>x</b></response>"
    )


async def test_headers(make_stack: StackFactory) -> None:
    """Every API answer the gateway sends carries BBB's headers: success, errors, 413, 404."""
    stack = await make_stack(proxy={"max_body_bytes": 100})
    answers = [
        await stack.http.get(stack.api()),
        await stack.http.get(stack.signed("getMeetings", [])),
        await stack.http.get(stack.signed("getMeetingInfo", [("meetingID", "nope")])),
        await stack.http.get(f"{stack.api()}/getMeetings?checksum=0"),
        await stack.http.get(stack.signed("noSuchCall", [])),
        await stack.http.post(
            stack.signed("insertDocument", [("meetingID", "nope")]),
            content=b"<modules>" + b" " * 200 + b"</modules>",
            headers={"Content-Type": "application/xml"},
        ),
    ]
    for response in answers:
        assert response.status_code == 200, response.url
        assert response.headers["content-type"] == "text/xml;charset=utf-8", response.url
        assert response.headers["cache-control"] == "no-cache", response.url
        assert response.text.startswith("<response><returncode>"), response.url
    assert envelope.HEADERS == {"Content-Type": envelope.CONTENT_TYPE, "Cache-Control": "no-cache"}


def decoded_errors(location: str) -> object:
    values = parse_qs(urlsplit(location).query)["errors"]
    assert len(values) == 1
    return orjson.loads(values[0])


@pytest.mark.parametrize(
    ("logout_url", "kept_query"),
    [
        ("https://lms.example/logout", ""),
        ("https://lms.example/logout?course=7&lang=de", "course=7&lang=de&"),
    ],
)
def test_join_error_location(logout_url: str, kept_query: str) -> None:
    location = envelope.join_error_location(logout_url, "notFound", 'No "room/1" & <no> joy')
    parts = urlsplit(location)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "lms.example", "/logout")
    assert parts.query.startswith(kept_query + "errors=")
    assert decoded_errors(location) == [{"key": "notFound", "message": 'No "room/1" & <no> joy'}]
    # The JSON is fully percent-encoded: no raw separators leak into the query.
    raw = parts.query[len(kept_query) + len("errors=") :]
    assert not set(raw) & set('&="[]{}/ ')


def test_join_error_location_keeps_fragment() -> None:
    location = envelope.join_error_location("https://lms.example/out#top", "checksumError", "x")
    assert location.startswith("https://lms.example/out?errors=")
    assert location.endswith("#top")
    assert decoded_errors(location) == [{"key": "checksumError", "message": "x"}]
