"""The store's local log: replay, torn tails, corruption, kill -9, compaction, bounds.

The storage faults that need a real file system (full, read-only) are in
``tests/test_store_faults.py``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proxy.store.local as local_module
import proxy.store.logfile as logfile_module
from proxy.errors import StateError, StorageUnavailable
from proxy.store import MAX_RECORD_BYTES, Json, Log, MemoryLog, Record, open_local_log
from proxy.store.framing import frame
from proxy.store.local import LocalLog, log_path, open_log
from tests.test_storage_faults import until


def reopened(state_dir: Path, name: str = "hooks") -> list[Record]:
    return open_local_log(state_dir, name, timeout=5)[1]


async def written(state_dir: Path, records: list[Record], name: str = "hooks") -> LocalLog:
    log, _ = open_local_log(state_dir, name, timeout=5)
    for record in records:
        log.append(record)
    await log.flush()
    return log


RECORDS: list[Record] = [
    {"op": "create", "id": "h1", "events": ["user-joined", "meeting-ended"], "n": 3},
    {"op": "create", "id": "h2", "url": "https://lms.example/hook?ä=ß", "at": 17.25},
    {"op": "destroy", "id": "h1", "nested": {"a": [1, {"b": None}], "t": True}},
]


# -- replay ------------------------------------------------------------------------------------


async def test_flushed_records_are_replayed_after_a_restart_in_order(tmp_path: Path) -> None:
    await written(tmp_path, RECORDS[:2])
    log, replayed = open_local_log(tmp_path, "hooks", timeout=5)
    assert replayed == RECORDS[:2]
    log.append(RECORDS[2])
    await log.flush()
    assert reopened(tmp_path) == RECORDS
    assert reopened(tmp_path, "webhook-queue") == []  # each log its own file


async def test_records_appended_but_never_flushed_are_not_on_disk(tmp_path: Path) -> None:
    log = await written(tmp_path, RECORDS[:1])
    log.append(RECORDS[1])
    assert reopened(tmp_path) == RECORDS[:1]
    assert log.statistics().pending == 1


async def test_concurrent_flushes_share_one_batch(tmp_path: Path) -> None:
    log, _ = open_local_log(tmp_path, "hooks", timeout=5)

    async def change(i: int) -> None:
        log.append({"i": i})
        await log.flush()

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(change, i)
    assert sorted(r["i"] for r in reopened(tmp_path)) == list(range(20))  # type: ignore[type-var]
    stats = log.statistics()
    assert stats.records_written == 20
    assert stats.batches < 20


def test_a_missing_state_dir_is_created_and_a_fresh_start(tmp_path: Path) -> None:
    assert reopened(tmp_path / "a" / "b") == []
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("name", ["", "Hooks", "../ledger", "a/b", "x" * 64, "-a"])
def test_a_log_name_is_a_short_slug(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="log name"):
        log_path(tmp_path, name)


# -- torn tails and corruption -----------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        b"0badc0de {",  # cut in the middle of the line
        frame(b'{"op":"x"}')[:-1],  # all but its newline
        b"00000000 {}\n",  # a complete line whose CRC is wrong (its end never reached disk)
        b"\0\0\0\0\0\0",  # zeros: the file grew before its data was written
    ],
)
async def test_a_torn_last_record_is_cut_off_with_a_warning(
    tmp_path: Path, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    await written(tmp_path, RECORDS[:2])
    path = log_path(tmp_path, "hooks")
    good = path.stat().st_size
    with path.open("ab") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING):
        log, replayed = open_local_log(tmp_path, "hooks", timeout=5)
    assert replayed == RECORDS[:2]
    assert path.stat().st_size == good
    assert f"dropping a torn last record (bytes {good} to {good + len(tail)})" in caplog.text
    log.append(RECORDS[2])  # what follows is not glued to the torn bytes
    await log.flush()
    assert reopened(tmp_path) == RECORDS


async def test_a_damaged_record_followed_by_an_intact_one_is_corruption(tmp_path: Path) -> None:
    await written(tmp_path, RECORDS)
    path = log_path(tmp_path, "hooks")
    data = bytearray(path.read_bytes())
    second = data.index(b"\n") + 1
    data[second + 20] ^= 0x01  # a flipped bit in the second of three records
    path.write_bytes(bytes(data))
    third = data.index(b"\n", second) + 1
    with pytest.raises(StateError) as caught:
        reopened(tmp_path)
    message = str(caught.value)
    assert str(path) in message
    assert f"corrupt record at byte {second}" in message
    assert f"intact record at byte {third}" in message
    assert path.read_bytes() == bytes(data)  # nothing cut: an operator decides


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[1, 2]", "not a JSON object"),
        (b"{no json", "unexpected character"),
        (b'"s"', "not a JSON"),
    ],
)
async def test_a_well_framed_line_that_is_not_a_record_is_corruption(
    tmp_path: Path, body: bytes, why: str
) -> None:
    await written(tmp_path, RECORDS[:1])
    path = log_path(tmp_path, "hooks")
    offset = path.stat().st_size
    with path.open("ab") as f:
        f.write(frame(body))  # even as the last line: its CRC says it was written whole
    with pytest.raises(StateError, match=f"{path}: invalid record at byte {offset}: {why}"):
        reopened(tmp_path)


async def test_a_file_over_the_replay_bound_is_refused(tmp_path: Path) -> None:
    await written(tmp_path, RECORDS)
    size = log_path(tmp_path, "hooks").stat().st_size
    with pytest.raises(StateError, match=f"over {size - 1} bytes"):
        open_log(tmp_path, "hooks", timeout=5, max_bytes=size - 1)
    assert open_log(tmp_path, "hooks", timeout=5, max_bytes=size)[1] == RECORDS


async def test_a_record_line_over_the_bound_is_corruption(tmp_path: Path) -> None:
    path = log_path(tmp_path, "hooks")
    path.write_bytes(frame(orjson.dumps({"x": "y" * MAX_RECORD_BYTES})) + frame(b"{}"))
    with pytest.raises(StateError, match="record at byte 0 is over"):
        reopened(tmp_path)


def test_an_unreadable_log_stops_start_up_naming_it(tmp_path: Path) -> None:
    log_path(tmp_path, "hooks").mkdir()  # a directory where the file should be
    with pytest.raises(StateError, match=r"cannot read .*hooks\.log"):
        reopened(tmp_path)


# -- what append refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"x": float("nan")},
        {"x": [float("inf")]},
        {"x": b"bytes"},
        {"x": {1, 2}},
        {"x": "a" * MAX_RECORD_BYTES},
        {"x": 2**64},
        ["not", "a", "mapping"],
    ],
)
async def test_append_refuses_what_is_not_a_bounded_json_record(
    tmp_path: Path, record: object
) -> None:
    log, _ = open_local_log(tmp_path, "hooks", timeout=5)
    memory = MemoryLog()
    for store in (log, memory):
        with pytest.raises(ValueError):
            store.append(record)  # type: ignore[arg-type]
    assert log.statistics().records_appended == 0
    assert memory.pending == []


async def test_tuples_and_mappings_are_stored_as_arrays_and_objects(tmp_path: Path) -> None:
    from types import MappingProxyType

    record: dict[str, Json] = {"t": ("a", 1), "m": MappingProxyType({"k": [2]})}
    await written(tmp_path, [record])
    assert reopened(tmp_path) == [{"t": ["a", 1], "m": {"k": [2]}}]


# -- compaction --------------------------------------------------------------------------------


async def test_compaction_replaces_the_content_and_later_records_follow(tmp_path: Path) -> None:
    log = await written(tmp_path, RECORDS)
    log.append({"op": "pending, covered by the compaction"})
    await log.compact([{"op": "state", "hooks": ["h2"]}])
    assert log.statistics().pending == 0
    await log.flush()  # nothing left to write
    log.append({"op": "after"})
    await log.flush()
    assert reopened(tmp_path) == [{"op": "state", "hooks": ["h2"]}, {"op": "after"}]
    assert not log_path(tmp_path, "hooks").with_suffix(".log.tmp").exists()


async def test_records_appended_while_a_compaction_writes_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await written(tmp_path, RECORDS[:1])
    writing, resume = threading.Event(), threading.Event()
    real = logfile_module.write_synced

    def slow(path: Path, data: bytes, mode: int) -> None:
        writing.set()
        resume.wait(10)
        real(path, data, mode)

    monkeypatch.setattr(logfile_module, "write_synced", slow)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.compact, [{"op": "state"}])
        await trio.to_thread.run_sync(writing.wait)
        log.append({"op": "during, flushed to the old file"})
        await log.flush()
        log.append({"op": "during, pending"})
        monkeypatch.setattr(logfile_module, "write_synced", real)
        resume.set()
    assert log.statistics().pending == 0  # the new file holds it
    assert reopened(tmp_path) == [
        {"op": "state"},
        {"op": "during, flushed to the old file"},
        {"op": "during, pending"},
    ]


@pytest.mark.parametrize("step", ["write_synced", "finish_compaction"])
async def test_a_compaction_that_fails_keeps_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    log = await written(tmp_path, RECORDS)
    log.append({"op": "pending"})

    def broken(*args: object) -> None:
        raise StateError("cannot write: No space left on device")

    monkeypatch.setattr(logfile_module, step, broken)
    with pytest.raises(StorageUnavailable):
        await log.compact([{"op": "state"}])
    # Writing the new file failed: the log still writes.  The rename failed: which file
    # is in place is settled by the next flush.
    assert log.failed is (step == "finish_compaction")
    log.append({"op": "after"})
    await log.flush()
    assert not log.failed
    assert reopened(tmp_path) == [*RECORDS, {"op": "pending"}, {"op": "after"}]
    assert not log_path(tmp_path, "hooks").with_suffix(".log.tmp").exists()


def freeze(monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[threading.Event, threading.Event]:
    """Make ``logfile.<name>`` wait for the second event; the first says it started."""
    started, thawed = threading.Event(), threading.Event()
    real = getattr(logfile_module, name)

    def frozen(*args: object) -> object:
        started.set()
        thawed.wait(10)
        return real(*args)

    monkeypatch.setattr(logfile_module, name, frozen)
    return started, thawed


async def test_records_appended_while_the_new_file_is_renamed_follow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await written(tmp_path, RECORDS[:1])
    log.append({"op": "pending at the call"})
    started, thawed = freeze(monkeypatch, "finish_compaction")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.compact, [{"op": "state"}])
        await trio.to_thread.run_sync(started.wait)
        log.append({"op": "during the rename"})  # not in the new file: still to write
        thawed.set()
    assert log.statistics().pending == 1
    await log.flush()
    assert reopened(tmp_path) == [{"op": "state"}, {"op": "during the rename"}]


async def test_a_compaction_called_while_a_flush_writes_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await written(tmp_path, RECORDS[:1])
    started, thawed = freeze(monkeypatch, "write_batch")
    log.append({"op": "being written"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.flush)
        await trio.to_thread.run_sync(started.wait)
        nursery.start_soon(log.compact, [{"op": "state"}])
        await trio.sleep(0.05)
        thawed.set()
    assert log.statistics().compactions == 1
    assert reopened(tmp_path) == [{"op": "state"}]


@pytest.mark.parametrize("renamed", [True, False])
async def test_a_rename_that_overruns_is_settled_when_its_thread_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renamed: bool
) -> None:
    log, _ = open_local_log(tmp_path, "hooks", timeout=0.1)  # compactions: 3 s
    log.compaction_timeout = 0.3
    for record in RECORDS:
        log.append(record)
    await log.flush()
    log.append({"op": "pending"})
    if renamed:
        _, thawed = freeze(monkeypatch, "finish_compaction")
    else:  # the rename never happens: the thread fails before it
        thawed = threading.Event()
        monkeypatch.setattr(logfile_module, "finish_compaction", _fails_after(thawed))
    with pytest.raises(StorageUnavailable):
        await log.compact([{"op": "state"}])
    assert log.failed
    log.append({"op": "after"})
    with pytest.raises(StorageUnavailable):
        await log.flush()  # not while the abandoned thread runs
    thawed.set()
    with trio.fail_after(5):
        while not await log.recover():  # noqa: ASYNC110 - until the abandoned thread returns
            await trio.sleep(0.01)
    # "pending" was appended before the call: the compacted state stands for it
    expected = [{"op": "state"}] if renamed else [*RECORDS, {"op": "pending"}]
    assert reopened(tmp_path) == [*expected, {"op": "after"}]
    assert not log_path(tmp_path, "hooks").with_suffix(".log.tmp").exists()


def _fails_after(thawed: threading.Event) -> Callable[[Path, bytes, Path], None]:
    def finish(tmp: Path, tail: bytes, path: Path) -> None:
        thawed.wait(10)
        raise StateError(f"cannot write {tmp}: Input/output error")

    return finish


async def test_a_crash_before_the_rename_leaves_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between writing the new file and renaming it: the old file, and a stray tmp."""
    log = await written(tmp_path, RECORDS)

    def crash(*args: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        await log.compact([{"op": "state"}])
    monkeypatch.undo()
    tmp = log_path(tmp_path, "hooks").with_suffix(".log.tmp")
    assert orjson.loads(tmp.read_bytes()[9:]) == {"op": "state"}
    assert reopened(tmp_path) == RECORDS
    assert not tmp.exists()


async def test_compaction_is_due_once_the_file_doubled(tmp_path: Path) -> None:
    log, _ = open_local_log(tmp_path, "hooks", timeout=5)
    big = {"x": "y" * 100_000}
    while not log.compaction_due:
        log.append(big)
        await log.flush()
    assert log.statistics().size > local_module.COMPACT_MIN_BYTES
    await log.compact([big])
    assert not log.compaction_due


async def test_maintain_compacts_when_due(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    log, _ = open_local_log(tmp_path, "hooks", timeout=math.inf)  # the clock jumps meanwhile
    state = [{"x": "y" * 100_000}]
    for _ in range(25):
        log.append(state[0])
    await log.flush()
    assert log.compaction_due
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.maintain, lambda: state)
        while log.statistics().compactions == 0:  # noqa: ASYNC110 - a worker thread writes
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert reopened(tmp_path) == state


# -- the size bound ----------------------------------------------------------------------------


async def test_a_log_at_its_bound_refuses_to_grow_until_compacted(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path, "hooks", timeout=5, max_bytes=4096)
    record = {"x": "y" * 1000}
    with pytest.raises(StorageUnavailable) as caught:
        for _ in range(5):
            log.append(record)
            await log.flush()
    assert "compact it" in str(caught.value.__cause__)
    assert log.failed
    assert not await log.recover()  # writing the queue again would still pass it
    await log.compact([record])  # the owner's state is small: compaction heals
    assert not log.failed
    assert open_log(tmp_path, "hooks", timeout=5, max_bytes=4096)[1] == [record]


# -- frozen disk -------------------------------------------------------------------------------


async def test_a_frozen_write_fails_the_flush_in_time_and_recovers_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, _ = open_local_log(tmp_path, "hooks", timeout=0.3)
    log.append(RECORDS[0])
    await log.flush()
    _, thawed = freeze(monkeypatch, "write_batch")
    log.append(RECORDS[1])
    started = trio.current_time()
    with pytest.raises(StorageUnavailable):
        await log.flush()
    assert trio.current_time() - started < 1
    assert log.failed
    assert not await log.recover()  # not while the abandoned write runs
    log.append(RECORDS[2])
    thawed.set()
    with trio.fail_after(5):
        while not await log.recover():  # noqa: ASYNC110 - until the abandoned thread returns
            await trio.sleep(0.01)
    assert not log.failed
    assert reopened(tmp_path) == RECORDS  # the abandoned batch is not written twice
    stats = log.statistics()
    assert (stats.failures, stats.recoveries) == (1, 1)


# -- MemoryLog ---------------------------------------------------------------------------------


async def test_memory_log_keeps_what_a_restart_would_replay() -> None:
    memory = MemoryLog([RECORDS[0]])
    memory.append(RECORDS[1])
    assert memory.replayed() == [RECORDS[0]]
    memory.failed = True
    with pytest.raises(StorageUnavailable):
        await memory.flush()
    with pytest.raises(StorageUnavailable):
        await memory.compact([])
    memory.failed = False
    await memory.flush()
    assert memory.replayed() == RECORDS[:2]
    await memory.compact([RECORDS[2]])
    assert memory.replayed() == [RECORDS[2]]
    memory.replayed()[0]["op"] = "changed"  # a copy
    assert memory.replayed() == [RECORDS[2]]


def test_both_logs_are_logs(tmp_path: Path) -> None:
    logs: list[Log] = [MemoryLog(), open_local_log(tmp_path, "hooks", timeout=1)[0]]
    assert [log.failed for log in logs] == [False, False]


# -- kill -9 -----------------------------------------------------------------------------------

CHILD = """
import sys, trio
from pathlib import Path
from proxy.store import open_local_log

async def main() -> None:
    log, records = open_local_log(Path(sys.argv[1]), "hooks", timeout=5)
    n = len(records)
    while True:
        log.append({"n": n, "pad": "x" * (n % 300)})
        await log.flush()
        if n % 37 == 36:
            await log.compact({"n": i, "pad": "x" * (i % 300)} for i in range(n + 1))
        print(n, flush=True)
        n += 1

trio.run(main)
"""


async def run_until_killed(state_dir: Path, acks: int) -> int:
    """Run the child until it acknowledged ``acks`` more records, SIGKILL it; the last ack."""
    command = [sys.executable, "-c", CHILD, str(state_dir)]
    output = b""
    child = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        with trio.fail_after(60):
            while output.count(b"\n") < acks:
                chunk = await child.stdout.receive_some()
                assert chunk, "the child died"
                output += chunk
            child.send_signal(signal.SIGKILL)
            while chunk := await child.stdout.receive_some():  # acknowledged before it died
                output += chunk
    finally:
        child.kill()
        await child.wait()
        if child.stdout is not None:
            await child.stdout.aclose()
    assert child.returncode == -signal.SIGKILL
    return int(output.split(b"\n")[-2])  # the last complete line


async def test_kill_9_in_the_middle_of_appends_loses_no_flushed_record(tmp_path: Path) -> None:
    rounds = random.Random(7)
    for _ in range(6):
        last_ack = await run_until_killed(tmp_path, rounds.randint(5, 120))
        replayed = reopened(tmp_path)
        numbers = [r["n"] for r in replayed]
        assert numbers == list(range(len(numbers))), "a gap, a repeat or a reordering"
        assert len(numbers) > last_ack, f"record {last_ack} was acknowledged, then lost"
        assert all(r["pad"] == "x" * (i % 300) for i, r in enumerate(replayed))


# -- property: whatever the sequence, a reopen replays the model -------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8).filter(str.isprintable), inner, max_size=4)
    ),
    max_leaves=12,
)
records = st.dictionaries(st.text(max_size=8).filter(str.isprintable), json_values, max_size=5)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), records),
        st.tuples(st.just("flush"), st.none()),
        st.tuples(st.just("compact"), st.lists(records, max_size=4)),
        st.tuples(
            st.just("compact-while-appending"),
            st.tuples(st.lists(records, max_size=3), st.lists(records, max_size=3)),
        ),
        st.tuples(st.just("reopen"), st.none()),
        st.tuples(
            st.just("torn"), st.binary(min_size=1, max_size=30).filter(lambda b: b[-1:] != b"\n")
        ),
    ),
    max_size=25,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_any_sequence_of_appends_compactions_and_restarts_replays_the_model(
    ops: list[tuple[str, object]],
) -> None:
    async def run(state_dir: Path) -> None:
        log, replayed = open_local_log(state_dir, "p", timeout=5)
        durable: list[object] = []  # what a restart must replay
        pending: list[object] = []
        for op, arg in ops:
            match op:
                case "append":
                    log.append(arg)  # type: ignore[arg-type]
                    pending.append(arg)
                case "flush":
                    await log.flush()
                    durable, pending = durable + pending, []
                case "compact":
                    await log.compact(arg)  # type: ignore[arg-type]
                    durable, pending = list(arg), []  # type: ignore[call-overload]
                case "compact-while-appending":
                    content: list[Record] = arg[0]  # type: ignore[index]
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(log.compact, content)
                        while not log._watches:  # until compact() has been called
                            await trio.lowlevel.checkpoint()
                        for record in arg[1]:  # type: ignore[index]
                            log.append(record)
                    await log.flush()  # some may have been appended after the new file
                    durable, pending = [*content, *arg[1]], []  # type: ignore[index]
                case "torn":  # a crash in the middle of a write, then a restart
                    with log_path(state_dir, "p").open("ab") as f:
                        f.write(arg)  # type: ignore[arg-type]
                    log, replayed = open_local_log(state_dir, "p", timeout=5)
                    assert replayed == durable
                    pending = []
                case "reopen":
                    log, replayed = open_local_log(state_dir, "p", timeout=5)
                    assert replayed == durable
                    pending = []
        await log.flush()
        assert reopened(state_dir, "p") == durable + pending

    with tempfile.TemporaryDirectory() as state_dir:
        trio.run(run, Path(state_dir))


async def test_maintain_heals_a_log_at_its_bound_and_tries_nothing_while_a_write_is_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, _ = open_log(tmp_path, "hooks", timeout=0.2, max_bytes=4096)
    state = [{"x": "y" * 1000}]
    compactions = []
    real = logfile_module.write_synced

    def counted(path: Path, data: bytes, mode: int) -> None:
        compactions.append(path)
        real(path, data, mode)

    monkeypatch.setattr(logfile_module, "write_synced", counted)
    _, thawed = freeze(monkeypatch, "write_batch")
    log.append(state[0])
    with pytest.raises(StorageUnavailable):
        await log.flush()  # frozen
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: log.maintain(lambda: state, every=0.05))
        await trio.sleep(0.3)
        assert compactions == []  # the abandoned write is still running
        thawed.set()
        await until(lambda: not log.failed)
        for _ in range(4):  # past the bound: only a compaction helps
            log.append(state[0])
        with pytest.raises(StorageUnavailable):
            await log.flush()
        await until(lambda: not log.failed)
        nursery.cancel_scope.cancel()
    assert compactions
    assert open_log(tmp_path, "hooks", timeout=5, max_bytes=4096)[1] == state
