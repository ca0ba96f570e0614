"""Where a new meeting goes: a consistent-hash ring with bounded loads.

Every backend owns ``vnodes`` points on a ring of 64-bit integers; a point is
the first eight bytes of ``blake2b(f"{backend_id}#{i}")``, so the ring is the
same in every process and on every restart (Python's ``hash()`` is salted per
process and would not be).  A meeting key (the namespaced meeting id) hashes
to a point too, and its candidates are the backends met walking clockwise from
there, each counted once.  Plain consistent hashing would take the first one:
stable, and adding or removing one of N backends moves only ~1/N of the keys.

Plain consistent hashing ignores load, so one unlucky arc of the ring can fill
a server while others idle.  "Consistent hashing with bounded loads"
(Mirrokni, Thorup, Zadimoghaddam, SODA 2018) keeps the walk but skips any
backend that would end up above ``1 + epsilon`` times the average load.  With
capacities that differ, "load" is utilisation, and the bound for a backend of
capacity ``c`` holding ``u`` connections, for a meeting of ``size``, is::

    (u + size) / c  <=  (1 + epsilon) * (total_used + size) / total_capacity

with the totals over the available backends.  As in the paper (whose bound is
``ceil((1 + epsilon) * m / n)`` balls per bin) the right-hand side is rounded
up to whole connections, which only matters while the pool is nearly empty: it
lets the first meetings go to their first choice instead of none meeting the
bound.  The ring itself is unweighted (every backend has ``vnodes`` points); it
is the bound that gives larger backends their larger share, the more exactly
the smaller ``epsilon`` is.

A candidate must also be available, not excluded by the caller, and have
``size`` free connections.  When none within the bound fits, the first one
in ring order that fits is taken: the bound spreads load, but it must never
be the reason a meeting that fits somewhere is refused.  ``None`` means
nothing fits.

A slow server is not a healthy one: backends that are not *responsive* (the
moving average of their answer times is above the latency bound, see
:mod:`proxy.health`) are left out while any responsive backend fits the
meeting, and are tried, by the same rules, only when none does.  So a slow
server gets no new meetings while others answer promptly, but a meeting that
fits only there is still created.  This module does no I/O; the caller
supplies the current loads.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

# Slack for float rounding in the bound, far below one connection.
_ROUNDING = 1e-9


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """What placement needs to know about one backend right now."""

    id: str
    capacity: int  # connections the server may host
    used: int  # connections reserved on it now
    available: bool  # up and accepting new meetings (not draining/disabled/down)
    responsive: bool = True  # answering within the latency bound (see proxy.health)

    @property
    def free(self) -> int:
        """Connections still free (never negative, even if over-reserved)."""
        return max(0, self.capacity - self.used)


NO_TAG = "none"  # in a meeting's tags: matches a backend without tags


@dataclass(frozen=True, slots=True)
class TagRule:
    """Which backends a meeting may go to, and which it prefers (see :func:`tiers`)."""

    wanted: frozenset[str] = frozenset()  # the create's tags (else the customer's default)
    strict: bool = False  # the create ended its tags with "!": a wanted tag is required
    required: frozenset[str] = frozenset()  # the customer's: a backend must have one

    @property
    def requires(self) -> bool:
        """True when some backends are ruled out whatever their load."""
        return bool(self.required) or (self.strict and bool(self.wanted))


def _has(tags: frozenset[str], names: frozenset[str]) -> bool:
    return bool(tags & names) or (not tags and NO_TAG in names)


def tiers(rule: TagRule, backend_tags: Mapping[str, frozenset[str]]) -> list[frozenset[str]]:
    """The backends ``rule`` allows, in the order to try them: those with a wanted tag,
    then (unless strict) the fallback: the untagged ones, or, when the customer
    requires tags, every backend with one of them.  Empty tiers are left out."""
    allowed = {
        b for b, tags in backend_tags.items() if not rule.required or _has(tags, rule.required)
    }
    out: list[frozenset[str]] = []
    if rule.wanted:
        out.append(frozenset(b for b in allowed if _has(backend_tags[b], rule.wanted)))
    if not (rule.strict and rule.wanted):
        fallback = allowed if rule.required else {b for b in allowed if not backend_tags[b]}
        out.append(frozenset(fallback) - (out[0] if out else frozenset()))
    return [tier for tier in out if tier]


@dataclass(frozen=True, slots=True)
class RingStatistics:
    backends: int
    vnodes: int  # points per backend


def _point(text: str) -> int:
    """A stable 64-bit position on the ring."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Ring:
    """The backends' points on the ring, built once; :meth:`choose` is the lookup."""

    def __init__(self, backend_ids: Iterable[str], *, vnodes: int = 100) -> None:
        ids = tuple(backend_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("backend ids must be unique")
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        # Ties (astronomically rare) are broken by id, so the order stays stable.
        ring = sorted(
            (_point(f"{backend_id}#{i}"), backend_id) for backend_id in ids for i in range(vnodes)
        )
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]
        self._backend_ids = ids
        self._vnodes = vnodes

    @property
    def backend_ids(self) -> tuple[str, ...]:
        return self._backend_ids

    def statistics(self) -> RingStatistics:
        return RingStatistics(backends=len(self._backend_ids), vnodes=self._vnodes)

    def candidates(self, key: str) -> Iterator[str]:
        """Every backend once, in the order met walking clockwise from ``key``'s point."""
        start = bisect.bisect_right(self._points, _point(key))
        seen: set[str] = set()
        total = len(self._owners)
        for offset in range(total):
            owner = self._owners[(start + offset) % total]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._backend_ids):
                    return

    def choose(
        self,
        key: str,
        size: int,
        loads: Mapping[str, BackendLoad],
        *,
        epsilon: float = 0.25,
        exclude: Collection[str] = (),
        rule: TagRule = TagRule(),
        backend_tags: Mapping[str, frozenset[str]] | None = None,
    ) -> str | None:
        """The backend for a new meeting of ``size`` connections keyed by ``key``.

        ``key`` is the namespaced meeting id; ``loads`` holds the current load of
        each backend (one missing from it is treated as unavailable).  Returns
        the first backend in ring order that fits within the load bound, else
        the first that fits at all, else ``None``; backends not ``responsive``
        only when no responsive one fits.  With ``backend_tags`` (every backend's
        tags; one missing has none), the tiers of ``rule`` are tried in order,
        each by these rules.  The same key with the same loads always gives the
        same answer.

        Error handling: ``ValueError`` for ``size < 1`` or ``epsilon < 0``.
        """
        if size < 1:
            raise ValueError("size must be >= 1")
        if epsilon < 0:
            raise ValueError("epsilon must be >= 0")
        if backend_tags is None:
            return self._choose_tier(key, size, loads, epsilon, exclude)
        known = {b: backend_tags.get(b, frozenset()) for b in self._backend_ids}
        for tier in tiers(rule, known):
            in_tier = {b: load for b, load in loads.items() if b in tier}
            chosen = self._choose_tier(key, size, in_tier, epsilon, exclude)
            if chosen is not None:
                return chosen
        return None

    def _choose_tier(
        self,
        key: str,
        size: int,
        loads: Mapping[str, BackendLoad],
        epsilon: float,
        exclude: Collection[str],
    ) -> str | None:
        responsive = {b: load for b, load in loads.items() if load.responsive}
        if len(responsive) < len(loads):
            chosen = self._choose(key, size, responsive, epsilon, exclude)
            if chosen is not None:
                return chosen
        return self._choose(key, size, loads, epsilon, exclude)

    def _choose(
        self,
        key: str,
        size: int,
        loads: Mapping[str, BackendLoad],
        epsilon: float,
        exclude: Collection[str],
    ) -> str | None:
        live = [load for b in self._backend_ids if (load := loads.get(b)) and load.available]
        bound = _Bound(epsilon, size, sum(x.used for x in live), sum(x.capacity for x in live))
        fallback: str | None = None
        for backend_id in self.candidates(key):
            load = loads.get(backend_id)
            if load is None or not load.available or backend_id in exclude or load.free < size:
                continue
            if bound.admits(load):
                return backend_id
            fallback = fallback or backend_id
        return fallback


@dataclass(frozen=True, slots=True)
class _Bound:
    """``(used + size) / capacity <= (1 + epsilon) * (total_used + size) / total_capacity``."""

    epsilon: float
    size: int
    total_used: int
    total_capacity: int

    def admits(self, load: BackendLoad) -> bool:
        if self.total_capacity <= 0:
            return False
        share = load.capacity / self.total_capacity
        limit = (1 + self.epsilon) * (self.total_used + self.size) * share
        return load.used + self.size <= math.ceil(limit - _ROUNDING)


def parse_tags(value: str | None) -> tuple[frozenset[str], bool]:
    """``meta_server-tag``'s tags and whether they are required: ``a;b`` (``,`` too)
    wants a or b, a trailing ``!`` requires one.  Blank parts are dropped; nothing
    left (``""``, ``"!"``) is no tag at all, as Scalelite reads it."""
    text = (value or "").strip()
    strict = text.endswith("!")
    names = frozenset(
        p.strip() for p in text.removesuffix("!").replace(",", ";").split(";") if p.strip()
    )
    return names, strict and bool(names)
