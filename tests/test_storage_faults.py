"""Issue 7, storage faults: a full, read-only or frozen ``state_dir`` is survived, not crashed on.

Fault injection at the file layer (a segment file or snapshot write that fails with
``ENOSPC``/``EROFS`` or blocks), then the gateway over real sockets on a small tmpfs that
fills up and is remounted read-only: writes answer ``serverUnavailable`` within the
journal's timeout, ``/readyz`` says 503, reads keep working, background work goes on,
and the journal writes again by itself with nothing acknowledged lost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import proxy.ledger.journal as journal_module
from proxy.errors import StateError, StorageUnavailable
from proxy.ledger.codec import Snapshot
from proxy.ledger.files import SegmentFile, load_state, segment_name, write_snapshot
from proxy.ledger.journal import FileJournal, open_durable_ledger
from proxy.ledger.model import (
    BackendSpec,
    CreateRequest,
    Duplicate,
    LedgerState,
    Release,
    Reservation,
    Reserve,
)
from proxy.ledger.service import Ledger
from tests.harness import Stack, StackFactory, text

BACKENDS = [BackendSpec("b1", 100, True)]


def reservation(meeting: str, size: int = 5) -> Reservation:
    return Reservation("acme", meeting, "b1", f"acme~{meeting}", size, 60, 0, 1000.0, True)


def held(state: LedgerState) -> list[Reservation]:
    return sorted(state, key=lambda r: r.key)


def create_request(meeting: str) -> CreateRequest:
    return CreateRequest("acme", meeting, f"acme~{meeting}", 5, 60, 60)


def admit(ledger: Ledger, meeting: str) -> object:
    return ledger.admit(create_request(meeting), 100, BACKENDS, lambda loads: "b1")


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait (real time: worker threads do the file work) until ``condition`` holds."""
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - a worker thread changes it
            await trio.sleep(0.01)


class FaultySegments(SegmentFile):
    """A segment file that fails (after writing half the batch: a torn tail) or blocks."""

    def __init__(self, state_dir: Path, fsync: bool) -> None:
        super().__init__(state_dir, fsync)
        self.error: int | None = None  # errno to fail with
        self.thawed = threading.Event()
        self.thawed.set()

    def append(self, generation: int, data: bytes) -> int:
        self.thawed.wait()
        if self.error is not None:
            super().append(generation, data[: len(data) // 2])  # a torn tail
            path = self.state_dir / segment_name(generation)
            cause = OSError(self.error, os.strerror(self.error))
            raise StateError(f"cannot write {path}: {cause.strerror}") from cause
        return super().append(generation, data)


def faulty_journal(
    state_dir: Path, timeout: float = 5.0, snapshot_timeout: float | None = None
) -> tuple[Ledger, FileJournal]:
    state, position = load_state(state_dir)
    journal = FileJournal(state_dir, position, timeout=timeout, snapshot_timeout=snapshot_timeout)
    journal._file = FaultySegments(state_dir, fsync=True)
    return Ledger(state, journal), journal


def segments(journal: FileJournal) -> FaultySegments:
    file = journal._file
    assert isinstance(file, FaultySegments)
    return file


# -- the journal and the ledger, with faults injected at the file layer ----------------------


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
async def test_a_failed_write_keeps_the_state_in_memory_and_recovers(
    tmp_path: Path, error: int
) -> None:
    ledger, journal = faulty_journal(tmp_path)
    await ledger.record(Reserve(reservation("kept")))
    await ledger.durable()
    segments(journal).error = error

    await ledger.record(Reserve(reservation("adopted")))  # background work: never raises
    assert journal.failed
    with pytest.raises(StorageUnavailable) as caught:
        await ledger.durable()
    assert caught.value.message_key == "serverUnavailable"
    assert os.strerror(error) in str(caught.value.__cause__)
    before = held(ledger.state)
    with pytest.raises(StorageUnavailable):
        admit(ledger, "new")  # a new meeting is refused, and nothing changes
    assert held(ledger.state) == before
    assert isinstance(admit(ledger, "kept"), Duplicate)  # a repeated create needs no write
    assert await ledger.release(("acme", "kept"), "gone") is not None
    await ledger.confirm(("acme", "adopted"))
    with pytest.raises(StateError, match="failed"):
        await journal.snapshot(ledger.state)

    segments(journal).error = None
    assert await journal.recover(ledger.state)
    assert not journal.failed
    await ledger.record(Reserve(reservation("after")))
    await ledger.durable()
    journal.close()
    assert held(load_state(tmp_path)[0]) == held(ledger.state)
    assert {r.meeting_id for r in ledger.state} == {"adopted", "after"}
    stats = journal.statistics()
    assert (stats.failures, stats.recoveries, stats.failed) == (1, 1, False)


async def test_recovery_waits_for_a_disk_that_takes_snapshots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, journal = faulty_journal(tmp_path)
    segments(journal).error = errno.EROFS
    await ledger.record(Reserve(reservation("m1")))
    real = write_snapshot
    calls: list[int] = []

    def read_only(state_dir: Path, snapshot: Snapshot, retired: tuple[int, ...]) -> int:
        calls.append(snapshot.seq)
        raise StateError(f"cannot write {state_dir}/snapshot.tmp: Read-only file system")

    monkeypatch.setattr("proxy.ledger.journal.write_snapshot", read_only)
    assert not await journal.recover(ledger.state)
    assert not await journal.recover(ledger.state)
    assert journal.failed and calls == [1, 1]
    await ledger.record(Reserve(reservation("m2")))  # still kept, in memory
    monkeypatch.setattr("proxy.ledger.journal.write_snapshot", real)
    segments(journal).error = None
    assert await journal.recover(ledger.state)
    journal.close()
    assert held(load_state(tmp_path)[0]) == held(ledger.state)
    assert len(ledger.state) == 2


async def test_a_frozen_write_answers_within_the_timeout_and_resumes_after(
    tmp_path: Path,
) -> None:
    ledger, journal = faulty_journal(tmp_path, timeout=1.5)
    await ledger.record(Reserve(reservation("m1")))
    segments(journal).thawed.clear()

    started = time.monotonic()
    await ledger.record(Reserve(reservation("m2")))  # waits at most the timeout
    assert 1.45 < time.monotonic() - started < 6
    assert journal.failed
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        await ledger.durable()  # failed: at once, not after another timeout
    assert time.monotonic() - started < 0.75
    assert not await journal.recover(ledger.state)  # the abandoned write still runs

    segments(journal).thawed.set()
    await until(lambda: not journal._io.running)
    assert await journal.recover(ledger.state)
    journal.close()
    assert held(load_state(tmp_path)[0]) == held(ledger.state)


async def test_an_overdue_snapshot_makes_the_journal_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, journal = faulty_journal(tmp_path, timeout=1.0, snapshot_timeout=0.2)
    await ledger.record(Reserve(reservation("m1")))
    thawed = threading.Event()
    real = write_snapshot

    def frozen(state_dir: Path, snapshot: Snapshot, retired: tuple[int, ...]) -> int:
        thawed.wait()
        return real(state_dir, snapshot, retired)

    monkeypatch.setattr("proxy.ledger.journal.write_snapshot", frozen)
    assert not journal.failed
    with pytest.raises(StateError, match=r"took over 0\.2 s"):
        await journal.snapshot(ledger.state)
    assert journal.failed  # a file operation has been running longer than the bound
    thawed.set()
    await until(lambda: not journal.failed)
    await ledger.record(Release(("acme", "m1"), "end"))
    await ledger.durable()


async def test_the_durable_ledger_recovers_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "SegmentFile", FaultySegments)
    async with open_durable_ledger(tmp_path, write_timeout=1, retry_every=0.05) as ledger:
        journal = ledger.journal
        assert isinstance(journal, FileJournal)
        segments(journal).error = errno.ENOSPC
        await ledger.record(Reserve(reservation("m1")))
        await ledger.confirm(("acme", "m1"))
        assert journal.failed
        segments(journal).error = None
        await until(lambda: not journal.failed)
        await ledger.durable()
        assert held(load_state(tmp_path)[0]) == held(ledger.state)
        segments(journal).error = errno.ENOSPC
        await ledger.record(Reserve(reservation("m2")))
    # the last snapshot on exit recovers what only memory held
    assert [r.meeting_id for r in held(load_state(tmp_path)[0])] == ["m1", "m2"]


# -- over real sockets, on a small tmpfs ---------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only: skipped with the reason where mounting is not permitted)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> Path:
    """Fill the file system to the last byte; the filler file, to remove later."""
    filler = mount / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    return filler


async def remount(mount: Path, mode: str) -> None:
    """``mount -o remount,MODE``, retried while a journal write has a file open."""
    for _ in range(100):
        done = await trio.run_process(
            ["mount", "-o", f"remount,{mode}", str(mount)], check=False, capture_stderr=True
        )
        if done.returncode == 0:
            return
        await trio.sleep(0.02)
    raise AssertionError(f"remount {mode} failed: {done.stderr!r}")


async def faulty_disk_stack(make_stack: StackFactory, mount: Path) -> Stack:
    state_dir = mount / "state"
    proxy = {"state_dir": str(state_dir), "journal_timeout": 1.0, "health": {"interval": 0.2}}
    return await make_stack(proxy=proxy)


async def ready(stack: Stack) -> int:
    return (await stack.http.get(f"{stack.url}/readyz")).status_code


async def check_survives(stack: Stack, fault: Callable[[], Any], mend: Callable[[], Any]) -> None:
    """The scenario of issue 7 §3 "Storage faults", for one kind of fault."""
    for meeting in ("kept", "vanishing"):
        assert text(await stack.create(meeting, maxParticipants="2"), "returncode") == "SUCCESS"
    assert await ready(stack) == 200
    await fault()

    # A full disk still takes what fits in the last page of the segment: creates may
    # succeed (durably) until one does not fit.
    for attempt in range(40):
        started = time.monotonic()
        answer = await stack.create(f"probe-{attempt}", "globex", maxParticipants="1")
        assert time.monotonic() - started < 3  # journal_timeout 1 s, and then some
        if text(answer, "returncode") == "FAILED":
            assert text(answer, "messageKey") == "serverUnavailable"
            break
    else:
        raise AssertionError("every create succeeded on a faulty disk")
    refused = await stack.create("new", maxParticipants="2")
    assert text(refused, "messageKey") == "serverUnavailable"
    assert await ready(stack) == 503
    ended = await stack.call("end", [("meetingID", "kept")])
    assert text(ended, "messageKey") == "serverUnavailable"
    sim, backend_id = stack.backend_meeting("acme", "kept")
    assert not sim.meetings[backend_id].ended  # refused before anything was sent

    # what needs no write keeps working
    info = await stack.call("getMeetingInfo", [("meetingID", "kept")])
    assert text(info, "returncode") == "SUCCESS"
    running = await stack.call("isMeetingRunning", [("meetingID", "kept")])
    assert text(running, "returncode") == "SUCCESS"
    listed = await stack.call("getMeetings", [])
    assert "kept" in [m.findtext("meetingID") for m in listed.iter("meeting")]
    again = await stack.create(
        "kept", maxParticipants="2"
    )  # Moodle's create-before-join of a running meeting
    assert text(again, "returncode") == "SUCCESS"
    join = stack.signed("join", [("meetingID", "kept"), ("fullName", "Ann"), ("role", "VIEWER")])
    response = await stack.http.get(join)
    assert response.status_code == 302, response.text

    # background work goes on: a meeting ended on its server is released by the next poll
    # (today a StateError out of that poll ended the process about 2 s after the fault)
    sim, backend_id = stack.backend_meeting("acme", "vanishing")
    sim.end_meeting(sim.meetings[backend_id], forcibly=True)
    await until(lambda: stack.gateway.ledger.get(("acme", "vanishing")) is None, 5)
    await trio.sleep(2.5)  # past the moment the process used to exit
    assert await ready(stack) == 503

    await mend()
    await until(lambda: not stack.gateway.ledger.journal.failed, 10)
    assert await ready(stack) == 200
    assert text(await stack.create("new", maxParticipants="2"), "returncode") == "SUCCESS"
    # nothing acknowledged lost: the disk holds exactly what memory holds
    on_disk = load_state(Path(stack.config.proxy.state_dir))[0]
    assert held(on_disk) == held(stack.gateway.ledger.state)
    assert sorted(r.meeting_id for r in on_disk if r.customer == "acme") == ["kept", "new"]


async def test_a_full_state_dir_is_survived(make_stack: StackFactory, small_fs: Path) -> None:
    stack = await faulty_disk_stack(make_stack, small_fs)
    filler: list[Path] = []

    async def fault() -> None:
        filler.append(fill(small_fs))

    async def mend() -> None:
        filler[0].unlink()

    await check_survives(stack, fault, mend)


async def test_a_read_only_state_dir_is_survived(make_stack: StackFactory, small_fs: Path) -> None:
    stack = await faulty_disk_stack(make_stack, small_fs)
    await check_survives(stack, lambda: remount(small_fs, "ro"), lambda: remount(small_fs, "rw"))


# -- start-up: exit 3 with one line, never a traceback --------------------------------------------


def write_config(path: Path, state_dir: Path) -> Path:
    path.write_text(
        f'[proxy]\nbind = "127.0.0.1:1"\npublic_url = "http://127.0.0.1:1"\n'
        f'state_dir = "{state_dir}"\n'
        '[[backends]]\nid = "bbb-1"\nurl = "http://127.0.0.1:1/bigbluebutton/"\n'
        'secret = "s"\ncapacity = 10\n'
        '[[customers]]\nid = "acme"\nsecret = "c"\nmax_connections = 10\n'
        "default_max_participants = 3\ndefault_duration = 60\n"
    )
    return path


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    """``python -m proxy.cli serve --config CONFIG``, as a process of its own."""
    command = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def assert_exit_3(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbb-proxy: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_full_state_dir_at_start_up_exits_3(tmp_path: Path, small_fs: Path) -> None:
    state_dir = small_fs / "state"
    state_dir.mkdir()
    (state_dir / "lock").touch()
    fill(small_fs)
    done = serve(write_config(tmp_path / "c.toml", state_dir))
    assert_exit_3(done, str(state_dir), "No space left on device")


def test_a_read_only_state_dir_at_start_up_exits_3(tmp_path: Path, small_fs: Path) -> None:
    state_dir = small_fs / "state"
    state_dir.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        done = serve(write_config(tmp_path / "c.toml", state_dir))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert_exit_3(done, str(state_dir), "Read-only file system")


async def test_journal_failures_and_recoveries_are_in_the_metrics(tmp_path: Path) -> None:
    from proxy.config import from_mapping
    from proxy.gateway import open_gateway
    from proxy.metrics import Metrics

    ledger, journal = faulty_journal(tmp_path)
    config = from_mapping(
        {
            "proxy": {"public_url": "http://127.0.0.1:1", "state_dir": str(tmp_path)},
            "backends": [{"id": "b1", "url": "http://127.0.0.1:1/", "secret": "s", "capacity": 10}],
            "customers": [],
        }
    )
    segments(journal).error = errno.ENOSPC
    await ledger.record(Reserve(reservation("m1")))
    segments(journal).error = None
    assert await journal.recover(ledger.state)
    async with open_gateway(config, ledger) as gw:
        exposition = Metrics(gw).exposition().decode()
    assert "bbb_proxy_journal_failures_total 1.0" in exposition
    assert "bbb_proxy_journal_recoveries_total 1.0" in exposition


async def test_a_frozen_disk_answers_in_bounded_time_and_resumes(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real sockets: today every create and end hung while /readyz said ready."""
    monkeypatch.setattr(journal_module, "SegmentFile", FaultySegments)
    stack = await make_stack(proxy={"journal_timeout": 0.5})
    journal = stack.gateway.ledger.journal
    assert isinstance(journal, FileJournal)
    assert text(await stack.create("kept", maxParticipants="2"), "returncode") == "SUCCESS"
    segments(journal).thawed.clear()
    try:
        started = time.monotonic()
        answer = await stack.create("frozen", maxParticipants="2")
        assert text(answer, "messageKey") == "serverUnavailable"
        assert time.monotonic() - started < 3
        assert await ready(stack) == 503
        started = time.monotonic()
        ended = await stack.call("end", [("meetingID", "kept")])
        assert text(ended, "messageKey") == "serverUnavailable"
        assert time.monotonic() - started < 1
        info = await stack.call("getMeetingInfo", [("meetingID", "kept")])
        assert text(info, "returncode") == "SUCCESS"
    finally:
        segments(journal).thawed.set()
    await until(lambda: not journal.failed)
    assert await ready(stack) == 200
    # the refused create's meeting exists on its server and is held: the retry finds it
    again = await stack.create("frozen", maxParticipants="2")
    assert text(again, "returncode") == "SUCCESS"
    assert text(again, "messageKey") == "duplicateWarning"
    assert text(await stack.call("end", [("meetingID", "kept")]), "returncode") == "SUCCESS"
    on_disk = load_state(Path(stack.config.proxy.state_dir))[0]
    assert held(on_disk) == held(stack.gateway.ledger.state)


def test_journal_timeout_is_read_from_the_config() -> None:
    from proxy.config import from_mapping
    from proxy.errors import ConfigError

    def proxy_config(**proxy: object) -> dict[str, object]:
        return {
            "proxy": {"public_url": "http://127.0.0.1:1", **proxy},
            "backends": [{"id": "b1", "url": "http://127.0.0.1:1/", "secret": "s", "capacity": 10}],
            "customers": [],
        }

    assert from_mapping(proxy_config()).proxy.journal_timeout == 2.0
    assert from_mapping(proxy_config(journal_timeout=0.5)).proxy.journal_timeout == 0.5
    with pytest.raises(ConfigError, match="journal_timeout"):
        from_mapping(proxy_config(journal_timeout=-1))
