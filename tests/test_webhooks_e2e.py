"""Webhooks end to end, over real sockets: simulated backends send their events to the
gateway, which delivers each to the hooks of the right customer and meeting only, signed
with that customer's secret, under the customer's meetingID, personal data removed.

Customers register hooks through the gateway's hooks API; the receiver is one loopback
endpoint recording every POST.  ``acme`` and ``globex`` both use the meetingID ``room-1``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import pytest
import trio

from tests.harness import SECRETS, Stack, StackFactory, serve_endpoint, text, wait_until

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"


@dataclass(frozen=True)
class Post:
    path: str
    query: str
    body: bytes

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))

    def event(self) -> dict[str, Any]:
        (event,) = json.loads(self.form()["event"])
        assert isinstance(event, dict)
        return event

    def name(self) -> str:
        return str(self.event()["data"]["id"])

    def meeting_id(self) -> str:
        return str(self.event()["data"]["attributes"]["meeting"]["external-meeting-id"])


async def start_receiver(nursery: trio.Nursery) -> tuple[str, list[Post]]:
    posts: list[Post] = []

    def respond(scope: dict[str, Any], body: bytes) -> int:
        posts.append(Post(scope["path"], scope["query_string"].decode(), body))
        return 200

    return await serve_endpoint(nursery, respond), posts


async def hook(
    stack: Stack, url: str, meeting_id: str, customer: str = "acme", **extra: str
) -> str:
    params = [("callbackURL", url), ("meetingID", meeting_id), *extra.items()]
    answer = await stack.call("hooks/create", params, customer)
    assert text(answer, "returncode") == "SUCCESS", answer
    return text(answer, "hookID")


async def registered(stack: Stack) -> None:
    """Wait until every backend has the gateway's hook."""
    await wait_until(lambda: all(sim.webhooks.hooks for sim in stack.sims))


async def join(stack: Stack, meeting_id: str, name: str, customer: str = "acme") -> None:
    params = [
        ("meetingID", meeting_id),
        ("fullName", name),
        ("role", "VIEWER"),
        ("userID", "lms-7"),
    ]
    response = await stack.http.get(
        stack.signed("join", params, customer),
        headers={"User-Agent": USER_AGENT, "Referer": "https://lms.example/course/7"},
        follow_redirects=True,
    )
    assert response.status_code == 200


def valid_checksum(post: Post, registered_url: str, secret: str) -> bool:
    params = dict(parse_qsl(post.query))
    given = params.get("checksum", "")
    algorithm = {40: "sha1", 64: "sha256", 96: "sha384", 128: "sha512"}[len(given)]
    expected = hashlib.new(algorithm, registered_url.encode() + post.body + secret.encode())
    return expected.hexdigest() == given


async def test_events_reach_the_right_customer_and_meeting_only(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    receiver, posts = await start_receiver(nursery)
    await registered(stack)
    acme_url = f"{receiver}/acme/room-1?lms=1"
    await hook(stack, acme_url, "room-1")
    await hook(stack, f"{receiver}/acme/room-2", "room-2")
    await hook(stack, f"{receiver}/globex/room-1", "room-1", customer="globex")
    await stack.create("room-1", meta_course="Maths 101")
    await stack.create("room-2")
    await stack.create("room-1", customer="globex")
    await join(stack, "room-1", "Ann Example")
    await join(stack, "room-1", "Bob Globex", customer="globex")
    await stack.call("end", [("meetingID", "room-1")])
    await stack.call("end", [("meetingID", "room-1")], "globex")
    await stack.call("end", [("meetingID", "room-2")])

    def by_path(path: str) -> list[Post]:
        return [p for p in posts if p.path == path]

    await wait_until(
        lambda: all(
            "meeting-ended" in [p.name() for p in by_path(path)]
            for path in ("/acme/room-1", "/acme/room-2", "/globex/room-1")
        )
    )
    acme = by_path("/acme/room-1")
    assert [p.name() for p in acme] == [
        "meeting-created",
        "user-joined",
        "user-left",
        "meeting-ended",
    ]
    assert [p.name() for p in by_path("/acme/room-2")] == ["meeting-created", "meeting-ended"]
    assert [p.name() for p in by_path("/globex/room-1")][1] == "user-joined"
    assert {p.meeting_id() for p in posts} == {"room-1", "room-2"}  # never the backend's id
    for post in acme:
        assert valid_checksum(post, acme_url, SECRETS["acme"])
        assert not valid_checksum(post, acme_url, SECRETS["globex"])
    for post in by_path("/globex/room-1"):
        assert valid_checksum(post, f"{receiver}/globex/room-1", SECRETS["globex"])
    globex_names = json.dumps([p.event() for p in by_path("/globex/room-1")])
    assert "Ann Example" not in globex_names
    created = acme[0].event()["data"]["attributes"]["meeting"]
    assert created["metadata"] == {"course": "Maths 101"}
    assert acme[0].form()["domain"]  # bbb-webhooks' form: domain, event, timestamp
    assert list(acme[0].form()) == ["domain", "event", "timestamp"]


async def test_personal_data_is_removed(make_stack: StackFactory, nursery: trio.Nursery) -> None:
    stack = await make_stack()
    receiver, posts = await start_receiver(nursery)
    await registered(stack)
    await hook(stack, f"{receiver}/h", "room-1", eventID="user-joined")
    await stack.create("room-1")
    await join(stack, "room-1", "Ann Example")
    await wait_until(lambda: len(posts) == 1)
    sim, _ = stack.backend_meeting("acme", "room-1")
    sent = json.dumps([e for e in sim.webhooks.emitted if e["data"]["id"] == "user-joined"])
    assert USER_AGENT in sent and "127.0.0.1" in sent  # what the backend sent
    delivered = posts[0].body.decode()
    delivered_json = json.dumps(posts[0].event())
    for personal in (USER_AGENT, "127.0.0.1", "lms.example/course"):
        assert personal not in delivered_json, personal
    assert "Firefox" not in delivered
    assert sim_session_token(stack) not in delivered
    user = posts[0].event()["data"]["attributes"]["user"]
    assert user["ip-address"] == "" and user["user-agent"] == ""  # the shape is kept


def sim_session_token(stack: Stack) -> str:
    sim, backend_id = stack.backend_meeting("acme", "room-1")
    (attendee,) = sim.meetings[backend_id].attendees.values()
    return attendee.session_token


async def test_event_id_filters_are_honoured(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    receiver, posts = await start_receiver(nursery)
    await registered(stack)
    await hook(stack, f"{receiver}/ended", "room-1", eventID="MEETING-ENDED")
    await hook(stack, f"{receiver}/all", "room-1")
    await stack.create("room-1")
    await join(stack, "room-1", "Ann Example")
    await stack.call("end", [("meetingID", "room-1")])
    await wait_until(
        lambda: [p.name() for p in posts if p.path == "/all"][-1:] == ["meeting-ended"]
    )
    await wait_until(lambda: any(p.path == "/ended" for p in posts))
    assert [p.name() for p in posts if p.path == "/ended"] == ["meeting-ended"]


async def test_one_customers_hooks_are_invisible_to_another(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    receiver, posts = await start_receiver(nursery)
    await registered(stack)
    acme_hook = await hook(stack, f"{receiver}/acme", "room-1")
    listed = await stack.call("hooks/list", [], "globex")
    assert listed.find("hooks/hook") is None
    refused = await stack.call("hooks/destroy", [("hookID", acme_hook)], "globex")
    assert text(refused, "messageKey") == "destroyMissingHook"
    await stack.create("room-1", customer="globex")  # globex's room-1: not acme's
    await stack.create("room-1")
    await wait_until(lambda: len(posts) == 1)
    await trio.sleep(0.3)
    assert len(posts) == 1  # acme's own meeting-created only
    assert posts[0].path == "/acme"


@pytest.mark.parametrize("algorithm", ["sha256"])
async def test_events_are_signed_with_the_algorithm_of_the_hooks_create(
    make_stack: StackFactory, nursery: trio.Nursery, algorithm: str
) -> None:
    stack = await make_stack()
    receiver, posts = await start_receiver(nursery)
    await registered(stack)
    url = f"{receiver}/h"
    params = [("callbackURL", url), ("meetingID", "room-1")]
    answer = await stack.http.get(stack.signed("hooks/create", params, algorithm=algorithm))
    assert "<returncode>SUCCESS</returncode>" in answer.text
    await stack.create("room-1")
    await wait_until(lambda: len(posts) == 1)
    assert len(dict(parse_qsl(posts[0].query))["checksum"]) == 64
    assert valid_checksum(posts[0], url, SECRETS["acme"])


async def test_recording_events_reach_the_customer_under_its_meeting_id(
    make_stack: StackFactory, nursery: trio.Nursery
) -> None:
    stack = await make_stack()
    receiver, posts = await start_receiver(nursery)
    await registered(stack)
    await hook(stack, f"{receiver}/rec", "room-1", eventID="rap-archive-ended,rap-publish-ended")
    await stack.create("room-1", record="true", meta_course="Maths 101")
    await stack.call("end", [("meetingID", "room-1")])
    await wait_until(lambda: "rap-publish-ended" in [p.name() for p in posts])  # the sim's tick
    assert [p.name() for p in posts] == ["rap-archive-ended", "rap-publish-ended"]
    assert {p.meeting_id() for p in posts} == {"room-1"}
    recording = posts[1].event()["data"]["attributes"]["recording"]
    assert recording["metadata"]["meetingId"] == "room-1"
    assert recording["metadata"]["course"] == "Maths 101"
    assert not [k for k in recording["metadata"] if k.startswith("bbb-proxy-")]
