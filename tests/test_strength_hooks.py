"""Tests written to kill mutants of ``proxy.bbb.hooks`` and ``proxy.calls.hooks`` that
survived (docs/mutation.md).

The hooks API's refusals are answered to the customer: each one's messageKey and
message are checked whole, as a client sees them.  hooks/create's resolution of the
callback host (``proxy.calls.hooks._check_reachable``) is checked on the function: what
it asks the SSRF filter, and a host that does not resolve in time.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio

from proxy.bbb import hooks
from proxy.calls import hooks as hooks_calls
from proxy.errors import ValidationError

URL = "https://lms.example.com/hook"
PUBLIC_NOTE = ". It must be an http(s) URL whose host is a public address"


def refusal(params: list[tuple[str, str]]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as refused:
        hooks.create_params(params)
    return refused.value.message_key, refused.value.message


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([], ("missingParamCallbackURL", "You must specify a callbackURL in the parameters.")),
        (
            [("callbackURL", "  ")],
            ("missingParamCallbackURL", "You must specify a callbackURL in the parameters."),
        ),
        (
            [("callbackURL", URL), ("getRaw", "TRUE ")],
            (
                "createHookError",
                "Raw events (getRaw=true) are not offered: they cannot be filtered of "
                "personal data. Register the hook without getRaw to get the mapped events",
            ),
        ),
        (
            [("callbackURL", URL), ("getRaw", "yes")],
            ("validationError", "Parameter getRaw must be true or false"),
        ),
        (
            [("callbackURL", URL), ("eventID", ",".join(f"e{i}" for i in range(65)))],
            ("validationError", "Parameter eventID may list at most 64 events"),
        ),
        (
            [("callbackURL", URL), ("eventID", "user-joined,Not An Id")],
            (
                "validationError",
                "Parameter eventID must be a comma list of event ids such as user-joined",
            ),
        ),
    ],
)
def test_every_create_refusal_says_what_is_wrong(
    params: list[tuple[str, str]], expected: tuple[str, str]
) -> None:
    assert refusal(params) == expected


def test_an_unusable_callback_url_names_the_reason() -> None:
    key, message = refusal([("callbackURL", "ftp://lms.example.com/hook")])
    assert key == "createHookError"
    assert message.startswith("The callbackURL cannot be used: ")
    assert message.endswith(PUBLIC_NOTE)
    assert message == "The callbackURL cannot be used: not an http(s) URL" + PUBLIC_NOTE


def test_hooks_list_is_bbb_webhooks_xml_exactly() -> None:
    """Element by element as bbb-webhooks writes them: eventID only with a filter, the
    flags false, nothing between the hooks."""
    every = SimpleNamespace(
        id="1", callback_url="https://a.test/x", meeting_id="m1", event_ids=None
    )
    some = SimpleNamespace(
        id="2",
        callback_url="https://b.test/]]>",
        meeting_id="m2",
        event_ids=frozenset({"user-joined", "meeting-ended"}),
    )
    assert hooks.listed([every, some]) == (
        "<response><returncode>SUCCESS</returncode><hooks>"
        "<hook><hookID>1</hookID><callbackURL><![CDATA[https://a.test/x]]></callbackURL>"
        "<meetingID><![CDATA[m1]]></meetingID>"
        "<permanentHook>false</permanentHook><rawData>false</rawData></hook>"
        "<hook><hookID>2</hookID>"
        "<callbackURL><![CDATA[https://b.test/]]]]><![CDATA[>]]></callbackURL>"
        "<meetingID><![CDATA[m2]]></meetingID><eventID>meeting-ended,user-joined</eventID>"
        "<permanentHook>false</permanentHook><rawData>false</rawData></hook>"
        "</hooks></response>"
    )
    assert (
        hooks.listed([]) == "<response><returncode>SUCCESS</returncode><hooks></hooks></response>"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        (" , ,", None),
        ("User-Joined, meeting-ended ,user-joined", frozenset({"user-joined", "meeting-ended"})),
        (",".join(f"e{i}" for i in range(64)), frozenset(f"e{i}" for i in range(64))),
        ("a" * 64, frozenset({"a" * 64})),
    ],
)
def test_event_ids(value: str | None, expected: frozenset[str] | None) -> None:
    params = [] if value is None else [("eventID", value)]
    assert hooks.event_ids(params) == expected


@pytest.mark.parametrize("bad", ["a" * 65, "-a", ".a", "a b", "a/b", "é"])
def test_event_ids_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="comma list"):
        hooks.event_ids([("eventID", bad)])


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_hook_id_is_required(value: str | None) -> None:
    params = [] if value is None else [("hookID", value)]
    with pytest.raises(ValidationError) as refused:
        hooks.hook_id(params)
    assert (refused.value.message_key, refused.value.message) == (
        "missingParamHookID",
        "You must specify a hookID in the parameters.",
    )
    assert hooks.hook_id([("hookID", " 7 "), ("hookID", "8")]) == "7"


def test_fixed_refusals() -> None:
    missing = hooks.missing_meeting_id()
    assert (missing.message_key, missing.message) == (
        "missingParamMeetingID",
        "You must provide a meeting ID: this gateway registers hooks for one meeting each; "
        "hooks for all meetings are not offered",
    )
    gone = hooks.missing_hook()
    assert (gone.message_key, gone.message) == (
        "destroyMissingHook",
        "The hook informed was not found.",
    )
    with pytest.raises(ValidationError) as control:
        hooks.checked_meeting_id("room\x01")
    assert (control.value.message_key, control.value.message) == (
        "validationError",
        "Meeting ID cannot contain control characters",
    )
    for ok in ["room-1", "räum\t\n\r", "\ue000"]:
        assert hooks.checked_meeting_id(ok) == ok
    for bad in ["\x00", "\x08", "\x0b", "\x0c", "\x0e", "\x1f", "\ufffe", "\uffff", "\ud800"]:
        with pytest.raises(ValidationError):
            hooks.checked_meeting_id(f"a{bad}b")


# -- proxy.calls.hooks: the callback host resolved at create ----------------------------------

UNREACHABLE = (
    "createHookError",
    "The callbackURL cannot be used: its host does not resolve to public addresses only"
    + PUBLIC_NOTE,
)


def gateway(allow: bool, networks: tuple[str, ...]) -> Any:
    return SimpleNamespace(
        config=SimpleNamespace(
            proxy=SimpleNamespace(allow_private_callbacks=allow),
            webhooks=SimpleNamespace(allowed_callback_networks=networks),
        )
    )


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("https://Bücher.Example:8443/hook?x=1", "xn--bcher-kva.example", 8443),
        ("http://lms.example.com/hook", "lms.example.com", 80),
        ("https://[2001:db8::1]/hook", "2001:db8::1", 443),
    ],
)
async def test_create_asks_the_filter_about_the_callbacks_host_and_port(
    monkeypatch: pytest.MonkeyPatch, url: str, host: str, port: int
) -> None:
    asked: list[tuple[Any, ...]] = []

    async def checked(*args: Any) -> str:
        asked.append(args)
        return "192.0.2.1"

    monkeypatch.setattr(hooks_calls, "checked_address", checked)
    networks = ("10.0.0.0/8",)
    await hooks_calls._check_reachable(gateway(True, networks), url)
    assert asked == [(host, port, True, networks)]
    asked.clear()
    await hooks_calls._check_reachable(gateway(False, ()), url)
    assert asked == [(host, port, False, ())]


async def test_a_host_the_filter_refuses_is_create_hook_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def refused(*args: Any) -> None:
        return None

    monkeypatch.setattr(hooks_calls, "checked_address", refused)
    with pytest.raises(ValidationError) as caught:
        await hooks_calls._check_reachable(gateway(False, ()), "https://lms.example/h")
    assert (caught.value.message_key, caught.value.message) == UNREACHABLE


async def test_a_host_that_does_not_resolve_in_time_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def slow(*args: Any) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(hooks_calls, "checked_address", slow)
    monkeypatch.setattr(hooks_calls, "RESOLVE_TIMEOUT", 0.05)
    with trio.fail_after(5):
        with pytest.raises(ValidationError) as caught:
            await hooks_calls._check_reachable(gateway(True, ()), "https://lms.example/h")
    assert (caught.value.message_key, caught.value.message) == UNREACHABLE
