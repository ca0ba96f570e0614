"""Placement tags (issue 12 §3): the rule's tiers, the ring with tags (hypothesis), the
config and admin fields, and creates over real sockets: preferred, required, required
with no room, a customer's default and required tags."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import cli as cli_module
from proxy.config import from_mapping
from proxy.errors import ConfigError
from proxy.placement import BackendLoad, Ring, TagRule, parse_tags, tiers
from tests.harness import CUSTOMERS, Stack, StackFactory, text
from tests.test_admin_cli import TOKEN as CLI_TOKEN
from tests.test_admin_cli import Cli

TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IDS = ("bbb-1", "bbb-2", "bbb-3", "bbb-4")
TAGS = ("eu", "us", "big")


# -- the rule, without I/O ---------------------------------------------------------------------


def test_parse_tags() -> None:
    assert parse_tags(None) == (frozenset(), False)
    assert parse_tags("") == (frozenset(), False)
    assert parse_tags("!") == (frozenset(), False)  # Scalelite: no tag at all
    assert parse_tags("eu") == (frozenset({"eu"}), False)
    assert parse_tags(" eu ; us !") == (frozenset({"eu", "us"}), True)
    assert parse_tags("eu,us;;") == (frozenset({"eu", "us"}), False)


def test_tiers() -> None:
    tags = {"a": frozenset({"eu"}), "b": frozenset(), "c": frozenset({"us"})}
    assert tiers(TagRule(), tags) == [{"b"}]  # untagged meetings: untagged servers
    assert tiers(TagRule(frozenset({"eu"})), tags) == [{"a"}, {"b"}]
    assert tiers(TagRule(frozenset({"eu"}), strict=True), tags) == [{"a"}]
    assert tiers(TagRule(frozenset({"none"}), strict=True), tags) == [{"b"}]
    assert tiers(TagRule(frozenset({"xx"})), tags) == [{"b"}]
    assert tiers(TagRule(frozenset({"xx"}), strict=True), tags) == []
    # A customer's required tags: only those servers, in every tier.
    assert tiers(TagRule(required=frozenset({"eu", "us"})), tags) == [{"a", "c"}]
    assert tiers(TagRule(frozenset({"us"}), required=frozenset({"eu", "us"})), tags) == [
        {"c"},
        {"a"},
    ]
    assert tiers(TagRule(frozenset({"us"}), required=frozenset({"eu"})), tags) == [{"a"}]


backend_tags = st.fixed_dictionaries(
    {b: st.frozensets(st.sampled_from(TAGS), max_size=2) for b in IDS}
)
loads = st.fixed_dictionaries(
    {
        b: st.builds(
            BackendLoad,
            st.just(b),
            st.integers(1, 20),
            st.integers(0, 25),
            st.booleans(),
            st.booleans(),
        )
        for b in IDS
    }
)
rules = st.builds(
    TagRule,
    st.frozensets(st.sampled_from((*TAGS, "none")), max_size=2),
    st.booleans(),
    st.frozensets(st.sampled_from(TAGS), max_size=2),
)


def _has(tags: frozenset[str], names: frozenset[str]) -> bool:
    return bool(tags & names) or (not tags and "none" in names)


@settings(max_examples=400, deadline=None)
@given(backend_tags, loads, rules, st.integers(1, 12), st.text(max_size=8))
def test_ring_with_tags(
    tags: dict[str, frozenset[str]],
    current: dict[str, BackendLoad],
    rule: TagRule,
    size: int,
    key: str,
) -> None:
    """Never a backend without a required tag, never over capacity or unavailable, and a
    backend with a wanted tag whenever one has room."""
    ring = Ring(IDS, vnodes=8)
    chosen = ring.choose(key, size, current, rule=rule, backend_tags=tags)
    fits = {b for b, load in current.items() if load.available and load.free >= size}
    if rule.required:
        fits = {b for b in fits if _has(tags[b], rule.required)}
    wanted = {b for b in fits if rule.wanted and _has(tags[b], rule.wanted)}
    if chosen is None:
        fallback = fits if rule.required else {b for b in fits if not tags[b]}
        assert not wanted and ((rule.strict and rule.wanted) or not fallback)
        return
    assert chosen in fits
    assert current[chosen].free >= size
    if rule.strict and rule.wanted:
        assert _has(tags[chosen], rule.wanted)
    if wanted:
        assert chosen in wanted
    elif not rule.required:
        assert not tags[chosen]  # the fallback: untagged servers only


def test_ring_without_tags_is_unchanged() -> None:
    ring = Ring(IDS, vnodes=8)
    current = {b: BackendLoad(b, 10, 0, True) for b in IDS}
    untagged = dict.fromkeys(IDS, frozenset[str]())
    for n in range(50):
        key = f"acme/m{n}"
        assert ring.choose(key, 1, current) == ring.choose(key, 1, current, backend_tags=untagged)


# -- configuration -----------------------------------------------------------------------------


def _config(backend: dict[str, Any], customer: dict[str, Any]) -> Any:
    return from_mapping(
        {
            "proxy": {"public_url": "http://gw.test", "state_dir": "unused"},
            "backends": [
                {"id": "b", "url": "http://b.test", "secret": "s", "capacity": 5, **backend}
            ],
            "customers": [{**CUSTOMERS[0], **customer}],
        }
    )


def test_config_tags() -> None:
    config = _config({"tags": ["eu", "big"]}, {"default_tags": ["big"], "required_tags": ["eu"]})
    assert config.backends[0].tags == ("eu", "big")
    assert config.customers[0].default_tags == ("big",)
    assert config.customers[0].required_tags == ("eu",)
    assert _config({}, {}).backends[0].tags == ()
    for bad in (["eu;us"], ["eu", "eu"], "eu", [""], ["a b"]):
        with pytest.raises(ConfigError, match="tags"):
            _config({"tags": bad}, {})
    with pytest.raises(ConfigError, match="required_tags"):
        _config({}, {"required_tags": ["x!"]})


# -- end to end --------------------------------------------------------------------------------


async def _tag(stack: Stack, backend_id: str, tags: list[str]) -> None:
    response = await stack.http.patch(
        f"{stack.url}/admin/v1/backends/{backend_id}", headers=AUTH, json={"tags": tags}
    )
    assert response.status_code == 200, response.text
    assert response.json()["tags"] == tags
    assert response.json()["source"]["tags"] == "runtime"


async def _tagged_stack(make_stack: StackFactory, **options: Any) -> Stack:
    """bbb-1 "eu", bbb-2 "us", bbb-3 untagged."""
    stack = await make_stack(backends=3, proxy={"admin_token": TOKEN}, **options)
    await _tag(stack, "bbb-1", ["eu"])
    await _tag(stack, "bbb-2", ["us", "big"])
    return stack


def _backend_of(stack: Stack, customer: str, meeting_id: str) -> str:
    reservation = stack.gateway.ledger.get((customer, meeting_id))
    assert reservation is not None
    return reservation.backend_id


async def test_preferred_tag_then_untagged(make_stack: StackFactory) -> None:
    customers = [{**CUSTOMERS[0], "max_connections": 100}]
    stack = await _tagged_stack(make_stack, capacity=20, customers=customers)
    for n in range(4):
        root = await stack.create(f"eu-{n}", **{"meta_server-tag": "eu", "maxParticipants": "5"})
        assert text(root, "returncode") == "SUCCESS"
        assert _backend_of(stack, "acme", f"eu-{n}") == "bbb-1"
    # bbb-1 is full: an optional tag falls back to the untagged server, never to "us".
    root = await stack.create("eu-4", **{"meta_server-tag": "eu;asia", "maxParticipants": "5"})
    assert text(root, "returncode") == "SUCCESS"
    assert _backend_of(stack, "acme", "eu-4") == "bbb-3"
    # No tag: the untagged server only.
    for n in range(3):
        await stack.create(f"plain-{n}", maxParticipants="1")
        assert _backend_of(stack, "acme", f"plain-{n}") == "bbb-3"
    # The backend was told the tags, and getMeetingInfo shows them back.
    sim, backend_meeting = stack.backend_meeting("acme", "eu-0")
    assert sim.meetings[backend_meeting].metadata["server-tag"] == "eu"
    info = await stack.call("getMeetingInfo", [("meetingID", "eu-0")])
    assert text(info, "metadata/server-tag") == "eu"


async def test_required_tag_and_no_room(make_stack: StackFactory) -> None:
    stack = await _tagged_stack(make_stack, capacity=10)
    root = await stack.create("big-1", **{"meta_server-tag": "big!", "maxParticipants": "8"})
    assert text(root, "returncode") == "SUCCESS"
    assert _backend_of(stack, "acme", "big-1") == "bbb-2"
    sim, backend_meeting = stack.backend_meeting("acme", "big-1")
    assert sim.meetings[backend_meeting].metadata["server-tag"] == "big"  # without the "!"
    # "us" is full: required, so no fallback to bbb-3 (which has room).
    root = await stack.create("big-2", **{"meta_server-tag": "us;big!", "maxParticipants": "8"})
    assert text(root, "returncode") == "FAILED"
    assert text(root, "messageKey") == "serverTagUnavailable"
    assert text(root, "message") == "There is no available server with the required tag=big;us."
    assert stack.gateway.ledger.get(("acme", "big-2")) is None
    # A tag no server has, required: refused; the same tag optional: the untagged server.
    root = await stack.create("x-1", **{"meta_server-tag": "asia!"})
    assert text(root, "messageKey") == "serverTagUnavailable"
    root = await stack.create("x-2", **{"meta_server-tag": "asia", "maxParticipants": "1"})
    assert text(root, "returncode") == "SUCCESS"
    assert _backend_of(stack, "acme", "x-2") == "bbb-3"
    # "none!" requires an untagged server.
    root = await stack.create("x-3", **{"meta_server-tag": "none!", "maxParticipants": "1"})
    assert text(root, "returncode") == "SUCCESS"
    assert _backend_of(stack, "acme", "x-3") == "bbb-3"


async def test_customer_default_and_required_tags(make_stack: StackFactory) -> None:
    customers = [
        {**CUSTOMERS[0], "default_tags": ["us"]},
        {**CUSTOMERS[1], "required_tags": ["eu"], "max_connections": 100},
    ]
    stack = await _tagged_stack(make_stack, capacity=10, customers=customers)
    # acme's default tag places on bbb-2; its own meta_server-tag wins over the default.
    await stack.create("d-1", maxParticipants="2")
    assert _backend_of(stack, "acme", "d-1") == "bbb-2"
    await stack.create("d-2", **{"meta_server-tag": "eu", "maxParticipants": "2"})
    assert _backend_of(stack, "acme", "d-2") == "bbb-1"
    # globex is EU-only: whatever it asks, its meetings go to an "eu" server ...
    await stack.create("g-1", "globex", maxParticipants="2")
    assert _backend_of(stack, "globex", "g-1") == "bbb-1"
    await stack.create("g-2", "globex", **{"meta_server-tag": "us", "maxParticipants": "2"})
    assert _backend_of(stack, "globex", "g-2") == "bbb-1"
    # ... and with bbb-1 full it is refused, though the others have room.
    root = await stack.create("g-3", "globex", maxParticipants="5")
    assert text(root, "messageKey") == "serverTagUnavailable"
    assert "tag=eu" in text(root, "message")
    # The operator lifts the requirement through the admin API: the untagged server.
    response = await stack.http.patch(
        f"{stack.url}/admin/v1/customers/globex", headers=AUTH, json={"required_tags": []}
    )
    assert response.status_code == 200, response.text
    assert response.json()["required_tags"] == []
    assert response.json()["source"]["required_tags"] == "runtime"
    root = await stack.create("g-3", "globex", maxParticipants="5")
    assert text(root, "returncode") == "SUCCESS"
    assert _backend_of(stack, "globex", "g-3") == "bbb-3"


async def test_admin_refuses_bad_tags(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"admin_token": TOKEN})
    for bad in ("eu", ["eu!"], ["eu", "eu"], [1]):
        response = await stack.http.patch(
            f"{stack.url}/admin/v1/backends/bbb-1", headers=AUTH, json={"tags": bad}
        )
        assert response.status_code == 400, response.text
    response = await stack.http.get(f"{stack.url}/admin/v1/backends/bbb-1", headers=AUTH)
    assert response.json()["tags"] == []
    assert response.json()["source"]["tags"] == "file"


async def test_cli_sets_tags(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_module, "setup_logging", lambda *_: None)
    cli = Cli(await make_stack(proxy={"admin_token": CLI_TOKEN}), capsys)
    await cli("backends", "update", "bbb-1", "--tags", "eu, large")
    shown = await cli.json("backends", "show", "bbb-1")
    assert (shown["tags"], shown["source"]["tags"]) == (["eu", "large"], "runtime")
    assert "eu" in (await cli("backends", "list")).splitlines()[1]
    await cli("customers", "update", "acme", "--required-tags", "eu", "--default-tags", "large")
    shown = await cli.json("customers", "show", "acme")
    assert (shown["required_tags"], shown["default_tags"]) == (["eu"], ["large"])
    root = await cli.stack.create("cli-1", maxParticipants="1")
    assert text(root, "returncode") == "SUCCESS"
    assert _backend_of(cli.stack, "acme", "cli-1") == "bbb-1"
    await cli("backends", "update", "bbb-1", "--tags", "")
    assert (await cli.json("backends", "show", "bbb-1"))["tags"] == []
    assert "tags" in await cli("backends", "update", "bbb-1", "--tags", "a!", expect=1)
    await cli("backends", "update", "bbb-1", "--reset", "tags")
    assert (await cli.json("backends", "show", "bbb-1"))["source"]["tags"] == "file"
