"""Real servers on loopback for end-to-end tests: simulated BBBs and the gateway."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.config import Config, from_mapping
from proxy.gateway import Gateway
from proxy.ledger.service import Ledger
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator

BACKEND_SECRET = "backend-secret"
CUSTOMERS: list[dict[str, Any]] = [
    {
        "id": "acme",
        "secret": "acme-secret",
        "max_connections": 20,
        "default_max_participants": 10,
        "default_duration": 60,
    },
    {
        "id": "globex",
        "secrets": ["globex-new", "globex-old"],
        "max_connections": 50,
        "default_max_participants": 5,
        "default_duration": 30,
        "hosts": ["bbb.globex.test"],
    },
    {
        "id": "off",
        "secret": "off-secret",
        "enabled": False,
        "max_connections": 10,
        "default_max_participants": 5,
        "default_duration": 30,
    },
]
SECRETS = {"acme": "acme-secret", "globex": "globex-new", "off": "off-secret"}


@dataclass
class Stack:
    gateway: Gateway
    url: str  # http://127.0.0.1:PORT
    sims: list[Simulator]
    sim_urls: list[str]
    http: httpx.AsyncClient
    config: Config
    secrets: dict[str, str] = field(default_factory=lambda: dict(SECRETS))

    def api(self, customer: str = "acme") -> str:
        return f"{self.url}/{customer}/bigbluebutton/api"

    def signed(
        self,
        call: str,
        params: list[tuple[str, str]],
        customer: str = "acme",
        algorithm: str = "sha1",
    ) -> str:
        query = signed_query(call, params, self.secrets[customer], algorithm)
        return f"{self.api(customer)}/{call}?{query}"

    async def call(
        self, call: str, params: list[tuple[str, str]], customer: str = "acme"
    ) -> etree._Element:
        """A signed GET; the parsed XML answer (asserts HTTP 200 and XML)."""
        response = await self.http.get(self.signed(call, params, customer))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/xml")
        return etree.fromstring(response.content)

    async def create(
        self, meeting_id: str, customer: str = "acme", **params: str
    ) -> etree._Element:
        base = [("meetingID", meeting_id), ("name", f"Room {meeting_id}")]
        return await self.call("create", base + list(params.items()), customer)

    def sim_for(self, backend_id: str) -> Simulator:
        ids = [b.id for b in self.config.backends]
        return self.sims[ids.index(backend_id)]

    def backend_meeting(self, customer: str, meeting_id: str) -> tuple[Simulator, str]:
        reservation = self.gateway.ledger.get((customer, meeting_id))
        assert reservation is not None, f"{customer}/{meeting_id} not in the ledger"
        return self.sim_for(reservation.backend_id), reservation.backend_meeting_id


def config_for(
    sim_urls: list[str],
    *,
    capacity: int = 100,
    customers: list[dict[str, Any]] | None = None,
    proxy: dict[str, Any] | None = None,
    webhooks: dict[str, Any] | None = None,
    portal: dict[str, Any] | None = None,
) -> Config:
    data: dict[str, Any] = {
        "webhooks": webhooks or {},
        "portal": portal or {},
        "proxy": {"public_url": "http://127.0.0.1:1", "state_dir": "unused", **(proxy or {})},
        "backends": [
            {"id": f"bbb-{i + 1}", "url": url, "secret": BACKEND_SECRET, "capacity": capacity}
            for i, url in enumerate(sim_urls)
        ],
        "customers": customers if customers is not None else CUSTOMERS,
    }
    return from_mapping(data)


async def start_stack(
    nursery: trio.Nursery,
    state_dir: Path,
    *,
    backends: int = 2,
    capacity: int = 100,
    customers: list[dict[str, Any]] | None = None,
    proxy: dict[str, Any] | None = None,
    ledger: Ledger | None = None,
    webhooks: dict[str, Any] | None = None,
    portal: dict[str, Any] | None = None,
) -> Stack:
    sims = [
        Simulator(BACKEND_SECRET, server_name=f"bbb-{i + 1}.test", expire_unjoined_minutes=None)
        for i in range(backends)
    ]
    sim_urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    port = free_port()
    own = {
        "state_dir": str(state_dir),
        "bind": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "allow_private_callbacks": True,
    }
    config = config_for(
        sim_urls,
        capacity=capacity,
        customers=customers,
        proxy=own | (proxy or {}),
        webhooks=webhooks,
        portal=portal,
    )
    gateway, binds = await nursery.start(_serve, config, ledger)
    http = httpx.AsyncClient(timeout=10)
    return Stack(gateway, binds[0], sims, sim_urls, http, config)


async def _serve(
    config: Config,
    ledger: Ledger | None,
    *,
    task_status: trio.TaskStatus[tuple[Gateway, list[str]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_gateway(config, ledger=ledger, task_status=task_status)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Receiver:
    """A customer's HTTP endpoint that records every request it gets."""

    url: str
    seen: list[str] = field(default_factory=list)


# (ASGI scope, body) -> HTTP status, or an awaitable of it (a receiver that takes its time)
type Respond = Callable[[dict[str, Any], bytes], int | Awaitable[int]]


async def serve_endpoint(nursery: trio.Nursery, respond: Respond) -> str:
    """An HTTP endpoint on loopback: reads each request's body whole, hands it with the
    scope to ``respond`` and answers ``ok`` with the status it returns; its base URL."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = respond(scope, body)
        if not isinstance(status, int):
            status = await status
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, app, config, mode="asgi"))
    return str(binds[0])


async def start_receiver(nursery: trio.Nursery) -> Receiver:
    receiver = Receiver("")

    def respond(scope: dict[str, Any], body: bytes) -> int:
        receiver.seen.append(scope["path"] + "?" + scope["query_string"].decode())
        return 200

    receiver.url = await serve_endpoint(nursery, respond)
    return receiver


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def text(root: etree._Element, path: str) -> str:
    value = root.findtext(path)
    assert value is not None, f"no <{path}> in {etree.tostring(root)!r}"
    return value


type StackFactory = Callable[..., Awaitable[Stack]]


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for something another server does in the background (polls; at most 5 s)."""
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - the condition lives in another server's state
            await trio.sleep(0.01)
