"""The dial-in router for FreeSWITCH's mod_xml_curl (issue 12 §2), over real sockets.

The forms are what mod_xml_curl posts for a dialplan lookup (the caller profile's
fields and the channel's variables as ``variable_*``, docs/decisions.md); the answers
are checked against the document shapes FreeSWITCH reads.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from lxml import etree

from proxy.config import FsapiSettings
from proxy.voice import dialplan
from tests.harness import text
from tests.voice_stack import VoiceFactory, VoiceStack, voice_stacks

PASSWORD = "fs-secret"
SIP_HOSTS = {"bbb-1": "10.0.0.1", "bbb-2": "10.0.0.2:5080", "bbb-3": "sip-3.example"}


@pytest.fixture
async def make_voice(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[VoiceFactory]:
    async with voice_stacks(nursery, tmp_path) as make:
        yield make


@pytest.fixture
async def voice(make_voice: VoiceFactory) -> VoiceStack:
    return await make_voice(
        fsapi={"password": PASSWORD, "sip_hosts": SIP_HOSTS, "max_duration": 3600}
    )


def lookup_form(destination: str | None, **extra: str) -> dict[str, str]:
    """A dialplan lookup as mod_xml_curl posts it (abridged: the fields that matter and
    a few of the many others)."""
    form = {
        "hostname": "fs-dialin-1",
        "section": "dialplan",
        "tag_name": "",
        "key_name": "",
        "key_value": "",
        "Event-Name": "REQUEST_PARAMS",
        "Core-UUID": "8e4b3c6a-0000-4000-8000-000000000001",
        "FreeSWITCH-Hostname": "fs-dialin-1",
        "Channel-State": "CS_ROUTING",
        "Call-Direction": "inbound",
        "Caller-Username": "+4915112345678",
        "Caller-Dialplan": "XML",
        "Caller-Caller-ID-Name": "Jane Doe",
        "Caller-Caller-ID-Number": "+4915112345678",
        "Caller-ANI": "+4915112345678",
        "Caller-Network-Addr": "192.0.2.10",
        "Caller-Source": "mod_sofia",
        "Caller-Context": "public",
        "Caller-Channel-Name": "sofia/external/+4915112345678@192.0.2.10",
        "Caller-Screen-Bit": "true",
        "Caller-Privacy-Hide-Name": "false",
        "Caller-Privacy-Hide-Number": "false",
        "Hunt-Context": "public",
        "variable_direction": "inbound",
        "variable_sip_from_user": "+4915112345678",
        "variable_sip_to_user": "+49301234567",
    }
    if destination is not None:
        form |= {
            "Caller-Destination-Number": destination,
            "Hunt-Destination-Number": destination,
            "variable_destination_number": destination,
        }
    return form | extra


def auth(password: str = PASSWORD, user: str = "freeswitch") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def post(
    stack_url: str, http: httpx.AsyncClient, form: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    return await http.post(f"{stack_url}/fsapi", data=form, headers=headers)


async def lookup(voice: VoiceStack, destination: str | None, **extra: str) -> etree._Element:
    stack = voice.stack
    assert stack is not None
    response = await post(stack.url, stack.http, lookup_form(destination, **extra), auth())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    assert response.content.startswith(b"<?xml version='1.0' encoding='UTF-8'")
    root = etree.fromstring(response.content)
    assert root.tag == "document" and root.get("type") == "freeswitch/xml"
    return root


def actions(root: etree._Element) -> list[tuple[str, str]]:
    """The one extension's actions, as (application, data); checks the shape around them."""
    (section,) = root.findall("section")
    assert section.get("name") == "dialplan"
    (context,) = section.findall("context")
    (extension,) = context.findall("extension")
    (condition,) = extension.findall("condition")
    assert condition.get("field") == "destination_number"
    assert condition.get("expression") == "^.*$"
    return [(a.get("application") or "", a.get("data") or "") for a in condition]


def is_not_found(root: etree._Element) -> bool:
    (section,) = root.findall("section")
    results = section.findall("result")
    return section.get("name") == "result" and [r.get("status") for r in results] == ["not found"]


async def meeting_bridge(voice: VoiceStack, meeting: str, customer: str = "acme") -> str:
    stack = voice.stack
    assert stack is not None
    root = await stack.create(meeting, customer)
    assert text(root, "returncode") == "SUCCESS"
    return text(root, "voiceBridge")


# -- access ------------------------------------------------------------------------------------


async def test_without_a_password_the_router_is_not_there(make_voice: VoiceFactory) -> None:
    off = await make_voice()
    stack = off.stack
    assert stack is not None
    response = await post(stack.url, stack.http, lookup_form("12345"), auth())
    assert response.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        auth("wrong"),
        auth(PASSWORD + "x"),
        auth(""),
        {"Authorization": f"Bearer {PASSWORD}"},
        {"Authorization": "Basic !!!not-base64!!!"},
        {"Authorization": "Basic " + base64.b64encode(PASSWORD.encode()).decode()},  # no colon
    ],
)
async def test_wrong_credentials_are_refused(voice: VoiceStack, headers: dict[str, str]) -> None:
    stack = voice.stack
    assert stack is not None
    response = await post(stack.url, stack.http, lookup_form("12345"), headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="fsapi"'
    assert b"<document" not in response.content


async def test_any_user_name_with_the_password_is_let_in(voice: VoiceStack) -> None:
    stack = voice.stack
    assert stack is not None
    for user in ("freeswitch", "", "fsapi"):
        response = await post(stack.url, stack.http, lookup_form(None), auth(user=user))
        assert response.status_code == 200


# -- the answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["directory", "configuration", "phrases", ""])
async def test_other_sections_and_a_missing_destination_are_not_found(
    voice: VoiceStack, section: str
) -> None:
    assert is_not_found(await lookup(voice, "12345", section=section))
    assert is_not_found(await lookup(voice, None))
    assert is_not_found(await lookup(voice, "  "))


async def test_the_platform_number_prompts_for_a_pin(voice: VoiceStack) -> None:
    root = await lookup(voice, "+49301234567", **{"Hunt-Context": "dialin"})
    assert root.find("section/context").get("name") == "dialin"  # type: ignore[union-attr]
    steps = actions(root)
    assert steps[0] == ("answer", "")
    assert ("set", "bbb_dialin_attempts=1") in steps
    assert ("playback", "conference/conf-bad-pin.wav") not in steps  # nothing wrong yet
    (ask,) = [data for app, data in steps if app == "play_and_get_digits"]
    assert ask.split(" ") == [
        "1",
        "10",
        "3",
        "10000",
        "#",
        "conference/conf-pin.wav",
        "conference/conf-bad-pin.wav",
        "bbb_dialin_pin",
        "^[0-9]+$",
        "3000",
        "bbb-dialin-failed",
        "XML",
        "dialin",
    ]
    assert steps[-1] == ("transfer", "${bbb_dialin_pin} XML dialin")


async def test_a_running_meetings_pin_bridges_to_its_backend(voice: VoiceStack) -> None:
    stack = voice.stack
    assert stack is not None
    pins = {m: await meeting_bridge(voice, m, c) for m, c in [("m1", "acme"), ("m2", "globex")]}
    for i in range(3, 12):  # spread over the three backends
        pins[f"m{i}"] = await meeting_bridge(voice, f"m{i}")
    backends = set()
    for meeting, pin in pins.items():
        customer = "globex" if meeting == "m2" else "acme"
        held = stack.gateway.ledger.get((customer, meeting))
        assert held is not None
        backends.add(held.backend_id)
        sim, backend_meeting = stack.backend_meeting(customer, meeting)
        assert sim.meetings[backend_meeting].voice_bridge == pin  # the backend has that PIN
        steps = actions(await lookup(voice, pin, variable_bbb_dialin_attempts="1"))
        assert steps[-1] == ("bridge", f"sofia/external/{pin}@{SIP_HOSTS[held.backend_id]}")
        assert ("sched_hangup", "+3600 allotted_timeout") in steps
        assert ("set", "effective_caller_id_number=+491511234XXXX") in steps
        assert ("set", "effective_caller_id_name=+491511234XXXX") in steps
        assert not any(app == "privacy" for app, _ in steps)
    assert backends == {"bbb-1", "bbb-2", "bbb-3"}


async def test_a_breakout_rooms_pin_is_the_meetings_and_one_digit(voice: VoiceStack) -> None:
    stack = voice.stack
    assert stack is not None
    pin = await meeting_bridge(voice, "parent")
    held = stack.gateway.ledger.get(("acme", "parent"))
    assert held is not None
    steps = actions(await lookup(voice, pin + "3"))
    assert steps[-1] == ("bridge", f"sofia/external/{pin}3@{SIP_HOSTS[held.backend_id]}")
    # Two digits more is no room of it.
    assert actions(await lookup(voice, pin + "31"))[-1][0] == "transfer"


async def test_an_unknown_pin_prompts_again_and_too_many_end_the_call(voice: VoiceStack) -> None:
    taken = {await meeting_bridge(voice, "real")}
    unknown = next(str(n) for n in range(10000, 99999) if str(n) not in taken)
    first = actions(await lookup(voice, unknown))  # dialled directly: told it is wrong
    assert first[:2] == [("answer", ""), ("playback", "conference/conf-bad-pin.wav")]
    assert ("set", "bbb_dialin_attempts=1") in first and first[-1][0] == "transfer"
    again = actions(await lookup(voice, unknown, variable_bbb_dialin_attempts="2"))
    assert ("playback", "conference/conf-bad-pin.wav") in again
    assert ("set", "bbb_dialin_attempts=3") in again
    goodbye = [
        ("answer", ""),
        ("playback", "voicemail/vm-goodbye.wav"),
        ("hangup", "NORMAL_CLEARING"),
    ]
    assert actions(await lookup(voice, unknown, variable_bbb_dialin_attempts="3")) == goodbye
    assert actions(await lookup(voice, "bbb-dialin-failed")) == goodbye  # no PIN entered
    # Garbage where the count should be counts as none.
    assert ("set", "bbb_dialin_attempts=1") in actions(
        await lookup(voice, unknown, variable_bbb_dialin_attempts="٣")
    )


async def test_an_ended_meetings_pin_no_longer_bridges(voice: VoiceStack) -> None:
    stack = voice.stack
    assert stack is not None
    pin = await meeting_bridge(voice, "short")
    assert actions(await lookup(voice, pin))[-1][0] == "bridge"
    await stack.call("end", [("meetingID", "short")])
    assert actions(await lookup(voice, pin))[-1][0] == "transfer"


@pytest.mark.parametrize(
    "privacy",
    [
        {"Caller-Privacy-Hide-Number": "true"},
        {"variable_sip_Privacy": "id"},
        {"variable_sip_h_Privacy": "user;id"},
        {"Caller-Caller-ID-Number": "anonymous"},
    ],
)
async def test_a_caller_asking_for_privacy_is_hidden(
    voice: VoiceStack, privacy: dict[str, str]
) -> None:
    pin = await meeting_bridge(voice, "private")
    steps = actions(await lookup(voice, pin, **privacy))
    assert ("privacy", "full") in steps
    assert ("set", "effective_caller_id_name=Anonymous") in steps
    assert ("set", "effective_caller_id_number=anonymous") in steps
    assert not any("1234" in data for _, data in steps)


async def test_nothing_the_caller_chose_reaches_freeswitch_unchecked(voice: VoiceStack) -> None:
    """FreeSWITCH expands ${...} in application data: a caller ID must not carry any."""
    pin = await meeting_bridge(voice, "safe")
    steps = actions(
        await lookup(
            voice,
            pin,
            **{
                "Caller-Caller-ID-Number": "${system(rm -rf /)}0301234567",
                "Hunt-Context": 'pub"lic><x',
                "Caller-Context": "",
            },
        )
    )
    assert ("set", "effective_caller_id_number=030123XXXX") in steps
    assert not any("$" in data or "system" in data for _, data in steps)
    root = await lookup(voice, "+1 555", **{"Hunt-Context": "a b", "Caller-Context": "c"})
    assert root.find("section/context").get("name") == "public"  # type: ignore[union-attr]


# -- the decision, as plain functions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "shown"),
    [
        ("+4915112345678", "+491511234XXXX"),
        ("030 1234-567", "030123XXXX"),
        ("1234", "XXXX"),
        ("12", "XX"),
        ("", "anonymous"),
        ("sip:alice", "anonymous"),
        ("٣٣٣٣٣٣٣", "anonymous"),
    ],
)
def test_caller_numbers_are_masked(number: str, shown: str) -> None:
    assert dialplan.masked(number, 4) == shown


def test_mask_digits_zero_shows_the_number_and_more_hides_all() -> None:
    assert dialplan.masked("+4930123", 0) == "+4930123"
    assert dialplan.masked("+4930123", 20) == "+XXXXXXX"


def test_pending_meetings_and_unknown_backends_are_not_routed() -> None:
    found = {"11111": dialplan.Target("11111", "h1")}
    assert dialplan.route("11111", found.get) == found["11111"]
    assert dialplan.route("111112", found.get) == dialplan.Target("111112", "h1")
    assert dialplan.route("1111", found.get) is None
    assert dialplan.route("11111a", found.get) is None
    assert dialplan.route("١١١١١", found.get) is None
    assert dialplan.route("", found.get) is None


def test_no_time_limit_by_default_and_the_profile_is_configurable() -> None:
    settings = FsapiSettings(password="x", sip_profile="bbb")

    def one(pin: str) -> dialplan.Target | None:
        return dialplan.Target(pin, "10.1.1.1") if pin == "55555" else None

    body = dialplan.answer(lookup_form("55555"), settings, one, 5)
    steps = actions(etree.fromstring(body))
    assert steps[-1] == ("bridge", "sofia/bbb/55555@10.1.1.1")
    assert not any(app == "sched_hangup" for app, _ in steps)


def test_a_long_number_is_a_phone_number_not_a_wrong_pin() -> None:
    settings = FsapiSettings(password="x")
    steps = actions(
        etree.fromstring(dialplan.answer(lookup_form("6135551234"), settings, lambda _: None, 5))
    )
    assert ("playback", "conference/conf-bad-pin.wav") not in steps
