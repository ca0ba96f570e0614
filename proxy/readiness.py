"""Whether the gateway is ready for traffic, and if not, why: the ``/readyz`` document.

Ready means every durable store can write and at least one backend may be given
new meetings.  Each failed check is one reason, named by ``check``:

- ``journal``: the ledger journal cannot write (a write failed, or runs longer than
  ``journal_timeout``): creates and ends answer serverUnavailable;
- ``store``: another durable store (hooks, runtime changes, ...) cannot write;
- ``no_backend``: no backend is both UP and ``active``: every create would be refused.

The document (JSON, also when ready) says every backend's health, mode and whether it
accepts meetings, so a probe or an operator sees a dead backend before it is the last
one.  It names backends and stores, never customers, and holds no secret: ``/readyz``
is open, as load balancers call it.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.gateway import Gateway


@dataclass(frozen=True, slots=True)
class Reason:
    check: str  # journal | store | no_backend
    message: str


@dataclass(frozen=True, slots=True)
class BackendState:
    id: str
    health: str  # up | unhealthy | down
    mode: str  # active | drain | disabled
    accepting: bool


@dataclass(frozen=True, slots=True)
class Readiness:
    reasons: tuple[Reason, ...]
    stores: tuple[tuple[str, bool], ...]  # (name, failed); the ledger journal is "ledger"
    backends: tuple[BackendState, ...]

    @property
    def ready(self) -> bool:
        return not self.reasons

    def document(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "reasons": [{"check": r.check, "message": r.message} for r in self.reasons],
            "stores": {name: "failed" if failed else "ok" for name, failed in self.stores},
            "backends": {
                b.id: {"health": b.health, "mode": b.mode, "accepting": b.accepting}
                for b in self.backends
            },
        }


def judged(stores: tuple[tuple[str, bool], ...], backends: tuple[BackendState, ...]) -> Readiness:
    """The reasons not to be ready, from the stores' and backends' states."""
    reasons = [
        Reason("journal", "the ledger journal cannot write: creates and ends are refused")
        if name == "ledger"
        else Reason("store", f"the {name} store cannot write: its changes are refused")
        for name, failed in stores
        if failed
    ]
    if not any(b.accepting for b in backends):
        down = ", ".join(f"{b.id} {b.health}/{b.mode}" for b in backends)
        reasons.append(Reason("no_backend", f"no backend is up and active ({down})"))
    return Readiness(tuple(reasons), stores, backends)


def readiness(gw: Gateway) -> Readiness:
    others = tuple((name, store.failed) for name, store in sorted(gw.stores.items()))
    stores = (("ledger", gw.ledger.journal.failed), *others)
    backends = tuple(
        BackendState(b.id, gw.health[b.id].state.value, gw.modes[b.id], gw.accepts_meetings(b.id))
        for b in gw.backends()
    )
    return judged(stores, backends)
