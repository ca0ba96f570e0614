"""Tests written to kill mutants of ``proxy.calls`` (the dispatcher, ``__init__``) and of
``proxy.calls.hooks`` that survived (docs/mutation.md).

On the module's functions where the difference lies in what no single request shows
(the customer looked for again after another instance's changes, the bound of the body
dropped after an answer), over real sockets where it is an answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest

from proxy import calls
from proxy.bbb import uploads as upload_rules
from proxy.config import Customer
from proxy.errors import StorageUnavailable
from proxy.gateway import Gateway
from tests.harness import Stack, StackFactory
from tests.test_recordings import seed
from tests.test_recordings_upload import track_params, upload
from tests.test_text_track_stream import CONTENT_TYPE, multipart

ACME = Customer("acme", ("s",), 10, 5, 30)


@dataclass
class Replica:
    """A runtime store's replica: shared or not, its refresh counted (and made to fail)."""

    shared: bool
    fails: bool = False
    refreshed: int = 0

    async def refresh(self) -> None:
        self.refreshed += 1
        if self.fails:
            raise StorageUnavailable("redis away")


@dataclass
class Directory:
    """Customers by id and by host; ``later`` become known once the replica refreshed."""

    replica: Replica | None
    known: dict[str, Customer] = field(default_factory=dict)
    later: dict[str, Customer] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)

    def _now(self) -> dict[str, Customer]:
        if self.replica is not None and self.replica.refreshed and not self.replica.fails:
            return self.known | self.later
        return self.known

    def customer(self, customer_id: str) -> Customer | None:
        self.asked.append(("id", customer_id))
        return self._now().get(customer_id)

    def customer_for_host(self, host: str) -> Customer | None:
        self.asked.append(("host", host))
        return self._now().get(host)


def gateway(directory: Directory) -> Gateway:
    runtime = None if directory.replica is None else SimpleNamespace(replica=directory.replica)
    fake = SimpleNamespace(
        runtime=runtime,
        customer=directory.customer,
        customer_for_host=directory.customer_for_host,
    )
    return cast(Gateway, fake)


def incoming(customer_id: str | None, host: str = "bbb.example.test") -> calls.Incoming:
    return calls.Incoming(customer_id, host, "getMeetings", "checksum=x")


async def test_a_known_customer_is_found_without_a_catch_up() -> None:
    directory = Directory(Replica(shared=True), known={"acme": ACME})
    assert await calls._customer(gateway(directory), incoming("acme")) is ACME
    assert directory.replica is not None and directory.replica.refreshed == 0
    assert directory.asked == [("id", "acme")]


async def test_an_unknown_customer_is_looked_for_again_after_a_shared_catch_up() -> None:
    directory = Directory(Replica(shared=True), later={"acme": ACME})
    assert await calls._customer(gateway(directory), incoming("acme")) is ACME
    assert directory.replica is not None and directory.replica.refreshed == 1
    assert directory.asked == [("id", "acme"), ("id", "acme")]


async def test_a_host_bound_customer_is_looked_for_again_by_host() -> None:
    directory = Directory(Replica(shared=True), later={"bbb.example.test": ACME})
    assert await calls._customer(gateway(directory), incoming(None)) is ACME
    assert directory.asked == [("host", "bbb.example.test"), ("host", "bbb.example.test")]


@pytest.mark.parametrize("replica", [None, Replica(shared=False)])
async def test_no_catch_up_without_a_shared_runtime_store(replica: Replica | None) -> None:
    directory = Directory(replica, later={"acme": ACME})
    assert await calls._customer(gateway(directory), incoming("acme")) is None
    assert replica is None or replica.refreshed == 0
    assert directory.asked == [("id", "acme")]


async def test_a_catch_up_that_fails_leaves_the_customer_unknown() -> None:
    replica = Replica(shared=True, fails=True)
    directory = Directory(replica, later={"acme": ACME})
    assert await calls._customer(gateway(directory), incoming("acme")) is None
    assert replica.refreshed == 1
    assert directory.asked == [("id", "acme"), ("id", "acme")]


def test_the_body_dropped_after_an_answer_is_bounded_by_the_upload_limit() -> None:
    fake: Any = SimpleNamespace(
        config=SimpleNamespace(proxy=SimpleNamespace(max_text_track_bytes=1000))
    )
    assert calls._upload_limit(fake) == 1000 + upload_rules.UPLOAD_OVERHEAD
    assert upload_rules.UPLOAD_OVERHEAD > 0


async def test_a_text_track_upload_without_a_body_is_an_empty_track(stack: Stack) -> None:
    """A GET holds no file: its (empty) body is read whole, as other calls' bodies are."""
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    response = await stack.http.get(
        stack.signed("putRecordingTextTrack", track_params(recording.record_id))
    )
    assert (response.status_code, response.headers["content-type"]) == (200, "application/json")
    assert response.json() == {
        "response": {
            "returncode": "FAILED",
            "messageKey": "empty_uploaded_text_track",
            "message": "Empty uploaded text track.",
        }
    }
    assert [sim.recordings.uploads for sim in stack.sims] == [[], []]


async def test_the_chunks_are_the_stream_or_the_held_body_once() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    held = calls.Incoming("acme", "h", "putRecordingTextTrack", "", body=b"whole")
    assert [chunk async for chunk in held.chunks()] == [b"whole"]
    empty = calls.Incoming("acme", "h", "putRecordingTextTrack", "")
    assert [chunk async for chunk in empty.chunks()] == []
    given = stream()
    streamed = calls.Incoming("acme", "h", "putRecordingTextTrack", "", stream=given)
    assert streamed.chunks() is given
    assert [chunk async for chunk in streamed.chunks()] == [b"a", b"b"]


async def test_an_upload_is_answered_once_its_body_is_read(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    (recording,) = seed(stack.sims[1], "acme", "room", 1)
    body = await upload(stack, track_params(recording.record_id), b"WEBVTT\n\n")
    assert (body["returncode"], body["messageKey"], body["recordId"]) == (
        "SUCCESS",
        "upload_text_track_success",
        recording.record_id,
    )
    assert [sim.recordings.uploads for sim in stack.sims] == [
        [],
        [(recording.record_id, "subtitles", "de-DE", b"WEBVTT\n\n")],
    ]


async def text_track_post(stack: Stack, url: str, body: bytes, content_type: str) -> Any:
    response = await stack.http.post(url, content=body, headers={"Content-Type": content_type})
    assert (response.status_code, response.headers["content-type"]) == (200, "application/json")
    return response.json()["response"]


async def test_a_big_body_field_beside_a_signed_query_is_refused_unread(stack: Stack) -> None:
    """The query verified with its parameters: a body field is a checksumError as soon as it
    shows, not read (a field over the fields' bound would otherwise be too large)."""
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    url = stack.signed("putRecordingTextTrack", track_params(recording.record_id))
    big = "x" * (upload_rules.UPLOAD_OVERHEAD + 1)
    body = multipart([("note", big)], b"WEBVTT\n")
    assert await text_track_post(stack, url, body, CONTENT_TYPE) == {
        "returncode": "FAILED",
        "messageKey": "checksumError",
        "message": "Checksums do not match",
    }
    assert [sim.recordings.uploads for sim in stack.sims] == [[], []]


async def test_a_body_that_is_not_multipart_is_read_whole_as_other_calls(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(proxy={"max_body_bytes": 100})
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    url = stack.signed("putRecordingTextTrack", track_params(recording.record_id))
    form = "application/x-www-form-urlencoded"
    # body parameters beside the signed query: refused, as for every call
    assert (await text_track_post(stack, url, b"kind=captions", form))["messageKey"] == (
        "checksumError"
    )
    # within max_body_bytes, read and then judged by its type
    plain = await text_track_post(stack, url, b"x" * 100, "text/plain")
    assert plain["messageKey"] == "unsupportedContentType"
    # over max_body_bytes (not the upload's bound): refused as other calls' bodies are
    assert await text_track_post(stack, url, b"x" * 101, "text/plain") == {
        "returncode": "FAILED",
        "messageKey": "validationError",
        "message": "The request body is too large",
    }


async def test_a_body_beside_a_signed_query_is_not_read_before_the_checks(stack: Stack) -> None:
    """The query verified with its parameters: nothing of the body is read before the
    checks that need none (here: the customer's API is disabled), so a field in it is not
    what the customer is answered."""
    url = stack.signed("putRecordingTextTrack", track_params("rec-1"), "off")
    body = multipart([("note", "x")], b"WEBVTT\n")
    assert await text_track_post(stack, url, body, CONTENT_TYPE) == {
        "returncode": "FAILED",
        "messageKey": "apiNotEnabled",
        "message": "The API is not enabled for this customer",
    }
