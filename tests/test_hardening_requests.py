"""Issue 7 §2: only what the customer signed reaches a backend; request input is hardened.

Everything here goes over real sockets to a gateway with simulated BBBs, except
the few unit checks of :mod:`proxy.bbb.checksum` and :mod:`proxy.request` at the end.
Checksums are computed here with hashlib, independently of the code under test.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit

import bbbctl
import httpx
import pytest
from lxml import etree

from proxy import calls as calls_module
from proxy.bbb import bodies, checksum, envelope
from proxy.config import Customer
from proxy.errors import ValidationError
from proxy.request import Answer, ApiRequest
from proxy.simulator import Simulator
from proxy.simulator.model import ApiRequest as SimRequest
from proxy.simulator.model import Reply
from tests.harness import Stack, StackFactory, text

SECRET = "acme-secret"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def sign(call: str, query: str, secret: str = SECRET) -> str:
    return hashlib.sha1((call + query + secret).encode()).hexdigest()


def canonical(params: list[tuple[str, str]]) -> str:
    ordered = sorted(params, key=lambda item: item[0])
    return "&".join(f"{k}={quote_plus(v)}" for k, v in ordered)


def key(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    return text(etree.fromstring(response.content), "messageKey")


def returncode(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return text(etree.fromstring(response.content), "returncode")


def join_error_key(response: httpx.Response) -> str:
    """The messageKey of a join error redirect (``errors=[{"key": ...}]``)."""
    assert response.status_code == 302, response.text
    errors = dict(parse_qsl(urlsplit(response.headers["location"]).query)).get("errors", "")
    assert '"key"' in errors, response.headers["location"]
    return errors.split('"key":"')[1].split('"')[0]


def recorded(sim: Simulator) -> list[SimRequest]:
    """Spy on what the simulated backend receives (the request as its web layer read it)."""
    seen: list[SimRequest] = []
    handle = sim.handle

    def spy(request: SimRequest) -> Reply:
        seen.append(request)
        return handle(request)

    sim.handle = spy  # type: ignore[method-assign]
    return seen


def all_recorded(stack: Stack) -> list[SimRequest]:
    seen: list[SimRequest] = []
    for sim in stack.sims:
        handle = sim.handle

        def spy(request: SimRequest, handle: Callable[[SimRequest], Reply] = handle) -> Reply:
            seen.append(request)
            return handle(request)

        sim.handle = spy  # type: ignore[method-assign]
    return seen


def calls(seen: list[SimRequest], call: str) -> list[SimRequest]:
    return [r for r in seen if r.call == call]


def params_of(request: SimRequest) -> list[tuple[str, str]]:
    return parse_qsl(request.raw_query, keep_blank_values=True) + list(request.form_params)


# -- 1. unsigned form fields ---------------------------------------------------------------------


async def test_a_posted_role_never_makes_a_moderator(stack: Stack) -> None:
    """An end user holding a viewer's join URL POSTs role=MODERATOR: refused, never forwarded."""
    await stack.create("class-1", attendeePW="ap", moderatorPW="mp")
    query = urlencode([("meetingID", "class-1"), ("fullName", "Eve"), ("password", "ap")])
    url = f"{stack.api()}/join?{query}&checksum={sign('join', query)}"
    posted = await stack.http.post(url, content="role=MODERATOR", headers=FORM)
    assert join_error_key(posted) == "checksumError"
    assert "role=MODERATOR" not in posted.headers["location"]
    plain = await stack.http.get(url)
    assert plain.status_code == 302
    assert plain.headers["location"].startswith(tuple(stack.sim_urls))
    assert "role=" not in plain.headers["location"]


async def test_a_body_only_join_is_refused(stack: Stack) -> None:
    """join takes its parameters from the signed URL query only, never from a body."""
    await stack.create("class-2")
    url = f"{stack.api()}/join?checksum={sign('join', '')}"
    body = urlencode([("meetingID", "class-2"), ("fullName", "Eve"), ("role", "MODERATOR")])
    response = await stack.http.post(url, content=body, headers=FORM)
    assert join_error_key(response) == "checksumError"
    assert not response.headers["location"].startswith(tuple(stack.sim_urls))


@pytest.mark.parametrize(
    "extra", ["meta_bbb-proxy-customer=globex", "record=true", "meetingEndedURL=http://10.0.0.1/"]
)
async def test_body_parameters_beside_a_signed_query_are_refused(stack: Stack, extra: str) -> None:
    seen = all_recorded(stack)
    query = urlencode([("meetingID", "signed-room"), ("name", "Signed room")])
    url = f"{stack.api()}/create?{query}&checksum={sign('create', query)}"
    response = await stack.http.post(url, content=extra, headers=FORM)
    assert key(response) == "checksumError"
    assert stack.gateway.ledger.get(("acme", "signed-room")) is None
    assert calls(seen, "create") == []


async def test_an_end_with_body_parameters_beside_its_signed_query_is_refused(
    stack: Stack,
) -> None:
    await stack.create("keep-me")
    query = "meetingID=keep-me"
    url = f"{stack.api()}/end?{query}&checksum={sign('end', query)}"
    response = await stack.http.post(url, content="password=x", headers=FORM)
    assert key(response) == "checksumError"
    assert stack.gateway.ledger.get(("acme", "keep-me")) is not None


async def test_body_only_posts_are_accepted_as_bbb_web_accepts_them(stack: Stack) -> None:
    seen = all_recorded(stack)
    # 3.0 docs: every parameter in the body, the checksum over the empty query.
    size = ("maxParticipants", "2")  # three meetings within acme's 20 connections
    body = [("meetingID", "post-empty"), ("name", "Posted room"), ("meta_course", "Maths 1"), size]
    url = f"{stack.api()}/create?checksum={sign('create', '')}"
    assert returncode(await stack.http.post(url, content=urlencode(body), headers=FORM)) == (
        "SUCCESS"
    )
    # bbb-common-web 2.5-2.7: the canonical form of every parameter, checksum in the body...
    body = [("name", "Canon room"), ("meetingID", "post-canon"), size]
    signed = [*body, ("checksum", sign("create", canonical(body)))]
    response = await stack.http.post(
        f"{stack.api()}/create", content=urlencode(signed), headers=FORM
    )
    assert returncode(response) == "SUCCESS"
    # ...or in the URL query.
    body = [("name", "Canon room"), ("meetingID", "post-canon-2"), size]
    url = f"{stack.api()}/create?checksum={sign('create', canonical(body))}"
    assert returncode(await stack.http.post(url, content=urlencode(body), headers=FORM)) == (
        "SUCCESS"
    )
    for meeting_id in ("post-empty", "post-canon", "post-canon-2"):
        assert stack.gateway.ledger.get(("acme", meeting_id)) is not None
    forwarded = dict(params_of(calls(seen, "create")[0]))
    assert forwarded["meta_course"] == "Maths 1"


async def test_a_parameter_both_in_the_url_and_the_body_is_a_checksum_error(
    stack: Stack,
) -> None:
    url_params = [("meetingID", "url-room")]
    body = [("meetingID", "body-room"), ("name", "Either room")]
    cs = sign("create", canonical(url_params + body))
    url = f"{stack.api()}/create?{urlencode(url_params)}&checksum={cs}"
    response = await stack.http.post(url, content=urlencode(body), headers=FORM)
    assert key(response) == "checksumError"
    assert stack.gateway.ledger.get(("acme", "url-room")) is None
    assert stack.gateway.ledger.get(("acme", "body-room")) is None


# -- 2. checksum stripping -----------------------------------------------------------------------


def _move_checksum(url: str, position: str) -> str:
    """The same signed URL with its checksum component first, in the middle or last."""
    base, query = url.split("?", 1)
    parts = query.split("&")
    (mark,) = [p for p in parts if p.startswith("checksum=")]
    rest = [p for p in parts if p != mark]
    at = {"first": 0, "middle": len(rest) // 2, "last": len(rest)}[position]
    return base + "?" + "&".join([*rest[:at], mark, *rest[at:]])


@pytest.mark.parametrize("position", ["first", "middle", "last"])
async def test_a_real_clients_urls_verify_with_the_checksum_anywhere(
    stack: Stack, position: str
) -> None:
    client = bbbctl.BBBApiClient(stack.api(), SECRET)
    create = client.makeurl(
        "create", meetingID=f"lib-{position}", name="Library (room)", welcome="Hi all & co"
    )
    moved = _move_checksum(create, position)
    query = urlsplit(moved).query
    cs = checksum.find_checksum(query)
    assert cs is not None
    # What the gateway checks is exactly the string bbb-web's literal removal leaves.
    split = checksum.split_checksum(query)
    assert split is not None and split.signed == checksum.strip_checksum(query, cs)
    assert returncode(await stack.http.get(moved)) == "SUCCESS"
    info = client.makeurl("getMeetingInfo", meetingID=f"lib-{position}")
    root = etree.fromstring((await stack.http.get(_move_checksum(info, position))).content)
    assert text(root, "meetingID") == f"lib-{position}"
    join = client.getJoinLink(f"lib-{position}", "Grace Hopper", role="VIEWER")
    joined = await stack.http.get(_move_checksum(join, position))
    assert joined.status_code == 302
    assert joined.headers["location"].startswith(tuple(stack.sim_urls))


async def test_the_php_librarys_leading_ampersand_form(stack: Stack) -> None:
    await stack.create("php-room")
    response = await stack.http.get(
        f"{stack.api()}/getMeetings?&checksum={sign('getMeetings', '')}"
    )
    assert returncode(response) == "SUCCESS"
    assert "<meetingID>php-room</meetingID>" in response.text


def _tampered(url: str, how: str) -> str:
    base, query = url.split("?", 1)
    cs = checksum.find_checksum(query)
    assert cs is not None
    if how == "inside-a-value":  # bbb-web's removal would give back the signed string
        query = _move_checksum(f"{base}?{query}", "first").split("?", 1)[1]
        query = query.replace("welcome=Hello", f"welcome=He&checksum={cs}llo")
    elif how == "twice":
        query = f"{query}&checksum={cs}"
    elif how == "encoded-name":
        query = f"{query}&checks%75m={cs}"
    elif how == "value-holds-mark":
        query = query.replace("welcome=Hello", f"welcome=Hellochecksum={cs}")
    return f"{base}?{query}"


@pytest.mark.parametrize("how", ["inside-a-value", "twice", "encoded-name", "value-holds-mark"])
async def test_extra_checksums_are_refused(stack: Stack, how: str) -> None:
    seen = all_recorded(stack)
    client = bbbctl.BBBApiClient(stack.api(), SECRET)
    url = client.makeurl("create", meetingID="cut-room", name="Cut room", welcome="Hello")
    response = await stack.http.get(_tampered(url, how))
    assert key(response) == "checksumError"
    assert stack.gateway.ledger.get(("acme", "cut-room")) is None
    assert calls(seen, "create") == []


async def test_a_join_with_a_checksum_inserted_into_its_name_is_refused(stack: Stack) -> None:
    await stack.create("named")
    client = bbbctl.BBBApiClient(stack.api(), SECRET)
    url = client.getJoinLink("named", "Grace", role="VIEWER")
    cs = checksum.find_checksum(urlsplit(url).query)
    # With the checksum moved first, bbb-web's removal leaves the signed string; fullName="Gr".
    tampered = _move_checksum(url, "first").replace(
        "fullName=Grace", f"fullName=Gr&checksum={cs}ace"
    )
    response = await stack.http.get(tampered)
    assert join_error_key(response) == "checksumError"


# -- 3. bodies other than urlencoded -------------------------------------------------------------


def multipart(fields: list[tuple[str, str]], file: tuple[str, bytes] | None = None) -> bytes:
    out = b""
    for name, value in fields:
        out += b"--BOUNDARY\r\n"
        out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    if file is not None:
        out += b"--BOUNDARY\r\n"
        out += f'Content-Disposition: form-data; name="{file[0]}"; filename="a.pdf"\r\n'.encode()
        out += b"Content-Type: application/pdf\r\n\r\n" + file[1] + b"\r\n"
    return out + b"--BOUNDARY--\r\n"


MULTIPART = {"Content-Type": "multipart/form-data; boundary=BOUNDARY"}
SMUGGLED = [
    ("meta_bbb-proxy-customer", "globex"),
    ("meetingEndedURL", "http://10.0.0.1/internal"),
    ("meta_endCallbackUrl", "http://10.0.0.1/callback"),
]


async def test_multipart_fields_are_filtered_like_query_parameters(stack: Stack) -> None:
    seen = all_recorded(stack)
    fields = [("meetingID", "mp-room"), ("name", "Multipart room"), *SMUGGLED]
    url = f"{stack.api()}/create?checksum={sign('create', '')}"
    response = await stack.http.post(url, content=multipart(fields), headers=MULTIPART)
    assert returncode(response) == "SUCCESS"
    (sent,) = calls(seen, "create")
    assert sent.body == b""  # nothing passed through byte for byte
    params = params_of(sent)
    assert [v for k, v in params if k == "meta_bbb-proxy-customer"] == ["acme"]
    ended = [v for k, v in params if k in ("meetingEndedURL", "meta_endCallbackUrl")]
    assert len(ended) == 2
    assert all(v.startswith(stack.config.proxy.public_url + "/callbacks/") for v in ended)


async def test_multipart_beside_a_signed_query_is_refused(stack: Stack) -> None:
    seen = all_recorded(stack)
    query = urlencode([("meetingID", "mp-signed"), ("name", "Multipart room")])
    url = f"{stack.api()}/create?{query}&checksum={sign('create', query)}"
    response = await stack.http.post(url, content=multipart(SMUGGLED), headers=MULTIPART)
    assert key(response) == "checksumError"
    assert calls(seen, "create") == []


async def test_multipart_files_and_other_bodies_are_unsupported(stack: Stack) -> None:
    seen = all_recorded(stack)
    await stack.create("bodies")
    empty = sign("create", "")
    with_file = multipart([("meetingID", "mp-file"), ("name", "File room")], ("file", b"%PDF"))
    query = "meetingID=bodies"
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        (f"create?checksum={empty}", with_file, MULTIPART),
        (f"create?checksum={empty}", b"meetingID=x&name=yy", {"Content-Type": "text/plain"}),
        (f"create?checksum={empty}", b'{"meetingID": "x"}', {"Content-Type": "application/json"}),
        (f"create?checksum={empty}", b"meetingID=x&name=yy", {}),
        (
            f"getMeetingInfo?{query}&checksum={sign('getMeetingInfo', query)}",
            b"<modules/>",
            {"Content-Type": "application/xml"},
        ),
    ]
    for target, body, headers in cases:
        response = await stack.http.post(f"{stack.api()}/{target}", content=body, headers=headers)
        assert key(response) == "unsupportedContentType", target
    assert calls(seen, "getMeetingInfo") == []
    assert len(calls(seen, "create")) == 1  # the stack.create above


DOCTYPE_BODIES = [
    b'<?xml version="1.0"?><!DOCTYPE modules [<!ENTITY x "big">]><modules>&x;</modules>',
    b'<!DOCTYPE modules SYSTEM "http://127.0.0.1:1/evil.dtd"><modules/>',
    b"<!DOCTYPE modules><modules/>",
]
XML = {"Content-Type": "application/xml"}


@pytest.mark.parametrize("body", [*DOCTYPE_BODIES, b"<presentation/>", b"<modules>"])
async def test_create_checks_its_xml_body_as_insert_document_does(
    stack: Stack, body: bytes
) -> None:
    seen = all_recorded(stack)
    query = urlencode([("meetingID", "xml-room"), ("name", "XML room")])
    url = f"{stack.api()}/create?{query}&checksum={sign('create', query)}"
    response = await stack.http.post(url, content=body, headers=XML)
    assert key(response) == "validationError"
    assert stack.gateway.ledger.get(("acme", "xml-room")) is None
    assert calls(seen, "create") == []


@pytest.mark.parametrize("body", DOCTYPE_BODIES)
async def test_insert_document_refuses_a_doctype(stack: Stack, body: bytes) -> None:
    seen = all_recorded(stack)
    await stack.create("doc-room")
    query = "meetingID=doc-room"
    url = f"{stack.api()}/insertDocument?{query}&checksum={sign('insertDocument', query)}"
    response = await stack.http.post(url, content=body, headers=XML)
    assert key(response) == "validationError"
    assert calls(seen, "insertDocument") == []


async def test_xml_bodies_reach_the_backend_as_the_tree_that_was_checked(stack: Stack) -> None:
    seen = all_recorded(stack)
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<?bbb ignored?><!-- a comment -->'
        b'<modules><module name="presentation"><document url="https://x.test/a.pdf?a=1&amp;b=2"'
        b' filename="caf\xc3\xa9.pdf"/></module><module name="clientSettingsOverride">'
        b'<![CDATA[{"public": {"app": {"x": "<y>"}}}]]></module></modules>'
    )
    query = urlencode([("meetingID", "slides"), ("name", "Slides room")])
    url = f"{stack.api()}/create?{query}&checksum={sign('create', query)}"
    response = await stack.http.post(url, content=body, headers={"Content-Type": "text/xml"})
    assert returncode(response) == "SUCCESS"
    (sent,) = calls(seen, "create")
    assert sent.content_type == "text/xml"
    assert sent.body.startswith(b"<modules>")
    assert b"<?" not in sent.body and b"<!DOCTYPE" not in sent.body
    forwarded = etree.fromstring(sent.body)
    assert forwarded.find("module/document").get("filename") == "café.pdf"  # type: ignore[union-attr]
    assert forwarded.find("module/document").get("url") == "https://x.test/a.pdf?a=1&b=2"  # type: ignore[union-attr]
    assert b'<![CDATA[{"public": {"app": {"x": "<y>"}}}]]>' in sent.body


# -- 4. integers from a customer -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("maxParticipants", "²"),
        ("duration", "١٢"),
        ("maxParticipants", "9" * 5000),
        ("duration", "1_0"),
    ],
)
async def test_odd_integers_are_a_validation_error(stack: Stack, name: str, value: str) -> None:
    root = await stack.create("numbers", **{name: value})
    assert text(root, "returncode") == "FAILED"
    assert text(root, "messageKey") == "validationError"
    assert stack.gateway.ledger.get(("acme", "numbers")) is None


def test_integer_reads_ascii_digits_only() -> None:
    customer = Customer("acme", ("s",), 10, 5, 30)

    def integer(value: str) -> int | None:
        return ApiRequest(customer, "create", [("n", value)]).integer("n")

    assert integer(" 12 ") == 12
    assert integer("-1") == -1
    assert integer("") is None
    assert integer("999999999") == 999999999
    for bad in ["²", "١٢", "1_0", "+5", "1e3", "0x10", "1234567890", "--1", "9" * 5000]:
        with pytest.raises(ValidationError) as caught:
            integer(bad)
        assert caught.value.message == "Parameter n must be an integer"


# -- 5. /metrics behind a bearer token -----------------------------------------------------------


async def test_metrics_can_require_a_bearer_token(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(proxy={"metrics_token": "scrape-me"})
    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    metrics = f"{stack.url}/metrics"
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-me"}]:
        refused = await stack.http.get(metrics, headers=headers)
        assert refused.status_code == 401
        assert "acme" not in refused.text
    good = await stack.http.get(metrics, headers={"Authorization": "Bearer scrape-me"})
    assert good.status_code == 200
    assert 'bbb_proxy_customer_connections{customer="acme"}' in good.text
    assert (b"scrape-me", b"scrape-me") in compared  # compared in constant time


async def test_metrics_are_open_without_a_token(stack: Stack) -> None:
    response = await stack.http.get(f"{stack.url}/metrics")
    assert response.status_code == 200
    assert "bbb_proxy_requests_total" in response.text


# -- unit checks of the checksum rule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "signed"),
    [
        ("a=1&checksum=C&b=2", "a=1&b=2"),
        ("checksum=C&a=1", "a=1"),
        ("a=1&checksum=C", "a=1"),
        ("&checksum=C", ""),
        ("checksum=C", ""),
        ("a=1", "a=1"),
    ],
)
def test_split_checksum_agrees_with_bbb_web(query: str, signed: str) -> None:
    split = checksum.split_checksum(query)
    assert split is not None and split.signed == signed
    if split.checksum is not None:
        assert checksum.strip_checksum(query, split.checksum) == signed


@pytest.mark.parametrize(
    "query",
    [
        "a=1&checksum=C&checksum=C",
        "a=xchecksum=C&checksum=C",
        "a=1&checksum=C&checks%75m=D",
        "checksum&checksum=C",
        "a=checksum=C",
        "Xchecksum=C",
    ],
)
def test_split_checksum_refuses_ambiguous_queries(query: str) -> None:
    assert checksum.split_checksum(query) is None


def test_signed_params_are_only_what_the_checksum_covers() -> None:
    secrets = [SECRET]
    query = "meetingID=m&name=Room"
    signed_url = f"{query}&checksum={sign('create', query)}"
    assert checksum.signed_params("create", signed_url, secrets) == [
        ("meetingID", "m"),
        ("name", "Room"),
    ]
    assert checksum.signed_params("create", signed_url, secrets, [("record", "true")]) is None
    body = [("meetingID", "m"), ("name", "Room")]
    empty = f"checksum={sign('create', '')}"
    assert checksum.signed_params("create", empty, secrets, body) == body
    # a checksum in the URL and another in the body: refused
    twice = [*body, ("checksum", sign("create", canonical(body)))]
    assert checksum.signed_params("create", empty, secrets, twice) is None
    assert checksum.signed_params("create", "", secrets, twice) == body


def test_canonical_form_sorts_by_name_only() -> None:
    # Repeated names keep the order they were sent in (a stable sort on the name).
    assert checksum.canonical_query([("b", "1"), ("a", "2"), ("a", "1")]) == "a=2&a=1&b=1"


def test_signed_params_edge_cases() -> None:
    secrets = [SECRET]
    # No parameters at all (getMeetings): signed, and nothing to pass on.
    assert (
        checksum.signed_params("getMeetings", f"checksum={sign('getMeetings', '')}", secrets) == []
    )
    assert (
        checksum.signed_params("getMeetings", f"&checksum={sign('getMeetings', '')}", secrets) == []
    )
    # Blank values are parameters too.
    cs = sign("create", "meetingID=m&welcome=")
    assert checksum.signed_params("create", f"meetingID=m&welcome=&checksum={cs}", secrets) == [
        ("meetingID", "m"),
        ("welcome", ""),
    ]
    # Control characters are dropped before checking, and from the parameters too.
    cs = sign("end", "meetingID=room-1")
    assert checksum.signed_params("end", f"meeting\nID=room-1\t&checksum={cs}", secrets) == [
        ("meetingID", "room-1")
    ]
    # An empty checksum, a wrong secret, a second checksum in the body: refused.
    assert checksum.signed_params("end", "meetingID=room-1&checksum=", secrets) is None
    assert checksum.signed_params("end", f"meetingID=room-1&checksum={cs}", ["other"]) is None
    body = [("meetingID", "m"), ("name", "Room")]
    cs = sign("create", canonical(body))
    two = [*body, ("checksum", cs), ("checksum", cs)]
    assert checksum.signed_params("create", "", secrets, two) is None
    # The canonical form may cover URL parameters too: all of them are then signed.
    url_cs = sign("create", canonical([("meetingID", "m"), ("name", "Room")]))
    assert checksum.signed_params(
        "create", f"meetingID=m&checksum={url_cs}", secrets, [("name", "Room")]
    ) == [("meetingID", "m"), ("name", "Room")]
    # Without any checksum: refused, whatever the body holds.
    assert checksum.signed_params("create", "meetingID=m", secrets, body) is None


# -- unit checks of proxy.bbb.bodies -------------------------------------------------------------


def test_media_type() -> None:
    assert bodies.media_type("Text/XML; charset=utf-8") == "text/xml"
    assert bodies.media_type(None) == ""
    assert bodies.media_type(" application/x-www-form-urlencoded ") == bodies.FORM


MESSAGES = {
    "unsupportedContentType": "POST request Content-Type is missing or unsupported",
    "too many": "The request body has too many parameters",
    "multipart": "The multipart body could not be parsed",
    "xml": "The XML body could not be parsed",
}


def _refused(fn: Callable[[], object], message: str | None = None) -> str:
    with pytest.raises(ValidationError) as caught:
        fn()
    if message is not None:
        assert caught.value.message == MESSAGES[message]
    return caught.value.message_key


def test_parse_reads_each_body_type() -> None:
    for content_type in [None, "", "text/plain", bodies.FORM, "application/xml"]:
        assert bodies.parse(content_type, b"") == bodies.Body()
    form = bodies.parse(bodies.FORM + "; charset=UTF-8", b"a=1+2&b=&c=%C3%A9&a=3")
    assert form == bodies.Body((("a", "1 2"), ("b", ""), ("c", "é"), ("a", "3")), None, bodies.FORM)
    xml = bodies.parse("Text/Xml", b"<modules/>")
    assert xml == bodies.Body((), b"<modules/>", "text/xml")
    fields = multipart([("meetingID", "room 1"), ("name", "Café")])
    parsed = bodies.parse(MULTIPART["Content-Type"], fields)
    assert parsed == bodies.Body(
        (("meetingID", "room 1"), ("name", "Café")), None, bodies.MULTIPART
    )
    for content_type in [None, "text/plain", "application/json", "multipartform-data"]:
        refused = partial(bodies.parse, content_type, b"a=1")
        assert _refused(refused, "unsupportedContentType") == "unsupportedContentType"


def test_form_bodies_are_bounded() -> None:
    many = "&".join(f"p{i}=1" for i in range(bodies.MAX_FIELDS)).encode()
    assert len(bodies.form_params(many)) == bodies.MAX_FIELDS
    assert (
        _refused(lambda: bodies.form_params(many + b"&one=more"), "too many") == "validationError"
    )
    assert bodies.form_params(b"\xff=\xfe") == (("\ufffd", "\ufffd"),)


def test_multipart_bodies() -> None:
    ct = MULTIPART["Content-Type"]
    assert bodies.multipart_params(ct, b"--BOUNDARY--\r\n") == ()
    assert bodies.multipart_params(ct, multipart([("a", "x" * 70000)])) == (("a", "x" * 70000),)
    raw = b'--BOUNDARY\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\r\n--BOUNDARY--\r\n'
    assert bodies.multipart_params(ct, raw) == (("a", "\ufffd"),)
    assert _refused(lambda: bodies.multipart_params("multipart/form-data", b"x")) == (
        "unsupportedContentType"
    )
    no_ascii = 'multipart/form-data; boundary="Bé"'
    assert _refused(lambda: bodies.multipart_params(no_ascii, b"x")) == "unsupportedContentType"
    with_file = multipart([("a", "1")], ("file", b"%PDF"))
    assert _refused(lambda: bodies.multipart_params(ct, with_file)) == "unsupportedContentType"
    for broken in [
        multipart([("a", "1")])[:-10],  # no closing boundary
        b"--BOUNDARY\r\nX-Other: 1\r\n\r\nvalue\r\n--BOUNDARY--\r\n",  # no Content-Disposition
        b"garbage",
        b"--BOUNDARY\r\nContent-Disposition: form-data; name=\xff\r\n\r\nv\r\n--BOUNDARY--\r\n",
    ]:
        assert _refused(partial(bodies.multipart_params, ct, broken), "multipart") == (
            "validationError"
        )
    for nameless in [b"form-data", b'form-data; name="\r"', b"form-data; filename=x"]:
        part = b"--BOUNDARY\r\nContent-Disposition: " + nameless + b"\r\n\r\nv\r\n--BOUNDARY--\r\n"
        with pytest.raises(ValidationError) as caught:
            bodies.multipart_params(ct, part)
        assert caught.value.message_key in ("validationError", "unsupportedContentType")
    unnamed = b"--BOUNDARY\r\nContent-Disposition: form-data\r\n\r\nv\r\n--BOUNDARY--\r\n"
    with pytest.raises(ValidationError) as caught:
        bodies.multipart_params(ct, unnamed)
    assert caught.value.message == "A multipart field has no name"
    too_many = multipart([(f"p{i}", "1") for i in range(bodies.MAX_FIELDS + 1)])
    assert _refused(lambda: bodies.multipart_params(ct, too_many)) == "validationError"


def test_checked_xml() -> None:
    def checked(call: str, data: bytes) -> bytes | None:
        return bodies.checked_xml(call, bodies.parse("application/xml", data))

    assert bodies.checked_xml("create", bodies.Body()) is None
    assert checked("insertDocument", b"<?xml version='1.0'?>\n<modules >\n</modules>") == (
        b"<modules>\n</modules>"
    )
    assert checked("create", '<modules a="é"/>'.encode()) == b'<modules a="&#233;"/>'
    cdata = b'<modules><module name="settings"><![CDATA[{"a": "<b>"}]]></module></modules>'
    assert checked("create", cdata) == cdata  # CDATA kept as sent
    with pytest.raises(ValidationError) as caught:
        checked("create", b"<other/>")
    assert caught.value.message == "The XML body must be a <modules> document"
    assert _refused(lambda: checked("end", b"<modules/>")) == "unsupportedContentType"
    for bad in [
        *DOCTYPE_BODIES,
        b"<modules>",
        b"<other/>",
        b"",
        b"\xff",
        b"<modules>&x;</modules>",
    ]:
        data = bad or b" "
        assert _refused(partial(checked, "create", data)) == "validationError"
    deep = b"<modules>" + b"<a>" * 300 + b"</a>" * 300 + b"</modules>"
    assert _refused(lambda: checked("create", deep), "xml") == "validationError"
    message = ""
    try:
        checked("create", b"<!DOCTYPE modules><modules/>")
    except ValidationError as error:
        message = error.message
    assert message == "The XML body must not have a DOCTYPE"


# -- unit checks of the dispatcher's and the answer's small pieces -------------------------------


def test_result_labels() -> None:
    failed = Answer.xml(envelope.failure("notFound", "gone"))
    assert calls_module.result_of(failed) == "notFound"
    assert calls_module.result_of(Answer.xml(envelope.success([("running", False)]))) == "success"
    bare = Answer.xml("<response><returncode>FAILED</returncode></response>")
    assert calls_module.result_of(bare) == "failed"
    empty = "<response><returncode>FAILED</returncode><messageKey></messageKey></response>"
    assert calls_module.result_of(Answer.xml(empty)) == "failed"
    assert calls_module.result_of(Answer.json(b'{"returncode": "FAILED"}')) == "success"
    assert calls_module.result_of(Answer.redirect("http://x/")) == "success"


def test_version_document() -> None:
    assert calls_module.version_document().body == (
        "<response><returncode>SUCCESS</returncode><version>2.0</version>"
        "<apiVersion>2.0</apiVersion><bbbVersion></bbbVersion></response>"
    )


def test_answer_constructors() -> None:
    redirect = Answer.redirect("http://x/?a=1")
    assert (redirect.body, redirect.status) == ("", 302)
    assert dict(redirect.headers) == {"Location": "http://x/?a=1", "Cache-Control": "no-cache"}
    json = Answer.json(b"{}")
    assert (json.body, json.status) == (b"{}", 200)
    assert dict(json.headers) == {"Content-Type": "application/json", "Cache-Control": "no-cache"}
    xml = Answer.xml("<response/>")
    assert (xml.body, xml.status, dict(xml.headers)) == ("<response/>", 200, envelope.HEADERS)


def test_meeting_id_is_checked_as_bbb_web_checks_it() -> None:
    customer = Customer("acme", ("s",), 10, 5, 30)

    def meeting_id(*params: tuple[str, str]) -> str:
        return ApiRequest(customer, "create", list(params)).meeting_id()

    assert meeting_id(("meetingID", " ab "), ("meetingID", "other")) == "ab"
    assert meeting_id(("meetingID", "x" * 256)) == "x" * 256
    cases = [
        ((), "missingParamMeetingID", "You must provide a meeting ID"),
        ((("meetingID", "  "),), "missingParamMeetingID", "You must provide a meeting ID"),
        (
            (("meetingID", "a"),),
            "validationError",
            "Meeting ID must be between 2 and 256 characters",
        ),
        (
            (("meetingID", "x" * 257),),
            "validationError",
            "Meeting ID must be between 2 and 256 characters",
        ),
        ((("meetingID", "a,b"),), "validationError", "Meeting ID cannot contain ','"),
    ]
    for params, key, message in cases:
        with pytest.raises(ValidationError) as caught:
            meeting_id(*params)
        assert (caught.value.message_key, caught.value.message) == (key, message)


async def test_a_streamed_answer_reads_whole() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"<response>"
        yield b"</response>"

    streamed = Answer.stream(chunks())
    whole = await streamed.buffered()
    assert (whole.body, whole.status, whole.headers) == (
        b"<response></response>",
        200,
        streamed.headers,
    )
    assert await whole.buffered() is whole


async def test_a_backend_failure_is_logged_with_the_call(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.create("logged")
    sim, _ = stack.backend_meeting("acme", "logged")
    sim.behaviour.mode = "http500"
    root = await stack.call("getMeetingInfo", [("meetingID", "logged")])
    assert text(root, "messageKey") == "internalError"
    assert any(
        r.getMessage().startswith("getMeetingInfo failed: BackendBadResponse(bbb-")
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


async def test_the_query_limit_is_inclusive(make_stack: StackFactory) -> None:
    query = urlencode([("meetingID", "sized"), ("pad", "x" * 100)])
    signed = f"{query}&checksum={sign('getMeetingInfo', query)}"
    stack = await make_stack(proxy={"max_query_bytes": len(signed)})
    at_limit = await stack.http.get(f"{stack.api()}/getMeetingInfo?{signed}")
    assert key(at_limit) == "notFound"  # verified and served: the meeting does not exist
    over = await stack.http.get(f"{stack.api()}/getMeetingInfo?{signed}&")
    assert key(over) == "validationError"
    assert text(etree.fromstring(over.content), "message") == "The request is too large"
