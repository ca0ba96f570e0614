"""The portal's thin service: invitations, logins and logouts, durable on the ``portal`` log.

Each change is applied to :class:`~proxy.portal.model.PortalState`, appended and flushed
before it is answered (:mod:`proxy.store`).  Passwords are hashed with argon2id
(argon2-cffi) in a worker thread, at most two at a time, so a login never blocks the
event loop; a password is never logged or kept.  Failed logins are counted per account
and per client address (:class:`~proxy.portal.model.Throttle`).

Several gateway instances on one Redis (``[store] kind = "redis"``): the log is a
:class:`~proxy.store.shared.Replica`; each change is committed in the stream's order
(:meth:`~proxy.store.shared.Replica.commit`, checked on the caught-up state: an
invitation accepted on another instance meanwhile is refused here), and the others'
changes are followed, so administrators, invitations and logouts are the same on every
instance.  A session cookie opens on every instance when they share the cookie key: the
configured ``cookie_secret``, else one key committed once to the log (a ``key`` record;
until an instance has read it, it uses a key of its own, so a login in its first moments
may have to be made again).  Failed logins are counted in Redis too, for every instance
(:class:`~proxy.portal.failures.SharedFailures`), so a load balancer's instances do not each
allow ``max_login_failures`` tries.

Error handling: :meth:`PortalService.invite`, :meth:`~PortalService.accept` and
:meth:`~PortalService.logout` raise ``StorageUnavailable`` when the change cannot be made
durable, and :class:`Refusal` (with a message key for the page) for what the person got
wrong; :func:`open_portal` raises ``StateError`` naming the file for a log that cannot
be read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from proxy.config import Config, PortalSettings
from proxy.errors import StateError, StorageUnavailable
from proxy.portal.model import Admin, Invitation, PortalState, Throttle, token_digest
from proxy.portal.sessions import Session, fingerprint, new_session
from proxy.store import Json, Log, open_store_log
from proxy.store.local import log_path
from proxy.store.shared import Replica

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.portal.failures import SharedFailures
    from proxy.store.redis import RedisLog

log = logging.getLogger(__name__)

LOG = "portal"
KEY_FILE = "portal-cookie.key"
COMPACT_AFTER = 200
MIN_PASSWORD = 10  # characters
MAX_PASSWORD = 1024  # characters; argon2 hashes anything, a megabyte would still cost
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s.]{2,63}$")


class Refusal(Exception):
    """What a person did wrong: ``key`` names the message (:mod:`proxy.portal.texts`)."""

    def __init__(self, key: str, field: str | None = None) -> None:
        super().__init__(key)
        self.key, self.field = key, field


@dataclass(frozen=True, slots=True)
class Invited:
    token: str  # shown once, in the invitation link
    invitation: Invitation


def check_email(value: object) -> str:
    """An e-mail address, lower-cased.  Error handling: ``ValueError``."""
    if not isinstance(value, str) or not _EMAIL.fullmatch(value.strip()):
        raise ValueError("must be an e-mail address")
    return value.strip().lower()


class PortalService:
    """Administrators, invitations and sessions of the portal."""

    def __init__(
        self,
        settings: PortalSettings,
        state: PortalState,
        store: Log,
        key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.state, self.log, self.key, self.clock = (
            settings, state, store, key, clock
        )  # fmt: skip
        limit, lockout = settings.max_login_failures, settings.login_lockout
        self.by_account = Throttle(limit, lockout)
        self.by_address = Throttle(limit, lockout)
        self._hasher = PasswordHasher()
        self._hashing = trio.CapacityLimiter(2)
        self._dummy = self._hasher.hash(secrets.token_hex(8))  # unknown accounts cost the same
        self._appended = 0
        self.replica = Replica(
            store,
            LOG,
            apply=self._apply_other,
            clear=self._clear,
            records=lambda: self.state.records(),
            changed=self._use_shared_key,
            compact_when_due=False,  # every COMPACT_AFTER changes, below
        )
        self.shared_failures: SharedFailures | None = None
        if self.replica.shared:
            from proxy.portal.failures import SharedFailures  # coredis only on Redis

            redis = cast("RedisLog", store).store
            self.shared_failures = SharedFailures(redis, limit, lockout)

    # -- changes -------------------------------------------------------------------------

    async def invite(self, customer: str, email: str) -> Invited:
        """A new invitation for ``email`` to administer ``customer``.

        Error handling: ``Refusal("taken")`` when the address administers another customer.
        """
        existing = self.state.admins.get(email)
        if existing is not None and existing.customer != customer:
            raise Refusal("taken", "email")
        token = secrets.token_urlsafe(24)
        expires = self.clock() + self.settings.invitation_lifetime
        await self._change(
            {
                "op": "invite",
                "token": token_digest(token),
                "customer": customer,
                "email": email,
                "expires_at": expires,
            }
        )
        log.info("portal: %s invited to administer customer %s", email, customer)
        return Invited(token, Invitation(customer, email, expires))

    async def accept(self, token: str, password: str, repeated: str) -> Admin:
        """Set the invitee's password; the invitation is used up.

        Error handling: ``Refusal`` ``invitation`` (unknown, used or expired),
        ``password_short``/``password_long`` or ``password_mismatch``.
        """
        invitation = self.state.invitation(token, self.clock())
        if invitation is None and await self._fresh():  # made on another instance just now
            invitation = self.state.invitation(token, self.clock())
        if invitation is None:
            raise Refusal("invitation")
        if len(password) < MIN_PASSWORD:
            raise Refusal("password_short", "password")
        if len(password) > MAX_PASSWORD:
            raise Refusal("password_long", "password")
        if password != repeated:
            raise Refusal("password_mismatch", "repeated")
        hashed = await self._run(self._hasher.hash, password)
        if self.state.invitation(token, self.clock()) is None:  # used while hashing
            raise Refusal("invitation")
        await self._change({"op": "accept", "token": token_digest(token), "password": hashed})
        log.info("portal: %s set a password (customer %s)", invitation.email, invitation.customer)
        return self.state.admins[invitation.email]

    async def remove(self, email: str) -> None:
        await self._change({"op": "remove", "email": email})
        log.info("portal: administrator %s removed", email)

    async def forget_customer(self, customer: str) -> None:
        """Remove a deleted customer's administrators and withdraw its invitations, so a
        customer created again under its id starts without them."""
        for admin in self.state.admins_of(customer):
            await self.remove(admin.email)
        for digest, invitation in sorted(self.state.invitations.items()):
            if invitation.customer == customer:
                await self._change({"op": "withdraw", "token": digest})

    async def logout(self, session: Session) -> None:
        await self._change({"op": "logout", "session": session.sid, "until": session.expires_at})
        log.info("portal: %s logged out", session.email)

    # -- logins and sessions ---------------------------------------------------------------

    async def login(self, email: str, password: str, address: str) -> Session:
        """A session for the right password.

        Error handling: ``Refusal("throttled")`` while the account or the address is
        locked (nothing is checked then), ``Refusal("login")`` for a wrong address or
        password (the same for both).
        """
        now = self.clock()
        if await self._throttled(email, address, now):
            log.warning("portal: login for %s from %s refused: throttled", email, address)
            raise Refusal("throttled")
        admin = self.state.admins.get(email)
        if admin is None and await self._fresh():  # its password set on another instance
            admin = self.state.admins.get(email)
        stored = admin.password_hash if admin is not None else self._dummy
        ok = await self._run(self._verified, stored, password[:MAX_PASSWORD])
        if admin is None or not ok:
            self.by_account.failed(email, now)
            self.by_address.failed(address, now)
            if self.shared_failures is not None:
                await self.shared_failures.failed(email, address)
            log.info("portal: failed login for %s from %s", email, address)
            raise Refusal("login")
        self.by_account.succeeded(email)
        self.by_address.succeeded(address)
        if self.shared_failures is not None:
            await self.shared_failures.succeeded(email, address)
        log.info("portal: %s logged in (customer %s)", email, admin.customer)
        until = now + self.settings.session_lifetime
        return new_session(email, admin.customer, admin.password_hash, until)

    async def _throttled(self, email: str, address: str, now: float) -> bool:
        """The account or the address is locked: on this instance's count, or (on Redis)
        on every instance's."""
        if self.by_account.locked(email, now) or self.by_address.locked(address, now):
            return True
        shared = self.shared_failures
        return shared is not None and await shared.locked(email, address)

    def current(self, session: Session | None) -> Session | None:
        """``session`` if it is still open: not logged out, its administrator still there
        with the same customer and password."""
        if session is None or not session.valid(self.clock()) or session.sid in self.state.closed:
            return None
        admin = self.state.admins.get(session.email)
        if admin is None or admin.customer != session.customer:
            return None
        return session if fingerprint(admin.password_hash) == session.password else None

    def _verified(self, stored: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(stored, password))
        except (VerificationError, InvalidHashError):
            return False

    async def _run[T](self, fn: Callable[[str, str], T] | Callable[[str], T], *args: str) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._hashing)  # type: ignore[arg-type]

    async def _change(self, record: dict[str, Json]) -> None:
        if self.log.failed:
            raise StorageUnavailable()
        if self.replica.shared:
            await self.replica.commit(record, lambda: self._check(record))
        else:
            self.state.apply(record)
            self.log.append(record)
            await self.log.flush()
        self._appended += 1
        if self._appended >= COMPACT_AFTER:
            self.state.purge(self.clock())
            with contextlib.suppress(StorageUnavailable):
                await self.replica.compact(list(self.state.records()))
                self._appended = 0

    async def _fresh(self) -> bool:
        """Catch up with the other instances (several on Redis); True if it did."""
        if not self.replica.shared:
            return False
        try:
            await self.replica.refresh()
        except StorageUnavailable:
            return False
        return True

    def _check(self, record: dict[str, Json]) -> None:
        """Whether ``record`` still applies to the caught-up state (several instances)."""
        if record["op"] == "accept" and record["token"] not in self.state.invitations:
            raise Refusal("invitation")  # accepted or withdrawn on another instance
        if record["op"] == "key" and self.state.key is not None:
            raise Refusal("key")

    def _apply_other(self, record: Mapping[str, Json]) -> None:
        self.state.apply(record)

    def _clear(self) -> None:
        self.state = PortalState()

    def _use_shared_key(self) -> None:
        if self.shared_key and self.state.key is not None:
            self.key = bytes.fromhex(self.state.key)

    @property
    def shared_key(self) -> bool:
        """Whether the cookie key is the one in the log (several instances, no
        ``cookie_secret``)."""
        return self.replica.shared and not self.settings.cookie_secret

    async def _share_key(self) -> None:
        """Commit this instance's key as everyone's if the log has none yet; use the
        log's.  Retried every few seconds while Redis does not answer."""
        while True:
            try:
                if self.state.key is None:
                    with contextlib.suppress(Refusal):  # another instance's was first
                        await self.replica.commit(
                            {"op": "key", "key": self.key.hex()},
                            lambda: self._check({"op": "key"}),
                        )
                else:
                    await self.replica.refresh()
                self._use_shared_key()
                return
            except StorageUnavailable:
                await trio.sleep(2.0)

    def start(self, gw: Gateway) -> None:
        if self.replica.shared or hasattr(self.log, "recover_forever"):
            gw.spawn("portal-store", self.replica.maintain)  # on Redis: follows the others
        if self.shared_key:
            self._use_shared_key()
            gw.spawn("portal-key", self._share_key)


def open_portal(config: Config) -> PortalService:
    """The portal's state under ``state_dir``, replayed, and its signing key.  Blocking:
    at start-up.  Error handling: ``StateError`` naming the file (the CLI exits 3)."""
    state_dir = config.proxy.state_dir
    store, records = open_store_log(state_dir, LOG, timeout=config.proxy.journal_timeout)
    state = PortalState()
    for number, record in enumerate(records, 1):
        try:
            state.apply(record)
        except StateError as exc:
            raise StateError(f"{log_path(state_dir, LOG)}: record {number}: {exc}") from None
    state.purge(time.time())
    key = cookie_key(config.portal, state_dir)
    return PortalService(config.portal, state, store, key)


def cookie_key(settings: PortalSettings, state_dir: Path) -> bytes:
    """The configured ``cookie_secret``, else the key file in ``state_dir`` (made once).

    Error handling: ``StateError`` naming the file when it cannot be read or written."""
    if settings.cookie_secret:
        return settings.cookie_secret.encode()
    path = Path(state_dir) / KEY_FILE
    try:
        if path.exists():
            key = path.read_bytes()
            if len(key) >= 32:
                return key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        return key
    except OSError as exc:
        raise StateError(f"{path}: cannot read or write the portal's key: {exc.strerror}") from None
