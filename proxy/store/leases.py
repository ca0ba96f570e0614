"""Leases and members on the Redis store: work done by one gateway instance at a time.

A :class:`Lease` is one Redis key holding the id of the instance that holds it, with an
expiry (``SET NX PX``).  The holder renews it before it runs out; an instance that dies
stops renewing, the key expires, and another instance takes it.  Every step that
depends on who holds it is a short Lua script, so it is atomic in Redis::

    hold       take the key if it is free, or renew it if this holder has it
    renew      renew only if this holder still has it
    release    delete only if this holder still has it
    hand_over  give it to another holder, only if that one is a live member (below)

:attr:`Lease.held` says whether this instance surely holds it now: the last hold or
renewal that Redis confirmed was sent less than ``length`` ago (time measured here,
from the moment the command was sent, so the local view ends no later than Redis'
key).  A holder cut off from Redis stops counting itself the holder once that time is
up, while Redis may already have given the lease to another: work guarded by a lease
must stay correct when, for a moment, two instances believe they hold it (the ledger's
compare-and-append makes a second commit lose).

:class:`Members` is a sorted set of the instances alive, each scored with the Redis
server time (ms) at which its membership ends unless refreshed; expired members are
dropped at each refresh.  Server time, not each instance's clock, so clocks that drift
apart do not matter.

:meth:`Lease.keep` holds a lease in a background task (every third of its length),
logging once when it is lost and once when it is held again.  :class:`Outage` does the
same for any user of Redis that goes on without it: once when Redis stops answering,
once when it answers again.

Error handling: every command runs under the store's timeout; a Redis failure or an
overrun is :class:`~proxy.errors.StorageUnavailable` (from :meth:`RedisStore.run`);
nothing else is raised once running.  :meth:`Lease.keep` raises nothing (cancellation
passes through).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import anyio
import trio

from proxy.errors import StateError, StorageUnavailable
from proxy.store.redis import RedisStore

__all__ = ["Lease", "Members", "script"]

log = logging.getLogger(__name__)

# KEYS: lease.  ARGV: holder, ms.  1 if held by the holder now.
_HOLD = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if v then return 0 end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

# The server's time in ms (scripts may read it since Redis 5: effects are replicated).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: lease, members.  ARGV: holder, successor, ms.  1 if handed over.
_HAND_OVER = (
    _NOW
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local until_ = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]) or '0')
if until_ <= now then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
)

# KEYS: members.  ARGV: member, ms.  The live members, sorted.
_REFRESH = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)

_LEAVE = "return redis.call('ZREM', KEYS[1], ARGV[1])"


class Lease:
    """The lease ``key`` (a full Redis key), ``length`` seconds long, for ``holder``."""

    def __init__(
        self, store: RedisStore, key: str, length: float, *, holder: str | None = None
    ) -> None:
        self.store = store
        self.key = key
        self.length = length
        self.holder = holder or secrets.token_hex(8)
        self._until = float("-inf")  # trio time until which this holder surely has it

    @property
    def held(self) -> bool:
        return trio.current_time() < self._until

    @property
    def _ms(self) -> int:
        return max(1, int(self.length * 1000))

    async def hold(self) -> bool:
        """Take the lease if it is free, renew it if this holder has it; True if held.

        Error handling: ``StorageUnavailable`` (``held`` keeps its last confirmed time).
        """
        return await self._confirm(_HOLD)

    async def renew(self) -> bool:
        """Renew the lease only if this holder still has it; True if so.

        Error handling: ``StorageUnavailable``.
        """
        return await self._confirm(_RENEW)

    async def release(self) -> bool:
        """Give the lease up now, if this holder has it (another may take it at once).

        Error handling: ``StorageUnavailable`` (the lease then runs out by itself).
        """
        self._until = float("-inf")
        return await self._script(_RELEASE, [self.key], [self.holder]) == 1

    async def hand_over(self, successor: str, members: Members) -> bool:
        """Give the lease (a full ``length``) to ``successor``, if this holder has it
        and ``successor`` is a live member of ``members``; True if handed over.

        Error handling: ``StorageUnavailable``.
        """
        keys, args = [self.key, members.key], [self.holder, successor, self._ms]
        if await self._script(_HAND_OVER, keys, args) != 1:
            return False
        self._until = float("-inf")
        return True

    async def keep(self) -> None:
        """Forever: :meth:`hold` every third of ``length``, logging once when the lease
        is lost (held by another, or Redis not answering) and once when held again.

        Error handling: none raised; cancellation passes through.
        """
        lost = False
        while True:
            try:
                held, why = await self.hold(), "held by another instance"
            except StorageUnavailable as e:
                held, why = self.held, f"Redis does not answer: {e.__cause__}"
            if not held and not lost:
                log.warning("lease %s lost: %s", self.key, why)
            elif held and lost:
                log.warning("lease %s held again", self.key)
            lost = not held
            await trio.sleep(self.length / 3)

    async def _confirm(self, source: str) -> bool:
        sent = trio.current_time()
        held = await self._script(source, [self.key], [self.holder, self._ms]) == 1
        self._until = sent + self.length if held else float("-inf")
        return held

    async def _script(self, source: str, keys: list[str], args: list[object]) -> int:
        return int(await script(self.store, source, keys, args))


class Members:
    """The live instances in the sorted set ``key``; this one is ``member``, kept alive
    ``ttl`` seconds past each :meth:`refresh`."""

    def __init__(self, store: RedisStore, key: str, member: str, ttl: float) -> None:
        self.store = store
        self.key = key
        self.member = member
        self.ttl = ttl

    async def refresh(self) -> list[str]:
        """Be alive for ``ttl`` more seconds; every live member, sorted (this one too).

        Error handling: ``StorageUnavailable``.
        """
        args = [self.member, max(1, int(self.ttl * 1000))]
        listed = await script(self.store, _REFRESH, [self.key], args)
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in listed)

    async def leave(self) -> None:
        """No longer a member (a clean stop).  Error handling: ``StorageUnavailable``."""
        await script(self.store, _LEAVE, [self.key], [self.member])


class Outage:
    """Whether Redis answers, for one of its users (``who``): said once when it stops
    answering, with what the user does meanwhile, and once when it answers again."""

    def __init__(self, logger: logging.Logger, who: str, meanwhile: str, again: str) -> None:
        self._log, self._who, self._meanwhile, self._again = logger, who, meanwhile, again
        self.down = False

    def failed(self, error: StorageUnavailable) -> None:
        if not self.down:
            self.down = True
            self._log.warning(
                "%s: Redis does not answer (%s): %s", self._who, error.__cause__, self._meanwhile
            )

    def answered(self) -> None:
        if self.down:
            self.down = False
            self._log.warning("%s: Redis answers again: %s", self._who, self._again)


async def script(store: RedisStore, source: str, keys: list[str], args: Sequence[object]) -> Any:
    """:meth:`RedisStore.script_source`, with coredis' connection or pool closed under it
    (anyio's errors, coredis' RuntimeError: while the gateway is being stopped) a
    ``StorageUnavailable`` too.

    Error handling: ``StorageUnavailable`` only.
    """
    try:
        return await store.script_source(source, keys, args)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream) as e:
        raise StorageUnavailable() from StateError(f"redis: the connection closed: {e!r}")
    except RuntimeError as e:  # "Connection pool is not initialized or has exited"
        raise StorageUnavailable() from StateError(f"redis: the client is closed: {e}")
