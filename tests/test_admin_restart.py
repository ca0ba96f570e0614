"""Runtime changes survive ``kill -9``: the gateway runs as a real process (``bbb-proxy
serve``), is changed through the admin API, killed with SIGKILL and started again on the
same ``state_dir``; every change still shapes what the BBB API does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.simulator import Simulator, serve_simulator
from tests.harness import BACKEND_SECRET, free_port
from tests.test_crash_recovery import SECRET, TOKEN, Gateway, write_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Api:
    def __init__(self, http: httpx.AsyncClient, port: int) -> None:
        self.http, self.base = http, f"http://127.0.0.1:{port}"

    async def admin(self, method: str, path: str, body: object = None, expect: int = 200) -> Any:
        content = None if body is None else orjson.dumps(body)
        response = await self.http.request(
            method, f"{self.base}/admin/v1/{path}", headers=AUTH, content=content
        )
        assert response.status_code == expect, response.text
        return orjson.loads(response.content)

    async def bbb(self, customer: str, secret: str, call: str, **params: str) -> etree._Element:
        query = signed_query(call, list(params.items()), secret)
        response = await self.http.get(f"{self.base}/{customer}/bigbluebutton/api/{call}?{query}")
        return etree.fromstring(response.content)

    async def create(self, customer: str, secret: str, meeting_id: str, size: int) -> str:
        root = await self.bbb(
            customer, secret, "create", meetingID=meeting_id, name=meeting_id,
            maxParticipants=str(size),
        )  # fmt: skip
        return root.findtext("returncode") or ""


async def test_runtime_changes_survive_sigkill(tmp_path: Path, nursery: trio.Nursery) -> None:
    sims = [Simulator(BACKEND_SECRET, expire_unjoined_minutes=None) for _ in range(3)]
    urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, port, urls[:2], tmp_path / "state")  # bbb-1, bbb-2; customer acme
    gw = Gateway(config, port, tmp_path / "gateway.log")
    async with httpx.AsyncClient(timeout=10) as http:
        api = Api(http, port)
        await gw.start(nursery, http)
        new = await api.admin(
            "POST", "customers", {"id": "initech", "max_connections": 4,
            "default_max_participants": 1, "default_duration": 30}, expect=201,
        )  # fmt: skip
        initech = new["secret"]
        await api.admin("PATCH", "customers/acme", {"max_connections": 5})
        rotated = await api.admin("POST", "customers/acme/secrets", {}, expect=201)
        acme_new = rotated["secret"]
        await api.admin(
            "POST", "backends", {"id": "bbb-3", "url": urls[2], "secret": BACKEND_SECRET,
            "capacity": 50}, expect=201,
        )  # fmt: skip
        await api.admin("PATCH", "backends/bbb-1", {"mode": "drain"})
        assert await api.create("acme", SECRET, "held", 2) == "SUCCESS"
        pinned = (await api.admin("GET", "meetings/acme/held"))["backend"]
        assert pinned in ("bbb-2", "bbb-3")
        other = "bbb-3" if pinned == "bbb-2" else "bbb-2"
        answer = await api.admin("DELETE", f"backends/{pinned}", expect=202)  # it holds "held"
        assert answer["removed"] is False
        await gw.kill()

        await gw.start(nursery, http)
        customers = {c["id"]: c for c in await api.admin("GET", "customers")}
        assert customers["acme"]["max_connections"] == 5
        assert customers["acme"]["source"]["max_connections"] == "runtime"
        assert customers["acme"]["secrets"] == 2
        assert await api.create("initech", initech, "i-1", 1) == "SUCCESS"  # the new customer
        assert await api.create("acme", acme_new, "a-1", 2) == "SUCCESS"  # the new secret
        root = await api.bbb(
            "acme", SECRET, "create", meetingID="a-2", name="x", maxParticipants="2"
        )
        assert root.findtext("messageKey") == "subscriptionExhausted"  # old secret valid; 6 > 5
        backends = {b["id"]: b for b in await api.admin("GET", "backends")}
        assert set(backends) == {"bbb-1", "bbb-2", "bbb-3"}
        assert backends["bbb-1"]["mode"] == "drain" and backends[pinned]["removing"] is True
        placed = {m["meeting_id"]: m["backend"] for m in await api.admin("GET", "meetings")}
        assert placed["held"] == pinned and placed["a-1"] == other and placed["i-1"] == other
        ended = await api.bbb("acme", acme_new, "end", meetingID="held")
        assert ended.findtext("returncode") == "SUCCESS"
        for _ in range(50):  # the removal resumed after the restart: gone once empty
            if pinned not in {b["id"] for b in await api.admin("GET", "backends")}:
                break
            await trio.sleep(0.2)
        else:
            raise AssertionError(f"{pinned} was not removed once empty")
        await gw.kill()

        await gw.start(nursery, http)  # and the removal, too, survives a kill
        assert {b["id"] for b in await api.admin("GET", "backends")} == {"bbb-1", other}
        await gw.kill()
