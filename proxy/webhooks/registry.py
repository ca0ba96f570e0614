"""The customers' hooks: who wants which meeting's events, and until when.

A :class:`Hook` is registered by ``hooks/create`` for one meeting of one
customer (``meeting_id`` is the customer's own meetingID, not the backend's),
possibly before that meeting exists: LMSs register first and create later.
It lives until ``hooks/destroy``, until delivery drops it (a receiver that
keeps failing), or until its meeting has ended and
``[webhooks] hook_grace_after_end`` has passed (recording events come after
the end).  A create of the meeting again within the grace keeps it: the
meeting runs again.

:class:`HookState` is the pure model: it changes only through
:meth:`HookState.apply` with a record, so the log of records replays to the
same hooks after a restart.  Records (JSON objects, ``"type"`` first)::

    {"type": "hook", "id", "customer", "meeting_id", "callback_url",
     "event_ids": [..] | null, "algorithm", "created_at", "ended_at": float | null}
    {"type": "destroyed", "id"}
    {"type": "ended", "customer", "meeting_id", "at"}   # every hook of it so far
    {"type": "started", "customer", "meeting_id"}       # the meeting runs (again)

Expiry needs no record: an expired hook is never answered (every read checks
it), leaves memory at the next sweep (at most :data:`PURGE_EVERY` seconds
later, and before a limit is checked), and replaying ``hook`` + ``ended``
gives the same verdict.
Times are epoch seconds from the registry's clock (``time.time``), so they
keep their meaning across restarts.

:class:`HookRegistry` is the thin service on a :class:`~proxy.store.Log`
named ``hooks``: it applies a change, appends its record and flushes before
the customer is answered.  The log's owner compacts it to :meth:`HookRegistry.records`
(the live hooks; ``LocalLog.maintain`` does it when the file has grown).

Several gateway instances on one Redis (``[store] kind = "redis"``): the log is a
:class:`~proxy.store.shared.Replica`, so each instance follows the hooks the others
create, destroy or mark ended (every :data:`~proxy.store.shared.FOLLOW_EVERY` seconds), and
:meth:`HookRegistry.lookup` / :meth:`HookRegistry.refresh` catch up at once before a
hook is "not found", before hooks/list and before a create checks duplicates and the
limit (read-your-writes).  A create is committed in the stream's order
(:meth:`~proxy.store.shared.Replica.commit`, its duplicate and limit checks run again on
the caught-up state), so two creates of one URL at once on two instances register one
hook and the per-customer limit holds across instances.

Error handling: :meth:`HookState.apply` raises ``StateError`` for a record it
does not understand (never ``KeyError``).  :meth:`HookRegistry.create` and
:meth:`HookRegistry.destroy` raise ``StorageUnavailable`` when the change cannot
be made durable and ``ValidationError`` (``createHookError``) over the
per-customer limit; :meth:`HookRegistry.meeting_ended`,
:meth:`HookRegistry.meeting_started` and :meth:`HookRegistry.drop` never raise
for storage (background work goes on; the change reaches the disk later).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from proxy.config import WebhookSettings
from proxy.errors import StateError, StorageUnavailable, ValidationError
from proxy.store import Json, Log, Record, open_store_log
from proxy.store.shared import Replica

if TYPE_CHECKING:
    from proxy.gateway import Gateway

log = logging.getLogger(__name__)

PURGE_EVERY = 60.0  # seconds between sweeps of expired hooks out of memory
_DEFAULTS = WebhookSettings()


@dataclass(frozen=True, slots=True)
class Hook:
    id: str
    customer: str
    meeting_id: str  # the customer's meetingID
    callback_url: str  # as registered (delivery signs it without any checksum of ours)
    event_ids: frozenset[str] | None  # lower-case bbb-webhooks event ids; None: every event
    algorithm: str  # sha1|sha256|sha384|sha512: what the hooks/create was signed with
    created_at: float  # epoch seconds
    ended_at: float | None = None  # its meeting's last end; it expires a grace later

    def wants(self, event_id: str) -> bool:
        return self.event_ids is None or event_id.lower() in self.event_ids

    def expired(self, now: float, grace: float) -> bool:
        return self.ended_at is not None and now >= self.ended_at + grace

    def record(self) -> Record:
        ids: Json = None if self.event_ids is None else sorted(self.event_ids)
        return {
            "type": "hook",
            "id": self.id,
            "customer": self.customer,
            "meeting_id": self.meeting_id,
            "callback_url": self.callback_url,
            "event_ids": ids,
            "algorithm": self.algorithm,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
        }


@dataclass(frozen=True, slots=True)
class HookStatistics:
    hooks: int  # live hooks, all customers
    customers: int  # customers with at least one


type MeetingKey = tuple[str, str]  # (customer id, customer's meetingID)


class HookState:
    """Every hook, by id, in creation order, indexed by customer and by meeting."""

    def __init__(self) -> None:
        self.hooks: dict[str, Hook] = {}
        self._by_customer: dict[str, dict[str, None]] = {}  # ordered sets of ids
        self._by_meeting: dict[MeetingKey, dict[str, None]] = {}
        # Meetings with hooks that will expire: the earliest end among their hooks.
        self.ended: dict[MeetingKey, float] = {}

    def apply(self, record: Mapping[str, Json]) -> None:
        """Apply one record (see the module docstring); ``StateError`` if it is not one."""
        kind = record.get("type")
        handler = _APPLY.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise StateError(f"hooks: unknown record type {kind!r}")
        handler(self, record)

    def records(self) -> Iterator[Record]:
        """The state as records: what compaction writes."""
        return (hook.record() for hook in self.hooks.values())

    def of(self, customer: str, meeting_id: str | None = None) -> list[Hook]:
        """The customer's hooks (of one meeting, if given), in creation order."""
        ids = (
            self._by_customer.get(customer, {})
            if meeting_id is None
            else self._by_meeting.get((customer, meeting_id), {})
        )
        return [self.hooks[i] for i in ids]

    def count(self, customer: str) -> int:
        return len(self._by_customer.get(customer, ()))

    def duplicate(self, customer: str, meeting_id: str, callback_url: str) -> Hook | None:
        """bbb-webhooks' rule, per customer and meeting: one hook per callback URL."""
        hooks = self.of(customer, meeting_id)
        return next((h for h in hooks if h.callback_url == callback_url), None)

    def expired(self, now: float, grace: float) -> list[Hook]:
        """Hooks whose meeting ended at least ``grace`` seconds before ``now``."""
        due = [key for key, at in self.ended.items() if now >= at + grace]
        return [h for key in due for h in self.of(*key) if h.expired(now, grace)]

    def forget(self, hooks: Iterable[Hook]) -> None:
        """Drop hooks from memory without a record (expired ones: replay agrees)."""
        for hook in hooks:
            self._remove(hook.id)

    def _add(self, hook: Hook) -> None:
        self._remove(hook.id)
        self.hooks[hook.id] = hook
        self._by_customer.setdefault(hook.customer, {})[hook.id] = None
        self._by_meeting.setdefault((hook.customer, hook.meeting_id), {})[hook.id] = None
        if hook.ended_at is not None:
            self._mark_ended((hook.customer, hook.meeting_id), hook.ended_at)

    def _remove(self, hook_id: str) -> None:
        hook = self.hooks.pop(hook_id, None)
        if hook is None:
            return
        key = (hook.customer, hook.meeting_id)
        _discard(self._by_customer, hook.customer, hook_id)
        _discard(self._by_meeting, key, hook_id)
        if hook.ended_at is not None:
            ends = [h.ended_at for h in self.of(*key) if h.ended_at is not None]
            self.ended.pop(key, None)
            if ends:
                self.ended[key] = min(ends)

    def _mark_ended(self, key: MeetingKey, at: float) -> None:
        self.ended[key] = min(at, self.ended.get(key, at))  # the earliest end expires first

    def _hook(self, record: Mapping[str, Json]) -> None:
        self._add(_hook_of(record))

    def _destroyed(self, record: Mapping[str, Json]) -> None:
        self._remove(_text(record, "id"))

    def _ended(self, record: Mapping[str, Json]) -> None:
        at = _number(record, "at")
        key = (_text(record, "customer"), _text(record, "meeting_id"))
        for hook in self.of(*key):
            self.hooks[hook.id] = replace(hook, ended_at=at)
        if key in self._by_meeting:
            self.ended[key] = at

    def _started(self, record: Mapping[str, Json]) -> None:
        key = (_text(record, "customer"), _text(record, "meeting_id"))
        for hook in self.of(*key):
            self.hooks[hook.id] = replace(hook, ended_at=None)
        self.ended.pop(key, None)


def _discard[K](index: dict[K, dict[str, None]], key: K, hook_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.pop(hook_id, None)
        if not ids:
            del index[key]


_APPLY: dict[str, Callable[[HookState, Mapping[str, Json]], None]] = {
    "hook": HookState._hook,
    "destroyed": HookState._destroyed,
    "ended": HookState._ended,
    "started": HookState._started,
}


def _hook_of(record: Mapping[str, Json]) -> Hook:
    ids = record.get("event_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise StateError(f"hooks: event_ids must be a list of strings, not {ids!r}")
    ended = record.get("ended_at")
    return Hook(
        id=_text(record, "id"),
        customer=_text(record, "customer"),
        meeting_id=_text(record, "meeting_id"),
        callback_url=_text(record, "callback_url"),
        event_ids=None if ids is None else frozenset(str(i) for i in ids),
        algorithm=_text(record, "algorithm"),
        created_at=_number(record, "created_at"),
        ended_at=None if ended is None else _number(record, "ended_at"),
    )


def _text(record: Mapping[str, Json], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise StateError(f"hooks: {record.get('type')} record needs a string {key}, not {value!r}")
    return value


def _number(record: Mapping[str, Json], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StateError(f"hooks: {record.get('type')} record needs a number {key}, not {value!r}")
    return float(value)


class _Duplicate(Exception):
    """The customer has a hook for that meeting and URL already: ``hook``."""

    def __init__(self, hook: Hook) -> None:
        super().__init__(hook.id)
        self.hook = hook


class HookRegistry:
    """The hooks as the API calls, the end notices and delivery use them.

    Expired hooks are never answered; they leave memory at the next purge
    (at most every :data:`PURGE_EVERY` seconds, and before a limit is checked).
    """

    def __init__(
        self,
        log: Log,
        *,
        max_per_customer: int = _DEFAULTS.max_hooks_per_customer,
        grace: float = _DEFAULTS.hook_grace_after_end,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log = log
        self.state = HookState()
        self.max_per_customer = max_per_customer
        self.grace = grace
        self.clock = clock
        self._next_purge = 0.0

    @classmethod
    def configured(cls, log: Log, settings: WebhookSettings) -> HookRegistry:
        return cls(
            log,
            max_per_customer=settings.max_hooks_per_customer,
            grace=settings.hook_grace_after_end,
        )

    def replay(self, records: Iterable[Mapping[str, Json]]) -> None:
        """Apply what the log gave at start-up (``StateError`` if it is not hooks' records)."""
        for record in records:
            self.state.apply(record)

    # -- what delivery asks ---------------------------------------------------------------------

    def matching(self, customer: str, meeting_id: str, event_id: str) -> list[Hook]:
        """The live hooks of ``customer``'s meeting ``meeting_id`` that want ``event_id``."""
        return [h for h in self._live(customer, meeting_id) if h.wants(event_id)]

    def get(self, hook_id: str) -> Hook | None:
        """A live hook by id (delivery looks its URL and algorithm up before each POST)."""
        hook = self.state.hooks.get(hook_id)
        return None if hook is None or hook.expired(self.clock(), self.grace) else hook

    async def lookup(self, hook_id: str) -> Hook | None:
        """:meth:`get`; when not found, :meth:`refresh` first (read-your-writes: a hook
        another instance just created).  Never raises for storage."""
        hook = self.get(hook_id)
        if hook is None and await self.refresh():
            hook = self.get(hook_id)
        return hook

    async def refresh(self) -> bool:
        """Catch up with the hooks other gateway instances changed (``[store] kind =
        "redis"``; :class:`~proxy.store.shared.Replica`); True if something may have been
        read.  Never raises for storage: with Redis unreachable the hooks known here are
        answered."""
        refresh = getattr(self.log, "refresh", None)
        if refresh is None or not getattr(self.log, "shared", False):
            return False
        try:
            await refresh()
        except StorageUnavailable:
            return False
        return True

    def apply_other(self, record: Mapping[str, Json]) -> None:
        """Another instance's record (the replica's ``apply``)."""
        self.state.apply(record)

    def clear(self) -> None:
        """Forget every hook (the replica rebuilds after another instance's compaction)."""
        self.state = HookState()

    async def drop(self, hook_id: str) -> Hook | None:
        """Remove a hook whose receiver keeps failing; never raises for storage."""
        hook = self.state.hooks.get(hook_id)
        if hook is not None:
            self._record({"type": "destroyed", "id": hook_id})
            await self._flush_if_possible()
        return hook

    # -- what the API calls ask -----------------------------------------------------------------

    def listed(self, customer: str, meeting_id: str | None = None) -> list[Hook]:
        """The customer's live hooks (of one meeting, if given), in creation order."""
        return self._live(customer, meeting_id)

    async def create(
        self,
        customer: str,
        meeting_id: str,
        callback_url: str,
        event_ids: frozenset[str] | None,
        algorithm: str,
    ) -> tuple[Hook, bool]:
        """Register a hook, or find the one this customer has for that meeting and URL.

        Returns ``(hook, duplicated)``.  A duplicate is the old hook as it was
        (its event filter and algorithm too), as bbb-webhooks answers it.

        Error handling: ``ValidationError`` (``createHookError``) over the limit;
        ``StorageUnavailable`` when the log cannot write (nothing is registered if
        it had failed already).
        """
        await self.refresh()  # a duplicate or the limit, as another instance left them
        try:
            self._may_create(customer, meeting_id, callback_url)
        except _Duplicate as found:
            return found.hook, True
        self._check_writable()
        hook = Hook(
            str(uuid.uuid4()),
            customer,
            meeting_id,
            callback_url,
            event_ids,
            algorithm,
            self.clock(),
        )
        if isinstance(self.log, Replica) and self.log.shared:
            # in the stream's order, checked again on the caught-up state: of two creates of
            # one URL on two instances at once, one registers; the limit holds across them
            try:
                await self.log.commit(
                    hook.record(), lambda: self._may_create(customer, meeting_id, callback_url)
                )
            except _Duplicate as found:
                return found.hook, True
            return hook, False
        self._record(hook.record())
        await self.log.flush()
        return hook, False

    def _may_create(self, customer: str, meeting_id: str, callback_url: str) -> None:
        """``_Duplicate`` for bbb-webhooks' duplicate; ``ValidationError`` over the limit."""
        self._purge(force=True)
        old = self.state.duplicate(customer, meeting_id, callback_url)
        if old is not None:
            raise _Duplicate(old)
        if self.state.count(customer) >= self.max_per_customer:
            raise ValidationError(
                f"You have {self.max_per_customer} hooks already, the most this gateway "
                "allows; destroy hooks you no longer need first",
                message_key="createHookError",
            )

    async def destroy(self, customer: str, hook_id: str) -> bool:
        """Remove one of ``customer``'s live hooks; False if it has none of that id.

        Error handling: ``StorageUnavailable`` when the log cannot write.
        """
        hook = await self.lookup(hook_id)
        if hook is None or hook.customer != customer:
            return False
        self._check_writable()
        self._record({"type": "destroyed", "id": hook_id})
        await self.log.flush()
        return True

    # -- what the gateway learns of meetings ----------------------------------------------------

    async def meeting_ended(self, customer: str, meeting_id: str, at: float | None = None) -> None:
        """The meeting ended at ``at`` (default now): its hooks expire a grace later.

        Never raises for storage; a meeting without hooks writes nothing.
        """
        if self.state.of(customer, meeting_id):
            when = self.clock() if at is None else at
            record: Record = {"type": "ended", "customer": customer, "meeting_id": meeting_id}
            self._record(record | {"at": when})
            await self._flush_if_possible()

    async def meeting_started(self, customer: str, meeting_id: str) -> None:
        """The meeting was created (again): its hooks stop expiring.  Never raises for storage."""
        if any(h.ended_at is not None for h in self.state.of(customer, meeting_id)):
            self._record({"type": "started", "customer": customer, "meeting_id": meeting_id})
            await self._flush_if_possible()

    def records(self) -> list[Record]:
        """The live hooks as records: what the log's owner compacts it to."""
        self._purge(force=True)
        return list(self.state.records())

    def statistics(self) -> HookStatistics:
        self._purge()
        hooks = self.state.hooks.values()
        return HookStatistics(len(hooks), len({h.customer for h in hooks}))

    # -- internals ------------------------------------------------------------------------------

    def _live(self, customer: str, meeting_id: str | None) -> list[Hook]:
        self._purge()
        now = self.clock()
        return [h for h in self.state.of(customer, meeting_id) if not h.expired(now, self.grace)]

    def _purge(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        expired = self.state.expired(now, self.grace)
        for hook in expired:
            log.info("hook %s of %s expired (its meeting ended)", hook.id, hook.customer)
        self.state.forget(expired)

    def _check_writable(self) -> None:
        if self.log.failed:
            raise StorageUnavailable()

    def _record(self, record: Record) -> None:
        self.state.apply(record)
        self.log.append(record)

    async def _flush_if_possible(self) -> None:
        with contextlib.suppress(StorageUnavailable):
            await self.log.flush()


def open_hooks(gw: Gateway) -> HookRegistry:
    """Put the durable registry (the ``hooks`` log under ``state_dir``, replayed) in force.

    Blocking: at start-up, before serving.  A supervised task recovers a failed log and
    compacts it to the live hooks when it has grown; /readyz reports it while it fails.

    Error handling: ``StateError`` for a log that cannot be read or holds a record
    that is not a hook's (the CLI exits 3).
    """
    proxy = gw.config.proxy
    store, records = open_store_log(proxy.state_dir, "hooks", timeout=proxy.journal_timeout)
    registry = HookRegistry.configured(store, gw.config.webhooks)
    registry.replay(records)
    replica = Replica(
        store, "hooks", apply=registry.apply_other, clear=registry.clear, records=registry.records
    )
    registry.log = replica  # on Redis: the other instances' hooks followed (proxy.store.shared)
    gw.hooks = registry
    gw.stores["hooks"] = store  # /readyz is 503 while it cannot write
    gw.spawn("hooks-store", replica.maintain)
    return registry
