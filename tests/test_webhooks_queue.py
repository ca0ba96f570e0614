"""The per-hook delivery queues as a pure model, and the callback form as bbb-webhooks sends it."""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl

import orjson
import pytest

from proxy.errors import StateError
from proxy.store import Json, MemoryLog, Record
from proxy.webhooks.callback import (
    RETRY_INTERVALS,
    form_body,
    outcome,
    retry_delay,
    signed_url,
    urlencoded,
)
from proxy.webhooks.queue import QueueState

EVENT: dict[str, Json] = {"data": {"type": "event", "id": "user-joined", "attributes": {"n": 1}}}


def event(n: int) -> dict[str, Json]:
    return {"data": {"type": "event", "id": "chat-group-message-sent", "n": n}}


def replayed(records: list[Record], max_per_hook: int = 1000) -> QueueState:
    state = QueueState(max_per_hook)
    for record in records:
        state.apply(orjson.loads(orjson.dumps(record)))  # as a log stores it
    return state


def snapshot(state: QueueState) -> dict[str, list[tuple[int, int, object]]]:
    return {h: [(p.seq, p.timestamp, p.event) for p in q] for h, q in state.queues.items()}


def test_queues_keep_order_per_hook_and_heads_come_off() -> None:
    state = QueueState()
    for n in range(3):
        state.enqueue("h1", event(n), 1000 + n)
    state.enqueue("h2", event(9), 2000)
    head = state.head("h1")
    assert head is not None and head.event == event(0) and head.timestamp == 1000
    state.delivered(head)
    assert [p.event for p in state.queues["h1"]] == [event(1), event(2)]
    assert state.depth("h2") == 1 and state.hooks() == ["h1", "h2"]
    second = state.head("h1")
    assert second is not None
    state.delivered(second)
    third = state.head("h1")
    assert third is not None
    state.delivered(third)
    assert state.head("h1") is None and state.hooks() == ["h2"]
    assert state.statistics().events == 1


def test_every_change_replays_to_the_same_queues() -> None:
    state, log = QueueState(max_per_hook=3), []
    for n in range(5):
        record, _ = state.enqueue("a" if n % 2 else "b", event(n), n)
        log.append(record)
    head = state.head("b")
    assert head is not None
    log.append(state.delivered(head))
    record, _ = state.enqueue("c", event(7), 7)
    log.append(record)
    log.append(state.drop("c")[0])
    again = replayed(log, max_per_hook=3)
    assert snapshot(again) == snapshot(state)
    assert again.next_seq == state.next_seq
    # compaction writes records() that replay to the same state
    assert snapshot(replayed(list(state.records()), 3)) == snapshot(state)


def test_sequence_numbers_continue_after_replay() -> None:
    state = QueueState()
    for n in range(4):
        state.enqueue("h", event(n), n)
    again = replayed(list(state.records()))
    record, _ = again.enqueue("h", event(5), 5)
    assert record["seq"] == 4
    assert len({p.seq for p in again.queues["h"]}) == 5


def test_overflow_pushes_the_oldest_out_and_says_which() -> None:
    state = QueueState(max_per_hook=2)
    assert state.enqueue("h", event(0), 0)[1] is None
    assert state.enqueue("h", event(1), 1)[1] is None
    _, pushed = state.enqueue("h", event(2), 2)
    assert pushed is not None and pushed.event == event(0)
    assert [p.event for p in state.queues["h"]] == [event(1), event(2)]
    assert state.enqueue("other", event(3), 3)[1] is None  # per hook, not overall


def test_done_of_an_event_already_pushed_out_changes_nothing() -> None:
    state = QueueState(max_per_hook=1)
    state.enqueue("h", event(0), 0)
    in_flight = state.head("h")
    assert in_flight is not None
    state.enqueue("h", event(1), 1)  # pushes the one being sent out
    state.delivered(in_flight)
    assert [p.event for p in state.queues["h"]] == [event(1)]
    state.apply({"type": "done", "hook": "unknown", "seq": 3})
    state.apply({"type": "dropped", "hook": "unknown"})
    assert state.depth("h") == 1


def test_done_of_a_later_event_removes_it() -> None:
    state = QueueState()
    for n in range(3):
        state.enqueue("h", event(n), n)
    state.apply({"type": "done", "hook": "h", "seq": 1})
    assert [p.seq for p in state.queues["h"]] == [0, 2]


def test_drop_says_how_many_events_went() -> None:
    state = QueueState()
    for n in range(3):
        state.enqueue("h", event(n), n)
    record, count = state.drop("h")
    assert (record, count) == ({"type": "dropped", "hook": "h"}, 3)
    assert state.head("h") is None and state.statistics().hooks == 0


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"type": "evnt", "hook": "h", "seq": 0, "ts": 0, "event": {}},
        {"type": 3},
        {"type": "event", "hook": "h", "seq": 0, "ts": 0},
        {"type": "event", "hook": "h", "seq": 0, "ts": 0, "event": [1]},
        {"type": "event", "hook": 7, "seq": 0, "ts": 0, "event": {}},
        {"type": "event", "hook": "h", "seq": "0", "ts": 0, "event": {}},
        {"type": "event", "hook": "h", "seq": True, "ts": 0, "event": {}},
        {"type": "event", "hook": "h", "seq": -1, "ts": 0, "event": {}},
        {"type": "event", "hook": "h", "seq": 0, "ts": 1.5, "event": {}},
        {"type": "done", "hook": "h"},
        {"type": "dropped"},
    ],
)
def test_a_record_it_does_not_know_is_a_state_error(record: Record) -> None:
    with pytest.raises(StateError, match="webhook-queue"):
        QueueState().apply(record)


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        QueueState(0)


async def test_records_survive_a_memory_log_round_trip() -> None:
    log, state = MemoryLog(), QueueState()
    for n in range(3):
        log.append(state.enqueue("h", {"data": {"id": "x", "text": "é ~*"}, "n": n}, n)[0])
    await log.flush()
    assert snapshot(replayed(log.replayed())) == snapshot(state)


# -- the callback form (proxy.webhooks.callback) -------------------------------------------------


def test_form_body_is_bbb_webhooks_form_in_alphabetical_order() -> None:
    body = form_body("bbb.example.com", EVENT, 1700000000123)
    fields = parse_qsl(body, keep_blank_values=True, strict_parsing=True)
    assert [k for k, _ in fields] == ["domain", "event", "timestamp"]
    values = dict(fields)
    assert values["domain"] == "bbb.example.com"
    assert values["timestamp"] == "1700000000123"
    assert orjson.loads(values["event"]) == [EVENT]  # the event wrapped in an array
    assert '"id":"user-joined"' in values["event"]  # JSON.stringify: no spaces


def test_urlencoded_matches_url_search_params() -> None:
    # URLSearchParams keeps letters, digits and *-._; space is '+'; everything else %XX.
    assert urlencoded("a b*-._~!'()") == "a+b*-._%7E%21%27%28%29"
    assert urlencoded('[{"k":"é/?&="}]') == "%5B%7B%22k%22%3A%22%C3%A9%2F%3F%26%3D%22%7D%5D"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_checksum_is_over_url_body_and_secret(algorithm: str) -> None:
    url = "https://lms.example.org/hook?course=7"
    body = form_body("gw.example.com", EVENT, 5)
    signed = signed_url(url, body, "s3cret", algorithm)
    expected = hashlib.new(algorithm, (url + body + "s3cret").encode()).hexdigest()
    assert signed == f"{url}&checksum={expected}"


def test_checksum_separator_follows_bbb_webhooks() -> None:
    assert "/hook?checksum=" in signed_url("https://a.example/hook", "b", "s")
    assert "/hook?&checksum=" in signed_url("https://a.example/hook?", "b", "s")
    with pytest.raises(ValueError):
        signed_url("https://a.example/hook", "b", "s", "md5")


def test_outcomes_and_backoff() -> None:
    assert [outcome(s) for s in (200, 204, 299)] == ["delivered"] * 3
    assert outcome(401) == "rejected"
    assert [outcome(s) for s in (0, 302, 400, 404, 500, 503)] == ["failed"] * 6
    assert outcome(None) == "refused"
    assert [retry_delay(n) for n in (1, 2, 3)] == [0.1, 0.5, 1.0]
    assert retry_delay(len(RETRY_INTERVALS)) == retry_delay(100) == 60.0
    assert retry_delay(0) == 0.1
