"""Recording-ready callbacks over real sockets: the customer's URL replaced on create by the
gateway's signed one, the backend's POST verified (forged ones refused with 401/403), and
the customer POSTed as BBB would, with a JWT signed with the customer's secret and its own
meetingID; retried when the receiver fails, and not lost across a gateway restart."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
import trio
from jwt.warnings import InsecureKeyLengthWarning

from proxy.bbb import recording_ready, rewrite
from proxy.bbb.checksum import signed_query
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from proxy.store.local import read_records
from tests.harness import BACKEND_SECRET, SECRETS, Stack, config_for, free_port, serve_endpoint


@dataclass
class Receiver:
    """A customer's recording-ready endpoint: records every POST, answers ``statuses``
    in turn (then 200)."""

    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def tokens(self) -> list[str]:
        return [parse_qs(b.decode())["signed_parameters"][0] for b in self.bodies]


async def start_receiver(nursery: trio.Nursery, statuses: list[int] | None = None) -> Receiver:
    receiver = Receiver(statuses=list(statuses or []))

    def respond(scope: dict[str, Any], body: bytes) -> int:
        receiver.bodies.append(body)
        return receiver.statuses.pop(0) if receiver.statuses else 200

    receiver.url = f"{await serve_endpoint(nursery, respond)}/bbb/ready"
    return receiver


def claims(token: str, secret: str) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return dict(jwt.decode(token, secret, algorithms=["HS256"]))


async def until(condition: Callable[[], bool], seconds: float = 5) -> None:
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - other servers change it
            await trio.sleep(0.01)


async def recorded(stack: Stack, meeting_id: str, url: str, key: str = "bbb") -> Simulator:
    """A meeting with a recording-ready URL, recorded and ended; its backend."""
    created = await stack.create(
        meeting_id, record="true", **{f"meta_{key}-recording-ready-url": url}
    )
    assert created.findtext("returncode") == "SUCCESS"
    sim, _ = stack.backend_meeting("acme", meeting_id)
    await stack.call("end", [("meetingID", meeting_id)])
    return sim


async def test_the_customer_gets_bbbs_post_signed_with_its_own_secret(
    stack: Stack, nursery: trio.Nursery
) -> None:
    receiver = await start_receiver(nursery)
    created = await stack.create(
        "lecture", record="true", **{"meta_bbb-recording-ready-url": receiver.url}
    )
    sim, backend_meeting = stack.backend_meeting("acme", "lecture")
    metadata = sim.meetings[backend_meeting].metadata
    own = metadata["bbb-recording-ready-url"]
    assert own.startswith(stack.url + recording_ready.PATH + "?")  # the gateway's, not theirs
    info = await stack.call("getMeetingInfo", [("meetingID", "lecture")])
    assert info.findtext("metadata/bbb-recording-ready-url") == receiver.url  # theirs, shown
    await stack.call("end", [("meetingID", "lecture")])
    await stack.call("getRecordings", [])  # the backend publishes (processing: 0 s)
    await until(lambda: len(receiver.bodies) == 2)  # once per format, as BBB sends it
    record_id = created.findtext("internalMeetingID")
    for token in receiver.tokens():
        assert claims(token, SECRETS["acme"]) == {"meeting_id": "lecture", "record_id": record_id}
        with pytest.raises(jwt.InvalidSignatureError):
            claims(token, BACKEND_SECRET)
    listed = await stack.call("getRecordings", [])
    shown = listed.findtext("recordings/recording/metadata/bbb-recording-ready-url")
    assert shown == receiver.url  # the recording's metadata shows the customer's own too


async def test_the_bn_key_is_kept_under_its_own_name(stack: Stack, nursery: trio.Nursery) -> None:
    receiver = await start_receiver(nursery)
    await recorded(stack, "lecture-bn", receiver.url, key="bn")
    await stack.call("getRecordings", [])
    await until(lambda: len(receiver.bodies) == 2)
    listed = await stack.call("getRecordings", [])
    metadata = listed.find("recordings/recording/metadata")
    assert metadata is not None
    assert metadata.findtext("bn-recording-ready-url") == receiver.url
    assert metadata.find("bbb-recording-ready-url") is None


async def test_forged_notices_are_refused(stack: Stack, nursery: trio.Nursery) -> None:
    receiver = await start_receiver(nursery)
    created = await stack.create(
        "room", record="true", **{"meta_bbb-recording-ready-url": receiver.url}
    )
    sim, backend_meeting = stack.backend_meeting("acme", "room")
    own = sim.meetings[backend_meeting].metadata["bbb-recording-ready-url"]
    record_id = created.findtext("internalMeetingID") or ""

    def token(secret: str, meeting: str = backend_meeting) -> dict[str, str]:
        payload = {"meeting_id": meeting, "record_id": record_id}
        return {"signed_parameters": recording_ready.signed_jwt(payload, secret)}

    post = stack.http.post
    assert (await post(own, data=token("wrong secret"))).status_code == 401
    assert (await post(own, data=token(BACKEND_SECRET, "globex~room"))).status_code == 401
    assert (await post(own, data={"other": "x"})).status_code == 401
    tampered = own.replace("m=room", "m=other")
    assert (await post(tampered, data=token(BACKEND_SECRET))).status_code == 403
    unsigned = own.split("&sig=")[0]
    assert (await post(unsigned, data=token(BACKEND_SECRET))).status_code == 403
    assert (await post(own, data=token(BACKEND_SECRET))).status_code == 200
    await until(lambda: len(receiver.bodies) == 1)
    await trio.sleep(0.2)
    assert len(receiver.bodies) == 1  # only the genuine one


async def test_a_customer_cannot_set_the_kept_url(stack: Stack) -> None:
    await stack.create("sneaky", **{f"meta_{rewrite.TAG_PREFIX}bbb-recording-ready-url": "x"})
    sim, backend_meeting = stack.backend_meeting("acme", "sneaky")
    assert not any(
        k.startswith(rewrite.TAG_PREFIX + "bbb-rec") for k in sim.meetings[backend_meeting].metadata
    )


async def test_a_failing_receiver_is_retried_and_a_final_answer_is_not(
    stack: Stack, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recording_ready, "backoff", lambda attempt: 0.05)
    flaky = await start_receiver(nursery, statuses=[500, 503, 500, 503])
    await recorded(stack, "flaky", flaky.url)
    await stack.call("getRecordings", [])
    await until(lambda: len(flaky.bodies) == 6)  # 2 formats: 4 failures, then 2 successes
    gone = await start_receiver(nursery, statuses=[410, 410])
    await recorded(stack, "gone", gone.url)
    await stack.call("getRecordings", [])
    await until(lambda: len(gone.bodies) == 2)
    await trio.sleep(0.3)
    assert len(gone.bodies) == 2  # 410: the application deleted it; never again


async def test_a_url_the_gateway_may_not_call_is_dropped_at_create(stack: Stack) -> None:
    await stack.create("bad", record="true", **{"meta_bbb-recording-ready-url": "ftp://x/y"})
    sim, backend_meeting = stack.backend_meeting("acme", "bad")
    assert "bbb-recording-ready-url" not in sim.meetings[backend_meeting].metadata


async def test_a_restart_between_receiving_and_delivering_loses_nothing(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recording_ready, "backoff", lambda attempt: 3600.0)  # no retry here
    sim = Simulator(BACKEND_SECRET, server_name="bbb-1.test", expire_unjoined_minutes=None)
    sim_url = await nursery.start(serve_simulator, sim)
    receiver = await start_receiver(nursery, statuses=[503, 503])
    journal = tmp_path  # the "recording-ready" log (proxy.store) under state_dir
    async with trio.open_nursery() as first, httpx.AsyncClient(timeout=10) as http:
        _, binds = await first.start(serve_gateway, _config(sim_url, tmp_path))
        api = f"{binds[0]}/acme/bigbluebutton/api"
        params = [
            ("meetingID", "kept"),
            ("name", "Kept room"),
            ("record", "true"),
            ("meta_bbb-recording-ready-url", receiver.url),
        ]
        for call, given in (
            ("create", params),
            ("end", [("meetingID", "kept")]),
            ("getRecordings", []),
        ):
            await http.get(f"{api}/{call}?{signed_query(call, given, SECRETS['acme'])}")
        await until(lambda: len(receiver.bodies) == 2)  # both refused by the receiver
        first.cancel_scope.cancel()
    assert len(_pending(journal)) == 2
    async with trio.open_nursery() as second:
        await second.start(serve_gateway, _config(sim_url, tmp_path))
        await until(lambda: len(receiver.bodies) == 4)  # resumed from state_dir, delivered
        await until(lambda: not _pending(journal))
        second.cancel_scope.cancel()
    for token in receiver.tokens()[2:]:
        assert claims(token, SECRETS["acme"])["meeting_id"] == "kept"


def _pending(state_dir: Path) -> dict[str, recording_ready.Delivery]:
    pending = recording_ready.Pending()
    for record in read_records(state_dir, "recording-ready"):  # the gateway may be writing
        pending.apply(record)
    return pending.deliveries


def _config(sim_url: str, state: Path) -> Any:
    port = free_port()
    own = {
        "state_dir": str(state),
        "bind": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "allow_private_callbacks": True,
    }
    return config_for([sim_url], proxy=own)
