"""The hooks API over real sockets: hooks/create|list|destroy as bbb-webhooks answers them.

Per-meeting hooks only, no raw events, duplicates per customer and meeting,
each customer sees only its own hooks, a per-customer limit, callback URLs
that reach inside refused at create, hooks kept across a restart and expired
a grace after their meeting ended.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.config import Config, Network, WebhookSettings
from proxy.gateway import Gateway
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from proxy.store import MemoryLog
from proxy.store.shared import Replica
from tests.harness import (
    BACKEND_SECRET,
    SECRETS,
    Stack,
    StackFactory,
    config_for,
    free_port,
    text,
    wait_until,
)

URL = "http://127.0.0.1:9/lms/hook?x=1&y=2"  # never called here: the hooks API only
OTHER_URL = "http://127.0.0.1:9/other"


async def hooks_call(
    stack: Stack, call: str, params: list[tuple[str, str]], customer: str = "acme", **kw: str
) -> etree._Element:
    url = stack.signed(f"hooks/{call}", params, customer, kw.get("algorithm", "sha1"))
    response = await stack.http.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    return etree.fromstring(response.content)


async def create_hook(
    stack: Stack, meeting_id: str = "room-1", url: str = URL, customer: str = "acme", **extra: str
) -> etree._Element:
    params = [("callbackURL", url), ("meetingID", meeting_id), *extra.items()]
    return await hooks_call(stack, "create", params, customer)


def failed(root: etree._Element, key: str) -> str:
    assert text(root, "returncode") == "FAILED", etree.tostring(root)
    assert text(root, "messageKey") == key, etree.tostring(root)
    return text(root, "message")


def listed_ids(root: etree._Element) -> list[str]:
    assert text(root, "returncode") == "SUCCESS"
    return [h.findtext("hookID") or "" for h in root.iter("hook")]


# -- create, list, destroy ---------------------------------------------------------------------


async def test_create_list_destroy_as_bbb_webhooks_answers(stack: Stack) -> None:
    created = await create_hook(stack, eventID="User-Joined, user-left")
    assert text(created, "returncode") == "SUCCESS"
    hook_id = text(created, "hookID")
    assert re.fullmatch(r"[0-9a-f-]{36}", hook_id)
    assert (text(created, "permanentHook"), text(created, "rawData")) == ("false", "false")

    response = await stack.http.get(stack.signed("hooks/list", []))
    body = response.text
    assert f"<callbackURL><![CDATA[{URL}]]></callbackURL>" in body  # CDATA, & unescaped
    assert "<meetingID><![CDATA[room-1]]></meetingID>" in body
    hook = etree.fromstring(response.content).find("hooks/hook")
    assert hook is not None
    assert [child.tag for child in hook] == [
        "hookID", "callbackURL", "meetingID", "eventID", "permanentHook", "rawData"
    ]  # fmt: skip
    assert hook.findtext("eventID") == "user-joined,user-left"  # lower-cased
    assert hook.findtext("callbackURL") == URL

    destroyed = await hooks_call(stack, "destroy", [("hookID", hook_id)])
    assert (text(destroyed, "returncode"), text(destroyed, "removed")) == ("SUCCESS", "true")
    assert listed_ids(await hooks_call(stack, "list", [])) == []
    again = await hooks_call(stack, "destroy", [("hookID", hook_id)])
    assert failed(again, "destroyMissingHook") == "The hook informed was not found."


async def test_list_of_one_meeting_and_hooks_without_event_filter(stack: Stack) -> None:
    one = text(await create_hook(stack, "room-1"), "hookID")
    two = text(await create_hook(stack, "room-2"), "hookID")
    assert listed_ids(await hooks_call(stack, "list", [("meetingID", "room-2")])) == [two]
    assert listed_ids(await hooks_call(stack, "list", [])) == [one, two]
    root = await hooks_call(stack, "list", [("meetingID", "room-1")])
    assert root.find("hooks/hook/eventID") is None  # no filter: no <eventID>, as bbb-webhooks


async def test_the_host_bound_form_serves_the_hooks_calls(stack: Stack) -> None:
    query = signed_query("hooks/create", [("callbackURL", URL), ("meetingID", "m1")], "globex-old")
    response = await stack.http.get(
        f"{stack.url}/bigbluebutton/api/hooks/create?{query}", headers={"Host": "bbb.globex.test"}
    )
    hook_id = text(etree.fromstring(response.content), "hookID")
    assert [h.id for h in stack.gateway.hooks.listed("globex")] == [hook_id]


# -- checksums ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
async def test_every_checksum_length_is_accepted_and_remembered(
    stack: Stack, algorithm: str
) -> None:
    params = [("callbackURL", URL), ("meetingID", "room-1")]
    root = await hooks_call(stack, "create", params, algorithm=algorithm)
    hook = stack.gateway.hooks.get(text(root, "hookID"))
    assert hook is not None and hook.algorithm == algorithm  # delivery signs with it


async def test_wrong_missing_and_foreign_checksums_are_checksum_errors(stack: Stack) -> None:
    call = "hooks/create"
    good = signed_query(call, [("callbackURL", URL), ("meetingID", "m")], SECRETS["acme"])
    wrong = re.sub(r"checksum=([0-9a-f])", lambda m: "checksum=" + "0123"[m.group(1) == "0"], good)
    missing = good.split("&checksum=")[0]
    as_create = signed_query("create", [("callbackURL", URL), ("meetingID", "m")], "acme-secret")
    for query in (wrong, missing, as_create):  # a create's checksum does not sign hooks/create
        response = await stack.http.get(f"{stack.api()}/{call}?{query}")
        failed(etree.fromstring(response.content), "checksumError")
    assert stack.gateway.hooks.listed("acme") == []


# -- errors of create and destroy --------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "key", "words"),
    [
        ([("meetingID", "m")], "missingParamCallbackURL", "callbackURL"),
        ([("callbackURL", "")], "missingParamCallbackURL", "callbackURL"),
        ([("callbackURL", URL)], "missingParamMeetingID", "hooks for all meetings"),
        ([("callbackURL", URL), ("meetingID", "  ")], "missingParamMeetingID", "one meeting"),
        ([("callbackURL", URL), ("meetingID", "a,b")], "validationError", "','"),
        ([("callbackURL", URL), ("meetingID", "x")], "validationError", "between 2 and 256"),
        ([("callbackURL", URL), ("meetingID", "m"), ("getRaw", "TRUE")], "createHookError", "raw"),
        ([("callbackURL", URL), ("meetingID", "m"), ("getRaw", "1")], "validationError", "getRaw"),
        (
            [("callbackURL", URL), ("meetingID", "m"), ("eventID", "a b")],
            "validationError",
            "event",
        ),
        ([("callbackURL", "ftp://127.0.0.1/x"), ("meetingID", "m")], "createHookError", "http"),
        ([("callbackURL", "http:///x"), ("meetingID", "m")], "createHookError", "host"),
    ],
)
async def test_create_refusals(
    stack: Stack, params: list[tuple[str, str]], key: str, words: str
) -> None:
    message = failed(await hooks_call(stack, "create", params), key)
    assert words.lower() in message.lower()
    assert stack.gateway.hooks.listed("acme") == []


async def test_get_raw_false_is_the_default(stack: Stack) -> None:
    root = await create_hook(stack, getRaw="false")
    assert text(root, "rawData") == "false"


async def test_destroy_without_a_hook_id(stack: Stack) -> None:
    root = await hooks_call(stack, "destroy", [])
    assert "hookID" in failed(root, "missingParamHookID")


async def test_other_hooks_calls_are_unsupported(stack: Stack) -> None:
    failed(await hooks_call(stack, "ping", []), "unsupportedRequest")


# -- duplicates, customers, limit --------------------------------------------------------------


async def test_duplicate_urls_within_a_customer_and_meeting(stack: Stack) -> None:
    first = text(await create_hook(stack, "room-1", eventID="user-joined"), "hookID")
    again = await create_hook(stack, "room-1", eventID="meeting-ended")
    assert text(again, "returncode") == "SUCCESS"
    assert text(again, "hookID") == first
    assert text(again, "messageKey") == "duplicateWarning"
    assert text(again, "message") == "There is already a hook for this callback URL."
    hook = stack.gateway.hooks.get(first)
    assert hook is not None and hook.event_ids == frozenset({"user-joined"})  # the old one kept
    other_meeting = text(await create_hook(stack, "room-2"), "hookID")
    other_url = text(await create_hook(stack, "room-1", OTHER_URL), "hookID")
    other_customer = text(await create_hook(stack, "room-1", customer="globex"), "hookID")
    assert len({first, other_meeting, other_url, other_customer}) == 4
    assert len(stack.gateway.hooks.listed("acme")) == 3


async def test_customers_see_and_destroy_only_their_own_hooks(stack: Stack) -> None:
    acme = text(await create_hook(stack, "room-1"), "hookID")
    globex = text(await create_hook(stack, "room-1", OTHER_URL, customer="globex"), "hookID")
    assert listed_ids(await hooks_call(stack, "list", [], "globex")) == [globex]
    one_meeting = await hooks_call(stack, "list", [("meetingID", "room-1")], "globex")
    assert listed_ids(one_meeting) == [globex]
    foreign = await hooks_call(stack, "destroy", [("hookID", acme)], "globex")
    assert failed(foreign, "destroyMissingHook") == "The hook informed was not found."
    unknown = await hooks_call(stack, "destroy", [("hookID", "no-such-hook")], "globex")
    failed(unknown, "destroyMissingHook")
    assert listed_ids(await hooks_call(stack, "list", [])) == [acme]
    assert [h.id for h in stack.gateway.hooks.matching("acme", "room-1", "user-joined")] == [acme]
    assert [h.id for h in stack.gateway.hooks.matching("globex", "room-1", "x")] == [globex]


async def test_a_customer_over_its_limit_gets_create_hook_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = await _config(nursery, tmp_path, max_hooks_per_customer=2)
    async with _gateway(config) as (gw, api):
        for meeting in ("m1", "m2"):
            assert text(await _create(api, meeting), "returncode") == "SUCCESS"
        message = failed(await _create(api, "m3"), "createHookError")
        assert "2 hooks" in message and "destroy" in message
        assert text(await _create(api, "m1"), "messageKey") == "duplicateWarning"  # not new
        assert text(await _create(api, "m3", customer="globex"), "returncode") == "SUCCESS"
        await gw.hooks.destroy("acme", gw.hooks.listed("acme")[0].id)
        assert text(await _create(api, "m3"), "returncode") == "SUCCESS"


# -- SSRF --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/hook",  # a name resolving to loopback
        "http://[::1]/hook",
        "https://224.0.0.1/hook",
        "http://0.0.0.0/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://name.does-not-resolve.invalid/hook",
    ],
)
async def test_callbacks_that_reach_inside_are_refused_at_create(
    make_stack: StackFactory, url: str
) -> None:
    stack = await make_stack(proxy={"allow_private_callbacks": False})
    message = failed(await create_hook(stack, url=url), "createHookError")
    assert "public" in message
    assert stack.gateway.hooks.listed("acme") == []


async def test_allowed_callback_networks_let_a_private_receiver_in(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = await _config(nursery, tmp_path, allowed_callback_networks=("127.0.0.0/8",))
    async with _gateway(config, allow_private=False) as (_gw, api):
        root = await _create(api, "mm", "http://127.0.0.1:9/in")
        assert text(root, "returncode") == "SUCCESS", etree.tostring(root)
        assert text(await _create(api, "mm", "http://localhost:9/in"), "returncode") == "SUCCESS"
        failed(await _create(api, "mm", "http://10.0.0.1/out"), "createHookError")


# -- lifetime: restarts, the meeting's end -----------------------------------------------------


async def test_hooks_survive_a_restart_on_the_same_state_dir(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = await _config(nursery, tmp_path)
    async with _gateway(config) as (gw, api):
        kept = text(await _create(api, "m1", eventID="user-joined"), "hookID")
        gone = text(await _create(api, "m2"), "hookID")
        await gw.hooks.destroy("acme", gone)
        ended = time.time()
        await gw.hooks.meeting_ended("acme", "m1", at=ended)
    async with _gateway(config) as (gw, api):
        (hook,) = gw.hooks.state.hooks.values()
        assert (hook.id, hook.meeting_id, hook.algorithm) == (kept, "m1", "sha1")
        assert hook.event_ids == frozenset({"user-joined"}) and hook.ended_at == ended
        assert text(await _create(api, "m1"), "hookID") == kept  # a duplicate of it


async def test_a_hook_expires_a_grace_after_its_meeting_ended(stack: Stack) -> None:
    """Registered before the meeting exists; kept while it runs and for the grace after."""
    now = [1_000_000.0]
    hooks = stack.gateway.hooks
    hooks.clock = lambda: now[0]
    early = text(await create_hook(stack, "lesson"), "hookID")
    assert text(await stack.create("lesson"), "returncode") == "SUCCESS"
    now[0] += 7200  # a long meeting: no expiry while it runs
    assert [h.id for h in hooks.matching("acme", "lesson", "user-joined")] == [early]
    assert text(await stack.call("end", [("meetingID", "lesson")]), "returncode") == "SUCCESS"
    now[0] += hooks.grace - 1  # recording events still reach it
    assert listed_ids(await hooks_call(stack, "list", [])) == [early]
    now[0] += 1
    assert listed_ids(await hooks_call(stack, "list", [])) == []
    assert hooks.matching("acme", "lesson", "rap-publish-ended") == []
    assert hooks.get(early) is None
    failed(await hooks_call(stack, "destroy", [("hookID", early)]), "destroyMissingHook")


async def test_a_meeting_created_again_within_the_grace_keeps_its_hook(stack: Stack) -> None:
    now = [1_000_000.0]
    hooks = stack.gateway.hooks
    hooks.clock = lambda: now[0]
    hook_id = text(await create_hook(stack, "weekly"), "hookID")
    await stack.create("weekly")
    await stack.call("end", [("meetingID", "weekly")])
    now[0] += 60
    assert text(await stack.create("weekly"), "returncode") == "SUCCESS"  # Moodle: again
    now[0] += 10 * hooks.grace
    assert [h.id for h in hooks.matching("acme", "weekly", "user-joined")] == [hook_id]


async def test_the_backends_end_notice_starts_the_grace(stack: Stack) -> None:
    now = [1_000_000.0]
    hooks = stack.gateway.hooks
    hooks.clock = lambda: now[0]
    await create_hook(stack, "room")
    await stack.create("room")
    sim, backend_meeting = stack.backend_meeting("acme", "room")
    sim.end_meeting(sim.meetings[backend_meeting], forcibly=True)  # the backend calls back
    await wait_until(lambda: bool(hooks.state.ended))
    now[0] += hooks.grace
    assert hooks.listed("acme") == []


# -- helpers: a gateway of one's own config, started and stopped -------------------------------


async def _config(nursery: trio.Nursery, state: Path, **webhooks: Any) -> Config:
    sim = Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)
    sim_url = await nursery.start(serve_simulator, sim)
    port = free_port()
    own = {
        "state_dir": str(state),
        "bind": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "allow_private_callbacks": True,
    }
    config = config_for([sim_url], proxy=own)
    networks = tuple(_networks(webhooks.pop("allowed_callback_networks", ())))
    settings = WebhookSettings(**webhooks, allowed_callback_networks=networks)
    return dataclasses.replace(config, webhooks=settings)


def _networks(cidrs: tuple[str, ...]) -> Iterator[Network]:
    return (ipaddress.ip_network(c) for c in cidrs)


@asynccontextmanager
async def _gateway(
    config: Config, *, allow_private: bool = True
) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway on ``config`` for the block: (gateway, acme's API base URL)."""
    proxy = dataclasses.replace(config.proxy, allow_private_callbacks=allow_private)
    async with trio.open_nursery() as nursery:
        gw, binds = await nursery.start(serve_gateway, dataclasses.replace(config, proxy=proxy))
        yield gw, f"{binds[0]}/acme/bigbluebutton/api"
        nursery.cancel_scope.cancel()


async def _create(
    api: str, meeting_id: str, url: str = URL, customer: str = "acme", **extra: str
) -> etree._Element:
    params = [("callbackURL", url), ("meetingID", meeting_id), *extra.items()]
    query = signed_query("hooks/create", params, SECRETS[customer])
    base = api.replace("/acme/", f"/{customer}/")
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base}/hooks/create?{query}")
    return etree.fromstring(response.content)


async def test_the_hooks_store_is_part_of_readiness(stack: Stack) -> None:
    response = await stack.http.get(f"{stack.url}/readyz")
    assert response.json()["stores"]["hooks"] == "ok"
    replica = stack.gateway.hooks.log
    assert isinstance(replica, Replica) and stack.gateway.stores["hooks"] is replica.log


async def test_a_disabled_customer_and_a_disabled_call(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"disabled_calls": ["hooks/destroy"]})
    failed(await create_hook(stack, customer="off"), "apiNotEnabled")
    hook_id = text(await create_hook(stack), "hookID")
    failed(await hooks_call(stack, "destroy", [("hookID", hook_id)]), "unsupportedRequest")
    assert [h.id for h in stack.gateway.hooks.listed("acme")] == [hook_id]


async def test_a_body_only_post_is_accepted_as_for_other_calls(stack: Stack) -> None:
    params = [("callbackURL", URL), ("meetingID", "room-1")]
    query = signed_query("hooks/create", params, SECRETS["acme"], "sha256")
    response = await stack.http.post(
        f"{stack.api()}/hooks/create",
        content=query,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    hook = stack.gateway.hooks.get(text(etree.fromstring(response.content), "hookID"))
    assert hook is not None and hook.algorithm == "sha256"


async def test_a_hooks_log_that_cannot_write_answers_server_unavailable(stack: Stack) -> None:
    broken = MemoryLog()
    broken.failed = True
    stack.gateway.hooks.log = broken
    failed(await create_hook(stack), "serverUnavailable")
    assert stack.gateway.hooks.listed("acme") == []
