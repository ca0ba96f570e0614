"""Customer administrators, their invitations and closed sessions; no I/O.

:class:`PortalState` is the pure model of the ``portal`` log (:mod:`proxy.store`):
:meth:`~PortalState.apply` one record (total: a record it does not know is a
:class:`~proxy.errors.StateError`), :meth:`~PortalState.records` the records that
rebuild it (what compaction writes).  Records (JSON objects)::

    {"op": "invite", "token": SHA256, "customer": ID, "email": E, "expires_at": T}
    {"op": "accept", "token": SHA256, "password": ARGON2}   # the invitee's password, hashed
    {"op": "admin", "email": E, "customer": ID, "password": ARGON2}  # compaction's form
    {"op": "remove", "email": E}                            # an administrator removed
    {"op": "withdraw", "token": SHA256}                     # an invitation withdrawn
    {"op": "logout", "session": SID, "until": T}            # a session closed before its end
    {"op": "key", "key": HEX}                               # the cookie key (several instances)

An invitation is kept by the SHA-256 of its token, never the token: the log cannot open
the door it describes.  Accepting it makes (or, for an administrator of the same
customer, resets) the administrator and uses the invitation up.  One e-mail address is
the administrator of one customer.  Times are epoch seconds.  A ``key`` record is only
written by gateway instances sharing one Redis without ``[portal] cookie_secret``: the
cookie key they all use (the first one in the log counts).

:class:`Throttle` counts failed logins per key (an account, a client address); it lives
in memory only (see docs/decisions.md, "Customer portal").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import StateError

_OPS = ("invite", "accept", "admin", "remove", "withdraw", "logout", "key")


def token_digest(token: str) -> str:
    """What the log keeps of an invitation token (hex SHA-256)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True, slots=True)
class Invitation:
    customer: str
    email: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Admin:
    email: str
    customer: str
    password_hash: str = field(repr=False)


class PortalState:
    """Administrators by e-mail, open invitations by token digest, closed sessions."""

    def __init__(self) -> None:
        self.admins: dict[str, Admin] = {}
        self.invitations: dict[str, Invitation] = {}
        self.closed: dict[str, float] = {}  # session id -> when it would have ended
        self.key: str | None = None  # the shared cookie key, hex (several instances)

    def apply(self, record: Mapping[str, Any]) -> None:
        """Apply one record.  Error handling: ``StateError`` for a record it does not know
        (the message names the op only: a record may hold a password hash)."""
        if not isinstance(record, Mapping) or record.get("op") not in _OPS:
            op = record.get("op") if isinstance(record, Mapping) else None
            raise StateError(f"unknown portal record (op={op!r:.20})")
        op = record["op"]
        if op == "invite":
            digest = _text(record, "token")
            self.invitations[digest] = Invitation(
                _text(record, "customer"), _text(record, "email"), _time(record, "expires_at")
            )
        elif op == "accept":
            invitation = self.invitations.pop(_text(record, "token"), None)
            if invitation is None:
                raise StateError("portal record: accept of an unknown invitation")
            password = _text(record, "password")
            self.admins[invitation.email] = Admin(invitation.email, invitation.customer, password)
        elif op == "admin":
            email = _text(record, "email")
            self.admins[email] = Admin(email, _text(record, "customer"), _text(record, "password"))
        elif op == "remove":
            self.admins.pop(_text(record, "email"), None)
        elif op == "withdraw":
            self.invitations.pop(_text(record, "token"), None)
        elif op == "key":
            key = _text(record, "key")
            self.key = key if self.key is None else self.key
        else:
            self.closed[_text(record, "session")] = _time(record, "until")

    def records(self) -> Iterator[dict[str, Any]]:
        """Records that rebuild this state from nothing (invitations before acceptance)."""
        if self.key is not None:
            yield {"op": "key", "key": self.key}
        for digest, inv in sorted(self.invitations.items()):
            yield {"op": "invite", "token": digest, "customer": inv.customer,
                   "email": inv.email, "expires_at": inv.expires_at}  # fmt: skip
        for email, admin in sorted(self.admins.items()):
            yield {"op": "admin", "email": email, "customer": admin.customer,
                   "password": admin.password_hash}  # fmt: skip
        for session, until in sorted(self.closed.items()):
            yield {"op": "logout", "session": session, "until": until}

    def purge(self, now: float) -> None:
        """Forget invitations and closed sessions that have expired."""
        self.invitations = {d: i for d, i in self.invitations.items() if i.expires_at > now}
        self.closed = {s: t for s, t in self.closed.items() if t > now}

    def invitation(self, token: str, now: float) -> Invitation | None:
        """The open invitation ``token`` opens at ``now``, if any."""
        found = self.invitations.get(token_digest(token))
        return found if found is not None and found.expires_at > now else None

    def admins_of(self, customer: str) -> list[Admin]:
        return [a for _, a in sorted(self.admins.items()) if a.customer == customer]


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise StateError(f"portal record ({record.get('op')}): {key} missing")
    return value


def _time(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StateError(f"portal record ({record.get('op')}): {key} missing")
    return float(value)


# -- login throttling ------------------------------------------------------------------------


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class Throttle:
    """``limit`` failures in a row under one key lock it for ``lockout`` seconds.

    A success clears the key; a lockout that has passed starts the count again.  At most
    ``max_keys`` keys are remembered (the stalest go first), so a flood of made-up
    accounts cannot grow it without bound.
    """

    def __init__(self, limit: int, lockout: float, max_keys: int = 10_000) -> None:
        self.limit, self.lockout, self.max_keys = limit, lockout, max_keys
        self._failures: dict[str, _Failures] = {}

    def locked(self, key: str, now: float) -> bool:
        entry = self._failures.get(key)
        if entry is None:
            return False
        if now - entry.last >= self.lockout:
            del self._failures[key]
            return False
        return entry.count >= self.limit

    def failed(self, key: str, now: float) -> None:
        entry = self._failures.pop(key, None)
        count = 1 if entry is None or now - entry.last >= self.lockout else entry.count + 1
        self._failures[key] = _Failures(count, now)  # re-inserted: the freshest last
        while len(self._failures) > self.max_keys:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
