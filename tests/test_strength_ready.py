"""Tests written to kill mutants of ``proxy.bbb.recording_ready`` and
``proxy.calls.recording_ready`` that survived (docs/mutation.md).

On the rules' functions directly: the gateway's signed URL and its check, the JWTs, the
delivery outcomes and backoff, and the queue's records (``claim`` and ``node`` records only
appear with several instances on one Redis, which the in-process selection does not run).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import warnings
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import cast
from urllib.parse import urlencode

import jwt
import orjson
import pytest
import trio
from jwt.warnings import InsecureKeyLengthWarning

from proxy.bbb import recording_ready as rules
from proxy.bbb.rewrite import backend_meeting_id
from proxy.calls import recording_ready as ready_calls
from proxy.config import Backend, StoreSettings
from proxy.errors import StateError, StorageUnavailable
from proxy.gateway import Gateway
from proxy.store import Log, MemoryLog, Record, shared
from proxy.store.local import create_log, log_path, read_records
from proxy.store.redis import RedisStore, open_redis_store
from tests.harness import BACKEND_SECRET, Stack
from tests.redis_server import RedisServer, redis_server
from tests.test_recordings_ready import start_receiver, until

__all__ = ["redis_server"]  # the fixture, used by name below

BACKEND = Backend(id="bbb-1", url="http://bbb-1.test/bigbluebutton", secret="s3cret", capacity=10)
OTHER = Backend(id="bbb-2", url="http://bbb-2.test/bigbluebutton", secret="other", capacity=10)
BACKENDS = {BACKEND.id: BACKEND, OTHER.id: OTHER}
PUBLIC = "https://gw.test"
TARGET = rules.Target("bbb-1", "acme", "room 1", "https://acme.test/ready?x=1")


def delivery(n: int, body: str = "") -> rules.Delivery:
    return rules.Delivery(
        f"acme/rec-{n}/{n}", f"https://acme.test/{n}", "acme", f"m-{n}", f"rec-{n}", body
    )


def decoded(token: str, secret: str) -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return dict(jwt.decode(token, secret, algorithms=["HS256"]))


def encoded(payload: dict[str, object], secret: str, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, secret, algorithm=algorithm)


# -- create ----------------------------------------------------------------------------------


def test_split_keeps_other_params_and_takes_the_first_key_in_bbbs_order() -> None:
    params = [
        ("name", "x"),
        ("META_canvas-recording-ready-url", "https://c.test/"),
        ("meta_bn-recording-ready-url", "https://bn.test/1"),
        ("meta_BN-recording-ready-url", "https://bn.test/2"),
        ("meta_bbb-recording-ready-url", ""),
        ("bbb-recording-ready-url", "https://no-prefix.test/"),
        ("meta_other", "y"),
    ]
    kept, given = rules.split(params)
    assert kept == [
        ("name", "x"),
        ("bbb-recording-ready-url", "https://no-prefix.test/"),
        ("meta_other", "y"),
    ]
    assert given == ("bn-recording-ready-url", "https://bn.test/1")  # first value, empty skipped
    assert rules.split([("meta_bbb-recording-ready-url", "https://b.test/")]) == (
        [],
        ("bbb-recording-ready-url", "https://b.test/"),
    )
    assert rules.split([("a", "1")]) == ([("a", "1")], None)


def test_split_drops_a_url_the_gateway_may_not_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, rules.log.name)
    params = [
        ("meta_bbb-recording-ready-url", "ftp://x.test/"),
        ("meta_bn-recording-ready-url", "https://bn.test/"),
    ]
    assert rules.split(params) == ([], None)  # the first key's URL decides, not the next one
    assert [r.getMessage() for r in caplog.records] == [
        "create: the bbb-recording-ready-url is not a URL the gateway may call; dropped"
    ]


def test_backend_params_and_the_signature_construction() -> None:
    assert rules.backend_params(PUBLIC, BACKEND, "acme", "room 1", None) == []
    params = rules.backend_params(
        PUBLIC, BACKEND, "acme", "room 1", ("bn-recording-ready-url", TARGET.url)
    )
    signed = [("b", "bbb-1"), ("c", "acme"), ("m", "room 1"), ("u", TARGET.url)]
    key = hashlib.sha256(b"bbb-proxy recording-ready:s3cret").digest()
    sig = hmac.new(key, urlencode(signed).encode(), hashlib.sha256).hexdigest()
    own = f"{PUBLIC}/callbacks/v1/recording-ready?{urlencode(signed)}&sig={sig}"
    assert params == [
        ("meta_bbb-recording-ready-url", own),
        ("meta_bbb-proxy-bn-recording-ready-url", TARGET.url),
    ]
    other = rules.signed_url(PUBLIC, "/p", BACKEND, ("acme", "room 1", TARGET.url), b"analytics")
    akey = hashlib.sha256(b"bbb-proxy analytics:s3cret").digest()
    asig = hmac.new(akey, urlencode(signed).encode(), hashlib.sha256).hexdigest()
    assert other == f"{PUBLIC}/p?{urlencode(signed)}&sig={asig}"


# -- the backend's notice --------------------------------------------------------------------


def query_of(url: str) -> str:
    return url.partition("?")[2]


def test_verify_url_reads_back_only_what_the_gateway_signed() -> None:
    own = rules.signed_url(
        PUBLIC, rules.PATH, BACKEND, ("acme", "room 1", TARGET.url), b"recording-ready"
    )
    query = query_of(own)
    assert rules.verify_url(query, BACKENDS) == TARGET
    assert rules.verify_url(query + "&b=bbb-2&sig=0", BACKENDS) == TARGET  # first values
    assert rules.verify_url(query, BACKENDS, b"analytics") is None  # another purpose's key
    for name in ("b", "c", "m", "u", "sig"):
        without = "&".join(p for p in query.split("&") if not p.startswith(name + "="))
        assert rules.verify_url(without, BACKENDS) is None, name
    assert rules.verify_url(query, {"bbb-1": OTHER}) is None  # another secret
    assert rules.verify_url(query.replace("b=bbb-1", "b=bbb-9"), BACKENDS) is None
    assert rules.verify_url(query.replace("m=room", "m=ro0m"), BACKENDS) is None
    sig = query.rpartition("sig=")[2]
    assert rules.verify_url(query.replace(sig, sig.upper()), BACKENDS) is None
    assert rules.verify_url(query.replace(sig, "é" + sig[1:]), BACKENDS) is None
    blank = rules.signed_url(PUBLIC, rules.PATH, BACKEND, ("acme", "", ""), b"recording-ready")
    assert rules.verify_url(query_of(blank), BACKENDS) == rules.Target("bbb-1", "acme", "", "")


def test_verify_url_of_a_query_that_does_not_parse() -> None:
    many = "&".join(["a=1"] * 5) + "&x"  # a field without "=" is kept (blank), not an error
    assert rules.verify_url(many, BACKENDS) is None
    assert rules.verify_url("", BACKENDS) is None


def test_form_token() -> None:
    assert rules.form_token(b"signed_parameters=a.b.c&signed_parameters=d") == "a.b.c"
    assert rules.form_token(b"signed_parameters=&x=1") == ""
    assert rules.form_token(b"x=1") is None
    assert rules.form_token(b"signed_parameters=\xff") is None
    assert rules.form_token("signed_parameters=é".encode()) == "é"


def test_backend_claims() -> None:
    meeting = backend_meeting_id("acme", "room 1")
    good = encoded({"meeting_id": meeting, "record_id": "r-1"}, "s3cret")
    assert rules.backend_claims(good, BACKEND, TARGET) == "r-1"
    assert rules.backend_claims(good, OTHER, TARGET) is None  # another secret
    other_room = rules.Target("bbb-1", "acme", "room 2", TARGET.url)
    assert rules.backend_claims(good, BACKEND, other_room) is None
    payloads: list[dict[str, object]] = [
        {"meeting_id": meeting, "record_id": ""},
        {"meeting_id": meeting, "record_id": 7},
        {"meeting_id": meeting},
        {"record_id": "r-1"},
        {"meeting_id": "room 1", "record_id": "r-1"},
    ]
    for payload in payloads:
        assert rules.backend_claims(encoded(payload, "s3cret"), BACKEND, TARGET) is None, payload
    hs512 = encoded({"meeting_id": meeting, "record_id": "r-1"}, "s3cret", "HS512")
    assert rules.backend_claims(hs512, BACKEND, TARGET) is None
    assert rules.backend_claims("not a jwt", BACKEND, TARGET) is None


def test_jwts_are_hs256_with_the_secret_used_raw() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = rules.signed_jwt({"meeting_id": "m", "record_id": "r"}, "short")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    assert decoded(token, "short") == {"meeting_id": "m", "record_id": "r"}
    form = rules.customer_form(delivery(1), "cust")
    assert list(form) == ["signed_parameters"]
    assert decoded(form["signed_parameters"], "cust") == {"meeting_id": "m-1", "record_id": "rec-1"}


# -- delivery --------------------------------------------------------------------------------


def test_delivery_id() -> None:
    assert rules.delivery_id(TARGET, "r-1", 42) == "acme/r-1/42"


def test_outcome_of_each_answer() -> None:
    assert rules.outcome(None) == "final"
    for status in (401, 404, 410):
        assert rules.outcome(status) == "final"
    for status in (200, 201, 204, 299):
        assert rules.outcome(status) == "done"
    for status in (0, 199, 300, 302, 400, 403, 409, 500, 503):
        assert rules.outcome(status) == "retry", status


def test_backoff_doubles_up_to_twenty_minutes() -> None:
    assert [rules.backoff(a) for a in range(1, 13)] == [
        2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 1200.0, 1200.0
    ]  # fmt: skip
    assert type(rules.backoff(3)) is float
    assert rules.MAX_ATTEMPTS == 12


# -- the queue's records ---------------------------------------------------------------------


FIELDS = {
    "id": "acme/rec-1/1",
    "url": "https://acme.test/1",
    "customer": "acme",
    "meeting_id": "m-1",
    "record_id": "rec-1",
}


def test_the_records() -> None:
    assert rules.queue_record(delivery(1)) == {"op": "queue", **FIELDS}
    assert rules.queue_record(delivery(1), "node-a") == {"op": "queue", **FIELDS, "node": "node-a"}
    assert rules.queue_record(delivery(1, "{}")) == {"op": "queue", **FIELDS, "body": "{}"}
    assert rules.claim_record(("a", "b"), "node-b") == {
        "op": "claim",
        "ids": ["a", "b"],
        "node": "node-b",
    }
    assert rules.done_record("acme/rec-1/1", "final") == {
        "op": "done",
        "id": "acme/rec-1/1",
        "how": "final",
    }


def test_pending_replays_queue_done_and_claim_records() -> None:
    pending = rules.Pending()
    pending.apply(rules.queue_record(delivery(1), "node-a"))
    pending.apply(rules.queue_record(delivery(2, "{}")))
    pending.apply(rules.queue_record(delivery(3), "node-a"))
    assert list(pending.deliveries.values()) == [delivery(1), delivery(2, "{}"), delivery(3)]
    assert pending.owners == {"acme/rec-1/1": "node-a", "acme/rec-3/3": "node-a"}
    pending.apply(rules.claim_record(["acme/rec-1/1", "acme/rec-2/2", "gone"], "node-b"))
    assert pending.owners == {
        "acme/rec-1/1": "node-b",
        "acme/rec-3/3": "node-a",
        "acme/rec-2/2": "node-b",
    }
    assert list(pending.records()) == [
        rules.queue_record(delivery(1), "node-b"),
        rules.queue_record(delivery(2, "{}"), "node-b"),
        rules.queue_record(delivery(3), "node-a"),
    ]
    pending.apply(rules.done_record("acme/rec-1/1", "done"))
    pending.apply(rules.done_record("never queued", "done"))
    assert list(pending.deliveries) == ["acme/rec-2/2", "acme/rec-3/3"]
    assert pending.owners == {"acme/rec-3/3": "node-a", "acme/rec-2/2": "node-b"}
    pending.apply(rules.claim_record([], "node-c"))
    pending.apply({"op": "queue", **FIELDS, "node": ""})
    assert "acme/rec-1/1" not in pending.owners
    assert pending.skipped == 0


def test_records_the_queue_does_not_know_are_state_errors() -> None:
    pending = rules.Pending()
    pending.apply(rules.queue_record(delivery(1)))
    bad: list[dict[str, object]] = [
        {"op": "queue", **FIELDS, "record_id": 1},
        {"op": "queue", **{k: v for k, v in FIELDS.items() if k != "record_id"}},
        {"op": "queue", **{k: v for k, v in FIELDS.items() if k != "id"}},
        {"op": "queue", **FIELDS, "body": 3},
        {"op": "done", "id": 1},
        {"op": "done"},
        {"op": "claim", "ids": ["acme/rec-1/1"], "node": 1},
        {"op": "claim", "ids": ["acme/rec-1/1"]},
        {"op": "claim", "ids": "acme/rec-1/1", "node": "n"},
        {"op": "claim", "node": "n"},
        {"op": "claim", "ids": ["acme/rec-1/1", 2], "node": "n"},
        {"op": "other", "id": "x"},
        {"id": "x", "url": "https://secret.test/?token=t"},
    ]
    for record in bad:
        with pytest.raises(StateError) as caught:
            pending.apply(record)  # type: ignore[arg-type]
        assert (
            str(caught.value)
            == f"not a recording-ready record: op {record.get('op')!r}, keys {sorted(record)}"
        )
    assert list(pending.deliveries.values()) == [delivery(1)]
    assert pending.owners == {}


def test_the_legacy_file_skips_and_counts_what_it_cannot_read() -> None:
    lines = [
        orjson.dumps(rules.queue_record(delivery(1))),
        b"",
        b"   ",
        b"[1, 2]",
        b'{"op": "queue"',
        b'{"op": "nope"}',
        orjson.dumps(rules.queue_record(delivery(2))),
        orjson.dumps(rules.done_record("acme/rec-1/1", "done")),
    ]
    pending = rules.Pending.from_legacy(lines)
    assert list(pending.deliveries.values()) == [delivery(2)]
    assert pending.skipped == 3
    assert rules.Pending.from_legacy([]) == rules.Pending()


# -- over real sockets (proxy.calls.recording_ready) -----------------------------------------


async def genuine_notice(stack: Stack, url: str) -> tuple[str, str, Callable[..., dict[str, str]]]:
    """A meeting whose recording-ready URL is ``url``: the gateway's URL the backend was
    given, the backend's id, and a maker of the backend's form."""
    created = await stack.create("room", record="true", **{"meta_bbb-recording-ready-url": url})
    assert created.findtext("returncode") == "SUCCESS"
    sim, backend_meeting = stack.backend_meeting("acme", "room")
    reservation = stack.gateway.ledger.get(("acme", "room"))
    assert reservation is not None

    def form(secret: str = BACKEND_SECRET, record_id: str = "rec-1") -> dict[str, str]:
        payload = {"meeting_id": backend_meeting, "record_id": record_id}
        return {"signed_parameters": rules.signed_jwt(payload, secret)}

    own = sim.meetings[backend_meeting].metadata["bbb-recording-ready-url"]
    return own, reservation.backend_id, form


async def test_a_refused_jwt_is_logged_with_its_backend(
    stack: Stack, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = await start_receiver(nursery)
    own, backend_id, form = await genuine_notice(stack, receiver.url)
    caplog.set_level(logging.WARNING, ready_calls.log.name)
    assert (await stack.http.post(own, data=form("wrong secret"))).status_code == 401
    warnings_ = [r.getMessage() for r in caplog.records if r.name == ready_calls.log.name]
    assert warnings_ == [f"recording-ready from {backend_id}: JWT refused"]


async def test_a_queued_notice_is_journaled_under_its_record_id(
    stack: Stack, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules, "backoff", lambda attempt: 3600.0)
    receiver = await start_receiver(nursery, statuses=[503])
    own, _, form = await genuine_notice(stack, receiver.url)
    assert (await stack.http.post(own, data=form(record_id="rec-9"))).status_code == 200
    await until(lambda: len(receiver.bodies) == 1)
    await trio.sleep(0.3)
    assert len(receiver.bodies) == 1  # refused once: the next try is an hour away
    records = read_records(Path(stack.config.proxy.state_dir), "recording-ready")
    assert len(records) == 1
    queued = dict(records[0])
    assert str(queued.pop("id")).startswith("acme/rec-9/")
    assert queued == {
        "op": "queue",
        "url": receiver.url,
        "customer": "acme",
        "meeting_id": "room",
        "record_id": "rec-9",
    }


def test_compaction_names_no_instance_for_a_delivery_without_one() -> None:
    pending = rules.Pending()
    pending.apply(rules.queue_record(delivery(1)))
    pending.apply(rules.queue_record(delivery(2), "node-a"))
    assert list(pending.records()) == [
        {"op": "queue", **FIELDS},
        rules.queue_record(delivery(2), "node-a"),
    ]


NO_SPACE = "[Errno 28] No space left on device"


class RefusingStore:
    """A local log whose disk refuses every write (``flush`` raises as the store's does)."""

    def __init__(self) -> None:
        self.appended: list[object] = []

    def append(self, record: object) -> None:
        self.appended.append(record)

    async def flush(self) -> None:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise StorageUnavailable("recording-ready: cannot write") from e


async def test_a_notice_that_cannot_be_journaled_is_503_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RefusingStore()
    queue = ready_calls.ReadyQueue(cast(Gateway, None), cast(Log, store), rules.Pending())
    caplog.set_level(logging.ERROR, ready_calls.log.name)
    assert await queue._queued(delivery(1)) == 503
    assert store.appended == [rules.queue_record(delivery(1))]
    assert [r.getMessage() for r in caplog.records] == [
        "recording-ready acme/rec-1/1 not durable yet: [Errno 28] No space left on device"
    ]


def gateway_stub(state_dir: Path) -> Gateway:
    """What :meth:`ReadyQueue.open` reads of a gateway: its state_dir, journal timeout, stores."""
    proxy = SimpleNamespace(state_dir=str(state_dir), journal_timeout=1.0)
    return cast(Gateway, SimpleNamespace(config=SimpleNamespace(proxy=proxy), stores={}))


def test_open_resumes_the_logs_deliveries_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    create_log(
        tmp_path,
        "recording-ready",
        [rules.queue_record(delivery(1)), rules.queue_record(delivery(2))],
    )
    caplog.set_level(logging.INFO, ready_calls.log.name)
    gw = gateway_stub(tmp_path)
    queue = ready_calls.ReadyQueue.open(gw)
    assert queue.pending == [delivery(1), delivery(2)]
    assert queue.node == ""
    assert queue._maintain == queue._log.maintain  # the local log's recovery and compaction
    assert list(gw.stores) == ["recording-ready"]
    assert gw.stores["recording-ready"].failed is False
    assert [r.getMessage() for r in caplog.records] == ["recording-ready: 2 deliveries to resume"]
    caplog.clear()
    empty = gateway_stub(tmp_path / "empty")
    assert ready_calls.ReadyQueue.open(empty).pending == []
    assert caplog.records == []


LEGACY_LINES = b"".join(
    orjson.dumps(r) + b"\n"
    for r in (
        rules.queue_record(delivery(1)),
        rules.queue_record(delivery(2)),
        rules.done_record("acme/rec-1/1", "done"),
    )
)


def test_the_legacy_file_is_converted_with_its_count_of_unreadable_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = tmp_path / "recording-ready.jsonl"
    legacy.write_bytes(LEGACY_LINES + b'[1]\n{"op": "que')
    caplog.set_level(logging.INFO, ready_calls.log.name)
    ready_calls._convert_legacy(tmp_path)
    assert not legacy.exists()
    assert read_records(tmp_path, "recording-ready") == [rules.queue_record(delivery(2))]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"{legacy}: 2 unreadable records skipped"),
        (logging.INFO, f"{legacy} converted to {log_path(tmp_path, 'recording-ready')}"),
    ]
    caplog.clear()
    ready_calls._convert_legacy(tmp_path)  # nothing to convert: nothing written, nothing said
    assert caplog.records == []
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "recording-ready.jsonl").write_bytes(LEGACY_LINES)
    ready_calls._convert_legacy(clean)
    assert [r.getMessage() for r in caplog.records] == [
        f"{clean / 'recording-ready.jsonl'} converted to {log_path(clean, 'recording-ready')}"
    ]


def test_a_legacy_file_over_the_logs_bound_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = tmp_path / "recording-ready.jsonl"
    legacy.write_bytes(LEGACY_LINES)
    monkeypatch.setattr(ready_calls, "MAX_LOG_BYTES", len(LEGACY_LINES) - 1)
    with pytest.raises(StateError) as caught:
        ready_calls._convert_legacy(tmp_path)
    assert str(caught.value) == f"{legacy}: over {len(LEGACY_LINES) - 1} bytes"
    assert legacy.exists() and not log_path(tmp_path, "recording-ready").exists()
    monkeypatch.setattr(ready_calls, "MAX_LOG_BYTES", len(LEGACY_LINES))  # the bound itself is fine
    ready_calls._convert_legacy(tmp_path)
    assert read_records(tmp_path, "recording-ready") == [rules.queue_record(delivery(2))]


class GatewayStub:
    """What a delivery reads of the gateway: the customer's secret, and the tallies it adds."""

    def __init__(self, customers: tuple[str, ...] = ("acme",)) -> None:
        self.customers = customers
        self.tallies: list[tuple[str, str]] = []

    def customer(self, customer_id: str) -> object:
        return (
            SimpleNamespace(secrets=("cust-1", "cust-2")) if customer_id in self.customers else None
        )

    def tally(self, name: str, how: str) -> None:
        self.tallies.append((name, how))


def delivery_queue(
    gw: GatewayStub, store: RefusingStore | MemoryLog, answers: list[int | None]
) -> tuple[ready_calls.ReadyQueue, list[str]]:
    """A queue whose POSTs answer ``answers`` in turn; the secrets they were signed with."""
    queue = ready_calls.ReadyQueue(cast(Gateway, gw), cast(Log, store), rules.Pending())
    secrets: list[str] = []

    async def post(delivery: rules.Delivery, secret: str) -> int | None:
        assert isinstance(delivery, rules.Delivery)
        secrets.append(secret)
        return answers.pop(0)

    queue._post = post  # type: ignore[method-assign]
    return queue, secrets


async def test_attempts_back_off_and_give_up_after_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = GatewayStub()
    queue, secrets = delivery_queue(gw, MemoryLog(), [500] * 12)
    caplog.set_level(logging.WARNING, ready_calls.log.name)
    d = delivery(1)
    for n in range(1, 12):
        before = trio.current_time()
        assert await queue._attempt(d) == "retry"
        assert queue._attempts == {d.id: n}
        assert (
            before + rules.backoff(n) <= queue._due[d.id] <= trio.current_time() + rules.backoff(n)
        )
    assert await queue._attempt(d) == "gave-up"
    assert secrets == ["cust-1"] * 12  # the customer's first secret
    assert gw.tallies == [("recording_ready_deliveries", "retry")] * 11
    assert [r.getMessage() for r in caplog.records] == [
        f"recording-ready {d.id}: giving up after 12 attempts"
    ]


async def test_an_attempts_outcome(caplog: pytest.LogCaptureFixture) -> None:
    gw = GatewayStub()
    queue, secrets = delivery_queue(gw, MemoryLog(), [204, 410, None])
    assert [await queue._attempt(delivery(n)) for n in (1, 2, 3)] == ["done", "final", "final"]
    assert queue._attempts == {} and queue._due == {} and gw.tallies == []
    caplog.set_level(logging.WARNING, ready_calls.log.name)
    gone = rules.Delivery("globex/r/1", "https://g.test/", "globex", "m", "r")
    assert await queue._attempt(gone) == "final"
    assert len(secrets) == 3  # not POSTed
    assert [r.getMessage() for r in caplog.records] == [
        "recording-ready globex/r/1: customer globex is gone"
    ]


async def test_the_end_of_a_delivery_is_recorded_tallied_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw, store = GatewayStub(), MemoryLog()
    queue, _ = delivery_queue(gw, store, [])
    await queue._queued(delivery(1))
    queue._attempts[delivery(1).id] = 3
    caplog.set_level(logging.INFO, ready_calls.log.name)
    await queue._finish(delivery(1), "final")
    assert store.durable == [
        rules.queue_record(delivery(1)),
        rules.done_record(delivery(1).id, "final"),
    ]
    assert queue.pending == [] and queue._due == {} and queue._attempts == {}
    assert gw.tallies == [("recording_ready_deliveries", "final")]
    assert [r.getMessage() for r in caplog.records] == [f"recording-ready {delivery(1).id}: final"]


async def test_an_end_that_cannot_be_journaled_is_logged_and_still_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = GatewayStub()
    queue, _ = delivery_queue(gw, RefusingStore(), [])
    caplog.set_level(logging.INFO, ready_calls.log.name)
    await queue._finish(delivery(1), "done")
    assert gw.tallies == [("recording_ready_deliveries", "done")]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.ERROR,
            f"recording-ready {delivery(1).id}: end not durable yet: {NO_SPACE}",
        ),
        (logging.INFO, f"recording-ready {delivery(1).id}: done"),
    ]


async def test_a_delivery_that_fails_is_logged_and_tried_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = GatewayStub()
    queue, _ = delivery_queue(gw, MemoryLog(), [])
    d = delivery(1)
    await queue._queued(d)

    def broken(customer_id: str) -> object:
        raise RuntimeError("boom")

    gw.customer = broken  # type: ignore[method-assign]
    queue._busy.add(d.id)
    queue._wake = trio.Event()
    caplog.set_level(logging.INFO, ready_calls.log.name)
    before = trio.current_time()
    await queue._deliver(d)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, f"recording-ready delivery {d.id} failed")
    ]
    assert before + 2 <= queue._due[d.id] <= trio.current_time() + 2  # backoff(1)
    assert queue._busy == set() and queue._wake.is_set()
    assert queue.pending == [d]


async def test_a_delivery_is_finished_unless_it_is_retried() -> None:
    gw = GatewayStub()
    queue, _ = delivery_queue(gw, MemoryLog(), [503, 200])
    d = delivery(1)
    await queue._queued(d)
    for expected in ([d], []):
        queue._busy.add(d.id)
        queue._wake = trio.Event()
        await queue._deliver(d)
        assert queue.pending == expected
        assert queue._busy == set() and queue._wake.is_set()
    assert gw.tallies == [
        ("recording_ready_deliveries", "retry"),
        ("recording_ready_deliveries", "done"),
    ]


async def test_receive_answers_each_notice() -> None:
    gw = GatewayStub()
    gw.backends = lambda: [BACKEND, OTHER]  # type: ignore[attr-defined]
    store = MemoryLog()
    queue, _ = delivery_queue(gw, store, [])
    own = rules.signed_url(
        PUBLIC, rules.PATH, BACKEND, ("acme", "room 1", TARGET.url), b"recording-ready"
    )
    query = query_of(own)
    meeting = backend_meeting_id("acme", "room 1")

    def body(secret: str = "s3cret", record_id: str = "r-1") -> bytes:
        token = encoded({"meeting_id": meeting, "record_id": record_id}, secret)
        return urlencode({"signed_parameters": token}).encode()

    assert await queue.receive(query.replace("m=room", "m=rooom"), body()) == 403
    assert await queue.receive(query, body("other")) == 401
    assert await queue.receive(query, b"x=1") == 401
    assert await queue.receive(query, b"\xff") == 401
    assert store.durable == [] and store.pending == []
    assert await queue.receive(query, body(record_id="r-7")) == 200
    assert len(store.durable) == 1 and store.pending == []
    record = dict(store.durable[0])
    customer, record_id, sequence = str(record.pop("id")).split("/")
    assert (customer, record_id) == ("acme", "r-7") and sequence.isdigit()
    assert record == {
        "op": "queue",
        "url": TARGET.url,
        "customer": "acme",
        "meeting_id": "room 1",
        "record_id": "r-7",
    }
    assert [d.record_id for d in queue.pending] == ["r-7"]
    assert queue._wake.is_set()


class SharedLogStub:
    """The shared log as :meth:`ReadyQueue._claim_gone` uses it: this instance is "b", the
    instances in ``alive`` still run, and a claim goes in (and is applied) while ``still()``."""

    node = "b"
    shared = True

    def __init__(self, pending: rules.Pending, alive: set[str]) -> None:
        self.pending, self.alive_nodes = pending, alive
        self.claims: list[object] = []

    async def alive(self, node: str) -> bool:
        return node in self.alive_nodes

    async def claim(self, record: Record, still: Callable[[], bool]) -> bool:
        if not still():
            return False
        self.pending.apply(record)
        self.claims.append(record)
        return True


async def test_the_deliveries_of_gone_instances_are_claimed_in_chunks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pending = rules.Pending()
    queue = ready_calls.ReadyQueue(cast(Gateway, GatewayStub()), cast(Log, MemoryLog()), pending)
    shared = SharedLogStub(pending, alive={"c"})
    queue._log = shared  # type: ignore[assignment]
    for n in range(2):
        pending.apply(rules.queue_record(delivery(1000 + n), "c"))  # alive: left alone
    a_ids = [delivery(n).id for n in range(450)]
    for n in range(450):
        pending.apply(rules.queue_record(delivery(n), "a"))  # gone
    pending.apply(rules.queue_record(delivery(2000), "b"))  # this instance's own
    pending.apply(rules.queue_record(delivery(3000)))  # no instance named
    caplog.set_level(logging.INFO, ready_calls.log.name)
    queue._wake = trio.Event()
    await queue._claim_gone()
    assert shared.claims == [
        rules.claim_record(a_ids[:200], "b"),
        rules.claim_record(a_ids[200:400], "b"),
        rules.claim_record(a_ids[400:], "b"),
        rules.claim_record([delivery(3000).id], "b"),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "recording-ready: 200 deliveries taken over",
        "recording-ready: 200 deliveries taken over",
        "recording-ready: 50 deliveries taken over",
        "recording-ready: 1 deliveries taken over",
    ]
    assert queue._wake.is_set()
    assert queue._owners_now() == {
        **{delivery(1000 + n).id: "c" for n in range(2)},
        **dict.fromkeys(a_ids, "b"),
        delivery(2000).id: "b",
        delivery(3000).id: "b",
    }
    caplog.clear()
    await queue._claim_gone()  # nothing left to claim
    assert len(shared.claims) == 4 and caplog.records == []


async def test_another_instances_compaction_clears_then_replays_the_queue() -> None:
    queue, _ = delivery_queue(GatewayStub(), MemoryLog(), [])
    await queue._queued(delivery(1))
    queue._clear()  # the shared log was compacted by another instance: its records follow
    assert queue.pending == [] and queue._owners_now() == {}
    queue._apply_other(rules.queue_record(delivery(2), "node-a"))
    assert queue.pending == [delivery(2)]
    assert queue._owners_now() == {delivery(2).id: "node-a"}


def test_open_names_the_log_and_the_record_it_cannot_replay(tmp_path: Path) -> None:
    records: list[Record] = [rules.queue_record(delivery(1)), {"op": "requeue", "id": "x"}]
    create_log(tmp_path, "recording-ready", records)
    with pytest.raises(StateError) as caught:
        ready_calls.ReadyQueue.open(gateway_stub(tmp_path))
    path = log_path(tmp_path, "recording-ready")
    assert str(caught.value) == (
        f"{path}: record 2: not a recording-ready record: op 'requeue', keys ['id', 'op']"
    )


def test_a_legacy_file_that_cannot_be_read_is_a_state_error_naming_it(tmp_path: Path) -> None:
    legacy = tmp_path / "recording-ready.jsonl"
    legacy.mkdir()  # exists, cannot be read as a file
    with pytest.raises(StateError) as caught:
        ready_calls._convert_legacy(tmp_path)
    assert str(caught.value) == f"cannot read {legacy}: Is a directory"


# -- the delivery loop (deliver_forever) on the local store ----------------------------------


class CountingQueue(ready_calls.ReadyQueue):
    """A queue whose delivery loop's rounds are counted (each round reads ``pending`` once)."""

    rounds = 0

    @property
    def pending(self) -> list[rules.Delivery]:
        self.rounds += 1
        return super().pending


def looping_queue(
    store: Log, pending: rules.Pending, posted: list[str], status: int = 503
) -> CountingQueue:
    """A queue on ``store`` whose POSTs answer ``status``, the ids POSTed in ``posted``."""
    queue = CountingQueue(cast(Gateway, GatewayStub()), store, pending)

    async def post(delivery: rules.Delivery, secret: str) -> int | None:
        posted.append(delivery.id)
        return status

    queue._post = post  # type: ignore[method-assign]
    return queue


def replayed(records: list[Record]) -> rules.Pending:
    pending = rules.Pending()
    for record in records:
        pending.apply(record)
    return pending


async def test_at_start_up_the_local_log_is_compacted_and_its_maintenance_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rules, "backoff", lambda attempt: 3600.0)
    records = [
        rules.queue_record(delivery(1)),
        rules.done_record(delivery(1).id, "done"),
        rules.queue_record(delivery(2)),
    ]
    store, posted, maintained = MemoryLog(records), list[str](), list[str]()
    queue = looping_queue(cast(Log, store), replayed(records), posted)

    async def maintain() -> None:
        maintained.append("started")
        await trio.sleep_forever()

    queue._maintain = maintain
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.deliver_forever)
        await until(lambda: posted == [delivery(2).id])
        assert store.compactions == 1  # before the first delivery: what is still to deliver
        assert store.durable == [rules.queue_record(delivery(2))]
        assert maintained == ["started"]
        nursery.cancel_scope.cancel()


async def test_a_start_up_compaction_the_disk_refuses_does_not_end_the_loop() -> None:
    store, posted = MemoryLog([rules.queue_record(delivery(1))]), list[str]()
    store.failed = True  # compact and flush raise StorageUnavailable
    queue = looping_queue(cast(Log, store), replayed(store.durable), posted, status=200)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.deliver_forever)  # no maintenance task (None): none started
        await until(lambda: queue._pending.deliveries == {})
        assert posted == [delivery(1).id] and store.compactions == 0
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_with_nothing_due_the_loop_waits() -> None:
    queue = looping_queue(cast(Log, MemoryLog()), rules.Pending(), [])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.deliver_forever)
        await trio.sleep(0.3)
        assert queue.rounds == 1  # one round, then asleep until a notice (or an hour)
        nursery.cancel_scope.cancel()


# -- several instances on one Redis (a real redis-server) -------------------------------------


def redis_at(server: RedisServer) -> AbstractAsyncContextManager[RedisStore]:
    """A new connection to ``server``, as another gateway instance would open it."""
    return open_redis_store(StoreSettings(kind="redis", url=server.url), timeout=2.0)


def shared_queue(store: RedisStore, posted: list[str]) -> CountingQueue:
    """An instance's queue on ``store``'s log, as :meth:`ReadyQueue.open` makes it there (its
    maintenance: following, the heartbeat); its POSTs answer 503 (retried in an hour)."""
    log_, records = store.open(ready_calls.LOG)
    queue = looping_queue(log_, replayed(records), posted)
    queue._maintain = queue._log.maintain
    return queue


@pytest.fixture
def quick_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Following and claims every 50 ms; a heartbeat every 50 ms lasting 5 s; no second try."""
    monkeypatch.setattr(shared, "FOLLOW_EVERY", 0.05)
    monkeypatch.setattr(shared, "HEARTBEAT_EVERY", 0.05)
    monkeypatch.setattr(shared, "HEARTBEAT_TTL", 5.0)
    monkeypatch.setattr(ready_calls, "CLAIM_EVERY", 0.05)
    monkeypatch.setattr(rules, "backoff", lambda attempt: 3600.0)


@pytest.mark.usefixtures("quick_shared")
async def test_on_redis_each_instance_delivers_its_own_and_takes_over_a_gone_ones(
    redis_server: RedisServer,
) -> None:
    d1, d2, d3 = (delivery(n).id for n in (1, 2, 3))
    async with (
        redis_at(redis_server) as g,
        redis_at(redis_server) as a_store,
        redis_at(redis_server) as b_store,
    ):
        a_posted: list[str] = []
        b_posted: list[str] = []
        gone, a = shared_queue(g, []), shared_queue(a_store, a_posted)
        b = shared_queue(b_store, b_posted)
        assert await gone._queued(delivery(1)) == 200  # its instance never runs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.deliver_forever)
            await until(lambda: a_posted == [d1])  # taken over, then delivered
            assert await a._queued(delivery(2)) == 200
            await until(lambda: a_posted == [d1, d2])
            await b._log.refresh()  # b's queue: a's two deliveries, then its own
            assert b._owners_now() == {d1: a.node, d2: a.node}
            assert await b._queued(delivery(3)) == 200
            nursery.start_soon(b.deliver_forever)
            await until(lambda: b_posted == [d3])
            await trio.sleep(0.6)  # a dozen looks for deliveries of gone instances
            assert a_posted == [d1, d2] and b_posted == [d3]  # a runs: nothing taken
            assert await b._log.alive(a.node) and await a._log.alive(b.node)
            assert b._owners_now() == {d1: a.node, d2: a.node, d3: b.node}
            nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("quick_shared")
async def test_another_instances_record_wakes_the_delivery_loop(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ready_calls, "CLAIM_EVERY", 3600.0)  # no look for gone instances
    async with redis_at(redis_server) as a_store, redis_at(redis_server) as b_store:
        b_posted: list[str] = []
        a, b = shared_queue(a_store, []), shared_queue(b_store, b_posted)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.deliver_forever)
            await trio.sleep(0.3)
            assert b.rounds == 1  # nothing due: asleep
            assert await a._queued(delivery(1)) == 200
            await until(lambda: b.rounds >= 2, seconds=3)  # followed within 50 ms: woken
            await trio.sleep(0.1)
            assert b.rounds == 2 and b_posted == []  # a's to deliver
            assert b._owners_now() == {delivery(1).id: a.node}
            nursery.cancel_scope.cancel()


async def test_the_shared_log_is_compacted_to_the_queue_and_the_others_rebuild_from_it(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with redis_at(redis_server) as a_store, redis_at(redis_server) as b_store:
        a, b = shared_queue(a_store, []), shared_queue(b_store, [])
        for n in (1, 2):
            assert await a._queued(delivery(n)) == 200
        await a._finish(delivery(1), "done")
        await b._log.refresh()
        assert b._owners_now() == {delivery(2).id: a.node}
        caplog.set_level(logging.INFO, shared.log.name)
        await a._log.compact()  # as the shared log's maintenance does when due
        raw = await a_store.read(ready_calls.LOG)
        assert [record for _, record in raw.entries] == [rules.queue_record(delivery(2), a.node)]
        b._pending.apply(rules.queue_record(delivery(9), "c"))  # gone from the log since
        await b._log.refresh()
        assert b._owners_now() == {delivery(2).id: a.node}
        assert [r.getMessage() for r in caplog.records if r.name == shared.log.name] == [
            "the recording-ready log compacted (shared)",
            "the recording-ready log read again whole: state rebuilt",
        ]


async def test_a_retry_is_made_when_its_backoff_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "backoff", lambda attempt: 0.1)
    posted: list[str] = []
    answers = [503, 200]
    queue = looping_queue(cast(Log, MemoryLog()), replayed([rules.queue_record(delivery(1))]), [])

    async def post(delivery: rules.Delivery, secret: str) -> int | None:
        posted.append(delivery.id)
        return answers.pop(0)

    queue._post = post  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.deliver_forever)
        await until(lambda: queue._pending.deliveries == {}, seconds=3)  # not in an hour
        assert posted == [delivery(1).id] * 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("allow", [True, False])
async def test_a_delivery_is_posted_as_bbb_would_with_the_customers_secret(
    monkeypatch: pytest.MonkeyPatch, allow: bool
) -> None:
    calls: list[tuple[object, ...]] = []

    async def post_customer_url(*args: object) -> int | None:
        calls.append(args)
        return 204

    monkeypatch.setattr(ready_calls, "post_customer_url", post_customer_url)
    outbound = object()
    proxy = SimpleNamespace(allow_private_callbacks=allow)
    gw = SimpleNamespace(outbound=outbound, config=SimpleNamespace(proxy=proxy))
    queue = ready_calls.ReadyQueue(cast(Gateway, gw), cast(Log, MemoryLog()), rules.Pending())
    assert await queue._post(delivery(1), "cust-1") == 204
    assert calls == [(outbound, delivery(1).url, rules.customer_form(delivery(1), "cust-1"), allow)]
