"""A gateway with [voice] / [fsapi] settings in front of simulated BBBs, for the voice tests.

Like :func:`tests.harness.start_stack`, on real sockets, but with three backends, two
customers with room for hundreds of meetings, a seeded random source for the voice
bridges, and a gateway that can be stopped and started again on the same ``state_dir``
while the simulated servers keep their meetings (a restart).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from proxy.config import Config, from_mapping
from proxy.gateway import Gateway
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from tests.harness import BACKEND_SECRET, Stack, free_port

VOICE_CUSTOMERS: list[dict[str, Any]] = [
    {
        "id": "acme",
        "secret": "acme-secret",
        "max_connections": 10_000,
        "default_max_participants": 1,
        "default_duration": 60,
    },
    {
        "id": "globex",
        "secret": "globex-secret",
        "max_connections": 10_000,
        "default_max_participants": 1,
        "default_duration": 60,
    },
]
VOICE_SECRETS = {"acme": "acme-secret", "globex": "globex-secret"}


@dataclass
class VoiceStack:
    """Simulated BBBs that outlive the gateway in front of them (restart with ``start``)."""

    nursery: trio.Nursery
    state_dir: Path
    sims: list[Simulator]
    sim_urls: list[str]
    sections: dict[str, Any]
    seed: int = 1
    stack: Stack | None = None
    _stop: trio.CancelScope | None = None
    _stopped: trio.Event = field(default_factory=trio.Event)

    def config(self, port: int) -> Config:
        return from_mapping(
            {
                "proxy": {
                    "state_dir": str(self.state_dir),
                    "bind": f"127.0.0.1:{port}",
                    "public_url": f"http://127.0.0.1:{port}",
                    "allow_private_callbacks": True,
                },
                "backends": [
                    {"id": f"bbb-{i + 1}", "url": url, "secret": BACKEND_SECRET, "capacity": 100}
                    for i, url in enumerate(self.sim_urls)
                ],
                "customers": VOICE_CUSTOMERS,
                **self.sections,
            }
        )

    async def start(self) -> Stack:
        """Start the gateway (again); its ledger replays ``state_dir``."""
        config = self.config(free_port())
        self._stop, self._stopped = trio.CancelScope(), trio.Event()
        gateway, binds = await self.nursery.start(self._serve, config, self._stop, self._stopped)
        gateway.ledger.rng = random.Random(self.seed)
        self.seed += 1
        http = httpx.AsyncClient(timeout=10)
        self.stack = Stack(gateway, binds[0], self.sims, self.sim_urls, http, config)
        self.stack.secrets = dict(VOICE_SECRETS)
        return self.stack

    async def stop(self) -> None:
        """Stop the gateway as a shutdown does (its journal closed); the BBBs go on."""
        assert self._stop is not None and self.stack is not None
        await self.stack.http.aclose()
        self._stop.cancel()
        await self._stopped.wait()

    @staticmethod
    async def _serve(
        config: Config,
        scope: trio.CancelScope,
        stopped: trio.Event,
        *,
        task_status: trio.TaskStatus[tuple[Gateway, list[str]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with scope:
                await serve_gateway(config, task_status=task_status)
        finally:
            stopped.set()


type VoiceFactory = Callable[..., Awaitable[VoiceStack]]


@asynccontextmanager
async def voice_stacks(nursery: trio.Nursery, state_dir: Path) -> AsyncIterator[VoiceFactory]:
    """Make voice stacks (``make(**sections)``); their clients are closed at the end."""
    made: list[VoiceStack] = []

    async def make(backends: int = 3, **sections: Any) -> VoiceStack:
        made.append(await start_voice_stack(nursery, state_dir, backends, **sections))
        return made[-1]

    try:
        yield make
    finally:
        for voice in made:
            if voice.stack is not None:
                await voice.stack.http.aclose()


async def start_voice_stack(
    nursery: trio.Nursery, state_dir: Path, backends: int = 3, **sections: Any
) -> VoiceStack:
    sims = [
        Simulator(BACKEND_SECRET, server_name=f"bbb-{i + 1}.test", expire_unjoined_minutes=None)
        for i in range(backends)
    ]
    urls = [await nursery.start(serve_simulator, sim) for sim in sims]
    voice = VoiceStack(nursery, state_dir, sims, urls, sections)
    await voice.start()
    return voice
