"""What one webhook callback is, as bbb-webhooks sends it: decided without I/O.

bbb-webhooks 3.x (``src/out/webhooks/callback-emitter.js``; docs/decisions.md,
"Webhooks: delivery") POSTs each event on its own to the hook's callback URL:

- body ``application/x-www-form-urlencoded``, keys in alphabetical order:
  ``domain=<server domain>&event=[<event JSON>]&timestamp=<epoch ms>`` (the event is
  wrapped in a JSON array), encoded as ``URLSearchParams`` encodes: space as ``+``,
  every byte but ASCII letters, digits and ``*-._`` as ``%XX`` (:func:`form_body`);
- ``timestamp`` is fixed when the delivery starts and kept across its retries (here: when
  the gateway accepted the event, see :mod:`proxy.webhooks.queue`);
- the URL gets ``checksum=<hex>`` appended (``?`` or ``&``), the hex digest of
  ``callbackURL + body + secret`` with the hook's algorithm (sha1 unless the
  customer's hooks/create was signed with another; bbb-webhooks' default is sha1)
  and the customer's current secret (:func:`signed_url`);
- success is a 2xx, and also 401: bbb-webhooks counts it delivered ("the callback worked
  but was denied by the recipient"); retrying a receiver that refuses our checksum
  would only hold up every later event until the hook is dropped (:func:`outcome`).

Retries wait :data:`RETRY_INTERVALS` (bbb-webhooks' example configuration: 0.1 s, 0.5 s,
1 s, ... then 60 s) and go on, 60 s apart, until the hook has failed for
``[webhooks] drop_after`` seconds in a row (:func:`retry_delay`).

Error handling: nothing here raises for what a customer registered; an unknown
algorithm name is the caller's bug (``ValueError``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from urllib.parse import quote

from proxy.bbb.checksum import SUPPORTED_ALGORITHMS
from proxy.store import Json

CONTENT_TYPE = "application/x-www-form-urlencoded"
# bbb-webhooks' config/default.example.yml retryIntervals, in seconds; the last repeats.
RETRY_INTERVALS = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 30.0, 60.0)


def event_json(event: Mapping[str, Json]) -> str:
    """The event as ``JSON.stringify`` writes it: no spaces, non-ASCII as is."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def urlencoded(value: str) -> str:
    """One value as WHATWG ``application/x-www-form-urlencoded`` (``URLSearchParams``)."""
    # quote() keeps letters, digits, "_.-~" and the safe "*"; the form keeps "~" out.
    return quote(value, safe="*").replace("~", "%7E").replace("%20", "+")


def form_body(domain: str, event: Mapping[str, Json], timestamp: int) -> str:
    """The callback's body, keys in bbb-webhooks' (alphabetical) order."""
    fields = (
        ("domain", domain),
        ("event", f"[{event_json(event)}]"),
        ("timestamp", str(timestamp)),
    )
    return "&".join(f"{key}={urlencoded(value)}" for key, value in fields)


def checksum(callback_url: str, body: str, secret: str, algorithm: str = "sha1") -> str:
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"not a checksum algorithm: {algorithm!r}")
    return hashlib.new(algorithm, (callback_url + body + secret).encode("utf-8")).hexdigest()


def signed_url(callback_url: str, body: str, secret: str, algorithm: str = "sha1") -> str:
    """The URL to POST ``body`` to: the registered one with ``checksum=`` appended.

    bbb-webhooks appends ``&`` when the URL has a query part (even an empty one,
    ``...?``), else ``?``.
    """
    separator = "&" if "?" in callback_url else "?"
    return f"{callback_url}{separator}checksum={checksum(callback_url, body, secret, algorithm)}"


def outcome(status: int | None) -> str:
    """What an attempt's answer means: ``delivered``, ``rejected`` (401, counted as
    delivered), ``refused`` (the URL may not be called now), or ``failed``."""
    if status is None:
        return "refused"
    if 200 <= status < 300:
        return "delivered"
    return "rejected" if status == 401 else "failed"


def retry_delay(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 for the first)."""
    return RETRY_INTERVALS[min(max(failures, 1), len(RETRY_INTERVALS)) - 1]
