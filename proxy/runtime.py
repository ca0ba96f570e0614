"""Customers and backends changed at run time, on top of the configuration file; no I/O.

The configuration file seeds the customers and backends; the admin API changes them
while the gateway runs.  How the two combine (docs/decisions.md, "Runtime customers and
backends"):

- a change made at run time is an *override of one field* of one customer or backend,
  kept (in the ``runtime`` log under ``state_dir``) until it is removed;
- the values in force are the file's, with every override on top, field by field.  A
  restart with an edited file applies the file's new values to every field that was not
  changed at run time; a field changed at run time keeps its runtime value.  Setting a
  field to ``null`` (PATCH) drops its override: the file's value applies again;
- a customer or backend *created* at run time has every field from run time and needs no
  file entry; one *deleted* at run time stays deleted (a tombstone), even while the file
  still lists it, until it is created again;
- a backend whose removal was asked while it held meetings is *retiring*: it is drained
  (``mode`` reads ``drain``) until its last meeting is gone, then deleted;
- the overrides of a file entry that is no longer in the file are kept but not used.

:class:`RuntimeState` is the model: :meth:`~RuntimeState.apply` one record (total: a
record it does not know is a :class:`~proxy.errors.StateError`),
:meth:`~RuntimeState.records` the records that rebuild it (what compaction writes).
:func:`merged` combines it with the file into a :class:`Directory`, the customers and
backends in force, with the source of every value.

Records (JSON objects)::

    {"op": "create", "kind": "customer" | "backend", "id": ID, "fields": {...}}
    {"op": "update", "kind": ..., "id": ID, "fields": {...}, "reset": [name, ...]}
    {"op": "delete", "kind": ..., "id": ID}
    {"op": "retire", "kind": "backend", "id": ID}

A customer's ``secrets`` field is a list of ``{"secret": S, "expires_at": T | null}``
(epoch seconds): a rotated-out secret stays valid until its ``expires_at``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.bbb.checksum import SUPPORTED_ALGORITHMS
from proxy.config import (
    BACKEND_MODES,
    Backend,
    Config,
    Customer,
    _bool,
    _http_url,
    _identifier,
    _nonempty,
    _positive,
    _str_list,
    _tags,
)
from proxy.errors import StateError

log = logging.getLogger(__name__)

KINDS = ("customer", "backend")
FILE, RUNTIME = "file", "runtime"
DAY = 86400.0
DEFAULT_GRACE = 7 * DAY  # a rotated-out secret stays valid this long (POST .../secrets)


# -- field checks: the config file's, shared by the admin API and by replay --------------------


def _hosts(value: Any) -> list[str]:
    hosts = [h.lower() for h in _str_list(value)]
    if not all(h and " " not in h for h in hosts):
        raise ValueError("must be a list of host names")
    if len(set(hosts)) != len(hosts):
        raise ValueError("a host appears twice")
    return hosts


def _secrets(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise TypeError("must be a non-empty list")
    checked = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"secret", "expires_at"}:
            raise TypeError("each must be {secret, expires_at}")
        expires = item["expires_at"]
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float)
        ):
            raise TypeError("expires_at must be a number or null")
        checked.append({"secret": _nonempty(item["secret"]), "expires_at": expires})
    return checked


def _algorithm(value: Any) -> str:
    if value not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"must be one of {', '.join(sorted(SUPPORTED_ALGORITHMS))}")
    return str(value)


def _mode(value: Any) -> str:
    if value not in BACKEND_MODES:
        raise ValueError(f"must be one of {', '.join(BACKEND_MODES)}")
    return str(value)


def _url(value: Any) -> str:
    return _http_url(value).rstrip("/")


type Check = Callable[[Any], Any]

CUSTOMER_FIELDS: Mapping[str, Check] = {
    "max_connections": _positive,
    "default_max_participants": _positive,
    "default_duration": _positive,
    "enabled": _bool,
    "hosts": _hosts,
    "secrets": _secrets,
    "default_tags": _tags,
    "required_tags": _tags,
}
BACKEND_FIELDS: Mapping[str, Check] = {
    "url": _url,
    "secret": _nonempty,
    "capacity": _positive,
    "mode": _mode,
    "checksum_algorithm": _algorithm,
    "tags": _tags,
}
FIELDS: Mapping[str, Mapping[str, Check]] = {"customer": CUSTOMER_FIELDS, "backend": BACKEND_FIELDS}
REQUIRED: Mapping[str, tuple[str, ...]] = {
    "customer": ("max_connections", "default_max_participants", "default_duration", "secrets"),
    "backend": ("url", "secret", "capacity"),
}
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "customer": {"enabled": True, "hosts": [], "default_tags": [], "required_tags": []},
    "backend": {"mode": "active", "checksum_algorithm": "sha256", "tags": []},
}


def check_field(kind: str, name: str, value: Any) -> Any:
    """``value`` checked (and normalised) for field ``name`` of a ``kind``.

    Error handling: ``KeyError`` for a field the kind does not have; ``TypeError`` or
    ``ValueError`` (whose text says what is expected) for a wrong value.
    """
    return FIELDS[kind][name](value)


def check_id(value: Any) -> str:
    """An id as the file allows it.  Error handling: ``ValueError``/``TypeError``."""
    return _identifier(value)


# -- the model -------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """What run time says about one customer or backend."""

    fields: dict[str, Any] = field(default_factory=dict)  # overrides, checked
    created: bool = False  # created at run time: every field is here
    deleted: bool = False  # a tombstone: hidden even if the file has it
    retiring: bool = False  # a backend draining towards its removal


class RuntimeState:
    """Every runtime change still in force, by kind and id."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def entry(self, kind: str, entity_id: str) -> Entry | None:
        return self.entries[kind].get(entity_id)

    def apply(self, record: Mapping[str, Any]) -> None:
        """Apply one record.  Error handling: ``StateError`` for a record it does not know."""
        op, kind, entity_id = _head(record)
        entries = self.entries[kind]
        if op == "create":
            fields = _fields(kind, record, "fields", complete=True)
            entries[entity_id] = Entry(fields, created=True)
        elif op == "update":
            current = entries.setdefault(entity_id, Entry())
            current.fields.update(_fields(kind, record, "fields", complete=False))
            reset = _reset(kind, record)
            if current.created and set(reset) & set(REQUIRED[kind]):
                raise StateError(f"runtime record of {kind} {entity_id!r}: resets a required field")
            for name in reset:
                current.fields.pop(name, None)
        elif op == "delete":
            entries[entity_id] = Entry(deleted=True)
        else:  # retire: checked by _head
            entries.setdefault(entity_id, Entry()).retiring = True

    def records(self) -> Iterator[dict[str, Any]]:
        """Records that rebuild this state from nothing, in order."""
        for kind, entries in self.entries.items():
            for entity_id, e in sorted(entries.items()):
                head = {"kind": kind, "id": entity_id}
                if e.deleted:
                    yield {"op": "delete", **head}
                    continue
                if e.created:
                    yield {"op": "create", **head, "fields": dict(e.fields)}
                elif e.fields:
                    yield {"op": "update", **head, "fields": dict(e.fields), "reset": []}
                if e.retiring:
                    yield {"op": "retire", **head}


_OPS = ("create", "update", "delete", "retire")


def _head(record: Mapping[str, Any]) -> tuple[str, str, str]:
    # The messages name op, kind and id only: a record's fields may hold a secret.
    if not isinstance(record, Mapping):
        raise StateError(f"runtime record is not an object but {type(record).__name__}")
    op, kind, entity_id = record.get("op"), record.get("kind"), record.get("id")
    head = f"op={op!r:.20} kind={kind!r:.20} id={entity_id!r:.70}"
    if op not in _OPS or kind not in KINDS or not isinstance(entity_id, str):
        raise StateError(f"unknown runtime record ({head})")
    if op == "retire" and kind != "backend":
        raise StateError(f"only a backend retires ({head})")
    return str(op), str(kind), entity_id


def _fields(kind: str, record: Mapping[str, Any], key: str, *, complete: bool) -> dict[str, Any]:
    given = record.get(key)
    if not isinstance(given, Mapping):
        raise StateError(f"runtime record without {key}: {record.get('id')!r}")
    checked = {}
    for name, value in given.items():
        try:
            checked[name] = check_field(kind, name, value)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(
                f"runtime record of {kind} {record.get('id')!r}: {name}: {exc}"
            ) from None
    missing = [n for n in REQUIRED[kind] if n not in checked] if complete else []
    if missing:
        raise StateError(f"runtime record of {kind} {record.get('id')!r}: {missing[0]} missing")
    return checked


def _reset(kind: str, record: Mapping[str, Any]) -> list[str]:
    names = record.get("reset", [])
    if not isinstance(names, list) or not all(n in FIELDS[kind] for n in names):
        raise StateError(f"runtime record of {kind} {record.get('id')!r}: bad reset")
    return names


# -- combining with the file ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Directory:
    """The customers and backends in force: the file's, with the runtime changes on top."""

    config: Config  # the file's [proxy] and [texts]; customers and backends merged
    sources: Mapping[tuple[str, str], Mapping[str, str]]  # (kind, id) -> field -> file|runtime
    expiries: Mapping[str, Mapping[str, float]]  # customer -> secret -> expires_at
    retiring: frozenset[str] = frozenset()  # backends drained towards removal

    def customer(self, customer_id: str, now: float) -> Customer | None:
        """The customer with only the secrets valid at ``now``."""
        return self._valid(self.config.customer(customer_id), now)

    def customer_for_host(self, host: str, now: float) -> Customer | None:
        return self._valid(self.config.customer_for_host(host), now)

    def _valid(self, customer: Customer | None, now: float) -> Customer | None:
        expiries = self.expiries.get(customer.id) if customer else None
        if customer is None or not expiries:
            return customer
        valid = tuple(s for s in customer.secrets if expiries.get(s, now + 1) > now)
        return customer if valid == customer.secrets else replace(customer, secrets=valid)

    def source(self, kind: str, entity_id: str) -> Mapping[str, str]:
        return self.sources.get((kind, entity_id), {})


def merged(file: Config, state: RuntimeState) -> Directory:
    """The file's customers and backends with ``state`` on top (rules: module docstring).

    Error handling: ``ValueError`` naming the conflict when two customers claim one host
    name through run time (the admin API checks each change before it is kept).  A host
    claimed by run time that a customer still has *from the file* is taken from that
    customer, with a warning: run time wins, so a restart never fails on it.
    """
    sources: dict[tuple[str, str], dict[str, str]] = {}
    backends = [_backend(v) for v in _combine("backend", _file_backends(file), state, sources)]
    raw_customers = _combine("customer", _file_customers(file), state, sources)
    customers = _claim_hosts(raw_customers, sources)
    retiring = frozenset(b.id for b in backends if _retiring(state, b.id))
    backends = [replace(b, mode="drain") if b.id in retiring else b for b in backends]
    config = replace(file, backends=tuple(backends), customers=tuple(map(_customer, customers)))
    expiries = {
        c["id"]: {s["secret"]: s["expires_at"] for s in c["secrets"] if s["expires_at"]}
        for c in customers
    }
    return Directory(config, sources, {k: v for k, v in expiries.items() if v}, retiring)


def _retiring(state: RuntimeState, backend_id: str) -> bool:
    entry = state.entry("backend", backend_id)
    return entry is not None and entry.retiring


def _combine(
    kind: str,
    from_file: dict[str, dict[str, Any]],
    state: RuntimeState,
    sources: dict[tuple[str, str], dict[str, str]],
) -> list[dict[str, Any]]:
    """Each entity in force as a dict of fields, in file order then creation order."""
    out = []
    ids = list(from_file) + sorted(set(state.entries[kind]) - set(from_file))
    for entity_id in ids:
        entry = state.entry(kind, entity_id)
        if entry is not None and entry.deleted:
            continue
        if entry is not None and entry.created:
            values = {**DEFAULTS[kind], **entry.fields}
            where = dict.fromkeys(values, RUNTIME)
        elif entity_id in from_file:
            overrides = entry.fields if entry is not None else {}
            values = {**from_file[entity_id], **overrides}
            where = {n: RUNTIME if n in overrides else FILE for n in values}
        else:
            continue  # overrides of an entry the file no longer has: kept, not used
        sources[(kind, entity_id)] = where
        out.append({"id": entity_id, **values})
    return out


def _claim_hosts(
    customers: list[dict[str, Any]], sources: Mapping[tuple[str, str], Mapping[str, str]]
) -> list[dict[str, Any]]:
    claimed: dict[str, str] = {}
    for c in customers:
        if sources[("customer", c["id"])].get("hosts") == RUNTIME:
            for host in c["hosts"]:
                if claimed.setdefault(host, c["id"]) != c["id"]:
                    raise ValueError(f"host {host} belongs to customer {claimed[host]}")
    fixed = []
    for c in customers:
        if sources[("customer", c["id"])].get("hosts") != RUNTIME:
            taken = [h for h in c["hosts"] if claimed.get(h, c["id"]) != c["id"]]
            if taken:
                log.warning("customer %s: hosts %s now belong to others", c["id"], taken)
                c = {**c, "hosts": [h for h in c["hosts"] if h not in taken]}
        fixed.append(c)
    return fixed


def _file_customers(file: Config) -> dict[str, dict[str, Any]]:
    return {c.id: _customer_values(c, {}) for c in file.customers}


def _customer_values(c: Customer, expiries: Mapping[str, float]) -> dict[str, Any]:
    return {
        "max_connections": c.max_connections,
        "default_max_participants": c.default_max_participants,
        "default_duration": c.default_duration,
        "enabled": c.enabled,
        "hosts": list(c.hosts),
        "secrets": [{"secret": s, "expires_at": expiries.get(s)} for s in c.secrets],
        "default_tags": list(c.default_tags),
        "required_tags": list(c.required_tags),
    }


def _file_backends(file: Config) -> dict[str, dict[str, Any]]:
    return {b.id: {k: v for k, v in _backend_raw(b).items() if k != "id"} for b in file.backends}


def _backend_raw(b: Backend) -> dict[str, Any]:
    return {
        "id": b.id,
        "url": b.url,
        "secret": b.secret,
        "capacity": b.capacity,
        "mode": b.mode,
        "checksum_algorithm": b.checksum_algorithm,
        "tags": list(b.tags),
    }


def _backend(values: Mapping[str, Any]) -> Backend:
    return Backend(**{**values, "tags": tuple(values.get("tags", ()))})


def _customer(values: Mapping[str, Any]) -> Customer:
    return Customer(
        id=values["id"],
        secrets=tuple(s["secret"] for s in values["secrets"]),
        max_connections=values["max_connections"],
        default_max_participants=values["default_max_participants"],
        default_duration=values["default_duration"],
        enabled=values["enabled"],
        hosts=tuple(values["hosts"]),
        default_tags=tuple(values.get("default_tags", ())),
        required_tags=tuple(values.get("required_tags", ())),
    )


def rotated(
    secrets: list[dict[str, Any]], new: str, now: float, grace: float
) -> list[dict[str, Any]]:
    """A customer's secrets after rotating in ``new``: the others valid ``grace`` more
    seconds at most (an earlier expiry is kept), the expired ones dropped."""
    kept = [
        {"secret": s["secret"], "expires_at": min(s["expires_at"] or now + grace, now + grace)}
        for s in secrets
        if (s["expires_at"] is None or s["expires_at"] > now) and s["secret"] != new
    ]
    return [{"secret": new, "expires_at": None}, *kept]


def customer_fields(directory: Directory, customer_id: str) -> dict[str, Any] | None:
    """A customer's fields as runtime records hold them (secrets with their expiries)."""
    c = directory.config.customer(customer_id)
    return None if c is None else _customer_values(c, directory.expiries.get(customer_id, {}))
