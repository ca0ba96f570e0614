"""The ledger measured in-process: create/join cost, memory, snapshots, recovery, fsync.

These curves take the HTTP stack out of the picture on purpose, to show what the
ledger itself costs as it grows (the gateway-level curves are in
:mod:`bench.gateway_curves`).  Every state is built through the ledger's own
API (``LedgerState.apply``, ``FileJournal``, ``load_state``) with realistic
ids: customer ``bench``, meetingIDs like ``course-123-lecture-4``, namespaced
backend ids from :func:`proxy.bbb.rewrite.backend_meeting_id`.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import trio

from proxy.bbb.rewrite import backend_meeting_id
from proxy.ledger.files import load_state
from proxy.ledger.journal import FileJournal
from proxy.ledger.model import (
    Admit,
    BackendSpec,
    Chooser,
    Confirm,
    CreateRequest,
    LedgerState,
    Release,
    Reservation,
    Reserve,
)
from proxy.ledger.service import Ledger
from proxy.placement import Ring

CUSTOMER = "bench"
BACKENDS = tuple(f"bbb-{n}" for n in range(1, 11))
UNLIMITED = 1_000_000_000
SPECS = [BackendSpec(b, UNLIMITED, True) for b in BACKENDS]
RING = Ring(BACKENDS)
DURATION = 600  # minutes: nothing goes overtime during a measurement


def meeting_id(n: int) -> str:
    return f"course-{n // 7}-lecture-{n % 7}-{n}"


def request(n: int) -> CreateRequest:
    mid = meeting_id(n)
    return CreateRequest(CUSTOMER, mid, backend_meeting_id(CUSTOMER, mid), 30, DURATION, 0)


def reservation(n: int, now: float) -> Reservation:
    r = request(n)
    backend = BACKENDS[n % len(BACKENDS)]
    return Reservation(
        r.customer, r.meeting_id, backend, r.backend_meeting_id, 30, DURATION, 0, now, True
    )


def filled(size: int) -> LedgerState:
    state = LedgerState()
    now = time.time()
    for n in range(size):
        state.apply(Reserve(reservation(n, now)))
    return state


def chooser(req: CreateRequest) -> Chooser:
    """Placement as the gateway does it: the ring, keyed by the namespaced meetingID."""
    return lambda loads: RING.choose(req.backend_meeting_id, req.connections, loads)


def _admit(state: LedgerState, n: int, now: float) -> Reservation:
    req = request(n)
    decision = state.admit(req, UNLIMITED, SPECS, chooser(req), now)
    assert isinstance(decision, Admit), decision
    state.apply(Reserve(decision.reservation))
    state.apply(Confirm(decision.reservation.key))
    return decision.reservation


def create_and_join_cost(size: int, operations: int = 3000, repeats: int = 5) -> dict[str, float]:
    """µs per create (admit + reserve + confirm) and per join look-up with ``size`` held.

    The created meetings are released again after each repeat, so the ledger stays
    at ``size``; the median of ``repeats`` is reported.
    """
    state = filled(size)
    now = time.time()
    creates, joins = [], []
    for repeat in range(repeats):
        fresh = range(10**8 + repeat * operations, 10**8 + (repeat + 1) * operations)
        started = time.perf_counter()
        made = [_admit(state, n, now) for n in fresh]
        creates.append((time.perf_counter() - started) / operations * 1e6)
        keys = [(CUSTOMER, meeting_id(n % size)) for n in range(operations)]
        started = time.perf_counter()
        for key in keys:
            state.get(key)
        joins.append((time.perf_counter() - started) / operations * 1e6)
        for r in made:
            state.apply(Release(r.key, "end"))
    return {"create_us": statistics.median(creates), "join_lookup_us": statistics.median(joins)}


def memory_per_meeting(size: int) -> float:
    """Bytes tracemalloc sees the ledger holding per meeting (ids included)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = filled(size)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(state) == size
    return held / size


# -- snapshots and recovery ---------------------------------------------------------------------


def _records(size: int) -> Iterator[Reserve | Confirm]:
    now = time.time()
    for n in range(size):
        r = reservation(n, now)
        yield Reserve(replace(r, confirmed=False))
        yield Confirm(r.key)


async def write_journal(state_dir: Path, size: int) -> LedgerState:
    """``size`` creates as the gateway journals them (Reserve, then Confirm), no snapshot."""
    state, position = load_state(state_dir)
    journal = FileJournal(state_dir, position, fsync=False, snapshot_records=10**9)
    for batch in itertools.batched(_records(size), 1000, strict=False):
        for record in batch:
            state.apply(record)
            journal.append(record)
        await journal.flush()
    journal.close()
    return state


async def snapshot_and_recovery(workdir: Path, size: int) -> dict[str, float]:
    """Seconds to recover from a journal only, to write a snapshot, to recover from it."""
    state_dir = workdir / f"ledger-{size}"
    state = await write_journal(state_dir, size)
    started = time.perf_counter()
    replayed, _ = load_state(state_dir)
    journal_recovery = time.perf_counter() - started
    assert len(replayed) == size
    journal = FileJournal(state_dir, load_state(state_dir)[1], fsync=True)
    started = time.perf_counter()
    await journal.snapshot(state)
    snapshot_write = time.perf_counter() - started
    journal.close()
    started = time.perf_counter()
    loaded, _ = load_state(state_dir)
    snapshot_recovery = time.perf_counter() - started
    assert len(loaded) == size
    return {
        "journal_recovery_s": journal_recovery,
        "snapshot_write_s": snapshot_write,
        "snapshot_recovery_s": snapshot_recovery,
        "snapshot_bytes": float((state_dir / "snapshot").stat().st_size),
    }


# -- the journal's cost per create --------------------------------------------------------------


async def journal_cost(workdir: Path, fsync: bool, creates: int, concurrency: int) -> float:
    """µs per create (admit, confirm, flush) on a FileJournal, ``concurrency`` creates at once."""
    state_dir = workdir / f"fsync-{fsync}-{concurrency}-{time.monotonic_ns()}"
    state, position = load_state(state_dir)
    journal = FileJournal(state_dir, position, fsync=fsync)
    ledger = Ledger(state, journal)
    numbers = iter(range(creates))
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(_create_loop, ledger, numbers)
    elapsed = time.perf_counter() - started
    journal.close()
    return elapsed / creates * 1e6


async def _create_loop(ledger: Ledger, numbers: Iterator[int]) -> None:
    for n in numbers:
        req = request(n)
        decision = ledger.admit(req, UNLIMITED, SPECS, chooser(req))
        assert isinstance(decision, Admit)
        # As proxy/calls/create.py: the backend is called, then one flush makes the
        # Reserve and the Confirm durable together before the answer leaves.
        await ledger.confirm(decision.reservation.key)
