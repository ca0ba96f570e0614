"""The operator API: bearer token, drain/disable, and no secret in any answer."""

from __future__ import annotations

import orjson

from tests.harness import BACKEND_SECRET, SECRETS, StackFactory, text

TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_admin_needs_the_token(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"admin_token": TOKEN})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = await stack.http.get(f"{stack.url}/admin/v1/backends", headers=headers)
        assert response.status_code == 404
    off = await make_stack()
    response = await off.http.get(f"{off.url}/admin/v1/backends", headers=AUTH)
    assert response.status_code == 404


async def test_admin_lists_without_secrets(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"admin_token": TOKEN})
    await stack.create("room-1", maxParticipants="3")
    bodies = []
    for what in ("backends", "customers", "meetings", "meetings?customer=acme"):
        response = await stack.http.get(f"{stack.url}/admin/v1/{what}", headers=AUTH)
        assert response.status_code == 200
        bodies.append(response.text)
    for secret in [*SECRETS.values(), BACKEND_SECRET, "globex-old", TOKEN]:
        assert all(secret not in body for body in bodies)
    meetings = orjson.loads(bodies[3])
    assert [(m["meeting_id"], m["connections"]) for m in meetings] == [("room-1", 3)]
    customers = {c["id"]: c for c in orjson.loads(bodies[1])}
    assert customers["acme"]["reserved_connections"] == 3
    assert customers["globex"]["secrets"] == 2


async def test_drain_takes_a_backend_out_of_placement(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"admin_token": TOKEN})
    response = await stack.http.patch(
        f"{stack.url}/admin/v1/backends/bbb-1", headers=AUTH, json={"mode": "drain"}
    )
    assert response.status_code == 200
    for i in range(6):
        root = await stack.create(f"room-{i}", maxParticipants="1")
        assert text(root, "returncode") == "SUCCESS"
    assert {r.backend_id for r in stack.gateway.ledger.state} == {"bbb-2"}
    bad = await stack.http.patch(
        f"{stack.url}/admin/v1/backends/bbb-1", headers=AUTH, json={"mode": "sleepy"}
    )
    assert bad.status_code == 400
    listed = orjson.loads(
        (await stack.http.get(f"{stack.url}/admin/v1/backends", headers=AUTH)).text
    )
    assert [(b["id"], b["mode"]) for b in listed] == [("bbb-1", "drain"), ("bbb-2", "active")]
