"""How the Redis store connects (issue 13): one URL, or the master Redis Sentinel names.

``[store] url`` alone: the client connects to that address (coredis' pool).

``[store] sentinels`` and ``sentinel_master``: the address comes from the Sentinels
(``SENTINEL get-master-addr-by-name``), asked again for every new connection, and each
new connection checks ``ROLE`` is ``master`` (coredis' ``SentinelConnectionPool``).  When
the master dies its connections break; the commands then fail (``StorageUnavailable``, the
logs' retry takes over) until the Sentinels have promoted a replica, and the next
connection goes to the new master (the pool drops every connection to the old one when
the address changes).  A master demoted by Sentinel has its clients killed by Sentinel
(``CLIENT KILL TYPE normal``), so no connection keeps writing to a replica.  The URL's
host and port are unused then; its scheme (``rediss://``: TLS, to the Sentinels too), its
database and credentials apply to the master; ``sentinel_password`` is the Sentinels'.

``[store] wait_replicas`` = N > 0: :func:`replicated` makes a command wait (``WAIT N
wait_timeout``, on the write's connection, right after it: coredis'
``ensure_replication``, which keeps the connection for the pair) and raise
``ReplicationError`` when fewer replicas acknowledged.

Error handling: :func:`connect` raises ``StateError`` naming the address or the Sentinels
(never a password) when Redis or no Sentinel answers at start-up; once connected, errors
are coredis' (``RedisError``, ``OSError``), which :meth:`RedisStore.run` turns into
``StorageUnavailable``.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import coredis
import trio
from coredis.connection import TCPConnection, TCPLocation
from coredis.connection._sentinel import SentinelManagedConnection
from coredis.exceptions import RedisError
from coredis.pool._sentinel import SentinelConnectionPool

from proxy.config import StoreSettings, split_bind
from proxy.errors import StateError

__all__ = ["connect", "replicated", "safe_url", "where"]


@contextlib.asynccontextmanager
async def connect(
    settings: StoreSettings,
    timeout: float,  # noqa: ASYNC109  (each command's bound)
) -> AsyncIterator[Any]:
    """A coredis client on the store's Redis (the master, with Sentinels), until the block
    ends.

    Error handling: ``StateError`` when Redis (or every Sentinel) cannot be reached.
    """
    if not settings.sentinels:
        await _reachable(settings, timeout)
        async with _client(settings, timeout) as client:
            yield client
        return
    options = _data_options(settings, timeout)
    sentinel_options: dict[str, Any] = {"stream_timeout": timeout, "connect_timeout": timeout}
    if settings.sentinel_password:
        sentinel_options["password"] = settings.sentinel_password
    if "ssl_context" in options:
        sentinel_options["ssl_context"] = options["ssl_context"]
    sentinel: Any = coredis.Sentinel(
        [TCPLocation(*split_bind(s)) for s in settings.sentinels],
        sentinel_kwargs=sentinel_options,
        decode_responses=False,
        **options,
    )
    for one in sentinel.sentinels:
        one.connection_pool.connection_class = _ClosingTCPConnection
    failure: StateError | None = None
    async with sentinel:
        try:
            host, port = await _master(sentinel, settings, timeout)
            await _probe(host, port, timeout)
        except StateError as e:  # raised out here: not wrapped in coredis' task groups
            failure = e
        if failure is None:
            client = sentinel.primary_for(settings.sentinel_master, connection_pool_class=_Pool)
            async with client:
                yield client
    if failure is not None:
        raise failure


def replicated(client: Any, settings: StoreSettings) -> contextlib.AbstractContextManager[Any]:
    """Commands run inside wait for ``settings.wait_replicas`` replicas (``WAIT``), if any.

    Error handling: such a command raises coredis' ``ReplicationError`` (a ``RedisError``)
    when fewer replicas acknowledged it within ``wait_timeout``.
    """
    if settings.wait_replicas <= 0:
        return contextlib.nullcontext()
    ms = max(1, int(settings.wait_timeout * 1000))
    manager: contextlib.AbstractContextManager[Any] = client.ensure_replication(
        settings.wait_replicas, ms
    )
    return manager


def where(settings: StoreSettings) -> str:
    """The store's Redis for messages: its URL without password, or its Sentinels."""
    if settings.sentinels:
        return f"sentinel master {settings.sentinel_master!r} ({', '.join(settings.sentinels)})"
    return safe_url(settings.url)


def safe_url(url: str) -> str:
    """``url`` without a password in it."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


# -- one URL -----------------------------------------------------------------------------------


async def _reachable(settings: StoreSettings, seconds: float) -> None:
    """Whether Redis' address takes a connection (coredis' pool, entered with Redis
    down, leaves streams unclosed: asked first with a plain socket).

    Error handling: ``StateError`` naming the address (never the password).
    """
    url = urllib.parse.urlsplit(settings.url)
    if url.scheme == "unix":
        return
    await _probe(url.hostname or "localhost", url.port or 6379, seconds)


async def _probe(host: str, port: int, seconds: float) -> None:
    try:
        with trio.fail_after(seconds):
            stream = await trio.open_tcp_stream(host, port)
        await stream.aclose()
    except (OSError, trio.TooSlowError) as e:
        reason = str(e) or "no answer in time"
        raise StateError(f"redis {host}:{port}: cannot connect: {reason}") from None


def _client(settings: StoreSettings, timeout: float) -> Any:
    options: dict[str, Any] = {
        "stream_timeout": timeout,
        "connect_timeout": timeout,
        "decode_responses": False,
    }
    if settings.username:
        options["username"] = settings.username
    if settings.password:
        options["password"] = settings.password
    if settings.url.startswith("rediss://") and settings.tls_ca_file:
        options["ssl_context"] = ssl.create_default_context(cafile=settings.tls_ca_file)
    pool = coredis.ConnectionPool.from_url(settings.url, **options)
    if pool.connection_class is TCPConnection:
        pool.connection_class = _ClosingTCPConnection
    return coredis.Redis(connection_pool=pool, decode_responses=False)


# -- Sentinel ------------------------------------------------------------------------------------


def _data_options(settings: StoreSettings, timeout: float) -> dict[str, Any]:
    """The master connections' options: the URL's database and credentials, the settings'
    credentials over them, TLS for ``rediss://``."""
    url = urllib.parse.urlsplit(settings.url)
    options: dict[str, Any] = {"stream_timeout": timeout, "connect_timeout": timeout}
    query = urllib.parse.parse_qs(url.query)
    database = query.get("db", [url.path.strip("/")])[0]
    if database:
        options["db"] = int(database) if database.isdigit() else 0
    username = settings.username or urllib.parse.unquote(url.username or "")
    password = settings.password or urllib.parse.unquote(url.password or "")
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    if url.scheme == "rediss":
        options["ssl_context"] = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    return options


async def _master(sentinel: Any, settings: StoreSettings, seconds: float) -> tuple[str, int]:
    """The master's address as the Sentinels say it (the first that answers).

    Error handling: ``StateError`` naming the master and the Sentinels.
    """
    try:
        with trio.fail_after(seconds * len(settings.sentinels)):
            host, port = await sentinel.discover_primary(settings.sentinel_master)
    except (RedisError, OSError, trio.TooSlowError) as e:
        reason = str(e) or "no answer in time"
        raise StateError(f"redis {where(settings)}: no master: {reason}") from None
    return str(host), int(port)


class _Pool(SentinelConnectionPool):
    """coredis' Sentinel pool for the master, with :class:`_ClosingSentinelConnection`."""

    async def _construct_connection(self) -> SentinelManagedConnection:
        location = await self.get_primary_location()
        return _ClosingSentinelConnection(
            location, self.service_name, True, **self.connection_kwargs
        )


# -- coredis 6.9's refused connections -----------------------------------------------------------


class _ClosingTCPConnection(TCPConnection):
    """coredis' TCP connection, closing its buffers when it cannot connect (coredis 6.9
    leaves them open then, and each refused connection warns when collected)."""

    async def _connect(self) -> Any:
        try:
            return await super()._connect()
        except BaseException:
            _close_buffers(self)
            raise


class _ClosingSentinelConnection(SentinelManagedConnection):
    """:class:`_ClosingTCPConnection` for a Sentinel-managed master connection (a master
    that died refuses them until the Sentinels have promoted another)."""

    async def _connect(self) -> Any:
        try:
            return await super()._connect()
        except BaseException:
            _close_buffers(self)
            raise


def _close_buffers(connection: TCPConnection) -> None:
    for buffer in _buffers(connection):
        buffer.close()


def _buffers(connection: TCPConnection) -> Iterator[Any]:
    yield connection._write_buffer_in
    yield connection._write_buffer_out
    yield connection._push_message_buffer_in
    yield connection._push_message_buffer_out
    yield connection._streamed_message_buffer_in
    yield connection._streamed_message_buffer_out
