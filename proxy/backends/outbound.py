"""Calls the gateway makes to customers' URLs (meeting-ended callbacks), SSRF-safe.

A customer's URL is called only if it is http(s) and every address its host
resolves to is public: loopback, private, link-local, multicast and reserved
ranges are refused (unless ``allow_private_callbacks`` is set, for tests and
closed installations).  Redirects are not followed, so a public URL cannot
bounce the request inside.  The connection goes to the address that was
checked, not to a second resolution (no DNS-rebinding window).
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from proxy.logs import redact

log = logging.getLogger(__name__)
TIMEOUT = httpx.Timeout(5.0)


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_global and not ip.is_multicast


async def checked_address(host: str, port: int, allow_private: bool) -> str | None:
    """The address to connect to for ``host``, or None if any of its addresses is not public."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError:
        return None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not (allow_private or all(is_public(a) for a in addresses)):
        return None
    return addresses[0]


async def call_customer_url(http: httpx.AsyncClient, url: str, allow_private: bool) -> bool:
    """GET ``url`` as BBB would; True if it answered 2xx.  Never raises."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        log.warning("not calling %s: not an http(s) URL", redact(url))
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = await checked_address(parts.hostname, port, allow_private)
    if address is None:
        log.warning("not calling %s: host is not public or does not resolve", redact(url))
        return False
    host = f"[{address}]" if ":" in address else address
    target = urlunsplit((parts.scheme, f"{host}:{port}", parts.path, parts.query, ""))
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    try:
        response = await http.get(target, headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        log.warning("callback %s failed: %s", redact(url), type(exc).__name__)
        return False
    return 200 <= response.status_code < 300
