"""/readyz says why the gateway is not ready: a dead backend, a failed journal, a failed store."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from proxy import cli
from proxy.ledger import journal as journal_module
from proxy.ledger.journal import FileJournal
from proxy.readiness import BackendState, judged
from proxy.store import MemoryLog
from tests.harness import Stack, StackFactory, text, wait_until
from tests.test_storage_faults import FaultySegments, segments

QUICK_POLLS = {"health": {"interval": 0.2, "timeout": 1.0, "down_after": 2, "up_after": 1}}
ADMIN = "admin-token-readiness"


async def readyz(stack: Stack) -> tuple[int, dict[str, Any]]:
    response = await stack.http.get(f"{stack.url}/readyz")
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return response.status_code, document


def checks(document: dict[str, Any]) -> list[str]:
    return [reason["check"] for reason in document["reasons"]]


async def test_ready_says_every_backend(stack: Stack) -> None:
    status, document = await readyz(stack)
    assert (status, document["ready"], document["reasons"]) == (200, True, [])
    assert document["stores"]["ledger"] == "ok"
    assert document["backends"] == {
        "bbb-1": {"health": "up", "mode": "active", "accepting": True},
        "bbb-2": {"health": "up", "mode": "active", "accepting": True},
    }


async def test_a_dead_backend_shows_and_the_last_one_makes_it_not_ready(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack(proxy={**QUICK_POLLS, "admin_token": ADMIN})
    stack.sims[1].behaviour.mode = "http500"  # its polls fail: DOWN after two
    await wait_until(lambda: stack.gateway.backend_down("bbb-2"))
    status, document = await readyz(stack)
    assert (status, document["ready"]) == (200, True)  # bbb-1 still takes meetings
    assert document["backends"]["bbb-2"] == {"health": "down", "mode": "active", "accepting": False}
    # the operator's view of the same gateway says it too
    args = ["status", "--url", stack.url, "--token", ADMIN]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert await trio.to_thread.run_sync(cli.main, args) == 0
    finally:  # cli.main set up the process's logging
        root.handlers[:] = handlers
        root.setLevel(level)
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bbb-2")]
    assert "down" in row.split()
    stack.sims[0].behaviour.mode = "http500"
    await wait_until(lambda: stack.gateway.backend_down("bbb-1"))
    status, document = await readyz(stack)
    assert (status, document["ready"], checks(document)) == (503, False, ["no_backend"])
    assert "bbb-1 down/active, bbb-2 down/active" in document["reasons"][0]["message"]
    stack.sims[0].behaviour.mode = "ok"
    await wait_until(lambda: not stack.gateway.backend_down("bbb-1"))
    assert (await readyz(stack))[0] == 200


async def test_a_failed_journal_is_the_reason(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "SegmentFile", FaultySegments)
    stack = await make_stack(proxy={"journal_timeout": 0.5})
    journal = stack.gateway.ledger.journal
    assert isinstance(journal, FileJournal)
    segments(journal).thawed.clear()  # the disk hangs
    try:
        answer = await stack.create("frozen", maxParticipants="2")
        assert text(answer, "messageKey") == "serverUnavailable"
        status, document = await readyz(stack)
        assert (status, checks(document)) == (503, ["journal"])
        assert document["stores"]["ledger"] == "failed"
    finally:
        segments(journal).thawed.set()
    await wait_until(lambda: not journal.failed)
    assert (await readyz(stack))[0] == 200


async def test_a_failed_store_is_the_reason(stack: Stack) -> None:
    store = MemoryLog()
    stack.gateway.stores["probe"] = store
    store.failed = True
    status, document = await readyz(stack)
    assert (status, checks(document), document["stores"]["probe"]) == (503, ["store"], "failed")
    assert "probe" in document["reasons"][0]["message"]
    store.failed = False
    assert (await readyz(stack))[0] == 200


def test_every_reason_at_once() -> None:
    down = BackendState("b1", "down", "active", False)
    drained = BackendState("b2", "up", "drain", False)
    state = judged((("ledger", True), ("hooks", True), ("runtime", False)), (down, drained))
    assert not state.ready
    assert [(r.check, r.message) for r in state.reasons] == [
        ("journal", "the ledger journal cannot write: creates and ends are refused"),
        ("store", "the hooks store cannot write: its changes are refused"),
        ("no_backend", "no backend is up and active (b1 down/active, b2 up/drain)"),
    ]
    assert judged((("ledger", False),), (BackendState("b", "up", "active", True),)).ready
