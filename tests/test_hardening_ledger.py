"""Issue 7, the ledger's integrity: meetingIDs never alias, apply is total, replay never bricks.

- ``backend_meeting_id`` is injective over customers and meetingIDs, long or short, the
  hashed form sent as a short ID included;
- ``LedgerState.apply`` never raises for any sequence of records and keeps every index and
  counter equal to what its reservations say (:func:`consistency_errors`);
- a journal holding a record that cannot be applied or decoded stops start-up with exit 3
  and a one-line message naming the file and offset (tests that run ``bbb-proxy``).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from lxml import etree

from proxy import cli
from proxy.bbb.rewrite import MAX_MEETING_ID, SEPARATOR, backend_meeting_id
from proxy.errors import StateError
from proxy.ledger.codec import encode_record, reservation_fields
from proxy.ledger.files import load_state, segment_name
from proxy.ledger.model import Confirm, LedgerState, Record, Release, Reservation, Reserve
from tests.harness import StackFactory, text, wait_until

CUSTOMERS = ["acme", "globex", "a", "a-b", "x" * 63]


def hashed(meeting_id: str) -> str:
    return "sha256-" + hashlib.sha256(meeting_id.encode("utf-8")).hexdigest()


def long_id(seed: str) -> str:
    """A meetingID of bbb-web's maximum length: too long to namespace, so hashed."""
    return ((seed + "-") * MAX_MEETING_ID)[:MAX_MEETING_ID]


# -- the invariant -----------------------------------------------------------------------------


def consistency_errors(state: LedgerState) -> list[str]:
    """Every index and counter of ``state`` recomputed from its reservations; the differences.

    Backends in ``state.suspended`` (failover, where the model has it) do not count
    against subscriptions.
    """
    held = list(state)
    suspended: frozenset[str] = getattr(state, "suspended", frozenset())
    errors: list[str] = []
    customers: Counter[str] = Counter()
    backends: Counter[str] = Counter()
    by_backend_meeting: dict[tuple[str, str], tuple[str, str]] = {}
    for r in held:
        backends[r.backend_id] += r.connections
        if r.backend_id not in suspended:
            customers[r.customer] += r.connections
        if (r.backend_id, r.backend_meeting_id) in by_backend_meeting:
            errors.append(f"two reservations hold backend meeting {r.backend_meeting_id}")
        by_backend_meeting[(r.backend_id, r.backend_meeting_id)] = r.key
        if state.get(r.key) != r:
            errors.append(f"get({r.key}) is not {r}")
        if state.by_backend_meeting(r.backend_id, r.backend_meeting_id) != r:
            errors.append(f"by_backend_meeting misses {r.key}")
    if dict(state._by_backend_meeting) != by_backend_meeting:
        errors.append(f"backend meeting index {state._by_backend_meeting} != {by_backend_meeting}")
    for customer in {r.customer for r in held} | set(state._by_customer):
        mine = {r.key: r for r in held if r.customer == customer}
        if {r.key: r for r in state.customer_meetings(customer)} != mine:
            errors.append(f"customer index of {customer} differs")
    for backend in {r.backend_id for r in held} | set(state._by_backend):
        there = {r.key: r for r in held if r.backend_id == backend}
        if {r.key: r for r in state.backend_meetings(backend)} != there:
            errors.append(f"backend index of {backend} differs")
    stats = state.statistics()
    # a zero count is the same as none (a reservation of 0 connections leaves one)
    if _nonzero(stats.connections_by_customer) != _nonzero(customers):
        errors.append(f"customer counts {stats.connections_by_customer} != {customers}")
    if _nonzero(stats.connections_by_backend) != _nonzero(backends):
        errors.append(f"backend counts {stats.connections_by_backend} != {backends}")
    if stats.pending != sum(not r.confirmed for r in held) or stats.meetings != len(held):
        errors.append(f"pending/meetings {stats.pending}/{stats.meetings} wrong")
    return errors


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


# -- 1. no meetingID aliasing ------------------------------------------------------------------

short_ids = st.text(min_size=1, max_size=40)
colliding_ids = st.one_of(
    short_ids,
    short_ids.map(long_id),  # long: hashed
    short_ids.map(lambda s: hashed(long_id(s))),  # a long ID's hashed form, sent short
    short_ids.map(hashed),
    st.sampled_from(["sha256-", "sha256-x", "SHA256-x", "~", "a~b", ""]),
)


@given(st.lists(st.tuples(st.sampled_from(CUSTOMERS), colliding_ids), min_size=2, max_size=12))
@settings(max_examples=300)
def test_backend_meeting_ids_never_alias(pairs: list[tuple[str, str]]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for pair in set(pairs):
        mapped = backend_meeting_id(*pair)
        assert seen.setdefault(mapped, pair) == pair, f"{pair} and {seen[mapped]} -> {mapped}"
        assert len(mapped) <= MAX_MEETING_ID
        assert mapped.startswith(pair[0] + SEPARATOR)


def test_long_id_and_its_hashed_form_map_apart() -> None:
    long = long_id("room")
    assert backend_meeting_id("acme", long) == "acme~" + hashed(long)
    assert backend_meeting_id("acme", hashed(long)) == "acme~" + hashed(hashed(long))
    assert backend_meeting_id("acme", "room-1") == "acme~room-1"  # short IDs unchanged
    assert backend_meeting_id("globex", long) != backend_meeting_id("acme", long)


async def test_long_id_and_its_hashed_form_are_two_meetings(make_stack: StackFactory) -> None:
    """Over real sockets: two creates, two backend meetings, two reservations; ending one
    leaves the other running (today the second create answered the first's meeting)."""
    stack = await make_stack()
    long = long_id("class")
    alias = hashed(long)
    for meeting_id in (long, alias):
        params = [("meetingID", meeting_id), ("name", "Class"), ("maxParticipants", "3")]
        created = await stack.call("create", params)
        assert text(created, "returncode") == "SUCCESS", etree.tostring(created)
        assert text(created, "meetingID") == meeting_id
        assert not created.findtext("messageKey")  # no duplicateWarning
    first, second = (stack.gateway.ledger.get(("acme", m)) for m in (long, alias))
    assert first is not None and second is not None
    assert first.backend_meeting_id != second.backend_meeting_id
    assert stack.gateway.ledger.state.customer_used("acme") == 6
    sim_first, backend_first = stack.backend_meeting("acme", long)
    sim_second, backend_second = stack.backend_meeting("acme", alias)
    assert not sim_first.meetings[backend_first].ended
    assert not sim_second.meetings[backend_second].ended

    ended = await stack.call("end", [("meetingID", alias)])
    assert text(ended, "returncode") == "SUCCESS"
    await wait_until(
        lambda: (
            sim_second.meetings.get(backend_second) is None
            or sim_second.meetings[backend_second].ended
        )
    )
    info = await stack.call("getMeetingInfo", [("meetingID", long)])
    assert text(info, "returncode") == "SUCCESS" and text(info, "meetingID") == long
    assert not sim_first.meetings[backend_first].ended
    assert stack.gateway.ledger.get(("acme", long)) is not None
    assert stack.gateway.ledger.get(("acme", alias)) is None
    assert consistency_errors(stack.gateway.ledger.state) == []


# -- 2. apply is total and keeps the indexes consistent ---------------------------------------

KEYS = [("acme", "m1"), ("acme", "m2"), ("globex", "m1"), ("acme", "sha256-x")]
BACKEND_MEETINGS = ["acme~m1", "acme~sha256-x", "shared"]


def reservations(confirmed: st.SearchStrategy[bool]) -> st.SearchStrategy[Reservation]:
    return st.builds(
        lambda key, backend, bmid, size, ok: Reservation(
            key[0], key[1], backend, bmid, size, 60, 0, 1000.0, ok
        ),
        st.sampled_from(KEYS),
        st.sampled_from(["b1", "b2"]),
        st.sampled_from(BACKEND_MEETINGS),
        st.integers(min_value=0, max_value=5),
        confirmed,
    )


class LedgerMachine(RuleBasedStateMachine):
    """Random interleavings of reserve/confirm/release/adopt with colliding keys and
    colliding backend meetings, and backends going down and up (failover's suspension);
    apply never raises and the indexes stay consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.state = LedgerState()

    @rule(r=reservations(st.just(False)))
    def reserve(self, r: Reservation) -> None:
        assert self.state.apply(Reserve(r)) == r
        assert self.state.get(r.key) == r
        assert self.state.by_backend_meeting(r.backend_id, r.backend_meeting_id) == r

    @rule(r=reservations(st.just(True)))
    def adopt(self, r: Reservation) -> None:
        """Reconciliation's adoption: a Reserve of a confirmed reservation."""
        self.state.apply(Reserve(r))
        assert self.state.get(r.key) == r

    @rule(key=st.sampled_from(KEYS))
    def confirm(self, key: tuple[str, str]) -> None:
        before = self.state.get(key)
        after = self.state.apply(Confirm(key))
        assert (after is None) == (before is None)
        assert after is None or after.confirmed

    @rule(key=st.sampled_from(KEYS), reason=st.sampled_from(["end", "gone", "ended"]))
    def release(self, key: tuple[str, str], reason: str) -> None:
        before = self.state.get(key)
        assert self.state.apply(Release(key, reason)) == before
        assert self.state.get(key) is None

    @rule(backend=st.sampled_from(["b1", "b2"]))
    def backend_down(self, backend: str) -> None:
        """Failover: a DOWN backend's reservations stop counting against subscriptions."""
        self.state.suspend(backend)

    @rule(backend=st.sampled_from(["b1", "b2"]))
    def backend_up(self, backend: str) -> None:
        self.state.resume(backend)

    @invariant()
    def consistent(self) -> None:
        assert consistency_errors(self.state) == []


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_newer_reserve_of_a_held_backend_meeting_replaces_the_older() -> None:
    state = LedgerState()
    old = Reservation("acme", "long", "b1", "acme~sha256-x", 5, 60, 0, 1.0, True)
    new = Reservation("acme", "sha256-x", "b1", "acme~sha256-x", 3, 60, 0, 2.0, False)
    state.apply(Reserve(old))
    state.apply(Reserve(new))
    assert state.get(old.key) is None
    assert state.by_backend_meeting("b1", "acme~sha256-x") == new
    assert state.customer_used("acme") == 3 and state.backend_used("b1") == 3
    # the next poll's release of the older key, the KeyError of issue 7, is a no-op now
    assert state.apply(Release(old.key, "gone")) is None
    assert state.apply(Release(new.key, "gone")) == new
    assert len(state) == 0 and consistency_errors(state) == []


# -- 3. replay never bricks a gateway ----------------------------------------------------------

GOOD = Reservation("acme", "m1", "bbb-1", "acme~m1", 5, 60, 0, 1000.5)


def framed(payload: object) -> bytes:
    """A journal line with a right CRC around ``payload``: content damage, not a torn write."""
    body = orjson.dumps(payload)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def reserve_fields(**changes: object) -> dict[str, object]:
    return {"seq": 2, "op": "reserve", **reservation_fields(GOOD), **changes}


BAD_RECORDS = {
    "negative connections": (reserve_fields(connections=-5), "field 'connections' is -5"),
    "negative duration": (reserve_fields(duration=-1), "field 'duration' is -1"),
    "non-string customer": (reserve_fields(customer=7), "field 'customer' is 7"),
    "non-string meeting": (
        {"seq": 2, "op": "confirm", "customer": "acme", "meeting_id": ["m1"]},
        "field 'meeting_id' is ['m1']",
    ),
    "unknown kind": (
        {"seq": 2, "op": "adopt", "customer": "acme", "meeting_id": "m1"},
        "unknown op 'adopt'",
    ),
    "huge created_at": (reserve_fields(created_at=1e400), "created_at"),
    "not an object": (["reserve", "acme", "m1"], "not a JSON object"),
    "missing field": ({"seq": 2, "op": "release", "customer": "acme"}, "'meeting_id'"),
    "a count that is true": (reserve_fields(connections=True), "field 'connections' is True"),
    "release without reason": (
        {"seq": 2, "op": "release", "customer": "acme", "meeting_id": "m1"},
        "field 'reason' is None",
    ),
    "a gap in seq": (
        {"seq": 5, "op": "release", "customer": "acme", "meeting_id": "m1", "reason": "end"},
        "record 5 follows record 1",
    ),
}


def config_file(tmp_path: Path, state_dir: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[proxy]\nbind = "127.0.0.1:1"\npublic_url = "http://127.0.0.1:1"\n'
        f'state_dir = "{state_dir}"\n'
        '[[backends]]\nid = "bbb-1"\nurl = "http://127.0.0.1:1/bigbluebutton/"\n'
        'secret = "s"\ncapacity = 10\n'
        '[[customers]]\nid = "acme"\nsecret = "c"\nmax_connections = 10\n'
        "default_max_participants = 3\ndefault_duration = 60\n"
    )
    return path


def bbb_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m proxy.cli ARGS`` as a process of its own."""
    command = [sys.executable, "-m", "proxy.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_record_that_cannot_be_applied_stops_start_up_with_exit_3(
    tmp_path: Path, case: str
) -> None:
    payload, reason = BAD_RECORDS[case]
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    first = encode_record(1, Reserve(GOOD))
    segment = state_dir / segment_name(1)
    segment.write_bytes(first + framed(payload) + encode_record(3, Confirm(GOOD.key)))

    done = bbb_proxy("serve", "--config", str(config_file(tmp_path, state_dir)))
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("bbb-proxy: ledger state in state_dir: ")
    assert str(segment) in line and f"byte {len(first)}" in line, line
    assert reason in line, line


def test_a_configuration_error_exits_2_with_one_line(tmp_path: Path) -> None:
    done = bbb_proxy("serve", "--config", str(tmp_path / "missing.toml"))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("bbb-proxy: configuration error: ") and "missing.toml" in line


def test_a_journal_with_aliased_meetings_loads_with_the_newer_one(tmp_path: Path) -> None:
    """What an old gateway wrote for a long meetingID and its hashed form sent short."""
    long = long_id("class")
    shared = backend_meeting_id("acme", long)
    older = Reservation("acme", long, "bbb-1", shared, 5, 60, 0, 1000.0, True)
    newer = Reservation("acme", hashed(long), "bbb-1", shared, 3, 60, 0, 2000.0, True)
    records: list[Record] = [
        Reserve(older),
        Reserve(newer),
        Release(older.key, "gone"),
        Confirm(newer.key),
    ]
    data = b"".join(encode_record(seq, r) for seq, r in enumerate(records, 1))
    (tmp_path / segment_name(1)).write_bytes(data)
    state, _ = load_state(tmp_path)
    assert list(state) == [newer]
    assert consistency_errors(state) == []


def test_the_cli_unwraps_a_state_error_out_of_a_task_group(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(args: object) -> None:
        inner = ExceptionGroup("nursery", [StateError("cannot write /s/journal: No space")])
        raise ExceptionGroup("outer", [inner])

    monkeypatch.setattr(cli, "_run", failing)
    assert cli.main(["serve", "--config", "x"]) == 3
    assert capsys.readouterr().err == (
        "bbb-proxy: ledger state in state_dir: cannot write /s/journal: No space\n"
    )


@pytest.mark.parametrize("grouped", [False, True])
def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, grouped: bool) -> None:
    def interrupted(args: object) -> None:
        if grouped:
            raise BaseExceptionGroup("nursery", [KeyboardInterrupt()])
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["serve"]) == 130


def test_a_bug_out_of_a_task_group_is_not_called_a_state_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def mixed(args: object) -> None:
        raise ExceptionGroup("nursery", [StateError("disk"), RuntimeError("bug")])

    monkeypatch.setattr(cli, "_run", mixed)
    with pytest.raises(ExceptionGroup):
        cli.main(["serve"])


def test_a_snapshot_that_cannot_be_applied_exits_3(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    body = orjson.dumps([reservation_fields(GOOD) | {"connections": -1}])
    header = b"bbb-ledger-snapshot 1 1 1 %08x\n" % zlib.crc32(body)
    (state_dir / "snapshot").write_bytes(header + body)
    done = bbb_proxy("serve", "--config", str(config_file(tmp_path, state_dir)))
    assert done.returncode == 3, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert str(state_dir / "snapshot") in line and "field 'connections' is -1" in line
