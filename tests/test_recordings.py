"""getRecordings through the gateway, over real sockets, with several simulated backends:
the customer's recordings from the whole pool, rewritten, filtered and paged as one BBB
server would list them; other customers' never; dead and slow backends left out;
the answer streamed."""

from __future__ import annotations

import hashlib
import time

import pytest
import trio
from lxml import etree

from proxy.bbb import recordings, rewrite
from proxy.bbb.checksum import signed_query
from proxy.health import Health, State
from proxy.simulator import Simulator
from proxy.simulator.model import ApiRequest, Reply
from proxy.simulator.recordings import Recording
from tests.harness import BACKEND_SECRET, Stack, StackFactory, text

BASE = 1_700_000_000_000


@pytest.fixture(params=["one-pass", "two-pass"], autouse=True)
def passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: bodies kept from the first pass, and (no budget) every body fetched
    again by recordID, in small rounds and batches so that several of each are needed."""
    if request.param == "two-pass":
        monkeypatch.setattr(recordings, "EARLY_BYTES", 0)
        monkeypatch.setattr(recordings, "ROUND", 7)
        monkeypatch.setattr(recordings, "BATCH", 3)
    return str(request.param)


def seed(
    sim: Simulator,
    customer: str,
    meeting_id: str,
    count: int,
    *,
    start_ms: int = BASE,
    step_ms: int = 3_000,
    metadata: dict[str, str] | None = None,
) -> list[Recording]:
    """Recordings as a meeting the gateway created would leave them on ``sim``."""
    tags = {k[len("meta_") :]: v for k, v in rewrite.tags(customer, meeting_id, 60, 1.5)}
    return sim.recordings.seed(
        count,
        meeting_id=rewrite.backend_meeting_id(customer, meeting_id),
        metadata={**tags, **(metadata or {})},
        start_ms=start_ms,
        step_ms=step_ms,
    )


def ids(root: etree._Element) -> list[str]:
    assert root.findtext("returncode") == "SUCCESS", etree.tostring(root)
    return [r.findtext("recordID") or "" for r in root.iterfind("recordings/recording")]


async def listing(stack: Stack, params: list[tuple[str, str]], customer: str = "acme") -> list[str]:
    return ids(await stack.call("getRecordings", params, customer))


def pool_order(*groups: list[Recording]) -> list[str]:
    every = [r for group in groups for r in group]
    return [r.record_id for r in sorted(every, key=lambda r: (r.start_time, r.record_id))]


async def test_a_recorded_meeting_is_listed_as_the_customer_made_it(stack: Stack) -> None:
    created = await stack.create("lecture-1", record="true")
    await stack.create("lecture-1", "globex", record="true")
    record_id = text(created, "internalMeetingID")
    sim, _ = stack.backend_meeting("acme", "lecture-1")
    ended = await stack.call("end", [("meetingID", "lecture-1")])
    assert text(ended, "returncode") == "SUCCESS"
    await stack.call("end", [("meetingID", "lecture-1")], "globex")
    root = await stack.call("getRecordings", [])
    assert ids(root) == [record_id]
    recording = root.find("recordings/recording")
    assert recording is not None
    assert text(recording, "meetingID") == "lecture-1"
    metadata = recording.find("metadata")
    assert metadata is not None
    assert metadata.findtext("meetingId") == "lecture-1"
    leaked = [c.tag for c in metadata if str(c.tag).startswith(rewrite.TAG_PREFIX)]
    assert leaked == []
    assert "~" not in etree.tostring(recording).decode()  # no namespaced meetingID anywhere
    host = text(recording, "playback/format/url").split("/")[2]
    assert host == sim.server_name  # playback stays on the server that recorded it


async def test_the_pool_is_one_list_in_start_time_order(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=3)
    groups = [
        seed(sim, "acme", f"room-{i}", 4, start_ms=BASE + i * 1_000)
        for i, sim in enumerate(stack.sims)
    ]
    seed(stack.sims[0], "globex", "room-0", 3)  # another customer's, same meetingID
    stack.sims[1].recordings.seed(2, meeting_id="not-the-gateways")  # made without the gateway
    assert await listing(stack, []) == pool_order(*groups)
    assert len(await listing(stack, [], "globex")) == 3


async def test_pages_are_disjoint_and_complete_across_backends(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=3)
    groups = [
        seed(sim, "acme", f"room-{i}", 9 + i, start_ms=BASE + i * 700)
        for i, sim in enumerate(stack.sims)
    ]
    every = pool_order(*groups)
    assert len(every) == 30
    for limit in (1, 7, 100):
        pages: list[str] = []
        for offset in range(0, 31, limit):
            root = await stack.call(
                "getRecordings", [("offset", str(offset)), ("limit", str(limit))]
            )
            assert root.findtext("totalElements") == "30"
            pages += ids(root)
        assert pages == every, limit
    deep = await stack.call("getRecordings", [("offset", "500"), ("limit", "10")])
    assert ids(deep) == [] and deep.findtext("messageKey") == "noRecordings"
    assert deep.findtext("totalElements") == "30"
    clamped = await stack.call("getRecordings", [("offset", "-4"), ("limit", "1000")])
    assert ids(clamped) == every and clamped.findtext("totalElements") == "30"
    unpaged = await stack.call("getRecordings", [("offset", "3")])
    assert ids(unpaged) == every and unpaged.find("totalElements") is None


async def test_meeting_id_and_record_id_filters(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=3)
    a0 = seed(stack.sims[0], "acme", "course-a", 2)
    a2 = seed(stack.sims[2], "acme", "course-a", 2, start_ms=BASE + 500)  # same meeting, later
    b1 = seed(stack.sims[1], "acme", "course-b", 3, start_ms=BASE + 100)
    g = seed(stack.sims[1], "globex", "course-a", 2)
    assert await listing(stack, [("meetingID", "course-a")]) == pool_order(a0, a2)
    assert await listing(stack, [("meetingID", "course-a,course-b")]) == pool_order(a0, a2, b1)
    assert await listing(stack, [("meetingID", "nothing-here")]) == []
    # A recordID prefix that matches on two backends.
    prefix = a0[0].record_id[:12]
    assert a2[0].record_id.startswith(prefix)
    assert await listing(stack, [("recordID", prefix)]) == pool_order(a0, a2)
    # recordID given: meetingID ignored, as bbb-web does.
    both = f"{b1[0].record_id},{a2[1].record_id}"
    listed = await listing(stack, [("recordID", both), ("meetingID", "course-a")])
    assert listed == pool_order([b1[0], a2[1]])
    # Another customer's recordID is not there for acme, and the reverse.
    assert await listing(stack, [("recordID", g[0].record_id)]) == []
    assert await listing(stack, [("recordID", a0[0].record_id)], "globex") == []
    assert await listing(stack, [("meetingID", "course-a")], "globex") == pool_order(g)
    assert hashlib.sha1(b"course-a").hexdigest() not in "".join(pool_order(a0, a2))


async def test_state_and_meta_filters(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    a = seed(stack.sims[0], "acme", "room", 3, metadata={"bbb-context": "Physics"})
    b = seed(stack.sims[1], "acme", "room", 2, start_ms=BASE + 1, metadata={"bbb-context": "Art"})
    a[1].state, b[0].state, b[1].state = "unpublished", "deleted", "processing"
    assert await listing(stack, []) == pool_order(a)  # default: published, unpublished
    assert await listing(stack, [("state", "unpublished")]) == [a[1].record_id]
    assert await listing(stack, [("state", "deleted,processing")]) == pool_order(b)
    assert await listing(stack, [("state", "any")]) == pool_order(a, b)
    assert await listing(stack, [("meta_bbb-context", "Physics")]) == pool_order(a)
    assert await listing(stack, [("meta_bbb-context", "Art"), ("state", "any")]) == pool_order(b)
    # The gateway's own metadata does not exist for the customer: filtering on it finds nothing.
    tag = f"meta_{rewrite.CUSTOMER_TAG}"
    assert await listing(stack, [(tag, "acme")]) == []
    assert await listing(stack, [(tag, "globex")]) == []


async def test_no_recordings_is_success(stack: Stack) -> None:
    root = await stack.call("getRecordings", [("meetingID", "none")])
    assert [str(c.tag) for c in root] == ["returncode", "recordings", "messageKey", "message"]
    assert root.findtext("messageKey") == "noRecordings"


@pytest.mark.parametrize("mode", ["hang", "http500", "garbage"])
async def test_a_dead_backend_leaves_its_recordings_out(
    make_stack: StackFactory, mode: str
) -> None:
    stack = await make_stack(backends=3, proxy={"timeouts": {"get_recordings": 1.0}})
    groups = [
        seed(sim, "acme", f"room-{i}", 2, start_ms=BASE + i) for i, sim in enumerate(stack.sims)
    ]
    stack.sims[1].behaviour.mode = mode
    started = time.perf_counter()
    assert await listing(stack, []) == pool_order(groups[0], groups[2])
    assert time.perf_counter() - started < 3


async def test_a_slow_backend_is_left_out_at_the_deadline_and_counted(
    make_stack: StackFactory,
) -> None:
    # The deadline leaves the fast backend a whole second, so that a loaded CI machine does not
    # leave it out too; the slow one would need four.
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 1.0}})
    fast = seed(stack.sims[0], "acme", "room", 2)
    seed(stack.sims[1], "acme", "room", 2, start_ms=BASE + 1)
    stack.sims[1].behaviour.latency = 4.0
    started = time.perf_counter()
    assert await listing(stack, []) == pool_order(fast)
    assert time.perf_counter() - started < 3.0
    metrics = (await stack.http.get(f"{stack.url}/metrics")).text
    assert 'call="getRecordings",outcome="deadline"' in metrics
    stack.sims[1].behaviour.latency = 0.0


async def test_the_answer_starts_before_a_slow_backend_answers(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    seed(stack.sims[0], "acme", "room", 2)
    slow = seed(stack.sims[1], "acme", "room", 2, start_ms=BASE + 1)
    stack.sims[1].behaviour.latency = 2.0
    started = time.perf_counter()
    chunks: list[tuple[float, bytes]] = []
    async with stack.http.stream("GET", stack.signed("getRecordings", [])) as response:
        assert response.headers["content-type"].startswith("text/xml")
        async for chunk in response.aiter_raw():
            chunks.append((time.perf_counter() - started, chunk))
    first_at = chunks[0][0]
    assert first_at < 1.0, chunks  # half the slow backend's latency: slack for a loaded machine
    assert chunks[0][1].startswith(b"<response><returncode>SUCCESS</returncode>")
    assert chunks[-1][0] >= 2.0
    body = b"".join(c for _, c in chunks)
    assert slow[0].record_id.encode() in body
    assert etree.fromstring(body).findtext("returncode") == "SUCCESS"


async def test_disabled_get_recordings_is_unsupported(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"disabled_calls": ["getRecordings"]})
    seed(stack.sims[0], "acme", "room", 1)
    root = await stack.call("getRecordings", [])
    assert root.findtext("messageKey") == "unsupportedRequest"


async def test_checksum_error_is_not_streamed(stack: Stack) -> None:
    url = stack.signed("getRecordings", []).replace("checksum=", "checksum=0")
    response = await stack.http.get(url)
    assert etree.fromstring(response.content).findtext("messageKey") == "checksumError"


async def test_many_recordings_are_listed_whole(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2)
    a = seed(stack.sims[0], "acme", "room", 300)
    b = seed(stack.sims[1], "acme", "room", 300, start_ms=BASE + 1)
    with trio.fail_after(10):
        assert await listing(stack, []) == pool_order(a, b)


async def test_a_backend_failing_the_second_pass_leaves_only_its_recordings_out(
    make_stack: StackFactory, passes: str
) -> None:
    stack = await make_stack(backends=3)
    groups = [
        seed(sim, "acme", f"room-{i}", 5, start_ms=BASE + i) for i, sim in enumerate(stack.sims)
    ]
    sim = stack.sims[1]
    original = sim.handle

    def second_pass_fails(request: ApiRequest) -> Reply:
        if request.call == "getRecordings" and "recordID=" in request.raw_query:
            return Reply(500, "<html>oops</html>")
        return original(request)

    sim.handle = second_pass_fails  # type: ignore[method-assign]
    root = await stack.call("getRecordings", [("limit", "100")])
    if passes == "one-pass":
        assert ids(root) == pool_order(*groups)
    else:
        assert ids(root) == pool_order(groups[0], groups[2])
    assert root.findtext("totalElements") == "15"  # what the first pass counted


async def test_listings_are_read_as_they_arrive_not_held_under_the_answer_cap(
    make_stack: StackFactory,
) -> None:
    """A backend's listing is parsed as it streams in, so [proxy] max_answer_bytes (which
    bounds answers held whole) does not bound it."""
    cap = 64 * 1024
    stack = await make_stack(backends=1, proxy={"max_answer_bytes": cap})
    many = seed(stack.sims[0], "acme", "room", 200)
    query = signed_query("getRecordings", [], BACKEND_SECRET)
    direct = await stack.http.get(f"{stack.sim_urls[0]}/getRecordings?{query}")
    assert len(direct.content) > 2 * cap
    assert await listing(stack, []) == pool_order(many)


async def test_a_down_backend_is_not_waited_for(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=2, proxy={"timeouts": {"get_recordings": 5}})
    up = seed(stack.sims[0], "acme", "room", 2)
    (down,) = seed(stack.sims[1], "acme", "room", 1, start_ms=BASE + 1)
    stack.sims[1].behaviour.mode = "hang"
    stack.gateway.set_health("bbb-2", Health(state=State.DOWN))
    started = time.perf_counter()
    assert await listing(stack, []) == pool_order(up)
    changed = await stack.call("deleteRecordings", [("recordID", down.record_id)])
    assert changed.findtext("messageKey") == "serverUnavailable"  # it may be there: not notFound
    assert time.perf_counter() - started < 2
