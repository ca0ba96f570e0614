"""Recording-ready callbacks, decided without I/O: the gateway's own URL, the JWTs, the
delivery rules and the queue's records.

BBB's post_publish script POSTs ``signed_parameters=<JWT>`` to the meeting's
``meta_bbb-recording-ready-url`` (else ``meta_bn-…``, else ``meta_canvas-…``) once per
published format: HS256, key = the server's secret used raw, payload ``{"meeting_id":
<external meetingID>, "record_id": <recordID>}`` (bbb-api.md §4).  Sent straight to the
customer, that JWT is signed with the backend's secret and names the namespaced meetingID,
so the customer could not verify it.  So on create the gateway drops the customer's keys
(:func:`split`) and puts its own URL in their place (:func:`backend_params`)::

    {public_url}/callbacks/v1/recording-ready?b=<backend>&c=<customer>&m=<customer's
        meetingID>&u=<customer's URL>&sig=<hex>

``sig`` is HMAC-SHA256 under a key derived from the backend's secret (its own derivation,
not the meeting-ended one's), over the other parameters in that order, so the receiver
needs no lookup and nobody without the key can make the gateway POST anywhere.  The
receiver checks the URL (else 403) and the backend's JWT (else 401, as BBB's receivers
answer a secret mismatch), queues a delivery, and the delivery POSTs the customer's URL
as BBB would: ``signed_parameters=<JWT signed with the customer's secret>``, payload
``{"meeting_id": <customer's meetingID>, "record_id": <recordID>}``.

Delivery outcomes (:func:`outcome`): 2xx is done; 401, 404 and 410 are final (BBB's script
treats them so: secret mismatch, ignored, meeting deleted); a URL the gateway may not call
is final; anything else is retried after :func:`backoff`, at most :data:`MAX_ATTEMPTS`.

The queue (:class:`Pending`) lives on a :class:`~proxy.store.Log` named "recording-ready":
``queue`` records (a delivery to make) and ``done`` records (it ended); replaying them gives
the deliveries still to make, and compaction writes a ``queue`` record for each of those.
Several gateway instances on one Redis: a ``queue`` record also names the ``node`` (the
instance) that delivers it, and a ``claim`` record (``{"op": "claim", "ids", "node"}``)
hands the deliveries of an instance that stopped to another
(:class:`proxy.calls.recording_ready.ReadyQueue`); on the local store neither appears.

Error handling: nothing here raises on what a peer sends; :func:`verify_url` and
:func:`backend_claims` answer None for anything not genuine.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning

from proxy.bbb import customer_urls, rewrite
from proxy.config import Backend
from proxy.errors import StateError
from proxy.store import Json, Record

log = logging.getLogger(__name__)

PATH = rewrite.READY_PATH
READY_KEYS = rewrite.READY_URL_KEYS
SIGNED = ("b", "c", "m", "u")
MAX_ATTEMPTS = 12  # with backoff(): about an hour and a half in all
FINAL_STATUSES = frozenset({401, 404, 410})


# -- create ------------------------------------------------------------------------------------


def split(
    params: Sequence[tuple[str, str]],
) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    """``params`` without the recording-ready keys, and (key, URL) of the customer's (the
    first key in BBB's order with a value; None when there is none or it may not be
    called)."""
    kept: list[tuple[str, str]] = []
    given: dict[str, str] = {}
    for key, value in params:
        name = key.lower().removeprefix("meta_")
        if key.lower().startswith("meta_") and name in READY_KEYS:
            given.setdefault(name, value)
        else:
            kept.append((key, value))
    chosen = next((k for k in READY_KEYS if given.get(k)), None)
    if chosen is None:
        return kept, None
    if customer_urls.problem(given[chosen]) is not None:
        log.warning("create: the %s is not a URL the gateway may call; dropped", chosen)
        return kept, None
    return kept, (chosen, given[chosen])


def backend_params(
    public_url: str,
    backend: Backend,
    customer: str,
    meeting_id: str,
    given: tuple[str, str] | None,
) -> list[tuple[str, str]]:
    """The gateway's own recording-ready URL for the backend, and the customer's kept aside
    under the gateway's prefix (shown back under its own key); none without one."""
    if given is None:
        return []
    key, url = given
    own = signed_url(public_url, PATH, backend, (customer, meeting_id, url), b"recording-ready")
    return [(f"meta_{READY_KEYS[0]}", own), (f"meta_{rewrite.TAG_PREFIX}{key}", url)]


def _sign(
    backend: Backend, params: Sequence[tuple[str, str]], purpose: bytes = b"recording-ready"
) -> str:
    """HMAC-SHA256 under a key derived from the backend's secret and the URL's ``purpose``
    (each callback the gateway signs has its own: one URL never passes for another)."""
    key = hashlib.sha256(b"bbb-proxy " + purpose + b":" + backend.secret.encode()).digest()
    return hmac.new(key, urlencode(params).encode(), hashlib.sha256).hexdigest()


def signed_url(
    public_url: str,
    path: str,
    backend: Backend,
    target: tuple[str, str, str],
    purpose: bytes,
) -> str:
    """The gateway's URL ``path`` naming (customer, customer's meetingID, customer's URL)
    on ``backend``, signed for ``purpose``; :func:`verify_url` reads it back."""
    customer, meeting_id, url = target
    signed = [("b", backend.id), ("c", customer), ("m", meeting_id), ("u", url)]
    return f"{public_url}{path}?{urlencode(signed)}&sig={_sign(backend, signed, purpose)}"


# -- the backend's notice ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """What a genuine gateway URL says: whose recording, and where to tell it."""

    backend_id: str
    customer: str
    meeting_id: str  # the customer's
    url: str  # the customer's recording-ready URL


def verify_url(
    raw_query: str, backends: Mapping[str, Backend], purpose: bytes = b"recording-ready"
) -> Target | None:
    """The target a URL the gateway signed for ``purpose`` names, or None if it did not."""
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return None
    values = rewrite.first_values(pairs)
    if any(k not in values for k in (*SIGNED, "sig")):
        return None
    backend = backends.get(values["b"])
    if backend is None:
        return None
    signed = [(k, values[k]) for k in SIGNED]
    given = values["sig"]
    if not given.isascii() or not hmac.compare_digest(given, _sign(backend, signed, purpose)):
        return None
    return Target(values["b"], values["c"], values["m"], values["u"])


def form_token(body: bytes) -> str | None:
    """The ``signed_parameters`` field of a urlencoded POST body."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return None
    return rewrite.first_values(pairs).get("signed_parameters")


def backend_claims(token: str, backend: Backend, target: Target) -> str | None:
    """The recordID of a genuine notice: the backend's JWT, for the meeting the URL names."""
    claims = _decoded(token, backend.secret)
    if claims is None:
        return None
    record_id, meeting = claims.get("record_id"), claims.get("meeting_id")
    expected = rewrite.backend_meeting_id(target.customer, target.meeting_id)
    if not isinstance(record_id, str) or not record_id or meeting != expected:
        return None
    return record_id


def _decoded(token: str, secret: str) -> dict[str, object] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            return None
    return claims if isinstance(claims, dict) else None


def signed_jwt(payload: Mapping[str, str], secret: str) -> str:
    """An HS256 JWT with ``secret`` used raw, as BBB signs it, whatever its length (pyjwt
    warns below 32 bytes; a BBB secret is what it is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(dict(payload), secret, algorithm="HS256")


# -- delivery ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST to make to a customer."""

    id: str
    url: str
    customer: str
    meeting_id: str
    record_id: str  # "" for an analytics callback
    body: str = ""  # an analytics callback's JSON document (proxy.bbb.analytics)


def delivery_id(target: Target, record_id: str, sequence: int) -> str:
    """Unique per notice received (BBB sends one per format: each is delivered)."""
    return f"{target.customer}/{record_id}/{sequence}"


def customer_form(delivery: Delivery, secret: str) -> dict[str, str]:
    payload = {"meeting_id": delivery.meeting_id, "record_id": delivery.record_id}
    return {"signed_parameters": signed_jwt(payload, secret)}


def outcome(status: int | None) -> str:
    """``done``, ``final`` (do not retry) or ``retry``, from the customer's answer.

    ``status`` None: the URL may not be called (final); 0: no answer (retry)."""
    if status is None or status in FINAL_STATUSES:
        return "final"
    if 200 <= status < 300:
        return "done"
    return "retry"


def backoff(attempt: int) -> float:
    """Seconds before attempt ``attempt + 1`` (1-based attempts): 2, 4, 8, … at most 20 min."""
    return float(min(1200, 2**attempt))


# -- the queue's records (a Log named "recording-ready", proxy.store) --------------------------


def queue_record(delivery: Delivery, node: str = "") -> Record:
    """The record that queues ``delivery``; ``node``: the instance that delivers it
    (several instances on one Redis; none on the local store)."""
    record: Record = {"op": "queue", **_fields(delivery)}
    if node:
        record["node"] = node
    return record


def claim_record(ids: Sequence[str], node: str) -> Record:
    """``node`` delivers ``ids`` from now on (their instance stopped)."""
    return {"op": "claim", "ids": list(ids), "node": node}


def done_record(delivery_id_: str, how: str) -> Record:
    return {"op": "done", "id": delivery_id_, "how": how}


def _fields(delivery: Delivery) -> dict[str, str]:
    fields = {
        "id": delivery.id,
        "url": delivery.url,
        "customer": delivery.customer,
        "meeting_id": delivery.meeting_id,
        "record_id": delivery.record_id,
    }
    return {**fields, "body": delivery.body} if delivery.body else fields


@dataclass
class Pending:
    """The deliveries still to make, in the order they were queued."""

    deliveries: dict[str, Delivery] = field(default_factory=dict)
    skipped: int = 0  # lines of a legacy file that could not be read
    owners: dict[str, str] = field(default_factory=dict)  # id -> the instance delivering it

    def apply(self, record: Mapping[str, Json]) -> None:
        """One record of the log.  Total: one it does not know is a ``StateError``."""
        op = record.get("op")
        if op == "queue" and _is_delivery(record):
            fields = {k: str(record[k]) for k in ("id", "url", "customer", "meeting_id")}
            body = record.get("body", "")
            self.deliveries[fields["id"]] = Delivery(
                record_id=str(record["record_id"]), body=str(body), **fields
            )
            node = record.get("node")
            if isinstance(node, str) and node:
                self.owners[fields["id"]] = node
        elif op == "done" and isinstance(record.get("id"), str):
            self.deliveries.pop(str(record["id"]), None)
            self.owners.pop(str(record["id"]), None)
        elif op == "claim" and _is_claim(record):
            node, ids = str(record["node"]), record["ids"]
            for delivery_id_ in ids if isinstance(ids, list) else ():
                if delivery_id_ in self.deliveries:
                    self.owners[str(delivery_id_)] = node
        else:  # the keys only: a URL may carry the customer's tokens
            raise StateError(f"not a recording-ready record: op {op!r}, keys {sorted(record)}")

    def records(self) -> Iterator[Record]:
        """What compaction writes: a ``queue`` record per delivery still to make."""
        return (queue_record(d, self.owners.get(d.id, "")) for d in list(self.deliveries.values()))

    @classmethod
    def from_legacy(cls, lines: Iterable[bytes]) -> Pending:
        """The JSON lines file of earlier versions; a line it cannot read is skipped and
        counted (that file had no framing to tell a torn line from a corrupt one)."""
        pending = cls()
        for line in lines:
            if line.strip():
                pending._apply_legacy(line)
        return pending

    def _apply_legacy(self, line: bytes) -> None:
        try:
            record = orjson.loads(line)
            if not isinstance(record, dict):
                raise StateError("not a JSON object")
            self.apply(record)
        except (orjson.JSONDecodeError, StateError):
            self.skipped += 1


def _is_claim(record: Mapping[str, object]) -> bool:
    ids = record.get("ids")
    return (
        isinstance(record.get("node"), str)
        and isinstance(ids, list)
        and all(isinstance(i, str) for i in ids)
    )


def _is_delivery(record: Mapping[str, object]) -> bool:
    keys = ("id", "url", "customer", "meeting_id", "record_id")
    return all(isinstance(record.get(k), str) for k in keys) and isinstance(
        record.get("body", ""), str
    )
