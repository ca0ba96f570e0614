"""Calls to customers' URLs: what is refused, and every failure path, over real sockets."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from proxy.backends.outbound import call_customer_url, checked_address, is_public
from proxy.bbb.customer_urls import MAX_URL_CHARS, OUTCOMES, port_of, problem

type Answerer = Callable[[trio.SocketStream, bytes], Awaitable[None]]

# The customer URLs the issue found ending the process, and their kin.
BAD_URLS = [
    "http://127.0.0.1:99999/x",  # port above 65535
    "http://127.0.0.1:0/x",
    "http://127.0.0.1:abc/x",
    "http://a..example/x",  # empty IDNA label
    "http://" + "a" * 64 + ".example/x",  # over-long label
    "http://" + "a." * 127 + "example/x",  # over-long name
    "http://127.0.0.1/a\x01b",  # non-printable in the path
    "http://127.0.0.1/x\r\nHost: evil",
    "http://\u2603\u00ad..test/",
    "http://[::1/x",
    "http:///no-host",
    "http://127.0.0.1/" + "x" * 3000,
]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("::", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("fec0::1", False),  # site-local (deprecated, still routed inside some networks)
        ("feff::1", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8: how DNS64 networks reach the world
        ("64:ff9b:1::808:808", False),  # local-use NAT64 (RFC 8215)
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::10.0.0.1", False),
        ("::8.8.8.8", True),
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("ff02::1", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(address) is public


@pytest.mark.parametrize("url", BAD_URLS)
def test_uncallable_urls_have_a_reason(url: str) -> None:
    assert problem(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://lms.example.org/mod/bigbluebuttonbn/bbb_broker.php?action=meeting_events",
        "http://lms.example.org:8080/ended?a=1&b=2",
        "http://[2001:db8::1]:8080/x",
        "http://exa_mple.test/x",
        "https://b\u00fccher.example/ended",  # IDNA
        "http://127.0.0.1/path with space",
    ],
)
def test_ordinary_urls_pass(url: str) -> None:
    assert problem(url) is None


# -- over real sockets -------------------------------------------------------------------------


class Site:
    """A customer's web server on loopback: records each request head, answers as told."""

    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.url = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
        self.heads.append(head)
        await self.answer(stream, head)


async def start_site(nursery: trio.Nursery, answer: Answerer) -> Site:
    site = Site(answer)
    listeners = await nursery.start(partial(trio.serve_tcp, site.handle, 0, host="127.0.0.1"))
    site.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return site


async def ok(stream: trio.SocketStream, head: bytes) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=0.5, follow_redirects=False) as client:
        yield client


async def test_a_public_or_allowed_url_is_called_with_its_host(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    site = await start_site(nursery, ok)
    before = OUTCOMES["ok"]
    assert await call_customer_url(http, site.url + "/ended?m=1", allow_private=True)
    [head] = site.heads
    assert head.startswith(b"GET /ended?m=1 HTTP/1.1\r\n")
    assert f"host: {site.url.removeprefix('http://')}".encode() in head.lower()
    assert OUTCOMES["ok"] == before + 1


@pytest.mark.parametrize("url", BAD_URLS)
async def test_bad_urls_never_raise(
    url: str, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    before = OUTCOMES["invalid"]
    with caplog.at_level(logging.WARNING):
        assert await call_customer_url(http, url, allow_private=True) is False
    assert OUTCOMES["invalid"] == before + 1
    assert "not calling" in caplog.text
    assert "\r\n" not in caplog.records[-1].getMessage()  # no forged log line


async def test_private_address_refused(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    site = await start_site(nursery, ok)
    before = OUTCOMES["refused"]
    assert await call_customer_url(http, site.url + "/x", allow_private=False) is False
    assert site.heads == []
    assert OUTCOMES["refused"] == before + 1


async def test_not_http_and_unresolvable(http: httpx.AsyncClient) -> None:
    assert await call_customer_url(http, "ftp://127.0.0.1/x", allow_private=True) is False
    assert await call_customer_url(http, "file:///etc/passwd", allow_private=True) is False
    before = OUTCOMES["refused"]
    url = "http://no-such-host.invalid/x"
    assert await call_customer_url(http, url, allow_private=True) is False
    assert OUTCOMES["refused"] == before + 1
    assert await checked_address("no-such-host.invalid", 80, allow_private=True) is None
    assert await checked_address("localhost", 80, allow_private=False) is None


async def test_redirects_are_not_followed(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    inside = await start_site(nursery, ok)

    async def redirect(stream: trio.SocketStream, head: bytes) -> None:
        location = f"Location: {inside.url}/admin\r\n".encode()
        await stream.send_all(b"HTTP/1.1 302 Found\r\n" + location + b"Content-Length: 0\r\n\r\n")

    outside = await start_site(nursery, redirect)
    before = OUTCOMES["failed"]
    assert await call_customer_url(http, outside.url + "/ended", allow_private=True) is False
    assert len(outside.heads) == 1
    assert inside.heads == []
    assert OUTCOMES["failed"] == before + 1


async def test_timeouts_errors_and_refused_connections(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    async def hang(stream: trio.SocketStream, head: bytes) -> None:
        await trio.sleep_forever()

    async def garbage(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")

    async def error(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")

    before = OUTCOMES["failed"]
    for answer in (hang, garbage, error):
        site = await start_site(nursery, answer)
        with trio.fail_after(5):
            assert await call_customer_url(http, site.url + "/x", allow_private=True) is False
    assert await call_customer_url(http, "http://127.0.0.1:9/x", allow_private=True) is False
    assert OUTCOMES["failed"] == before + 4


async def test_an_unexpected_exception_in_the_http_client_is_caught(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug deep in the client, e.g. for ?checksum=s3cr3t")

    before = OUTCOMES["failed"]
    async with httpx.AsyncClient(transport=httpx.MockTransport(broken)) as client:
        url = "http://127.0.0.1:8/x?checksum=s3cr3t"
        with caplog.at_level(logging.WARNING):
            assert await call_customer_url(client, url, allow_private=True) is False
    assert OUTCOMES["failed"] == before + 1
    assert "callback http://127.0.0.1:8/x?checksum=*** failed: RuntimeError" in caplog.text


def test_limits_at_their_boundaries() -> None:
    base = "http://lms.test/"
    assert problem(base + "x" * (MAX_URL_CHARS - len(base))) is None
    assert problem(base + "x" * (MAX_URL_CHARS - len(base) + 1))
    assert problem(f"http://{'a' * 63}.test/") is None
    assert problem(f"http://{'a' * 64}.test/")
    host = ("a" * 62 + ".") * 4  # 252 characters with its trailing dot
    assert problem(f"http://{host[:-1]}b/") is None  # 252 + 1
    assert problem(f"http://{host}bc/")  # 254
    assert problem("http://lms.test.:8080/ended") is None  # a fully qualified name
    assert problem("http://lms.test:65535/") is None
    assert problem("http://lms.test:65536/")
    assert port_of(urlsplit("https://lms.test/")) == 443
    assert port_of(urlsplit("http://lms.test/")) == 80
    assert port_of(urlsplit("http://lms.test:8080/")) == 8080


async def test_the_request_goes_to_the_checked_address_named_as_the_customer_wrote_it() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
        assert await call_customer_url(client, "http://localhost/e?a=1", allow_private=True)
        assert await call_customer_url(client, "https://localhost:8443/c", allow_private=True)
        assert await call_customer_url(client, "http://[::1]:81/v6", allow_private=True)
    plain, tls, v6 = seen
    assert plain.headers["host"] == "localhost"
    assert plain.url.host in ("127.0.0.1", "::1") and plain.url.port in (80, None)
    assert (plain.url.path, plain.url.query) == ("/e", b"a=1")
    assert "sni_hostname" not in plain.extensions
    assert tls.headers["host"] == "localhost:8443"
    assert tls.extensions["sni_hostname"] == "localhost"
    assert tls.url.scheme == "https" and tls.url.port == 8443
    assert v6.headers["host"] == "[::1]:81"
