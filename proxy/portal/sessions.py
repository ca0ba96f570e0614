"""Signed session cookies and CSRF tokens for the portal; no I/O.

A session cookie is ``base64url(JSON) "." base64url(HMAC-SHA256)`` over a
:class:`Session`: who (e-mail, customer), until when, a random session id (a logout
closes it durably, :mod:`proxy.portal.model`) and a fingerprint of the password hash
(a new password ends every older session).  The server keeps no session table.

A CSRF token is an HMAC of the purpose ``"csrf"`` and a binding: the session id when
logged in, else the value of a random pre-login cookie (login and invitation forms).
A form posted without the token of its binding is refused.

Error handling: :func:`opened` returns None for anything that is not a cookie this key
signed and that is still valid; nothing here raises for what a browser sends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    email: str
    customer: str
    expires_at: float
    password: str  # fingerprint of the password hash it was opened with

    def valid(self, now: float) -> bool:
        return now < self.expires_at


def new_session(email: str, customer: str, password_hash: str, until: float) -> Session:
    return Session(secrets.token_urlsafe(16), email, customer, until, fingerprint(password_hash))


def fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def sealed(key: bytes, session: Session) -> str:
    """The cookie value for ``session``."""
    body = orjson.dumps(
        {
            "sid": session.sid,
            "email": session.email,
            "customer": session.customer,
            "exp": session.expires_at,
            "pw": session.password,
        }
    )
    payload = _b64(body)
    return f"{payload}.{_b64(_mac(key, b'session', payload.encode()))}"


def opened(key: bytes, value: str | None, now: float) -> Session | None:
    """The session a cookie value holds, if this key signed it and it has not expired."""
    if not value or len(value) > 4096 or value.count(".") != 1:
        return None
    payload, mac = value.split(".")
    try:
        expected = _b64(_mac(key, b"session", payload.encode("ascii")))
        if not hmac.compare_digest(expected, mac):
            return None
        data = orjson.loads(_unb64(payload))
        session = Session(
            str(data["sid"]), str(data["email"]), str(data["customer"]), float(data["exp"]),
            str(data["pw"]),
        )  # fmt: skip
    except (UnicodeEncodeError, ValueError, KeyError, TypeError, binascii.Error):
        return None
    return session if session.valid(now) else None


def csrf_token(key: bytes, binding: str) -> str:
    return _b64(_mac(key, b"csrf", binding.encode("utf-8", "replace")))


def csrf_ok(key: bytes, binding: str | None, token: str | None) -> bool:
    """Whether ``token`` is the CSRF token of ``binding`` (constant time)."""
    if not binding or not token:
        return False
    return hmac.compare_digest(csrf_token(key, binding), token)


def _mac(key: bytes, purpose: bytes, data: bytes) -> bytes:
    return hmac.new(key, purpose + b"\0" + data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
