"""The scenarios: what is set up, which targets are measured, what is compared.

join
    Meetings are created through the gateway first; then signed join URLs for
    them are sent in a loop.  The gateway answers a join locally (a 302 to the
    backend's re-signed join URL, no backend call), so this measures the
    gateway's own per-request work: routing, checksum, ledger look-up, signing.
    Baselines: the bare endpoint answering a 302 to the very same URLs, and the
    floor (``bench/bare.py --fixed``: a fixed 200, no routing) answering them.

lean
    One process's own cost against the stack's floor, in one run: the join
    targets above, then getMeetingInfo for the same meetings forwarded by the
    gateway against the same call sent straight to the simulated backends (each
    direct backend holds the same meetingIDs, created on it directly).  Ratios:
    gateway join / floor, gateway join / bare 302, gateway getMeetingInfo /
    simulator getMeetingInfo.

create
    Every request creates a new meeting (unique meetingID, maxParticipants=1);
    the customer's max_connections and the backends' capacity are huge, so
    nothing is refused.  Meetings are NOT ended: they pile up in the ledger and
    the simulators during the run.  Each create goes through admission, a
    durable journal write (fsync), the call to a simulated backend and the
    answer's rewrite.  Baselines: the same create sent straight to simulated
    backends (the forwarded call alone; as many as the gateway has, in the same
    process, but holding only their own meetings), and the bare endpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from bench.client import fetch
from bench.loadgen import Expect
from bench.stack import (
    BACKEND_SECRET,
    CUSTOMER,
    CUSTOMER_SECRET,
    HOST,
    Endpoint,
    Stack,
)
from proxy.bbb.checksum import signed_query

SUCCESS = Expect(200, b"<returncode>SUCCESS</returncode>")
JOIN_REDIRECT = Expect(302, b"/bigbluebutton/api/join?")  # a failed join redirects elsewhere
JOIN_POOL = 1000  # distinct join URLs, sent round-robin
ALGORITHM = "sha256"

type Params = list[tuple[str, str]]
type Signer = Callable[[str, Params], str]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    endpoint: Endpoint
    next_path: Callable[[], str]
    expect: Expect


@dataclass(frozen=True, slots=True)
class Scenario:
    targets: tuple[Target, ...]  # measured in this order, baselines first
    comparisons: tuple[tuple[str, str], ...]  # (subject, baseline) target names


def gateway_path(call: str, params: Params) -> str:
    query = signed_query(call, params, CUSTOMER_SECRET, ALGORITHM)
    return f"/{CUSTOMER}/bigbluebutton/api/{call}?{query}"


def simulator_path(api: str, call: str, params: Params) -> str:
    return f"{api}/{call}?{signed_query(call, params, BACKEND_SECRET, ALGORITHM)}"


def create_params(meeting_id: str) -> Params:
    return [("meetingID", meeting_id), ("name", f"Room {meeting_id}"), ("maxParticipants", "1")]


def unique_creates(prefix: str, sign: Signer) -> Callable[[], str]:
    """A path source that never repeats a meetingID."""
    numbers = itertools.count()
    return lambda: sign("create", create_params(f"{prefix}-{next(numbers)}"))


async def join_scenario(stack: Stack, meetings: int) -> Scenario:
    ids = [f"join-room-{n}" for n in range(meetings)]
    for meeting_id in ids:
        await _create_through_gateway(stack, meeting_id)
    return _join(stack, ids)


def _join(stack: Stack, ids: list[str]) -> Scenario:
    meetings = len(ids)
    pool = [
        gateway_path(
            "join",
            [("meetingID", ids[n % meetings]), ("fullName", f"User {n}"), ("role", "VIEWER")],
        )
        for n in range(JOIN_POOL)
    ]
    paths = partial(next, itertools.cycle(pool))
    floor = Target("floor 200", stack.floor, paths, SUCCESS)
    bare = Target("bare 302", stack.bare, paths, JOIN_REDIRECT)
    gateway = Target("gateway join", stack.gateway, paths, JOIN_REDIRECT)
    comparisons = ((gateway.name, floor.name), (gateway.name, bare.name))
    return Scenario((floor, bare, gateway), comparisons)


async def lean_scenario(stack: Stack, meetings: int) -> Scenario:
    ids = [f"lean-room-{n}" for n in range(meetings)]
    for meeting_id in ids:
        await _create_through_gateway(stack, meeting_id)
        for port in stack.simulators.ports:
            await _create_directly(stack, port, meeting_id)
    join = _join(stack, ids)
    direct = partial(simulator_path, stack.simulator_api)
    sim = Target("simulator getMeetingInfo", stack.simulators, _infos(ids, direct), SUCCESS)
    gateway = Target("gateway getMeetingInfo", stack.gateway, _infos(ids, gateway_path), SUCCESS)
    return Scenario((*join.targets, sim, gateway), (*join.comparisons, (gateway.name, sim.name)))


def _infos(ids: list[str], sign: Signer) -> Callable[[], str]:
    pool = [sign("getMeetingInfo", [("meetingID", meeting_id)]) for meeting_id in ids]
    return partial(next, itertools.cycle(pool))


def create_scenario(stack: Stack) -> Scenario:
    direct = partial(simulator_path, stack.simulator_api)
    bare = Target("bare xml", stack.bare, unique_creates("bare", gateway_path), SUCCESS)
    sim = Target("simulator create", stack.simulators, unique_creates("direct", direct), SUCCESS)
    gateway = Target("gateway create", stack.gateway, unique_creates("gw", gateway_path), SUCCESS)
    comparisons = ((gateway.name, sim.name), (gateway.name, bare.name))
    return Scenario((bare, sim, gateway), comparisons)


async def _create_directly(stack: Stack, port: int, meeting_id: str) -> None:
    path = simulator_path(stack.simulator_api, "create", create_params(meeting_id))
    response = await fetch(HOST, port, path)
    if not SUCCESS.met_by(response):
        raise RuntimeError(f"set-up create {meeting_id} on :{port} failed: {response.body[:300]!r}")


async def _create_through_gateway(stack: Stack, meeting_id: str) -> None:
    response = await fetch(
        HOST, stack.gateway.ports[0], gateway_path("create", create_params(meeting_id))
    )
    if not SUCCESS.met_by(response):
        raise RuntimeError(f"set-up create {meeting_id} failed: {response.body[:300]!r}")
