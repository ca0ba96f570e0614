"""The bench's own decisions: user spread, task discovery, tables, the ledger pre-fill."""

from __future__ import annotations

from pathlib import Path

import trio

from bench.gateway_curves import PARKED, prefill
from bench.ledger_curves import create_and_join_cost, journal_cost, memory_per_meeting
from bench.lms import Student, Teacher
from bench.plot import markdown_table
from bench.swarm import spread
from proxy.ledger.files import load_state


def test_spread_follows_weights_and_keeps_every_class() -> None:
    assert spread(130, [1, 12]) == [10, 120]
    assert spread(5, [1, 100]) == [1, 4]
    assert sum(spread(97, [3, 5, 7])) == 97


def test_user_classes_declare_weighted_tasks() -> None:
    teacher = {m.__name__: w for m, w in Teacher.tasks()}
    student = {m.__name__: w for m, w in Student.tasks()}
    assert teacher == {"poll_info": 4, "list_meetings": 1, "end_lecture": 1}
    assert student == {"poll_running": 6, "poll_info": 2}


def test_markdown_table() -> None:
    text = markdown_table(["n", "µs"], [(100, 70.41), (100000, 1234.5)])
    assert text.splitlines() == ["| n | µs |", "|---|---|", "| 100 | 70.4 |", "| 100000 | 1234 |"]


def test_prefilled_state_dir_loads_with_every_meeting_parked(tmp_path: Path) -> None:
    prefill(tmp_path / "state", 250)
    state, _ = load_state(tmp_path / "state")
    assert len(state) == 250
    assert {r.backend_id for r in state} == {PARKED}
    assert all(r.confirmed for r in state)


def test_ledger_curves_run_small() -> None:
    cost = create_and_join_cost(50, operations=20, repeats=1)
    assert cost["create_us"] > 0 and cost["join_lookup_us"] > 0
    assert 100 < memory_per_meeting(200) < 10_000


def test_journal_cost_counts_every_create(tmp_path: Path) -> None:
    assert trio.run(journal_cost, tmp_path, False, 20, 4) > 0
    (state_dir,) = list(tmp_path.glob("fsync-*"))
    state, _ = load_state(state_dir)
    assert len(state) == 20
