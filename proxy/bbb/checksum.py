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

The gateway is stricter than bbb-web in two ways, because it re-signs what it
accepts for a backend, so whatever the checksum does not cover would reach the
backend signed (:func:`signed_params` is the rule; :func:`verify` is its yes/no):

- **One checksum, one whole component.**  bbb-web's literal removal lets a
  holder of a signed URL insert further ``&checksum=<C>`` into values and so
  truncate values or drop parameters from what is checked.  A query is
  accepted only with exactly one ``checksum`` parameter (in the URL query, or
  else in the form body) that is a whole ``&``-separated ``checksum=<C>``
  component, and no other ``checksum=`` anywhere; the signed string is the
  query with that one component removed.  For first, middle, last and the
  ``?&checksum=`` form, that is exactly the string bbb-web's replacements give.
- **Only signed parameters.**  When the checksum is over the URL query, the
  request's parameters are the URL query's; body parameters beside a non-empty
  signed query are refused, not merged.  A body-only POST (checksum over the
  empty query, as the 3.0 docs say, or over the canonical form of every
  parameter, as 2.5-2.7 do) is accepted with its body parameters.  A parameter
  both in the URL and in the body is refused, as bbb-web refuses it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote_plus, unquote_plus, urlencode

ALGORITHMS_BY_LENGTH = {40: "sha1", 64: "sha256", 96: "sha384", 128: "sha512"}
SUPPORTED_ALGORITHMS = frozenset(ALGORITHMS_BY_LENGTH.values())
_CONTROL_CHARS = dict.fromkeys(range(32))


def compute(call_name: str, query: str, secret: str, algorithm: str = "sha1") -> str:
    """The hex checksum BBB expects for ``call_name`` with ``query``."""
    data = (call_name + query + secret).encode("utf-8")
    return hashlib.new(algorithm, data).hexdigest()


type Params = list[tuple[str, str]]
MARK = "checksum="


@dataclass(frozen=True, slots=True)
class Split:
    """A raw query cut at its one checksum component."""

    checksum: str | None  # None: the query has no checksum parameter
    signed: str  # the query without the checksum component, as received


def split_checksum(raw_query: str) -> Split | None:
    """The query's checksum and the string it signs; None when the query is ambiguous.

    Ambiguous: more than one parameter named ``checksum`` (percent-encoded names
    count), or ``checksum=`` anywhere but at the start of the one such component.
    """
    parts = raw_query.split("&")
    named = [i for i, part in enumerate(parts) if _name(part) == "checksum"]
    if len(named) > 1 or raw_query.count(MARK) != len(named):
        return None
    if not named:
        return Split(None, raw_query)
    (index,) = named
    if not parts[index].startswith(MARK):
        return None
    signed = "&".join(parts[:index] + parts[index + 1 :])
    return Split(parts[index][len(MARK) :], signed)


def _name(component: str) -> str:
    return unquote_plus(component.partition("=")[0])


def find_checksum(raw_query: str) -> str | None:
    """The value of the first ``checksum`` component of a raw query string, if any."""
    for part in raw_query.split("&"):
        if part.startswith("checksum="):
            return part[len("checksum=") :]
    return None


def strip_checksum(raw_query: str, checksum: str) -> str:
    """Remove the checksum the way bbb-web does (literal replacements, in order).

    Not used to verify: :func:`split_checksum` is the gateway's rule.  Kept as the
    reference the tests compare it with (the same string for every query it accepts).
    """
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
    """Whether the request is signed by one of ``secrets`` (see :func:`signed_params`)."""
    return signed_params(call_name, raw_query, secrets, body_params) is not None


def signed_params(
    call_name: str,
    raw_query: str,
    secrets: Sequence[str],
    body_params: Sequence[tuple[str, str]] = (),
) -> Params | None:
    """The parameters the request's checksum covers (checksum removed), or None.

    ``raw_query`` is the URL's query string exactly as received, ``body_params``
    the decoded form body.  The rules are in the module docstring.

    Error handling: never raises; anything that does not verify is None.
    """
    split = split_checksum(raw_query.translate(_CONTROL_CHARS))
    if split is None:
        return None
    url = parse_qsl(split.signed, keep_blank_values=True)
    body = [(k, v) for k, v in body_params if k != "checksum"]
    given = _the_checksum(split, body_params)
    if given is None or {k for k, _ in url} & {k for k, _ in body}:
        return None
    if matches(call_name, split.signed, given, secrets):
        return None if url and body else url or body
    if body and matches(call_name, canonical_query(url + body), given, secrets):
        return url + body
    return None


def algorithm_of(raw_query: str, body_params: Sequence[tuple[str, str]] = ()) -> str:
    """The algorithm a request's one checksum was made with (by its length); sha1 if unknown.

    For a request :func:`signed_params` accepted (delivery signs a hook's events
    with the algorithm its hooks/create was signed with).
    """
    split = split_checksum(raw_query.translate(_CONTROL_CHARS))
    given = None if split is None else _the_checksum(split, body_params)
    return ALGORITHMS_BY_LENGTH.get(len(given or ""), "sha1")


def _the_checksum(split: Split, body_params: Sequence[tuple[str, str]]) -> str | None:
    """The one checksum of the request: in the URL query, or else the body's only one."""
    in_body = [v for k, v in body_params if k == "checksum"]
    if split.checksum is not None:
        return None if in_body else split.checksum
    return in_body[0] if len(in_body) == 1 else None


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
