"""Runtime changes of customers and backends: checked, applied at once, made durable.

The thin service over :mod:`proxy.runtime`'s model, on a :class:`~proxy.store.Log` named
``runtime`` under ``state_dir``.  :meth:`RuntimeService.change` checks that a record
leaves a consistent directory, applies it in memory, puts the new directory in force in
the gateway (:meth:`~proxy.gateway.Gateway.reconfigure`) and awaits the log's flush
before the operator is answered, as the ledger does for a create.

A backend removed while it holds meetings *retires*: it is drained (no new meeting goes
there) and a supervised task removes it once the ledger pins nothing to it any more, so
no meeting is ever dropped under its users; at start-up the task resumes for every
backend still retiring.

Several gateway instances on one Redis (``[store] kind = "redis"``): the log is a
:class:`~proxy.store.shared.Replica`.  A change is committed in the stream's order
(:meth:`~proxy.store.shared.Replica.commit`: checked on the caught-up state, appended with
compare-and-append, then applied), so every instance applies the same changes in the same
order; each instance follows the others' changes and puts the new directory in force
within the follow interval.  Every instance watches a retiring backend; the first to see
it empty removes it (a second removal changes nothing).

Error handling: :meth:`~RuntimeService.change` raises ``StorageUnavailable`` when the
log cannot write (nothing is changed if it was failed already; a change applied while
the flush then fails stays in force in memory and reaches the disk when the storage
works again, as the ledger's changes do) and ``ValueError`` for a change that would
leave two customers with one host name (nothing is changed).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping
from typing import Any

import trio

from proxy.config import Config
from proxy.errors import StateError, StorageUnavailable
from proxy.gateway import Gateway
from proxy.runtime import Directory, RuntimeState, merged
from proxy.store import Log, open_store_log
from proxy.store.local import log_path
from proxy.store.shared import Replica

log = logging.getLogger(__name__)
COMPACT_AFTER = 200  # records appended before the log is rewritten as the current state
RETIRE_CHECK = 1.0  # seconds between two looks at a retiring backend's meetings


class RuntimeService:
    """The runtime state of customers and backends, with the file it sits on."""

    def __init__(self, file: Config, state: RuntimeState, store: Log) -> None:
        self.file = file
        self.state = state
        self.directory: Directory = merged(file, state)
        self._appended = 0
        self._gw: Gateway | None = None
        self._retiring: set[str] = set()  # backends a task here is removing
        self.replica = Replica(
            store,
            "runtime",
            apply=self._apply_other,
            clear=self._clear,
            records=lambda: self.state.records(),
            changed=self._others_changed,
            compact_when_due=False,  # every COMPACT_AFTER changes, below
        )
        self.log = store  # what /readyz asks (gw.stores["runtime"])

    def trial(self, record: Mapping[str, Any]) -> Directory:
        """The directory ``record`` would give; changes nothing.

        Error handling: ``ValueError`` for a conflict (see the module docstring).
        """
        state = copy.deepcopy(self.state)
        state.apply(record)
        return merged(self.file, state)

    async def change(self, gw: Gateway, record: Mapping[str, Any], label: str) -> Directory:
        """Apply ``record`` now and make it durable (see the module docstring); count it
        under ``label`` (``proxy.metrics`` ``admin_changes``)."""
        if self.log.failed:
            raise StorageUnavailable()
        if self.replica.shared:
            await self.replica.commit(record, lambda: self.trial(record))
            gw.tally("admin_changes", label)
            return await self._counted()
        directory = self.trial(record)
        self.state.apply(record)
        self.log.append(record)
        self.directory = directory
        gw.reconfigure(directory)
        gw.tally("admin_changes", label)
        await self.log.flush()
        return await self._counted()

    async def _counted(self) -> Directory:
        self._appended += 1
        if self._appended >= COMPACT_AFTER:
            await self._compact()
        return self.directory

    def _apply_other(self, record: Mapping[str, Any]) -> None:
        """A record in the stream (another instance's, or this one's committed): applied
        if it leaves a consistent directory (else ``ValueError``: skipped, logged)."""
        self.trial(record)
        self.state.apply(record)

    def _clear(self) -> None:
        self.state = RuntimeState()

    def _others_changed(self) -> None:
        """Put the directory the stream now gives in force."""
        self.directory = merged(self.file, self.state)
        if self._gw is not None:
            self._gw.reconfigure(self.directory)
            for backend_id in sorted(self.directory.retiring - self._retiring):
                self._gw.spawn("retire-backend", self.remove_when_empty, self._gw, backend_id)

    async def _compact(self) -> None:
        with contextlib.suppress(StorageUnavailable):  # tried again after the next change
            await self.replica.compact(list(self.state.records()))
            self._appended = 0

    def start(self, gw: Gateway) -> None:
        """Resume the removal of every backend still retiring (at start-up), and let a
        log that can heal itself (the local one) retry a failed disk."""
        self._gw = gw
        if self.replica.shared or hasattr(self.replica.log, "recover_forever"):
            gw.spawn("runtime-store", self.replica.maintain)  # on Redis: follows the others
        for backend_id in sorted(self.directory.retiring):
            gw.spawn("retire-backend", self.remove_when_empty, gw, backend_id)

    async def remove_when_empty(self, gw: Gateway, backend_id: str) -> None:
        """Delete a retiring backend once the ledger pins no meeting to it (one task per
        backend: a second returns at once)."""
        if backend_id in self._retiring:
            return
        self._retiring.add(backend_id)
        try:
            await self._remove_when_empty(gw, backend_id)
        finally:
            self._retiring.discard(backend_id)

    async def _remove_when_empty(self, gw: Gateway, backend_id: str) -> None:
        while backend_id in self.directory.retiring:
            if not gw.ledger.state.backend_meetings(backend_id):
                log.info("backend %s holds no meeting any more: removing it", backend_id)
                with contextlib.suppress(StorageUnavailable):  # applied, or tried again
                    record = {"op": "delete", "kind": "backend", "id": backend_id}
                    await self.change(gw, record, "backend_deleted")
            await trio.sleep(RETIRE_CHECK)


def open_runtime(file: Config) -> RuntimeService:
    """The runtime state under ``file``'s ``state_dir``, replayed.  Blocking: at start-up.

    Error handling: ``StateError`` naming the file for a log that cannot be read or
    holds a record the model does not know (the CLI exits 3).
    """
    store, records = open_store_log(
        file.proxy.state_dir, "runtime", timeout=file.proxy.journal_timeout
    )
    state = RuntimeState()
    for number, record in enumerate(records, 1):
        try:
            state.apply(record)
        except StateError as exc:
            path = log_path(file.proxy.state_dir, "runtime")
            raise StateError(f"{path}: record {number}: {exc}") from None
    return RuntimeService(file, state, store)
