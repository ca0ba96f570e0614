"""Tests written to kill mutants of ``proxy.calls.recordings`` (docs/mutation.md): over real
sockets, what each listing, change and text-track call logs, counts and sends to whom, and the
exact answers of its failures."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from lxml import etree

from proxy.bbb import envelope, recordings
from proxy.calls import recordings as recording_calls
from proxy.health import Health, State
from proxy.simulator import Simulator
from proxy.simulator.model import ApiRequest, Reply
from proxy.simulator.recordings import Recording
from tests.harness import Stack, StackFactory
from tests.test_recordings import BASE, ids, pool_order, seed
from tests.test_recordings_changes import answer, received
from tests.test_recordings_text_tracks import failure, tracks

NOT_ASKED = "The server hosting this meeting cannot be reached"
NOT_VALID = "The server hosting this meeting gave an invalid answer"


def warnings_of(
    caplog: pytest.LogCaptureFixture, name: str = recording_calls.log.name
) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == name and r.levelno == logging.WARNING
    ]


def left_out(stack: Stack) -> dict[str, int]:
    return {
        label: count
        for (family, label), count in stack.gateway.tallies.items()
        if family == "recordings_left_out"
    }


def asked(sim: Simulator, call: str = "getRecordings") -> int:
    return sum(1 for name, _ in sim.requests if name == call)


def answering(sim: Simulator, call: str, reply: Reply, when: str = "") -> None:
    """``sim`` answers ``call`` (whose raw query holds ``when``) with ``reply``."""
    original = sim.handle

    def handle(request: ApiRequest) -> Reply:
        if request.call == call and when in request.raw_query:
            return reply
        return original(request)

    sim.handle = handle  # type: ignore[method-assign]


def prefixed_pair(sim: Simulator, customer: str = "acme") -> tuple[Recording, Recording]:
    """Two recordings of one meeting whose recordIDs are ``p-170000000000`` and
    ``p-1700000000000``: the first is a prefix of the second (BBB matches recordID prefixes)."""
    short, long = seed(
        sim, customer, "room", 2, start_ms=170_000_000_000, step_ms=1_530_000_000_000
    )
    assert long.record_id.startswith(short.record_id) and long.record_id != short.record_id
    return short, long


# -- getRecordings: who is left out, logged and counted ------------------------------------------


async def test_a_down_backend_is_logged_and_counted_each_time_it_is_left_out(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 5}})
    (up,) = seed(stack.sims[0], "acme", "room", 1)
    stack.gateway.set_health("bbb-2", Health(state=State.DOWN))
    caplog.set_level(logging.WARNING)
    assert await listing_ids(stack) == [up.record_id]
    assert warnings_of(caplog) == ["getRecordings: leaving out bbb-2: it is DOWN"]
    assert left_out(stack) == {"down": 1}
    assert asked(stack.sims[1]) == 0
    caplog.clear()
    deleted = await stack.call("deleteRecordings", [("recordID", up.record_id)])
    assert answer(deleted) == ("SUCCESS", "")
    assert warnings_of(caplog) == ["recording lookup: leaving out bbb-2: it is DOWN"]
    assert left_out(stack) == {"down": 2}


async def test_a_backend_past_the_deadline_is_logged_counted_and_timed(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 0.3}})
    (fast,) = seed(stack.sims[0], "acme", "room", 1)
    seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    stack.sims[1].behaviour.latency = 2.0
    seen: list[tuple[str, str, str, float]] = []
    client = stack.gateway.client("bbb-2")
    observed = client.observer

    def spy(backend: str, call: str, outcome: str, seconds: float) -> None:
        seen.append((backend, call, outcome, seconds))
        observed(backend, call, outcome, seconds)

    client.observer = spy
    caplog.set_level(logging.WARNING)
    assert await listing_ids(stack) == [fast.record_id]
    stack.sims[1].behaviour.latency = 0.0
    assert warnings_of(caplog) == [
        "getRecordings: leaving out bbb-2: no answer before the deadline"
    ]
    assert left_out(stack) == {"deadline": 1}
    deadline = [s for s in seen if s[2] == "deadline"]
    assert [s[:3] for s in deadline] == [("bbb-2", "getRecordings", "deadline")]
    assert 0.3 <= deadline[0][3] < 1.5


@pytest.mark.parametrize(
    ("mode", "reply", "logged"),
    [
        ("garbage", None, "getRecordings of bbb-2 answered not BBB's XML, leaving it out"),
        (
            "",
            Reply.xml(envelope.failure("internalError", "disk")),
            "getRecordings of bbb-2 answered returncode 'FAILED', leaving it out",
        ),
    ],
)
async def test_a_backend_answering_no_listing_is_logged_and_counted_once(
    make_stack: StackFactory,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    reply: Reply | None,
    logged: str,
) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 2}})
    (kept,) = seed(stack.sims[0], "acme", "room", 1)
    seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    if mode:
        stack.sims[1].behaviour.mode = mode
    if reply is not None:
        answering(stack.sims[1], "getRecordings", reply)
    caplog.set_level(logging.WARNING)
    assert await listing_ids(stack) == [kept.record_id]
    assert warnings_of(caplog) == [logged]  # not also "no answer before the deadline"
    assert left_out(stack) == {"failed": 1}


async def test_a_backend_failing_its_request_is_logged_and_counted_once(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 2}})
    (kept,) = seed(stack.sims[0], "acme", "room", 1)
    stack.sims[1].behaviour.mode = "http500"
    caplog.set_level(logging.WARNING)
    assert await listing_ids(stack) == [kept.record_id]
    [warning] = warnings_of(caplog)
    assert warning.startswith("getRecordings of bbb-2 failed, leaving it out: Backend"), warning
    assert left_out(stack) == {"failed": 1}


async def test_a_backend_failing_the_second_pass_is_logged_with_its_count(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recordings, "EARLY_BYTES", 0)
    stack = await make_stack(backends=2)
    kept = seed(stack.sims[0], "acme", "room", 2)
    seed(stack.sims[1], "acme", "room", 3, start_ms=BASE + 1)
    answering(stack.sims[1], "getRecordings", Reply(500, "<html>oops</html>"), "recordID=")
    caplog.set_level(logging.WARNING)
    root = await stack.call("getRecordings", [])
    assert ids(root) == pool_order(kept)
    logged = warnings_of(caplog)
    assert logged[-1] == "getRecordings: 3 recordings of bbb-2 left out", logged
    assert logged[0].startswith("getRecordings of bbb-2 failed, leaving it out: ")


async def listing_ids(stack: Stack, params: list[tuple[str, str]] | None = None) -> list[str]:
    return ids(await stack.call("getRecordings", params or []))


# -- getRecordings: passes and the answer's end -------------------------------------------------


async def test_a_few_recordings_are_listed_in_one_request_per_backend(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(backends=2)
    a = seed(stack.sims[0], "acme", "room", 3)
    b = seed(stack.sims[1], "acme", "room", 2, start_ms=BASE + 1)
    assert await listing_ids(stack) == pool_order(a, b)
    assert [asked(sim) for sim in stack.sims] == [1, 1]  # the bodies came with the keys


async def test_past_the_budget_each_body_is_fetched_once_by_record_id(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recordings, "EARLY_BYTES", 0)
    stack = await make_stack(backends=2)
    a = seed(stack.sims[0], "acme", "room", 3)
    b = seed(stack.sims[1], "acme", "room", 2, start_ms=BASE + 1)
    assert await listing_ids(stack, [("limit", "3"), ("offset", "1")]) == pool_order(a, b)[1:4]
    second = [
        sorted(dict(params)["recordID"].split(","))
        for sim in stack.sims
        for name, params in sim.requests
        if name == "getRecordings" and "recordID" in dict(params)
    ]
    shown = pool_order(a, b)[1:4]
    assert sorted(i for batch in second for i in batch) == sorted(shown)


async def test_a_body_is_kept_only_from_the_request_that_asked_for_it(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One recordID per request. The shorter ID is gone by its request, so the backend answers
    it as a prefix, with the longer one; the longer ID's own request fails: it is left out."""
    monkeypatch.setattr(recordings, "EARLY_BYTES", 0)
    monkeypatch.setattr(recordings, "BATCH", 1)
    stack = await make_stack(backends=1)
    sim = stack.sims[0]
    short, long = prefixed_pair(sim)
    answering(sim, "getRecordings", Reply(500, "<html>oops</html>"), long.record_id)
    original = sim.handle

    def handle(request: ApiRequest) -> Reply:
        if request.call == "getRecordings" and short.record_id in request.raw_query:
            sim.recordings.by_id.pop(short.record_id, None)
        return original(request)

    sim.handle = handle  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING)
    assert await listing_ids(stack) == []
    assert warnings_of(caplog)[-1] == "getRecordings: 1 recordings of bbb-1 left out"


@pytest.mark.parametrize("count", [50, 100])
async def test_a_multiple_of_the_write_chunk_is_not_no_recordings(
    make_stack: StackFactory, count: int
) -> None:
    stack = await make_stack(backends=1)
    made = seed(stack.sims[0], "acme", "room", count)
    root = await stack.call("getRecordings", [("limit", "100")])
    assert ids(root) == pool_order(made)
    assert root.find("messageKey") is None and root.find("message") is None
    assert root.findtext("totalElements") == str(count)
    assert [str(c.tag) for c in root] == ["returncode", "recordings", "totalElements"]


async def test_the_count_of_what_was_written_spans_chunks_and_rounds(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds of 4 written in chunks of 3: a chunk and a rest of 1, then a rest of 2 (6 shown),
    the recordings back to back."""
    monkeypatch.setattr(recordings, "ROUND", 4)
    monkeypatch.setattr(recording_calls, "CHUNK", 3)
    stack = await make_stack(backends=1)
    made = seed(stack.sims[0], "acme", "room", 6)
    root = await stack.call("getRecordings", [])
    assert ids(root) == pool_order(made)
    assert [str(c.tag) for c in root] == ["returncode", "recordings"]
    listed = root.find("recordings")
    assert listed is not None and listed.text is None
    assert [r.tail for r in listed] == [None] * 6


async def test_a_filter_on_the_gateways_metadata_asks_no_one(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    seed(stack.sims[0], "acme", "room", 1)
    root = await stack.call("getRecordings", [("meta_bbb-proxy-customer", "acme")])
    assert etree.tostring(root) == (
        b"<response><returncode>SUCCESS</returncode><recordings/>"
        b"<messageKey>noRecordings</messageKey>"
        b"<message>There are no recordings for the meeting(s).</message></response>"
    )
    assert [asked(sim) for sim in stack.sims] == [0, 0]


# -- publish / delete / update ------------------------------------------------------------------


async def test_a_change_is_made_to_the_exact_record_id_not_one_it_prefixes(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(backends=1)
    short, long = prefixed_pair(stack.sims[0])
    root = await stack.call("deleteRecordings", [("recordID", short.record_id)])
    assert answer(root) == ("SUCCESS", "")
    assert received(stack.sims[0], "deleteRecordings") == [short.record_id]
    assert short.state == "deleted" and long.state == "published"


async def test_a_record_id_listed_twice_is_sent_once(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    both = f"{a.record_id},{a.record_id}"
    root = await stack.call("publishRecordings", [("recordID", both), ("publish", "false")])
    assert answer(root) == ("SUCCESS", "")
    assert received(stack.sims[0], "publishRecordings") == [a.record_id]


async def test_no_holder_answering_is_server_unavailable_and_logged(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 0.3}})
    for sim in stack.sims:
        sim.behaviour.mode = "hang"
    caplog.set_level(logging.WARNING)
    root = await stack.call("deleteRecordings", [("recordID", "f" * 40 + "-1")])
    assert answer(root) == ("FAILED", "serverUnavailable")
    assert root.findtext("message") == NOT_ASKED
    assert warnings_of(caplog, "proxy.calls") == [
        "deleteRecordings failed: BackendUnavailable(bbb-1): could not be asked for its recordings"
    ]


async def test_nowhere_held_is_not_found_with_bbbs_message(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    root = await stack.call("deleteRecordings", [("recordID", "f" * 40 + "-1")])
    assert answer(root) == ("FAILED", "notFound")
    assert root.findtext("message") == "We could not find recordings"


async def test_a_holder_failing_the_change_is_the_answer(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    (b,) = seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    answering(stack.sims[1], "deleteRecordings", Reply(500, "<html>oops</html>"))
    root = await stack.call("deleteRecordings", [("recordID", f"{a.record_id},{b.record_id}")])
    assert answer(root) == ("FAILED", "internalError")
    assert root.findtext("message") == NOT_VALID
    assert a.state == "deleted"  # the other holder's share was sent all the same


@pytest.mark.parametrize("other_done", [True, False])
async def test_a_holder_answering_not_found_to_the_change(
    make_stack: StackFactory, other_done: bool
) -> None:
    """A recording gone between the lookup and the change: notFound from its holder counts
    as nothing changed there, not as a failure."""
    stack = await make_stack(backends=2)
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    (b,) = seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    gone = Reply.xml(envelope.failure("notFound", "We could not find recordings"))
    answering(stack.sims[1], "deleteRecordings", gone)
    listed = f"{a.record_id},{b.record_id}" if other_done else b.record_id
    root = await stack.call("deleteRecordings", [("recordID", listed)])
    if other_done:
        assert etree.tostring(root) == (
            b"<response><returncode>SUCCESS</returncode><deleted>true</deleted></response>"
        )
    else:
        assert answer(root) == ("FAILED", "notFound")
        assert root.findtext("message") == "We could not find recordings"


async def test_a_holders_own_failure_is_passed_whole(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    (b,) = seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    full = Reply.xml(envelope.failure("internalError", "The disk is full"))
    answering(stack.sims[1], "publishRecordings", full)
    both = f"{a.record_id},{b.record_id}"
    root = await stack.call("publishRecordings", [("recordID", both), ("publish", "false")])
    assert etree.tostring(root) == (
        b"<response><returncode>FAILED</returncode><messageKey>internalError</messageKey>"
        b"<message>The disk is full</message></response>"
    )


# -- text tracks --------------------------------------------------------------------------------


async def test_text_tracks_of_a_padded_record_id(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    (recording,) = seed(stack.sims[1], "acme", "room", 1)
    body = await tracks(stack, [("recordID", f"  {recording.record_id} ")])
    assert body == {"returncode": "SUCCESS", "tracks": []}
    assert received(stack.sims[1], "getRecordingTextTracks") == [recording.record_id]


async def test_text_tracks_of_the_exact_record_id(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    short, _ = prefixed_pair(stack.sims[0])
    body = await tracks(stack, [("recordID", short.record_id)])
    assert body == {"returncode": "SUCCESS", "tracks": []}
    assert received(stack.sims[0], "getRecordingTextTracks") == [short.record_id]


async def test_text_tracks_errors_are_bbbs_messages(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 0.3}})
    (recording,) = seed(stack.sims[1], "acme", "room", 1)
    assert failure(await tracks(stack, [("recordID", "  ")])) == (
        "paramError",
        "Missing param recordID.",
    )
    assert failure(await tracks(stack, [("recordID", "nope")])) == (
        "noRecordings",
        "No recording found for nope",
    )
    answering(stack.sims[1], "getRecordingTextTracks", Reply(200, "[]", "application/json"))
    caplog.set_level(logging.WARNING)
    assert failure(await tracks(stack, [("recordID", recording.record_id)])) == (
        "internalError",
        NOT_VALID,
    )
    assert warnings_of(caplog) == [
        "getRecordingTextTracks: bbb-2 answered something else than BBB's JSON"
    ]
    caplog.clear()
    answering(stack.sims[1], "getRecordingTextTracks", Reply(500, "<html>oops</html>"))
    assert failure(await tracks(stack, [("recordID", recording.record_id)]))[0] == "internalError"
    [warning] = warnings_of(caplog)
    assert warning.startswith("getRecordingTextTracks of bbb-2 failed: BackendBadResponse(bbb-2)")
    stack.sims[1].behaviour.mode = "hang"
    assert failure(await tracks(stack, [("recordID", recording.record_id)])) == (
        "serverUnavailable",
        NOT_ASKED,
    )


async def test_text_tracks_of_a_down_holder_are_server_unavailable(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(backends=2)
    (recording,) = seed(stack.sims[1], "acme", "room", 1)
    stack.gateway.set_health("bbb-2", Health(state=State.DOWN))
    body: Any = await tracks(stack, [("recordID", recording.record_id)])
    assert failure(body) == ("serverUnavailable", NOT_ASKED)
    assert asked(stack.sims[1]) == 0


# -- every request to a backend is made for the customer (its fair share applies) ---------------

RECORDING_CALLS = {
    "getRecordings",
    "publishRecordings",
    "deleteRecordings",
    "updateRecordings",
    "getRecordingTextTracks",
    "putRecordingTextTrack",
}


def customers_of_requests(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """(call, customer) of every recording call the gateway's backend clients make."""
    seen: list[tuple[str, Any]] = []
    for backend in stack.gateway.backends():
        client = stack.gateway.client(backend.id)
        original = client.fetch

        async def fetch(call: str, *args: Any, original: Any = original, **kwargs: Any) -> Any:
            if call in RECORDING_CALLS:
                seen.append((call, kwargs.get("customer")))
            return await original(call, *args, **kwargs)

        monkeypatch.setattr(client, "fetch", fetch)
    return seen


async def test_every_recording_request_is_made_for_the_customer(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recordings, "EARLY_BYTES", 0)  # the second pass too
    stack = await make_stack(backends=2)
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    (b,) = seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    seen = customers_of_requests(stack, monkeypatch)
    assert await listing_ids(stack) == [a.record_id, b.record_id]
    assert (await tracks(stack, [("recordID", b.record_id)]))["returncode"] == "SUCCESS"
    published = await stack.call(
        "publishRecordings", [("recordID", a.record_id), ("publish", "false")]
    )
    assert answer(published) == ("SUCCESS", "")
    calls = sorted({call for call, _ in seen})
    assert calls == ["getRecordingTextTracks", "getRecordings", "publishRecordings"]
    assert {customer for _, customer in seen} == {"acme"}
    assert len(seen) == 2 + 2 + 2 + 1 + 2 + 1  # keys, bodies, lookup + tracks, lookup + change


@pytest.mark.parametrize(
    ("call", "params", "expected"),
    [
        ("deleteRecordings", [], ("missingParamRecordID", "You must specify a recordID.")),
        (
            "publishRecordings",
            [("recordID", "x")],
            ("missingParamPublish", "You must specify a publish value true or false."),
        ),
    ],
)
async def test_a_change_missing_a_parameter_has_bbbs_message(
    stack: Stack, call: str, params: list[tuple[str, str]], expected: tuple[str, str]
) -> None:
    root = await stack.call(call, params)
    assert (root.findtext("messageKey"), root.findtext("message")) == expected


async def test_an_upload_without_a_file_is_never_sent(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    params = [("recordID", recording.record_id), ("kind", "subtitles"), ("lang", "de")]
    response = await stack.http.post(stack.signed("putRecordingTextTrack", params))
    assert response.json() == {
        "response": {
            "returncode": "FAILED",
            "messageKey": "empty_uploaded_text_track",
            "message": "Empty uploaded text track.",
        }
    }
    assert received(stack.sims[0], "putRecordingTextTrack") == []


async def test_an_upload_holding_boundary_like_lines_reaches_the_holder_whole(
    make_stack: StackFactory,
) -> None:
    """The forwarded body's boundary is random, so no line of the file can end its part."""
    stack = await make_stack(backends=1)
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    data = b"WEBVTT\r\n\r\n--None\r\nnot a part\r\n--None--\r\n--\r\n"
    params = [("recordID", recording.record_id), ("kind", "subtitles"), ("lang", "de-DE")]
    response = await stack.http.post(
        stack.signed("putRecordingTextTrack", params), files={"file": ("de.vtt", data, "text/vtt")}
    )
    assert response.json()["response"]["returncode"] == "SUCCESS"
    assert stack.sims[0].recordings.uploads == [(recording.record_id, "subtitles", "de-DE", data)]


async def test_an_upload_of_an_unknown_kind_is_bbbs_error_and_never_sent(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(backends=1)
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    params = [("recordID", recording.record_id), ("kind", "slides"), ("lang", "de")]
    response = await stack.http.post(
        stack.signed("putRecordingTextTrack", params), files={"file": ("de.vtt", b"WEBVTT\r\n")}
    )
    assert response.json() == {
        "response": {
            "returncode": "FAILED",
            "messageKey": "invalidKind",
            "message": "Invalid kind parameter, expected='subtitles|captions' actual=slides",
        }
    }
    assert received(stack.sims[0], "putRecordingTextTrack") == []
