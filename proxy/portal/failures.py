"""Failed-login counts shared by every gateway instance on one Redis.

Behind a load balancer each instance would otherwise count on its own, and a guesser
would get ``max_login_failures`` tries per instance.  :class:`SharedFailures` keeps one
count per key (an account, a client address) in Redis, as the local
:class:`~proxy.portal.model.Throttle` keeps it: each failure adds one and makes the key
last ``login_lockout`` seconds more (so ``limit`` failures in a row lock it until the
lockout has passed since the last one), and a success removes it.  Keys are SHA-256 of
the account or address (no personal data in Redis), and they expire by themselves.

The local throttle is always kept too, and decides alone while Redis does not answer:
a login is then refused on this instance's count, never let through for want of
Redis; each Redis call is bounded by the store's timeout.

Error handling: nothing raises; a Redis failure is logged once until Redis answers again.
"""

from __future__ import annotations

import hashlib
import logging

from proxy.errors import StorageUnavailable
from proxy.store.leases import Outage, script
from proxy.store.redis import RedisStore

log = logging.getLogger(__name__)

# KEYS: the account's and the address's counts.  Returns both (0 when absent).
_COUNTS = """
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
# KEYS: as above; ARGV[1]: the lockout in milliseconds.
_FAILED = """
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, ARGV[1])
end
return 1
"""
_SUCCEEDED = """
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


class SharedFailures:
    """The failed-login counts in Redis, per account and per client address."""

    def __init__(self, store: RedisStore, limit: int, lockout: float) -> None:
        self.store, self.limit, self.lockout = store, limit, lockout
        self._outage = Outage(
            log,
            "portal",
            "failed logins are counted on this instance alone until it does",
            "failed logins are counted for all",
        )

    def keys(self, account: str, address: str) -> list[str]:
        return [self._key("account", account), self._key("address", address)]

    async def locked(self, account: str, address: str) -> bool:
        """Either key has ``limit`` failures in a row (False when Redis does not answer)."""
        counts = await self._run(_COUNTS, self.keys(account, address), [])
        if not isinstance(counts, list):
            return False
        return any(isinstance(n, int) and n >= self.limit for n in counts)

    async def failed(self, account: str, address: str) -> None:
        lockout_ms = max(1, round(self.lockout * 1000))
        await self._run(_FAILED, self.keys(account, address), [lockout_ms])

    async def succeeded(self, account: str, address: str) -> None:
        await self._run(_SUCCEEDED, self.keys(account, address), [])

    def _key(self, kind: str, value: str) -> str:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        return self.store.key("login-failures", f"{kind}:{digest}")

    async def _run(self, source: str, keys: list[str], args: list[object]) -> object:
        try:
            answer = await script(self.store, source, keys, args)
        except StorageUnavailable as e:
            self._outage.failed(e)
            return None
        self._outage.answered()
        return answer
