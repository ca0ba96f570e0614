"""Calls the gateway makes to customers' URLs (meeting-ended callbacks), SSRF-safe.

A customer's URL is called only if it passes :func:`proxy.bbb.customer_urls.problem`
(http(s), a host that can be encoded, a valid port, printable, not too long)
and every address its host resolves to is public (:func:`is_public`; unless
``allow_private_callbacks`` is set, for tests and closed installations).
Redirects are not followed, so a public URL cannot bounce the request inside.
The connection goes to the address that was checked, not to a second
resolution (no DNS-rebinding window).

Error handling: :func:`call_customer_url` never raises (cancellation aside).
Every refusal and failure is logged with the URL redacted and counted in
:data:`proxy.bbb.customer_urls.OUTCOMES`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
import trio

from proxy.bbb.customer_urls import OUTCOMES, ascii_host, port_of, problem
from proxy.config import Network
from proxy.logs import shown

log = logging.getLogger(__name__)
TIMEOUT = httpx.Timeout(5.0)

# Ranges that Python's ``is_global`` lets through but that reach inside a network:
# local-use NAT64 (RFC 8215) and the deprecated site-local fec0::/10 (RFC 3879).
_NOT_PUBLIC_V6 = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))
# The well-known NAT64 prefix (RFC 6052) embeds the IPv4 address it translates to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public(address: str) -> bool:
    """Whether ``address`` (IPv4 or IPv6, scope allowed) is a public unicast address.

    An IPv6 address that embeds an IPv4 one (mapped ``::ffff:a.b.c.d``, compatible
    ``::a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``, 6to4, Teredo) is judged by the
    IPv4 it reaches as well.
    """
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in network for network in _NOT_PUBLIC_V6):
            return False
        embedded = _embedded_v4(ip)
        if embedded and not all(_public(v4) for v4 in embedded):
            return False
        if ip in _NAT64 or ip.ipv4_mapped or _compatible(ip):
            return True  # judged by the IPv4 alone (the v6 form is "global" by construction)
    return _public(ip)


def _allowed(address: str, networks: Sequence[Network]) -> bool:
    if is_public(address):
        return True
    ip = ipaddress.ip_address(address.split("%")[0])
    return any(ip in network for network in networks)


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or _compatible(ip):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour:
        return [ip.sixtofour]
    return list(ip.teredo or ())


def _compatible(ip: ipaddress.IPv6Address) -> bool:
    """IPv4-compatible (``::a.b.c.d``, RFC 4291 2.5.5.1), not ``::`` or ``::1``."""
    return int(ip) >> 32 == 0 and int(ip) > 1


async def checked_address(
    host: str, port: int, allow_private: bool, allowed: Sequence[Network] = ()
) -> str | None:
    """The address to connect to for ``host``, or None if any of its addresses is not public
    (nor in one of the ``allowed`` networks: ``[webhooks] allowed_callback_networks``).

    Error handling: None when the host does not resolve or cannot be encoded.
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not (allow_private or all(_allowed(a, allowed) for a in addresses)):
        return None
    return addresses[0]


async def call_customer_url(http: httpx.AsyncClient, url: str, allow_private: bool) -> bool:
    """GET ``url`` as BBB would; True if it answered 2xx.

    Error handling: never raises (only cancellation passes through): a URL that
    cannot be called, a host that is not public, and any failure of the call
    are logged (URL redacted) and counted, and answer False.
    """
    status = await _called(http, url, allow_private, None)
    return status is not None and 200 <= status < 300


async def post_customer_url(
    http: httpx.AsyncClient, url: str, form: Mapping[str, str], allow_private: bool
) -> int | None:
    """POST ``form`` (urlencoded) to ``url``, checked as :func:`call_customer_url` checks
    it: the HTTP status, 0 when no answer came, None when the URL may not be called.

    Error handling: as :func:`call_customer_url`, never raises.
    """
    return await _called(http, url, allow_private, form)


async def post_form_body(
    http: httpx.AsyncClient,
    url: str,
    body: str,
    allow_private: bool,
    allowed: Sequence[Network] = (),
) -> int | None:
    """POST ``body``, already ``application/x-www-form-urlencoded``, byte for byte (a
    webhook's checksum covers the exact body); otherwise as :func:`post_customer_url`,
    the ``allowed`` networks as :func:`checked_address` takes them."""
    return await _called(http, url, allow_private, body, allowed)


async def post_json(
    http: httpx.AsyncClient, url: str, body: bytes, bearer: str, allow_private: bool
) -> int | None:
    """POST ``body`` as ``application/json`` with ``Authorization: Bearer <bearer>`` (BBB's
    analytics callback); otherwise as :func:`post_customer_url`."""
    return await _called(http, url, allow_private, _Json(body, bearer))


@dataclass(frozen=True, slots=True)
class _Json:
    body: bytes
    bearer: str = field(repr=False)


async def _called(
    http: httpx.AsyncClient,
    url: str,
    allow: bool,
    form: Mapping[str, str] | str | _Json | None,
    allowed: Sequence[Network] = (),
) -> int | None:
    reason = problem(url)
    if reason is not None:
        _refused(url, reason, "invalid")
        return None
    try:
        return await _call(http, url, urlsplit(url), allow, form, allowed)
    except Exception as exc:  # never raises: whatever httpx or the codecs find
        log.warning("callback %s failed: %s", shown(url), type(exc).__name__)
        OUTCOMES["failed"] += 1
        return 0


async def _call(
    http: httpx.AsyncClient,
    url: str,
    parts: SplitResult,
    allow: bool,
    form: Mapping[str, str] | str | _Json | None = None,
    allowed: Sequence[Network] = (),
) -> int | None:
    host, port = ascii_host(parts.hostname or ""), port_of(parts)
    address = await checked_address(host, port, allow, allowed)
    if address is None:
        _refused(url, "host is not public or does not resolve", "refused")
        return None
    literal = f"[{address}]" if ":" in address else address
    target = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path, parts.query, ""))
    named = f"[{host}]" if ":" in host else host
    headers = {"Host": named if parts.port is None else f"{named}:{port}"}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    try:
        if form is None:
            response = await http.get(target, headers=headers, extensions=extensions)
        elif isinstance(form, _Json):
            headers["Content-Type"] = "application/json"
            headers["Authorization"] = f"Bearer {form.bearer}"
            response = await http.post(
                target, content=form.body, headers=headers, extensions=extensions
            )
        elif isinstance(form, str):
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            response = await http.post(
                target, content=form.encode("utf-8"), headers=headers, extensions=extensions
            )
        else:
            response = await http.post(
                target, data=dict(form), headers=headers, extensions=extensions
            )
    except httpx.HTTPError as exc:
        log.warning("callback %s failed: %s", shown(url), type(exc).__name__)
        OUTCOMES["failed"] += 1
        return 0
    ok = 200 <= response.status_code < 300
    OUTCOMES["ok" if ok else "failed"] += 1
    if not ok:
        log.warning("callback %s answered HTTP %d", shown(url), response.status_code)
    return response.status_code


def _refused(url: str, reason: str, outcome: str) -> None:
    log.warning("not calling %s: %s", shown(url), reason)
    OUTCOMES[outcome] += 1
