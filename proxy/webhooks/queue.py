"""The events still to deliver, one queue per hook: the pure model of the "webhook-queue" log.

Each hook with something to deliver has a first-in first-out queue of
:class:`Pending` events; delivery sends the head, and only the head, of each
queue (order kept per hook), and takes it off once the receiver has it.  The
model changes only through :meth:`QueueState.apply` with a record, so the log
replays to the same queues after a restart or a ``kill -9``.  Records (JSON
objects, ``"type"`` first, as the other logs under ``proxy/store``)::

    {"type": "event", "hook", "seq", "ts", "event": {...}[, "node"]}  queued at the tail
    {"type": "done", "hook", "seq"[, "node"]}                taken off (delivered)
    {"type": "dropped", "hook"}                              the hook's whole queue is gone
    {"type": "owner", "hook", "node"}                        who delivers it (several instances)

``seq`` numbers events across all hooks (unique among what is queued; replay
continues after the largest).  Several gateway instances on one Redis (``[store] kind =
"redis"``) queue into one log: there an event also names the ``node`` that queued it
(the instance's writer id), and an event is known by ``(node, seq)``, so two instances'
numbers never mix; an ``event`` seen twice (a flush whose answer was lost, read back after
another instance's compaction) is queued once.  ``owner`` says which instance delivers a
hook's queue (:mod:`proxy.webhooks.delivery`); compaction writes it before the queue.  On
the local store no record has a ``node`` and there is no ``owner``.

``ts`` is the ``timestamp`` of bbb-webhooks' callback form, in epoch milliseconds:
fixed when the event is accepted, so it stays the same across retries and restarts, as
bbb-webhooks keeps it across retries.  ``event`` is the event as the customer receives
it (already scrubbed of personal data: nothing else is ever queued).

Bound: a queue holds at most ``max_per_hook`` events; an event beyond pushes the
oldest out (``overflow``, counted by the service).  The newest events are
kept because a receiver that catches up wants the meeting's latest state (its
end, its recording) rather than the early joins; the receiver sees a gap
either way.  Replaying the same records with the same bound gives the same
queues.

A ``done`` for an event no longer queued (pushed out while it was being sent)
changes nothing: replay is idempotent about it.

Error handling: :meth:`QueueState.apply` raises ``StateError`` for a record it
does not understand (unknown type, missing or mistyped field), never
``KeyError``/``TypeError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from proxy.errors import StateError
from proxy.store import Json, Record

DEFAULT_MAX_PER_HOOK = 1000


@dataclass(frozen=True, slots=True)
class Pending:
    """One event queued for one hook."""

    hook: str
    seq: int
    timestamp: int  # epoch ms: the callback form's ``timestamp``
    event: Mapping[str, Json]
    origin: str = ""  # the instance that queued it (several instances); "" on the local store

    def record(self) -> Record:
        record: Record = {
            "type": "event",
            "hook": self.hook,
            "seq": self.seq,
            "ts": self.timestamp,
            "event": self.event,
        }
        if self.origin:
            record["node"] = self.origin
        return record


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    hooks: int  # hooks with at least one event queued
    events: int  # events queued, all hooks
    deepest: int  # the longest queue


class QueueState:
    """Every hook's queue, by hook id."""

    def __init__(self, max_per_hook: int = DEFAULT_MAX_PER_HOOK) -> None:
        if max_per_hook < 1:
            raise ValueError("max_per_hook must be >= 1")
        self.max_per_hook = max_per_hook
        self.queues: dict[str, deque[Pending]] = {}
        self.next_seq = 0
        self.owners: dict[str, str] = {}  # hook -> the instance delivering it (several)
        self._queued: set[tuple[str, str, int]] = set()  # (hook, origin, seq) in a queue

    # -- the log ----------------------------------------------------------------------------------

    def apply(self, record: Mapping[str, Json]) -> None:
        """Apply one record (see the module docstring); ``StateError`` if it is not one."""
        kind = record.get("type")
        handler = _APPLY.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise StateError(f"webhook-queue: unknown record type {kind!r}")
        handler(self, record)

    def records(self) -> Iterator[Record]:
        """The queues as records, each queue in order (after its owner, if any): what
        compaction writes."""
        for hook, queue in list(self.queues.items()):
            owner = self.owners.get(hook)
            if owner is not None:
                yield {"type": "owner", "hook": hook, "node": owner}
            yield from (pending.record() for pending in list(queue))

    # -- changes: each builds its record, applies it and returns it for the log ------------------

    def enqueue(
        self, hook: str, event: Mapping[str, Json], timestamp: int, origin: str = ""
    ) -> tuple[Record, Pending | None]:
        """Queue ``event`` for ``hook``; its record, and the event it pushed out (or None)."""
        record = self.event_record(hook, event, timestamp, origin)
        return record, self.push(record)

    def event_record(
        self, hook: str, event: Mapping[str, Json], timestamp: int, origin: str = ""
    ) -> Record:
        """The record that would queue ``event`` for ``hook`` (nothing changes yet)."""
        return Pending(hook, self.next_seq, timestamp, event, origin).record()

    def push(self, record: Mapping[str, Json]) -> Pending | None:
        """Apply an ``event`` record; the event it pushed out of a full queue, or None."""
        queue = self.queues.get(_text(record, "hook"))
        pushed = queue[0] if queue is not None and len(queue) >= self.max_per_hook else None
        self.apply(record)
        return pushed

    def delivered(self, pending: Pending) -> Record:
        record: Record = {"type": "done", "hook": pending.hook, "seq": pending.seq}
        if pending.origin:
            record["node"] = pending.origin
        self.apply(record)
        return record

    def owner_record(self, hook: str, node: str) -> Record:
        """The record that makes ``node`` the deliverer of ``hook`` (nothing changes yet)."""
        return {"type": "owner", "hook": hook, "node": node}

    def drop(self, hook: str) -> tuple[Record, int]:
        """Forget everything queued for ``hook``; the record and how many events went."""
        record: Record = {"type": "dropped", "hook": hook}
        count = self.depth(hook)
        self.apply(record)
        return record, count

    # -- questions --------------------------------------------------------------------------------

    def head(self, hook: str) -> Pending | None:
        queue = self.queues.get(hook)
        return queue[0] if queue else None

    def depth(self, hook: str) -> int:
        return len(self.queues.get(hook, ()))

    def hooks(self) -> list[str]:
        """Hooks with something queued, in the order their queues began."""
        return list(self.queues)

    def statistics(self, hooks: Iterable[str] | None = None) -> QueueStatistics:
        """Of every queue, or of ``hooks``' only (an instance's own, with several)."""
        queues = self.queues.values() if hooks is None else [self.queues[h] for h in hooks]
        depths = [len(q) for q in queues]
        return QueueStatistics(len(depths), sum(depths), max(depths, default=0))

    # -- applying ---------------------------------------------------------------------------------

    def _event(self, record: Mapping[str, Json]) -> None:
        event = record.get("event")
        if not isinstance(event, Mapping):
            raise StateError(f"webhook-queue: event record needs an object event, not {event!r}")
        pending = Pending(
            _text(record, "hook"),
            _int(record, "seq"),
            _int(record, "ts"),
            event,
            _node(record),
        )
        self.next_seq = max(self.next_seq, pending.seq + 1)
        known = (pending.hook, pending.origin, pending.seq)
        if known in self._queued:
            return  # seen twice: queued once
        queue = self.queues.setdefault(pending.hook, deque())
        if len(queue) >= self.max_per_hook:
            self._forget(queue.popleft())
        queue.append(pending)
        self._queued.add(known)

    def _done(self, record: Mapping[str, Json]) -> None:
        hook, seq, origin = _text(record, "hook"), _int(record, "seq"), _node(record)
        queue = self.queues.get(hook)
        if queue is None:
            return
        if queue[0].seq == seq and queue[0].origin == origin:
            self._forget(queue.popleft())  # the usual case: delivery takes heads off
        else:
            found = next((p for p in queue if p.seq == seq and p.origin == origin), None)
            if found is not None:
                queue.remove(found)
                self._forget(found)
        if not queue:
            del self.queues[hook]

    def _dropped(self, record: Mapping[str, Json]) -> None:
        hook = _text(record, "hook")
        for pending in self.queues.pop(hook, ()):
            self._forget(pending)
        self.owners.pop(hook, None)

    def _owner(self, record: Mapping[str, Json]) -> None:
        self.owners[_text(record, "hook")] = _text(record, "node")

    def _forget(self, pending: Pending) -> None:
        self._queued.discard((pending.hook, pending.origin, pending.seq))


_APPLY: dict[str, Callable[[QueueState, Mapping[str, Json]], None]] = {
    "event": QueueState._event,
    "done": QueueState._done,
    "dropped": QueueState._dropped,
    "owner": QueueState._owner,
}


def _node(record: Mapping[str, Json]) -> str:
    value = record.get("node", "")
    if not isinstance(value, str):
        raise StateError(f"webhook-queue: {record.get('type')} record's node must be a string")
    return value


def _text(record: Mapping[str, Json], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise StateError(
            f"webhook-queue: {record.get('type')} record needs a string {key}, not {value!r}"
        )
    return value


def _int(record: Mapping[str, Json], key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(
            f"webhook-queue: {record.get('type')} record needs an integer {key} >= 0, not {value!r}"
        )
    return value
