"""The privacy filter: what of a backend's webhook event a customer may see.

:func:`scrubbed` runs on every event before it is queued for a customer.  It is pure
and total (any JSON value in, a JSON value of the same shape out, never an exception)
and knows no event type: bbb-webhooks' mapped events, the raw ones it refuses to
deliver, and whatever a later BBB adds are all treated by the same rules, so a field
the table below does not name is still scanned.  The per-event decisions, field by
field, are in ``docs/decisions.md`` ("Webhooks: the privacy filter").

Two kinds of rule, applied at every depth:

* **By key** (:func:`is_secret_key`; keys compared lower-cased without ``-``/``_``):
  a field that names an address, a client, a credential or a password -- ``ip-address``,
  ``user-agent``, ``referer``, ``session-token``, ``learningDashboardAccessToken``,
  ``moderator-pass``/``viewer-pass`` (BBB's ``moderatorPW``/``attendeePW``), a dial-in
  caller's number, any key containing ``token``, ``secret`` or ``password`` -- keeps
  its key and gets an empty value of the same JSON type (``""``, ``0``, ``false``,
  ``[]``, ``{}``), so receivers that index the key still parse the event.
* **By value** (:func:`scrub_text`), on every string and every key, whatever the key:
  an IPv4 or IPv6 address becomes ``""`` when it is the whole value and ``[ip]``
  inside text; a JWT, a run of 32 or more hex digits, or a 32+ character base64 run
  mixing upper case, lower case and digits (the shape of session and auth tokens)
  becomes a stable pseudonym ``tok-<12 hex>`` (sha256 of the token: the same camera
  stream keeps the same name in its start and end events, and the token cannot be
  recovered from it); a user agent (``Mozilla/...``) becomes ``""``; a URL's
  ``user:password@`` is removed and its query parameters named like secrets are
  emptied.

Identifiers are what a customer needs to match an event to its meeting and its users,
and they look random by nature (Moodle's meetingIDs and LTI user ids are sha1 hex):
under the id keys of :data:`ID_KEYS` a string is kept except for addresses and JWTs,
and BBB's own ``<sha1 hex>-<13 digit ms>`` ids (internal meeting ids, record ids,
presentation and poll ids) are kept wherever they are.

Containers nested deeper than :data:`MAX_DEPTH` (real events nest 6 deep, recordings'
metadata 8) are cut: replaced by an empty container of the same kind.  Values that no
JSON document holds (a tuple is taken as a list) become ``None``; entries with a
non-string key are dropped.

Error handling: none is needed and none escapes -- every branch is a plain string,
regex or dictionary operation on values already in memory; the recursion is bounded
by :data:`MAX_DEPTH`, and the only inputs whose length drives super-linear work (runs
of address characters) are bounded by :data:`_MAX_ADDRESS_RUN`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Mapping

from proxy.bbb.numbers import parse_int

MAX_DEPTH = 32  # containers below this many levels are replaced by empty ones
IP_MARK = "[ip]"  # what an address inside text becomes
PSEUDONYM_PREFIX = "tok-"
_PSEUDONYM_HEX = 12  # 48 bits of sha256: stable, short, and no token shape itself
_MAX_ADDRESS_RUN = 256  # longer runs of [0-9a-f:.] holding colons are removed whole
_MAX_V6_TEXT = 45  # the longest textual IPv6 address (with an embedded IPv4)
_MAX_ZONE = 32  # room for a "%zone" after it

# Keys, compared by _norm(): lower-case, without "-", "_", "." and spaces.
_SECRET_EXACT = frozenset(
    {
        # where the participant is and what runs there
        "ip", "ipaddress", "ipaddr", "clientip", "remoteip", "remoteaddr",
        "remoteaddress", "xforwardedfor", "forwardedfor", "xrealip",
        "useragent", "referer", "referrer",
        # credentials
        "session", "sessionid", "jsessionid", "auth", "authorization", "cookie",
        "setcookie", "checksum", "signature", "sig", "signedparameters", "apikey",
        "jwt", "bearer", "pass", "pw", "pwd",
        # a dial-in participant's telephone number (raw voice events)
        "callernum", "callerid",
    }
)  # fmt: skip
_SECRET_PARTS = ("token", "secret", "password", "passwd")
# moderatorPass, viewerPass, attendeePW, moderatorPW; moodle_session, PHPSESSID
_SECRET_SUFFIXES = ("pass", "pw", "session", "sessid")
ID_KEYS = frozenset(
    {
        "internalmeetingid", "externalmeetingid", "meetingid", "intid", "extid",
        "parentid", "recordid", "internaluserid", "externaluserid", "userid",
        "presenterid", "pollid", "presentationid", "padid", "externalpadid",
    }
)  # fmt: skip

_BBB_ID = r"[0-9a-f]{40}-\d{13}(?!\d)"  # sha1(external id)-createTime: a meeting's id
_HEX = re.compile(rf"(?<![0-9A-Fa-f])(?:(?P<bbb>{_BBB_ID})|[0-9A-Fa-f]{{32,}})", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{32,}={0,2}", re.ASCII)
# Each pattern can start only where its run starts (lookbehinds, delimiters outside the
# classes), so that no text makes it scan the same characters again and again.
_JWT = re.compile(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{2,}={0,2}\.[A-Za-z0-9_-]{2,}={0,2}\.[A-Za-z0-9_-]*",
    re.ASCII,
)
_DOTTED = re.compile(r"(?<!\d)\d+(?:\.\d+){3,}(?!\d)", re.ASCII)  # IPv4 addresses are in these
_ADDRESS_RUN = re.compile(r"[0-9A-Fa-f:.]+(?:%[0-9A-Za-z_.~-]+)?", re.ASCII)
# The runs that may hold an IPv6 address: two colons at least.
_V6_RUN = re.compile(
    r"(?<![0-9A-Fa-f:.])[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[0-9A-Za-z_.~-]+)?",
    re.ASCII,
)
_USERINFO = re.compile(r"(?<=://)[^/?#@\s]+@")
_QUERY_PARAM = re.compile(r"(?<=[?&;])([^=?&#;\s]+)=([^?&#;\s]*)")
_USER_AGENT = re.compile(r"\s*Mozilla/\d", re.ASCII | re.IGNORECASE)


def scrubbed(event: object) -> object:
    """``event`` with participants' addresses, clients, credentials and tokens removed.

    Same shape: every key the input has (as a string, scrubbed like a value) is there,
    every list keeps its length, every scalar keeps its JSON type.

    Error handling: never raises, for any input (see the module's docstring).
    """
    return _walk(event, 0)


def _walk(value: object, depth: int) -> object:
    if isinstance(value, str):
        return scrub_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {} if depth >= MAX_DEPTH else _walk_object(value, depth + 1)
    if isinstance(value, (list, tuple)):
        return [] if depth >= MAX_DEPTH else [_walk(item, depth + 1) for item in value]
    return None


def _walk_object(value: Mapping[object, object], depth: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, str):
            out[scrub_text(key)] = _field(key, item, depth)
    return out


def _field(key: str, value: object, depth: int) -> object:
    if is_secret_key(key):
        return _blank(value, depth)
    if is_id_key(key) and isinstance(value, str):
        return scrub_text(value, identifier=True)
    return _walk(value, depth)


def blank(value: object) -> object:
    """``value`` emptied, shape kept: every scalar becomes the empty value of its JSON
    type (``""``, ``0``, ``false``; ``None`` stays), containers keep their keys (as
    :func:`scrub_text` leaves them) and lengths.
    """
    return _blank(value, 0)


def _blank(value: object, depth: int) -> object:
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            return {}
        return {scrub_text(k): _blank(v, depth + 1) for k, v in value.items() if isinstance(k, str)}
    if isinstance(value, (list, tuple)):
        return [] if depth >= MAX_DEPTH else [_blank(item, depth + 1) for item in value]
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return 0
    return "" if isinstance(value, str) else None


_SEPARATORS = str.maketrans("", "", "-_. ")


def _norm(key: str) -> str:
    return _norm_short(key) if len(key) <= 64 else key.lower().translate(_SEPARATORS)


@functools.lru_cache(maxsize=4096)  # events repeat their keys: 4096 short ones at most
def _norm_short(key: str) -> str:
    return key.lower().translate(_SEPARATORS)


def is_secret_key(key: str) -> bool:
    """Whether a field called ``key`` holds an address, client, credential or password."""
    name = _norm(key)
    return (
        name in _SECRET_EXACT
        or any(part in name for part in _SECRET_PARTS)
        or name.endswith(_SECRET_SUFFIXES)
    )


def is_id_key(key: str) -> bool:
    """Whether a field called ``key`` holds a meeting's or user's identifier."""
    return _norm(key) in ID_KEYS


def scrub_text(text: str, *, identifier: bool = False) -> str:
    """``text`` without addresses, tokens, user agents and URL credentials.

    With ``identifier`` (a value under an id key) only addresses and JWTs are
    removed: an identifier's hex or base64 shape is not a token's.
    """
    if _plain(text):
        return text
    if _is_address(text.strip()):
        return ""
    if not identifier and _USER_AGENT.match(text):
        return ""
    text = _JWT.sub(_pseudonym, text)
    text = _V6_RUN.sub(_without_v6, text)
    text = _DOTTED.sub(_without_v4, text)
    if identifier:
        return text
    text = _USERINFO.sub("", text)
    text = _QUERY_PARAM.sub(_query_param, text)
    text = _HEX.sub(_hex, text)
    return _BASE64.sub(_base64, text)


def _plain(text: str) -> bool:
    """Too short for a token (32), no colon (IPv6, URLs), no ``=`` (query parameters),
    fewer than two dots (IPv4 has three, a JWT two), no user agent: nothing to find.
    Most keys and values of an event are such; this keeps the filter cheap.
    """
    return (
        len(text) < 32
        and ":" not in text
        and "=" not in text
        and text.count(".") < 2
        and not _USER_AGENT.match(text)
    )


def pseudonym(token: str) -> str:
    """The stable stand-in for ``token``: equal tokens, equal pseudonyms."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
    return PSEUDONYM_PREFIX + digest[:_PSEUDONYM_HEX]


def _pseudonym(match: re.Match[str]) -> str:
    return pseudonym(match.group())


def _hex(match: re.Match[str]) -> str:
    return match.group() if match.group("bbb") else pseudonym(match.group())


def _base64(match: re.Match[str]) -> str:
    run = match.group()
    mixed = (
        any(c.isupper() for c in run)
        and any(c.islower() for c in run)
        and any(c.isdigit() for c in run)
    )
    return pseudonym(run) if mixed else run


def _query_param(match: re.Match[str]) -> str:
    name = match.group(1)
    return f"{name}=" if is_secret_key(name) else match.group()


def _without_v4(match: re.Match[str]) -> str:
    """A dotted number with every four octets in a row marked (``300.1.2.3.4``: one)."""
    parts = match.group().split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        if _is_ipv4(".".join(parts[i : i + 4])):
            out.append(IP_MARK)
            i += 4
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(_octet(p) for p in parts)


def _octet(text: str) -> bool:
    value = parse_int(text, max_digits=3)  # ASCII digits only, no int() on long text
    return value is not None and value <= 255 and text == text.strip()


def _is_address(text: str) -> bool:
    return _is_ipv4(text) or _is_ipv6(text)


def _without_v6(match: re.Match[str]) -> str:
    """A run of address characters: ``[ip]`` if it holds an IPv6 address, else itself.

    The run is maximal, so an address glued to other hex digits, colons or dots takes
    its neighbours with it: the run is marked whole if a piece of it that starts at its
    beginning or after one of its first two separators, and ends at a separator or at
    its end, is an address (``id:2001:db8::1.A`` holds ``2001:db8::1``).
    """
    run = match.group()
    if len(run) > _MAX_ADDRESS_RUN or _holds_v6(run):
        return IP_MARK
    return run


def _holds_v6(run: str) -> bool:
    seps = [i for i, ch in enumerate(run) if ch in ":.%"]
    for start in [0, *(i + 1 for i in seps[:2])]:
        limit = start + _MAX_V6_TEXT + _MAX_ZONE
        ends = [len(run), *(i for i in reversed(seps) if start < i <= limit)]
        for end in ends:
            piece = run[start:end]
            if ("::" in piece or piece.count(":") >= 6) and _is_ipv6(piece):
                return True
    return False


def _is_ipv6(text: str) -> bool:
    """Whether ``text`` is an IPv6 address (an optional ``%zone`` and brackets allowed)."""
    text = text.removeprefix("[").removesuffix("]")
    if len(text) > _MAX_V6_TEXT + _MAX_ZONE or not _ADDRESS_RUN.fullmatch(text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
