"""Characters XML cannot carry, in what a customer or an end user sends (issue 7 §1).

bbb-web removes control characters from create's ``name`` and join's ``fullName``
(``ParamsUtil.stripControlChars``) and keeps every other value as it came, writing it raw
into getMeetings, getMeetingInfo and getRecordings. One meetingID or ``meta_`` value with
U+000E made each of those answers unparseable for every meeting on that server, and three
health polls later the gateway counted the server DOWN. The gateway now strips those two
values as bbb-web does and refuses any other value with such a character (``validationError``),
before a backend is asked. Create's end URLs are dropped instead (``test_supervision.py``) and
join's error targets answer XML (``test_join.py``).
"""

from __future__ import annotations

import orjson
import pytest
from lxml import etree

from proxy.backends.monitor import poll_once
from proxy.bbb.checksum import signed_query
from proxy.health import State
from proxy.request import strip_control_chars
from tests.harness import BACKEND_SECRET, Stack, StackFactory, query_of, text

BAD = "\x0e"


def backend_calls(stack: Stack) -> list[str]:
    return [name for sim in stack.sims for name, _ in sim.requests if name != "getMeetings"]


async def polled_healthy(stack: Stack) -> None:
    for backend in stack.config.backends:
        for _ in range(stack.config.proxy.health.down_after + 1):
            await poll_once(stack.gateway, backend.id)
        assert stack.gateway.health[backend.id].state == State.UP, backend.id


@pytest.mark.parametrize(
    "params",
    [
        [("meetingID", f"room{BAD}1"), ("name", "Room")],
        [("meetingID", "room-1"), ("name", "Room"), ("meta_course", f"Physics{BAD}")],
        [("meetingID", "room-1"), ("name", "Room"), (f"meta_c{BAD}", "Physics")],
        [("meetingID", "room-1"), ("name", "Room"), ("welcome", "Hi\x00")],
        [("meetingID", "room-1"), ("name", "Room"), ("dialNumber", "\ufffe")],
    ],
)
async def test_a_create_with_a_value_xml_cannot_carry_is_refused(
    stack: Stack, params: list[tuple[str, str]]
) -> None:
    root = await stack.call("create", params)
    assert (text(root, "returncode"), text(root, "messageKey")) == ("FAILED", "validationError")
    assert "cannot contain control characters" in text(root, "message")
    assert BAD not in text(root, "message")  # the answer is XML itself
    assert backend_calls(stack) == []
    assert stack.gateway.ledger.statistics().connections_by_customer == {}
    await polled_healthy(stack)


async def test_a_meeting_name_loses_its_control_characters_as_bbb_webs_does(
    stack: Stack,
) -> None:
    name = "Physics\x0e\t101\x7f\x85"
    root = await stack.call("create", [("meetingID", "room-1"), ("name", name)])
    assert text(root, "returncode") == "SUCCESS"
    [sent] = [p for sim in stack.sims for n, p in sim.requests if n == "create"]
    assert dict(sent)["name"] == "Physics101"
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "meetingName") == "Physics101"
    listed = await stack.call("getMeetings", [])
    assert listed.findtext("meetings/meeting/meetingName") == "Physics101"
    await polled_healthy(stack)


async def test_a_name_of_control_characters_only_is_no_name(stack: Stack) -> None:
    root = await stack.call("create", [("meetingID", "room-1"), ("name", "\x01\x02\x03")])
    assert text(root, "messageKey") == "validationError"
    assert backend_calls(stack) == []


async def test_a_full_name_loses_its_control_characters_and_a_user_id_is_refused(
    stack: Stack,
) -> None:
    await stack.create("room-1")
    base = [("meetingID", "room-1"), ("role", "VIEWER")]
    joined = await stack.http.get(stack.signed("join", [*base, ("fullName", "Ada\x1b[31m\x0e")]))
    assert joined.status_code == 302
    assert query_of(joined.headers["location"])["fullName"] == "Ada[31m"
    refused = await stack.http.get(
        stack.signed("join", [*base, ("fullName", "Ada"), ("userID", f"lms{BAD}7")])
    )
    assert refused.status_code == 302
    [error] = orjson.loads(query_of(refused.headers["location"])["errors"])
    assert error["key"] == "validationError"
    assert "room-1" not in refused.headers["location"]  # not a join of the backend


async def test_a_text_track_call_answers_json(stack: Stack) -> None:
    response = await stack.http.get(
        stack.signed("getRecordingTextTracks", [("recordID", f"r{BAD}1")])
    )
    assert response.status_code == 200
    answer = orjson.loads(response.content)["response"]
    assert (answer["returncode"], answer["messageKey"]) == ("FAILED", "validationError")


async def test_other_calls_refuse_it_too(make_stack: StackFactory) -> None:
    stack = await make_stack(backends=1)
    await stack.create("room-1")
    for call, params in [
        ("getMeetingInfo", [("meetingID", f"room{BAD}")]),
        ("end", [("meetingID", "room-1"), ("x", BAD)]),
        ("getRecordings", [("meetingID", f"room{BAD}")]),
        ("hooks/create", [("meetingID", "room-1"), ("callbackURL", f"https://a.test/{BAD}")]),
    ]:
        root = await stack.call(call, params)
        assert text(root, "messageKey") == "validationError", call
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None  # not ended


def test_strip_control_chars_is_javas_cc_class() -> None:
    every = "".join(chr(c) for c in range(0x100))
    kept = strip_control_chars(every)
    assert kept == "".join(chr(c) for c in range(0x20, 0x7F)) + "".join(
        chr(c) for c in range(0xA0, 0x100)
    )
    assert strip_control_chars("\u2028\ufffe") == "\u2028\ufffe"  # not Cc


async def test_the_simulator_strips_names_as_bbb_web_does(stack: Stack) -> None:
    sim, url = stack.sims[0], stack.sim_urls[0]
    query = signed_query(
        "create", [("meetingID", "direct"), ("name", "A\x0eB\x9fC")], BACKEND_SECRET
    )
    response = await stack.http.get(f"{url}/create?{query}")
    assert text(etree.fromstring(response.content), "returncode") == "SUCCESS"
    assert sim.meetings["direct"].name == "ABC"
