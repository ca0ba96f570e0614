"""The admin API ``/admin/v1`` over real sockets: every endpoint, bad tokens, bad input of
every field, unknown ids, and each change seen in what the BBB API does next."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import trio
from lxml import etree

from proxy import runtime_service
from proxy.bbb.checksum import signed_query
from proxy.errors import StorageUnavailable
from proxy.ledger.service import Ledger
from proxy.runtime import DEFAULT_GRACE
from proxy.simulator import Simulator, serve_simulator
from tests.harness import (
    BACKEND_SECRET,
    SECRETS,
    Stack,
    StackFactory,
    free_port,
    text,
    wait_until,
)

TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = [
    ("GET", "customers"),
    ("POST", "customers"),
    ("GET", "customers/acme"),
    ("PATCH", "customers/acme"),
    ("DELETE", "customers/acme"),
    ("POST", "customers/acme/secrets"),
    ("GET", "customers/acme/credentials"),
    ("GET", "customers/acme/timeline"),
    ("GET", "backends"),
    ("POST", "backends"),
    ("GET", "backends/bbb-1"),
    ("PATCH", "backends/bbb-1"),
    ("DELETE", "backends/bbb-1"),
    ("GET", "meetings"),
    ("GET", "meetings/acme/room-1"),
    ("DELETE", "meetings/acme/room-1"),
    ("GET", "status"),
    ("PUT", "customers"),
    ("GET", "nothing/here"),
]
NEW_CUSTOMER = {
    "id": "initech",
    "max_connections": 6,
    "default_max_participants": 2,
    "default_duration": 30,
}


class Admin:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    async def __call__(
        self, method: str, path: str, body: object = None, *, expect: int = 200
    ) -> Any:
        content = None if body is None else orjson.dumps(body)
        response = await self.stack.http.request(
            method, f"{self.stack.url}/admin/v1/{path}", headers=AUTH, content=content
        )
        assert response.status_code == expect, response.text
        assert response.headers["content-type"] == "application/json"
        return orjson.loads(response.content)


async def admin_stack(make_stack: StackFactory, **options: Any) -> tuple[Stack, Admin]:
    options.setdefault("proxy", {"admin_token": TOKEN})
    stack = await make_stack(**options)
    return stack, Admin(stack)


async def created(stack: Stack, meeting_id: str, customer: str = "acme", **params: str) -> str:
    return text(await stack.create(meeting_id, customer, **params), "returncode")


async def test_a_wrong_or_missing_token_is_404_everywhere(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack)
    await stack.create("room-1")
    bad = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": ""}]
    for method, path in ROUTES:
        for headers in bad:
            response = await stack.http.request(
                method, f"{stack.url}/admin/v1/{path}", headers=headers, content=b"{}"
            )
            assert (response.status_code, response.json()) == (404, {"error": "not found"})
    assert await admin("GET", "meetings/acme/room-1")  # the same paths work with the token
    assert (await admin("PUT", "customers", expect=404))["error"] == "not found"
    off = await make_stack()  # no admin_token: the API is off
    response = await off.http.get(f"{off.url}/admin/v1/customers", headers=AUTH)
    assert response.status_code == 404


# -- customers ---------------------------------------------------------------------------------


async def test_a_new_customer_works_at_once_with_the_secret_shown_once(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack, admin = await admin_stack(make_stack)
    answer = await admin(
        "POST", "customers", {**NEW_CUSTOMER, "hosts": ["BBB.Initech.test"]}, expect=201
    )
    secret = answer["secret"]
    assert len(secret) == 48 and answer["secrets"] == 1 and answer["hosts"] == ["bbb.initech.test"]
    assert set(answer["source"].values()) == {"runtime"}
    stack.secrets["initech"] = secret
    assert await created(stack, "room-1", "initech") == "SUCCESS"
    assert stack.gateway.ledger.get(("initech", "room-1")).connections == 2  # type: ignore[union-attr]
    shown = [await admin("GET", "customers"), await admin("GET", "customers/initech")]
    assert all(secret not in orjson.dumps(s).decode() for s in shown)
    assert secret not in caplog.text
    credentials = await admin("GET", "customers/initech/credentials")
    assert credentials["secrets"] == [{"secret": secret, "expires_at": None}]
    assert credentials["api_url"] == f"{stack.url}/initech/bigbluebutton/api"
    assert credentials["host_api_urls"] == ["http://bbb.initech.test/bigbluebutton/api"]
    query = signed_query("getMeetings", [], secret)
    bound = await stack.http.get(
        f"{stack.url}/bigbluebutton/api/getMeetings?{query}", headers={"Host": "bbb.initech.test"}
    )
    assert "<returncode>SUCCESS</returncode>" in bound.text
    given = await admin(
        "POST", "customers", {**NEW_CUSTOMER, "id": "hooli", "secret": "hooli-secret-1"}, expect=201
    )
    assert given["secret"] == "hooli-secret-1"
    assert (await admin("POST", "customers", NEW_CUSTOMER, expect=409))["field"] == "id"


BAD_CUSTOMER_FIELDS = [
    ("id", None),
    ("id", "Not An Id"),
    ("id", 7),
    ("max_connections", 0),
    ("max_connections", "10"),
    ("max_connections", True),
    ("default_max_participants", -1),
    ("default_duration", 1.5),
    ("enabled", "yes"),
    ("hosts", "bbb.example"),
    ("hosts", ["a.test", "a.test"]),
    ("hosts", ["bbb.globex.test"]),  # another customer's
    ("secret", "short"),
    ("secret", 12345678),
    ("colour", "red"),
]


@pytest.mark.parametrize(("field", "value"), BAD_CUSTOMER_FIELDS)
async def test_bad_customer_input_names_the_field(
    make_stack: StackFactory, field: str, value: object
) -> None:
    _, admin = await admin_stack(make_stack)
    body = (
        {**NEW_CUSTOMER, field: value}
        if value is not None
        else {k: v for k, v in NEW_CUSTOMER.items() if k != field}
    )
    refused = await admin("POST", "customers", body, expect=400)
    assert refused["field"] == field and refused["error"]
    if field not in ("id", "secret"):
        patched = await admin("PATCH", "customers/acme", {field: value or 0}, expect=400)
        assert patched["field"] == field
    assert [c["id"] for c in await admin("GET", "customers")] == ["acme", "globex", "off"]


async def test_bad_bodies_and_unknown_customers(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack)
    for body in (b"not json", b"[1, 2]", b""):
        response = await stack.http.post(
            f"{stack.url}/admin/v1/customers", headers=AUTH, content=body
        )
        assert response.status_code == 400 and response.json()["field"] is None
    for field in ("max_connections", "default_max_participants", "default_duration"):
        partial = {k: v for k, v in NEW_CUSTOMER.items() if k != field}
        assert (await admin("POST", "customers", partial, expect=400))["field"] == field
    assert (await admin("PATCH", "customers/acme", {"id": "x"}, expect=400))["field"] == "id"
    assert (await admin("PATCH", "customers/acme", {"secret": "abcdefgh"}, expect=400))[
        "field"
    ] == "secret"
    assert (await admin("PATCH", "customers/acme", {}, expect=400))["field"] is None
    for method, path in [
        ("GET", "customers/nobody"),
        ("PATCH", "customers/nobody"),
        ("DELETE", "customers/nobody"),
        ("POST", "customers/nobody/secrets"),
        ("GET", "customers/nobody/credentials"),
        ("GET", "customers/nobody/timeline"),
    ]:
        assert (await admin(method, path, {"enabled": False}, expect=404))["field"] == "id"


async def test_a_changed_subscription_applies_to_the_next_create(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack)
    assert await created(stack, "room-1", maxParticipants="5") == "SUCCESS"
    changed = await admin("PATCH", "customers/acme", {"max_connections": 6})
    assert changed["max_connections"] == 6 and changed["source"]["max_connections"] == "runtime"
    root = await stack.create("room-2", maxParticipants="2")
    assert text(root, "messageKey") == "subscriptionExhausted"
    back = await admin("PATCH", "customers/acme", {"max_connections": None})  # the file's 20
    assert back["max_connections"] == 20 and back["source"]["max_connections"] == "file"
    assert await created(stack, "room-2", maxParticipants="2") == "SUCCESS"
    await admin("PATCH", "customers/acme", {"enabled": False})
    assert text(await stack.create("room-3"), "messageKey") == "apiNotEnabled"
    await admin("PATCH", "customers/acme", {"enabled": True, "default_max_participants": 3})
    assert await created(stack, "room-3") == "SUCCESS"
    assert stack.gateway.ledger.get(("acme", "room-3")).connections == 3  # type: ignore[union-attr]


async def test_a_customer_with_meetings_is_not_deleted(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack)
    assert await created(stack, "room-1") == "SUCCESS"
    refused = await admin("DELETE", "customers/acme", expect=409)
    assert refused["field"] == "id" and "1 meetings" in refused["error"]
    await admin("DELETE", "meetings/acme/room-1")
    assert await admin("DELETE", "customers/acme") == {"id": "acme", "removed": True}
    assert text(await stack.create("room-2"), "messageKey") == "checksumError"
    assert (await admin("GET", "customers/acme", expect=404))["field"] == "id"
    again = {**NEW_CUSTOMER, "id": "acme"}
    assert (await admin("POST", "customers", again, expect=201))["source"]["enabled"] == "runtime"
    refused = await admin("PATCH", "customers/acme", {"max_connections": None}, expect=400)
    assert refused["field"] == "max_connections"  # created at run time: no file value in force
    assert await admin("PATCH", "customers/globex", {"max_connections": None}, expect=200)


async def test_a_rotated_secret_keeps_the_old_one_for_the_grace(make_stack: StackFactory) -> None:
    now = [1_000_000.0]
    stack, admin = await admin_stack(make_stack, ledger=Ledger(clock=lambda: now[0]))
    rotated = await admin("POST", "customers/acme/secrets", None, expect=201)
    new = rotated["secret"]
    assert [s["secret"] for s in rotated["secrets"]] == [new, SECRETS["acme"]]
    assert rotated["secrets"][1]["expires_at"] == now[0] + DEFAULT_GRACE
    assert (await admin("GET", "customers/acme"))["secrets"] == 2
    assert await created(stack, "old-1") == "SUCCESS"  # the old secret
    stack.secrets["acme"] = new
    assert await created(stack, "new-1") == "SUCCESS"
    now[0] += DEFAULT_GRACE  # the grace is over
    assert await created(stack, "new-2") == "SUCCESS"
    stack.secrets["acme"] = SECRETS["acme"]
    assert text(await stack.create("old-2"), "messageKey") == "checksumError"
    assert (await admin("GET", "customers/acme"))["secrets"] == 1
    short = await admin(
        "POST", "customers/acme/secrets", {"secret": "acme-third", "grace_seconds": 60}, expect=201
    )
    assert short["secrets"][1] == {"secret": new, "expires_at": now[0] + 60}
    for body, field in [
        ({"grace_seconds": -1}, "grace_seconds"),
        ({"grace_seconds": "7d"}, "grace_seconds"),
        ({"secret": "x"}, "secret"),
        ({"colour": 1}, "colour"),
    ]:
        assert (await admin("POST", "customers/acme/secrets", body, expect=400))["field"] == field


async def test_the_timeline_shows_windows_overtime_and_connections(
    make_stack: StackFactory,
) -> None:
    now = [1_000_000.0]
    stack, admin = await admin_stack(make_stack, ledger=Ledger(clock=lambda: now[0]))
    assert await created(stack, "short", maxParticipants="4", duration="10") == "SUCCESS"
    now[0] += 300
    assert await created(stack, "long", maxParticipants="2", duration="60") == "SUCCESS"
    now[0] += 600  # short is 5 minutes over its window
    timeline = await admin("GET", "customers/acme/timeline")
    assert timeline["reserved_connections"] == 6 and timeline["max_connections"] == 20
    short, long = timeline["meetings"]
    assert (short["meeting_id"], short["overtime"], short["overtime_seconds"]) == (
        "short",
        True,
        300.0,
    )
    assert (long["meeting_id"], long["overtime"]) == ("long", False)
    steps = [(s["at"] - 1_000_000.0, s["held"], s["in_window"]) for s in timeline["connections"]]
    assert steps == [(0, 4, 4), (300, 6, 6), (600, 6, 2), (900, 6, 2), (3900, 6, 0)]


# -- backends ----------------------------------------------------------------------------------


async def test_a_new_backend_takes_meetings(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack, admin = await admin_stack(make_stack, capacity=4)
    extra = Simulator(BACKEND_SECRET, server_name="bbb-3.test", expire_unjoined_minutes=None)
    url = await nursery.start(serve_simulator, extra)
    for i in range(2):
        assert await created(stack, f"fill-{i}", maxParticipants="4") == "SUCCESS"
    assert text(await stack.create("more", maxParticipants="4"), "messageKey") == "noServerCapacity"
    answer = await admin(
        "POST",
        "backends",
        {"id": "bbb-3", "url": url + "/", "secret": BACKEND_SECRET, "capacity": 10},
        expect=201,
    )
    assert (answer["url"], answer["mode"], answer["health"]) == (url, "active", "up")
    assert BACKEND_SECRET not in orjson.dumps(answer).decode()
    assert await created(stack, "more", maxParticipants="4") == "SUCCESS"
    assert stack.gateway.ledger.get(("acme", "more")).backend_id == "bbb-3"  # type: ignore[union-attr]
    assert any(m.meeting_id.endswith("more") for m in extra.meetings.values())
    assert (
        await admin(
            "POST",
            "backends",
            {"id": "bbb-3", "url": url, "secret": "s", "capacity": 1},
            expect=409,
        )
    )["field"] == "id"
    listed = await admin("GET", "backends")
    assert [b["id"] for b in listed] == ["bbb-1", "bbb-2", "bbb-3"]
    assert all(BACKEND_SECRET not in orjson.dumps(b).decode() for b in listed)


async def test_a_new_backend_that_does_not_answer_gets_no_meetings(
    make_stack: StackFactory,
) -> None:
    stack, admin = await admin_stack(make_stack)
    await admin("PATCH", "backends/bbb-1", {"mode": "drain"})
    await admin("PATCH", "backends/bbb-2", {"mode": "drain"})
    dead = f"http://127.0.0.1:{free_port()}/bigbluebutton/api"
    body = {"id": "bbb-3", "url": dead, "secret": "s", "capacity": 100}
    answer = await admin("POST", "backends", body, expect=201)
    assert (answer["health"], answer["accepts_meetings"]) == ("unhealthy", False)
    assert text(await stack.create("room-1"), "messageKey") == "noServerCapacity"


BAD_BACKEND_FIELDS = [
    ("id", None),
    ("id", "BBB 1"),
    ("url", None),
    ("url", "ftp://bbb.example/api"),
    ("url", 7),
    ("secret", None),
    ("secret", ""),
    ("capacity", None),
    ("capacity", 0),
    ("capacity", "100"),
    ("mode", "sleepy"),
    ("checksum_algorithm", "md5"),
    ("weight", 3),
]


@pytest.mark.parametrize(("field", "value"), BAD_BACKEND_FIELDS)
async def test_bad_backend_input_names_the_field(
    make_stack: StackFactory, field: str, value: object
) -> None:
    _, admin = await admin_stack(make_stack)
    good = {
        "id": "bbb-9",
        "url": "http://127.0.0.1:9/bigbluebutton/api",
        "secret": "s",
        "capacity": 5,
    }
    body = (
        {**good, field: value}
        if value is not None
        else {k: v for k, v in good.items() if k != field}
    )
    assert (await admin("POST", "backends", body, expect=400))["field"] == field
    if field != "id" and value is not None:
        assert (await admin("PATCH", "backends/bbb-1", {field: value}, expect=400))[
            "field"
        ] == field
    assert [b["id"] for b in await admin("GET", "backends")] == ["bbb-1", "bbb-2"]


async def test_capacity_and_mode_changes_apply_at_once(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack, capacity=10)
    await admin("PATCH", "backends/bbb-1", {"mode": "drain"})
    changed = await admin("PATCH", "backends/bbb-2", {"capacity": 3})
    assert changed["capacity"] == 3 and changed["source"]["capacity"] == "runtime"
    assert text(await stack.create("big", maxParticipants="4"), "messageKey") == "noServerCapacity"
    assert await created(stack, "small", maxParticipants="3") == "SUCCESS"
    await admin("PATCH", "backends/bbb-1", {"mode": None})  # back to the file's active
    assert await created(stack, "big", maxParticipants="4") == "SUCCESS"
    assert stack.gateway.ledger.get(("acme", "big")).backend_id == "bbb-1"  # type: ignore[union-attr]
    for method in ("GET", "PATCH", "DELETE"):
        assert (await admin(method, "backends/bbb-9", {"capacity": 1}, expect=404))["field"] == "id"
    assert (await admin("PATCH", "backends/bbb-1", {"id": "x"}, expect=400))["field"] == "id"


async def test_a_removed_backend_drains_before_it_goes(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_service, "RETIRE_CHECK", 0.05)
    stack, admin = await admin_stack(make_stack)
    await admin("PATCH", "backends/bbb-2", {"mode": "drain"})
    assert await created(stack, "room-1") == "SUCCESS"  # on bbb-1, the only active one
    await admin("PATCH", "backends/bbb-2", {"mode": "active"})
    answer = await admin("DELETE", "backends/bbb-1", expect=202)
    assert answer == {"id": "bbb-1", "removed": False, "meetings": 1, "mode": "drain"}
    shown = await admin("GET", "backends/bbb-1")
    assert (shown["mode"], shown["removing"]) == ("drain", True)
    assert (await admin("PATCH", "backends/bbb-1", {"mode": "active"}, expect=409))[
        "field"
    ] == "mode"
    assert await created(stack, "room-2") == "SUCCESS"  # a new meeting: not on bbb-1
    assert stack.gateway.ledger.get(("acme", "room-2")).backend_id == "bbb-2"  # type: ignore[union-attr]
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])  # still served
    assert text(info, "returncode") == "SUCCESS"
    await trio.sleep(0.2)
    assert "bbb-1" in stack.gateway.clients  # not dropped under its meeting
    root = await stack.call("end", [("meetingID", "room-1")])
    assert text(root, "returncode") == "SUCCESS"
    await wait_until(lambda: "bbb-1" not in stack.gateway.clients)
    assert [b["id"] for b in await admin("GET", "backends")] == ["bbb-2"]
    assert (await admin("DELETE", "backends/bbb-2", expect=409))["field"] == "id"  # the last one
    assert await created(stack, "room-3") == "SUCCESS"
    assert stack.gateway.ledger.get(("acme", "room-3")).backend_id == "bbb-2"  # type: ignore[union-attr]


async def test_an_empty_backend_is_removed_at_once(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack)
    assert await admin("DELETE", "backends/bbb-1") == {
        "id": "bbb-1",
        "removed": True,
        "meetings": 0,
    }
    assert "bbb-1" not in stack.gateway.clients and "bbb-1" not in stack.gateway.health
    assert stack.gateway.ring.backend_ids == ("bbb-2",)
    for i in range(4):
        root = await stack.create(f"room-{i}", maxParticipants="1")
        assert text(root, "returncode") == "SUCCESS", etree.tostring(root)
    assert {r.backend_id for r in stack.gateway.ledger.state} == {"bbb-2"}
    assert (await admin("GET", "backends/bbb-1", expect=404))["field"] == "id"


# -- meetings and status -----------------------------------------------------------------------


async def test_meetings_listed_shown_and_ended(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack)
    assert await created(stack, "room-1", maxParticipants="3") == "SUCCESS"
    assert await created(stack, "room/2", "globex") == "SUCCESS"
    everything = await admin("GET", "meetings")
    assert sorted(m["meeting_id"] for m in everything) == ["room-1", "room/2"]
    mine = await admin("GET", "meetings?customer=acme")
    assert [(m["meeting_id"], m["connections"]) for m in mine] == [("room-1", 3)]
    backend = mine[0]["backend"]
    on_it = await admin("GET", f"meetings?backend={backend}")
    assert "room-1" in [m["meeting_id"] for m in on_it]
    assert all(m["backend"] == backend for m in on_it)
    assert (await admin("GET", "meetings?customer=nobody", expect=404))["field"] == "customer"
    assert (await admin("GET", "meetings?backend=bbb-9", expect=404))["field"] == "backend"
    shown = await admin("GET", "meetings/globex/room%2F2")
    assert (shown["customer"], shown["meeting_id"]) == ("globex", "room/2")
    assert (await admin("GET", "meetings/acme/nothing", expect=404))["field"] == "meetingID"
    sim, backend_meeting = stack.backend_meeting("acme", "room-1")
    ended = await admin("DELETE", "meetings/acme/room-1")
    assert ended == {"customer": "acme", "meeting_id": "room-1", "ended": True}
    assert sim.meetings[backend_meeting].ended
    assert stack.gateway.ledger.state.customer_used("acme") == 0
    running = await stack.call("isMeetingRunning", [("meetingID", "room-1")])
    assert text(running, "running") == "false"
    assert (await admin("DELETE", "meetings/acme/room-1", expect=404))["field"] == "meetingID"


async def test_status_shows_every_backend_and_totals(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack, capacity=50)
    assert await created(stack, "room-1", maxParticipants="4") == "SUCCESS"
    await admin("PATCH", "backends/bbb-2", {"mode": "drain"})
    document = await admin("GET", "status")
    rows = {b["id"]: b for b in document["backends"]}
    assert rows["bbb-2"]["mode"] == "drain" and not rows["bbb-2"]["accepts_meetings"]
    assert rows["bbb-1"]["health"] == "up" and rows["bbb-1"]["capacity"] == 50
    totals = document["totals"]
    assert (totals["backends"], totals["accepting"], totals["meetings"]) == (2, 1, 1)
    assert (totals["reserved_connections"], totals["capacity"], totals["customers"]) == (4, 100, 3)
    assert document["journal_failed"] is False


async def test_no_answer_but_two_shows_a_secret(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack, admin = await admin_stack(make_stack)
    assert await created(stack, "room-1") == "SUCCESS"
    await admin("POST", "customers/globex/secrets", {"secret": "globex-newest"}, expect=201)
    await admin(
        "POST",
        "backends",
        {
            "id": "bbb-3",
            "url": "http://127.0.0.1:9/bigbluebutton/api",
            "secret": "backend-three",
            "capacity": 1,
        },
        expect=201,
    )
    await admin("PATCH", "backends/bbb-3", {"secret": "backend-three-b"})
    await admin("PATCH", "customers/acme", {"hosts": ["acme.test"]})
    answers = [
        await admin("GET", path)
        for path in (
            "customers",
            "customers/acme",
            "customers/globex",
            "customers/acme/timeline",
            "backends",
            "backends/bbb-3",
            "meetings",
            "meetings/acme/room-1",
            "status",
        )
    ]
    text_of = orjson.dumps(answers).decode() + caplog.text
    for secret in [
        *SECRETS.values(),
        "globex-old",
        "globex-newest",
        BACKEND_SECRET,
        "backend-three",
        TOKEN,
    ]:
        assert secret not in text_of
    assert (
        "globex-newest" in orjson.dumps(await admin("GET", "customers/globex/credentials")).decode()
    )


async def test_a_change_that_cannot_be_made_durable_is_503(make_stack: StackFactory) -> None:
    stack, admin = await admin_stack(make_stack)
    assert stack.gateway.runtime is not None
    store: Any = stack.gateway.runtime.log
    real = store.flush

    async def failing() -> None:
        raise StorageUnavailable()

    store.flush = failing
    refused = await admin("PATCH", "customers/acme", {"max_connections": 2}, expect=503)
    assert "durable" in refused["error"]
    store.flush = real
    assert (await admin("GET", "customers/acme"))["max_connections"] == 2  # kept in memory


async def test_the_monitor_polls_an_added_backend_and_stops_for_a_removed_one(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    quick = {"health": {"interval": 0.1, "timeout": 2}}
    stack, admin = await admin_stack(make_stack, proxy={"admin_token": TOKEN, **quick})
    extra = Simulator(BACKEND_SECRET, server_name="bbb-3.test", expire_unjoined_minutes=None)
    url = await nursery.start(serve_simulator, extra)
    body = {"id": "bbb-3", "url": url, "secret": BACKEND_SECRET, "capacity": 10}
    await admin("POST", "backends", body, expect=201)
    extra.behaviour.mode = "http500"  # the monitor's own polls must see it fail
    await wait_until(lambda: stack.gateway.health["bbb-3"].state.value == "down")
    assert (await admin("GET", "backends/bbb-3"))["health"] == "down"
    extra.behaviour.mode = "ok"
    await wait_until(lambda: stack.gateway.health["bbb-3"].state.value == "up")
    assert extra.requests[-1][0] == "getMeetings"  # the monitor's polls, recorded
    await admin("DELETE", "backends/bbb-3")
    polls = len(extra.requests)
    await trio.sleep(0.5)  # five intervals: a poll task left behind would have asked again
    assert len(extra.requests) == polls
