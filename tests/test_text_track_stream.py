"""putRecordingTextTrack's upload is streamed to the backend over real sockets: a client
trickling its file is forwarded as it comes (the backend has the first bytes while the
client still holds the rest), the size limit is enforced while streaming (the backend's
request is aborted, never completed), a slow client is cut off, fields in the body are
verified before the file goes on, and the memory an upload takes does not grow with the
file (tracemalloc's peak for 1 MiB against 3 MiB)."""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from proxy.backends import http
from proxy.bbb import checksum
from proxy.config import Timeouts
from proxy.simulator import Simulator
from proxy.simulator.app import create_app
from tests.harness import BACKEND_SECRET, SECRETS, _serve, config_for, free_port
from tests.test_recordings import seed

BOUNDARY = "TrackBoundary42"
HEAD = (
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="file"; filename="de.vtt"\r\n'
    "Content-Type: text/vtt\r\n\r\n"
).encode()
TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
TRACK = [("kind", "subtitles"), ("lang", "de-DE"), ("label", "Deutsch")]


@dataclass
class Watched:
    """A simulated BBB behind an ASGI layer that watches putRecordingTextTrack's body."""

    sim: Simulator
    swallow: bool = False  # answer uploads itself, counting and dropping their bytes
    received: int = 0  # body bytes of uploads seen so far
    completed: int = 0  # uploads whose body arrived whole
    aborted: int = 0  # uploads whose client went away mid-body
    first_bytes: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/putRecordingTextTrack"):
            return await create_app(self.sim)(scope, receive, send)
        # The body is watched as it comes and handed to the simulated BBB only once whole
        # (an aborted upload never reaches it), or counted and dropped (swallow).
        kept: list[Any] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.aborted += 1
                return None
            self.received += len(message.get("body", b""))
            if self.received:
                self.first_bytes.set()
            if not self.swallow:
                kept.append(message)
            if not message.get("more_body"):
                break
        self.completed += 1
        if not self.swallow:

            async def replayed() -> Any:
                return kept.pop(0) if kept else await receive()

            return await create_app(self.sim)(scope, replayed, send)
        body = {"response": {"returncode": "SUCCESS", "messageKey": "upload_text_track_success"}}
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        return None


@dataclass
class Setup:
    url: str  # the gateway
    backend: Watched
    record_id: str
    http: httpx.AsyncClient

    def signed(self, params: list[tuple[str, str]]) -> str:
        query = checksum.signed_query("putRecordingTextTrack", params, SECRETS["acme"])
        return f"{self.url}/acme/bigbluebutton/api/putRecordingTextTrack?{query}"

    def url_for(self) -> str:
        return self.signed([("recordID", self.record_id), *TRACK])


@asynccontextmanager
async def start(
    nursery: trio.Nursery, tmp_path: Path, *, swallow: bool = False, **proxy: Any
) -> AsyncIterator[Setup]:
    sim = Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)
    (recording,) = seed(sim, "acme", "room", 1)
    backend = Watched(sim, swallow)
    hyper = HypercornConfig()
    hyper.bind = ["127.0.0.1:0"]
    hyper.accesslog = None
    app: Any = backend
    binds = await nursery.start(partial(serve, app, hyper, mode="asgi"))
    port = free_port()
    own = {"state_dir": str(tmp_path), "bind": f"127.0.0.1:{port}"}
    own["public_url"] = f"http://127.0.0.1:{port}"
    config = config_for([f"{binds[0]}/bigbluebutton/api"], proxy=own | proxy)
    _, gateway = await nursery.start(_serve, config, None)
    async with httpx.AsyncClient(timeout=30) as client:
        yield Setup(gateway[0], backend, recording.record_id, client)


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    async with start(nursery, tmp_path) as ready:
        yield ready


def answer(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()["response"]
    return body


async def trickled(parts: list[bytes], between: trio.Event) -> AsyncIterator[bytes]:
    """The body in two halves: the second only once ``between`` is set."""
    yield parts[0]
    with trio.fail_after(10):  # a gateway that buffers the upload never sets it
        await between.wait()
    yield parts[1]


async def test_a_trickled_upload_is_forwarded_as_it_comes(setup: Setup) -> None:
    first, rest = b"WEBVTT\n\n00:00.000 --> 00:01.000\nHallo\n", b"\n" + b"x" * 5000
    parts = [HEAD + first, rest + TAIL]
    size = sum(map(len, parts))
    response = await setup.http.post(
        setup.url_for(),
        content=trickled(parts, setup.backend.first_bytes),
        headers={"Content-Type": CONTENT_TYPE, "Content-Length": str(size)},
    )
    body = answer(response)
    assert body["messageKey"] == "upload_text_track_success", body
    # the backend had bytes while the client held back the rest (else fail_after fired)
    assert setup.backend.first_bytes.is_set()
    assert setup.backend.sim.recordings.uploads == [
        (setup.record_id, "subtitles", "de-DE", first + rest)
    ]
    assert setup.backend.completed == 1


async def test_a_chunked_upload_is_forwarded_too(setup: Setup) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield HEAD
        for _ in range(20):
            yield b"y" * 1000
        yield TAIL

    response = await setup.http.post(
        setup.url_for(), content=pieces(), headers={"Content-Type": CONTENT_TYPE}
    )
    assert answer(response)["messageKey"] == "upload_text_track_success"
    assert setup.backend.sim.recordings.uploads[0][3] == b"y" * 20_000


async def test_over_the_limit_while_streaming_aborts_the_backend_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with start(nursery, tmp_path, max_text_track_bytes=4000) as ready:
        # no Content-Length: the web layer cannot refuse it before reading
        parts = [HEAD + b"a" * 3000, b"b" * 2000 + TAIL]
        response = await ready.http.post(
            ready.url_for(),
            content=trickled(parts, ready.backend.first_bytes),
            headers={"Content-Type": CONTENT_TYPE},
        )
        body = answer(response)
        assert (body["returncode"], body["messageKey"]) == ("FAILED", "upload_text_track_failed")
        assert body["message"] == "Text track upload failed: larger than 4000 bytes."
        assert ready.backend.first_bytes.is_set()  # it was streaming when the limit hit
        with trio.fail_after(5):
            while not ready.backend.aborted:  # noqa: ASYNC110 - the backend's own state
                await trio.sleep(0.01)
        assert ready.backend.completed == 0
        assert ready.backend.sim.recordings.uploads == []
        assert ready.backend.sim.requests[-1][0] != "putRecordingTextTrack"


async def test_a_client_too_slow_is_cut_off(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A client trickling its file a byte at a time (never silent long enough for
    hypercorn's read timeout): once waiting for it took ``client_read`` in all, it is
    answered BBB's JSON error and the backend's half-sent request is aborted."""
    async with start(nursery, tmp_path, timeouts={"client_read": 0.5}) as ready:
        url = httpx.URL(ready.url_for())
        client = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", url.netloc.decode()),
            ("Content-Type", CONTENT_TYPE),
            ("Content-Length", str(len(HEAD) + 20_000)),
        ]
        request = h11.Request(method="POST", target=url.raw_path, headers=headers)
        stream = await trio.open_tcp_stream(url.host, url.port or 80)
        await stream.send_all((client.send(request) or b"") + HEAD + b"c" * 100)
        events: list[Any] = []

        async def trickle(cancel: trio.CancelScope) -> None:
            with cancel:
                for _ in range(10_000):
                    await stream.send_all(b"c")
                    await trio.sleep(0.05)

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                trickling = trio.CancelScope()
                inner.start_soon(trickle, trickling)
                while not any(isinstance(e, h11.EndOfMessage) for e in events):
                    client.receive_data(await stream.receive_some(65536))
                    while (event := client.next_event()) is not h11.NEED_DATA:
                        events.append(event)
                        if isinstance(event, h11.EndOfMessage):
                            break
                trickling.cancel()
        await stream.aclose()
        body = json.loads(b"".join(e.data for e in events if isinstance(e, h11.Data)))
        assert body["response"]["messageKey"] == "validationError"
        assert body["response"]["message"] == "The request body did not arrive in time"
        with trio.fail_after(5):
            while not ready.backend.aborted:  # noqa: ASYNC110 - the backend's own state
                await trio.sleep(0.01)
        assert ready.backend.received > 0  # the start of the file was on its way
        assert ready.backend.completed == 0
        assert ready.backend.sim.recordings.uploads == []


def multipart(
    before: list[tuple[str, str]],
    file: bytes,
    after: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> bytes:
    def texts(fields: list[tuple[str, str]]) -> bytes:
        return b"".join(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields
        )

    return texts(before) + HEAD + file + b"\r\n" + texts(after) + f"--{BOUNDARY}--\r\n".encode()


def body_signed(setup: Setup, fields: list[tuple[str, str]]) -> str:
    """A URL whose checksum is over the body's fields (bbb-web 2.5-2.7's canonical form)."""
    signed = checksum.canonical_query(fields)
    digest = checksum.compute("putRecordingTextTrack", signed, SECRETS["acme"])
    return f"{setup.url}/acme/bigbluebutton/api/putRecordingTextTrack?checksum={digest}"


async def test_fields_in_the_body_are_verified_before_the_file(setup: Setup) -> None:
    fields = [("recordID", setup.record_id), *TRACK]
    response = await setup.http.post(
        body_signed(setup, fields),
        content=multipart(fields, b"WEBVTT\n"),
        headers={"Content-Type": CONTENT_TYPE},
    )
    assert answer(response)["messageKey"] == "upload_text_track_success"
    sent = setup.backend.received
    assert sent > 0
    forged = [("recordID", setup.record_id), ("kind", "captions"), *TRACK[1:]]
    response = await setup.http.post(
        body_signed(setup, fields),  # signed for subtitles, sent as captions
        content=multipart(forged, b"WEBVTT\n"),
        headers={"Content-Type": CONTENT_TYPE},
    )
    assert answer(response)["messageKey"] == "checksumError"
    assert setup.backend.received == sent  # nothing of it went to the backend
    assert [u[1] for u in setup.backend.sim.recordings.uploads] == ["subtitles"]


async def test_a_field_after_the_file_aborts_the_upload(setup: Setup) -> None:
    """The checksum was verified over the fields before the file; one after it could not
    be, so the upload is refused once it shows, and the backend's request is aborted."""
    fields = [("recordID", setup.record_id), *TRACK]
    response = await setup.http.post(
        body_signed(setup, fields),
        content=multipart(fields, b"WEBVTT\n" * 100, after=[("kind", "captions")]),
        headers={"Content-Type": CONTENT_TYPE},
    )
    assert answer(response)["messageKey"] == "checksumError"
    with trio.fail_after(5):
        await setup.backend.first_bytes.wait()  # the file was on its way (the backend may
        while not setup.backend.aborted:  # read it only after the client has its answer)  # noqa: ASYNC110 - the backend's own state
            await trio.sleep(0.01)
    assert setup.backend.completed == 0
    assert setup.backend.sim.recordings.uploads == []


async def test_body_fields_beside_a_signed_query_are_checksum_error(setup: Setup) -> None:
    response = await setup.http.post(
        setup.url_for(),
        content=multipart([("kind", "captions")], b"WEBVTT\n"),
        headers={"Content-Type": CONTENT_TYPE},
    )
    assert answer(response)["messageKey"] == "checksumError"
    assert setup.backend.received == 0  # refused before anything went to the backend


async def test_an_early_error_still_reaches_a_client_sending_a_big_body(setup: Setup) -> None:
    """bbb-web reads a body whole before answering: the gateway drops the rest of it, so
    a client that sends its whole body before reading (as most do) gets the answer."""
    big = HEAD + b"z" * (2 * 1024 * 1024) + TAIL
    for _ in range(3):  # a reset connection would lose the answer now and then
        response = await setup.http.post(
            setup.url_for().replace("checksum=", "checksum=0"),
            content=big,
            headers={"Content-Type": CONTENT_TYPE},
        )
        assert answer(response)["messageKey"] == "checksumError"
    assert setup.backend.received == 0


async def test_memory_per_upload_does_not_grow_with_the_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """tracemalloc's peak over one upload (gateway, backend and client in this process):
    3 MiB take about what 1 MiB take; a gateway holding the file would take three times."""
    block = b"v" * 65536

    async def body(size: int) -> AsyncIterator[bytes]:
        yield HEAD
        for _ in range(size // len(block)):
            yield block
        yield TAIL

    async with start(nursery, tmp_path, swallow=True) as ready:

        async def peak(size: int) -> int:
            gc.collect()
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            response = await ready.http.post(
                ready.url_for(), content=body(size), headers={"Content-Type": CONTENT_TYPE}
            )
            assert answer(response)["messageKey"] == "upload_text_track_success"
            return tracemalloc.get_traced_memory()[1] - before

        mib = 1024 * 1024
        tracemalloc.start()
        try:
            await peak(mib)  # warm: connections, caches
            small, large = await peak(mib), await peak(3 * mib)
        finally:
            tracemalloc.stop()
        assert ready.backend.completed == 3
        assert ready.backend.received >= 5 * mib
        print(f"peak per upload: 1 MiB {small / mib:.2f} MiB, 3 MiB {large / mib:.2f} MiB")
        assert large < 1.5 * small, (small, large)
        assert large < 3 * mib, large  # less than the file itself


# -- the backend client's streamed request body ---------------------------------------------


async def test_pool_streams_a_body_chunked_and_aborts_on_error(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []

    async def endpoint(stream: trio.SocketStream) -> None:
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
            if b"0\r\n\r\n" in data:
                # One request per connection, and it says so: the pool must not reuse it.
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                )
                break
        seen.append(data)

    listeners = await nursery.start(partial(trio.serve_tcp, endpoint, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    pool = http.Pool(f"http://127.0.0.1:{port}", Timeouts(), 2)

    async def pieces(fail: bool) -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        if fail:
            raise ValueError("the customer's body broke")
        yield b"defg"

    answered = await pool.request("POST", "/x", pieces(False), "text/plain")
    assert (answered.status, answered.body) == (200, b"ok")
    with pytest.raises(ValueError, match="body broke"):
        await pool.request("POST", "/x", pieces(True), "text/plain")
    with trio.fail_after(5):
        while len(seen) < 2:  # noqa: ASYNC110 - the endpoint's own state
            await trio.sleep(0.01)
    head, _, chunks = seen[0].partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert chunks == b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    assert seen[1].endswith(b"3\r\nabc\r\n")  # cut off: never a whole request
    await pool.aclose()
