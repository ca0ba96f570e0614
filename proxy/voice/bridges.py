"""Voice bridges (conference PINs): their shape and how a free one is chosen, without I/O.

BBB gives every meeting a ``voiceBridge``, the number its FreeSWITCH conference is
called by, and refuses a second live meeting with the same one on the same server
(``nonUniqueVoiceBridge``).  On a pool the gateway makes them unique across every
backend and customer, so one public phone number can reach any meeting: the caller's
PIN names the meeting (docs/decisions.md, "Voice bridges").

Numbers are chosen at random among the free ones of the configured length, never
sequentially: a participant who knows the PIN of its own meeting must not be able to
guess the next one.  The first digit is never 0, because clients read ``voiceBridge``
as an integer (bigbluebutton-api-php, Moodle) and would lose it.
"""

from __future__ import annotations

import random
from collections.abc import Container

MAX_LENGTH = 9  # digits; BBB's voice bridges are integers
_DIGITS = frozenset("0123456789")
_RANDOM_TRIES = 64  # random draws before the free numbers are counted out
_COUNTED_OUT = 1_000_000  # the largest space whose free numbers are ever listed


def is_bridge(text: str) -> bool:
    """Whether ``text`` is a voice bridge: 1 to :data:`MAX_LENGTH` ASCII digits."""
    return 0 < len(text) <= MAX_LENGTH and _DIGITS.issuperset(text)


def space(length: int) -> range:
    """Every bridge of ``length`` digits the gateway hands out (no leading zero)."""
    return range(10 ** (length - 1), 10**length)


def choose(held: Container[str], length: int, rng: random.Random) -> str | None:
    """A bridge of ``length`` digits not in ``held``, uniformly at random; None if none is.

    Random draws find a free number at once unless the space is nearly full; after
    :data:`_RANDOM_TRIES` misses the free numbers of a space of at most
    :data:`_COUNTED_OUT` are counted out and one of them drawn (still uniform).  A larger
    space that many draws found full is as good as full: None.
    """
    numbers = space(length)
    for _ in range(_RANDOM_TRIES):
        candidate = str(rng.choice(numbers))
        if candidate not in held:
            return candidate
    if len(numbers) > _COUNTED_OUT:
        return None
    free = [text for text in map(str, numbers) if text not in held]
    return rng.choice(free) if free else None


class BridgeIndex[K]:
    """The voice bridges held, each by the keys of the meetings holding it.

    Admission never gives one bridge twice, but meetings adopted from what a backend
    lists may share one; so a bridge is free only once its last holder is gone.
    """

    def __init__(self) -> None:
        self._holders: dict[str, set[K]] = {}

    def __contains__(self, bridge: object) -> bool:
        return bridge in self._holders

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, bridge: str) -> set[K]:
        return set(self._holders.get(bridge, ()))

    def taken(self, bridge: str, by_other_than: K | None = None) -> bool:
        """Whether a holder other than ``by_other_than`` has ``bridge``."""
        holders = self._holders.get(bridge, set())
        return bool(holders) and holders != {by_other_than}

    def add(self, bridge: str, key: K) -> None:
        if bridge:
            self._holders.setdefault(bridge, set()).add(key)

    def discard(self, bridge: str, key: K) -> None:
        holders = self._holders.get(bridge)
        if holders is not None:
            holders.discard(key)
            if not holders:
                del self._holders[bridge]
