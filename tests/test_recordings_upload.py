"""putRecordingTextTrack: a multipart upload sent only to the backend holding the recording,
answered in BBB's JSON shapes and JSON errors, size-limited by ``[proxy]
max_text_track_bytes``; another customer's recording is noRecordings like a missing one; the
simulated server accepts the upload as bbb-web does and lists the track afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.bbb.checksum import signed_query
from proxy.bbb.recordings import UPLOAD_OVERHEAD
from tests.harness import BACKEND_SECRET, Stack, StackFactory
from tests.test_recordings import BASE, seed
from tests.test_recordings_changes import received
from tests.test_recordings_text_tracks import failure, shape, tracks

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bbb"
SUCCESS = FIXTURES / "bigbluebutton-api-php" / "responses" / "put_recording_text_track_success.json"
VTT = b"WEBVTT\n\n00:00.000 --> 00:02.000\nHallo\n"


def track_params(record_id: str, **extra: str) -> list[tuple[str, str]]:
    params = {"recordID": record_id, "kind": "subtitles", "lang": "de-DE", "label": "Deutsch"}
    return [(k, v) for k, v in (params | extra).items() if v != "-"]


async def upload(
    stack: Stack,
    params: list[tuple[str, str]],
    data: bytes | None = VTT,
    customer: str = "acme",
) -> Any:
    files = None if data is None else {"file": ("de.vtt", data, "text/vtt")}
    response = await stack.http.post(
        stack.signed("putRecordingTextTrack", params, customer),
        files=files,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return json.loads(response.content)["response"]


def uploads(stack: Stack) -> list[list[tuple[str, str, str, bytes]]]:
    return [sim.recordings.uploads for sim in stack.sims]


async def test_the_simulator_accepts_an_upload_as_bbb_does(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    sim = stack.sims[0]
    (recording,) = sim.recordings.seed(1)
    query = signed_query("putRecordingTextTrack", track_params(recording.record_id), BACKEND_SECRET)
    response = await stack.http.post(
        f"{stack.sim_urls[0]}/putRecordingTextTrack?{query}",
        files={"file": ("de.vtt", VTT, "text/vtt")},
    )
    body = response.json()
    assert shape(body) == shape(json.loads(SUCCESS.read_text()))
    assert body["response"]["messageKey"] == "upload_text_track_success"
    assert sim.recordings.uploads == [(recording.record_id, "subtitles", "de-DE", VTT)]
    assert [(t["lang"], t["label"]) for t in recording.text_tracks] == [("de-DE", "Deutsch")]


async def test_an_upload_reaches_only_the_holder_and_is_listed(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=3)
    seed(stack.sims[0], "acme", "room", 2)
    (recording,) = seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    body = await upload(stack, track_params(recording.record_id))
    assert body["returncode"] == "SUCCESS"
    assert body["messageKey"] == "upload_text_track_success"
    assert body["recordId"] == recording.record_id
    assert shape({"response": body}) == shape(json.loads(SUCCESS.read_text()))
    assert uploads(stack) == [[], [(recording.record_id, "subtitles", "de-DE", VTT)], []]
    assert received(stack.sims[1], "putRecordingTextTrack") == [recording.record_id]
    assert received(stack.sims[0], "putRecordingTextTrack") == []
    assert received(stack.sims[2], "putRecordingTextTrack") == []
    listed = await tracks(stack, [("recordID", recording.record_id)])
    assert [(t["kind"], t["lang"], t["label"]) for t in listed["tracks"]] == [
        ("subtitles", "de-DE", "Deutsch")
    ]
    assert listed["tracks"][0]["href"].startswith("https://bbb-2.test/")


async def test_the_label_defaults_to_the_lang(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    body = await upload(stack, track_params(recording.record_id, label="-", kind="captions"))
    assert body["messageKey"] == "upload_text_track_success"
    assert [(t["kind"], t["label"]) for t in recording.text_tracks] == [("captions", "de-DE")]


async def test_the_size_limit(make_stack: StackFactory) -> None:
    limit = 1000
    stack = await make_stack(backends=2, proxy={"max_text_track_bytes": limit})
    (recording,) = seed(stack.sims[1], "acme", "room", 1)
    params = track_params(recording.record_id)
    key, message = failure(await upload(stack, params, b"x" * (limit + 1)))
    assert (key, message) == (
        "upload_text_track_failed",
        f"Text track upload failed: larger than {limit} bytes.",
    )
    # far above the limit: refused by the web layer before it is read, still BBB's JSON
    huge = b"x" * (limit + UPLOAD_OVERHEAD + 1)
    assert failure(await upload(stack, params, huge))[0] == "upload_text_track_failed"
    assert uploads(stack) == [[], []]
    assert (await upload(stack, params, b"y" * limit))["returncode"] == "SUCCESS"
    assert uploads(stack)[1] == [(recording.record_id, "subtitles", "de-DE", b"y" * limit)]


async def test_the_size_limit_may_exceed_the_body_limit(make_stack: StackFactory) -> None:
    stack = await make_stack(
        backends=1, proxy={"max_body_bytes": 2000, "max_text_track_bytes": 10_000}
    )
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    body = await upload(stack, track_params(recording.record_id), b"z" * 9_000)
    assert body["returncode"] == "SUCCESS"
    # other calls keep max_body_bytes
    response = await stack.http.post(
        stack.signed("getRecordings", []),
        content=b"a=" + b"b" * 3000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert b"<messageKey>validationError</messageKey>" in response.content


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"kind": "-"}, ("paramError", "Missing param kind.")),
        (
            {"kind": "chapters"},
            (
                "invalidKind",
                "Invalid kind parameter, expected='subtitles|captions' actual=chapters",
            ),
        ),
        ({"lang": "-"}, ("paramError", "Missing param lang.")),
        ({"lang": "de DE!"}, ("invalidLang", "Malformed lang param, received=de DE!")),
    ],
)
async def test_bad_kind_or_lang(
    make_stack: StackFactory, extra: dict[str, str], expected: tuple[str, str]
) -> None:
    stack = await make_stack(backends=2)
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    assert failure(await upload(stack, track_params(recording.record_id, **extra))) == expected
    assert uploads(stack) == [[], []]
    assert all(received(sim, "putRecordingTextTrack") == [] for sim in stack.sims)


async def test_missing_params(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    no_id = failure(await upload(stack, track_params("-", recordID="-")))
    assert no_id == ("paramError", "Missing param recordID.")
    no_file = failure(await upload(stack, track_params(recording.record_id), data=None))
    assert no_file == ("empty_uploaded_text_track", "Empty uploaded text track.")
    empty = failure(await upload(stack, track_params(recording.record_id), data=b""))
    assert empty[0] == "empty_uploaded_text_track"
    assert uploads(stack) == [[], []]


async def test_another_customers_recording_is_no_recording(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    (theirs,) = seed(stack.sims[1], "globex", "room", 1)
    other = failure(await upload(stack, track_params(theirs.record_id)))
    missing_id = "e" * 40 + "-1"
    missing = failure(await upload(stack, track_params(missing_id)))
    assert other[0] == missing[0] == "noRecordings"
    assert other[1] == missing[1].replace(missing_id, theirs.record_id)
    assert uploads(stack) == [[], []]
    assert all(received(sim, "putRecordingTextTrack") == [] for sim in stack.sims)
    assert theirs.text_tracks == []


async def test_bad_checksum_and_disabled_are_json(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1, proxy={"disabled_calls": ["putRecordingTextTrack"]})
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    assert failure(await upload(stack, track_params(recording.record_id)))[0] == (
        "unsupportedRequest"
    )
    url = stack.signed("putRecordingTextTrack", track_params(recording.record_id))
    response = await stack.http.post(
        url.replace("checksum=", "checksum=0"), files={"file": ("a.vtt", VTT, "text/vtt")}
    )
    assert failure(response.json()["response"])[0] == "checksumError"
    assert uploads(stack) == [[]]


async def test_a_dead_holder_is_server_unavailable(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 0.5}})
    (recording,) = seed(stack.sims[1], "acme", "room", 1)
    stack.sims[1].behaviour.mode = "hang"
    body = await upload(stack, track_params(recording.record_id))
    assert failure(body)[0] == "serverUnavailable"
