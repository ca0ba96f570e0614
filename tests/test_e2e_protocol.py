"""End-to-end: checksums, customers, unsupported calls and bad input (SPEC §2, §6)."""

from __future__ import annotations

import pytest
from lxml import etree

from proxy.bbb.checksum import compute
from tests.harness import Stack, StackFactory, text

ALGORITHMS = ["sha1", "sha256", "sha384", "sha512"]


async def raw_get(stack: Stack, customer: str, call: str, query: str, algorithm: str) -> str:
    """GET with ``query`` exactly as written, signed over those very bytes."""
    checksum = compute(call, query, stack.secrets[customer], algorithm)
    separator = "&" if query else ""
    response = await stack.http.get(
        f"{stack.api(customer)}/{call}?{query}{separator}checksum={checksum}"
    )
    assert response.status_code == 200
    return response.text


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("space", ["+", "%20"])
async def test_every_algorithm_and_space_encoding(stack: Stack, algorithm: str, space: str) -> None:
    query = f"meetingID=room{space}one&name=Room{space}%28one%29"
    body = await raw_get(stack, "acme", "create", query, algorithm)
    assert "<returncode>SUCCESS</returncode>" in body
    assert "<meetingID>room one</meetingID>" in body


async def test_uppercase_checksum_and_leading_ampersand(stack: Stack) -> None:
    checksum = compute("getMeetings", "", stack.secrets["acme"], "sha256").upper()
    response = await stack.http.get(f"{stack.api()}/getMeetings?&checksum={checksum}")
    assert "<returncode>SUCCESS</returncode>" in response.text


async def test_rotated_secrets_both_work(stack: Stack) -> None:
    for secret in ("globex-new", "globex-old"):
        stack.secrets["globex"] = secret
        root = await stack.call("getMeetings", [], "globex")
        assert text(root, "returncode") == "SUCCESS"


@pytest.mark.parametrize(
    "url_suffix",
    [
        "getMeetings?checksum=0000000000000000000000000000000000000000",
        "getMeetings",
        "getMeetings?checksum=abc",
    ],
)
async def test_bad_checksums_are_checksum_error(stack: Stack, url_suffix: str) -> None:
    response = await stack.http.get(f"{stack.api()}/{url_suffix}")
    assert response.status_code == 200
    assert "<messageKey>checksumError</messageKey>" in response.text


async def test_unknown_customer_looks_like_a_wrong_secret(stack: Stack) -> None:
    stack.secrets["ghost"] = "acme-secret"
    unknown = await stack.http.get(stack.signed("getMeetings", [], "ghost"))
    stack.secrets["acme"] = "wrong"
    wrong = await stack.http.get(stack.signed("getMeetings", [], "acme"))
    assert unknown.text == wrong.text
    assert "<messageKey>checksumError</messageKey>" in unknown.text


async def test_disabled_customer(stack: Stack) -> None:
    right = await stack.call("getMeetings", [], "off")
    assert text(right, "messageKey") == "apiNotEnabled"
    stack.secrets["off"] = "wrong"
    wrong = await stack.call("getMeetings", [], "off")
    assert text(wrong, "messageKey") == "checksumError"


async def test_host_binding_serves_the_bound_customer(stack: Stack) -> None:
    url = stack.signed("getMeetings", [], "globex").replace(
        "/globex/bigbluebutton", "/bigbluebutton"
    )
    response = await stack.http.get(url, headers={"Host": "bbb.globex.test:443"})
    assert "<returncode>SUCCESS</returncode>" in response.text
    other = await stack.http.get(url, headers={"Host": "unknown.test"})
    assert "<messageKey>checksumError</messageKey>" in other.text


@pytest.mark.parametrize("call", ["getDefaultConfigXML", "setConfigXML", "noSuchCall"])
async def test_unsupported_calls(stack: Stack, call: str) -> None:
    root = await stack.call(call, [])
    assert text(root, "returncode") == "FAILED"
    assert text(root, "messageKey") == "unsupportedRequest"


@pytest.mark.parametrize(
    "path",
    [
        "/acme/bigbluebutton/api//",
        "/acme/bigbluebutton/api/%2F",
        "/acme/bigbluebutton/api//create",
        "/acme/bigbluebutton//api/create",
        "/acme//bigbluebutton/api",
        "/bigbluebutton/api//getMeetings",
    ],
)
async def test_doubled_slashes_answer_bbb_xml_not_a_redirect(stack: Stack, path: str) -> None:
    """A path with ``//`` is no call of BBB's: its error, not the web framework's HTML 308."""
    response = await stack.http.get(f"{stack.url}{path}", follow_redirects=False)
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("text/xml")
    assert text(etree.fromstring(response.content), "messageKey") == "unsupportedRequest"


async def test_disabled_calls(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"disabled_calls": ["sendChatMessage"]})
    await stack.create("room-1")
    root = await stack.call("sendChatMessage", [("meetingID", "room-1"), ("message", "x")])
    assert text(root, "messageKey") == "unsupportedRequest"
    assert not [r for sim in stack.sims for r in sim.requests if r[0] == "sendChatMessage"]


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ([("name", "x")], "missingParamMeetingID"),
        ([("meetingID", "x" * 257), ("name", "x")], "validationError"),
        ([("meetingID", "a,b"), ("name", "x")], "validationError"),
        ([("meetingID", "ok"), ("name", "")], "validationError"),
        ([("meetingID", "ok"), ("name", "x"), ("maxParticipants", "many")], "validationError"),
        ([("meetingID", "ok"), ("name", "x"), ("duration", "1.5")], "validationError"),
        ([("meetingID", "ok"), ("name", "x"), ("maxParticipants", "--1")], "validationError"),
    ],
)
async def test_bad_create_parameters_change_nothing(
    stack: Stack, params: list[tuple[str, str]], key: str
) -> None:
    root = await stack.call("create", params)
    assert text(root, "returncode") == "FAILED"
    assert text(root, "messageKey") == key
    assert len(stack.gateway.ledger.state) == 0
    assert not [r for sim in stack.sims for r in sim.requests if r[0] != "getMeetings"]


async def test_broken_xml_body_is_refused_and_changes_nothing(stack: Stack) -> None:
    await stack.create("room-1")
    for body, content_type in [
        (b"<modules><module", "application/xml"),
        (b"<!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>", "text/xml"),
        (b"meetingID=x", "text/plain"),
    ]:
        response = await stack.http.post(
            stack.signed("insertDocument", [("meetingID", "room-1")]),
            content=body,
            headers={"Content-Type": content_type},
        )
        assert response.status_code == 200
        assert "<returncode>FAILED</returncode>" in response.text
    assert not [r for sim in stack.sims for r in sim.requests if r[0] == "insertDocument"]


async def test_oversized_requests_get_bbb_envelope(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"max_body_bytes": 1000, "max_query_bytes": 2000})
    await stack.create("room-1")
    big_body = b"<modules>" + b" " * 5000 + b"</modules>"
    response = await stack.http.post(
        stack.signed("insertDocument", [("meetingID", "room-1")]),
        content=big_body,
        headers={"Content-Type": "application/xml"},
    )
    assert response.status_code == 200
    assert "<returncode>FAILED</returncode>" in response.text
    # A create that is valid in every way but its length (a long meetingID would be
    # refused for itself, so it could not show the limit at work).
    params = [("meetingID", "room-2"), ("name", "Room 2"), ("meta_notes", "n" * 2100)]
    long_query = await stack.http.get(stack.signed("create", params))
    assert long_query.status_code == 200
    assert long_query.headers["content-type"] == "text/xml;charset=utf-8"
    assert "<messageKey>validationError</messageKey>" in long_query.text
    assert "too large" in long_query.text
    assert len(stack.gateway.ledger.state) == 1
    assert len([r for sim in stack.sims for r in sim.requests if r[0] == "create"]) == 1
