"""The processes of one benchmark run: simulated BBB servers, the gateway, the bare endpoint.

Four processes besides this one (the load generator): ``python -m
proxy.simulator`` serving every simulated backend, ``python -m proxy.cli
serve`` (the gateway, exactly as ``bbb-proxy serve`` runs in production, on a
durable ledger in a temporary ``state_dir``), ``python -m bench.bare`` and
``python -m bench.bare --fixed`` (the floor).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.processes import Server, open_server, read_lines, wait_ready

HOST = "127.0.0.1"
CUSTOMER = "bench"
CUSTOMER_SECRET = "bench-customer-secret"
BACKEND_SECRET = "bench-backend-secret"
UNLIMITED = 1_000_000_000  # customer max_connections and backend capacity: nothing is refused


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server under test: where it listens and which processes serve it.

    With several ports, the load generator spreads its connections over them.
    """

    ports: tuple[int, ...]
    servers: tuple[Server, ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(s.pid for s in self.servers)


@dataclass(frozen=True, slots=True)
class Stack:
    gateway: Endpoint  # served by the gateway and, behind it, its simulated backends
    simulators: Endpoint  # as many other simulated backends, called directly
    simulator_api: str  # their API path, /bigbluebutton/api
    bare: Endpoint  # routes the gateway's URLs: join a 302, anything else a fixed XML
    floor: Endpoint  # the fixed 200 without routing (bench/bare.py --fixed)


@asynccontextmanager
async def open_stack(workdir: Path, backends: int, latency: float) -> AsyncIterator[Stack]:
    """Start every process; stop them all when the block exits."""
    async with AsyncExitStack() as stack:
        start = stack.enter_async_context
        sim = await start(open_server("simulator", _simulator_argv(2 * backends, latency), workdir))
        # The gateway's backends and the direct baseline's must not share meetings: a
        # simulator's per-request cost grows with the meetings it holds.
        sim_urls = await read_lines(sim, 2 * backends)
        gateway_urls, direct_urls = sim_urls[:backends], sim_urls[backends:]
        bare = await start(open_server("bare", _module("bench.bare"), workdir))
        bare_url = (await read_lines(bare, 1))[0]
        floor = await start(open_server("floor", [*_module("bench.bare"), "--fixed"], workdir))
        floor_url = (await read_lines(floor, 1))[0]
        gw_port = free_port()
        config = workdir / "gateway.toml"
        config.write_text(gateway_toml(gw_port, gateway_urls, workdir / "state"))
        gw = await start(open_server("gateway", _gateway_argv(config), workdir))
        await wait_ready(gw, HOST, gw_port, "/readyz")
        yield Stack(
            gateway=Endpoint((gw_port,), (gw, sim)),
            simulators=Endpoint(tuple(_port(u) for u in direct_urls), (sim,)),
            simulator_api=urlsplit(direct_urls[0]).path,
            bare=Endpoint((_port(bare_url),), (bare,)),
            floor=Endpoint((_port(floor_url),), (floor,)),
        )


def gateway_toml(port: int, backend_urls: list[str], state_dir: Path) -> str:
    """The gateway's configuration: one customer, nothing ever refused for capacity."""
    backends = "".join(
        f'[[backends]]\nid = "sim-{i + 1}"\nurl = "{url}"\n'
        f'secret = "{BACKEND_SECRET}"\ncapacity = {UNLIMITED}\n\n'
        for i, url in enumerate(backend_urls)
    )
    return (
        f'[proxy]\nbind = "{HOST}:{port}"\npublic_url = "http://{HOST}:{port}"\n'
        f'state_dir = "{state_dir}"\n\n{backends}'
        f'[[customers]]\nid = "{CUSTOMER}"\nsecret = "{CUSTOMER_SECRET}"\n'
        f"max_connections = {UNLIMITED}\ndefault_max_participants = 1\ndefault_duration = 60\n"
    )


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def _simulator_argv(backends: int, latency: float) -> list[str]:
    options = ["--port", "0", "--count", str(backends), "--secret", BACKEND_SECRET]
    return [*_module("proxy.simulator"), *options, "--latency", str(latency)]


def _gateway_argv(config: Path) -> list[str]:
    return [*_module("proxy.cli"), "serve", "--config", str(config)]


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])
