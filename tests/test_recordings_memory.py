"""The first pass of getRecordings keeps one packed bytes key per recording: it must sort
exactly as the (startTime, recordID, backend rank) order and give the key back unchanged."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from proxy.backends import http
from proxy.bbb import recordings, rewrite
from proxy.bbb.recordings import Listed, Page
from tests.harness import StackFactory
from tests.test_recordings import seed
from tests.test_recordings_rules import answer, recording

LISTED = st.builds(
    Listed,
    st.integers(0, 10**15 - 1),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12),
    st.integers(0, 999),
)


@given(st.lists(LISTED, max_size=30))
def test_packed_keys_sort_as_the_pool_order(items: list[Listed]) -> None:
    keys = [recordings.packed(item) for item in items]
    assert [recordings.unpacked(k) for k in recordings.window(keys, Page())] == sorted(items)


@given(LISTED)
def test_packed_round_trips(item: Listed) -> None:
    assert recordings.unpacked(recordings.packed(item)) == item


def test_a_recordid_sorts_before_one_it_prefixes_on_a_later_backend() -> None:
    short, longer = Listed(5, "abc", 9), Listed(5, "abc-1", 0)
    assert sorted([recordings.packed(longer), recordings.packed(short)]) == [
        recordings.packed(short),
        recordings.packed(longer),
    ]


def test_a_bbb_key_is_smaller_than_the_object() -> None:
    item = Listed(1_700_000_000_000, "a" * 40 + "-1700000000000", 3)
    key = recordings.packed(item)
    as_object = sys.getsizeof(item) + sys.getsizeof(item.record_id) + sys.getsizeof(item.start_time)
    assert sys.getsizeof(key) <= 100 < as_object


def test_a_big_read_is_parsed_a_slice_at_a_time() -> None:
    """A 64 KiB read holds about 50 recordings; the reader must not let libxml2 build them
    all before it drops the first (the tree of 20 such reads was most of the memory growth)."""
    backend_id = rewrite.backend_meeting_id("acme", "room")
    data = answer(*(recording(f"r{i}", str(i), "acme", "room", backend_id) for i in range(200)))
    assert len(data) > 10 * recordings.FEED
    present: list[int] = []

    def found(item: Listed, element: etree._Element | None) -> None:
        assert element is not None
        parent = element.getparent()
        present.append(0 if parent is None else len(parent))

    reader = recordings.AnswerReader("acme", 0, found, lambda: True)
    reader.feed(data)  # in one piece, as one big read arrives
    reader.close()
    assert reader.ok and len(present) == 200
    assert max(present) <= recordings.FEED // 250 + 2  # each recording is over 250 bytes


async def test_streamed_listings_read_small_pieces(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 listings streamed at once each hold one read: those reads are STREAM_READ bytes,
    other answers (held whole anyway) keep 64 KiB reads."""
    sizes: list[int] = []
    original = http._receive

    async def receive(connection: http._Connection, size: int = 65536) -> bytes:
        sizes.append(size)
        return await original(connection, size)

    monkeypatch.setattr(http, "_receive", receive)
    stack = await make_stack(backends=2)
    seed(stack.sims[0], "acme", "room", 30)
    await stack.create("other")
    created = set(sizes)
    sizes.clear()
    root = await stack.call("getRecordings", [])
    assert len(root.findall("recordings/recording")) == 30
    assert created == {65536}
    # both servers' listings were streamed in small reads (a background poll, if one ran
    # meanwhile, reads 64 KiB: not asserted against)
    assert sizes.count(http.STREAM_READ) >= 2 and http.STREAM_READ <= 16 * 1024
