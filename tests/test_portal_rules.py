"""The portal's decisions without I/O: its log's model, the throttle, cookies, forms, language."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import StateError
from proxy.portal import forms, sessions, texts
from proxy.portal.model import PortalState, Throttle, token_digest
from proxy.portal.service import check_email

KEY = b"k" * 32


def test_the_model_replays_its_records_and_compacts_to_the_same_state() -> None:
    state = PortalState()
    state.apply({"op": "invite", "token": token_digest("t1"), "customer": "acme",
                 "email": "a@acme.example", "expires_at": 100.0})  # fmt: skip
    state.apply({"op": "invite", "token": token_digest("t2"), "customer": "acme",
                 "email": "b@acme.example", "expires_at": 50.0})  # fmt: skip
    state.apply({"op": "accept", "token": token_digest("t1"), "password": "$argon2id$x"})
    state.apply({"op": "logout", "session": "s1", "until": 80.0})
    assert state.invitation("t1", 10.0) is None  # used
    assert state.invitation("t2", 10.0) is not None and state.invitation("t2", 50.0) is None
    assert [a.email for a in state.admins_of("acme")] == ["a@acme.example"]
    again = PortalState()
    for record in state.records():
        again.apply(record)
    assert (again.admins, again.invitations, again.closed) == (
        state.admins, state.invitations, state.closed
    )  # fmt: skip
    state.purge(60.0)
    assert not state.invitations and "s1" in state.closed
    state.purge(90.0)
    assert not state.closed
    state.apply({"op": "remove", "email": "a@acme.example"})
    assert not state.admins
    state.apply({"op": "withdraw", "token": token_digest("t2")})
    state.apply({"op": "withdraw", "token": token_digest("unknown")})


@pytest.mark.parametrize(
    "record",
    [
        {},
        [],
        {"op": "grant"},
        {"op": "invite", "token": "x", "customer": "acme", "email": "a@b.cd"},
        {"op": "invite", "token": "", "customer": "acme", "email": "a@b.cd", "expires_at": 1},
        {"op": "invite", "token": "x", "customer": "acme", "email": "a@b.cd", "expires_at": True},
        {"op": "accept", "token": "unknown", "password": "$argon2id$x"},
        {"op": "admin", "email": "a@b.cd", "customer": 7, "password": "p"},
        {"op": "logout", "session": "s"},
    ],
)
def test_a_record_the_model_does_not_know_is_a_state_error(record: Any) -> None:
    with pytest.raises(StateError) as caught:
        PortalState().apply(record)
    assert "$argon2" not in str(caught.value)


def test_the_throttle_locks_after_the_limit_and_forgets_after_the_lockout() -> None:
    throttle = Throttle(limit=3, lockout=60.0, max_keys=2)
    for t in (0.0, 1.0):
        throttle.failed("a", t)
    assert not throttle.locked("a", 2.0)
    throttle.failed("a", 2.0)
    assert throttle.locked("a", 3.0) and throttle.locked("a", 61.0)
    assert not throttle.locked("a", 62.0)  # the lockout has passed: counting starts again
    throttle.failed("a", 70.0)
    assert not throttle.locked("a", 71.0)
    throttle.succeeded("a")
    for key in ("b", "c", "d"):
        for t in (0.0, 1.0, 2.0):
            throttle.failed(key, t)
    assert not throttle.locked("b", 3.0) and throttle.locked("d", 3.0)  # bounded: b went


def test_a_session_cookie_opens_only_with_its_key_and_before_its_end() -> None:
    session = sessions.new_session("a@acme.example", "acme", "$argon2id$x", until=100.0)
    sealed = sessions.sealed(KEY, session)
    assert sessions.opened(KEY, sealed, 99.0) == session
    assert sessions.opened(KEY, sealed, 100.0) is None
    assert sessions.opened(b"other" * 8, sealed, 1.0) is None
    payload, mac = sealed.split(".")
    forged = sessions.sealed(b"other" * 8, session).split(".")[1]
    for bad in (None, "", "x", f"{payload}.{forged}", f"{payload[:-1]}A.{mac}", "é.é",
                f"{payload}.{mac}.x", "a" * 5000, "e30." + mac):  # fmt: skip
        assert sessions.opened(KEY, bad, 1.0) is None, bad
    token = sessions.csrf_token(KEY, session.sid)
    assert sessions.csrf_ok(KEY, session.sid, token)
    assert not sessions.csrf_ok(KEY, "other", token)
    assert not sessions.csrf_ok(KEY, None, token) and not sessions.csrf_ok(KEY, session.sid, None)


def test_the_defaults_form() -> None:
    ok = forms.defaults({"default_max_participants": " 20 ", "default_duration": "90"}, 20)
    assert ok.values == {"default_max_participants": 20, "default_duration": 90} and not ok.errors
    bad = forms.defaults({"default_max_participants": "21", "default_duration": "٣"}, 20)
    assert bad.errors == {
        "default_max_participants": ("above_subscription", {"max": 20}),
        "default_duration": ("whole_number", {}),
    }
    for text in ("", "+5", "1e3", "5.0", "0", "-1", "9" * 20, "1_000"):
        assert "default_duration" in forms.defaults({"default_duration": text}, 5).errors, text
    assert (
        forms.defaults({"default_duration": str(forms.MAX_DURATION + 1)}, 5).errors[
            "default_duration"
        ][0]
        == "too_long"
    )


@pytest.mark.parametrize(
    ("cookie", "header", "expected"),
    [
        (None, None, "en"),
        (None, "de-DE,de;q=0.9,en;q=0.8", "de"),
        (None, "en-US,en;q=0.9,de;q=0.8", "en"),
        (None, "fr-FR,fr;q=0.9,de;q=0.5", "de"),
        (None, "de;q=0.2,en;q=0.9", "en"),
        (None, "de;q=nan", "en"),
        (None, "*", "en"),
        ("de", "en", "de"),
        ("xx", "de", "de"),
    ],
)
def test_the_language(cookie: str | None, header: str | None, expected: str) -> None:
    assert texts.language(cookie, header) == expected


def test_both_languages_have_every_text() -> None:
    assert set(texts.EN) == set(texts.DE)
    assert not set(texts.EN) & set(dir(dict))  # a key like "copy" would be a method in Jinja


@pytest.mark.parametrize("value", ["a@b.cd", " A@Example.ORG "])
def test_an_email_address(value: str) -> None:
    assert check_email(value) == value.strip().lower()


@pytest.mark.parametrize("value", ["", "a", "a@b", "a b@c.de", "@b.cd", "a@@b.cd", 7, None])
def test_not_an_email_address(value: object) -> None:
    with pytest.raises(ValueError):
        check_email(value)
