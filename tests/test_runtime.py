"""The runtime model of customers and backends, how it combines with the file (no I/O),
and the service that keeps it on a log."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import runtime_service
from proxy.config import Config
from proxy.errors import StateError
from proxy.gateway import open_gateway
from proxy.runtime import (
    DEFAULT_GRACE,
    RuntimeState,
    customer_fields,
    merged,
    rotated,
)
from proxy.runtime_service import RuntimeService
from proxy.store import MemoryLog
from tests.harness import config_for

FILE = config_for(["http://127.0.0.1:9/bigbluebutton/api", "http://127.0.0.1:10/bigbluebutton/api"])


def state_of(*records: dict[str, Any]) -> RuntimeState:
    state = RuntimeState()
    for record in records:
        state.apply(record)
    return state


def update(
    kind: str, entity_id: str, reset: list[str] | None = None, **fields: Any
) -> dict[str, Any]:
    return {"op": "update", "kind": kind, "id": entity_id, "fields": fields, "reset": reset or []}


NEW_BACKEND = {
    "op": "create",
    "kind": "backend",
    "id": "bbb-9",
    "fields": {"url": "http://127.0.0.1:11/bigbluebutton/api", "secret": "s9", "capacity": 7},
}
NEW_CUSTOMER = {
    "op": "create",
    "kind": "customer",
    "id": "initech",
    "fields": {
        "max_connections": 4,
        "default_max_participants": 2,
        "default_duration": 30,
        "secrets": [{"secret": "initech-secret", "expires_at": None}],
        "hosts": ["bbb.initech.test"],
    },
}


def test_nothing_at_run_time_is_the_file() -> None:
    directory = merged(FILE, RuntimeState())
    assert directory.config == FILE
    assert set(directory.source("customer", "acme").values()) == {"file"}


def test_an_override_wins_per_field_and_says_so() -> None:
    directory = merged(FILE, state_of(update("customer", "acme", max_connections=3)))
    acme = directory.config.customer("acme")
    assert acme is not None and acme.max_connections == 3
    assert acme.default_duration == 60  # from the file
    assert directory.source("customer", "acme")["max_connections"] == "runtime"
    assert directory.source("customer", "acme")["default_duration"] == "file"


def test_a_restart_with_an_edited_file_keeps_runtime_fields_only() -> None:
    state = state_of(update("customer", "acme", max_connections=3))
    edited = config_for(
        [b.url for b in FILE.backends],
        customers=[
            {
                "id": "acme",
                "secret": "acme-secret",
                "max_connections": 99,  # changed at run time: the runtime value stays
                "default_max_participants": 10,
                "default_duration": 15,  # not changed at run time: the file's new value
            }
        ],
    )
    acme = merged(edited, state).config.customer("acme")
    assert acme is not None and (acme.max_connections, acme.default_duration) == (3, 15)


def test_a_reset_goes_back_to_the_file() -> None:
    state = state_of(
        update("customer", "acme", max_connections=3),
        update("customer", "acme", reset=["max_connections"]),
    )
    acme = merged(FILE, state).config.customer("acme")
    assert acme is not None and acme.max_connections == 20
    assert merged(FILE, state).source("customer", "acme")["max_connections"] == "file"


def test_created_and_deleted_entities() -> None:
    state = state_of(NEW_BACKEND, NEW_CUSTOMER, {"op": "delete", "kind": "customer", "id": "off"})
    directory = merged(FILE, state)
    assert [b.id for b in directory.config.backends] == ["bbb-1", "bbb-2", "bbb-9"]
    assert directory.config.backends[2].mode == "active"
    assert directory.config.customer("off") is None  # a tombstone hides the file's entry
    assert directory.config.customer_for_host("bbb.initech.test") is not None
    assert set(directory.source("backend", "bbb-9").values()) == {"runtime"}


def test_a_retiring_backend_is_drained() -> None:
    directory = merged(FILE, state_of({"op": "retire", "kind": "backend", "id": "bbb-1"}))
    assert directory.retiring == {"bbb-1"}
    assert directory.config.backends[0].mode == "drain"


def test_overrides_of_an_entry_gone_from_the_file_are_not_used() -> None:
    state = state_of(update("backend", "bbb-7", capacity=3))
    assert [b.id for b in merged(FILE, state).config.backends] == ["bbb-1", "bbb-2"]


def test_rotation_keeps_the_old_secret_for_the_grace() -> None:
    directory = merged(FILE, RuntimeState())
    current = customer_fields(directory, "acme")
    assert current is not None
    secrets = rotated(current["secrets"], "acme-next", now=1000.0, grace=DEFAULT_GRACE)
    state = state_of(update("customer", "acme", secrets=secrets))
    after = merged(FILE, state)
    valid_now = after.customer("acme", 1000.0 + DEFAULT_GRACE - 1)
    assert valid_now is not None and valid_now.secrets == ("acme-next", "acme-secret")
    later = after.customer("acme", 1000.0 + DEFAULT_GRACE)
    assert later is not None and later.secrets == ("acme-next",)


def test_a_second_rotation_drops_expired_secrets_and_keeps_earlier_expiries() -> None:
    first = rotated([{"secret": "a", "expires_at": None}], "b", now=0.0, grace=100.0)
    second = rotated(first, "c", now=50.0, grace=1000.0)
    assert second == [
        {"secret": "c", "expires_at": None},
        {"secret": "b", "expires_at": 1050.0},
        {"secret": "a", "expires_at": 100.0},  # its earlier expiry stands
    ]
    assert rotated(second, "d", now=200.0, grace=10.0)[1:] == [
        {"secret": "c", "expires_at": 210.0},
        {"secret": "b", "expires_at": 210.0},
    ]


def test_records_rebuild_the_state() -> None:
    state = state_of(
        NEW_BACKEND,
        update("customer", "acme", max_connections=3, hosts=["a.test"]),
        {"op": "delete", "kind": "customer", "id": "off"},
        {"op": "retire", "kind": "backend", "id": "bbb-2"},
    )
    rebuilt = state_of(*state.records())
    assert merged(FILE, rebuilt) == merged(FILE, state)


def test_runtime_hosts_win_over_the_file() -> None:
    state = state_of(update("customer", "acme", hosts=["bbb.globex.test"]))
    config: Config = merged(FILE, state).config
    assert config.customer_for_host("bbb.globex.test") == config.customer("acme")
    globex = config.customer("globex")
    assert globex is not None and globex.hosts == ()
    clash = state_of(
        update("customer", "acme", hosts=["x.test"]), update("customer", "off", hosts=["x.test"])
    )
    with pytest.raises(ValueError, match=r"x\.test"):
        merged(FILE, clash)


@pytest.mark.parametrize(
    "record",
    [
        {"op": "vanish", "kind": "customer", "id": "acme"},
        {"op": "update", "kind": "tenant", "id": "acme", "fields": {}},
        {"op": "update", "kind": "customer", "id": 7, "fields": {}},
        {"op": "retire", "kind": "customer", "id": "acme"},
        {"op": "update", "kind": "customer", "id": "acme", "fields": {"max_connections": 0}},
        {"op": "update", "kind": "customer", "id": "acme", "fields": {"colour": "red"}},
        {"op": "update", "kind": "customer", "id": "acme", "fields": []},
        {"op": "update", "kind": "customer", "id": "acme", "fields": {}, "reset": ["colour"]},
        {"op": "create", "kind": "backend", "id": "b", "fields": {"url": "http://x"}},
        {"op": "update", "kind": "customer", "id": "acme", "fields": {"secrets": [{"secret": ""}]}},
        {"op": "update", "kind": "backend", "id": "bbb-1", "fields": {"mode": "sleepy"}},
        ["not", "an", "object"],
    ],
)
def test_a_record_it_does_not_know_is_a_state_error(record: Any) -> None:
    with pytest.raises(StateError):
        RuntimeState().apply(record)


def test_a_created_entity_keeps_its_required_fields() -> None:
    state = state_of(NEW_BACKEND)
    with pytest.raises(StateError, match="required"):
        state.apply(update("backend", "bbb-9", reset=["capacity"]))


async def test_the_service_compacts_its_log_to_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_service, "COMPACT_AFTER", 3)
    store = MemoryLog()
    service = RuntimeService(FILE, RuntimeState(), store)
    async with open_gateway(FILE) as gw:
        for size in (3, 4, 5):
            await service.change(gw, update("customer", "acme", max_connections=size), "x")
        await service.change(gw, NEW_BACKEND, "backend_created")
        acme = gw.customer("acme")
        assert acme is not None and acme.max_connections == 5
        assert "bbb-9" in gw.clients and gw.ring.backend_ids[-1] == "bbb-9"
    assert store.compactions == 1
    assert len(store.durable) == 2  # the compacted acme, then the new backend
    replayed = RuntimeState()
    for record in store.replayed():
        replayed.apply(record)
    assert merged(FILE, replayed) == service.directory
    assert gw.tallies[("admin_changes", "backend_created")] == 1


def test_a_state_error_never_shows_a_secret() -> None:
    record = {"op": "vanish", "kind": "backend", "id": "b", "fields": {"secret": "top-secret"}}
    bad_value = {"op": "update", "kind": "backend", "id": "b", "fields": {"secret": "", "x": 1}}
    for bad in (record, bad_value, ["top-secret"]):
        with pytest.raises(StateError) as caught:
            RuntimeState().apply(bad)  # type: ignore[arg-type]
        assert "top-secret" not in str(caught.value)
