"""Hooks and webhook events across gateway processes behind HAProxy (issue 13).

Three ``bbb-proxy serve`` processes on one ``redis-server`` (:mod:`tests.cluster`): a hook
made on one is listed on the others at once; the simulated BBB server posts its events to
the load balancer, which spreads them over the instances; each event reaches the
customer's receiver once, also when the instance delivering a hook is killed with SIGKILL
(another takes its hooks over once its heartbeat on Redis runs out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import trio
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.config import StoreSettings
from proxy.store.redis import open_redis_store
from proxy.webhooks.queue import QueueState
from tests.cluster import BACKEND_SECRET, KEY_PREFIX, Cluster, open_cluster, wait_for
from tests.harness import serve_endpoint

ROOMS = 6


class Receiver:
    """The customer's webhook receiver: (meetingID, event id) of every event it took."""

    def __init__(self) -> None:
        self.took: Counter[tuple[str, str]] = Counter()

    async def respond(self, scope: dict[str, Any], body: bytes) -> int:
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        for event in orjson.loads(form.get("event", "[]")):
            meeting = event["data"]["attributes"]["meeting"]["external-meeting-id"]
            self.took[(str(meeting), str(event["data"]["id"]))] += 1
        return 200

    def has(self, event_id: str) -> Callable[[], Awaitable[bool]]:
        """A condition for :func:`wait_for`: every room's ``event_id`` taken."""

        async def taken() -> bool:
            return all((f"room-{k}", event_id) in self.took for k in range(ROOMS))

        return taken


async def hooks_call(cluster: Cluster, call: str, params: list[tuple[str, str]], via: int) -> Any:
    return await cluster.call(f"hooks/{call}", params, via)


async def nothing_queued(cluster: Cluster) -> bool:
    """Whether the shared webhook queue, as Redis holds it, is empty (each delivery recorded)."""
    settings = StoreSettings(kind="redis", url=cluster.redis.url, key_prefix=KEY_PREFIX)
    async with open_redis_store(settings, timeout=5.0) as store:
        queues = QueueState()
        for record in store.open("webhook-queue")[1]:
            queues.apply(record)
        return queues.statistics().events == 0


async def intake_registered(cluster: Cluster) -> bool:
    """Whether the gateway's own hook is on the simulated BBB server (its events come)."""
    query = signed_query("hooks/list", [], BACKEND_SECRET)
    response = await cluster.http.get(f"{cluster.sim_urls[0]}/hooks/list?{query}")
    return response.status_code == 200 and b"<hookID>" in response.content


async def delivered_by(cluster: Cluster, via: int) -> float:
    """The webhook events one instance POSTed (its ``/metrics``)."""
    metrics = (await cluster.http.get(f"{cluster.base(via)}/metrics")).text
    line = 'bbb_proxy_webhook_events_total{outcome="delivered"} '
    return sum(float(m.removeprefix(line)) for m in metrics.splitlines() if m.startswith(line))


async def test_hooks_and_events_across_three_processes_each_event_once_across_a_kill(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = Receiver()
    url = await serve_endpoint(nursery, receiver.respond)
    async with open_cluster(tmp_path, instances=3, backends=1, max_connections=100) as cluster:
        await wait_for(lambda: intake_registered(cluster), 30)
        hook_ids = []
        for k in range(ROOMS):
            room = f"room-{k}"
            created = await hooks_call(
                cluster, "create", [("callbackURL", f"{url}/hook"), ("meetingID", room)], k % 3
            )
            assert created.findtext("returncode") == "SUCCESS", etree.tostring(created)
            hook_id = str(created.findtext("hookID"))
            hook_ids.append(hook_id)
            listed = await hooks_call(cluster, "list", [("meetingID", room)], (k + 1) % 3)
            assert [h.findtext("hookID") for h in listed.iter("hook")] == [hook_id]
            answer = await cluster.create(room, via=None)  # through HAProxy
            assert answer.findtext("returncode") == "SUCCESS", etree.tostring(answer)
        await wait_for(receiver.has("meeting-created"), 30)
        await wait_for(lambda: nothing_queued(cluster), 10)  # every delivery recorded
        delivered = [await delivered_by(cluster, i) for i in range(3)]
        assert sum(delivered) == ROOMS
        busiest = delivered.index(max(delivered))  # it owns hooks: the kill takes them away
        await cluster.kill(busiest)  # SIGKILL: its hooks wait for its heartbeat to run out
        for k in range(ROOMS):
            via = (busiest + 1 + k % 2) % 3  # the other two
            ended = await cluster.call("end", [("meetingID", f"room-{k}")], via=via)
            assert ended.findtext("returncode") == "SUCCESS", etree.tostring(ended)
        await wait_for(receiver.has("meeting-ended"), 40)
        await wait_for(lambda: nothing_queued(cluster), 10)
    assert all(count == 1 for count in receiver.took.values()), receiver.took
