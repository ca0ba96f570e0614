"""getRecordingTextTracks: on the simulated server (checked against BBB's JSON) and through
the gateway, sent only to the backend holding the recording, answered and failed in BBB's
JSON shapes; another customer's recording is noRecordings like a missing one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.bbb.checksum import signed_query
from proxy.simulator.recordings import text_track
from tests.harness import BACKEND_SECRET, Stack, StackFactory
from tests.test_recordings import BASE, seed
from tests.test_recordings_changes import received

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bbb"
DOCS = FIXTURES / "bigbluebutton" / "docs-getRecordingTextTracks.json"


def shape(value: Any) -> Any:
    """Keys and nesting of a JSON value, values ignored."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


async def tracks(stack: Stack, params: list[tuple[str, str]], customer: str = "acme") -> Any:
    response = await stack.http.get(stack.signed("getRecordingTextTracks", params, customer))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return json.loads(response.content)["response"]


def failure(body: Any) -> tuple[str, str]:
    assert body["returncode"] == "FAILED", body
    return body["messageKey"], body["message"]


async def test_the_simulator_answers_bbbs_json(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    sim = stack.sims[0]
    (recording,) = sim.recordings.seed(1)
    recording.text_tracks = [
        text_track(sim.server_name, recording.record_id, "en-US", "English"),
        text_track(sim.server_name, recording.record_id, "pt-BR", "Brazil"),
    ]

    async def direct(params: list[tuple[str, str]]) -> Any:
        query = signed_query("getRecordingTextTracks", params, BACKEND_SECRET)
        response = await stack.http.get(f"{stack.sim_urls[0]}/getRecordingTextTracks?{query}")
        assert response.headers["content-type"].startswith("application/json")
        return response.json()

    ours = await direct([("recordID", recording.record_id)])
    assert shape(ours) == shape(json.loads(DOCS.read_text()))
    assert [t["lang"] for t in ours["response"]["tracks"]] == ["en-US", "pt-BR"]
    assert failure((await direct([]))["response"])[0] == "paramError"
    assert failure((await direct([("recordID", "nope")]))["response"])[0] == "noRecordings"


async def test_tracks_come_from_the_backend_holding_the_recording(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(backends=3)
    seed(stack.sims[0], "acme", "room", 2)
    sim = stack.sims[2]
    (recording,) = seed(sim, "acme", "room", 1, start_ms=BASE + 1)
    recording.text_tracks = [text_track(sim.server_name, recording.record_id, "de-DE", "Deutsch")]
    body = await tracks(stack, [("recordID", recording.record_id)])
    assert body["returncode"] == "SUCCESS"
    assert body["tracks"] == recording.text_tracks  # hrefs on the server that has them
    assert received(stack.sims[2], "getRecordingTextTracks") == [recording.record_id]
    assert received(stack.sims[0], "getRecordingTextTracks") == []
    assert received(stack.sims[1], "getRecordingTextTracks") == []


async def test_another_customers_recording_is_no_recording(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    (theirs,) = seed(stack.sims[0], "globex", "room", 1)
    other = failure(await tracks(stack, [("recordID", theirs.record_id)]))
    missing_id = "f" * 40 + "-1"
    missing = failure(await tracks(stack, [("recordID", missing_id)]))
    assert other[0] == missing[0] == "noRecordings"
    assert other[1] == missing[1].replace(missing_id, theirs.record_id)
    assert all(received(sim, "getRecordingTextTracks") == [] for sim in stack.sims)


async def test_errors_are_bbbs_json(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    assert failure(await tracks(stack, []))[0] == "paramError"
    url = stack.signed("getRecordingTextTracks", [("recordID", "x")]).replace(
        "checksum=", "checksum=0"
    )
    response = await stack.http.get(url)
    assert response.headers["content-type"].startswith("application/json")
    assert failure(response.json()["response"])[0] == "checksumError"


async def test_a_dead_holder_is_server_unavailable(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 0.5}})
    (recording,) = seed(stack.sims[1], "acme", "room", 1)
    stack.sims[1].behaviour.mode = "hang"
    body = await tracks(stack, [("recordID", recording.record_id)])
    assert failure(body)[0] == "serverUnavailable"


@pytest.mark.parametrize("garbage", [b"<html>no</html>", b'{"response": 1}'])
async def test_a_backend_answering_other_than_bbbs_json(
    make_stack: StackFactory, garbage: bytes
) -> None:
    stack = await make_stack(backends=1)
    sim = stack.sims[0]
    (recording,) = seed(sim, "acme", "room", 1)
    original = sim.handle

    def broken(request: Any) -> Any:
        reply = original(request)
        if request.call == "getRecordingTextTracks":
            return type(reply)(200, garbage.decode(), "application/json")
        return reply

    sim.handle = broken  # type: ignore[method-assign]
    body = await tracks(stack, [("recordID", recording.record_id)])
    assert failure(body)[0] == "internalError"


async def test_disabled_text_tracks_answer_unsupported_in_json(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"disabled_calls": ["getRecordingTextTracks"]})
    (recording,) = seed(stack.sims[0], "acme", "room", 1)
    body = await tracks(stack, [("recordID", recording.record_id)])
    assert failure(body)[0] == "unsupportedRequest"
