"""Serving the gateway (:mod:`proxy.front`: the API's GETs on its own connection loop,
everything else by hypercorn's trio worker), and stopping it cleanly.

``serve_gateway`` never returns until cancelled or until SIGTERM/SIGINT asks it
to stop; it reports the bound URLs through ``task_status`` (port 0 binds a
free port, which the tests use).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig

from proxy import front, request_log, store
from proxy.app import create_app
from proxy.backends.client import Transport
from proxy.backends.monitor import monitor_backends, reconcile_all
from proxy.config import Config, Timeouts, split_bind
from proxy.errors import ConfigError, StateError
from proxy.fast_api import fast_api, response_timeout
from proxy.gateway import Gateway, open_gateway
from proxy.ledger.journal import open_durable_ledger
from proxy.ledger.service import Ledger

if TYPE_CHECKING:
    from proxy.store.redis import RedisStore
    from proxy.workers import Seat
from proxy.runtime_service import open_runtime
from proxy.webhooks.delivery import open_webhooks
from proxy.webhooks.registry import open_hooks

log = logging.getLogger(__name__)
SHUTDOWN_DEADLINE = 10.0  # seconds in-flight requests get after SIGTERM


def hypercorn_config(
    bind: str, max_header_bytes: int, timeouts: Timeouts | None = None
) -> HypercornConfig:
    """hypercorn's settings: every client connection bounded in time and size.

    - ``keep_alive_timeout`` (``client_idle``): an idle connection is closed; hypercorn
      keeps that timer running until a request's head is complete, so a head that
      trickles in is bounded by it too;
    - ``read_timeout`` (``client_read``): a connection silent that long in the
      middle of a request is closed (the body's whole-time bound is the app's
      ``BODY_TIMEOUT``, set in :func:`_serve_app`).
    """
    timeouts = timeouts or Timeouts()
    config = HypercornConfig()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = SHUTDOWN_DEADLINE
    # Leave room for long create URLs; the gateway's own limit answers BBB's envelope.
    config.h11_max_incomplete_size = max_header_bytes
    config.keep_alive_timeout = timeouts.client_idle
    config.read_timeout = timeouts.client_read  # type: ignore[assignment]  # a float works
    return config


def resolve_bind(bind: str) -> tuple[socket.AddressFamily, socket.SocketKind, int, Any]:
    """``bind``'s socket family, kind, protocol and address (blocking: a name lookup).

    Error handling: ``ConfigError`` naming ``proxy.bind`` and why (the CLI exits 2).
    """
    try:
        host, port = split_bind(bind)
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except ValueError as exc:
        raise ConfigError(f"proxy.bind {bind!r}: {exc}") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"proxy.bind {bind!r}: cannot resolve the host: {exc}") from None
    return family, kind, proto, address


def check_listen(bind: str, *, try_bind: bool = True) -> None:
    """Whether the gateway can listen on ``bind``: its host resolves and (``try_bind``)
    the port is free.  Blocking: before the event loop starts.

    Error handling: ``ConfigError`` naming ``proxy.bind`` and why (the CLI exits 2).
    """
    family, kind, proto, address = resolve_bind(bind)
    if not try_bind:
        return
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hypercorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"proxy.bind {bind}: cannot listen: {exc.strerror}") from None


async def serve_gateway(
    config: Config,
    *,
    bind: str | None = None,
    ledger: Ledger | None = None,
    handle_signals: bool = False,
    monitor: bool = True,
    transport_factory: Callable[[str], Transport | None] = lambda _id: None,
    worker: Seat | None = None,
    task_status: trio.TaskStatus[tuple[Gateway, list[str]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until cancelled (or, with ``handle_signals``, until SIGTERM/SIGINT).

    Without a ``ledger`` the durable one under ``config.proxy.state_dir`` is used;
    a final snapshot is written when the gateway stops.  The customers and backends
    changed at run time are read from the ``runtime`` log there (:mod:`proxy.runtime`).
    ``worker``: this process is one of ``[proxy] workers`` (:mod:`proxy.workers`): it
    serves the socket its parent listens on, and stops as on SIGTERM when the parent dies.

    Error handling: ``StateError`` when the saved state is corrupt or unreadable.
    """
    async with contextlib.AsyncExitStack() as stack:
        redis = await _open_store(stack, config)  # [store] kind = "redis": the logs on Redis
        if ledger is None and redis is not None:
            from proxy.ledger.shared import open_shared_ledger

            ledger = await stack.enter_async_context(open_shared_ledger(redis))
        elif ledger is None:
            durable = open_durable_ledger(
                config.proxy.state_dir, write_timeout=config.proxy.journal_timeout
            )
            ledger = await stack.enter_async_context(durable)
        runtime = open_runtime(config)  # customers and backends changed at run time
        gw = await stack.enter_async_context(
            open_gateway(config, ledger, transport_factory, runtime.directory)
        )
        gw.runtime = runtime
        gw.stores["runtime"] = runtime.log
        runtime.start(gw)
        bind = worker.bind if worker is not None else bind or config.proxy.bind
        await _run(gw, bind, handle_signals, monitor, worker, task_status)


async def _open_store(stack: contextlib.AsyncExitStack, config: Config) -> RedisStore | None:
    """With ``[store] kind = "redis"``, connect to Redis, read its logs, and make every
    store the gateway opens in this task (hooks, webhook-queue, runtime, recording-ready,
    portal) open there until ``stack`` closes; the store (the ledger opens on it too,
    shared by every instance on the key prefix: :mod:`proxy.ledger.shared`).  None for
    ``kind = "local"``.

    Error handling: ``StateError`` when Redis cannot be reached or a log cannot be
    replayed (the CLI exits 3).
    """
    if config.store.kind != "redis":
        return None
    try:  # still the place of files that are not stores (the portal's cookie key)
        config.proxy.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{config.proxy.state_dir}: cannot create: {exc.strerror}") from None
    from proxy.store.redis import open_redis_store  # coredis only when asked for

    opened = open_redis_store(config.store, timeout=config.proxy.journal_timeout)
    redis = await stack.enter_async_context(opened)
    stack.enter_context(store.using(redis.opener))
    log.info("store: the logs are on Redis (%s)", config.store.key_prefix)
    return redis


async def _run(
    gw: Gateway,
    bind: str,
    handle_signals: bool,
    monitor: bool,
    worker: Seat | None,
    task_status: trio.TaskStatus[tuple[Gateway, list[str]]],
) -> None:
    proxy = gw.config.proxy
    hyper = hypercorn_config(bind, 2 * proxy.max_query_bytes, proxy.timeouts)
    open_hooks(gw)  # the customers' hooks (issue 9), from the "hooks" log in state_dir
    open_webhooks(gw)  # their delivery queue, from the "webhook-queue" log; delivering
    await reconcile_all(gw)
    stop = trio.Event()
    async with trio.open_nursery() as background:
        if handle_signals:
            background.start_soon(_stop_on_signal, stop)
        if worker is not None:
            background.start_soon(_stop_when_parent_gone, worker, stop)
        if monitor:
            background.start_soon(monitor_backends, gw)
        async with trio.open_nursery() as serving:
            binds = await serving.start(_serve_app, gw, hyper)
            if worker is not None:
                log.info("worker %d of %d listening on %s", worker.index, worker.count, binds[0])
                worker.ready()
            else:
                log.info("gateway listening on %s", ", ".join(binds))
            task_status.started((gw, binds))
            await stop.wait()
            # Finish what is in flight (bounded), then close every connection, idle
            # keep-alive ones included: hypercorn alone would wait them out.
            with trio.move_on_after(SHUTDOWN_DEADLINE):
                await gw.wait_idle()
            serving.cancel_scope.cancel()
        background.cancel_scope.cancel()


async def _serve_app(
    gw: Gateway,
    hyper: HypercornConfig,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    quart = create_app(gw)
    quart.config["BODY_TIMEOUT"] = gw.config.proxy.timeouts.client_read  # the whole body
    trusted = request_log.networks(gw.config.proxy.trusted_proxies)
    metrics = quart.extensions["bbb_proxy_metrics"]
    fast = fast_api(gw, metrics, quart)  # the API's GETs
    app = counted(gw, request_log.logged(closing_unread(fast), trusted))
    gw.spawn("metrics", metrics.mirror_forever)  # workers: this one's counts (proxy.metrics)
    send_timeout = response_timeout(quart)
    await front.serve(app, hyper, send_timeout=send_timeout, task_status=task_status)


def counted(gw: Gateway, app: Any) -> Any:
    """The ASGI app, counting each HTTP request in flight until its answer is sent."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)  # type: ignore[no-any-return]
        with gw.request_in_flight():
            await app(scope, receive, send)
        return None

    return asgi


def closing_unread(app: Any) -> Any:
    """The ASGI app, made to close a connection whose request body it did not read whole.

    hypercorn closes such a connection when the answer is complete (it cannot read
    the next request), but quart-trio sends the answer's last part from inside a
    cancel scope that it cancels at that very moment, so the close is cancelled
    and the connection stays open as long as the client trickles bytes.  Holding
    the last part back until the app has returned lets hypercorn close it.
    """

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)  # type: ignore[no-any-return]
        body_read = False
        held: list[Any] = []

        async def receiving() -> Any:
            nonlocal body_read
            message = await receive()
            body_read = body_read or not message.get("more_body", False)
            return message

        async def sending(message: Any) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not body_read:
                held.append(message)
            else:
                await send(message)

        await app(scope, receiving, sending)
        for message in held:
            await send(message)
        return None

    return asgi


async def _stop_when_parent_gone(worker: Seat, stop: trio.Event) -> None:
    await worker.parent_gone()
    if not stop.is_set():
        log.warning("worker %d: the parent process is gone, stopping", worker.index)
        stop.set()


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, finishing in-flight requests", signal.Signals(signum).name)
            stop.set()
            return
