"""The durable ledger store: formats, replay, torn tails, corruption, compaction, group commit."""

from __future__ import annotations

import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import StateError
from proxy.ledger.codec import (
    Segment,
    Snapshot,
    decode_snapshot,
    encode_record,
    encode_snapshot,
    replay,
    scan_segment,
)
from proxy.ledger.journal import (
    SNAPSHOT,
    SNAPSHOT_TMP,
    FileJournal,
    load_state,
    open_durable_ledger,
    segment_name,
)
from proxy.ledger.model import (
    BackendSpec,
    Confirm,
    CreateRequest,
    LedgerState,
    Record,
    Release,
    Reservation,
    Reserve,
)
from proxy.ledger.service import Ledger
from proxy.placement import BackendLoad, Ring

BACKENDS = [BackendSpec("b1", 60, True), BackendSpec("b2", 60, True)]
RING = Ring([b.id for b in BACKENDS])


def reservation(meeting: str = "m1", customer: str = "acme", size: int = 5) -> Reservation:
    return Reservation(customer, meeting, "b1", f"{customer}~{meeting}", size, 60, 0, 1000.5)


def records(count: int) -> list[Record]:
    """Reserve, confirm and (every third) release ``count`` meetings' worth of records."""
    out: list[Record] = []
    for i in range(count):
        r = reservation(f"m{i}")
        out += [Reserve(r), Confirm(r.key)]
        if i % 3 == 2:
            out.append(Release(r.key, "end"))
    return out


def applied(rs: list[Record]) -> LedgerState:
    state = LedgerState()
    for record in rs:
        state.apply(record)
    return state


def contents(state: LedgerState) -> tuple[list[Reservation], object]:
    stats = state.statistics()
    counts = (dict(stats.connections_by_customer), dict(stats.connections_by_backend))
    return sorted(state, key=lambda r: r.key), counts


def write_journal(state_dir: Path, rs: list[Record], generation: int = 1, first: int = 1) -> Path:
    state_dir.mkdir(exist_ok=True)
    path = state_dir / segment_name(generation)
    path.write_bytes(b"".join(encode_record(first + i, r) for i, r in enumerate(rs)))
    return path


def segment_sizes(state_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(state_dir.glob("journal.*"))}


# -- the format --------------------------------------------------------------------------------

texts = st.text(min_size=0, max_size=12)
reservations = st.builds(
    Reservation,
    customer=texts,
    meeting_id=texts,
    backend_id=texts,
    backend_meeting_id=texts,
    connections=st.integers(0, 10**6),
    duration=st.integers(0, 10**5),
    asked_duration=st.integers(-(10**5), 10**5),
    created_at=st.floats(0, 4e9, allow_nan=False),
    confirmed=st.booleans(),
)
any_record: st.SearchStrategy[Record] = st.one_of(
    st.builds(Reserve, reservations),
    st.builds(Confirm, st.tuples(texts, texts)),
    st.builds(Release, st.tuples(texts, texts), texts),
)


@given(st.lists(any_record, max_size=5), st.integers(0, 10**9))
def test_every_record_type_round_trips(rs: list[Record], first: int) -> None:
    data = b"".join(encode_record(first + i, r) for i, r in enumerate(rs))
    segment = scan_segment(data, "j")
    assert [(e.seq, e.record) for e in segment.entries] == list(enumerate(rs, first))
    assert (segment.good_length, segment.torn) == (len(data), False)


@given(st.lists(reservations, max_size=5), st.integers(0, 10**9))
def test_snapshot_round_trips(rs: list[Reservation], seq: int) -> None:
    snapshot = Snapshot(seq, tuple(rs))
    assert decode_snapshot(encode_snapshot(snapshot), "s") == snapshot


def test_a_record_with_a_right_crc_but_wrong_content_is_corruption_even_last() -> None:
    data = encode_record(1, Reserve(reservation())).replace(
        b'"connections":5', b'"connections":"5"'
    )
    assert b'"5"' in data
    body = data[9:-1]
    line = b"%08x %s\n" % (zlib.crc32(body), body)
    with pytest.raises(StateError, match=r"j: invalid record at byte 0: field 'connections'"):
        scan_segment(line, "j")


def test_a_gap_in_seq_is_corruption() -> None:
    rs = records(2)
    data = encode_record(1, rs[0]) + encode_record(3, rs[1])
    with pytest.raises(StateError, match="record 3 follows record 1"):
        replay(Snapshot(0, ()), [("j", scan_segment(data, "j"))])


# -- replay equals the live state --------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.integers(0, 2), st.integers(0, 5), st.integers(1, 30)),
        st.tuples(st.just("confirm"), st.integers(0, 20)),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("tick"), st.integers(1, 120)),
        st.tuples(st.just("snapshot")),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_replay_equals_the_live_state(ops: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        live = trio.run(run_operations, state_dir, ops)
        loaded, position = load_state(state_dir)
        assert contents(loaded) == contents(live)
        assert position.last_seq >= position.snapshot_seq


async def run_operations(state_dir: Path, ops: list[tuple[object, ...]]) -> LedgerState:
    now = [0.0]
    state, position = load_state(state_dir)
    journal = FileJournal(state_dir, position)
    ledger = Ledger(state, journal, clock=lambda: now[0])
    for op in ops:
        await run_operation(ledger, journal, op, now)
    await ledger.durable()
    journal.close()
    return ledger.state


async def run_operation(
    ledger: Ledger, journal: FileJournal, op: tuple[object, ...], now: list[float]
) -> None:
    meetings = sorted(ledger.state, key=lambda r: r.key)
    match op:
        case ("create", int(customer), int(meeting), int(size)):
            req = CreateRequest(
                f"c{customer}", f"m{meeting}", f"c{customer}~m{meeting}", size, 1, 1
            )

            def choose(loads: Mapping[str, BackendLoad]) -> str | None:
                return RING.choose(req.backend_meeting_id, req.connections, loads)

            ledger.admit(req, 40, BACKENDS, choose)
            await ledger.durable()
        case ("confirm", int(i)) if meetings:
            await ledger.confirm(meetings[i % len(meetings)].key)
        case ("release", int(i)) if meetings:
            await ledger.release(meetings[i % len(meetings)].key, "end")
        case ("tick", int(minutes)):
            now[0] += minutes * 60
        case ("snapshot",):
            await journal.snapshot(ledger.state)


# -- torn tails and corruption -----------------------------------------------------------------


def test_a_torn_last_record_is_dropped_at_every_cut(tmp_path: Path) -> None:
    rs = records(4)
    path = write_journal(tmp_path / "full", rs)
    whole = path.read_bytes()
    last_start = len(whole) - len(encode_record(len(rs), rs[-1]))
    for cut in range(last_start, len(whole) + 1):
        state_dir = tmp_path / f"cut{cut}"
        write_journal(state_dir, []).write_bytes(whole[:cut])
        loaded, position = load_state(state_dir)
        kept = rs if cut == len(whole) else rs[:-1]
        assert contents(loaded) == contents(applied(kept)), cut
        assert position.last_seq == len(kept)
        expected_length = len(whole) if cut == len(whole) else last_start
        assert (state_dir / segment_name(1)).stat().st_size == expected_length


def test_a_garbled_last_record_is_dropped_and_the_file_truncated(tmp_path: Path) -> None:
    rs = records(3)
    path = write_journal(tmp_path, rs)
    whole = bytearray(path.read_bytes())
    last_start = len(whole) - len(encode_record(len(rs), rs[-1]))
    whole[last_start + 20] ^= 0x01
    path.write_bytes(bytes(whole))
    loaded, _ = load_state(tmp_path)
    assert contents(loaded) == contents(applied(rs[:-1]))
    assert path.stat().st_size == last_start
    # and the journal continues after the good part: a second load sees the same
    assert contents(load_state(tmp_path)[0]) == contents(loaded)


def test_a_corrupt_middle_record_stops_start_up(tmp_path: Path) -> None:
    rs = records(3)
    path = write_journal(tmp_path, rs)
    whole = bytearray(path.read_bytes())
    second = len(encode_record(1, rs[0]))
    whole[second + 15] ^= 0x20
    path.write_bytes(bytes(whole))
    with pytest.raises(StateError, match=rf"{path}: corrupt record at byte {second}, followed"):
        load_state(tmp_path)
    assert path.read_bytes() == bytes(whole)  # nothing truncated


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],
        lambda b: b[:-3] + b"x" + b[-2:],
        lambda b: b.replace(b"bbb-ledger-snapshot", b"bbb-ledger-snapshoT"),
        lambda b: b"",
        lambda b: b.replace(b"snapshot 1 ", b"snapshot 2 "),
    ],
)
def test_a_corrupt_snapshot_stops_start_up(tmp_path: Path, damage: object) -> None:
    assert callable(damage)
    data = encode_snapshot(Snapshot(3, (reservation("a"), reservation("b"))))
    (tmp_path / SNAPSHOT).write_bytes(damage(data))
    with pytest.raises(StateError, match=rf"{tmp_path / SNAPSHOT}: "):
        load_state(tmp_path)


def test_an_unreadable_file_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / SNAPSHOT).mkdir()  # reading a directory fails even for root
    with pytest.raises(StateError, match=rf"cannot read {tmp_path / SNAPSHOT}"):
        load_state(tmp_path)


def test_a_missing_state_dir_is_a_fresh_start(tmp_path: Path) -> None:
    loaded, position = load_state(tmp_path / "a" / "b")
    assert len(loaded) == 0 and position.last_seq == 0
    assert (tmp_path / "a" / "b").is_dir()


# -- compaction and crashes around it ----------------------------------------------------------


async def test_a_crash_between_snapshot_rename_and_segment_removal(tmp_path: Path) -> None:
    rs = records(6)
    state, position = load_state(tmp_path)
    journal = FileJournal(tmp_path, position)
    for record in rs[:8]:
        journal.append(record)
        state.apply(record)
    await journal.flush()
    old_segment = tmp_path / segment_name(1)
    kept = old_segment.read_bytes()
    await journal.snapshot(state)
    assert not old_segment.exists()
    for record in rs[8:]:
        journal.append(record)
        state.apply(record)
    await journal.flush()
    journal.close()
    old_segment.write_bytes(kept)  # as if the crash came before the removal

    loaded, position = load_state(tmp_path)
    assert contents(loaded) == contents(state) == contents(applied(rs))
    assert (position.snapshot_seq, position.last_seq) == (8, len(rs))


async def test_a_crash_before_the_snapshot_rename_leaves_the_old_state(tmp_path: Path) -> None:
    rs = records(4)
    write_journal(tmp_path, rs)
    (tmp_path / SNAPSHOT_TMP).write_bytes(b"bbb-ledger-snapshot 1 99 1 0000")  # half written
    loaded, _ = load_state(tmp_path)
    assert contents(loaded) == contents(applied(rs))
    assert not (tmp_path / SNAPSHOT_TMP).exists()


async def test_records_buffered_during_a_snapshot_are_not_counted_twice(tmp_path: Path) -> None:
    rs = records(4)
    state, position = load_state(tmp_path)
    journal = FileJournal(tmp_path, position)
    for record in rs:
        journal.append(record)
        state.apply(record)
    await journal.snapshot(state)  # covers records still only in the buffer
    await journal.flush()  # ... which now land in the new segment
    journal.close()
    loaded, position = load_state(tmp_path)
    assert contents(loaded) == contents(applied(rs))
    assert position.snapshot_seq == position.last_seq == len(rs)


# -- group commit, failure ---------------------------------------------------------------------


async def test_concurrent_flushes_share_fsyncs_and_all_are_durable(tmp_path: Path) -> None:
    state, position = load_state(tmp_path)
    journal = FileJournal(tmp_path, position)
    rs = records(60)
    flushed: list[int] = []

    async def append_and_flush(i: int) -> None:
        journal.append(rs[i])
        state.apply(rs[i])
        await journal.flush()
        flushed.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(len(rs)):
            nursery.start_soon(append_and_flush, i)
    journal.close()

    stats = journal.statistics()
    assert len(flushed) == stats.flushes == stats.records_written == len(rs)
    assert stats.batches < stats.flushes
    assert stats.fsyncs < stats.flushes
    assert stats.pending == 0
    assert contents(load_state(tmp_path)[0]) == contents(state)  # tasks ran in any order


async def test_without_fsync_nothing_is_fsynced_but_all_is_written(tmp_path: Path) -> None:
    _, position = load_state(tmp_path)
    journal = FileJournal(tmp_path, position, fsync=False)
    for record in records(3):
        journal.append(record)
        await journal.flush()
    journal.close()
    assert journal.statistics().fsyncs == 0
    assert journal.statistics().records_written == len(records(3))
    assert contents(load_state(tmp_path)[0]) == contents(applied(records(3)))


# A failed write no longer fails the journal for good: tests/test_storage_faults.py.


# -- the durable ledger ------------------------------------------------------------------------


async def test_a_final_snapshot_is_written_on_exit(tmp_path: Path) -> None:
    async with open_durable_ledger(tmp_path, snapshot_every=3600) as ledger:
        for record in records(5):
            await ledger.record(record)
        live = contents(ledger.state)
    snapshot = decode_snapshot((tmp_path / SNAPSHOT).read_bytes(), "s")
    assert snapshot.seq == len(records(5))
    assert sorted(snapshot.reservations, key=lambda r: r.key) == live[0]
    assert all(size == 0 for size in segment_sizes(tmp_path).values())
    async with open_durable_ledger(tmp_path) as again:
        assert contents(again.state) == live


async def test_a_final_snapshot_is_written_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        async with open_durable_ledger(tmp_path) as ledger:
            await ledger.record(Reserve(reservation()))
            raise KeyError("boom")
    assert decode_snapshot((tmp_path / SNAPSHOT).read_bytes(), "s").seq == 1


async def until(condition: Callable[[], bool]) -> None:
    """Checkpoint until ``condition`` holds; snapshots run in worker threads, in real time.

    (Under ``autojump_clock`` the clock would jump while a worker thread works, so
    these tests move a manual ``mock_clock`` themselves.)
    """
    give_up = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < give_up, "condition never held"
        await trio.lowlevel.checkpoint()


async def test_periodic_snapshots_only_when_something_changed(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with open_durable_ledger(tmp_path, snapshot_every=60) as ledger:
        journal = ledger.journal
        assert isinstance(journal, FileJournal)
        await ledger.record(Reserve(reservation()))
        mock_clock.jump(59)
        await trio.testing.wait_all_tasks_blocked()
        assert journal.statistics().snapshots == 0
        mock_clock.jump(2)
        await until(lambda: journal.statistics().snapshots == 1)
        for _ in range(10):
            mock_clock.jump(60)
            await trio.testing.wait_all_tasks_blocked()
        assert journal.statistics().snapshots == 1  # nothing changed since
        await ledger.confirm(reservation().key)
        mock_clock.jump(60)
        await until(lambda: journal.statistics().snapshots == 2)


async def test_a_long_journal_triggers_a_snapshot(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with open_durable_ledger(tmp_path, snapshot_records=10) as ledger:
        journal = ledger.journal
        assert isinstance(journal, FileJournal)
        for record in records(3):  # 7 records
            await ledger.record(record)
        await trio.testing.wait_all_tasks_blocked()
        assert journal.statistics().snapshots == 0
        for record in records(6)[7:]:  # 7 more
            await ledger.record(record)
        await until(lambda: journal.statistics().snapshots == 1)
        await trio.testing.wait_all_tasks_blocked()
        assert journal.statistics().snapshots == 1
        assert list(segment_sizes(tmp_path)) == [segment_name(2)]


async def test_a_state_dir_serves_one_process(tmp_path: Path) -> None:
    async with open_durable_ledger(tmp_path):
        with pytest.raises(StateError, match="in use by another process"):
            async with open_durable_ledger(tmp_path):
                pass  # pragma: no cover


async def test_corrupt_state_stops_the_durable_ledger(tmp_path: Path) -> None:
    (tmp_path / SNAPSHOT).write_bytes(b"not a snapshot\n")
    with pytest.raises(StateError, match="not a ledger snapshot"):
        async with open_durable_ledger(tmp_path):
            pass  # pragma: no cover


def test_scan_reports_a_torn_tail_without_raising() -> None:
    data = encode_record(1, Confirm(("a", "b")))
    assert scan_segment(data + b"0000", "j") == Segment(
        (scan_segment(data, "j").entries), len(data), torn=True
    )
