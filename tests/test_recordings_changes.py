"""publishRecordings, deleteRecordings and updateRecordings through the gateway, over real
sockets: sent only to the backends holding each recordID, lists split and answered as one,
another customer's recordIDs not found; and bbbctl driving the recording calls."""

from __future__ import annotations

import bbbctl
import pytest
import trio
from lxml import etree

from proxy.bbb import envelope, rewrite
from proxy.simulator import Simulator
from proxy.simulator.model import ApiRequest, Reply
from tests.harness import Stack, StackFactory
from tests.test_recordings import BASE, seed


def received(sim: Simulator, call: str) -> list[str]:
    """The recordID parameter of every ``call`` ``sim`` got."""
    return [dict(params).get("recordID", "") for name, params in sim.requests if name == call]


def answer(root: etree._Element) -> tuple[str, str]:
    return root.findtext("returncode") or "", root.findtext("messageKey") or ""


async def three(make_stack: StackFactory) -> Stack:
    return await make_stack(backends=3, proxy={"timeouts": {"get_recordings": 0.5}})


async def test_publish_goes_only_to_the_backends_holding_each_recording(
    make_stack: StackFactory,
) -> None:
    stack = await three(make_stack)
    a = seed(stack.sims[0], "acme", "room-a", 2)
    c = seed(stack.sims[2], "acme", "room-c", 2, start_ms=BASE + 1)
    both = f"{a[0].record_id},{c[1].record_id}"
    root = await stack.call("publishRecordings", [("recordID", both), ("publish", "false")])
    assert answer(root) == ("SUCCESS", "")
    assert root.findtext("published") == "false"
    assert [a[0].state, a[1].state, c[0].state, c[1].state] == [
        "unpublished",
        "published",
        "published",
        "unpublished",
    ]
    assert received(stack.sims[0], "publishRecordings") == [a[0].record_id]
    assert received(stack.sims[2], "publishRecordings") == [c[1].record_id]
    assert received(stack.sims[1], "publishRecordings") == []


async def test_delete_and_update_are_routed_too(make_stack: StackFactory) -> None:
    stack = await three(make_stack)
    (a,) = seed(stack.sims[1], "acme", "room", 1, metadata={"gl-listed": "true"})
    root = await stack.call(
        "updateRecordings",
        [("recordID", a.record_id), ("meta_gl-listed", ""), ("meta_Note", "seen")],
    )
    assert answer(root) == ("SUCCESS", "") and root.findtext("updated") == "true"
    assert "gl-listed" not in a.metadata and a.metadata["note"] == "seen"
    deleted = await stack.call("deleteRecordings", [("recordID", a.record_id)])
    assert deleted.findtext("deleted") == "true" and a.state == "deleted"
    for call in ("updateRecordings", "deleteRecordings"):
        assert received(stack.sims[1], call) == [a.record_id]
        assert received(stack.sims[0], call) == received(stack.sims[2], call) == []


async def test_update_cannot_set_the_gateways_own_metadata(make_stack: StackFactory) -> None:
    stack = await three(make_stack)
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    root = await stack.call(
        "updateRecordings",
        [("recordID", a.record_id), (f"meta_{rewrite.CUSTOMER_TAG}", "globex"), ("meta_x", "1")],
    )
    assert answer(root) == ("SUCCESS", "")
    assert a.metadata[rewrite.CUSTOMER_TAG] == "acme" and a.metadata["x"] == "1"
    listed = await stack.call("getRecordings", [], "globex")
    assert listed.findtext("messageKey") == "noRecordings"


@pytest.mark.parametrize("call", ["publishRecordings", "deleteRecordings", "updateRecordings"])
async def test_another_customers_recording_is_not_found(
    make_stack: StackFactory, call: str
) -> None:
    stack = await three(make_stack)
    (theirs,) = seed(stack.sims[0], "globex", "room", 1)
    (mine,) = seed(stack.sims[1], "acme", "room", 1)
    extra = [("publish", "false"), ("meta_x", "y")]
    root = await stack.call(call, [("recordID", theirs.record_id), *extra])
    missing = await stack.call(call, [("recordID", "f" * 40 + "-1"), *extra])
    assert answer(root) == answer(missing) == ("FAILED", "notFound")
    assert root.findtext("message") == missing.findtext("message")
    assert all(received(sim, call) == [] for sim in stack.sims)
    assert theirs.state == "published" and "x" not in theirs.metadata
    # A list with one of each: only the customer's own is changed.
    mixed = await stack.call(call, [("recordID", f"{theirs.record_id},{mine.record_id}"), *extra])
    assert answer(mixed)[0] == "SUCCESS"
    assert received(stack.sims[1], call) == [mine.record_id]
    assert received(stack.sims[0], call) == []
    assert theirs.state == "published" and "x" not in theirs.metadata


@pytest.mark.parametrize(
    ("call", "params", "key"),
    [
        ("publishRecordings", [("publish", "true")], "missingParamRecordID"),
        ("publishRecordings", [("recordID", "x")], "missingParamPublish"),
        ("deleteRecordings", [("recordID", " , ")], "missingParamRecordID"),
        ("updateRecordings", [], "missingParamRecordID"),
    ],
)
async def test_missing_parameters(
    stack: Stack, call: str, params: list[tuple[str, str]], key: str
) -> None:
    root = await stack.call(call, params)
    assert answer(root) == ("FAILED", key)
    asked = [name for sim in stack.sims for name, _ in sim.requests if name != "getMeetings"]
    assert asked == []  # decided before asking anyone (getMeetings: the health polls)


async def test_a_dead_holder(make_stack: StackFactory) -> None:
    stack = await three(make_stack)
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    (b,) = seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    stack.sims[1].behaviour.mode = "hang"
    alone = await stack.call("deleteRecordings", [("recordID", b.record_id)])
    assert answer(alone) == ("FAILED", "serverUnavailable")
    both = await stack.call("deleteRecordings", [("recordID", f"{a.record_id},{b.record_id}")])
    assert answer(both) == ("SUCCESS", "")  # as BBB: SUCCESS when any was changed
    assert a.state == "deleted" and b.state == "published"


async def test_a_backends_own_failure_is_answered(make_stack: StackFactory) -> None:
    stack = await three(make_stack)
    (a,) = seed(stack.sims[2], "acme", "room", 1)
    sim = stack.sims[2]
    original = sim.handle

    def failing(request: ApiRequest) -> Reply:
        if request.call == "publishRecordings":
            return Reply.xml(envelope.failure("internalError", "The disk is full"))
        return original(request)

    sim.handle = failing  # type: ignore[method-assign]
    root = await stack.call("publishRecordings", [("recordID", a.record_id), ("publish", "true")])
    assert answer(root) == ("FAILED", "internalError")
    assert root.findtext("message") == "The disk is full"


@pytest.mark.parametrize("call", ["publishRecordings", "deleteRecordings", "updateRecordings"])
async def test_disabled_calls_stay_off(make_stack: StackFactory, call: str) -> None:
    stack = await make_stack(proxy={"disabled_calls": [call]})
    (a,) = seed(stack.sims[0], "acme", "room", 1)
    root = await stack.call(call, [("recordID", a.record_id), ("publish", "true")])
    assert answer(root) == ("FAILED", "unsupportedRequest")
    assert received(stack.sims[0], call) == []


async def test_bbbctl_lists_publishes_and_deletes_recordings(make_stack: StackFactory) -> None:
    stack = await three(make_stack)
    a = seed(stack.sims[0], "acme", "lib-room", 2)
    b = seed(stack.sims[2], "acme", "lib-room", 1, start_ms=BASE + 1)
    client = bbbctl.BBBApiClient(stack.api(), stack.secrets["acme"])

    def drive() -> tuple[list[str], list[str], list[str]]:
        listed = [r.findtext("recordID") or "" for r in client.getRecordings(meetingID="lib-room")]
        client.publishRecordings(f"{a[1].record_id},{b[0].record_id}", "false")
        client.deleteRecordings(a[0].record_id)
        unpublished = [
            r.findtext("recordID") or "" for r in client.getRecordings(state="unpublished")
        ]
        remaining = [r.findtext("recordID") or "" for r in client.getRecordings()]
        return listed, unpublished, remaining

    listed, unpublished, remaining = await trio.to_thread.run_sync(drive)
    assert listed == [a[0].record_id, b[0].record_id, a[1].record_id]
    assert unpublished == [b[0].record_id, a[1].record_id]
    assert remaining == unpublished
    with pytest.raises(bbbctl.ApiError):
        await trio.to_thread.run_sync(client.deleteRecordings, "f" * 40 + "-1")
