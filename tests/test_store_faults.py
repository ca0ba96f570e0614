"""The store's local log on a real small file system that fills up or turns read-only.

``append`` never raises, ``flush`` raises ``StorageUnavailable`` while the disk refuses,
``failed`` says so, and the log writes again by itself once the disk takes writes,
with every record exactly once and in order.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from proxy.errors import StorageUnavailable
from proxy.store import Record, open_local_log
from proxy.store.local import LocalLog, log_path
from tests.test_storage_faults import fill, remount, small_fs, until

__all__ = ["small_fs"]  # the fixture, shared with the ledger's storage tests


def record(n: int) -> Record:
    return {"n": n, "pad": "p" * 500}


async def fault_then_mend(
    log: LocalLog, fault: Callable[[], Awaitable[object]], mend: Callable[[], Awaitable[object]]
) -> list[int]:
    """Append and flush until the fault refuses a flush; mend; the numbers acknowledged."""
    acknowledged = []
    for n in range(5):
        log.append(record(n))
        await log.flush()
        acknowledged.append(n)
    await fault()
    with pytest.raises(StorageUnavailable):
        for n in range(5, 2000):  # a full disk still takes what fits in its last page
            log.append(record(n))
            await log.flush()
            acknowledged.append(n)
    assert log.failed
    for n in range(2000, 2010):
        log.append(record(n))  # never raises while failed
    with pytest.raises(StorageUnavailable):
        await log.flush()
    assert log.statistics().pending > 0
    await mend()
    return acknowledged


async def check_recovers_by_itself(
    state_dir: Path, log: LocalLog, acknowledged: list[int], task: Callable[[], Awaitable[None]]
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)
        await until(lambda: not log.failed)
        nursery.cancel_scope.cancel()
    await log.flush()
    numbers = [r["n"] for r in open_local_log(state_dir, "q", timeout=5)[1]]
    refused = acknowledged[-1] + 1  # its flush raised; it stayed queued
    assert numbers == [*acknowledged, refused, *range(2000, 2010)], "lost, repeated, reordered"
    stats = log.statistics()
    assert stats.recoveries >= 1 and stats.failures >= 1


async def test_a_full_disk_fails_the_flush_and_the_log_recovers_by_itself(
    small_fs: Path,
) -> None:
    state_dir = small_fs / "state"
    log, _ = open_local_log(state_dir, "q", timeout=5)
    filler: list[Path] = []

    async def fault() -> None:
        filler.append(fill(small_fs))

    async def mend() -> None:
        filler[0].unlink()

    acknowledged = await fault_then_mend(log, fault, mend)
    assert acknowledged[-1] >= 4
    await check_recovers_by_itself(state_dir, log, acknowledged, lambda: log.maintain(every=0.05))


async def test_a_read_only_disk_fails_the_flush_and_the_log_recovers_by_itself(
    small_fs: Path,
) -> None:
    state_dir = small_fs / "state"
    log, _ = open_local_log(state_dir, "q", timeout=5)
    acknowledged = await fault_then_mend(
        log, lambda: remount(small_fs, "ro"), lambda: remount(small_fs, "rw")
    )
    assert acknowledged == list(range(5))
    await check_recovers_by_itself(state_dir, log, acknowledged, lambda: log.recover_forever(0.05))


async def test_a_compaction_on_a_full_disk_leaves_the_old_file_whole(small_fs: Path) -> None:
    state_dir = small_fs / "state"
    log, _ = open_local_log(state_dir, "q", timeout=math.inf)
    for n in range(20):
        log.append(record(n))
    await log.flush()
    filler = fill(small_fs)
    with pytest.raises(StorageUnavailable):
        await log.compact([record(n) for n in range(20)])
    assert not log_path(state_dir, "q").with_suffix(".log.tmp").exists()  # its space given back
    filler.unlink()
    assert [r["n"] for r in open_local_log(state_dir, "q", timeout=5)[1]] == list(range(20))
