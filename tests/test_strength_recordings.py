"""Tests written to kill mutants of ``proxy.bbb.recordings`` that survived (docs/mutation.md)."""

from __future__ import annotations

import orjson
import pytest

from proxy.bbb import recordings, rewrite
from tests.harness import StackFactory
from tests.test_recordings import ids, seed
from tests.test_recordings_rules import answer, read, recording


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


INT_MAX = 2**31 - 1  # Java's Integer.MAX_VALUE: bbb-web reads offset and limit with parseInt


@pytest.mark.parametrize(
    ("params", "page"),
    [
        ([("limit", "1000000000")], recordings.Page(0, 100)),  # 10 digits, an int: clamped
        ([("limit", str(INT_MAX))], recordings.Page(0, 100)),
        ([("limit", str(INT_MAX + 1))], recordings.Page()),  # NumberFormatException: no page
        ([("limit", str(-INT_MAX - 1))], recordings.Page(0, 1)),
        ([("limit", str(-INT_MAX - 2))], recordings.Page()),
        ([("limit", "9" * 18)], recordings.Page()),
        ([("limit", "9" * 19)], recordings.Page()),
        ([("limit", "5"), ("offset", str(INT_MAX))], recordings.Page(INT_MAX, 5)),
        ([("limit", "5"), ("offset", str(INT_MAX + 1))], recordings.Page(0, 5)),
        ([("limit", "5"), ("offset", "1000000000")], recordings.Page(1_000_000_000, 5)),
    ],
)
def test_offset_and_limit_are_read_as_javas_int(
    params: list[tuple[str, str]], page: recordings.Page
) -> None:
    assert recordings.page_of(params) == page


def test_java_int_reads_exactly_javas_range() -> None:
    assert recordings.java_int(str(INT_MAX)) == INT_MAX
    assert recordings.java_int(str(-INT_MAX - 1)) == -INT_MAX - 1
    assert recordings.java_int(str(INT_MAX + 1)) is None
    assert recordings.java_int(str(-INT_MAX - 2)) is None
    assert recordings.java_int("-7") == -7
    assert recordings.java_int("") is None


async def test_a_ten_digit_limit_is_a_page_of_100_over_the_wire(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    listed = seed(stack.sims[0], "acme", "room", 2) + seed(stack.sims[1], "acme", "room", 1)
    every = [r.record_id for r in sorted(listed, key=lambda r: (r.start_time, r.record_id))]
    paged = await stack.call("getRecordings", [("limit", "1000000000"), ("offset", "1")])
    assert ids(paged) == every[1:] and paged.findtext("totalElements") == "3"
    past = await stack.call("getRecordings", [("limit", "2"), ("offset", "1000000000")])
    assert ids(past) == [] and past.findtext("messageKey") == "noRecordings"
    assert past.findtext("totalElements") == "3"
    unpaged = await stack.call("getRecordings", [("limit", str(INT_MAX + 1)), ("offset", "1")])
    assert ids(unpaged) == every and unpaged.find("totalElements") is None


def test_page_window_is_offset_to_offset_plus_limit() -> None:
    """``Page.window`` (the listing itself windows with :func:`recordings.window`)."""
    assert recordings.Page().window(0) and recordings.Page().window(10**6)
    page = recordings.Page(2, 3)
    assert [page.window(i) for i in range(7)] == [False, False, True, True, True, False, False]
    assert page.end == 5 and recordings.Page().end is None


def test_bodies_fill_the_budget_exactly() -> None:
    """The budget is the bytes kept at most: bodies adding up to it exactly are all kept."""
    bodies = recordings.Bodies(budget=10)
    first, second, third = (recordings.Listed(i, f"r{i}", 0) for i in range(3))
    bodies.keep(first, "1234")
    bodies.keep(second, "123456")
    assert not bodies.full and bodies.take(first) == "1234" and bodies.take(second) == "123456"
    bodies.keep(third, "1")  # 11 bytes offered in all: over
    assert bodies.full and not bodies.has(third)


def test_lookup_filters_ask_every_state_of_the_customers_exact_ids() -> None:
    """``any`` as bbb-web spells it (the simulator lower-cases state names; a server need not)."""
    assert recordings.lookup_filters("acme", ["r1", "r2"]) == [
        ("recordID", "r1,r2"),
        ("state", "any"),
        (f"meta_{rewrite.CUSTOMER_TAG}", "acme"),
    ]


def test_reader_lists_only_recordings_under_recordings() -> None:
    stray = recording("r0", "5", "acme", "room", "acme~room")
    data = answer(recording("r1", "20", "acme", "room", "acme~room"))
    data = data.replace(b"<recordings>", stray.encode() + b"<recordings>")
    found, state = read(data, bodies=False)
    assert found == ["20/r1"] and state == (True, False, "SUCCESS")


@pytest.mark.parametrize(
    ("start", "read_as"), [("9" * 15, 10**15 - 1), ("9" * 16, 0), ("1" + "0" * 15, 0)]
)
def test_a_start_time_of_more_than_15_digits_is_read_as_0(start: str, read_as: int) -> None:
    found, _ = read(answer(recording("r1", start, "acme", "room", "acme~room")), bodies=False)
    assert found == [f"{read_as}/r1"]


def test_a_recording_without_record_id_is_keyed_by_the_empty_id() -> None:
    listed = recording("r1", "20", "acme", "room", "acme~room").replace(
        "<recordID>r1</recordID>", ""
    )
    found, _ = read(answer(listed), bodies=False)
    assert found == ["20/"]  # sorts before every recordID of the same startTime


def test_a_recording_without_the_meeting_tag_is_not_the_customers() -> None:
    untagged = recording("r1", "20", "acme", "room", "acme~room").replace(
        f"<{rewrite.MEETING_TAG}>room</{rewrite.MEETING_TAG}>", ""
    )
    assert rewrite.MEETING_TAG not in untagged
    assert read(answer(untagged))[0] == []


def test_an_empty_returncode_is_read_as_empty() -> None:
    """What the listing logs for a backend left out: ``returncode ''``."""
    assert read(answer(returncode=""))[1] == (False, False, "")
    assert read(answer(returncode=" SUCCESS\n"))[1] == (True, False, "SUCCESS")


def test_an_answer_nested_past_libxml2s_default_depth_is_broken() -> None:
    """No ``huge_tree``: libxml2's own bounds (256 levels) hold for a backend's answer."""
    deep = "<x>" * 300 + "</x>" * 300
    listed = recording("r1", "20", "acme", "room", "acme~room").replace(
        "<startTime>", deep + "<startTime>"
    )
    found, state = read(answer(listed), chunk=4096)
    assert state == (False, True, "") and found == []
    shallow = "<x>" * 200 + "</x>" * 200
    listed = recording("r1", "20", "acme", "room", "acme~room").replace(
        "<startTime>", shallow + "<startTime>"
    )
    assert read(answer(listed), 4096, bodies=False) == (["20/r1"], (True, False, "SUCCESS"))


def test_an_internal_entity_is_not_resolved_either() -> None:
    """lxml's default would resolve an internal entity (``resolve_entities="internal"``)."""
    doctype = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e "acme">]>'
    found, _ = read(doctype + answer(recording("r1", "1", "&e;", "room", "acme~room")))
    assert found == []


def test_a_success_under_another_root_is_broken() -> None:
    data = answer(recording("r1", "1", "acme", "room", "acme~room"))
    other = data.replace(b"<response>", b"<html>").replace(b"</response>", b"</html>")
    assert read(other, bodies=False)[1] == (False, True, "SUCCESS")
