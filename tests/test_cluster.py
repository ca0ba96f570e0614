"""End-to-end: three gateway processes on one Redis behind HAProxy (issue 13, "Done means").

Every test runs :func:`tests.cluster.open_cluster`: a private redis-server, simulated BBB
servers in their own process, three ``bbb-proxy serve`` processes on ``[store] kind =
"redis"`` and HAProxy with ``config/haproxy.cfg``.  What is checked is what a deployment
promises: the SPEC's reservation example holds when each step goes to another instance;
concurrent creates on all instances never overbook (checked in the ledger Redis holds, in
every instance's admin API and on the simulators) and make one backend meeting per
meetingID; a ``kill -9`` of an instance or of Redis in the middle of a burst loses no
acknowledged meeting; a create on one instance is seen at once by the others.

The backend poll once per interval is tests/test_cluster_polls.py's.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lxml import etree

from proxy.ledger.model import LedgerState
from tests.cluster import (
    CUSTOMER,
    HAPROXY_CFG,
    ROOT,
    Cluster,
    haproxy_config,
    open_cluster,
    session_alive,
    tool,
    wait_for,
)

HOUR = 3600.0
REFUSED = {"noServerCapacity", "subscriptionExhausted"}


def answer(root: etree._Element) -> str:
    """``SUCCESS``, or ``FAILED:<messageKey>``."""
    code = root.findtext("returncode") or "?"
    return code if code == "SUCCESS" else f"{code}:{root.findtext('messageKey')}"


def assert_within_limits(state: LedgerState, capacity: int, max_connections: int) -> None:
    stats = state.statistics()
    assert all(used <= capacity for used in stats.connections_by_backend.values()), stats
    assert stats.connections_by_customer.get(CUSTOMER, 0) <= max_connections, stats


async def admin_meetings(cluster: Cluster, via: int) -> set[str]:
    return {m["meeting_id"] for m in await cluster.admin(via, f"meetings?customer={CUSTOMER}")}


async def every_instance_sees(cluster: Cluster, expected: set[str]) -> None:
    """Every instance's admin API lists exactly ``expected`` (each catches up by itself)."""
    for via in range(len(cluster.instances)):

        async def same(via: int = via) -> bool:
            return await admin_meetings(cluster, via) == expected

        await wait_for(same)


def gateway_meeting_ids(backend: dict[str, list[etree._Element]]) -> Counter[str]:
    """How many backend meetings each customer meetingID has (the backend's ids are
    ``<customer>~<meetingID>``, docs/decisions.md "Meeting IDs on the backends")."""
    ids = [m.findtext("meetingID") or "" for meetings in backend.values() for m in meetings]
    return Counter(i.split("~", 1)[1] for i in ids)


async def ended_then_gone(cluster: Cluster, meeting: str, via: int) -> None:
    """getMeetingInfo of a meeting another instance has just ended, on ``via``: its replica
    may hold the meeting until it follows the log (every 0.25 s, proxy.ledger.shared), and
    its answer is then the backend's ended meeting, never a running one; then notFound."""
    seen = await cluster.call("getMeetingInfo", [("meetingID", meeting)], via)
    if answer(seen) == "SUCCESS":
        assert seen.findtext("running") == "false", etree.tostring(seen)
        assert seen.findtext("hasBeenForciblyEnded") == "true", etree.tostring(seen)

    async def not_found() -> bool:
        info = await cluster.call("getMeetingInfo", [("meetingID", meeting)], via)
        return answer(info) == "FAILED:notFound"

    await wait_for(not_found, 2)


async def held(cluster: Cluster) -> dict[str, Any]:
    """For a failure's message: the meetings Redis and each instance hold."""
    return {
        "redis": sorted((r.meeting_id, r.connections, r.confirmed) for r in await cluster.ledger()),
        **{f"instance {v}": sorted(await admin_meetings(cluster, v)) for v in range(3)},
    }


# -- the shipped files -------------------------------------------------------------------------


async def test_shipped_haproxy_config_is_valid() -> None:
    """config/haproxy.cfg as shipped, and as the tests run it, passes ``haproxy -c``."""
    haproxy = tool("haproxy")
    shipped = await trio.run_process(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_stdout=True, capture_stderr=True
    )
    assert b"Configuration file is valid" in shipped.stdout + shipped.stderr
    for needed in ("option forwardfor", "uri /readyz", "expect status 200", "balance leastconn"):
        assert needed in HAPROXY_CFG.read_text()


async def test_loopback_haproxy_config_is_valid_without_warnings(tmp_path: Path) -> None:
    haproxy = tool("haproxy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(18000, [18001, 18002, 18003], "100ms"))
    checked = await trio.run_process(
        [haproxy, "-c", "-f", str(cfg)], capture_stdout=True, capture_stderr=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert b"WARNING" not in checked.stderr, checked.stderr
    broken = tmp_path / "broken.cfg"  # the check can fail
    broken.write_text(cfg.read_text().replace("balance leastconn", "balance nowhere"))
    refused = await trio.run_process(
        [haproxy, "-c", "-f", str(broken)], capture_stdout=True, capture_stderr=True, check=False
    )
    assert refused.returncode != 0


def test_compose_file_names_what_is_shipped() -> None:
    """docker-compose.yml parses (with the YAML parser the venv has, PyYAML-ft through
    mutmut's libcst: no dependency added for it) and runs three gateways from the
    Dockerfile, Redis with AOF always, HAProxy with config/haproxy.cfg and Prometheus
    with a config that scrapes all three."""
    try:
        yaml: Any = importlib.import_module("yaml_ft")  # what the venv has
    except ModuleNotFoundError:
        yaml = importlib.import_module("yaml")  # PyYAML, its original
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    gateways = sorted(name for name in services if name.startswith("gateway"))
    assert gateways == ["gateway1", "gateway2", "gateway3"]
    for name in gateways:
        assert services[name]["build"]["context"] == "."
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--appendfsync always" in redis
    mounted = [v.split(":")[0] for s in services.values() for v in s.get("volumes", [])]
    for path in (p for p in mounted if p.startswith("./")):
        assert (ROOT / path).exists(), path
    assert "./config/haproxy.cfg" in mounted
    prometheus = yaml.safe_load((ROOT / "config" / "prometheus-cluster.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == [f"{g}:8080" for g in gateways]


async def test_prometheus_cluster_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "Debian's prometheus package is not installed (./run test installs it)"
        if os.environ.get("BBB_PROXY_NEED_PROMETHEUS"):
            pytest.fail(message)
        pytest.skip(message)
    config = ROOT / "config" / "prometheus-cluster.yml"
    checked = await trio.run_process([promtool, "check", "config", str(config)], check=False)
    assert checked.returncode == 0


# -- the harness itself ------------------------------------------------------------------------


async def test_harness_leaves_no_process_and_haproxy_forwards_the_client(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        sessions = cluster.sessions()
        assert len(sessions) == 5  # simulators, haproxy, three gateways
        assert all(session_alive(s) for s in sessions)
        vias = {via: await cluster.ready(via) for via in (0, 1, 2, None)}
        assert vias == {0: 200, 1: 200, 2: 200, None: 200}
        # HAProxy's X-Forwarded-For: a call from 127.0.0.2 is logged with that address by
        # the instance HAProxy sent it to (it trusts HAProxy, on 127.0.0.1).
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            response = await client.get(cluster.signed("getMeetings", [], None))
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]

        async def logged() -> list[dict[str, Any]]:
            lines = []
            for instance in cluster.instances:
                text = await trio.Path(instance.proc.log).read_text()
                lines += [json.loads(line) for line in text.splitlines() if request_id in line]
            return lines

        await wait_for(logged)
        assert [line["client"] for line in await logged()] == ["127.0.0.2"]
    assert not any(session_alive(s) for s in sessions)


# -- SPEC §4 across instances ------------------------------------------------------------------


async def test_spec_example_each_step_on_another_instance(tmp_path: Path) -> None:
    """Subscription 20. A: 15 for 2 h. B asks 10 during A's two hours: refused, A untouched.
    B asks 5: created, A untouched. B asks 10 after A's two hours: A is ended, B is created.
    (tests/test_e2e_reservations.py's steps; here each on the next instance, the gateways'
    clocks moved together by libfaketime.)"""
    async with open_cluster(tmp_path, fake_clock=True) as cluster:
        a = await cluster.create("meeting-A", 0, maxParticipants="15", duration="120")
        assert answer(a) == "SUCCESS", etree.tostring(a)

        cluster.advance_clock(2 * HOUR - 60)
        refused = await cluster.create("meeting-B", 1, maxParticipants="10", duration="60")
        assert answer(refused) == "FAILED:subscriptionExhausted"
        info = await cluster.call("getMeetingInfo", [("meetingID", "meeting-A")], 2)
        assert answer(info) == "SUCCESS"

        small = await cluster.create("meeting-B5", 0, maxParticipants="5", duration="60")
        assert answer(small) == "SUCCESS"
        info = await cluster.call("getMeetingInfo", [("meetingID", "meeting-A")], 1)
        assert answer(info) == "SUCCESS"
        ended = await cluster.call("end", [("meetingID", "meeting-B5")], 2)
        assert answer(ended) == "SUCCESS"

        cluster.advance_clock(61)
        created = await cluster.create("meeting-B", 1, maxParticipants="10", duration="60")
        assert answer(created) == "SUCCESS", etree.tostring(created)

        async def a_ended_on_its_backend() -> bool:
            for meetings in (await cluster.backend_meetings()).values():
                for m in meetings:
                    if m.findtext("meetingID") == f"{CUSTOMER}~meeting-A":
                        return m.findtext("running") == "false" and m.findtext("endTime") != "0"
            return False

        await wait_for(a_ended_on_its_backend)
        await ended_then_gone(cluster, "meeting-A", 2)  # (preempted, ended in the background)
        held = {r.meeting_id for r in await cluster.ledger()}
        assert held == {"meeting-B"}
        await every_instance_sees(cluster, {"meeting-B"})


# -- concurrency -------------------------------------------------------------------------------


async def test_200_concurrent_creates_over_three_instances_never_overbook(tmp_path: Path) -> None:
    """One customer (50 connections), 3 backends of 14: 200 creates of 2, spread over the
    instances, at once.  The backends fit 21 meetings, so 21 are created and 179 refused."""
    async with open_cluster(tmp_path, capacity=14, max_connections=50) as cluster:
        answers: list[tuple[str, str]] = []

        async def one(i: int) -> None:
            root = await cluster.create(f"m{i}", i % 3, maxParticipants="2")
            answers.append((f"m{i}", answer(root)))

        async with trio.open_nursery() as burst:
            for i in range(200):
                burst.start_soon(one, i)
        counts = Counter(a for _, a in answers)
        created = {m for m, a in answers if a == "SUCCESS"}
        assert set(counts) <= {"SUCCESS", *(f"FAILED:{k}" for k in REFUSED)}, counts
        assert counts["SUCCESS"] == 21, counts  # no overbooking, and nothing refused wrongly

        state = await cluster.ledger()  # the ledger Redis holds
        assert_within_limits(state, capacity=14, max_connections=50)
        assert {r.meeting_id for r in state} == created
        assert all(r.confirmed for r in state)
        await every_instance_sees(cluster, created)
        for via in range(3):
            status = await cluster.admin(via, "status")
            for row in status["backends"]:
                assert row["reserved_connections"] <= row["capacity"] == 14, row
            assert status["totals"]["reserved_connections"] == 42
        backend = await cluster.backend_meetings()
        assert all(len(meetings) <= 7 for meetings in backend.values()), backend
        assert set(gateway_meeting_ids(backend)) == created


async def test_50_concurrent_creates_of_one_meeting_make_one_backend_meeting(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path, latency=0.05) as cluster:
        answers: list[tuple[str, str]] = []

        async def one(i: int) -> None:
            via = None if i % 4 == 3 else i % 4  # the three instances and HAProxy
            root = await cluster.create("same-room", via, maxParticipants="4")
            answers.append((answer(root), root.findtext("internalMeetingID") or ""))

        async with trio.open_nursery() as burst:
            for i in range(50):
                burst.start_soon(one, i)
        assert {code for code, _ in answers} == {"SUCCESS"}, Counter(answers)
        assert len({internal for _, internal in answers}) == 1
        backend = await cluster.backend_meetings()
        assert gateway_meeting_ids(backend) == Counter({"same-room": 1})
        state = await cluster.ledger()
        assert [(r.meeting_id, r.connections) for r in state] == [("same-room", 4)]


# -- faults ------------------------------------------------------------------------------------


async def burst_through(
    cluster: Cluster, during: Any, *, after: int, then: int, via: Any = None
) -> list[tuple[str, str]]:
    """Creates of one connection each, 10 at a time, through ``via`` (HAProxy unless
    told; a function of the create's number picks an instance); once ``after`` have
    answered, ``during()`` runs (the fault) while the burst goes on, and the burst ends
    ``then`` answers after it returned.  Each answer: (meetingID, ``answer()``, with
    ``HTTP <status>`` before it when not 200)."""
    answers: list[tuple[str, str]] = []
    fault_done = trio.Event()
    numbers = itertools.count()
    after_fault = 0

    async def fault() -> None:
        await during()
        fault_done.set()

    async def worker(nursery: trio.Nursery) -> None:
        nonlocal after_fault
        while not (fault_done.is_set() and after_fault >= then):
            i = next(numbers)
            assert i < 20_000, "the fault never ended"
            target = via(i) if callable(via) else via
            params = [("meetingID", f"k{i}"), ("name", f"Room k{i}"), ("maxParticipants", "1")]
            try:
                response = await cluster.get("create", params, target)
            except httpx.RemoteProtocolError:
                # A kept-alive connection to HAProxy closed as the instance behind it died,
                # before this request was read (HAProxy logs nothing): no answer at all.
                answers.append((f"k{i}", "disconnected"))
                continue
            # Every answer a client gets is BBB XML, HAProxy's own errors included.
            assert response.headers["content-type"].startswith("text/xml"), response.text
            code = answer(etree.fromstring(response.content))
            if response.status_code != 200:
                assert response.status_code in (502, 503, 504) and code.startswith("FAILED:")
                code = f"HTTP {response.status_code} {code}"
            answers.append((f"k{i}", code))
            if fault_done.is_set():
                after_fault += 1
            if len(answers) == after:
                nursery.start_soon(fault)
            if code != "SUCCESS":
                await trio.sleep(0.05)  # pacing while the fault lasts, as a client would

    async with trio.open_nursery() as burst:
        for _ in range(10):
            burst.start_soon(worker, burst)
    return answers


async def test_kill_9_of_an_instance_in_a_burst_loses_no_acknowledged_meeting(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path, max_connections=1000, latency=0.02) as cluster:

        async def crash() -> None:
            await cluster.kill(1)

        answers = await burst_through(cluster, crash, after=40, then=60)
        acknowledged = {m for m, a in answers if a == "SUCCESS"}
        assert len(acknowledged) >= 90, Counter(a for _, a in answers)
        held = {r.meeting_id for r in await cluster.ledger()}
        assert acknowledged <= held
        backend = gateway_meeting_ids(await cluster.backend_meetings())
        assert acknowledged <= set(backend)
        for via in (0, 2):  # the survivors
            assert acknowledged <= await admin_meetings(cluster, via)
        await cluster.start(1)  # and the killed one, started again, has them all
        assert acknowledged <= await admin_meetings(cluster, 1)


async def test_redis_killed_and_restarted_in_a_burst_loses_nothing_and_recovers(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path, max_connections=1000) as cluster:
        before = await cluster.create("known", 0, maxParticipants="1")
        assert answer(before) == "SUCCESS"
        outage: dict[str, Any] = {}

        async def redis_outage() -> None:
            await cluster.kill_redis()
            for via in range(3):

                async def unready(via: int = via) -> bool:
                    return await cluster.ready(via) == 503

                await wait_for(unready)
            failed = await cluster.create("during", 1, maxParticipants="1")
            outage["create"] = answer(failed)
            join = await cluster.get(
                "join", [("meetingID", "known"), ("fullName", "Ada"), ("role", "VIEWER")], 2
            )
            outage["join"] = join.status_code
            # Through HAProxy too: with no instance ready it sends calls to the live ones.
            await wait_for(lambda: _lb_has_none_ready(cluster))
            lb_join = await cluster.get(
                "join", [("meetingID", "known"), ("fullName", "Bo"), ("role", "VIEWER")], None
            )
            outage["lb_join"] = lb_join.status_code
            outage["lb_create"] = answer(await cluster.create("during-lb", None))
            await cluster.start_redis()
            for via in range(3):

                async def ready(via: int = via) -> bool:
                    return await cluster.ready(via) == 200

                await wait_for(ready, 20)

        answers = await burst_through(cluster, redis_outage, after=30, then=40, via=lambda i: i % 3)
        assert outage["create"] == "FAILED:serverUnavailable"
        assert outage["join"] == 302  # a known meeting's join works without Redis
        assert outage["lb_join"] == 302
        assert outage["lb_create"] == "FAILED:serverUnavailable"  # the gateway's own answer
        codes = Counter(a for _, a in answers)
        assert set(codes) <= {"SUCCESS", "FAILED:serverUnavailable"}, codes
        acknowledged = {m for m, a in answers if a == "SUCCESS"}
        assert len(acknowledged) >= 60, codes  # before and after the outage
        # Recovered without a restart: a create on each instance works again.
        for via in range(3):
            assert answer(await cluster.create(f"after-{via}", via, maxParticipants="1")) == (
                "SUCCESS"
            )
        acknowledged |= {"known", "after-0", "after-1", "after-2"}
        held = {r.meeting_id for r in await cluster.ledger()}
        assert acknowledged <= held
        assert acknowledged <= set(gateway_meeting_ids(await cluster.backend_meetings()))
        assert all(i.proc.running for i in cluster.instances)


async def _lb_has_none_ready(cluster: Cluster) -> bool:
    """Whether HAProxy has taken every instance out of ``gateways`` (it says so in its log)."""
    log = await trio.Path(cluster.haproxy.log).read_text()
    return "backend gateways has no server available" in log


# -- read-your-writes --------------------------------------------------------------------------


async def test_create_on_one_instance_is_seen_at_once_by_another(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        for i in range(6):
            a, b = i % 3, (i + 1) % 3
            meeting = f"ryw-{i}"
            created = await cluster.create(meeting, a, maxParticipants="2")
            assert answer(created) == "SUCCESS"
            info = await cluster.call("getMeetingInfo", [("meetingID", meeting)], b)
            assert answer(info) == "SUCCESS", (a, b, etree.tostring(info))
            join = await cluster.get(
                "join", [("meetingID", meeting), ("fullName", "Ada"), ("role", "VIEWER")], b
            )
            assert join.status_code == 302, (a, b, join.text)
            ended = await cluster.call("end", [("meetingID", meeting)], b)
            assert answer(ended) == "SUCCESS", (a, b, etree.tostring(ended))
            await ended_then_gone(cluster, meeting, a)


async def test_end_on_one_instance_frees_connections_for_another_at_once(
    tmp_path: Path,
) -> None:
    """The customer's 20 connections held by one meeting; ended on A, a create of 20 on
    B is admitted at once."""
    async with open_cluster(tmp_path) as cluster:
        for i in range(6):
            a, b = i % 3, (i + 1) % 3
            full = await cluster.create(f"full-{i}", a, maxParticipants="20")
            assert answer(full) == "SUCCESS", (i, a, b, await held(cluster))
            refused = await cluster.create(f"more-{i}", b, maxParticipants="1")
            assert answer(refused) == "FAILED:subscriptionExhausted", (i, a, b, await held(cluster))
            ended = await cluster.call("end", [("meetingID", f"full-{i}")], a)
            assert answer(ended) == "SUCCESS", (i, a, b, etree.tostring(ended))
            again = await cluster.create(f"next-{i}", b, maxParticipants="20")
            assert answer(again) == "SUCCESS", (i, a, b, await held(cluster))
            ended = await cluster.call("end", [("meetingID", f"next-{i}")], b)
            assert answer(ended) == "SUCCESS", (i, a, b, etree.tostring(ended))
