"""create: admission (SPEC §4), placement, default texts, and the call to the backend.

The flow, one arrow a function call::

    request -> resolve size and duration -> ledger.admit (atomic, reserves)
            -> end preempted overtime meetings -> backend create
            -> confirm (or release and maybe try another backend) -> answer

A backend that refuses (answers FAILED for a reason that is not the
customer's) or cannot be reached before anything was sent is skipped for the
next backend on the ring.  A backend that timed out or broke mid-answer may
have created the meeting, so no other backend is tried: the reservation is
released and the customer gets an error it can retry.

Failover: a create of a meeting pinned to a DOWN backend is admitted afresh
on a live one, its old pin released in the same step (``Admit.replaces``, see
:mod:`proxy.ledger.model`); with no live backend to take it, the answer is
``serverUnavailable``.  Every create's answer time feeds the backend's latency
average (:mod:`proxy.health`).

Voice bridges (:mod:`proxy.voice.bridges`): unless ``[voice] allocate = false``, the
ledger gives the meeting its ``voiceBridge`` as it admits it (the customer's own when
free pool-wide, else ``nonUniqueVoiceBridge``), and the backend is sent that one and
the configured ``dialNumber``.  A backend refusing a bridge the gateway chose (a meeting
there the ledger does not know) is skipped like any refusing backend, and the next one
gets a new bridge.
"""

from __future__ import annotations

import logging

import trio

from proxy.backends.client import Reply
from proxy.bbb import analytics, callbacks, recording_ready, rewrite
from proxy.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    NoServerCapacity,
    ServerTagUnavailable,
    ValidationError,
)
from proxy.gateway import Gateway
from proxy.ledger.model import Admit, CreateRequest, Duplicate, Refuse, Reservation
from proxy.placement import TagRule, parse_tags
from proxy.request import Answer, ApiRequest
from proxy.texts import apply_default_texts
from proxy.voice.bridges import is_bridge

log = logging.getLogger(__name__)

# FAILED answers that are about the request, not the server: never retried elsewhere.
CUSTOMER_ERRORS = frozenset({"validationError", "idNotUnique", "nonUniqueVoiceBridge"})
MAX_ATTEMPTS = 3
SERVER_TAG = "meta_server-tag"


async def create(gw: Gateway, req: ApiRequest) -> Answer:
    request = _create_request(req, gw.config.voice.allocate)
    excluded: set[str] = set()
    refused: BackendUnavailable | None = None
    rule = tag_rule(req)
    backend_tags = {b.id: frozenset(b.tags) for b in gw.backends()}
    while True:
        decision = await gw.ledger.decide(
            request,
            req.customer.max_connections,
            gw.backend_specs(),
            lambda loads: gw.ring.choose(
                request.backend_meeting_id,
                request.connections,
                loads,
                exclude=excluded,
                rule=rule,
                backend_tags=backend_tags,
            ),
            bridge_length=gw.config.voice.length if gw.config.voice.allocate else None,
        )
        match decision:
            case Refuse(error):
                raise refused or _on_down_backend(gw, request) or _tagged(error, rule)
            case Duplicate(reservation) if gw.ledger.settling(reservation.key):
                await gw.ledger.wait_settled(reservation.key)
            case Duplicate(reservation):
                # Confirmed, or pending from before a restart (its answer was never seen):
                # the backend it is pinned to says whether it exists.
                return await _forward(gw, req, reservation)
            case Admit(reservation, victims, replaces):
                if replaces is not None:
                    gw.count("moved")
                    log.warning(
                        "meeting %s: backend %s is down, re-creating it on %s",
                        reservation.key,
                        replaces.backend_id,
                        reservation.backend_id,
                    )
                _end_victims(gw, victims)
                try:
                    return await _first_create(gw, req, reservation)
                except BackendUnavailable as exc:
                    excluded.add(reservation.backend_id)
                    refused = exc
                    if len(excluded) >= MAX_ATTEMPTS:
                        raise


def tag_rule(req: ApiRequest) -> TagRule:
    """The placement tags of a create: its ``meta_server-tag`` (else the customer's
    default tags), and the customer's required tags."""
    wanted, strict = parse_tags(_server_tag(req.params))
    customer = req.customer
    return TagRule(
        wanted=wanted or frozenset(customer.default_tags),
        strict=strict,
        required=frozenset(customer.required_tags),
    )


def _server_tag(params: list[tuple[str, str]]) -> str | None:
    return next((v for k, v in params if k.lower() == SERVER_TAG), None)


def _tagged(error: Exception, rule: TagRule) -> Exception:
    """No room where the tags allow: Scalelite's serverTagUnavailable when tags ruled
    backends out, else the ledger's answer."""
    if not rule.requires or type(error) is not NoServerCapacity:  # not NoVoiceBridge
        return error
    names = ";".join(sorted(rule.wanted if rule.strict else rule.required))
    return ServerTagUnavailable(f"There is no available server with the required tag={names}.")


def _on_down_backend(gw: Gateway, request: CreateRequest) -> BackendUnavailable | None:
    """A meeting pinned to a DOWN backend that no live one can take: the server is the
    problem, not capacity (every backend with room refusing is the caller's other case)."""
    pinned = gw.ledger.get((request.customer, request.meeting_id))
    if pinned is None or not gw.backend_down(pinned.backend_id):
        return None
    return BackendUnavailable(pinned.backend_id, "down, and no other server can take the meeting")


def _create_request(req: ApiRequest, allocate: bool) -> CreateRequest:
    meeting_id = req.meeting_id()
    name = req.first("name")
    if name is None or not name.strip():
        raise ValidationError("You must provide a meeting name")
    customer = req.customer
    asked_size = max(req.integer("maxParticipants") or 0, 0)  # 0 or less: not given
    asked_duration = max(req.integer("duration") or 0, 0)
    return CreateRequest(
        customer=customer.id,
        meeting_id=meeting_id,
        backend_meeting_id=rewrite.backend_meeting_id(customer.id, meeting_id),
        connections=asked_size or customer.default_max_participants,
        duration=asked_duration or customer.default_duration,
        asked_duration=asked_duration,
        voice_bridge=_asked_bridge(req) if allocate else None,
    )


def _asked_bridge(req: ApiRequest) -> str | None:
    """The customer's own voiceBridge (None if it sent none); bbb-web's error if not one."""
    asked = (req.first("voiceBridge") or "").strip()
    if not asked:
        return None
    if not is_bridge(asked):
        raise ValidationError("Voice bridge must be an integer.")
    return asked


async def _first_create(gw: Gateway, req: ApiRequest, reservation: Reservation) -> Answer:
    """Send the admitted create; confirm on success, release on anything else."""
    try:
        reply = await _send(gw, req, reservation)
    except BaseException:
        with trio.CancelScope(shield=True):
            await gw.ledger.release(reservation.key, "failed")
        raise
    if not reply.ok:
        await gw.ledger.release(reservation.key, "failed")
        if not _customers_fault(reply.message_key, req):
            log.warning(
                "backend %s refused a create: %s", reservation.backend_id, reply.message_key
            )
            raise BackendUnavailable(reservation.backend_id, f"refused: {reply.message_key}")
        return Answer.xml(rewrite.serialise(reply.root))
    await gw.ledger.confirm(reservation.key)
    await gw.hooks.meeting_started(*reservation.key)  # runs (again): its hooks stay
    await gw.ledger.durable()  # SUCCESS only once on disk, else serverUnavailable (kept)
    return _answer(reply, reservation)


async def _forward(gw: Gateway, req: ApiRequest, reservation: Reservation) -> Answer:
    """A repeated create: same backend, BBB answers duplicateWarning; nothing reserved."""
    reply = await _send(gw, req, reservation)
    if not reply.ok:
        return Answer.xml(rewrite.serialise(reply.root))
    if not reservation.confirmed:
        await gw.ledger.confirm(reservation.key)
    return _answer(reply, reservation)


async def _send(gw: Gateway, req: ApiRequest, reservation: Reservation) -> Reply:
    """The create on the reservation's backend; its answer time feeds the latency average."""
    params = backend_params(gw, req, reservation)
    client = gw.client(reservation.backend_id)
    who = req.customer.id  # its fair share of the backend's connections applies
    started = trio.current_time()
    try:
        if req.body:
            reply = await client.call(
                "create", params, body=req.body, content_type=req.content_type, customer=who
            )
        else:
            reply = await client.call("create", params, customer=who)
    except BackendTimeout:
        gw.observe_latency(reservation.backend_id, trio.current_time() - started)
        raise
    # A refused or broken connection (any other BackendError) says nothing of latency.
    gw.observe_latency(reservation.backend_id, trio.current_time() - started)
    return reply


def backend_params(gw: Gateway, req: ApiRequest, reservation: Reservation) -> list[tuple[str, str]]:
    """What the backend is sent: namespaced id, resolved size, duration 0, texts, tags."""
    params = rewrite.without(req.params, ["meetingID", "maxParticipants", "duration"])
    params = _server_tag_param(params)
    params = _voice_params(gw, params, reservation)
    params = apply_default_texts(params, gw.config.texts)
    params, customer_urls, kept = callbacks.split_customer_urls(params)
    params, ready_url = recording_ready.split(params)
    params, analytics_url = analytics.split(params)
    ended, end_callback = callbacks.ended_urls(
        gw.config.proxy.public_url,
        gw.client(reservation.backend_id).backend,
        reservation.backend_meeting_id,
        reservation.meeting_id,
        customer_urls,
        reservation.created_at,
    )
    return [
        ("meetingID", reservation.backend_meeting_id),
        *params,
        ("maxParticipants", str(reservation.connections)),
        ("duration", "0"),  # the gateway never ends a meeting for its duration (SPEC §4)
        ("meetingEndedURL", ended),
        ("meta_endCallbackUrl", end_callback),
        *rewrite.tags(
            reservation.customer,
            reservation.meeting_id,
            reservation.asked_duration,
            reservation.created_at,
        ),
        *kept,
        *recording_ready.backend_params(
            gw.config.proxy.public_url,
            gw.client(reservation.backend_id).backend,
            reservation.customer,
            reservation.meeting_id,
            ready_url,
        ),
        *analytics.backend_params(
            gw.config.proxy.public_url,
            gw.client(reservation.backend_id).backend,
            reservation.customer,
            reservation.meeting_id,
            analytics_url,
        ),
    ]


def _server_tag_param(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``meta_server-tag`` as the backend is told it: the tags without the ``!``."""
    given = _server_tag(params)
    if given is None:
        return params
    kept = [(k, v) for k, v in params if k.lower() != SERVER_TAG]
    tags = given.strip().removesuffix("!").strip()
    return [*kept, (SERVER_TAG, tags)] if parse_tags(tags)[0] else kept


def _voice_params(
    gw: Gateway, params: list[tuple[str, str]], reservation: Reservation
) -> list[tuple[str, str]]:
    """The reservation's voiceBridge instead of the customer's; the configured dialNumber
    when the create names none (BBB puts both into %%CONFNUM%% and %%DIALNUM%%)."""
    if reservation.voice_bridge:
        params = [
            *rewrite.without(params, ["voiceBridge"]),
            ("voiceBridge", reservation.voice_bridge),
        ]
    dial_number = gw.config.voice.dial_number_for(reservation.customer)
    if dial_number and not (rewrite.first_values(params).get("dialNumber") or "").strip():
        params = rewrite.replace_param(params, "dialNumber", dial_number)
    return params


def _customers_fault(message_key: str, req: ApiRequest) -> bool:
    """A refusal about the request itself, not the server: a voice bridge in use counts
    only when the customer chose it (one the gateway chose is the backend's conflict)."""
    if message_key == "nonUniqueVoiceBridge":
        return bool((req.first("voiceBridge") or "").strip())
    return message_key in CUSTOMER_ERRORS or message_key.startswith("missingParam")


def _answer(reply: Reply, reservation: Reservation) -> Answer:
    rewrite.restore_meeting(reply.root, reservation.meeting_id, reservation.asked_duration)
    return Answer.xml(rewrite.serialise(reply.root))


def _end_victims(gw: Gateway, victims: tuple[Reservation, ...]) -> None:
    """End preempted overtime meetings; their connections are already free in the ledger."""
    for victim in victims:
        gw.spawn("end-preempted", _end_one, gw, victim)


async def _end_one(gw: Gateway, victim: Reservation) -> None:
    try:
        reply = await gw.client(victim.backend_id).call(
            "end", [("meetingID", victim.backend_meeting_id)]
        )
    except BackendError as exc:
        log.warning("could not end preempted meeting on %s: %s", victim.backend_id, exc)
        gw.tally("preemptions", "end_failed")
        return
    gw.tally("preemptions", "ended" if reply.ok else "end_failed")
    log.info("ended overtime meeting %s on %s: %s", victim.key, victim.backend_id, reply.ok)
