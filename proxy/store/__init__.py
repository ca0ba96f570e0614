"""The one small durable-store interface every kind of state uses (hooks, webhook queue, runtime).

A kind of state is a pure model with ``apply(record) -> None`` (total: a record it does not
know is a ``StateError``, never a ``KeyError``) and ``records() -> Iterable[dict]`` (its
current state as records, what compaction writes), plus a thin service that applies a
change in memory, :meth:`Log.append`\\s its record, and ``await log.flush()`` before the
customer is answered::

    log, replayed = open_local_log(config.proxy.state_dir, "hooks",
                                   timeout=config.proxy.journal_timeout)  # blocking, at start-up
    state = HookState()
    for record in replayed:
        state.apply(record)
    gw.spawn("hooks-store", log.maintain, state.records)  # recovery, and compaction when due
    ...
    state.apply(record); log.append(record); await log.flush()   # per change, in one step

``LocalLog.maintain(records)`` retries a failed disk every second and compacts from
``records()`` when the file has doubled; an owner that compacts by itself spawns
``LocalLog.recover_forever`` instead.  Apply and append in one synchronous step (no
``await`` between): a compaction reads ``records()`` at once and counts every record
appended after that call as later.

A record is a JSON object (:data:`Json` values; no NaN or infinity, no bytes).  What
:func:`open_local_log` replays is exactly what was appended and flushed, in order, with
a compaction standing for everything appended before it.

Implementations: :class:`~proxy.store.local.LocalLog` (a framed, fsynced file under
``state_dir``, with the ledger journal's torn-tail and corruption rules; see its module),
:class:`MemoryLog` (tests and benchmarks), :class:`~proxy.store.redis.RedisLog` (``[store]
kind = "redis"``; owners open with :func:`open_store_log`, which picks it).  Code against
:class:`Log`, never against a concrete class.

Error handling: ``append`` never raises for a storage fault (it only queues); ``flush``
and ``compact`` raise :class:`~proxy.errors.StorageUnavailable` when the records cannot be
made durable within the timeout; start-up (``open_local_log``) raises
:class:`~proxy.errors.StateError` naming the file and byte offset of any corruption.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import orjson

from proxy.errors import StorageUnavailable

if TYPE_CHECKING:
    from proxy.store.local import LocalLog

__all__ = [
    "MAX_RECORD_BYTES",
    "DurableLog",
    "Json",
    "Log",
    "MemoryLog",
    "Record",
    "open_local_log",
    "open_store_log",
    "using",
]

# What a record may hold.  Sequence and Mapping (not list and dict) so that a
# ``list[str]`` or ``dict[str, int]`` is a Json value too; replay gives lists and dicts.
type Json = bool | int | float | str | Sequence[Json] | Mapping[str, Json] | None
type Record = dict[str, Json]

MAX_RECORD_BYTES = 1 << 20  # a record's JSON, in every implementation


class Log(Protocol):
    """An append-only log of JSON records, replayed at start-up, compacted by its owner."""

    def append(self, record: Mapping[str, Json]) -> None:
        """Queue one record; it is durable once a later :meth:`flush` returns.

        Error handling: never raises for a storage fault.  A record that is not JSON (a
        NaN, bytes, a str that is not UTF-8) or whose JSON is over ``MAX_RECORD_BYTES`` is
        the caller's bug: ``ValueError``.
        """
        ...

    async def flush(self) -> None:
        """Return once everything appended so far is durable.

        Error handling: ``StorageUnavailable`` if it is not within the log's timeout
        (the records stay queued and are written once the storage works again).
        """
        ...

    @property
    def failed(self) -> bool:
        """True while nothing can be made durable (a write failed, or is overdue)."""
        ...

    async def compact(self, records: Iterable[Mapping[str, Json]]) -> None:
        """Replace the log's content with ``records``: the owner's whole current state.

        ``records`` must stand for every record appended so far (it is read at once,
        before the first ``await``); records appended later follow it.  Atomic: a
        crash leaves the old content or the new one, never a mix.

        Error handling: ``StorageUnavailable`` if it cannot be written in time; the
        old content (and everything appended) is kept then.
        """
        ...


class DurableLog(Log, Protocol):
    """A :class:`Log` as its owner runs it: with a supervised task that recovers it
    (and compacts it from the owner's ``records()`` when due)."""

    async def maintain(
        self, records: Callable[[], Iterable[Mapping[str, Json]]] | None = None
    ) -> None: ...

    async def recover_forever(self) -> None: ...


type Opener = Callable[[Path, str, float], tuple[DurableLog, list[Record]]]
_opener: contextvars.ContextVar[Opener] = contextvars.ContextVar("store_opener")


def open_store_log(
    state_dir: Path, name: str, *, timeout: float
) -> tuple[DurableLog, list[Record]]:
    """Open the log ``name`` where ``[store] kind`` keeps it; the records to replay.

    The local log under ``state_dir`` (:func:`open_local_log`), unless the task runs
    inside :func:`using` (``serve_gateway`` with ``kind = "redis"``: the Redis store's
    log of that name, read when the store was opened).  Blocking: at start-up.

    Error handling: as :func:`open_local_log` (``StateError``, the CLI exits 3).
    """
    opener = _opener.get(None)
    if opener is None:
        return open_local_log(state_dir, name, timeout=timeout)
    return opener(state_dir, name, timeout)


@contextlib.contextmanager
def using(opener: Opener) -> Iterator[None]:
    """Make :func:`open_store_log` open with ``opener`` in this task (and the tasks it
    starts) until the block ends."""
    token = _opener.set(opener)
    try:
        yield
    finally:
        _opener.reset(token)


def open_local_log(state_dir: Path, name: str, *, timeout: float) -> tuple[LocalLog, list[Record]]:
    """Open the log ``name`` under ``state_dir``; return it and the records to replay, in order.

    Blocking: call it at start-up, before serving (or in a worker thread).  ``timeout``
    bounds each write (``[proxy] journal_timeout``).

    Error handling: a torn last record is cut off (with a warning); corruption
    anywhere else, a file over the replay bound, or a ``state_dir`` that cannot be read
    raises ``StateError`` naming the file and byte offset (the CLI exits 3).
    """
    from proxy.store.local import open_log  # here: proxy.store.local imports this module

    return open_log(state_dir, name, timeout=timeout)


def encode(record: Mapping[str, Json]) -> bytes:
    """The JSON of one record; ``ValueError`` unless a JSON object of JSON values, bounded."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a record is a JSON object, not {type(record).__name__}")
    try:
        body = orjson.dumps(_plain(record))
    except TypeError as e:  # orjson.JSONEncodeError
        raise ValueError(f"not a JSON record: {e}") from None
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"a record of {len(body)} bytes is over {MAX_RECORD_BYTES}")
    return body


def _plain(value: object) -> object:
    """``value`` with every Mapping a dict and every non-str Sequence a list (for orjson).

    Floats that JSON cannot hold are refused rather than written as ``null``.
    """
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError(f"not a JSON number: {value!r}")
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


class MemoryLog:
    """A :class:`Log` in memory: for tests of the services on top, and benchmarks' baselines.

    ``durable`` is what a restart would replay: flushed records, compactions included.
    Set ``failed = True`` to make ``flush`` and ``compact`` raise ``StorageUnavailable``
    (the records stay pending, and are flushed once ``failed`` is False again).
    """

    def __init__(self, records: Iterable[Mapping[str, Json]] = ()) -> None:
        self.durable: list[Record] = [_copy(r) for r in records]
        self.pending: list[Record] = []
        self.failed = False
        self.flushes = 0
        self.compactions = 0

    def append(self, record: Mapping[str, Json]) -> None:
        self.pending.append(_copy(record))

    async def flush(self) -> None:
        self.flushes += 1
        if self.pending and self.failed:
            raise StorageUnavailable()
        self.durable += self.pending
        self.pending = []

    async def compact(self, records: Iterable[Mapping[str, Json]]) -> None:
        content = [_copy(r) for r in records]
        if self.failed:
            raise StorageUnavailable()
        self.durable, self.pending = content, []
        self.compactions += 1

    def replayed(self) -> list[Record]:
        """What ``open_local_log`` would give after a crash now (a fresh copy)."""
        return copy.deepcopy(self.durable)


def _copy(record: Mapping[str, Json]) -> Record:
    """A private copy, round-tripped through JSON as a real log would store it."""
    decoded: Record = orjson.loads(encode(record))
    return decoded
