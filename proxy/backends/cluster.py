"""Backend polls shared by several gateway instances on one Redis (``[store] kind = "redis"``).

Each backend is polled by ONE instance at a time: the one holding its lease
``<prefix>poll:<backend_id>`` (:class:`~proxy.store.leases.Lease`), which lasts
``LEASE_INTERVALS`` poll intervals and is renewed at each of its polls.  Only the holder
reconciles the ledger with the backend's answer (releases, adoptions, strays, pending
creates past their grace).  After each poll it publishes the backend's health in the hash
``<prefix>health:<backend_id>`` (``HEALTH_INTERVALS`` intervals to live, written only
while it holds the lease); every other instance reads that hash once per interval and
applies it (``Gateway.set_health``), so a DOWN backend is suspended everywhere and every
instance's placement, failover, admin API and metrics agree.  A hash that has expired
(its poller gone, the lease not yet taken over) leaves the health as last seen.

Taking over.  Every instance tries :meth:`~proxy.store.leases.Lease.hold` for every
backend once per interval: a free lease is taken at once, so a dead holder's backends are
polled again within the lease's length and one interval.  A new holder polls at the
previous poll's time plus an interval (the hash says when that was), so a backend gets
one poll per interval across a change of holder too.

Spreading.  The instances alive are the members of ``<prefix>members:poll``
(:class:`~proxy.store.leases.Members`, ``MEMBER_INTERVALS`` intervals to live, refreshed
every interval).  Each backend has a preferred instance among them (rendezvous hashing:
stable when instances come and go, :func:`preferred`); a holder that is not the preferred
one hands the lease over after its poll (atomically, only to a live member).

Redis unreachable.  An instance that cannot reach Redis polls every backend itself, for
health only (no reconciliation: the ledger cannot commit anyway), so joins of known
meetings are not sent to a backend that died meanwhile; it goes back to its share when
Redis answers.  That is N polls per interval per backend while Redis is down.

Error handling: nothing here raises once running (a Redis failure is logged once per
outage and waited out); cancellation passes through.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import trio

from proxy.errors import StorageUnavailable
from proxy.health import Health, from_shared, shared_fields
from proxy.store.leases import Lease, Members, Outage, script
from proxy.store.redis import RedisLog, RedisStore

if TYPE_CHECKING:
    from proxy.gateway import Gateway

__all__ = ["SharedPolls", "preferred", "shared_polls"]

log = logging.getLogger(__name__)

LEASE_INTERVALS = 3  # a poll lease outlives two missed renewals
HEALTH_INTERVALS = 3  # the published health outlives two missed polls
MEMBER_INTERVALS = 2  # a dead instance leaves the members before its leases expire

# KEYS: health hash, lease.  ARGV: holder, ms to live, field, value, ...
_PUBLISH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_READ = "return redis.call('HGETALL', KEYS[1])"

_BY_STORE: weakref.WeakKeyDictionary[RedisStore, SharedPolls] = weakref.WeakKeyDictionary()


def shared_polls(gw: Gateway) -> SharedPolls | None:
    """This gateway's :class:`SharedPolls` (one per Redis store, so start-up and the
    monitor share its leases); None on the local store (one process polls all)."""
    store = next((s.store for s in gw.stores.values() if isinstance(s, RedisLog)), None)
    if store is None:
        return None
    polls = _BY_STORE.get(store)
    if polls is None:
        polls = _BY_STORE[store] = SharedPolls(store, gw.config.proxy.health.interval)
    return polls


def preferred(backend_id: str, members: Iterable[str]) -> str | None:
    """The member that should poll ``backend_id`` (highest rendezvous hash); None if none."""

    def weight(member: str) -> bytes:
        return hashlib.blake2b(f"{member}\0{backend_id}".encode(), digest_size=8).digest()

    return max(members, key=weight, default=None)


class SharedPolls:
    """One instance's part in the shared polls: its leases, its view of the members,
    the shared health it publishes and reads."""

    def __init__(self, store: RedisStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.lease_length = LEASE_INTERVALS * interval
        self.members = Members(
            store, store.key("members", "poll"), secrets.token_hex(8), MEMBER_INTERVALS * interval
        )
        self.holder = self.members.member
        self.view: Sequence[str] = [self.holder]  # the live members, as last read
        self.leases: dict[str, Lease] = {}
        self._outage = Outage(
            log,
            "polls",
            "this instance polls every backend for health, reconciling none, until it does",
            "this instance polls its share",
        )

    def lease(self, backend_id: str) -> Lease:
        lease = self.leases.get(backend_id)
        if lease is None:
            key = self.store.key("poll", backend_id)
            lease = self.leases[backend_id] = Lease(
                self.store, key, self.lease_length, holder=self.holder
            )
        return lease

    def holds(self, backend_id: str) -> bool:
        lease = self.leases.get(backend_id)
        return lease is not None and lease.held

    async def refresh_members(self) -> None:
        """Stay a member; read who else is (kept as it was when Redis does not answer)."""
        try:
            self.view = await self.members.refresh()
        except StorageUnavailable as e:
            self.unreachable(e)

    async def keep_members(self) -> None:
        """Forever: :meth:`refresh_members` every interval."""
        while True:
            await self.refresh_members()
            await trio.sleep(self.interval)

    async def publish(self, backend_id: str, health: Health) -> None:
        """The backend's health for the other instances (only while holding its lease)."""
        fields = shared_fields(health, trio.current_time()) | {"at": repr(time.time())}
        ttl = max(1, int(HEALTH_INTERVALS * self.interval * 1000))
        args: list[object] = [self.holder, ttl]
        for name, value in fields.items():
            args += [name, value]
        keys = [self.store.key("health", backend_id), self.store.key("poll", backend_id)]
        try:
            await script(self.store, _PUBLISH, keys, args)
        except StorageUnavailable as e:
            self.unreachable(e)

    async def read(self, backend_id: str) -> tuple[Health, float] | None:
        """The health last published for ``backend_id`` and when (wall clock, seconds);
        None if there is none (expired) or Redis does not answer."""
        key = self.store.key("health", backend_id)
        try:
            raw = await script(self.store, _READ, [key], [])
        except StorageUnavailable as e:
            self.unreachable(e)
            return None
        fields = {_text(k): _text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}
        health = from_shared(fields, trio.current_time())
        try:
            at = float(fields.get("at", ""))
        except ValueError:
            return None
        return None if health is None else (health, at)

    async def due_in(self, backend_id: str) -> float:
        """Seconds until the backend's next poll is due by its last published one (a new
        holder waits that long: one poll per interval across a change); 0 if unknown."""
        shared = await self.read(backend_id)
        if shared is None:
            return 0.0
        return min(self.interval, max(0.0, shared[1] + self.interval - time.time()))

    async def hand_over_if_due(self, backend_id: str) -> None:
        """Give the lease to the backend's preferred live member, if that is another."""
        successor = preferred(backend_id, self.view)
        if successor is None or successor == self.holder:
            return
        try:
            if await self.lease(backend_id).hand_over(successor, self.members):
                log.info("polls of %s handed over to instance %s", backend_id, successor)
        except StorageUnavailable as e:
            self.unreachable(e)

    async def leave(self) -> None:
        """A clean stop: give up every lease held and the membership (bounded by the
        store's timeout; what is not given up expires)."""
        with trio.move_on_after(self.store.timeout):
            try:
                for lease in self.leases.values():
                    if lease.held:
                        await lease.release()
                await self.members.leave()
            except StorageUnavailable:
                pass

    def unreachable(self, error: StorageUnavailable) -> None:
        self._outage.failed(error)

    def reachable(self) -> None:
        self._outage.answered()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
