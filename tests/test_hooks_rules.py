"""The hooks API's decisions as plain functions, and the hook registry's model and service.

The registry's times run on trio's autojump clock here (its clock is injectable;
the gateway gives it ``time.time``), so expiry is asserted at exact times.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from proxy import config
from proxy.backends.outbound import checked_address
from proxy.bbb import checksum, hooks
from proxy.errors import ConfigError, StateError, StorageUnavailable, ValidationError
from proxy.store import MemoryLog
from proxy.webhooks.registry import Hook, HookRegistry, HookState

URL = "https://lms.example/hook?a=1&b=2"


def refusal(params: list[tuple[str, str]]) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        hooks.create_params(params)
    return caught.value


# -- parameters --------------------------------------------------------------------------------


def test_create_params_normalise_the_event_filter() -> None:
    given = hooks.create_params([("callbackURL", URL), ("eventID", " User-Joined,,user-left ,")])
    assert given == hooks.CreateParams(URL, frozenset({"user-joined", "user-left"}))
    assert hooks.create_params([("callbackURL", URL), ("eventID", " , ")]).event_ids is None
    assert hooks.create_params([("callbackURL", URL)]).event_ids is None


def test_the_first_value_of_a_parameter_counts_as_bbb_webhooks_reads_it() -> None:
    given = hooks.create_params([("callbackURL", URL), ("callbackURL", "ftp://x/")])
    assert given.callback_url == URL


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ([], "missingParamCallbackURL"),
        ([("callbackURL", " ")], "missingParamCallbackURL"),
        ([("callbackURL", "gopher://lms.example/")], "createHookError"),
        ([("callbackURL", "http://lms.example:0/")], "createHookError"),
        ([("callbackURL", "http://lms.example/\n")], "createHookError"),
        ([("callbackURL", "http://" + "a" * 2100)], "createHookError"),
        ([("callbackURL", URL), ("getRaw", "true")], "createHookError"),
        ([("callbackURL", URL), ("getRaw", " True ")], "createHookError"),
        ([("callbackURL", URL), ("getRaw", "yes")], "validationError"),
        ([("callbackURL", URL), ("eventID", "user joined")], "validationError"),
        ([("callbackURL", URL), ("eventID", "-x")], "validationError"),
        ([("callbackURL", URL), ("eventID", "x" * 65)], "validationError"),
        (
            [("callbackURL", URL), ("eventID", ",".join(f"e{i}" for i in range(65)))],
            "validationError",
        ),
    ],
)
def test_create_refusals(params: list[tuple[str, str]], key: str) -> None:
    assert refusal(params).message_key == key


def test_the_callback_url_is_checked_before_get_raw_and_event_id() -> None:
    params = [("getRaw", "true"), ("eventID", "bad id")]
    assert refusal(params).message_key == "missingParamCallbackURL"
    assert refusal([("callbackURL", URL), *params]).message_key == "createHookError"


def test_get_raw_false_and_empty_are_accepted() -> None:
    for value in ("false", "FALSE", ""):
        assert hooks.create_params([("callbackURL", URL), ("getRaw", value)]).callback_url == URL


def test_sixty_four_event_ids_are_accepted() -> None:
    ids = ",".join(f"e{i}" for i in range(64))
    given = hooks.create_params([("callbackURL", URL), ("eventID", ids)]).event_ids
    assert given is not None and len(given) == 64


def test_hook_id_and_meeting_id_rules() -> None:
    assert hooks.hook_id([("hookID", " abc ")]) == "abc"
    with pytest.raises(ValidationError) as missing:
        hooks.hook_id([("hookID", "")])
    assert missing.value.message_key == "missingParamHookID"
    assert hooks.missing_meeting_id().message_key == "missingParamMeetingID"
    assert "hooks for all meetings are not offered" in hooks.missing_meeting_id().message
    for fine in ("room 1 é", "tab\tand\xa0nbsp", "emoji \U0001f600"):
        assert hooks.checked_meeting_id(fine) == fine
        assert etree.fromstring(f"<m>{hooks.cdata(fine)}</m>").text == fine
    for bad in ("room\x01", "a\x0bb", "\ufffe", "x\udc80"):
        with pytest.raises(ValidationError):
            hooks.checked_meeting_id(bad)
    assert hooks.missing_hook().message_key == "destroyMissingHook"


# -- answers -----------------------------------------------------------------------------------


def hook(**fields: Any) -> Hook:
    base: dict[str, Any] = {
        "id": "h1",
        "customer": "acme",
        "meeting_id": "room",
        "callback_url": URL,
        "event_ids": None,
        "algorithm": "sha1",
        "created_at": 100.0,
    }
    return Hook(**(base | fields))


def test_answers_are_bbb_webhooks_xml() -> None:
    assert hooks.created("h1") == (
        "<response><returncode>SUCCESS</returncode><hookID>h1</hookID>"
        "<permanentHook>false</permanentHook><rawData>false</rawData></response>"
    )
    assert hooks.duplicated("h1") == (
        "<response><returncode>SUCCESS</returncode><hookID>h1</hookID>"
        "<messageKey>duplicateWarning</messageKey>"
        "<message>There is already a hook for this callback URL.</message></response>"
    )
    assert hooks.destroyed() == (
        "<response><returncode>SUCCESS</returncode><removed>true</removed></response>"
    )
    assert (
        hooks.listed([]) == "<response><returncode>SUCCESS</returncode><hooks></hooks></response>"
    )


def test_list_writes_cdata_that_survives_any_text() -> None:
    tricky = "https://lms.example/x?a=]]>&b=<c>"
    listed = hooks.listed(
        [hook(callback_url=tricky, meeting_id="a]]>b", event_ids=frozenset({"b", "a"}))]
    )
    assert (
        "<callbackURL><![CDATA[https://lms.example/x?a=]]]]><![CDATA[>&b=<c>]]></callbackURL>"
        in listed
    )
    root = etree.fromstring(listed)
    assert root.findtext("hooks/hook/callbackURL") == tricky
    assert root.findtext("hooks/hook/meetingID") == "a]]>b"
    assert root.findtext("hooks/hook/eventID") == "a,b"
    assert root.findtext("hooks/hook/hookID") == "h1"


def test_algorithm_of_a_checksum_by_its_length() -> None:
    for algorithm in ("sha1", "sha256", "sha384", "sha512"):
        query = checksum.signed_query("hooks/create", [("a", "1")], "s", algorithm)
        assert checksum.algorithm_of(query) == algorithm
        body_only = [("a", "1"), ("checksum", query.split("checksum=")[1])]
        assert checksum.algorithm_of("", body_only) == algorithm
    assert checksum.algorithm_of("a=1") == "sha1"  # none (never for a verified request)


# -- the registry's model ----------------------------------------------------------------------


def test_records_replay_to_the_same_state() -> None:
    state = HookState()
    state.apply(hook(id="a", event_ids=frozenset({"user-left"})).record())
    state.apply(hook(id="b", meeting_id="other").record())
    state.apply(hook(id="c", customer="globex").record())
    state.apply({"type": "ended", "customer": "acme", "meeting_id": "room", "at": 5})
    state.apply({"type": "destroyed", "id": "c"})
    state.apply({"type": "destroyed", "id": "never-was"})
    again = HookState()
    for record in state.records():
        again.apply(record)
    assert again.hooks == state.hooks
    assert state.hooks["a"].ended_at == 5.0 and state.hooks["b"].ended_at is None
    assert [h.id for h in state.of("acme")] == ["a", "b"]
    assert again.ended == state.ended == {("acme", "room"): 5.0}
    state.apply({"type": "started", "customer": "acme", "meeting_id": "room"})
    assert state.hooks["a"].ended_at is None and not state.ended


@pytest.mark.parametrize(
    "record",
    [
        {"type": "hooked"},
        {},
        {"type": 3},
        {"type": "destroyed"},
        {"type": "ended", "customer": "acme", "meeting_id": "m", "at": "soon"},
        {"type": "ended", "customer": "acme", "meeting_id": "m", "at": True},
        {"type": "started", "customer": None, "meeting_id": "m"},
        hook().record() | {"event_ids": "user-joined"},
        hook().record() | {"event_ids": [1]},
        hook().record() | {"created_at": None},
        hook().record() | {"ended_at": "x"},
        {k: v for k, v in hook().record().items() if k != "callback_url"},
    ],
)
def test_a_record_that_is_not_a_hooks_record_is_a_state_error(record: dict[str, Any]) -> None:
    with pytest.raises(StateError, match="hooks"):
        HookState().apply(record)


def test_wants_is_case_insensitive_and_none_is_everything() -> None:
    assert hook().wants("anything")
    filtered = hook(event_ids=frozenset({"user-joined"}))
    assert filtered.wants("User-Joined") and not filtered.wants("user-left")


# -- the registry's service --------------------------------------------------------------------


def registry(log: MemoryLog | None = None, **kw: Any) -> HookRegistry:
    return HookRegistry(log or MemoryLog(), clock=trio.current_time, **kw)


async def test_expiry_at_the_exact_end_of_the_grace(autojump_clock: trio.testing.MockClock) -> None:
    hooks_ = registry(grace=3600.0)
    kept, _ = await hooks_.create("acme", "room", URL, None, "sha256")
    other, _ = await hooks_.create("acme", "other", URL, None, "sha1")
    await trio.sleep(100)
    await hooks_.meeting_ended("acme", "room")
    await trio.sleep(3599.5)
    ended = dataclasses.replace(kept, ended_at=100.0)
    assert hooks_.matching("acme", "room", "rap-publish-ended") == [ended]
    assert hooks_.get(kept.id) == ended
    await trio.sleep(0.5)
    assert hooks_.matching("acme", "room", "rap-publish-ended") == []
    assert hooks_.get(kept.id) is None and hooks_.listed("acme") == [other]
    assert hooks_.records() == [other.record()]  # compaction leaves the expired one out
    assert hooks_.statistics().hooks == 1


async def test_a_hook_registered_after_the_end_waits_for_the_next_meeting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks_ = registry(grace=60.0)
    old, _ = await hooks_.create("acme", "room", URL, None, "sha1")
    await hooks_.meeting_ended("acme", "room")
    new, _ = await hooks_.create("acme", "room", URL + "&next", None, "sha1")
    await trio.sleep(61)
    assert hooks_.listed("acme") == [new]
    assert old.id not in hooks_.state.hooks


async def test_a_meeting_without_hooks_writes_nothing() -> None:
    log = MemoryLog()
    hooks_ = HookRegistry(log)
    await hooks_.meeting_ended("acme", "room")
    await hooks_.meeting_started("acme", "room")
    assert log.durable == [] and log.pending == []


async def test_the_limit_counts_live_hooks_only(autojump_clock: trio.testing.MockClock) -> None:
    hooks_ = registry(max_per_customer=2, grace=10.0)
    await hooks_.create("acme", "m1", URL, None, "sha1")
    await hooks_.create("acme", "m2", URL, None, "sha1")
    with pytest.raises(ValidationError) as over:
        await hooks_.create("acme", "m3", URL, None, "sha1")
    assert over.value.message_key == "createHookError"
    assert (await hooks_.create("acme", "m2", URL, None, "sha1"))[1]  # a duplicate is fine
    await hooks_.create("globex", "m1", URL, None, "sha1")  # per customer
    await hooks_.meeting_ended("acme", "m1")
    await trio.sleep(10)
    assert not (await hooks_.create("acme", "m3", URL, None, "sha1"))[1]


async def test_a_failed_log_refuses_changes_but_not_ends() -> None:
    log = MemoryLog()
    hooks_ = HookRegistry(log)
    kept, _ = await hooks_.create("acme", "room", URL, None, "sha1")
    log.failed = True
    with pytest.raises(StorageUnavailable):
        await hooks_.create("acme", "other", URL, None, "sha1")
    assert hooks_.listed("acme") == [kept]
    with pytest.raises(StorageUnavailable):
        await hooks_.destroy("acme", kept.id)
    assert hooks_.listed("acme") == [kept]
    await hooks_.meeting_ended("acme", "room")  # background work goes on
    dropped = await hooks_.drop(kept.id)
    assert dropped is not None and dropped.id == kept.id
    log.failed = False
    await log.flush()
    replayed = HookRegistry(MemoryLog())
    replayed.replay(log.replayed())
    assert replayed.listed("acme") == []


async def test_destroy_is_for_the_owner_only_and_durable() -> None:
    log = MemoryLog()
    hooks_ = HookRegistry(log)
    made, _ = await hooks_.create("acme", "room", URL, frozenset({"user-joined"}), "sha512")
    assert log.durable == [made.record()]  # flushed before the answer
    assert not await hooks_.destroy("globex", made.id)
    assert await hooks_.destroy("acme", made.id)
    assert not await hooks_.destroy("acme", made.id)
    assert log.durable[-1] == {"type": "destroyed", "id": made.id}


# -- configuration and the allowlist -----------------------------------------------------------


def load(webhooks: dict[str, Any]) -> config.Config:
    return config.from_mapping(
        {
            "backends": [{"id": "b", "url": "http://b.test/api", "secret": "s", "capacity": 1}],
            "webhooks": webhooks,
        }
    )


def test_webhooks_settings() -> None:
    assert load({}).webhooks == config.WebhookSettings()
    settings = load(
        {
            "max_hooks_per_customer": 5,
            "hook_grace_after_end": 60,
            "allowed_callback_networks": ["10.1.2.3/24", "fd00::/8"],
        }
    ).webhooks
    assert settings.max_hooks_per_customer == 5 and settings.hook_grace_after_end == 60.0
    assert settings.allowed_callback_networks == (
        ipaddress.ip_network("10.1.2.0/24"),
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize(
    ("webhooks", "named"),
    [
        ({"max_hooks_per_customer": 0}, "webhooks.max_hooks_per_customer"),
        ({"hook_grace_after_end": -1}, "webhooks.hook_grace_after_end"),
        ({"allowed_callback_networks": ["lms.example"]}, "webhooks.allowed_callback_networks[0]"),
        ({"allowed_callback_networks": "10.0.0.0/8"}, "webhooks.allowed_callback_networks"),
        ({"max_hooks": 3}, "webhooks.max_hooks"),
    ],
)
def test_webhooks_settings_errors_name_the_key(webhooks: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load(webhooks)


async def test_checked_address_lets_allowed_networks_in() -> None:
    loopback = [ipaddress.ip_network("127.0.0.0/8")]
    assert await checked_address("127.0.0.1", 80, False) is None
    assert await checked_address("127.0.0.1", 80, False, loopback) == "127.0.0.1"
    assert await checked_address("10.0.0.1", 80, False, loopback) is None
    assert await checked_address("10.0.0.1", 80, True) == "10.0.0.1"


# -- property: any sequence of records replays, and compacts, to the same hooks ----------------

_IDS = st.sampled_from(["h1", "h2", "h3", "h4"])
_CUSTOMERS = st.sampled_from(["acme", "globex"])
_MEETINGS = st.sampled_from(["m1", "m2"])
_TIMES = st.sampled_from([0.0, 5.0, 1e5, 1e9])  # few values: ends collide and interleave
_RECORDS = st.one_of(
    st.builds(
        lambda i, c, m, at: hook(id=i, customer=c, meeting_id=m, ended_at=at).record(),
        _IDS,
        _CUSTOMERS,
        _MEETINGS,
        st.none() | _TIMES,
    ),
    st.builds(lambda i: {"type": "destroyed", "id": i}, _IDS),
    st.builds(
        lambda c, m, at: {"type": "ended", "customer": c, "meeting_id": m, "at": at},
        _CUSTOMERS,
        _MEETINGS,
        _TIMES,
    ),
    st.builds(
        lambda c, m: {"type": "started", "customer": c, "meeting_id": m}, _CUSTOMERS, _MEETINGS
    ),
)


@given(st.lists(_RECORDS, max_size=30), _TIMES | st.floats(0, 2e9))
def test_records_compact_and_replay_to_the_same_hooks(records: list[Any], now: float) -> None:
    state = HookState()
    for record in records:
        state.apply(record)
    again = HookState()
    for record in state.records():
        again.apply(record)
    assert again.hooks == state.hooks
    for customer in ("acme", "globex"):
        assert (
            again.of(customer)
            == state.of(customer)
            == [h for h in state.hooks.values() if h.customer == customer]
        )
    expired = state.expired(now, 3600.0)
    assert {h.id for h in expired} == {h.id for h in state.hooks.values() if h.expired(now, 3600.0)}
    state.forget(expired)
    assert all(not h.expired(now, 3600.0) for h in state.hooks.values())
    for key, at in state.ended.items():  # the earliest end of the meeting's stamped hooks
        assert at == min(h.ended_at for h in state.of(*key) if h.ended_at is not None)


def test_the_earliest_end_of_a_meeting_expires_first() -> None:
    state = HookState()
    state.apply(hook(id="a", ended_at=5.0).record())
    state.apply(hook(id="b", ended_at=1e9).record())
    assert [h.id for h in state.expired(1e5, 3600.0)] == ["a"]
    state.forget(state.expired(1e5, 3600.0))
    assert state.ended == {("acme", "room"): 1e9}
