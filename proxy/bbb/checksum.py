"""BBB API checksums, exactly as bbb-web computes and checks them.

bbb-web (``GetChecksumValidator``) works on the *raw* query string as it was
received: it never decodes or re-encodes it, so the client's choice of ``+``
or ``%20`` and its parameter order are covered as sent.  The checksum itself
is removed by literal string replacement, in this order::

    "&checksum=" + cs  ->  ""
    "checksum=" + cs + "&"  ->  ""
    "checksum=" + cs  ->  ""

and ``data = call_name + query_without_checksum + secret``.  The hash is
chosen by the checksum's length (40 sha1, 64 sha256, 96 sha384, 128 sha512)
and compared case-insensitively.  We compare in constant time.

For POST requests whose parameters are in the body, bbb-common-web 2.5-2.7
falls back to a canonical string: every parameter sorted by name, values
form-encoded (space as ``+``).  :func:`canonical_query` builds it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from urllib.parse import parse_qsl, quote_plus, urlencode

ALGORITHMS_BY_LENGTH = {40: "sha1", 64: "sha256", 96: "sha384", 128: "sha512"}
SUPPORTED_ALGORITHMS = frozenset(ALGORITHMS_BY_LENGTH.values())
_CONTROL_CHARS = dict.fromkeys(range(32))


def compute(call_name: str, query: str, secret: str, algorithm: str = "sha1") -> str:
    """The hex checksum BBB expects for ``call_name`` with ``query``."""
    data = (call_name + query + secret).encode("utf-8")
    return hashlib.new(algorithm, data).hexdigest()


def find_checksum(raw_query: str) -> str | None:
    """The value of the ``checksum`` parameter in a raw query string, if any."""
    for part in raw_query.split("&"):
        if part.startswith("checksum="):
            return part[len("checksum=") :]
    return None


def strip_checksum(raw_query: str, checksum: str) -> str:
    """Remove the checksum the way bbb-web does (literal replacements, in order)."""
    query = raw_query.replace("&checksum=" + checksum, "")
    query = query.replace("checksum=" + checksum + "&", "")
    return query.replace("checksum=" + checksum, "")


def matches(call_name: str, query: str, checksum: str, secrets: Iterable[str]) -> bool:
    """Whether ``checksum`` signs ``call_name + query`` with any of ``secrets``.

    Every secret is tried, so the time taken does not tell which one matched.
    """
    algorithm = ALGORITHMS_BY_LENGTH.get(len(checksum))
    if algorithm is None:
        return False
    given = checksum.lower().encode("ascii", "replace")
    found = False
    for secret in secrets:
        expected = compute(call_name, query, secret, algorithm).encode("ascii")
        found |= hmac.compare_digest(expected, given)
    return found


def verify(
    call_name: str,
    raw_query: str,
    secrets: Sequence[str],
    body_params: Sequence[tuple[str, str]] = (),
) -> bool:
    """Check a request the way bbb-web does.

    ``raw_query`` is the URL's query string exactly as received.  When the
    checksum is not over the URL query, the canonical form of every parameter
    (URL and form body) is tried, as bbb-common-web 2.5-2.7 does for POSTs.
    """
    raw_query = raw_query.translate(_CONTROL_CHARS)
    checksum = find_checksum(raw_query)
    if checksum is None:
        checksum = dict(body_params).get("checksum")
        if checksum is None:
            return False
    if matches(call_name, strip_checksum(raw_query, checksum), checksum, secrets):
        return True
    if not body_params:
        return False
    canonical = canonical_query(_params_without_checksum(raw_query, body_params))
    return matches(call_name, canonical, checksum, secrets)


def _params_without_checksum(
    raw_query: str, body_params: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    url_params = parse_qsl(raw_query, keep_blank_values=True)
    return [(k, v) for k, v in [*url_params, *body_params] if k != "checksum"]


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """Parameters sorted by name, values form-encoded: bbb-common-web's POST fallback."""
    ordered = sorted(params, key=lambda item: item[0])
    return "&".join(f"{key}={quote_plus(value)}" for key, value in ordered)


def signed_query(
    call_name: str, params: Sequence[tuple[str, str]], secret: str, algorithm: str = "sha1"
) -> str:
    """A fresh query string for ``params`` with its checksum appended."""
    query = urlencode(params, quote_via=quote_plus)
    checksum = compute(call_name, query, secret, algorithm)
    return f"{query}&checksum={checksum}" if query else f"checksum={checksum}"
