"""Tests written to kill mutants of ``proxy.bbb.recordings`` that survived (docs/mutation.md)."""

from __future__ import annotations

import orjson
import pytest

from proxy.bbb import recordings


def test_publish_needs_its_publish_parameter_only() -> None:
    ok = [("recordID", "r1"), ("publish", "true")]
    assert recordings.missing_param("publishRecordings", ok) is None
    assert recordings.missing_param("publishRecordings", ok[:1]) == recordings.MISSING_PUBLISH
    assert recordings.missing_param("deleteRecordings", ok[:1]) is None
    assert recordings.missing_param("deleteRecordings", []) == recordings.MISSING_RECORD_ID


def test_change_params_replace_the_record_ids_with_the_backends_share() -> None:
    params = [("recordID", "r1,r2,r3"), ("publish", "true"), ("recordID", "r9")]
    assert recordings.change_params(params, ["r1", "r3"]) == [
        ("recordID", "r1,r3"),
        ("publish", "true"),
    ]


@pytest.mark.parametrize("code", ["SUCCESS", "FAILED"])
def test_text_tracks_answer_passes_bbbs_json_either_way(code: str) -> None:
    body = {"response": {"returncode": code, "tracks": [], "messageKey": "k"}}
    answered = recordings.text_tracks_answer(orjson.dumps(body))
    assert answered is not None and orjson.loads(answered) == body


@pytest.mark.parametrize(
    "content", [b"not json", b"[]", b'{"response": []}', b'{"response": {"returncode": "failed"}}']
)
def test_text_tracks_answer_refuses_other_shapes(content: bytes) -> None:
    assert recordings.text_tracks_answer(content) is None
