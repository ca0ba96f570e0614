"""``bbb-proxy``'s exit codes, from a real process: 2 configuration, 3 state, 130 Ctrl-C.

Each failure at start-up is one line on stderr naming what is wrong, never a traceback.
SIGINT has two meanings: before the gateway serves (still loading or reconciling) it is
Ctrl-C and the process exits 130; once it serves, SIGINT is a stop request like SIGTERM,
in-flight requests finish and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from tests.harness import free_port

COMMAND = [sys.executable, "-m", "proxy.cli"]


def config_text(port: int, backend_url: str, state_dir: Path, *, capacity: str = "10") -> str:
    return (
        f'[proxy]\nbind = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'state_dir = "{state_dir}"\n'
        f'[[backends]]\nid = "bbb-1"\nurl = "{backend_url}"\nsecret = "s"\n'
        f"capacity = {capacity}\n"
        '[[customers]]\nid = "acme"\nsecret = "acme-secret"\nmax_connections = 10\n'
        "default_max_participants = 2\ndefault_duration = 60\n"
    )


def serve(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "BBB_PROXY_CONFIG"} | env
    return subprocess.run(
        [*COMMAND, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )


def assert_one_line(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("bbb-proxy: ")]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], stderr


# -- 2: configuration --------------------------------------------------------------------------


def test_no_configuration_is_exit_2() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "BBB_PROXY_CONFIG"}
    done = subprocess.run(
        [*COMMAND, "serve"], capture_output=True, text=True, timeout=60, env=environment
    )
    assert done.returncode == 2
    assert_one_line(done.stderr, "configuration", "--config")


def test_a_missing_configuration_file_is_exit_2(tmp_path: Path) -> None:
    done = serve(tmp_path / "nowhere.toml")
    assert done.returncode == 2
    assert_one_line(done.stderr, "configuration", "nowhere.toml")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("this is [not toml", "configuration"),
        (
            config_text(1, "http://127.0.0.1:9/bigbluebutton/api", Path("s"), capacity='"many"'),
            "capacity",
        ),
    ],
)
def test_a_wrong_configuration_is_exit_2(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "bbb-proxy.toml"
    config.write_text(text)
    done = serve(config)
    assert done.returncode == 2
    assert_one_line(done.stderr, "configuration", needle)


def test_the_config_path_may_come_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "env.toml"
    config.write_text("not = [valid")
    environment = {**os.environ, "BBB_PROXY_CONFIG": str(config)}
    done = subprocess.run(
        [*COMMAND, "serve"], capture_output=True, text=True, timeout=60, env=environment
    )
    assert done.returncode == 2
    assert_one_line(done.stderr, "configuration")


# -- 3: state ----------------------------------------------------------------------------------


def frame(payload: object) -> bytes:
    body = orjson.dumps(payload)
    return b"%08x %s\n" % (zlib.crc32(body), body)


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("snapshot", b"not a snapshot\n[]", ("snapshot",)),
        (
            "journal.00000001",
            frame({"seq": 1, "op": "vanish", "customer": "acme", "meeting_id": "m"}),
            ("journal.00000001", "byte 0"),
        ),
        (
            "journal.00000001",
            b"ffffffff {}\n"
            + frame({"seq": 1, "op": "confirm", "customer": "a", "meeting_id": "m"}),
            ("journal.00000001", "byte 0"),
        ),
    ],
)
def test_a_damaged_state_is_exit_3(
    tmp_path: Path, name: str, content: bytes, needles: tuple[str, ...]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_bytes(content)
    config = tmp_path / "bbb-proxy.toml"
    config.write_text(config_text(free_port(), "http://127.0.0.1:9/bigbluebutton/api", state))
    done = serve(config)
    assert done.returncode == 3, done.stderr
    assert_one_line(done.stderr, *needles)


def test_a_state_dir_that_cannot_be_made_is_exit_3(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    config = tmp_path / "bbb-proxy.toml"
    config.write_text(
        config_text(free_port(), "http://127.0.0.1:9/bigbluebutton/api", blocker / "state")
    )
    done = serve(config)
    assert done.returncode == 3, done.stderr
    assert_one_line(done.stderr, "a-file")


# -- 130 and 0: SIGINT -------------------------------------------------------------------------


async def start_silent_backend(nursery: trio.Nursery) -> tuple[str, trio.Event]:
    """A 'BBB server' that accepts connections and never answers; the event says one came."""
    connected = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        connected.set()
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/bigbluebutton/api", connected


async def run_gateway(
    nursery: trio.Nursery, tmp_path: Path, backend_url: str
) -> tuple[trio.Process, int, Path]:
    port = free_port()
    config = tmp_path / "bbb-proxy.toml"
    config.write_text(config_text(port, backend_url, tmp_path / "state"))
    err = tmp_path / "stderr.txt"
    with err.open("wb") as sink:
        command = [*COMMAND, "serve", "--config", str(config)]
        run = trio.run_process  # started in the nursery: returns when the process has exited
        process: trio.Process = await nursery.start(
            lambda task_status: run(
                command,
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                task_status=task_status,
            )
        )
    return process, port, err


async def test_sigint_during_start_up_is_exit_130(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Start-up reconciles with every backend before serving; Ctrl-C while it waits: 130."""
    backend_url, connected = await start_silent_backend(nursery)
    process, port, err = await run_gateway(nursery, tmp_path, backend_url)
    with trio.fail_after(30):
        await connected.wait()  # the gateway is asking the backend, not serving yet
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.TransportError):
            await http.get(f"http://127.0.0.1:{port}/healthz")
    process.send_signal(signal.SIGINT)
    with trio.fail_after(30):
        code = await process.wait()
    assert code == 130
    assert "Traceback" not in err.read_text()


async def test_sigint_while_serving_stops_cleanly_with_exit_0(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # A closed port: the start-up poll fails at once and the gateway serves.
    process, port, err = await run_gateway(nursery, tmp_path, f"http://127.0.0.1:{free_port()}/b")
    async with httpx.AsyncClient() as http:
        with trio.fail_after(30):
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await trio.sleep(0.05)
    process.send_signal(signal.SIGINT)
    with trio.fail_after(30):
        code = await process.wait()
    assert code == 0
    assert "Traceback" not in err.read_text()
    assert (tmp_path / "state" / "snapshot").exists()  # the final snapshot of a clean stop
