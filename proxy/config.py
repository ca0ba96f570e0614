"""One typed configuration, read from one TOML file.

Every key is checked on start; a wrong one stops start-up with a message that
names it (``customers[1].max_connections: must be an integer >= 1``), never a
stack trace.  Unknown keys are errors too: a typo must not silently fall back
to a default.  Times are in seconds unless the name says minutes.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.bbb.checksum import SUPPORTED_ALGORITHMS
from proxy.errors import ConfigError

log = logging.getLogger(__name__)

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
KIB = 1024
MIB = 1024 * KIB

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_NO_STRINGS: list[str] = []
# Keys of earlier releases that are accepted, with a warning, so an upgrade does not stop on them.
RETIRED_HEALTH_KEYS = frozenset({"release_after"})  # failover suspends instead (docs/decisions.md)
BACKEND_MODES = ("active", "drain", "disabled")

DEFAULT_WELCOME = (
    "<br>To join this meeting by phone, dial:<br>  %%DIALNUM%%<br>"
    "Then enter %%CONFNUM%% as the conference PIN number.<br>"
    "This conference is hosted on a shared BigBlueButton platform."
)
DEFAULT_MODERATOR_ONLY_MESSAGE = (
    "To invite someone by phone, ask them to dial %%DIALNUM%% and enter %%CONFNUM%%."
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase limits for every call to a BBB server."""

    connect: float = 2 * SECONDS
    read: float = 10 * SECONDS
    write: float = 5 * SECONDS
    pool: float = 2 * SECONDS
    get_meetings: float = 5 * SECONDS  # deadline for the whole getMeetings fan-out
    get_recordings: float = 10 * SECONDS  # deadline for the getRecordings fan-out
    # Towards API clients (hypercorn and the request body), not backends:
    client_read: float = 30 * SECONDS  # a request's body must arrive whole within this
    client_idle: float = 5 * SECONDS  # idle keep-alive connection; also bounds a request head


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """How backends are polled and when they count as down (see proxy.health)."""

    interval: float = 5 * SECONDS  # one getMeetings poll per backend per interval
    timeout: float = 4 * SECONDS  # a poll not answered by then failed (below timeouts.read)
    down_after: int = 3  # consecutive failed polls
    up_after: int = 2  # consecutive good polls
    slow_after: float = 1 * SECONDS  # answer-time average above this: no new meetings


@dataclass(frozen=True, slots=True)
class Texts:
    """The platform's default chat texts (SPEC §5); BBB fills %%DIALNUM%% etc."""

    welcome: str = DEFAULT_WELCOME
    moderator_only_message: str = DEFAULT_MODERATOR_ONLY_MESSAGE


@dataclass(frozen=True, slots=True)
class ProxySettings:
    bind: str = "127.0.0.1:8080"
    public_url: str = "http://127.0.0.1:8080"
    state_dir: Path = Path("state")
    journal_timeout: float = 2 * SECONDS  # a ledger write not done by then: answer, not ready
    disabled_calls: frozenset[str] = frozenset()
    logout_url: str = ""  # where failed joins are sent; default: public_url
    max_query_bytes: int = 64 * KIB
    max_body_bytes: int = 4 * MIB
    max_text_track_bytes: int = 4 * MIB  # putRecordingTextTrack's file, at most
    backend_connections: int = 16  # pooled connections per BBB server
    customer_backend_calls: int = 0  # in flight per customer per backend; 0: half the pool
    max_answer_bytes: int = 16 * MIB  # a backend answer larger than this is refused
    timeouts: Timeouts = field(default_factory=Timeouts)
    health: HealthSettings = field(default_factory=HealthSettings)
    admin_token: str = field(default="", repr=False)  # empty: the admin API is off
    metrics_token: str = field(default="", repr=False)  # empty: /metrics is open
    allow_private_callbacks: bool = False  # customer callbacks to private/loopback hosts
    # Request logs (proxy.request_log): "auto" is JSON lines unless stderr is a terminal.
    log_format: str = "auto"  # "auto" | "json" | "text"
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-For is believed (CIDRs)
    workers: int = 1  # gateway processes on one listening socket (proxy.workers); >1: Redis

    @property
    def calls_per_customer(self) -> int:
        """In-flight calls one customer may have on one backend (its fair share of the pool)."""
        return self.customer_backend_calls or max(1, self.backend_connections // 2)

    @property
    def join_error_url(self) -> str:
        return self.logout_url or self.public_url + "/"


type Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """The hooks API (``[webhooks]``): how many hooks, how long, and where they may point."""

    max_hooks_per_customer: int = 100  # live hooks of one customer, all meetings together
    hook_grace_after_end: float = 1 * HOURS  # a hook outlives its meeting's end by this
    # Networks a callback URL may reach although they are not public (a private LMS);
    # allow_private_callbacks = true allows every address.
    allowed_callback_networks: tuple[Network, ...] = ()
    # Delivery (proxy.webhooks.delivery): a receiver failing this long in a row loses its
    # hook; a hook's queue holds at most queue_per_hook events (then the oldest go).
    drop_after: float = 5 * MINUTES
    queue_per_hook: int = 1000
    max_in_flight: int = 64  # POSTs to receivers at once, all hooks (one per hook)
    delivery_timeout: float = 5 * SECONDS  # one POST, whole (as bbb-webhooks)
    # Intake (proxy.webhooks.intake): how often each backend's hooks/list is asked whether
    # it still has the gateway's hook (bbb-webhooks forgets hooks on restart, drops failing ones).
    backend_hook_check: float = 1 * MINUTES


@dataclass(frozen=True, slots=True)
class PortalSettings:
    """The customer administrators' pages under ``/portal/`` (``[portal]``, proxy.portal)."""

    enabled: bool = True  # no page opens to anyone before the operator invites someone
    session_lifetime: float = 8 * HOURS  # a login lasts this long, then the pages ask again
    invitation_lifetime: float = 7 * 24 * HOURS  # an invitation link works this long, once
    # Signs the session cookies and CSRF tokens.  Empty: a random key kept in state_dir
    # (portal-cookie.key, 0600); set one when several gateways share the sessions.
    cookie_secret: str = field(default="", repr=False)
    max_login_failures: int = 5  # wrong passwords in a row, per account and per client address
    login_lockout: float = 15 * MINUTES  # then no login is tried for this long


@dataclass(frozen=True, slots=True)
class VoiceSettings:
    """Voice bridges (``[voice]``, proxy.voice): pool-wide unique conference PINs."""

    allocate: bool = True  # the gateway gives every new meeting its voiceBridge
    length: int = 5  # digits of the bridges it gives (1-9; BBB's are 5)
    dial_number: str = ""  # the platform's dialNumber; "": the backend's own
    dial_numbers: Mapping[str, str] = field(default_factory=dict)  # by customer id

    def dial_number_for(self, customer_id: str) -> str:
        return self.dial_numbers.get(customer_id, self.dial_number)


@dataclass(frozen=True, slots=True)
class FsapiSettings:
    """The FreeSWITCH dial-in router (``[fsapi]``, proxy.voice.fsapi, mod_xml_curl)."""

    password: str = field(default="", repr=False)  # HTTP basic auth; "": /fsapi is off
    sip_profile: str = "external"  # FreeSWITCH's sofia profile that calls the backends
    sip_hosts: Mapping[str, str] = field(default_factory=dict)  # by backend id; else URL host
    max_duration: float = 0.0  # seconds a dial-in call may last; 0: no limit
    mask_digits: int = 4  # last digits of a caller's number replaced by X
    max_attempts: int = 3  # wrong PINs before the call is ended
    context: str = "public"  # dialplan context answered when the request names none
    prompt_sound: str = "conference/conf-pin.wav"
    invalid_sound: str = "conference/conf-bad-pin.wav"
    goodbye_sound: str = "voicemail/vm-goodbye.wav"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the gateway keeps its durable state (``[store]``, proxy.store).

    ``kind = "local"`` (the default): files under ``[proxy] state_dir``.  ``kind =
    "redis"``: streams on one Redis server (proxy.store.redis); ``url`` is coredis'
    (``redis://`` or ``rediss://`` for TLS, ``/N`` the database), ``password`` (and
    ``username``) override the URL's, ``tls_ca_file`` checks the server's certificate.

    With ``sentinels`` (``host:port`` each) and ``sentinel_master``, the master is the one
    those Sentinels name (proxy.store.redis_connect), followed across failovers; the
    URL's host and port are then unused (its scheme, database and credentials apply).
    ``wait_replicas`` > 0: each log write waits (``WAIT``) for that many replicas, at most
    ``wait_timeout`` seconds, and is not acknowledged with fewer.
    """

    kind: str = "local"  # "local" | "redis"
    url: str = "redis://127.0.0.1:6379/0"
    username: str = ""
    password: str = field(default="", repr=False)
    tls_ca_file: str = ""  # with a rediss:// URL; "": the system's CAs
    key_prefix: str = "bbb-proxy:"  # every key the gateway uses starts with it
    sentinels: tuple[str, ...] = ()  # "host:port" of Redis Sentinels; (): url is the master
    sentinel_master: str = ""  # the master's name in Sentinel (sentinel monitor <name> ...)
    sentinel_password: str = field(default="", repr=False)  # the Sentinels' (requirepass)
    wait_replicas: int = 0  # replicas that must have each write (WAIT); 0: not waited for
    wait_timeout: float = 0.5  # seconds WAIT may take (below proxy.journal_timeout)


@dataclass(frozen=True, slots=True)
class Backend:
    id: str
    url: str
    secret: str = field(repr=False)
    capacity: int
    checksum_algorithm: str = "sha256"
    mode: str = "active"  # "active" | "drain" (no new meetings) | "disabled" (not used at all)
    tags: tuple[str, ...] = ()  # placement tags (meta_server-tag, proxy.placement)

    def __repr__(self) -> str:
        return f"Backend(id={self.id!r}, url={self.url!r}, capacity={self.capacity})"


@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    secrets: tuple[str, ...] = field(repr=False)
    max_connections: int
    default_max_participants: int
    default_duration: int  # minutes
    enabled: bool = True
    hosts: tuple[str, ...] = ()
    default_tags: tuple[str, ...] = ()  # placement tags when a create names none
    required_tags: tuple[str, ...] = ()  # its meetings only on backends with one of these

    def __repr__(self) -> str:
        return f"Customer(id={self.id!r}, max_connections={self.max_connections})"


@dataclass(frozen=True, slots=True)
class Config:
    proxy: ProxySettings
    backends: tuple[Backend, ...]
    customers: tuple[Customer, ...]
    texts: Texts = field(default_factory=Texts)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    portal: PortalSettings = field(default_factory=PortalSettings)
    voice: VoiceSettings = field(default_factory=VoiceSettings)
    fsapi: FsapiSettings = field(default_factory=FsapiSettings)
    _by_id: dict[str, Customer] = field(init=False, repr=False, compare=False)
    _by_host: dict[str, Customer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {c.id: c for c in self.customers})
        by_host = {h: c for c in self.customers for h in c.hosts}
        object.__setattr__(self, "_by_host", by_host)

    def customer(self, customer_id: str) -> Customer | None:
        return self._by_id.get(customer_id)

    def customer_for_host(self, host: str) -> Customer | None:
        host = host.lower()
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        else:
            host = host.rsplit(":", 1)[0]
        return self._by_host.get(host)


def load(path: str | Path) -> Config:
    """Read and check the TOML file at ``path``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(data)


def from_mapping(data: Mapping[str, Any]) -> Config:
    _only(
        data,
        "",
        {
            "proxy",
            "backends",
            "customers",
            "texts",
            "webhooks",
            "store",
            "portal",
            "voice",
            "fsapi",
        },
    )
    proxy = _proxy(_table(data, "proxy", "proxy"))
    backends = tuple(_backend(b, f"backends[{i}]") for i, b in enumerate(_array(data, "backends")))
    customers = tuple(
        _customer(c, f"customers[{i}]") for i, c in enumerate(_array(data, "customers"))
    )
    texts = _texts(_table(data, "texts", "texts"))
    webhooks = _webhooks(_table(data, "webhooks", "webhooks"))
    store = _store(_table(data, "store", "store"))
    portal = _portal(_table(data, "portal", "portal"))
    voice = _voice(_table(data, "voice", "voice"))
    fsapi = _fsapi(_table(data, "fsapi", "fsapi"))
    _unique([b.id for b in backends], "backends", "id")
    _unique([c.id for c in customers], "customers", "id")
    _unique([h for c in customers for h in c.hosts], "customers", "hosts")
    if not backends:
        raise ConfigError("backends: at least one [[backends]] entry is required")
    if proxy.workers > 1 and store.kind != "redis":  # the local journal is one process's
        raise ConfigError('proxy.workers > 1 needs [store] kind = "redis"')
    if store.wait_replicas and store.wait_timeout >= proxy.journal_timeout:
        raise ConfigError(  # WAIT runs within the write's bound
            f"store.wait_timeout: must be below proxy.journal_timeout ({proxy.journal_timeout} s)"
        )
    return Config(
        proxy=proxy,
        backends=backends,
        customers=customers,
        texts=texts,
        webhooks=webhooks,
        store=store,
        portal=portal,
        voice=voice,
        fsapi=fsapi,
    )


def _proxy(t: Mapping[str, Any]) -> ProxySettings:
    _only(t, "proxy", set(ProxySettings.__dataclass_fields__))
    d = ProxySettings()
    timeouts = _timeouts(_table(t, "timeouts", "proxy.timeouts"))
    return ProxySettings(
        bind=_get(t, "proxy", "bind", _bind, d.bind),
        public_url=_get(t, "proxy", "public_url", _http_url, d.public_url).rstrip("/"),
        state_dir=Path(_get(t, "proxy", "state_dir", _string, str(d.state_dir))),
        journal_timeout=_get(t, "proxy", "journal_timeout", _seconds, d.journal_timeout),
        disabled_calls=frozenset(_get(t, "proxy", "disabled_calls", _str_list, _NO_STRINGS)),
        logout_url=_get(t, "proxy", "logout_url", _string, d.logout_url),
        max_query_bytes=_get(t, "proxy", "max_query_bytes", _positive, d.max_query_bytes),
        max_body_bytes=_get(t, "proxy", "max_body_bytes", _positive, d.max_body_bytes),
        max_text_track_bytes=_get(
            t, "proxy", "max_text_track_bytes", _positive, d.max_text_track_bytes
        ),
        backend_connections=_get(
            t, "proxy", "backend_connections", _positive, d.backend_connections
        ),
        customer_backend_calls=_get(t, "proxy", "customer_backend_calls", _positive, 0),
        max_answer_bytes=_get(t, "proxy", "max_answer_bytes", _positive, d.max_answer_bytes),
        timeouts=timeouts,
        health=_health(_table(t, "health", "proxy.health")),
        admin_token=_get(t, "proxy", "admin_token", _string, ""),
        metrics_token=_get(t, "proxy", "metrics_token", _string, ""),
        allow_private_callbacks=_get(t, "proxy", "allow_private_callbacks", _bool, False),
        log_format=_get(t, "proxy", "log_format", _log_format, d.log_format),
        trusted_proxies=_get(t, "proxy", "trusted_proxies", _cidrs, ()),
        workers=_get(t, "proxy", "workers", _positive, d.workers),
    )


LOG_FORMATS = ("auto", "json", "text")


def _log_format(value: Any) -> str:
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return str(value)


def _cidrs(value: Any) -> tuple[str, ...]:
    """Addresses or networks ("10.0.0.1", "10.0.0.0/8", "::1"), each normalised to a CIDR."""
    try:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in _str_list(value))
    except ValueError:
        raise ValueError("must be a list of IP addresses or networks (e.g. 10.0.0.0/8)") from None


def _timeouts(t: Mapping[str, Any]) -> Timeouts:
    names = set(Timeouts.__dataclass_fields__)
    _only(t, "proxy.timeouts", names)
    d = Timeouts()
    values = {n: _get(t, "proxy.timeouts", n, _seconds, getattr(d, n)) for n in names}
    return Timeouts(**values)


def _health(t: Mapping[str, Any]) -> HealthSettings:
    _only(t, "proxy.health", set(HealthSettings.__dataclass_fields__) | RETIRED_HEALTH_KEYS)
    for key in RETIRED_HEALTH_KEYS & set(t):
        log.warning("proxy.health.%s is no longer used and is ignored (see the README)", key)
    d = HealthSettings()
    return HealthSettings(
        interval=_get(t, "proxy.health", "interval", _seconds, d.interval),
        timeout=_get(t, "proxy.health", "timeout", _seconds, d.timeout),
        down_after=_get(t, "proxy.health", "down_after", _positive, d.down_after),
        up_after=_get(t, "proxy.health", "up_after", _positive, d.up_after),
        slow_after=_get(t, "proxy.health", "slow_after", _seconds, d.slow_after),
    )


def _backend(t: Any, where: str) -> Backend:
    t = _as_table(t, where)
    _only(t, where, set(Backend.__dataclass_fields__))
    algorithm = _get(t, where, "checksum_algorithm", _string, "sha256")
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(f"{where}.checksum_algorithm: one of {sorted(SUPPORTED_ALGORITHMS)}")
    return Backend(
        id=_get(t, where, "id", _identifier),
        url=_get(t, where, "url", _http_url).rstrip("/"),
        secret=_get(t, where, "secret", _nonempty),
        capacity=_get(t, where, "capacity", _positive),
        checksum_algorithm=algorithm,
        mode=_get(t, where, "mode", _mode, "active"),
        tags=tuple(_get(t, where, "tags", _tags, _NO_STRINGS)),
    )


def _customer(t: Any, where: str) -> Customer:
    t = _as_table(t, where)
    allowed = set(Customer.__dataclass_fields__) - {"secrets"} | {"secret", "secrets"}
    _only(t, where, allowed)
    secrets = _customer_secrets(t, where)
    return Customer(
        id=_get(t, where, "id", _identifier),
        secrets=secrets,
        max_connections=_get(t, where, "max_connections", _positive),
        default_max_participants=_get(t, where, "default_max_participants", _positive),
        default_duration=_get(t, where, "default_duration", _positive),
        enabled=_get(t, where, "enabled", _bool, True),
        hosts=tuple(h.lower() for h in _get(t, where, "hosts", _str_list, _NO_STRINGS)),
        default_tags=tuple(_get(t, where, "default_tags", _tags, _NO_STRINGS)),
        required_tags=tuple(_get(t, where, "required_tags", _tags, _NO_STRINGS)),
    )


def _customer_secrets(t: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """``secret = "..."`` or, while rotating, ``secrets = ["new", "old"]``."""
    if ("secret" in t) == ("secrets" in t):
        raise ConfigError(f"{where}: give exactly one of 'secret' or 'secrets'")
    if "secret" in t:
        return (_get(t, where, "secret", _nonempty),)
    secrets = _get(t, where, "secrets", _str_list)
    if not secrets or not all(secrets):
        raise ConfigError(f"{where}.secrets: a non-empty list of non-empty strings")
    return tuple(secrets)


def _texts(t: Mapping[str, Any]) -> Texts:
    _only(t, "texts", set(Texts.__dataclass_fields__))
    d = Texts()
    return Texts(
        welcome=_get(t, "texts", "welcome", _string, d.welcome),
        moderator_only_message=_get(
            t, "texts", "moderator_only_message", _string, d.moderator_only_message
        ),
    )


STORE_KINDS = ("local", "redis")


def _store(t: Mapping[str, Any]) -> StoreSettings:
    _only(t, "store", set(StoreSettings.__dataclass_fields__))
    d = StoreSettings()
    kind = _get(t, "store", "kind", _string, d.kind)
    if kind not in STORE_KINDS:
        raise ConfigError(f"store.kind: must be one of {', '.join(STORE_KINDS)}")
    url = _get(t, "store", "url", _string, d.url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("store.url: must be a redis://, rediss:// or unix:// URL")
    prefix = _get(t, "store", "key_prefix", _string, d.key_prefix)
    if not prefix or any(c in prefix for c in "*?[]\\"):
        raise ConfigError("store.key_prefix: must be non-empty, without * ? [ ] or \\")
    sentinels = tuple(_get(t, "store", "sentinels", _host_ports, list(d.sentinels)))
    master = _get(t, "store", "sentinel_master", _string, d.sentinel_master)
    sentinel_password = _get(t, "store", "sentinel_password", _string, d.sentinel_password)
    if sentinels and not master:
        raise ConfigError("store.sentinel_master: required with store.sentinels")
    if master and not sentinels:
        raise ConfigError("store.sentinels: required with store.sentinel_master")
    if sentinel_password and not sentinels:
        raise ConfigError("store.sentinel_password: only with store.sentinels")
    if sentinels and url.startswith("unix://"):
        raise ConfigError("store.url: must be redis:// or rediss:// with store.sentinels")
    return StoreSettings(
        kind=kind,
        url=url,
        username=_get(t, "store", "username", _string, d.username),
        password=_get(t, "store", "password", _string, d.password),
        tls_ca_file=_get(t, "store", "tls_ca_file", _string, d.tls_ca_file),
        key_prefix=prefix,
        sentinels=sentinels,
        sentinel_master=master,
        sentinel_password=sentinel_password,
        wait_replicas=_get(t, "store", "wait_replicas", _count, d.wait_replicas),
        wait_timeout=_get(t, "store", "wait_timeout", _seconds, d.wait_timeout),
    )


def _host_ports(value: Any) -> list[str]:
    entries = _str_list(value)
    for entry in entries:
        try:
            port = split_bind(entry)[1]
        except ValueError:
            port = 0
        if not port:
            raise ValueError(f"{entry!r} is not HOST:PORT, e.g. 127.0.0.1:26379")
    if len(set(entries)) != len(entries):
        raise ValueError("a Sentinel appears twice")
    return entries


def _webhooks(t: Mapping[str, Any]) -> WebhookSettings:
    _only(t, "webhooks", set(WebhookSettings.__dataclass_fields__))
    d = WebhookSettings()
    networks = _get(t, "webhooks", "allowed_callback_networks", _str_list, _NO_STRINGS)
    return WebhookSettings(
        max_hooks_per_customer=_get(
            t, "webhooks", "max_hooks_per_customer", _positive, d.max_hooks_per_customer
        ),
        hook_grace_after_end=_get(
            t, "webhooks", "hook_grace_after_end", _seconds, d.hook_grace_after_end
        ),
        allowed_callback_networks=tuple(
            _network(n, f"webhooks.allowed_callback_networks[{i}]") for i, n in enumerate(networks)
        ),
        drop_after=_get(t, "webhooks", "drop_after", _seconds, d.drop_after),
        queue_per_hook=_get(t, "webhooks", "queue_per_hook", _positive, d.queue_per_hook),
        max_in_flight=_get(t, "webhooks", "max_in_flight", _positive, d.max_in_flight),
        delivery_timeout=_get(t, "webhooks", "delivery_timeout", _seconds, d.delivery_timeout),
        backend_hook_check=_get(
            t, "webhooks", "backend_hook_check", _seconds, d.backend_hook_check
        ),
    )


def _portal(t: Mapping[str, Any]) -> PortalSettings:
    _only(t, "portal", set(PortalSettings.__dataclass_fields__))
    d = PortalSettings()
    return PortalSettings(
        enabled=_get(t, "portal", "enabled", _bool, d.enabled),
        session_lifetime=_get(t, "portal", "session_lifetime", _seconds, d.session_lifetime),
        invitation_lifetime=_get(
            t, "portal", "invitation_lifetime", _seconds, d.invitation_lifetime
        ),
        cookie_secret=_get(t, "portal", "cookie_secret", _cookie_secret, ""),
        max_login_failures=_get(t, "portal", "max_login_failures", _positive, d.max_login_failures),
        login_lockout=_get(t, "portal", "login_lockout", _seconds, d.login_lockout),
    )


def _voice(t: Mapping[str, Any]) -> VoiceSettings:
    _only(t, "voice", set(VoiceSettings.__dataclass_fields__))
    d = VoiceSettings()
    numbers: dict[str, Any] = _get(t, "voice", "dial_numbers", _str_table, {})
    return VoiceSettings(
        allocate=_get(t, "voice", "allocate", _bool, d.allocate),
        length=_get(t, "voice", "length", _bridge_length, d.length),
        dial_number=_get(t, "voice", "dial_number", _dial_number, d.dial_number),
        dial_numbers={
            _checked(_identifier, key, f"voice.dial_numbers.{key}"): _checked(
                _dial_number, value, f"voice.dial_numbers.{key}"
            )
            for key, value in numbers.items()
        },
    )


def _fsapi(t: Mapping[str, Any]) -> FsapiSettings:
    _only(t, "fsapi", set(FsapiSettings.__dataclass_fields__))
    d = FsapiSettings()
    hosts: dict[str, Any] = _get(t, "fsapi", "sip_hosts", _str_table, {})
    return FsapiSettings(
        password=_get(t, "fsapi", "password", _string, d.password),
        sip_profile=_get(t, "fsapi", "sip_profile", _token, d.sip_profile),
        sip_hosts={
            _checked(_identifier, key, f"fsapi.sip_hosts.{key}"): _checked(
                _sip_host, value, f"fsapi.sip_hosts.{key}"
            )
            for key, value in hosts.items()
        },
        max_duration=_get(t, "fsapi", "max_duration", _seconds_or_zero, d.max_duration),
        mask_digits=_get(t, "fsapi", "mask_digits", _count, d.mask_digits),
        max_attempts=_get(t, "fsapi", "max_attempts", _positive, d.max_attempts),
        context=_get(t, "fsapi", "context", _token, d.context),
        prompt_sound=_get(t, "fsapi", "prompt_sound", _sound, d.prompt_sound),
        invalid_sound=_get(t, "fsapi", "invalid_sound", _sound, d.invalid_sound),
        goodbye_sound=_get(t, "fsapi", "goodbye_sound", _sound, d.goodbye_sound),
    )


_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SIP_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
_SOUND = re.compile(r"[A-Za-z0-9_./:$-]{1,200}")  # one word of FreeSWITCH's app data
_DIAL_NUMBER = re.compile(r"[0-9A-Za-z +().#*/-]{0,64}")  # shown to people; no markup


def _checked[T](check: Callable[[Any], T], value: Any, name: str) -> T:
    try:
        return check(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _str_table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError('must be a table of strings (id = "value")')
    return value


def _bridge_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 9:
        raise ValueError("must be an integer from 1 to 9 (digits)")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be an integer >= 0")
    return value


def _seconds_or_zero(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError("must be a number of seconds >= 0 (0: no limit)")
    return float(value)


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return check


_token = _matching(_TOKEN, "1-64 characters of A-Z, a-z, 0-9, '_', '.' and '-'")
_sip_host = _matching(_SIP_HOST, "a host name or address, optionally with :port")
_sound = _matching(_SOUND, "a FreeSWITCH sound file (no spaces)")
_dial_number = _matching(_DIAL_NUMBER, "a phone number (digits, spaces, + ( ) - . # * /)")


def _cookie_secret(value: Any) -> str:
    if not isinstance(value, str) or (value and len(value) < 32):
        raise ValueError("must be empty or at least 32 characters")
    return value


def _network(value: str, where: str) -> Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{where}: not an IP network ({value!r}; e.g. 10.1.2.0/24)") from None


# -- checking helpers ---------------------------------------------------------------------------

_MISSING: Any = object()


def _get[T](
    t: Mapping[str, Any], where: str, key: str, check: Callable[[Any], T], default: T = _MISSING
) -> T:
    name = f"{where}.{key}" if where else key
    if key not in t:
        if default is _MISSING:
            raise ConfigError(f"{name}: required")
        return default
    try:
        return check(t[key])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _only(t: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in t:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{name}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(t: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    return _as_table(t.get(key, {}), where)


def _as_table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    return value


def _array(t: Mapping[str, Any], key: str) -> list[Any]:
    value = t.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _unique(values: list[str], where: str, key: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"{where}: {key} {value!r} appears twice")
        seen.add(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be an integer >= 1")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("must be a number of seconds > 0")
    return float(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def split_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port).  Error handling: ``ValueError``."""
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"port {port!r} is not a number 0-65535")
    return host, int(port)


def _bind(value: Any) -> str:
    split_bind(_string(value))
    return str(value)


def _mode(value: Any) -> str:
    if value not in BACKEND_MODES:
        raise ValueError(f"must be one of {', '.join(BACKEND_MODES)}")
    return str(value)


def _nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(
            "must be 1-63 characters of a-z, 0-9 and '-', starting with a letter/digit"
        )
    return value


def _http_url(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _tags(value: Any) -> list[str]:
    """Placement tags: distinct names of letters, digits, ``._-`` (``none`` means untagged)."""
    tags = _str_list(value)
    if not all(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", t) for t in tags):
        raise ValueError("must be a list of tags (letters, digits, . _ -, at most 64)")
    if len(set(tags)) != len(tags):
        raise ValueError("a tag appears twice")
    return tags


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("must be a list of strings")
    return value
