"""Recording-ready notices: received from a backend, delivered to the customer, durably.

The rules (the gateway's URL, the JWTs, outcomes, the journal's records) are in
:mod:`proxy.bbb.recording_ready`.  Here:

- :meth:`ReadyQueue.receive`: a backend's POST to the gateway's URL.  Not a URL the gateway
  signed: 403.  A ``signed_parameters`` JWT that does not verify with that backend's secret
  (or names another meeting): 401, as BBB's receivers answer a secret mismatch.  Else the
  delivery is journaled (appended and fsynced under ``state_dir``) before the 200, so a
  restart between receiving and delivering loses nothing; a journal that cannot be
  written answers 503.
- :meth:`ReadyQueue.deliver_forever` (a supervised task): POSTs each queued delivery to the
  customer's URL (SSRF-checked, :func:`proxy.backends.outbound.post_customer_url`), with a
  JWT signed with the customer's secret; done, final or retried with backoff; the end of
  each is recorded.  At start-up the log is replayed and compacted to what is still to
  deliver (attempt counts start again).  The JSON lines file of earlier versions
  (``recording-ready.jsonl``) is converted once, before the log is opened.

Several gateway instances on one Redis (``[store] kind = "redis"``): the log is a
:class:`~proxy.store.shared.Replica` every instance follows.  The instance that received
a notice delivers it (its ``queue`` record names it); every :data:`CLAIM_EVERY` seconds
each instance looks for deliveries whose instance is gone (its member heartbeat ran out,
or it stopped cleanly) and claims them with one compare-and-append ``claim`` record, so
one instance takes each over: each callback is made once (at least once across a crash
between the POST and its ``done``, as on one instance).  The start-up compaction is left
to the shared log's maintenance (other instances are writing).

Error handling: :meth:`receive` never raises for what a backend sends; the delivery loop
logs a failed delivery and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Self

import trio

from proxy.backends.outbound import post_customer_url
from proxy.bbb import recording_ready as rules
from proxy.errors import StateError, StorageUnavailable
from proxy.gateway import Gateway
from proxy.store import Json, Log, Record, open_store_log
from proxy.store.files import os_errors
from proxy.store.local import MAX_LOG_BYTES, create_log, log_path
from proxy.store.shared import Replica

log = logging.getLogger(__name__)
LOG = "recording-ready"
LEGACY = "recording-ready.jsonl"  # before proxy.store: JSON lines, converted at start-up
CONCURRENT = 8  # deliveries in flight at once
CLAIM_EVERY = 1.0  # seconds: several instances, a look for deliveries whose instance is gone
CLAIM_CHUNK = 200  # ids per claim record


class ReadyQueue:
    """The deliveries still to make, their journal, and the task that makes them.

    The analytics callback's queue (:class:`proxy.calls.analytics.AnalyticsQueue`) is
    this one on its own log: it overrides the names below and :meth:`_post`.
    """

    LOG_NAME = LOG
    LEGACY_FILE: str | None = LEGACY
    TALLY = "recording_ready_deliveries"

    def __init__(
        self,
        gw: Gateway,
        store: Log,
        pending: rules.Pending,
        maintain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._gw = gw
        self._pending = pending
        self._log = Replica(
            store,
            self.LOG_NAME,
            apply=self._apply_other,
            clear=self._clear,
            records=lambda: self._pending.records(),
            changed=lambda: self._wake.set(),
            members=True,  # deliveries of a stopped instance are claimed
        )
        self._maintain = maintain  # the local log's recovery and compaction task
        # trio time each delivery THIS instance makes is due
        self._due: dict[str, float] = dict.fromkeys(
            (i for i in pending.deliveries if self._owned(i)), 0.0
        )
        self._attempts: dict[str, int] = {}
        self._busy: set[str] = set()
        self._wake = trio.Event()
        self._slots = trio.CapacityLimiter(CONCURRENT)

    @classmethod
    def open(cls, gw: Gateway) -> Self:
        """Replay the log (blocking: at start-up, before serving).

        Error handling: ``StateError`` naming the file for a log (or legacy file) that
        cannot be read, or a record that is not a recording-ready record (the CLI exits 3).
        """
        state_dir = Path(gw.config.proxy.state_dir)
        if cls.LEGACY_FILE:
            _convert_legacy(state_dir)
        timeout = gw.config.proxy.journal_timeout
        store, records = open_store_log(state_dir, cls.LOG_NAME, timeout=timeout)
        pending = _replayed(records, log_path(state_dir, cls.LOG_NAME))
        gw.stores[cls.LOG_NAME] = store  # /readyz is 503 while it cannot write
        if pending.deliveries:
            log.info("%s: %d deliveries to resume", cls.LOG_NAME, len(pending.deliveries))
        queue = cls(gw, store, pending)
        queue._maintain = queue._log.maintain  # recovery, compaction (and on Redis: following)
        return queue

    @property
    def pending(self) -> list[rules.Delivery]:
        return list(self._pending.deliveries.values())

    @property
    def node(self) -> str:
        """This instance's name in the records ("" on the local store)."""
        return self._log.node

    def _owned(self, delivery_id: str) -> bool:
        """Whether this instance makes that delivery (always, on the local store)."""
        return not self._log.shared or self._pending.owners.get(delivery_id) == self.node

    def _apply_other(self, record: Mapping[str, Json]) -> None:
        self._pending.apply(record)

    def _clear(self) -> None:
        self._pending = rules.Pending()

    # -- receiving ---------------------------------------------------------------------------

    async def receive(self, raw_query: str, body: bytes) -> int:
        """One backend notice; the HTTP status to answer (200, 401, 403 or 503)."""
        backends = {b.id: b for b in self._gw.backends()}
        target = rules.verify_url(raw_query, backends)
        if target is None:
            return 403
        token = rules.form_token(body)
        record_id = None
        if token is not None:
            record_id = rules.backend_claims(token, backends[target.backend_id], target)
        if record_id is None:
            log.warning("recording-ready from %s: JWT refused", target.backend_id)
            return 401
        delivery = rules.Delivery(
            rules.delivery_id(target, record_id, time.time_ns()),
            target.url,
            target.customer,
            target.meeting_id,
            record_id,
        )
        return await self._queued(delivery)

    async def _queued(self, delivery: rules.Delivery) -> int:
        """Queue ``delivery`` durably: 200 once it is on disk, 503 if it cannot be now."""
        record = rules.queue_record(delivery, self.node)
        self._pending.apply(record)
        self._log.append(record)
        self._due[delivery.id] = 0.0
        self._wake.set()
        try:
            await self._log.flush()
        except StorageUnavailable as exc:
            log.error("%s %s not durable yet: %s", self.LOG_NAME, delivery.id, exc.__cause__)
            return 503
        return 200

    # -- delivering --------------------------------------------------------------------------

    async def deliver_forever(self) -> None:
        """Deliver what is due, sleep until the next is due or a notice comes; forever.

        First the log is compacted to what is still to deliver; its maintenance (recovery
        of a failed disk, compaction when due) runs beside.
        """
        if not self._log.shared:
            with contextlib.suppress(StorageUnavailable):  # maintain() compacts later
                await self._log.compact(self._pending.records())
        async with trio.open_nursery() as nursery:
            if self._maintain is not None:
                nursery.start_soon(self._maintain)
            if self._log.shared:
                nursery.start_soon(self._claim_forever)
            while True:
                now = trio.current_time()
                for delivery in self.pending:
                    if not self._owned(delivery.id):
                        continue
                    due = self._due.setdefault(delivery.id, 0.0)
                    if delivery.id not in self._busy and due <= now:
                        self._busy.add(delivery.id)
                        nursery.start_soon(self._deliver, delivery)
                for gone in [i for i in self._due if i not in self._pending.deliveries]:
                    del self._due[gone]  # ended by another instance
                waiting = [t for i, t in self._due.items() if i not in self._busy]
                self._wake = trio.Event()
                with trio.move_on_at(min(waiting, default=now + 3600)):
                    await self._wake.wait()

    async def _claim_forever(self) -> None:
        """Every :data:`CLAIM_EVERY`: claim the deliveries whose instance is gone."""
        while True:
            await trio.sleep(CLAIM_EVERY)
            with contextlib.suppress(StorageUnavailable):  # Redis away: next time
                await self._claim_gone()

    async def _claim_gone(self) -> None:
        by_owner: dict[str, list[str]] = {}
        for delivery_id, owner in self._owners_now().items():
            if owner != self.node:
                by_owner.setdefault(owner, []).append(delivery_id)
        for owner, ids in by_owner.items():
            if owner and await self._log.alive(owner):
                continue
            for start in range(0, len(ids), CLAIM_CHUNK):
                chunk = ids[start : start + CLAIM_CHUNK]
                record = rules.claim_record(chunk, self.node)

                def still(chunk: list[str] = chunk, owner: str = owner) -> bool:
                    return all(self._owners_now().get(i) == owner for i in chunk)

                if await self._log.claim(record, still):
                    log.info("%s: %d deliveries taken over", self.LOG_NAME, len(chunk))
                    self._wake.set()

    def _owners_now(self) -> dict[str, str]:
        """Each delivery still to make and its instance ("" if none is named)."""
        owners = self._pending.owners
        return {i: owners.get(i, "") for i in self._pending.deliveries}

    async def _deliver(self, delivery: rules.Delivery) -> None:
        try:
            async with self._slots:
                how = await self._attempt(delivery)
            if how == "retry":
                return
            await self._finish(delivery, how)
        except Exception:
            log.exception("recording-ready delivery %s failed", delivery.id)
            self._due[delivery.id] = trio.current_time() + rules.backoff(1)
        finally:
            self._busy.discard(delivery.id)
            self._wake.set()

    async def _attempt(self, delivery: rules.Delivery) -> str:
        customer = self._gw.customer(delivery.customer)
        if customer is None:
            log.warning("recording-ready %s: customer %s is gone", delivery.id, delivery.customer)
            return "final"
        how = rules.outcome(await self._post(delivery, customer.secrets[0]))
        if how != "retry":
            return how
        attempts = self._attempts.get(delivery.id, 0) + 1
        if attempts >= rules.MAX_ATTEMPTS:
            log.warning("recording-ready %s: giving up after %d attempts", delivery.id, attempts)
            return "gave-up"
        self._attempts[delivery.id] = attempts
        self._due[delivery.id] = trio.current_time() + rules.backoff(attempts)
        self._gw.tally(self.TALLY, "retry")
        return "retry"

    async def _post(self, delivery: rules.Delivery, secret: str) -> int | None:
        """POST one delivery as BBB would; the status (0: no answer, None: may not call)."""
        form = rules.customer_form(delivery, secret)
        allow = self._gw.config.proxy.allow_private_callbacks
        return await post_customer_url(self._gw.outbound, delivery.url, form, allow)

    async def _finish(self, delivery: rules.Delivery, how: str) -> None:
        """The delivery ended: record it (written once the log can, if it cannot now)."""
        record = rules.done_record(delivery.id, how)
        self._pending.apply(record)
        self._log.append(record)
        try:
            await self._log.flush()
        except StorageUnavailable as exc:
            log.error("recording-ready %s: end not durable yet: %s", delivery.id, exc.__cause__)
        self._due.pop(delivery.id, None)
        self._attempts.pop(delivery.id, None)
        log.info("recording-ready %s: %s", delivery.id, how)
        self._gw.tally(self.TALLY, how)


def _replayed(records: list[Record], path: Path) -> rules.Pending:
    pending = rules.Pending()
    for number, record in enumerate(records, 1):
        try:
            pending.apply(record)
        except StateError as e:
            raise StateError(f"{path}: record {number}: {e}") from None
    return pending


def _convert_legacy(state_dir: Path) -> None:
    """Turn ``recording-ready.jsonl`` into the log (once), then remove it (blocking).

    A crash after the log is written and before the old file is removed leaves both:
    the log wins, and the old file is removed then.
    """
    legacy = state_dir / LEGACY
    with os_errors("read", legacy):
        if not legacy.exists():
            return
        if not log_path(state_dir, LOG).exists():
            with legacy.open("rb") as f:
                data = f.read(MAX_LOG_BYTES + 1)
            if len(data) > MAX_LOG_BYTES:
                raise StateError(f"{legacy}: over {MAX_LOG_BYTES} bytes")
            pending = rules.Pending.from_legacy(data.splitlines())
            if pending.skipped:
                log.warning("%s: %d unreadable records skipped", legacy, pending.skipped)
            create_log(state_dir, LOG, pending.records())
            log.info("%s converted to %s", legacy, log_path(state_dir, LOG))
        legacy.unlink()
