"""The privacy filter (issue 9 item 3): proxy.webhooks.privacy.scrubbed.

Every event of the fixture set (bbb-webhooks' mapped and raw example events, the webhooks
docs' callback bodies; tests/fixtures/bbb/SOURCES.md) keeps its shape and loses exactly the
fields docs/decisions.md ("Webhooks: the privacy filter") lists for it; two events the
fixtures lack (user-joined with the client fields bbb-api.md §3 lists, rap-publish-ended)
are built here after bbb-webhooks' mapping.  Then hypothesis: addresses and tokens injected
anywhere under any key do not survive, non-personal values do, and no JSON value makes the
filter raise.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.webhooks.privacy import (
    IP_MARK,
    MAX_DEPTH,
    PSEUDONYM_PREFIX,
    is_id_key,
    is_secret_key,
    pseudonym,
    scrub_text,
    scrubbed,
)

FIXTURES = Path(__file__).parent / "fixtures" / "bbb"
type Path_ = tuple[str | int, ...]


def _lines(name: str) -> list[dict[str, Any]]:
    text = (FIXTURES / "bbb-webhooks" / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _doc_callback_events() -> list[dict[str, Any]]:
    """The ``event=`` line of each callback body the webhooks docs show."""
    found = []
    for path in sorted((FIXTURES / "bigbluebutton-webhooks-docs").glob("callback-body-*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("event="):
                found.append(json.loads(line.removeprefix("event=")))
    return found


MAPPED = _lines("mapped-events.json")
RAW = _lines("raw-events.json")
DOCS = _doc_callback_events()

STREAM_HASH = "0e2313d7c9d39860e908e20cd196adc3a6b8bf5c16110fdadc63741f48193c19"
REMOVED = object()  # the field's value becomes the empty value of its type
OBFUSCATED_STREAM = "w_xfsb9gxtlfom_" + pseudonym(STREAM_HASH)

# event id (mapped: data.id; raw: envelope.name) -> {path: what the filter makes of it}.
# The rows of docs/decisions.md's table; every field not listed must come out unchanged.
CHANGES: dict[str, dict[Path_, object]] = {
    "meeting-created": {
        ("data", "attributes", "meeting", "moderator-pass"): REMOVED,
        ("data", "attributes", "meeting", "viewer-pass"): REMOVED,
    },
    "user-cam-broadcast-start": {("data", "attributes", "user", "stream"): OBFUSCATED_STREAM},
    "user-cam-broadcast-end": {("data", "attributes", "user", "stream"): OBFUSCATED_STREAM},
    "MeetingCreatedEvtMsg": {
        ("core", "body", "props", "password", "moderatorPass"): REMOVED,
        ("core", "body", "props", "password", "viewerPass"): REMOVED,
        ("core", "body", "props", "password", "learningDashboardAccessToken"): REMOVED,
    },
    "UserJoinedVoiceConfToClientEvtMsg": {("core", "body", "callerNum"): REMOVED},
    "UserBroadcastCamStartedEvtMsg": {("core", "body", "stream"): OBFUSCATED_STREAM},
    "UserBroadcastCamStoppedEvtMsg": {("core", "body", "stream"): OBFUSCATED_STREAM},
}


def _event_id(event: dict[str, Any]) -> str:
    return str(event.get("data", {}).get("id") or event["envelope"]["name"])


def _get(value: Any, path: Path_) -> Any:
    for step in path:
        value = value[step]
    return value


def _set(value: Any, path: Path_, new: object) -> None:
    _get(value, path[:-1])[path[-1]] = new


def _empty_like(value: object) -> object:
    return {str: "", bool: False, int: 0, float: 0}[type(value)]


def _shape(value: object) -> object:
    """Keys, list lengths and JSON types, without the values."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return type(value).__name__


FIXTURE_EVENTS = [pytest.param(e, id=f"mapped-{i}-{_event_id(e)}") for i, e in enumerate(MAPPED)]
FIXTURE_EVENTS += [pytest.param(e, id=f"raw-{i}-{_event_id(e)}") for i, e in enumerate(RAW)]
FIXTURE_EVENTS += [pytest.param(e, id=f"docs-{i}-{_event_id(e)}") for i, e in enumerate(DOCS)]


def test_the_fixtures_hold_every_event_of_the_set() -> None:
    assert len(MAPPED) == 24 and len(RAW) == 24 and len(DOCS) == 2
    assert {_event_id(e) for e in MAPPED} >= {"meeting-created", "user-joined", "meeting-ended"}


@pytest.mark.parametrize("event", FIXTURE_EVENTS)
def test_a_fixture_event_keeps_its_shape_and_loses_its_listed_fields(
    event: dict[str, Any],
) -> None:
    original = copy.deepcopy(event)
    out = scrubbed(event)
    assert event == original, "the filter must not change its input"
    assert _shape(out) == _shape(event)
    expected = copy.deepcopy(event)
    for path, becomes in CHANGES.get(_event_id(event), {}).items():
        value = _get(event, path)
        assert value not in ("", None), f"{path}: the fixture must carry something to remove"
        _set(expected, path, _empty_like(value) if becomes is REMOVED else becomes)
        assert _get(out, path) != value, path
    assert out == expected


def test_every_listed_field_is_in_some_fixture_event() -> None:
    """A row of the table that matches no fixture event would test nothing."""
    ids = {_event_id(e) for e in MAPPED + RAW}
    assert set(CHANGES) <= ids


def test_a_camera_stream_keeps_one_pseudonym_from_start_to_end() -> None:
    streams = {
        _event_id(e): _get(scrubbed(e), ("data", "attributes", "user", "stream"))
        for e in MAPPED
        if _event_id(e).startswith("user-cam-broadcast")
    }
    assert streams["user-cam-broadcast-start"] == streams["user-cam-broadcast-end"]
    assert STREAM_HASH not in json.dumps(streams)


# --- the personal data the fixtures lack, built after bbb-webhooks' mapping -------------------

USER_JOINED: dict[str, Any] = {
    "data": {
        "type": "event",
        "id": "user-joined",
        "attributes": {
            "meeting": {
                "internal-meeting-id": "8043c8452ae9830aac14c517adff3839dbd9228f-1698771157700",
                "external-meeting-id": "5bd5b4c1b8d4f8e1c0a9f2e3d4c5b6a7980716f5-2-3",
            },
            "user": {
                "internal-user-id": "w_xfsb9gxtlfom",
                "external-user-id": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
                "name": "John Doe",
                "role": "MODERATOR",
                "presenter": False,
                "guest": False,
                "ip-address": "203.0.113.7",
                "user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101",
                "referer": "https://lms.example.edu/mod/bigbluebuttonbn/view.php?id=42",
                "session-token": "ai1wqj8wb6s7rnra",
                "userdata": {
                    "userdata-bbb_auto_join_audio": "true",
                    "userdata-lms_token": "q3xk9z",
                    "userdata-bbb_custom_style_url": "https://cdn.example.edu/s.css?sig=abc",
                    "userdata-origin": "joined from 2001:db8::7 via proxy",
                    "userdata-moodle_session": "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg",
                },
            },
        },
        "event": {"ts": 1708381133689},
    }
}
USER_JOINED_CHANGES: dict[Path_, object] = {
    ("data", "attributes", "user", "ip-address"): "",
    ("data", "attributes", "user", "user-agent"): "",
    ("data", "attributes", "user", "referer"): "",
    ("data", "attributes", "user", "session-token"): "",
    ("data", "attributes", "user", "userdata", "userdata-lms_token"): "",
    ("data", "attributes", "user", "userdata", "userdata-bbb_custom_style_url"): (
        "https://cdn.example.edu/s.css?sig="
    ),
    ("data", "attributes", "user", "userdata", "userdata-origin"): (
        f"joined from {IP_MARK} via proxy"
    ),
    ("data", "attributes", "user", "userdata", "userdata-moodle_session"): "",
}

RECORD_ID = "8043c8452ae9830aac14c517adff3839dbd9228f-1698771157700"
PLAYBACK_URL = f"https://bbb.example.com/playback/presentation/2.3/{RECORD_ID}"
RAP_PUBLISH_ENDED: dict[str, Any] = {
    "data": {
        "type": "event",
        "id": "rap-publish-ended",
        "attributes": {
            "meeting": {"internal-meeting-id": RECORD_ID, "external-meeting-id": "random-9019868"},
            "record-id": RECORD_ID,
            "success": True,
            "step-time": 1480,
            "workflow": "presentation",
            "recording": {
                "name": "random-9019868",
                "is-breakout": "false",
                "start-time": 1698771157700,
                "end-time": 1698771310209,
                "size": 1096345,
                "raw-size": 5012345,
                "metadata": {
                    "isBreakout": "false",
                    "meetingName": "random-9019868",
                    "bbb-context": "Course 101",
                    "lms-session": "4b3f2a1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a",
                },
                "playback": {"format": "presentation", "link": PLAYBACK_URL, "processing_time": 9},
                "download": {},
            },
        },
        "event": {"ts": 1698771320000},
    }
}
RAP_CHANGES: dict[Path_, object] = {
    ("data", "attributes", "recording", "metadata", "lms-session"): "",
}


@pytest.mark.parametrize(
    ("event", "changes"),
    [(USER_JOINED, USER_JOINED_CHANGES), (RAP_PUBLISH_ENDED, RAP_CHANGES)],
    ids=["user-joined-with-client", "rap-publish-ended"],
)
def test_a_built_event_loses_its_listed_fields(
    event: dict[str, Any], changes: dict[Path_, object]
) -> None:
    expected = copy.deepcopy(event)
    for path, becomes in changes.items():
        _set(expected, path, becomes)
    out = scrubbed(event)
    assert _shape(out) == _shape(event)
    assert out == expected


# --- the rules one by one ------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "ip-address", "ip", "remoteAddress", "X-Forwarded-For", "user-agent", "userAgent",
        "referer", "Referrer", "session-token", "sessionToken", "auth_token", "authToken",
        "learningDashboardAccessToken", "moderator-pass", "viewer-pass", "moderatorPass",
        "viewerPass", "moderatorPW", "attendeePW", "password", "secret", "sharedSecret",
        "checksum", "cookie", "Authorization", "callerNum", "userdata-lms_token", "jwt",
    ],
)  # fmt: skip
def test_keys_that_name_addresses_clients_and_credentials(key: str) -> None:
    assert is_secret_key(key)
    assert scrubbed({key: "x"}) == {key: ""}


@pytest.mark.parametrize(
    "key",
    [
        "name", "role", "presenter", "guest", "authed", "authenticatedGuest", "key",
        "external-user-id", "internal-user-id", "external-meeting-id", "stream", "emoji",
        "raise-hand", "message", "voice-conf", "dial-number", "metadata", "userdata",
        "answerIds", "passive",
    ],
)  # fmt: skip
def test_keys_that_carry_what_the_customer_needs(key: str) -> None:
    assert not is_secret_key(key)
    assert scrubbed({key: "Ada"}) == {key: "Ada"}


def test_a_removed_field_keeps_its_json_type_and_its_shape() -> None:
    event = {"password": {"moderatorPass": "mp", "n": 3, "on": True, "list": [1, "a"]}, "pw": 7}
    assert scrubbed(event) == {
        "password": {"moderatorPass": "", "n": 0, "on": False, "list": [0, ""]},
        "pw": 0,
    }


@pytest.mark.parametrize(
    ("text", "becomes"),
    [
        ("10.0.0.1", ""),
        (" 192.168.1.20 ", ""),
        ("::1", ""),
        ("[2001:db8::1]", ""),
        ("fe80::1%eth0", ""),
        ("::ffff:10.1.2.3", ""),
        ("client 10.1.2.3:5060 rejected", f"client {IP_MARK}:5060 rejected"),
        ("from [2001:db8::1]:443.", f"from [{IP_MARK}]:443."),
        ("addr:fe80::1 up", f"addr{IP_MARK} up"),
        ("host.10.0.0.1", f"host.{IP_MARK}"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64)", ""),
        ("https://ann:hunter2@lms.example/x", "https://lms.example/x"),
        ("https://lms.example/x?a=1&token=abc&sessionToken=def", "https://lms.example/x?a=1&token=&sessionToken="),
        # kept: not an address, not a token
        ("13:52:37", "13:52:37"),
        ("Tue Oct 31 13:52:37 BRT 2023", "Tue Oct 31 13:52:37 BRT 2023"),
        ("version 2.7.3 or 1.2.3.4.5", f"version 2.7.3 or {IP_MARK}.5"),
        ("300.1.2.3.4 and 2023.10.0.0.1", f"300.{IP_MARK} and 2023.{IP_MARK}"),
        ("613-555-1234", "613-555-1234"),
        ("aa:bb:cc", "aa:bb:cc"),
        ("Q&A=yes", "Q&A=yes"),
        ("w_xfsb9gxtlfom", "w_xfsb9gxtlfom"),
        ("1698771232706-9idm9pxf", "1698771232706-9idm9pxf"),
        ("182c133e-5512-4695-be20-8cc760dc1595", "182c133e-5512-4695-be20-8cc760dc1595"),
        (RECORD_ID, RECORD_ID),
        (f"{RECORD_ID}/1/1698771266437", f"{RECORD_ID}/1/1698771266437"),
        ("presentationUploadExternalDescription", "presentationUploadExternalDescription"),
        ("lecture_notes_2023_final_version_v2", "lecture_notes_2023_final_version_v2"),
    ],
)  # fmt: skip
def test_text_rules(text: str, becomes: str) -> None:
    assert scrub_text(text) == becomes


@pytest.mark.parametrize(
    "token",
    [
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJtZWV0aW5nX2lkIjoiYSJ9.c2lnbmF0dXJlLXNpZw",
        "0e2313d7c9d39860e908e20cd196adc3",  # 32 hex digits
        "2BE5820127B5F8EFC050FA003E83EF53FA62C356",
        "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg==",
        "xR4_tQ9-zLm2VbN8kJ7hG6fD5sA3pO1iUyTrEwQ0",
    ],
)
def test_tokens_become_a_stable_pseudonym_wherever_they_are(token: str) -> None:
    assert scrub_text(token) == pseudonym(token)
    assert scrub_text(f"see ({token}) now") == f"see ({pseudonym(token)}) now"
    assert pseudonym(token).startswith(PSEUDONYM_PREFIX)
    assert scrub_text(pseudonym(token)) == pseudonym(token)


def test_identifiers_keep_their_random_look_but_not_addresses() -> None:
    moodle = "5bd5b4c1b8d4f8e1c0a9f2e3d4c5b6a7980716f5-2-3"
    assert is_id_key("external-meeting-id") and is_id_key("meetingID") and is_id_key("extId")
    assert scrubbed({"external-meeting-id": moodle}) == {"external-meeting-id": moodle}
    assert scrubbed({"notes": moodle}) != {"notes": moodle}
    assert scrubbed({"meetingId": "room 10.0.0.1"}) == {"meetingId": f"room {IP_MARK}"}


def test_keys_are_scrubbed_like_values() -> None:
    assert scrubbed({"10.0.0.9": True, "ok": 1}) == {"": True, "ok": 1}


def test_containers_deeper_than_the_limit_are_cut() -> None:
    deep: object = ["10.0.0.1"]
    for _ in range(5000):
        deep = {"x": [deep]}
    out = scrubbed(deep)
    assert "10.0.0.1" not in json.dumps(out)
    # MAX_DEPTH levels of containers are kept whole; one level more is there, emptied
    assert _depth(out) == MAX_DEPTH + 1
    assert _depth(_nested(MAX_DEPTH - 1)) == MAX_DEPTH
    assert scrubbed(_nested(MAX_DEPTH - 1)) == _nested(MAX_DEPTH - 1)
    assert scrubbed(_nested(MAX_DEPTH)) != _nested(MAX_DEPTH)
    assert _depth(scrubbed(_nested(MAX_DEPTH))) == MAX_DEPTH + 1


def _nested(levels: int) -> object:
    value: object = ["w_xfsb9gxtlfom"]
    for _ in range(levels):
        value = [value]
    return value


def _depth(value: object) -> int:
    """How many containers deep ``value`` goes (a scalar: 0)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def test_what_json_cannot_hold() -> None:
    assert scrubbed(("10.0.0.1", 2)) == ["", 2]
    assert scrubbed({1: "a", "b": {1, 2}, "c": b"x", "d": object()}) == {
        "b": None,
        "c": None,
        "d": None,
    }
    assert scrubbed(float("inf")) == float("inf")


def test_long_runs_of_address_characters_cost_linear_time() -> None:
    # A CPU budget, not a wait: runs far beyond any event's are handled in bounded time.
    started = time.process_time()
    texts = [
        "1:" * 200_000,
        ":" * 400_000,
        ("ab:" * 80 + " ") * 2000,
        "9." * 200_000,
        "eyJ" * 100_000,  # a JWT may start only where its run starts
        ".eyJab" * 50_000,
        "?a" * 100_000,  # so may a query parameter's name
        "&a" * 100_000 + "=b",
        "://a" * 100_000,
        ("aB3_" * 7 + " ") * 10_000,  # base64 runs just too short to be tokens
    ]
    for text in texts:
        scrub_text(text)
    assert time.process_time() - started < 5


def test_long_digit_runs_are_no_octets_and_raise_nothing() -> None:
    # int() refuses more than 4300 digits: the octets are read with parse_int
    digits = "9" * 5000
    assert scrub_text(f"1.1.1.{digits}") == f"1.1.1.{pseudonym(digits)}"
    assert scrub_text(f"{digits}.1.1.1.1") == f"{pseudonym(digits)}.{IP_MARK}"


# --- hypothesis ----------------------------------------------------------------------------

SEPARATORS = st.sampled_from([" ", "\n", "/", "=", ",", ";", "(", ")", "[", "]", '"', ".", ":"])


def _keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        yield from value
        for item in value.values():
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


FIXTURE_KEYS = sorted({key for event in MAPPED + RAW for key in _keys(event)})
WORD = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12)
SAFE_KEYS = st.one_of(st.sampled_from(FIXTURE_KEYS), WORD).filter(
    lambda k: not is_secret_key(k) and not is_id_key(k)
)
SAFE_TEXT = st.one_of(
    st.lists(WORD, min_size=1, max_size=6).map(" ".join),
    st.sampled_from(
        [
            "meeting-created", "user-joined", "chat-group-message-sent", "rap-publish-ended",
            "MAIN-PUBLIC-GROUP-CHAT", "random-9019868", "w_xfsb9gxtlfom", "MODERATOR",
            "Tue Oct 31 13:52:37 BRT 2023", "613-555-1234", "71347", "%%CONFNAME%%", "🙁",
            RECORD_ID, f"{RECORD_ID}/1/1698771266437", "1698771232706-9idm9pxf",
            "182c133e-5512-4695-be20-8cc760dc1595", "version 2.7", "",
        ]
    ),
)  # fmt: skip
SAFE_SCALARS = st.one_of(
    SAFE_TEXT,
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
SAFE_JSON = st.recursive(
    SAFE_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(SAFE_KEYS, inner, max_size=5),
    max_leaves=40,
)


def _b64_token(raw: bytes, url: bool) -> str:
    text = (base64.urlsafe_b64encode if url else base64.b64encode)(raw).decode()
    return text.rstrip("=") if url else text


HEX_TOKENS = st.text("0123456789abcdefABCDEF", min_size=32, max_size=96)
# Tokens are random: hypothesis's "simplest" bytes (all zero) are no token's.
B64_TOKENS = st.builds(_b64_token, st.binary(min_size=24, max_size=64), st.booleans()).filter(
    lambda t: (
        any(c.isupper() for c in t) and any(c.islower() for c in t) and any(c.isdigit() for c in t)
    )
)
JWTS = st.builds(
    lambda claims, sig: ".".join(
        base64.urlsafe_b64encode(part).decode().rstrip("=")
        for part in (b'{"alg":"HS256","typ":"JWT"}', json.dumps(claims).encode(), sig)
    ),
    st.dictionaries(WORD, WORD, max_size=3),
    st.binary(min_size=0, max_size=32),
)
TOKENS = st.one_of(HEX_TOKENS, B64_TOKENS, JWTS)
ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:443"),
    st.ip_addresses(v=4).map(lambda a: f"{a}:5060"),
)


def _containers(value: object, path: Path_ = ()) -> Iterator[Path_]:
    if isinstance(value, (dict, list)):
        yield path
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            yield from _containers(item, (*path, key))


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@st.composite
def _with_secrets(draw: st.DrawFn) -> tuple[object, list[str], list[str]]:
    """A JSON tree with addresses and tokens put in at random places, under random keys,
    alone or inside text; the addresses and the tokens put in."""
    tree: object = {"data": draw(SAFE_JSON)}
    addresses: list[str] = []
    tokens: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        is_token = draw(st.booleans())
        secret = draw(TOKENS if is_token else ADDRESSES)
        (tokens if is_token else addresses).append(secret)
        if draw(st.booleans()):
            value = secret
        else:
            before, after = draw(SAFE_TEXT), draw(SAFE_TEXT)
            value = f"{before}{draw(SEPARATORS)}{secret}{draw(SEPARATORS)}{after}"
        where = _get(tree, draw(st.sampled_from(list(_containers(tree)))))
        if isinstance(where, list):
            where.insert(draw(st.integers(0, len(where))), value)
        else:
            # identifiers may look like hex or base64 (they are kept); never like addresses
            keys = SAFE_KEYS if is_token else st.one_of(SAFE_KEYS, st.sampled_from(FIXTURE_KEYS))
            where[draw(keys)] = value
    return tree, addresses, tokens


def _address_core(address: str) -> str:
    return address.removeprefix("[").split("]:")[0].removesuffix(":443").removesuffix(":5060")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_with_secrets())
def test_no_address_or_token_survives_anywhere(case: tuple[object, list[str], list[str]]) -> None:
    tree, addresses, tokens = case
    out = scrubbed(tree)
    seen = "\x00".join(_strings(out))
    for address in addresses:
        assert _address_core(address) not in seen, address
    for token in tokens:
        # not whole, and no 12-character piece of it either
        for i in range(max(1, len(token) - 11)):
            assert token[i : i + 12] not in seen, token


@settings(max_examples=300, deadline=None)
@given(SAFE_JSON)
def test_non_personal_values_survive_unchanged(tree: object) -> None:
    assert scrubbed(tree) == tree


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(k for k in FIXTURE_KEYS if is_id_key(k))),
        st.one_of(SAFE_TEXT, HEX_TOKENS, st.uuids().map(str)),
    )
)
def test_identifiers_survive_unchanged(ids: dict[str, str]) -> None:
    assert scrubbed(ids) == ids


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=60,
)


def _same_shape(before: object, after: object) -> None:
    if isinstance(before, dict):
        assert isinstance(after, dict)
        assert set(after) == {scrub_text(key) for key in before}
        names = [scrub_text(key) for key in before]
        for key, item in before.items():
            if names.count(scrub_text(key)) == 1:  # merged keys: the last one wins
                _same_shape(item, after[scrub_text(key)])
    elif isinstance(before, list):
        assert isinstance(after, list) and len(after) == len(before)
        for x, y in zip(before, after, strict=True):
            _same_shape(x, y)
    else:
        assert type(after) is type(before) or (before is None) is (after is None)


@settings(max_examples=200, deadline=None)
@given(ANY_JSON)
def test_never_raises_and_keeps_the_shape_of_any_json_value(value: object) -> None:
    out = scrubbed(value)
    json.dumps(out)  # still JSON
    _same_shape(value, out)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        SAFE_SCALARS | TOKENS | ADDRESSES,
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=30,
    )
)
def test_filtering_twice_changes_nothing_more(value: object) -> None:
    once = scrubbed(value)
    assert scrubbed(once) == once
