"""The Redis :class:`~proxy.store.Log` (issue 13): one stream per log on a shared Redis 7.

Keys (``prefix`` is ``[store] key_prefix``)::

    <prefix>log:<name>     a stream; each entry {"r": record JSON, "w": writer id}
    <prefix>meta:<name>    a hash: "gen" (compactions so far), and per writer id the
                           number of its records already in the stream

Writers.  Every :class:`RedisLog` has a random writer id and numbers its records 1, 2, ...
A flush sends the queued records with their numbers to a Lua script that adds only
those past the writer's count in ``meta`` and moves the count on, in one atomic step.
A flush whose answer was lost (a timeout, a dropped connection) is therefore sent
again as it was: Redis adds what it has not got, never a record twice.

Durability.  A flush returns once Redis has answered the script.  Redis acknowledges a
write after appending it to its AOF; with ``appendonly yes`` and ``appendfsync always``
(the README's required settings) that is after an fsync, so an acknowledged record
survives a crash of Redis and of the host.  ``appendfsync everysec`` loses up to a
second of acknowledged records in a host crash (documented trade-off).  With ``[store]
wait_replicas`` = N, each log script is followed by ``WAIT N`` on its connection
(:func:`proxy.store.redis_connect.replicated`): fewer acknowledgements within
``wait_timeout`` make the write unacknowledged (``StorageUnavailable``; it is on the
master, and is kept or lost as a lost answer is).  ``[store] sentinels``: the master is
found through Redis Sentinel and followed across a failover (proxy.store.redis_connect).

Compaction.  :meth:`RedisLog.compact` sends the owner's whole state to a script that
deletes the stream, adds the records, bumps ``gen`` and sets this writer's count to
the records the state covers, atomically (Redis runs a script alone, and writes its
effects to the AOF as one MULTI/EXEC).  Other writers' counts are dropped with the
old content: a log compacted this way has one owner.

Several instances.  :meth:`RedisLog.tail` reads what OTHER writers appended since the
last entry this log has seen (its own entries are skipped: the owner applied them when
it appended); after another writer's compaction (``gen`` changed) it gives the whole
content again, marked ``reset``.  :meth:`RedisLog.try_append` appends only if the
stream's last entry is still the one this log has seen (compare-and-append), the
primitive of the shared ledger (docs/decisions.md, "Store on Redis").

Redis unreachable.  Every command runs under ``timeout``; a connection error, a Redis
error or an overrun makes the log *failed* and ``flush`` raise
:class:`~proxy.errors.StorageUnavailable`; the records stay queued.  The next flush, and
:meth:`RedisLog.maintain` every second, send them again; the log recovers by itself when
Redis answers.

Bounds.  A record's JSON is at most ``MAX_RECORD_BYTES``; a log at most ``max_bytes`` of
record JSON (a flush that would pass it fails until the owner compacts), and start-up
refuses a larger stream, so what is in Redis can always be replayed.

Error handling: start-up (:func:`open_redis_store`) raises ``StateError`` when Redis
cannot be reached or a log holds an entry that is not a record (naming key and entry
id); once running, only ``StorageUnavailable`` (``flush``, ``compact``, ``try_append``,
``tail``) and ``ValueError`` from ``append`` for a record that is not JSON or too large.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import trio
from coredis.exceptions import RedisError

from proxy.config import StoreSettings
from proxy.errors import StateError, StorageUnavailable
from proxy.store import Json, Record, encode
from proxy.store.redis_connect import connect, replicated, where
from proxy.store.redis_connect import safe_url as _safe_url

__all__ = ["MAX_LOG_BYTES", "RedisLog", "RedisStore", "Tail", "open_redis_store"]

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 256 << 20  # record JSON per log, as the local log's bound
COMPACT_MIN_BYTES = 1 << 20
READ_CHUNK = 1000  # entries per XRANGE at replay and in tail
RETRY_EVERY = 1.0
NO_ID = "0-0"

# A fence (KEYS[3], ARGV[3]): write only while that key holds that value (a lease).
_FENCE = """
if #KEYS > 2 and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return redis.error_reply('FENCED ' .. KEYS[3] .. ' is not held by this writer')
end
"""

# KEYS: stream, meta[, fence].  ARGV: writer, first number, fence value, records...
# Returns the last entry id.
_APPEND = (
    _FENCE
    + """
local done = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local first = tonumber(ARGV[2])
local last = nil
for i = 4, #ARGV do
  if first + i - 4 > done then
    last = redis.call('XADD', KEYS[1], '*', 'r', ARGV[i], 'w', ARGV[1])
  end
end
local count = first + #ARGV - 4
if count > done then redis.call('HSET', KEYS[2], ARGV[1], count) end
return last or false
"""
)

# Appends to ``out`` the entries of stream KEYS[1] after id ``after`` (at most ``count``)
# as flat triples: id, writer, record.
_RANGE = """
local function range(out, after, count)
  local start = '-'
  if after ~= '0-0' then start = '(' .. after end
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', count)) do
    local f, r, w = e[2], '', ''
    for i = 1, #f, 2 do
      if f[i] == 'r' then r = f[i + 1] elseif f[i] == 'w' then w = f[i + 1] end
    end
    out[#out + 1] = e[1]
    out[#out + 1] = w
    out[#out + 1] = r
  end
  return out
end
"""

# KEYS: stream, meta.  ARGV: writer, gen seen, last id seen, records...
# Returns {1, last id} appended, or {0, gen, last id, entries after the id seen...} when
# the log moved on (the entries, as _RANGE's triples, only if ``gen`` is the one seen):
# a lost race reads what it missed in the same round trip.
_TRY_APPEND = (
    _RANGE
    + """
local gen = redis.call('HGET', KEYS[2], 'gen') or '0'
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = '0-0'
if #top > 0 then last = top[1][1] end
if gen ~= ARGV[2] then return {0, gen, last} end
if last ~= ARGV[3] then return range({0, gen, last}, ARGV[3], """
    + str(READ_CHUNK)
    + """) end
for i = 4, #ARGV do
  last = redis.call('XADD', KEYS[1], '*', 'r', ARGV[i], 'w', ARGV[1])
end
return {1, last}
"""
)

# KEYS: stream, meta.  ARGV: gen seen, id seen, count.  One round trip for a tail:
# {gen} when the log was compacted since, else {gen, entries after the id...}.
_TAIL = (
    _RANGE
    + """
local gen = redis.call('HGET', KEYS[2], 'gen') or '0'
if gen ~= ARGV[1] then return {gen} end
return range({gen}, ARGV[2], tonumber(ARGV[3]))
"""
)

# KEYS: stream, meta.  ARGV: writer, gen seen, last id seen, records...
# Compaction by one of several writers: only if nobody appended since (as _TRY_APPEND),
# and every writer's count is kept, so a flush retried after it adds nothing twice.
# Returns {1, gen, last id}, or {0, gen, last id} when the log moved on.
_TRY_COMPACT = """
local gen = redis.call('HGET', KEYS[2], 'gen') or '0'
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = '0-0'
if #top > 0 then last = top[1][1] end
if gen ~= ARGV[2] or last ~= ARGV[3] then return {0, gen, last} end
redis.call('DEL', KEYS[1])
gen = tostring(tonumber(gen) + 1)
redis.call('HSET', KEYS[2], 'gen', gen)
last = '0-0'
for i = 4, #ARGV do
  last = redis.call('XADD', KEYS[1], '*', 'r', ARGV[i], 'w', ARGV[1])
end
return {1, gen, last}
"""

# KEYS: stream, meta[, fence].  ARGV: writer, records covered, fence value, records...
# Returns {gen, last id}.
_COMPACT = (
    _FENCE
    + """
redis.call('DEL', KEYS[1])
local gen = redis.call('HGET', KEYS[2], 'gen') or '0'
gen = tostring(tonumber(gen) + 1)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'gen', gen, ARGV[1], ARGV[2])
local last = '0-0'
for i = 4, #ARGV do
  last = redis.call('XADD', KEYS[1], '*', 'r', ARGV[i], 'w', ARGV[1])
end
return {gen, last}
"""
)


@dataclass(frozen=True, slots=True)
class Tail:
    """What :meth:`RedisLog.tail` read: records other writers appended, in order; with
    ``reset`` the log was compacted by another writer and ``records`` is its whole content."""

    records: list[Record]
    reset: bool = False


@dataclass(frozen=True, slots=True)
class _Loaded:
    entries: list[tuple[str, Record]]  # (writer id, record)
    gen: str
    last_id: str
    size: int


# -- the store: one client, the logs' replay -----------------------------------------------------


class RedisStore:
    """One Redis client shared by every log of the process; built by :func:`open_redis_store`."""

    def __init__(self, client: Any, settings: StoreSettings, timeout: float) -> None:
        self.client = client
        self.settings = settings
        self.timeout = timeout
        self._loaded: dict[str, _Loaded] = {}
        self._opened: set[str] = set()
        self._scripts: dict[str, Any] = {}

    def key(self, kind: str, name: str) -> str:
        return f"{self.settings.key_prefix}{kind}:{name}"

    async def run[T](self, command: Callable[[], Awaitable[T]], what: str) -> T:
        """One Redis command under ``timeout``; ``StorageUnavailable`` on any failure."""
        try:
            with trio.fail_after(self.timeout):
                return await command()
        except trio.TooSlowError:
            raise StorageUnavailable() from StateError(
                f"redis: {what} not answered within {self.timeout} s"
            )
        except (RedisError, OSError, anyio.ClosedResourceError, anyio.BrokenResourceError) as e:
            # (anyio's: a connection a cancelled command left closed, coredis 6.9)
            raise StorageUnavailable() from StateError(f"redis: {what}: {e or type(e).__name__}")
        except BaseExceptionGroup as group:  # coredis' task groups
            leaf = _redis_failure(group)
            if leaf is None:
                raise
            raise StorageUnavailable() from StateError(f"redis: {what}: {leaf}")

    async def script(self, name: str, keys: list[str], args: Sequence[object]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            source = {
                "append": _APPEND,
                "try_append": _TRY_APPEND,
                "compact": _COMPACT,
                "try_compact": _TRY_COMPACT,
            }[name]
            script = self._scripts[name] = self.client.register_script(source)

        async def write() -> Any:  # the log writes: WAIT for [store] wait_replicas after
            with replicated(self.client, self.settings):
                return await script(keys=keys, args=list(args))

        return await self.run(write, name)

    async def script_source(self, source: str, keys: list[str], args: Sequence[object]) -> Any:
        """Run the Lua ``source`` (registered once) under ``timeout``.

        Error handling: ``StorageUnavailable`` as :meth:`run`.
        """
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return await self.run(lambda: script(keys=keys, args=list(args)), "a script")

    async def load(self, *, max_bytes: int = MAX_LOG_BYTES) -> None:
        """Read every log under the prefix (at start-up, before :meth:`open`).

        Error handling: ``StateError`` naming the key for an entry that is not a
        record, a log over ``max_bytes``, or Redis not answering.
        """
        pattern = self.key("log", "*")
        try:
            keys = [k async for k in self.client.scan_iter(match=pattern)]
            for key in sorted(_text(k) for k in keys):
                name = key.removeprefix(self.key("log", ""))
                self._loaded[name] = await self.read(name, max_bytes=max_bytes)
        except StorageUnavailable as e:
            url = _safe_url(self.settings.url)
            raise StateError(f"redis {url}: cannot read the logs: {e.__cause__}") from None
        except (RedisError, OSError) as e:
            raise StateError(f"redis {_safe_url(self.settings.url)}: cannot read: {e}") from None

    async def read(
        self, name: str, *, after: str = NO_ID, max_bytes: int = MAX_LOG_BYTES
    ) -> _Loaded:
        """The log's ``gen`` and entries after ``after`` (all writers'), read in chunks
        between two readings of ``gen``: a compaction in between is read again, so the
        entries are always of the ``gen`` returned.

        Error handling: ``StateError`` for an entry that is not a record or a log over
        ``max_bytes``; ``StorageUnavailable`` when Redis does not answer.
        """
        meta = self.key("meta", name)
        while True:
            gen = await self.run(lambda: self.client.hget(meta, "gen"), f"HGET {meta}")
            loaded = await self._read_entries(name, after, max_bytes, _text(gen) if gen else "0")
            again = await self.run(lambda: self.client.hget(meta, "gen"), f"HGET {meta}")
            if again == gen:
                return loaded
            after = NO_ID  # compacted meanwhile: the ids of before mean nothing now

    async def _read_entries(self, name: str, after: str, max_bytes: int, gen: str) -> _Loaded:
        key = self.key("log", name)
        records: list[tuple[str, Record]] = []
        size, last = 0, after
        while True:
            start = f"({last}" if last != NO_ID else "-"
            entries = await self.run(
                functools.partial(self.client.xrange, key, start, "+", count=READ_CHUNK),
                f"XRANGE {key}",
            )
            for entry in entries:
                last = _text(entry.identifier)
                body = entry.field_values.get(b"r", b"")
                size += len(body)
                if size > max_bytes:
                    raise StateError(f"redis {key}: over {max_bytes} bytes of records: compact it")
                writer = _text(entry.field_values.get(b"w", b""))
                records.append((writer, _decoded(body, key, last)))
            if len(entries) < READ_CHUNK:
                return _Loaded(records, gen, last, size)

    # -- members: which writers still run (proxy.store.shared) ------------------------------

    async def beat(self, member: str, ttl: float) -> None:
        """Say ``member`` runs, for ``ttl`` seconds (``<prefix>alive:<member>``).

        Error handling: ``StorageUnavailable`` when Redis does not answer.
        """
        key, ms = self.key("alive", member), max(1, int(ttl * 1000))
        await self.run(lambda: self.client.set(key, b"1", px=ms), f"SET {key}")

    async def alive(self, member: str) -> bool:
        """Whether ``member``'s last :meth:`beat` has not run out.

        Error handling: ``StorageUnavailable`` when Redis does not answer.
        """
        key = self.key("alive", member)
        return bool(await self.run(lambda: self.client.exists([key]), f"EXISTS {key}"))

    async def leave(self, member: str) -> None:
        """``member`` stops (its work may be taken over at once).

        Error handling: ``StorageUnavailable`` when Redis does not answer.
        """
        key = self.key("alive", member)
        await self.run(lambda: self.client.delete([key]), f"DEL {key}")

    def opener(self, state_dir: Path, name: str, timeout: float) -> tuple[RedisLog, list[Record]]:
        """:func:`proxy.store.open_store_log`'s way of opening on Redis (``state_dir``
        unused: the log lives in Redis)."""
        return self.open(name, timeout=timeout)

    def open(
        self, name: str, *, timeout: float | None = None, max_bytes: int = MAX_LOG_BYTES
    ) -> tuple[RedisLog, list[Record]]:
        """The log ``name`` and its records to replay (read by :meth:`load`).

        Error handling: ``StateError`` if ``name`` is opened twice in one process.
        """
        if name in self._opened:
            raise StateError(f"redis log {name!r} opened twice")
        self._opened.add(name)
        loaded = self._loaded.pop(name, None) or _Loaded([], "0", NO_ID, 0)
        records = [record for _, record in loaded.entries]
        redis_log = RedisLog(self, name, loaded, timeout=timeout or self.timeout)
        redis_log.max_bytes = max_bytes
        return redis_log, records


@contextlib.asynccontextmanager
async def open_redis_store(
    settings: StoreSettings,
    *,
    timeout: float,  # noqa: ASYNC109  (each command's bound)
) -> AsyncIterator[RedisStore]:
    """Connect to ``settings.url`` and read every log; the store, until the block ends.

    Error handling: ``StateError`` when Redis cannot be reached or a log cannot be
    replayed (the CLI exits 3); the password is never in a message.
    """
    try:
        async with connect(settings, timeout) as client:
            store = RedisStore(client, settings, timeout)
            await store.load()
            yield store
    except BaseExceptionGroup as group:  # coredis' task group wraps what the block raised
        leaf = _redis_failure(group)
        if leaf is not None:
            raise StateError(f"redis {where(settings)}: {leaf}") from None
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]  # (nested: a Sentinel client's groups around it)
        if inner is not group:
            raise inner from None
        raise
    except (RedisError, OSError) as e:
        raise StateError(f"redis {where(settings)}: {e}") from None


# -- one log ------------------------------------------------------------------------------------


class RedisLog:
    """A :class:`~proxy.store.Log` on one Redis stream; built by :meth:`RedisStore.open`."""

    def __init__(self, store: RedisStore, name: str, loaded: _Loaded, *, timeout: float) -> None:
        self.store = store
        self.name = name
        self.timeout = timeout
        self.max_bytes = MAX_LOG_BYTES
        self.writer = secrets.token_hex(8)
        # (key, value): flush and compact write only while Redis' ``key`` holds ``value``
        # (the ledger's lease), atomically with the write; else StorageUnavailable.
        self.fence: tuple[str, str] | None = None
        self._key, self._meta = store.key("log", name), store.key("meta", name)
        self._gen, self._seen = loaded.gen, loaded.last_id  # what this log has read
        self._size = self._compacted_size = loaded.size
        self._pending: list[bytes] = []  # records _durable+1 .. _appended
        self._appended = self._durable = 0
        self._lock = trio.Lock()
        self._failed: StateError | None = None
        self._over_bound = False  # the last flush failed at max_bytes: only compaction helps

    # -- the Log protocol ----------------------------------------------------------------------

    def append(self, record: Mapping[str, Json]) -> None:
        """Queue ``record``; durable once a later :meth:`flush` returns.

        Error handling: ``ValueError`` for a record that is not JSON or too large.
        """
        self._pending.append(encode(record))
        self._appended += 1

    async def flush(self) -> None:
        """Return once every record appended so far is in Redis (AOF: see the module).

        Error handling: ``StorageUnavailable`` when Redis does not take them within
        ``timeout`` (they stay queued, and are sent again without duplicates).
        """
        target = self._appended
        if self._durable >= target:
            return
        try:
            with trio.fail_after(self.timeout):
                async with self._lock:
                    if self._durable < target:
                        await self._write_pending()
        except trio.TooSlowError:
            self._fail(StateError(f"redis {self._key}: flush not done within {self.timeout} s"))
            raise StorageUnavailable() from self._failed

    async def _write_pending(self) -> None:
        count = len(self._pending)
        data = sum(len(line) for line in self._pending)
        if self._size + data > self.max_bytes:
            self._fail(StateError(f"redis {self._key} would pass {self.max_bytes} bytes: compact"))
            self._over_bound = True
            raise StorageUnavailable() from self._failed
        args = [self.writer, str(self._durable + 1), self._fence_value, *self._pending]
        try:
            await self.store.script("append", self._keys(), args)
        except StorageUnavailable as e:
            self._fail(e.__cause__)
            raise
        del self._pending[:count]
        self._durable += count
        self._size += data
        self._over_bound = False
        self._recovered()

    async def compact(self, records: Iterable[Mapping[str, Json]]) -> None:
        """Replace the stream with ``records`` (covering everything appended so far).

        Error handling: ``StorageUnavailable`` if Redis does not take it in time; the
        old content and the queue are kept then.
        """
        lines = [encode(r) for r in records]
        covered = self._appended
        try:
            with trio.fail_after(self.timeout * 10):
                async with self._lock:
                    args = [self.writer, str(covered), self._fence_value, *lines]
                    gen, last = await self.store.script("compact", self._keys(), args)
        except trio.TooSlowError:
            raise StorageUnavailable() from StateError(
                f"redis {self._key}: compaction not done in time"
            )
        dropped = max(0, covered - self._durable)
        del self._pending[:dropped]
        self._durable = max(self._durable, covered)
        self._gen, self._seen = _text(gen), _text(last)
        self._size = self._compacted_size = sum(len(line) for line in lines)
        self._over_bound = False
        self._recovered()

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _keys(self) -> list[str]:
        keys = [self._key, self._meta]
        return keys if self.fence is None else [*keys, self.fence[0]]

    @property
    def _fence_value(self) -> str:
        return "" if self.fence is None else self.fence[1]

    @property
    def compaction_due(self) -> bool:
        return self._size > max(2 * self._compacted_size, COMPACT_MIN_BYTES)

    @property
    def over_bound(self) -> bool:
        """The last flush failed at ``max_bytes``: only a compaction lets the log grow."""
        return self._over_bound

    @property
    def unflushed(self) -> int:
        """Records appended and not yet known to be in Redis."""
        return self._appended - self._durable

    # -- what LocalLog's owners call ---------------------------------------------------------

    async def recover(self) -> bool:
        """If failed, send the queue once more; True if the log is not failed."""
        if self._failed is None:
            return True
        with contextlib.suppress(StorageUnavailable):
            if self._pending:
                await self.flush()
            else:
                await self.store.run(self.store.client.ping, "PING")
                self._recovered()
        return self._failed is None

    async def maintain(
        self,
        records: Callable[[], Iterable[Mapping[str, Json]]] | None = None,
        *,
        every: float = RETRY_EVERY,
    ) -> None:
        """Forever: recover a failed log, and compact from ``records()`` when due.

        Error handling: a failed compaction is logged and retried.
        """
        while True:
            await trio.sleep(every)
            if await self.recover() and not self.compaction_due:
                continue
            if records is None or not (self.compaction_due or self._over_bound):
                continue
            try:
                await self.compact(records())
            except StorageUnavailable as e:
                log.warning("the %s log was not compacted: %s", self.name, e.__cause__)

    async def recover_forever(self, every: float = RETRY_EVERY) -> None:
        await self.maintain(None, every=every)

    # -- several instances ---------------------------------------------------------------------

    async def tail(self, *, own: bool = False) -> Tail:
        """Records OTHER writers appended since this log last read (or wrote with
        :meth:`try_append`), in order; the whole content, ``reset``, after another
        writer's compaction.  With ``own``, this writer's entries too (a log written
        only with :meth:`try_append` has applied none it has not seen: after an
        unanswered one, its records may be there).

        Error handling: ``StorageUnavailable`` when Redis does not answer (the log is
        failed then, until :meth:`recover`); ``StateError`` for an entry that is not a
        record.
        """
        entries: list[tuple[str, Record]] = []
        while True:  # one round trip per READ_CHUNK entries (``_TAIL``)
            args = [self._gen, self._seen, READ_CHUNK]
            try:
                answer = await self.store.script_source(_TAIL, [self._key, self._meta], args)
            except StorageUnavailable as e:  # Redis away: nothing could be written either
                self._fail(e.__cause__)
                raise
            if _text(answer[0]) != self._gen:  # compacted: ids of before mean nothing now
                return await self.reread()
            chunk = self._moved_on(answer, 1)
            entries.extend(chunk)
            if len(chunk) < READ_CHUNK:
                return Tail([r for w, r in entries if own or w != self.writer])

    def _moved_on(self, answer: Sequence[Any], start: int) -> list[tuple[str, Record]]:
        """The entries of a script's answer from ``start`` (``_RANGE``'s triples), read:
        this log's position moves past them.

        Error handling: ``StateError`` for an entry that is not a record, or past
        ``max_bytes`` of records.
        """
        entries: list[tuple[str, Record]] = []
        for i in range(start, len(answer) - 2, 3):
            entry_id, writer, body = _text(answer[i]), _text(answer[i + 1]), answer[i + 2]
            body = body if isinstance(body, bytes) else str(body).encode()
            self._size += len(body)
            if self._size > self.max_bytes:
                raise StateError(f"redis {self._key}: over {self.max_bytes} bytes: compact it")
            entries.append((writer, _decoded(body, self._key, entry_id)))
            self._seen = entry_id
        return entries

    async def reread(self) -> Tail:
        """The log's whole content, ``reset``, from now on the position this log has seen
        (a reader that found its replica inconsistent starts again from the truth).

        Error handling: as :meth:`tail`.
        """
        loaded = await self.store.read(self.name)
        self._gen, self._seen = loaded.gen, loaded.last_id
        self._size = loaded.size
        return Tail([record for _, record in loaded.entries], reset=True)

    async def follow(self, every: float = RETRY_EVERY) -> AsyncIterator[Tail]:
        """:meth:`tail` every ``every`` seconds, forever, yielding what is new.

        Error handling: Redis not answering is waited out (logged once per outage).
        """
        down = False
        while True:
            try:
                tail = await self.tail()
            except StorageUnavailable as e:
                if not down:
                    log.warning("following the %s log: %s", self.name, e.__cause__)
                down = True
            else:
                down = False
                if tail.records or tail.reset:
                    yield tail
            await trio.sleep(every)

    async def try_append(self, records: Sequence[Mapping[str, Json]]) -> bool:
        """Append ``records`` only if the stream's last entry is the one this log has
        seen (nobody appended or compacted since); True if appended.  On False, read
        what is new with :meth:`tail`, decide again, and retry.

        Error handling: ``StorageUnavailable`` when Redis does not answer in time (the
        records may or may not be in: :meth:`tail` tells, they carry this writer's id).
        """
        return await self._try_append(records) is None

    async def try_append_or_read(self, records: Sequence[Mapping[str, Json]]) -> Tail | None:
        """:meth:`try_append`, and on a lost race what was missed, read in the same round
        trip: None if appended, else the records appended since this log's position
        (every writer's, this one's too), the position moved past them; ``reset`` with
        the whole content after a compaction.  Up to ``READ_CHUNK`` entries come with
        the answer; more are read as :meth:`tail` does.

        Error handling: as :meth:`try_append`; ``StateError`` for an entry that is not
        a record.
        """
        answer = await self._try_append(records)
        if answer is None:
            return None
        if _text(answer[1]) != self._gen:
            return await self.reread()
        missed = [record for _, record in self._moved_on(answer, 3)]
        if len(missed) == READ_CHUNK:
            missed.extend((await self.tail(own=True)).records)
        return Tail(missed)

    async def _try_append(self, records: Sequence[Mapping[str, Json]]) -> Sequence[Any] | None:
        """Run ``_TRY_APPEND``: None if appended (the position moved past the records),
        else the script's answer (the position unchanged)."""
        lines = [encode(r) for r in records]
        args = [self.writer, self._gen, self._seen, *lines]
        try:
            answer = await self.store.script("try_append", [self._key, self._meta], args)
        except StorageUnavailable as e:
            self._fail(e.__cause__)
            raise
        self._recovered()
        if int(answer[0]) != 1:
            return list(answer)
        self._seen = _text(answer[1])
        self._size += sum(len(line) for line in lines)
        return None

    async def try_compact(self, records: Iterable[Mapping[str, Json]]) -> bool:
        """Replace the stream with ``records`` only if nobody appended or compacted since
        this log last read (the records are a state of exactly what it has seen); True
        if replaced.  Every writer's count is kept (see ``_TRY_COMPACT``).

        Error handling: ``StorageUnavailable`` when Redis does not answer in time (the
        log may or may not be replaced: the next :meth:`tail` says, by ``reset``).
        """
        lines = [encode(r) for r in records]
        args = [self.writer, self._gen, self._seen, *lines]
        answer = await self.store.script("try_compact", [self._key, self._meta], args)
        if int(answer[0]) != 1:
            return False
        self._gen, self._seen = _text(answer[1]), _text(answer[2])
        self._size = self._compacted_size = sum(len(line) for line in lines)
        return True

    async def reread_with_queued(self) -> list[Record]:
        """The whole content, then this writer's records not yet in it: what a replica
        rebuilds from after another writer's compaction (:class:`proxy.store.shared.Replica`).

        Read under the flush lock, so no flush of this writer is half-way: its records
        are either in the content or still queued (a flush whose answer was lost may
        have landed, and its records come twice then: owners' models take that).

        Error handling: ``StorageUnavailable`` when Redis does not answer in time.
        """
        try:
            with trio.fail_after(self.timeout * 10):
                async with self._lock:
                    loaded = await self.store.read(self.name, max_bytes=self.max_bytes)
                    queued = [orjson.loads(line) for line in self._pending]
        except trio.TooSlowError:
            raise StorageUnavailable() from StateError(f"redis {self._key}: read not done in time")
        self._gen, self._seen = loaded.gen, loaded.last_id
        self._size = self._compacted_size = loaded.size
        return [record for _, record in loaded.entries] + queued

    # -- failure -------------------------------------------------------------------------------

    def _fail(self, error: BaseException | None) -> None:
        if self._failed is None:
            self._failed = error if isinstance(error, StateError) else StateError(str(error))
            log.error("the %s log cannot write to Redis (%s); its records wait", self.name, error)

    def _recovered(self) -> None:
        if self._failed is not None:
            self._failed = None
            log.warning("the %s log writes to Redis again", self.name)


# -- helpers ------------------------------------------------------------------------------------


def _decoded(body: bytes, key: str, entry_id: str) -> Record:
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise StateError(f"redis {key}: entry {entry_id} is not a JSON record")
    return record


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redis_failure(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The first Redis or socket error in ``group`` if that is all it holds, else None."""
    matched, rest = group.split((RedisError, OSError))
    if matched is None or rest is not None:
        return None
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf
