"""The gateway's parts, owned together: config, ledger, placement, backend clients.

:func:`open_gateway` owns the lifetime of every backend client; the call
handlers in :mod:`proxy.calls` receive the :class:`Gateway` and nothing else.

Customers and backends change at run time (:mod:`proxy.runtime`): read them through
the accessors (:meth:`Gateway.customer`, :meth:`Gateway.customers`,
:meth:`Gateway.backends`, ...), never from a config captured earlier.
:meth:`Gateway.reconfigure` puts a new :class:`~proxy.runtime.Directory` in force at
once: ``config`` is replaced, a new backend gets its client, ring points and health,
a removed one loses them (the runtime service removes a backend only once it holds no
meeting).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import trio

from proxy.backends.client import BackendClient, Observer, Transport
from proxy.backends.outbound import TIMEOUT as OUTBOUND_TIMEOUT
from proxy.config import Backend, Config, Customer
from proxy.health import Health, State, Thresholds, responsive, suspended, with_latency
from proxy.ledger.model import BackendSpec
from proxy.ledger.service import Ledger
from proxy.placement import Ring
from proxy.runtime import Directory, RuntimeState, merged
from proxy.store import Log, MemoryLog
from proxy.webhooks.delivery import Webhooks
from proxy.webhooks.registry import HookRegistry

if TYPE_CHECKING:
    from proxy.portal.service import PortalService
    from proxy.runtime_service import RuntimeService

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    config: Config
    ledger: Ledger
    clients: dict[str, BackendClient]
    ring: Ring
    nursery: trio.Nursery  # background work: only through spawn(), which supervises it
    outbound: httpx.AsyncClient  # calls to customers' URLs (see backends/outbound.py)
    hooks: HookRegistry = field(default_factory=lambda: HookRegistry(MemoryLog()))  # issue 9
    health: dict[str, Health] = field(default_factory=dict)  # set by the backend monitor
    modes: dict[str, str] = field(default_factory=dict)  # active | drain | disabled
    task_failures: dict[str, int] = field(default_factory=dict)  # by task kind, for metrics
    failover: dict[str, int] = field(default_factory=dict)  # failover/reconcile events, metrics
    # Counted events other than failover's, by (family, label); see tally() and proxy.metrics.
    tallies: dict[tuple[str, str], int] = field(default_factory=dict)
    # Durable stores by name ("hooks", "runtime", ...): /readyz is 503 while one has failed.
    stores: dict[str, Log] = field(default_factory=dict)
    directory: Directory | None = None  # customers and backends in force; None: config's
    transport_factory: Callable[[str], Transport | None] = lambda _id: None
    runtime: RuntimeService | None = None  # runtime changes (set by serve_gateway)
    portal: PortalService | None = None  # customer administrators (set by proxy.portal)
    # Called with a backend's id when the monitor sees it come back from DOWN.
    on_backend_back: list[Callable[[str], None]] = field(default_factory=list)
    _in_flight: int = field(default=0, init=False)
    _idle: trio.Event = field(default_factory=trio.Event, init=False)
    _changed: trio.Event = field(default_factory=trio.Event, init=False)
    _observer: Observer | None = field(default=None, init=False)
    _retired: list[BackendClient] = field(default_factory=list, init=False)
    # Webhook delivery (issue 9): in memory here; serve_gateway opens the durable queue.
    webhooks: Webhooks = field(init=False)

    def __post_init__(self) -> None:
        if self.directory is None:
            self.directory = merged(self.config, RuntimeState())
        self.config = self.directory.config
        for backend in self.config.backends:
            self.health.setdefault(backend.id, Health())
            self.modes.setdefault(backend.id, backend.mode)
        self.webhooks = Webhooks(self, MemoryLog())

    # -- customers and backends in force (see proxy.runtime) --

    def customers(self) -> tuple[Customer, ...]:
        return self.config.customers

    def customer(self, customer_id: str) -> Customer | None:
        """The customer, with only the secrets still valid now (rotation grace)."""
        assert self.directory is not None
        return self.directory.customer(customer_id, self.ledger.clock())

    def customer_for_host(self, host: str) -> Customer | None:
        assert self.directory is not None
        return self.directory.customer_for_host(host, self.ledger.clock())

    def backends(self) -> tuple[Backend, ...]:
        return self.config.backends

    def backend(self, backend_id: str) -> Backend | None:
        return next((b for b in self.config.backends if b.id == backend_id), None)

    def observe_backends(self, observer: Observer) -> None:
        """Give every backend client, and each one added later, this observer."""
        self._observer = observer
        for client in self.clients.values():
            client.observer = observer

    def reconfigure(self, directory: Directory) -> None:
        """Put ``directory`` in force now: clients, ring, health and modes follow it.

        A backend whose URL changed gets a new client (the old one's calls finish; it
        is closed when the gateway stops); a mode changed at run time is the mode now.
        """
        before = {b.id: b for b in self.config.backends}
        self.directory, self.config = directory, directory.config
        after = {b.id: b for b in self.config.backends}
        for b in after.values():
            self._follow(before.get(b.id), b)
        for gone in before.keys() - after.keys():
            self._retired.append(self.clients.pop(gone))
            self.health.pop(gone, None)
            self.modes.pop(gone, None)
        if list(before) != list(after):
            self.ring = Ring(after.keys())
        self._changed.set()
        self._changed = trio.Event()

    def _follow(self, old: Backend | None, new: Backend) -> None:
        if old is None or old.url != new.url:
            if old is not None:
                self._retired.append(self.clients[new.id])
            self.clients[new.id] = self._open_client(new)
        elif old != new:
            self.clients[new.id].backend = new
        if old is None or old.mode != new.mode:
            self.modes[new.id] = new.mode
        self.health.setdefault(new.id, Health())

    def _open_client(self, backend: Backend) -> BackendClient:
        client = BackendClient(backend, self.config.proxy, self.transport_factory(backend.id))
        if self._observer is not None:
            client.observer = self._observer
        return client

    async def backends_changed(self) -> None:
        """Return at the next :meth:`reconfigure`."""
        await self._changed.wait()

    async def aclose_clients(self) -> None:
        for client in [*self.clients.values(), *self._retired]:
            await client.aclose()

    def spawn[*Ts](self, kind: str, fn: Callable[[*Ts], Awaitable[object]], *args: *Ts) -> None:
        """Run ``fn(*args)`` in the background on behalf of one customer or backend.

        Supervised: an exception is logged (the log filter redacts it) and counted
        under ``kind`` in :attr:`task_failures`; it never reaches the nursery, so it
        never ends the gateway.  Cancellation passes through.
        """
        self.nursery.start_soon(self._supervised, kind, fn, *args)

    async def _supervised[*Ts](
        self, kind: str, fn: Callable[[*Ts], Awaitable[object]], *args: *Ts
    ) -> None:
        try:
            await fn(*args)
        except Exception:
            self.task_failures[kind] = self.task_failures.get(kind, 0) + 1
            log.exception("background task %s failed", kind)

    @contextmanager
    def request_in_flight(self) -> Iterator[None]:
        """Count an API request as in flight, so a graceful stop can wait for it."""
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
                self._idle = trio.Event()

    async def wait_idle(self) -> None:
        """Return once no API request is in flight."""
        if self._in_flight:
            await self._idle.wait()

    def client(self, backend_id: str) -> BackendClient:
        return self.clients[backend_id]

    def accepts_meetings(self, backend_id: str) -> bool:
        """Up and active: may be given new meetings."""
        return self.modes[backend_id] == "active" and self.health[backend_id].state is State.UP

    def thresholds(self) -> Thresholds:
        h = self.config.proxy.health
        return Thresholds(down_after=h.down_after, up_after=h.up_after, slow_after=h.slow_after)

    def set_health(self, backend_id: str, health: Health) -> None:
        """Record a backend's health; a DOWN backend's reservations stop counting at once.

        A backend removed meanwhile (a poll in flight when it went) is left alone."""
        before = self.health.get(backend_id)
        if before is None:
            return
        self.health[backend_id] = health
        if suspended(health):
            self.ledger.state.suspend(backend_id)
        else:
            self.ledger.state.resume(backend_id)
        if health.state is not before.state:
            log.warning("backend %s is now %s", backend_id, health.state.value)

    def observe_latency(self, backend_id: str, seconds: float) -> None:
        """One answer time of ``backend_id`` (a poll or a create), into its latency average."""
        if backend_id in self.health:
            self.health[backend_id] = with_latency(self.health[backend_id], seconds)

    def responsive(self, backend_id: str) -> bool:
        return responsive(self.health[backend_id], self.thresholds())

    def count(self, event: str, n: int = 1) -> None:
        """Count a failover or reconciliation event (see :attr:`failover`)."""
        if n:
            self.failover[event] = self.failover.get(event, 0) + n

    def tally(self, family: str, label: str, n: int = 1) -> None:
        """Count ``n`` events of ``family`` (a metric of :data:`proxy.metrics.TALLIES`),
        e.g. ``gw.tally("admin_changes", "customer_created")``.  ``label`` must come from a
        small fixed set (never an id a peer chose): it becomes a Prometheus label."""
        if n:
            self.tallies[family, label] = self.tallies.get((family, label), 0) + n

    def backend_down(self, backend_id: str) -> bool:
        """DOWN by health: its meetings are not reachable, so a create re-places them
        elsewhere and a join must not send users there (answer an error instead)."""
        health = self.health.get(backend_id)  # not configured (any more): as good as down
        return health is None or health.state is State.DOWN

    def in_service(self) -> list[str]:
        """Backends that are polled and asked for their meetings (not disabled)."""
        return [b.id for b in self.backends() if self.modes[b.id] != "disabled"]

    def backend_specs(self) -> list[BackendSpec]:
        """What the ledger decides a create with: the backends in force, their capacity now."""
        return [
            BackendSpec(b.id, b.capacity, self.accepts_meetings(b.id), self.responsive(b.id))
            for b in self.backends()
        ]


@asynccontextmanager
async def open_gateway(
    config: Config,
    ledger: Ledger | None = None,
    transport_factory: Callable[[str], Transport | None] = lambda _id: None,
    directory: Directory | None = None,
) -> AsyncIterator[Gateway]:
    """A running gateway; its backend clients close when the block exits.

    ``directory``: the customers and backends in force (runtime changes on top of
    ``config``); by default ``config``'s own.
    """
    directory = directory if directory is not None else merged(config, RuntimeState())
    backends = directory.config.backends
    clients = {b.id: BackendClient(b, config.proxy, transport_factory(b.id)) for b in backends}
    outbound = httpx.AsyncClient(timeout=OUTBOUND_TIMEOUT, follow_redirects=False)
    gw: Gateway | None = None
    try:
        async with trio.open_nursery() as nursery:
            gw = Gateway(
                config=directory.config,
                ledger=ledger if ledger is not None else Ledger(),
                clients=clients,
                ring=Ring(b.id for b in backends),
                nursery=nursery,
                hooks=HookRegistry.configured(MemoryLog(), config.webhooks),  # serve: durable
                outbound=outbound,
                directory=directory,
                transport_factory=transport_factory,
            )
            yield gw
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if gw is not None:
                await gw.aclose_clients()
            else:
                for client in clients.values():
                    await client.aclose()
            await outbound.aclose()
