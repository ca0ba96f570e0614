"""``bbb-proxy customers|backends|meetings|status`` against a running gateway, and the
one-line exit-2 errors of ``serve``/``demo``/``check-config`` (real processes there)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from proxy import cli as cli_module
from proxy import runtime_service
from proxy.backends.monitor import supervised_poll
from proxy.cli import main
from proxy.simulator import Simulator, serve_simulator
from proxy.store.framing import frame
from proxy.store.local import log_path
from tests.harness import BACKEND_SECRET, SECRETS, Stack, StackFactory, free_port, text, wait_until
from tests.test_cli import assert_one_line

TOKEN = "cli-admin-token"
COMMAND = [sys.executable, "-m", "proxy.cli"]


class Cli:
    """``bbb-proxy ARGS`` in this process (in a thread: the gateway runs in the loop)."""

    def __init__(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        self.stack, self.capsys = stack, capsys

    async def __call__(self, *args: str, expect: int = 0) -> str:
        argv = [*args, "--url", self.stack.url, "--token", TOKEN]
        code = await trio.to_thread.run_sync(main, argv)
        out, err = self.capsys.readouterr()
        assert code == expect, (out, err)
        if expect:
            assert_one_line(err)
        return out if not expect else err

    async def json(self, *args: str) -> Any:
        return orjson.loads(await self(*args, "--json"))


@pytest.fixture
def levels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The log levels ``main`` set up (in this process, the gateway's logging stays)."""
    seen: list[str] = []
    monkeypatch.setattr(cli_module, "setup_logging", lambda level, *_: seen.append(level))
    return seen


@pytest.fixture
async def cli(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str], levels: list[str]
) -> Cli:
    return Cli(await make_stack(proxy={"admin_token": TOKEN}), capsys)


async def test_customers_subcommands(cli: Cli) -> None:
    listed = await cli("customers", "list")
    header, *rows = listed.splitlines()
    assert header.split()[:3] == ["id", "enabled", "max_connections"]
    assert [r.split()[0] for r in rows] == ["acme", "globex", "off"]
    assert all(secret not in listed for secret in SECRETS.values())
    created = await cli(
        "customers", "create", "initech", "--max-connections", "4",
        "--default-max-participants", "2", "--default-duration", "30", "--host", "bbb.initech.test",
    )  # fmt: skip
    secret = created.split("(shown once): ")[1].strip()
    cli.stack.secrets["initech"] = secret
    assert text(await cli.stack.create("room-1", "initech"), "returncode") == "SUCCESS"
    shown = await cli("customers", "show", "initech")
    assert "max_connections           4  (runtime)" in shown and secret not in shown
    await cli("customers", "update", "acme", "--max-connections", "1")
    assert "max_connections           1  (runtime)" in await cli("customers", "show", "acme")
    assert text(await cli.stack.create("big"), "messageKey") == "subscriptionExhausted"
    await cli("customers", "update", "acme", "--reset", "max_connections", "--enabled", "no")
    assert (await cli.json("customers", "show", "acme"))["source"]["max_connections"] == "file"
    assert text(await cli.stack.create("big"), "messageKey") == "apiNotEnabled"
    rotated = await cli("customers", "rotate-secret", "globex", "--grace", "60")
    new = rotated.splitlines()[0].split(": ")[1]
    credentials = await cli("customers", "credentials", "globex")
    assert new in credentials and "globex-new" in credentials and "valid until" in credentials
    timeline = await cli.json("customers", "timeline", "initech")
    assert [m["meeting_id"] for m in timeline["meetings"]] == ["room-1"]
    assert "room-1" in await cli("customers", "timeline", "initech")
    await cli("meetings", "end", "initech", "room-1")
    assert "deleted" in await cli("customers", "delete", "initech")


async def test_backends_subcommands(
    cli: Cli, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_service, "RETIRE_CHECK", 0.05)
    extra = Simulator(BACKEND_SECRET, server_name="bbb-3.test", expire_unjoined_minutes=None)
    url = await nursery.start(serve_simulator, extra)
    await cli(
        "backends", "create", "bbb-3", "--backend-url", url, "--secret", BACKEND_SECRET,
        "--capacity", "5",
    )  # fmt: skip
    listed = await cli("backends", "list")
    assert [r.split()[0] for r in listed.splitlines()[1:]] == ["bbb-1", "bbb-2", "bbb-3"]
    assert BACKEND_SECRET not in listed
    await cli("backends", "drain", "bbb-1")
    await cli("backends", "disable", "bbb-2")
    root = await cli.stack.create("room-1", maxParticipants="2")
    assert text(root, "returncode") == "SUCCESS"
    assert cli.stack.gateway.ledger.get(("acme", "room-1")).backend_id == "bbb-3"  # type: ignore[union-attr]
    await cli("backends", "activate", "bbb-1")
    await cli("backends", "update", "bbb-2", "--reset", "mode", "--capacity", "7")
    shown = await cli.json("backends", "show", "bbb-2")
    assert (shown["mode"], shown["capacity"], shown["source"]["mode"]) == ("active", 7, "file")
    draining = await cli("backends", "delete", "bbb-3")
    assert "draining" in draining
    await cli("meetings", "end", "acme", "room-1")
    await wait_until(lambda: "bbb-3" not in cli.stack.gateway.clients)
    assert "removed" in await cli("backends", "delete", "bbb-2")
    status = await cli("status")
    assert status.splitlines()[1].split()[:3] == ["bbb-1", "up", "active"]
    assert "1 backends (1 accepting meetings, 0 down)" in status


async def test_meetings_subcommands_and_status(cli: Cli) -> None:
    assert text(await cli.stack.create("room-1", maxParticipants="3"), "returncode") == "SUCCESS"
    assert text(await cli.stack.create("a/b", "globex"), "returncode") == "SUCCESS"
    listed = await cli("meetings", "list", "--customer", "acme")
    assert listed.splitlines()[1].split()[:2] == ["acme", "room-1"]
    assert len((await cli.json("meetings", "list")) or []) == 2
    backend = cli.stack.gateway.ledger.get(("globex", "a/b")).backend_id  # type: ignore[union-attr]
    on_it = await cli.json("meetings", "list", "--backend", backend)
    assert "a/b" in [m["meeting_id"] for m in on_it]
    shown = await cli("meetings", "show", "acme", "room-1")
    assert ["connections", "3"] in [line.split() for line in shown.splitlines()]
    assert "ended" in await cli("meetings", "end", "globex", "a/b")
    assert cli.stack.gateway.ledger.get(("globex", "a/b")) is None
    status = await cli.json("status")
    assert status["totals"]["meetings"] == 1


async def test_refusals_are_exit_1_with_one_line(cli: Cli) -> None:
    assert "no customer nobody" in await cli("customers", "show", "nobody", expect=1)
    assert "max_connections" in await cli(
        "customers", "update", "acme", "--max-connections", "0", expect=1
    )
    assert "capacity" in await cli("backends", "update", "bbb-1", "--capacity", "-3", expect=1)
    assert "meetingID" in await cli("meetings", "end", "acme", "none", expect=1)
    assert "customer" in await cli("meetings", "list", "--customer", "nobody", expect=1)


async def test_a_wrong_token_and_no_gateway(
    cli: Cli,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    levels: list[str],
) -> None:
    argv = ["status", "--url", cli.stack.url, "--token", "wrong"]
    assert await trio.to_thread.run_sync(main, argv) == 1
    assert "wrong token" in capsys.readouterr().err
    monkeypatch.setenv("BBB_PROXY_ADMIN_URL", cli.stack.url)
    monkeypatch.setenv("BBB_PROXY_ADMIN_TOKEN", TOKEN)
    assert await trio.to_thread.run_sync(main, ["--log-level", "WARNING", "status"]) == 0
    assert "bbb-1" in capsys.readouterr().out
    assert await trio.to_thread.run_sync(main, ["status", "--log-level", "DEBUG", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["totals"]["backends"] == 2
    assert levels[-2:] == ["WARNING", "DEBUG"]  # before and after the subcommand
    dead = ["status", "--url", f"http://127.0.0.1:{free_port()}"]
    assert await trio.to_thread.run_sync(main, dead) == 2
    assert "cannot reach" in capsys.readouterr().err
    monkeypatch.delenv("BBB_PROXY_ADMIN_TOKEN")
    assert await trio.to_thread.run_sync(main, ["status"]) == 2
    assert "no admin token" in capsys.readouterr().err


# -- exit 2, one line, from real processes -----------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BBB_PROXY")}
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, env=environment, check=False
    )


def config_file(tmp_path: Path, bind: str) -> Path:
    path = tmp_path / "bbb-proxy.toml"
    path.write_text(
        f'[proxy]\nbind = "{bind}"\nstate_dir = "{tmp_path / "state"}"\n'
        '[[backends]]\nid = "bbb-1"\nurl = "http://127.0.0.1:9/bigbluebutton/api"\n'
        'secret = "s"\ncapacity = 10\n'
    )
    return path


@pytest.mark.parametrize(
    ("bind", "needle"),
    [
        ("", "HOST:PORT"),
        ("127.0.0.1", "HOST:PORT"),
        (":8080", "HOST:PORT"),
        ("127.0.0.1:65536", "0-65535"),
        ("127.0.0.1:http", "0-65535"),
        ("no-such-host.invalid:8080", "resolve"),
    ],
)
def test_a_bad_bind_is_one_line_and_exit_2(tmp_path: Path, bind: str, needle: str) -> None:
    config = config_file(tmp_path, bind)
    for command in ("serve", "check-config"):
        done = (
            run(command, str(config))
            if command == "check-config"
            else run("serve", "--config", str(config))
        )
        assert done.returncode == 2, done.stderr
        assert_one_line(done.stderr, "bind", needle)


def test_a_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "--config", str(config_file(tmp_path, f"127.0.0.1:{port}")))
        assert done.returncode == 2, done.stderr
        assert_one_line(done.stderr, "bind", "in use")
        demo = run("demo", "--port", str(port))
        assert demo.returncode == 2, demo.stderr
        assert_one_line(demo.stderr, "in use")


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--port", "70000"],
        ["demo", "--port", "http"],
        ["demo", "--backends", "0"],
        ["demo", "--backends", "many"],
        ["demo", "--colour"],
        ["customers", "frobnicate"],
        ["check-config"],
        ["--log-level", "LOUD", "status"],
        ["nothing"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr, "usage")


def test_check_config(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config" / "example.toml"
    done = run("check-config", str(example), "--log-level", "WARNING")
    assert done.returncode == 0, done.stderr
    assert "ok: 2 backends" in done.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text(example.read_text().replace("capacity = ", "capacity = -", 1))
    done = run("check-config", str(broken))
    assert done.returncode == 2
    assert_one_line(done.stderr, "capacity")


async def test_status_shows_a_dead_backend(cli: Cli) -> None:
    dead = f"http://127.0.0.1:{free_port()}/bigbluebutton/api"
    await cli(
        "backends", "create", "bbb-3", "--backend-url", dead, "--secret", "s", "--capacity", "9"
    )
    gw = cli.stack.gateway
    for _ in range(gw.config.proxy.health.down_after):
        await supervised_poll(gw, "bbb-3")
    status = await cli("status")
    assert status.splitlines()[3].split()[:3] == ["bbb-3", "down", "active"]
    assert "3 backends (2 accepting meetings, 1 down)" in status


def test_a_runtime_log_it_cannot_read_is_exit_3(tmp_path: Path) -> None:
    config = config_file(tmp_path, f"127.0.0.1:{free_port()}")
    state = tmp_path / "state"
    state.mkdir()
    record = orjson.dumps({"op": "vanish", "kind": "customer", "id": "acme"})
    log_path(state, "runtime").write_bytes(frame(record))
    done = run("serve", "--config", str(config))
    assert done.returncode == 3, done.stderr
    assert_one_line(done.stderr, "runtime", "record 1", "vanish")
