"""Pool-wide unique voice bridges (issue 12 §1): the choice, the ledger's admission, the
journal's format, and end to end over real sockets (creates, ends, a restart)."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from lxml import etree

from proxy.backends.monitor import reconcile_all
from proxy.bbb.checksum import signed_query
from proxy.config import FsapiSettings, VoiceSettings, load
from proxy.errors import NonUniqueVoiceBridge, NoVoiceBridge, StateError
from proxy.ledger import codec
from proxy.ledger.model import (
    Admit,
    BackendSpec,
    Bridges,
    Confirm,
    CreateRequest,
    Duplicate,
    LedgerState,
    Refuse,
    Release,
    Reservation,
    Reserve,
)
from proxy.placement import BackendLoad, Ring
from proxy.simulator import Simulator
from proxy.simulator.model import ApiRequest
from proxy.store.framing import frame
from proxy.voice import bridges
from tests.harness import Stack, text
from tests.voice_stack import VoiceFactory, voice_stacks

BACKENDS = [BackendSpec("b1", 1000, True), BackendSpec("b2", 1000, True)]
EXAMPLE = Path(__file__).parent.parent / "config" / "example.toml"


@pytest.fixture
async def make_voice(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[VoiceFactory]:
    async with voice_stacks(nursery, tmp_path) as make:
        yield make


# -- choosing a number -------------------------------------------------------------------------


def test_a_bridge_is_one_to_nine_ascii_digits() -> None:
    assert all(map(bridges.is_bridge, ["1", "70757", "123456789", "00012"]))
    for bad in ["", "1234567890", "12a", " 123", "-12", "١٢٣", "1_000", "²"]:
        assert not bridges.is_bridge(bad), bad


def test_choices_are_random_not_sequential_and_repeat_under_a_seed() -> None:
    def draw(seed: int) -> list[str]:
        rng, drawn = random.Random(seed), list[str]()
        for _ in range(50):
            chosen = bridges.choose(set(drawn), 5, rng)
            assert chosen is not None and chosen not in drawn
            drawn.append(chosen)
        return drawn

    first = draw(7)
    assert first == draw(7) and first != draw(8)
    assert all(len(b) == 5 and b[0] != "0" for b in first)
    steps = {int(b) - int(a) for a, b in itertools.pairwise(first)}
    assert len(steps) > 40  # no fixed stride: one PIN does not tell the next


def test_a_full_space_has_no_choice_and_a_nearly_full_one_its_last_number() -> None:
    rng = random.Random(3)
    held = {str(n) for n in range(10, 100)}  # every 2-digit bridge
    assert bridges.choose(held, 2, rng) is None
    held.discard("57")
    assert bridges.choose(held, 2, rng) == "57"
    assert bridges.choose(set(), 1, rng) in {str(n) for n in range(1, 10)}


# -- the ledger's admission --------------------------------------------------------------------


def request(meeting: str, customer: str = "acme", bridge: str | None = None) -> CreateRequest:
    return CreateRequest(customer, meeting, f"{customer}~{meeting}", 1, 60, 0, bridge)


def admit(
    state: LedgerState,
    req: CreateRequest,
    *,
    length: int = 5,
    rng: random.Random | None = None,
    backends: Sequence[BackendSpec] = BACKENDS,
    now: float = 0.0,
    limit: int = 1000,
) -> Admit | Duplicate | Refuse:
    """Decide and apply in one step, as :class:`proxy.ledger.service.Ledger` does."""
    ring = Ring([b.id for b in backends])

    def choose(loads: Mapping[str, BackendLoad]) -> str | None:
        return ring.choose(req.backend_meeting_id, req.connections, loads)

    voice = Bridges(length, rng or random.Random(0))
    decision = state.admit(req, limit, backends, choose, now, voice=voice)
    if isinstance(decision, Admit):
        if decision.replaces is not None:
            state.apply(Release(decision.replaces.key, "moved"))
        for victim in decision.victims:
            state.apply(Release(victim.key, "preempted"))
        state.apply(Reserve(decision.reservation))
        state.apply(Confirm(decision.reservation.key))
    return decision


def admitted(decision: Admit | Duplicate | Refuse) -> Reservation:
    assert isinstance(decision, Admit), decision
    return replace(decision.reservation, confirmed=True)  # as admit() left it


def test_admission_gives_each_meeting_its_own_bridge_and_frees_it_at_the_end() -> None:
    state, rng = LedgerState(), random.Random(1)
    numbers = [admitted(admit(state, request(f"m{i}"), length=1, rng=rng)) for i in range(9)]
    assert sorted(r.voice_bridge for r in numbers) == [str(n) for n in range(1, 10)]
    refused = admit(state, request("tenth"), length=1, rng=rng)
    assert isinstance(refused, Refuse) and isinstance(refused.error, NoVoiceBridge)
    assert refused.error.message_key == "noServerCapacity"
    freed = numbers[4].voice_bridge
    state.apply(Release(numbers[4].key, "end"))
    assert state.by_voice_bridge(freed) is None and not state.bridge_taken(freed)
    assert admitted(admit(state, request("tenth"), length=1, rng=rng)).voice_bridge == freed


def test_a_customers_own_bridge_is_kept_when_free_and_refused_when_any_meeting_holds_it() -> None:
    state = LedgerState()
    own = admitted(admit(state, request("lesson", bridge="70757")))
    assert own.voice_bridge == "70757"
    assert state.by_voice_bridge("70757") == own
    for other in (request("other", bridge="70757"), request("x", "globex", bridge="70757")):
        refused = admit(state, other)
        assert isinstance(refused, Refuse) and isinstance(refused.error, NonUniqueVoiceBridge)
        assert refused.error.message_key == "nonUniqueVoiceBridge"
    # A repeated create of the same meeting is a duplicate, whatever it asks.
    assert isinstance(admit(state, request("lesson", bridge="12345")), Duplicate)
    # Any length of digits BBB would take; the gateway's own are of the configured one.
    assert admitted(admit(state, request("short", bridge="042"))).voice_bridge == "042"


def test_a_meeting_moved_off_a_down_backend_keeps_its_bridge() -> None:
    state = LedgerState()
    first = admitted(admit(state, request("m")))
    state.suspend(first.backend_id)
    others = [b for b in BACKENDS if b.id != first.backend_id]
    before = state.get(first.key)
    moved = admit(state, request("m"), rng=random.Random(99), backends=others)
    assert isinstance(moved, Admit) and moved.replaces == before
    assert moved.reservation.backend_id != first.backend_id
    assert moved.reservation.voice_bridge == first.voice_bridge
    assert state.by_voice_bridge(first.voice_bridge) == state.get(first.key)


def test_preempted_meetings_bridges_are_not_given_to_the_meeting_that_ends_them() -> None:
    """The backend may not have ended the victim yet: its PIN is still in use there."""
    state = LedgerState()
    old = admitted(admit(state, request("old"), length=1, now=0.0, limit=1))
    for n in range(1, 10):
        if str(n) != old.voice_bridge:
            state.apply(
                Reserve(Reservation("globex", f"g{n}", "b1", f"g~{n}", 1, 1, 0, 0.0, True, str(n)))
            )
    late = admit(state, request("new"), length=1, now=7200.0, limit=1)
    assert isinstance(late, Refuse) and isinstance(late.error, NoVoiceBridge)
    assert state.get(old.key) == old  # nothing ended for a meeting that was not admitted


def test_only_confirmed_meetings_are_found_by_their_bridge() -> None:
    state = LedgerState()
    pending = Reservation("acme", "p", "b1", "acme~p", 1, 60, 0, 1.0, False, "55555")
    state.apply(Reserve(pending))
    assert state.bridge_taken("55555") and state.by_voice_bridge("55555") is None
    state.apply(Confirm(pending.key))
    found = state.by_voice_bridge("55555")
    assert found is not None and found.key == pending.key


def test_adopted_meetings_sharing_a_bridge_hold_it_until_the_last_one_goes() -> None:
    state = LedgerState()
    a = Reservation("acme", "a", "b1", "acme~a", 1, 60, 0, 1.0, True, "12345")
    b = Reservation("globex", "b", "b2", "globex~b", 1, 60, 0, 2.0, True, "12345")
    state.apply(Reserve(a))
    state.apply(Reserve(b))
    assert state.by_voice_bridge("12345") == b  # the latest created
    state.apply(Release(b.key, "gone"))
    assert state.by_voice_bridge("12345") == a
    state.apply(Release(a.key, "gone"))
    assert not state.bridge_taken("12345")


class BridgeMachine(RuleBasedStateMachine):
    """Random creates (some asking for a bridge), confirms, ends, backends down and up
    over a space of 9 bridges: no two held meetings ever share one, every refusal is
    explained, and a replay of the records gives the same bridges."""

    def __init__(self) -> None:
        super().__init__()
        self.state = LedgerState()
        self.rng = random.Random(0)
        self.records: list[Reserve | Confirm | Release] = []

    def apply(self, record: Reserve | Confirm | Release) -> None:
        self.records.append(record)
        self.state.apply(record)

    @rule(
        customer=st.sampled_from(["acme", "globex"]),
        meeting=st.integers(0, 14),
        asked=st.none() | st.integers(1, 9).map(str),
    )
    def create(self, customer: str, meeting: int, asked: str | None) -> None:
        req = request(f"m{meeting}", customer, asked)
        key = (customer, f"m{meeting}")
        held = {r.voice_bridge for r in self.state if r.key != key}
        ring = Ring(["b1", "b2"])
        decision = self.state.admit(
            req,
            1000,
            [
                BackendSpec("b1", 1000, "b1" not in self.state.suspended),
                BackendSpec("b2", 1000, True),
            ],
            lambda loads: ring.choose(req.backend_meeting_id, 1, loads),
            0.0,
            voice=Bridges(1, self.rng),
        )
        match decision:
            case Refuse(NonUniqueVoiceBridge()):
                assert asked in held
            case Refuse(NoVoiceBridge()):
                assert asked is None and len(held) == 9
            case Admit(reservation, _victims, replaces):
                assert reservation.voice_bridge not in held
                assert asked is None or reservation.voice_bridge == asked
                if replaces is not None:
                    self.apply(Release(replaces.key, "moved"))
                self.apply(Reserve(reservation))
            case Duplicate(existing):
                assert existing.key == key and existing.backend_id not in self.state.suspended
            case Refuse(error):
                raise AssertionError(f"refused for no reason: {error!r}")

    @rule(customer=st.sampled_from(["acme", "globex"]), meeting=st.integers(0, 14))
    def confirm(self, customer: str, meeting: int) -> None:
        self.apply(Confirm((customer, f"m{meeting}")))

    @precondition(lambda self: len(self.state) > 0)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from(sorted(r.key for r in self.state)))
        self.apply(Release(victim, "end"))

    @rule()
    def backend_down(self) -> None:
        self.state.suspend("b1")

    @rule()
    def backend_up(self) -> None:
        self.state.resume("b1")

    @invariant()
    def no_two_running_meetings_share_a_bridge(self) -> None:
        held = [r.voice_bridge for r in self.state]
        assert all(held) and len(held) == len(set(held))
        for r in self.state:
            assert self.state.bridge_taken(r.voice_bridge)
            assert self.state.by_voice_bridge(r.voice_bridge) == (r if r.confirmed else None)

    @invariant()
    def a_replay_holds_the_same_bridges(self) -> None:
        replayed = LedgerState()
        for record in self.records:
            replayed.apply(record)
        assert {r.key: r.voice_bridge for r in replayed} == {
            r.key: r.voice_bridge for r in self.state
        }


TestBridgeMachine = BridgeMachine.TestCase
TestBridgeMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- the journal -------------------------------------------------------------------------------


OLD_RESERVE = {
    "seq": 1,
    "op": "reserve",
    "customer": "acme",
    "meeting_id": "m1",
    "backend_id": "b1",
    "backend_meeting_id": "acme~m1",
    "connections": 5,
    "duration": 60,
    "asked_duration": 0,
    "created_at": 10.5,
    "confirmed": False,
}


def test_a_record_written_before_voice_bridges_reads_as_holding_none() -> None:
    entry = codec.decode_record(OLD_RESERVE)
    assert isinstance(entry.record, Reserve) and entry.record.reservation.voice_bridge == ""


def test_a_bridge_survives_the_journal_and_a_snapshot() -> None:
    r = Reservation("acme", "m1", "b1", "acme~m1", 5, 60, 0, 10.5, True, "70757")
    line = codec.encode_record(3, Reserve(r))
    (entry,) = codec.scan_segment(line, "journal").entries
    assert entry.record == Reserve(r)
    snapshot = codec.decode_snapshot(codec.encode_snapshot(codec.Snapshot(3, (r,))), "snap")
    assert snapshot.reservations == (r,)
    # One without a bridge is written as before: an older gateway reads it unchanged.
    plain = codec.reservation_fields(Reservation("a", "m", "b", "a~m", 1, 1, 1, 1.0))
    assert "voice_bridge" not in plain


@pytest.mark.parametrize("bad", [12345, "", "12a45", "1234567890", None, True])
def test_a_malformed_bridge_in_the_journal_stops_start_up_naming_the_place(bad: Any) -> None:
    record = {**OLD_RESERVE, "voice_bridge": bad}
    if bad == "":  # written by nobody, but it means "none": accepted
        assert codec.decode_record(record).record == codec.decode_record(OLD_RESERVE).record
        return
    data = frame(orjson.dumps(record)) + frame(orjson.dumps({**OLD_RESERVE, "seq": 2}))
    with pytest.raises(
        StateError, match=r"journal: invalid record at byte 0: field 'voice_bridge'"
    ):
        codec.scan_segment(data, "journal")


# -- end to end --------------------------------------------------------------------------------


async def create(
    stack: Stack, meeting: str, customer: str = "acme", **params: str
) -> etree._Element:
    return await stack.create(meeting, customer, **params)


def bridge_of(root: etree._Element) -> str:
    assert text(root, "returncode") == "SUCCESS", etree.tostring(root)
    return text(root, "voiceBridge")


def backend_bridges(stack: Stack) -> list[str]:
    """Every live meeting's voice bridge, as the simulated servers hold them."""
    return [m.voice_bridge for sim in stack.sims for m in sim.meetings.values() if not m.ended]


async def test_200_meetings_over_3_backends_and_2_customers_get_different_bridges(
    make_voice: VoiceFactory,
) -> None:
    voice = await make_voice(
        voice={"dial_number": "+1 555 0100", "dial_numbers": {"globex": "+49 30 1234567"}},
    )
    stack = voice.stack
    assert stack is not None
    answers: dict[tuple[str, str], str] = {}

    async def one(i: int) -> None:
        customer = ("acme", "globex")[i % 2]
        root = await create(stack, f"room-{i}", customer)
        answers[(customer, f"room-{i}")] = bridge_of(root)
        dial = "+49 30 1234567" if customer == "globex" else "+1 555 0100"
        assert text(root, "dialNumber") == dial

    async with trio.open_nursery() as creates:  # concurrently: admission is atomic
        for i in range(200):
            creates.start_soon(one, i)
    assert len(set(answers.values())) == 200
    assert all(len(b) == 5 and b[0] != "0" for b in answers.values())
    assert sorted(backend_bridges(stack)) == sorted(answers.values())
    assert {r.backend_id for r in stack.gateway.ledger.state} == {"bbb-1", "bbb-2", "bbb-3"}
    for key, bridge in answers.items():
        held = stack.gateway.ledger.get(key)
        assert held is not None and held.voice_bridge == bridge
    info = await stack.call("getMeetingInfo", [("meetingID", "room-7")], "globex")
    assert text(info, "voiceBridge") == answers[("globex", "room-7")]
    assert text(info, "dialNumber") == "+49 30 1234567"
    own = await create(stack, "own-number", "globex", dialNumber="+1 800 555")
    assert text(own, "dialNumber") == "+1 800 555"  # the customer's own is kept
    listed = await stack.call("getMeetings", [], "acme")
    assert {m.findtext("voiceBridge") for m in listed.iter("meeting")} == {
        b for (c, _), b in answers.items() if c == "acme"
    }


async def test_bridges_stay_unique_across_a_restart_and_freed_ones_are_given_again(
    make_voice: VoiceFactory,
) -> None:
    """Two-digit bridges (90 of them): the pool fills, ends free some, a restart keeps
    every held one, and the freed ones (only those) are given to new meetings."""
    voice = await make_voice(voice={"length": 2})
    stack = voice.stack
    assert stack is not None
    held: dict[str, str] = {}
    for i in range(90):
        held[f"m{i}"] = bridge_of(await create(stack, f"m{i}", ("acme", "globex")[i % 2]))
    assert sorted(held.values()) == [str(n) for n in range(10, 100)]
    full = await create(stack, "one-too-many")
    assert text(full, "messageKey") == "noServerCapacity"
    ended = [f"m{i}" for i in range(0, 40, 4)]  # ten, all acme's (even numbers)
    for meeting in ended:
        end = await stack.call("end", [("meetingID", meeting)], "acme")
        assert text(end, "returncode") == "SUCCESS"
    freed = {held.pop(meeting) for meeting in ended}

    await voice.stop()
    stack = await voice.start()  # the same state_dir; the BBBs kept their meetings
    assert {r.meeting_id: r.voice_bridge for r in stack.gateway.ledger.state} == held
    given = {bridge_of(await create(stack, f"new-{i}", "globex")) for i in range(10)}
    assert given == freed
    assert text(await create(stack, "again"), "messageKey") == "noServerCapacity"
    live = backend_bridges(stack)
    assert len(live) == len(set(live)) == 90


async def test_a_customers_own_bridge_is_honoured_when_free_and_refused_when_taken(
    make_voice: VoiceFactory,
) -> None:
    voice = await make_voice()
    stack = voice.stack
    assert stack is not None
    assert bridge_of(await create(stack, "mine", "acme", voiceBridge="70757")) == "70757"
    for customer, meeting in (("globex", "theirs"), ("acme", "another")):
        root = await create(stack, meeting, customer, voiceBridge="70757")
        assert text(root, "returncode") == "FAILED"
        assert text(root, "messageKey") == "nonUniqueVoiceBridge"
        assert text(root, "message") == "The selected voice bridge is already in use."
        assert stack.gateway.ledger.get((customer, meeting)) is None
    bad = await create(stack, "odd", "acme", voiceBridge="12ab")
    assert (text(bad, "messageKey"), text(bad, "message")) == (
        "validationError",
        "Voice bridge must be an integer.",
    )
    # The duplicate create of the meeting keeps its bridge (BBB ignores the new one).
    again = await create(stack, "mine", "acme", voiceBridge="11111")
    assert (bridge_of(again), text(again, "messageKey")) == ("70757", "duplicateWarning")
    await stack.call("end", [("meetingID", "mine")], "acme")
    assert bridge_of(await create(stack, "theirs", "globex", voiceBridge="70757")) == "70757"


class Rigged(random.Random):
    """A random source whose first draws are given (then seeded random ones)."""

    def __init__(self, first: list[int]) -> None:
        super().__init__(5)
        self.first = first

    def choice(self, seq: Sequence[Any]) -> Any:  # type: ignore[override]  # ranges only
        if self.first:
            wanted = self.first.pop(0)
            assert wanted in seq
            return wanted
        return super().choice(seq)


async def test_a_backend_holding_the_chosen_bridge_is_skipped_and_the_next_gets_another(
    make_voice: VoiceFactory,
) -> None:
    """A meeting the gateway does not know (made on the server directly) holds 44444 on
    the backend the create is placed on: that backend refuses, another one gets the
    meeting with a new bridge, and the customer sees SUCCESS."""
    voice = await make_voice()
    stack = voice.stack
    assert stack is not None
    gw = stack.gateway
    loads = {b.id: BackendLoad(b.id, b.capacity, 0, True) for b in stack.config.backends}
    placed = gw.ring.choose("acme~lesson", 1, loads)
    assert placed is not None
    outside = [("meetingID", "outside"), ("name", "Outside"), ("voiceBridge", "44444")]
    assert (await gw.client(placed).call("create", outside)).ok
    gw.ledger.rng = Rigged([44444, 55555])
    root = await create(stack, "lesson")
    assert bridge_of(root) == "55555"
    held = gw.ledger.get(("acme", "lesson"))
    assert held is not None and held.backend_id != placed and held.voice_bridge == "55555"


async def test_with_allocation_off_the_backends_choose_as_before(make_voice: VoiceFactory) -> None:
    voice = await make_voice(voice={"allocate": False})
    stack = voice.stack
    assert stack is not None
    chosen = bridge_of(await create(stack, "aa"))
    held = stack.gateway.ledger.get(("acme", "aa"))
    assert held is not None and held.voice_bridge == "" and len(chosen) == 5
    assert bridge_of(await create(stack, "bb", voiceBridge="70757")) == "70757"
    assert text(await create(stack, "cc", dialNumber="+1 800 1"), "dialNumber") == "+1 800 1"


def test_the_example_config_shows_every_voice_and_fsapi_key() -> None:
    example = EXAMPLE.read_text()
    for cls, table in ((VoiceSettings, "[voice]"), (FsapiSettings, "[fsapi]")):
        assert table in example
        for key in cls.__dataclass_fields__:
            assert f"# {key} = " in example or f"[{table[1:-1]}.{key}]" in example, key
    loaded = load(EXAMPLE)
    assert (loaded.voice.length, loaded.fsapi.password) == (5, "")


# -- the simulated BBB ---------------------------------------------------------------------------


def sim_create(sim: Simulator, meeting: str, bridge: str) -> etree._Element:
    params = [("meetingID", meeting), ("name", meeting), ("voiceBridge", bridge)]
    reply = sim.handle(ApiRequest("create", raw_query=signed_query("create", params, "s")))
    return etree.fromstring(reply.body.encode())


def test_the_simulated_bbb_keeps_a_given_bridge_and_refuses_it_twice_on_one_server() -> None:
    sim, other = Simulator("s"), Simulator("s")
    assert bridge_of(sim_create(sim, "m1", "00123")) == "00123"  # as written, as bbb-web
    taken = sim_create(sim, "m2", "00123")
    assert (text(taken, "messageKey"), text(taken, "message")) == (
        "nonUniqueVoiceBridge",
        "The selected voice bridge is already in use.",
    )
    assert bridge_of(sim_create(sim, "m3", "123")) == "123"  # another number
    assert bridge_of(sim_create(other, "m2", "00123")) == "00123"  # another server
    bad = sim_create(sim, "m4", "12a")
    assert text(bad, "messageKey") == "validationError"
    sim.end_meeting(sim.meetings["m1"], forcibly=True)
    assert bridge_of(sim_create(sim, "m5", "00123")) == "00123"  # free once it ended


async def test_a_meeting_the_ledger_lost_is_adopted_with_its_bridge(
    make_voice: VoiceFactory,
) -> None:
    """Reconciliation reserves a tagged meeting again from the server's list: its PIN is
    held again (no new meeting gets it) and routes calls again."""
    voice = await make_voice()
    stack = voice.stack
    assert stack is not None
    pin = bridge_of(await create(stack, "kept", "globex"))
    gw = stack.gateway
    await gw.ledger.release(("globex", "kept"), "gone")  # the ledger forgot it
    assert not gw.ledger.state.bridge_taken(pin)
    await reconcile_all(gw)
    adopted = gw.ledger.get(("globex", "kept"))
    assert adopted is not None and adopted.voice_bridge == pin
    assert gw.ledger.state.by_voice_bridge(pin) == adopted
    refused = await create(stack, "copycat", "acme", voiceBridge=pin)
    assert text(refused, "messageKey") == "nonUniqueVoiceBridge"
