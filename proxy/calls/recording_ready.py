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
  each is journaled.  At start-up the journal is replayed and rewritten with only what is
  still to deliver (attempt counts start again).

Error handling: :meth:`receive` never raises for what a backend sends; the delivery loop
logs a failed delivery and goes on.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import trio

from proxy.backends.outbound import post_customer_url
from proxy.bbb import recording_ready as rules
from proxy.gateway import Gateway

log = logging.getLogger(__name__)
JOURNAL = "recording-ready.jsonl"
CONCURRENT = 8  # deliveries in flight at once


class ReadyQueue:
    """The deliveries still to make, their journal, and the task that makes them."""

    def __init__(self, gw: Gateway, path: Path, pending: rules.Pending) -> None:
        self._gw = gw
        self._path = path
        self._pending = pending
        self._due: dict[str, float] = dict.fromkeys(pending.deliveries, 0.0)  # trio time
        self._attempts: dict[str, int] = {}
        self._busy: set[str] = set()
        self._write = trio.Lock()
        self._wake = trio.Event()
        self._slots = trio.CapacityLimiter(CONCURRENT)

    @classmethod
    def open(cls, gw: Gateway) -> ReadyQueue:
        """Replay and compact the journal (blocking: at start-up, before serving)."""
        path = Path(gw.config.proxy.state_dir) / JOURNAL
        try:
            lines = path.read_bytes().splitlines() if path.exists() else []
        except OSError as exc:  # the ledger's own checks decide whether the gateway starts
            log.error("recording-ready journal %s unreadable: %s", path, exc)
            lines = []
        pending = rules.Pending.replayed(lines)
        if pending.skipped:
            log.warning("recording-ready journal: %d unreadable records skipped", pending.skipped)
        if lines:
            content = b"".join(rules.queue_record(d) for d in pending.deliveries.values())
            try:
                _rewrite(path, content)
            except OSError as exc:
                log.error("recording-ready journal %s not compacted: %s", path, exc)
        if pending.deliveries:
            log.info("recording-ready: %d deliveries to resume", len(pending.deliveries))
        return cls(gw, path, pending)

    @property
    def pending(self) -> list[rules.Delivery]:
        return list(self._pending.deliveries.values())

    # -- receiving ---------------------------------------------------------------------------

    async def receive(self, raw_query: str, body: bytes) -> int:
        """One backend notice; the HTTP status to answer (200, 401, 403 or 503)."""
        backends = {b.id: b for b in self._gw.config.backends}
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
        try:
            await self._append(rules.queue_record(delivery))
        except OSError as exc:
            log.error("recording-ready for %s not durable: %s", record_id, exc)
            return 503
        self._pending.deliveries[delivery.id] = delivery
        self._due[delivery.id] = 0.0
        self._wake.set()
        return 200

    async def _append(self, record: bytes) -> None:
        async with self._write:
            await trio.to_thread.run_sync(_append_synced, self._path, record)

    # -- delivering --------------------------------------------------------------------------

    async def deliver_forever(self) -> None:
        """Deliver what is due, sleep until the next is due or a notice comes; forever."""
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for delivery in self.pending:
                    due = self._due.get(delivery.id, 0.0)
                    if delivery.id not in self._busy and due <= now:
                        self._busy.add(delivery.id)
                        nursery.start_soon(self._deliver, delivery)
                waiting = [t for i, t in self._due.items() if i not in self._busy]
                self._wake = trio.Event()
                with trio.move_on_at(min(waiting, default=now + 3600)):
                    await self._wake.wait()

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
        customer = self._gw.config.customer(delivery.customer)
        if customer is None:
            log.warning("recording-ready %s: customer %s is gone", delivery.id, delivery.customer)
            return "final"
        form = rules.customer_form(delivery, customer.secrets[0])
        allow = self._gw.config.proxy.allow_private_callbacks
        how = rules.outcome(await post_customer_url(self._gw.outbound, delivery.url, form, allow))
        if how != "retry":
            return how
        attempts = self._attempts.get(delivery.id, 0) + 1
        if attempts >= rules.MAX_ATTEMPTS:
            log.warning("recording-ready %s: giving up after %d attempts", delivery.id, attempts)
            return "gave-up"
        self._attempts[delivery.id] = attempts
        self._due[delivery.id] = trio.current_time() + rules.backoff(attempts)
        return "retry"

    async def _finish(self, delivery: rules.Delivery, how: str) -> None:
        """The delivery ended: journal it (a failed write means it is made again later)."""
        try:
            await self._append(rules.done_record(delivery.id, how))
        except OSError as exc:
            log.error("recording-ready %s: end not journaled: %s", delivery.id, exc)
        self._pending.deliveries.pop(delivery.id, None)
        self._due.pop(delivery.id, None)
        self._attempts.pop(delivery.id, None)
        log.info("recording-ready %s: %s", delivery.id, how)


def _append_synced(path: Path, record: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _write_all(fd, record)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _rewrite(path: Path, content: bytes) -> None:
    """Replace the journal with ``content``, atomically and durably."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
