"""The recording-ready queue on the store's "recording-ready" log: the JSON lines file of
earlier versions converted once, and a damaged log stopping start-up with exit 3."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trio

from proxy.bbb import recording_ready
from proxy.errors import StateError
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator
from proxy.store import Record
from proxy.store.framing import frame
from proxy.store.local import create_log, log_path, read_records
from tests.harness import BACKEND_SECRET, SECRETS
from tests.test_recordings_ready import _config, claims, start_receiver, until
from tests.test_storage_faults import serve, write_config

LEGACY = "recording-ready.jsonl"


def delivery(n: int, url: str) -> recording_ready.Delivery:
    return recording_ready.Delivery(f"acme/rec-{n}/{n}", url, "acme", f"room-{n}", f"rec-{n}")


def legacy_lines(url: str) -> bytes:
    """As the earlier versions wrote it: two queued, one of them done, and a torn line."""
    lines = [
        {"op": "queue", **_fields(delivery(1, url))},
        {"op": "queue", **_fields(delivery(2, url))},
        {"op": "done", "id": delivery(1, url).id, "how": "done"},
    ]
    return b"".join(orjson.dumps(line) + b"\n" for line in lines) + b'{"op": "que'


def _fields(d: recording_ready.Delivery) -> dict[str, str]:
    return {k: getattr(d, k) for k in ("id", "url", "customer", "meeting_id", "record_id")}


async def test_the_legacy_file_is_converted_once_and_its_deliveries_made(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    receiver = await start_receiver(nursery)
    (tmp_path / LEGACY).write_bytes(legacy_lines(receiver.url))
    sim = Simulator(BACKEND_SECRET, server_name="bbb-1.test")
    sim_url = await nursery.start(serve_simulator, sim)
    async with trio.open_nursery() as gateway:
        await gateway.start(serve_gateway, _config(sim_url, tmp_path))
        await until(lambda: len(receiver.bodies) == 1)
        await until(lambda: not _still_queued(tmp_path))
        gateway.cancel_scope.cancel()
    assert not (tmp_path / LEGACY).exists()
    assert claims(receiver.tokens()[0], SECRETS["acme"]) == {
        "meeting_id": "room-2",
        "record_id": "rec-2",
    }
    await trio.sleep(0.2)
    assert len(receiver.bodies) == 1  # the one done before the upgrade is not made again


def _still_queued(state_dir: Path) -> dict[str, recording_ready.Delivery]:
    pending = recording_ready.Pending()
    for record in read_records(state_dir, "recording-ready"):
        pending.apply(record)
    return pending.deliveries


def test_after_a_crash_mid_conversion_the_log_wins(tmp_path: Path) -> None:
    from proxy.calls.recording_ready import _convert_legacy

    create_log(tmp_path, "recording-ready", [recording_ready.queue_record(delivery(3, "u"))])
    (tmp_path / LEGACY).write_bytes(legacy_lines("http://old"))
    _convert_legacy(tmp_path)
    assert not (tmp_path / LEGACY).exists()
    assert list(_still_queued(tmp_path)) == ["acme/rec-3/3"]


def test_a_record_the_queue_does_not_know_is_a_state_error_naming_the_file(
    tmp_path: Path,
) -> None:
    from proxy.calls.recording_ready import _replayed

    path = log_path(tmp_path, "recording-ready")
    records: list[Record] = [
        recording_ready.queue_record(delivery(1, "u")),
        {"op": "requeue", "id": "x"},
    ]
    with pytest.raises(StateError, match=f"{path}: record 2: not a recording-ready record"):
        _replayed(records, path)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda good: b"0000dead {}\n" + good, "corrupt record at byte 0"),
        (lambda good: good + frame(b'{"op":"requeue"}'), "record 2: not a recording-ready"),
    ],
)
def test_a_damaged_log_at_start_up_exits_3_naming_file_and_place(
    tmp_path: Path, damage: object, fragment: str
) -> None:
    state_dir = tmp_path / "state"
    create_log(state_dir, "recording-ready", [recording_ready.queue_record(delivery(1, "u"))])
    path = log_path(state_dir, "recording-ready")
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    done = serve(write_config(tmp_path / "c.toml", state_dir))
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]  # backend polls may be logged before it
    assert last.startswith("bbb-proxy: ") and str(path) in last and fragment in last, last


async def test_the_recording_ready_log_is_one_of_the_gateways_stores(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sim_url = await nursery.start(serve_simulator, Simulator(BACKEND_SECRET))
    async with trio.open_nursery() as gateway:
        gw, _ = await gateway.start(serve_gateway, _config(sim_url, tmp_path))
        assert gw.stores["recording-ready"].failed is False
        gateway.cancel_scope.cancel()
